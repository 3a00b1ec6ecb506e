"""Frequency Band Modulation (FBM), from "Frequency Dynamic Convolution for Dense Image Prediction" (CVPR 2025).

The input map is split into frequency bands by nested low-pass masks (along each of its 1, 2 or 3 spatial axes);
each band but the lowest is scaled by a spatial map 2*sigmoid(conv3x3(x)) shared by all channels. With all maps
equal to 1 the input is unchanged.
The band re-weighting itself is the operator ``fdconv::band_modulation`` (``ops``, where the masks become
products with a real Fourier basis); this module holds the band convolutions that give the maps.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import band_modulation, check_cutoffs, fft_dtype


class FBM(nn.Module):
    """x' = sum_j A_j * (LP_{j-1} - LP_j) + LP_J with LP_0 = x, computed in float32."""

    def __init__(
            self,
            in_channels: int,
            cutoffs: tuple[int, ...] = (2, 4, 8),
            device=None,
            dtype=None,
            dims: int = 2,
    ):
        super().__init__()
        self.cutoffs = check_cutoffs(cutoffs)
        self.dims = dims
        # the J per-band 3x3 convs Cin -> 1 run as one Cin -> J conv (3 wide along each axis in 1-D and 3-D)
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        self.band_conv = conv(in_channels, len(self.cutoffs), 3, padding=1, device=device, dtype=dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.band_conv.weight)
        nn.init.zeros_(self.band_conv.bias)

    def band_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The band maps A_j = 2*sigmoid(conv3x3(x)) (B, J, *spatial), in at least float32.

        In 2-D the J band convs (Cin -> J) run as one matrix product to the J*9 tap maps and col2im (``F.fold``),
        which adds each tap's map shifted into place: 2-3x faster on the CPU than a convolution with so few
        outputs. Fold scatters where a convolution gathers, hence the flipped taps."""
        x = x.to(fft_dtype(x.dtype))
        weight, bias = self.band_conv.weight.to(x.dtype), self.band_conv.bias.to(x.dtype)
        if self.dims != 2:
            return 2.0 * torch.sigmoid(self.band_conv._conv_forward(x, weight, bias))
        b, c, h, w = x.shape
        taps = weight.flip(2, 3).permute(0, 2, 3, 1).reshape(-1, c)  # (J*9, Cin)
        maps = torch.bmm(taps.expand(b, -1, -1), x.reshape(b, c, h * w))  # (matmul would keep a copy of x)
        logits = F.fold(maps, (h, w), 3, padding=1) + bias.view(1, -1, 1, 1)
        return 2.0 * torch.sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, *spatial) -> modulated map of the same shape, at least float32."""
        return band_modulation(x, self.band_scale(x), list(self.cutoffs))
