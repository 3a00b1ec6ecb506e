"""Hub IO against the Hub-protocol test server (tests/hub_server.py) with the real huggingface_hub client."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from hub_cache import prefill_hf_cache
from safetensors.torch import save, save_file

import fdconv_zoo  # noqa: F401
from fdconv_zoo.apps.benchmark import liven_
from fdconv_zoo.apps.cli import main as cli
from fdconv_zoo.cards import load_manifest_entry, write_card
from fdconv_zoo.hub import HubError, convert, info, load_checkpoint, pull, push


@pytest.fixture
def dense_r18(hub):
    torch.manual_seed(0)
    dense = liven_(timm.create_model('resnet18')).eval()
    hub.add_files('timm/resnet18.a1_in1k', {'model.safetensors': save(dense.state_dict())})
    return dense


@pytest.fixture
def converted(tmp_path, dense_r18) -> Path:
    return convert('resnet18.a1_in1k', tmp_path / 'ckpt')


def test_convert_writes_save_for_hf_folder_that_matches_dense(converted, dense_r18):
    assert sorted(p.name for p in converted.iterdir()) == ['config.json', 'model.safetensors']
    config = json.loads((converted / 'config.json').read_text())
    assert config['architecture'] == 'resnet18_fdconv' and config['num_classes'] == 1000
    model = timm.create_model(f'local-dir:{converted}', pretrained=True).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        y, ref = model(x), dense_r18(x)
    assert ((y - ref).abs().max() / ref.abs().max()) < 1e-5


def test_push_pull_create_model_round_trip_is_bit_identical(hub, converted, tmp_path):
    repo = push(converted, 'roundtrip-r18', org='zoo-test')
    assert repo == 'zoo-test/roundtrip-r18'
    stored = hub.state.repos[repo].files
    assert set(stored) == {'model.safetensors', 'config.json', 'README.md'}
    card = stored['README.md'].decode()
    assert 'library_name: timm' in card and 'import fdconv_zoo' in card
    out = pull(repo, tmp_path / 'pulled')
    assert (out / 'model.safetensors').read_bytes() == (converted / 'model.safetensors').read_bytes()
    from_hub = timm.create_model(f'hf-hub:{repo}', pretrained=True)
    local = load_checkpoint(converted)
    for (k, a), (_, b) in zip(from_hub.state_dict().items(), local.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    cached = pull(repo)  # into the HF cache
    assert (cached / 'config.json').is_file()


def test_org_from_environment(hub, converted, monkeypatch):
    monkeypatch.setenv('FDCONV_ZOO_ORG', 'env-org')
    assert push(converted, 'env-model') == 'env-org/env-model'


def test_info_reads_header_only(hub, converted):
    local = info(str(converted))
    assert local['architecture'] == 'resnet18_fdconv' and local['fdconv_layers'] == 16
    assert abs(local['params'] - sum(p.numel() for p in timm.create_model('resnet18_fdconv').parameters())) == 0
    push(converted, 'zoo-test/info-r18')
    assert info('zoo-test/info-r18')['params'] == local['params']


def test_pull_errors_name_repo_and_leave_nothing(hub, tmp_path):
    with pytest.raises(HubError, match='zoo-test/does-not-exist not found'):
        pull('zoo-test/does-not-exist', tmp_path / 'out')
    assert not (tmp_path / 'out').exists() and not list(tmp_path.glob('.out.*'))
    hub.add_files('zoo-test/no-weights', {'config.json': b'{"architecture": "resnet18_fdconv"}'})
    with pytest.raises(HubError, match='model.safetensors'):
        pull('zoo-test/no-weights', tmp_path / 'out2')
    assert not (tmp_path / 'out2').exists()


def test_corrupt_and_mismatched_checkpoints_are_refused(hub, converted, tmp_path):
    data = (converted / 'model.safetensors').read_bytes()
    config = (converted / 'config.json').read_bytes()
    hub.add_files('zoo-test/truncated', {'model.safetensors': data[:len(data) // 2], 'config.json': config})
    with pytest.raises(HubError, match='model.safetensors is not a readable safetensors file'):
        pull('zoo-test/truncated', tmp_path / 'a')
    assert not (tmp_path / 'a').exists()
    other = json.loads(config)
    other['architecture'] = 'convnext_tiny_fdconv'
    hub.add_files('zoo-test/wrong-arch', {'model.safetensors': data, 'config.json': json.dumps(other).encode()})
    with pytest.raises(HubError, match='does not fit FDConvNeXt'):
        pull('zoo-test/wrong-arch', tmp_path / 'b')
    dense = json.loads(config)
    dense['architecture'] = 'resnet18'
    (converted / 'config.json').write_text(json.dumps(dense))
    with pytest.raises(HubError, match="architecture 'resnet18' is not an fdconv_zoo architecture"):
        push(converted, 'zoo-test/not-fdconv')
    sd = timm.create_model('resnet18_fdconv').state_dict()
    sd['layer1.0.conv1.fdw.spectrum'] = torch.zeros(3, 3, 2)
    bad = tmp_path / 'bad'
    bad.mkdir()
    save_file(sd, bad / 'model.safetensors')
    (bad / 'config.json').write_text(config.decode())
    with pytest.raises(HubError, match=r"key 'layer1.0.conv1.fdw.spectrum' has shape \(3, 3, 2\)"):
        load_checkpoint(bad)


def test_connection_refused_is_one_clear_error(tmp_path):
    env = {**os.environ, 'HF_ENDPOINT': 'http://127.0.0.1:9', 'HF_HOME': str(tmp_path / 'hf')}
    proc = subprocess.run([sys.executable, '-m', 'fdconv_zoo.apps.cli', 'pull', 'zoo-test/x', str(tmp_path / 'o')],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count('\n') == 1 and 'zoo-test/x' in proc.stderr and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'o').exists()


def test_offline_pull_from_prefilled_cache(converted, tmp_path):
    """HF_HUB_OFFLINE=1 with a cache this test fills: pull and create_model resolve without any server."""
    files = {name: (converted / name).read_bytes() for name in ('model.safetensors', 'config.json')}
    hf_home = tmp_path / 'hf'
    env = {**os.environ, 'HF_HOME': str(hf_home), 'HF_HUB_OFFLINE': '1', 'HF_ENDPOINT': 'http://127.0.0.1:9'}
    os.environ['HF_HOME'], old = str(hf_home), os.environ['HF_HOME']
    try:
        prefill_hf_cache('zoo-test/offline', files)
    finally:
        os.environ['HF_HOME'] = old
    code = ("import timm, fdconv_zoo; from fdconv_zoo.hub import pull; print(pull('zoo-test/offline')); "
            "m = timm.create_model('hf-hub:zoo-test/offline', pretrained=True); print(type(m).__name__)")
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'FDResNet' in proc.stdout


def test_token_is_never_printed(hub, converted, capsys):
    assert cli(['push', str(converted), 'zoo-test/token-check']) == 0
    assert cli(['info', 'zoo-test/token-check']) == 0
    out = capsys.readouterr()
    assert os.environ['HF_TOKEN'] not in out.out + out.err


def test_manifest_entry_to_model_card(tmp_path):
    entry = {
        'architecture': 'resnet50_fdconv', 'tag': 'ft_food101', 'hub_repo': 'fdconv-zoo/resnet50_fdconv.ft_food101',
        'source_checkpoint': 'timm/resnet50.a1_in1k', 'recipe': 'scripts/finetune.py, 10 epochs, AdamW',
        'metrics': [{'dataset': 'food101', 'split': 'validation', 'name': 'top1', 'value': 80.1}],
        'params': 29202712, 'gflops': 9.72, 'throughput': {'cpu_bs1_img_s': 4.1}, 'license': 'apache-2.0',
        'sha256': '0' * 64}
    path = tmp_path / 'entry.json'
    path.write_text(json.dumps(entry))
    card = write_card(path, tmp_path / 'cards').read_text()
    assert card.startswith('---\n') and 'library_name: timm' in card and 'model-index' in card
    assert 'food101' in card and 'value: 80.1' in card
    del entry['sha256']
    path.write_text(json.dumps(entry))
    with pytest.raises(ValueError, match=r"missing manifest fields \['sha256'\]"):
        load_manifest_entry(path)


def test_cli_convert_local_file_needs_and_checks_arch(tmp_path, dense_r18, capsys):
    src = tmp_path / 'dense.safetensors'
    save_file(dense_r18.state_dict(), src)
    assert cli(['convert', str(src), str(tmp_path / 'no-arch')]) == 2
    assert '--arch' in capsys.readouterr().err
    assert cli(['convert', str(src), str(tmp_path / 'wrong'), '--arch', 'convnext_tiny_fdconv']) == 2
    assert "no classifier weight 'head.fc.weight'" in capsys.readouterr().err
    assert not (tmp_path / 'wrong').exists()
    assert cli(['convert', str(src), str(tmp_path / 'ok'), '--arch', 'resnet18_fdconv']) == 0
    model = load_checkpoint(tmp_path / 'ok').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert ((model(x) - dense_r18(x)).abs().max() / dense_r18(x).abs().max()) < 1e-5


@pytest.mark.parametrize('option,value', [('num_freq_groups', 'many'), ('num_freq_groups', 2.5),
                                          ('att_multi', 'x'), ('reduction', -1), ('fbm_cutoffs', [8, 4]),
                                          ('ksm_local', 1), ('min_hidden', 0)])
def test_bad_model_args_in_config_are_one_error_naming_the_option(converted, tmp_path, capsys, option, value):
    """config.json's model_args enter the constructors unchecked by timm: each bad value is one line naming the
    file, the option and the value, from `info`, load_checkpoint and create_model('local-dir:...') alike."""
    bad = tmp_path / 'bad'
    bad.mkdir()
    config = json.loads((converted / 'config.json').read_text())
    config['model_args'][option] = value
    (bad / 'config.json').write_text(json.dumps(config))
    (bad / 'model.safetensors').symlink_to(converted / 'model.safetensors')
    assert cli(['info', str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Traceback' not in err
    assert str(bad / 'config.json') in err and f"{option}={value!r} is invalid" in err
    with pytest.raises(HubError, match=f'{option}='):
        load_checkpoint(bad)
    with pytest.raises(ValueError, match=f"FDConv option {option}="):
        timm.create_model(f'local-dir:{bad}', pretrained=True)


def test_info_on_a_safetensors_file_reads_its_header(converted, tmp_path, capsys):
    """A checkpoint file, with the config beside it or alone; a file larger than memory is never mapped."""
    beside = info(str(converted / 'model.safetensors'))
    folder = info(str(converted))
    assert beside['params'] == folder['params'] and beside['architecture'] == 'resnet18_fdconv'
    alone = tmp_path / 'alone.safetensors'
    alone.write_bytes((converted / 'model.safetensors').read_bytes())
    assert cli(['info', str(alone)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['architecture'] is None and report['fdconv_layers'] == 16
    assert report['params'] == folder['params'] and report['tensors'] == len(timm.create_model(
        'resnet18_fdconv').state_dict())
    huge = tmp_path / 'huge.safetensors'  # a consistent 64 GiB file, sparse on disk
    header = json.dumps({'w': {'dtype': 'F32', 'shape': [2 ** 34], 'data_offsets': [0, 2 ** 36]}}).encode()
    with open(huge, 'wb') as f:
        f.write(len(header).to_bytes(8, 'little') + header)
        f.truncate(8 + len(header) + 2 ** 36)
    assert info(str(huge))['params'] == 2 ** 34
    for junk in (b'', b'\xff' * 8 + b'{}', (10).to_bytes(8, 'little') + b'not json!!'):
        alone.write_bytes(junk)
        assert cli(['info', str(alone)]) == 2
        assert f'{alone} is not a' in capsys.readouterr().err


def test_checkpoint_larger_than_memory_is_one_line(converted, tmp_path):
    """Loading (not just inspecting) a file that cannot be mapped: address space capped in a child process."""
    huge = tmp_path / 'huge'
    huge.mkdir()
    (huge / 'config.json').write_text((converted / 'config.json').read_text())
    header = json.dumps({'w': {'dtype': 'F32', 'shape': [2 ** 34], 'data_offsets': [0, 2 ** 36]}}).encode()
    with open(huge / 'model.safetensors', 'wb') as f:
        f.write(len(header).to_bytes(8, 'little') + header)
        f.truncate(8 + len(header) + 2 ** 36)
    code = ("import resource, sys; from fdconv_zoo.apps.cli import main; "
            "resource.setrlimit(resource.RLIMIT_AS, (32 * 2 ** 30, 32 * 2 ** 30)); "
            f"sys.exit(main(['push', {str(huge)!r}, 'zoo-test/huge']))")  # push loads it before uploading
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1, proc.stderr[-3000:]
    assert 'model.safetensors (64.0 GiB) does not fit in memory' in proc.stderr


def test_offline_mode_fails_fast_and_says_so(tmp_path):
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf')}
    for cmd in (['convert', 'resnet18.a1_in1k', str(tmp_path / 'o')], ['pull', 'zoo-test/x', str(tmp_path / 'o')],
                ['info', 'zoo-test/x']):
        proc = subprocess.run([sys.executable, '-m', 'fdconv_zoo.apps.cli', *cmd], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count('\n') == 1, proc.stderr
        assert 'HF_HUB_OFFLINE' in proc.stderr and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'o').exists()
    proc = subprocess.run([sys.executable, '-m', 'fdconv_zoo.apps.cli', '--debug', 'info', 'zoo-test/x'], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and 'Traceback' in proc.stderr


def test_outputs_respect_the_umask(converted, tmp_path):
    """Written under a private temporary name, published with the modes any new file gets."""
    old = os.umask(0o022)
    try:
        out = convert('resnet18.a1_in1k', tmp_path / 'pub')
        assert (out.stat().st_mode & 0o777) == 0o755
        assert {(p.stat().st_mode & 0o777) for p in out.iterdir()} == {0o644}
        os.umask(0o077)
        private = convert('resnet18.a1_in1k', tmp_path / 'private')
        assert {(p.stat().st_mode & 0o777) for p in private.iterdir()} == {0o600}
    finally:
        os.umask(old)
    config = json.loads((out / 'config.json').read_text())['pretrained_cfg']
    assert 'tag' not in config and config['notes'] == [
        'FDConv layers converted from the dense checkpoint resnet18.a1_in1k; equal to it at step 0.']
