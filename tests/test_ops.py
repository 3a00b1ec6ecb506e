"""The fdconv operators: torch.library's checks, both implementations, bad group ids, compile of whole models."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading

import pytest
import timm
import torch
from conftest import rel_err
from naive import naive_fdconv, randomize_
from safetensors.torch import load, save

import fdconv_zoo  # noqa: F401  registers the models
from fdconv_zoo import FDConv2d
from fdconv_zoo.apps.benchmark import liven_
from fdconv_zoo.layers import native_kernels, ops
from fdconv_zoo.layers.ops import native
from fdconv_zoo.layers.ops.portable import portable_dynamic_conv
from fdconv_zoo.layers.ops.synthesis import local_logits


def _layer_inputs(layer: FDConv2d, x: torch.Tensor) -> dict:
    """The arguments an FDConv layer hands to fdconv::dynamic_conv, as leaves that require grad."""
    pooled = x.mean(tuple(range(2, x.ndim)))
    att = layer.ksm_global(pooled)
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_()  # noqa: E731
    kernel_size, stride, padding, pre_pad, dilation, mode = layer._conv_options()
    return dict(
        x=leaf(x), band_scale=leaf(layer.fbm.band_scale(x)) if layer.fbm is not None else None,
        spectrum=leaf(layer.fdw.spectrum), group_index=layer.fdw.indices(),
        attention=leaf(layer.fdw.operator_attention(att.kernel)),
        taps=leaf(layer.ksm_local.taps()), windows=leaf(layer.ksm_local(pooled)), channel=leaf(att.channel * 2),
        spatial=leaf(att.spatial), filter_attention=leaf(att.filter), bias=leaf(layer.bias),
        kernel_size=kernel_size, groups=layer.groups, stride=stride, padding=padding, dilation=dilation,
        pre_pad=pre_pad, padding_mode=mode, cutoffs=list(layer.fbm.cutoffs) if layer.fbm is not None else [])


@pytest.mark.parametrize('make', [
    lambda: FDConv2d(16, 24, 3, padding=1, num_freq_groups=8),  # FBM, grouped convolution
    lambda: FDConv2d(16, 48, 3, stride=2, padding=1, num_freq_groups=8),  # small map: im2col
    lambda: FDConv2d(16, 24, 1, num_freq_groups=5),  # 1x1: matrix product
    lambda: FDConv2d(16, 24, 3, padding=1, groups=4, num_freq_groups=4, fbm=False),  # groups > 1
], ids=['3x3', 'small-map', '1x1', 'groups'])
def test_opcheck_every_operator(make, loops):
    """torch.library.opcheck: schema, fake implementation, registered autograd and AOT dispatch agree with the
    real implementation, for every operator and both implementations."""
    torch.manual_seed(0)
    layer = make()
    randomize_(layer, scale=0.3)
    opcheck_operators(layer, torch.randn(2, 16, 6, 5))


def opcheck_operators(layer: torch.nn.Module, x: torch.Tensor) -> None:
    """torch.library.opcheck of every fdconv operator on the arguments ``layer`` hands them for input ``x``."""
    kwargs = _layer_inputs(layer, x)
    args = list(kwargs.values())
    torch.library.opcheck(torch.ops.fdconv.dynamic_conv.default, args)
    y = ops.dynamic_conv(*args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]  # backward ops have no gradient
    torch.library.opcheck(torch.ops.fdconv.dynamic_conv_backward.default, [torch.randn_like(y), *plain])
    synthesis = [kwargs[n] for n in ('spectrum', 'group_index', 'attention', 'taps', 'windows', 'channel',
                                     'kernel_size', 'groups')]
    torch.library.opcheck(torch.ops.fdconv.synthesize.default, synthesis)
    if kwargs['band_scale'] is not None:
        torch.library.opcheck(torch.ops.fdconv.band_modulation.default,
                              [kwargs['x'], kwargs['band_scale'], kwargs['cutoffs']])


def test_synthesize_and_band_modulation_gradients_match_autograd(loops):
    """The two building-block operators against autograd through plain PyTorch (float64 gradcheck runs the
    PyTorch implementation; float32 here runs the fused loops too)."""
    torch.manual_seed(1)
    layer = FDConv2d(16, 24, 3, padding=1, num_freq_groups=8)
    randomize_(layer, scale=0.3)
    kw = _layer_inputs(layer, torch.randn(2, 16, 7, 6))
    p = ops.synthesize(kw['spectrum'], kw['group_index'], kw['attention'], kw['taps'], kw['windows'],
                       kw['channel'], [3, 3], 1)
    grad = torch.randn_like(p)
    got = torch.autograd.grad(p, [kw[n] for n in ('spectrum', 'attention', 'taps', 'windows', 'channel')], grad)
    spec = torch.view_as_complex(kw['spectrum']).t() * kw['attention'][:, layer.fdw.group_of_bin]
    m = torch.fft.irfft2(spec, s=(72, 48))
    logits = local_logits(kw['taps'], kw['windows'], 72, 3, 1)
    expected_p = m * torch.sigmoid(logits) * kw['channel'].repeat_interleave(3, 1)[:, None]
    expected = torch.autograd.grad(expected_p, [kw[n] for n in ('spectrum', 'attention', 'taps', 'windows',
                                                                'channel')], grad)
    assert rel_err(p, expected_p) < 1e-5
    for a, b in zip(got, expected, strict=True):
        assert rel_err(a, b) < 1e-4
    x, scale = kw['x'], kw['band_scale']
    y = ops.band_modulation(x, scale, [2, 4, 8])
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, scale], g)
    bands = [torch.fft.ifft2(torch.fft.fft2(x) * _square_mask(x.shape[-2:], c)).real for c in (2, 4, 8)]
    literal = scale[:, :1] * (x - bands[0]) + scale[:, 1:2] * (bands[0] - bands[1]) \
        + scale[:, 2:3] * (bands[1] - bands[2]) + bands[2]
    assert rel_err(y, literal) < 1e-5
    for a, b in zip(got, torch.autograd.grad(literal, [x, scale], g), strict=True):
        assert rel_err(a, b) < 1e-4


def _square_mask(size, kappa: int) -> torch.Tensor:
    fy = torch.fft.fftfreq(size[0]).abs()[:, None]
    fx = torch.fft.fftfreq(size[1]).abs()[None]
    return (torch.maximum(fy, fx) < torch.tensor(0.5 / kappa + 1e-8, dtype=torch.float32)).float()


@pytest.mark.parametrize('bad', [200, 2 ** 30, -5])
def test_bad_group_ids_are_refused_when_loaded(bad, tmp_path):
    """A crafted checkpoint: ids outside [0, n) are refused by load_state_dict with the key named, whatever
    index type the loops would read (200 fits uint8, 2**30 would wrap to 0, -5 would wrap to 251)."""
    layer = FDConv2d(64, 64, 3, padding=1)
    state = layer.state_dict()
    state['fdw.group_of_bin'] = torch.full_like(state['fdw.group_of_bin'], bad)
    path = tmp_path / 'crafted.safetensors'
    path.write_bytes(save(state))
    with pytest.raises(RuntimeError, match=r"fdw\.group_of_bin holds group ids .* outside \[0, 64\)"):
        FDConv2d(64, 64, 3, padding=1).load_state_dict(load(path.read_bytes()))


def test_grouping_must_cover_every_group_and_fit():
    layer = FDConv2d(16, 16, 3, padding=1, num_freq_groups=8)
    uncovered = torch.zeros_like(layer.fdw.group_of_bin)
    with pytest.raises(ValueError, match='leaves 7 of its 8 frequency groups without a bin'):
        layer.fdw.set_grouping(uncovered)
    with pytest.raises(RuntimeError, match='fdw.group_of_bin has shape'):
        layer.load_state_dict({**layer.state_dict(), 'fdw.group_of_bin': uncovered[:-1]})
    with pytest.raises(ValueError, match='integer group ids'):
        layer.fdw.set_grouping(layer.fdw.group_of_bin.float())


def test_group_ids_corrupted_after_loading_are_refused_at_forward(loops):
    """A buffer changed in place after it was checked is checked again before use; the operators themselves
    refuse a corrupted index (the fused loops check each id where they read it)."""
    layer = FDConv2d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, 6, 6)
    layer.fdw.group_of_bin[3, 2] = 200
    with pytest.raises(ValueError, match=r'group ids in \[0, 200\], outside \[0, 64\)'), torch.no_grad():
        layer(x)
    layer.fdw.group_of_bin[3, 2] = 1
    layer(x)  # checked again, good again
    layer.fdw.group_index[2, 3] = 77  # the operators' own copy
    with pytest.raises(ValueError, match=r'group id.* outside \[0, (n|64)\)'), torch.no_grad():
        layer(x)
    with pytest.raises(ValueError, match=r'group id.* outside \[0, (n|64)\)'):
        layer(x.requires_grad_()).sum().backward()


@pytest.mark.parametrize('make', [
    lambda: FDConv2d(16, 24, 3, padding=1, num_freq_groups=8),
    lambda: FDConv2d(16, 24, 3, stride=2, padding=1, padding_mode='reflect', num_freq_groups=8),
    lambda: FDConv2d(16, 24, 1, num_freq_groups=5),
    lambda: FDConv2d(16, 24, 3, padding=1, groups=4, num_freq_groups=4, fbm=False),
], ids=['3x3', 'reflect-stride2', '1x1', 'groups'])
def test_empty_batch_gives_empty_output_and_zero_gradients(make, loops):
    """A batch of 0 (a distributed sampler's last shard, a filtered detection batch) behaves as in nn.Conv2d:
    an empty output of the right shape, zero parameter gradients, an empty input gradient."""
    torch.manual_seed(0)
    layer = make()
    dense = torch.nn.Conv2d(16, 24, layer.kernel_size, stride=layer.stride,
                            padding=layer.padding, padding_mode=layer.padding_mode, groups=layer.groups)
    x = torch.randn(0, 16, 9, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == dense(x).shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in layer.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


@pytest.mark.parametrize('rows, cols', [(6, 6), (1, 5), (12, 15), (192, 96), (201, 9), (6144, 7), (1536, 1536),
                                        (2 * 131, 4), (3 * 6144, 4), (257, 4)])
def test_irfft2_by_matrix_products(rows, cols):
    """dft.irfft2 (the export's FFT: two stages of DFT matrices of at most 128 points, Hermitian extension along
    the columns) equals torch.fft.irfft2 for even, odd, single-matrix, two-stage (1536 = 32 x 48, 6144 =
    64 x 96, 262 = 2 x 131 and 18432 = 128 x 144 with a second stage past LEAF) and prime (257: one dense
    matrix) lengths, and stays accurate in float32."""
    from fdconv_zoo.layers.ops import dft
    gen = torch.Generator().manual_seed(rows * cols)
    half = torch.randn(2, rows, cols // 2 + 1, 2, dtype=torch.float64, generator=gen)
    expected = torch.fft.irfft2(torch.view_as_complex(half), s=(rows, cols))
    stacked = half.movedim(-1, 1)  # (2, [re, im], rows, cols // 2 + 1)
    exact = dft.irfft2(stacked, rows, cols)
    assert ((exact - expected).abs().max() / expected.abs().max()).item() < 1e-12
    assert torch.equal(dft.irfft2(stacked, rows, cols, transposed=True), exact.transpose(-1, -2))
    assert rel_err(dft.irfft2(stacked.float(), rows, cols), expected) < 2e-6


@pytest.mark.parametrize('make', [
    lambda: FDConv2d(16, 24, 3, padding=1, num_freq_groups=8),
    lambda: FDConv2d(16, 48, 3, stride=2, padding=1, padding_mode='reflect', num_freq_groups=8),
    lambda: FDConv2d(16, 24, 1, stride=2, num_freq_groups=5),
    lambda: FDConv2d(16, 24, 3, padding=2, dilation=2, groups=4, num_freq_groups=4, fbm=False),
], ids=['3x3', 'reflect-stride2', '1x1-stride2', 'dilated-groups'])
def test_portable_implementation_equals_the_operator(make):
    """portable_dynamic_conv (what exports decompose the operator into: real-valued scaling, the inverse FFT as
    matrix products, im2col by slices and a batched product) computes what fdconv::dynamic_conv computes."""
    torch.manual_seed(0)
    layer = make()
    randomize_(layer, scale=0.3)
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in _layer_inputs(layer, torch.randn(3, 16, 9, 8)).values()]
    expected = ops.dynamic_conv(*args)
    assert rel_err(portable_dynamic_conv(*args), expected) < 1e-5


def test_portable_token_path_equals_the_layer():
    """FDLinear's tokens take the transposed product and transposed gates: the layer exported and decomposed
    computes what the layer computes."""
    from fdconv_zoo.layers import FDLinear
    torch.manual_seed(0)
    layer = FDLinear(16, 24, num_freq_groups=8).eval()
    randomize_(layer, scale=0.3)
    x = torch.randn(3, 7, 16)
    program = torch.export.export(layer, (x,))
    portable = program.run_decompositions({torch.ops.fdconv.dynamic_conv.default: portable_dynamic_conv})
    with torch.no_grad():
        assert rel_err(portable.module()(x), layer(x)) < 1e-5


@pytest.mark.parametrize('name', ['resnet18_fdconv', 'convnext_tiny_fdconv'])
def test_torch_export_with_a_dynamic_batch(name):
    """torch.export keeps the fdconv operators in the graph with a free batch size; decomposed into the portable
    implementation, no fdconv node is left and the program still computes the model."""
    model = _modulated(name).eval()
    batch = torch.export.Dim('batch', min=1, max=1024)
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    assert any(n.target == torch.ops.fdconv.dynamic_conv.default for n in program.graph.nodes)
    portable = program.run_decompositions({torch.ops.fdconv.dynamic_conv.default: portable_dynamic_conv})
    assert not any('fdconv' in str(n.target) for n in portable.graph.nodes)
    for size in (1, 3, 8):
        x = torch.randn(size, 3, 64, 64)
        with torch.no_grad():
            expected = model(x)
            assert rel_err(program.module()(x), expected) < 1e-6
            assert rel_err(portable.module()(x), expected) < 1e-5


def test_empty_batch_through_whole_models(loops):
    from fdconv_zoo.layers import FDLinear
    assert FDLinear(8, 16)(torch.randn(0, 5, 8)).shape == (0, 5, 16)
    for name in ('resnet18_fdconv', 'convnext_tiny_fdconv'):  # timm's dense Swin refuses B=0 itself
        model = timm.create_model(name, num_classes=5)
        for training in (False, True):
            model.train(training)
            y = model(torch.randn(0, 3, 32, 32))
            assert y.shape == (0, 5)
            y.sum().backward()
        assert [f.shape[0] for f in timm.create_model(name, features_only=True)(torch.randn(0, 3, 32, 32))] == \
            [0] * (5 if name.startswith('resnet') else 4)


def test_native_boundary_checks_dtype_layout_and_shape():
    """What crosses into native code is checked with real errors (not asserts, which python -O drops)."""
    assert native.library() is not None
    spectrum, att = torch.randn(5, 24, 2), torch.rand(2, 4)
    group = torch.zeros(5, 24, dtype=torch.uint8)
    columns, work = torch.empty(24 * 2 * 5 * 2), torch.empty(10 ** 6)
    out = torch.empty(2, 24, 8)
    native.synthesize(spectrum, group, att, None, None, None, 1, columns, work, out)
    with pytest.raises(TypeError, match='spectrum must be a torch.float32 CPU tensor'):
        native.synthesize(spectrum.double(), group, att, None, None, None, 1, columns, work, out)
    with pytest.raises(ValueError, match='attention must be contiguous'):
        native.synthesize(spectrum, group, att.t().contiguous().t(), None, None, None, 1, columns, work, out)
    with pytest.raises(ValueError, match='columns has 10 elements, needs at least 480'):
        native.synthesize(spectrum, group, att, None, None, None, 1, columns[:10], work, out)
    with pytest.raises(TypeError, match='group index must be uint8 or int32'):
        native.synthesize(spectrum, group.long(), att, None, None, None, 1, columns, work, out)
    with pytest.raises(ValueError, match='group id'):
        native.synthesize(spectrum, group + 4, att, None, None, None, 1, columns, work, out)
    with pytest.raises(ValueError, match=r'spectrum has shape \(5, 24, 3\), expected \(5, 24, 2\)'):
        native.synthesize(torch.randn(5, 24, 3), group, att, None, None, None, 1, columns, work, out)
    with pytest.raises(ValueError, match='spectrum .* does not fit'):
        native.synthesize(torch.randn(5, 24), group, att, None, None, None, 1, columns, work, out)


def test_band_count_is_checked_on_both_paths_and_by_the_fakes(loops):
    """Band maps must number the cut-offs, whichever implementation runs; the fake implementations (what
    torch.compile and torch.export trace) refuse the same inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    layer = FDConv2d(16, 24, 3, padding=1, num_freq_groups=8)
    kwargs = _layer_inputs(layer, torch.randn(2, 16, 6, 5))
    kwargs['band_scale'] = torch.rand(2, 4, 6, 5)  # four maps, three cut-offs
    with pytest.raises(ValueError, match=r'band scales \(2, 4, 6, 5\) do not fit input .* and 3 cut-offs'):
        ops.dynamic_conv(**kwargs)
    with pytest.raises(ValueError, match='band scales'):
        ops.band_modulation(torch.randn(2, 16, 6, 5), torch.rand(2, 4, 6, 5), [2, 4, 8])
    with pytest.raises(ValueError, match='increasing list'):
        ops.band_modulation(torch.randn(2, 16, 6, 5), torch.rand(2, 2, 6, 5), [4, 2])
    with FakeTensorMode() as mode:
        x, scale = mode.from_tensor(torch.randn(2, 16, 6, 5)), mode.from_tensor(torch.rand(2, 4, 6, 5))
        with pytest.raises(ValueError, match='band scales'):
            torch.ops.fdconv.band_modulation(x, scale, [2, 4, 8])
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with pytest.raises(ValueError, match='band scales'):
            torch.ops.fdconv.dynamic_conv(**fake)
        fake['band_scale'] = mode.from_tensor(torch.rand(2, 3, 6, 5))
        fake['spectrum'] = mode.from_tensor(torch.randn(5, 72, 2))
        with pytest.raises(ValueError, match='spectrum .* does not fit'):
            torch.ops.fdconv.dynamic_conv(**fake)


def test_pytorch_implementation_transforms_whole_batches(monkeypatch):
    """The implementation CUDA runs: one 2-D inverse FFT per synthesis whatever the layer's size and batch (no
    CPU-cache slicing), and results owned by the caller."""
    calls = []
    irfft2 = torch.fft.irfft2
    monkeypatch.setattr(torch.fft, 'irfft2', lambda *a, **k: calls.append(a[0].shape) or irfft2(*a, **k))
    layer = FDConv2d(256, 256, 3, padding=1, num_freq_groups=64)
    with torch.no_grad(), native_kernels(False):
        first = layer.fdw(torch.ones(16, 64))
        second = layer.fdw(torch.full((16, 64), 0.5))
    assert calls == [(16, 768, 385)] * 2
    assert first.data_ptr() != second.data_ptr() and rel_err(second, first * 0.5) < 1e-6


def test_scratch_is_per_thread_freed_with_its_thread_and_by_release():
    """Backward runs on autograd's worker thread: each thread has its own scratch. A thread that ends takes its
    buffers with it; release_workspace frees those of the threads that live on."""
    assert native.library() is not None, "the fused CPU loops did not build on this machine"
    layer = FDConv2d(32, 32, 3, padding=1, num_freq_groups=8)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    ops.release_workspace()
    with torch.no_grad():
        layer(x)
    mine = ops.workspace_bytes()
    assert mine > 0
    for _ in range(3):  # short-lived threads, e.g. a server's request handlers
        thread = threading.Thread(target=lambda: layer(x.detach()))
        thread.start()
        thread.join()
    gc.collect()
    assert ops.workspace_bytes() == mine
    layer(x).sum().backward()  # autograd's thread keeps its scratch
    assert ops.workspace_bytes() > mine
    ops.release_workspace()
    assert ops.workspace_bytes() == 0
    expected = naive_fdconv(layer, x.detach())
    with torch.no_grad():
        assert rel_err(layer(x), expected) < 1e-5


def test_caches_are_bounded_and_freed_by_release():
    """The FFT descriptors of the fused loops and the cached constants (Fourier bases) stay bounded whatever
    sizes a long-lived process sees, and release_workspace frees them."""
    from fdconv_zoo.layers.ops import constants
    assert native.library() is not None, "the fused CPU loops did not build on this machine"
    layer = FDConv2d(16, 16, 3, padding=1, num_freq_groups=4)
    ops.release_workspace()
    with torch.no_grad():
        for batch in range(1, 40):  # a descriptor per (transform size, batch) before the bound
            layer(torch.randn(batch, 16, 5, 5))
        assert native.fft_plans() <= 8 * torch.get_num_threads() * 2
        for size in range(3, 3 + constants.MAX_ENTRIES // 2 + 20):  # two bases per size
            layer.fbm(torch.randn(1, 16, size, size + 1))
    assert 0 < constants.cached_constants() <= constants.MAX_ENTRIES
    assert native.fft_plans() > 0
    ops.release_workspace()
    assert native.fft_plans() == 0 and constants.cached_constants() == 0
    with torch.no_grad():  # and everything works after
        x = torch.randn(2, 16, 6, 6)
        assert rel_err(layer(x), naive_fdconv(layer, x)) < 1e-5


def test_switch_for_the_cpu_kernels():
    """One public switch: on by default, FDCONV_ZOO_NATIVE=0 turns it off at start, the context manager
    restores it, and both settings compute the same."""
    assert ops.native_kernels_enabled()
    layer = FDConv2d(16, 24, 3, padding=1, num_freq_groups=8)
    randomize_(layer, scale=0.2)
    x = torch.randn(2, 16, 7, 6)
    with torch.no_grad():
        fused = layer(x)
        with native_kernels(False):
            assert not ops.native_kernels_enabled() and not ops.cpu_kernels(x.device)
            plain = layer(x)
    assert ops.native_kernels_enabled() and ops.cpu_kernels(x.device)
    assert rel_err(fused, plain) < 1e-5
    # off at start: nothing is even built (no compiler warning, which -W error would make fatal)
    code = ("import torch; from fdconv_zoo import FDConv2d; from fdconv_zoo.layers import native_kernels_enabled; "
            "FDConv2d(8, 8, 3, padding=1)(torch.randn(1, 8, 5, 5)); print(native_kernels_enabled())")
    env = {**os.environ, 'FDCONV_ZOO_NATIVE': '0', 'CXX': 'no-such-compiler-fdconv'}
    out = subprocess.run([sys.executable, '-W', 'error', '-c', code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ['False']


def _modulated(name: str) -> torch.nn.Module:
    """A randomly initialised model whose FDConv layers modulate (head and band biases and local taps moved, so
    the factors differ from 1 and the local ones depend on the input) and whose every residual branch reaches
    the output. Random modulation of every KSM weight makes a deep model chaotic: float32 eager itself is then
    2-5% away from float64, and no comparison to float32 rounding means anything."""
    if name.startswith('resnet'):
        model = timm.create_model(name, num_classes=10, zero_init_last=False)
    else:
        model = liven_(timm.create_model(name, num_classes=10, drop_path_rate=0.0))  # compiled RNG differs
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(('_fc.bias', 'band_conv.bias', 'ksm_local.conv.weight')):
                p.add_(torch.randn(p.shape, generator=gen) * (0.3 if n.endswith('bias') else 0.05))
    return model


@pytest.mark.slow
@pytest.mark.parametrize('name,size', [('resnet50_fdconv', 64), ('convnext_tiny_fdconv', 64),
                                       ('swin_tiny_patch4_window7_224_fdconv', 224)])
def test_compile_fullgraph_matches_eager(name, size):
    """torch.compile(model, fullgraph=True): no graph break, eval outputs and a training step's gradients equal
    to eager; the operators stay inside the graph (their fused CPU kernels run there). ResNet trains with frozen
    BatchNorm statistics (the detection setting): with batch statistics a random ResNet-50's gradients are so
    ill-conditioned that float32 eager itself is 18% away from float64 (dense timm model, batch 4, 128 px)."""
    torch.manual_seed(0)
    model = _modulated(name)
    x = torch.randn(2, 3, size, size)
    compiled = torch.compile(model, fullgraph=True)
    model.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5
    model.train(not name.startswith('resnet'))
    grads = []
    for run in (model, compiled):
        model.zero_grad()
        run(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert rel_err(grads[1][n], g) < 1e-4, n


def test_out_of_memory_in_native_code_is_a_python_exception(tmp_path):
    """A failed allocation inside the fused loops raises MemoryError; the process does not abort. Run in a
    child process whose address space is capped just above what it holds once everything else is allocated."""
    script = tmp_path / 'oom.py'
    script.write_text('''
import resource, sys
import torch
from fdconv_zoo.layers.ops import native
torch.set_num_threads(1)
b, cin, cout, k, taps_k = 64, 512, 32, 3, 5
rows, cols = cout * k, cin * k
half = cols // 2 + 1
spectrum, group = torch.randn(half, rows, 2), torch.zeros(half, rows, dtype=torch.uint8)
attention, taps = torch.rand(b, 4), torch.randn(rows * k, taps_k)
windows, channel = torch.randn(b, cin, taps_k), torch.rand(b, cin)
columns, out = torch.empty(rows * b * half * 2), torch.empty(b, rows, cols)
work = torch.empty(native.workspace_floats(0, b, rows, cols))
native.synthesize(spectrum, group, attention, taps, windows, channel, k, columns, work, out)  # warm
with open('/proc/self/status') as f:
    size = next(int(line.split()[1]) for line in f if line.startswith('VmSize')) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 20), resource.RLIM_INFINITY))  # spread windows: 2 MB
try:
    native.synthesize(spectrum, group, attention, taps, windows, channel, k, columns, work, out)
except MemoryError as e:
    print('MemoryError:', e)
''')
    import subprocess
    import sys
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'MemoryError: fdconv native loop fdconv_synthesize_u8: out of memory' in done.stdout


def test_mkl_refusing_a_transform_size_falls_back_to_the_pytorch_code(monkeypatch):
    """Where MKL refuses a size the loops report it (native.FFTRefused) and the operators compute the same
    values with their PyTorch code, forward and backward."""
    layer = FDConv2d(16, 24, 3, padding=1, num_freq_groups=8)
    randomize_(layer, scale=0.2)
    x = torch.randn(2, 16, 7, 6)
    expected = naive_fdconv(layer, x)

    def refuse(*args, **kwargs):
        raise native.FFTRefused("MKL's FFT refused a transform size")
    monkeypatch.setattr(native, 'synthesize', refuse)
    monkeypatch.setattr(native, 'synthesis_gradient', refuse)
    inp = x.clone().requires_grad_()
    y = layer(inp)
    assert rel_err(y.detach(), expected) < 1e-5
    y.square().sum().backward()
    ref_inp = x.clone().requires_grad_()
    naive_fdconv(layer, ref_inp).square().sum().backward()
    assert rel_err(inp.grad, ref_inp.grad) < 1e-4
