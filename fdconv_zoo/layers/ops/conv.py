"""The per-sample convolution: the math of ``fdconv::dynamic_conv`` and its gradient around the synthesis.

The kernels P are made in the weight-matrix layout (B, Cout*kr, Cg*kc); 1x1 layers and linears multiply it as it
is, small maps against im2col rows in its (u, i, v) order, and only large maps reorder it once for one grouped
convolution over the batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import fft_dtype, region, scratch
from .bands import band_modulation, band_modulation_backward, check_cutoffs
from .synthesis import check, geometry, matrix_factors, synthesis_backward, synthesize


class Conv:
    """Geometry of one dynamic convolution over 1, 2 or 3 spatial axes (or, for token inputs (B, N, Cin) and no
    kernel axes, of the FDLinear product), with its output size computed once from the layer input ``x``: the one
    formula for the operator, its fake and its export decomposition."""

    def __init__(self, x: Tensor, rows: int, kernel_size: Sequence[int], groups: int, stride: list[int],
                 padding: list[int], dilation: list[int], pre_pad: list[int], padding_mode: str):
        self.kernel_size, self.dims = tuple(kernel_size), len(kernel_size)
        self.tokens = self.dims == 0
        self.kr, self.kc = matrix_factors(kernel_size)
        self.groups, self.out_channels = groups, rows // self.kr
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.pre_pad, self.padding_mode = tuple(pre_pad), padding_mode
        self.matmul = self.tokens or (math.prod(kernel_size) == 1 and groups == 1 and not any(padding)
                                      and not pre_pad)
        self.batch = x.shape[0]
        if self.tokens:
            self.size: tuple[int, ...] = (x.shape[1],)
            return
        size = list(x.shape[2:])
        for axis in range(len(pre_pad) // 2):  # F.pad's order: the last axis first
            size[-1 - axis] = size[-1 - axis] + pre_pad[2 * axis] + pre_pad[2 * axis + 1]
        if self.matmul:  # the stride subsamples the input (no padding)
            self.size = tuple((n - 1) // s + 1 for n, s in zip(size, self.stride, strict=True))
        else:
            self.size = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(
                size, self.padding, self.dilation, kernel_size, self.stride, strict=True))

    @property
    def output_shape(self) -> tuple[int, ...]:
        if self.tokens:
            return (self.batch, *self.size, self.out_channels)
        return (self.batch, self.out_channels, *self.size)

    @property
    def unfolds(self) -> bool:
        """Small 2-D maps with square kernels (at most Cout output positions, e.g. ResNet stages 3 and 4): im2col
        and one batched matrix product beat the grouped convolution there, where the per-sample kernels outweigh
        the activations."""
        return (not self.matmul and self.dims == 2 and self.kr == self.kc > 1 and self.groups == 1
                and math.prod(self.size) <= self.out_channels)

    def channel_shape(self, y: Tensor) -> list[int]:
        """Shape that broadcasts a (B, Cout) attention over an output like ``y``."""
        shape = [1] * y.ndim
        shape[0], shape[2 if self.tokens else 1] = y.shape[0], self.out_channels
        return shape

    @property
    def subsamples(self) -> bool:
        """A strided 1x1 convolution done as a matrix product: it reads every stride-th position."""
        return self.matmul and not self.tokens and any(s != 1 for s in self.stride)

    def subsampled(self, t: Tensor) -> Tensor:
        """The positions a strided 1x1 (matmul) convolution reads."""
        return t[(slice(None), slice(None), *(slice(None, None, s) for s in self.stride))]


def check_conv(x: Tensor, band_scale: Tensor | None, channel: Tensor, kernel_size: Sequence[int], groups: int,
               spatial: Tensor | None, cutoffs: list[int]) -> None:
    """The convolution's inputs fit each other (eager calls and fake tensors alike): x has the kernel's spatial
    axes (tokens (B, N, Cin) for no kernel axes)."""
    b, taps = x.shape[0], math.prod(kernel_size)
    tokens = len(kernel_size) == 0
    check(x.ndim == (3 if tokens else len(kernel_size) + 2) and channel.ndim == 2
          and x.shape[-1 if tokens else 1] == channel.shape[1] and channel.shape[0] == b,
          lambda: f"input {tuple(x.shape)} does not fit channel attention {tuple(channel.shape)} and a "
                  f"{len(kernel_size)}-D kernel")
    check((spatial is None) == (taps == 1) and (spatial is None or tuple(spatial.shape) == (b, taps)),
          lambda: f"spatial attention must be (B, {taps}) for a kernel of {taps} positions, None for 1, got "
                  f"{None if spatial is None else tuple(spatial.shape)}")
    if band_scale is not None:
        check(not tokens and band_scale.ndim == x.ndim
              and tuple(band_scale.shape) == (b, len(cutoffs), *x.shape[2:]),
              lambda: f"band scales {tuple(band_scale.shape)} do not fit input {tuple(x.shape)} and "
                      f"{len(cutoffs)} cut-offs")
        check_cutoffs(cutoffs)


def _pad_index(n: int, before: int, after: int, mode: str, device: torch.device) -> Tensor:
    """Source index of every padded position along one axis (reflect, replicate, circular)."""
    q = torch.arange(-before, n + after, device=device)
    if mode == 'circular':
        return q % n
    if mode == 'replicate':
        return q.clamp(0, n - 1)
    q = q.abs()  # reflect
    return (n - 1) - ((n - 1) - q).abs()


def _kernel_input(x: Tensor, band_scale: Tensor | None, cutoffs: list[int], conv: Conv, fused: bool) -> Tensor:
    """What the kernels multiply: x after FBM, padding that the convolution cannot do, and the 1x1 stride."""
    inp = x
    if band_scale is not None:
        dtype = fft_dtype(x.dtype)
        inp = band_modulation(x.to(dtype), band_scale.to(dtype), cutoffs, fused).to(x.dtype)
    if conv.pre_pad:
        inp = F.pad(inp, conv.pre_pad, mode='constant' if conv.padding_mode == 'zeros' else conv.padding_mode)
    if conv.subsamples:
        inp = conv.subsampled(inp)
    return inp


def _kernel_input_backward(grad: Tensor, x: Tensor, band_scale: Tensor | None, cutoffs: list[int],
                           conv: Conv) -> tuple[Tensor, Tensor | None]:
    if conv.subsamples:
        full = grad.new_zeros(*grad.shape[:2], *x.shape[2:])
        conv.subsampled(full).copy_(grad)
        grad = full
    if conv.pre_pad:
        for axis in range(len(conv.pre_pad) // 2):  # F.pad's order: the last axis first
            dim, (before, after) = grad.ndim - 1 - axis, conv.pre_pad[2 * axis:2 * axis + 2]
            n = x.shape[dim]
            if conv.padding_mode == 'zeros':
                grad = grad.narrow(dim, before, n)
            else:  # each padded position adds to the position it copies
                shape = list(grad.shape)
                shape[dim] = n
                source = _pad_index(n, before, after, conv.padding_mode, grad.device)
                grad = grad.new_zeros(shape).index_add_(dim, source, grad)
    if band_scale is None:
        return grad, None
    dtype = fft_dtype(x.dtype)
    grad_x, grad_scale = band_modulation_backward(grad.to(dtype), x.to(dtype), band_scale.to(dtype), cutoffs)
    return grad_x, grad_scale


def _reorder_scaled(matrix: Tensor, kernels: Tensor, spatial: Tensor, conv: Conv, to_kernel_order: bool) -> None:
    """kernels[b, o, i, r, v] = matrix[b, o*kr + r, i*kc + v] * spatial[b, r*kc + v] (or the reverse direction),
    kernels (B, Cout, Cg, *kernel_size) seen as (B, Cout, Cg, kr, kc).

    One product per kernel row r: torch's strided loops run about twice as fast with the reordered axis outside
    than with a kc-element inner run."""
    b, cout, cin = kernels.shape[:3]
    kr, kc = conv.kr, conv.kc
    matrix, kernels = matrix.view(b, cout, kr, cin, kc), kernels.view(b, cout, cin, kr, kc)
    if kc == 1:  # 1-D kernels: runs of one element would make kr slow passes; one pass instead
        scale = spatial.view(b, 1, 1, kr, 1)
        if to_kernel_order:
            torch.mul(matrix.transpose(2, 3), scale, out=kernels)
        else:
            torch.mul(kernels.transpose(2, 3), scale.transpose(2, 3), out=matrix)
        return
    for r in range(kr):
        scale = spatial.view(b, 1, 1, kr, kc)[:, :, :, r]
        if to_kernel_order:
            torch.mul(matrix[:, :, r], scale, out=kernels[:, :, :, r])
        else:
            torch.mul(kernels[:, :, :, r], scale, out=matrix[:, :, r])


def _kernels(product: Tensor, spatial: Tensor | None, conv: Conv) -> Tensor:
    """P (matrix layout) and s -> kernels (B, Cout, Cg, *kernel_size)."""
    b, cg = product.shape[0], product.shape[2] // conv.kc
    if spatial is None:  # a single kernel position: the layouts agree
        return product.view(b, conv.out_channels, cg, *conv.kernel_size)
    kernels = product.new_empty(b, conv.out_channels, cg, *conv.kernel_size)
    _reorder_scaled(product, kernels, spatial.to(product.dtype), conv, to_kernel_order=True)
    return kernels


def _unfold_by_row(inp: Tensor, spatial: Tensor, conv: Conv) -> tuple[Tensor, Tensor]:
    """im2col with rows in the weight-matrix order (u, i, v), each scaled by s[u, v], so that P
    (B, Cout, k*Cin*k) multiplies it as it is: no reordering of the kernels, s costs activation memory only.
    The columns are a strided view of the padded input, so gathering and scaling them is one product (3-5x
    faster than ``F.unfold`` and a product). Returns the scaled columns (B, k*Cin*k, Ho*Wo) and the unscaled
    ones as a (B, k, Cin, k, Ho, Wo) view."""
    k, (b, cin) = conv.kc, inp.shape[:2]
    ph, pw = conv.padding
    padded = F.pad(inp, (pw, pw, ph, ph)) if ph or pw else inp
    (ho, wo), (dh, dw), (sh, sw) = conv.size, conv.dilation, conv.stride
    stride_b, stride_c, stride_h, stride_w = padded.stride()
    cols = padded.as_strided(
        (b, k, cin, k, ho, wo),
        (stride_b, dh * stride_h, stride_c, dw * stride_w, sh * stride_h, sw * stride_w),
        padded.storage_offset())
    scaled = torch.empty(cols.shape, device=inp.device, dtype=inp.dtype)
    torch.mul(cols, spatial.view(b, k, 1, k, 1, 1).to(inp.dtype), out=scaled)
    return scaled.view(b, k * cin * k, ho * wo), cols


def _apply(inp: Tensor, product: Tensor, spatial: Tensor | None, conv: Conv) -> Tensor:
    """The per-sample convolution (token product) of ``inp`` with kernels P * s, P in the matrix layout it is
    made in: 1x1 layers and linears multiply it as is, small maps against im2col rows in its (u, i, v) order;
    only large maps reorder it once for the grouped convolution."""
    b = inp.shape[0]
    if conv.tokens:
        return torch.bmm(inp, product.transpose(1, 2))
    if conv.matmul:
        return torch.bmm(product, inp.reshape(b, inp.shape[1], -1)).view(b, -1, *inp.shape[2:])
    if conv.unfolds:
        cols, _ = _unfold_by_row(inp, spatial, conv)
        return torch.bmm(product.view(b, conv.out_channels, -1), cols).view(b, -1, *conv.size)
    kernels = _kernels(product, spatial, conv)
    conv_nd = (F.conv1d, F.conv2d, F.conv3d)[conv.dims - 1]  # (autocast lowers these, as for a dense layer)
    out = conv_nd(inp.reshape(1, -1, *inp.shape[2:]), kernels.reshape(-1, *kernels.shape[2:]), None, conv.stride,
                  conv.padding, conv.dilation, b * conv.groups)
    return out.view(b, conv.out_channels, *out.shape[2:])


def _apply_backward(inp: Tensor, grad: Tensor, product: Tensor, spatial: Tensor | None, conv: Conv,
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
    k = conv.kc
    if conv.unfolds:
        cin, h, w = inp.shape[1:]
        cols, unscaled = _unfold_by_row(inp, spatial, conv)
        torch.bmm(flat_grad, cols.transpose(1, 2), out=grad_product.view(b, conv.out_channels, -1))
        grad_cols = torch.bmm(flat_p.transpose(1, 2), flat_grad).view(unscaled.shape)
        grad_spatial = (grad_cols * unscaled).sum((2, 4, 5)).view(b, k * k)
        grad_cols = (grad_cols * spatial.view(b, k, 1, k, 1, 1).to(grad_cols.dtype)).transpose(1, 2)
        grad_inp = F.fold(grad_cols.reshape(b, cin * k * k, -1), (h, w), k, conv.dilation, conv.padding, conv.stride)
        return grad_inp, grad_spatial
    kernels = _kernels(product, spatial, conv)
    grad_inp, grad_k, _ = torch.ops.aten.convolution_backward(
        grad.reshape(1, -1, *grad.shape[2:]), inp.reshape(1, -1, *inp.shape[2:]),
        kernels.view(-1, *kernels.shape[2:]), None, conv.stride, conv.padding, conv.dilation, False,
        [0] * conv.dims, b * conv.groups, (True, True, False))
    if spatial is None:
        grad_product.copy_(grad_k.view(grad_product.shape))
    else:
        _reorder_scaled(grad_product, grad_k.view(kernels.shape), spatial.to(grad_product.dtype), conv,
                        to_kernel_order=False)
    return grad_inp.view(inp.shape), None


def _product_buffer(role: str, shape: tuple[int, ...], dtype: torch.dtype, fused: bool) -> Tensor | None:
    """Scratch for a float32 B x |W| tensor that stays inside an operator, where the fused loops run; else None."""
    if fused and dtype == torch.float32:
        return scratch(role, math.prod(shape)).view(shape)
    return None


def kernels_and_input(x, band_scale, spectrum, group_index, attention, taps, windows, channel, kernel_size, groups,
                      stride, padding, dilation, pre_pad, padding_mode, cutoffs, fused) -> tuple[Conv, Tensor, Tensor]:
    """What the forward makes and the backward makes again: the geometry, the kernels P (in scratch memory where
    the fused loops run) and the tensor they multiply."""
    rows, cols = geometry(spectrum, channel, kernel_size, groups)
    conv = Conv(x, rows, kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode)
    out = _product_buffer('conv.product', (x.shape[0], rows, cols), fft_dtype(spectrum.dtype), fused)
    with region('fdconv.synthesis'):
        product = synthesize(spectrum, group_index, attention, taps, windows, channel, kernel_size, groups, fused,
                             out)
    with region('fdconv.fbm'):
        inp = _kernel_input(x, band_scale, cutoffs, conv, fused)
    return conv, product, inp


def dynamic_conv(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial, filter_attention,
                 bias, kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode, cutoffs,
                 fused) -> Tensor:
    """The operator's forward (see ``fdconv::dynamic_conv``) for a non-empty batch."""
    conv, product, inp = kernels_and_input(x, band_scale, spectrum, group_index, attention, taps, windows, channel,
                                           kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode,
                                           cutoffs, fused)
    with region('fdconv.conv'):
        y = _apply(inp, product.to(x.dtype), spatial, conv)
    shape = conv.channel_shape(y)
    if filter_attention is not None:
        y.mul_(filter_attention.view(shape).to(y.dtype))
    return y.add_(bias.view(shape[1:]).to(y.dtype)) if bias is not None else y


def dynamic_conv_backward(grad_out, x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial,
                          filter_attention, bias, kernel_size, groups, stride, padding, dilation, pre_pad,
                          padding_mode, cutoffs, fused) -> dict[str, Tensor | None]:
    """Gradients of :func:`dynamic_conv` by input name; the kernels and FBM's output are made again."""
    conv, product, inp = kernels_and_input(x, band_scale, spectrum, group_index, attention, taps, windows, channel,
                                           kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode,
                                           cutoffs, fused)
    (b, rows, cols), dtype = product.shape, product.dtype
    grads: dict[str, Tensor | None] = {}
    grad_out = grad_out.to(x.dtype)
    if bias is not None:
        dims = [d for d in range(grad_out.ndim) if d != (2 if conv.tokens else 1)]
        grads['bias'] = grad_out.sum(dims)
    shape = conv.channel_shape(grad_out)
    grad_z = grad_out * filter_attention.view(shape).to(x.dtype) if filter_attention is not None else grad_out
    grad_product = _product_buffer('conv.grad', (b, rows, cols), x.dtype, fused)
    if grad_product is None:
        grad_product = torch.empty(b, rows, cols, device=x.device, dtype=x.dtype)
    grad_inp, grad_spatial = _apply_backward(inp, grad_z, product.to(x.dtype), spatial, conv, grad_product)
    grad_product = grad_product.to(dtype)
    (grads['spectrum'], grads['attention'], grads['taps'], grads['windows'], grads['channel'],
     per_tap) = synthesis_backward(grad_product, product, spectrum, group_index, attention, taps, windows, channel,
                                   kernel_size, groups, fused)
    per_tap = per_tap.view(b, conv.out_channels, -1)  # (B, Cout, kr*kc): per kernel position
    tiny = torch.finfo(dtype).tiny
    if filter_attention is not None:  # sum_hw grad_out * z == sum_(i,u,v) P * dL/dP / f
        grads['filter_attention'] = per_tap.sum(2) / filter_attention.to(dtype).clamp_min(tiny)
    if spatial is not None:
        if grad_spatial is None:  # sum_(o,i) P * dL/dP / s
            grad_spatial = per_tap.sum(1) / spatial.to(dtype).clamp_min(tiny)
        grads['spatial'] = grad_spatial
    grads['x'], grads['band_scale'] = _kernel_input_backward(grad_inp, x, band_scale, cutoffs, conv)
    return grads


