"""Fused CPU loops for kernel synthesis and FBM (``native.cpp``), compiled on first use, called through ctypes.

Each loop does in one pass over B x |W| values what takes PyTorch several (see native.cpp); where torch was
built with MKL, the synthesis and its adjoint call MKL's FFT (from libtorch) inside their loops. The library is
built with the system C++ compiler (``$CXX``, else ``c++``) for the CPU it runs on and cached in
``$FDCONV_ZOO_CACHE`` (default ``~/.cache/fdconv_zoo``) under a hash of source, compiler and CPU, so it is
built once per machine. Without a compiler, on other platforms, or with ``FDCONV_ZOO_NATIVE=0`` the layers use
their PyTorch code, which computes the same values more slowly. Only float32 CPU tensors take this path.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name('native.cpp')
_FLAGS = ['-O3', '-march=native', '-fno-math-errno', '-fopenmp', '-shared', '-fPIC', '-std=c++17']
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    **{f'fdconv_scale_spectrum_{index}': [_P, _P, _P, _P, _I, _I, _I, _I] for index in ('u8', 'i32')},
    **{f'fdconv_spectrum_adjoint_{index}': [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I] for index in ('u8', 'i32')},
    'fdconv_transpose8': [_P, _P, _I, _I, _I, _I, _I, _I, _I],
    'fdconv_local_modulation': [_P, _I, _I, _P, _P, _I, _I, _P, _P, _P, _I, _I, _I, _I, _I, _I],
    'fdconv_local_modulation_backward': [_P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I],
    'fdconv_set_fft': [_P, _P, _P, _P, _P],
    'fdconv_band_modulation': [_P, _P, _P, _P, _I, _P, _I, _P, _P, _I, _I, _I, _I, _I],
    **{f'fdconv_synthesize_{index}': [_P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I]
       for index in ('u8', 'i32')},
    **{f'fdconv_synthesis_gradient_{index}': [_P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I]
       for index in ('u8', 'i32')},
}
_RETURNS = {f'fdconv_{name}_{index}': ctypes.c_int64
            for name in ('synthesize', 'synthesis_gradient') for index in ('u8', 'i32')}
# MKL's FFT inside libtorch (torch built with MKL), which fdconv_synthesize_* call
_DFTI = ('DftiCreateDescriptor_s_1d', 'DftiSetValue', 'DftiCommitDescriptor', 'DftiComputeBackward',
         'DftiComputeForward')


def _cpu_signature() -> str:
    """What the compiled code depends on besides the source: the CPU's instruction set extensions."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((line for line in f if line.startswith(('flags', 'Features'))), '')
    except OSError:
        return platform.processor()


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, '--version'], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256('\0'.join([_SOURCE.read_text(), version, ' '.join(_FLAGS), _cpu_signature()]).encode())
    cache = Path(os.environ.get('FDCONV_ZOO_CACHE', Path.home() / '.cache' / 'fdconv_zoo'))
    target = cache / f'fdconv_native_{key.hexdigest()[:16]}.so'
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix='.so.tmp')
        os.close(fd)
        try:
            subprocess.run([compiler, *_FLAGS, str(_SOURCE), '-o', tmp], capture_output=True, text=True, check=True)
            os.replace(tmp, target)  # atomic: other processes see no library or a whole one
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    if os.environ.get('FDCONV_ZOO_NATIVE', '1') == '0':
        return None
    if not sys.platform.startswith('linux') or platform.machine() not in ('x86_64', 'aarch64'):
        return None
    compiler = shutil.which(os.environ.get('CXX', 'c++'))
    if compiler is None:
        warnings.warn("fdconv_zoo: no C++ compiler found ($CXX or c++); FDConv layers use their slower PyTorch "
                      "code on the CPU", RuntimeWarning, stacklevel=3)
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, 'stderr', '') or str(e)
        warnings.warn(f"fdconv_zoo: building the fused CPU loops failed; FDConv layers use their slower PyTorch "
                      f"code on the CPU. {detail.strip()[:2000]}", RuntimeWarning, stacklevel=3)
        return None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, _RETURNS.get(name)
    return lib


def _connect_fft(lib: ctypes.CDLL) -> bool:
    """Hand the loops MKL's FFT functions from libtorch; False where torch was built without MKL."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        torch_lib = ctypes.CDLL(str(Path(torch.__file__).parent / 'lib' / 'libtorch_cpu.so'))
        lib.fdconv_set_fft(*(ctypes.cast(getattr(torch_lib, name), ctypes.c_void_p) for name in _DFTI))
    except (OSError, AttributeError):
        return False
    return True


def library() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be used (built once per process)."""
    if 'lib' not in _state:
        with _lock:
            if 'lib' not in _state:
                lib = _load()
                _state['fft'] = lib is not None and _connect_fft(lib)
                _state['lib'] = lib
    return _state['lib']


def fft_usable() -> bool:
    """Whether :func:`synthesize` can run: the library and MKL's FFT (torch's x86-64 builds have it)."""
    return library() is not None and _state.get('fft', False)


@contextlib.contextmanager
def switched_off() -> Iterator[None]:
    """Inside this block the layers run their PyTorch code, e.g. so that torch's operation counters see every
    FFT and matrix product. It switches the loops off for the whole process, so it is not for concurrent use."""
    lib = library()
    _state['lib'] = None
    try:
        yield
    finally:
        _state['lib'] = lib


def usable_for(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused loops apply to tensors of this dtype on this device: float32 on the CPU, and a library."""
    return dtype == torch.float32 and device.type == 'cpu' and library() is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused loops apply to all of these tensors (see :func:`usable_for`)."""
    return all(usable_for(t.dtype, t.device) for t in tensors)


def group_index(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """A (C, R) bin -> group map in the narrowest index type the loops take: uint8 for n <= 256, else int32."""
    return group.to(torch.uint8 if num_groups <= 256 else torch.int32).contiguous()


def _suffix(group: torch.Tensor) -> str:
    if group.dtype not in (torch.uint8, torch.int32):
        raise ValueError(f"group index must be uint8 or int32 (see group_index), got {group.dtype}")
    return 'u8' if group.dtype == torch.uint8 else 'i32'


def scale_spectrum(spectrum: torch.Tensor, group: torch.Tensor, attention: torch.Tensor, out: torch.Tensor) -> None:
    """out[c, b, r] = spectrum[c, r] * attention[b, group[c, r]]: spectrum (C, R, 2), group (C, R) from
    :func:`group_index`, attention (B, n), out (C, B, R, 2); all contiguous."""
    (cols, rows, _), (batch, groups) = spectrum.shape, attention.shape
    _check_contiguous(spectrum=spectrum, group=group, attention=attention, out=out)
    assert tuple(out.shape) == (cols, batch, rows, 2)
    getattr(library(), f'fdconv_scale_spectrum_{_suffix(group)}')(
        spectrum.data_ptr(), group.data_ptr(), attention.data_ptr(), out.data_ptr(), cols, rows, batch, groups)


def spectrum_adjoint(
        grad: torch.Tensor,
        spectrum: torch.Tensor,
        group: torch.Tensor,
        weight: torch.Tensor,
        attention: torch.Tensor,
        grad_spectrum: torch.Tensor,
        grad_attention: torch.Tensor,
) -> None:
    """Adjoint of :func:`scale_spectrum` for a slice of columns, each column's bins weighted by ``weight``:
    writes grad_spectrum (C, R, 2) and adds to grad_attention (B, n); grad (C, B, R, 2); all contiguous."""
    cols, batch, rows, _ = grad.shape
    _check_contiguous(grad=grad, spectrum=spectrum, group=group, weight=weight, attention=attention,
                      grad_spectrum=grad_spectrum, grad_attention=grad_attention)
    assert tuple(spectrum.shape) == tuple(grad_spectrum.shape) == (cols, rows, 2)
    assert tuple(weight.shape) == (cols,) and tuple(grad_attention.shape) == tuple(attention.shape)
    getattr(library(), f'fdconv_spectrum_adjoint_{_suffix(group)}')(
        grad.data_ptr(), spectrum.data_ptr(), group.data_ptr(), weight.data_ptr(), attention.data_ptr(),
        grad_spectrum.data_ptr(), grad_attention.data_ptr(), cols, batch, rows, attention.shape[1])


def transpose(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[b, j, i] = src[b, i, j] for complex64 (or 8-byte) views (B, I, J) -> (B, J, I) whose last dims have
    unit stride; a blocked copy (torch's strided copy reads one side a value per cache line)."""
    batch, n_i, n_j = src.shape
    assert tuple(dst.shape) == (batch, n_j, n_i) and src.element_size() == dst.element_size() == 8
    assert src.stride(2) == 1 and dst.stride(2) == 1
    library().fdconv_transpose8(
        src.data_ptr(), dst.data_ptr(), batch, n_i, n_j, src.stride(1), src.stride(0), dst.stride(1), dst.stride(0))


def local_modulation(
        matrix: torch.Tensor,
        out: torch.Tensor,
        sigmoid_out: torch.Tensor | None,
        taps: torch.Tensor,
        windows: torch.Tensor,
        channel: torch.Tensor | None,
        kernel_size: int,
        first_row: int,
) -> None:
    """out = matrix * sigmoid(L) (* channel[b, i] if given) for rows [first_row, first_row + rows) of the weight
    matrix, with the local logits L made on the fly from ``taps`` (Cout*k*k, K) and ``windows`` (B, Cin, K);
    sigmoid(L) also goes to ``sigmoid_out`` (laid out like ``out``) if given. matrix, out: (B, rows, Cin*k)
    views, unit column stride; channel (B, Cin) contiguous."""
    batch, rows, cols = matrix.shape
    in_channels, taps_k = windows.shape[1:]
    assert cols == in_channels * kernel_size and tuple(out.shape) == tuple(matrix.shape)
    assert matrix.stride(2) == 1 and out.stride(2) == 1
    _check_contiguous(taps=taps, windows=windows)
    scale = _optional('channel', channel, (batch, in_channels))
    sig = 0
    if sigmoid_out is not None:
        assert sigmoid_out.shape == out.shape and sigmoid_out.stride() == out.stride()
        sig = sigmoid_out.data_ptr()
    library().fdconv_local_modulation(
        matrix.data_ptr(), matrix.stride(1), matrix.stride(0), out.data_ptr(), sig, out.stride(1), out.stride(0),
        taps.data_ptr(), windows.data_ptr(), scale, batch, in_channels, kernel_size, taps_k, first_row, rows)


@dataclass(frozen=True)
class LocalModulation:
    """The local KSM product P = M * sigmoid(L) (* channel[b, i]) as the loops take it: callable on a slice of
    rows like ``fdw.Modulation``, or handed whole to :func:`synthesize`, which applies it inside the transform.
    taps (Cout*k*k, K), windows (B, Cin, K), channel (B, Cin) or None, all contiguous; sigmoid(L) also goes to
    ``sigmoid_out`` (B, Cout*k, Cin*k) if given."""

    taps: torch.Tensor
    windows: torch.Tensor
    channel: torch.Tensor | None
    kernel_size: int
    sigmoid_out: torch.Tensor | None = None

    def __call__(self, part: torch.Tensor, out: torch.Tensor, first_row: int) -> None:
        sig = None if self.sigmoid_out is None else self.sigmoid_out[:, first_row:first_row + part.shape[1]]
        local_modulation(part, out, sig, self.taps, self.windows, self.channel, self.kernel_size, first_row)


def synthesize(
        spectrum: torch.Tensor,
        group: torch.Tensor,
        attention: torch.Tensor,
        columns: torch.Tensor,
        out: torch.Tensor,
        modulation: LocalModulation | None,
) -> bool:
    """out[b] = irfft2 of the half spectrum scaled per group (``scale_spectrum``), times ``modulation`` if given,
    in two passes over cache-sized blocks with MKL's FFT inside them (see :func:`fft_usable`). spectrum
    (C/2+1, R, 2) column-major, group (C/2+1, R) from :func:`group_index`, attention (B, n), columns scratch of
    R*B*(C/2+1)*2 floats, out (B, R, C); ``modulation`` without ``sigmoid_out``. False (out not written) where
    MKL refused a transform size."""
    (half, rows, _), (batch, groups), cols = spectrum.shape, attention.shape, out.shape[-1]
    _check_contiguous(spectrum=spectrum, group=group, attention=attention, columns=columns, out=out)
    assert tuple(out.shape) == (batch, rows, cols) and half == cols // 2 + 1
    assert columns.numel() >= rows * batch * half * 2 and columns.dtype == out.dtype
    pointers, k, taps_k = [0, 0, 0], 1, 0
    if modulation is not None:
        m = modulation
        _check_contiguous(taps=m.taps, windows=m.windows)
        assert m.windows.shape[:2] == (batch, cols // m.kernel_size) and m.sigmoid_out is None
        pointers = [m.taps.data_ptr(), m.windows.data_ptr(), _optional('channel', m.channel, m.windows.shape[:2])]
        k, taps_k = m.kernel_size, m.windows.shape[2]
    status = getattr(library(), f'fdconv_synthesize_{_suffix(group)}')(
        spectrum.data_ptr(), group.data_ptr(), attention.data_ptr(), columns.data_ptr(), out.data_ptr(), *pointers,
        batch, rows, cols, groups, k, taps_k)
    return status == 0


def local_modulation_backward(
        product: torch.Tensor,
        grad: torch.Tensor,
        taps: torch.Tensor,
        windows: torch.Tensor,
        channel: torch.Tensor | None,
        kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward of P = M * sigmoid(L) (* channel[b, i] if given) over whole matrices (B, R, Cin*k), the logits
    made again on the fly. Turns ``grad`` (dLoss/dP) into dLoss/dM in place and returns sum_i P*dP per
    (sample, row, v) (B, R, k), the gradients of the taps (Cout*k*k, K) and of the windows (B, Cin, K), and
    sum_(row, v) P*dP per (sample, Cin) (None without ``channel``)."""
    batch, rows, _ = product.shape
    in_channels, taps_k = windows.shape[1:]
    _check_contiguous(product=product, grad=grad, taps=taps, windows=windows)
    assert product.shape == grad.shape and product.shape[2] == in_channels * kernel_size
    per_tap = torch.empty(batch, rows, kernel_size, dtype=product.dtype)
    grad_taps = torch.zeros(taps.shape, dtype=product.dtype)
    grad_windows = torch.empty(windows.shape, dtype=product.dtype)
    scale = _optional('channel', channel, (batch, in_channels))
    channel_sums = None if channel is None else torch.empty(batch, in_channels, dtype=product.dtype)
    library().fdconv_local_modulation_backward(
        product.data_ptr(), grad.data_ptr(), taps.data_ptr(), windows.data_ptr(), scale, per_tap.data_ptr(),
        grad_taps.data_ptr(), grad_windows.data_ptr(), 0 if channel_sums is None else channel_sums.data_ptr(),
        batch, rows, in_channels, kernel_size, taps_k)
    return per_tap, grad_taps, grad_windows, channel_sums


def synthesis_gradient(
        grad: torch.Tensor,
        spectrum: torch.Tensor,
        group: torch.Tensor,
        weight: torch.Tensor,
        attention: torch.Tensor,
        columns: torch.Tensor,
        grad_spectrum: torch.Tensor,
        grad_attention: torch.Tensor,
) -> bool:
    """Adjoint of :func:`synthesize` without modulation, in two passes with MKL's FFT inside: grad (B, R, C) ->
    grad_spectrum (C/2+1, R, 2), written, and the attention's gradient, added to grad_attention (B, n); the bins
    of column c weighted by weight[c] (see ``FDW.gradient``); columns: scratch of (C/2+1)*B*R*2 floats. False
    (outputs not written) where MKL refused a transform size."""
    (batch, rows, cols), half = grad.shape, spectrum.shape[0]
    _check_contiguous(grad=grad, spectrum=spectrum, group=group, weight=weight, attention=attention,
                      columns=columns, grad_spectrum=grad_spectrum, grad_attention=grad_attention)
    assert tuple(spectrum.shape) == tuple(grad_spectrum.shape) == (half, rows, 2) and half == cols // 2 + 1
    assert tuple(weight.shape) == (half,) and tuple(grad_attention.shape) == tuple(attention.shape)
    assert attention.shape[0] == batch and columns.numel() >= half * batch * rows * 2
    status = getattr(library(), f'fdconv_synthesis_gradient_{_suffix(group)}')(
        grad.data_ptr(), spectrum.data_ptr(), group.data_ptr(), weight.data_ptr(), attention.data_ptr(),
        columns.data_ptr(), grad_spectrum.data_ptr(), grad_attention.data_ptr(), batch, rows, cols,
        attention.shape[1])
    return status == 0


def band_modulation(
        x: torch.Tensor,
        band_scale: torch.Tensor,
        basis_h: torch.Tensor,
        ranks_h: tuple[int, ...],
        basis_w: torch.Tensor,
        ranks_w: tuple[int, ...],
) -> torch.Tensor:
    """FBM's output without autograd (see fbm.FBM.forward): x (B, C, H, W) and band scales A (B, J, H, W),
    bases (H, >= max ranks_h) and (W, >= max ranks_w) from ``fbm.fourier_basis``; a fresh (B, C, H, W)."""
    batch, channels, height, width = x.shape
    bands = band_scale.shape[1]
    _check_contiguous(x=x, band_scale=band_scale)
    assert tuple(band_scale.shape) == (batch, bands, height, width) and len(ranks_h) == len(ranks_w) == bands
    assert basis_h.stride(1) == basis_w.stride(1) == 1 and basis_h.shape[0] == height and basis_w.shape[0] == width
    assert basis_h.shape[1] >= max(ranks_h) and basis_w.shape[1] >= max(ranks_w)
    ranks = torch.tensor([ranks_h, ranks_w], dtype=torch.int64)
    out = torch.empty_like(x)
    library().fdconv_band_modulation(
        x.data_ptr(), band_scale.data_ptr(), out.data_ptr(), basis_h.data_ptr(), basis_h.stride(0),
        basis_w.data_ptr(), basis_w.stride(0), ranks[0].data_ptr(), ranks[1].data_ptr(), batch, channels, bands,
        height, width)
    return out


def _optional(name: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> int:
    """Address of an optional contiguous tensor of ``shape`` (0, a null pointer, for None)."""
    if tensor is None:
        return 0
    _check_contiguous(**{name: tensor})
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor.data_ptr()


def _check_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the fused CPU loops, got strides {t.stride()}")
