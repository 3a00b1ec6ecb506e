"""Frequency Band Modulation (FBM), from "Frequency Dynamic Convolution for Dense Image Prediction" (CVPR 2025).

The input map is split into frequency bands by nested low-pass masks; each band but the lowest is scaled by
a spatial map 2*sigmoid(conv3x3(x)) shared by all channels. With all maps equal to 1 the input is unchanged.

The masks are squares in frequency, max(|fr|, |fc|) < cut-off, so each low pass is separable: LP = P_H x P_W
with P the projection of one axis onto its kept frequencies. P = Q Q^T for a real Fourier basis Q of few
columns, so the bands cost a few small matrix products instead of one forward and J inverse 2-D FFTs. Without
autograd, float32 on the CPU, everything after the band logits is one fused loop per plane
(``native.band_modulation``): no band maps are materialised.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import native
from .fdw import fft_dtype


def kept_frequencies(length: int, cutoffs: tuple[int, ...]) -> tuple[int, ...]:
    """How many non-negative frequencies j/length pass each cut-off kappa (|f| < 0.5/kappa + 1e-8).

    Evaluated in float32 as the reference does: there 0.5/kappa + 1e-8 rounds to 0.25 for kappa=2 (edge bins
    excluded) but stays above 0.125 and 0.0625 for kappa=4, 8 (edge bins kept). Checkpoints were trained so.
    """
    freq = torch.fft.fftfreq(length, dtype=torch.float32).abs()[:length // 2 + 1]
    return tuple(int((freq < torch.tensor(0.5 / kappa + 1e-8, dtype=torch.float32)).sum()) for kappa in cutoffs)


@lru_cache(maxsize=64)
def _fourier_basis_cpu(length: int, cutoffs: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    # orthonormal real Fourier basis, columns by frequency: DC, cos 1, sin 1, cos 2, sin 2, ... (Nyquist: cos only)
    kept = kept_frequencies(length, cutoffs)
    t = torch.arange(length, dtype=torch.float64)
    columns = [torch.full((length,), 1 / math.sqrt(length), dtype=torch.float64)]
    ranks = []
    for j in range(1, max(kept)):
        angle = 2 * math.pi * j * t / length
        if 2 * j == length:
            columns.append(torch.cos(angle) / math.sqrt(length))
        else:
            columns += [torch.cos(angle) * math.sqrt(2 / length), torch.sin(angle) * math.sqrt(2 / length)]
    for count in kept:
        ranks.append(0 if count == 0 else min(2 * count - 1, length))
    return torch.stack(columns, 1), tuple(ranks)


_basis_cache: dict[tuple, tuple[torch.Tensor, tuple[int, ...]]] = {}


def fourier_basis(
        length: int,
        cutoffs: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Basis Q (length, r) and, per cut-off, how many of its leading columns span the kept frequencies.

    Q[:, :rank] Q[:, :rank]^T is the exact low-pass projection of one axis; cached per length, device, dtype.
    """
    key = (length, cutoffs, str(device), dtype)
    entry = _basis_cache.get(key)
    if entry is None:
        basis, ranks = _fourier_basis_cpu(length, cutoffs)
        entry = _basis_cache.setdefault(key, (basis.to(device=device, dtype=dtype), ranks))
    return entry


class FBM(nn.Module):
    """x' = sum_j A_j * (LP_{j-1} - LP_j) + LP_J with LP_0 = x, computed in float32."""

    def __init__(
            self,
            in_channels: int,
            cutoffs: tuple[int, ...] = (2, 4, 8),
            device=None,
            dtype=None,
    ):
        super().__init__()
        if not cutoffs or any(int(c) != c or c < 1 for c in cutoffs):
            raise ValueError(f"FBM cut-offs must be a non-empty list of positive integers, got {cutoffs}")
        self.cutoffs = tuple(int(c) for c in cutoffs)
        # the J per-band 3x3 convs Cin -> 1 run as one Cin -> J conv
        self.band_conv = nn.Conv2d(in_channels, len(self.cutoffs), 3, padding=1, device=device, dtype=dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.band_conv.weight)
        nn.init.zeros_(self.band_conv.bias)

    def _band_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The J band convs (3x3, padding 1, Cin -> J) as one matrix product to the J*9 tap maps and col2im
        (``F.fold``), which adds each tap's map shifted into place: 2-3x faster on the CPU than a convolution
        with so few outputs. Fold scatters where a convolution gathers, hence the flipped taps."""
        b, c, h, w = x.shape
        taps = self.band_conv.weight.to(x.dtype).flip(2, 3).permute(0, 2, 3, 1).reshape(-1, c)  # (J*9, Cin)
        maps = torch.matmul(taps, x.reshape(b, c, h * w))
        return F.fold(maps, (h, w), 3, padding=1) + self.band_conv.bias.to(x.dtype).view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, H, W) -> modulated map of the same shape, at least float32."""
        h, w = x.shape[-2:]
        x = x.to(fft_dtype(x.dtype))
        basis_h, ranks_h = fourier_basis(h, self.cutoffs, x.device, x.dtype)
        basis_w, ranks_w = fourier_basis(w, self.cutoffs, x.device, x.dtype)
        band_scale = 2.0 * torch.sigmoid(self._band_logits(x))  # (B, J, H, W)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling() and native.usable(x, band_scale):
            return native.band_modulation(x.contiguous(), band_scale, basis_h, ranks_h, basis_w, ranks_w)  # one pass
        # sum_j A_j (LP_{j-1} - LP_j) + LP_J  ==  A_1 x + sum_j (A_{j+1} - A_j) LP_j  with A_{J+1} = 1
        next_scale = torch.cat([band_scale[:, 1:], torch.ones_like(band_scale[:, :1])], dim=1)
        weight = next_scale - band_scale
        # Fourier coefficients of the widest band; every narrower band is a leading corner of them
        rh, rw = max(ranks_h), max(ranks_w)
        coeff = basis_h[:, :rh].t() @ (x @ basis_w[:, :rw])  # (B, C, rh, rw)
        out = band_scale[:, :1] * x
        for j, (rh, rw) in enumerate(zip(ranks_h, ranks_w, strict=True)):
            low = basis_h[:, :rh] @ coeff[..., :rh, :rw] @ basis_w[:, :rw].t()
            out.addcmul_(weight[:, j:j + 1], low)
        return out
