"""Frequency Dynamic Convolution, from "Frequency Dynamic Convolution for Dense Image Prediction" (CVPR 2025).

``FDConv2d`` is a drop-in for ``nn.Conv2d`` and ``FDLinear`` for ``nn.Linear`` on token inputs (..., Cin).
Each sample gets its own kernel: FDW synthesises it from the spectrum and per-group attention, KSM scales it
per channel, filter, kernel position and element; FBM (3x3 layers) re-weights the input's frequency bands.
Channel and filter attention are applied to the activations, which is the same as scaling the kernel.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from .fbm import FBM
from .fdw import FourierDisjointWeight, fft_dtype, matrix_to_weight
from .ksm import GlobalAttention, KSMGlobal, KSMLocal
from .workspace import scratch

_Size2 = int | tuple[int, int]


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

    def sample_weights(self, pooled: torch.Tensor) -> tuple[GlobalAttention, torch.Tensor]:
        """Pooled input (B, Cin) -> global attention and the per-sample kernels (B, Cout, Cg, k, k), >= float32.

        The kernels carry FDW, spatial and local modulation; channel/filter attention are left to the caller.
        """
        pooled = pooled.to(self.ksm_global.fc.weight.dtype)
        with record_function('fdconv.ksm'):
            att = self.ksm_global(pooled)
        with record_function('fdconv.synthesis'):
            if (not torch.is_grad_enabled() and self.groups == 1 and pooled.device.type == 'cpu'
                    and not torch.compiler.is_compiling()):
                return self._synthesize_reusing_memory(pooled, att)
            return att, self._synthesize(pooled, att)

    def _synthesize(self, pooled: torch.Tensor, att: GlobalAttention) -> torch.Tensor:
        """The differentiable path: plain tensor algebra (recomputed in backward when ``recompute``)."""
        k = self.fdw.kernel_size
        weight = matrix_to_weight(self.fdw(att.kernel), self.out_channels, k)
        scale = self.att_multi if self.ksm_local is not None else 1.0
        if att.spatial is not None:
            scale = att.spatial.view(-1, 1, 1, k, k) * scale
        if self.ksm_local is not None:
            local = torch.sigmoid(self.ksm_local(pooled).unflatten(-1, (k, k)))
            weight = weight * local
        if not isinstance(scale, float) or scale != 1.0:
            weight = weight * scale
        return weight.contiguous()

    def _synthesize_reusing_memory(
            self, pooled: torch.Tensor, att: GlobalAttention) -> tuple[GlobalAttention, torch.Tensor]:
        """Inference on CPU, groups = 1: the same kernels with the fewest passes over B x |W| floats, in scratch
        memory (fresh multi-MB tensors cost more to map than to compute). The constant att_multi of the local
        factors moves to the channel attention, which scales the (smaller) input instead of the kernel."""
        k, b = self.fdw.kernel_size, pooled.shape[0]
        cout, cin = self.out_channels, self.in_channels
        matrix = self.fdw(att.kernel, reuse_memory=True)  # (B, Cout*k, Cin*k)
        if self.ksm_local is None:
            weight = matrix_to_weight(matrix, cout, k)
            if att.spatial is not None:
                weight = weight * att.spatial.view(b, 1, 1, k, k).to(weight.dtype)
            return att, weight.contiguous()
        windows = self.ksm_local.windows(pooled).to(matrix.dtype)  # (B, Cin, K)
        taps = self.ksm_local.conv.weight.to(matrix.dtype).flatten(1)  # (Cout*k*k, K)
        att = att._replace(channel=att.channel * self.att_multi)
        if k == 1:  # logits straight in the kernel's (B, Cout, Cin) layout, then in place
            local = scratch('ksm.local', (b, cout, cin), pooled.device, matrix.dtype)
            torch.matmul(taps, windows.transpose(1, 2), out=local)
            return att, local.sigmoid_().mul_(matrix.view(b, cout, cin)).view(b, cout, cin, 1, 1)
        local = scratch('ksm.local', (b, cin, cout * k * k), pooled.device, matrix.dtype)
        torch.matmul(windows, taps.t(), out=local)
        local = local.sigmoid_().view(b, cin, cout, k, k).transpose(1, 2)
        weight = scratch('fdconv.kernel', (b, cout, cin, k, k), pooled.device, matrix.dtype)
        torch.mul(matrix_to_weight(matrix, cout, k), local, out=weight)
        if att.spatial is not None:
            weight.mul_(att.spatial.view(b, 1, 1, k, k).to(weight.dtype))
        return att, weight

    def _check_input(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _dynamic_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.recompute and torch.is_grad_enabled():
            # per-sample kernels are B x |W| floats: rebuild them in backward rather than keep them alive
            if torch.compiler.is_compiling():
                return checkpoint(self._dynamic_forward, x, use_reentrant=False, preserve_rng_state=False)
            return _RecomputeInBackward.apply(self, x, *self.parameters())
        return self._dynamic_forward(x)

    def _finish(self, y: torch.Tensor, filter_att: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
        shape = [1] * y.ndim
        shape[0], shape[channel_dim] = y.shape[0], self.out_channels
        if filter_att is not None:
            y = y * filter_att.view(shape).to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.view(shape[1:]).to(y.dtype)
        return y


class _RecomputeInBackward(torch.autograd.Function):
    """Activation checkpointing of one layer whose forward runs the no-grad path (scratch memory, fewest
    passes); backward rebuilds the kernels with autograd and differentiates them. Only the input is kept."""

    @staticmethod
    def forward(ctx, layer: _FrequencyDynamicLayer, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x)
        return layer._dynamic_forward(x)  # autograd.Function.forward runs without grad

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = list(ctx.layer.parameters())
        x = x.detach().requires_grad_(ctx.needs_input_grad[1])
        wanted = [t for t, need in zip([x, *params], ctx.needs_input_grad[1:], strict=True) if need]
        with torch.enable_grad():
            y = ctx.layer._dynamic_forward(x)
        grads = iter(torch.autograd.grad(y, wanted, grad_out, allow_unused=True))
        return (None, *(next(grads) if need else None for need in ctx.needs_input_grad[1:]))


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
        recompute: in training, rebuild the per-sample kernels in backward instead of storing them
            (activation checkpointing of the layer: far less memory, one more kernel synthesis).
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

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Per-sample convolution: x (B, Cin, H, W), weight (B, Cout, Cg, k, k), both in the compute dtype."""
        b, cin, h, w = x.shape
        padding = self.padding
        if self.padding_mode != 'zeros':
            ph, pw = padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = 0
            h, w = x.shape[-2:]
        if self.kernel_size == (1, 1) and self.groups == 1 and padding in ((0, 0), 0, 'valid', 'same'):
            if self.stride != (1, 1):
                x = x[:, :, ::self.stride[0], ::self.stride[1]]
            out = torch.bmm(weight.view(b, self.out_channels, cin), x.reshape(b, cin, -1))
            return out.view(b, self.out_channels, *x.shape[-2:])
        out = F.conv2d(
            x.reshape(1, b * cin, h, w), weight.view(b * self.out_channels, *weight.shape[2:]), None,
            self.stride, padding, self.dilation, b * self.groups)
        return out.view(b, self.out_channels, *out.shape[-2:])

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FDConv2d expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")

    def _dynamic_forward(self, x: torch.Tensor) -> torch.Tensor:
        att, weight = self.sample_weights(x.to(fft_dtype(x.dtype)).mean((2, 3)))
        with record_function('fdconv.fbm'):
            x_mod = self.fbm(x) if self.fbm is not None else x
        with record_function('fdconv.conv'):
            x_mod = (x_mod * att.channel[:, :, None, None]).to(x.dtype)
            y = self._conv(x_mod, weight.to(x.dtype))
            return self._finish(y, att.filter, channel_dim=1)


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

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim < 2 or x.shape[-1] != self.in_channels:
            raise ValueError(f"FDLinear expects input (B, ..., {self.in_channels}), got {tuple(x.shape)}")

    def _dynamic_forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        tokens = x.reshape(b, -1, self.in_channels)
        att, weight = self.sample_weights(tokens.to(fft_dtype(x.dtype)).mean(1))
        with record_function('fdconv.conv'):
            tokens = (tokens * att.channel[:, None, :]).to(x.dtype)
            weight_t = weight.view(b, self.out_channels, self.in_channels).transpose(1, 2).to(x.dtype)
            y = self._finish(torch.bmm(tokens, weight_t), att.filter, channel_dim=2)
        return y.view(*x.shape[:-1], self.out_channels)
