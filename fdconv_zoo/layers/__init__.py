"""Math-only FDConv building blocks: FDW, KSM, FBM and the layers that compose them."""
from . import ops
from .fbm import FBM
from .fdconv import FDConv1d, FDConv2d, FDConv3d, FDLinear
from .fdw import (
    FourierDisjointWeight,
    check_grouping,
    dense_spectrum,
    matrix_to_weight,
    radial_grouping,
    weight_to_matrix,
)
from .ksm import GlobalAttention, KSMGlobal, KSMLocal, local_kernel_size
from .ops import (
    fourier_basis,
    native_kernels,
    native_kernels_enabled,
    release_workspace,
    set_native_kernels,
)

__all__ = [
    'FBM', 'FDConv1d', 'FDConv2d', 'FDConv3d', 'FDLinear', 'FourierDisjointWeight', 'GlobalAttention', 'KSMGlobal',
    'KSMLocal',
    'check_grouping', 'dense_spectrum', 'fourier_basis', 'local_kernel_size', 'matrix_to_weight', 'native_kernels',
    'native_kernels_enabled', 'ops', 'radial_grouping', 'release_workspace', 'set_native_kernels', 'weight_to_matrix',
]
