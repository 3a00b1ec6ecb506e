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
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import models as _models  # noqa: F401  registers the FDConv families
from .atomic import atomic_dir
from .errors import HubError
from .layers.weight_import import check_keys_and_shapes, upgrade_native
from .models import ensure_registered
from .models._fdconv import FDCONV_PAPER, describe_origin, fdconv_checkpoint_filter

ORG_ENV = 'FDCONV_ZOO_ORG'
DEFAULT_ORG = 'fdconv-zoo'
WEIGHTS, CONFIG, CARD = 'model.safetensors', 'config.json', 'README.md'


def hub_org(org: str | None = None) -> str:
    """The Hub organisation: the argument, else $FDCONV_ZOO_ORG, else 'fdconv-zoo'."""
    return org or os.environ.get(ORG_ENV) or DEFAULT_ORG


def full_repo_id(repo: str, org: str | None = None) -> str:
    """'name' -> 'ORG/name'; 'owner/name' stays."""
    return repo if '/' in repo else f'{hub_org(org)}/{repo}'


@contextmanager
def _output_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    try:
        with atomic_dir(out_dir) as tmp:
            yield tmp
    except FileExistsError as e:
        raise HubError(str(e)) from None


def hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """A timm config.json that transformers' TimmWrapper also builds: ``num_classes`` only at the root. timm's
    save_for_hf also writes it into ``model_args``, which TimmWrapper passes beside its own ``num_classes`` (a
    TypeError for every timm model); timm reads the root value either way."""
    model_args = {k: v for k, v in config.get('model_args', {}).items() if k != 'num_classes'}
    config = {k: v for k, v in config.items() if k != 'model_args'}
    return {**config, 'model_args': model_args} if model_args else config


def write_hf_files(model: torch.nn.Module, folder: Path, **kwargs: Any) -> None:
    """timm's ``save_for_hf`` (safetensors) into ``folder`` with the config.json made by :func:`hf_config`."""
    timm.models.save_for_hf(model, folder, safe_serialization=True, **kwargs)
    path = folder / CONFIG
    path.write_text(json.dumps(hf_config(json.loads(path.read_text())), indent=2))


def save_for_hf(model: torch.nn.Module, folder: str | os.PathLike, **kwargs: Any) -> Path:
    """timm's ``save_for_hf``, written atomically (replacing ``folder``), whose folder loads in timm
    (``local-dir:``, ``hf-hub:``) and in transformers (``AutoModelForImageClassification``, ``pipeline``).
    ``kwargs`` go to timm's (``model_config``, ``model_args``, ``data_config``)."""
    with atomic_dir(folder, replace=True) as tmp:
        write_hf_files(model, tmp, **kwargs)
    return Path(folder)


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
    ensure_registered(arch)  # any timm architecture's FDConv version (register_fdconv)
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
    except MemoryError as e:
        raise HubError(f"{path} ({os.path.getsize(path) / 2**30:.1f} GiB) does not fit in memory ({e})") from None


MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header


def read_header(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file declares (name -> dtype, shape), read from its JSON header alone: no
    mapping of the data, so it works for files larger than memory. Checked against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, 'rb') as f:
            (length,) = struct.unpack('<Q', f.read(8)) if size >= 8 else (-1,)
            if not 0 < length <= min(MAX_HEADER, size - 8):
                raise HubError(f"{path} is not a safetensors file (header length {length}, file size {size})")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise HubError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"{path} is not a readable safetensors file ({e})") from None
    header.pop('__metadata__', None)
    data = size - 8 - length
    for name, entry in header.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get('shape'), list)
              and all(isinstance(n, int) and n >= 0 for n in entry['shape'])
              and isinstance(entry.get('data_offsets'), list) and len(entry['data_offsets']) == 2
              and 0 <= entry['data_offsets'][0] <= entry['data_offsets'][1] <= data)
        if not ok:
            raise HubError(f"{path}: tensor {name!r} has a malformed header entry {entry!r} (data is {data} bytes)")
    return header


def build_model(config: dict[str, Any], source: Path, **kwargs: Any) -> torch.nn.Module:
    """The model a checkpoint's config.json describes; model_args that do not build it are an error naming the
    file (and, from the layers, the option)."""
    model_args = {'num_classes': config.get('num_classes', 1000), **config.get('model_args', {}), **kwargs}
    try:
        return timm.create_model(config['architecture'], pretrained_cfg_overlay=config.get('pretrained_cfg'),
                                 **model_args)
    except (TypeError, ValueError) as e:
        raise HubError(f"{source}: model_args {config.get('model_args', {})} do not build "
                       f"{config['architecture']}: {e}") from None


def load_checkpoint(folder: str | os.PathLike, **kwargs: Any) -> torch.nn.Module:
    """Build the model a checkpoint folder describes and load its weights, checking every key and shape."""
    folder = Path(folder)
    config = read_config(folder)
    model = build_model(config, folder / CONFIG, **kwargs)
    state_dict = read_weights(folder / WEIGHTS)
    _load_strict(model, state_dict, folder / WEIGHTS)
    return model


def _load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: Path | str) -> None:
    own = model.state_dict()
    try:
        upgrade_native(model, state_dict)  # checkpoints before the orthonormal scale
    except ValueError as e:
        raise HubError(f"{source}: {e}") from None
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
    except RuntimeError as e:  # timm: unknown model or tag, no weights
        raise HubError(f"could not load dense checkpoint {source!r}: {e}") from None
    except (OSError, EntryNotFoundError) as e:
        raise _hub_failure(f"dense checkpoint {source!r}", e) from None
    arch = arch or f"{dense.pretrained_cfg.get('architecture') or source.split('.')[0]}_fdconv"
    _check_arch(arch)
    return dense.state_dict(), arch, dense.num_classes, dict(dense.pretrained_cfg)


def _check_arch(arch: str) -> None:
    ensure_registered(arch)
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
    if source_cfg.get('paper_ids'):
        cfg['paper_ids'] = f"{FDCONV_PAPER},{source_cfg['paper_ids']}"
    describe_origin(model, f'FDConv layers converted from the dense checkpoint {source}; equal to it at step 0.',
                    derived=False)  # the source's own cfg (license, data config) is what applies
    with _output_dir(out_dir) as tmp:
        write_hf_files(model, tmp, model_config={'pretrained_cfg': cfg}, model_args=dict(fdconv_options))
    return Path(out_dir)


def info(path_or_repo: str, revision: str | None = None) -> dict[str, Any]:
    """What a checkpoint holds: architecture, classes, parameters, FDConv layers and their options, dtypes,
    size; from a checkpoint folder, a .safetensors file (with the config.json beside it, if any) or a Hub
    repo. Only config.json and the safetensors header are read."""
    path = Path(path_or_repo)
    if path.is_file():
        weights, folder = path, path.parent
        config = read_config(folder) if (folder / CONFIG).is_file() else None
    else:
        folder = path if path.is_dir() else Path(_download(path_or_repo, [CONFIG, WEIGHTS], revision))
        weights, config = folder / WEIGHTS, read_config(folder)
    header = read_header(weights)
    shapes = {k: torch.Size(v['shape']) for k, v in header.items()}
    if config is not None:
        with torch.device('meta'):  # parameter names without allocating them
            params = {n for n, _ in build_model(config, folder / CONFIG).named_parameters()}
    else:  # no config: everything but the usual buffers (BatchNorm statistics, FDConv's group maps)
        buffers = ('.running_mean', '.running_var', '.num_batches_tracked', '.group_of_bin', '.spectrum_scale')
        params = {k for k in shapes if not k.endswith(buffers)}
    layers = sorted({k[:-len('.fdw.spectrum')] for k in shapes if k.endswith('.fdw.spectrum')})
    config = config or {}
    return {
        'path': str(path if path.is_file() else folder), 'architecture': config.get('architecture'),
        'num_classes': config.get('num_classes'), 'label_names': config.get('label_names'),
        'model_args': config.get('model_args', {}), 'tensors': len(shapes),
        'params': sum(shapes[k].numel() for k in shapes if k in params), 'fdconv_layers': len(layers),
        'dtypes': sorted({v['dtype'] for v in header.values()}), 'bytes': weights.stat().st_size,
        'notes': config.get('pretrained_cfg', {}).get('notes'),
    }


def _hub_failure(what: str, e: BaseException, revision: str | None = None) -> HubError:
    """One line for a Hub access that failed: offline mode, unreachable endpoint, missing repo/revision/file."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"{what} not found (or not accessible with your token)")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"revision {revision!r} not found for {what}")
    if constants.HF_HUB_OFFLINE:
        return HubError(f"{what} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set")
    if isinstance(e, LocalEntryNotFoundError):  # no connection and nothing cached
        return HubError(f"{what} is not in the local cache and the Hub ({constants.ENDPOINT}) cannot be reached; "
                        f"HF_HUB_OFFLINE=1 uses the cache only, HF_ENDPOINT sets the Hub address")
    if isinstance(e, EntryNotFoundError):
        return HubError(f"file missing for {what}: {str(e).splitlines()[0]}")
    return HubError(f"could not reach the Hub ({constants.ENDPOINT}) for {what}: {e}")


def _download(repo_id: str, files: list[str], revision: str | None, local_dir: str | None = None) -> str:
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=files, local_dir=local_dir)
    except (OSError, EntryNotFoundError) as e:
        raise _hub_failure(f"Hub repo {repo_id}", e, revision) from None


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
    with _output_dir(out_dir) as tmp:
        _download(repo_id, files, revision, local_dir=str(tmp))
        shutil.rmtree(tmp / '.cache', ignore_errors=True)
        load_checkpoint(tmp)
    return Path(out_dir)


def push_folder(folder: str | os.PathLike, repo_id: str, commit_message: str) -> str:
    """Upload every file of a model folder (one written by a task's training script) to a Hub repo."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    repo_id = full_repo_id(repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    except HfHubHTTPError as e:
        raise HubError(f"push to Hub repo {repo_id} failed: {e}") from None
    except OSError as e:
        raise HubError(f"could not reach the Hub to push {repo_id}: {e}") from None
    return repo_id


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
    config = hf_config(json.loads((folder / CONFIG).read_text()))  # a folder timm wrote itself loads too
    operations = [CommitOperationAdd(path_in_repo=WEIGHTS, path_or_fileobj=str(folder / WEIGHTS)),
                  CommitOperationAdd(path_in_repo=CONFIG, path_or_fileobj=json.dumps(config, indent=2).encode())]
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
