"""Frequency Dynamic Convolution, from "Frequency Dynamic Convolution for Dense Image Prediction" (CVPR 2025).

``FDConv2d`` is a drop-in for ``nn.Conv2d`` and ``FDLinear`` for ``nn.Linear`` on token inputs (..., Cin).
Each sample gets its own kernel: FDW synthesises it from the spectrum and per-group attention, KSM scales it
per channel, filter, kernel position and element; FBM (3x3 layers) re-weights the input's frequency bands.
Filter attention scales the output and channel attention the input (on the fused CPU path it is folded into
the kernels instead, where it is free), which is the same as scaling the kernel.

Speed (groups = 1): without autograd the B x |W| work runs in FDW's weight-matrix layout in scratch memory
(``_fast_product``) and the kernels are applied in the layout they are made in (``_apply_product``); training
runs that same path forward and differentiates it by hand (``_SynthesisGradient``). In float32 on the CPU the
passes over B x |W| values run as fused loops (``native``). Other cases (groups > 1, ``recompute=False``,
torch.compile) use plain tensor algebra and autograd (``_synthesize``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch.autograd.function import once_differentiable
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from . import native
from .fbm import FBM
from .fdw import FourierDisjointWeight, fft_dtype, matrix_to_weight
from .ksm import GlobalAttention, KSMGlobal, KSMLocal
from .workspace import scratch

_Size2 = int | tuple[int, int]


def _region(name: str) -> contextlib.AbstractContextManager:
    """A named profiler region (the parts of ``fdconv-zoo bench --breakdown``); free when no profiler runs."""
    return record_function(name) if torch.autograd.profiler._is_profiler_enabled else contextlib.nullcontext()


def _pair(value: _Size2, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return int(value[0]), int(value[1])


class _FrequencyDynamicLayer(nn.Module):
    """What FDConv2d and FDLinear share: FDW spectrum, global and local KSM, bias, per-sample kernel synthesis."""

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int,
            groups: int,
            bias: bool,
            num_freq_groups: int,
            att_multi: float,
            temperature: float,
            kernel_temperature: float,
            reduction: float,
            min_hidden: int,
            ksm_local: bool,
            recompute: bool,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"channels must be positive, got in={in_channels}, out={out_channels}")
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible "
                             f"by groups={groups}")
        if att_multi <= 1.0:
            raise ValueError(f"att_multi must be > 1 so that the attention can be the identity, got {att_multi}")
        if temperature <= 0 or kernel_temperature <= 0:
            raise ValueError(f"temperatures must be positive, got {temperature} and {kernel_temperature}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.att_multi = float(att_multi)
        self.recompute = recompute
        depthwise = groups == in_channels == out_channels
        self.fdw = FourierDisjointWeight(out_channels, in_channels // groups, kernel_size, num_freq_groups, **dd)
        self.ksm_global = KSMGlobal(
            in_channels, out_channels, kernel_size, num_freq_groups, reduction=reduction, min_hidden=min_hidden,
            att_multi=att_multi, temperature=temperature, kernel_temperature=kernel_temperature,
            filter_attention=not depthwise, **dd)
        self.ksm_local = KSMLocal(in_channels, out_channels, kernel_size, groups, **dd) if ksm_local else None
        self.bias = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None

    @property
    def num_freq_groups(self) -> int:
        return self.fdw.num_groups

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Spectrum of a kaiming-uniform dense kernel (nn.Conv2d's init), identity modulation."""
        weight = torch.empty(self.fdw.weight_shape, device=self.fdw.spectrum.device)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if not weight.is_meta:
            self.fdw.set_weight(weight)
        if self.bias is not None:
            bound = 1 / math.sqrt(weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def dense_weight(self) -> torch.Tensor:
        """The static kernel (Cout, Cg, k, k) that the layer computes when all its attention is 1."""
        return self.fdw.static_weight()

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Take a dense layer's weight (as (Cout, Cg, k, k)) and bias; the layer then reproduces it exactly."""
        self.fdw.set_weight(weight)
        if (bias is None) != (self.bias is None):
            raise ValueError(f"dense layer has bias={bias is not None}, FDConv layer has bias={self.bias is not None}")
        if bias is not None:
            self.bias.copy_(bias)

    def _attention(self, pooled: torch.Tensor) -> tuple[GlobalAttention, torch.Tensor | None]:
        """Pooled input (B, Cin) -> global attention and the local branch's input windows (or None)."""
        pooled = pooled.to(self.ksm_global.fc.weight.dtype)
        with _region('fdconv.ksm'):
            att = self.ksm_global(pooled)
            windows = self.ksm_local.windows(pooled) if self.ksm_local is not None else None
        return att, windows

    def _fast_path(self) -> bool:
        return not torch.is_grad_enabled() and self.groups == 1 and not torch.compiler.is_compiling()

    def _folds_channel(self, device: torch.device) -> bool:
        """Fast path: whether the channel attention rides along in the fused local-modulation pass over the
        kernels (float32 CPU, local branch), where it costs nothing, instead of scaling the input activations,
        a pass over B x Cin x H x W (and two more in training)."""
        dtype = fft_dtype(self.fdw.spectrum.dtype)
        return self.ksm_local is not None and self.groups == 1 and native.usable_for(dtype, device)

    def _fold_local_scale(self, att: GlobalAttention) -> GlobalAttention:
        """Move the local branch's constant att_multi from the kernel to the (smaller) channel attention."""
        return att if self.ksm_local is None else att._replace(channel=att.channel * self.att_multi)

    def _synthesize(self, att: GlobalAttention, windows: torch.Tensor | None) -> torch.Tensor:
        """The differentiable path, any groups: per-sample kernels (B, Cout, Cg, k, k) with FDW, spatial and
        local modulation (channel/filter attention are applied to the activations)."""
        k = self.fdw.kernel_size
        weight = matrix_to_weight(self.fdw(att.kernel), self.out_channels, k)
        scale = self.att_multi if self.ksm_local is not None else 1.0
        if att.spatial is not None:
            scale = att.spatial.view(-1, 1, 1, k, k) * scale
        if self.ksm_local is not None:
            weight = weight * torch.sigmoid(self.ksm_local.logits(windows).unflatten(-1, (k, k)))
        if not isinstance(scale, float) or scale != 1.0:
            weight = weight * scale
        return weight.contiguous()

    @torch.no_grad()
    def _fast_product(
            self,
            kernel_att: torch.Tensor,
            windows: torch.Tensor | None,
            channel: torch.Tensor | None = None,
            keep_local: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """groups = 1, no autograd: P = M * sigmoid(L) in FDW's weight-matrix layout (B, Cout*k, Cin*k) (fresh,
        or scratch memory when the FFT ran on slices), times the channel attention if given (only where
        ``_folds_channel``), in the fewest passes over B x |W| floats, and, if ``keep_local`` (for the
        backward), sigmoid(L) in scratch memory (None without the local branch).

        The layout is the one the inverse FFT writes, so the products are contiguous and vectorise. The spatial
        attention is applied later, where it is cheapest (see ``_apply_product``); the local att_multi travels
        with the channel attention (``_fold_local_scale``).
        """
        local = modulate = None
        if self.ksm_local is not None:  # FDW multiplies each slice of M by sigmoid(L) as it makes it
            b, dtype = kernel_att.shape[0], fft_dtype(self.fdw.spectrum.dtype)
            if keep_local:
                local = scratch('ksm.local', (b, self.fdw.rows, self.fdw.cols), kernel_att.device, dtype)
            modulate = self.ksm_local.modulation(windows, dtype, local, channel)
        return self.fdw.synthesize(kernel_att, modulate), local

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """The KSM statistics: per-sample mean of the input (B, Cin), in the FFT dtype."""
        raise NotImplementedError

    def _kernel_input(self, x: torch.Tensor, channel: torch.Tensor | None) -> torch.Tensor:
        """The tensor the per-sample kernels multiply: input after FBM and the channel attention (unless None:
        folded into the kernels), in x's dtype."""
        raise NotImplementedError

    def _apply_kernels(self, inp: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """Per-sample convolution / matrix product with kernels (B, Cout, Cg, k, k); channels of the output
        at ``self._channel_dim``."""
        raise NotImplementedError

    def _apply_product(self, inp: torch.Tensor, product: torch.Tensor, spatial: torch.Tensor | None) -> torch.Tensor:
        """Fast path (groups = 1): the same with the kernels given as P (B, Cout*k, Cin*k) and s (B, k*k)."""
        return self._apply_kernels(inp, product.view(product.shape[0], self.out_channels, self.in_channels, 1, 1))

    def _apply_product_backward(
            self,
            inp: torch.Tensor,
            grad: torch.Tensor,
            product: torch.Tensor,
            spatial: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Gradients of :meth:`_apply_product` for its input, P (matrix layout, may live in FDW's gradient
        buffer) and s; the last is None when s is absent or the caller should take it from sum(P * dP) / s."""
        raise NotImplementedError

    _channel_dim = 1

    def _dynamic_forward(self, x: torch.Tensor) -> torch.Tensor:
        att, windows = self._attention(self._pool(x))
        fast = self._fast_path()
        with _region('fdconv.synthesis'):
            folds_channel = fast and self._folds_channel(x.device)
            if fast:
                att = self._fold_local_scale(att)
                product, _ = self._fast_product(att.kernel, windows, att.channel if folds_channel else None)
            else:
                kernels = self._synthesize(att, windows)
        with _region('fdconv.fbm'):
            inp = self._kernel_input(x, None if folds_channel else att.channel)
        with _region('fdconv.conv'):
            if fast:
                y = self._apply_product(inp, product.to(x.dtype), att.spatial)
            else:
                y = self._apply_kernels(inp, kernels.to(x.dtype))
            return self._finish(y, att.filter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.recompute and torch.is_grad_enabled():
            # per-sample kernels are B x |W| floats: rebuild them in backward rather than keep them alive
            if torch.compiler.is_compiling():
                return checkpoint(self._dynamic_forward, x, use_reentrant=False, preserve_rng_state=False)
            function = _SynthesisGradient if self.groups == 1 else _RecomputeInBackward
            return function.apply(self, x, *self.parameters())
        return self._dynamic_forward(x)

    def _check_input(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _channel_shape(self, y: torch.Tensor) -> list[int]:
        """Shape that broadcasts a (B, Cout) attention over an output like ``y``."""
        shape = [1] * y.ndim
        shape[0], shape[self._channel_dim] = y.shape[0], self.out_channels
        return shape

    def _finish(self, y: torch.Tensor, filter_att: torch.Tensor | None) -> torch.Tensor:
        shape = self._channel_shape(y)
        bias = self.bias.view(shape[1:]).to(y.dtype) if self.bias is not None else None
        if not torch.is_grad_enabled():  # in place on the fresh output, one pass
            if filter_att is not None and bias is not None:
                return torch.addcmul(bias, y, filter_att.view(shape).to(y.dtype), out=y)
            if filter_att is not None:
                return y.mul_(filter_att.view(shape).to(y.dtype))
            return y.add_(bias) if bias is not None else y
        if filter_att is not None:
            y = y * filter_att.view(shape).to(y.dtype)
        return y + bias if bias is not None else y


def _reorder_scaled(matrix: torch.Tensor, kernels: torch.Tensor, spatial: torch.Tensor, to_kernel_order: bool) -> None:
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


class _RecomputeInBackward(torch.autograd.Function):
    """Activation checkpointing of one layer whose forward runs without autograd; backward rebuilds the
    kernels with autograd and differentiates them. Only the input is kept. Used for groups > 1."""

    @staticmethod
    def forward(ctx, layer: _FrequencyDynamicLayer, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x)
        return layer._dynamic_forward(x)  # autograd.Function.forward runs without grad

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = list(ctx.layer.parameters())
        x = x.detach().requires_grad_(ctx.needs_input_grad[1])
        wanted = [t for t, need in zip([x, *params], ctx.needs_input_grad[1:], strict=True) if need]
        with torch.enable_grad():
            y = ctx.layer._dynamic_forward(x)
        grads = iter(torch.autograd.grad(y, wanted, grad_out, allow_unused=True))
        return (None, *(next(grads) if need else None for need in ctx.needs_input_grad[1:]))


def _safe_divide(numerator: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    # attention = att_multi * sigmoid(z) > 0; where it underflows to 0 the numerator is 0 too (and so is d/dz)
    return numerator / attention.clamp_min(torch.finfo(attention.dtype).tiny)


class _SynthesisGradient(_RecomputeInBackward):
    """groups = 1 training: the same forward (fast path, only the input kept); backward rebuilds the kernels
    the same way and differentiates the B x |W| part (kernel products, FFTs) by hand in scratch memory.
    Autograd handles only what is activation- or vector-sized: FBM, channel input, KSM heads."""

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        # in the input's dtype, whatever autocast did in forward (the output may be bf16 under autocast)
        with torch.autocast(x.device.type, enabled=False):
            return _SynthesisGradient._gradients(ctx.layer, x, ctx.needs_input_grad[1:], grad_out.to(x.dtype))

    @staticmethod
    def _gradients(layer: _FrequencyDynamicLayer, x: torch.Tensor, needs: tuple[bool, ...], grad_out: torch.Tensor):
        named = dict(layer.named_parameters())
        by_hand = {'fdw.spectrum', 'ksm_local.conv.weight', 'bias'}
        with torch.enable_grad():
            xg = x.detach().requires_grad_(needs[0])
            att, windows = layer._attention(layer._pool(xg))
            att = layer._fold_local_scale(att)
            fused_local = layer._folds_channel(x.device)  # one fused pass, sigmoid(L) made again, channel folded
            inp = layer._kernel_input(xg, None if fused_local else att.channel)
        grads: dict[str, torch.Tensor] = {}
        outputs, output_grads = [inp], []
        with torch.no_grad():
            k, b = layer.fdw.kernel_size, x.shape[0]
            spatial = att.spatial.detach() if att.spatial is not None else None
            kernel_att = att.kernel.detach()
            local_input = windows.detach() if windows is not None else None
            channel = att.channel.detach() if fused_local else None
            product, local = layer._fast_product(kernel_att, local_input, channel, keep_local=not fused_local)
            grad_z = grad_out
            if att.filter is not None:
                grad_z = grad_out * att.filter.detach().view(layer._channel_shape(grad_out)).to(grad_out.dtype)
            if layer.bias is not None:
                dims = [d for d in range(grad_out.ndim) if d != layer._channel_dim]
                grads['bias'] = grad_out.sum(dims).to(layer.bias.dtype)
            grad_inp, grad_m, grad_spatial = layer._apply_product_backward(
                inp.detach(), grad_z, product.to(x.dtype), spatial)
            output_grads.append(grad_inp)
            grad_m = grad_m.to(product.dtype)  # dL/dP, matrix layout
            if fused_local:  # one pass: dL/dM into grad_m, the sums of P * dL/dP, the local branch's gradients
                per_tap, grad_taps, grad_windows, channel_sums = layer.ksm_local.fused_modulation_backward(
                    product, grad_m, local_input, channel)
                outputs.append(att.channel)  # sum_hw over the input of grad * x' == sum_(o,u,v) P * dL/dP / c
                output_grads.append(_safe_divide(channel_sums, channel).to(att.channel.dtype))
            else:
                product.mul_(grad_m)  # P * dL/dP: its sums give the filter (and spatial) gradients
                per_tap = product.view(b, layer.out_channels, k, -1, k).sum(3)  # (B, Cout, k, k), one pass
            if att.filter is not None:  # sum_hw grad_out * z == sum_(i,u,v) P * dL/dP / f
                outputs.append(att.filter)
                output_grads.append(_safe_divide(per_tap.sum((2, 3)), att.filter.detach()))
            if spatial is not None:
                if grad_spatial is None:
                    grad_spatial = _safe_divide(per_tap.sum(1).view(b, k * k), spatial)
                outputs.append(att.spatial)
                output_grads.append(grad_spatial.to(att.spatial.dtype))
            if local is not None:
                grad_m.mul_(local)  # dL/dM = dL/dP * sigmoid(L)
                torch.addcmul(product, product, local, value=-1, out=local)  # dL/dlogits, in sigmoid(L)'s memory
                grad_taps, grad_windows = layer.ksm_local.matrix_logits_backward(local, local_input)
            if windows is not None:
                grads['ksm_local.conv.weight'] = grad_taps.to(layer.ksm_local.conv.weight.dtype)
                outputs.append(windows)
                output_grads.append(grad_windows.to(windows.dtype))
            grad_spectrum, grad_kernel_att = layer.fdw.gradient(grad_m, kernel_att)
            grads['fdw.spectrum'] = grad_spectrum.to(layer.fdw.spectrum.dtype)
            outputs.append(att.kernel)
            output_grads.append(grad_kernel_att.to(att.kernel.dtype))
        wanted = [(name, p) for (name, p), need in zip(named.items(), needs[1:], strict=True)
                  if need and name not in by_hand]
        inputs = ([xg] if needs[0] else []) + [p for _, p in wanted]
        found = torch.autograd.grad(outputs, inputs, output_grads, allow_unused=True) if inputs else ()
        found = list(found)
        grad_x = found.pop(0) if needs[0] else None
        grads.update({name: g for (name, _), g in zip(wanted, found, strict=True)})
        return (None, grad_x, *(grads.get(name) if need else None for name, need in zip(named, needs[1:], strict=True)))


@register_notrace_module
class FDConv2d(_FrequencyDynamicLayer):
    """Frequency Dynamic Convolution; constructor is nn.Conv2d's plus the FDConv options (keyword-only).

    Args (FDConv options):
        num_freq_groups: n, the number of radial frequency groups of the spectrum (paper: 64).
        att_multi: range of the sigmoid attention, att_multi * sigmoid(z); 2 makes z = 0 the identity.
        temperature, kernel_temperature: softness of the KSM heads and of the frequency-group attention.
        reduction, min_hidden: KSM global hidden width max(int(Cin * reduction), min_hidden).
        ksm_local: use the per-element local KSM branch.
        fbm: frequency band modulation of the input; None means on for 3x3 kernels (the paper's placement).
        fbm_cutoffs: low-pass cut-offs kappa of the FBM bands.
        recompute: in training, keep only the input and rebuild the per-sample kernels in backward instead of
            storing them (far less memory, one more kernel synthesis; hand-written gradient for groups = 1).
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: _Size2,
            stride: _Size2 = 1,
            padding: _Size2 | str = 0,
            dilation: _Size2 = 1,
            groups: int = 1,
            bias: bool = True,
            padding_mode: str = 'zeros',
            device=None,
            dtype=None,
            *,
            num_freq_groups: int = 64,
            att_multi: float = 2.0,
            temperature: float = 1.0,
            kernel_temperature: float = 1.0,
            reduction: float = 0.0625,
            min_hidden: int = 16,
            ksm_local: bool = True,
            fbm: bool | None = None,
            fbm_cutoffs: tuple[int, ...] = (2, 4, 8),
            recompute: bool = True,
    ):
        kh, kw = _pair(kernel_size, 'kernel_size')
        if kh != kw:
            raise ValueError(f"FDConv2d needs a square kernel, got kernel_size={kernel_size!r}")
        if padding_mode not in ('zeros', 'reflect', 'replicate', 'circular'):
            raise ValueError(f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', "
                             f"got {padding_mode!r}")
        if isinstance(padding, str):
            if padding not in ('same', 'valid'):
                raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
            if padding_mode != 'zeros':
                raise ValueError(f"string padding {padding!r} needs padding_mode='zeros'")
        super().__init__(
            in_channels, out_channels, kh, groups, bias, num_freq_groups, att_multi, temperature,
            kernel_temperature, reduction, min_hidden, ksm_local, recompute, device=device, dtype=dtype)
        self.kernel_size = (kh, kh)
        self.stride = _pair(stride, 'stride')
        self.padding = padding if isinstance(padding, str) else _pair(padding, 'padding')
        self.dilation = _pair(dilation, 'dilation')
        self.padding_mode = padding_mode
        use_fbm = kh == 3 if fbm is None else fbm
        self.fbm = FBM(in_channels, tuple(fbm_cutoffs), device=device, dtype=dtype) if use_fbm else None
        self.reset_parameters()

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, **options: Any) -> FDConv2d:
        """An FDConv2d that reproduces ``conv`` exactly at step 0 (same device and dtype)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"FDConv2d.from_dense needs an nn.Conv2d, got {type(conv).__name__}")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
            dtype=conv.weight.dtype, **options)
        layer.load_dense(conv.weight, conv.bias)
        return layer

    @classmethod
    def from_reference(
            cls,
            state_dict: dict[str, torch.Tensor],
            grouping: torch.Tensor | None = None,
            **constructor_kwargs: Any,
    ) -> FDConv2d:
        """Build a layer from one reference-implementation layer's state dict (keys without prefix).

        Channels and kernel size are read off the state dict unless given; ``grouping`` is the reference's
        ``official_indices`` (1, 2, n, N/n) or a (R, C) bin -> group map.
        """
        from .reference import infer_layer_shape, load_reference_layer
        kwargs = {**infer_layer_shape(state_dict), **constructor_kwargs}
        if 'num_freq_groups' not in constructor_kwargs and grouping is not None and grouping.ndim == 4:
            kwargs['num_freq_groups'] = grouping.shape[2]
        in_ch, out_ch, k = kwargs.pop('in_channels'), kwargs.pop('out_channels'), kwargs.pop('kernel_size')
        kwargs.setdefault('fbm', any(key.startswith('FBM.') for key in state_dict))
        kwargs.setdefault('ksm_local', True)
        kwargs.setdefault('bias', 'bias' in state_dict)
        layer = cls(in_ch, out_ch, k, **kwargs)
        load_reference_layer(layer, state_dict, grouping)
        return layer

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != 'zeros':
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", num_freq_groups={self.num_freq_groups}"

    def _explicit_padding(self) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
        """(symmetric padding for the convolution, or 0; a (left, right, top, bottom) pad done before it)."""
        if self.padding == 'valid':
            return (0, 0), None
        if self.padding == 'same':
            pads = []
            for d, k in zip(self.dilation, self.kernel_size, strict=True):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            if top == bottom and left == right:
                return (top, left), None
            return (0, 0), (left, right, top, bottom)
        ph, pw = self.padding
        if self.padding_mode != 'zeros':
            return (0, 0), (pw, pw, ph, ph)
        return (ph, pw), None

    def _uses_matmul(self) -> bool:
        return self.kernel_size == (1, 1) and self.groups == 1 and self._explicit_padding() == ((0, 0), None)

    def _uses_unfold(self, inp: torch.Tensor) -> bool:
        """Small maps (at most Cout output positions, e.g. ResNet stages 3 and 4): im2col and one batched matrix
        product beat the grouped convolution there, where the per-sample kernels outweigh the activations."""
        if self.groups != 1 or self.kernel_size == (1, 1):
            return False
        ho, wo = self._output_size(inp)
        return ho * wo <= self.out_channels

    def _output_size(self, inp: torch.Tensor) -> tuple[int, int]:
        padding, _ = self._explicit_padding()
        ho, wo = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(
            inp.shape[-2:], padding, self.dilation, self.kernel_size, self.stride, strict=True)]
        return ho, wo

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FDConv2d expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(fft_dtype(x.dtype)).mean((2, 3))

    def _kernel_input(self, x: torch.Tensor, channel: torch.Tensor | None) -> torch.Tensor:
        inp = self.fbm(x) if self.fbm is not None else x
        if channel is not None and (torch.is_grad_enabled() or inp is x):
            inp = inp * channel[:, :, None, None].to(inp.dtype)
        elif channel is not None:  # FBM output is fresh
            inp.mul_(channel[:, :, None, None].to(inp.dtype))
        inp = inp.to(x.dtype)
        _, pre_pad = self._explicit_padding()
        if pre_pad is not None:
            inp = F.pad(inp, pre_pad, mode='constant' if self.padding_mode == 'zeros' else self.padding_mode)
        if self._uses_matmul() and self.stride != (1, 1):
            inp = inp[:, :, ::self.stride[0], ::self.stride[1]]
        return inp

    def _apply_kernels(self, inp: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        b, cin, h, w = inp.shape
        if self._uses_matmul():
            out = torch.bmm(kernels.view(b, self.out_channels, cin), inp.reshape(b, cin, h * w))
            return out.view(b, self.out_channels, h, w)
        padding, _ = self._explicit_padding()
        out = F.conv2d(
            inp.reshape(1, b * cin, h, w), kernels.reshape(b * self.out_channels, *kernels.shape[2:]), None,
            self.stride, padding, self.dilation, b * self.groups)
        return out.view(b, self.out_channels, *out.shape[-2:])

    def _kernels_from_product(self, product: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
        """P (matrix layout) and s -> kernels (B, Cout, Cin, k, k), for k > 1 in scratch memory."""
        k, b = self.kernel_size[0], product.shape[0]
        if spatial is None:  # k = 1: the layouts agree
            return product.view(b, self.out_channels, self.in_channels, 1, 1)
        kernels = scratch('fdconv.kernel', (b, self.out_channels, self.in_channels, k, k), product.device,
                          product.dtype)
        _reorder_scaled(product, kernels, spatial.to(product.dtype), to_kernel_order=True)
        return kernels

    def _unfold_by_row(self, inp: torch.Tensor, spatial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """im2col with rows in the weight-matrix order (u, i, v), each scaled by s[u, v], so that P
        (B, Cout, k*Cin*k) multiplies it as it is: no reordering of the kernels, s costs activation memory only.
        The columns are a strided view of the padded input, so gathering and scaling them is one product (3-5x
        faster than ``F.unfold`` and a product). Returns the scaled columns (B, k*Cin*k, Ho*Wo) and the unscaled
        ones as a (B, k, Cin, k, Ho, Wo) view."""
        k, (b, cin) = self.kernel_size[0], inp.shape[:2]
        (ph, pw), _ = self._explicit_padding()
        padded = F.pad(inp, (pw, pw, ph, ph)) if ph or pw else inp
        (ho, wo), (dh, dw), (sh, sw) = self._output_size(inp), self.dilation, self.stride
        stride_b, stride_c, stride_h, stride_w = padded.stride()
        cols = padded.as_strided(
            (b, k, cin, k, ho, wo),
            (stride_b, dh * stride_h, stride_c, dw * stride_w, sh * stride_h, sw * stride_w),
            padded.storage_offset())
        scaled = torch.empty(cols.shape, device=inp.device, dtype=inp.dtype)
        torch.mul(cols, spatial.view(b, k, 1, k, 1, 1).to(inp.dtype), out=scaled)
        return scaled.view(b, k * cin * k, ho * wo), cols

    def _apply_product(self, inp: torch.Tensor, product: torch.Tensor, spatial: torch.Tensor | None) -> torch.Tensor:
        if self._uses_matmul():
            return self._apply_kernels(inp, product)
        if self._uses_unfold(inp):
            cols, _ = self._unfold_by_row(inp, spatial)
            out = torch.bmm(product.view(inp.shape[0], self.out_channels, -1), cols)
            return out.view(inp.shape[0], self.out_channels, *self._output_size(inp))
        return self._apply_kernels(inp, self._kernels_from_product(product, spatial))

    def _apply_product_backward(
            self,
            inp: torch.Tensor,
            grad: torch.Tensor,
            product: torch.Tensor,
            spatial: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        b, cin, h, w = inp.shape
        grad_m = self.fdw.gradient_buffer(b, product.dtype)
        flat_grad, flat_p = grad.reshape(b, self.out_channels, -1), product.view(b, self.out_channels, -1)
        if self._uses_matmul():
            grad_inp = torch.bmm(flat_p.transpose(1, 2), flat_grad).view(inp.shape)
            torch.bmm(flat_grad, inp.reshape(b, cin, -1).transpose(1, 2), out=grad_m)
            return grad_inp, grad_m, None
        k = self.kernel_size[0]
        padding, _ = self._explicit_padding()
        if self._uses_unfold(inp):
            cols, unscaled = self._unfold_by_row(inp, spatial)
            torch.bmm(flat_grad, cols.transpose(1, 2), out=grad_m.view(b, self.out_channels, -1))
            grad_cols = torch.bmm(flat_p.transpose(1, 2), flat_grad).view(unscaled.shape)
            grad_spatial = (grad_cols * unscaled).sum((2, 4, 5)).view(b, k * k)
            grad_cols = (grad_cols * spatial.view(b, k, 1, k, 1, 1).to(grad_cols.dtype)).transpose(1, 2)
            grad_inp = F.fold(grad_cols.reshape(b, cin * k * k, -1), (h, w), self.kernel_size, self.dilation,
                              padding, self.stride)
            return grad_inp, grad_m, grad_spatial
        kernels = self._kernels_from_product(product, spatial)
        grad_inp, grad_k, _ = torch.ops.aten.convolution_backward(
            grad.reshape(1, b * self.out_channels, *grad.shape[-2:]), inp.reshape(1, b * cin, h, w),
            kernels.view(b * self.out_channels, cin, k, k), None, self.stride, padding, self.dilation, False,
            (0, 0), b, (True, True, False))
        if spatial is None:
            return grad_inp.view(inp.shape), grad_k.view(grad_m.shape), None
        _reorder_scaled(grad_m, grad_k.view(kernels.shape), spatial.to(grad_m.dtype), to_kernel_order=False)
        return grad_inp.view(inp.shape), grad_m, None


@register_notrace_module
class FDLinear(_FrequencyDynamicLayer):
    """Frequency Dynamic linear layer for tokens (B, ..., Cin); the KSM statistics pool over all tokens of a
    sample. A linear weight (Cout, Cin) is the k = 1 case of FDConv2d; options as for FDConv2d, without FBM."""

    fbm = None

    def __init__(
            self,
            in_features: int,
            out_features: int,
            bias: bool = True,
            device=None,
            dtype=None,
            *,
            num_freq_groups: int = 64,
            att_multi: float = 2.0,
            temperature: float = 1.0,
            kernel_temperature: float = 1.0,
            reduction: float = 0.0625,
            min_hidden: int = 16,
            ksm_local: bool = True,
            recompute: bool = True,
    ):
        super().__init__(
            in_features, out_features, 1, 1, bias, num_freq_groups, att_multi, temperature, kernel_temperature,
            reduction, min_hidden, ksm_local, recompute, device=device, dtype=dtype)
        self.reset_parameters()

    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_channels

    @classmethod
    def from_dense(cls, linear: nn.Linear, **options: Any) -> FDLinear:
        """An FDLinear that reproduces ``linear`` exactly at step 0 (same device and dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FDLinear.from_dense needs an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **options)
        layer.load_dense(linear.weight[:, :, None, None], linear.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, num_freq_groups={self.num_freq_groups}")

    _channel_dim = 2

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim < 2 or x.shape[-1] != self.in_channels:
            raise ValueError(f"FDLinear expects input (B, ..., {self.in_channels}), got {tuple(x.shape)}")

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, self.in_channels).to(fft_dtype(x.dtype)).mean(1)

    def _kernel_input(self, x: torch.Tensor, channel: torch.Tensor | None) -> torch.Tensor:
        tokens = x.reshape(x.shape[0], -1, self.in_channels)
        if channel is None:
            return tokens
        return (tokens * channel[:, None, :].to(tokens.dtype)).to(x.dtype)

    def _apply_kernels(self, inp: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        b = inp.shape[0]
        return torch.bmm(inp, kernels.view(b, self.out_channels, self.in_channels).transpose(1, 2))

    def _apply_product_backward(
            self,
            inp: torch.Tensor,
            grad: torch.Tensor,
            product: torch.Tensor,
            spatial: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        b = inp.shape[0]
        grad_inp = torch.bmm(grad, product.view(b, self.out_channels, self.in_channels))
        grad_m = self.fdw.gradient_buffer(b, product.dtype)
        torch.bmm(grad.transpose(1, 2), inp, out=grad_m)
        return grad_inp, grad_m, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).view(*x.shape[:-1], self.out_channels)
