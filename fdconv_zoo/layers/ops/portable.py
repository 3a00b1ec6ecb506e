"""``fdconv::dynamic_conv`` in operations every exporter and runtime has: the decomposition that the ONNX export
(``fdconv_zoo.apps.export``) hands to ``run_decompositions``. Only exports import this module (and ``dft``)."""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dft
from .backend import fft_dtype
from .bands import along, combine_bands, cutoff_frequency
from .conv import Conv
from .synthesis import geometry, local_logits, matrix_factors


def low_pass_projections(n: int, cutoffs: list[int], like: Tensor) -> list[Tensor]:
    """Per cut-off, the (n, n) low-pass projection of one axis, P[t, s] = p[(t - s) mod n] with
    p[d] = (1/n) sum over kept j of cos(2 pi j d / n), made inside the graph from the length, so that a symbolic
    length in an export stays symbolic. The kept frequencies follow kept_frequencies' float32 test exactly:
    float32(1/n) by a float32 division (equal to numpy's rounding for every n < 100000, checked), times |j|."""
    # n enters as a 0-d tensor: exporters take tensor arithmetic on a symbolic size, not every scalar form of it
    j = torch.arange(n, device=like.device)
    length = torch.full((), n, dtype=torch.int64, device=like.device)
    step = torch.reciprocal(length.to(torch.float32))
    freq = torch.minimum(j, length - j).to(torch.float32) * step  # |fftfreq(n)| as the reference computes it
    turns = torch.remainder(j.unsqueeze(1) * j, length).to(like.dtype) / length.to(like.dtype)  # reduced mod n first
    cos = torch.cos(turns * (2 * math.pi))
    offset = torch.remainder(j.unsqueeze(1) - j, length)
    projections = []
    for kappa in cutoffs:
        kept = (freq < cutoff_frequency(kappa)).to(like.dtype)
        projections.append((cos @ kept / length.to(like.dtype))[offset])
    return projections


def band_modulation_portable(x: Tensor, band_scale: Tensor, cutoffs: list[int]) -> Tensor:
    """FBM with the projections made in the graph (low_pass_projections): for exports, where the spatial size
    may be symbolic. Full (n, n) projections cost more than the bases' few columns; only exports pay it."""
    per_axis = [low_pass_projections(n, cutoffs, x) for n in x.shape[2:]]
    lows = []
    for j in range(len(cutoffs)):
        low = x
        for dim, projections in enumerate(per_axis):  # the projections are symmetric
            low = along(low, dim + 2, projections[j])
        lows.append(low)
    return combine_bands(x, band_scale, lows)


def portable_dynamic_conv(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial,
                          filter_attention, bias, kernel_size, groups, stride, padding, dilation, pre_pad,
                          padding_mode, cutoffs) -> Tensor:
    """fdconv::dynamic_conv in operations every exporter and runtime has, for torch.export decompositions (ONNX):
    the group scaling in real arithmetic, the inverse FFT as matrix products (dft.irfft2: no complex tensors, and
    fast where a runtime's FFT is not), and the per-sample kernels applied by im2col from slices and one batched
    matrix product, so the batch stays a free dimension (no convolution with batch x groups groups). No fused
    loops and no data-dependent checks."""
    dtype = fft_dtype(spectrum.dtype)
    rows, cols = geometry(spectrum, channel, kernel_size, groups)
    kr, kc = matrix_factors(kernel_size)
    b = x.shape[0]
    conv = Conv(x, rows, kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode)
    scale = attention.to(dtype)[:, group_index.long().t()]  # (B, R, C/2+1)
    # tokens (FDLinear: no kernel axes, one group) multiply x K^T: the transposed product (B, C, R) is then the
    # matmul's right operand as it is, and its gates come transposed (the local logits as windows @ taps^T)
    product = dft.irfft2(spectrum.to(dtype).permute(2, 1, 0) * scale.unsqueeze(1), rows, cols, conv.tokens)
    if taps is not None:
        flat_taps, windows = taps.to(dtype).reshape(taps.shape[0], -1), windows.to(dtype)
        logits = windows @ flat_taps.t() if conv.tokens else local_logits(flat_taps, windows, rows, kc, groups)
        product = product * torch.sigmoid(logits)
    inp = x
    if band_scale is not None:
        inp = band_modulation_portable(x.to(dtype), band_scale.to(dtype), cutoffs).to(x.dtype)
    if pre_pad:
        inp = F.pad(inp, pre_pad, mode='constant' if padding_mode == 'zeros' else padding_mode)
    cout, cg = conv.out_channels, cols // kc
    if conv.tokens:
        y = torch.bmm(inp, (product * channel.to(dtype).unsqueeze(2)).to(x.dtype))
    else:
        # the contraction runs over (r, i, v), the order of a kernel matrix row (o, r) followed by its columns
        # (i, v), r the kernel position on every axis but the last and v on the last: the product is the
        # matmul's left operand as it is, and im2col stacks its taps in that order. The channel attention of input
        # channel i and the spatial attention of tap (r, v) scale it in one pass.
        factor = channel.to(dtype).view(b, groups, 1, 1, cg, 1)
        if spatial is not None:
            factor = factor * spatial.to(dtype).view(b, 1, 1, kr, 1, kc)
        kernels = (product.view(b, groups, cout // groups, kr, cg, kc) * factor).to(x.dtype)
        pads = [p for pad in reversed(conv.padding) for p in (pad, pad)]
        padded = F.pad(inp, pads) if any(conv.padding) else inp
        padded = padded.reshape(b, groups, cg, *padded.shape[2:])
        offsets = list(itertools.product(*(range(k) for k in kernel_size)))  # kernel positions, row-major

        def window(offset: tuple[int, ...]) -> Tensor:
            return padded[(..., *(slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, s, n in zip(
                offset, conv.dilation, conv.stride, conv.size, strict=True)))]
        columns = torch.stack([torch.stack([window(offsets[r * kc + v]) for v in range(kc)], 3)
                               for r in range(kr)], 2)  # (B, groups, kr, Cg, kc, *out)
        positions = math.prod(conv.size)
        y = torch.matmul(kernels.reshape(b, groups, cout // groups, kr * cg * kc),
                         columns.reshape(b, groups, kr * cg * kc, positions)).reshape(b, cout, *conv.size)
    shape = conv.channel_shape(y)
    if filter_attention is not None:
        y = y * filter_attention.view(shape).to(y.dtype)
    return y + bias.view(shape[1:]).to(y.dtype) if bias is not None else y
