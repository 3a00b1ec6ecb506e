"""scripts/segment.py / fdconv_zoo.apps.segment on texture mosaics made from scikit-image's textures, offline, CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from resume_check import kill_and_resume_equals_uninterrupted
from safetensors.torch import load_file
from seg_data import CLASSES, mosaic, write_folder

from fdconv_zoo.apps.cli import main as cli
from fdconv_zoo.apps.segment import build_parser, load_segmenter, main, predict_logits, scores, train

pytestmark = pytest.mark.usefixtures('fresh_accelerate_state')  # (conftest.py)
ROOT = Path(__file__).resolve().parent.parent
SMALL = ['--model', 'convnext_tiny_fdconv', '--no-pretrained', '--model-kwargs', 'dims=[32,32,64,64]',
         'depths=[1,1,1,1]', 'num_freq_groups=8', '--decoder-channels', '32', '--crop-size', '64', '--seed', '0']
LAUNCH = [sys.executable, '-m', 'accelerate.commands.launch', '--num_machines', '1', '--main_process_port', '0',
          '--mixed_precision', 'no', '--dynamo_backend', 'no']
ENV = {**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1'}


@pytest.fixture(scope='module')
def mosaics(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('mosaics')
    write_folder(root / 'train', 48, 64, seed=0)
    write_folder(root / 'val', 12, 64, seed=1)
    return root


def folders(root: Path) -> list[str]:
    return ['--train-dir', str(root / 'train'), '--val-dir', str(root / 'val')]


@pytest.mark.slow
def test_two_process_run_learns_the_textures_and_its_export_reloads(mosaics, tmp_path):
    """A real 2-process run (gloo DDP); metrics over every validation pixel once; the exported model, reloaded
    by one call, scores the same on the validation set."""
    out = tmp_path / 'run'
    cmd = [*LAUNCH, '--multi_gpu', '--num_processes', '2', str(ROOT / 'scripts' / 'segment.py'), *SMALL,
           *folders(mosaics), '--batch-size', '2', '--epochs', '12', '--lr', '2e-3', '--workers', '1',
           '--expect-num-processes', '2', '--checkpoint-every', '1000', '--output-dir', str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((out / 'results.json').read_text())
    assert results['num_processes'] == 2 and results['pixels'] == 12 * 64 * 64  # each pixel once, none twice
    assert results['mIoU'] > 40, results  # always predicting the commonest texture scores 14
    losses = [h['loss'] for h in results['train_loss']]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    with Image.open(sorted((out / 'visualizations').glob('step_*.png'))[-1]) as png:
        assert png.size[0] > 200 and png.size[1] > 200
    model, meta = load_segmenter(out / 'model')
    assert meta['label_names'] == ['0', '1', '2'] and meta['decoder'] == 'upernet'
    confusion = torch.zeros(3, 3, dtype=torch.long)
    mean, std = torch.tensor(meta['mean'])[:, None, None], torch.tensor(meta['std'])[:, None, None]
    for path in sorted((mosaics / 'val' / 'images').iterdir()):
        image = torch.from_numpy(np.array(Image.open(path).convert('RGB'))).permute(2, 0, 1) / 255
        truth = torch.from_numpy(np.array(Image.open(mosaics / 'val' / 'masks' / f'{path.stem}.png'))).long()
        with torch.no_grad():
            pred = predict_logits(model, ((image - mean) / std)[None], 'whole', [64, 64], [42, 42])[0].argmax(0)
        confusion += torch.bincount(truth.flatten() * 3 + pred.flatten(), minlength=9).view(3, 3)
    assert scores(confusion, meta['label_names'])['mIoU'] == pytest.approx(results['mIoU'], abs=1e-6)


@pytest.mark.slow
def test_one_process_batch4_equals_two_processes_batch2(mosaics, tmp_path):
    """Data-parallel training is the same computation as one process on the whole batch: augmentation per image
    from its own seed, an encoder (ConvNeXt: LayerNorm) and decoder (FPN: GroupNorm) without batch statistics
    (smp's UPerNet keeps a BatchNorm in its pyramid pooling whatever --decoder-norm says), and no dropout. The
    resize ratio stays >= 1: an image scaled below the crop is padded with the ignore index, and each process
    then averages its loss over its own count of labelled pixels (as mmseg does), which is not the mean over
    the whole batch."""
    no_dropout = [*SMALL[:7], 'decoder_dropout=0', *SMALL[7:]]  # appended to --model-kwargs
    common = [str(ROOT / 'scripts' / 'segment.py'), *no_dropout, *folders(mosaics), '--decoder', 'fpn',
              '--ratio-range', '1.0', '2.0',
              '--max-steps', '3', '--epochs', '1', '--lr', '1e-3', '--workers', '0', '--num-visualized', '0']
    runs = {'one': [*LAUNCH, '--num_processes', '1', *common, '--batch-size', '4', '--expect-num-processes', '1'],
            'two': [*LAUNCH, '--multi_gpu', '--num_processes', '2', *common, '--batch-size', '2',
                    '--expect-num-processes', '2']}
    weights = {}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd + ['--output-dir', str(tmp_path / name)], env=ENV, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-5000:]
        weights[name] = load_file(str(tmp_path / name / 'model' / 'model.safetensors'))
    # a tenth of one AdamW step (lr 1e-3): Adam's per-element normalisation magnifies the rounding of a different
    # reduction order in parameters whose gradient is near zero (the modulation heads start at zero); a real
    # difference (the padded mean above) moves weights by whole steps
    for key, value in weights['one'].items():
        torch.testing.assert_close(weights['two'][key], value, atol=1e-4, rtol=1e-4, msg=key)


def test_killed_run_resumes_bit_identical(mosaics, tmp_path):
    """SIGKILL right after a checkpoint, resume: the same weights as a run never interrupted, with the default
    augmentation (random resize, crop, flip, photometric distortion) and loader workers."""
    differ = kill_and_resume_equals_uninterrupted(
        [sys.executable, str(ROOT / 'scripts' / 'segment.py')],
        [*SMALL, *folders(mosaics), '--batch-size', '4', '--epochs', '2', '--checkpoint-every', '3', '--workers', '2',
         '--num-visualized', '0'], tmp_path, 'step_3')
    assert differ == []


def test_hub_style_dataset_slide_evaluation_fpn_and_frozen_stages(mosaics, tmp_path, hub, capsys):
    """An HF dataset (image + annotation columns, 0 = 'other' as in scene_parse_150), sliding-window evaluation,
    FPN, and --freeze-stages 2: the stem and first two stages keep their dense weights, their KSM/FBM train."""
    rng = np.random.default_rng(3)
    rows = {'image': [], 'annotation': []}
    for _ in range(12):
        image, mask = mosaic(rng, 96)
        rows['image'].append(Image.fromarray(image))
        rows['annotation'].append(Image.fromarray(mask + 1))  # reduce_labels: 1.. are the classes
    features = datasets.Features({'image': datasets.Image(), 'annotation': datasets.Image()})
    ds = datasets.Dataset.from_dict(rows, features=features)
    path = tmp_path / 'ds'
    datasets.DatasetDict(train=ds.select(range(8)), validation=ds.select(range(8, 12))).save_to_disk(str(path))
    names = tmp_path / 'names.txt'
    names.write_text('\n'.join(CLASSES))
    args = build_parser().parse_args([
        *SMALL, '--model', 'resnet18_fdconv', '--model-kwargs', 'channels=[32,32,64,64]', 'stem_width=32',
        'layers=[1,1,1,1]', 'num_freq_groups=8', '--dataset', str(path), '--reduce-labels', '--label-names',
        str(names), '--decoder', 'fpn', '--eval-mode', 'slide', '--stride', '32', '--freeze-stages', '2',
        '--batch-size', '4', '--max-steps', '2', '--epochs', '1', '--workers', '0', '--output-dir',
        str(tmp_path / 'run'), '--push-to-hub', '--hub-repo-id', 'zoo-test/seg-fpn'])
    results = train(args)
    assert results['pixels'] == 4 * 96 * 96 and set(results['per_class_iou']) == set(CLASSES)
    saved = load_file(str(tmp_path / 'run' / 'model' / 'model.safetensors'))
    from accelerate.utils import set_seed

    from fdconv_zoo.apps.segment import build_segmenter
    set_seed(0)
    init = build_segmenter('resnet18_fdconv', 'fpn', 3, False, {'channels': [32, 32, 64, 64], 'stem_width': 32,
                                                                 'layers': [1, 1, 1, 1], 'num_freq_groups': 8},
                           32).state_dict()
    for key in ('encoder.model.conv1.weight', 'encoder.model.layer2.0.conv1.fdw.spectrum'):
        assert torch.equal(saved[key], init[key]), key  # frozen dense weights
    for key in ('encoder.model.layer1.0.conv1.ksm_global.fc.weight', 'encoder.model.layer3.0.conv1.fdw.spectrum',
                'decoder.p5.weight'):
        assert not torch.equal(saved[key], init[key]), key  # trained
    meta = json.loads((tmp_path / 'run' / 'model' / 'segmentation.json').read_text())
    assert meta['label_names'] == CLASSES and 'random initialisation' in meta['notes']
    pushed = hub.state.repos['zoo-test/seg-fpn'].files
    assert pushed['model.safetensors'] == (tmp_path / 'run' / 'model' / 'model.safetensors').read_bytes()
    card = pushed['README.md'].decode()
    assert 'model-index' in card and 'mIoU' in card and 'load_segmenter' in card
    # the saved folder exports as it is, at its crop size, and the program is checked against it
    assert cli(['export', str(tmp_path / 'run' / 'model'), '--format', 'pt2', '--out', str(tmp_path / 'seg.pt2')]) == 0
    assert '2x3x96x128' in capsys.readouterr().out  # 64 px crops, and another size: the height and width are free
    assert (tmp_path / 'seg.pt2').is_file()


def test_bad_input_is_one_error_naming_it(mosaics, tmp_path, capsys):
    def run(*extra) -> str:
        assert main([*SMALL, '--batch-size', '2', '--max-steps', '1', '--workers', '0', '--output-dir',
                     str(tmp_path / 'o'), *extra]) == 2
        return capsys.readouterr().err
    assert "unknown --decoder 'unet'" in run(*folders(mosaics), '--decoder', 'unet')
    assert "unknown encoder 'resnet_nope'" in run(*folders(mosaics), '--model', 'resnet_nope')
    bad = tmp_path / 'bad'
    write_folder(bad, 2, 64, seed=5)
    (bad / 'masks' / '001.png').unlink()
    assert f"image {bad / 'images' / '001.jpg'} has no mask" in run('--train-dir', str(bad), '--val-dir', str(bad))
    write_folder(bad, 2, 64, seed=5)
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(bad / 'masks' / '001.png')
    err = run('--train-dir', str(bad), '--val-dir', str(bad))
    assert f"{bad / 'images' / '001.jpg'}: mask is 64x32, image 64x64" in err
    write_folder(bad, 2, 64, seed=5)
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(bad / 'masks' / '000.png')
    err = run('--train-dir', str(bad), '--val-dir', str(bad), '--num-classes', '3', '--workers', '1')
    assert f"{bad / 'images' / '000.jpg'}: label 7 is not a class id in [0, 3)" in err and 'Traceback' not in err
    assert len([line for line in err.splitlines() if 'segment:' in line]) == 1  # (stderr also has the bar)
    assert not (tmp_path / 'o' / 'model').exists()


def test_streamed_hub_style_dataset_trains_to_max_steps_and_resumes(tmp_path):
    """--streaming: the training split read as a stream (classes from the validation masks), the run's length
    from --max-steps, the stream's position in every checkpoint, and --resume continuing from it."""
    rng = np.random.default_rng(5)
    rows = {'image': [], 'mask': []}
    for _ in range(10):
        image, mask = mosaic(rng, 64)
        rows['image'].append(Image.fromarray(image))
        rows['mask'].append(Image.fromarray(mask))
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({'image': datasets.Image(),
                                                                      'mask': datasets.Image()}))
    path = tmp_path / 'ds'
    datasets.DatasetDict(train=ds.select(range(7)), validation=ds.select(range(7, 10))).save_to_disk(str(path))
    common = [*SMALL, '--dataset', str(path), '--decoder', 'fpn', '--streaming', '--batch-size', '2',
              '--workers', '0', '--num-visualized', '0', '--checkpoint-every', '3', '--output-dir', str(tmp_path / 'r')]
    first = train(build_parser().parse_args([*common, '--max-steps', '6']))
    assert first['steps'] == 6 and first['pixels'] == 3 * 64 * 64 and first['num_classes'] == 3
    position = json.loads((tmp_path / 'r' / 'checkpoints' / 'step_3' / 'stream_0.json').read_text())
    assert position['position'] == 6 and position['epoch'] == 0  # 3 updates of 2 of the 7 examples
    from accelerate.state import AcceleratorState, PartialState
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    resumed = train(build_parser().parse_args([*common, '--max-steps', '6', '--resume',
                                               str(tmp_path / 'r' / 'checkpoints' / 'step_3')]))
    assert resumed['steps'] == 6
    assert [h['loss'] for h in resumed['train_loss'][:3]] == [h['loss'] for h in first['train_loss'][:3]]
