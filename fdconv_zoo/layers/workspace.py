"""Reusable scratch memory for the B x |W| tensors of kernel synthesis (forward and hand-written backward).

A per-sample kernel tensor is B x |W| floats (660 MB at batch 8 for ResNet-50's FDConv layers). On the CPU a
fresh tensor that large is mapped page by page, which costs about as much as the arithmetic done on it.
Layers run one after another (also in backward), so one buffer per role, grown to the largest layer, serves
all of them; buffers are per thread.
"""
from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch(role: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor of ``shape`` whose memory is reused by the next call with the same role."""
    buffers = getattr(_local, 'buffers', None)
    if buffers is None:
        buffers = _local.buffers = {}
    numel = 1
    for s in shape:
        numel *= s
    key = (role, device, dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers.pop(key, None)  # free the smaller one first
        buf = buffers[key] = torch.empty(numel, device=device, dtype=dtype)
    return buf[:numel].view(shape)


def release_workspace() -> None:
    """Free the scratch buffers of this thread (they are kept between forward passes for speed)."""
    _local.buffers = {}
