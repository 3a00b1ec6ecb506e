"""FDConv2d / FDLinear: parts against a literal implementation of the spec, gradients, dtypes, errors."""
from __future__ import annotations

import itertools
import logging
import re

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import rel_err
from naive import naive_fdconv, randomize_
from safetensors.torch import load, save

from fdconv_zoo import FDConv2d, FDConv3d, FDLinear
from fdconv_zoo.layers import FBM, fourier_basis, native_kernels, radial_grouping
from fdconv_zoo.layers.ops import native


@pytest.mark.parametrize('cin,cout,k,stride,dilation,groups,n', [
    (24, 40, 3, 1, 1, 1, 16),   # FBM, spatial attention
    (32, 48, 1, 2, 1, 1, 7),    # 1x1 strided, n not dividing the bins
    (33, 20, 3, 1, 1, 1, 5),    # odd Cg*k
    (24, 36, 3, 2, 1, 4, 8),    # groups > 1: channel/local factors follow the input channel an element reads
    (32, 32, 3, 1, 1, 32, 4),   # depthwise: no filter attention
    (16, 128, 3, 2, 1, 1, 8),   # output map small next to Cout: im2col + batched matrix product
    (16, 128, 3, 1, 2, 1, 8),   # the same, dilated
])
def test_layer_matches_literal_spec(cin, cout, k, stride, dilation, groups, n):
    torch.manual_seed(0)
    layer = FDConv2d(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, groups=groups,
                     num_freq_groups=n).eval()
    randomize_(layer)
    x = torch.randn(3, cin, 12, 10)
    with torch.no_grad():
        expected = naive_fdconv(layer, x)
        assert rel_err(layer(x), expected) < 1e-5  # inference path (scratch memory on CPU)
    assert rel_err(layer(x).detach(), expected) < 1e-5  # autograd path (recomputed in backward)


@pytest.mark.parametrize('part', ['kernel_fc', 'channel_fc', 'filter_fc', 'spatial_fc', 'local', 'fbm'])
def test_each_modulation_part_moves_the_output(part):
    """Every part is live: perturbing only it changes the output (so the literal-spec test covers it)."""
    torch.manual_seed(1)
    layer = FDConv2d(24, 24, 3, padding=1).eval()
    x = torch.randn(2, 24, 16, 16)
    with torch.no_grad():
        y0 = layer(x)
        target = {'local': layer.ksm_local.conv.weight, 'fbm': layer.fbm.band_conv.weight}.get(part)
        if target is None:
            target = getattr(layer.ksm_global, part).bias
        target.add_(torch.randn_like(target))
        assert rel_err(layer(x), y0) > 1e-3


def test_grouping_is_radial_stable_and_balanced():
    group = radial_grouping(12, 10, 7)
    assert group.shape == (12, 6)
    sizes = torch.bincount(group.flatten(), minlength=7)
    assert sizes.max() - sizes.min() <= 1
    assert group[0, 0] == 0 and group[6, 5] == 6  # DC lowest, the (Nyquist, Nyquist) corner highest
    fr, fc = torch.fft.fftfreq(12).double(), torch.fft.rfftfreq(10).double()
    radius = fr[:, None] ** 2 + fc[None] ** 2
    for g in range(6):  # groups are contiguous in radius
        assert radius[group == g].max() <= radius[group == g + 1].min()
    assert torch.equal(group, radial_grouping(12, 10, 7))
    # ties broken by flat index: symmetric bins +f / -f land in the lower group first
    assert torch.equal(radial_grouping(8, 8, 1), torch.zeros(8, 5, dtype=torch.long))


def test_kernel_attention_scale_convention():
    """Group g scaled by 2*sigmoid(z_g): z = 0 is the identity, and the kernel is linear in the scales."""
    torch.manual_seed(2)
    layer = FDConv2d(20, 20, 3, num_freq_groups=4, ksm_local=False, fbm=False)
    dense = layer.dense_weight()
    ones = torch.ones(1, 4)
    torch.testing.assert_close(layer.fdw(ones).view(20, 3, 20, 3).transpose(1, 2), dense, atol=1e-6, rtol=1e-5)
    z = torch.tensor([[0.3, -1.0, 2.0, 0.0]])
    with torch.no_grad():
        layer.ksm_global.kernel_fc.bias.copy_(z[0])
    att = layer.ksm_global(torch.zeros(1, 20)).kernel
    torch.testing.assert_close(att, 2 * torch.sigmoid(z))
    bands = [layer.fdw(F.one_hot(torch.tensor([g]), 4).float()) for g in range(4)]
    expected = sum(a * b for a, b in zip(att[0], bands, strict=True))
    torch.testing.assert_close(layer.fdw(att), expected, atol=1e-5, rtol=1e-5)


def test_fbm_bands_equal_masked_fft_for_every_size_and_cached():
    """The separable projections equal the spec's masked FFT filter (float32 mask rule) at any size."""
    h, w, cutoffs = 200, 336, (2, 4, 8)
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    fr = torch.fft.fftfreq(h).abs()
    fc = torch.fft.rfftfreq(w)
    basis_h, ranks_h = fourier_basis(h, cutoffs, torch.device('cpu'), torch.float64)
    basis_w, ranks_w = fourier_basis(w, cutoffs, torch.device('cpu'), torch.float64)
    for kappa, rh, rw in zip(cutoffs, ranks_h, ranks_w, strict=True):
        mask = torch.maximum(fr[:, None], fc[None]) < torch.tensor(0.5 / kappa + 1e-8)
        expected = torch.fft.irfft2(torch.fft.rfft2(x, norm='ortho') * mask, s=(h, w), norm='ortho')
        low = basis_h[:, :rh] @ (basis_h[:, :rh].t() @ x @ basis_w[:, :rw]) @ basis_w[:, :rw].t()
        torch.testing.assert_close(low, expected, atol=1e-12, rtol=0)
    assert ranks_h == (99, 51, 25)  # float32 rule: kappa = 2 drops the |f| = 1/4 rows, kappa = 4 keeps |f| = 1/8
    assert fourier_basis(h, cutoffs, torch.device('cpu'), torch.float64)[0] is basis_h


def test_fused_band_modulation_matches_torch_code():
    """FBM without autograd runs as one fused loop; it equals the PyTorch code for square, odd, wide (several
    chunks of vectors), single-pixel and non-default cut-offs, at batch 1 and 2."""
    assert native.library() is not None, "the fused CPU loops did not build on this machine"
    torch.manual_seed(5)
    for shape, cutoffs in [((2, 8, 56, 56), (2, 4, 8)), ((1, 3, 33, 17), (2, 4, 8)), ((2, 5, 1, 1), (2, 4, 8)),
                           ((1, 2, 40, 200), (2, 4, 8)), ((2, 4, 12, 9), (3, 5))]:
        fbm = FBM(shape[1], cutoffs)
        nn.init.normal_(fbm.band_conv.weight, std=0.3)
        nn.init.normal_(fbm.band_conv.bias)
        x = torch.randn(shape)
        with torch.no_grad(), native_kernels(True):
            fused = fbm(x)
            with native_kernels(False):
                expected = fbm(x)
        assert rel_err(fused, expected) < 1e-5, (shape, cutoffs)


def test_identity_at_init_for_fresh_layer():
    conv = nn.Conv2d(24, 40, 3, padding=1)
    layer = FDConv2d.from_dense(conv)
    x = torch.relu(torch.randn(2, 24, 15, 17))
    with torch.no_grad():
        assert rel_err(layer(x), conv(x)) < 1e-5


def test_gradcheck_float64():
    torch.manual_seed(3)
    layer = FDConv2d(17, 18, 3, padding=1, num_freq_groups=3, min_hidden=4).double()
    randomize_(layer, scale=0.1)
    x = torch.randn(2, 17, 6, 5, dtype=torch.float64, requires_grad=True)
    params = [layer.fdw.spectrum, layer.ksm_local.conv.weight, layer.ksm_global.kernel_fc.weight,
              layer.fbm.band_conv.weight]
    assert torch.autograd.gradcheck(lambda inp, *ps: layer(inp), (x, *params), eps=1e-6, atol=1e-5)
    lin = FDLinear(17, 18, num_freq_groups=3, min_hidden=4).double()
    randomize_(lin, scale=0.1)
    tokens = torch.randn(2, 5, 17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: lin(inp), (tokens,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize('make', [
    lambda: FDConv2d(24, 40, 3, padding=1, num_freq_groups=16),  # FBM, spatial and local attention
    lambda: FDConv2d(32, 48, 1, stride=2, num_freq_groups=7),  # 1x1 strided: matrix products
    lambda: FDConv2d(33, 20, 3, stride=2, padding=1, num_freq_groups=5, ksm_local=False),  # odd Cg*k
    lambda: FDConv2d(16, 24, 2, padding='same', dilation=2, num_freq_groups=4),  # asymmetric 'same'
    lambda: FDConv2d(16, 16, 3, padding=1, padding_mode='reflect', num_freq_groups=4, fbm=False),
    lambda: FDConv2d(16, 112, 3, stride=2, padding=1, num_freq_groups=8),  # small map: im2col path
    lambda: FDConv2d(16, 112, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), num_freq_groups=8),
    lambda: FDConv2d(16, 24, 1, padding=1, num_freq_groups=4),  # padded 1x1: grouped-convolution path
    lambda: FDLinear(20, 36, num_freq_groups=6),
], ids=['3x3', '1x1-stride', 'odd-no-local', 'same-even-k', 'reflect', 'small-map', 'small-map-dilated',
        'padded-1x1', 'linear'])
def test_hand_written_gradient_matches_autograd(make, loops):
    """The training path (fast forward, gradient of the kernel synthesis by hand) against plain autograd."""
    _check_against_autograd(make())


def _check_against_autograd(layer: nn.Module) -> None:
    """Outputs and every gradient of the operator (its registered backward) against autograd through the
    literal spec implementation (tests/naive.py)."""
    torch.manual_seed(7)
    randomize_(layer, scale=0.2)
    reference, as_map = layer, lambda t: t
    if isinstance(layer, FDLinear):  # a linear layer is a 1x1 FDConv2d on (B, Cin, N, 1) maps
        reference = FDConv2d(layer.in_features, layer.out_features, 1, num_freq_groups=layer.num_freq_groups)
        reference.load_state_dict(layer.state_dict())
        as_map = lambda t: t.transpose(1, 2).unsqueeze(-1)  # noqa: E731
    shape = (3, 9, layer.in_features) if isinstance(layer, FDLinear) else (3, layer.in_channels, 9, 10)
    x = torch.randn(shape)
    inp = x.clone().requires_grad_()
    y = layer(inp)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    ref_inp = x.clone().requires_grad_()
    expected = naive_fdconv(reference, as_map(ref_inp))
    expected.backward(as_map(grad_out))
    assert rel_err(as_map(y.detach()), expected.detach()) < 1e-5
    assert rel_err(inp.grad, ref_inp.grad) < 1e-4
    ref_params = dict(reference.named_parameters())
    for name, p in layer.named_parameters():
        assert rel_err(p.grad, ref_params[name].grad) < 1e-4, name


def test_fused_loops_match_torch_code():
    """The fused CPU loops and the PyTorch code give the same outputs and gradients (inference and training,
    batch 1 and 2, rows of 16*k values and ragged tails, uint8 and int32 group indices, every compile-time
    local conv size; the fused path folds the channel attention into the kernels)."""
    lib = native.library()
    assert lib is not None, "the fused CPU loops did not build on this machine"
    torch.manual_seed(3)
    layers = [FDConv2d(33, 20, 3, padding=1, num_freq_groups=5), FDConv2d(64, 48, 1, num_freq_groups=7),
              FDConv2d(16, 24, 2, padding='same', num_freq_groups=4), FDLinear(20, 36, num_freq_groups=6),
              FDConv2d(20, 40, 3, padding=1, num_freq_groups=300),  # n > 256: int32 group index
              FDConv2d(3, 24, 7, padding=3, num_freq_groups=8),  # local branch K = 1: no compile-time K
              FDConv2d(64, 16, 3, padding=1, num_freq_groups=8),  # K = 5 with k = 3
              FDConv2d(1024, 8, 3, padding=1, num_freq_groups=4), FDConv2d(1024, 12, 1, num_freq_groups=4)]  # K = 7
    for layer, batch in itertools.product(layers, (1, 2)):
        randomize_(layer, scale=0.3)
        shape = (batch, 5, layer.in_features) if isinstance(layer, FDLinear) else (batch, layer.in_channels, 7, 6)
        x = torch.randn(shape)
        results = []
        for fused in (False, True):  # PyTorch code first: the reference
            with native_kernels(fused):
                with torch.no_grad():
                    y_eval = layer(x)
                inp = x.clone().requires_grad_()
                layer.zero_grad()
                layer(inp).square().sum().backward()
            results.append([y_eval, inp.grad] + [p.grad.clone() for p in layer.parameters()])
        for fused in results[1:]:
            for got, expected in zip(fused, results[0], strict=True):
                assert rel_err(got, expected) < 1e-5


@pytest.fixture
def reloads_library():
    """For a test that loads the library again under other conditions: the real one is found again after it
    (request this fixture before monkeypatch, so that it is torn down after monkeypatch's undo)."""
    yield
    assert native.library(reload=True) is not None


def test_without_mkl_fft_the_operators_run_their_pytorch_code(reloads_library, monkeypatch):
    """Where torch has no MKL the loops are not used at all (they call MKL's FFT); the layer still works."""
    monkeypatch.setattr(torch.backends.mkl, 'is_available', lambda: False)
    assert native.library(reload=True) is None
    layer = FDConv2d(24, 40, 3, padding=1, num_freq_groups=16)
    x = torch.randn(2, 24, 7, 7)
    expected = naive_fdconv(layer, x)
    with torch.no_grad():
        assert rel_err(layer(x), expected) < 1e-5


def test_fused_loops_are_built_once_per_machine(reloads_library, monkeypatch, tmp_path):
    """The library is compiled into the cache once (atomically: no temporary file stays), then loaded."""
    monkeypatch.setenv('FDCONV_ZOO_CACHE', str(tmp_path))
    assert native.library(reload=True) is not None
    (built,) = tmp_path.iterdir()
    assert built.suffix == '.so'
    stamp = built.stat().st_mtime_ns
    assert native.library(reload=True) is not None
    assert list(tmp_path.iterdir()) == [built] and built.stat().st_mtime_ns == stamp


def test_fused_loops_fall_back_with_one_warning(reloads_library, monkeypatch, tmp_path):
    """No compiler or a failing build: the PyTorch code runs, with one clear warning (none when the switch is
    off: then nothing is built), and no half-written library is left in the cache."""
    cache, bin_dir = tmp_path / 'cache', tmp_path / 'bin'
    bin_dir.mkdir()
    monkeypatch.setenv('FDCONV_ZOO_CACHE', str(cache))
    monkeypatch.setenv('CXX', 'no-such-compiler-fdconv')
    with pytest.warns(RuntimeWarning, match='no C.. compiler'):
        assert native.library(reload=True) is None
    broken = bin_dir / 'broken-c++'  # answers --version, then fails the compilation with a message
    broken.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo broken 1.0; exit 0; }\n'
                      'echo "native.cpp:1: error: broken compiler" >&2; exit 1\n')
    broken.chmod(0o755)
    monkeypatch.setenv('CXX', str(broken))
    with pytest.warns(RuntimeWarning, match='building the fused CPU loops failed.*broken compiler'):
        assert native.library(reload=True) is None
    assert list(cache.iterdir()) == []  # the temporary output is gone
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert rel_err(FDConv2d.from_dense(conv)(x), conv(x)) < 1e-5



def test_batch_one_training_step_reaches_every_part():
    """Batch size 1 trains (no batch statistics); after one step every parameter gets a non-zero gradient."""
    torch.manual_seed(4)
    layer = FDConv2d(24, 24, 3, padding=1).train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in layer.named_parameters()}
    for _step in range(2):  # the trunk's gradient is zero while the heads are still zero
        loss = layer(torch.randn(1, 24, 8, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    assert not torch.equal(layer.ksm_global.kernel_fc.weight, before['ksm_global.kernel_fc.weight'])
    assert torch.isfinite(loss)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_output_dtype(dtype):
    torch.manual_seed(5)
    layer = FDConv2d(24, 24, 3, padding=1).eval()
    randomize_(layer, scale=0.1)
    lin = FDLinear(24, 32).eval()
    x = torch.randn(2, 24, 8, 8)
    with torch.no_grad():
        y = layer(x.to(dtype))
        assert y.dtype == dtype
        assert rel_err(y, layer(x)) < 3e-2
        assert lin(x.permute(0, 2, 3, 1).to(dtype)).dtype == dtype
        half_layer = FDConv2d(24, 24, 3, padding=1).to(dtype)
        assert half_layer(x.to(dtype)).dtype == dtype


def test_training_under_autocast_keeps_dtypes_and_gradients():
    """bf16 autocast in forward (output bf16), backward in the input's dtype: gradients close to float32's."""
    torch.manual_seed(8)
    layer = FDConv2d(24, 24, 3, padding=1)
    randomize_(layer, scale=0.1)
    x = torch.randn(2, 24, 8, 8)
    grads = []
    for amp in (False, True):
        layer.zero_grad()
        inp = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            y = layer(inp)
        assert y.dtype == (torch.bfloat16 if amp else torch.float32)
        y.float().pow(2).mean().backward()
        assert inp.grad.dtype == torch.float32
        grads.append([inp.grad] + [p.grad for p in layer.parameters()])
    for g32, g16 in zip(*grads, strict=True):
        assert rel_err(g16, g32) < 5e-2


def test_fdlinear_pools_over_all_tokens_and_keeps_shape():
    torch.manual_seed(6)
    lin = FDLinear(20, 30).eval()
    randomize_(lin)
    x = torch.randn(2, 4, 5, 20)
    with torch.no_grad():
        y = lin(x)
        assert y.shape == (2, 4, 5, 30)
        # the same tokens in another layout give the same result: statistics pool over all tokens of a sample
        torch.testing.assert_close(lin(x.reshape(2, 20, 20)).view(2, 4, 5, 30), y)
        # each sample only sees its own tokens
        torch.testing.assert_close(lin(x[1:]), y[1:])


def test_state_dict_round_trip_through_safetensors():
    torch.manual_seed(7)
    layer = FDConv2d(24, 24, 3, padding=1, num_freq_groups=8).eval()
    randomize_(layer)
    with torch.no_grad():
        layer.fdw.group_of_bin.copy_(torch.randint(0, 8, layer.fdw.group_of_bin.shape))
    blob = save(layer.state_dict())
    other = FDConv2d(24, 24, 3, padding=1, num_freq_groups=8).eval()
    other.load_state_dict(load(blob))
    x = torch.randn(2, 24, 8, 8)
    with torch.no_grad():
        assert torch.equal(other(x), layer(x))


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(8)
    layer = FDConv2d(24, 24, 3, padding=1).eval()
    randomize_(layer, scale=0.1)
    x = torch.randn(2, 24, 8, 8)
    compiled = torch.compile(layer)
    with torch.no_grad():
        assert rel_err(compiled(x), layer(x)) < 1e-5


def test_nothing_is_printed(capsys):
    layer = FDConv2d(24, 24, 3, padding=1)
    layer(torch.randn(1, 24, 8, 8))
    FDLinear(24, 24)(torch.randn(1, 3, 24))
    assert capsys.readouterr() == ('', '')


def test_bad_input_errors_name_the_problem():
    layer = FDConv2d(24, 32, 3, padding=1)
    with pytest.raises(ValueError, match=r'\(B, 24, H, W\).*\(2, 23, 8, 8\)'):
        layer(torch.randn(2, 23, 8, 8))
    with pytest.raises(ValueError, match='expects input'):
        layer(torch.randn(24, 8, 8))
    with pytest.raises(ValueError, match=r'\(B, \.\.\., 24\)'):
        FDLinear(24, 8)(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match='n=300 must be between 1 and the 240 spectral bins'):
        FDConv2d(5, 10, 3, num_freq_groups=300)
    with pytest.raises(TypeError, match='unknown_option'):
        FDConv2d(24, 24, 3, unknown_option=1)
    with pytest.raises(ValueError, match=r'kernel_size must be .* tuple of 2'):
        FDConv2d(24, 24, (3, 3, 3))
    with pytest.raises(ValueError, match=r'FDConv3d expects input \(B, 24, D, H, W\)'):
        FDConv3d(24, 24, 3)(torch.randn(2, 24, 8, 8))
    bad = layer.state_dict()
    bad['ksm_global.channel_fc.weight'] = torch.zeros(7, 16)
    with pytest.raises(RuntimeError, match=r'ksm_global\.channel_fc\.weight.*\[7, 16\].*\[24, 16\]'):
        layer.load_state_dict(bad)


def test_padding_modes_match_dense():
    x = torch.randn(2, 24, 9, 9)
    for mode in ('reflect', 'circular'):
        conv = nn.Conv2d(24, 24, 3, padding=1, padding_mode=mode)
        with torch.no_grad():
            assert rel_err(FDConv2d.from_dense(conv)(x), conv(x)) < 1e-5


def test_repr_and_module_log_quiet(caplog):
    with caplog.at_level(logging.INFO, logger='fdconv_zoo'):
        layer = FDConv2d(24, 24, 3, padding=1)
    assert 'num_freq_groups=64' in repr(layer)
    assert not caplog.records


@pytest.mark.parametrize('kwargs,named', [
    (dict(num_freq_groups='many'), "num_freq_groups='many'"), (dict(num_freq_groups=2.5), 'num_freq_groups=2.5'),
    (dict(num_freq_groups=True), 'num_freq_groups=True'), (dict(att_multi=1.0), 'att_multi=1.0'),
    (dict(att_multi=float('nan')), 'att_multi=nan'), (dict(temperature=0), 'temperature=0'),
    (dict(reduction=-1), 'reduction=-1'), (dict(min_hidden=0), 'min_hidden=0'), (dict(ksm_local='yes'), 'ksm_local'),
    (dict(fbm='on'), "fbm='on'"), (dict(fbm_cutoffs=()), 'fbm_cutoffs=()'), (dict(fbm_cutoffs=[2, 2]), 'fbm_cutoffs'),
    (dict(stride=0), 'stride'), (dict(padding=-1), 'padding'), (dict(kernel_size=(3, 'x')), 'kernel_size'),
])
def test_every_option_is_checked_where_it_enters(kwargs, named):
    """One ValueError naming the option and its value, from the layer and from a model constructor alike."""
    args = {'kernel_size': 3, **kwargs}
    with pytest.raises(ValueError, match=re.escape(named)):
        FDConv2d(16, 16, **args)
    if 'kernel_size' not in kwargs and not {'stride', 'padding'} & set(kwargs):
        with pytest.raises(ValueError, match=re.escape(named)):
            timm.create_model('resnet18_fdconv', **kwargs)


@pytest.mark.parametrize('opt', ['sgd', 'adamw'])
def test_spectrum_trains_as_fast_as_the_dense_kernel(opt):
    """The spectrum is stored orthonormal: one optimizer step moves the synthesised kernel about as far as the
    same step moves a dense conv's kernel (stored as the plain FFT it moved 1/N as far under SGD, 1/sqrt(N)
    under Adam: 1/36864 and 1/192 for this layer)."""
    torch.manual_seed(0)
    dense = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
    layer = FDConv2d.from_dense(dense, fbm=False, ksm_local=False)
    x = torch.randn(4, 64, 8, 8)
    target = torch.randn(4, 64, 8, 8)
    moved = []
    for module, weight in ((dense, lambda: dense.weight), (layer, layer.dense_weight)):
        before = weight().detach().clone()
        params = [dense.weight] if module is dense else [layer.fdw.spectrum]
        optimizer = (torch.optim.SGD(params, lr=0.1) if opt == 'sgd' else torch.optim.AdamW(params, lr=1e-3))
        torch.nn.functional.mse_loss(module(x), target).backward()
        optimizer.step()
        moved.append((weight().detach() - before).norm().item())
    assert 0.4 < moved[1] / moved[0] < 2.5, moved


def test_checkpoint_with_the_unnormalised_spectrum_still_loads():
    """Checkpoints written before the orthonormal scale hold rfft2 itself and no spectrum_scale: they load
    (state dict, timm's pretrained filter) to the same layer."""
    from fdconv_zoo.models._fdconv import fdconv_checkpoint_filter
    torch.manual_seed(0)
    model = timm.create_model('resnet18_fdconv', channels=[16, 16, 32, 32], stem_width=16, layers=[1, 1, 1, 1],
                              num_freq_groups=8).eval()
    old = {}
    for key, value in model.state_dict().items():
        if key.endswith('fdw.spectrum_scale'):
            continue
        scale = model.get_submodule(key[:-len('.spectrum')]).scale if key.endswith('fdw.spectrum') else 1.0
        old[key] = value * scale if key.endswith('fdw.spectrum') else value
    x = torch.randn(1, 3, 32, 32)
    for how in ('state_dict', 'filter'):
        fresh = timm.create_model('resnet18_fdconv', channels=[16, 16, 32, 32], stem_width=16, layers=[1, 1, 1, 1],
                                  num_freq_groups=8).eval()
        sd = dict(old) if how == 'state_dict' else fdconv_checkpoint_filter(dict(old), fresh)
        fresh.load_state_dict(sd, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-6)
