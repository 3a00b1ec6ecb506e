"""Kernel synthesis: the math of ``fdconv::synthesize`` and of the kernels inside ``fdconv::dynamic_conv``.

P = irfft2(spectrum * attention[group]) * sigmoid(local logits) * channel attention, per sample, as (B, Cout*kr,
Cg*kc) weight matrices (``matrix_factors``); its adjoint gives the gradients of the spectrum, the attentions and
the local branch.
Each function takes the operator's backend choice (``fused``): the fused loops of ``native`` for float32, else
whole-batch PyTorch (one 2-D FFT per call: the GPU path).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import native
from .backend import fft_dtype, scratch


def check(condition, message) -> None:
    """A shape or type rule of an operator's inputs, as torch._check_value: a ValueError in eager calls, and a
    guard or runtime assert (not a Python branch) on symbolic sizes while tracing."""
    torch._check_value(condition, message)


def check_group_index(group_index: Tensor, num_groups: int) -> None:
    """Refuse group ids outside [0, n): they index the attention. On CUDA the check is asynchronous (a device
    assert) so that it costs no synchronisation; the fused CPU loops check ids where they read them."""
    if group_index.numel() == 0:
        return
    bad = (group_index.amin() < 0) | (group_index.amax() >= num_groups)
    message = f"fdw.group_index holds group ids outside [0, {num_groups})"
    if group_index.device.type == 'cpu':
        if bad:
            raise ValueError(message)
    else:
        torch._assert_async(~bad, message)


def kernel_shape(kernel_size: int | Sequence[int]) -> tuple[int, ...]:
    """A kernel's spatial shape: an int is a square 2-D kernel."""
    return (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(int(k) for k in kernel_size)


def matrix_factors(kernel_size: Sequence[int]) -> tuple[int, int]:
    """(kr, kc): how a kernel's axes split between the weight matrix's rows, which they share with the output
    channel, and its columns, which they share with the input channel: the last axis goes to the columns and every
    other axis to the rows, so that a 3-D kernel (1, k, k), a 2-D one inflated in time, has the 2-D kernel's
    spectrum. A 1-D kernel is the 2-D kernel (k, 1), as the authors lay out time series; a token product (no axes,
    FDLinear) is (1, 1)."""
    if len(kernel_size) <= 1:
        return (int(kernel_size[0]) if kernel_size else 1), 1
    return math.prod(kernel_size[:-1]), int(kernel_size[-1])


def geometry(spectrum: Tensor, channel: Tensor, kernel_size: Sequence[int], groups: int) -> tuple[int, int]:
    """(rows, cols) of the weight matrices: (Cout*kr, Cg*kc)."""
    return spectrum.shape[1], channel.shape[1] // groups * matrix_factors(kernel_size)[1]


def check_synthesis(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups) -> None:
    """The synthesis inputs fit each other (eager calls and fake tensors alike)."""
    check(len(kernel_size) <= 3 and all(k >= 1 for k in kernel_size),
          lambda: f"kernel_size must list 0 to 3 sizes >= 1, got {list(kernel_size)}")
    rows, cols = geometry(spectrum, channel, kernel_size, groups)
    kr, kc = matrix_factors(kernel_size)
    b = attention.shape[0]
    check(spectrum.ndim == 3 and spectrum.shape[0] == cols // 2 + 1 and spectrum.shape[2] == 2
          and rows % kr == 0 and (rows // kr) % groups == 0,
          lambda: f"spectrum {tuple(spectrum.shape)} does not fit ({rows}, {cols}) weight matrices")
    check(tuple(group_index.shape) == tuple(spectrum.shape[:2]) and group_index.dtype in (torch.uint8, torch.int32),
          lambda: f"group index must be uint8/int32 of shape {tuple(spectrum.shape[:2])}, got {group_index.dtype} "
                  f"{tuple(group_index.shape)}")
    check(attention.ndim == 2, lambda: f"attention must be (B, groups), got {tuple(attention.shape)}")
    check(channel.ndim == 2 and channel.shape[0] == b and channel.shape[1] % groups == 0,
          lambda: f"channel attention {tuple(channel.shape)} does not fit batch {b} and groups {groups}")
    check((taps is None) == (windows is None), lambda: "taps and windows of the local branch come together")
    if taps is not None:
        check(taps.ndim == 2 and windows.ndim == 3 and taps.shape[0] == rows * kc
              and tuple(windows.shape[:2]) == tuple(channel.shape) and taps.shape[1] == windows.shape[2],
              lambda: f"local taps {tuple(taps.shape)} and windows {tuple(windows.shape)} do not fit ({rows}, "
                      f"{cols}) matrices")


def local_logits(taps: Tensor, windows: Tensor, rows: int, kc: int, groups: int) -> Tensor:
    """Logits of the local branch in the weight-matrix layout (B, R, Cg*kc): element (row, i*kc + v) sums
    taps[row*kc + v, t] * windows[b, c, t] over t, c the input channel it reads ((row // (R/g))*Cg + i). For a
    2-D kernel row = o*k + u, so tap row (o*k + u)*k + v is the local conv's output channel of element [o, i, u, v]."""
    b, cin, taps_k = windows.shape
    cg = cin // groups
    t = taps.view(groups, rows // groups, kc, taps_k)
    logits = torch.einsum('bgit,grvt->bgriv', windows.reshape(b, groups, cg, taps_k), t)
    return logits.reshape(b, rows, cg * kc)


def local_logits_backward(grad: Tensor, windows: Tensor, taps: Tensor, kc: int, groups: int) -> tuple[Tensor, Tensor]:
    b, cin, taps_k = windows.shape
    rows, cg = grad.shape[1], cin // groups
    g = grad.reshape(b, groups, rows // groups, cg, kc)
    w = windows.reshape(b, groups, cg, taps_k)
    grad_taps = torch.einsum('bgriv,bgit->grvt', g, w).reshape(taps.shape)
    grad_windows = torch.einsum('bgriv,grvt->bgit', g, taps.view(groups, rows // groups, kc, taps_k))
    return grad_taps, grad_windows.reshape(b, cin, taps_k)


def per_column(channel: Tensor, rows: int, kc: int, groups: int) -> Tensor:
    """The channel attention (B, Cin) of the input channel each matrix element reads, broadcastable to
    (B, R, Cg*kc)."""
    b, cin = channel.shape
    if groups == 1:
        return channel.repeat_interleave(kc, 1).unsqueeze(1)
    cg = cin // groups
    per = channel.view(b, groups, 1, cg, 1).expand(b, groups, rows // groups, cg, kc)
    return per.reshape(b, rows, cg * kc)


def per_column_sum(values: Tensor, channels: int, kc: int, groups: int) -> Tensor:
    """Adjoint of :func:`per_column`: (B, R, Cg*kc) -> sums per input channel (B, Cin)."""
    b, rows, cols = values.shape
    cg = cols // kc
    return values.view(b, groups, rows // groups, cg, kc).sum((2, 4)).reshape(b, channels)


def in_dtype(dtype: torch.dtype, spectrum: Tensor, attention: Tensor, taps: Tensor | None, windows: Tensor | None,
              channel: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """The synthesis inputs in the dtype it computes in; the vectors and the local taps (R*kc, K) contiguous,
    as the fused loops read them."""
    if taps is not None:
        taps, windows = taps.to(dtype).reshape(taps.shape[0], -1).contiguous(), windows.to(dtype).contiguous()
    return spectrum.to(dtype), attention.to(dtype).contiguous(), taps, windows, channel.to(dtype).contiguous()


def _matrices(spectrum: Tensor, group_index: Tensor, attention: Tensor, rows: int, cols: int) -> Tensor:
    """irfft2 of the half spectrum scaled per group, whole batch in one transform: (B, R, C)."""
    check_group_index(group_index, attention.shape[1])
    spec = torch.view_as_complex(spectrum.contiguous())  # (H, R), column-major half spectrum
    scale = attention[:, group_index.long()]  # (B, H, R)
    return torch.fft.irfft2((spec * scale).transpose(1, 2), s=(rows, cols))


def synthesize(spectrum: Tensor, group_index: Tensor, attention: Tensor, taps: Tensor | None, windows: Tensor | None,
               channel: Tensor, kernel_size: Sequence[int], groups: int, fused: bool,
               out: Tensor | None = None) -> Tensor:
    """P (B, Cout*kr, Cg*kc) in the FFT dtype; into ``out`` if given (the fused loops' scratch, inside an op)."""
    spectrum, attention, taps, windows, channel = in_dtype(fft_dtype(spectrum.dtype), spectrum, attention, taps,
                                                            windows, channel)
    rows, cols = geometry(spectrum, channel, kernel_size, groups)
    k = matrix_factors(kernel_size)[1]  # the fused loops and the local branch need only the column factor
    b = attention.shape[0]
    if fused and spectrum.dtype == torch.float32 and b and (groups == 1 or taps is None):
        out = torch.empty(b, rows, cols) if out is None else out
        half = cols // 2 + 1
        columns = scratch('synthesis.columns', rows * b * half * 2)
        work = scratch('synthesis.work', native.workspace_floats(0, b, rows, cols))
        local = (taps, windows, channel) if taps is not None else (None, None, None)
        try:
            native.synthesize(spectrum.contiguous(), group_index, attention, *local, k, columns, work, out)
        except native.FFTRefused:  # the PyTorch code below computes the same
            pass
        else:
            return out if taps is not None else out.mul_(per_column(channel, rows, k, groups))
    product = _matrices(spectrum, group_index, attention, rows, cols)
    if taps is not None:
        product.mul_(torch.sigmoid(local_logits(taps, windows, rows, k, groups)))
    return product.mul_(per_column(channel, rows, k, groups))


def synthesis_backward(grad: Tensor, product: Tensor, spectrum: Tensor, group_index: Tensor, attention: Tensor,
                       taps: Tensor | None, windows: Tensor | None, channel: Tensor, kernel_size: Sequence[int],
                       groups: int, fused: bool) -> tuple[Tensor, ...]:
    """Gradients of P = M * sigmoid(L) * c (``product``, as made by :func:`synthesize`) from dL/dP (``grad``,
    overwritten): spectrum, attention, taps, windows (None without the local branch), channel, and
    sum_i P * dP per (sample, row, v) (B, R, kc), which gives the filter and spatial attention's gradients."""
    dtype, k = product.dtype, matrix_factors(kernel_size)[1]
    spectrum, attention, taps, windows, channel = in_dtype(dtype, spectrum, attention, taps, windows, channel)
    rows, cols = product.shape[1:]
    b, cin = channel.shape
    grad_taps = grad_windows = None
    if taps is not None and groups == 1 and fused and dtype == torch.float32:  # one pass; grad becomes dL/dM in place
        per_tap, grad_taps, grad_windows, channel_sums = native.local_modulation_backward(
            product, grad, taps, windows, channel, k)
    else:
        pdp = product * grad
        per_tap = pdp.view(b, rows, cols // k, k).sum(2)
        channel_sums = per_column_sum(pdp, cin, k, groups)
        factor = per_column(channel, rows, k, groups)
        if taps is not None:
            sig = torch.sigmoid(local_logits(taps, windows, rows, k, groups))
            grad_taps, grad_windows = local_logits_backward(pdp.mul_(1 - sig), windows, taps, k, groups)
            factor = sig.mul_(factor)
        grad.mul_(factor)  # dL/dM
    # P = M * s * c: sum over c's elements of dP * M * s == sum P * dP / c  (c = att_multi * sigmoid > 0)
    grad_channel = channel_sums / channel.clamp_min(torch.finfo(dtype).tiny)
    grad_spectrum, grad_attention = spectrum_adjoint(grad, spectrum, group_index, attention, fused)
    return grad_spectrum, grad_attention, grad_taps, grad_windows, grad_channel, per_tap


def spectrum_adjoint(grad: Tensor, spectrum: Tensor, group_index: Tensor, attention: Tensor,
                     fused: bool) -> tuple[Tensor, Tensor]:
    """Adjoint of :func:`_matrices`: dL/dM (B, R, C) -> gradients of the spectrum (H, R, 2) and attention (B, n).

    The adjoint of irfft2 is rfft2 / (R*C) with the half-spectrum columns that stand for two bins (all but DC
    and Nyquist) counted twice."""
    (b, rows, cols), half = grad.shape, spectrum.shape[0]
    weight = torch.full((half,), 2.0 / (rows * cols), device=grad.device, dtype=grad.dtype)
    weight[0] /= 2
    if cols % 2 == 0:
        weight[-1] /= 2
    if fused and grad.dtype == torch.float32 and b:
        columns = scratch('synthesis.columns', half * b * rows * 2)
        work = scratch('synthesis.work', native.workspace_floats(1, b, rows, cols))
        try:
            return native.synthesis_gradient(grad.contiguous(), spectrum.contiguous(), group_index, weight,
                                             attention, columns, work)
        except native.FFTRefused:  # the PyTorch code below computes the same
            pass
    # no check of group_index here: the product being differentiated was made from it (_matrices checks it)
    spec = torch.view_as_real(torch.fft.fft(torch.fft.rfft(grad, dim=-1), dim=-2).transpose(1, 2))  # (B, H, R, 2)
    spec = spec * weight.view(1, -1, 1, 1)
    index = group_index.long()
    grad_scale = (spec * spectrum).sum(-1)  # d/d(scale of a bin) = <grad, spectrum> over real/imag
    grad_attention = torch.zeros_like(attention).index_add_(1, index.flatten(), grad_scale.reshape(b, -1))
    grad_spectrum = (spec * attention[:, index].unsqueeze(-1)).sum(0)
    return grad_spectrum, grad_attention


def synthesis_fft_flops(rows: int, cols: int, batch: int) -> int:
    """FLOPs of the per-sample inverse 2-D FFTs, 2.5 N log2 N per real and 5 N log2 N per complex transform of N
    points (as the benchmark counts torch's FFTs): C/2+1 complex ones along R, R real ones along C."""
    half = cols // 2 + 1
    return int(batch * (5 * rows * math.log2(max(rows, 2)) * half + 2.5 * cols * math.log2(max(cols, 2)) * rows))
