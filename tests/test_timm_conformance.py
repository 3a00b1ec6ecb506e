"""timm's own model test suite (tests/test_models.py of the installed timm's sdist, fetched by
scripts/fetch_timm_tests.py) run on every FDConv architecture, with fdconv_zoo imported by its conftest."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import fdconv_zoo  # noqa: F401  registers the architectures (parametrized below)
from fdconv_zoo.apps.export import program

SUITE = Path(__file__).resolve().parent.parent / '.timm-tests' / f'timm-{timm.__version__}'

# test -> why it cannot apply to FDConv models
DESELECT = {
    'test_model_forward_torchscript': 'TorchScript (deprecated upstream) cannot script the eager-only check of the '
                                      'group map (data_ptr, _version) nor the Python operators; torch.compile with '
                                      'fullgraph (tests/test_ops.py) and torch.export of every architecture '
                                      '(below) are tested instead',
}
# timm's CI leaves this unmarked test out (it prunes every model at every index); the smallest model of each
# family runs it, the larger ones share its code paths
PRUNE_ONLY = ('resnet18_fdconv', 'convnext_tiny_fdconv', 'swin_tiny_patch4_window7_224_fdconv',
              'vit_small_patch16_224_fdconv', 'deit3_small_patch16_224_fdconv', 'efficientnet_b0_fdconv',
              'convnextv2_tiny_fdconv', 'regnety_016_fdconv')
# every size of the paper's families, and one size of each family registered with register_fdconv (the others
# are the same code at other widths and depths)
ARCHITECTURES = [a for a in timm.list_models('*_fdconv') if a.startswith(('resnet', 'convnext_', 'swin'))] + [
    a for a in PRUNE_ONLY if not a.startswith(('resnet', 'convnext_', 'swin'))]


@pytest.mark.slow
def test_timm_model_suite_passes_for_every_fdconv_model():
    assert (SUITE / 'tests' / 'test_models.py').is_file(), \
        f'timm tests missing in {SUITE}: run `python scripts/fetch_timm_tests.py` first'
    deselect_k = ' and '.join(f'not {name}' for name in DESELECT)
    prune_k = ' or '.join(PRUNE_ONLY)
    archs_k = ' or '.join(ARCHITECTURES)
    expr = f'({archs_k}) and {deselect_k} and (not test_prune_intermediate_layers_contract or {prune_k})'
    env = {**os.environ, 'GITHUB_ACTIONS': 'true'}  # timm's switch for tests that download weights
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', 'tests/test_models.py', '-k', expr, '-v', '-p', 'no:cacheprovider',
         '-W', 'ignore::pytest.PytestUnknownMarkWarning'],
        cwd=SUITE, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    passed = re.findall(r'::(\w+)\[[^\]]*?-?([\w.]+_fdconv[\w.]*)\] PASSED', proc.stdout)
    # the core checks, each with the variant timm runs for non-standard models (ViT, DeiT: no NCHW features)
    core = [{'test_model_forward'}, {'test_model_backward'}, {'test_model_forward_fx'},
            {'test_model_default_cfgs', 'test_model_default_cfgs_non_std'},
            {'test_model_forward_features', 'test_model_forward_intermediates_features'},
            {'test_model_forward_intermediates'}]
    for arch in ARCHITECTURES:  # every architecture went through the core checks
        tests = {test for test, name in passed if name.split('.')[0] == arch}
        assert all(check & tests for check in core), (arch, [sorted(c) for c in core if not c & tests])


@pytest.mark.slow
@pytest.mark.parametrize('arch', ARCHITECTURES)
def test_torch_export_of_every_architecture(arch):
    """In place of timm's TorchScript test: each architecture exports with torch.export with a free batch, and
    the program computes what the model computes."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=7).eval()
    size = (224, 224) if model.pretrained_cfg.get('fixed_input_size') else (64, 64)
    exported = program(model, size).module()
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        expected = model(x)
        assert ((exported(x) - expected).abs().max() / expected.abs().max()) < 1e-5
