"""fdconv_zoo: Frequency Dynamic Convolution (FDConv, CVPR 2025) layers and timm models."""
from .conversion import convert_to_fdconv, load_reference_checkpoint, reference_gate
from .hub import save_for_hf
from .layers import FDConv1d, FDConv2d, FDConv3d, FDLinear
from .models import FDConvNeXt, FDResNet, FDSwinTransformer, register_fdconv

__version__ = '0.1.0'
__all__ = [
    'FDConv1d', 'FDConv2d', 'FDConv3d', 'FDConvNeXt', 'FDLinear', 'FDResNet', 'FDSwinTransformer', '__version__',
    'convert_to_fdconv', 'load_reference_checkpoint', 'reference_gate', 'register_fdconv', 'save_for_hf',
]
