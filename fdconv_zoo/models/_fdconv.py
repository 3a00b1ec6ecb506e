"""What every FDConv model family shares: its constructor options, the pretrained filter, the cfg of a tag."""
from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from timm.models import build_model_with_cfg, get_pretrained_cfg

from ..errors import OptionError
from ..layers import FDConv2d
from ..layers.fdconv import check_options
from ..layers.weight_import import translate_checkpoint

FDCONV_PAPER = 'arXiv:2503.18783'

# FDConv options a model constructor accepts: FDConv2d's keyword-only arguments and their defaults (JSON-friendly,
# so they survive timm's config.json model_args)
FDCONV_OPTIONS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(FDConv2d).parameters.items() if p.kind is p.KEYWORD_ONLY}


def fdconv_options(**overrides: Any) -> dict[str, Any]:
    """The layer options with ``overrides`` applied; an unknown name is an OptionError (a TypeError) that names it."""
    if 'recompute' in overrides:  # an option before the fdconv operators; configs saved with it still load
        overrides = {k: v for k, v in overrides.items() if k != 'recompute'}
        warnings.warn("FDConv option 'recompute' is gone: training always rebuilds the per-sample kernels in "
                      "backward; ignoring it", FutureWarning, stacklevel=3)
    unknown = sorted(set(overrides) - set(FDCONV_OPTIONS))
    if unknown:
        raise OptionError(f"unknown FDConv option(s): {unknown}")
    check_options(**overrides)  # before any layer is built: the error names the option as the config spells it
    options = {**FDCONV_OPTIONS, **overrides}
    options['fbm_cutoffs'] = tuple(options['fbm_cutoffs'])
    return options


def pop_fdconv_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the FDConv options out of a model constructor's kwargs (the rest go to the timm base class)."""
    return fdconv_options(**{k: kwargs.pop(k) for k in list(kwargs) if k in FDCONV_OPTIONS or k == 'recompute'})


def fdconv_checkpoint_filter(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Pretrained filter: dense layers of a timm checkpoint become FDConv weights (exact at step 0); native
    FDConv checkpoints pass through; reference-implementation layers (``dft_weight``) are translated."""
    return translate_checkpoint(model, state_dict)[0]


def chain_filters(*filters: Callable | None) -> Callable:
    """One pretrained_filter_fn that runs timm's own family filter first, then the FDConv one. timm's filters
    take (state_dict, model) or, in older families (RegNet), the state dict alone."""
    def takes_model(f: Callable) -> bool:
        try:
            return len(inspect.signature(f).parameters) >= 2
        except (TypeError, ValueError):
            return True

    def run(state_dict, model):
        for f in filters:
            if f is not None:
                state_dict = f(state_dict, model) if takes_model(f) else f(state_dict)
        return state_dict
    return run


def build_fdconv_model(cls: type[nn.Module], variant: str, pretrained: bool, family_filter: Callable | None = None,
                       **kwargs: Any) -> nn.Module:
    """timm's build_model_with_cfg with the FDConv pretrained filter after the family's own. A model built without
    weights says so in its pretrained_cfg (save_for_hf writes it), not the default tag's provenance."""
    try:
        model = build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=chain_filters(
            family_filter, fdconv_checkpoint_filter), **kwargs)
    except SafetensorError as e:  # safetensors' own message names no file
        raise ValueError(f"{_weights_source(variant, kwargs.get('pretrained_cfg'))} is not a readable safetensors "
                         f"file ({e})") from None
    if not pretrained:
        describe_origin(model, f'{variant} randomly initialised (no pretrained weights loaded)', derived=False)
    return model


def _weights_source(variant: str, cfg: Any) -> str:
    """Where the weights of a build come from, for an error: the local file, or the Hub repo and file."""
    if isinstance(cfg, dict) and cfg.get('file'):  # local-dir: gives the folder
        path = Path(cfg['file'])
        return str(path / 'model.safetensors' if (path / 'model.safetensors').is_file() else path)
    if isinstance(cfg, dict) and cfg.get('hf_hub_id'):
        return f"hf-hub:{cfg['hf_hub_id']} ({cfg.get('hf_hub_filename') or 'model.safetensors'})"
    return f"the pretrained weights of {variant}" + (f".{cfg}" if isinstance(cfg, str) else '')


def describe_origin(model: nn.Module, note: str, derived: bool = True) -> None:
    """Make the provenance that save_for_hf will write say what happened to these weights (``note``) instead of
    naming the tag the model was created with (its name, Hub id and notes belong to other weights). Weights
    ``derived`` from that tag's keep its license; weights trained from scratch do not."""
    dropped = {'tag', 'hf_hub_id', 'url', 'file', 'notes', 'origin_url'} | (set() if derived else {'license'})
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in dropped}
    cfg['notes'] = (note,)
    if not derived:
        cfg['paper_ids'] = FDCONV_PAPER
    model.pretrained_cfg = cfg


def dense_tag_cfg(dense_name: str, **overrides: Any) -> dict[str, Any]:
    """Pretrained cfg of an FDConv tag whose weights are timm's dense checkpoint ``dense_name`` (converted
    while loading): the source's data config, license and Hub repo, without its pickled-file URL."""
    src = get_pretrained_cfg(dense_name).to_dict()
    for key in ('url', 'architecture', 'tag', 'file', 'state_dict', 'hf_hub_filename', 'source'):
        src.pop(key, None)
    src['hf_hub_id'] = src.get('hf_hub_id') or f'timm/{dense_name}'
    papers = [FDCONV_PAPER] + [p for p in (src.get('paper_ids') or '').split(',') if p]
    src['paper_ids'] = ','.join(papers)
    src['notes'] = (f'FDConv layers converted at load time from dense {dense_name}; '
                    'outputs equal the dense checkpoint at step 0.',)
    src.update(overrides)
    return src


def stage_of(name: str) -> int | None:
    """Stage (0-based) of a module name in a timm model or its features_only wrapper; None for the stem."""
    m = re.match(r'^(?:.*\.)?(?:layer(\d+)|stages[._](\d+)|layers[._](\d+))(?:\.|$)', name)
    if not m:
        return None
    if m.group(1):
        return int(m.group(1)) - 1  # ResNet layer1..4 -> 0..3
    return int(m.group(2) or m.group(3))
