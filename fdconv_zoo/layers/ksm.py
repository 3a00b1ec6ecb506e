"""Kernel Spatial Modulation (KSM), from "Frequency Dynamic Convolution for Dense Image Prediction" (CVPR 2025).

Both branches read the per-sample mean of the input, shape (B, Cin). The global branch gives channel, filter,
spatial and frequency-group (kernel) attention; the local branch gives one factor per weight element. Every
head starts at the identity (all factors 1), so a layer converted from a dense one is exact at step 0.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.metaformer import StarReLU

from . import native
from .fdw import Modulation
from .workspace import scratch


def _identity_logit(att_multi: float, temperature: float) -> float:
    """The pre-activation z with att_multi * sigmoid(z / temperature) == 1 (0 for the paper's att_multi=2)."""
    return -temperature * math.log(att_multi - 1.0)


def local_kernel_size(in_channels: int) -> int:
    """Odd 1-D kernel size of the local branch: 5 for 64..512 channels, 7 for 1024..2048 (paper's ECA-like rule)."""
    return round(math.log2(in_channels) / 2 + 0.5) // 2 * 2 + 1


class GlobalAttention(NamedTuple):
    channel: torch.Tensor  # (B, Cin)
    filter: torch.Tensor | None  # (B, Cout), None for depthwise layers
    spatial: torch.Tensor | None  # (B, k*k), None for k = 1
    kernel: torch.Tensor  # (B, n): the scale 2*sigmoid(z) of each frequency group


class KSMGlobal(nn.Module):
    """Global KSM: linear -> StarReLU trunk (no batch statistics, so batch size 1 trains) and four heads."""

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int,
            num_groups: int,
            reduction: float = 0.0625,
            min_hidden: int = 16,
            att_multi: float = 2.0,
            temperature: float = 1.0,
            kernel_temperature: float = 1.0,
            filter_attention: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        hidden = max(int(in_channels * reduction), min_hidden)
        self.att_multi = att_multi
        self.temperature = temperature
        self.kernel_temperature = kernel_temperature
        self.fc = nn.Linear(in_channels, hidden, **dd)
        self.act = StarReLU(**dd)
        self.channel_fc = nn.Linear(hidden, in_channels, **dd)
        self.filter_fc = nn.Linear(hidden, out_channels, **dd) if filter_attention else None
        self.spatial_fc = nn.Linear(hidden, kernel_size * kernel_size, **dd) if kernel_size > 1 else None
        self.kernel_fc = nn.Linear(hidden, num_groups, **dd)
        # per output of the four heads taken as one: the temperature before the sigmoid, the factor after it
        attention = sum(h.out_features for h in self.heads()[:-1])
        self.register_buffer('head_temperature', torch.tensor(
            [temperature] * attention + [kernel_temperature] * num_groups, **dd), persistent=False)
        self.register_buffer('head_scale', torch.tensor([att_multi] * attention + [2.0] * num_groups, **dd),
                             persistent=False)
        self.reset_parameters()

    def heads(self) -> list[nn.Linear]:
        return [h for h in (self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc) if h is not None]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.fc.weight, mode='fan_out', nonlinearity='relu')
        nn.init.zeros_(self.fc.bias)
        for head in self.heads():
            nn.init.zeros_(head.weight)
            nn.init.constant_(head.bias, _identity_logit(self.att_multi, self.temperature))
        nn.init.zeros_(self.kernel_fc.bias)  # 2 * sigmoid(0) == 1 whatever att_multi is

    def forward(self, pooled: torch.Tensor) -> GlobalAttention:
        hidden = self.act(self.fc(pooled))
        # the four heads as one matrix product and one sigmoid: a few small ops instead of sixteen
        heads = self.heads()
        logits = F.linear(hidden, torch.cat([h.weight for h in heads]), torch.cat([h.bias for h in heads]))
        if self.temperature != 1.0 or self.kernel_temperature != 1.0:
            logits = logits / self.head_temperature.to(logits.dtype)
        att = torch.sigmoid(logits) * self.head_scale.to(logits.dtype)
        parts = iter(att.split([h.out_features for h in heads], dim=1))
        return GlobalAttention(
            channel=next(parts),
            filter=next(parts) if self.filter_fc is not None else None,
            spatial=next(parts) if self.spatial_fc is not None else None,
            kernel=next(parts),
        )


class KSMLocal(nn.Module):
    """Local KSM: LayerNorm of the pooled vector, then a 1-D conv along the channel axis with Cout*k*k outputs.

    Output channel o*k*k + u*k + v at position i is the logit of weight element [o, i, u, v]; with groups > 1
    element [o, i, u, v] reads input channel (o // (Cout/g)) * Cg + i, and only those logits are computed.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int,
            groups: int = 1,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.groups = groups
        self.conv_size = local_kernel_size(in_channels)
        self.norm = nn.LayerNorm(in_channels, **dd)
        self.conv = nn.Conv1d(1, out_channels * kernel_size ** 2, self.conv_size, bias=False, **dd)
        cg = in_channels // groups
        channel = (torch.arange(out_channels) // (out_channels // groups))[:, None] * cg + torch.arange(cg)
        self.register_buffer('channel_of_element', channel.to(device), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.conv.weight)
        self.norm.reset_parameters()

    def windows(self, pooled: torch.Tensor) -> torch.Tensor:
        """The 1-D conv's input windows (B, Cin, K) of the normalised pooled vector (zero padded)."""
        pad = self.conv_size // 2
        return F.pad(self.norm(pooled), (pad, pad)).unfold(1, self.conv_size, 1)

    def logits(self, windows: torch.Tensor) -> torch.Tensor:
        """Windows (B, Cin, K) -> logits (B, Cout, Cg, k*k); apply ``att_multi * sigmoid`` to get the factors."""
        kk = self.kernel_size ** 2
        taps = self.conv.weight.view(self.out_channels, kk, self.conv_size)
        if self.groups == 1:
            return torch.einsum('bit,out->boiu', windows, taps)
        windows = windows[:, self.channel_of_element]  # (B, Cout, Cg, K)
        return torch.einsum('boit,out->boiu', windows, taps)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, Cin) -> logits (B, Cout, Cg, k*k)."""
        return self.logits(self.windows(pooled))

    def expanded_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, Cin, K) -> (B, Cin*k, K*k) with entry [(i, v), (t, v')] = windows[i, t] if v == v' else 0, so that
        ``expanded_taps() @ expanded_windows().T`` gives the logits in the weight-matrix layout of FDW."""
        k = self.kernel_size
        eye = torch.eye(k, device=windows.device, dtype=windows.dtype)
        return (windows[:, :, None, :, None] * eye[:, None, :]).flatten(3).flatten(1, 2)

    def expanded_taps(self) -> torch.Tensor:
        """The taps as (Cout*k, K*k), entry [(o, u), (t, v)] = tap t of output channel o*k*k + u*k + v."""
        k = self.kernel_size
        taps = self.conv.weight.view(self.out_channels, k, k, self.conv_size)
        return taps.transpose(2, 3).reshape(self.out_channels * k, self.conv_size * k)

    def matrix_logits(self, windows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """groups = 1: logits in FDW's weight-matrix layout (B, Cout*k, Cin*k), written into ``out``."""
        taps = self.expanded_taps().to(out.dtype)
        windows = self.expanded_windows(windows.to(out.dtype))
        return torch.bmm(taps.expand(windows.shape[0], -1, -1), windows.transpose(1, 2), out=out)

    def modulation(
            self,
            windows: torch.Tensor,
            dtype: torch.dtype,
            sigmoid_out: torch.Tensor | None,
            channel: torch.Tensor | None = None,
    ) -> Modulation:
        """groups = 1: the product with sigmoid(L) in FDW's weight-matrix layout, for ``FDW.synthesize`` to apply
        slice by slice; sigmoid(L) also goes to ``sigmoid_out`` (B, Cout*k, Cin*k) if given. In float32 on the
        CPU it is a ``native.LocalModulation``: the fused loop makes the logits on the fly (no B x |W| logits
        tensor, one pass) and can multiply by a channel attention (B, Cin) on the way; otherwise sigmoid(L) is
        made first, in ``sigmoid_out`` or scratch memory (and ``channel`` must be None)."""
        taps = self.conv.weight.detach().to(dtype).view(-1, self.conv_size)
        windows = windows.to(dtype).contiguous()
        k, rows, cols = self.kernel_size, self.out_channels * self.kernel_size, self.in_channels * self.kernel_size
        if native.usable(taps, windows):
            channel = None if channel is None else channel.to(dtype).contiguous()
            return native.LocalModulation(taps, windows, channel, k, sigmoid_out)
        if channel is not None:
            raise ValueError("only the fused CPU loops fold the channel attention into the kernels")
        if sigmoid_out is None:
            sigmoid_out = scratch('ksm.local', (windows.shape[0], rows, cols), windows.device, dtype)
        self.matrix_logits(windows, out=sigmoid_out).sigmoid_()

        def product(part: torch.Tensor, out: torch.Tensor, first_row: int) -> None:
            torch.mul(part, sigmoid_out[:, first_row:first_row + part.shape[1]], out=out)
        return product

    def fused_modulation_backward(
            self,
            product: torch.Tensor,
            grad: torch.Tensor,
            windows: torch.Tensor,
            channel: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """groups = 1, float32 CPU: backward of P = M * sigmoid(L) (* channel (B, Cin) if given) in one pass of
        the fused loop, sigmoid(L) made again rather than stored. Turns ``grad`` (dLoss/dP) into dLoss/dM in
        place and returns sum_i P * dP per (sample, Cout, k, k), the gradients of the conv taps (like
        ``conv.weight``) and of the windows (B, Cin, K), and sum_(o,u,v) P * dP per (sample, Cin) (None without
        ``channel``). Use :meth:`matrix_logits_backward` where the fused loops do not apply."""
        taps = self.conv.weight.detach().to(product.dtype).view(-1, self.conv_size)
        windows = windows.to(product.dtype).contiguous()
        channel = None if channel is None else channel.to(product.dtype).contiguous()
        per_tap, grad_taps, grad_windows, channel_sums = native.local_modulation_backward(
            product, grad, taps, windows, channel, self.kernel_size)
        k = self.kernel_size
        return (per_tap.view(-1, self.out_channels, k, k), grad_taps.view(self.conv.weight.shape), grad_windows,
                channel_sums)

    def matrix_logits_backward(
            self, grad: torch.Tensor, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of :meth:`matrix_logits` (B, Cout*k, Cin*k) -> gradients of the conv taps (shaped like
        ``conv.weight``) and of the windows (B, Cin, K)."""
        k, b = self.kernel_size, grad.shape[0]
        expanded = self.expanded_windows(windows.to(grad.dtype))
        grad_taps = torch.bmm(expanded.transpose(1, 2), grad.transpose(1, 2)).sum(0).t()  # (Cout*k, K*k)
        grad_taps = grad_taps.view(self.out_channels, k, self.conv_size, k).transpose(2, 3)
        expanded = torch.bmm(self.expanded_taps().to(grad.dtype).t().expand(b, -1, -1), grad)  # (B, K*k, Cin*k)
        grad_windows = expanded.view(b, self.conv_size, k, self.in_channels, k).diagonal(dim1=2, dim2=4).sum(-1)
        return grad_taps.reshape(self.conv.weight.shape), grad_windows.transpose(1, 2)
