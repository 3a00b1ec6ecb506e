"""The numbers behind the frequency picture of an FDConv model (``fdconv-zoo analyze``; drawn by report.py):
what each frequency group's kernel looks like and how different the groups are, what the attention does per
image, where FBM acts, and how far a model's modulation has moved from the identity it starts at."""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import FDConv2d, FDLinear
from ..layers.fdw import matrix_to_weight, weight_to_matrix
from ..layers.weight_import import fdconv_modules
from ..models import stage_of

RADIAL_BINS = 48
BASELINE_EXPERTS = 16


def representative_layers(layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The first FDConv layer of each stage (and of the stem): the detailed pages without --layers."""
    chosen: dict[Any, str] = {}
    for name in layers:
        chosen.setdefault(stage_of(name), name)
    return {name: layers[name] for name in chosen.values()}


def fdconv_layers(model: nn.Module, pattern: str | None = None) -> dict[str, FDConv2d | FDLinear]:
    """The model's FDConv layers (any dimension, and FDLinear) whose names match the glob ``pattern`` (all
    without one)."""
    every = fdconv_modules(model)
    if not every:
        raise ValueError(f"{type(model).__name__} has no FDConv layer")
    layers = {n: m for n, m in every.items() if fnmatch.fnmatch(n, pattern)} if pattern else every
    if not layers:
        raise ValueError(f"--layers {pattern!r} matches none of the FDConv layers (e.g. {next(iter(every))})")
    return layers


def _cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(vectors.float().flatten(1), dim=1)
    return (unit @ unit.t()).double()


def _mean_abs_off_diagonal(matrix: torch.Tensor) -> float:
    n = matrix.shape[0]
    return float((matrix.abs().sum() - matrix.diagonal().abs().sum()) / max(n * (n - 1), 1))


@torch.no_grad()
def group_kernels(layer: FDConv2d | FDLinear) -> torch.Tensor:
    """(n, Cout, Cg, *kernel): the kernel of each frequency group alone (the inverse FFT of the spectrum restricted
    to that group). They sum to the layer's dense kernel."""
    fdw = layer.fdw
    matrices = fdw(torch.eye(fdw.num_groups, device=fdw.spectrum.device))
    return matrix_to_weight(matrices, fdw.out_channels, fdw.kernel_size)


@torch.no_grad()
def radial_profiles(layer: FDConv2d | FDLinear) -> torch.Tensor:
    """(n, RADIAL_BINS): each group kernel's spectral energy per band of normalised radial frequency, 0 (DC) to 1
    (the corner of its (Cout*k, Cg*k) matrix's spectrum). A group kernel's spectrum is the layer's spectrum on
    that group's bins and zero elsewhere, so the profiles are read off the spectrum (half-spectrum columns that
    stand for two bins counted twice)."""
    fdw = layer.fdw
    power = (torch.view_as_complex(fdw.spectrum.detach().double()) * fdw.scale).abs().square().t()  # (R, C/2+1)
    weight = torch.full((power.shape[1],), 2.0, dtype=torch.float64)
    weight[0] = 1
    if fdw.cols % 2 == 0:
        weight[-1] = 1
    fr = torch.fft.fftfreq(fdw.rows, dtype=torch.float64).abs()[:, None] * 2
    fc = torch.fft.rfftfreq(fdw.cols, dtype=torch.float64)[None, :] * 2
    band = (torch.sqrt(fr ** 2 + fc ** 2) / math.sqrt(2) * RADIAL_BINS).long().clamp_max(RADIAL_BINS - 1)
    slot = (fdw.group_of_bin.long() * RADIAL_BINS + band).flatten()
    profiles = torch.zeros(fdw.num_groups * RADIAL_BINS, dtype=torch.float64)
    profiles.index_add_(0, slot, (power * weight).flatten())
    profiles = profiles.view(fdw.num_groups, RADIAL_BINS)
    return profiles / profiles.sum(1, keepdim=True).clamp_min(1e-300)


@torch.no_grad()
def group_diversity(layer: FDConv2d | FDLinear, seed: int = 0) -> dict[str, Any]:
    """Pairwise cosine similarity of the n group kernels, beside two dense-expert baselines of the same budget
    (n kernels of the layer's shape): experts drawn with nn.Conv2d's init, as CondConv initialises its experts,
    and experts made from this layer's dense kernel plus 10% noise, as a dense checkpoint is usually turned
    into a mixture. Frequency groups are disjoint supports, so by Parseval their kernels are orthogonal."""
    kernels = group_kernels(layer)
    dense = layer.fdw.static_weight()
    n = kernels.shape[0]
    experts = min(n, BASELINE_EXPERTS)  # the baselines' statistic barely depends on how many are drawn
    gen = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(dense[0].numel())  # kaiming_uniform(a=sqrt(5)) as nn.Conv2d
    random_experts = (torch.rand((experts, *dense.shape), generator=gen) * 2 - 1) * bound
    noisy = dense + 0.1 * dense.std() * torch.randn((experts, *dense.shape), generator=gen)
    cosine = _cosine_matrix(kernels)
    return {
        'num_groups': n, 'cosine': cosine, 'mean_abs_cosine': _mean_abs_off_diagonal(cosine),
        'random_init_experts': _mean_abs_off_diagonal(_cosine_matrix(random_experts)),
        'dense_init_experts': _mean_abs_off_diagonal(_cosine_matrix(noisy)),
        'sum_error': float((kernels.double().sum(0) - dense.double()).abs().max() / dense.abs().max()),
        'profiles': radial_profiles(layer),
        'magnitude': (torch.view_as_complex(layer.fdw.spectrum.detach().double()) * layer.fdw.scale).abs().t(),
        'group_of_bin': layer.fdw.group_of_bin.detach().clone(),
    }


def parameter_summary(model: nn.Module) -> dict[str, Any]:
    """Parameters per FDConv component, and the dense model's total (each FDConv layer counted as the dense
    layer it replaces: its kernel and bias)."""
    parts = {'fdw_spectrum': 0, 'ksm_global': 0, 'ksm_local': 0, 'fbm': 0}
    dense_layers = 0
    for layer in fdconv_layers(model).values():
        dense_layers += math.prod(layer.fdw.weight_shape) + (layer.bias.numel() if layer.bias is not None else 0)
        parts['fdw_spectrum'] += layer.fdw.spectrum.numel()
        parts['ksm_global'] += sum(p.numel() for p in layer.ksm_global.parameters())
        parts['ksm_local'] += sum(p.numel() for p in layer.ksm_local.parameters()) if layer.ksm_local else 0
        parts['fbm'] += sum(p.numel() for p in layer.fbm.parameters()) if layer.fbm is not None else 0
    total = sum(p.numel() for p in model.parameters())
    other = total - sum(parts.values())  # biases of the FDConv layers are counted here, as in the dense model
    return {**parts, 'other': other, 'total': total, 'dense_total': other + dense_layers - sum(
        layer.bias.numel() for layer in fdconv_layers(model).values() if layer.bias is not None)}


# --------------------------------------------------------------------------------------------- per image
def _layer_inputs(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of each chosen layer for a batch of images (one forward pass with hooks)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _, args, name=name: seen.__setitem__(name, args[0].detach()))
             for name, m in layers.items()]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@torch.no_grad()
def per_sample_kernels(layer: FDConv2d | FDLinear, x: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """(the per-sample kernels (B, Cout*kr, Cg*kc) with every attention applied, the KSM attention, the static
    kernel matrix) of a layer for its input ``x``, computed the way its forward does."""
    kernels, att = layer.per_sample_kernels(x)
    return kernels, att, weight_to_matrix(layer.fdw.static_weight(), len(layer.fdw.kernel_size))


def edge_mask(inputs: torch.Tensor, size: tuple[int, ...], quantile: float = 0.8) -> torch.Tensor:
    """(B, *size) bool: where an input's local contrast is above its ``quantile`` (per input), at ``size``. Images
    (B, C, H, W) use the Sobel magnitude of the grey image; sequences and volumes the magnitude of the gradient
    of the channel mean along every axis."""
    if inputs.ndim == 4:
        return sobel_edges(inputs, size, quantile)
    mean = inputs.float().mean(1)
    gradient = torch.stack(torch.gradient(mean, dim=tuple(range(1, mean.ndim)))).square().sum(0).sqrt()
    mode = 'linear' if inputs.ndim == 3 else 'trilinear'
    magnitude = F.interpolate(gradient[:, None], size=size, mode=mode, align_corners=False)[:, 0]
    threshold = magnitude.flatten(1).quantile(quantile, dim=1).view(-1, *[1] * len(size))
    return magnitude > threshold


def sobel_edges(images: torch.Tensor, size: tuple[int, int], quantile: float = 0.8) -> torch.Tensor:
    """(B, H, W) bool: Sobel magnitude of the grey image above its ``quantile`` (per image), at ``size``."""
    grey = images.mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=grey.dtype)
    gx = F.conv2d(grey, kx.view(1, 1, 3, 3), padding=1)
    gy = F.conv2d(grey, kx.t().reshape(1, 1, 3, 3), padding=1)
    magnitude = F.interpolate(torch.sqrt(gx ** 2 + gy ** 2), size=size, mode='bilinear', align_corners=False)[:, 0]
    threshold = magnitude.flatten(1).quantile(quantile, dim=1).view(-1, 1, 1)
    return magnitude > threshold


def _pca2(vectors: torch.Tensor) -> torch.Tensor:
    centred = vectors.double() - vectors.double().mean(0)
    if vectors.shape[0] < 2:
        return torch.zeros(vectors.shape[0], 2, dtype=torch.float64)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    coords = centred @ v[:2].t()
    return F.pad(coords, (0, 2 - coords.shape[1]))


@torch.no_grad()
def image_statistics(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor) -> dict[str, Any]:
    """Per layer, over the images (or any model inputs: clips, volumes, sequences): the attention values
    (kernel per group, channel, filter, spatial), how far the per-sample kernels are from the static one (the
    modulation distance: 0 at the identity), their mutual cosine similarity and a 2-D PCA embedding, and for FBM
    layers the band maps with their means on edges (local contrast above its 80th percentile, ``edge_mask``)
    and on flat regions."""
    inputs = _layer_inputs(model, layers, images)
    stats: dict[str, Any] = {}
    for name, layer in layers.items():
        kernels, att, static = per_sample_kernels(layer, inputs[name])
        flat = kernels.flatten(1).double()
        distance = (flat - static.flatten().double()).norm(dim=1) / static.double().norm().clamp_min(1e-300)
        entry = {
            'kernel_attention': att.kernel, 'channel_attention': att.channel, 'filter_attention': att.filter,
            'spatial_attention': att.spatial, 'kernel_distance': distance,
            'sample_cosine': _cosine_matrix(flat), 'embedding': _pca2(flat),
        }
        entry['mean_sample_cosine'] = 1 - _mean_abs_off_diagonal(1 - entry['sample_cosine']) if len(flat) > 1 \
            else 1.0
        if layer.fbm is not None:
            x = inputs[name]
            bands = layer.fbm.band_scale(layer.operator_input(x))
            edges = edge_mask(images, tuple(bands.shape[2:]))
            entry['fbm_bands'] = bands
            entry['fbm_edge_mean'] = [float(bands[:, j][edges].mean()) for j in range(bands.shape[1])]
            entry['fbm_flat_mean'] = [float(bands[:, j][~edges].mean()) for j in range(bands.shape[1])]
            entry['fbm_distance'] = float((bands - 1).abs().max())
        stats[name] = entry
    return stats


def modulation_distance(stats: dict[str, Any]) -> dict[str, float]:
    """Per layer: the largest relative distance of a per-sample kernel from the static one, or of an FBM band
    map from 1, over the images (0 for a freshly converted model)."""
    return {name: max(float(s['kernel_distance'].max()), s.get('fbm_distance', 0.0)) for name, s in stats.items()}


def compare_groups(build: Callable[[int], nn.Module], counts: list[int], seed: int = 0) -> list[dict[str, Any]]:
    """The seed paper's first ablation: for each n, the same dense weights as an FDConv model with n groups;
    parameters (FDW's are the dense kernel's whatever n is; KSM's n-way head grows a little) and the mean
    group-kernel similarity (over
    the first FDConv layer of each stage)."""
    rows = []
    for n in counts:
        model = build(n)
        layers = fdconv_layers(model)
        diversity = [group_diversity(m, seed)['mean_abs_cosine'] for m in representative_layers(layers).values()]
        rows.append({'num_groups': n, 'params': sum(p.numel() for p in model.parameters()),
                     'fdw_params': sum(m.fdw.spectrum.numel() for m in layers.values()),
                     'mean_abs_cosine': sum(diversity) / len(diversity)})
    return rows
