"""Frequency Dynamic Convolution, from "Frequency Dynamic Convolution for Dense Image Prediction" (CVPR 2025).

``FDConv2d`` is a drop-in for ``nn.Conv2d`` (``FDConv1d``, ``FDConv3d`` for ``nn.Conv1d``, ``nn.Conv3d``) and
``FDLinear`` for ``nn.Linear`` on token inputs (..., Cin).
Each sample gets its own kernel: FDW synthesises it from the spectrum and per-group attention, KSM scales it
per channel, filter, kernel position and element; FBM (3x3 layers) re-weights the input's frequency bands.

The layers compute the attention (KSM heads, FBM's band maps) and hand everything per-sample to one operator,
``fdconv::dynamic_conv`` (``ops``): the same call in eager mode, under torch.compile and torch.export, on
every device; the operator picks its implementation and, in training, keeps only the layer's input.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from timm.layers import register_notrace_module

from .fbm import FBM
from .fdw import FourierDisjointWeight
from .ksm import GlobalAttention, KSMGlobal, KSMLocal
from .ops import check_cutoffs, dynamic_conv, fft_dtype, region, synthesize
from .ops.synthesis import matrix_factors
from .weight_import import infer_layer_shape, load_reference_layer

_Size = int | tuple[int, ...]
_AXES = {1: 'L', 2: 'H, W', 3: 'D, H, W'}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_cutoffs(value: Any) -> bool:
    try:
        check_cutoffs(value)
    except ValueError:
        return False
    return True


# what each FDConv option accepts: a test, and the words for it in the error
OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    'num_freq_groups': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'att_multi': (lambda v: _is_number(v) and v > 1, 'a number > 1 (so that the attention can be the identity)'),
    'temperature': (lambda v: _is_number(v) and v > 0, 'a number > 0'),
    'kernel_temperature': (lambda v: _is_number(v) and v > 0, 'a number > 0'),
    'reduction': (lambda v: _is_number(v) and v >= 0, 'a number >= 0'),
    'min_hidden': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'ksm_local': (lambda v: isinstance(v, bool), 'true or false'),
    'fbm': (lambda v: v is None or isinstance(v, bool), 'true, false or null (on for 3x3 kernels)'),
    'fbm_cutoffs': (_is_cutoffs, 'a non-empty increasing list of integers >= 1'),
    'in_channels': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'out_channels': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'groups': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'bias': (lambda v: isinstance(v, bool), 'true or false'),
}


def check_options(**options: Any) -> None:
    """Type and range of FDConv constructor options, where they enter (a layer, a model's kwargs, a
    config.json's model_args): one error naming the option, its value and what it accepts."""
    for name, value in options.items():
        test, allowed = OPTION_RULES[name]
        if not test(value):
            raise ValueError(f"FDConv option {name}={value!r} is invalid: expected {allowed}")


def _per_axis(value: _Size, name: str, dims: int, minimum: int = 1) -> tuple[int, ...]:
    """An int or a tuple of ``dims`` ints (nn.Conv's convention for sizes, strides, paddings, dilations)."""
    values = (value,) * dims if not isinstance(value, (tuple, list)) else tuple(value)
    if len(values) != dims or not all(_is_int(v) and v >= minimum for v in values):
        raise ValueError(f"{name} must be an integer >= {minimum} or a tuple of {dims} of them, got {value!r}")
    return tuple(int(v) for v in values)


class _FrequencyDynamicLayer(nn.Module):
    """What the FDConv layers and FDLinear share: FDW spectrum, global and local KSM, bias, per-sample kernel
    synthesis."""

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: tuple[int, ...],
            groups: int,
            bias: bool,
            num_freq_groups: int,
            att_multi: float,
            temperature: float,
            kernel_temperature: float,
            reduction: float,
            min_hidden: int,
            ksm_local: bool,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        check_options(in_channels=in_channels, out_channels=out_channels, groups=groups, bias=bias,
                      num_freq_groups=num_freq_groups, att_multi=att_multi, temperature=temperature,
                      kernel_temperature=kernel_temperature, reduction=reduction, min_hidden=min_hidden,
                      ksm_local=ksm_local)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible "
                             f"by groups={groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.att_multi = float(att_multi)
        depthwise = groups == in_channels == out_channels
        self.fdw = FourierDisjointWeight(out_channels, in_channels // groups, kernel_size, num_freq_groups, **dd)
        self.ksm_global = KSMGlobal(
            in_channels, out_channels, kernel_size, num_freq_groups, reduction=reduction, min_hidden=min_hidden,
            att_multi=att_multi, temperature=temperature, kernel_temperature=kernel_temperature,
            filter_attention=not depthwise, **dd)
        self.ksm_local = KSMLocal(in_channels, out_channels, kernel_size, **dd) if ksm_local else None
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
        """The static kernel (Cout, Cg, *kernel) that the layer computes when all its attention is 1."""
        return self.fdw.static_weight()

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Take a dense layer's weight (as (Cout, Cg, *kernel)) and bias; the layer then reproduces it exactly."""
        self.fdw.set_weight(weight)
        if (bias is None) != (self.bias is None):
            raise ValueError(f"dense layer has bias={bias is not None}, FDConv layer has bias={self.bias is not None}")
        if bias is not None:
            self.bias.copy_(bias)

    def _conv_options(self) -> tuple[list[int], list[int], list[int], list[int], list[int], str]:
        """The operator's kernel axes ([] for tokens), stride, symmetric padding, padding done before the
        convolution (F.pad's order), dilation and padding mode."""
        return [], [], [], [], [], 'zeros'

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the operator takes it: (B, Cin, *spatial) maps or (B, N, Cin) tokens."""
        return x

    def _pooled_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        """The axes KSM's statistics average over: every spatial axis (tokens: FDLinear overrides)."""
        return tuple(range(2, x.ndim))

    def _check_input(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def kernel_modulation(self, x: torch.Tensor) -> tuple[GlobalAttention, torch.Tensor | None,
                                                          torch.Tensor | None, torch.Tensor]:
        """KSM of an input as the operator takes it (``_tokens``): the global attention, the local branch's taps
        and windows (None without it) and the channel factor the synthesis applies."""
        pooled = x.to(fft_dtype(x.dtype)).mean(self._pooled_dims(x)).to(self.ksm_global.fc.weight.dtype)  # (B, Cin)
        att = self.ksm_global(pooled)
        if self.ksm_local is None:
            return att, None, None, att.channel
        # the local branch's factor att_multi * sigmoid(L)
        return att, self.ksm_local.taps(), self.ksm_local(pooled), att.channel * self.att_multi

    def operator_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the operators take it: (B, Cin, *spatial) maps, or (B, N, Cin) tokens for FDLinear."""
        return self._tokens(x)

    @torch.no_grad()
    def per_sample_kernels(self, x: torch.Tensor) -> tuple[torch.Tensor, GlobalAttention]:
        """What forward convolves each sample of ``x`` with, for analysis: the kernels (B, Cout*kr, Cg*kc) in
        the weight-matrix layout with every attention applied (frequency, local, channel, spatial, filter), and
        the KSM attention. Forward itself never keeps them (they are made inside the operator)."""
        x = self._tokens(x)
        att, taps, windows, channel = self.kernel_modulation(x)
        fdw = self.fdw
        kernels = synthesize(fdw.spectrum, fdw.indices(), fdw.operator_attention(att.kernel), taps, windows, channel,
                             list(fdw.kernel_size), self.groups)
        b, (kr, kc) = kernels.shape[0], matrix_factors(fdw.kernel_size)
        view = kernels.view(b, fdw.out_channels, kr, -1, kc)
        if att.spatial is not None:
            view = view * att.spatial.view(b, 1, kr, 1, kc)
        if att.filter is not None:
            view = view * att.filter.view(b, -1, 1, 1, 1)
        return view.reshape(kernels.shape), att

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script calls this on every module first: one clear error instead of a failure deep inside."""
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by TorchScript (deprecated in PyTorch; it cannot script the "
            "fdconv operators): use torch.compile, torch.export (fdconv-zoo export --format pt2) or ONNX "
            "(fdconv-zoo export --format onnx) instead")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self._tokens(x)
        with region('fdconv.ksm'):
            att, taps, windows, channel = self.kernel_modulation(x)
        with region('fdconv.fbm'):
            band_scale = self.fbm.band_scale(x) if self.fbm is not None else None
        kernel, stride, padding, pre_pad, dilation, mode = self._conv_options()
        return dynamic_conv(
            x, band_scale, self.fdw.spectrum, self.fdw.indices(), self.fdw.operator_attention(att.kernel), taps,
            windows, channel, att.spatial, att.filter, self.bias, kernel, self.groups, stride, padding, dilation,
            pre_pad, mode, list(self.fbm.cutoffs) if self.fbm is not None else [])


class _FDConvNd(_FrequencyDynamicLayer):
    """FDConv over ``dims`` spatial axes; constructor is nn.ConvNd's plus the FDConv options (keyword-only, see
    FDConv2d; ``fbm=None`` is on for kernels 3 wide along every axis, the paper's 3x3 placement)."""

    dims: int
    dense_type: type[nn.Module]

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: _Size,
            stride: _Size = 1,
            padding: _Size | str = 0,
            dilation: _Size = 1,
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
    ):
        check_options(fbm=fbm, fbm_cutoffs=fbm_cutoffs)
        kernel = _per_axis(kernel_size, 'kernel_size', self.dims)
        if padding_mode not in ('zeros', 'reflect', 'replicate', 'circular'):
            raise ValueError(f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', "
                             f"got {padding_mode!r}")
        if isinstance(padding, str):
            if padding not in ('same', 'valid'):
                raise ValueError(f"padding must be 'same', 'valid', an int or a tuple, got {padding!r}")
            if padding_mode != 'zeros':
                raise ValueError(f"string padding {padding!r} needs padding_mode='zeros'")
        super().__init__(
            in_channels, out_channels, kernel, groups, bias, num_freq_groups, att_multi, temperature,
            kernel_temperature, reduction, min_hidden, ksm_local, device=device, dtype=dtype)
        self.kernel_size = kernel
        self.stride = _per_axis(stride, 'stride', self.dims)
        self.padding = padding if isinstance(padding, str) else _per_axis(padding, 'padding', self.dims, minimum=0)
        self.dilation = _per_axis(dilation, 'dilation', self.dims)
        if isinstance(padding, str) and padding == 'same' and any(s != 1 for s in self.stride):
            raise ValueError("padding='same' is not supported for strided convolutions")
        self.padding_mode = padding_mode
        use_fbm = all(k == 3 for k in kernel) if fbm is None else fbm
        self.fbm = FBM(in_channels, tuple(fbm_cutoffs), device=device, dtype=dtype, dims=self.dims) if use_fbm else None
        self.reset_parameters()

    @classmethod
    def from_dense(cls, conv: nn.Module, **options: Any) -> _FDConvNd:
        """The FDConv layer that reproduces the dense ``conv`` exactly at step 0 (same device and dtype)."""
        if not isinstance(conv, cls.dense_type):
            raise TypeError(f"{cls.__name__}.from_dense needs an {cls.dense_type.__module__.split('.')[0]}.nn."
                            f"{cls.dense_type.__name__}, got {type(conv).__name__}")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
            dtype=conv.weight.dtype, **options)
        layer.load_dense(conv.weight, conv.bias)
        return layer

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != 'zeros':
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", num_freq_groups={self.num_freq_groups}"

    def _explicit_padding(self) -> tuple[tuple[int, ...], list[int]]:
        """(symmetric padding for the convolution, or 0; a pad done before it, in F.pad's order: the last axis
        first, before and after)."""
        zeros = (0,) * self.dims
        if self.padding == 'valid':
            return zeros, []
        if self.padding == 'same':
            pads = []
            for d, k in zip(self.dilation, self.kernel_size, strict=True):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            if all(before == after for before, after in pads):
                return tuple(before for before, _ in pads), []
            return zeros, [p for pad in reversed(pads) for p in pad]
        if self.padding_mode != 'zeros':
            return zeros, [p for pad in reversed(self.padding) for p in (pad, pad)]
        return self.padding, []

    def _conv_options(self) -> tuple[list[int], list[int], list[int], list[int], list[int], str]:
        padding, pre_pad = self._explicit_padding()
        return (list(self.kernel_size), list(self.stride), list(padding), pre_pad, list(self.dilation),
                self.padding_mode)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects input (B, {self.in_channels}, {_AXES[self.dims]}), got "
                             f"{tuple(x.shape)}")


@register_notrace_module
class FDConv1d(_FDConvNd):
    """Frequency Dynamic Convolution for sequences (B, Cin, L): nn.Conv1d's constructor plus the FDConv options
    (see FDConv2d). Its weight matrix is that of the 2-D kernel (k, 1), as the authors lay out time series."""

    dims = 1
    dense_type = nn.Conv1d


@register_notrace_module
class FDConv2d(_FDConvNd):
    """Frequency Dynamic Convolution; constructor is nn.Conv2d's plus the FDConv options (keyword-only).

    Args (FDConv options):
        num_freq_groups: n, the number of radial frequency groups of the spectrum (paper: 64).
        att_multi: range of the sigmoid attention, att_multi * sigmoid(z); 2 makes z = 0 the identity.
        temperature, kernel_temperature: softness of the KSM heads and of the frequency-group attention.
        reduction, min_hidden: KSM global hidden width max(int(Cin * reduction), min_hidden).
        ksm_local: use the per-element local KSM branch.
        fbm: frequency band modulation of the input; None means on for 3x3 kernels (the paper's placement).
        fbm_cutoffs: low-pass cut-offs kappa of the FBM bands.
    """

    dims = 2
    dense_type = nn.Conv2d

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


@register_notrace_module
class FDConv3d(_FDConvNd):
    """Frequency Dynamic Convolution for volumes and video (B, Cin, D, H, W): nn.Conv3d's constructor plus the
    FDConv options (see FDConv2d). Its weight matrix puts the depth and height axes with the output channel and
    the width axis with the input channel, so a (1, k, k) kernel has the 2-D k x k kernel's spectrum."""

    dims = 3
    dense_type = nn.Conv3d


@register_notrace_module
class FDLinear(_FrequencyDynamicLayer):
    """Frequency Dynamic linear layer for tokens (B, ..., Cin); the KSM statistics pool over all tokens of a
    sample. A linear weight (Cout, Cin) is the 1x1 case of FDConv2d (its FDW keeps that shape); options as for
    FDConv2d, without FBM."""

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
    ):
        super().__init__(
            in_features, out_features, (1, 1), 1, bias, num_freq_groups, att_multi, temperature, kernel_temperature,
            reduction, min_hidden, ksm_local, device=device, dtype=dtype)
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

    def _pooled_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        return (1,)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim < 2 or x.shape[-1] != self.in_channels:
            raise ValueError(f"FDLinear expects input (B, ..., {self.in_channels}), got {tuple(x.shape)}")

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), self.in_channels)  # explicit: B may be 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).view(*x.shape[:-1], self.out_channels)
