"""Input-independent tensors of the operators' math (FBM's Fourier bases, the export's DFT matrices), cached.

The cache is bounded (least recently used out first) and ``release_workspace`` empties it: a server that sees
every input size keeps a few hundred small tensors at most.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

MAX_ENTRIES = 256
_cache: OrderedDict[tuple, Any] = OrderedDict()
_lock = threading.Lock()


def cached_constant(key: tuple, make: Callable[[], Any]) -> Any:
    """``make()`` once per ``key``, run outside any tracing mode (fake, proxy, functional): real tensors, which a
    traced or exported graph holds as constants, and which eager calls after an export can reuse."""
    with _lock:
        entry = _cache.get(key)
        if entry is not None:
            _cache.move_to_end(key)
            return entry
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
        entry = make()
    with _lock:
        entry = _cache.setdefault(key, entry)
        _cache.move_to_end(key)
        while len(_cache) > MAX_ENTRIES:
            _cache.popitem(last=False)
    return entry


def cached_constants() -> int:
    """How many constants the cache holds."""
    return len(_cache)


def clear_constants() -> None:
    with _lock:
        _cache.clear()
