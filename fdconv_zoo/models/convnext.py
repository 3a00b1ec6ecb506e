"""FDConv ConvNeXts: timm's ConvNeXt with the block MLP (fc1, fc2) as FDLinear, as the paper treats FFNs.

The 7x7 depthwise conv stays dense unless ``fdconv_dwconv=True``. Tags load timm's dense checkpoints,
converted while loading.
"""
from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt, checkpoint_filter_fn

from ..conversion import convert_to_fdconv
from ._fdconv import build_fdconv_model, dense_tag_cfg, pop_fdconv_options

__all__ = ['FDConvNeXt']


class FDConvNeXt(ConvNeXt):
    """ConvNeXt with FDConv MLPs; ``fdconv_dwconv`` also converts the depthwise convs. Other FDConv options
    are keyword arguments (see FDConv2d)."""

    def __init__(self, *args: Any, fdconv_dwconv: bool = False, **kwargs: Any):
        options = pop_fdconv_options(kwargs)
        super().__init__(*args, **kwargs)
        targets = ('mlp.fc1', 'mlp.fc2', 'conv_dw') if fdconv_dwconv else ('mlp.fc1', 'mlp.fc2')
        convert_to_fdconv(self, rule=lambda name, m: name.startswith('stages.') and name.endswith(targets),
                          **options)


def _create_fdconvnext(variant: str, pretrained: bool = False, **kwargs: Any) -> FDConvNeXt:
    return build_fdconv_model(
        FDConvNeXt, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs)


default_cfgs = generate_default_cfgs({
    'convnext_tiny_fdconv.fb_in22k_ft_in1k': dense_tag_cfg('convnext_tiny.fb_in22k_ft_in1k'),
    'convnext_tiny_fdconv.fb_in1k': dense_tag_cfg('convnext_tiny.fb_in1k'),
    'convnext_small_fdconv.fb_in22k_ft_in1k': dense_tag_cfg('convnext_small.fb_in22k_ft_in1k'),
    'convnext_small_fdconv.fb_in1k': dense_tag_cfg('convnext_small.fb_in1k'),
    'convnext_base_fdconv.fb_in22k_ft_in1k': dense_tag_cfg('convnext_base.fb_in22k_ft_in1k'),
    'convnext_base_fdconv.fb_in1k': dense_tag_cfg('convnext_base.fb_in1k'),
})


@register_model
def convnext_tiny_fdconv(pretrained: bool = False, **kwargs: Any) -> FDConvNeXt:
    """ConvNeXt-T with FDLinear block MLPs."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
    return _create_fdconvnext('convnext_tiny_fdconv', pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_small_fdconv(pretrained: bool = False, **kwargs: Any) -> FDConvNeXt:
    """ConvNeXt-S with FDLinear block MLPs."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768))
    return _create_fdconvnext('convnext_small_fdconv', pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_base_fdconv(pretrained: bool = False, **kwargs: Any) -> FDConvNeXt:
    """ConvNeXt-B with FDLinear block MLPs."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024))
    return _create_fdconvnext('convnext_base_fdconv', pretrained, **dict(model_args, **kwargs))
