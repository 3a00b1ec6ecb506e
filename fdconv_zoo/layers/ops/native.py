"""Fused CPU loops for kernel synthesis and FBM (``native.cpp``): the float32 CPU kernels of the ``fdconv``
operators, compiled on first use and called through ctypes.

Each loop does in one pass over B x |W| values what takes PyTorch several (see native.cpp); the synthesis and
its adjoint call MKL's FFT (from the libtorch of torch's x86-64 builds) inside their loops. Every tensor that
crosses into native code is checked here (dtype, device, contiguity, shapes), group ids are checked where the
loops read them, and a failing loop (out of memory included) raises a Python exception. The library is
built with the system C++ compiler (``$CXX``, else ``c++``) for the CPU it runs on and cached in
``$FDCONV_ZOO_CACHE`` (default ``~/.cache/fdconv_zoo``) under a hash of source, compiler and CPU, so it is
built once per machine. Without a compiler or on other platforms the layers use the operators' PyTorch code,
which computes the same values more slowly; whether the loops are used at all is the switch of ``backend``
(``FDCONV_ZOO_NATIVE=0``, ``set_native_kernels``).
"""
from __future__ import annotations

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
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name('native.cpp')
_FLAGS = ['-O3', '-march=native', '-fno-math-errno', '-fopenmp', '-shared', '-fPIC', '-std=c++17']
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}

_P, _I = ctypes.c_void_p, ctypes.c_int64
# every entry point, its argument types and its status return (FDCONV_OK = 0, see native.cpp)
_SIGNATURES = {
    'fdconv_workspace_floats': [_I] * 6,
    'fdconv_set_fft': [_P] * 6,
    'fdconv_release_fft': [],
    'fdconv_fft_plans': [],
    'fdconv_local_modulation_backward': [_P] * 9 + [_I] * 5,
    'fdconv_band_modulation': [_P, _P, _P, _P, _I, _P, _I, _P, _P, _P] + [_I] * 5,
    **{f'fdconv_synthesize_{index}': [_P] * 9 + [_I] * 6 for index in ('u8', 'i32')},
    **{f'fdconv_synthesis_gradient_{index}': [_P] * 9 + [_I] * 4 for index in ('u8', 'i32')},
}


class FFTRefused(RuntimeError):
    """MKL's FFT refused a transform size: the caller runs the PyTorch code instead."""


_STATUS = {1: (FFTRefused, "MKL's FFT refused a transform size"), 2: (MemoryError, "out of memory"),
           3: (ValueError, "a group id of the bin -> group map (fdw.group_index) is outside [0, n)")}
# MKL's FFT inside libtorch (torch built with MKL), which the synthesis and its adjoint call
_DFTI = ('DftiCreateDescriptor_s_1d', 'DftiSetValue', 'DftiCommitDescriptor', 'DftiComputeBackward',
         'DftiComputeForward', 'DftiFreeDescriptor')


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
        function.argtypes = argtypes
        function.restype = None if name in ('fdconv_set_fft', 'fdconv_release_fft') else ctypes.c_int64
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


def library(reload: bool = False) -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be used (built and loaded once per process; ``reload``
    builds or finds it again, e.g. after the compiler or cache changed). Its loops need MKL's FFT from libtorch
    (torch's x86-64 builds); without it the operators run their PyTorch code."""
    if reload:
        with _lock:
            _state.clear()
    if 'lib' not in _state:
        with _lock:
            if 'lib' not in _state:
                lib = _load()
                _state['lib'] = lib if lib is not None and _connect_fft(lib) else None
    return _state['lib']


def release_fft_plans() -> None:
    """Free the loops' cached FFT descriptors (of every thread), once no loop runs."""
    lib = _state.get('lib')
    if lib is not None:
        lib.fdconv_release_fft()


def fft_plans() -> int:
    """How many FFT descriptors the loops hold (each thread keeps at most a few per transform size)."""
    lib = _state.get('lib')
    return 0 if lib is None else int(lib.fdconv_fft_plans())


def workspace_floats(kind: int, *sizes: int) -> int:
    """Floats of the per-thread block buffers (``work``) that a loop needs (see fdconv_workspace_floats)."""
    return int(library().fdconv_workspace_floats(kind, *sizes, *[0] * (5 - len(sizes))))


def _call(name: str, *args: int | None) -> None:
    status = getattr(library(), name)(*args)
    if status:
        error, what = _STATUS.get(status, (RuntimeError, f"status {status}"))
        raise error(f"fdconv native loop {name}: {what}")


def _check(name: str, t: torch.Tensor | None, shape: tuple[int, ...] | None = None,
           dtype: torch.dtype = torch.float32, min_numel: int | None = None) -> int:
    """Validate one tensor that crosses into native code and return its address (0 for None): dtype, device,
    contiguity and shape (or at least ``min_numel`` elements). Real errors, not asserts (python -O keeps them)."""
    if t is None:
        return 0
    if t.dtype != dtype or t.device.type != 'cpu':
        raise TypeError(f"{name} must be a {dtype} CPU tensor for the fused loops, got {t.dtype} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous for the fused loops, got strides {t.stride()}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if min_numel is not None and t.numel() < min_numel:
        raise ValueError(f"{name} has {t.numel()} elements, needs at least {min_numel}")
    return t.data_ptr()


def _index_suffix(group: torch.Tensor, shape: tuple[int, ...]) -> str:
    """The group index is uint8 (n <= 256) or int32; its ids are checked in the loops where they are read."""
    if group.dtype not in (torch.uint8, torch.int32):
        raise TypeError(f"group index must be uint8 or int32, got {group.dtype}")
    _check('group index', group, shape, group.dtype)
    return 'u8' if group.dtype == torch.uint8 else 'i32'


def synthesize(
        spectrum: torch.Tensor,
        group: torch.Tensor,
        attention: torch.Tensor,
        taps: torch.Tensor | None,
        windows: torch.Tensor | None,
        channel: torch.Tensor | None,
        kernel_size: int,
        columns: torch.Tensor,
        work: torch.Tensor,
        out: torch.Tensor,
) -> None:
    """out[b] = irfft2 of the half spectrum scaled per group, times sigmoid(local logits) * channel[b, i] if
    taps are given (groups = 1), in two passes over cache-sized blocks with MKL's FFT inside. spectrum (H, R, 2)
    column-major (H = C/2+1), group (H, R), attention (B, n), taps (R*k, K), windows (B, Cin, K), channel
    (B, Cin) or None, out (B, R, C) with C = Cin*k (k: the kernel's column factor, ``synthesis.matrix_factors``);
    columns and work are scratch (see :func:`workspace_floats`)."""
    if spectrum.ndim != 3 or out.ndim != 3 or attention.ndim != 2:
        raise ValueError(f"spectrum {tuple(spectrum.shape)} does not fit matrices {tuple(out.shape)} and "
                         f"attention {tuple(attention.shape)}")
    (half, rows, _), (batch, groups), cols = spectrum.shape, attention.shape, out.shape[-1]
    k, taps_k = kernel_size, 0
    if half != cols // 2 + 1 or cols % k:
        raise ValueError(f"spectrum {tuple(spectrum.shape)} does not fit matrices {tuple(out.shape)} of k={k}")
    pointers = [_check('spectrum', spectrum, (half, rows, 2)), 0, _check('attention', attention, (batch, groups))]
    suffix = _index_suffix(group, (half, rows))
    if taps is not None:
        taps_k = windows.shape[-1]
        local = [_check('taps', taps, (rows * k, taps_k)), _check('windows', windows, (batch, cols // k, taps_k)),
                 _check('channel', channel, (batch, cols // k))]
    else:
        local = [0, 0, 0]
    _call(f'fdconv_synthesize_{suffix}', pointers[0], group.data_ptr(), pointers[2],
          _check('columns', columns, min_numel=rows * batch * half * 2), _check('out', out, (batch, rows, cols)),
          *local, _check('work', work, min_numel=workspace_floats(0, batch, rows, cols)), batch, rows, cols, groups,
          k, taps_k)


def synthesis_gradient(
        grad: torch.Tensor,
        spectrum: torch.Tensor,
        group: torch.Tensor,
        weight: torch.Tensor,
        attention: torch.Tensor,
        columns: torch.Tensor,
        work: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjoint of :func:`synthesize` without modulation, in two passes with MKL's FFT inside: grad (B, R, C) ->
    (gradient of the spectrum (H, R, 2), of the attention (B, n)); the bins of column c weighted by weight[c]
    (see synthesis.spectrum_adjoint); columns and work are scratch."""
    if grad.ndim != 3 or attention.ndim != 2:
        raise ValueError(f"grad {tuple(grad.shape)} must be (B, R, C) and attention {tuple(attention.shape)} (B, n)")
    batch, rows, cols = grad.shape
    half = cols // 2 + 1
    grad_spectrum = torch.empty(half, rows, 2)
    grad_attention = torch.zeros(batch, attention.shape[1])
    suffix = _index_suffix(group, (half, rows))
    _call(f'fdconv_synthesis_gradient_{suffix}', _check('grad', grad), _check('spectrum', spectrum, (half, rows, 2)),
          group.data_ptr(), _check('weight', weight, (half,)),
          _check('attention', attention, (batch, attention.shape[1])),
          _check('columns', columns, min_numel=half * batch * rows * 2),
          grad_spectrum.data_ptr(), grad_attention.data_ptr(),
          _check('work', work, min_numel=workspace_floats(1, batch, rows, cols)), batch, rows, cols,
          attention.shape[1])
    return grad_spectrum, grad_attention


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
    (sample, row, v) (B, R, k), the gradients of the taps (R*k, K) and of the windows (B, Cin, K), and
    sum_(row, v) P*dP per (sample, Cin) (None without ``channel``)."""
    if product.ndim != 3 or windows.ndim != 3:
        raise ValueError(f"product {tuple(product.shape)} must be (B, R, C) and windows {tuple(windows.shape)} "
                         f"(B, Cin, K)")
    (batch, rows, cols), k = product.shape, kernel_size
    in_channels, taps_k = windows.shape[1:]
    if cols != in_channels * k:
        raise ValueError(f"matrices {tuple(product.shape)} do not fit windows {tuple(windows.shape)} and k={k}")
    per_tap = torch.empty(batch, rows, k)
    grad_taps = torch.zeros(rows * k, taps_k)
    grad_windows = torch.empty(batch, in_channels, taps_k)
    channel_sums = None if channel is None else torch.empty(batch, in_channels)
    _call('fdconv_local_modulation_backward', _check('product', product), _check('grad', grad, product.shape),
          _check('taps', taps, (rows * k, taps_k)), _check('windows', windows, (batch, in_channels, taps_k)),
          _check('channel', channel, (batch, in_channels)), per_tap.data_ptr(), grad_taps.data_ptr(),
          grad_windows.data_ptr(), 0 if channel_sums is None else channel_sums.data_ptr(), batch, rows, in_channels,
          k, taps_k)
    return per_tap, grad_taps, grad_windows, channel_sums


def band_modulation(
        x: torch.Tensor,
        band_scale: torch.Tensor,
        basis_h: torch.Tensor,
        ranks_h: tuple[int, ...],
        basis_w: torch.Tensor,
        ranks_w: tuple[int, ...],
        work: torch.Tensor,
) -> torch.Tensor:
    """FBM's output (see ops.band_modulation): x (B, C, H, W) and band scales A (B, J, H, W), bases (H, >= max
    ranks_h) and (W, >= max ranks_w) from ``ops.fourier_basis``; a fresh (B, C, H, W). work is scratch."""
    if x.ndim != 4 or band_scale.ndim != 4 or basis_h.ndim != 2 or basis_w.ndim != 2:
        raise ValueError(f"x {tuple(x.shape)} and band scales {tuple(band_scale.shape)} must be 4-D, the bases 2-D")
    batch, channels, height, width = x.shape
    bands = band_scale.shape[1]
    if len(ranks_h) != bands or len(ranks_w) != bands or min(ranks_h + ranks_w) < 0:
        raise ValueError(f"need {bands} ranks per axis, got {ranks_h} and {ranks_w}")
    rh, rw = max(ranks_h), max(ranks_w)
    if basis_h.shape[0] != height or basis_w.shape[0] != width or basis_h.shape[1] < rh or basis_w.shape[1] < rw:
        raise ValueError(f"bases {tuple(basis_h.shape)}, {tuple(basis_w.shape)} do not fit a {height}x{width} map "
                         f"with ranks {ranks_h}, {ranks_w}")
    ranks = torch.tensor([ranks_h, ranks_w], dtype=torch.int64)
    out = torch.empty_like(x)
    _call('fdconv_band_modulation', _check('x', x), _check('band_scale', band_scale, (batch, bands, height, width)),
          out.data_ptr(), _check('basis_h', basis_h), basis_h.stride(0), _check('basis_w', basis_w),
          basis_w.stride(0), ranks[0].data_ptr(), ranks[1].data_ptr(),
          _check('work', work, min_numel=workspace_floats(2, height, width, rh, rw, bands)), batch, channels, bands,
          height, width)
    return out
