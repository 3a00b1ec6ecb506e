"""Kernel Spatial Modulation (KSM), from "Frequency Dynamic Convolution for Dense Image Prediction" (CVPR 2025).

Both branches read the per-sample mean of the input, shape (B, Cin). The global branch gives channel, filter,
spatial and frequency-group (kernel) attention; the local branch gives one factor per weight element. Every
head starts at the identity (all factors 1), so a layer converted from a dense one is exact at step 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.metaformer import StarReLU

from .ops.synthesis import kernel_shape


def _identity_logit(att_multi: float, temperature: float) -> float:
    """The pre-activation z with att_multi * sigmoid(z / temperature) == 1 (0 for the paper's att_multi=2)."""
    return -temperature * math.log(att_multi - 1.0)


def local_kernel_size(in_channels: int) -> int:
    """Odd 1-D kernel size of the local branch: 5 for 64..512 channels, 7 for 1024..2048 (paper's ECA-like rule)."""
    return round(math.log2(in_channels) / 2 + 0.5) // 2 * 2 + 1


class GlobalAttention(NamedTuple):
    channel: torch.Tensor  # (B, Cin)
    filter: torch.Tensor | None  # (B, Cout), None for depthwise layers
    spatial: torch.Tensor | None  # (B, k*k), or one per kernel position; None for a single position
    kernel: torch.Tensor  # (B, n): the scale 2*sigmoid(z) of each frequency group


class KSMGlobal(nn.Module):
    """Global KSM: linear -> StarReLU trunk (no batch statistics, so batch size 1 trains) and four heads."""

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int | Sequence[int],
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
        positions = math.prod(kernel_shape(kernel_size))
        self.spatial_fc = nn.Linear(hidden, positions, **dd) if positions > 1 else None
        self.kernel_fc = nn.Linear(hidden, num_groups, **dd)
        self.register_buffer('head_temperature', torch.empty(0, **dd), persistent=False)
        self.register_buffer('head_scale', torch.empty(0, **dd), persistent=False)
        self.init_non_persistent_buffers()
        self.reset_parameters()

    def heads(self) -> list[nn.Linear]:
        return [h for h in (self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc) if h is not None]

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Per output of the four heads taken as one: the temperature before the sigmoid and the factor after it.
        Derived from the options, so not saved; timm and transformers call this after building on the meta
        device (``to_empty`` leaves the buffers uninitialised)."""
        attention = sum(h.out_features for h in self.heads()[:-1])
        groups = self.kernel_fc.out_features
        dd = {'device': self.head_scale.device, 'dtype': self.head_scale.dtype}
        self.head_temperature = torch.tensor([self.temperature] * attention + [self.kernel_temperature] * groups, **dd)
        self.head_scale = torch.tensor([self.att_multi] * attention + [2.0] * groups, **dd)

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
    """Local KSM: LayerNorm of the pooled vector, then a 1-D conv along the channel axis with Cout*k*k outputs
    (Cout times the kernel's positions).

    Output channel o*k*k + u*k + v at position c is the logit of weight element [o, i, u, v] for the input
    channel c it reads (c = i for groups = 1, else (o // (Cout/g))*Cg + i); kernels of 1 or 3 axes number their
    positions row-major too. The conv runs inside the kernel
    synthesis (``ops.synthesize``), which makes only those logits, on the fly: this module gives its input
    windows and its taps.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int | Sequence[int],
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_shape(kernel_size)
        self.conv_size = local_kernel_size(in_channels)
        self.norm = nn.LayerNorm(in_channels, **dd)
        self.conv = nn.Conv1d(1, out_channels * math.prod(self.kernel_size), self.conv_size, bias=False, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.conv.weight)
        self.norm.reset_parameters()

    def taps(self) -> torch.Tensor:
        """The conv's taps (Cout * positions, K)."""
        return self.conv.weight.view(-1, self.conv_size)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """The 1-D conv's input windows (B, Cin, K) of the normalised pooled vector (zero padded)."""
        pad = self.conv_size // 2
        return F.pad(self.norm(pooled), (pad, pad)).unfold(1, self.conv_size, 1)
