"""timm-registered FDConv model families; importing this registers them with timm."""
from .convnext import FDConvNeXt
from .resnet import FDResNet
from .swin_transformer import FDSwinTransformer

__all__ = ['FDConvNeXt', 'FDResNet', 'FDSwinTransformer']
