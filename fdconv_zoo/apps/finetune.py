"""Fine-tune or retrain FDConv models with accelerate (one CPU, several GPUs or machines; DDP or FSDP from an
accelerate config), built from timm's own parts: data config and transforms, optimizer and scheduler
factories, Mixup/CutMix, label smoothing, ModelEmaV3. ``scripts/finetune.py`` is the command-line entry."""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from .. import models as _models  # noqa: F401  registers the FDConv families
from ..atomic import atomic_dir, write_json
from ..hub import write_hf_files
from ..models import create_model
from ..models._fdconv import describe_origin
from .data import is_folder, load_folder, open_dataset, open_split, pick_split, validation_split
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

_logger = logging.getLogger('fdconv_zoo.apps.finetune')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Fine-tune an FDConv model (run under `accelerate launch`).')
    add_common_arguments(p, model='resnet50_fdconv.a1_in1k', lr=1e-3, weight_decay=0.05, epochs=10, batch_size=32,
                         output_dir='runs/finetune')
    p.add_argument('--dataset', help='Hugging Face dataset name, or a folder written by save_to_disk')
    p.add_argument('--dataset-config', help='dataset configuration name')
    p.add_argument('--train-split', default='train')
    p.add_argument('--val-split', default=None, help='default: validation, else test, else a stratified split')
    p.add_argument('--val-fraction', type=float, default=0.1, help='share of train held out when no val split')
    p.add_argument('--train-dir', help='image folder with one sub-folder per class')
    p.add_argument('--val-dir', help='image folder with one sub-folder per class')
    p.add_argument('--image-column')
    p.add_argument('--label-column')
    p.add_argument('--img-size', type=int, default=None, help='default: the model cfg')
    p.add_argument('--no-augment', action='store_true', help='train with the eval transform')
    p.add_argument('--no-shuffle', action='store_true', help='keep the training order fixed')
    p.add_argument('--opt', default='adamw')
    p.add_argument('--momentum', type=float, default=0.9)
    p.add_argument('--sched', default='cosine')
    p.add_argument('--layer-decay', type=float, default=None)
    p.add_argument('--mixup', type=float, default=0.0)
    p.add_argument('--cutmix', type=float, default=0.0)
    p.add_argument('--smoothing', type=float, default=0.0)
    p.add_argument('--model-ema', action='store_true')
    p.add_argument('--model-ema-decay', type=float, default=0.9998)
    add_streaming_arguments(p)
    return p


# ----------------------------------------------------------------------------------------------------- data
def _detect_columns(ds, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    from datasets import ClassLabel, Image
    features = ds.features
    image = image_column or next((k for k, f in features.items() if isinstance(f, Image)), None)
    label = label_column or next((k for k, f in features.items() if isinstance(f, ClassLabel)), None)
    if label is None and 'label' in features:
        label = 'label'
    if image is None or image not in features:
        raise ValueError(f"no image column among {list(features)} (set --image-column)")
    if label is None or label not in features:
        raise ValueError(f"no label column among {list(features)} (set --label-column)")
    return image, label


def _label_names(ds, label: str) -> list[str]:
    from datasets import ClassLabel
    feature = ds.features[label]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(v) for v in sorted(set(ds[label]))]


def load_stream_splits(args: argparse.Namespace, accelerator):
    """--streaming: (train stream of this process, validation dataset, image column, label column, class names);
    the training split is never downloaded whole nor decoded ahead."""
    import datasets
    if args.train_dir:
        if not (os.path.isdir(args.train_dir) and args.val_dir and os.path.isdir(args.val_dir)):
            raise ValueError('--streaming with --train-dir needs --train-dir and --val-dir folders')
        train = datasets.load_dataset('imagefolder', data_dir=args.train_dir, split='train', streaming=True)
        val = datasets.load_dataset('imagefolder', data_dir=args.val_dir, split='train')
    elif args.dataset:
        if is_folder(args.dataset):  # --streaming needs a validation split there
            val_split = validation_split(load_folder(args.dataset), args.val_split) or 'validation'
        else:
            val_split = args.val_split or 'validation'
        train = open_split(args.dataset, args.dataset_config, args.train_split, streaming=True,
                           accelerator=accelerator)
        val = open_split(args.dataset, args.dataset_config, val_split)
    else:
        raise ValueError('give --dataset or --train-dir')
    image, label = _detect_columns(val, args.image_column, args.label_column)
    return process_part(train, accelerator, args), val, image, label, _label_names(val, label)


def load_splits(args: argparse.Namespace):
    """(train, validation, image column, label column, class names) from an HF dataset, a save_to_disk
    folder or image folders; without a validation split, a stratified split seeded the same everywhere."""
    import datasets
    if args.train_dir:
        if not os.path.isdir(args.train_dir):
            raise ValueError(f"--train-dir {args.train_dir} is not a folder")
        train = datasets.load_dataset('imagefolder', data_dir=args.train_dir, split='train')
        val = None
        if args.val_dir:
            if not os.path.isdir(args.val_dir):
                raise ValueError(f"--val-dir {args.val_dir} is not a folder")
            val = datasets.load_dataset('imagefolder', data_dir=args.val_dir, split='train')
        splits = None
    elif args.dataset:
        splits = open_dataset(args.dataset, args.dataset_config)
        train = pick_split(splits, args.train_split, args.dataset)
        val_split = validation_split(splits, args.val_split)
        val = splits[val_split] if val_split else None
    else:
        raise ValueError('give --dataset or --train-dir')
    image, label = _detect_columns(train, args.image_column, args.label_column)
    if val is None:
        if not isinstance(train.features[label], datasets.ClassLabel):
            train = train.class_encode_column(label)
        parts = train.train_test_split(test_size=args.val_fraction, seed=args.seed, stratify_by_column=label)
        train, val = parts['train'], parts['test']
    return train, val, image, label, _label_names(train, label)


def image_example(image: str, label: str, transform) -> Callable[[Any, int], tuple[torch.Tensor, int]]:
    """(image tensor, label) of a row."""
    return lambda row, _: (transform(row[image].convert('RGB')), row[label])


def image_rows(ds, image: str, label: str, transform, seed: int) -> SeededRows:
    """(image tensor, label) rows, each image's augmentation drawn from its own seeded generator."""
    return SeededRows(ds, image_example(image, label, transform), seed)


def _collate(rows):
    return torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


# ---------------------------------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    model = create_model(args.model, pretrained=args.pretrained, num_classes=num_classes,
                         **parse_model_kwargs(args.model_kwargs))
    head = {id(p) for p in model.get_classifier().parameters()}
    select_trainable(nn.ModuleDict({name: m for name, m in model.named_children()
                                    if not any(id(p) in head for p in m.parameters())}), args)
    return model


# --------------------------------------------------------------------------------------------- train / eval
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator) -> dict[str, float]:
    """Top-1, top-5 and loss over the whole validation set, gathered across processes without duplicates."""
    model.eval()
    correct1 = correct5 = loss_sum = 0.0
    count = 0
    for images, labels in loader:
        with accelerator.autocast():
            logits = model(images)
        logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction='sum').item()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(-1).sum().item()
        count += labels.numel()
    model.train()
    return {'top1': 100.0 * correct1 / count, 'top5': 100.0 * correct5 / count, 'loss': loss_sum / count,
            'samples': count}


def train(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output_dir)
    check_streaming_args(args)
    accelerator = make_accelerator(args)
    train_ds, val_ds, image, label, names = (load_stream_splits(args, accelerator) if args.streaming else
                                             load_splits(args))
    model = build_model(args, len(names))
    data_config = resolve_data_config(
        {'input_size': (3, args.img_size, args.img_size)} if args.img_size else {}, model=model)
    eval_tf = create_transform(**data_config, is_training=False)
    train_tf = eval_tf if args.no_augment else create_transform(**data_config, is_training=True)
    train_loader = train_loader_for(args, accelerator, train_ds, image_example(image, label, train_tf), _collate,
                                    shuffle=not args.no_shuffle)
    val_loader = make_loader(image_rows(val_ds, image, label, eval_tf, args.seed), args.batch_size, False,
                             args.workers, args.seed, _collate)

    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay)
    model, optimizer, train_loader, val_loader, updates_per_epoch = prepare(accelerator, args, model, optimizer,
                                                                            train_loader, val_loader)
    scheduler = make_scheduler(accelerator, optimizer, args, updates_per_epoch, sched=args.sched)
    ema = None
    if args.model_ema:
        ema = ModelEmaV3(accelerator.unwrap_model(model), decay=args.model_ema_decay)
        accelerator.register_for_checkpointing(ema)

    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=len(names))
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        if mixup is not None:
            images, labels = mixup(images, labels)
        return criterion(model(images), labels)

    def evaluate_now() -> dict[str, float]:
        return evaluate(ema.module if ema is not None else model, val_loader, accelerator)

    state = resume_run(accelerator, args, train_loader)
    if args.report_to:
        accelerator.init_trackers('finetune', config=loggable_config(args))
    final = run(accelerator, args, model, optimizer, scheduler, train_loader, loss_fn, evaluate_now, state,
                updates_per_epoch, ema)
    results = {**final, 'steps': state.step, 'model': args.model, 'num_classes': len(names),
               'num_processes': accelerator.num_processes, 'data_source': args.dataset or args.train_dir,
               # a Hub dataset id goes into the model card's metadata; local data is 'custom'
               'dataset': args.dataset if args.dataset and not os.path.exists(args.dataset) else 'custom',
               'split': 'validation', 'train_loss': state.history}
    accelerator.wait_for_everyone()
    export = plain_copy(ema.module if ema is not None else accelerator.unwrap_model(model),
                       lambda: create_model(args.model, num_classes=len(names),
                                            **parse_model_kwargs(args.model_kwargs)))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _export(export, out / 'model', names, data_config, results, args)
        write_json(out / 'results.json', results)
        if args.push_to_hub:
            from ..hub import push
            push(out / 'model', args.hub_repo_id or f"{args.model.split('.')[0]}-finetuned")
    accelerator.end_training()
    return results


def _export(model: nn.Module, folder: Path, names: list[str], data_config: dict, results: dict,
            args: argparse.Namespace) -> None:
    """save_for_hf (model.safetensors + config.json with label names, the data config used and where the
    weights came from), atomically."""
    if args.pretrained:
        describe_origin(model, f"fine-tuned with fdconv_zoo.apps.finetune from {args.model}")
    else:
        describe_origin(model, f"trained with fdconv_zoo.apps.finetune from random initialisation ({args.model} "
                               f"architecture, no pretrained weights)", derived=False)
    with atomic_dir(folder, replace=True) as tmp:
        write_hf_files(model, tmp, model_config={'label_names': names}, data_config=data_config)
        write_json(tmp / 'results.json', {k: v for k, v in results.items() if k != 'train_loss'})


def main(argv: list[str] | None = None) -> int:
    return run_main('finetune', build_parser(), train, lambda r: f"top1 {r['top1']:.2f} top5 {r['top5']:.2f} "
                                                              f"loss {r['loss']:.4f}", argv)
