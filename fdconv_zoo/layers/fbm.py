"""Frequency Band Modulation (FBM), from "Frequency Dynamic Convolution for Dense Image Prediction" (CVPR 2025).

The input map is split into frequency bands by nested low-pass masks; each band but the lowest is scaled by
a spatial map 2*sigmoid(conv3x3(x)) shared by all channels. With all maps equal to 1 the input is unchanged.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fdw import fft_dtype


@lru_cache(maxsize=64)
def _low_pass_masks_cpu(height: int, width: int, cutoffs: tuple[int, ...]) -> torch.Tensor:
    # Evaluated in float32 as the reference does: there 0.5/kappa + 1e-8 rounds to 0.25 for kappa=2 (edge bins
    # excluded) but stays above 0.125 and 0.0625 for kappa=4, 8 (edge bins kept). Checkpoints were trained so.
    fr = torch.fft.fftfreq(height, dtype=torch.float32).abs()
    fc = torch.fft.rfftfreq(width, dtype=torch.float32)
    radius = torch.maximum(fr[:, None], fc[None, :])
    return torch.stack([radius < torch.tensor(0.5 / kappa + 1e-8, dtype=torch.float32) for kappa in cutoffs]).float()


_mask_cache: dict[tuple, torch.Tensor] = {}


def low_pass_masks(height: int, width: int, cutoffs: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Exact (J, H, W//2+1) float masks of the half spectrum for every input size, cached per size and device.

    Bin (r, c) passes cut-off kappa when max(|fftfreq(H)[r]|, rfftfreq(W)[c]) < 0.5 / kappa.
    """
    key = (height, width, cutoffs, str(device))
    masks = _mask_cache.get(key)
    if masks is None:
        masks = _mask_cache.setdefault(key, _low_pass_masks_cpu(height, width, cutoffs).to(device))
    return masks


class FBM(nn.Module):
    """x' = sum_j A_j * (LP_{j-1} - LP_j) + LP_J with LP_0 = x, computed in float32."""

    def __init__(
            self,
            in_channels: int,
            cutoffs: tuple[int, ...] = (2, 4, 8),
            device=None,
            dtype=None,
    ):
        super().__init__()
        if not cutoffs or any(int(c) != c or c < 1 for c in cutoffs):
            raise ValueError(f"FBM cut-offs must be a non-empty list of positive integers, got {cutoffs}")
        self.cutoffs = tuple(int(c) for c in cutoffs)
        # the J per-band 3x3 convs Cin -> 1 run as one Cin -> J conv
        self.band_conv = nn.Conv2d(in_channels, len(self.cutoffs), 3, padding=1, device=device, dtype=dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.band_conv.weight)
        nn.init.zeros_(self.band_conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, H, W) -> modulated map of the same shape, at least float32."""
        h, w = x.shape[-2:]
        x = x.to(fft_dtype(x.dtype))
        masks = low_pass_masks(h, w, self.cutoffs, x.device).to(x.dtype)
        spec = torch.fft.rfft2(x, norm='ortho')
        low_pass = torch.fft.irfft2(spec.unsqueeze(1) * masks[:, None], s=(h, w), norm='ortho')  # (B, J, C, H, W)
        band_scale = 2.0 * torch.sigmoid(F.conv2d(
            x, self.band_conv.weight.to(x.dtype), self.band_conv.bias.to(x.dtype), padding=1))  # (B, J, H, W)
        # sum_j A_j (LP_{j-1} - LP_j) + LP_J  ==  A_1 x + sum_j (A_{j+1} - A_j) LP_j  with A_{J+1} = 1
        next_scale = torch.cat([band_scale[:, 1:], torch.ones_like(band_scale[:, :1])], dim=1)
        weight = (next_scale - band_scale).unsqueeze(2)
        return band_scale[:, :1] * x + (weight * low_pass).sum(1)
