"""Fourier Disjoint Weight (FDW), from "Frequency Dynamic Convolution for Dense Image Prediction" (CVPR 2025).

The learnable parameter is the 2-D real FFT of the dense kernel seen as a (Cout*kr, Cg*kc) matrix, scaled to be
orthonormal (divided by sqrt(Cout*kr * Cg*kc)); a k x k kernel is a (Cout*k, Cg*k) matrix, and kernels of 1 or 3
axes split as ``ops.synthesis.matrix_factors`` says (the last axis with the input channel). Its bins are split
into ``n`` groups by radial frequency; a per-sample attention value per group scales each group, and the inverse
FFT gives the per-sample kernel. With every attention value equal to 1 the kernel is the dense one.

Why orthonormal: with the unnormalised FFT a step on the spectrum moves the kernel 1/N as far as the same
step on a dense kernel under SGD (N = Cout*k * Cg*k, 36864 for a 64-channel 3x3 conv) and 1/sqrt(N) under
Adam, so the kernel hardly trains; orthonormal, the spectrum trains like the dense kernel it represents.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .ops import fft_dtype, synthesize
from .ops.synthesis import kernel_shape, matrix_factors


def weight_to_matrix(weight: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """(..., Cout, Cg, *kernel) -> (..., Cout*kr, Cg*kc), the paper's weight-matrix view, for a kernel of ``dims``
    axes: for k x k, row o*k+u and column i*k+v; in general the last axis joins the columns
    (``ops.synthesis.matrix_factors``)."""
    *lead, cout, cg = weight.shape[:-dims]
    kr, kc = matrix_factors(weight.shape[-dims:])
    return weight.reshape(*lead, cout, cg, kr, kc).transpose(-3, -2).reshape(*lead, cout * kr, cg * kc)


def matrix_to_weight(matrix: torch.Tensor, out_channels: int, kernel_size: int | Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`weight_to_matrix`; returns a (non-contiguous) view (..., Cout, Cg, *kernel)."""
    *lead, rows, cols = matrix.shape
    shape = kernel_shape(kernel_size)
    kr, kc = matrix_factors(shape)
    return matrix.view(*lead, out_channels, kr, cols // kc, kc).transpose(-3, -2).reshape(
        *lead, out_channels, cols // kc, *shape)


def dense_spectrum(weight: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Dense (Cout, Cg, *kernel) weight with ``dims`` kernel axes -> its half spectrum, column-major as FDW stores
    it: (C, R, 2) real/imag pairs with entry [c, r] = rfft2(M)[r, c]. Computed in float64 so that the layer
    reproduces the dense one exactly."""
    return torch.view_as_real(torch.fft.rfft2(weight_to_matrix(weight.double(), dims)).t().contiguous())


def radial_grouping(rows: int, cols: int, num_groups: int, device: torch.device | None = None) -> torch.Tensor:
    """Group index of every bin of a (rows, cols//2+1) half spectrum, lowest radial frequencies in group 0.

    Bins are ordered by radius with a stable sort (ties by flat index r*C + c), so the grouping is the same on
    every build; the ordered list is cut into ``num_groups`` contiguous runs whose sizes differ by at most one.
    """
    fr = torch.fft.fftfreq(rows, dtype=torch.float64)
    fc = torch.fft.rfftfreq(cols, dtype=torch.float64)
    radius = (fr[:, None] ** 2 + fc[None, :] ** 2).flatten()
    num_bins = radius.numel()
    if not 1 <= num_groups <= num_bins:
        raise ValueError(
            f"number of frequency groups n={num_groups} must be between 1 and the {num_bins} spectral bins "
            f"of a ({rows}, {cols}) weight matrix")
    order = torch.argsort(radius, stable=True)
    group_of_rank = torch.arange(num_bins, dtype=torch.int64) * num_groups // num_bins
    group = torch.empty(num_bins, dtype=torch.int64)
    group[order] = group_of_rank
    return group.view(rows, cols // 2 + 1).to(device)


def upgrade_spectrum(state_dict: dict[str, torch.Tensor], prefix: str, scale: float) -> None:
    """In place: a checkpoint's ``spectrum`` in the orthonormal scale ``scale`` and its ``spectrum_scale`` set.
    Checkpoints from before the scale (no ``spectrum_scale``) hold the unnormalised FFT (scale 1)."""
    key = prefix + 'spectrum'
    if key not in state_dict:
        return
    stored = state_dict.get(prefix + 'spectrum_scale')
    stored = 1.0 if stored is None else float(stored)
    if not math.isfinite(stored) or stored <= 0:
        raise ValueError(f"{prefix}spectrum_scale is {stored}, expected {scale:.6g}")
    if abs(stored / scale - 1) > 1e-2:  # another convention: bring it to this one
        state_dict[key] = state_dict[key] * (stored / scale)
    state_dict[prefix + 'spectrum_scale'] = torch.tensor(scale, dtype=state_dict[key].dtype)


def check_grouping(group: torch.Tensor, shape: tuple[int, int], num_groups: int, name: str = 'group_of_bin') -> None:
    """Refuse a bin -> group map that is not (R, C/2+1) integers in [0, n) covering every group: its ids index
    memory in the synthesis, so a map from a checkpoint is checked before any kernel reads it."""
    if tuple(group.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(group.shape)}, expected {tuple(shape)}")
    if group.dtype.is_floating_point or group.dtype.is_complex or group.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer group ids, got {group.dtype}")
    low, high = int(group.min()), int(group.max())
    if low < 0 or high >= num_groups:
        raise ValueError(f"{name} holds group ids in [{low}, {high}], outside [0, {num_groups})")
    missing = (torch.bincount(group.flatten().long().cpu(), minlength=num_groups) == 0).sum()
    if missing:
        raise ValueError(f"{name} leaves {int(missing)} of its {num_groups} frequency groups without a bin")


class FourierDisjointWeight(nn.Module):
    """Kernel stored as its half spectrum; synthesises per-sample kernels from per-group attention.

    ``spectrum`` is ``rfft2`` of the weight matrix divided by ``scale`` = sqrt(R * Cg*k) (norm "ortho") as
    real/imag pairs, stored column-major: shape (C, R, 2), entry [c, r] = bin (r, c), so that the per-sample
    inverse FFT along R reads contiguous memory. The operators take the unnormalised convention; the layers
    hand them the attention times ``scale`` (a (B, n) product instead of a spectrum-sized one).
    ``spectrum_scale`` records the scale in checkpoints. ``group_of_bin`` (R, C) is a persistent buffer so that a
    non-default grouping (e.g. a reference checkpoint's) travels with the weights.
    """

    def __init__(
            self,
            out_channels: int,
            in_channels_per_group: int,
            kernel_size: int | Sequence[int],
            num_groups: int = 64,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.out_channels = out_channels
        self.in_channels_per_group = in_channels_per_group
        self.kernel_size = kernel_shape(kernel_size)  # spatial shape, e.g. (3, 3) or (3, 3, 3)
        self.num_groups = num_groups
        kr, kc = matrix_factors(self.kernel_size)
        self.rows = out_channels * kr
        self.cols = in_channels_per_group * kc
        self.scale = math.sqrt(self.rows * self.cols)
        self.spectrum = nn.Parameter(torch.empty(self.cols // 2 + 1, self.rows, 2, **dd))
        self.register_buffer('spectrum_scale', torch.tensor(self.scale, **dd), persistent=True)
        group = radial_grouping(self.rows, self.cols, num_groups)
        self.register_buffer('group_of_bin', group.to(device=device), persistent=True)
        self.register_buffer('group_index', None, persistent=False)
        self._refresh_group_index(checked=True)  # radial_grouping covers every group by construction

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.out_channels, self.in_channels_per_group, *self.kernel_size

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Set the spectrum from a dense (Cout, Cg, *kernel) weight; the FFT runs in float64 so it is exact."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"dense weight has shape {tuple(weight.shape)}, expected {self.weight_shape}")
        spectrum = dense_spectrum(weight, len(self.kernel_size)) / self.scale
        self.spectrum.copy_(spectrum.to(self.spectrum.dtype))

    @torch.no_grad()
    def set_grouping(self, group_of_bin: torch.Tensor) -> None:
        """Use a given bin -> group map (R, C/2+1) instead of the radial one (checked: see ``check_grouping``)."""
        check_grouping(group_of_bin, tuple(self.group_of_bin.shape), self.num_groups)
        self.group_of_bin.copy_(group_of_bin)
        self._refresh_group_index(checked=True)

    @torch.no_grad()
    def _refresh_group_index(self, checked: bool = False) -> None:
        """The map as the operators read it: column-major (C/2+1, R) like the spectrum, uint8 for n <= 256 (a
        quarter of int32's memory traffic), else int32; made only from a checked ``group_of_bin`` (``checked``:
        the caller has just checked it)."""
        group = self.group_of_bin
        if not checked and not group.is_meta:
            check_grouping(group, tuple(group.shape), self.num_groups)
        index_dtype = torch.uint8 if self.num_groups <= 256 else torch.int32
        self.group_index = group.t().to(index_dtype).contiguous()
        self._group_key = None if group.is_meta else (group.data_ptr(), group._version)

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Rebuild ``group_index`` after a meta-device build (timm's and transformers' convention). Where
        ``group_of_bin`` is not loaded yet (memory left by ``to_empty``), the index is made safe (group 0) and
        marked stale: the next eager forward checks the map again and refuses it if it is still bad."""
        if self.group_of_bin.is_meta:
            return
        try:
            self._refresh_group_index()
        except ValueError:
            self.group_index = torch.zeros_like(self.group_index, device=self.group_of_bin.device)
            self._group_key = None

    def indices(self) -> torch.Tensor:
        """``group_index`` for the operators; in eager mode a ``group_of_bin`` changed in place since it was
        checked is checked again first (and refused at forward if it went bad)."""
        group = self.group_of_bin
        if not torch.compiler.is_compiling() and not group.is_meta and self._group_key != (
                group.data_ptr(), group._version):
            self._refresh_group_index()
        return self.group_index

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        try:
            upgrade_spectrum(state_dict, prefix, self.scale)
        except ValueError as e:
            error_msgs.append(str(e))
            return
        key = prefix + 'group_of_bin'
        if key in state_dict:
            try:
                check_grouping(state_dict[key], tuple(self.group_of_bin.shape), self.num_groups, name=key)
            except ValueError as e:
                error_msgs.append(str(e))
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._refresh_group_index(checked=key in state_dict)

    def static_weight(self) -> torch.Tensor:
        """The dense kernel the spectrum represents (all group attentions equal to 1)."""
        spec = torch.view_as_complex(self.spectrum.to(fft_dtype(self.spectrum.dtype))).t() * self.scale
        matrix = torch.fft.irfft2(spec, s=(self.rows, self.cols))
        return matrix_to_weight(matrix, self.out_channels, self.kernel_size).contiguous()

    def forward(self, kernel_attention: torch.Tensor) -> torch.Tensor:
        """(B, n) attention per group -> per-sample weight matrices (B, Cout*kr, Cg*kc), at least float32."""
        ones = kernel_attention.new_ones(kernel_attention.shape[0], self.in_channels_per_group)
        return synthesize(self.spectrum, self.indices(), self.operator_attention(kernel_attention), None, None, ones,
                          list(self.kernel_size), 1)

    def operator_attention(self, kernel_attention: torch.Tensor) -> torch.Tensor:
        """The attention as the operators take it (they read ``spectrum`` as the unnormalised FFT)."""
        return kernel_attention * self.scale

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, num_groups={self.num_groups}"
