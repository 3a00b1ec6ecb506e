"""register_fdconv: any timm architecture as FDConv, its tags converted on load, found again from its config."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from conftest import rel_err
from safetensors.torch import save

import fdconv_zoo
from fdconv_zoo import FDConv2d, FDLinear, register_fdconv
from fdconv_zoo.apps.benchmark import liven_
from fdconv_zoo.apps.cli import main as cli
from fdconv_zoo.hub import push
from fdconv_zoo.models import create_model, placement


def _fdconv_names(model: torch.nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, (FDConv2d, FDLinear))}


def test_any_architecture_registers_with_its_tags_and_converts_exactly(hub):
    """A family the zoo does not ship: one call registers it with a tag per dense tag; the tag loads timm's
    dense checkpoint (served here) converted, equal to the dense model at step 0 with live BatchNorm
    statistics; registering again is a no-op; names that are no timm architecture are refused by name."""
    name = register_fdconv('mobilenetv3_small_100')
    assert name == 'mobilenetv3_small_100_fdconv' and register_fdconv('mobilenetv3_small_100') == name
    dense_tags = timm.list_pretrained('mobilenetv3_small_100.*')
    assert timm.list_pretrained(f'{name}.*') == [t.replace('mobilenetv3_small_100', name) for t in dense_tags]
    torch.manual_seed(0)
    dense = liven_(timm.create_model('mobilenetv3_small_100')).eval()
    tag = timm.models.get_pretrained_cfg(name).tag  # the default tag: timm's default for the dense family
    hub.add_files(f'timm/mobilenetv3_small_100.{tag}', {'model.safetensors': save(dense.state_dict())})
    model = timm.create_model(f'{name}.{tag}', pretrained=True).eval()
    assert _fdconv_names(model)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert rel_err(model(x), dense(x)) <= 1e-5
    assert model.pretrained_cfg['architecture'] == name
    for bad in ('no_such_net', 'resnet50.a1_in1k', 'resnet50_fdconv'):
        with pytest.raises(ValueError, match='not a timm architecture'):
            register_fdconv(bad)


def test_placement_follows_the_paper_and_its_options():
    """Default: the paper's rule (FFN linears; 1x1 and 3x3 convs with more than 16 channels), never squeeze-
    excitation, shortcuts or heads; depthwise convolutions, attention projections and the patch embedding
    are options, as constructor keywords."""
    vit = timm.create_model('vit_small_patch16_224_fdconv', depth=2)
    assert _fdconv_names(vit) == {f'blocks.{i}.mlp.fc{j}' for i in (0, 1) for j in (1, 2)}
    vit = timm.create_model('vit_small_patch16_224_fdconv', depth=2, fdconv_attention=True,
                            fdconv_patch_embed=True)
    assert {'blocks.0.attn.qkv', 'blocks.1.attn.proj', 'patch_embed.proj'} <= _fdconv_names(vit)
    net = timm.create_model('efficientnet_b0_fdconv')
    names = _fdconv_names(net)
    assert 'blocks.2.0.conv_pw' in names and 'conv_head' in names and 'blocks.1.0.conv_pw' not in names  # 16 in
    assert not any('.se.' in n or n.endswith('conv_dw') for n in names)
    assert 'blocks.1.0.conv_dw' in _fdconv_names(timm.create_model('efficientnet_b0_fdconv', fdconv_depthwise=True))
    regnet = _fdconv_names(timm.create_model('regnety_016_fdconv'))
    assert 's1.b1.conv2.conv' in regnet and not any('downsample' in n or '.se.' in n for n in regnet)
    rule = placement()
    assert not rule('head', torch.nn.Linear(64, 64)) and rule('blocks.0.mlp.fc1', torch.nn.Linear(64, 64))


def test_folder_and_hub_repo_of_any_architecture_load_where_it_was_never_registered(hub, tmp_path):
    """What is saved for an architecture registered by hand loads in a new process through fdconv_zoo's
    loaders, its create_model and the CLI, registered from the config."""
    register_fdconv('mobilenetv3_small_050')
    torch.manual_seed(1)
    model = liven_(timm.create_model('mobilenetv3_small_050_fdconv', num_classes=3)).eval()
    folder = fdconv_zoo.save_for_hf(model, tmp_path / 'm')
    assert json.loads((folder / 'config.json').read_text())['architecture'] == 'mobilenetv3_small_050_fdconv'
    repo = push(folder, 'any-arch', org='zoo-test')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    torch.save(x, tmp_path / 'x.pt')
    code = f"""
import torch, timm, fdconv_zoo
from fdconv_zoo.hub import load_checkpoint
from fdconv_zoo.models import create_model
assert not timm.is_model('mobilenetv3_small_050_fdconv')
x = torch.load({str(tmp_path / 'x.pt')!r})
with torch.no_grad():
    for model in (load_checkpoint({str(folder)!r}), create_model('local-dir:{folder}', pretrained=True),
                  create_model('hf-hub:{repo}', pretrained=True)):
        print(model.eval()(x).flatten().tolist())
"""
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    for line in done.stdout.split('\n')[:3]:
        assert rel_err(torch.tensor(json.loads(line)), expected.flatten()) < 1e-6
    done = subprocess.run([sys.executable, '-m', 'fdconv_zoo.apps.cli', 'info', str(folder)], capture_output=True,
                          text=True, env=os.environ.copy())
    assert done.returncode == 0 and 'mobilenetv3_small_050_fdconv' in done.stdout, done.stderr[-3000:]


def test_convert_takes_any_timm_tag(hub, tmp_path):
    """`fdconv-zoo convert` with a dense timm tag of any family: the FDConv folder equals the dense model."""
    torch.manual_seed(2)
    dense = liven_(timm.create_model('mobilenetv3_small_075')).eval()
    tag = timm.models.get_pretrained_cfg('mobilenetv3_small_075').tag
    hub.add_files(f'timm/mobilenetv3_small_075.{tag}', {'model.safetensors': save(dense.state_dict())})
    assert cli(['convert', f'mobilenetv3_small_075.{tag}', str(tmp_path / 'out')]) == 0
    model = create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    assert type(model).__name__ == 'FDMobileNetV3' and _fdconv_names(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), dense(x)) <= 1e-5


@pytest.mark.parametrize('name,kwargs,size', [
    ('efficientnet_b0_fdconv', {}, 64),
    ('regnety_002_fdconv', {}, 64),
    ('convnextv2_tiny_fdconv', {'dims': (24, 48, 96, 192), 'depths': (1, 1, 1, 1)}, 64),
], ids=['efficientnet', 'regnety', 'convnextv2'])
def test_registered_families_as_segmentation_and_detection_backbones(name, kwargs, size):
    """features_only of the new families under smp's decoders (timm-universal encoder) and the detection FPN."""
    from fdconv_zoo.apps.detect import TimmFPN
    from fdconv_zoo.apps.segment import build_segmenter
    segmenter = build_segmenter(name, 'fpn', 3, False, {**kwargs, 'num_freq_groups': 8}).eval()
    with torch.no_grad():
        assert segmenter(torch.randn(1, 3, size, size)).shape == (1, 3, size, size)
    fpn = TimmFPN(name, False, {**kwargs, 'num_freq_groups': 8}, 32).eval()
    with torch.no_grad():
        feats = fpn(torch.randn(1, 3, size, size))
    assert [f.shape[-1] for f in feats.values()][:4] == [size // 4, size // 8, size // 16, size // 32]
