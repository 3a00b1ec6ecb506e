"""Semantic segmentation with a zoo encoder (FDConv or dense) and a segmentation_models_pytorch decoder through
its timm-universal encoder (``tu-<name>``): UPerNet (the paper's setting), FPN or DeepLabV3+. The loop,
checkpoints, exact resume and logging are fdconv_zoo.apps.training's; ``scripts/segment.py`` is the entry point."""
from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import models as _models  # noqa: F401  registers the FDConv families
from ..atomic import atomic_dir, write_bytes, write_json
from ..cards import task_card
from ..hub import push_folder
from ..models import ensure_registered
from .data import open_dataset, open_split, pick_split
from .streaming import (
    add_streaming_arguments,
    check_streaming_args,
    prepare,
    process_part,
    resume_run,
    run,
    train_loader_for,
)
from .training import (
    SeededRows,
    add_common_arguments,
    loggable_config,
    make_accelerator,
    make_loader,
    make_scheduler,
    parse_model_kwargs,
    plain_copy,
    run_main,
    select_trainable,
)

DECODERS = {'upernet': 'UPerNet', 'fpn': 'FPN', 'deeplabv3plus': 'DeepLabV3Plus'}
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
META = 'segmentation.json'  # beside smp's config.json: what the decoder config does not hold


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Train a semantic segmentation model (run under `accelerate launch`).')
    add_common_arguments(p, model='convnext_tiny_fdconv.fb_in22k_ft_in1k', lr=1e-4, weight_decay=0.05, epochs=50,
                         batch_size=2, output_dir='runs/segment')
    p.add_argument('--decoder', default='upernet', help=f'one of {sorted(DECODERS)}')
    p.add_argument('--decoder-channels', type=int, default=None, help="default: smp's for the decoder")
    p.add_argument('--decoder-norm', default='batchnorm', choices=['batchnorm', 'instancenorm', 'identity'],
                   help='normalisation in the decoder (UPerNet, DeepLabV3+ use it)')
    p.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=None,
                   help='synchronized BatchNorm (default: on with several GPU processes, as in the paper)')
    p.add_argument('--dataset', help='Hugging Face dataset name, or a folder written by save_to_disk')
    p.add_argument('--dataset-config')
    p.add_argument('--train-split', default='train')
    p.add_argument('--val-split', default='validation')
    p.add_argument('--train-dir', help='folder with images/<stem>.<jpg|png> and masks/<stem>.png')
    p.add_argument('--val-dir', help='folder with images/<stem>.<jpg|png> and masks/<stem>.png')
    p.add_argument('--image-column')
    p.add_argument('--mask-column')
    p.add_argument('--reduce-labels', action='store_true',
                   help="mask value 0 is 'other' (ignored) and class c is stored as c+1 (ADE20K's convention)")
    p.add_argument('--num-classes', type=int, default=None, help='default: from --label-names, else the masks')
    p.add_argument('--label-names', help='text file, one class name per line')
    p.add_argument('--ignore-index', type=int, default=255)
    p.add_argument('--crop-size', type=int, nargs='+', default=[512, 512], help='training crop, H [W]')
    p.add_argument('--scale', type=int, nargs=2, default=None, metavar=('H', 'W'),
                   help='images are resized to fit this (times a random ratio) before cropping; default: the crop '
                        "height by 4x the crop width (mmseg's 512 x 2048 for a 512 crop)")
    p.add_argument('--ratio-range', type=float, nargs=2, default=[0.5, 2.0])
    p.add_argument('--eval-mode', choices=['whole', 'slide'], default='whole')
    p.add_argument('--stride', type=int, nargs='+', default=None, help='slide window stride (default 2/3 crop)')
    p.add_argument('--num-visualized', type=int, default=4, help='validation images drawn in each PNG')
    p.add_argument('--poly-power', type=float, default=1.0)
    add_streaming_arguments(p)
    return p


# ------------------------------------------------------------------------------------------------------- data
def folder_rows(folder: str) -> list[dict[str, str]]:
    """(image, mask) file pairs of DIR/images/<stem>.<jpg|png> and DIR/masks/<stem>.png."""
    root = Path(folder)
    images, masks = root / 'images', root / 'masks'
    if not images.is_dir() or not masks.is_dir():
        raise ValueError(f"{folder} must hold images/ and masks/ folders")
    rows = []
    for path in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        mask = masks / f'{path.stem}.png'
        if not mask.is_file():
            raise ValueError(f"image {path} has no mask {mask}")
        rows.append({'image': str(path), 'mask': str(mask), 'name': str(path)})
    if not rows:
        raise ValueError(f"no images in {images}")
    return rows


def _hf_rows(ds, image_column: str | None, mask_column: str | None, split: str):
    from datasets import Image
    images = [k for k, f in ds.features.items() if isinstance(f, Image)]
    image = image_column or next((k for k in images if k in ('image', 'pixel_values', 'img')), None) or \
        (images[0] if images else None)
    mask = mask_column or next((k for k in images if k != image), None)
    for name, column in (('image', image), ('mask', mask)):
        if column is None or column not in ds.features:
            raise ValueError(f"split {split!r} has no {name} column among {list(ds.features)} "
                             f"(set --{name}-column)")
    renames = {k: v for k, v in ((image, 'image'), (mask, 'mask')) if k != v}
    ds = ds.select_columns([image, mask])
    return ds.rename_columns(renames) if renames else ds


def load_splits(args: argparse.Namespace, accelerator=None):
    """(train rows, validation rows): lists of file pairs or HF datasets with 'image' and 'mask' columns; with
    --streaming the training rows are this process's part of the streamed split."""
    if args.streaming:
        if not args.dataset:
            raise ValueError('--streaming needs --dataset (a Hugging Face dataset or save_to_disk folder)')
        train = open_split(args.dataset, args.dataset_config, args.train_split, streaming=True,
                           accelerator=accelerator)
        val = open_split(args.dataset, args.dataset_config, args.val_split)
        return (process_part(_hf_rows(train, args.image_column, args.mask_column, args.train_split), accelerator,
                             args), _hf_rows(val, args.image_column, args.mask_column, args.val_split))
    if args.train_dir:
        if not args.val_dir:
            raise ValueError('--train-dir needs --val-dir')
        return folder_rows(args.train_dir), folder_rows(args.val_dir)
    if not args.dataset:
        raise ValueError('give --dataset or --train-dir/--val-dir')
    loaded = open_dataset(args.dataset, args.dataset_config)
    for split in (args.train_split, args.val_split):
        pick_split(loaded, split, args.dataset)
    return tuple(_hf_rows(loaded[s], args.image_column, args.mask_column, s)
                 for s in (args.train_split, args.val_split))


def read_example(row: dict[str, Any], name: str, num_classes: int | None, ignore: int, reduce_labels: bool):
    """(RGB PIL image, int64 mask tensor) of a row, the mask checked against the image and the classes; errors
    name the image file (folders) or ``name``."""
    from PIL import Image
    image, mask = row['image'], row['mask']
    name = row.get('name', name)
    image = (Image.open(image) if isinstance(image, str) else image).convert('RGB')
    mask = Image.open(mask) if isinstance(mask, str) else mask
    if mask.size != image.size:
        raise ValueError(f"{name}: mask is {mask.size[0]}x{mask.size[1]}, image {image.size[0]}x{image.size[1]}")
    labels = torch.from_numpy(np.array(mask, dtype=np.int64))
    if labels.ndim != 2:
        raise ValueError(f"{name}: mask must have one channel of class ids, has shape {tuple(labels.shape)}")
    if reduce_labels:
        labels = torch.where(labels == 0, ignore, labels - 1)
    if num_classes is not None:
        bad = (labels >= num_classes) & (labels != ignore) | (labels < 0)
        if bad.any():
            raise ValueError(f"{name}: label {int(labels[bad][0])} is not a class id in [0, {num_classes}) nor "
                             f"the ignore index {ignore}")
    return image, labels


def class_names(args: argparse.Namespace, train_rows) -> list[str]:
    """From --label-names, else --num-classes, else the largest id in the training masks (the validation masks
    of a streamed run)."""
    if args.label_names:
        names = [line.strip() for line in Path(args.label_names).read_text().splitlines() if line.strip()]
        if args.num_classes is not None and args.num_classes != len(names):
            raise ValueError(f"--label-names {args.label_names} has {len(names)} names, --num-classes is "
                             f"{args.num_classes}")
        return names
    count = args.num_classes
    if count is None:
        high = -1
        for i in range(len(train_rows)):
            _, labels = read_example(train_rows[i], f'training example {i}', None, args.ignore_index,
                                     args.reduce_labels)
            valid = labels[labels != args.ignore_index]
            high = max(high, int(valid.max()) if valid.numel() else -1)
        count = high + 1
    if count < 1:
        raise ValueError('no class ids found in the training masks (set --num-classes)')
    return [str(i) for i in range(count)]


def transforms(args: argparse.Namespace, mean, std):
    """Joint image + mask augmentation from torchvision.transforms.v2 (mmseg's ADE20K pipeline: resize by a
    random ratio, crop with the mask padded by the ignore index, flip, photometric distortion) and the
    evaluation transform (normalisation only: evaluation is at full resolution)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    crop = _hw(args.crop_size)
    train = v2.Compose([
        v2.ScaleJitter(target_size=tuple(resize_scale(args)), scale_range=tuple(args.ratio_range), antialias=True),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: args.ignore_index}),
        v2.RandomHorizontalFlip(),
        v2.RandomPhotometricDistort(),
        v2.ToDtype({tv_tensors.Image: torch.float32, 'others': None}, scale=True),
        v2.Normalize(mean, std),
    ])
    evaluation = v2.Compose([v2.ToDtype({tv_tensors.Image: torch.float32, 'others': None}, scale=True),
                             v2.Normalize(mean, std)])

    def apply(transform, image, labels):
        image, mask = transform(tv_tensors.Image(v2.functional.pil_to_tensor(image)), tv_tensors.Mask(labels))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
    return (lambda image, labels: apply(train, image, labels)), (lambda image, labels: apply(evaluation, image,
                                                                                            labels))


def resize_scale(args: argparse.Namespace) -> list[int]:
    """--scale, else the crop's height by 4x its width: mmseg's ADE20K (2048, 512) for a 512 crop, and for any
    crop the images are resized around the size they are cropped (and evaluated) at."""
    if args.scale:
        return list(args.scale)
    h, w = _hw(args.crop_size)
    return [h, 4 * w]


def _hw(values: list[int]) -> list[int]:
    """[H, W] from one or two command-line integers."""
    if len(values) not in (1, 2):
        raise ValueError(f"give one or two sizes (H [W]), got {values}")
    return [values[0], values[-1]]


def _stack(rows):
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


# ---------------------------------------------------------------------------------------------------- model
def build_segmenter(encoder: str, decoder: str, num_classes: int, pretrained: bool, model_kwargs: dict[str, Any],
                    decoder_channels: int | None = None, decoder_norm: str = 'batchnorm') -> nn.Module:
    """smp decoder on the timm-universal encoder ``tu-<encoder>``; a pretrained tag loads (and converts) through
    timm, so dense ImageNet weights become exact FDConv weights at step 0."""
    import segmentation_models_pytorch as smp
    if decoder not in DECODERS:
        raise ValueError(f"unknown --decoder {decoder!r}: one of {sorted(DECODERS)}")
    ensure_registered(encoder.split('.')[0])  # any timm architecture as <name>_fdconv
    if not timm.is_model(encoder.split('.')[0]):
        raise ValueError(f"unknown encoder {encoder!r}: not a timm or fdconv_zoo model "
                         f"(e.g. {timm.list_models('*_fdconv')[:3]})")
    cls = getattr(smp, DECODERS[decoder])
    accepted = inspect.signature(cls).parameters
    extra: dict[str, Any] = {}
    if decoder_channels is not None:
        extra['decoder_pyramid_channels' if decoder == 'fpn' else 'decoder_channels'] = decoder_channels
    if 'decoder_use_norm' in accepted:
        extra['decoder_use_norm'] = decoder_norm
    return cls(encoder_name=f'tu-{encoder}', encoder_weights='imagenet' if pretrained else None,
               classes=num_classes, **extra, **model_kwargs)


def load_segmenter(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """A saved segmentation model (smp's save_pretrained folder) and what it was trained with (class names,
    ignore index, normalisation, evaluation mode): one call, no network."""
    import segmentation_models_pytorch as smp
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file():
        raise ValueError(f"{folder} is not a segmentation model folder (no {META})")
    ensure_registered(json.loads(meta_path.read_text()).get('encoder', '').split('.')[0])
    model = smp.from_pretrained(str(folder))
    return model.eval(), json.loads(meta_path.read_text())


# --------------------------------------------------------------------------------------------------- evaluate
def _padded(image: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = image.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(image, (0, pw, 0, ph)), (h, w)


def predict_logits(model: nn.Module, image: torch.Tensor, mode: str, crop: list[int], stride: list[int],
                   multiple: int = 32) -> torch.Tensor:
    """Logits (B, C, H, W) at the image's own resolution: the whole (padded) image at once, or overlapping
    crop-sized windows averaged (``slide``), as mmseg evaluates."""
    if mode == 'whole':
        padded, (h, w) = _padded(image, multiple)
        return model(padded)[..., :h, :w]
    h, w = image.shape[-2:]
    ch, cw = min(crop[0], h), min(crop[1], w)
    rows = range(0, max(h - ch, 0) + 1, stride[0])
    cols = range(0, max(w - cw, 0) + 1, stride[1])
    tops = sorted({*rows, h - ch})
    lefts = sorted({*cols, w - cw})
    total = count = None
    for top in tops:
        for left in lefts:
            window, _ = _padded(image[..., top:top + ch, left:left + cw], multiple)
            logits = model(window)[..., :ch, :cw]
            if total is None:
                total = image.new_zeros(image.shape[0], logits.shape[1], h, w)
                count = image.new_zeros(1, 1, h, w)
            total[..., top:top + ch, left:left + cw] += logits
            count[..., top:top + ch, left:left + cw] += 1
    return total / count


def scores(confusion: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """mIoU, mean class accuracy and pixel accuracy from a confusion matrix (rows: truth); classes absent from
    both truth and prediction do not count, as in mmseg."""
    confusion = confusion.double()
    tp = confusion.diag()
    truth, predicted = confusion.sum(1), confusion.sum(0)
    union = truth + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.nan)
    acc = torch.where(truth > 0, tp / truth.clamp_min(1), torch.nan)
    return {'mIoU': 100 * iou.nanmean().item(), 'mAcc': 100 * acc.nanmean().item(),
            'aAcc': 100 * (tp.sum() / confusion.sum().clamp_min(1)).item(),
            'per_class_iou': {n: (None if math.isnan(v) else 100 * v) for n, v in zip(names, iou.tolist(),
                                                                                      strict=True)},
            'pixels': int(confusion.sum().item())}


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, names: list[str], args: argparse.Namespace,
             keep: int = 0) -> tuple[dict[str, Any], list[tuple[torch.Tensor, ...]]]:
    """Scores over the whole validation set, per-image confusion matrices gathered across processes without
    duplicates; and the first ``keep`` (image, truth, prediction) triples of the main process."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix
    model.eval()
    crop = _hw(args.crop_size)
    stride = _hw(args.stride) if args.stride else [max(1, 2 * c // 3) for c in crop]
    n = len(names)
    confusion = torch.zeros(n, n, dtype=torch.long, device=accelerator.device)
    shown: list[tuple[torch.Tensor, ...]] = []
    for image, truth in loader:
        with accelerator.autocast():
            logits = predict_logits(model, image, args.eval_mode, crop, stride)
        pred = logits.float().argmax(1)
        per_image = torch.stack([multiclass_confusion_matrix(p, t, n, ignore_index=args.ignore_index)
                                 for p, t in zip(pred, truth, strict=True)])
        confusion += accelerator.gather_for_metrics(per_image).sum(0)
        if len(shown) < keep:
            shown.append((image[0].cpu(), truth[0].cpu(), pred[0].cpu()))
    model.train()
    return scores(confusion.cpu(), names), shown


def draw(shown: list[tuple[torch.Tensor, ...]], mean, std, num_classes: int, ignore: int) -> bytes:
    """PNG: a row per validation image, the image, its ground truth and the prediction side by side."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    palette = plt.get_cmap('tab20' if num_classes <= 20 else 'gist_ncar', max(num_classes, 2))
    fig, axes = plt.subplots(len(shown), 3, figsize=(9, 3 * len(shown)), squeeze=False)
    for row, (image, truth, pred) in zip(axes, shown, strict=True):
        rgb = (image * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
        panels = [rgb.permute(1, 2, 0).numpy()]
        for labels in (truth, pred):
            colours = palette(labels.clamp(0, num_classes - 1).numpy() / max(num_classes - 1, 1))[..., :3]
            colours[labels.numpy() == ignore] = 0
            panels.append(colours)
        for ax, panel, title in zip(row, panels, ('image', 'ground truth', 'prediction'), strict=True):
            ax.imshow(panel)
            ax.set_title(title)
            ax.axis('off')
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=80)
    plt.close(fig)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------ train
def train(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output_dir)
    if args.decoder not in DECODERS:
        raise ValueError(f"unknown --decoder {args.decoder!r}: one of {sorted(DECODERS)}")
    if any(c % 32 for c in _hw(args.crop_size)):
        raise ValueError(f"--crop-size {args.crop_size}: the decoders need multiples of 32")
    check_streaming_args(args)
    accelerator = make_accelerator(args)
    train_rows, val_rows = load_splits(args, accelerator)
    names = class_names(args, val_rows if args.streaming else train_rows)
    model = build_segmenter(args.model, args.decoder, len(names), args.pretrained,
                            parse_model_kwargs(args.model_kwargs), args.decoder_channels, args.decoder_norm)
    select_trainable(model.encoder, args)
    sync_bn = args.sync_bn if args.sync_bn is not None else (accelerator.num_processes > 1
                                                              and accelerator.device.type == 'cuda')
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    cfg = model.encoder.model.pretrained_cfg
    mean, std = list(cfg.get('mean', (0.485, 0.456, 0.406))), list(cfg.get('std', (0.229, 0.224, 0.225)))
    train_tf, eval_tf = transforms(args, mean, std)
    ignore, reduce = args.ignore_index, args.reduce_labels

    def train_example(row, index):
        return train_tf(*read_example(row, f'training example {index}', len(names), ignore, reduce))

    def eval_example(row, index):
        return eval_tf(*read_example(row, f'validation example {index}', len(names), ignore, reduce))
    train_loader = train_loader_for(args, accelerator, train_rows, train_example, _stack)
    val_loader = make_loader(SeededRows(val_rows, eval_example, args.seed), 1, False, args.workers, args.seed,
                             _stack)

    from timm.optim import create_optimizer_v2
    optimizer = create_optimizer_v2(model, opt='adamw', lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_loader, val_loader, updates_per_epoch = prepare(accelerator, args, model, optimizer,
                                                                            train_loader, val_loader)
    scheduler = make_scheduler(accelerator, optimizer, args, updates_per_epoch, sched='poly',
                               decay_rate=args.poly_power, warmup_lr=args.lr * 1e-3 if args.warmup_epochs else 0)
    criterion = nn.CrossEntropyLoss(ignore_index=ignore)

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        images, masks = batch
        return criterion(model(images).float(), masks)

    state = resume_run(accelerator, args, train_loader)
    if args.report_to:
        accelerator.init_trackers('segment', config=loggable_config(args))

    def evaluate_now() -> dict[str, Any]:
        metrics, shown = evaluate(model, val_loader, accelerator, names, args,
                                  keep=args.num_visualized if accelerator.is_main_process else 0)
        metrics['step'] = state.step
        if accelerator.is_main_process:
            write_json(out / 'results.json', metrics)
            if shown:
                write_bytes(out / 'visualizations' / f'step_{state.step}.png',
                            draw(shown, mean, std, len(names), ignore))
        return metrics

    final = run(accelerator, args, model, optimizer, scheduler, train_loader, loss_fn, evaluate_now, state,
                updates_per_epoch)
    results = {**final, 'steps': state.step, 'model': args.model, 'decoder': args.decoder,
               'num_classes': len(names), 'num_processes': accelerator.num_processes,
               'dataset': args.dataset if args.dataset and not os.path.exists(args.dataset) else 'custom',
               'train_loss': state.history}
    accelerator.wait_for_everyone()
    export = plain_copy(accelerator.unwrap_model(model), lambda: build_segmenter(
        args.model, args.decoder, len(names), False, parse_model_kwargs(args.model_kwargs), args.decoder_channels,
        args.decoder_norm))
    if accelerator.is_main_process:
        _export(export, out / 'model', names, mean, std, results, args)
        write_json(out / 'results.json', results)
        if args.push_to_hub:
            push_segmenter(out / 'model', args.hub_repo_id or f"{args.model.split('.')[0]}-{args.decoder}")
    accelerator.end_training()
    return results


def _export(model: nn.Module, folder: Path, names: list[str], mean, std, results: dict[str, Any],
            args: argparse.Namespace) -> None:
    """smp's save_pretrained (config.json that rebuilds the model, model.safetensors) and segmentation.json
    (classes, ignore index, normalisation, evaluation, provenance), written atomically."""
    origin = (f"fine-tuned with fdconv_zoo.apps.segment from {args.model}" if args.pretrained else
              f"trained with fdconv_zoo.apps.segment from random initialisation ({args.model} encoder)")
    meta = {'label_names': names, 'ignore_index': args.ignore_index, 'reduce_labels': args.reduce_labels,
            'mean': mean, 'std': std, 'encoder': args.model, 'decoder': args.decoder,
            'model_kwargs': parse_model_kwargs(args.model_kwargs), 'eval_mode': args.eval_mode,
            'crop_size': args.crop_size, 'notes': origin,
            'results': {k: v for k, v in results.items() if k != 'train_loss'}}
    with atomic_dir(folder, replace=True) as tmp:
        model.save_pretrained(str(tmp))
        config = json.loads((tmp / 'config.json').read_text())
        config['encoder_weights'] = None  # rebuilding must not download what the safetensors already hold
        config.update(meta['model_kwargs'])
        write_json(tmp / 'config.json', config)
        write_json(tmp / META, meta)
        (tmp / 'README.md').unlink(missing_ok=True)
        write_bytes(tmp / 'README.md', segmentation_card(meta, folder.name).encode())


def segmentation_card(meta: dict[str, Any], repo_id: str) -> str:
    """Model card with the mIoU in the Hub's model-index metadata and a loading snippet."""
    results = meta.get('results', {})
    body = (f"# {repo_id}\n\n{DECODERS[meta['decoder']]} on the `{meta['encoder']}` encoder "
            f"({len(meta['label_names'])} classes), {meta['notes']}.\n\n"
            "```python\nfrom fdconv_zoo.apps.segment import load_segmenter\n"
            f"model, meta = load_segmenter('path/to/{repo_id}')\n```\n")
    return task_card(repo_id, task='image-segmentation', library='segmentation-models-pytorch',
                     metrics={k: results.get(k) for k in ('mIoU', 'mAcc', 'aAcc')},
                     dataset=results.get('dataset', 'custom'), body=body)


def push_segmenter(folder: Path, repo_id: str) -> str:
    load_segmenter(folder)  # refuse to publish what would not load
    return push_folder(folder, repo_id, 'Upload FDConv segmentation model')


def main(argv: list[str] | None = None) -> int:
    return run_main('segment', build_parser(), train, lambda r: f"mIoU {r['mIoU']:.2f} mAcc {r['mAcc']:.2f} "
                                                             f"aAcc {r['aAcc']:.2f}", argv)
