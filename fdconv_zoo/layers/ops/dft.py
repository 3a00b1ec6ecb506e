"""The inverse real 2-D FFT as matrix products, for runtimes whose FFT is slow (ONNX export).

onnxruntime's DFT is radix-2 on powers of two and a plain O(n^2) sum on any other length, and the weight matrices
of 3x3 kernels have 3 x 2^m rows and columns. The four-step Cooley-Tukey split n = n2 x n1 turns one transform into
two batched matrix products with constant real matrices and one reordering, which every runtime does fast:
complex numbers are (real, imaginary) rows of one real tensor, the twiddle factors are folded into the second
stage's matrices (one per output index of the first), and float32 stays accurate (each stage is an exact small
DFT; about 3e-7 relative at 1536 x 1536).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .constants import cached_constant

LEAF = 128  # largest first-stage factor; lengths up to LEAF^2 take two stages of at most LEAF points


def split(n: int) -> tuple[int, int]:
    """n = n2 * n1 with both factors <= LEAF and n2 nearest sqrt(n); past LEAF^2 the largest n2 <= LEAF (the
    second stage's matrices grow as 4 n n1); (n, 1) for a length that is small or has no factor <= LEAF (then
    one dense matrix)."""
    factors = [d for d in range(2, LEAF + 1) if n % d == 0]
    if n <= LEAF or not factors:
        return n, 1
    balanced = [d for d in factors if n // d <= LEAF]
    n2 = min(balanced, key=lambda d: abs(math.log(d / math.sqrt(n)))) if balanced else max(factors)
    return n2, n // n2


def _complex_blocks(re: np.ndarray, im: np.ndarray, real_only: bool) -> np.ndarray:
    """(..., m, n) complex matrices as real (..., [re, im] x m, [re, im] x n) ones acting on stacked parts (only
    the real output rows with ``real_only``)."""
    top = np.concatenate([re, -im], -1)
    return top if real_only else np.concatenate([top, np.concatenate([im, re], -1)], -2)


def _stages(n: int, real_only: bool, scale: float) -> tuple[np.ndarray, ...]:
    """The matrices of an unnormalised inverse DFT of n points times ``scale``: one (2n, 2n) matrix, or for
    n = n2 x n1 the first stage (rows ordered (k2, part), columns (part, j2)) and per k2 the second stage with
    its twiddle factors exp(2 pi i j1 k2 / n) folded in."""
    n2, n1 = split(n)
    if n1 == 1:
        angle = 2 * np.pi * np.outer(np.arange(n), np.arange(n)) / n
        return (scale * _complex_blocks(np.cos(angle), np.sin(angle), real_only),)
    angle = 2 * np.pi * np.outer(np.arange(n2), np.arange(n2)) / n2
    first = _complex_blocks(np.cos(angle), np.sin(angle), False)  # rows (part, k2)
    first = first.reshape(2, n2, 2 * n2).transpose(1, 0, 2).reshape(2 * n2, 2 * n2)  # rows (k2, part)
    k2, k1, j1 = np.ogrid[:n2, :n1, :n1]
    angle = 2 * np.pi * (k1 * j1 / n1 + j1 * k2 / n)  # (n2, n1 k1, n1 j1)
    return first, scale * _complex_blocks(np.cos(angle), np.sin(angle), real_only)


def _matrices(n: int, real_only: bool, scale: float, like: Tensor) -> tuple[Tensor, ...]:
    """_stages as tensors in like's dtype and device (cached constants of a traced graph)."""
    return cached_constant(
        ('dft', n, real_only, scale, like.dtype, str(like.device)),
        lambda: tuple(torch.from_numpy(m).to(like.device, like.dtype) for m in _stages(n, real_only, scale)))


def idft(z: Tensor, real_only: bool = False, scale: float = 1.0) -> Tensor:
    """Inverse DFT (unnormalised, times ``scale``) along axis -2 of complex values stored as z (..., 2, n, h),
    part 0 real and 1 imaginary; the same layout back, or the real part only, (..., n, h), with ``real_only``.
    Every reordering moves whole rows of h values (onnxruntime's Transpose is 15x slower when the innermost
    axis moves)."""
    *lead, _, n, h = z.shape
    matrices = _matrices(n, real_only, scale, z)
    if len(matrices) == 1:
        return (matrices[0] @ z.reshape(*lead, 2 * n, h)).reshape(*lead, *([] if real_only else [2]), n, h)
    first, second = matrices
    n2, n1 = split(n)
    # input j = j1 + n1 j2 and output k = k2 + n2 k1: a DFT over j2 (rows of a (2 n2, n1 h) view), then per k2 a
    # DFT over j1 with the twiddles, and the (k2, k1) result read in (k1, k2) order
    y = (first @ z.reshape(*lead, 2 * n2, n1 * h)).reshape(*lead, n2, 2 * n1, h)
    out = second @ y  # (..., n2, [2,] n1, h)
    if real_only:
        return out.transpose(-3, -2).reshape(*lead, n, h)
    return out.reshape(*lead, n2, 2, n1, h).permute(*range(len(lead)), -3, -2, -4, -1).reshape(*lead, 2, n, h)


def irfft2(z: Tensor, rows: int, cols: int, transposed: bool = False) -> Tensor:
    """``torch.fft.irfft2(torch.complex(z[..., 0, :, :], z[..., 1, :, :]), s=(rows, cols))`` for a half spectrum z
    (..., 2, rows, cols // 2 + 1), by matrix products only; with ``transposed``, its transpose (..., cols, rows),
    which is how the column pass leaves it (no copy)."""
    z = idft(z).transpose(-1, -2)  # along the rows, then columns first: (..., 2, cols // 2 + 1, rows)
    # along the columns, the half spectrum extended by Hermitian symmetry (bin c = conj(bin cols - c)); only the
    # real part is wanted, to which the imaginary parts of the DC and Nyquist bins do not contribute
    tail = cols - z.shape[-2]
    mirror = z[..., 1:1 + tail, :].flip(-2)
    z = torch.cat([z, torch.stack([mirror[..., 0, :, :], -mirror[..., 1, :, :]], -3)], -2)
    out = idft(z, real_only=True, scale=1.0 / (rows * cols))
    return out if transposed else out.transpose(-1, -2)
