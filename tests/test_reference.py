"""Import of the authors' reference layers and checkpoints (tests/data holds their reference vectors)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fdconv_zoo import FDConv2d, load_reference_checkpoint

VECTORS = sorted((Path(__file__).parent / 'data').glob('*.safetensors'))


def load_vector(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    with safe_open(str(path), 'pt') as f:
        config = json.loads(f.metadata()['config'])
    tensors = load_file(str(path))
    official = {k[len('official.'):]: v for k, v in tensors.items() if k.startswith('official.')}
    return config, official, tensors


def build(config: dict, official: dict, grouping: torch.Tensor | None) -> FDConv2d:
    return FDConv2d.from_reference(
        official, grouping=grouping, stride=config['stride'], padding=config['padding'], bias=config['bias'],
        att_multi=config['att_multi'], temperature=config['temp'], kernel_temperature=config['kernel_temp'],
        fbm_cutoffs=tuple(config['fbm_k_list']) or (2, 4, 8), ksm_local=config['ksm_local']).eval()


@pytest.mark.parametrize('path', VECTORS, ids=[p.stem for p in VECTORS])
def test_reference_vector_reproduced(path):
    config, official, tensors = load_vector(path)
    layer = build(config, official, tensors['official_indices'])
    assert (layer.fbm is not None) == bool(config['fbm_k_list'])
    with torch.no_grad():
        y = layer(tensors['x'])
    err = ((y - tensors['y']).abs().max() / tensors['y'].abs().max()).item()
    assert err < 1e-4, err


def test_reference_grouping_matters():
    """Without the reference's own grouping the output moves by percent: the grouping really is used."""
    config, official, tensors = load_vector(VECTORS[0])
    layer = build(config, official, None)
    with torch.no_grad():
        y = layer(tensors['x'])
    assert ((y - tensors['y']).abs().max() / tensors['y'].abs().max()).item() > 1e-3


def test_converter_output_without_modulation_keys_loads_at_identity(caplog):
    """The authors' converter writes only dft_weight: KSM/FBM start at identity with one log line."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    matrix = conv.weight.detach().permute(0, 2, 1, 3).reshape(192, 192)
    dft = torch.view_as_real(torch.fft.rfft2(matrix))[None] / (64 // 2)
    with caplog.at_level(logging.WARNING, logger='fdconv_zoo'):
        layer = FDConv2d.from_reference({'dft_weight': dft}, in_channels=64, out_channels=64, kernel_size=3,
                                        padding=1, bias=False, fbm=True).eval()
    assert len(caplog.records) == 1 and 'identity init' in caplog.records[0].getMessage()
    x = torch.relu(torch.randn(2, 64, 10, 10))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), atol=1e-4, rtol=1e-4)


def test_reference_wrong_shape_names_key_and_shapes():
    config, official, tensors = load_vector(VECTORS[0])
    official['KSM_Global.channel_fc.bias'] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"ksm_global\.channel_fc\.bias.*\(5,\).*\(128,\)"):
        build(config, official, None)
    _, official, _ = load_vector(VECTORS[0])
    official['KSM_Global.extra'] = torch.zeros(1)
    with pytest.raises(KeyError, match='KSM_Global.extra'):
        build(config, official, None)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.body = FDConv2d(64, 64, 3, padding=1, bias=False)
        self.head = FDConv2d(64, 32, 1, bias=False)


def test_model_level_reference_checkpoint(tmp_path, caplog):
    """A mmdet-style .pth (backbone. prefix, state_dict wrapper) with one full layer and one converter layer."""
    config, official, tensors = load_vector(VECTORS[[p.stem for p in VECTORS].index('c64_k3_s1')])
    model = TwoLayer().eval()
    dense_head = torch.randn(32, 64, 1, 1)
    sd = {f'backbone.body.{k}': v for k, v in official.items()}
    sd['backbone.head.weight'] = dense_head
    sd['backbone.stem.weight'] = torch.randn(64, 3, 3, 3)
    sd['backbone.stem.bias'] = torch.randn(64)
    sd['neck.conv.weight'] = torch.randn(1)
    path = tmp_path / 'ref.pth'
    torch.save({'state_dict': sd, 'meta': {}}, path)
    with caplog.at_level(logging.WARNING, logger='fdconv_zoo'):
        load_reference_checkpoint(model, path, groupings={'body': tensors['official_indices']})
    assert sum('identity init' in r.getMessage() for r in caplog.records) == 1
    with torch.no_grad():
        y = model.body(tensors['x'])
        assert ((y - tensors['y']).abs().max() / tensors['y'].abs().max()).item() < 1e-4
        torch.testing.assert_close(model.head.dense_weight(), dense_head, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.stem.weight, sd['backbone.stem.weight'])
    sd['backbone.body.KSM_Local.norm.weight'] = torch.zeros(3)
    save_file(sd, tmp_path / 'bad.safetensors')
    with pytest.raises(ValueError, match=r"body\.ksm_local\.norm\.weight.*\(3,\).*\(64,\)"):
        load_reference_checkpoint(TwoLayer(), tmp_path / 'bad.safetensors')
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load_reference_checkpoint(TwoLayer(), tmp_path / 'missing.pth')
