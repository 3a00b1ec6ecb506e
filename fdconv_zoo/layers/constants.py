"""Input-independent tensors of the layers' math (FBM's Fourier bases, the export's DFT matrices), cached."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

_cache: dict[tuple, Any] = {}


def cached_constant(key: tuple, make: Callable[[], Any]) -> Any:
    """``make()`` once per ``key``, run outside any tracing mode (fake, proxy, functional): real tensors, which a
    traced or exported graph holds as constants, and which eager calls after an export can reuse."""
    entry = _cache.get(key)
    if entry is None:
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():
            entry = _cache.setdefault(key, make())
    return entry
