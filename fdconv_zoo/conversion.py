"""Model-level conversion: dense -> FDConv layer swap, and import of reference-implementation checkpoints."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from .errors import CheckpointKeyError
from .layers import FDConv2d, FDLinear
from .layers.reference import (
    check_keys_and_shapes,
    grouping_from_indices,
    load_native_partial,
    reference_to_native,
)

_logger = logging.getLogger('fdconv_zoo')

Rule = Callable[[str, nn.Module], bool]


def reference_gate(name: str, module: nn.Module) -> bool:
    """The paper's placement: convs with min(Cin, Cout) > 16 and k in {1, 3}, and the linears of MLP/FFN blocks."""
    if isinstance(module, nn.Conv2d):
        return (min(module.in_channels, module.out_channels) > 16 and module.kernel_size[0] == module.kernel_size[1]
                and module.kernel_size[0] in (1, 3))
    if isinstance(module, nn.Linear):
        parent = name.rpartition('.')[0]
        return parent.split('.')[-1] in ('mlp', 'ffn') and min(module.in_features, module.out_features) > 16
    return False


def to_fdconv(module: nn.Module, **options: Any) -> FDConv2d | FDLinear:
    """The FDConv counterpart of a dense nn.Conv2d or nn.Linear, exact at step 0."""
    if isinstance(module, nn.Conv2d):
        return FDConv2d.from_dense(module, **options)
    if isinstance(module, nn.Linear):
        linear_options = {k: v for k, v in options.items() if k not in ('fbm', 'fbm_cutoffs')}
        return FDLinear.from_dense(module, **linear_options)
    raise TypeError(f"cannot convert {type(module).__name__} to FDConv (only nn.Conv2d and nn.Linear)")


def convert_to_fdconv(model: nn.Module, rule: Rule | None = None, **options: Any) -> nn.Module:
    """Swap every layer that ``rule(name, module)`` selects (default: :func:`reference_gate`) for its FDConv
    counterpart carrying the pretrained weights; returns ``model``, converted in place."""
    rule = rule or reference_gate
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in (nn.Conv2d, nn.Linear) and rule(name, m)]
    for name, module in targets:
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        new = to_fdconv(module, **options)
        new.train(module.training)
        setattr(parent, child, new)
    return model


def _read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, Mapping):
        sd = dict(path_or_state_dict)
    else:
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference checkpoint not found: {path}")
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location='cpu', weights_only=True)
    for wrapper in ('state_dict', 'model'):
        if wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = dict(sd[wrapper])
    if sd and all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    return sd


def load_reference_checkpoint(
        model: nn.Module,
        path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
        groupings: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Load a reference-implementation checkpoint (the authors' converted ResNet-50 or their COCO backbones)
    into an FDConv model; ``.pth`` files load with ``weights_only=True``, ``.safetensors`` directly.

    FDConv layers take the reference layer keys (BatchNorm folded; a plain ``weight`` is converted), other
    modules load as usual. ``groupings`` maps a layer name to its reference ``official_indices``. KSM/FBM
    parts absent from the checkpoint (the authors' converter writes none) stay at their identity init.
    """
    sd = _read_state_dict(path_or_state_dict)
    if any(k.startswith('backbone.') for k in sd) and not any(k.startswith('backbone.') for k in model.state_dict()):
        sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    groupings = dict(groupings or {})
    missing_parts: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (FDConv2d, FDLinear)):
            continue
        prefix = f'{name}.'
        layer_sd = {k[len(prefix):]: sd.pop(k) for k in list(sd) if k.startswith(prefix)}
        try:
            native, missing = reference_to_native(module, layer_sd)
        except (KeyError, ValueError) as e:
            raise type(e)(f"layer '{name}': {e.args[0]}") from None
        load_native_partial(module, native, prefix)
        if name in groupings:
            module.fdw.set_grouping(grouping_from_indices(groupings.pop(name), *module.fdw.group_of_bin.shape))
        for part in missing:
            missing_parts.setdefault(part, []).append(name)
    if groupings:
        raise CheckpointKeyError(f"groupings given for layers that are not FDConv layers: {sorted(groupings)}")

    own = model.state_dict()
    fd_prefixes = tuple(f'{n}.' for n, m in model.named_modules() if isinstance(m, (FDConv2d, FDLinear)))
    check_keys_and_shapes(own, sd, f"the model ({type(model).__name__})")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(fd_prefixes)]
    if missing:
        _logger.warning("reference checkpoint has no values for %d model keys (left as initialised): %s",
                        len(missing), ', '.join(missing[:8]) + (' ...' if len(missing) > 8 else ''))
    if missing_parts:
        summary = '; '.join(f"{part} in {len(names)} layers" for part, names in missing_parts.items())
        _logger.warning("reference checkpoint has no %s weights; those parts start at their identity init", summary)
    return model
