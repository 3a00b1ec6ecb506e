"""timm-registered FDConv model families; importing this registers them with timm."""
from ._fdconv import stage_of
from .convnext import FDConvNeXt
from .register import create_model, ensure_registered, placement, register_fdconv
from .resnet import FDResNet
from .swin_transformer import FDSwinTransformer

__all__ = ['FDConvNeXt', 'FDResNet', 'FDSwinTransformer', 'create_model', 'ensure_registered', 'placement',
           'register_fdconv', 'stage_of']
