"""Fine-tune or retrain FDConv models with accelerate (one CPU, several GPUs or machines; DDP or FSDP from an
accelerate config), built from timm's own parts: data config and transforms, optimizer and scheduler
factories, Mixup/CutMix, label smoothing, ModelEmaV3. ``scripts/finetune.py`` is the command-line entry."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from . import models as _models  # noqa: F401  registers the FDConv families
from .atomic import atomic_dir, write_json
from .hub import EXPECTED_ERRORS, describe_origin, one_line
from .layers import FDConv2d, FDLinear

_logger = logging.getLogger('fdconv_zoo.finetune')
CHECKPOINT_RE = re.compile(r'^step_(\d+)$')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Fine-tune an FDConv model (run under `accelerate launch`).')
    p.add_argument('--model', default='resnet50_fdconv.a1_in1k', help='registered name or tag')
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra model constructor arguments, values as JSON (e.g. num_freq_groups=32 '
                        'channels=[32,64,128,256])')
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
    p.add_argument('--batch-size', type=int, default=32, help='per device')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--max-steps', type=int, default=None, help='stop after this many optimizer updates')
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--opt', default='adamw')
    p.add_argument('--momentum', type=float, default=0.9)
    p.add_argument('--sched', default='cosine')
    p.add_argument('--warmup-epochs', type=float, default=0.0)
    p.add_argument('--min-lr', type=float, default=0.0)
    p.add_argument('--layer-decay', type=float, default=None)
    p.add_argument('--grad-accum', type=int, default=1)
    p.add_argument('--clip-grad', type=float, default=None)
    p.add_argument('--mixup', type=float, default=0.0)
    p.add_argument('--cutmix', type=float, default=0.0)
    p.add_argument('--smoothing', type=float, default=0.0)
    p.add_argument('--model-ema', action='store_true')
    p.add_argument('--model-ema-decay', type=float, default=0.9998)
    p.add_argument('--train-modulation-only', action='store_true',
                   help='train only the FDConv modulation (KSM, FBM) and the head, as the detection recipes do')
    p.add_argument('--modulation-stages', type=int, nargs='*', default=None,
                   help='stages (0-based) whose modulation trains with --train-modulation-only (default: all)')
    p.add_argument('--mixed-precision', choices=['no', 'bf16', 'fp16'], default='no')
    p.add_argument('--output-dir', default='runs/finetune')
    p.add_argument('--checkpoint-every', default='epoch', help="'epoch' or a number of optimizer updates")
    p.add_argument('--resume', help="a checkpoint folder or 'latest'")
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--push-to-hub', action='store_true')
    p.add_argument('--hub-repo-id')
    p.add_argument('--report-to', default=None, help="accelerate tracker, e.g. 'tensorboard'")
    p.add_argument('--expect-num-processes', type=int, default=None,
                   help='fail unless launched on this many processes (guards against a silent fallback)')
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
        # Hub dataset ids are 'name' or 'owner/name'; anything else is meant as a folder
        looks_like_path = args.dataset.startswith(('.', '/', '~')) or args.dataset.count('/') > 1
        if looks_like_path and not os.path.exists(os.path.expanduser(args.dataset)):
            raise ValueError(f"--dataset {args.dataset}: no such folder")
        if os.path.exists(args.dataset):
            try:
                loaded = datasets.load_from_disk(args.dataset)
            except FileNotFoundError as e:
                raise ValueError(f"--dataset {args.dataset} is not a dataset saved with save_to_disk ({e})") from None
        else:
            loaded = datasets.load_dataset(args.dataset, args.dataset_config)
        splits = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        if args.train_split not in splits:
            raise ValueError(f"split {args.train_split!r} not in {args.dataset} (has {list(splits)})")
        train = splits[args.train_split]
        val_split = args.val_split or next((s for s in ('validation', 'val', 'test') if s in splits), None)
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


@contextlib.contextmanager
def seeded_rng(*key: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators seeded from ``key`` inside, restored after: what a transform
    draws is a function of the key alone, and the caller's streams (dropout, Mixup) are left untouched."""
    import numpy as np
    seed = int(np.random.SeedSequence(key).generate_state(1)[0])
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class ImageRows(torch.utils.data.Dataset):
    """(image tensor, label) rows of a Hugging Face dataset. The augmentation of row i in epoch e is drawn from
    seeded_rng(seed, e, i), so it does not depend on which process or loader worker makes it, on what was
    prefetched, or on whether the run was resumed: a resumed run sees the same images as an uninterrupted one."""

    def __init__(self, ds, image: str, label: str, transform, seed: int):
        self.ds, self.image, self.label, self.transform, self.seed = ds, image, label, transform, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.ds[index]
        with seeded_rng(self.seed, self.epoch, index):
            return self.transform(row[self.image].convert('RGB')), row[self.label]


def make_loader(ds, image: str, label: str, transform, batch_size: int, shuffle: bool, workers: int,
                seed: int) -> DataLoader:
    """A loader of ImageRows; the order comes from the sampler, which accelerate re-seeds per epoch
    (use_seedable_sampler), and its own generator keeps the global streams untouched."""
    def collate(rows):
        return torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    return DataLoader(ImageRows(ds, image, label, transform, seed), batch_size=batch_size, shuffle=shuffle,
                      num_workers=workers, collate_fn=collate, generator=torch.Generator().manual_seed(seed),
                      drop_last=False, persistent_workers=False)


# ---------------------------------------------------------------------------------------------------- model
def modulation_parameters(model: nn.Module, stages: list[int] | None = None) -> list[nn.Parameter]:
    """KSM and FBM parameters of the FDConv layers (in the given stages): what the detection recipes train."""
    params = []
    for name, module in model.named_modules():
        if not isinstance(module, (FDConv2d, FDLinear)):
            continue
        if stages is not None and _stage_of(name) not in stages:
            continue
        for sub in (module.ksm_global, module.ksm_local, module.fbm):
            if sub is not None:
                params += list(sub.parameters())
    return params


def _stage_of(name: str) -> int | None:
    m = re.match(r'^(?:layer(\d+)|stages\.(\d+)|layers\.(\d+))\.', name)
    if not m:
        return None
    if m.group(1):
        return int(m.group(1)) - 1  # ResNet layer1..4 -> 0..3
    return int(m.group(2) or m.group(3))


def parse_model_kwargs(pairs: list[str]) -> dict[str, Any]:
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep:
            raise ValueError(f"--model-kwargs entry {pair!r} is not KEY=VALUE")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes,
                              **parse_model_kwargs(args.model_kwargs))
    if args.train_modulation_only:
        keep = {id(p) for p in modulation_parameters(model, args.modulation_stages)}
        keep |= {id(p) for p in model.get_classifier().parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
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


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in root.glob('step_*') if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def save_checkpoint(accelerator, root: Path, step: int, epoch: int, batches_in_epoch: int,
                    history: list[dict[str, float]]) -> Path:
    """accelerator.save_state (model, optimizer, scheduler, EMA, every process's random streams) into step_N.tmp,
    then renamed: a crash mid-write leaves no complete-looking step_N folder (the rename is the commit)."""
    final, tmp = root / f'step_{step}', root / f'step_{step}.tmp'
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_json(tmp / 'trainer_state.json',
                   {'step': step, 'epoch': epoch, 'batches_in_epoch': batches_in_epoch, 'history': history})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def train(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    out = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
        log_with=args.report_to, project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))
    if args.expect_num_processes and accelerator.num_processes != args.expect_num_processes:
        raise RuntimeError(f"expected {args.expect_num_processes} processes, running on {accelerator.num_processes}")
    set_seed(args.seed)

    train_ds, val_ds, image, label, names = load_splits(args)
    model = build_model(args, len(names))
    data_config = resolve_data_config(
        {'input_size': (3, args.img_size, args.img_size)} if args.img_size else {}, model=model)
    eval_tf = create_transform(**data_config, is_training=False)
    train_tf = eval_tf if args.no_augment else create_transform(**data_config, is_training=True)
    train_loader = make_loader(train_ds, image, label, train_tf, args.batch_size, not args.no_shuffle,
                               args.workers, args.seed)
    val_loader = make_loader(val_ds, image, label, eval_tf, args.batch_size, False, args.workers, args.seed)

    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    accelerator.register_for_checkpointing(scheduler)
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

    ckpt_root = out / 'checkpoints'
    step, start_epoch, skip_batches = 0, 0, 0
    history: list[dict[str, float]] = []
    if args.resume:
        resume = _checkpoints(ckpt_root)[-1][1] if args.resume == 'latest' and _checkpoints(ckpt_root) else \
            Path(args.resume) if args.resume != 'latest' else None
        if resume is None:
            raise ValueError(f"--resume latest: no complete checkpoint in {ckpt_root}")
        if not (resume / 'trainer_state.json').is_file():
            raise ValueError(f"--resume {resume}: not a complete checkpoint folder")
        accelerator.load_state(str(resume))
        state = json.loads((resume / 'trainer_state.json').read_text())
        step, start_epoch, skip_batches = state['step'], state['epoch'], state['batches_in_epoch']
        history = state.get('history', [])
        accelerator.print(f"resumed from {resume} at update {step} (epoch {start_epoch})")
    if args.report_to:
        accelerator.init_trackers('finetune', config={k: v for k, v in vars(args).items()
                                                      if isinstance(v, (int, float, str, bool))})

    every = None if args.checkpoint_every == 'epoch' else int(args.checkpoint_every)
    max_steps = args.max_steps or updates_per_epoch * args.epochs
    model.train()
    done = step >= max_steps
    for epoch in range(start_epoch, args.epochs):
        if done:
            break
        train_loader.set_epoch(epoch)  # the sampler's order of this epoch
        train_loader.dataset.set_epoch(epoch)  # and its augmentation (accelerate sets only one of the two)
        loader = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        bar = tqdm(loader, disable=not accelerator.is_local_main_process, desc=f'epoch {epoch}')
        for batch_idx, (images, labels) in enumerate(bar, start=skip_batches):
            if mixup is not None:
                images, labels = mixup(images, labels)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = criterion(model(images), labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.clip_grad:
                    accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=step)
            loss_value = accelerator.reduce(loss.detach(), 'mean').item()
            bar.set_postfix(loss=f'{loss_value:.4f}', lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            history.append({'step': step, 'loss': loss_value})
            if args.report_to:
                accelerator.log({'train/loss': loss_value, 'lr': optimizer.param_groups[0]['lr']}, step=step)
            if every and step % every == 0:
                save_checkpoint(accelerator, ckpt_root, step, epoch, batch_idx + 1, history)
            if step >= max_steps:
                done = True
                break
        skip_batches = 0
        metrics = evaluate(ema.module if ema is not None else model, val_loader, accelerator)
        accelerator.print(f"epoch {epoch}: val top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} "
                          f"loss {metrics['loss']:.4f}")
        if args.report_to:
            accelerator.log({f'val/{k}': v for k, v in metrics.items()}, step=step)
        if every is None and not done:
            save_checkpoint(accelerator, ckpt_root, step, epoch + 1, 0, history)

    final = evaluate(ema.module if ema is not None else model, val_loader, accelerator)
    results = {**final, 'steps': step, 'model': args.model, 'num_classes': len(names),
               'num_processes': accelerator.num_processes, 'data_source': args.dataset or args.train_dir,
               # a Hub dataset id goes into the model card's metadata; local data is 'custom'
               'dataset': args.dataset if args.dataset and not os.path.exists(args.dataset) else 'custom',
               'split': 'validation', 'train_loss': history}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        export = (ema.module if ema is not None else accelerator.unwrap_model(model)).float()
        _export(export, out / 'model', names, data_config, results, args)
        write_json(out / 'results.json', results)
        if args.push_to_hub:
            from .hub import push
            push(out / 'model', args.hub_repo_id or f"{args.model.split('.')[0]}-finetuned")
    accelerator.end_training()
    return results


def _export(model: nn.Module, folder: Path, names: list[str], data_config: dict, results: dict,
            args: argparse.Namespace) -> None:
    """save_for_hf (model.safetensors + config.json with label names, the data config used and where the
    weights came from), atomically."""
    if args.pretrained:
        describe_origin(model, f"fine-tuned with fdconv_zoo.finetune from {args.model}")
    else:
        describe_origin(model, f"trained with fdconv_zoo.finetune from random initialisation ({args.model} "
                               f"architecture, no pretrained weights)", derived=False)
    with atomic_dir(folder, replace=True) as tmp:
        timm.models.save_for_hf(model, tmp, model_config={'label_names': names}, safe_serialization=True,
                                data_config=data_config)
        write_json(tmp / 'results.json', {k: v for k, v in results.items() if k != 'train_loss'})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        results = train(args)
    except EXPECTED_ERRORS as e:
        print(f"finetune: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"top1 {results['top1']:.2f} top5 {results['top5']:.2f} loss {results['loss']:.4f} "
          f"({results['steps']} updates, {time.time() - start:.0f} s)")
    return 0
