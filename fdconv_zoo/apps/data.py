"""Where a task's data comes from: ``--dataset`` is a folder written by ``datasets``' save_to_disk or a Hugging
Face Hub dataset id, resolved here by one rule for classification, segmentation and detection."""
from __future__ import annotations

import os
from typing import Any

VALIDATION_SPLITS = ('validation', 'val', 'test')


def is_folder(dataset: str) -> bool:
    """True for an existing folder, False for a Hub id ('name' or 'owner/name'); a path that names no folder is
    an error that says so rather than a Hub lookup of a file path."""
    if os.path.exists(dataset):
        return True
    if dataset.startswith(('.', '/', '~')) or dataset.count('/') > 1:
        raise ValueError(f"--dataset {dataset}: no such folder")
    return False


def load_folder(path: str):
    """The DatasetDict saved in ``path`` (a single saved Dataset is its 'train' split)."""
    import datasets
    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise ValueError(f"--dataset {path} is not a dataset saved with save_to_disk ({e})") from None
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)


def open_dataset(dataset: str, config: str | None = None):
    """Every split of ``dataset`` as a DatasetDict (rows read lazily from Arrow files, not held in memory)."""
    import datasets
    if is_folder(dataset):
        return load_folder(dataset)
    loaded = datasets.load_dataset(dataset, config)
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)


def pick_split(splits: Any, split: str, dataset: str) -> Any:
    """``splits[split]``, or an error naming the split, the dataset and the splits it has."""
    if split not in splits:
        raise ValueError(f"split {split!r} not in {dataset} (has {list(splits)})")
    return splits[split]


def validation_split(splits: Any, given: str | None) -> str | None:
    """The split to validate on: the one given, else the first of validation/val/test that exists."""
    return given or next((s for s in VALIDATION_SPLITS if s in splits), None)


def open_split(dataset: str, config: str | None, split: str, streaming: bool = False, accelerator=None):
    """One split; with ``streaming`` an IterableDataset (a Hub dataset streamed from its files, a folder's split
    sharded for the processes of ``accelerator``)."""
    import datasets
    if is_folder(dataset):
        ds = pick_split(load_folder(dataset), split, dataset)
        if streaming:
            from .streaming import to_stream
            return to_stream(ds, accelerator)
        return ds
    return datasets.load_dataset(dataset, config, split=split, streaming=streaming)
