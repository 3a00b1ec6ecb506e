"""FDConv's per-sample work as torch operators (``torch.ops.fdconv``): one seam for every backend.

- ``fdconv::synthesize``: per-sample weight matrices P = irfft2(spectrum * attention[group]) * sigmoid(local
  logits) * channel attention, (B, Cout*kr, Cg*kc) for a kernel of 1 to 3 axes (``synthesis.matrix_factors``: a
  k x k kernel is (Cout*k, Cg*k)); gradient ``fdconv::synthesize_backward``.
- ``fdconv::band_modulation``: FBM's band re-weighting of a map; gradient ``fdconv::band_modulation_backward``.
- ``fdconv::dynamic_conv``: what an FDConv layer does per sample after its KSM heads: FBM, the kernels (as
  ``synthesize``), the convolution with them (or the token product for FDLinear), spatial and filter attention
  and bias. Its gradient, ``fdconv::dynamic_conv_backward``, keeps only the inputs (activation- and
  vector-sized) and makes the kernels again: a layer's B x |W| values never outlive it, in training too.

Each operator has one implementation that runs on any device with plain PyTorch (whole batches: one 2-D FFT per
call, no CPU-cache slicing), a fake implementation, and its gradient registered with it (``registry``). Where
the tensors are float32 on the CPU, the switch is on (``set_native_kernels``) and the fused loops of ``native``
load, the same functions run those loops instead (``backend``). The math is by part: ``bands`` (FBM),
``synthesis`` (the kernels), ``conv`` (the per-sample convolution); ``portable`` is the export's decomposition.
"""
from .backend import (
    cpu_kernels,
    fft_dtype,
    native_kernels,
    native_kernels_enabled,
    region,
    release_workspace,
    set_native_kernels,
    workspace_bytes,
)
from .bands import basis_ranks, check_cutoffs, fourier_basis, kept_frequencies
from .registry import band_modulation, dynamic_conv, synthesize
from .synthesis import check_group_index, synthesis_fft_flops

__all__ = [
    'band_modulation', 'basis_ranks', 'check_cutoffs', 'check_group_index', 'cpu_kernels', 'dynamic_conv',
    'fft_dtype', 'fourier_basis', 'kept_frequencies', 'native_kernels', 'native_kernels_enabled', 'region',
    'release_workspace', 'set_native_kernels', 'synthesis_fft_flops', 'synthesize', 'workspace_bytes',
]
