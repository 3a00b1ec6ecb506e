"""Training on a Hugging Face dataset streamed (``--streaming``): nothing is downloaded or decoded ahead of the
step that needs it. Each process reads its own part of the stream (``split_dataset_by_node``: whole shards
when their count divides by the processes), shuffled through a buffer as timm's train.py does; examples are
made as they arrive; the run's length is ``--max-steps``, the stream starting over (reshuffled) when a process
reaches its end; every checkpoint saves each process's position (datasets' ``state_dict``), so ``--resume``
continues where the run stopped."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .training import TrainerState, evaluate_and_log, save_checkpoint, seeded_rng, update_step

SHUFFLE_BUFFER = 4096  # timm's train.py for hfids/


def add_streaming_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--streaming', action='store_true',
                   help='stream the training split instead of downloading it first (needs --max-steps, and then '
                        '--warmup-epochs is a fraction of the run); the validation split is loaded as usual')
    p.add_argument('--shuffle-buffer', type=int, default=SHUFFLE_BUFFER, help="the stream's shuffle buffer")


def check_streaming_args(args: argparse.Namespace) -> None:
    if args.streaming and not args.max_steps:
        raise ValueError('--streaming needs --max-steps (a stream has no length to count epochs in)')
    if args.streaming and args.shuffle_buffer < 1:
        raise ValueError(f'--shuffle-buffer {args.shuffle_buffer}: must be at least 1')


def process_part(stream, accelerator, args: argparse.Namespace):
    """This process's part of an ``IterableDataset``, shuffled (seeded: the same order on every process)."""
    from datasets.distributed import split_dataset_by_node
    stream = stream.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer)
    return split_dataset_by_node(stream, rank=accelerator.process_index, world_size=accelerator.num_processes)


def to_stream(ds, accelerator):
    """A map-style ``datasets.Dataset`` (a save_to_disk folder) as a stream of 8 shards per process (fewer, and
    then each process reads all and keeps its share, when the dataset has fewer rows)."""
    shards = min(len(ds), max(accelerator.num_processes * 8, 8))
    return ds.to_iterable_dataset(num_shards=max(shards, 1))


class StreamRows(torch.utils.data.IterableDataset):
    """``make(row, index)`` of each row of this process's stream, drawn inside seeded_rng(seed, rank, epoch,
    index): the augmentation of an example is a function of where it is in the run. Read in the main process
    (a DataLoader without workers), so its ``state_dict`` is exactly what the updates consumed."""

    def __init__(self, stream, make: Callable[[Any, int], Any], seed: int, rank: int):
        super().__init__()
        self.stream, self.make, self.seed, self.rank = stream, make, seed, rank
        self.epoch = self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.set_epoch(epoch)  # a new shuffle of shards and buffer

    def __iter__(self):
        for row in self.stream:
            with seeded_rng(self.seed, self.rank, self.epoch, self.position):
                example = self.make(row, self.position)
            self.position += 1
            yield example

    def state_dict(self) -> dict[str, Any]:
        return {'stream': self.stream.state_dict(), 'epoch': self.epoch, 'position': self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_epoch(state['epoch'])
        self.stream.load_state_dict(state['stream'])
        self.position = state['position']


def stream_loader(rows: StreamRows, batch_size: int, collate: Callable) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, num_workers=0, collate_fn=collate)


def train_stream(accelerator, args: argparse.Namespace, model: nn.Module, optimizer, scheduler,
                 loader: torch.utils.data.DataLoader, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 evaluate: Callable[[], dict[str, float]], state: TrainerState, ema=None) -> dict[str, float] | None:
    """``--max-steps`` updates from a stream (the loader is this process's own, not accelerate's: every process
    makes the same number of updates whatever its part's length), checkpoints every ``--checkpoint-every``
    updates with the stream's position, an evaluation at each checkpoint and at the end."""
    from accelerate.utils import send_to_device
    from tqdm.auto import tqdm
    rows: StreamRows = loader.dataset
    ckpt_root = Path(args.output_dir) / 'checkpoints'
    every = None if args.checkpoint_every == 'epoch' else int(args.checkpoint_every)
    if state.step >= args.max_steps:
        return None
    model.train()
    bar = tqdm(total=args.max_steps, initial=state.step, disable=not accelerator.is_local_main_process)
    while state.step < args.max_steps:
        produced = False
        for batch in loader:
            produced = True
            batch = send_to_device(batch, accelerator.device)
            if not update_step(accelerator, args, model, optimizer, scheduler, batch, loss_fn, state, ema, bar):
                continue
            bar.update(1)
            state.epoch = rows.epoch
            if every and state.step % every == 0 and state.step < args.max_steps:
                save_checkpoint(accelerator, ckpt_root, state, rows)
                evaluate_and_log(accelerator, args, evaluate, state, f'update {state.step}')
                model.train()
            if state.step >= args.max_steps:
                break
        else:
            if not produced:
                raise ValueError(f'process {accelerator.process_index} got no training example from the stream')
            rows.set_epoch(rows.epoch + 1)
            rows.position = 0
    bar.close()
    return evaluate_and_log(accelerator, args, evaluate, state, f'update {state.step}')


# ------------------------------------------------------------------- what a task calls, streamed or not
def train_loader_for(args: argparse.Namespace, accelerator, train, make: Callable[[Any, int], Any],
                     collate: Callable, shuffle: bool = True) -> torch.utils.data.DataLoader:
    """The training loader: over a stream (this process's part) with --streaming, else over indexable rows."""
    from .training import SeededRows, make_loader
    if args.streaming:
        return stream_loader(StreamRows(train, make, args.seed, accelerator.process_index), args.batch_size, collate)
    return make_loader(SeededRows(train, make, args.seed), args.batch_size, shuffle, args.workers, args.seed, collate)


def prepare(accelerator, args: argparse.Namespace, model: nn.Module, optimizer, train_loader, val_loader):
    """accelerate's prepare, and the updates of an epoch (a stream's run is one epoch of --max-steps updates;
    its loader is split across processes already, so accelerate must not split it again)."""
    import math
    if args.streaming:
        model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
        return model, optimizer, train_loader, val_loader, args.max_steps
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    return model, optimizer, train_loader, val_loader, math.ceil(len(train_loader) / args.grad_accum)


def resume_run(accelerator, args: argparse.Namespace, train_loader) -> TrainerState:
    from .training import resume
    return resume(accelerator, Path(args.output_dir) / 'checkpoints', args.resume,
                  train_loader.dataset if args.streaming else None)


def run(accelerator, args: argparse.Namespace, model: nn.Module, optimizer, scheduler, train_loader,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor], evaluate: Callable[[], dict[str, float]],
        state: TrainerState, updates_per_epoch: int, ema=None) -> dict[str, float]:
    """The training run (epochs, or --max-steps of a stream), then the final evaluation if it made none."""
    from .training import train_loop
    if args.streaming:
        metrics = train_stream(accelerator, args, model, optimizer, scheduler, train_loader, loss_fn, evaluate,
                               state, ema)
    else:
        metrics = train_loop(accelerator, args, model, optimizer, scheduler, train_loader, loss_fn, evaluate, state,
                             updates_per_epoch, ema)
    return metrics or evaluate()
