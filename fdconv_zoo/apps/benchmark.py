"""Measuring FDConv models against their dense counterparts: parameters, FLOPs (FFTs included), speed, memory.

FLOPs follow torch's FlopCounterMode (2 per multiply-add, matmuls and convolutions), plus the FFTs it does not
count: a real transform of N points costs 2.5 N log2 N, a complex one 5 N log2 N (the radix-2 estimate).
Element-wise work (attention products, sigmoids) is not counted, as in timm's own tables.
"""
from __future__ import annotations

import ctypes
import math
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..layers import FourierDisjointWeight, ops

aten = torch.ops.aten


def _fft_points(shape: tuple[int, ...], dims: list[int]) -> tuple[int, int]:
    n = math.prod(shape[d] for d in dims)
    return n, math.prod(shape) // max(n, 1)


def _r2c_flops(x_shape, dim, normalization, onesided, out_shape=None) -> int:
    n, batch = _fft_points(x_shape, dim)
    return int(2.5 * n * math.log2(max(n, 2)) * batch)


def _c2r_flops(x_shape, dim, normalization, last_dim_size, out_shape=None) -> int:
    n, batch = _fft_points(out_shape, dim)
    return int(2.5 * n * math.log2(max(n, 2)) * batch)


def _c2c_flops(x_shape, dim, normalization, forward, out_shape=None) -> int:
    n, batch = _fft_points(x_shape, dim)
    return int(5 * n * math.log2(max(n, 2)) * batch)


FFT_FLOPS = {aten._fft_r2c: _r2c_flops, aten._fft_c2r: _c2r_flops, aten._fft_c2c: _c2c_flops}


@torch.no_grad()
def count_flops(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """FLOPs of one eval forward at ``input_size`` (B, C, H, W): ``total`` and the ``fft`` part of it."""
    was_training = model.training
    model.eval()
    x = torch.randn(input_size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False, custom_mapping=FFT_FLOPS)
    with counter:  # the fdconv operators count through their registered formulas (layers/ops/registry.py)
        model(x)
    model.train(was_training)
    per_op = counter.get_flop_counts()['Global']
    fft = sum(v for op, v in per_op.items() if op in FFT_FLOPS)
    fft += sum(ops.synthesis_fft_flops(m.rows, m.cols, input_size[0]) for m in model.modules()
               if isinstance(m, FourierDisjointWeight))
    return {'total': counter.get_total_flops(), 'fft': fft}


@torch.no_grad()
def liven_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-trivial norm scales and layer scales, in place. timm's fresh init zeroes the last BN of each
    ResNet block and sets ConvNeXt layer scales to 1e-6, which would hide every residual branch from a
    dense-vs-FDConv comparison of randomly initialised models."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit('.', 1)[-1]
        owner = name.rsplit('.', 2)[-2] if name.count('.') else ''
        if leaf == 'gamma' or (leaf == 'weight' and ('norm' in owner or owner.startswith('bn'))):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sequence_resnet(in_channels: int = 12, num_classes: int = 10,
                    widths: tuple[int, ...] = (64, 128, 256)) -> nn.Module:
    """The benchmark's 1-D network: a ResNet-18-like CNN for multichannel sequences (e.g. 12-lead ECG), a k7
    stem and two basic blocks of k3 convs per stage, each stage halving the length."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv1d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm1d(cout)
            self.conv2 = nn.Conv1d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm1d(cout)
            self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shortcut = x if self.downsample is None else self.downsample(x)
            return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + shortcut)

    layers: list[nn.Module] = [nn.Conv1d(in_channels, widths[0], 7, 2, 3, bias=False), nn.BatchNorm1d(widths[0]),
                               nn.ReLU()]
    cin = widths[0]
    for i, width in enumerate(widths):
        layers += [Block(cin, width, 1 if i == 0 else 2), Block(width, width, 1)]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(cin, num_classes))


@dataclass(frozen=True)
class Network:
    """A dense network outside timm, benchmarked against its ``convert_to_fdconv`` version (the paper's
    placement): how to build it, one sample's input shape for a size (--img-size), the default size, classes."""
    build: Callable[[], nn.Module]
    sample_shape: Callable[[int], tuple[int, ...]]
    default_size: int
    num_classes: int


def _video(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import video
        return getattr(video, name)(num_classes=400)
    return build


NETWORKS: dict[str, Network] = {
    'r3d_18_fdconv': Network(_video('r3d_18'), lambda s: (3, 16, s, s), 112, 400),  # 16-frame clips, Kinetics
    'r2plus1d_18_fdconv': Network(_video('r2plus1d_18'), lambda s: (3, 16, s, s), 112, 400),
    'sequence_resnet_fdconv': Network(sequence_resnet, lambda s: (12, s), 1000, 10),  # 10 s of 12-lead ECG
}


def dense_counterpart(name: str) -> str:
    """The dense architecture an FDConv one is converted from (resnet50_fdconv -> resnet50, r3d_18_fdconv ->
    torchvision's r3d_18); a ValueError naming the choices for anything else, so that a dense name is not
    benchmarked against itself."""
    import timm
    choices = [*timm.list_models('*_fdconv'), *NETWORKS]
    if name not in choices:
        raise ValueError(f"{name!r} is not an FDConv architecture (one of {', '.join(choices)})")
    return name.removesuffix('_fdconv')


def build_pair(fd_name: str) -> dict[str, nn.Module]:
    """The dense model and its FDConv version, from timm or converted (``NETWORKS``), same random weights."""
    import copy

    import timm

    from ..conversion import convert_to_fdconv
    if fd_name in NETWORKS:
        dense = NETWORKS[fd_name].build()
        return {'dense': dense, 'fdconv': convert_to_fdconv(copy.deepcopy(dense))}
    return {'dense': timm.create_model(dense_counterpart(fd_name)), 'fdconv': timm.create_model(fd_name)}


def bench_input(fd_name: str, model: nn.Module, batch_size: int, size: int | None,
                device: torch.device) -> tuple[torch.Tensor, int, int]:
    """A random batch for the model, the size it has (--img-size, or the model's own) and the classes."""
    if fd_name in NETWORKS:
        net = NETWORKS[fd_name]
        size = size or net.default_size
        return torch.randn(batch_size, *net.sample_shape(size), device=device), size, net.num_classes
    cfg = model.pretrained_cfg
    if size is None or cfg.get('fixed_input_size'):  # e.g. Swin: only its own resolution
        size = cfg['input_size'][-1]
    return torch.randn(batch_size, 3, size, size, device=device), size, model.num_classes


def model_table(names: list[str], img_size: int | None = None) -> list[dict[str, Any]]:
    """One row per architecture: params and FLOPs of the dense timm model and of its FDConv version."""
    import timm
    rows = []
    for name in names:
        fd = timm.create_model(name)
        dense = timm.create_model(dense_counterpart(name))
        size = img_size or fd.pretrained_cfg['input_size'][-1]
        shape = (1, 3, size, size)
        fd_flops, dense_flops = count_flops(fd, shape), count_flops(dense, shape)
        tags = [t for t in timm.list_pretrained(f'{name}.*')]
        rows.append({
            'model': name, 'img_size': size,
            'params_dense_m': count_params(dense) / 1e6, 'params_fdconv_m': count_params(fd) / 1e6,
            'gflops_dense': dense_flops['total'] / 1e9, 'gflops_fdconv': fd_flops['total'] / 1e9,
            'gflops_fft': fd_flops['fft'] / 1e9,
            'tags': {t.split('.', 1)[1]: timm.models.get_pretrained_cfg(t).hf_hub_id for t in tags},
        })
    return rows


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks',
        'keepcost')]


def _live_heap_bytes_fn():
    """glibc's count of bytes handed out and not yet freed (heap + mmapped blocks), or None elsewhere."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def live() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd
    return live


class PeakMemory:
    """Peak memory a block allocates above what was live when it started: CUDA's allocator statistics on
    GPU; on CPU glibc's live allocated bytes (mallinfo2), sampled every millisecond by a thread. Freed memory
    that malloc keeps for reuse does not count, so runs that reuse memory are measured fairly."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._live = _live_heap_bytes_fn()

    def __enter__(self) -> PeakMemory:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        if self._live is None:
            raise RuntimeError('peak CPU memory needs glibc (mallinfo2)')
        self._base = self._peak = self._live()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.0005):
                self._peak = max(self._peak, self._live())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._peak, self._live()) - self._base


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def time_eval(model: nn.Module, x: torch.Tensor, amp: bool = False) -> float:
    """Seconds for one eval forward."""
    with torch.no_grad(), _autocast(x.device, amp):
        _sync(x.device)
        start = time.perf_counter()
        model(x)
        _sync(x.device)
    return time.perf_counter() - start


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
               amp: bool = False) -> float:
    """Seconds for forward, cross-entropy backward and an optimizer step."""
    _sync(x.device)
    start = time.perf_counter()
    with _autocast(x.device, amp):
        loss = F.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(x.device)
    return time.perf_counter() - start


@dataclass
class BenchResult:
    model: str
    mode: str  # 'eval' or 'train'
    batch_size: int
    img_size: int
    dense_ms: float
    fdconv_ms: float
    dense_peak_mb: float | None = None
    fdconv_peak_mb: float | None = None
    # quartiles of the per-repeat ratios (each FDConv run over the dense run just before it): the noise of
    # a shared machine, which slows both runs of a pair alike
    ratio_q1: float | None = None
    ratio_q3: float | None = None
    backend: str = 'eager'

    @property
    def time_ratio(self) -> float:
        return self.fdconv_ms / self.dense_ms

    @property
    def memory_ratio(self) -> float | None:
        if not self.dense_peak_mb:
            return None
        return self.fdconv_peak_mb / self.dense_peak_mb

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(time_ratio=self.time_ratio, memory_ratio=self.memory_ratio,
                 dense_throughput=self.batch_size / self.dense_ms * 1e3,
                 fdconv_throughput=self.batch_size / self.fdconv_ms * 1e3)
        return d


BACKENDS = ('eager', 'onnxruntime')


def check_backend(backend: str, mode: str, device: str | torch.device, amp: bool, compile: bool) -> None:
    """What a backend can time; a ValueError naming the conflict otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: one of {list(BACKENDS)}")
    if backend == 'onnxruntime' and (mode != 'eval' or torch.device(device).type != 'cpu' or amp or compile):
        raise ValueError("the onnxruntime backend times eval on the CPU provider only (no training step, --device "
                         "cuda, --amp or --compile)")


_sessions: dict[tuple[str, int], Callable[[torch.Tensor], torch.Tensor]] = {}


def onnxruntime_runner(name: str, model: nn.Module, img_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` (architecture ``name``, made with compare's seed) exported to ONNX with a dynamic batch and run
    by onnxruntime's CPU provider, as a callable on tensors. Not checked here (the export command checks); one
    session per architecture and size, reused across batch sizes."""
    from .export import export, runner
    run = _sessions.get((name, img_size))
    if run is None:
        with tempfile.TemporaryDirectory() as folder:  # the session keeps what it loaded
            path = Path(folder) / 'model.onnx'
            export(model, 'onnx', path, img_size=[img_size], check=False)
            run = _sessions[(name, img_size)] = runner('onnx', path)
    return run


def compare(fd_name: str, mode: str, batch_size: int, img_size: int | None, repeats: int = 5, warmup: int = 1,
            device: str | torch.device = 'cpu', amp: bool = False, compile: bool = False,
            backend: str = 'eager') -> BenchResult:
    """Dense model vs its FDConv version in this process, repeats interleaved, medians reported (and the
    quartiles of the per-repeat ratios); with ``compile`` both run as ``torch.compile(model, fullgraph=True)``
    (compiled during the warm-up); with ``backend='onnxruntime'`` both are exported to ONNX and run by
    onnxruntime's CPU provider (eval only, 2-D timm models). ``img_size`` None: the model's own size (a
    sequence's length, a clip's height and width for ``NETWORKS``)."""
    check_backend(backend, mode, device, amp, compile)
    if backend == 'onnxruntime' and fd_name in NETWORKS:
        raise ValueError(f"the onnxruntime backend times timm models; {fd_name} is converted from outside timm")
    device = torch.device(device)
    torch.manual_seed(0)
    names = {'dense': dense_counterpart(fd_name), 'fdconv': fd_name}
    models = build_pair(fd_name)
    for m in models.values():
        m.to(device).train(mode == 'train')
    x, img_size, classes = bench_input(fd_name, models['fdconv'], batch_size, img_size, device)
    target = torch.randint(0, classes, (batch_size,), device=device)
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in models.items()}
    if compile:
        models = {k: torch.compile(m, fullgraph=True) for k, m in models.items()}
    if backend == 'onnxruntime':
        models = {k: onnxruntime_runner(names[k], m, img_size) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    peaks: dict[str, float] = {}
    for i in range(warmup + repeats):
        for key, m in models.items():
            if mode == 'eval':
                t = time_eval(m, x, amp)
            else:
                if i == warmup:  # measure peak memory once, after warm-up
                    with PeakMemory(device) as mem:
                        t = train_step(m, optimizers[key], x, target, amp)
                    peaks[key] = mem.peak_bytes / 2 ** 20
                else:
                    t = train_step(m, optimizers[key], x, target, amp)
            if i >= warmup:
                times[key].append(t * 1e3)
    paired = [f / d for d, f in zip(times['dense'], times['fdconv'], strict=True)]
    q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (None, None, None)
    return BenchResult(fd_name, mode, batch_size, img_size, statistics.median(times['dense']),
                       statistics.median(times['fdconv']), peaks.get('dense'), peaks.get('fdconv'), q1, q3, backend)


PARTS = ('fdconv.ksm', 'fdconv.synthesis', 'fdconv.fbm', 'fdconv.conv')


def part_breakdown(fd_name: str, batch_size: int, img_size: int, device: str | torch.device = 'cpu',
                   repeats: int = 3) -> dict[str, float]:
    """Milliseconds per eval forward spent in each FDConv part, summed over layers (torch.profiler, median over
    ``repeats``): KSM heads, kernel synthesis (FFTs and products), FBM with the channel scaling of the input,
    the convolution itself."""
    from torch.profiler import ProfilerActivity, profile
    device = torch.device(device)
    model = build_pair(fd_name)['fdconv'].to(device).eval()
    x = bench_input(fd_name, model, batch_size, img_size, device)[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    samples: dict[str, list[float]] = {p: [] for p in PARTS + ('total',)}
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                model(x)
                _sync(device)
                total = (time.perf_counter() - start) * 1e3
            events = {e.key: e for e in prof.key_averages()}
            for part in PARTS:
                e = events.get(part)
                samples[part].append((e.cpu_time_total if e is not None else 0.0) / 1e3)
            samples['total'].append(total)
    return {k: statistics.median(v) for k, v in samples.items()}
