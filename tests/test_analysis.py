"""fdconv-zoo analyze: the numbers behind the pictures, and the report they make."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from fdconv_zoo.apps.analysis import (
    fdconv_layers,
    group_diversity,
    group_kernels,
    image_statistics,
    modulation_distance,
)
from fdconv_zoo.apps.benchmark import liven_
from fdconv_zoo.apps.cli import main as cli
from fdconv_zoo.layers import FDConv2d
from fdconv_zoo.models._fdconv import fdconv_checkpoint_filter

SMALL = {'channels': [32, 32, 64, 64], 'stem_width': 32, 'layers': [1, 1, 1, 1], 'num_freq_groups': 16}


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    """Three real photographs shipped with scikit-image."""
    from skimage import data
    folder = tmp_path_factory.mktemp('photos')
    for name in ('astronaut', 'coffee', 'chelsea'):
        Image.fromarray(getattr(data, name)()).save(folder / f'{name}.png')
    return folder


def converted_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    dense = liven_(timm.create_model('resnet18', **{k: v for k, v in SMALL.items() if k != 'num_freq_groups'}))
    model = timm.create_model('resnet18_fdconv', **SMALL)
    model.load_state_dict(fdconv_checkpoint_filter(dense.state_dict(), model))
    return model.eval()


def test_group_kernels_split_the_dense_kernel_into_orthogonal_parts():
    torch.manual_seed(0)
    layer = FDConv2d(32, 48, 3, num_freq_groups=16)
    kernels = group_kernels(layer)
    assert kernels.shape == (16, 48, 32, 3, 3)
    torch.testing.assert_close(kernels.sum(0), layer.fdw.static_weight(), atol=1e-6, rtol=1e-5)
    d = group_diversity(layer)
    assert d['mean_abs_cosine'] < 1e-5  # disjoint frequency supports: orthogonal (Parseval)
    assert d['random_init_experts'] > 100 * d['mean_abs_cosine']  # random experts: about 1/sqrt(D)
    assert d['dense_init_experts'] > 0.95  # experts made from one dense kernel are nearly parallel
    assert torch.allclose(d['profiles'].sum(1), torch.ones(16, dtype=torch.float64))
    peaks = d['profiles'].argmax(1)
    assert (peaks[1:] >= peaks[:-1]).all()  # radial groups: each group's energy lies further out


def test_converted_model_sits_at_the_identity_until_its_modulation_moves(photos):
    model = converted_resnet18()
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert('RGB').resize((64, 64)))).permute(
        2, 0, 1).float() / 255 for p in sorted(photos.iterdir())])
    layers = fdconv_layers(model)
    stats = image_statistics(model, layers, images)
    assert max(modulation_distance(stats).values()) < 1e-5
    for s in stats.values():
        assert torch.all(s['kernel_attention'] == 1) and torch.all(s['channel_attention'] == 1)
        if 'fbm_bands' in s:
            assert torch.all(s['fbm_bands'] == 1)
            assert s['fbm_edge_mean'] == s['fbm_flat_mean']
    name = next(n for n in layers if layers[n].fbm is not None)
    with torch.no_grad():  # an FBM that reacts to local contrast: edges and flat regions now differ
        layers[name].fbm.band_conv.weight.normal_(0, 0.5)
    moved = image_statistics(model, {name: layers[name]}, images)[name]
    assert moved['fbm_distance'] > 0.05
    assert any(abs(e - f) > 1e-3 for e, f in zip(moved['fbm_edge_mean'], moved['fbm_flat_mean'], strict=True))


def test_analyze_writes_figures_json_and_index(photos, tmp_path, capsys):
    folder = tmp_path / 'model'
    timm.models.save_for_hf(converted_resnet18(), folder, safe_serialization=True)
    out = tmp_path / 'report'
    assert cli(['analyze', str(folder), '--images', str(photos), '--out', str(out), '--compare-groups', '1', '4',
                '16']) == 0
    assert 'index.html' in capsys.readouterr().out
    report = json.loads((out / 'report.json').read_text())
    html = (out / 'index.html').read_text()
    for file, (width, height) in report['figures'].items():
        with Image.open(out / file) as png:
            assert png.size == (width, height) and width > 200 and height > 200
        assert f'src="{file}"' in html
    assert {'summary.png', 'attention.png', 'kernels.png', 'fbm.png', 'compare_groups.png'} <= set(report['figures'])
    layer = next(iter(report['layers']))
    model = converted_resnet18()
    expected = group_diversity(model.get_submodule(layer))
    assert np.allclose(report['layers'][layer]['profiles'], expected['profiles'].numpy())
    assert report['images'] == ['astronaut.png', 'chelsea.png', 'coffee.png']
    assert max(report['modulation_distance'].values()) < 1e-5
    parts = report['parameters']
    assert parts['total'] == sum(p.numel() for p in model.parameters()) and parts['dense_total'] < parts['total']
    rows = report['compare_groups']
    assert len({r['fdw_params'] for r in rows}) == 1  # the weight budget does not grow with n ...
    assert max(r['params'] for r in rows) < 1.001 * min(r['params'] for r in rows)  # (only KSM's n-way head)
    assert rows[0]['mean_abs_cosine'] == 0 and all(r['mean_abs_cosine'] < 1e-4 for r in rows)


def test_bad_input_is_one_line(photos, tmp_path, capsys):
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'not an image')
    assert cli(['analyze', 'resnet18_fdconv', '--images', str(bad), '--out', str(tmp_path / 'a')]) == 2
    assert f'image {bad} cannot be read' in capsys.readouterr().err
    assert cli(['analyze', 'resnet18', '--out', str(tmp_path / 'b')]) == 2
    assert 'has no FDConv layer' in capsys.readouterr().err
    assert cli(['analyze', 'resnet18_fdconv', '--layers', 'head.*', '--out', str(tmp_path / 'c')]) == 2
    assert "--layers 'head.*' matches none" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in 'abc')


def test_analyze_a_3d_video_model_draws_kernels_and_band_maps_as_slices(tmp_path, capsys):
    """A 3-D network (torchvision's r3d_18, converted) with a batch of clips: group kernels of its 3x3x3 layers
    drawn slice by slice, FBM band maps as slices along time, the numbers for every layer, compare-groups too."""
    torch.manual_seed(0)
    clips = torch.randn(2, 3, 8, 32, 32)
    clips[1, :, :, :16] += 2.0  # one clip with a strong edge, so that edges and flat regions differ
    torch.save(clips, tmp_path / 'clips.pt')
    out = tmp_path / 'report'
    assert cli(['analyze', 'r3d_18_fdconv', '--inputs', str(tmp_path / 'clips.pt'), '--out', str(out),
                '--compare-groups', '1', '8']) == 0
    assert 'index.html' in capsys.readouterr().out
    report = json.loads((out / 'report.json').read_text())
    assert {'summary.png', 'attention.png', 'kernels.png', 'fbm.png', 'compare_groups.png',
            'kernels_layer1_0_conv1_0.png'} <= set(report['figures'])
    for file, (width, height) in report['figures'].items():
        with Image.open(out / file) as png:
            assert png.size == (width, height) and width > 200 and height > 200
    # three slices of a 3x3x3 kernel side by side: wider than a 2-D kernel's one column of pictures
    width, height = report['figures']['kernels_layer1_0_conv1_0.png']
    assert width > 450  # 3 slices of a 3x3x3 kernel side by side (one 3x3 picture would be about 230 wide)
    assert report['images'] == ['input 0', 'input 1']
    assert max(report['modulation_distance'].values()) < 1e-5  # converted: at the identity
    layer = report['layers']['layer1.0.conv1.0']
    assert layer['num_groups'] == 64 and layer['mean_abs_cosine'] < 1e-5 and layer['sum_error'] < 1e-5
    assert all(r['mean_abs_cosine'] < 1e-4 for r in report['compare_groups'])


def test_analyze_a_1d_model_and_group_kernels_of_any_dimension(tmp_path):
    """The group kernels of 1-D and 3-D layers sum to the dense kernel; the report runs on a 1-D network."""
    from fdconv_zoo.apps.report import analyze
    from fdconv_zoo.layers import FDConv1d, FDConv3d
    torch.manual_seed(0)
    for layer, shape in ((FDConv1d(24, 32, 5, num_freq_groups=8), (8, 32, 24, 5)),
                         (FDConv3d(24, 32, (3, 1, 3), num_freq_groups=8), (8, 32, 24, 3, 1, 3))):
        kernels = group_kernels(layer)
        assert kernels.shape == shape
        torch.testing.assert_close(kernels.sum(0), layer.fdw.static_weight(), atol=1e-6, rtol=1e-5)
    from fdconv_zoo.apps.benchmark import build_pair
    model = build_pair('sequence_resnet_fdconv')['fdconv']
    with torch.no_grad():  # a band conv that reacts to the sequence: the band maps move
        next(m for m in model.modules() if isinstance(m, FDConv1d) and m.fbm is not None).fbm.band_conv.weight.normal_(
            0, 0.5)
    out = analyze(model, tmp_path / 'r', inputs=torch.randn(2, 12, 200))
    report = json.loads((out / 'report.json').read_text())
    assert 'fbm.png' in report['figures'] and max(report['modulation_distance'].values()) > 0.05
