"""Any timm architecture as FDConv: ``register_fdconv('efficientnet_b0')`` registers ``efficientnet_b0_fdconv``.

The FDConv model is the dense architecture built by timm's own entry point (its constructor, ``features_only``,
``forward_intermediates``, ``set_grad_checkpointing`` and pretrained filter), with the layers that the placement
selects swapped for FDConv2d/FDLinear right after construction, and one tag per pretrained tag of the dense
architecture whose weights are timm's dense checkpoint, converted while loading (exact at step 0).

The swap hooks the one call every timm family makes, ``build_model_with_cfg``: for the duration of the dense entry
point the family module's reference to it is replaced by one that builds a converting subclass of the model class
under the FDConv name and chains the FDConv pretrained filter after the family's. Models are built one at a time
(a lock), as timm builds them.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import timm
import torch.nn as nn
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._registry import _model_with_tags, model_entrypoint

from ..conversion import convert_to_fdconv, reference_gate
from ._fdconv import build_fdconv_model, dense_tag_cfg, pop_fdconv_options

__all__ = ['PLACEMENT_OPTIONS', 'SHIPPED', 'create_model', 'ensure_registered', 'placement', 'register_fdconv']

SUFFIX = '_fdconv'

# the families registered at import: one line each in the README's model table
SHIPPED = (
    'vit_small_patch16_224', 'vit_base_patch16_224', 'vit_large_patch16_224',
    'deit3_small_patch16_224', 'deit3_base_patch16_224',
    'efficientnet_b0', 'efficientnet_b1', 'efficientnet_b2', 'efficientnet_b3', 'tf_efficientnet_lite0',
    'convnextv2_tiny', 'convnextv2_small', 'convnextv2_base',
    'regnety_016', 'regnety_040', 'regnety_080',
)

# constructor keywords of the placement, and their defaults (the paper's rule)
PLACEMENT_OPTIONS = {'fdconv_depthwise': False, 'fdconv_attention': False, 'fdconv_patch_embed': False}
# modules that stay dense whatever the layer: squeeze-excitation (a 1x1 "image"), shortcuts (as in the zoo's
# ResNets), attention pooling and classifier heads
_ALWAYS_DENSE = frozenset({'se', 'downsample', 'shortcut', 'attn_pool', 'head', 'fc_norm'})

_registry_lock = threading.Lock()
_build_lock = threading.RLock()


def placement(fdconv_depthwise: bool = False, fdconv_attention: bool = False,
              fdconv_patch_embed: bool = False) -> Callable[[str, nn.Module], bool]:
    """Which layers become FDConv: the paper's rule (``conversion.reference_gate``: convolutions with
    min(Cin, Cout) > 16 and kernels 1 or 3 wide, and the linears of MLP/FFN blocks), never inside squeeze-excitation,
    shortcuts or heads, and without depthwise convolutions; ``fdconv_depthwise`` adds depthwise convolutions of
    any kernel size, ``fdconv_attention`` the qkv and output projections of attention, ``fdconv_patch_embed``
    the patch embedding."""
    def rule(name: str, module: nn.Module) -> bool:
        parts = name.split('.')
        if _ALWAYS_DENSE.intersection(parts):
            return False
        if 'patch_embed' in parts:
            return fdconv_patch_embed and isinstance(module, nn.Conv2d) and module.groups == 1
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            return fdconv_depthwise and module.in_channels > 16
        if isinstance(module, nn.Linear) and len(parts) > 1 and parts[-2] == 'attn':
            return fdconv_attention and min(module.in_features, module.out_features) > 16
        return reference_gate(name, module)
    return rule


def _converting(model_cls: Any, rule: Callable[[str, nn.Module], bool], options: dict[str, Any]) -> Any:
    """``model_cls`` (a class, or a callable that builds the model) whose instances are converted as built."""
    if not isinstance(model_cls, type):
        @functools.wraps(model_cls)
        def build(*args: Any, **kwargs: Any) -> nn.Module:
            return convert_to_fdconv(model_cls(*args, **kwargs), rule=rule, **options)
        return build

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        model_cls.__init__(self, *args, **kwargs)
        convert_to_fdconv(self, rule=rule, **options)
    name = f'FD{model_cls.__name__}'
    return type(name, (model_cls,), {'__init__': __init__, '__module__': model_cls.__module__, '__qualname__': name,
                                     '__doc__': f"timm's {model_cls.__name__} with FDConv layers."})


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _family_module(family: str) -> types.ModuleType:
    """The module an FDConv entry point is registered from: named after the dense family's timm module (timm
    groups models by it: ``list_models(module='efficientnet')``, and its own test suite selects tests so), holding
    the ``default_cfgs`` that timm's register_model reads for the tags."""
    name = f'{__name__}.{family}'
    module = sys.modules.get(name)
    if module is None:
        module = sys.modules[name] = types.ModuleType(name, f"FDConv versions of timm's {family} models.")
        module.default_cfgs = {}
    return module


def _entrypoint(fd_name: str, dense_name: str) -> Callable[..., nn.Module]:
    dense_fn = model_entrypoint(dense_name)
    family = sys.modules[dense_fn.__module__]
    if not hasattr(family, 'build_model_with_cfg'):
        raise ValueError(f"timm architecture {dense_name!r} is not built with build_model_with_cfg; "
                         f"register_fdconv cannot convert it")

    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        rule = placement(**{k: kwargs.pop(k) for k in list(kwargs) if k in PLACEMENT_OPTIONS})
        options = pop_fdconv_options(kwargs)

        def build(model_cls: Any, variant: str, pretrained: bool, pretrained_filter_fn: Any = None,
                  **build_kwargs: Any) -> nn.Module:
            return build_fdconv_model(_converting(model_cls, rule, options), fd_name, pretrained, pretrained_filter_fn,
                                      **build_kwargs)
        with _build_lock, _patched(family, 'build_model_with_cfg', build):
            return dense_fn(pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = fd_name
    entry.__module__ = _family_module(family.__name__.rpartition('.')[2]).__name__
    entry.__doc__ = (f"timm's {dense_name} with FDConv layers (placement: fdconv_zoo.models.register.placement); "
                     f"FDConv options and {sorted(PLACEMENT_OPTIONS)} are keyword arguments.")
    return entry


def register_fdconv(dense_name: str) -> str:
    """Register the FDConv version of the timm architecture ``dense_name`` (no tag) as ``<dense_name>_fdconv``,
    with one tag per pretrained tag of ``dense_name`` (timm's default first); returns the new name. Registering
    a name again does nothing."""
    if '.' in dense_name or dense_name.endswith(SUFFIX) or not timm.is_model(dense_name):
        raise ValueError(f"{dense_name!r} is not a timm architecture (a name like 'efficientnet_b0', no tag)")
    fd_name = dense_name + SUFFIX
    with _registry_lock:
        if timm.is_model(fd_name):
            return fd_name
        entry = _entrypoint(fd_name, dense_name)
        module = sys.modules[entry.__module__]
        tags = [name for name in _model_with_tags.get(dense_name, []) if get_pretrained_cfg(name).has_weights]
        cfgs = {fd_name + name[len(dense_name):]: dense_tag_cfg(name) for name in tags}
        if not cfgs:  # an architecture without weights in timm: its data config, nothing to load
            cfg = get_pretrained_cfg(dense_name).to_dict()
            cfgs = {fd_name: {k: v for k, v in cfg.items() if k not in ('url', 'hf_hub_id', 'file', 'architecture',
                                                                         'tag', 'state_dict', 'source')}}
        module.default_cfgs.update(generate_default_cfgs(cfgs))
        setattr(module, fd_name, register_model(entry))
    return fd_name


def ensure_registered(architecture: str) -> None:
    """Register ``architecture`` (``<timm name>_fdconv``, e.g. read from a config.json) if it is not yet: a
    folder or Hub repo written for any architecture loads without registering it by hand."""
    if (isinstance(architecture, str) and architecture.endswith(SUFFIX) and '.' not in architecture
            and not timm.is_model(architecture)):
        dense_name = architecture[:-len(SUFFIX)]
        if timm.is_model(dense_name):
            register_fdconv(dense_name)


def create_model(model_name: str, **kwargs: Any) -> nn.Module:
    """timm.create_model that first registers the FDConv architecture it names (``<timm name>_fdconv``,
    directly or in the config.json of a ``hf-hub:`` repo or ``local-dir:`` folder): timm would not know it."""
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path
    if model_name.startswith('hf-hub:'):
        ensure_registered(load_model_config_from_hf(model_name[len('hf-hub:'):])[1])
    elif model_name.startswith('local-dir:'):
        ensure_registered(load_model_config_from_path(model_name[len('local-dir:'):])[1])
    else:
        ensure_registered(model_name.split('.')[0])
    return timm.create_model(model_name, **kwargs)


for _name in SHIPPED:
    register_fdconv(_name)
