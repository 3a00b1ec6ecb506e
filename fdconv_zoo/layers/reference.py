"""Import of one layer of the authors' reference FDConv implementation (state-dict keys of FDCONV_SPEC section 8).

The reference stores ``dft_weight`` = spectrum / (min(Cin, Cout) // 2), keeps a BatchNorm on the pooled vector
(folded here into the trunk's linear layer, which is what it computes in eval mode), and one 3x3 conv per FBM
band (stacked here into one conv). Parts missing from a checkpoint keep their identity init.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointKeyError
from .fdw import dense_spectrum

if TYPE_CHECKING:  # the layer builds itself from a reference state dict through this module
    from .fdconv import FDConv2d

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
        spectrum = dense_spectrum(weight)
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
        logging.getLogger('fdconv_zoo').warning(
            "reference layer %s has no %s weights; those parts start at their identity init",
            prefix.rstrip('.') or '(top level)', ', '.join(missing))
    return missing
