"""What the training entry points share (classification fine-tuning, semantic segmentation): their common
flags, the accelerate setup, augmentation drawn per image from a seeded generator, which parameters train,
checkpoints with exact resume, and the update loop with its logging."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..atomic import write_json
from ..layers import FDConv2d, FDLinear
from ..models import stage_of

CHECKPOINT_RE = re.compile(r'^step_(\d+)$')


def add_common_arguments(p: argparse.ArgumentParser, *, model: str, lr: float, weight_decay: float, epochs: int,
                         batch_size: int, output_dir: str) -> None:
    """The flags every training script has, with the same names and meaning (defaults differ per task)."""
    p.add_argument('--model', default=model, help='registered name or tag (dense tags are converted on load)')
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra model constructor arguments, values as JSON (e.g. num_freq_groups=32 '
                        'channels=[32,64,128,256])')
    p.add_argument('--batch-size', type=int, default=batch_size, help='per device')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--epochs', type=int, default=epochs)
    p.add_argument('--max-steps', type=int, default=None, help='stop after this many optimizer updates')
    p.add_argument('--lr', type=float, default=lr)
    p.add_argument('--weight-decay', type=float, default=weight_decay)
    p.add_argument('--warmup-epochs', type=float, default=0.0)
    p.add_argument('--min-lr', type=float, default=0.0)
    p.add_argument('--grad-accum', type=int, default=1)
    p.add_argument('--clip-grad', type=float, default=None)
    p.add_argument('--train-modulation-only', action='store_true',
                   help='train only the FDConv modulation (KSM, FBM) and the task head')
    p.add_argument('--modulation-stages', type=int, nargs='*', default=None,
                   help='stages (0-based) whose modulation trains with --train-modulation-only (default: all)')
    p.add_argument('--freeze-stages', type=int, default=0,
                   help='freeze the stem and the first N stages, except their KSM/FBM parameters')
    p.add_argument('--mixed-precision', choices=['no', 'bf16', 'fp16'], default='no')
    p.add_argument('--output-dir', default=output_dir)
    p.add_argument('--checkpoint-every', default='epoch', help="'epoch' or a number of optimizer updates")
    p.add_argument('--resume', help="a checkpoint folder or 'latest'")
    p.add_argument('--seed', type=int, default=42)
    p.add_argument('--push-to-hub', action='store_true')
    p.add_argument('--hub-repo-id')
    p.add_argument('--report-to', default=None, help="accelerate tracker, e.g. 'tensorboard'")
    p.add_argument('--expect-num-processes', type=int, default=None,
                   help='fail unless launched on this many processes (guards against a silent fallback)')


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


def make_accelerator(args: argparse.Namespace, **kwargs: Any):
    """Accelerator with accelerate's seedable sampler (an epoch's order is a function of seed and epoch), the
    process-count guard, and every generator seeded."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    out = str(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
        log_with=args.report_to, project_config=ProjectConfiguration(project_dir=out, logging_dir=out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed), **kwargs)
    launched = int(os.environ.get('WORLD_SIZE', '1'))  # what the launcher (torchrun, accelerate) started
    if launched != accelerator.num_processes:
        raise ValueError(
            f"launched as one of {launched} processes, but accelerate runs this one alone: the {launched} processes "
            f"would each train a full copy into {out}. On a machine without GPUs, data parallelism needs "
            f"`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {launched} ...`")
    if args.expect_num_processes and accelerator.num_processes != args.expect_num_processes:
        raise RuntimeError(f"expected {args.expect_num_processes} processes, running on {accelerator.num_processes}")
    set_seed(args.seed)
    return accelerator


# ------------------------------------------------------------------------------------------------------- data
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


class SeededRows(torch.utils.data.Dataset):
    """``make(row, index)`` of each row of a dataset, drawn inside seeded_rng(seed, epoch, index): the augmentation of
    an example does not depend on which process or loader worker makes it, on what was prefetched, or on
    whether the run was resumed, so a resumed run sees what an uninterrupted one saw."""

    def __init__(self, rows, make: Callable[[Any, int], Any], seed: int):
        self.rows, self.make, self.seed = rows, make, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        row = self.rows[index]
        with seeded_rng(self.seed, self.epoch, index):
            return self.make(row, index)


def make_loader(rows: SeededRows, batch_size: int, shuffle: bool, workers: int, seed: int,
                collate: Callable | None = None) -> torch.utils.data.DataLoader:
    """The order comes from the sampler, which accelerate re-seeds per epoch; the loader's own generator keeps
    the global streams untouched when an iterator is made."""
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       collate_fn=collate, generator=torch.Generator().manual_seed(seed),
                                       drop_last=False, persistent_workers=False)


# ---------------------------------------------------------------------------------------- what trains
def modulation_parameters(model: nn.Module, stages: list[int] | None = None) -> list[nn.Parameter]:
    """KSM and FBM parameters of the FDConv layers (in the given stages): what starts untrained in a converted
    model and must keep learning even where the dense weights are frozen."""
    params = []
    for name, module in model.named_modules():
        if not isinstance(module, (FDConv2d, FDLinear)):
            continue
        if stages is not None and stage_of(name) not in stages:
            continue
        for sub in (module.ksm_global, module.ksm_local, module.fbm):
            if sub is not None:
                params += list(sub.parameters())
    return params


def select_trainable(backbone: nn.Module, args: argparse.Namespace) -> None:
    """--train-modulation-only: only KSM/FBM (of --modulation-stages) train in the backbone.
    --freeze-stages N: the stem and stages 0..N-1 are frozen except their KSM/FBM. Modules outside
    ``backbone`` (heads, decoders) are not touched."""
    keep = {id(p) for p in modulation_parameters(backbone, args.modulation_stages)}
    frozen: list[nn.Parameter] = []
    if args.train_modulation_only:
        frozen = list(backbone.parameters())
    elif args.freeze_stages > 0:
        for name, p in backbone.named_parameters():
            stage = stage_of(name)
            if stage is None or stage < args.freeze_stages:
                frozen.append(p)
    for p in frozen:
        if id(p) not in keep:
            p.requires_grad_(False)


def plain_copy(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
    """The trained model as a plain float32 CPU module to export: ``build()`` (the architecture as one process
    builds it, e.g. BatchNorm2d where training used SyncBatchNorm) loaded with ``model``'s weights, on the main
    process; the other processes get None, and ``model`` itself is left as it is (device, dtype, modules). A
    model sharded by FSDP (FSDP2's ``fully_shard`` or FSDP1) holds only its shard on each process: its full state
    dict is gathered first (a collective: every process calls this)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor
    main = not dist.is_initialized() or dist.get_rank() == 0
    if (any(isinstance(p, DTensor) for p in model.parameters())
            or any(isinstance(m, FullyShardedDataParallel) for m in model.modules())):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict() if main else None
    if not main:
        return None
    plain = build().float()
    plain.load_state_dict(state)
    for attr in ('pretrained_cfg', '_model_args'):  # what timm's save_for_hf writes about the trained model
        if hasattr(model, attr):
            setattr(plain, attr, getattr(model, attr))
    return plain.train(model.training)


# ----------------------------------------------------------------------------------------- checkpoints
def checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in root.glob('step_*') if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(accelerator, root: Path, state: TrainerState, stream=None) -> Path:
    """accelerator.save_state (model, optimizer, scheduler, EMA, every process's random streams) into step_N.tmp,
    then renamed: a crash mid-write leaves no complete-looking step_N folder (the rename is the commit). A
    streamed run's data position (``stream.state_dict()``) is saved per process."""
    final, tmp = root / f'step_{state.step}', root / f'step_{state.step}.tmp'
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if stream is not None:
        write_json(tmp / f'stream_{accelerator.process_index}.json', stream.state_dict())
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / 'trainer_state.json', vars(state))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, root: Path, spec: str | None, stream=None) -> TrainerState:
    """Load the checkpoint ``spec`` names ('latest' or a folder); a fresh state without one. A streamed run's
    ``stream`` continues where this process's part stopped."""
    if not spec:
        return TrainerState()
    found = checkpoints(root)
    if spec == 'latest' and not found:
        raise ValueError(f"--resume latest: no complete checkpoint in {root}")
    folder = found[-1][1] if spec == 'latest' else Path(spec)
    if not (folder / 'trainer_state.json').is_file():
        raise ValueError(f"--resume {folder}: not a complete checkpoint folder")
    accelerator.load_state(str(folder))
    if stream is not None:
        position = folder / f'stream_{accelerator.process_index}.json'
        if not position.is_file():
            raise ValueError(f"--resume {folder}: no stream position {position.name} (not a --streaming run on "
                             f"{accelerator.num_processes} processes)")
        stream.load_state_dict(json.loads(position.read_text()))
    state = TrainerState(**json.loads((folder / 'trainer_state.json').read_text()))
    accelerator.print(f"resumed from {folder} at update {state.step} (epoch {state.epoch})")
    return state


# ------------------------------------------------------------------------------------------------ the loop
def update_step(accelerator, args: argparse.Namespace, model: nn.Module, optimizer, scheduler, batch,
            loss_fn: Callable[[nn.Module, Any], torch.Tensor], state: TrainerState, ema, bar) -> bool:
    """One batch: forward, backward, and at the end of an accumulation the optimizer step, scheduler, EMA and
    logging. True when an update was made."""
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss = loss_fn(model, batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.clip_grad:
            accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if not accelerator.sync_gradients:
        return False
    state.step += 1
    scheduler.step_update(state.step)
    if ema is not None:
        ema.update(accelerator.unwrap_model(model), step=state.step)
    loss_value = accelerator.reduce(loss.detach(), 'mean').item()
    lr = optimizer.param_groups[0]['lr']
    bar.set_postfix(loss=f'{loss_value:.4f}', lr=f'{lr:.2e}')
    state.history.append({'step': state.step, 'loss': loss_value})
    if args.report_to:
        accelerator.log({'train/loss': loss_value, 'lr': lr}, step=state.step)
    return True


def evaluate_and_log(accelerator, args: argparse.Namespace, evaluate: Callable[[], dict[str, float]],
                      state: TrainerState, what: str) -> dict[str, float]:
    metrics = evaluate()
    accelerator.print(f"{what}: " + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items() if isinstance(v, float)))
    if args.report_to:
        accelerator.log({f'val/{k}': v for k, v in metrics.items() if isinstance(v, (int, float))}, step=state.step)
    return metrics


def run_length(args: argparse.Namespace, updates_per_epoch: int) -> int:
    """Updates in the run: --max-steps, else the epochs'."""
    return args.max_steps or updates_per_epoch * args.epochs


def train_loop(accelerator, args: argparse.Namespace, model: nn.Module, optimizer, scheduler, loader,
               loss_fn: Callable[[nn.Module, Any], torch.Tensor], evaluate: Callable[[], dict[str, float]],
               state: TrainerState, updates_per_epoch: int, ema=None) -> dict[str, float] | None:
    """Epochs of updates (accumulation, clipping, per-update scheduler, EMA, logging, checkpoints every N
    updates or each epoch), an evaluation after each epoch; returns the last evaluation (None when the run
    was already complete)."""
    from tqdm.auto import tqdm
    ckpt_root = Path(args.output_dir) / 'checkpoints'
    every = None if args.checkpoint_every == 'epoch' else int(args.checkpoint_every)
    max_steps = run_length(args, updates_per_epoch)
    metrics = None
    model.train()
    for epoch in range(state.epoch, args.epochs):
        if state.step >= max_steps:
            break
        loader.set_epoch(epoch)  # the sampler's order of this epoch
        loader.dataset.set_epoch(epoch)  # and its augmentation (accelerate sets only one of the two)
        skip = state.batches_in_epoch
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        bar = tqdm(batches, disable=not accelerator.is_local_main_process, desc=f'epoch {epoch}')
        for batch_idx, batch in enumerate(bar, start=skip):
            if not update_step(accelerator, args, model, optimizer, scheduler, batch, loss_fn, state, ema, bar):
                continue
            state.epoch, state.batches_in_epoch = epoch, batch_idx + 1
            if every and state.step % every == 0:
                save_checkpoint(accelerator, ckpt_root, state)
            if state.step >= max_steps:
                break
        metrics = evaluate_and_log(accelerator, args, evaluate, state, f'epoch {epoch}')
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        if every is None and state.step < max_steps:
            save_checkpoint(accelerator, ckpt_root, state)
    return metrics


def run_main(name: str, parser: argparse.ArgumentParser, train: Callable[[argparse.Namespace], dict[str, Any]],
             summary: Callable[[dict[str, Any]], str], argv: list[str] | None = None) -> int:
    """A training entry point: parse, train, print ``summary(results)``; bad input is one line on stderr and
    exit code ``errors.EXIT_BAD_INPUT``."""
    import time

    from ..errors import USER_ERRORS, report
    args = parser.parse_args(argv)
    start = time.time()
    try:
        results = train(args)
    except USER_ERRORS as e:
        return report(name, e)
    print(f"{summary(results)} ({results['steps']} updates, {time.time() - start:.0f} s)")
    return 0


def fit_warmup(accelerator, warmup: int, total: int, flag: str) -> int:
    """Updates of warmup for a run of ``total`` updates: at most a quarter of the run (a recipe's warmup given
    in iterations, e.g. detection's 500, would otherwise be most or all of a small dataset's run), with one
    line saying so when it is shortened."""
    limit = total // 4
    if warmup <= limit:
        return warmup
    accelerator.print(f"warning: {flag} gives {warmup} warmup updates for a run of {total}; using {limit} "
                      f"(a quarter of the run)")
    return limit


def make_scheduler(accelerator, optimizer, args: argparse.Namespace, updates_per_epoch: int, **kwargs: Any):
    """timm's ``create_scheduler_v2`` stepped per update over the run's updates (:func:`run_length`), its warmup
    fitted to the run (:func:`fit_warmup`); registered for checkpointing."""
    from timm.scheduler import create_scheduler_v2
    total = run_length(args, updates_per_epoch)
    warmup = fit_warmup(accelerator, round(args.warmup_epochs * updates_per_epoch), total, '--warmup-epochs')
    scheduler, _ = create_scheduler_v2(
        optimizer, num_epochs=total / updates_per_epoch, warmup_epochs=warmup / updates_per_epoch, min_lr=args.min_lr,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch, **kwargs)
    accelerator.register_for_checkpointing(scheduler)
    return scheduler


def loggable_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
