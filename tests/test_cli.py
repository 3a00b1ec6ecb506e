"""The fdconv-zoo command's demo, list and bench (the Hub commands are in test_hub.py)."""
from __future__ import annotations

import json
import re

import timm

from fdconv_zoo.apps.cli import main as cli


def test_demo_shows_exact_conversion_and_cost(capsys):
    assert cli(['demo', '--model', 'resnet18_fdconv', '--img-size', '64', '--repeats', '1']) == 0
    out = capsys.readouterr().out
    err = float(re.search(r'max relative error ([\d.e+-]+)', out).group(1))
    assert 0 < err <= 1e-5  # non-zero: the residual branches are live, so the comparison means something
    assert 'params: 11.69M dense -> 12.26M FDConv' in out and 'GFLOPs' in out
    assert float(re.search(r'\(([\d.]+) in FFTs\)', out).group(1)) > 0  # counted through the fused loops too


def test_list_names_every_architecture_and_tag(capsys):
    assert cli(['list']) == 0
    out = capsys.readouterr().out
    assert re.search(r'resnet50_fdconv\s+29\.20M params', out)
    assert 'resnet50_fdconv.a1_in1k' in out and 'hf-hub:timm/resnet50.a1_in1k' in out
    assert out.count('_fdconv ') == len(timm.list_models('*_fdconv')) >= 27  # the families registered at import
    for family in ('resnet:', 'vision_transformer:', 'deit:', 'efficientnet:', 'convnext:', 'regnet:'):
        assert f'\n{family}\n' in f'\n{out}'
    assert re.search(r'efficientnet_b0_fdconv\.ra_in1k\s+<- hf-hub:timm/efficientnet_b0\.ra_in1k', out)


def test_bench_writes_measured_ratios(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    assert cli(['bench', '--models', 'resnet18_fdconv', '--batch-sizes', '1', '--img-size', '64',
                '--train-batch-size', '2', '--train-img-size', '64', '--repeats', '3', '--out', str(out)]) == 0
    rows = json.loads(out.read_text())['rows']
    assert [(r['mode'], r['batch_size']) for r in rows] == [('eval', 1), ('train', 2)]
    for r in rows:
        assert r['dense_ms'] > 0 and r['fdconv_ms'] > 0 and r['time_ratio'] == r['fdconv_ms'] / r['dense_ms']
        assert 0 < r['ratio_q1'] <= r['ratio_q3']  # spread of the per-repeat ratios
    assert rows[1]['fdconv_peak_mb'] > 0 and rows[1]['dense_peak_mb'] > 0
    assert 'ratio' in capsys.readouterr().out


def test_bench_times_networks_converted_from_outside_timm(tmp_path, capsys):
    """The 3-D video ResNet and the 1-D sequence ResNet, converted under the paper's placement: eval and a
    training step (peak memory) against the dense network in the same process."""
    out = tmp_path / 'bench.json'
    assert cli(['bench', '--models', 'r3d_18_fdconv', 'sequence_resnet_fdconv', '--batch-sizes', '1',
                '--img-size', '32', '--train-batch-size', '2', '--train-img-size', '32', '--repeats', '2',
                '--out', str(out)]) == 0
    rows = json.loads(out.read_text())['rows']
    assert [(r['model'], r['mode']) for r in rows] == [
        ('r3d_18_fdconv', 'eval'), ('r3d_18_fdconv', 'train'), ('sequence_resnet_fdconv', 'eval'),
        ('sequence_resnet_fdconv', 'train')]
    for r in rows:
        assert r['dense_ms'] > 0 and r['fdconv_ms'] > 0 and r['img_size'] == 32
    assert all(r['fdconv_peak_mb'] > 0 for r in rows if r['mode'] == 'train')
    assert 'r3d_18_fdconv' in capsys.readouterr().out


def test_bench_refuses_a_dense_architecture(tmp_path, capsys):
    """A dense name would be benchmarked against itself: one line naming it, exit code 2, nothing written."""
    out = tmp_path / 'bench.json'
    assert cli(['bench', '--models', 'resnet18_fdconv', 'resnet50', '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert "'resnet50' is not an FDConv architecture" in err and 'resnet50_fdconv' in err
    assert not out.exists()
