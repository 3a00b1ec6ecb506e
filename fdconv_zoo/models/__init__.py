"""timm-registered FDConv model families; importing this registers them with timm."""
from ._fdconv import stage_of
from .convnext import FDConvNeXt
from .resnet import FDResNet
from .swin_transformer import FDSwinTransformer

__all__ = ['FDConvNeXt', 'FDResNet', 'FDSwinTransformer', 'stage_of']
