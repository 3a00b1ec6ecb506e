"""Model-level conversion: the dense -> FDConv layer swap at the paper's places (weight import itself is
``layers/weight_import.py``)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from .layers import FDConv1d, FDConv2d, FDConv3d, FDLinear
from .layers.weight_import import load_reference_checkpoint

__all__ = ['convert_to_fdconv', 'fdconv_type', 'load_reference_checkpoint', 'reference_gate', 'to_fdconv']

Rule = Callable[[str, nn.Module], bool]


# the FDConv counterpart of each dense layer type
FDCONV_OF: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: FDConv1d, nn.Conv2d: FDConv2d, nn.Conv3d: FDConv3d, nn.Linear: FDLinear}


def reference_gate(name: str, module: nn.Module) -> bool:
    """The paper's placement: convs with min(Cin, Cout) > 16 and kernels 1 or 3 wide along each axis (1x1 and 3x3
    in 2-D; in 3-D also R(2+1)D's (1, 3, 3) and (3, 1, 1)), and the linears of MLP/FFN blocks."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (min(module.in_channels, module.out_channels) > 16
                and all(k in (1, 3) for k in module.kernel_size))
    if isinstance(module, nn.Linear):
        parent = name.rpartition('.')[0]
        return parent.split('.')[-1] in ('mlp', 'ffn') and min(module.in_features, module.out_features) > 16
    return False


def fdconv_type(module: nn.Module) -> type[nn.Module] | None:
    """The FDConv layer type that computes what ``module`` computes: for nn.Conv1d/2d/3d, nn.Linear and their
    subclasses that keep the base forward (e.g. torchvision's Conv3DSimple, which only adds a constructor); None
    for anything else, such as timm's Conv2dSame or StdConv2d, whose forward differs."""
    for dense, fd in FDCONV_OF.items():
        if isinstance(module, dense) and type(module).forward is dense.forward:
            return fd
    return None


def to_fdconv(module: nn.Module, **options: Any) -> nn.Module:
    """The FDConv counterpart of a dense nn.Conv1d/2d/3d or nn.Linear, exact at step 0."""
    layer_type = fdconv_type(module)
    if layer_type is None:
        raise TypeError(f"cannot convert {type(module).__name__} to FDConv (only nn.Conv1d, nn.Conv2d, nn.Conv3d "
                        "and nn.Linear)")
    if layer_type is FDLinear:
        options = {k: v for k, v in options.items() if k not in ('fbm', 'fbm_cutoffs')}
    return layer_type.from_dense(module, **options)


def convert_to_fdconv(model: nn.Module, rule: Rule | None = None, **options: Any) -> nn.Module:
    """Swap every layer that ``rule(name, module)`` selects (default: :func:`reference_gate`) for its FDConv
    counterpart carrying the pretrained weights; returns ``model``, converted in place."""
    rule = rule or reference_gate
    targets = [(name, m) for name, m in model.named_modules()
               if fdconv_type(m) is not None and rule(name, m)]
    for name, module in targets:
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        new = to_fdconv(module, **options)
        new.train(module.training)
        setattr(parent, child, new)
    return model
