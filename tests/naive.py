"""A slow, literal per-sample FDConv written straight from FDCONV_SPEC.md, used to check the fast layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fdconv_zoo import FDConv2d


def naive_fbm(layer: FDConv2d, x: torch.Tensor) -> torch.Tensor:
    """One sample (Cin, H, W): sum_j A_j (LP_{j-1} - LP_j) + LP_J with masks built from the spec's formula."""
    h, w = x.shape[-2:]
    spec = torch.fft.rfft2(x, norm='ortho')
    fr = torch.fft.fftfreq(h).abs()
    fc = torch.fft.rfftfreq(w)
    out = torch.zeros_like(x)
    previous = x
    for j, kappa in enumerate(layer.fbm.cutoffs):
        mask = (torch.maximum(fr[:, None], fc[None, :]) < torch.tensor(0.5 / kappa + 1e-8)).float()
        low = torch.fft.irfft2(spec * mask, s=(h, w), norm='ortho')
        conv = layer.fbm.band_conv
        band_scale = 2 * torch.sigmoid(F.conv2d(x[None], conv.weight[j:j + 1], conv.bias[j:j + 1], padding=1))[0]
        out = out + band_scale * (previous - low)
        previous = low
    return out + previous


def naive_fdconv(layer: FDConv2d, x: torch.Tensor) -> torch.Tensor:
    """Loop over samples and groups; every factor indexed as the spec writes it."""
    g_mod, loc = layer.ksm_global, layer.ksm_local
    cout, cin, groups = layer.out_channels, layer.in_channels, layer.groups
    cg, k = cin // groups, layer.kernel_size[0]
    outs = []
    for b in range(x.shape[0]):
        xb = x[b]
        p = xb.mean((1, 2))
        hid = g_mod.act(g_mod.fc(p))
        c = layer.att_multi * torch.sigmoid(g_mod.channel_fc(hid) / g_mod.temperature)
        f = (layer.att_multi * torch.sigmoid(g_mod.filter_fc(hid) / g_mod.temperature)
             if g_mod.filter_fc is not None else torch.ones(cout))
        s = (layer.att_multi * torch.sigmoid(g_mod.spatial_fc(hid) / g_mod.temperature)
             if g_mod.spatial_fc is not None else torch.ones(1)).view(k, k)
        a = 2 * torch.sigmoid(g_mod.kernel_fc(hid) / g_mod.kernel_temperature)
        spec = torch.view_as_complex(layer.fdw.spectrum).t() * layer.fdw.scale  # stored column-major, orthonormal
        spec = spec * a[layer.fdw.group_of_bin]
        matrix = torch.fft.irfft2(spec, s=(cout * k, cg * k))
        if loc is not None:
            q = loc.norm(p)
            logits = F.conv1d(q[None, None], loc.conv.weight, padding=loc.conv_size // 2)[0]  # (Cout*k*k, Cin)
        rows = []  # built without in-place writes, so that autograd can differentiate it (tests' oracle)
        for o in range(cout):
            row = []
            for i in range(cg):
                ch = (o // (cout // groups)) * cg + i
                w = matrix[o * k:(o + 1) * k, i * k:(i + 1) * k] * c[ch] * f[o] * s
                if loc is not None:
                    w = w * layer.att_multi * torch.sigmoid(logits[o * k * k:(o + 1) * k * k, ch]).view(k, k)
                row.append(w)
            rows.append(torch.stack(row))
        weight = torch.stack(rows)
        xm = naive_fbm(layer, xb) if layer.fbm is not None else xb
        padding = layer.padding
        if layer.padding_mode != 'zeros':
            ph, pw = layer.padding
            xm, padding = F.pad(xm, (pw, pw, ph, ph), mode=layer.padding_mode), 0
        outs.append(F.conv2d(xm[None], weight, layer.bias, layer.stride, padding, layer.dilation, groups)[0])
    return torch.stack(outs)


def randomize_(layer: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Give every modulation parameter a non-trivial value so that each part moves the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == 'fdw.spectrum':
                continue
            p.add_(torch.randn(p.shape, generator=gen) * scale)
