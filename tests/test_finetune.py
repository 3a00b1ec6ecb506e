"""scripts/finetune.py / fdconv_zoo.apps.finetune on small real data (scikit-learn's digits), offline, on CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from resume_check import kill_and_resume_equals_uninterrupted
from safetensors.torch import load_file

from fdconv_zoo.apps.finetune import build_parser, main, train

pytestmark = pytest.mark.usefixtures('fresh_accelerate_state')  # (conftest.py)
ROOT = Path(__file__).resolve().parent.parent


def digits_images(n: int | None = None):
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = [Image.fromarray((img * 255 / 16).astype(np.uint8), mode='L') for img in digits.images[:n]]
    return images, [int(t) for t in digits.target[:n]]


@pytest.fixture(scope='module')
def digits_dataset(tmp_path_factory) -> str:
    """The 1,797 8x8 digits as an HF dataset with train/validation splits, saved with save_to_disk."""
    import datasets
    images, labels = digits_images()
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=[str(i) for i in
                                                                                                  range(10)])})
    ds = datasets.Dataset.from_dict({'image': images, 'label': labels}, features=features)
    parts = ds.train_test_split(test_size=0.2, seed=0, stratify_by_column='label')
    path = tmp_path_factory.mktemp('digits') / 'ds'
    datasets.DatasetDict(train=parts['train'], validation=parts['test']).save_to_disk(str(path))
    return str(path)


# narrow, shallow FDConv nets: per-sample kernels dominate FDConv's cost on tiny images, so keep |W| small
SMALL_RESNET = ['--model', 'resnet18_fdconv', '--model-kwargs', 'channels=[32,32,64,64]', 'stem_width=32',
                'layers=[1,1,1,1]', 'num_freq_groups=16']
SMALL_CONVNEXT = ['--model', 'convnext_tiny_fdconv', '--model-kwargs', 'dims=[32,32,64,64]', 'depths=[1,1,1,1]',
                  'num_freq_groups=16']


def args_for(tmp_path: Path, *extra: str):
    return build_parser().parse_args([
        '--no-pretrained', '--img-size', '32', '--workers', '0', '--output-dir', str(tmp_path / 'run'),
        '--seed', '0', *extra])


@pytest.mark.slow
def test_two_process_data_parallel_run_learns_digits(digits_dataset, tmp_path):
    env = {**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--main_process_port', '0', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           str(ROOT / 'scripts' / 'finetune.py'), *SMALL_RESNET, '--no-pretrained',
           '--dataset', digits_dataset, '--img-size', '32', '--batch-size', '32', '--epochs', '8', '--lr', '3e-3',
           '--workers', '0', '--expect-num-processes', '2',
           '--output-dir', str(tmp_path / 'run')]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert results['num_processes'] == 2
    assert results['samples'] == 360  # every validation image once, none twice
    losses = [h['loss'] for h in results['train_loss']]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])  # under timm's default augmentation
    assert results['top1'] > 70, results['top1']  # chance is 10; the dense resnet18 reaches 84
    config = json.loads((tmp_path / 'run' / 'model' / 'config.json').read_text())
    assert config['label_names'] == [str(i) for i in range(10)]
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]


@pytest.mark.slow
def test_one_process_batch8_equals_two_processes_batch4(digits_dataset, tmp_path):
    common = [*SMALL_CONVNEXT, '--no-pretrained', '--dataset', digits_dataset, '--img-size', '32',
              '--opt', 'momentum', '--momentum', '0', '--weight-decay', '0', '--lr', '0.05', '--max-steps', '2',
              '--no-shuffle', '--no-augment', '--workers', '0', '--epochs', '1', '--seed', '0']
    env = {**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1'}
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--num_machines', '1', '--main_process_port', '0',
              '--mixed_precision', 'no', '--dynamo_backend', 'no']
    runs = {'one': launch + ['--num_processes', '1'] + [str(ROOT / 'scripts' / 'finetune.py'), *common,
                                                         '--batch-size', '8', '--expect-num-processes', '1'],
            'two': launch + ['--multi_gpu', '--num_processes', '2'] + [str(ROOT / 'scripts' / 'finetune.py'), *common,
                                                                         '--batch-size', '4', '--expect-num-processes',
                                                                         '2']}
    weights = {}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd + ['--output-dir', str(tmp_path / name)], env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-5000:]
        weights[name] = load_file(str(tmp_path / name / 'model' / 'model.safetensors'))
    for key, value in weights['one'].items():
        torch.testing.assert_close(weights['two'][key], value, atol=2e-5, rtol=1e-4, msg=key)
    from accelerate.utils import set_seed
    set_seed(0)
    init = timm.create_model('convnext_tiny_fdconv', dims=[32, 32, 64, 64], depths=[1, 1, 1, 1], num_freq_groups=16,
                             num_classes=10).state_dict()
    assert sum(not torch.equal(init[k], v) for k, v in weights['one'].items()) > 10  # the two steps did train


@pytest.fixture(scope='module')
def small_digits(tmp_path_factory) -> str:
    """200 digits (160 train, 40 validation): at batch 32 an epoch is 5 updates, so short runs cross epochs."""
    import datasets
    images, labels = digits_images(200)
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({'image': images, 'label': labels}, features=features)
    parts = ds.train_test_split(test_size=0.2, seed=0, stratify_by_column='label')
    path = tmp_path_factory.mktemp('small_digits') / 'ds'
    datasets.DatasetDict(train=parts['train'], validation=parts['test']).save_to_disk(str(path))
    return str(path)


# the defaults (augmentation, shuffling) plus every other random draw: Mixup/CutMix, dropout, drop-path, EMA
RANDOM_EVERYTHING = ['--model-kwargs', 'channels=[32,32,64,64]', 'stem_width=32', 'layers=[1,1,1,1]',
                     'num_freq_groups=16', 'drop_rate=0.2', 'drop_path_rate=0.1', '--model', 'resnet18_fdconv',
                     '--no-pretrained', '--img-size', '32', '--batch-size', '32', '--epochs', '3', '--max-steps', '12',
                     '--checkpoint-every', '2', '--mixup', '0.2', '--cutmix', '1.0', '--model-ema', '--seed', '0']


def test_run_killed_after_a_checkpoint_resumes_bit_identical(small_digits, tmp_path):
    """SIGKILL at an arbitrary point after a checkpoint; the resumed run ends with exactly the weights (BatchNorm
    statistics and EMA included) of a run never interrupted, across epoch boundaries, with loader workers."""
    differ = kill_and_resume_equals_uninterrupted(
        [sys.executable, str(ROOT / 'scripts' / 'finetune.py')],
        [*RANDOM_EVERYTHING, '--dataset', small_digits, '--workers', '2'], tmp_path, 'step_2')
    assert differ == []


@pytest.mark.slow
def test_two_process_run_killed_after_a_checkpoint_resumes_bit_identical(small_digits, tmp_path):
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
              '--num_machines', '1', '--main_process_port', '0', '--mixed_precision', 'no', '--dynamo_backend', 'no',
              str(ROOT / 'scripts' / 'finetune.py')]
    differ = kill_and_resume_equals_uninterrupted(
        launch, [*RANDOM_EVERYTHING, '--dataset', small_digits, '--batch-size', '16', '--workers', '1',
                 '--expect-num-processes', '2'], tmp_path, 'step_2')
    assert differ == []


def test_augmented_rows_depend_on_seed_epoch_and_index_only(small_digits):
    """What the loader's workers make: the same row in the same epoch is the same tensor however it is reached;
    another epoch draws anew; the caller's random streams are not touched."""
    import datasets
    from timm.data import create_transform

    from fdconv_zoo.apps.finetune import image_rows
    ds = datasets.load_from_disk(small_digits)['train']
    rows = image_rows(ds, 'image', 'label', create_transform(32, is_training=True), seed=0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = rows[5][0]
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(100)  # whatever else was drawn in between
    assert torch.equal(rows[5][0], a)
    rows.set_epoch(1)
    assert not torch.equal(rows[5][0], a)


def test_bf16_step_and_dataset_without_validation_split(tmp_path):
    import datasets
    images, labels = digits_images(300)
    features = datasets.Features({'img': datasets.Image(), 'digit': datasets.ClassLabel(num_classes=10)})
    path = tmp_path / 'train_only'
    datasets.Dataset.from_dict({'img': images, 'digit': labels}, features=features).save_to_disk(str(path))
    results = train(args_for(tmp_path, *SMALL_RESNET, '--dataset', str(path), '--batch-size', '8',
                             '--max-steps', '1', '--mixed-precision', 'bf16', '--val-fraction', '0.2',
                             '--report-to', 'tensorboard'))
    assert results['samples'] == 60 and np.isfinite(results['loss'])
    assert list((tmp_path / 'run').rglob('events.out.tfevents.*'))
    assert np.isfinite(results['train_loss'][0]['loss'])


def test_image_folders_with_timm_training_parts_and_push(hub, tmp_path):
    images, labels = digits_images(60)
    for split, sl in (('train', slice(0, 40)), ('val', slice(40, 60))):
        for i, (img, lab) in enumerate(zip(images[sl], labels[sl], strict=True)):
            folder = tmp_path / split / f'digit_{lab}'
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f'{i}.png')
    results = train(args_for(
        tmp_path, *SMALL_RESNET, '--train-dir', str(tmp_path / 'train'), '--val-dir', str(tmp_path / 'val'),
        '--batch-size', '8', '--max-steps', '2', '--mixup', '0.2', '--cutmix', '1.0', '--smoothing', '0.1',
        '--layer-decay', '0.8', '--grad-accum', '2', '--clip-grad', '1.0', '--model-ema', '--push-to-hub',
        '--hub-repo-id', 'zoo-test/digits-folder'))
    assert results['samples'] == 20 and results['steps'] == 2
    assert all(np.isfinite(h['loss']) for h in results['train_loss'])
    config = json.loads((tmp_path / 'run' / 'model' / 'config.json').read_text())
    assert config['label_names'][0] == 'digit_0'
    # --no-pretrained: no tag, Hub id or license of weights it never saw, and a note that says what happened
    cfg = config['pretrained_cfg']
    assert not {'tag', 'hf_hub_id', 'license'} & set(cfg) and 'random initialisation' in cfg['notes'][0]
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / 'run' / 'model').iterdir()} == {0o666 & ~umask}
    pushed = hub.state.repos['zoo-test/digits-folder'].files
    assert {'model.safetensors', 'config.json', 'README.md'} <= set(pushed)
    assert 'top1' in pushed['README.md'].decode()
    from fdconv_zoo.hub import push
    assert push(tmp_path / 'run', 'zoo-test/run-folder') == 'zoo-test/run-folder'  # the run folder itself
    assert hub.state.repos['zoo-test/run-folder'].files['model.safetensors'] == pushed['model.safetensors']
    # the fine-tune's export loads in transformers with its class names and timm's logits
    from transformers import AutoModelForImageClassification
    hf = AutoModelForImageClassification.from_pretrained(str(tmp_path / 'run' / 'model')).eval()
    assert hf.config.id2label[0] == 'digit_0'
    reference = timm.create_model(f"local-dir:{tmp_path / 'run' / 'model'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - reference(x)).abs().max() <= 1e-6


def test_missing_or_malformed_dataset_is_one_clear_error(tmp_path, capsys):
    assert main(['--dataset', str(tmp_path / 'nope'), '--output-dir', str(tmp_path / 'o')]) == 2
    assert 'nope: no such folder' in capsys.readouterr().err
    (tmp_path / 'junk').mkdir()
    assert main(['--dataset', str(tmp_path / 'junk'), '--output-dir', str(tmp_path / 'o')]) == 2
    assert 'not a dataset saved with save_to_disk' in capsys.readouterr().err
    assert main(['--train-dir', str(tmp_path / 'missing'), '--output-dir', str(tmp_path / 'o')]) == 2
    assert not (tmp_path / 'o' / 'results.json').exists()


@pytest.mark.slow
def test_two_process_streamed_run_killed_and_resumed_continues_where_it_stopped(tmp_path):
    """--streaming on image folders opened with streaming=True: each process reads its part through a shuffle
    buffer, with the default augmentation; killed after a checkpoint and resumed from the saved stream
    positions, the run continues from there to --max-steps (the examples that were in the shuffle buffer are not
    saved by datasets, so what follows the resume is not bit-identical), and passes the end of the stream."""
    images, labels = digits_images(200)
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / 'data' / ('train' if i < 160 else 'val') / f'digit_{lab}'
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f'{i}.png')
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
              '--num_machines', '1', '--main_process_port', '0', '--mixed_precision', 'no', '--dynamo_backend', 'no',
              str(ROOT / 'scripts' / 'finetune.py')]
    args = [*SMALL_RESNET, '--no-pretrained', '--img-size', '32', '--batch-size', '8', '--streaming',
            '--shuffle-buffer', '64', '--max-steps', '14', '--checkpoint-every', '4', '--workers', '0',
            '--train-dir', str(tmp_path / 'data' / 'train'), '--val-dir', str(tmp_path / 'data' / 'val'),
            '--expect-num-processes', '2', '--seed', '0']
    kill_and_resume_equals_uninterrupted(launch, args, tmp_path, 'step_4', exact=False)
    results = json.loads((tmp_path / 'part' / 'results.json').read_text())
    assert results['steps'] == 14 and results['num_processes'] == 2 and results['samples'] == 40
    # 14 updates of 8 examples per process pass the end of each process's ~80 examples: a second, reshuffled pass
    positions = [json.loads((tmp_path / 'part' / 'checkpoints' / 'step_12' / f'stream_{r}.json').read_text())
                 for r in (0, 1)]
    assert all(p['epoch'] == 1 for p in positions)


def test_several_processes_launched_without_data_parallelism_stop_with_one_line(digits_dataset, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs (and without
    ACCELERATE_USE_CPU=1) starts two unconnected processes: each stops with the command that works instead of
    training a full copy into the same folder."""
    env = {k: v for k, v in os.environ.items() if k != 'ACCELERATE_USE_CPU'}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--main_process_port', '0', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           str(ROOT / 'scripts' / 'finetune.py'), *SMALL_RESNET, '--no-pretrained', '--dataset', digits_dataset,
           '--output-dir', str(tmp_path / 'run')]
    proc = subprocess.run(cmd, env={**env, 'CUDA_VISIBLE_DEVICES': ''}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # one line per process that got to say it (the launcher stops the other when the first exits; their lines
    # may interleave)
    said = proc.stderr.count('finetune: launched as one of 2 processes, but accelerate runs this one alone')
    assert 1 <= said <= 2, proc.stderr[-3000:]
    assert 'data parallelism needs `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2' in proc.stderr
    assert not (tmp_path / 'run' / 'model').exists()


@pytest.mark.parametrize('model', [
    ['--model', 'vit_small_patch16_224_fdconv', '--model-kwargs', 'img_size=32', 'patch_size=8', 'embed_dim=48',
     'depth=2', 'num_heads=2', 'num_freq_groups=8'],
    ['--model', 'efficientnet_b0_fdconv', '--model-kwargs', 'num_freq_groups=8'],
    ['--model', 'convnextv2_tiny_fdconv', '--model-kwargs', 'dims=[32,32,64,64]', 'depths=[1,1,1,1]',
     'num_freq_groups=8'],
    ['--model', 'regnety_002_fdconv', '--model-kwargs', 'num_freq_groups=8'],  # registered from its name
], ids=['vit', 'efficientnet', 'convnextv2', 'regnety'])
def test_families_registered_with_register_fdconv_fine_tune_and_export(tmp_path, model):
    """A small member of each family that register_fdconv adds: two updates with the default recipe, and the
    export reloads through timm's local-dir: as the same architecture with its FDConv layers."""
    import datasets
    images, labels = digits_images(40)
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(num_classes=10)})
    path = tmp_path / 'digits'
    datasets.DatasetDict(train=datasets.Dataset.from_dict({'image': images[:24], 'label': labels[:24]}, features),
                         validation=datasets.Dataset.from_dict({'image': images[24:], 'label': labels[24:]},
                                                               features)).save_to_disk(str(path))
    results = train(args_for(tmp_path, *model, '--dataset', str(path), '--batch-size', '8', '--max-steps', '2'))
    assert results['steps'] == 2 and all(np.isfinite(h['loss']) for h in results['train_loss'])
    config = json.loads((tmp_path / 'run' / 'model' / 'config.json').read_text())
    assert config['architecture'] == model[1]
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'run' / 'model'}", pretrained=True)
    assert any(type(m).__name__ in ('FDConv2d', 'FDLinear') for m in reloaded.modules())
