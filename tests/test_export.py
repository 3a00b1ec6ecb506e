"""fdconv-zoo export: torch.export programs and ONNX models with a dynamic batch, checked against eager."""
from __future__ import annotations

import onnxruntime as ort
import pytest
import timm
import torch
from test_ops import rel_err

from fdconv_zoo.benchmark import liven_
from fdconv_zoo.cli import main as cli
from fdconv_zoo.export import export

NARROW = {'resnet18_fdconv': {'channels': [32, 32, 64, 64], 'stem_width': 32, 'layers': [1, 1, 1, 1]},
          'convnext_tiny_fdconv': {'dims': [32, 32, 64, 64], 'depths': [1, 1, 1, 1]}}


def narrow_modulated(name: str) -> torch.nn.Module:
    """A narrow model whose FDConv modulation is not the identity (as test_ops._modulated)."""
    model = liven_(timm.create_model(name, num_classes=10, num_freq_groups=8, **NARROW[name]))  # live residuals
    with torch.no_grad():  # the moves of test_ops._modulated: head and band biases, local taps
        gen = torch.Generator().manual_seed(2)
        for n, p in model.named_parameters():
            if n.endswith(('_fc.bias', 'band_conv.bias', 'ksm_local.conv.weight')):
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize('name', list(NARROW))
@pytest.mark.parametrize('fmt', ['pt2', 'onnx'])
def test_export_runs_any_batch_and_size_and_matches_eager(name, fmt, tmp_path):
    """ResNet and ConvNeXt export with a free batch, height and width; the command checks batches 1, 3, 8 and
    another size itself, and the file then serves a batch and a size the check did not use."""
    model = narrow_modulated(name)
    out = tmp_path / f'model.{fmt}'
    result = export(model, fmt, out, img_size=[64])
    assert out.is_file() and list(result['errors']) == ['1x3x64x64', '3x3x64x64', '8x3x64x64', '2x3x96x128']
    assert max(result['errors'].values()) < 1e-4, result
    batch, channels, height, width = result['input_ranges']
    assert batch == (1, 4096) and channels == 3 and height[0] <= 64 and width[0] <= 64
    assert height[1] == width[1] == -1  # no upper bound
    x = torch.randn(5, 3, 80, 72)  # a batch size and a spatial size the check did not use
    with torch.no_grad():
        expected = model(x)
    if fmt == 'pt2':
        got = torch.export.load(str(out)).module()(x)
    else:
        session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        shape = session.get_inputs()[0].shape
        assert shape[1] == 3 and all(isinstance(d, str) for d in (shape[0], shape[2], shape[3]))  # symbolic
    assert rel_err(got, expected) < 1e-4


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / 'm.bin'
    assert cli(['export', 'resnet18_fdconv', '--format', 'tflite', '--out', str(out)]) == 1
    assert "unknown format 'tflite'" in capsys.readouterr().err
    assert cli(['export', 'resnet18_fdconv', '--format', 'onnx', '--opset', '9', '--out', str(out)]) == 1
    assert '--opset 9' in capsys.readouterr().err
    assert cli(['export', 'swin_tiny_patch4_window7_224_fdconv', '--format', 'pt2', '--img-size', '100',
                '--out', str(out)]) == 1
    assert 'does not export' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
