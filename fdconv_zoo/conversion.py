"""Model-level conversion: the dense -> FDConv layer swap at the paper's places (weight import itself is
``layers/weight_import.py``)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from .layers import FDConv2d, FDLinear
from .layers.weight_import import load_reference_checkpoint

__all__ = ['convert_to_fdconv', 'load_reference_checkpoint', 'reference_gate', 'to_fdconv']

Rule = Callable[[str, nn.Module], bool]


def reference_gate(name: str, module: nn.Module) -> bool:
    """The paper's placement: convs with min(Cin, Cout) > 16 and k in {1, 3}, and the linears of MLP/FFN blocks."""
    if isinstance(module, nn.Conv2d):
        return (min(module.in_channels, module.out_channels) > 16 and module.kernel_size[0] == module.kernel_size[1]
                and module.kernel_size[0] in (1, 3))
    if isinstance(module, nn.Linear):
        parent = name.rpartition('.')[0]
        return parent.split('.')[-1] in ('mlp', 'ffn') and min(module.in_features, module.out_features) > 16
    return False


def to_fdconv(module: nn.Module, **options: Any) -> FDConv2d | FDLinear:
    """The FDConv counterpart of a dense nn.Conv2d or nn.Linear, exact at step 0."""
    if isinstance(module, nn.Conv2d):
        return FDConv2d.from_dense(module, **options)
    if isinstance(module, nn.Linear):
        linear_options = {k: v for k, v in options.items() if k not in ('fbm', 'fbm_cutoffs')}
        return FDLinear.from_dense(module, **linear_options)
    raise TypeError(f"cannot convert {type(module).__name__} to FDConv (only nn.Conv2d and nn.Linear)")


def convert_to_fdconv(model: nn.Module, rule: Rule | None = None, **options: Any) -> nn.Module:
    """Swap every layer that ``rule(name, module)`` selects (default: :func:`reference_gate`) for its FDConv
    counterpart carrying the pretrained weights; returns ``model``, converted in place."""
    rule = rule or reference_gate
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in (nn.Conv2d, nn.Linear) and rule(name, m)]
    for name, module in targets:
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        new = to_fdconv(module, **options)
        new.train(module.training)
        setattr(parent, child, new)
    return model
