"""``fdconv-zoo analyze``: draws what fdconv_zoo.apps.analysis computes, as PNGs (matplotlib), a JSON file with every
number plotted, and an index.html that shows the PNGs with a line each on how to read them."""
from __future__ import annotations

import html
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..atomic import atomic_dir, write_bytes, write_json, write_text
from ..layers import FDLinear
from . import analysis

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=72)
    _plt().close(fig)
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    """Tensors and nested containers as JSON values."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_images(paths: list[str], model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(normalised batch, the same in [0, 1], file names) from files or folders of images, with the model's
    evaluation transform; an unreadable file is an error naming it."""
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform, resolve_data_config
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"image {path} not found")
    if not files:
        raise ValueError(f"no images in {paths}")
    config = resolve_data_config({}, model=model)
    transform = create_transform(**config, is_training=False)
    mean, std = torch.tensor(config['mean']).view(3, 1, 1), torch.tensor(config['std']).view(3, 1, 1)
    batch = []
    for file in files:
        try:
            with Image.open(file) as image:
                batch.append(transform(image.convert('RGB')))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"image {file} cannot be read ({e})") from None
    images = torch.stack(batch)
    return images, (images * std + mean).clamp(0, 1), [f.name for f in files]


def _draw_summary(params: dict[str, Any], distance: dict[str, float]) -> bytes:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={'width_ratios': [1, 2]})
    parts = ['fdw_spectrum', 'ksm_global', 'ksm_local', 'fbm', 'other']
    bottom = 0.0
    for part in parts:
        a.bar(['FDConv'], [params[part] / 1e6], bottom=bottom, label=part)
        bottom += params[part] / 1e6
    a.bar(['dense'], [params['dense_total'] / 1e6], color='grey')
    a.set_ylabel('parameters (M)')
    a.legend(fontsize=7)
    names = list(distance)
    b.bar(range(len(names)), [distance[n] for n in names])
    b.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    b.set_ylabel('modulation distance from identity')
    fig.tight_layout()
    return _png(fig)


def _draw_groups(name: str, d: dict[str, Any]) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(1, 5, figsize=(20, 4))
    n = d['num_groups']
    cmap = plt.get_cmap('viridis', n)
    x = (torch.arange(analysis.RADIAL_BINS) + 0.5) / analysis.RADIAL_BINS
    for g in range(n):
        axes[0].plot(x, d['profiles'][g], color=cmap(g), lw=0.8)
    axes[0].set_xlabel('radial frequency')
    axes[0].set_ylabel('share of the group kernel energy')
    axes[0].set_title(f'{name}: {n} group kernels')
    for ax, g in zip(axes[1:4], (0, n // 2, n - 1), strict=True):
        masked = torch.where(d['group_of_bin'] == g, d['magnitude'], 0.0)
        ax.imshow(torch.log1p(masked).numpy(), aspect='auto', cmap='magma')
        ax.set_title(f'|spectrum| of group {g}')
        ax.axis('off')
    image = axes[4].imshow(d['cosine'].numpy(), vmin=-1, vmax=1, cmap='coolwarm')
    axes[4].set_title(f"cos: groups {d['mean_abs_cosine']:.1e}, random {d['random_init_experts']:.1e},\n"
                      f"dense+noise {d['dense_init_experts']:.2f}", fontsize=9)
    fig.colorbar(image, ax=axes[4])
    fig.tight_layout()
    return _png(fig)


def _slices(kernel: torch.Tensor) -> list[torch.Tensor]:
    """A kernel of 1 to 3 axes as 2-D pictures: a 1-D kernel as a column, a 3-D one as its slices along the
    first axis (time or depth)."""
    if kernel.ndim == 1:
        return [kernel[:, None]]
    return [kernel] if kernel.ndim == 2 else list(kernel)


def _draw_group_kernels(name: str, layer: nn.Module) -> bytes:
    """Three group kernels and the dense kernel of one (output, input) channel pair, the strongest, drawn as
    slices; they sum to the dense kernel."""
    plt = _plt()
    kernels = analysis.group_kernels(layer)
    dense = layer.fdw.static_weight().detach()
    flat = dense.flatten(2).norm(dim=2)
    o, i = divmod(int(flat.argmax()), flat.shape[1])
    n = kernels.shape[0]
    rows = [(f'group {g}', kernels[g, o, i]) for g in dict.fromkeys((0, n // 2, n - 1))] + [('dense', dense[o, i])]
    columns = len(_slices(dense[o, i]))
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns + 1, 2.2 * len(rows)), squeeze=False)
    for r, (label, kernel) in enumerate(rows):
        bound = float(kernel.abs().max()) or 1.0
        for c, picture in enumerate(_slices(kernel)):
            image = axes[r][c].imshow(picture.numpy(), cmap='coolwarm', vmin=-bound, vmax=bound)
            axes[r][c].set_title(f'{label}' + (f', slice {c}' if columns > 1 else ''), fontsize=8)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        fig.colorbar(image, ax=axes[r][-1])
    fig.suptitle(f'{name}: kernel {tuple(layer.fdw.kernel_size)} of output channel {o}, input channel {i}',
                 fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _draw_attention(stats: dict[str, Any]) -> bytes:
    plt = _plt()
    kinds = ['kernel_attention', 'channel_attention', 'filter_attention', 'spatial_attention']
    fig, axes = plt.subplots(len(stats), 4, figsize=(16, 2.6 * len(stats)), squeeze=False)
    for row, (name, s) in zip(axes, stats.items(), strict=True):
        for ax, kind in zip(row, kinds, strict=True):
            if s[kind] is None:
                ax.axis('off')
                continue
            ax.hist(s[kind].flatten().numpy(), bins=40)
            ax.set_title(f'{name} {kind.split("_")[0]}', fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _draw_kernels(stats: dict[str, Any], names: list[str]) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(len(stats), 2, figsize=(9, 3.5 * len(stats)), squeeze=False)
    for (a, b), (name, s) in zip(axes, stats.items(), strict=True):
        image = a.imshow(s['sample_cosine'].numpy(), cmap='viridis')
        a.set_title(f"{name}: per-image kernels, mean cos {s['mean_sample_cosine']:.4f}", fontsize=8)
        fig.colorbar(image, ax=a)
        coords = s['embedding'].numpy()
        b.scatter(coords[:, 0], coords[:, 1], c=range(len(coords)), cmap='tab10')
        for i, label in enumerate(names):
            b.annotate(label, coords[i], fontsize=6)
        b.set_title('PCA of the per-image kernels', fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _draw_fbm(name: str, s: dict[str, Any], pixels: torch.Tensor) -> bytes:
    plt = _plt()
    bands = s['fbm_bands']
    rows, j = bands.shape[0], bands.shape[1]
    fig, axes = plt.subplots(rows, j + 1, figsize=(3 * (j + 1), 3 * rows), squeeze=False)
    size = tuple(pixels.shape[-2:])
    for i in range(rows):
        axes[i][0].imshow(pixels[i].permute(1, 2, 0).numpy())
        axes[i][0].axis('off')
        for b in range(j):
            up = torch.nn.functional.interpolate(bands[i:i + 1, b:b + 1], size=size, mode='bilinear')[0, 0]
            axes[i][b + 1].imshow(pixels[i].permute(1, 2, 0).numpy())
            axes[i][b + 1].imshow(up.numpy(), cmap='coolwarm', vmin=0, vmax=2, alpha=0.6)
            axes[i][b + 1].set_title(f"band {b}: edge {s['fbm_edge_mean'][b]:.3f} / flat {s['fbm_flat_mean'][b]:.3f}",
                                     fontsize=7)
            axes[i][b + 1].axis('off')
    fig.suptitle(f'{name}: FBM band scales (1 = unchanged, >1 boosted)')
    fig.tight_layout()
    return _png(fig)


def _draw_fbm_slices(name: str, s: dict[str, Any], inputs: torch.Tensor) -> bytes:
    """FBM's band maps of the first input that is not an image: along the sequence for 1-D inputs, as slices
    along the first axis (time or depth) over the input's channel mean for 3-D ones."""
    plt = _plt()
    bands, mean = s['fbm_bands'][0], inputs[0].float().mean(0)
    j = bands.shape[0]
    if bands.ndim == 2:  # (J, L)
        fig, axes = plt.subplots(j, 1, figsize=(10, 2 * j), squeeze=False)
        for b in range(j):
            axes[b][0].plot(torch.linspace(0, 1, bands.shape[1]).numpy(), bands[b].numpy(), color='C3')
            axes[b][0].set_ylim(0, 2)
            axes[b][0].set_ylabel(f'band {b} scale')
            twin = axes[b][0].twinx()
            twin.plot(torch.linspace(0, 1, mean.shape[0]).numpy(), mean.numpy(), color='0.6', lw=0.6)
            axes[b][0].set_title(f"band {b}: edge {s['fbm_edge_mean'][b]:.3f} / flat {s['fbm_flat_mean'][b]:.3f}",
                                 fontsize=8)
    else:  # (J, D, H, W)
        depth = bands.shape[1]
        picks = sorted(dict.fromkeys(round(t * (depth - 1) / 3) for t in range(4)))
        fig, axes = plt.subplots(j, len(picks), figsize=(2.6 * len(picks), 2.6 * j), squeeze=False)
        for b in range(j):
            for c, t in enumerate(picks):
                background = mean[round(t * (mean.shape[0] - 1) / max(depth - 1, 1))]
                up = torch.nn.functional.interpolate(bands[b, t][None, None], size=tuple(background.shape),
                                                     mode='bilinear')[0, 0]
                axes[b][c].imshow(background.numpy(), cmap='gray')
                axes[b][c].imshow(up.numpy(), cmap='coolwarm', vmin=0, vmax=2, alpha=0.6)
                axes[b][c].set_title(f'band {b}, slice {t}', fontsize=8)
                axes[b][c].axis('off')
        fig.suptitle(f"{name}: edge / flat means per band: " + ', '.join(
            f'{e:.3f}/{f:.3f}' for e, f in zip(s['fbm_edge_mean'], s['fbm_flat_mean'], strict=True)), fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _draw_compare(rows: list[dict[str, Any]]) -> bytes:
    plt = _plt()
    fig, a = plt.subplots(figsize=(6, 4))
    ns = [r['num_groups'] for r in rows]
    a.plot(ns, [max(r['mean_abs_cosine'], 1e-12) for r in rows], 'o-')
    a.set_xscale('log', base=2)
    a.set_yscale('log')
    a.set_xlabel('frequency groups n')
    a.set_ylabel('mean |cos| between group kernels')
    sizes = ', '.join(f"{r['params'] / 1e6:.2f}M" for r in rows)
    a.set_title(f'parameters: {sizes}', fontsize=8)
    fig.tight_layout()
    return _png(fig)


def analyze(model: nn.Module, out_dir: str | os.PathLike, image_paths: list[str] | None = None,
            pattern: str | None = None, compare: list[dict[str, Any]] | None = None,
            inputs: torch.Tensor | None = None, sample_shape: tuple[int, ...] | None = None) -> Path:
    """Write the report for ``model`` into ``out_dir`` (atomically): PNGs, report.json, index.html.

    The per-input pages use ``image_paths`` (image models) or ``inputs``, a batch of model inputs of any kind
    (clips, volumes, sequences: band maps drawn as slices); without either, a fixed random batch of
    ``sample_shape`` (default: the timm model's input size) gives the modulation distance."""
    from tqdm.auto import tqdm
    model = model.eval()
    every = analysis.fdconv_layers(model)
    chosen = analysis.fdconv_layers(model, pattern) if pattern else analysis.representative_layers(every)
    data: dict[str, Any] = {'parameters': analysis.parameter_summary(model), 'layers': {}}
    pages: list[tuple[str, bytes, str]] = []
    for name, layer in tqdm(chosen.items(), desc='layers'):
        d = analysis.group_diversity(layer)
        data['layers'][name] = {k: v for k, v in d.items() if k not in ('magnitude', 'group_of_bin')}
        pages.append((f"groups_{name.replace('.', '_')}.png", _draw_groups(name, d),
                      f'{name}: left, the share of each group kernel\'s energy per radial frequency (one line per '
                      'group: disjoint bands); middle, three groups\' spectra; right, the cosine similarity of the '
                      'group kernels (0 off the diagonal) beside random-init and dense+noise experts.'))
        if not isinstance(layer, FDLinear):
            pages.append((f"kernels_{name.replace('.', '_')}.png", _draw_group_kernels(name, layer),
                          f'{name}: the kernel of one channel pair (the strongest) split into three of its frequency '
                          'groups and whole, drawn as slices along its first axis for 3-D kernels: the groups add '
                          'up to the dense kernel, the low groups smooth, the high ones alternating.'))
    if image_paths or inputs is not None:
        if image_paths:
            images, pixels, names = load_images(image_paths, model)
        else:
            images, pixels, names = inputs, None, [f'input {i}' for i in range(len(inputs))]
        stats = analysis.image_statistics(model, every, images)
        distance = analysis.modulation_distance(stats)
        shown = {n: stats[n] for n in chosen}
        data['images'] = names
        data['per_image'] = {n: {k: v for k, v in s.items() if k != 'fbm_bands'} for n, s in shown.items()}
        pages.append(('attention.png', _draw_attention(shown),
                      'Distribution over the images of each attention (kernel per frequency group, channel, filter, '
                      'spatial): a spike at 1 is the identity a converted model starts at.'))
        pages.append(('kernels.png', _draw_kernels(shown, names),
                      'How different the per-image kernels are: their cosine similarity (1 = the same kernel for '
                      'every image) and a 2-D PCA of them, one point per image.'))
        fbm = next((n for n in [*chosen, *every] if 'fbm_bands' in stats[n]), None)
        if fbm is not None:
            drawn = _draw_fbm(fbm, stats[fbm], pixels) if pixels is not None else _draw_fbm_slices(
                fbm, stats[fbm], images)
            pages.append(('fbm.png', drawn,
                          f'{fbm}: FBM scale of each frequency band over each image, with its mean on edges (Sobel '
                          'magnitude above its 80th percentile) and on flat regions.'))
    else:  # the distance needs inputs: a fixed random batch stands in for images
        gen = torch.Generator().manual_seed(0)
        size = sample_shape or getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224))
        distance = analysis.modulation_distance(analysis.image_statistics(
            model, every, torch.randn((2, *size), generator=gen)))
    data['modulation_distance'] = distance
    pages.insert(0, ('summary.png', _draw_summary(data['parameters'], distance),
                     'Left, parameters per FDConv component against the dense model; right, per layer, how far the '
                     'modulation is from the identity (0 for a freshly converted model).'))
    if compare:
        data['compare_groups'] = compare
        pages.append(('compare_groups.png', _draw_compare(compare),
                      'Same dense weights with n frequency groups: the weights (FDW) keep the dense budget whatever '
                      'n is (only the KSM head that picks the groups grows), and the group kernels stay orthogonal.'))
    body = '\n'.join(f'<h3>{html.escape(f)}</h3><p>{html.escape(text)}</p><img src="{html.escape(f)}">'
                     for f, _, text in pages)
    from PIL import Image
    data['figures'] = {file: list(Image.open(io.BytesIO(png)).size) for file, png, _ in pages}  # (width, height)
    with atomic_dir(out_dir, replace=True) as tmp:
        for file, png, _ in pages:
            write_bytes(tmp / file, png)
        write_json(tmp / 'report.json', _plain(data))
        write_text(tmp / 'index.html', f'<!doctype html><meta charset="utf-8"><title>FDConv analysis</title>'
                                       f'<h1>FDConv analysis</h1>{body}\n')
    return Path(out_dir)


def summary_line(out: Path) -> str:
    data = json.loads((out / 'report.json').read_text())
    worst = max(data['modulation_distance'].values())
    return f"wrote {out}/index.html ({len(data['layers'])} layers in detail; largest modulation distance {worst:.3g})"
