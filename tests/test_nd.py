"""FDConv1d and FDConv3d: the literal spec, exact conversion, the weight-matrix layout, gradients, the operators'
contracts (opcheck, torch.compile, torch.export, empty batches, autocast) and whole 1-D and 3-D networks
(torchvision's video ResNets, MONAI's UNet, a sequence CNN), each with a training step."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import rel_err
from naive import naive_fdconv, randomize_

from fdconv_zoo import convert_to_fdconv
from fdconv_zoo.layers import FDConv1d, FDConv2d, FDConv3d
from fdconv_zoo.layers.fdw import dense_spectrum

CASES = {
    '1d-fbm': (lambda: FDConv1d(16, 24, 3, padding=1, num_freq_groups=8), (2, 16, 11)),
    '1d-strided-groups': (lambda: FDConv1d(16, 24, 5, stride=2, padding=2, groups=2, num_freq_groups=4),
                          (2, 16, 13)),
    '1d-1x1': (lambda: FDConv1d(16, 24, 1, num_freq_groups=5), (2, 16, 9)),
    '1d-reflect-dilated': (lambda: FDConv1d(16, 16, 3, padding=2, dilation=2, padding_mode='reflect',
                                            num_freq_groups=6), (2, 16, 10)),
    '2d-(1,3)-nonsquare': (lambda: FDConv2d(16, 24, (1, 3), padding=(0, 1), num_freq_groups=6), (2, 16, 5, 7)),
    '3d-fbm': (lambda: FDConv3d(8, 12, 3, padding=1, num_freq_groups=8), (2, 8, 4, 6, 5)),
    '3d-(1,3,3)-strided': (lambda: FDConv3d(8, 12, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1),
                                            num_freq_groups=6), (2, 8, 3, 7, 6)),
    '3d-(3,1,1)-groups': (lambda: FDConv3d(8, 12, (3, 1, 1), padding=(1, 0, 0), groups=4, num_freq_groups=4),
                          (2, 8, 5, 4, 3)),
    '3d-1x1x1-strided': (lambda: FDConv3d(8, 12, 1, stride=2, num_freq_groups=4), (2, 8, 5, 4, 6)),
    '3d-same-uneven': (lambda: FDConv3d(8, 8, (2, 3, 3), padding='same', num_freq_groups=4, fbm=True),
                          (2, 8, 4, 5, 5)),
}


def _case(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    make, shape = CASES[name]
    layer = make()
    randomize_(layer, seed=seed, scale=0.3)
    return layer, torch.randn(shape)


@pytest.mark.parametrize('name', list(CASES))
def test_layer_matches_literal_spec(name, loops):
    """Forward against the spec written out per sample (tests/naive.py), with the fused loops and without."""
    layer, x = _case(name)
    assert rel_err(layer(x), naive_fdconv(layer, x)) < 1e-5


@pytest.mark.parametrize('name', list(CASES))
def test_gradients_match_autograd_of_the_literal_spec(name, loops):
    """The registered gradients (kernels made again in the backward) against autograd through the spec, for the
    input and every parameter."""
    layer, x = _case(name, seed=1)
    x.requires_grad_()
    params = [x, *layer.parameters()]
    y = layer(x)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, params, grad)
    expected = torch.autograd.grad(naive_fdconv(layer, x), params, grad, allow_unused=True)
    for (name_, _), a, b in zip([('x', x), *layer.named_parameters()], got, expected, strict=True):
        assert rel_err(a, b if b is not None else torch.zeros_like(a)) < 1e-4, name_


def test_gradcheck_float64():
    """Finite differences in float64 (the operators' PyTorch code) for a 1-D and a 3-D layer with every part."""
    for make, shape in (CASES['1d-fbm'], (lambda: FDConv3d(4, 6, 3, padding=1, num_freq_groups=4),
                                          (1, 4, 3, 4, 4))):
        torch.manual_seed(0)
        layer = make().double()
        randomize_(layer, scale=0.3)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        def call(x_, s_, layer=layer):
            return torch.func.functional_call(layer, {'fdw.spectrum': s_}, (x_,))
        assert torch.autograd.gradcheck(call, (x, layer.fdw.spectrum), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize('dense', [
    nn.Conv1d(24, 32, 3, padding=1), nn.Conv1d(24, 32, 7, stride=3, padding=3, bias=False),
    nn.Conv1d(24, 24, 3, padding='same', dilation=3, groups=4), nn.Conv1d(24, 32, 4, padding='same'),
    nn.Conv1d(24, 32, 3, padding=1, padding_mode='circular'),
    nn.Conv2d(24, 32, (3, 1), padding=(1, 0)),
    nn.Conv3d(24, 32, 3, padding=1), nn.Conv3d(24, 32, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
    nn.Conv3d(24, 32, (3, 1, 1), padding=(1, 0, 0), bias=False), nn.Conv3d(24, 32, 1, stride=2),
    nn.Conv3d(24, 24, 3, padding=1, groups=24), nn.Conv3d(24, 32, 3, padding=1, padding_mode='replicate'),
    nn.Conv3d(24, 32, (2, 3, 3), padding='same'),
], ids=lambda m: repr(m))
def test_from_dense_is_exact(dense, loops):
    """At step 0 the FDConv layer computes the dense one (float32, relative error <= 1e-5), FBM included."""
    torch.manual_seed(0)
    layer = {nn.Conv1d: FDConv1d, nn.Conv2d: FDConv2d, nn.Conv3d: FDConv3d}[type(dense)].from_dense(dense)
    x = torch.randn(2, 24, *(17, 9, 8)[:dense.weight.ndim - 2])
    with torch.no_grad():
        assert rel_err(layer(x), dense(x)) <= 1e-5


def test_weight_matrix_layout_is_that_of_the_lower_dimensional_kernel():
    """A 1-D kernel k has the spectrum and grouping of the 2-D kernel (k, 1) (the authors' answer for time
    series), and a 3-D kernel (1, k, k) those of the 2-D kernel k x k (a 2-D kernel inflated in time)."""
    torch.manual_seed(0)
    conv1 = nn.Conv1d(16, 24, 5)
    conv2 = nn.Conv2d(16, 24, (5, 1))
    conv2.weight.data.copy_(conv1.weight.data[..., None])
    a, b = FDConv1d.from_dense(conv1, num_freq_groups=8), FDConv2d.from_dense(conv2, num_freq_groups=8)
    assert torch.equal(a.fdw.spectrum, b.fdw.spectrum) and torch.equal(a.fdw.group_of_bin, b.fdw.group_of_bin)
    assert a.fdw.spectrum.shape == (16 // 2 + 1, 24 * 5, 2)
    conv3 = nn.Conv3d(16, 24, (1, 3, 3))
    conv2 = nn.Conv2d(16, 24, 3)
    conv3.weight.data.copy_(conv2.weight.data[:, :, None])
    a, b = FDConv3d.from_dense(conv3, num_freq_groups=8), FDConv2d.from_dense(conv2, num_freq_groups=8)
    assert torch.equal(a.fdw.spectrum, b.fdw.spectrum) and torch.equal(a.fdw.group_of_bin, b.fdw.group_of_bin)
    cube = torch.randn(24, 16, 3, 3, 3)  # the last axis with the input channel, the others with the output one
    matrix = torch.fft.irfft2(torch.view_as_complex(dense_spectrum(cube, 3)).t(), s=(24 * 9, 16 * 3))
    assert torch.allclose(matrix.view(24, 3, 3, 16, 3).permute(0, 3, 1, 2, 4).double(), cube.double(), atol=1e-6)


@pytest.mark.parametrize('name', ['1d-fbm', '1d-strided-groups', '3d-fbm', '3d-(3,1,1)-groups'])
def test_opcheck_every_operator(name, loops):
    """torch.library.opcheck (schema, fake, registered autograd, AOT dispatch) on 1-D and 3-D inputs."""
    from test_ops import opcheck_operators
    opcheck_operators(*_case(name))


@pytest.mark.parametrize('name', list(CASES))
def test_portable_decomposition_equals_the_operator(name):
    """The export's decomposition (layers/ops/portable.py: real-valued FFTs as products, im2col from slices) on
    every 1-D and 3-D geometry."""
    from test_ops import _layer_inputs

    from fdconv_zoo.layers.ops.portable import portable_dynamic_conv
    layer, x = _case(name)
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _layer_inputs(layer, x).values()]
    assert rel_err(portable_dynamic_conv(*args), torch.ops.fdconv.dynamic_conv(*args)) < 1e-5


@pytest.mark.parametrize('name', ['1d-fbm', '3d-fbm'])
def test_compile_fullgraph_export_and_empty_batch(name):
    """torch.compile with fullgraph, torch.export with a free batch size, and a batch of 0 (forward and
    backward), as for FDConv2d."""
    layer, x = _case(name)
    expected = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    assert rel_err(compiled(x), expected) < 1e-5
    batch = torch.export.Dim('batch', min=1, max=64)
    program = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},))
    assert any('fdconv' in str(n.target) for n in program.graph.nodes)
    assert rel_err(program.module()(torch.cat([x, x])), torch.cat([expected, expected])) < 1e-5
    empty = x[:0].clone().requires_grad_()
    y = layer(empty)
    assert y.shape == (0, *expected.shape[1:])
    y.sum().backward()
    assert empty.grad.shape == empty.shape and layer.fdw.spectrum.grad.abs().sum() == 0


@pytest.mark.parametrize('name', ['1d-fbm', '3d-fbm'])
def test_bf16_autocast(name):
    """Under bf16 autocast the layer returns bf16 and trains: gradients reach the spectrum in its dtype."""
    layer, x = _case(name)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), layer(x)) < 3e-2
    y.float().square().mean().backward()
    assert layer.fdw.spectrum.grad.dtype == torch.float32 and layer.fdw.spectrum.grad.abs().sum() > 0


# ---- whole networks ---------------------------------------------------------------------------------------------

def _sequence_cnn() -> nn.Module:
    """A 1-D CNN for sequences (e.g. sensor or audio features): a wide stem, strided, dilated and 1x1 convs."""
    return nn.Sequential(
        nn.Conv1d(6, 32, 7, padding=3), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Conv1d(64, 64, 3, padding='same', dilation=2), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Conv1d(64, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, 5))


def _r3d_18() -> nn.Module:
    from torchvision.models.video import r3d_18
    return r3d_18(num_classes=7)


def _r2plus1d_18() -> nn.Module:
    from torchvision.models.video import r2plus1d_18
    return r2plus1d_18(num_classes=7)


def _monai_unet() -> nn.Module:
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=1)


NETWORKS = {  # builder, input, the dense conv type, how many convs the placement selects
    'sequence-cnn': (_sequence_cnn, (2, 6, 64), nn.Conv1d, 3),
    'r3d_18': (_r3d_18, (2, 3, 4, 32, 32), nn.Conv3d, 19),
    'r2plus1d_18': (_r2plus1d_18, (2, 3, 4, 32, 32), nn.Conv3d, 36),
    'monai-unet': (_monai_unet, (2, 1, 16, 16, 16), nn.Conv3d, 5),
}


@pytest.mark.parametrize('name', list(NETWORKS))
def test_network_converts_exactly_and_trains(name):
    """convert_to_fdconv under the paper's placement (min(Cin, Cout) > 16, kernels 1 or 3 wide along each axis):
    the converted network computes the dense one (random weights, eval mode) and one training step moves every
    FDConv part."""
    make, shape, dense_type, count = NETWORKS[name]
    torch.manual_seed(0)
    dense = make().eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in dense.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    expected_targets = [n for n, m in dense.named_modules() if isinstance(m, dense_type)
                        and min(m.in_channels, m.out_channels) > 16 and all(k in (1, 3) for k in m.kernel_size)]
    x = torch.randn(shape)
    with torch.no_grad():
        y_dense = dense(x)
    model = convert_to_fdconv(dense)
    converted = [n for n, m in model.named_modules() if isinstance(m, (FDConv1d, FDConv3d))]
    assert converted == expected_targets and len(converted) == count
    with torch.no_grad():
        assert rel_err(model(x), y_dense) <= 1e-5
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    y = model(x)
    loss = y.float().square().mean()
    loss.backward()
    layer = model.get_submodule(converted[-1])
    for part in (layer.fdw.spectrum, layer.ksm_global.kernel_fc.weight, layer.ksm_local.conv.weight):
        assert part.grad is not None and torch.isfinite(part.grad).all() and part.grad.abs().sum() > 0
    before = layer.fdw.spectrum.detach().clone()
    optimizer.step()
    assert not torch.equal(before, layer.fdw.spectrum)


def test_r2plus1d_factorised_convs_are_converted():
    """R(2+1)D's spatial (1, 3, 3) and temporal (3, 1, 1) convs are both converted; the stem (3 input channels)
    and nothing with 16 or fewer channels is."""
    model = convert_to_fdconv(_r2plus1d_18())
    kernels = {tuple(m.kernel_size) for m in model.modules() if isinstance(m, FDConv3d)}
    assert {(1, 3, 3), (3, 1, 1), (1, 1, 1)} <= kernels
    assert isinstance(model.stem[0], nn.Conv3d)
    fbm = [m for m in model.modules() if isinstance(m, FDConv3d) and m.fbm is not None]
    assert not fbm  # FBM sits on kernels 3 wide along every axis; R(2+1)D has none
    assert all(m.fbm is not None for m in convert_to_fdconv(_r3d_18()).modules()
               if isinstance(m, FDConv3d) and m.kernel_size == (3, 3, 3))


def test_meta_device_build_of_a_3d_network_matches():
    """Built the way transformers, accelerate and FSDP build (meta device, to_empty, load, then the buffer pass
    timm and transformers run): a converted 3-D network gives the same outputs."""
    torch.manual_seed(0)
    ref = convert_to_fdconv(_r3d_18()).eval()
    with torch.device('meta'):
        model = convert_to_fdconv(_r3d_18())
    model.to_empty(device='cpu')
    model.load_state_dict(ref.state_dict())
    for m in model.modules():
        if hasattr(m, 'init_non_persistent_buffers'):
            m.init_non_persistent_buffers()
    x = torch.randn(1, 3, 4, 24, 24)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref(x))


def test_dense_checkpoint_loads_into_a_converted_network():
    """load_reference_checkpoint (the weight import behind timm's pretrained filter) takes a dense 1-D or 3-D
    network's state dict: each conv's plain weight becomes its FDConv layer's spectrum, exactly."""
    from fdconv_zoo import load_reference_checkpoint
    for make, shape in ((_sequence_cnn, (2, 6, 64)), (_r3d_18, (1, 3, 4, 24, 24))):
        torch.manual_seed(0)
        dense = make().eval()
        model = convert_to_fdconv(make()).eval()  # other random weights
        load_reference_checkpoint(model, dense.state_dict())
        x = torch.randn(shape)
        with torch.no_grad():
            assert rel_err(model(x), dense(x)) <= 1e-5
