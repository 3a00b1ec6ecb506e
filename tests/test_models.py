"""The timm-registered FDConv families: pretrained tags converted from dense checkpoints, heads, features."""
from __future__ import annotations

import pytest
import timm
import torch
from conftest import rel_err
from safetensors.torch import load, save
from timm.models import save_for_hf

import fdconv_zoo  # noqa: F401  registers the models
from fdconv_zoo import FDConv2d, FDLinear
from fdconv_zoo.apps.benchmark import liven_
from fdconv_zoo.models import create_model

FAMILIES = [
    ('resnet50_fdconv.a1_in1k', 'resnet50', 160),
    ('convnext_tiny_fdconv.fb_in22k_ft_in1k', 'convnext_tiny', 128),
    ('swin_tiny_patch4_window7_224_fdconv.ms_in1k', 'swin_tiny_patch4_window7_224', 224),
    # registered with register_fdconv: timm's default (first) tag of each family
    ('vit_small_patch16_224_fdconv.augreg_in21k_ft_in1k', 'vit_small_patch16_224', 224),
    ('deit3_small_patch16_224_fdconv.fb_in1k', 'deit3_small_patch16_224', 224),
    ('efficientnet_b0_fdconv.ra_in1k', 'efficientnet_b0', 128),
    ('tf_efficientnet_lite0_fdconv.in1k', 'tf_efficientnet_lite0', 128),
    ('convnextv2_tiny_fdconv.fcmae_ft_in22k_in1k', 'convnextv2_tiny', 128),
    ('regnety_016_fdconv.tv2_in1k', 'regnety_016', 128),
]


def serve_dense(hub, dense_name: str, tag_name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """Random dense timm weights, served as the tag's Hub repo (e.g. timm/resnet50.a1_in1k)."""
    torch.manual_seed(seed)
    dense = liven_(timm.create_model(dense_name, **kwargs), seed).eval()
    repo = timm.models.get_pretrained_cfg(tag_name).hf_hub_id
    hub.add_files(repo, {'model.safetensors': save(dense.state_dict())})
    return dense


@pytest.mark.parametrize('tag,dense_name,size', FAMILIES, ids=[f[1] for f in FAMILIES])
def test_pretrained_tag_converts_dense_checkpoint_exactly(hub, tag, dense_name, size):
    dense = serve_dense(hub, dense_name, tag)
    model = timm.create_model(tag, pretrained=True).eval()
    assert any(isinstance(m, (FDConv2d, FDLinear)) for m in model.modules())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert rel_err(model(x), dense(x)) <= 1e-5
    # new head and a grey-scale stem, as timm users expect
    model = timm.create_model(tag, pretrained=True, num_classes=7, in_chans=1).eval()
    assert model(torch.randn(1, 1, size, size)).shape == (1, 7)


def test_pretrained_filter_passes_native_fdconv_weights(hub):
    torch.manual_seed(1)
    src = timm.create_model('resnet18_fdconv').eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    hub.add_files('timm/resnet18.tv_in1k', {'model.safetensors': save(src.state_dict())})
    model = timm.create_model('resnet18_fdconv.tv_in1k', pretrained=True).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_pretrained_wrong_shape_names_the_key(hub):
    dense = timm.create_model('resnet18').state_dict()
    dense['layer1.0.conv1.weight'] = torch.zeros(64, 32, 3, 3)
    hub.add_files('timm/resnet18.a1_in1k', {'model.safetensors': save(dense)})
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1.*\(64, 32, 3, 3\).*\(64, 64, 3, 3\)"):
        timm.create_model('resnet18_fdconv.a1_in1k', pretrained=True)


def test_fdconv_options_are_constructor_args_and_round_trip_config(tmp_path):
    model = timm.create_model('resnet18_fdconv', num_freq_groups=16, ksm_local=False, fbm_cutoffs=[2, 4])
    conv = model.layer1[0].conv1
    assert conv.num_freq_groups == 16 and conv.ksm_local is None and conv.fbm.cutoffs == (2, 4)
    args = dict(num_freq_groups=16, ksm_local=False, fbm_cutoffs=[2, 4])
    save_for_hf(model, tmp_path, model_args=args)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    assert loaded.layer1[0].conv1.num_freq_groups == 16
    torch.testing.assert_close(loaded.state_dict()['layer1.0.conv1.fdw.spectrum'], conv.fdw.spectrum.detach())
    with pytest.raises(TypeError, match='bogus'):
        timm.create_model('resnet18_fdconv', bogus=1)


def test_convnext_dwconv_option_and_placement():
    model = timm.create_model('convnext_tiny_fdconv', fdconv_dwconv=True)
    block = model.stages[0].blocks[0]
    assert isinstance(block.mlp.fc1, FDLinear) and isinstance(block.mlp.fc2, FDLinear)
    assert isinstance(block.conv_dw, FDConv2d) and block.conv_dw.groups == 96 and block.conv_dw.fbm is None
    assert not isinstance(timm.create_model('convnext_tiny_fdconv').stages[0].blocks[0].conv_dw, FDConv2d)


def test_resnet_placement_follows_the_paper():
    r50 = timm.create_model('resnet50_fdconv')
    block = r50.layer2[0]
    assert all(isinstance(getattr(block, c), FDConv2d) for c in ('conv1', 'conv2', 'conv3'))
    assert type(r50.conv1) is torch.nn.Conv2d and type(block.downsample[0]) is torch.nn.Conv2d
    assert block.conv2.fbm is not None and block.conv1.fbm is None
    r18 = timm.create_model('resnet18_fdconv')
    assert isinstance(r18.layer1[0].conv1, FDConv2d) and isinstance(r18.layer1[0].conv2, FDConv2d)


def test_configs_saved_with_the_old_recompute_option_still_load():
    with pytest.warns(FutureWarning, match="'recompute' is gone"):
        model = timm.create_model('resnet18_fdconv', recompute=False, num_freq_groups=8)
    assert model.layer1[0].conv1.num_freq_groups == 8


class ArchitectureTester:
    """What every FDConv architecture must do as a timm model (in the style of smp's BaseModelTester): one
    subclass per family, on a narrow member so that each check takes seconds."""
    name: str
    size: int = 64
    kwargs: dict = {}
    reductions: tuple[int, ...] = (4, 8, 16, 32)

    def model(self, **kwargs) -> torch.nn.Module:
        torch.manual_seed(0)
        return create_model(self.name, **{**self.kwargs, **kwargs})  # registers a family member not shipped

    def test_forward_with_new_head_and_input_channels(self):
        model = self.model(num_classes=7, in_chans=1).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 1, self.size, self.size)).shape == (2, 7)
        assert any(isinstance(m, (FDConv2d, FDLinear)) for m in model.modules())

    def test_backward_reaches_every_fdconv_parameter(self):
        model = liven_(self.model(num_classes=3)).train()
        model(torch.randn(2, 3, self.size, self.size)).logsumexp(1).sum().backward()
        for name, module in model.named_modules():
            if isinstance(module, (FDConv2d, FDLinear)):
                for pname, p in module.named_parameters():
                    assert p.grad is not None and torch.isfinite(p.grad).all(), f'{name}.{pname}'
                assert module.fdw.spectrum.grad.abs().sum() > 0, name

    def test_features_only_for_dense_heads(self):
        """The last four feature maps, at the strides a segmentation or detection neck expects."""
        model = self.model(features_only=True, out_indices=(-4, -3, -2, -1)).eval()
        assert model.feature_info.reduction() == list(self.reductions)
        with torch.no_grad():
            feats = model(torch.randn(1, 3, self.size, self.size))
        for f, c, r in zip(feats, model.feature_info.channels(), self.reductions, strict=True):
            assert c in f.shape and (f.shape[-1] * r == self.size or f.shape[-2] * r == self.size)

    def test_forward_intermediates_and_grad_checkpointing(self):
        model = liven_(self.model()).eval()
        x = torch.randn(1, 3, self.size, self.size)
        with torch.no_grad():
            final, inter = model.forward_intermediates(x, indices=4)
            assert len(inter) == 4
            torch.testing.assert_close(final, model.forward_features(x))
        model.set_grad_checkpointing(True)
        model.train()
        model(x).sum().backward()  # checkpointed FDConv blocks recompute their kernels

    def test_state_dict_round_trip_through_safetensors(self):
        model = liven_(self.model()).eval()
        other = self.model()
        other.load_state_dict(load(save(model.state_dict())), strict=True)
        x = torch.randn(1, 3, self.size, self.size)
        with torch.no_grad():
            torch.testing.assert_close(other.eval()(x), model(x), rtol=0, atol=0)


class TestResNet(ArchitectureTester):
    name = 'resnet18_fdconv'
    kwargs = dict(channels=[16, 16, 32, 32], stem_width=16, layers=[1, 1, 1, 1], num_freq_groups=8)


class TestConvNeXt(ArchitectureTester):
    name = 'convnext_tiny_fdconv'
    kwargs = dict(dims=(24, 48, 96, 192), depths=(1, 1, 1, 1), num_freq_groups=8)


class TestSwin(ArchitectureTester):
    name = 'swin_tiny_patch4_window7_224_fdconv'
    size = 224
    kwargs = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_freq_groups=8)


class TestViT(ArchitectureTester):
    name = 'vit_small_patch16_224_fdconv'
    size = 224
    kwargs = dict(embed_dim=48, depth=4, num_heads=2, num_freq_groups=8)
    reductions = (16, 16, 16, 16)


class TestEfficientNet(ArchitectureTester):
    name = 'efficientnet_b0_fdconv'
    kwargs = dict(num_freq_groups=8)


class TestConvNeXtV2(ArchitectureTester):
    name = 'convnextv2_tiny_fdconv'
    kwargs = dict(dims=(24, 48, 96, 192), depths=(1, 1, 1, 1), num_freq_groups=8)


class TestRegNetY(ArchitectureTester):
    name = 'regnety_002_fdconv'  # the family's smallest member, registered by create_model
    kwargs = dict(num_freq_groups=8)
