"""A slow, literal per-sample FDConv written straight from FDCONV_SPEC.md, used to check the fast layers."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fdconv_zoo import FDConv2d


def naive_fbm(layer: FDConv2d, x: torch.Tensor) -> torch.Tensor:
    """One sample (Cin, *spatial): sum_j A_j (LP_{j-1} - LP_j) + LP_J with masks built from the spec's formula (a
    frequency passes when it passes along every axis: a square in 2-D, a cube in 3-D)."""
    size = x.shape[1:]
    dims = tuple(range(1, x.ndim))
    spec = torch.fft.rfftn(x, dim=dims, norm='ortho')
    freqs = [torch.fft.fftfreq(n).abs() for n in size[:-1]] + [torch.fft.rfftfreq(size[-1])]
    radius = torch.stack(torch.meshgrid(*freqs, indexing='ij')).amax(0)
    out = torch.zeros_like(x)
    previous = x
    conv_nd = (F.conv1d, F.conv2d, F.conv3d)[len(size) - 1]
    for j, kappa in enumerate(layer.fbm.cutoffs):
        mask = (radius < torch.tensor(0.5 / kappa + 1e-8)).float()
        low = torch.fft.irfftn(spec * mask, s=size, dim=dims, norm='ortho')
        conv = layer.fbm.band_conv
        band_scale = 2 * torch.sigmoid(conv_nd(x[None], conv.weight[j:j + 1], conv.bias[j:j + 1], padding=1))[0]
        out = out + band_scale * (previous - low)
        previous = low
    return out + previous


def naive_fdconv(layer: FDConv2d, x: torch.Tensor) -> torch.Tensor:
    """Loop over samples and groups; every factor indexed as the spec writes it. Kernels of 1 or 3 axes take
    their (kr, kc) block of the weight matrix as docs/design.md lays it out: rows o*kr + (every axis but the
    last, row-major), columns i*kc + (the last axis); a 1-D kernel is a (k, 1) block."""
    g_mod, loc = layer.ksm_global, layer.ksm_local
    cout, cin, groups = layer.out_channels, layer.in_channels, layer.groups
    shape = tuple(layer.kernel_size)
    kr, kc = (shape[0], 1) if len(shape) == 1 else (math.prod(shape[:-1]), shape[-1])
    positions = kr * kc
    cg = cin // groups
    outs = []
    for b in range(x.shape[0]):
        xb = x[b]
        p = xb.mean(tuple(range(1, xb.ndim)))
        hid = g_mod.act(g_mod.fc(p))
        c = layer.att_multi * torch.sigmoid(g_mod.channel_fc(hid) / g_mod.temperature)
        f = (layer.att_multi * torch.sigmoid(g_mod.filter_fc(hid) / g_mod.temperature)
             if g_mod.filter_fc is not None else torch.ones(cout))
        s = (layer.att_multi * torch.sigmoid(g_mod.spatial_fc(hid) / g_mod.temperature)
             if g_mod.spatial_fc is not None else torch.ones(1)).view(shape)
        a = 2 * torch.sigmoid(g_mod.kernel_fc(hid) / g_mod.kernel_temperature)
        spec = torch.view_as_complex(layer.fdw.spectrum).t() * layer.fdw.scale  # stored column-major, orthonormal
        spec = spec * a[layer.fdw.group_of_bin]
        matrix = torch.fft.irfft2(spec, s=(cout * kr, cg * kc))
        if loc is not None:
            q = loc.norm(p)
            logits = F.conv1d(q[None, None], loc.conv.weight, padding=loc.conv_size // 2)[0]  # (Cout*k*k, Cin)
        rows = []  # built without in-place writes, so that autograd can differentiate it (tests' oracle)
        for o in range(cout):
            row = []
            for i in range(cg):
                ch = (o // (cout // groups)) * cg + i
                w = matrix[o * kr:(o + 1) * kr, i * kc:(i + 1) * kc].reshape(shape) * c[ch] * f[o] * s
                if loc is not None:
                    w = w * layer.att_multi * torch.sigmoid(logits[o * positions:(o + 1) * positions, ch]).view(shape)
                row.append(w)
            rows.append(torch.stack(row))
        weight = torch.stack(rows)
        xm = naive_fbm(layer, xb) if layer.fbm is not None else xb
        padding = layer.padding
        if layer.padding_mode != 'zeros':
            pads = [q for pad in reversed(layer.padding) for q in (pad, pad)]
            xm, padding = F.pad(xm, pads, mode=layer.padding_mode), 0
        conv_nd = (F.conv1d, F.conv2d, F.conv3d)[len(shape) - 1]
        outs.append(conv_nd(xm[None], weight, layer.bias, layer.stride, padding, layer.dilation, groups)[0])
    return torch.stack(outs)


def randomize_(layer: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Give every modulation parameter a non-trivial value so that each part moves the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == 'fdw.spectrum':
                continue
            p.add_(torch.randn(p.shape, generator=gen) * scale)
