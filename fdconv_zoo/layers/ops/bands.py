"""FBM's band modulation: the math of ``fdconv::band_modulation`` and of FBM inside ``fdconv::dynamic_conv``.

out = sum_j A_j (LP_{j-1} - LP_j) x + LP_J x  ==  A_1 x + sum_j W_j LP_j x,  W_j = A_{j+1} - A_j,  A_{J+1} = 1.
The masks are squares in frequency, so LP_j = P_H,j x P_W,j with P = Q Q^T for a real Fourier basis Q of few
columns: a few small matrix products instead of FFTs. LP_j is symmetric, which gives the adjoint.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from . import native
from .backend import scratch
from .constants import cached_constant


def check_cutoffs(cutoffs: Sequence[int]) -> tuple[int, ...]:
    """FBM's cut-offs kappa: a non-empty, strictly increasing sequence of integers >= 1 (nested low passes, the
    widest first). The one rule for the layer options, FBM and the operators."""
    if (not isinstance(cutoffs, (list, tuple)) or not cutoffs
            or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 1 for c in cutoffs)
            or list(cutoffs) != sorted(set(cutoffs))):
        raise ValueError(f"FBM cut-offs must be a non-empty increasing list of integers >= 1, got {cutoffs!r}")
    return tuple(int(c) for c in cutoffs)


def cutoff_frequency(kappa: int) -> np.float32:
    """The reference's float32 cut-off: frequencies |f| below it pass the low-pass of kappa."""
    return np.float32(0.5 / kappa + 1e-8)


def kept_frequencies(length: int, cutoffs: tuple[int, ...]) -> tuple[int, ...]:
    """How many non-negative frequencies j/length pass each cut-off kappa (|f| < 0.5/kappa + 1e-8).

    Evaluated in float32 as the reference does: there 0.5/kappa + 1e-8 rounds to 0.25 for kappa=2 (edge bins
    excluded) but stays above 0.125 and 0.0625 for kappa=4, 8 (edge bins kept). Checkpoints were trained so.
    """
    # numpy, bit for bit what torch.fft.fftfreq(length, dtype=float32) gives (float32 index x float32(1/length)),
    # so that the bases stay plain constants inside a traced or exported graph
    freq = np.arange(length // 2 + 1, dtype=np.float32) * np.float32(1.0 / length)
    return tuple(int((freq < cutoff_frequency(kappa)).sum()) for kappa in cutoffs)


def basis_ranks(length: int, cutoffs: tuple[int, ...]) -> tuple[int, ...]:
    """Per cut-off, the columns of the real Fourier basis that span its kept frequencies (cos and sin of each
    but DC; the Nyquist frequency has no sine)."""
    return tuple(0 if count == 0 else min(2 * count - 1, length) for count in kept_frequencies(length, cutoffs))


def _fourier_basis_cpu(length: int, cutoffs: tuple[int, ...]) -> Tensor:
    # orthonormal real Fourier basis, columns by frequency: DC, cos 1, sin 1, cos 2, sin 2, ... (Nyquist: cos only);
    # numpy, then one real tensor even inside a trace (torch.export, compile): a constant of the graph
    t = np.arange(length, dtype=np.float64)
    columns = [np.full(length, 1 / math.sqrt(length))]
    for j in range(1, max(kept_frequencies(length, cutoffs))):
        angle = 2 * math.pi * j * t / length
        if 2 * j == length:
            columns.append(np.cos(angle) / math.sqrt(length))
        else:
            columns += [np.cos(angle) * math.sqrt(2 / length), np.sin(angle) * math.sqrt(2 / length)]
    return torch.from_numpy(np.stack(columns, 1))


def fourier_basis(length: int, cutoffs: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype) -> tuple[Tensor, tuple[int, ...]]:
    """Basis Q (length, r) and, per cut-off, how many of its leading columns span the kept frequencies.

    Q[:, :rank] Q[:, :rank]^T is the exact low-pass projection of one axis; cached per length, device, dtype
    (constants of a traced graph).
    """
    cutoffs = tuple(cutoffs)

    def make() -> tuple[Tensor, tuple[int, ...]]:
        return _fourier_basis_cpu(length, cutoffs).to(device=device, dtype=dtype), basis_ranks(length, cutoffs)
    return cached_constant(('fourier_basis', length, cutoffs, str(device), dtype), make)


def _bases(x: Tensor, cutoffs: list[int]) -> list[tuple[Tensor, list[int]]]:
    """Per spatial axis of x: its basis and, per cut-off, the rank of the low pass."""
    return [(basis, list(ranks)) for basis, ranks in (fourier_basis(n, tuple(cutoffs), x.device, x.dtype)
                                                       for n in x.shape[2:])]


def along(t: Tensor, dim: int, matrix: Tensor) -> Tensor:
    """t with its axis ``dim`` (length n) multiplied by ``matrix`` (n, r): axis length r, as one matrix product."""
    if dim == t.ndim - 1:
        return t @ matrix
    shape = t.shape
    out = matrix.t() @ t.reshape(math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:]))
    return out.view(*shape[:dim], matrix.shape[1], *shape[dim + 1:])


def low_passes(x: Tensor, cutoffs: list[int]) -> list[Tensor]:
    """LP_j x for every cut-off, x (B, C, *spatial) with 1 to 3 spatial axes: the Fourier coefficients of the
    widest band are made once (one product per axis), every narrower band is a leading corner of them.

    Sequences take the FFT instead: the widest band keeps about half of a sequence's frequencies, so its basis
    product costs O(L^2) per channel where the FFT costs O(L log L), and sequences are long. Keeping the first
    ``kept_frequencies`` bins of the real FFT is the same projection as the basis (DC, then cos and sin)."""
    if x.ndim == 3:
        length = x.shape[-1]
        counts = kept_frequencies(length, tuple(cutoffs))
        spectrum = torch.fft.rfft(x, dim=-1)[..., :max(counts)]
        return [torch.fft.irfft(spectrum[..., :count], n=length, dim=-1) for count in counts]
    bases = _bases(x, cutoffs)
    coeff = x
    for dim in reversed(range(len(bases))):
        basis, ranks = bases[dim]
        coeff = along(coeff, dim + 2, basis[:, :max(ranks)])
    lows = []
    for j in range(len(cutoffs)):
        low = coeff[(slice(None), slice(None), *(slice(0, ranks[j]) for _, ranks in bases))]
        for dim in reversed(range(len(bases))):
            basis, ranks = bases[dim]
            low = along(low, dim + 2, basis[:, :ranks[j]].t())
        lows.append(low)
    return lows


def _band_weights(band_scale: Tensor) -> Tensor:
    """W_j = A_{j+1} - A_j with A_{J+1} = 1, (B, J, H, W)."""
    return torch.cat([band_scale[:, 1:], torch.ones_like(band_scale[:, :1])], dim=1) - band_scale


def combine_bands(x: Tensor, band_scale: Tensor, lows: list[Tensor]) -> Tensor:
    """A_1 x + sum_j W_j LP_j x from the low passes LP_j x."""
    weight = _band_weights(band_scale)
    out = band_scale[:, :1] * x
    for j, low in enumerate(lows):  # out of place: export decompositions must stay functional
        out = torch.addcmul(out, weight[:, j:j + 1], low)
    return out


def band_modulation(x: Tensor, band_scale: Tensor, cutoffs: list[int], fused: bool) -> Tensor:
    """FBM of x (B, C, *spatial) by band scales (B, J, *spatial), in x's dtype (at least float32); a fresh tensor.
    With ``fused`` (the operator's backend choice) float32 2-D maps run in one fused loop."""
    if fused and x.dtype == band_scale.dtype == torch.float32 and x.numel() and x.ndim == 4:
        (basis_h, ranks_h), (basis_w, ranks_w) = _bases(x, cutoffs)
        h, w = x.shape[-2:]
        work = scratch('fbm.work', native.workspace_floats(2, h, w, max(ranks_h), max(ranks_w), len(cutoffs)))
        return native.band_modulation(x.contiguous(), band_scale.contiguous(), basis_h, tuple(ranks_h), basis_w,
                                      tuple(ranks_w), work)
    return combine_bands(x, band_scale, low_passes(x, cutoffs))


def band_modulation_backward(grad: Tensor, x: Tensor, band_scale: Tensor, cutoffs: list[int]) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`band_modulation` for x and the band scales."""
    weight = _band_weights(band_scale)
    grad_x = band_scale[:, :1] * grad
    grad_weight = []
    for j, low in enumerate(low_passes(x, cutoffs)):
        grad_weight.append((grad * low).sum(1))
        grad_x += low_passes(weight[:, j:j + 1] * grad, cutoffs[j:j + 1])[0]
    grad_weight = torch.stack(grad_weight, 1)  # dL/dW_j, (B, J, *spatial)
    # W_j = A_{j+1} - A_j: A_j gets -dW_j and +dW_{j-1}; A_1 also multiplies x directly
    grad_scale = -grad_weight
    grad_scale[:, 1:] += grad_weight[:, :-1]
    grad_scale[:, 0] += (grad * x).sum(1)
    return grad_x, grad_scale


def band_flops(batch: int, channels: int, *sizes_and_cutoffs) -> int:
    """FLOPs of FBM's basis products (2 per multiply-add) on a (batch, channels, *sizes) map: the coefficients of
    the widest band, one product per axis, and each band made back from them."""
    *sizes, cutoffs = sizes_and_cutoffs
    if len(sizes) == 1:  # sequences: one real FFT and one inverse per band (see low_passes)
        return int(batch * channels * (1 + len(cutoffs)) * 2.5 * sizes[0] * math.log2(max(sizes[0], 2)))
    ranks = [max(basis_ranks(n, tuple(cutoffs))) for n in sizes]

    def products(start: list[int], end: list[int]) -> int:
        shape, flops = list(start), 0
        for dim in reversed(range(len(shape))):
            flops += 2 * batch * channels * math.prod(shape) * end[dim]
            shape[dim] = end[dim]
        return flops
    return products(sizes, ranks) + len(cutoffs) * products(ranks, sizes)
