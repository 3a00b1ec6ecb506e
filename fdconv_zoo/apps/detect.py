"""Object detection and instance segmentation: torchvision's Faster R-CNN and Mask R-CNN on a zoo backbone
(timm ``features_only``, strides 4-32) with torchvision's FeaturePyramidNetwork, trained in the paper's 1x
setting on the loop of fdconv_zoo.apps.training and evaluated with the COCO protocol (torchmetrics).
``scripts/detect.py`` is the entry point."""
from __future__ import annotations

import argparse
import io
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import timm
import torch
import torch.nn as nn

from .. import models as _models  # noqa: F401  registers the FDConv families
from ..atomic import atomic_dir, write_bytes, write_json
from ..cards import task_card
from ..hub import push_folder
from ..models import create_model, ensure_registered
from .data import open_split
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
    fit_warmup,
    loggable_config,
    make_accelerator,
    make_loader,
    parse_model_kwargs,
    plain_copy,
    run_length,
    run_main,
    select_trainable,
)

DETECTORS = ('faster_rcnn', 'mask_rcnn')
AP_KEYS = {'map': 'AP', 'map_50': 'AP50', 'map_75': 'AP75', 'map_small': 'APs', 'map_medium': 'APm',
           'map_large': 'APl'}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Train a detector on an FDConv backbone (run under `accelerate launch`).')
    add_common_arguments(p, model='resnet50_fdconv.a1_in1k', lr=0.02, weight_decay=1e-4, epochs=12, batch_size=2,
                         output_dir='runs/detect')
    # torchvision's convention: with backbone weights BatchNorm frozen and the stem and first stage frozen (the
    # paper's, mmdet's ResNet setting); from scratch everything trains and BatchNorm is live
    p.set_defaults(freeze_stages=None)
    p.add_argument('--frozen-bn', action=argparse.BooleanOptionalAction, default=None,
                   help='BatchNorm of the backbone frozen (default: with --pretrained)')
    p.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=None,
                   help='synchronized live BatchNorm (default: on with several GPU processes)')
    p.add_argument('--detector', default='faster_rcnn', help=f'one of {list(DETECTORS)}')
    p.add_argument('--train-ann', help='COCO-format annotation JSON of the training images')
    p.add_argument('--train-images', help='folder the training annotation file names refer to')
    p.add_argument('--val-ann')
    p.add_argument('--val-images')
    p.add_argument('--dataset', help="Hugging Face dataset (or save_to_disk folder) with an 'objects' column")
    p.add_argument('--dataset-config')
    p.add_argument('--train-split', default='train')
    p.add_argument('--val-split', default='validation')
    p.add_argument('--min-size', type=int, default=800, help="torchvision's resize: shorter side")
    p.add_argument('--max-size', type=int, default=1333, help="torchvision's resize: longer side at most")
    p.add_argument('--warmup-iters', type=int, default=500,
                   help='linear warmup (added to --warmup-epochs; at most a quarter of the run)')
    p.add_argument('--momentum', type=float, default=0.9)
    p.add_argument('--fpn-channels', type=int, default=256)
    p.add_argument('--rois-per-image', type=int, default=512, help='box head samples per image in training')
    p.add_argument('--num-visualized', type=int, default=4, help='validation images drawn in each PNG')
    p.add_argument('--score-threshold', type=float, default=0.5, help='detections drawn in the PNG')
    add_streaming_arguments(p)
    return p


# ------------------------------------------------------------------------------------------------------- data
def _polygon_or_rle(segmentation: Any, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as coco_mask
    if isinstance(segmentation, list):  # polygons
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get('counts'), list):  # uncompressed RLE
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return coco_mask.decode(rle)


def load_coco(ann_path: str, images_dir: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Records (image file, size, boxes x1y1x2y2, contiguous labels 1..K, crowd flags, segmentations) and class
    names from a COCO annotation file. Boxes are clipped to their image as COCO's tools do, and boxes with no
    area left are dropped; a reference to a missing image or category is an error naming it."""
    try:
        with open(ann_path) as f:
            coco = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"annotation file {ann_path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann_path} is not valid JSON: {e}") from None
    for key in ('images', 'annotations', 'categories'):
        if key not in coco:
            raise ValueError(f"{ann_path} has no '{key}' list (not a COCO annotation file)")
    categories = sorted(coco['categories'], key=lambda c: c['id'])
    label_of = {c['id']: i + 1 for i, c in enumerate(categories)}
    records: dict[Any, dict[str, Any]] = {}
    for image in coco['images']:
        path = Path(images_dir) / image['file_name']
        if not path.is_file():
            raise ValueError(f"{ann_path}: image {image['id']} file {path} not found")
        records[image['id']] = {'image': str(path), 'name': str(path), 'height': image['height'],
                                'width': image['width'], 'boxes': [], 'labels': [], 'crowd': [], 'segmentation': []}
    for ann in coco['annotations']:
        record = records.get(ann['image_id'])
        if record is None:
            raise ValueError(f"{ann_path}: annotation {ann.get('id')} refers to image {ann['image_id']}, which is "
                             f"not in 'images'")
        if ann['category_id'] not in label_of:
            raise ValueError(f"{ann_path}: annotation {ann.get('id')} has category {ann['category_id']}, not in "
                             f"'categories' {sorted(label_of)}")
        _add_object(record, ann['bbox'], label_of[ann['category_id']], bool(ann.get('iscrowd', 0)),
                    ann.get('segmentation'))
    return list(records.values()), [c['name'] for c in categories]


def _add_object(record: dict[str, Any], xywh, label: int, crowd: bool, segmentation) -> None:
    x, y, w, h = (float(v) for v in xywh)
    x1, y1 = min(max(x, 0.0), record['width']), min(max(y, 0.0), record['height'])
    x2, y2 = min(max(x + w, 0.0), record['width']), min(max(y + h, 0.0), record['height'])
    if x2 <= x1 or y2 <= y1:
        return  # no area inside the image: dropped, as torchvision's COCO reference does
    record['boxes'].append([x1, y1, x2, y2])
    record['labels'].append(label)
    record['crowd'].append(crowd)
    record['segmentation'].append(segmentation)


def _hf_category_names(ds) -> list[str] | None:
    """Class names from the ClassLabel of ``objects.category``, if it is one."""
    objects = ds.features['objects']
    category = objects.feature['category'] if hasattr(objects, 'feature') else objects['category']
    category = getattr(category, 'feature', category)
    return list(category.names) if isinstance(category, datasets.ClassLabel) else None


def hf_record(row: dict[str, Any], name: str, num_classes: int | None) -> dict[str, Any]:
    """The record of one row of a Hugging Face detection dataset (its image decoded now)."""
    image = row['image'].convert('RGB')
    record = {'image': image, 'name': name, 'width': image.width, 'height': image.height,
              'boxes': [], 'labels': [], 'crowd': [], 'segmentation': []}
    objects = row['objects']
    for j, (box, cat) in enumerate(zip(objects['bbox'], objects['category'], strict=True)):
        if num_classes is not None and not 0 <= cat < num_classes:
            raise ValueError(f"{name}: object {j} has category {cat}, not in [0, {num_classes})")
        crowd = bool(objects.get('iscrowd', [0] * len(objects['bbox']))[j])
        segmentation = objects['segmentation'][j] if 'segmentation' in objects else None
        _add_object(record, box, int(cat) + 1, crowd, segmentation)
    return record


class HFRecords(Sequence):
    """The records of a Hugging Face detection split, each made when it is asked for: nothing is decoded ahead,
    so memory does not grow with the dataset."""

    def __init__(self, ds, split: str, num_classes: int | None):
        self.ds, self.split, self.num_classes = ds, split, num_classes

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return hf_record(self.ds[index], f'{self.split} example {index}', self.num_classes)


def load_hf(args: argparse.Namespace, accelerator=None) -> tuple[Any, HFRecords, list[str]]:
    """Records from a Hugging Face detection dataset: an image column and ``objects`` with ``bbox`` (COCO
    x, y, w, h), ``category`` (0-based; names from its ClassLabel) and optional ``segmentation``/``iscrowd``.
    Rows are read when the loader asks for them; with --streaming the training split is this process's part of
    the stream (its rows made into records by the loader) and class names without a ClassLabel come from the
    validation split."""
    splits = []
    for split in (args.train_split, args.val_split):
        streamed = args.streaming and split == args.train_split
        ds = open_split(args.dataset, args.dataset_config, split, streaming=streamed, accelerator=accelerator)
        if 'objects' not in ds.features:
            raise ValueError(f"split {split!r} of {args.dataset} has no 'objects' column ({list(ds.features)})")
        splits.append(ds)
    names = _hf_category_names(splits[0])
    if names is None:  # the largest category id, read from the objects column alone (no image decoded)
        objects = splits[1 if args.streaming else 0].select_columns(['objects'])
        high = max((max(row['objects']['category'], default=-1) for row in objects), default=-1)
        names = [str(i) for i in range(high + 1)]
    val = HFRecords(splits[1], args.val_split, len(names))
    if args.streaming:
        return process_part(splits[0], accelerator, args), val, names
    return HFRecords(splits[0], args.train_split, len(names)), val, names


def example(record: dict[str, Any], masks: bool, flip: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(image in [0, 1], torchvision target) of a record; crowd objects are left out of the training targets
    (``iscrowd`` marks them for evaluation); a horizontal flip with probability 0.5 when ``flip``."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF
    image = record['image']
    image = Image.open(image).convert('RGB') if isinstance(image, str) else image
    if image.size != (record['width'], record['height']):
        raise ValueError(f"{record['name']}: image is {image.size[0]}x{image.size[1]}, annotation says "
                         f"{record['width']}x{record['height']}")
    pixels = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)
    n = len(record['boxes'])
    target = {'boxes': torch.tensor(record['boxes'], dtype=torch.float32).reshape(n, 4),
              'labels': torch.tensor(record['labels'], dtype=torch.int64),
              'iscrowd': torch.tensor(record['crowd'], dtype=torch.bool)}
    if masks:
        if any(s is None for s in record['segmentation']):
            raise ValueError(f"{record['name']}: --detector mask_rcnn needs a segmentation for every object")
        target['masks'] = torch.from_numpy(np.stack(
            [_polygon_or_rle(s, record['height'], record['width']) for s in record['segmentation']])
            if n else np.zeros((0, record['height'], record['width']), np.uint8))
    if flip and torch.rand(()) < 0.5:
        pixels = pixels.flip(-1)
        target['boxes'] = torch.stack([record['width'] - target['boxes'][:, 2], target['boxes'][:, 1],
                                       record['width'] - target['boxes'][:, 0], target['boxes'][:, 3]], 1)
        if masks:
            target['masks'] = target['masks'].flip(-1)
    return pixels, target


def _as_lists(rows):
    return [r[0] for r in rows], [r[1] for r in rows]


def _train_target(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keep = ~target['iscrowd']
    return {k: v[keep] for k, v in target.items() if k != 'iscrowd'}


# ---------------------------------------------------------------------------------------------------- model
class TimmFPN(nn.Module):
    """A timm model's stride 4-32 features (``features_only``) through torchvision's FeaturePyramidNetwork with
    a max-pooled extra level: the '0'..'3' and 'pool' maps torchvision's detectors expect."""

    def __init__(self, name: str, pretrained: bool, model_kwargs: dict[str, Any], channels: int):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        self.body = create_model(name, pretrained=pretrained, features_only=True, out_indices=(-4, -3, -2, -1),
                                 **model_kwargs)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def build_detector(config: dict[str, Any], pretrained: bool = False) -> nn.Module:
    """Faster or Mask R-CNN from a config (as saved beside the weights); BatchNorm in the backbone frozen when
    ``frozen_bn`` (configs from before the option had it always frozen)."""
    from timm.layers import freeze_batch_norm_2d
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    if config['detector'] not in DETECTORS:
        raise ValueError(f"unknown --detector {config['detector']!r}: one of {list(DETECTORS)}")
    ensure_registered(config['backbone'].split('.')[0])  # any timm architecture as <name>_fdconv
    if not timm.is_model(config['backbone'].split('.')[0]):
        raise ValueError(f"unknown backbone {config['backbone']!r}: not a timm or fdconv_zoo model")
    backbone = TimmFPN(config['backbone'], pretrained, config['model_kwargs'], config['fpn_channels'])
    if config.get('frozen_bn', True):
        backbone.body = freeze_batch_norm_2d(backbone.body)
    cls = MaskRCNN if config['detector'] == 'mask_rcnn' else FasterRCNN
    return cls(backbone, num_classes=len(config['label_names']) + 1, min_size=config['min_size'],
               max_size=config['max_size'], image_mean=config['mean'], image_std=config['std'],
               box_batch_size_per_image=config.get('rois_per_image', 512))


def load_detector(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """A saved detector (config.json + model.safetensors), in eval mode, and its config: one call, no network."""
    from ..hub import read_weights
    folder = Path(folder)
    config_path = folder / 'config.json'
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a detector folder (no config.json)")
    config = json.loads(config_path.read_text())
    model = build_detector(config)
    model.load_state_dict(read_weights(folder / 'model.safetensors'))
    return model.eval(), config


# --------------------------------------------------------------------------------------------------- evaluate
def _prediction(output: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pred = {k: output[k].detach().cpu() for k in ('boxes', 'scores', 'labels')}
    if 'masks' in output:
        pred['masks'] = output['masks'][:, 0].detach().cpu() > 0.5
    return pred


def _truth(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    truth = {k: target[k].cpu() for k in ('boxes', 'labels', 'iscrowd')}
    if 'masks' in target:
        truth['masks'] = target['masks'].cpu().bool()
    return truth


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, masks: bool, keep: int = 0):
    """COCO box AP (and mask AP) over the whole validation set, predictions gathered across processes without
    duplicates and scored on the main process; and the first ``keep`` (image, prediction) pairs there."""
    from accelerate.utils import broadcast_object_list
    from torchmetrics.detection import MeanAveragePrecision
    model.eval()
    pairs, shown = [], []
    for images, targets in loader:
        outputs = model(list(images))
        batch = [(_prediction(o), _truth(t)) for o, t in zip(outputs, targets, strict=True)]
        pairs += accelerator.gather_for_metrics(batch, use_gather_object=True)
        if len(shown) < keep:
            shown += [(images[i].cpu(), batch[i][0]) for i in range(min(keep - len(shown), len(images)))]
    model.train()
    result = [None]
    if accelerator.is_main_process:
        # the predictions are gathered already: no second synchronisation inside compute()
        metric = MeanAveragePrecision(iou_type=['bbox', 'segm'] if masks else 'bbox', backend='pycocotools',
                                      sync_on_compute=False)
        metric.update([p for p, _ in pairs], [t for _, t in pairs])
        values = metric.compute()
        result = [{'images': len(pairs)}]
        for prefix in (('bbox', 'box'), ('segm', 'mask')) if masks else (('', 'box'),):
            for key, name in AP_KEYS.items():
                value = values[f'{prefix[0]}_{key}' if masks else key].item()
                result[0][f'{prefix[1]}_{name}'] = 100 * value if value >= 0 else None  # -1: no such objects
    broadcast_object_list(result)
    return result[0], shown


def draw(shown, names: list[str], threshold: float) -> bytes:
    """PNG: validation images with the predicted boxes (and masks) above ``threshold``, labelled."""
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid
    tiles = []
    size = max(max(im.shape[-2:]) for im, _ in shown)
    for image, pred in shown:
        canvas = (image * 255).to(torch.uint8)
        keep = pred['scores'] >= threshold
        if 'masks' in pred and keep.any():
            canvas = draw_segmentation_masks(canvas, pred['masks'][keep], alpha=0.4)
        labels = [f"{names[i - 1]} {s:.2f}" for i, s in zip(pred['labels'][keep].tolist(),
                                                            pred['scores'][keep].tolist(), strict=True)]
        if keep.any():
            canvas = draw_bounding_boxes(canvas, pred['boxes'][keep], labels, colors='red', width=2)
        tile = torch.zeros(3, size, size, dtype=torch.uint8)
        tile[:, :canvas.shape[1], :canvas.shape[2]] = canvas
        tiles.append(tile)
    grid = make_grid(tiles, nrow=min(4, len(tiles)), padding=4)
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format='PNG')
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------ train
def train(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate.utils import DistributedDataParallelKwargs
    from timm.optim import create_optimizer_v2
    from timm.scheduler import MultiStepLRScheduler
    out = Path(args.output_dir)
    if args.detector not in DETECTORS:
        raise ValueError(f"unknown --detector {args.detector!r}: one of {list(DETECTORS)}")
    check_streaming_args(args)
    if args.streaming and not args.dataset:
        raise ValueError('--streaming needs --dataset (a Hugging Face dataset or save_to_disk folder)')
    # frozen stages and heads that see no positive box in a batch leave parameters without gradient
    accelerator = make_accelerator(args, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if args.train_ann:
        if not (args.train_images and args.val_ann and args.val_images):
            raise ValueError('--train-ann needs --train-images, --val-ann and --val-images')
        train_records, names = load_coco(args.train_ann, args.train_images)
        val_records, val_names = load_coco(args.val_ann, args.val_images)
        if val_names != names:
            raise ValueError(f"{args.val_ann} has categories {val_names}, {args.train_ann} has {names}")
    elif args.dataset:
        train_records, val_records, names = load_hf(args, accelerator)
    else:
        raise ValueError('give --train-ann/--train-images/--val-ann/--val-images or --dataset')
    if not timm.is_model(args.model.split('.')[0]):
        raise ValueError(f"unknown backbone {args.model!r}: not a timm or fdconv_zoo model")
    mean_std = timm.models.get_pretrained_cfg(args.model).to_dict()
    config = {'detector': args.detector, 'backbone': args.model, 'model_kwargs': parse_model_kwargs(args.model_kwargs),
              'fpn_channels': args.fpn_channels, 'rois_per_image': args.rois_per_image, 'label_names': names,
              'min_size': args.min_size, 'max_size': args.max_size,
              'frozen_bn': args.pretrained if args.frozen_bn is None else args.frozen_bn,
              'mean': list(mean_std.get('mean', (0.485, 0.456, 0.406))),
              'std': list(mean_std.get('std', (0.229, 0.224, 0.225)))}
    model = build_detector(config, pretrained=args.pretrained)
    if args.freeze_stages is None:
        args.freeze_stages = 1 if args.pretrained else 0
    select_trainable(model.backbone.body, args)
    sync_bn = args.sync_bn if args.sync_bn is not None else (accelerator.num_processes > 1
                                                              and accelerator.device.type == 'cuda')
    if sync_bn and not config['frozen_bn']:
        model.backbone.body = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone.body)
    masks = args.detector == 'mask_rcnn'
    if args.streaming:
        def train_example(row, index):
            return example(hf_record(row, f'{args.train_split} example {index}', len(names)), masks, flip=True)
    else:
        def train_example(record, index):
            return example(record, masks, flip=True)
    train_loader = train_loader_for(args, accelerator, train_records, train_example, _as_lists)
    val_loader = make_loader(SeededRows(val_records, lambda r, _: example(r, masks, flip=False), args.seed),
                             args.batch_size, False, args.workers, args.seed, _as_lists)
    total_batch = args.batch_size * accelerator.num_processes * args.grad_accum
    lr = args.lr * total_batch / 16  # --lr is for a total batch of 16 (linear scaling)
    optimizer = create_optimizer_v2(model, opt='momentum', lr=lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    model, optimizer, train_loader, val_loader, updates_per_epoch = prepare(accelerator, args, model, optimizer,
                                                                            train_loader, val_loader)
    total = run_length(args, updates_per_epoch)
    warmup = fit_warmup(accelerator, args.warmup_iters + int(args.warmup_epochs * updates_per_epoch), total,
                        '--warmup-iters/--warmup-epochs')
    scheduler = MultiStepLRScheduler(  # the 1x schedule: x0.1 at 8/12 and 11/12 of the run
        optimizer, decay_t=[round(total * 8 / 12), round(total * 11 / 12)], decay_rate=0.1, warmup_t=warmup,
        warmup_lr_init=lr * 1e-3, t_in_epochs=False)
    accelerator.register_for_checkpointing(scheduler)

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        images, targets = batch
        losses = model(list(images), [_train_target(t) for t in targets])
        return sum(losses.values())

    state = resume_run(accelerator, args, train_loader)
    if args.report_to:
        accelerator.init_trackers('detect', config=loggable_config(args))

    def evaluate_now() -> dict[str, Any]:
        metrics, shown = evaluate(model, val_loader, accelerator, masks,
                                  keep=args.num_visualized if accelerator.is_main_process else 0)
        metrics['step'] = state.step
        if accelerator.is_main_process:
            write_json(out / 'results.json', metrics)
            if shown:
                write_bytes(out / 'visualizations' / f'step_{state.step}.png',
                            draw(shown, names, args.score_threshold))
        return metrics

    final = run(accelerator, args, model, optimizer, scheduler, train_loader, loss_fn, evaluate_now, state,
                updates_per_epoch)
    results = {**final, 'steps': state.step, 'model': args.model, 'detector': args.detector, 'lr': lr,
               'num_classes': len(names), 'num_processes': accelerator.num_processes,
               'dataset': args.dataset if args.dataset and not os.path.exists(args.dataset) else 'custom',
               'train_loss': state.history}
    accelerator.wait_for_everyone()
    export = plain_copy(accelerator.unwrap_model(model), lambda: build_detector(config))
    if accelerator.is_main_process:
        origin = (f"fine-tuned with fdconv_zoo.apps.detect from {args.model}" if args.pretrained else
                  f"trained with fdconv_zoo.apps.detect from random initialisation ({args.model} backbone)")
        config['notes'] = origin
        _export(export, out / 'model', config, results)
        write_json(out / 'results.json', results)
        if args.push_to_hub:
            load_detector(out / 'model')  # refuse to publish what would not load
            push_folder(out / 'model', args.hub_repo_id or f"{args.model.split('.')[0]}-{args.detector}",
                        'Upload FDConv detector')
    accelerator.end_training()
    return results


def _export(model: nn.Module, folder: Path, config: dict[str, Any], results: dict[str, Any]) -> None:
    """model.safetensors and a config.json that rebuilds the detector (load_detector), with a model card."""
    from safetensors.torch import save_file
    config = {**config, 'results': {k: v for k, v in results.items() if k != 'train_loss'}}
    scores = {k: v for k, v in config['results'].items() if k.startswith(('box_', 'mask_'))}
    body = (f"# {folder.name}\n\n{config['detector']} on the `{config['backbone']}` backbone with an FPN "
            f"({len(config['label_names'])} classes), {config['notes']}.\n\n"
            "```python\nfrom fdconv_zoo.apps.detect import load_detector\n"
            f"model, config = load_detector('path/to/{folder.name}')\n```\n")
    with atomic_dir(folder, replace=True) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / 'model.safetensors'))
        write_json(tmp / 'config.json', config)
        write_bytes(tmp / 'README.md', task_card(folder.name, task='object-detection', library='torchvision',
                                                 metrics=scores, dataset=results['dataset'], body=body).encode())


def main(argv: list[str] | None = None) -> int:
    return run_main('detect', build_parser(), train, lambda r: f"box AP {r['box_AP']:.2f} AP50 "
                                                            f"{r['box_AP50']:.2f}", argv)
