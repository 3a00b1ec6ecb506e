"""FDConv Swin Transformers: timm's Swin with the block MLP (fc1, fc2) as FDLinear over the (B, H*W, C) tokens.

Tags load timm's dense checkpoints, converted while loading.
"""
from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

from ..conversion import convert_to_fdconv
from ._fdconv import build_fdconv_model, dense_tag_cfg, pop_fdconv_options

__all__ = ['FDSwinTransformer']


class FDSwinTransformer(SwinTransformer):
    """Swin Transformer with FDConv MLPs; FDConv options are keyword arguments (see FDConv2d)."""

    def __init__(self, *args: Any, **kwargs: Any):
        options = pop_fdconv_options(kwargs)
        super().__init__(*args, **kwargs)
        convert_to_fdconv(self, rule=lambda name, m: name.endswith(('mlp.fc1', 'mlp.fc2')), **options)


def _create_fdswin(variant: str, pretrained: bool = False, **kwargs: Any) -> FDSwinTransformer:
    default_out_indices = tuple(i for i, _ in enumerate(kwargs.get('depths', (1, 1, 3, 1))))
    out_indices = kwargs.pop('out_indices', default_out_indices)
    return build_fdconv_model(
        FDSwinTransformer, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs)


default_cfgs = generate_default_cfgs({
    'swin_tiny_patch4_window7_224_fdconv.ms_in1k': dense_tag_cfg('swin_tiny_patch4_window7_224.ms_in1k'),
    'swin_tiny_patch4_window7_224_fdconv.ms_in22k_ft_in1k': dense_tag_cfg(
        'swin_tiny_patch4_window7_224.ms_in22k_ft_in1k'),
    'swin_small_patch4_window7_224_fdconv.ms_in22k_ft_in1k': dense_tag_cfg(
        'swin_small_patch4_window7_224.ms_in22k_ft_in1k'),
    'swin_small_patch4_window7_224_fdconv.ms_in1k': dense_tag_cfg('swin_small_patch4_window7_224.ms_in1k'),
    'swin_base_patch4_window7_224_fdconv.ms_in22k_ft_in1k': dense_tag_cfg(
        'swin_base_patch4_window7_224.ms_in22k_ft_in1k'),
    'swin_base_patch4_window7_224_fdconv.ms_in1k': dense_tag_cfg('swin_base_patch4_window7_224.ms_in1k'),
})


@register_model
def swin_tiny_patch4_window7_224_fdconv(pretrained: bool = False, **kwargs: Any) -> FDSwinTransformer:
    """Swin-T @ 224 with FDLinear block MLPs."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_fdswin('swin_tiny_patch4_window7_224_fdconv', pretrained, **dict(model_args, **kwargs))


@register_model
def swin_small_patch4_window7_224_fdconv(pretrained: bool = False, **kwargs: Any) -> FDSwinTransformer:
    """Swin-S @ 224 with FDLinear block MLPs."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_fdswin('swin_small_patch4_window7_224_fdconv', pretrained, **dict(model_args, **kwargs))


@register_model
def swin_base_patch4_window7_224_fdconv(pretrained: bool = False, **kwargs: Any) -> FDSwinTransformer:
    """Swin-B @ 224 with FDLinear block MLPs."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_fdswin('swin_base_patch4_window7_224_fdconv', pretrained, **dict(model_args, **kwargs))
