"""What every operator shares: the dtype its FFTs run in, the switch for the fused CPU kernels, their scratch
memory and the profiler regions.

The switch follows timm's ``set_fused_attn``: one process-wide setting, ``FDCONV_ZOO_NATIVE=0`` turns it off at
start, :func:`set_native_kernels` and the :func:`native_kernels` context manager change it. Each operator asks
:func:`cpu_kernels` once, at its top, and hands the answer down.
"""
from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.profiler import record_function

from . import native
from .constants import clear_constants

_enabled = os.environ.get('FDCONV_ZOO_NATIVE', '1') != '0'


def fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFTs run in float32 at least (bf16/fp16 spectra lose too much), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def native_kernels_enabled() -> bool:
    """Whether the operators may use the fused CPU kernels (they still need a compiler and torch's MKL FFT)."""
    return _enabled


def set_native_kernels(enable: bool = True) -> None:
    """Turn the fused CPU kernels on or off for this process; off, every device runs the PyTorch code."""
    global _enabled
    _enabled = bool(enable)


@contextlib.contextmanager
def native_kernels(enable: bool) -> Iterator[None]:
    """``with native_kernels(False): ...`` runs the block on the PyTorch code (process-wide, not per thread)."""
    before = _enabled
    set_native_kernels(enable)
    try:
        yield
    finally:
        set_native_kernels(before)


def cpu_kernels(device: torch.device) -> bool:
    """The backend choice, asked once per operator call: the fused loops for CPU tensors where the switch is on
    and the library loads (each loop then also needs float32 tensors), else PyTorch."""
    return _enabled and device.type == 'cpu' and native.library() is not None


def region(name: str) -> contextlib.AbstractContextManager:
    """A named profiler region (the parts of ``fdconv-zoo bench --breakdown``); free when no profiler runs."""
    return record_function(name) if torch.autograd.profiler._is_profiler_enabled else contextlib.nullcontext()


# ---- scratch memory of the fused loops: per thread (backward runs on autograd's thread), freeable ----------------

class _Pool:
    """One thread's buffers by role; freed with the thread (a thread-local value), or by release_workspace."""

    def __init__(self):
        self.buffers: dict[str, Tensor] = {}


_local = threading.local()
_pools: weakref.WeakSet[_Pool] = weakref.WeakSet()
_pools_lock = threading.Lock()


def scratch(role: str, numel: int) -> Tensor:
    """A float32 CPU buffer of ``numel`` values that this thread's next request for ``role`` reuses. Only for
    memory that never leaves an operator: a fresh 100-MB tensor is mapped page by page, which costs about as
    much as the arithmetic done on it."""
    pool = getattr(_local, 'pool', None)
    if pool is None:
        pool = _local.pool = _Pool()
        with _pools_lock:
            _pools.add(pool)
    buffers = pool.buffers
    buf = buffers.get(role)
    if buf is None or buf.numel() < numel:
        buffers.pop(role, None)  # free the smaller one first
        buf = buffers[role] = torch.empty(max(numel, 1))
    return buf[:numel]


def workspace_bytes() -> int:
    """Bytes held by the scratch buffers of all live threads."""
    with _pools_lock:
        pools = list(_pools)
    return sum(buf.numel() * buf.element_size() for pool in pools for buf in list(pool.buffers.values()))


def release_workspace() -> None:
    """Free what the operators keep between calls for speed: every thread's scratch buffers, the cached
    constants (Fourier bases, DFT matrices) and the FFT descriptors of the fused loops. Safe while an operator
    runs: it holds its own references until it returns, and the loops' descriptors go once no loop runs."""
    with _pools_lock:
        pools = list(_pools)
    for pool in pools:
        pool.buffers = {}
    clear_constants()
    native.release_fft_plans()
