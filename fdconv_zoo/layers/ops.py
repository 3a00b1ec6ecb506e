"""FDConv's per-sample work as torch operators (``torch.ops.fdconv``): one seam for every backend.

- ``fdconv::synthesize``: per-sample weight matrices P = irfft2(spectrum * attention[group]) * sigmoid(local
  logits) * channel attention, (B, Cout*k, Cg*k); gradient ``fdconv::synthesize_backward``.
- ``fdconv::band_modulation``: FBM's band re-weighting of a map; gradient ``fdconv::band_modulation_backward``.
- ``fdconv::dynamic_conv``: what an FDConv layer does per sample after its KSM heads: FBM, the kernels (as
  ``synthesize``), the convolution with them (or the token product for FDLinear), spatial and filter attention
  and bias. Its gradient, ``fdconv::dynamic_conv_backward``, keeps only the inputs (activation- and
  vector-sized) and makes the kernels again: a layer's B x |W| values never outlive it, in training too.

Each operator has one implementation that runs on any device with plain PyTorch (whole batches: one 2-D FFT
per call, no CPU-cache slicing), a fake implementation (shapes only) so that torch.compile and torch.export
trace through it, and its gradient registered with it. Where the tensors are float32 on the CPU and the fused
loops of ``native`` load, the same functions run those loops instead (``_native_for`` is the one place that
decides), and scratch memory for them comes from a per-thread pool that ``release_workspace`` frees.
"""
from __future__ import annotations

import contextlib
import math
import threading
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function
from torch.utils.flop_counter import register_flop_formula

from . import dft, native
from .constants import cached_constant


def fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFTs run in float32 at least (bf16/fp16 spectra lose too much), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _native_for(dtype: torch.dtype, device: torch.device) -> bool:
    """The backend choice: the fused CPU loops for float32 CPU tensors where the library loads, else PyTorch."""
    return dtype == torch.float32 and device.type == 'cpu' and native.library() is not None


def _native(*tensors: Tensor) -> bool:
    return all(_native_for(t.dtype, t.device) for t in tensors)


def region(name: str) -> contextlib.AbstractContextManager:
    """A named profiler region (the parts of ``fdconv-zoo bench --breakdown``); free when no profiler runs."""
    return record_function(name) if torch.autograd.profiler._is_profiler_enabled else contextlib.nullcontext()


# ---- scratch memory of the fused loops: per thread (backward runs on autograd's thread), freeable ----------------

_pools: dict[int, dict[str, Tensor]] = {}
_pools_lock = threading.Lock()


def _scratch(role: str, numel: int) -> Tensor:
    """A float32 CPU buffer of ``numel`` values that this thread's next request for ``role`` reuses. Only for
    memory that never leaves an operator: a fresh 100-MB tensor is mapped page by page, which costs about as
    much as the arithmetic done on it."""
    with _pools_lock:
        pool = _pools.setdefault(threading.get_ident(), {})
    buf = pool.get(role)
    if buf is None or buf.numel() < numel:
        pool.pop(role, None)  # free the smaller one first
        buf = pool[role] = torch.empty(max(numel, 1))
    return buf[:numel]


def release_workspace() -> None:
    """Free the scratch buffers of every thread (kept between calls for speed). Safe while an operator runs: it
    holds its own references until it returns."""
    with _pools_lock:
        _pools.clear()


# ---- group index ------------------------------------------------------------------------------------------------

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


# ---- FBM's real Fourier bases -----------------------------------------------------------------------------------

def kept_frequencies(length: int, cutoffs: tuple[int, ...]) -> tuple[int, ...]:
    """How many non-negative frequencies j/length pass each cut-off kappa (|f| < 0.5/kappa + 1e-8).

    Evaluated in float32 as the reference does: there 0.5/kappa + 1e-8 rounds to 0.25 for kappa=2 (edge bins
    excluded) but stays above 0.125 and 0.0625 for kappa=4, 8 (edge bins kept). Checkpoints were trained so.
    """
    # numpy, bit for bit what torch.fft.fftfreq(length, dtype=float32) gives (float32 index x float32(1/length)),
    # so that the bases stay plain constants inside a traced or exported graph
    freq = np.arange(length // 2 + 1, dtype=np.float32) * np.float32(1.0 / length)
    return tuple(int((freq < _cutoff_frequency(kappa)).sum()) for kappa in cutoffs)


def _cutoff_frequency(kappa: int) -> np.float32:
    """The reference's float32 cut-off: frequencies |f| below it pass the low-pass of kappa."""
    return np.float32(0.5 / kappa + 1e-8)


@lru_cache(maxsize=64)
def _fourier_basis_cpu(length: int, cutoffs: tuple[int, ...]) -> tuple[Tensor, tuple[int, ...]]:
    # orthonormal real Fourier basis, columns by frequency: DC, cos 1, sin 1, cos 2, sin 2, ... (Nyquist: cos only);
    # numpy, then one real tensor even inside a trace (torch.export, compile): a constant of the graph
    kept = kept_frequencies(length, cutoffs)
    t = np.arange(length, dtype=np.float64)
    columns = [np.full(length, 1 / math.sqrt(length))]
    for j in range(1, max(kept)):
        angle = 2 * math.pi * j * t / length
        if 2 * j == length:
            columns.append(np.cos(angle) / math.sqrt(length))
        else:
            columns += [np.cos(angle) * math.sqrt(2 / length), np.sin(angle) * math.sqrt(2 / length)]
    ranks = tuple(0 if count == 0 else min(2 * count - 1, length) for count in kept)
    return torch.from_numpy(np.stack(columns, 1)), ranks


def fourier_basis(length: int, cutoffs: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype) -> tuple[Tensor, tuple[int, ...]]:
    """Basis Q (length, r) and, per cut-off, how many of its leading columns span the kept frequencies.

    Q[:, :rank] Q[:, :rank]^T is the exact low-pass projection of one axis; cached per length, device, dtype
    (constants of a traced graph).
    """
    def make() -> tuple[Tensor, tuple[int, ...]]:
        basis, ranks = _fourier_basis_cpu(length, tuple(cutoffs))
        return basis.to(device=device, dtype=dtype), ranks
    return cached_constant(('fourier_basis', length, tuple(cutoffs), str(device), dtype), make)


# ---- band modulation (FBM) --------------------------------------------------------------------------------------
# out = sum_j A_j (LP_{j-1} - LP_j) x + LP_J x  ==  A_1 x + sum_j W_j LP_j x,  W_j = A_{j+1} - A_j,  A_{J+1} = 1.
# The masks are squares in frequency, so LP_j = P_H,j x P_W,j with P = Q Q^T for a real Fourier basis Q of few
# columns: a few small matrix products instead of FFTs. LP_j is symmetric, which gives the adjoint.

def _bands(x: Tensor, cutoffs: list[int]) -> tuple[Tensor, list[int], Tensor, list[int]]:
    h, w = x.shape[-2:]
    basis_h, ranks_h = fourier_basis(h, tuple(cutoffs), x.device, x.dtype)
    basis_w, ranks_w = fourier_basis(w, tuple(cutoffs), x.device, x.dtype)
    return basis_h, list(ranks_h), basis_w, list(ranks_w)


def _low_passes(x: Tensor, cutoffs: list[int]) -> list[Tensor]:
    """LP_j x for every cut-off; the Fourier coefficients of the widest band are made once, every narrower band
    is a leading corner of them."""
    basis_h, ranks_h, basis_w, ranks_w = _bands(x, cutoffs)
    rh, rw = max(ranks_h), max(ranks_w)
    coeff = basis_h[:, :rh].t() @ (x @ basis_w[:, :rw])  # (B, C, rh, rw)
    return [basis_h[:, :a] @ coeff[..., :a, :b] @ basis_w[:, :b].t() for a, b in zip(ranks_h, ranks_w, strict=True)]


def _band_weights(band_scale: Tensor) -> Tensor:
    """W_j = A_{j+1} - A_j with A_{J+1} = 1, (B, J, H, W)."""
    return torch.cat([band_scale[:, 1:], torch.ones_like(band_scale[:, :1])], dim=1) - band_scale


def _band_modulation(x: Tensor, band_scale: Tensor, cutoffs: list[int]) -> Tensor:
    """FBM of x (B, C, H, W) by band scales (B, J, H, W), in x's dtype (at least float32); a fresh tensor."""
    if _native(x, band_scale) and x.numel():
        basis_h, ranks_h, basis_w, ranks_w = _bands(x, cutoffs)
        h, w = x.shape[-2:]
        work = _scratch('fbm.work', native.workspace_floats(2, h, w, max(ranks_h), max(ranks_w), len(cutoffs)))
        return native.band_modulation(x.contiguous(), band_scale.contiguous(), basis_h, tuple(ranks_h), basis_w,
                                      tuple(ranks_w), work)
    return _combine_bands(x, band_scale, _low_passes(x, cutoffs))


def _combine_bands(x: Tensor, band_scale: Tensor, lows: list[Tensor]) -> Tensor:
    """A_1 x + sum_j W_j LP_j x from the low passes LP_j x."""
    weight = _band_weights(band_scale)
    out = band_scale[:, :1] * x
    for j, low in enumerate(lows):  # out of place: export decompositions must stay functional
        out = torch.addcmul(out, weight[:, j:j + 1], low)
    return out


def _low_pass_projections(n: int, cutoffs: list[int], like: Tensor) -> list[Tensor]:
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
        kept = (freq < _cutoff_frequency(kappa)).to(like.dtype)
        projections.append((cos @ kept / length.to(like.dtype))[offset])
    return projections


def _band_modulation_portable(x: Tensor, band_scale: Tensor, cutoffs: list[int]) -> Tensor:
    """FBM with the projections made in the graph (_low_pass_projections): for exports, where the spatial size
    may be symbolic. Full (n, n) projections cost more than the bases' few columns; only exports pay it."""
    h, w = x.shape[-2:]
    return _combine_bands(x, band_scale, [proj_h @ x @ proj_w for proj_h, proj_w in zip(
        _low_pass_projections(h, cutoffs, x), _low_pass_projections(w, cutoffs, x), strict=True)])


def _band_modulation_backward(grad: Tensor, x: Tensor, band_scale: Tensor, cutoffs: list[int]) -> tuple[Tensor, Tensor]:
    weight = _band_weights(band_scale)
    grad_x = band_scale[:, :1] * grad
    grad_weight = []
    for j, low in enumerate(_low_passes(x, cutoffs)):
        grad_weight.append((grad * low).sum(1))
        grad_x += _low_passes(weight[:, j:j + 1] * grad, cutoffs[j:j + 1])[0]
    grad_weight = torch.stack(grad_weight, 1)  # dL/dW_j, (B, J, H, W)
    # W_j = A_{j+1} - A_j: A_j gets -dW_j and +dW_{j-1}; A_1 also multiplies x directly
    grad_scale = -grad_weight
    grad_scale[:, 1:] += grad_weight[:, :-1]
    grad_scale[:, 0] += (grad * x).sum(1)
    return grad_x, grad_scale


def _check_bands(x: Tensor, band_scale: Tensor, cutoffs: list[int]) -> None:
    if x.ndim != 4 or band_scale.shape != (x.shape[0], len(cutoffs), *x.shape[2:]):
        raise ValueError(f"band_modulation needs x (B, C, H, W) and band scales (B, {len(cutoffs)}, H, W), got "
                         f"{tuple(x.shape)} and {tuple(band_scale.shape)}")


@torch.library.custom_op('fdconv::band_modulation', mutates_args=())
def band_modulation(x: Tensor, band_scale: Tensor, cutoffs: list[int]) -> Tensor:
    """FBM: x (B, C, H, W) with its frequency bands scaled by band_scale (B, J, H, W), in fft_dtype(x.dtype)."""
    _check_bands(x, band_scale, cutoffs)
    dtype = fft_dtype(x.dtype)
    if x.numel() == 0:
        return x.to(dtype, copy=True)
    return _band_modulation(x.to(dtype), band_scale.to(dtype), cutoffs)


@band_modulation.register_fake
def _(x, band_scale, cutoffs):
    return x.new_empty(x.shape, dtype=fft_dtype(x.dtype))


@torch.library.custom_op('fdconv::band_modulation_backward', mutates_args=())
def band_modulation_backward(grad: Tensor, x: Tensor, band_scale: Tensor, cutoffs: list[int]) -> list[Tensor]:
    dtype = fft_dtype(x.dtype)
    if x.numel() == 0:
        return [torch.zeros_like(x), torch.zeros_like(band_scale)]
    grad_x, grad_scale = _band_modulation_backward(grad.to(dtype), x.to(dtype), band_scale.to(dtype), cutoffs)
    return [grad_x.to(x.dtype), grad_scale.to(band_scale.dtype)]


@band_modulation_backward.register_fake
def _(grad, x, band_scale, cutoffs):
    return [torch.empty_like(x), torch.empty_like(band_scale)]


def _band_setup(ctx, inputs, output):
    x, band_scale, ctx.cutoffs = inputs
    ctx.save_for_backward(x, band_scale)


def _band_grad(ctx, grad):
    x, band_scale = ctx.saved_tensors
    grad_x, grad_scale = band_modulation_backward(grad, x, band_scale, ctx.cutoffs)
    return grad_x, grad_scale, None


band_modulation.register_autograd(_band_grad, setup_context=_band_setup)


# ---- kernel synthesis -------------------------------------------------------------------------------------------

def _geometry(spectrum: Tensor, channel: Tensor, kernel_size: int, groups: int) -> tuple[int, int]:
    """(rows, cols) of the weight matrices: (Cout*k, Cg*k)."""
    return spectrum.shape[1], channel.shape[1] // groups * kernel_size


def _check_synthesis(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups) -> None:
    rows, cols = _geometry(spectrum, channel, kernel_size, groups)
    b = attention.shape[0]
    if spectrum.ndim != 3 or spectrum.shape[0] != cols // 2 + 1 or spectrum.shape[2] != 2 or rows % kernel_size:
        raise ValueError(f"spectrum {tuple(spectrum.shape)} does not fit ({rows}, {cols}) weight matrices")
    if tuple(group_index.shape) != tuple(spectrum.shape[:2]) or group_index.dtype not in (torch.uint8, torch.int32):
        raise ValueError(f"group index must be uint8/int32 of shape {tuple(spectrum.shape[:2])}, got "
                         f"{group_index.dtype} {tuple(group_index.shape)}")
    if channel.ndim != 2 or channel.shape[0] != b or channel.shape[1] % groups:
        raise ValueError(f"channel attention {tuple(channel.shape)} does not fit batch {b} and groups {groups}")
    if (taps is None) != (windows is None):
        raise ValueError("taps and windows of the local branch come together")
    if taps is not None and (taps.shape[0] != rows * kernel_size or windows.shape[:2] != channel.shape
                             or taps.shape[1] != windows.shape[2]):
        raise ValueError(f"local taps {tuple(taps.shape)} and windows {tuple(windows.shape)} do not fit "
                         f"({rows}, {cols}) matrices")


def _local_logits(taps: Tensor, windows: Tensor, rows: int, k: int, groups: int) -> Tensor:
    """Logits of the local branch in the weight-matrix layout (B, Cout*k, Cg*k): element [o, i, u, v] sums
    taps[(o*k + u)*k + v, t] * windows[b, c, t] over t, c the input channel it reads ((o // (Cout/g))*Cg + i)."""
    b, cin, taps_k = windows.shape
    cout, cg = rows // k, cin // groups
    t = taps.view(groups, cout // groups, k, k, taps_k)
    logits = torch.einsum('bgit,gouvt->bgouiv', windows.reshape(b, groups, cg, taps_k), t)
    return logits.reshape(b, rows, cg * k)


def _local_logits_backward(grad: Tensor, windows: Tensor, taps: Tensor, k: int, groups: int) -> tuple[Tensor, Tensor]:
    b, cin, taps_k = windows.shape
    rows, cg = grad.shape[1], cin // groups
    cout = rows // k
    g = grad.reshape(b, groups, cout // groups, k, cg, k)
    w = windows.reshape(b, groups, cg, taps_k)
    grad_taps = torch.einsum('bgouiv,bgit->gouvt', g, w).reshape(taps.shape)
    grad_windows = torch.einsum('bgouiv,gouvt->bgit', g, taps.view(groups, cout // groups, k, k, taps_k))
    return grad_taps, grad_windows.reshape(b, cin, taps_k)


def _per_column(channel: Tensor, rows: int, k: int, groups: int) -> Tensor:
    """The channel attention (B, Cin) of the input channel each matrix element reads, broadcastable to
    (B, Cout*k, Cg*k)."""
    b, cin = channel.shape
    if groups == 1:
        return channel.repeat_interleave(k, 1).unsqueeze(1)
    cg, cout = cin // groups, rows // k
    per = channel.view(b, groups, 1, 1, cg, 1).expand(b, groups, cout // groups, k, cg, k)
    return per.reshape(b, rows, cg * k)


def _per_column_sum(values: Tensor, channels: int, k: int, groups: int) -> Tensor:
    """Adjoint of :func:`_per_column`: (B, Cout*k, Cg*k) -> sums per input channel (B, Cin)."""
    b, rows, cols = values.shape
    cg = cols // k
    return values.view(b, groups, rows // groups, cg, k).sum((2, 4)).reshape(b, channels)


def _in_dtype(dtype: torch.dtype, spectrum: Tensor, attention: Tensor, taps: Tensor | None, windows: Tensor | None,
              channel: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """The synthesis inputs in the dtype it computes in; the vectors and the local taps (Cout*k*k, K) contiguous,
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


def _synthesize(spectrum: Tensor, group_index: Tensor, attention: Tensor, taps: Tensor | None,
                windows: Tensor | None, channel: Tensor, k: int, groups: int, out: Tensor | None = None) -> Tensor:
    """P (B, Cout*k, Cg*k) in the FFT dtype; into ``out`` if given (the fused loops' scratch, inside an op)."""
    spectrum, attention, taps, windows, channel = _in_dtype(fft_dtype(spectrum.dtype), spectrum, attention, taps,
                                                            windows, channel)
    rows, cols = _geometry(spectrum, channel, k, groups)
    b = attention.shape[0]
    if _native(spectrum) and b and (groups == 1 or taps is None):
        out = torch.empty(b, rows, cols) if out is None else out
        half = cols // 2 + 1
        columns = _scratch('synthesis.columns', rows * b * half * 2)
        work = _scratch('synthesis.work', native.workspace_floats(0, b, rows, cols))
        local = (taps, windows, channel) if taps is not None else (None, None, None)
        try:
            native.synthesize(spectrum.contiguous(), group_index, attention, *local, k, columns, work, out)
        except native.FFTRefused:  # the PyTorch code below computes the same
            pass
        else:
            return out if taps is not None else out.mul_(_per_column(channel, rows, k, groups))
    product = _matrices(spectrum, group_index, attention, rows, cols)
    if taps is not None:
        product.mul_(torch.sigmoid(_local_logits(taps, windows, rows, k, groups)))
    return product.mul_(_per_column(channel, rows, k, groups))


def _synthesis_backward(grad: Tensor, product: Tensor, spectrum: Tensor, group_index: Tensor, attention: Tensor,
                        taps: Tensor | None, windows: Tensor | None, channel: Tensor, k: int,
                        groups: int) -> tuple[Tensor, ...]:
    """Gradients of P = M * sigmoid(L) * c (``product``, as made by :func:`_synthesize`) from dL/dP (``grad``,
    overwritten): spectrum, attention, taps, windows (None without the local branch), channel, and
    sum_i P * dP per (sample, row, v) (B, R, k), which gives the filter and spatial attention's gradients."""
    dtype = product.dtype
    spectrum, attention, taps, windows, channel = _in_dtype(dtype, spectrum, attention, taps, windows, channel)
    rows, cols = product.shape[1:]
    b, cin = channel.shape
    grad_taps = grad_windows = None
    if taps is not None and groups == 1 and _native(product):  # one pass; grad becomes dL/dM in place
        per_tap, grad_taps, grad_windows, channel_sums = native.local_modulation_backward(
            product, grad, taps, windows, channel, k)
    else:
        pdp = product * grad
        per_tap = pdp.view(b, rows, cols // k, k).sum(2)
        channel_sums = _per_column_sum(pdp, cin, k, groups)
        factor = _per_column(channel, rows, k, groups)
        if taps is not None:
            sig = torch.sigmoid(_local_logits(taps, windows, rows, k, groups))
            grad_taps, grad_windows = _local_logits_backward(pdp.mul_(1 - sig), windows, taps, k, groups)
            factor = sig.mul_(factor)
        grad.mul_(factor)  # dL/dM
    # P = M * s * c: sum over c's elements of dP * M * s == sum P * dP / c  (c = att_multi * sigmoid > 0)
    grad_channel = channel_sums / channel.clamp_min(torch.finfo(dtype).tiny)
    grad_spectrum, grad_attention = _spectrum_adjoint(grad, spectrum, group_index, attention)
    return grad_spectrum, grad_attention, grad_taps, grad_windows, grad_channel, per_tap


def _spectrum_adjoint(grad: Tensor, spectrum: Tensor, group_index: Tensor, attention: Tensor) -> tuple[Tensor, Tensor]:
    """Adjoint of :func:`_matrices`: dL/dM (B, R, C) -> gradients of the spectrum (H, R, 2) and attention (B, n).

    The adjoint of irfft2 is rfft2 / (R*C) with the half-spectrum columns that stand for two bins (all but DC
    and Nyquist) counted twice."""
    (b, rows, cols), half = grad.shape, spectrum.shape[0]
    weight = torch.full((half,), 2.0 / (rows * cols), device=grad.device, dtype=grad.dtype)
    weight[0] /= 2
    if cols % 2 == 0:
        weight[-1] /= 2
    if _native(grad) and b:
        columns = _scratch('synthesis.columns', half * b * rows * 2)
        work = _scratch('synthesis.work', native.workspace_floats(1, b, rows, cols))
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


def _empty_batch_gradients(inputs, like: Tensor) -> list[Tensor]:
    """An empty batch's output depends on nothing: zero gradients (empty for the batch-shaped inputs)."""
    return [like.new_empty(0) if ref is None else torch.zeros_like(ref) for ref in inputs]


def _as_inputs(grads, inputs, like: Tensor) -> list[Tensor]:
    """Gradients shaped and typed like their inputs; an empty tensor stands for an absent (None) input, since an
    operator's list of outputs cannot hold None."""
    return [like.new_empty(0) if ref is None else g.to(ref.dtype).reshape(ref.shape)
            for g, ref in zip(grads, inputs, strict=True)]


@torch.library.custom_op('fdconv::synthesize', mutates_args=())
def synthesize(spectrum: Tensor, group_index: Tensor, attention: Tensor, taps: Tensor | None, windows: Tensor | None,
               channel: Tensor, kernel_size: int, groups: int) -> Tensor:
    """Per-sample weight matrices P (B, Cout*k, Cg*k), fft_dtype(spectrum.dtype): spectrum (C/2+1, Cout*k, 2)
    column-major half spectrum, group_index (C/2+1, Cout*k) uint8/int32, attention (B, n) per frequency group,
    local taps (Cout*k*k, K) and windows (B, Cin, K) or None, channel attention (B, Cin)."""
    _check_synthesis(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups)
    if attention.shape[0] == 0:  # an empty batch has no kernels; the transforms refuse a batch of 0
        return spectrum.new_empty(0, *_geometry(spectrum, channel, kernel_size, groups),
                                  dtype=fft_dtype(spectrum.dtype))
    return _synthesize(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups)


@synthesize.register_fake
def _(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups):
    _check_synthesis(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups)
    rows, cols = _geometry(spectrum, channel, kernel_size, groups)
    return spectrum.new_empty(attention.shape[0], rows, cols, dtype=fft_dtype(spectrum.dtype))


@torch.library.custom_op('fdconv::synthesize_backward', mutates_args=())
def synthesize_backward(grad: Tensor, spectrum: Tensor, group_index: Tensor, attention: Tensor, taps: Tensor | None,
                        windows: Tensor | None, channel: Tensor, kernel_size: int, groups: int) -> list[Tensor]:
    """Gradients of :func:`synthesize` (spectrum, attention, taps, windows, channel; empty for absent ones); the
    matrices are made again rather than kept."""
    if attention.shape[0] == 0:
        return _empty_batch_gradients((spectrum, attention, taps, windows, channel), spectrum)
    product = _synthesize(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups)
    grad = grad.to(product.dtype, copy=True)
    grads = _synthesis_backward(grad, product, spectrum, group_index, attention, taps, windows, channel,
                                kernel_size, groups)[:5]
    return _as_inputs(grads, (spectrum, attention, taps, windows, channel), spectrum)


@synthesize_backward.register_fake
def _(grad, spectrum, group_index, attention, taps, windows, channel, kernel_size, groups):
    return [torch.empty_like(t) if t is not None else spectrum.new_empty(0)
            for t in (spectrum, attention, taps, windows, channel)]


def _synthesize_setup(ctx, inputs, output):
    *tensors, ctx.kernel_size, ctx.groups = inputs
    ctx.save_for_backward(*tensors)


def _synthesize_grad(ctx, grad):
    spectrum, group_index, attention, taps, windows, channel = ctx.saved_tensors
    grads = synthesize_backward(grad, spectrum, group_index, attention, taps, windows, channel, ctx.kernel_size,
                                ctx.groups)
    g_spectrum, g_attention, g_taps, g_windows, g_channel = grads
    return (g_spectrum, None, g_attention, None if taps is None else g_taps, None if windows is None else g_windows,
            g_channel, None, None)


synthesize.register_autograd(_synthesize_grad, setup_context=_synthesize_setup)


def synthesis_fft_flops(rows: int, cols: int, batch: int) -> int:
    """FLOPs of the per-sample inverse 2-D FFTs, 2.5 N log2 N per real and 5 N log2 N per complex transform of N
    points (as the benchmark counts torch's FFTs): C/2+1 complex ones along R, R real ones along C."""
    half = cols // 2 + 1
    return int(batch * (5 * rows * math.log2(max(rows, 2)) * half + 2.5 * cols * math.log2(max(cols, 2)) * rows))


@register_flop_formula(torch.ops.fdconv.synthesize)
def _synthesize_flops(spectrum_shape, group_shape, attention_shape, *args, out_shape=None, **kwargs) -> int:
    batch, rows, cols = out_shape
    return synthesis_fft_flops(rows, cols, batch)


# ---- the per-sample convolution ---------------------------------------------------------------------------------

class _Conv:
    """Geometry of one dynamic convolution (or, for token inputs (B, N, Cin), of the FDLinear product)."""

    def __init__(self, x: Tensor, rows: int, kernel_size: int, groups: int, stride: list[int], padding: list[int],
                 dilation: list[int], pre_pad: list[int], padding_mode: str):
        self.tokens = x.ndim == 3
        self.k, self.groups, self.out_channels = kernel_size, groups, rows // kernel_size
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.pre_pad, self.padding_mode = tuple(pre_pad), padding_mode
        self.matmul = self.tokens or (kernel_size == 1 and groups == 1 and self.padding == (0, 0) and not pre_pad)

    def output_size(self, inp: Tensor) -> tuple[int, ...]:
        if self.tokens:
            return (inp.shape[1],)
        if self.matmul:
            return tuple(inp.shape[-2:])
        return tuple((n + 2 * p - d * (self.k - 1) - 1) // s + 1 for n, p, d, s in zip(
            inp.shape[-2:], self.padding, self.dilation, self.stride, strict=True))

    def unfolds(self, inp: Tensor) -> bool:
        """Small maps (at most Cout output positions, e.g. ResNet stages 3 and 4): im2col and one batched matrix
        product beat the grouped convolution there, where the per-sample kernels outweigh the activations."""
        return self.groups == 1 and self.k > 1 and math.prod(self.output_size(inp)) <= self.out_channels

    def channel_shape(self, y: Tensor) -> list[int]:
        """Shape that broadcasts a (B, Cout) attention over an output like ``y``."""
        shape = [1] * y.ndim
        shape[0], shape[2 if self.tokens else 1] = y.shape[0], self.out_channels
        return shape


def _pad_index(n: int, before: int, after: int, mode: str, device: torch.device) -> Tensor:
    """Source index of every padded position along one axis (reflect, replicate, circular)."""
    q = torch.arange(-before, n + after, device=device)
    if mode == 'circular':
        return q % n
    if mode == 'replicate':
        return q.clamp(0, n - 1)
    q = q.abs()  # reflect
    return (n - 1) - ((n - 1) - q).abs()


def _kernel_input(x: Tensor, band_scale: Tensor | None, cutoffs: list[int], conv: _Conv) -> Tensor:
    """What the kernels multiply: x after FBM, padding that the convolution cannot do, and the 1x1 stride."""
    inp = x
    if band_scale is not None:
        dtype = fft_dtype(x.dtype)
        inp = _band_modulation(x.to(dtype), band_scale.to(dtype), cutoffs).to(x.dtype)
    if conv.pre_pad:
        inp = F.pad(inp, conv.pre_pad, mode='constant' if conv.padding_mode == 'zeros' else conv.padding_mode)
    if conv.matmul and not conv.tokens and conv.stride != (1, 1):
        inp = inp[:, :, ::conv.stride[0], ::conv.stride[1]]
    return inp


def _kernel_input_backward(grad: Tensor, x: Tensor, band_scale: Tensor | None, cutoffs: list[int],
                           conv: _Conv) -> tuple[Tensor, Tensor | None]:
    if conv.matmul and not conv.tokens and conv.stride != (1, 1):
        full = grad.new_zeros(*grad.shape[:2], *x.shape[-2:])
        full[:, :, ::conv.stride[0], ::conv.stride[1]] = grad
        grad = full
    if conv.pre_pad:
        left, right, top, bottom = conv.pre_pad
        h, w = x.shape[-2:]
        if conv.padding_mode == 'zeros':
            grad = grad[..., top:top + h, left:left + w]
        else:  # each padded position adds to the position it copies
            rows = _pad_index(h, top, bottom, conv.padding_mode, grad.device)
            cols = _pad_index(w, left, right, conv.padding_mode, grad.device)
            grad = grad.new_zeros(*grad.shape[:2], h, grad.shape[-1]).index_add_(2, rows, grad)
            grad = grad.new_zeros(*grad.shape[:2], h, w).index_add_(3, cols, grad)
    if band_scale is None:
        return grad, None
    dtype = fft_dtype(x.dtype)
    grad_x, grad_scale = _band_modulation_backward(grad.to(dtype), x.to(dtype), band_scale.to(dtype), cutoffs)
    return grad_x, grad_scale


def _reorder_scaled(matrix: Tensor, kernels: Tensor, spatial: Tensor, to_kernel_order: bool) -> None:
    """kernels[b, o, i, u, v] = matrix[b, o*k+u, i*k+v] * spatial[b, u, v] (or the reverse direction).

    One product per kernel row u: torch's strided loops run about twice as fast with the reordered axis outside
    than with a k-element inner run."""
    b, cout, cin, k, _ = kernels.shape
    matrix = matrix.view(b, cout, k, cin, k)
    for u in range(k):
        scale = spatial.view(b, 1, 1, k, k)[:, :, :, u]
        if to_kernel_order:
            torch.mul(matrix[:, :, u], scale, out=kernels[:, :, :, u])
        else:
            torch.mul(kernels[:, :, :, u], scale, out=matrix[:, :, u])


def _kernels(product: Tensor, spatial: Tensor | None, conv: _Conv) -> Tensor:
    """P (matrix layout) and s -> kernels (B, Cout, Cg, k, k)."""
    k, b = conv.k, product.shape[0]
    cg = product.shape[2] // k
    if spatial is None:  # k = 1: the layouts agree
        return product.view(b, conv.out_channels, cg, 1, 1)
    kernels = product.new_empty(b, conv.out_channels, cg, k, k)
    _reorder_scaled(product, kernels, spatial.to(product.dtype), to_kernel_order=True)
    return kernels


def _unfold_by_row(inp: Tensor, spatial: Tensor, conv: _Conv) -> tuple[Tensor, Tensor]:
    """im2col with rows in the weight-matrix order (u, i, v), each scaled by s[u, v], so that P
    (B, Cout, k*Cin*k) multiplies it as it is: no reordering of the kernels, s costs activation memory only.
    The columns are a strided view of the padded input, so gathering and scaling them is one product (3-5x
    faster than ``F.unfold`` and a product). Returns the scaled columns (B, k*Cin*k, Ho*Wo) and the unscaled
    ones as a (B, k, Cin, k, Ho, Wo) view."""
    k, (b, cin) = conv.k, inp.shape[:2]
    ph, pw = conv.padding
    padded = F.pad(inp, (pw, pw, ph, ph)) if ph or pw else inp
    (ho, wo), (dh, dw), (sh, sw) = conv.output_size(inp), conv.dilation, conv.stride
    stride_b, stride_c, stride_h, stride_w = padded.stride()
    cols = padded.as_strided(
        (b, k, cin, k, ho, wo),
        (stride_b, dh * stride_h, stride_c, dw * stride_w, sh * stride_h, sw * stride_w),
        padded.storage_offset())
    scaled = torch.empty(cols.shape, device=inp.device, dtype=inp.dtype)
    torch.mul(cols, spatial.view(b, k, 1, k, 1, 1).to(inp.dtype), out=scaled)
    return scaled.view(b, k * cin * k, ho * wo), cols


def _apply(inp: Tensor, product: Tensor, spatial: Tensor | None, conv: _Conv) -> Tensor:
    """The per-sample convolution (token product) of ``inp`` with kernels P * s, P in the matrix layout it is
    made in: 1x1 layers and linears multiply it as is, small maps against im2col rows in its (u, i, v) order;
    only large maps reorder it once for the grouped convolution."""
    b = inp.shape[0]
    if conv.tokens:
        return torch.bmm(inp, product.transpose(1, 2))
    if conv.matmul:
        return torch.bmm(product, inp.reshape(b, inp.shape[1], -1)).view(b, -1, *inp.shape[-2:])
    if conv.unfolds(inp):
        cols, _ = _unfold_by_row(inp, spatial, conv)
        return torch.bmm(product.view(b, conv.out_channels, -1), cols).view(b, -1, *conv.output_size(inp))
    kernels = _kernels(product, spatial, conv)
    out = F.conv2d(inp.reshape(1, -1, *inp.shape[-2:]), kernels.reshape(-1, *kernels.shape[2:]), None, conv.stride,
                   conv.padding, conv.dilation, b * conv.groups)
    return out.view(b, conv.out_channels, *out.shape[-2:])


def _apply_backward(inp: Tensor, grad: Tensor, product: Tensor, spatial: Tensor | None, conv: _Conv,
                    grad_product: Tensor) -> tuple[Tensor, Tensor | None]:
    """Gradients of :func:`_apply` for its input and P (written into ``grad_product``), and for s where it comes
    cheaper than from sum(P * dP) / s (else None)."""
    b = inp.shape[0]
    if conv.tokens:
        torch.bmm(grad.transpose(1, 2), inp, out=grad_product)
        return torch.bmm(grad, product), None
    flat_grad, flat_p = grad.reshape(b, conv.out_channels, -1), product.view(b, conv.out_channels, -1)
    if conv.matmul:
        torch.bmm(flat_grad, inp.reshape(b, inp.shape[1], -1).transpose(1, 2), out=grad_product)
        return torch.bmm(flat_p.transpose(1, 2), flat_grad).view(inp.shape), None
    k, (cin, h, w) = conv.k, inp.shape[1:]
    if conv.unfolds(inp):
        cols, unscaled = _unfold_by_row(inp, spatial, conv)
        torch.bmm(flat_grad, cols.transpose(1, 2), out=grad_product.view(b, conv.out_channels, -1))
        grad_cols = torch.bmm(flat_p.transpose(1, 2), flat_grad).view(unscaled.shape)
        grad_spatial = (grad_cols * unscaled).sum((2, 4, 5)).view(b, k * k)
        grad_cols = (grad_cols * spatial.view(b, k, 1, k, 1, 1).to(grad_cols.dtype)).transpose(1, 2)
        grad_inp = F.fold(grad_cols.reshape(b, cin * k * k, -1), (h, w), k, conv.dilation, conv.padding, conv.stride)
        return grad_inp, grad_spatial
    kernels = _kernels(product, spatial, conv)
    grad_inp, grad_k, _ = torch.ops.aten.convolution_backward(
        grad.reshape(1, -1, *grad.shape[-2:]), inp.reshape(1, -1, h, w), kernels.view(-1, *kernels.shape[2:]), None,
        conv.stride, conv.padding, conv.dilation, False, (0, 0), b * conv.groups, (True, True, False))
    if spatial is None:
        grad_product.copy_(grad_k.view(grad_product.shape))
    else:
        _reorder_scaled(grad_product, grad_k.view(kernels.shape), spatial.to(grad_product.dtype),
                        to_kernel_order=False)
    return grad_inp.view(inp.shape), None


def _product_buffer(role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """Scratch for a B x |W| tensor that stays inside an operator, where the fused loops run; else None."""
    if _native_for(dtype, device):
        return _scratch(role, math.prod(shape)).view(shape)
    return None


def _kernels_and_input(x, band_scale, spectrum, group_index, attention, taps, windows, channel, kernel_size, groups,
                       stride, padding, dilation, pre_pad, padding_mode, cutoffs) -> tuple[_Conv, Tensor, Tensor]:
    """What the forward makes and the backward makes again: the geometry, the kernels P (in scratch memory where
    the fused loops run) and the tensor they multiply."""
    rows, cols = _geometry(spectrum, channel, kernel_size, groups)
    conv = _Conv(x, rows, kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode)
    out = _product_buffer('conv.product', (x.shape[0], rows, cols), fft_dtype(spectrum.dtype), x.device)
    with region('fdconv.synthesis'):
        product = _synthesize(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups, out)
    with region('fdconv.fbm'):
        inp = _kernel_input(x, band_scale, cutoffs, conv)
    return conv, product, inp


def _dynamic_conv(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial, filter_attention,
                  bias, kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode, cutoffs) -> Tensor:
    conv, product, inp = _kernels_and_input(x, band_scale, spectrum, group_index, attention, taps, windows, channel,
                                            kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode,
                                            cutoffs)
    with region('fdconv.conv'):
        y = _apply(inp, product.to(x.dtype), spatial, conv)
    shape = conv.channel_shape(y)
    if filter_attention is not None:
        y.mul_(filter_attention.view(shape).to(y.dtype))
    return y.add_(bias.view(shape[1:]).to(y.dtype)) if bias is not None else y


def _check_conv(x: Tensor, band_scale: Tensor | None, channel: Tensor, kernel_size: int, groups: int,
                spatial: Tensor | None) -> None:
    b = x.shape[0]
    channel_dim = -1 if x.ndim == 3 else 1
    if x.ndim not in (3, 4) or x.shape[channel_dim] != channel.shape[1] or channel.shape[0] != b:
        raise ValueError(f"input {tuple(x.shape)} does not fit channel attention {tuple(channel.shape)}")
    if (spatial is None) != (kernel_size == 1) or spatial is not None and spatial.shape != (b, kernel_size ** 2):
        raise ValueError(f"spatial attention must be (B, k*k) for k > 1 and None for k = 1, got "
                         f"{None if spatial is None else tuple(spatial.shape)} for k={kernel_size}")
    if band_scale is not None and (x.ndim != 4 or band_scale.shape[0] != b or band_scale.shape[2:] != x.shape[2:]):
        raise ValueError(f"band scales {tuple(band_scale.shape)} do not fit input {tuple(x.shape)}")


@torch.library.custom_op('fdconv::dynamic_conv', mutates_args=())
def dynamic_conv(x: Tensor, band_scale: Tensor | None, spectrum: Tensor, group_index: Tensor, attention: Tensor,
                 taps: Tensor | None, windows: Tensor | None, channel: Tensor, spatial: Tensor | None,
                 filter_attention: Tensor | None, bias: Tensor | None, kernel_size: int, groups: int,
                 stride: list[int], padding: list[int], dilation: list[int], pre_pad: list[int], padding_mode: str,
                 cutoffs: list[int]) -> Tensor:
    """One FDConv layer after its KSM heads: y = conv(pad(FBM(x, band_scale)), P * s) * f + bias per sample,
    P = synthesize(spectrum, group_index, attention, taps, windows, channel), s the spatial attention (B, k*k)
    and f the filter attention (B, Cout). x (B, Cin, H, W), or tokens (B, N, Cin) for FDLinear; output in x's
    dtype. ``padding`` is the convolution's symmetric padding, ``pre_pad`` (left, right, top, bottom) one it
    cannot do (other modes, uneven 'same')."""
    _check_synthesis(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups)
    _check_conv(x, band_scale, channel, kernel_size, groups, spatial)
    if x.shape[0] == 0:  # an empty batch: an empty output, as a dense convolution gives (no batch-sized groups)
        return x.new_empty(_conv_output_shape(x, spectrum.shape[1], kernel_size, groups, stride, padding, dilation,
                                              pre_pad, padding_mode))
    return _dynamic_conv(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial,
                         filter_attention, bias, kernel_size, groups, stride, padding, dilation, pre_pad,
                         padding_mode, cutoffs)


def _conv_output_shape(x: Tensor, rows: int, kernel_size: int, groups: int, stride: list[int], padding: list[int],
                       dilation: list[int], pre_pad: list[int], padding_mode: str) -> tuple[int, ...]:
    conv = _Conv(x, rows, kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode)
    size = list(x.shape[2:])
    if pre_pad:
        size = [size[0] + pre_pad[2] + pre_pad[3], size[1] + pre_pad[0] + pre_pad[1]]
    if conv.tokens:
        return (x.shape[0], x.shape[1], conv.out_channels)
    if conv.matmul:
        return (x.shape[0], conv.out_channels, *[(n - 1) // s + 1 for n, s in zip(size, conv.stride, strict=True)])
    return (x.shape[0], conv.out_channels, *[(n + 2 * p - d * (kernel_size - 1) - 1) // s + 1 for n, p, d, s in zip(
        size, conv.padding, conv.dilation, conv.stride, strict=True)])


@dynamic_conv.register_fake
def _(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial, filter_attention, bias,
      kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode, cutoffs):
    _check_synthesis(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups)
    _check_conv(x, band_scale, channel, kernel_size, groups, spatial)
    rows = spectrum.shape[1]
    return x.new_empty(_conv_output_shape(x, rows, kernel_size, groups, stride, padding, dilation, pre_pad,
                                          padding_mode))


_CONV_INPUTS = ('x', 'band_scale', 'spectrum', 'group_index', 'attention', 'taps', 'windows', 'channel', 'spatial',
                'filter_attention', 'bias')
_CONV_DIFFERENTIABLE = [name for name in _CONV_INPUTS if name != 'group_index']


def _dynamic_conv_backward(grad_out, x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial,
                           filter_attention, bias, kernel_size, groups, stride, padding, dilation, pre_pad,
                           padding_mode, cutoffs) -> dict[str, Tensor | None]:
    conv, product, inp = _kernels_and_input(x, band_scale, spectrum, group_index, attention, taps, windows, channel,
                                            kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode,
                                            cutoffs)
    (b, rows, cols), k, dtype = product.shape, kernel_size, product.dtype
    grads: dict[str, Tensor | None] = {}
    grad_out = grad_out.to(x.dtype)
    if bias is not None:
        dims = [d for d in range(grad_out.ndim) if d != (2 if conv.tokens else 1)]
        grads['bias'] = grad_out.sum(dims)
    shape = conv.channel_shape(grad_out)
    grad_z = grad_out * filter_attention.view(shape).to(x.dtype) if filter_attention is not None else grad_out
    grad_product = _product_buffer('conv.grad', (b, rows, cols), x.dtype, x.device)
    if grad_product is None:
        grad_product = torch.empty(b, rows, cols, device=x.device, dtype=x.dtype)
    grad_inp, grad_spatial = _apply_backward(inp, grad_z, product.to(x.dtype), spatial, conv, grad_product)
    grad_product = grad_product.to(dtype)
    (grads['spectrum'], grads['attention'], grads['taps'], grads['windows'], grads['channel'],
     per_tap) = _synthesis_backward(grad_product, product, spectrum, group_index, attention, taps, windows, channel,
                                    k, groups)
    per_tap = per_tap.view(b, conv.out_channels, k, k)
    tiny = torch.finfo(dtype).tiny
    if filter_attention is not None:  # sum_hw grad_out * z == sum_(i,u,v) P * dL/dP / f
        grads['filter_attention'] = per_tap.sum((2, 3)) / filter_attention.to(dtype).clamp_min(tiny)
    if spatial is not None:
        if grad_spatial is None:  # sum_(o,i) P * dL/dP / s
            grad_spatial = per_tap.sum(1).view(b, k * k) / spatial.to(dtype).clamp_min(tiny)
        grads['spatial'] = grad_spatial
    grads['x'], grads['band_scale'] = _kernel_input_backward(grad_inp, x, band_scale, cutoffs, conv)
    return grads


@torch.library.custom_op('fdconv::dynamic_conv_backward', mutates_args=())
def dynamic_conv_backward(grad_out: Tensor, x: Tensor, band_scale: Tensor | None, spectrum: Tensor,
                          group_index: Tensor, attention: Tensor, taps: Tensor | None, windows: Tensor | None,
                          channel: Tensor, spatial: Tensor | None, filter_attention: Tensor | None,
                          bias: Tensor | None, kernel_size: int, groups: int, stride: list[int], padding: list[int],
                          dilation: list[int], pre_pad: list[int], padding_mode: str,
                          cutoffs: list[int]) -> list[Tensor]:
    """Gradients of :func:`dynamic_conv` for every input but group_index (empty for absent ones); the kernels
    and FBM's output are made again rather than kept."""
    inputs = dict(zip(_CONV_INPUTS, (x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial,
                                     filter_attention, bias), strict=True))
    if x.shape[0] == 0:
        return _empty_batch_gradients([inputs[name] for name in _CONV_DIFFERENTIABLE], x)
    grads = _dynamic_conv_backward(grad_out, *inputs.values(), kernel_size, groups, stride, padding, dilation,
                                   pre_pad, padding_mode, cutoffs)
    return _as_inputs([grads.get(name) for name in _CONV_DIFFERENTIABLE],
                      [inputs[name] for name in _CONV_DIFFERENTIABLE], x)


@dynamic_conv_backward.register_fake
def _(grad_out, x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial, filter_attention,
      bias, *args):
    refs = (x, band_scale, spectrum, attention, taps, windows, channel, spatial, filter_attention, bias)
    return [x.new_empty(0) if t is None else torch.empty_like(t) for t in refs]


def _conv_setup(ctx, inputs, output):
    ctx.options = inputs[len(_CONV_INPUTS):]
    ctx.save_for_backward(*inputs[:len(_CONV_INPUTS)])


def _conv_grad(ctx, grad):
    saved = ctx.saved_tensors
    grads = iter(dynamic_conv_backward(grad, *saved, *ctx.options))
    by_name = dict(zip(_CONV_INPUTS, saved, strict=True))
    result = []
    for name in _CONV_INPUTS:
        g = None if name == 'group_index' else next(grads)
        result.append(None if by_name[name] is None or g is None else g)
    return (*result, *[None] * len(ctx.options))


dynamic_conv.register_autograd(_conv_grad, setup_context=_conv_setup)


def portable_dynamic_conv(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial,
                          filter_attention, bias, kernel_size, groups, stride, padding, dilation, pre_pad,
                          padding_mode, cutoffs) -> Tensor:
    """fdconv::dynamic_conv in operations every exporter and runtime has, for torch.export decompositions (ONNX):
    the group scaling in real arithmetic, the inverse FFT as matrix products (dft.irfft2: no complex tensors, and
    fast where a runtime's FFT is not), and the per-sample kernels applied by im2col from slices and one batched
    matrix product, so the batch stays a free dimension (no convolution with batch x groups groups). No fused
    loops and no data-dependent checks."""
    k, dtype = kernel_size, fft_dtype(spectrum.dtype)
    rows, cols = _geometry(spectrum, channel, k, groups)
    b = x.shape[0]
    conv = _Conv(x, rows, k, groups, stride, padding, dilation, pre_pad, padding_mode)
    scale = attention.to(dtype)[:, group_index.long().t()]  # (B, R, C/2+1)
    # tokens (FDLinear: k = 1, one group) multiply x K^T: the transposed product (B, C, R) is then the matmul's
    # right operand as it is, and its gates come transposed (the local logits as windows @ taps^T)
    product = dft.irfft2(spectrum.to(dtype).permute(2, 1, 0) * scale.unsqueeze(1), rows, cols, conv.tokens)
    if taps is not None:
        flat_taps, windows = taps.to(dtype).reshape(taps.shape[0], -1), windows.to(dtype)
        logits = windows @ flat_taps.t() if conv.tokens else _local_logits(flat_taps, windows, rows, k, groups)
        product = product * torch.sigmoid(logits)
    inp = x
    if band_scale is not None:
        inp = _band_modulation_portable(x.to(dtype), band_scale.to(dtype), cutoffs).to(x.dtype)
    if pre_pad:
        inp = F.pad(inp, pre_pad, mode='constant' if padding_mode == 'zeros' else padding_mode)
    cout, cg = conv.out_channels, cols // k
    if conv.tokens:
        y = torch.bmm(inp, (product * channel.to(dtype).unsqueeze(2)).to(x.dtype))
    else:
        # the contraction runs over (u, i, v), the order of a kernel matrix row (o, u) followed by its columns
        # (i, v): the product is the matmul's left operand as it is, and im2col stacks its taps in that order.
        # The channel attention of input channel i and the spatial attention of tap (u, v) scale it in one pass.
        factor = channel.to(dtype).view(b, groups, 1, 1, cg, 1)
        if spatial is not None:
            factor = factor * spatial.to(dtype).view(b, 1, 1, k, 1, k)
        kernels = (product.view(b, groups, cout // groups, k, cg, k) * factor).to(x.dtype)
        ph, pw = conv.padding
        padded = F.pad(inp, (pw, pw, ph, ph)) if ph or pw else inp
        padded = padded.reshape(b, groups, cg, *padded.shape[2:])
        (dh, dw), (sh, sw) = conv.dilation, conv.stride
        ho = (padded.shape[3] - dh * (k - 1) - 1) // sh + 1
        wo = (padded.shape[4] - dw * (k - 1) - 1) // sw + 1
        columns = torch.stack([torch.stack([
            padded[..., u * dh:u * dh + (ho - 1) * sh + 1:sh, v * dw:v * dw + (wo - 1) * sw + 1:sw]
            for v in range(k)], 3) for u in range(k)], 2)  # (B, groups, k, Cg, k, Ho, Wo)
        y = torch.matmul(kernels.reshape(b, groups, cout // groups, k * cg * k),
                         columns.reshape(b, groups, k * cg * k, ho * wo)).reshape(b, cout, ho, wo)
    shape = conv.channel_shape(y)
    if filter_attention is not None:
        y = y * filter_attention.view(shape).to(y.dtype)
    return y + bias.view(shape[1:]).to(y.dtype) if bias is not None else y


@register_flop_formula(torch.ops.fdconv.dynamic_conv)
def _dynamic_conv_flops(x_shape, band_scale_shape, spectrum_shape, group_shape, attention_shape, taps_shape,
                        windows_shape, channel_shape, spatial_shape, filter_shape, bias_shape, kernel_size, groups,
                        *args, out_shape=None, **kwargs) -> int:
    """The per-sample inverse FFTs, the local branch's logits and the convolution (2 per multiply-add), and FBM's
    basis products."""
    b, rows = x_shape[0], spectrum_shape[1]
    cols = channel_shape[1] // groups * kernel_size
    positions = out_shape[1] if len(out_shape) == 3 else out_shape[2] * out_shape[3]
    flops = synthesis_fft_flops(rows, cols, b) + 2 * b * rows * cols * positions
    if taps_shape is not None:
        flops += 2 * b * rows * cols * taps_shape[1]
    if band_scale_shape is not None:
        cutoffs = args[-1] if args else kwargs['cutoffs']
        c, h, w = x_shape[1:]
        rh = max(kept * 2 - 1 for kept in kept_frequencies(h, tuple(cutoffs)))
        rw = max(kept * 2 - 1 for kept in kept_frequencies(w, tuple(cutoffs)))
        flops += 2 * b * c * (h * w * rw + h * rh * rw + len(cutoffs) * (rh * rw * w + h * rh * w))
    return flops
