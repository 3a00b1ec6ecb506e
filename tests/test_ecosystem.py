"""FDConv models where the Hugging Face stack builds them: on the meta device (transformers, accelerate,
FSDP), in transformers' TimmWrapper and pipeline, from a folder and from the Hub; and the one-line errors
of what cannot work (TorchScript, a bad checkpoint file)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models._manipulate import reinit_non_persistent_buffers

import fdconv_zoo
from fdconv_zoo.apps.benchmark import liven_
from fdconv_zoo.hub import convert, push

SMALLEST = ['resnet18_fdconv', 'convnext_tiny_fdconv', 'swin_tiny_patch4_window7_224_fdconv']
TINY_RESNET = dict(channels=[16, 16, 32, 32], stem_width=16, layers=[1, 1, 1, 1], num_freq_groups=8)


def _modulated(name: str, **kwargs) -> torch.nn.Module:
    """A model whose KSM/FBM are not the identity (a pass that left their buffers wrong would show)."""
    torch.manual_seed(0)
    model = liven_(timm.create_model(name, **kwargs))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(('_fc.bias', 'band_conv.bias', 'ksm_local.conv.weight')):
                p.add_(torch.randn(p.shape, generator=gen) * (0.3 if n.endswith('bias') else 0.05))
    return model.eval()


def _meta_built(name: str, state_dict: dict[str, torch.Tensor], **kwargs) -> torch.nn.Module:
    """Built the way transformers and FSDP build: meta device, to_empty, load, then timm's buffer pass."""
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    model.to_empty(device='cpu')
    model.load_state_dict(state_dict, strict=True)
    reinit_non_persistent_buffers(model)
    return model.eval()


def _size(name: str) -> int:
    return 224 if 'swin' in name else 64


@pytest.mark.parametrize('name', SMALLEST)
def test_meta_device_build_gives_the_same_outputs(name):
    ref = _modulated(name)
    model = _meta_built(name, ref.state_dict())
    x = torch.randn(2, 3, _size(name), _size(name))
    with torch.no_grad():
        y, expected = model(x), ref(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y, expected)


@pytest.mark.slow
@pytest.mark.parametrize('name', timm.list_models('*_fdconv'))
def test_meta_device_build_restores_every_buffer(name):
    ref = timm.create_model(name)
    model = _meta_built(name, ref.state_dict())
    expected = dict(ref.named_buffers())
    rebuilt = dict(model.named_buffers())
    assert rebuilt.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(rebuilt[key], value), key


def test_accelerate_init_empty_weights_then_loaded_weights():
    from accelerate import init_empty_weights
    ref = _modulated('resnet18_fdconv', **TINY_RESNET)
    with init_empty_weights():
        model = timm.create_model('resnet18_fdconv', **TINY_RESNET)
    assert model.fc.weight.is_meta and model.layer1[0].conv1.fdw.spectrum.is_meta
    model.to_empty(device='cpu')
    model.load_state_dict(ref.state_dict(), strict=True)
    reinit_non_persistent_buffers(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref(x))


def test_meta_build_refuses_a_group_map_that_was_never_loaded():
    """init_non_persistent_buffers before the weights arrive (uninitialised memory) does not crash, and a map
    still bad at forward is refused by name instead of indexing memory with it."""
    with torch.device('meta'):
        model = timm.create_model('resnet18_fdconv', **TINY_RESNET)
    model.to_empty(device='cpu')
    layer = model.layer1[0].conv1
    layer.fdw.group_of_bin.fill_(10_000)
    reinit_non_persistent_buffers(model)
    assert int(layer.fdw.group_index.max()) == 0  # safe until checked again
    with pytest.raises(ValueError, match='group_of_bin holds group ids'):
        layer(torch.randn(1, layer.in_channels, 8, 8))


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8))


def _check_in_transformers(source: str, model: torch.nn.Module, labels: list[str]) -> None:
    """AutoModelForImageClassification gives timm's logits; pipeline the saved names and timm's scores."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
    hf = AutoModelForImageClassification.from_pretrained(source).eval()
    assert [hf.config.id2label[i] for i in range(len(labels))] == labels
    pixels = AutoImageProcessor.from_pretrained(source)(_image(), return_tensors='pt').pixel_values
    with torch.no_grad():
        logits, expected = hf(pixel_values=pixels).logits, model.eval()(pixels)
    assert torch.isfinite(logits).all()
    assert (logits - expected).abs().max() <= 1e-6
    scores = {r['label']: r['score'] for r in pipeline('image-classification', model=source, top_k=None)(_image())}
    probs = expected.softmax(-1)[0]
    assert scores.keys() == set(labels)
    for i, label in enumerate(labels):
        assert abs(scores[label] - probs[i].item()) <= 1e-6


def test_save_for_hf_folder_loads_in_transformers(tmp_path):
    model = _modulated('resnet18_fdconv', num_classes=4, **TINY_RESNET)
    labels = ['brick', 'grass', 'gravel', 'sand']
    folder = fdconv_zoo.save_for_hf(model, tmp_path / 'model', model_config={'label_names': labels})
    config = json.loads((folder / 'config.json').read_text())
    assert config['num_classes'] == 4 and 'num_classes' not in config.get('model_args', {})
    assert config['model_args']['channels'] == [16, 16, 32, 32]
    assert config['pretrained_cfg']['notes'] == ['resnet18_fdconv randomly initialised (no pretrained weights loaded)']
    _check_in_transformers(str(folder), model, labels)
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()  # and still in timm
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_converted_and_pushed_checkpoints_load_in_transformers_from_the_hub(hub, tmp_path):
    torch.manual_seed(0)
    dense = liven_(timm.create_model('resnet18', num_classes=3)).eval()
    from safetensors.torch import save_file
    save_file(dense.state_dict(), str(tmp_path / 'dense.safetensors'))
    folder = convert(str(tmp_path / 'dense.safetensors'), tmp_path / 'converted', arch='resnet18_fdconv')
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    _check_in_transformers(str(folder), model, ['LABEL_0', 'LABEL_1', 'LABEL_2'])  # no label_names saved

    # a folder written by timm's own save_for_hf (num_classes in model_args) is repaired on the way up
    plain = tmp_path / 'timm_saved'
    labelled = _modulated('resnet18_fdconv', num_classes=2, **TINY_RESNET)
    timm.models.save_for_hf(labelled, plain, model_config={'label_names': ['cat', 'dog']}, safe_serialization=True)
    repo = push(plain, 'transformers-r18', org='zoo-test')
    _check_in_transformers(repo, labelled, ['cat', 'dog'])


def test_torchscript_is_one_clear_error():
    model = timm.create_model('resnet18_fdconv', **TINY_RESNET)
    with pytest.raises(RuntimeError, match='FDConv2d cannot be compiled by TorchScript.*torch.compile.*torch.export'):
        torch.jit.script(model)


def test_truncated_checkpoint_under_local_dir_or_hf_hub_names_the_file(tmp_path, hub):
    folder = fdconv_zoo.save_for_hf(timm.create_model('resnet18_fdconv', **TINY_RESNET), tmp_path / 'm')
    weights = folder / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f'{weights} is not a readable safetensors file'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    hub.add_files('zoo-test/truncated', {'config.json': (folder / 'config.json').read_bytes(),
                                         'model.safetensors': weights.read_bytes()})
    with pytest.raises(ValueError, match=r'hf-hub:zoo-test/truncated \(model.safetensors\) is not a readable'):
        timm.create_model('hf-hub:zoo-test/truncated', pretrained=True)


def test_provenance_of_a_model_never_initialised_from_weights(tmp_path):
    model = timm.create_model('resnet18_fdconv', **TINY_RESNET)
    cfg = model.pretrained_cfg
    assert 'tag' not in cfg and 'hf_hub_id' not in cfg and 'license' not in cfg
    assert 'converted' not in ' '.join(cfg['notes'])


@pytest.mark.slow
def test_fsdp2_sharded_model_exports_and_pushes(tmp_path, hub):
    """2 CPU processes (gloo, torchrun), FSDP2 fully_shard: the final export gathers the full state dict on
    every process and writes it once; the folder holds the trained weights and loads in timm from the Hub."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    script = Path(__file__).resolve().parent / 'fsdp_export.py'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           str(script), str(tmp_path), 'zoo-test/fsdp-r18'], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    gathered = load_file(str(tmp_path / 'gathered.safetensors'))
    saved = load_file(str(tmp_path / 'model' / 'model.safetensors'))
    assert saved.keys() == gathered.keys()
    for key, value in gathered.items():
        assert torch.equal(saved[key], value), key
    init = timm.create_model('resnet18_fdconv', num_classes=4, channels=[16, 16, 32, 32], stem_width=16,
                             layers=[1, 1, 1, 1], num_freq_groups=8).state_dict()
    assert not torch.equal(init['layer1.0.conv1.fdw.spectrum'], saved['layer1.0.conv1.fdw.spectrum'])  # trained
    model = timm.create_model('hf-hub:zoo-test/fsdp-r18', pretrained=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
