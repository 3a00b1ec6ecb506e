"""Hub IO: convert dense timm checkpoints to FDConv ones, push and pull them, and say what a checkpoint holds.

A checkpoint folder is timm's ``save_for_hf`` layout (model.safetensors + config.json, README.md model card),
so ``timm.create_model("hf-hub:ORG/REPO", pretrained=True)`` loads what ``push`` writes. Weights are only
ever read from safetensors. Every output folder is written next to its final place and renamed into it, so
an interrupted run leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from . import models as _models  # noqa: F401  registers the FDConv families
from .layers.reference import check_keys_and_shapes
from .models._fdconv import fdconv_checkpoint_filter

ORG_ENV = 'FDCONV_ZOO_ORG'
DEFAULT_ORG = 'fdconv-zoo'
WEIGHTS, CONFIG, CARD = 'model.safetensors', 'config.json', 'README.md'


class HubError(RuntimeError):
    """A checkpoint or Hub operation failed; the message names the repo, file or key."""


def hub_org(org: str | None = None) -> str:
    """The Hub organisation: the argument, else $FDCONV_ZOO_ORG, else 'fdconv-zoo'."""
    return org or os.environ.get(ORG_ENV) or DEFAULT_ORG


def full_repo_id(repo: str, org: str | None = None) -> str:
    """'name' -> 'ORG/name'; 'owner/name' stays."""
    return repo if '/' in repo else f'{hub_org(org)}/{repo}'


@contextmanager
def _atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir`` that replaces it only if the block succeeds."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', dir=out.parent))
    try:
        yield tmp
        if out.exists():
            if any(out.iterdir()):
                raise HubError(f"output folder {out} exists and is not empty")
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise HubError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise HubError(f"{path} is not valid JSON: {e}") from None
    arch = config.get('architecture')
    if arch not in timm.list_models('*_fdconv'):
        raise HubError(f"{path}: architecture {arch!r} is not an fdconv_zoo architecture "
                       f"(one of {timm.list_models('*_fdconv')})")
    return config


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a truncated or corrupted file is an error naming it."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise HubError(f"{path} not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise HubError(f"{path} is not a readable safetensors file ({e})") from None


def load_checkpoint(folder: str | os.PathLike, **kwargs: Any) -> torch.nn.Module:
    """Build the model a checkpoint folder describes and load its weights, checking every key and shape."""
    folder = Path(folder)
    config = read_config(folder)
    state_dict = read_weights(folder / WEIGHTS)
    model_args = {'num_classes': config.get('num_classes', 1000), **config.get('model_args', {}), **kwargs}
    model = timm.create_model(config['architecture'], pretrained_cfg_overlay=config.get('pretrained_cfg'),
                              **model_args)
    _load_strict(model, state_dict, folder / WEIGHTS)
    return model


def _load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: Path | str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise HubError(f"{source} does not fit {type(model).__name__}: missing keys {missing[:5]}, "
                       f"unexpected keys {unexpected[:5]}")
    try:
        check_keys_and_shapes(own, state_dict, type(model).__name__)
    except ValueError as e:
        raise HubError(f"{source}: {e}") from None
    model.load_state_dict(state_dict)


def _dense_source(source: str, arch: str | None) -> tuple[dict[str, torch.Tensor], str, int, dict[str, Any]]:
    """(state dict, FDConv architecture, classes, pretrained cfg) of a dense source: a local safetensors file,
    a timm name/tag or an hf-hub: id (downloaded through timm, safetensors preferred)."""
    if os.path.exists(source):
        if not arch:
            raise HubError(f"converting the local file {source} needs --arch (an FDConv architecture)")
        _check_arch(arch)
        state_dict = read_weights(source)
        head = f"{timm.models.get_pretrained_cfg(arch).classifier}.weight"
        if head not in state_dict:
            raise HubError(f"{source}: no classifier weight '{head}' (is it a {arch.replace('_fdconv', '')} "
                           f"checkpoint?)")
        return state_dict, arch, state_dict[head].shape[0], {}
    try:
        dense = timm.create_model(source, pretrained=True)
    except RuntimeError as e:
        raise HubError(f"could not load dense checkpoint {source!r}: {e}") from None
    arch = arch or f"{dense.pretrained_cfg.get('architecture') or source.split('.')[0]}_fdconv"
    _check_arch(arch)
    return dense.state_dict(), arch, dense.num_classes, dict(dense.pretrained_cfg)


def _check_arch(arch: str) -> None:
    if arch not in timm.list_models('*_fdconv'):
        raise HubError(f"{arch!r} is not an fdconv_zoo architecture (one of {timm.list_models('*_fdconv')})")


def convert(source: str, out_dir: str | os.PathLike, arch: str | None = None, **fdconv_options: Any) -> Path:
    """Dense timm checkpoint -> FDConv checkpoint folder (model.safetensors + config.json, save_for_hf layout).
    The converted model reproduces the dense one exactly at step 0."""
    state_dict, arch, num_classes, source_cfg = _dense_source(source, arch)
    model = timm.create_model(arch, num_classes=num_classes, **fdconv_options)
    try:
        converted = fdconv_checkpoint_filter(state_dict, model)
    except (KeyError, ValueError) as e:
        raise HubError(f"{source}: {e}") from None
    _load_strict(model, converted, source)
    data_keys = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode', 'license', 'test_input_size',
                 'test_crop_pct', 'label_names', 'label_descriptions')
    cfg = {k: v for k, v in source_cfg.items() if k in data_keys and v is not None}
    cfg['notes'] = (f'FDConv layers converted from the dense checkpoint {source}; equal to it at step 0.',)
    with _atomic_dir(out_dir) as tmp:
        timm.models.save_for_hf(model, tmp, model_config={'pretrained_cfg': cfg}, model_args=dict(fdconv_options),
                                safe_serialization=True)
    return Path(out_dir)


def info(path_or_repo: str, revision: str | None = None) -> dict[str, Any]:
    """What a checkpoint holds: architecture, classes, parameter count, FDConv layers and their options,
    dtypes, size; from a local folder or a Hub repo (only config.json and the safetensors header are read)."""
    folder = Path(path_or_repo)
    if not folder.is_dir():
        folder = Path(_download(path_or_repo, [CONFIG, WEIGHTS], revision))
    config = read_config(folder)
    weights = folder / WEIGHTS
    try:
        with safe_open(str(weights), 'pt') as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    except FileNotFoundError:
        raise HubError(f"{weights} not found") from None
    except (SafetensorError, OSError) as e:
        raise HubError(f"{weights} is not a readable safetensors file ({e})") from None
    layers = sorted({k[:-len('.fdw.spectrum')] for k in shapes if k.endswith('.fdw.spectrum')})
    model_args = {'num_classes': config.get('num_classes', 1000), **config.get('model_args', {})}
    with torch.device('meta'):  # parameter names without allocating them
        params = {n for n, _ in timm.create_model(config['architecture'], **model_args).named_parameters()}
    n_params = sum(int(torch.Size(s).numel()) for k, s in shapes.items() if k in params)
    return {
        'path': str(folder), 'architecture': config['architecture'], 'num_classes': config.get('num_classes'),
        'label_names': config.get('label_names'), 'model_args': config.get('model_args', {}),
        'params': n_params, 'fdconv_layers': len(layers), 'dtypes': dtypes, 'bytes': weights.stat().st_size,
    }


def _download(repo_id: str, files: list[str], revision: str | None, local_dir: str | None = None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=files, local_dir=local_dir)
    except RepositoryNotFoundError:
        raise HubError(f"Hub repo {repo_id} not found (or not accessible with your token)") from None
    except RevisionNotFoundError:
        raise HubError(f"revision {revision!r} not found in Hub repo {repo_id}") from None
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError) no connection and nothing cached
        raise HubError(f"Hub repo {repo_id} is not in the local cache and the Hub cannot be reached "
                       f"({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')})") from None
    except EntryNotFoundError as e:
        raise HubError(f"file missing in Hub repo {repo_id}: {str(e).splitlines()[0]}") from None
    except OSError as e:  # connection refused, DNS, timeouts
        raise HubError(f"could not reach the Hub for {repo_id}: {e}") from None


def pull(repo_id: str, out_dir: str | os.PathLike | None = None, revision: str | None = None,
         org: str | None = None) -> Path:
    """Download a checkpoint (weights, config, card) into the HF cache, or into ``out_dir``; it is checked to
    load before the folder appears."""
    repo_id = full_repo_id(repo_id, org)
    files = [WEIGHTS, CONFIG, CARD]
    if out_dir is None:
        folder = Path(_download(repo_id, files, revision))
        load_checkpoint(folder)
        return folder
    with _atomic_dir(out_dir) as tmp:
        _download(repo_id, files, revision, local_dir=str(tmp))
        shutil.rmtree(tmp / '.cache', ignore_errors=True)
        load_checkpoint(tmp)
    return Path(out_dir)


def push(folder: str | os.PathLike, repo_id: str, org: str | None = None, private: bool = False,
         commit_message: str = 'Upload FDConv checkpoint', card: str | None = None) -> str:
    """Upload a checkpoint folder (or a fine-tuning run's output folder) to a Hub repo, with a model card
    generated from its config when the folder has none. Returns the repo id. Tokens come from
    huggingface_hub's usual places (HF_TOKEN, `hf auth login`) and are never printed."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .cards import model_card
    folder = Path(folder)
    if not (folder / CONFIG).is_file() and (folder / 'model' / CONFIG).is_file():
        folder = folder / 'model'  # a fine-tuning run's output folder
    model = load_checkpoint(folder)  # refuse to publish what would not load
    repo_id = full_repo_id(repo_id, org)
    if card is None:
        card = (folder / CARD).read_text() if (folder / CARD).is_file() else model_card(folder, repo_id, model)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
                  for name in (WEIGHTS, CONFIG)]
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode()))
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations=operations, commit_message=commit_message)
    except HfHubHTTPError as e:
        raise HubError(f"push to Hub repo {repo_id} failed: {e}") from None
    except OSError as e:
        raise HubError(f"could not reach the Hub to push {repo_id}: {e}") from None
    return repo_id
