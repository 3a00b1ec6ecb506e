"""Dense -> FDConv conversion is exact at step 0, for layers shaped like the zoo's and for whole timm models."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from conftest import rel_err

from fdconv_zoo import FDConv2d, FDLinear, convert_to_fdconv
from fdconv_zoo.apps.benchmark import liven_


@pytest.mark.parametrize('conv,shape', [
    (nn.Conv2d(256, 64, 1, bias=False), (2, 256, 14, 14)),                # ResNet bottleneck conv1
    (nn.Conv2d(128, 128, 3, stride=2, padding=1, bias=False), (2, 128, 28, 28)),  # ResNet conv2, strided
    (nn.Conv2d(64, 256, 1, bias=False), (1, 64, 14, 14)),                 # ResNet conv3
    (nn.Conv2d(96, 96, 7, padding=3, groups=96), (2, 96, 14, 14)),        # ConvNeXt depthwise 7x7
    (nn.Conv2d(48, 64, 3, padding=2, dilation=2, groups=4), (2, 48, 11, 13)),
])
def test_converted_conv_matches_dense(conv, shape):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(shape))
    with torch.no_grad():
        assert rel_err(FDConv2d.from_dense(conv)(x), conv(x)) <= 1e-5


@pytest.mark.parametrize('shape', [(2, 7, 7, 96), (2, 49, 96), (3, 96)])  # ConvNeXt NHWC, Swin tokens, vectors
def test_converted_linear_matches_dense(shape):
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(96, 384), nn.Linear(384, 96)
    x = torch.randn(shape)
    with torch.no_grad():
        dense = fc2(torch.nn.functional.gelu(fc1(x)))
        fd = FDLinear.from_dense(fc2)(torch.nn.functional.gelu(FDLinear.from_dense(fc1)(x)))
    assert rel_err(fd, dense) <= 1e-5


@pytest.mark.parametrize('name,size', [
    ('resnet50', 160), ('convnext_tiny', 128), ('swin_tiny_patch4_window7_224', 224)])
def test_converted_timm_model_matches_dense(name, size):
    torch.manual_seed(0)
    model = liven_(timm.create_model(name, num_classes=10)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        dense = model(x)
        convert_to_fdconv(model)
        assert any(isinstance(m, (FDConv2d, FDLinear)) for m in model.modules())
        assert rel_err(model(x), dense) <= 1e-5


def test_default_rule_is_the_reference_gate():
    model = nn.Sequential(nn.Conv2d(3, 64, 7), nn.Conv2d(64, 64, 3), nn.Conv2d(64, 16, 1), nn.Conv2d(64, 64, 5))
    convert_to_fdconv(model)
    assert [type(m).__name__ for m in model] == ['Conv2d', 'FDConv2d', 'Conv2d', 'Conv2d']


def test_custom_rule_and_options_reach_the_layers():
    model = nn.Sequential(nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 1))
    convert_to_fdconv(model, rule=lambda name, m: name == '1', num_freq_groups=8, ksm_local=False)
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[1], FDConv2d)
    assert model[1].num_freq_groups == 8 and model[1].ksm_local is None


def test_bottleneck_only_resnet50_adds_reported_params():
    """Spec section 5: every bottleneck conv as FDConv (n = 64), stem and shortcuts dense: +3.65M."""
    model = timm.create_model('resnet50', num_classes=0)
    dense = sum(p.numel() for p in model.parameters())
    convert_to_fdconv(model, rule=lambda name, m: '.conv' in name and name.startswith('layer'))
    added = sum(p.numel() for p in model.parameters()) - dense
    assert dense == 23_508_032
    assert abs(added - 3.65e6) < 0.01e6, added
