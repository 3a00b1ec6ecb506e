"""The ``fdconv`` operators as torch.library registers them: schemas, fake implementations (shapes only, with
the same input checks, so that torch.compile and torch.export trace through them), autograd and FLOP formulas.
The math lives in ``bands``, ``synthesis`` and ``conv``; each operator asks for the backend once, at its top.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import bands, conv, synthesis
from .backend import cpu_kernels, fft_dtype

# ---- fdconv::band_modulation ------------------------------------------------------------------------------------


def _check_bands(x: Tensor, band_scale: Tensor, cutoffs: list[int]) -> None:
    synthesis.check(3 <= x.ndim <= 5 and band_scale.ndim == x.ndim
                    and tuple(band_scale.shape) == (x.shape[0], len(cutoffs), *x.shape[2:]),
                    lambda: f"band_modulation needs x (B, C, *spatial) with 1 to 3 spatial axes and band scales "
                            f"(B, {len(cutoffs)}, *spatial), got {tuple(x.shape)} and {tuple(band_scale.shape)}")
    bands.check_cutoffs(cutoffs)


@torch.library.custom_op('fdconv::band_modulation', mutates_args=())
def band_modulation(x: Tensor, band_scale: Tensor, cutoffs: list[int]) -> Tensor:
    """FBM: x (B, C, *spatial) with its frequency bands scaled by band_scale (B, J, *spatial), in
    fft_dtype(x.dtype)."""
    _check_bands(x, band_scale, cutoffs)
    dtype = fft_dtype(x.dtype)
    if x.numel() == 0:
        return x.to(dtype, copy=True)
    return bands.band_modulation(x.to(dtype), band_scale.to(dtype), cutoffs, cpu_kernels(x.device))


@band_modulation.register_fake
def _(x, band_scale, cutoffs):
    _check_bands(x, band_scale, cutoffs)
    return x.new_empty(x.shape, dtype=fft_dtype(x.dtype))


@torch.library.custom_op('fdconv::band_modulation_backward', mutates_args=())
def band_modulation_backward(grad: Tensor, x: Tensor, band_scale: Tensor, cutoffs: list[int]) -> list[Tensor]:
    _check_bands(x, band_scale, cutoffs)
    dtype = fft_dtype(x.dtype)
    if x.numel() == 0:
        return [torch.zeros_like(x), torch.zeros_like(band_scale)]
    grad_x, grad_scale = bands.band_modulation_backward(grad.to(dtype), x.to(dtype), band_scale.to(dtype), cutoffs)
    return [grad_x.to(x.dtype), grad_scale.to(band_scale.dtype)]


@band_modulation_backward.register_fake
def _(grad, x, band_scale, cutoffs):
    _check_bands(x, band_scale, cutoffs)
    return [torch.empty_like(x), torch.empty_like(band_scale)]


def _band_setup(ctx, inputs, output):
    x, band_scale, ctx.cutoffs = inputs
    ctx.save_for_backward(x, band_scale)


def _band_grad(ctx, grad):
    x, band_scale = ctx.saved_tensors
    grad_x, grad_scale = band_modulation_backward(grad, x, band_scale, ctx.cutoffs)
    return grad_x, grad_scale, None


band_modulation.register_autograd(_band_grad, setup_context=_band_setup)


# ---- shared by the gradients ------------------------------------------------------------------------------------

def _empty_batch_gradients(inputs, like: Tensor) -> list[Tensor]:
    """An empty batch's output depends on nothing: zero gradients (empty for the batch-shaped inputs)."""
    return [like.new_empty(0) if ref is None else torch.zeros_like(ref) for ref in inputs]


def _as_inputs(grads, inputs, like: Tensor) -> list[Tensor]:
    """Gradients shaped and typed like their inputs; an empty tensor stands for an absent (None) input, since an
    operator's list of outputs cannot hold None."""
    return [like.new_empty(0) if ref is None else g.to(ref.dtype).reshape(ref.shape)
            for g, ref in zip(grads, inputs, strict=True)]


def _like_inputs(refs, like: Tensor) -> list[Tensor]:
    """The fake gradients: one tensor like each input, empty for an absent one."""
    return [like.new_empty(0) if t is None else torch.empty_like(t) for t in refs]


# ---- fdconv::synthesize -----------------------------------------------------------------------------------------

@torch.library.custom_op('fdconv::synthesize', mutates_args=())
def synthesize(spectrum: Tensor, group_index: Tensor, attention: Tensor, taps: Tensor | None, windows: Tensor | None,
               channel: Tensor, kernel_size: list[int], groups: int) -> Tensor:
    """Per-sample weight matrices P (B, R, C) = (B, Cout*kr, Cg*kc), fft_dtype(spectrum.dtype), for a kernel of
    spatial shape ``kernel_size`` ([] for a linear; ``synthesis.matrix_factors`` gives kr, kc): spectrum
    (C/2+1, R, 2) column-major half spectrum, group_index (C/2+1, R) uint8/int32, attention (B, n) per frequency
    group, local taps (R*kc, K) and windows (B, Cin, K) or None, channel attention (B, Cin)."""
    synthesis.check_synthesis(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups)
    if attention.shape[0] == 0:  # an empty batch has no kernels; the transforms refuse a batch of 0
        return spectrum.new_empty(0, *synthesis.geometry(spectrum, channel, kernel_size, groups),
                                  dtype=fft_dtype(spectrum.dtype))
    return synthesis.synthesize(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups,
                                cpu_kernels(spectrum.device))


@synthesize.register_fake
def _(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups):
    synthesis.check_synthesis(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups)
    rows, cols = synthesis.geometry(spectrum, channel, kernel_size, groups)
    return spectrum.new_empty(attention.shape[0], rows, cols, dtype=fft_dtype(spectrum.dtype))


@torch.library.custom_op('fdconv::synthesize_backward', mutates_args=())
def synthesize_backward(grad: Tensor, spectrum: Tensor, group_index: Tensor, attention: Tensor, taps: Tensor | None,
                        windows: Tensor | None, channel: Tensor, kernel_size: list[int],
                        groups: int) -> list[Tensor]:
    """Gradients of :func:`synthesize` (spectrum, attention, taps, windows, channel; empty for absent ones); the
    matrices are made again rather than kept."""
    synthesis.check_synthesis(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups)
    inputs = (spectrum, attention, taps, windows, channel)
    if attention.shape[0] == 0:
        return _empty_batch_gradients(inputs, spectrum)
    fused = cpu_kernels(spectrum.device)
    product = synthesis.synthesize(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups,
                                   fused)
    grad = grad.to(product.dtype, copy=True)
    grads = synthesis.synthesis_backward(grad, product, spectrum, group_index, attention, taps, windows, channel,
                                         kernel_size, groups, fused)[:5]
    return _as_inputs(grads, inputs, spectrum)


@synthesize_backward.register_fake
def _(grad, spectrum, group_index, attention, taps, windows, channel, kernel_size, groups):
    synthesis.check_synthesis(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups)
    return _like_inputs((spectrum, attention, taps, windows, channel), spectrum)


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


@register_flop_formula(torch.ops.fdconv.synthesize)
def _synthesize_flops(spectrum_shape, group_shape, attention_shape, *args, out_shape=None, **kwargs) -> int:
    batch, rows, cols = out_shape
    return synthesis.synthesis_fft_flops(rows, cols, batch)


# ---- fdconv::dynamic_conv ---------------------------------------------------------------------------------------

_CONV_INPUTS = ('x', 'band_scale', 'spectrum', 'group_index', 'attention', 'taps', 'windows', 'channel', 'spatial',
                'filter_attention', 'bias')
_CONV_DIFFERENTIABLE = [name for name in _CONV_INPUTS if name != 'group_index']


def _check_conv(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial, kernel_size,
                groups, cutoffs) -> None:
    synthesis.check_synthesis(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups)
    conv.check_conv(x, band_scale, channel, kernel_size, groups, spatial, cutoffs)


@torch.library.custom_op('fdconv::dynamic_conv', mutates_args=())
def dynamic_conv(x: Tensor, band_scale: Tensor | None, spectrum: Tensor, group_index: Tensor, attention: Tensor,
                 taps: Tensor | None, windows: Tensor | None, channel: Tensor, spatial: Tensor | None,
                 filter_attention: Tensor | None, bias: Tensor | None, kernel_size: list[int], groups: int,
                 stride: list[int], padding: list[int], dilation: list[int], pre_pad: list[int], padding_mode: str,
                 cutoffs: list[int]) -> Tensor:
    """One FDConv layer after its KSM heads: y = conv(pad(FBM(x, band_scale)), P * s) * f + bias per sample,
    P = synthesize(spectrum, group_index, attention, taps, windows, channel), s the spatial attention
    (B, prod(kernel_size)) and f the filter attention (B, Cout). x (B, Cin, *spatial) with the kernel's 1 to 3
    spatial axes, or tokens (B, N, Cin) for FDLinear (kernel_size []); output in x's dtype. ``padding`` is the
    convolution's symmetric padding, ``pre_pad`` (F.pad's order, the last axis first) one it cannot do (other
    modes, uneven 'same')."""
    _check_conv(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial, kernel_size,
                groups, cutoffs)
    if x.shape[0] == 0:  # an empty batch: an empty output, as a dense convolution gives (no batch-sized groups)
        return x.new_empty(conv.Conv(x, spectrum.shape[1], kernel_size, groups, stride, padding, dilation, pre_pad,
                                     padding_mode).output_shape)
    return conv.dynamic_conv(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial,
                             filter_attention, bias, kernel_size, groups, stride, padding, dilation, pre_pad,
                             padding_mode, cutoffs, cpu_kernels(x.device))


@dynamic_conv.register_fake
def _(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial, filter_attention, bias,
      kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode, cutoffs):
    _check_conv(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial, kernel_size,
                groups, cutoffs)
    return x.new_empty(conv.Conv(x, spectrum.shape[1], kernel_size, groups, stride, padding, dilation, pre_pad,
                                 padding_mode).output_shape)


@torch.library.custom_op('fdconv::dynamic_conv_backward', mutates_args=())
def dynamic_conv_backward(grad_out: Tensor, x: Tensor, band_scale: Tensor | None, spectrum: Tensor,
                          group_index: Tensor, attention: Tensor, taps: Tensor | None, windows: Tensor | None,
                          channel: Tensor, spatial: Tensor | None, filter_attention: Tensor | None,
                          bias: Tensor | None, kernel_size: list[int], groups: int, stride: list[int],
                          padding: list[int],
                          dilation: list[int], pre_pad: list[int], padding_mode: str,
                          cutoffs: list[int]) -> list[Tensor]:
    """Gradients of :func:`dynamic_conv` for every input but group_index (empty for absent ones); the kernels
    and FBM's output are made again rather than kept."""
    _check_conv(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial, kernel_size,
                groups, cutoffs)
    inputs = dict(zip(_CONV_INPUTS, (x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial,
                                     filter_attention, bias), strict=True))
    differentiable = [inputs[name] for name in _CONV_DIFFERENTIABLE]
    if x.shape[0] == 0:
        return _empty_batch_gradients(differentiable, x)
    grads = conv.dynamic_conv_backward(grad_out, *inputs.values(), kernel_size, groups, stride, padding, dilation,
                                       pre_pad, padding_mode, cutoffs, cpu_kernels(x.device))
    return _as_inputs([grads.get(name) for name in _CONV_DIFFERENTIABLE], differentiable, x)


@dynamic_conv_backward.register_fake
def _(grad_out, x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial, filter_attention,
      bias, kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode, cutoffs):
    _check_conv(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial, kernel_size,
                groups, cutoffs)
    return _like_inputs((x, band_scale, spectrum, attention, taps, windows, channel, spatial, filter_attention, bias),
                        x)


def _conv_setup(ctx, inputs, output):
    ctx.options = inputs[len(_CONV_INPUTS):]
    ctx.save_for_backward(*inputs[:len(_CONV_INPUTS)])


def _conv_grad(ctx, grad):
    saved = ctx.saved_tensors
    grads = iter(dynamic_conv_backward(grad, *saved, *ctx.options))
    result = [None if name == 'group_index' else next(grads) for name in _CONV_INPUTS]
    result = [None if ref is None else g for g, ref in zip(result, saved, strict=True)]
    return (*result, *[None] * len(ctx.options))


dynamic_conv.register_autograd(_conv_grad, setup_context=_conv_setup)


@register_flop_formula(torch.ops.fdconv.dynamic_conv)
def _dynamic_conv_flops(x_shape, band_scale_shape, spectrum_shape, group_shape, attention_shape, taps_shape,
                        windows_shape, channel_shape, spatial_shape, filter_shape, bias_shape, kernel_size, groups,
                        *args, out_shape=None, **kwargs) -> int:
    """The per-sample inverse FFTs, the local branch's logits and the convolution (2 per multiply-add), and FBM's
    basis products."""
    b, rows = x_shape[0], spectrum_shape[1]
    cols = channel_shape[1] // groups * synthesis.matrix_factors(kernel_size)[1]
    positions = out_shape[1] if not kernel_size else math.prod(out_shape[2:])
    flops = synthesis.synthesis_fft_flops(rows, cols, b) + 2 * b * rows * cols * positions
    if taps_shape is not None:
        flops += 2 * b * rows * cols * taps_shape[1]
    if band_scale_shape is not None:
        cutoffs = args[-1] if args else kwargs['cutoffs']
        flops += bands.band_flops(*x_shape, tuple(cutoffs))
    return flops
