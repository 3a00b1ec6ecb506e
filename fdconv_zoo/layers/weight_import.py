"""Weight import, in one place: dense layers, the authors' reference layers (state-dict keys of FDCONV_SPEC
section 8) and whole checkpoints of either into FDConv layers, and this package's own older checkpoints.

The reference stores ``dft_weight`` = spectrum / (min(Cin, Cout) // 2), keeps a BatchNorm on the pooled vector
(folded here into the trunk's linear layer, which is what it computes in eval mode), and one 3x3 conv per FBM
band (stacked here into one conv). Parts missing from a checkpoint keep the layer's current values (its identity
init). timm's pretrained filter (``fdconv_checkpoint_filter``) and ``load_reference_checkpoint`` both go through
:func:`translate_checkpoint`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..errors import CheckpointKeyError
from .fdw import dense_spectrum, upgrade_spectrum

if TYPE_CHECKING:  # the layer builds itself from a reference state dict through this module
    from .fdconv import FDConv2d

_logger = logging.getLogger('fdconv_zoo')

_HEADS = ('channel_fc', 'filter_fc', 'spatial_fc', 'kernel_fc')
BN_EPS = 1e-5


def reference_scale(layer: FDConv2d) -> int:
    """The factor between the reference's stored ``dft_weight`` and the plain rfft2 spectrum."""
    return min(layer.in_channels, layer.out_channels) // 2


def infer_layer_shape(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """in_channels, out_channels and kernel_size of a reference layer, from the shapes of its tensors."""
    shape: dict[str, int] = {}
    if 'KSM_Global.fc.weight' in state_dict:
        shape['in_channels'] = state_dict['KSM_Global.fc.weight'].shape[1]
    if 'KSM_Global.filter_fc.weight' in state_dict:
        shape['out_channels'] = state_dict['KSM_Global.filter_fc.weight'].shape[0]
    if 'KSM_Global.spatial_fc.weight' in state_dict:
        shape['kernel_size'] = int(round(state_dict['KSM_Global.spatial_fc.weight'].shape[0] ** 0.5))
    elif 'KSM_Global.fc.weight' in state_dict:
        shape['kernel_size'] = 1
    if 'dft_weight' in state_dict and 'kernel_size' in shape and 'out_channels' not in shape:
        shape['out_channels'] = state_dict['dft_weight'].shape[1] // shape['kernel_size']
    if 'weight' in state_dict:
        cout, cg, k, _ = state_dict['weight'].shape
        shape.update(out_channels=cout, in_channels=cg, kernel_size=k)
    return shape


def grouping_from_indices(indices: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Reference ``official_indices`` (1, 2, n, N/n) -> (rows, cols) bin -> group map."""
    if indices.ndim == 2:
        return indices.long()
    if indices.ndim != 4 or indices.shape[:2] != (1, 2):
        raise ValueError(f"grouping must be official_indices (1, 2, n, N/n) or a (R, C) map, "
                         f"got shape {tuple(indices.shape)}")
    n = indices.shape[2]
    if n * indices.shape[3] != rows * cols:
        raise ValueError(f"grouping covers {n * indices.shape[3]} bins, the spectrum has {rows}x{cols}")
    group = torch.full((rows, cols), -1, dtype=torch.long)
    ids = torch.arange(n).view(n, 1).expand_as(indices[0, 0])
    group[indices[0, 0].long(), indices[0, 1].long()] = ids
    if (group < 0).any():
        raise ValueError("grouping does not assign every spectral bin to a group")
    return group


def _fold_batchnorm(state_dict: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear (no bias) then eval-mode BatchNorm == one linear with bias."""
    weight = state_dict['KSM_Global.fc.weight'].flatten(1).double()
    bias = state_dict.get('KSM_Global.fc.bias', torch.zeros(weight.shape[0])).double()
    if 'KSM_Global.bn.weight' not in state_dict:
        return weight.float(), bias.float()
    gamma = state_dict['KSM_Global.bn.weight'].double()
    beta = state_dict['KSM_Global.bn.bias'].double()
    mean = state_dict['KSM_Global.bn.running_mean'].double()
    var = state_dict['KSM_Global.bn.running_var'].double()
    scale = gamma / torch.sqrt(var + BN_EPS)
    return (weight * scale[:, None]).float(), ((bias - mean) * scale + beta).float()


def reference_to_native(
        layer: FDConv2d,
        state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Translate a reference layer state dict to this layer's keys.

    Returns the native state dict (without ``fdw.group_of_bin``) and the names of the modulation parts
    the reference checkpoint did not hold. A dense ``weight`` (a layer the reference left under its gate, or
    its converter's input) is turned into a spectrum.
    """
    sd = dict(state_dict)
    native: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    if 'dft_weight' in sd:
        dft = sd.pop('dft_weight')
        expected = (1, layer.fdw.rows, layer.fdw.cols // 2 + 1, 2)
        if tuple(dft.shape) != expected:
            raise ValueError(f"reference key 'dft_weight' has shape {tuple(dft.shape)}, expected {expected}")
        spectrum = (dft[0].double() * reference_scale(layer)).transpose(0, 1)
    elif 'weight' in sd:
        weight = sd.pop('weight')
        if weight.ndim == 2:  # a linear layer's (Cout, Cin) is the k = 1 case
            weight = weight[:, :, None, None]
        if tuple(weight.shape) != layer.fdw.weight_shape:
            raise ValueError(f"key 'weight' has shape {tuple(weight.shape)}, expected {layer.fdw.weight_shape}")
        spectrum = dense_spectrum(weight, len(layer.fdw.kernel_size))
    else:
        raise CheckpointKeyError("reference state dict has neither 'dft_weight' nor 'weight'")
    native['fdw.spectrum'] = (spectrum / layer.fdw.scale).float().contiguous()
    native['fdw.spectrum_scale'] = torch.tensor(layer.fdw.scale)
    if 'bias' in sd:
        native['bias'] = sd.pop('bias')

    if 'KSM_Global.fc.weight' in sd:
        native['ksm_global.fc.weight'], native['ksm_global.fc.bias'] = _fold_batchnorm(sd)
        for key in ('fc.weight', 'fc.bias', 'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var',
                    'bn.num_batches_tracked'):
            sd.pop(f'KSM_Global.{key}', None)
        native['ksm_global.act.scale'] = sd.pop('KSM_Global.relu.scale')
        native['ksm_global.act.bias'] = sd.pop('KSM_Global.relu.bias')
        for head in _HEADS:
            for p in ('weight', 'bias'):
                if f'KSM_Global.{head}.{p}' in sd:
                    value = sd.pop(f'KSM_Global.{head}.{p}')
                    native[f'ksm_global.{head}.{p}'] = value.flatten(1) if p == 'weight' else value
    else:
        missing.append('KSM global')

    if any(key.startswith('KSM_Local.') for key in sd):
        native['ksm_local.conv.weight'] = sd.pop('KSM_Local.conv.weight')
        native['ksm_local.norm.weight'] = sd.pop('KSM_Local.norm.weight')
        native['ksm_local.norm.bias'] = sd.pop('KSM_Local.norm.bias')
    elif layer.ksm_local is not None:
        missing.append('KSM local')

    band_keys = sorted({key.split('.')[2] for key in sd if key.startswith('FBM.freq_weight_conv_list.')}, key=int)
    if band_keys:
        native['fbm.band_conv.weight'] = torch.cat([sd.pop(f'FBM.freq_weight_conv_list.{j}.weight') for j in band_keys])
        native['fbm.band_conv.bias'] = torch.cat([sd.pop(f'FBM.freq_weight_conv_list.{j}.bias') for j in band_keys])
    elif layer.fbm is not None:
        missing.append('FBM')

    if sd:
        raise CheckpointKeyError(f"unexpected reference keys: {sorted(sd)}")
    return native, missing


def check_keys_and_shapes(own: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor],
                          owner: str, prefix: str = '') -> None:
    """Every key of ``state_dict`` exists in ``own`` with the same shape; the error names the key(s) and both
    shapes. (Missing keys are left to the caller, which knows which parts may start from their init.)"""
    unexpected = sorted(k for k in state_dict if k not in own)
    if unexpected:
        names = [prefix + k for k in unexpected[:10]]
        raise CheckpointKeyError(f"keys that do not exist in {owner}: {names}"
                       + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
    for key, value in state_dict.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"key '{prefix}{key}' has shape {tuple(value.shape)} in the checkpoint, "
                             f"{tuple(own[key].shape)} in the model")


def load_native_partial(layer: FDConv2d, native: dict[str, torch.Tensor], prefix: str = '') -> None:
    """Copy ``native`` into ``layer``; every key must exist and match in shape (the message names both)."""
    own = layer.state_dict()
    check_keys_and_shapes(own, native, type(layer).__name__, prefix)
    with torch.no_grad():
        for key, value in native.items():
            own[key].copy_(value)


def load_reference_layer(
        layer: FDConv2d,
        state_dict: dict[str, torch.Tensor],
        grouping: torch.Tensor | None = None,
        prefix: str = '',
) -> list[str]:
    """Load one reference layer into ``layer``; returns the modulation parts left at their identity init."""
    native, missing = reference_to_native(layer, state_dict)
    load_native_partial(layer, native, prefix)
    if grouping is not None:
        layer.fdw.set_grouping(grouping_from_indices(grouping, *layer.fdw.group_of_bin.shape))
    if missing:
        _logger.warning(
            "reference layer %s has no %s weights; those parts start at their identity init",
            prefix.rstrip('.') or '(top level)', ', '.join(missing))
    return missing


def fdconv_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The FDConv layers of ``model`` (of any dimension, and FDLinear) by name."""
    from .fdconv import _FrequencyDynamicLayer
    return {name: m for name, m in model.named_modules() if isinstance(m, _FrequencyDynamicLayer)}


def upgrade_native(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Spectra of this package's checkpoints saved before the orthonormal scale (no ``fdw.spectrum_scale``),
    rescaled in place."""
    for name, module in fdconv_modules(model).items():
        prefix = f'{name}.' if name else ''
        if f'{prefix}fdw.spectrum' in state_dict:
            upgrade_spectrum(state_dict, f'{prefix}fdw.', module.fdw.scale)


def translate_checkpoint(model: nn.Module, state_dict: Mapping[str, torch.Tensor]
                         ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], list[str]]:
    """``state_dict`` with every FDConv layer of ``model`` in this package's keys: native layers pass (spectra
    saved before the orthonormal scale are upgraded), a dense ``weight`` or a reference layer is translated, and
    modulation parts the checkpoint does not hold take the model's current values. Returns the state dict, the
    missing parts (part -> layer names) and the FDConv layers the checkpoint holds no weight for (their keys are
    left for load_state_dict to report)."""
    own = model.state_dict()
    out = dict(state_dict)
    upgrade_native(model, out)
    missing_parts: dict[str, list[str]] = {}
    absent: list[str] = []
    for name, module in fdconv_modules(model).items():
        prefix = f'{name}.' if name else ''
        if f'{prefix}fdw.spectrum' in out:  # this package's own keys
            continue
        if f'{prefix}dft_weight' not in out and f'{prefix}weight' not in out:
            absent.append(name)
            continue
        layer_sd = {k[len(prefix):]: out.pop(k) for k in list(out) if k.startswith(prefix)}
        try:
            native, missing = reference_to_native(module, layer_sd)
        except (KeyError, ValueError) as e:
            raise type(e)(f"checkpoint layer '{name}': {e.args[0]}") from None
        layer_own = {k[len(prefix):]: v for k, v in own.items() if k.startswith(prefix)}
        out.update({prefix + k: v for k, v in {**layer_own, **native}.items()})
        for part in missing:
            missing_parts.setdefault(part, []).append(name)
    return out, missing_parts, absent


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint as a flat state dict: ``.safetensors`` read directly, ``.pth`` with ``weights_only=True``;
    the wrappers of training scripts ('state_dict', 'model', DataParallel's 'module.') removed."""
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
    sd = read_state_dict(path_or_state_dict)
    if any(k.startswith('backbone.') for k in sd) and not any(k.startswith('backbone.') for k in model.state_dict()):
        sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    layers = fdconv_modules(model)
    unknown = sorted(set(groupings or {}) - set(layers))
    if unknown:
        raise CheckpointKeyError(f"groupings given for layers that are not FDConv layers: {unknown}")
    sd, missing_parts, absent = translate_checkpoint(model, sd)
    if absent:
        raise CheckpointKeyError(f"reference checkpoint has no weights ('dft_weight' or 'weight') for the FDConv "
                                 f"layers {absent[:8]}" + (' ...' if len(absent) > 8 else ''))
    check_keys_and_shapes(model.state_dict(), sd, f"the model ({type(model).__name__})")
    result = model.load_state_dict(sd, strict=False)
    for name, indices in (groupings or {}).items():
        fdw = layers[name].fdw
        fdw.set_grouping(grouping_from_indices(indices, *fdw.group_of_bin.shape))
    fd_prefixes = tuple(f'{n}.' for n in layers)
    missing = [k for k in result.missing_keys if not k.startswith(fd_prefixes)]
    if missing:
        _logger.warning("reference checkpoint has no values for %d model keys (left as initialised): %s",
                        len(missing), ', '.join(missing[:8]) + (' ...' if len(missing) > 8 else ''))
    if missing_parts:
        summary = '; '.join(f"{part} in {len(names)} layers" for part, names in missing_parts.items())
        _logger.warning("reference checkpoint has no %s weights; those parts start at their identity init", summary)
    return model
