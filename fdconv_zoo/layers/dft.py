"""The inverse real 2-D FFT as matrix products, for runtimes whose FFT is slow (ONNX export).

onnxruntime's DFT is radix-2 on powers of two and a plain O(n^2) sum on any other length, and the weight matrices
of 3x3 kernels have 3 x 2^m rows and columns. The four-step Cooley-Tukey split n = n2 x n1 turns one transform into
small dense DFT matrices (at most ``LEAF`` points), a twiddle product and a reordering: a few large matrix
products, which every runtime does fast, in real arithmetic (no complex tensors to export), and accurate in
float32 (each stage is an exact small DFT; about 3e-7 relative at 1536 x 1536).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

LEAF = 64  # largest DFT done as one matrix; bigger lengths are split


def split(n: int) -> tuple[int, int]:
    """n = n2 * n1 with n2 the factor <= LEAF nearest sqrt(n) (two stages for n <= LEAF^2); (n, 1) for a length
    that is small or has no such factor (then one dense n x n matrix)."""
    if n <= LEAF:
        return n, 1
    factors = [d for d in range(2, LEAF + 1) if n % d == 0]
    if not factors:
        return n, 1
    n2 = min(factors, key=lambda d: abs(math.log(d / math.sqrt(n))))
    return n2, n // n2


_cache: dict[tuple, tuple[Tensor, Tensor]] = {}


def _exp_table(rows: int, cols: int, length: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of 2 pi r c / length, (rows, cols), in like's dtype and device: constants made outside any
    tracing mode, so that a traced graph holds them as plain tensors and eager calls can reuse the cache."""
    key = (rows, cols, length, like.dtype, str(like.device))
    entry = _cache.get(key)
    if entry is None:
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():
            angle = 2 * np.pi * np.outer(np.arange(rows), np.arange(cols)) / length
            entry = tuple(torch.from_numpy(t).to(like.device, like.dtype) for t in (np.cos(angle), np.sin(angle)))
            entry = _cache.setdefault(key, entry)
    return entry


def _complex_matmul(cos: Tensor, sin: Tensor, re: Tensor, im: Tensor, real_only: bool) -> tuple[Tensor, Tensor | None]:
    """(cos + i sin) @ (re + i im), the imaginary part skipped when only the real part is wanted."""
    out_re = cos @ re - sin @ im
    return out_re, None if real_only else cos @ im + sin @ re


def idft_rows(re: Tensor, im: Tensor, real_only: bool = False) -> tuple[Tensor, Tensor | None]:
    """Unnormalised inverse DFT along axis -2 of a complex (..., n, h) given as real and imaginary parts."""
    n, h = re.shape[-2:]
    n2, n1 = split(n)
    if n1 == 1:
        return _complex_matmul(*_exp_table(n, n, n, re), re, im, real_only)
    lead = re.shape[:-2]
    # input index j = j1 + n1 j2, output index k = k2 + n2 k1: a DFT over j2 (rows of an (n2, n1 h) view), the
    # twiddle exp(2 pi i j1 k2 / n), then a DFT over j1, and the (k2, k1) result read in (k1, k2) order
    cos, sin = _exp_table(n2, n2, n2, re)
    yr, yi = _complex_matmul(cos, sin, re.reshape(*lead, n2, n1 * h), im.reshape(*lead, n2, n1 * h), False)
    yr, yi = yr.reshape(*lead, n2, n1, h), yi.reshape(*lead, n2, n1, h)
    cos, sin = (t.unsqueeze(-1) for t in _exp_table(n2, n1, n, re))
    yr, yi = yr * cos - yi * sin, yr * sin + yi * cos
    zr, zi = idft_rows(yr, yi, real_only)
    return tuple(None if z is None else z.transpose(-3, -2).reshape(*lead, n, h) for z in (zr, zi))


def irfft2(re: Tensor, im: Tensor, rows: int, cols: int) -> Tensor:
    """``torch.fft.irfft2(torch.complex(re, im), s=(rows, cols))`` for a (..., rows, cols // 2 + 1) half spectrum,
    by matrix products only."""
    re, im = idft_rows(re, im)
    # along the columns: the half spectrum extended by Hermitian symmetry (bin c = conj(bin cols - c)), of which
    # only the real part of the transform is needed (the imaginary parts of the DC and Nyquist bins drop out)
    tail = cols - re.shape[-1]
    re, im = re.transpose(-1, -2), im.transpose(-1, -2)
    re = torch.cat([re, re[..., 1:1 + tail, :].flip(-2)], -2)
    im = torch.cat([im, -im[..., 1:1 + tail, :].flip(-2)], -2)
    out, _ = idft_rows(re, im, real_only=True)
    return out.transpose(-1, -2) / (rows * cols)
