"""FDConv ResNets: timm's ResNet with the residual-block convs as FDConv2d (stem and shortcuts stay dense).

Bottleneck nets (50/101/152) convert conv1, conv2 and conv3 of every block, as the paper's ResNet-50;
basic-block nets (18/34) convert both 3x3 convs. Tags load timm's dense checkpoints, converted while loading.
"""
from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..conversion import convert_to_fdconv
from ._fdconv import build_fdconv_model, dense_tag_cfg, pop_fdconv_options

__all__ = ['FDResNet']


def _is_block_conv(name: str, module: Any) -> bool:
    return name.startswith('layer') and '.conv' in name and 'downsample' not in name


class FDResNet(ResNet):
    """ResNet whose residual-block convs are FDConv2d; FDConv options are keyword arguments (see FDConv2d)."""

    def __init__(self, *args: Any, **kwargs: Any):
        options = pop_fdconv_options(kwargs)
        super().__init__(*args, **kwargs)
        convert_to_fdconv(self, rule=_is_block_conv, **options)


def _create_fdresnet(variant: str, pretrained: bool = False, **kwargs: Any) -> FDResNet:
    return build_fdconv_model(FDResNet, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    'resnet18_fdconv.a1_in1k': dense_tag_cfg('resnet18.a1_in1k'),
    'resnet18_fdconv.tv_in1k': dense_tag_cfg('resnet18.tv_in1k'),
    'resnet34_fdconv.a1_in1k': dense_tag_cfg('resnet34.a1_in1k'),
    'resnet34_fdconv.tv_in1k': dense_tag_cfg('resnet34.tv_in1k'),
    'resnet50_fdconv.a1_in1k': dense_tag_cfg('resnet50.a1_in1k'),
    'resnet50_fdconv.tv_in1k': dense_tag_cfg('resnet50.tv_in1k'),
    'resnet50_fdconv.tv2_in1k': dense_tag_cfg('resnet50.tv2_in1k'),
    'resnet101_fdconv.a1h_in1k': dense_tag_cfg('resnet101.a1h_in1k'),
    'resnet101_fdconv.tv2_in1k': dense_tag_cfg('resnet101.tv2_in1k'),
    'resnet152_fdconv.a1h_in1k': dense_tag_cfg('resnet152.a1h_in1k'),
    'resnet152_fdconv.tv2_in1k': dense_tag_cfg('resnet152.tv2_in1k'),
})


@register_model
def resnet18_fdconv(pretrained: bool = False, **kwargs: Any) -> FDResNet:
    """ResNet-18 with FDConv in both 3x3 convs of every basic block."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_fdresnet('resnet18_fdconv', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet34_fdconv(pretrained: bool = False, **kwargs: Any) -> FDResNet:
    """ResNet-34 with FDConv in both 3x3 convs of every basic block."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3))
    return _create_fdresnet('resnet34_fdconv', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_fdconv(pretrained: bool = False, **kwargs: Any) -> FDResNet:
    """ResNet-50 with FDConv in all three convs of every bottleneck (the paper's ResNet-50, +3.65M params)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_fdresnet('resnet50_fdconv', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_fdconv(pretrained: bool = False, **kwargs: Any) -> FDResNet:
    """ResNet-101 with FDConv in all three convs of every bottleneck."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3))
    return _create_fdresnet('resnet101_fdconv', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet152_fdconv(pretrained: bool = False, **kwargs: Any) -> FDResNet:
    """ResNet-152 with FDConv in all three convs of every bottleneck."""
    model_args = dict(block=Bottleneck, layers=(3, 8, 36, 3))
    return _create_fdresnet('resnet152_fdconv', pretrained, **dict(model_args, **kwargs))
