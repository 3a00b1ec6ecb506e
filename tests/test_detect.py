"""scripts/detect.py / fdconv_zoo.apps.detect on scikit-image textures pasted onto grass, offline, on CPU."""
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
from det_data import CATEGORIES, scene, write_coco
from PIL import Image
from resume_check import kill_and_resume_equals_uninterrupted
from safetensors.torch import load_file

from fdconv_zoo.apps.detect import build_detector, build_parser, load_coco, load_detector, main, train

pytestmark = pytest.mark.usefixtures('fresh_accelerate_state')  # (conftest.py)
ROOT = Path(__file__).resolve().parent.parent
SMALL = ['--model', 'resnet18_fdconv', '--no-pretrained', '--model-kwargs', 'channels=[32,32,64,64]', 'stem_width=32',
         'layers=[1,1,1,1]', 'num_freq_groups=8', '--fpn-channels', '32', '--rois-per-image', '64', '--min-size', '96',
         '--max-size', '96', '--seed', '0']


@pytest.fixture(scope='module')
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('coco')
    write_coco(root / 'train', 64, 96, seed=0)
    write_coco(root / 'val', 16, 96, seed=1)
    return root


def coco_args(root: Path) -> list[str]:
    return ['--train-ann', str(root / 'train' / 'annotations.json'), '--train-images', str(root / 'train' / 'images'),
            '--val-ann', str(root / 'val' / 'annotations.json'), '--val-images', str(root / 'val' / 'images')]


@pytest.mark.slow
def test_two_process_faster_rcnn_learns_the_objects(coco, tmp_path):
    """A real 2-process run (gloo DDP) in the 1x recipe's shape (warmup, steps at 8/12 and 11/12): box AP50 far
    above a random detector's 0, every validation image scored once."""
    out = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--main_process_port', '0', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           str(ROOT / 'scripts' / 'detect.py'), *SMALL, *coco_args(coco), '--batch-size', '2', '--epochs', '8',
           '--lr', '0.16', '--workers', '1', '--expect-num-processes', '2',
           '--checkpoint-every', '1000', '--output-dir', str(out)]
    env = {**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((out / 'results.json').read_text())
    assert results['num_processes'] == 2 and results['images'] == 16
    assert results['box_AP50'] > 30, results
    assert results['lr'] == pytest.approx(0.16 * 4 / 16)  # --lr is for a total batch of 16
    with Image.open(sorted((out / 'visualizations').glob('*.png'))[-1]) as png:
        assert png.size[0] > 96


def test_killed_run_resumes_bit_identical(coco, tmp_path):
    differ = kill_and_resume_equals_uninterrupted(
        [sys.executable, str(ROOT / 'scripts' / 'detect.py')],
        [*SMALL, *coco_args(coco), '--batch-size', '8', '--epochs', '2', '--lr', '0.04',
         '--checkpoint-every', '3', '--workers', '2', '--num-visualized', '0'], tmp_path, 'step_3')
    assert differ == []


def hf_detection_dataset(path: Path) -> None:
    """An HF dataset in the Hub's detection layout: objects with COCO bbox, ClassLabel category, polygons; one
    image without objects, one crowd object, one box partly outside its image and one with no area."""
    rng = np.random.default_rng(4)
    rows: dict[str, list] = {'image': [], 'objects': []}
    ids = [c['id'] for c in CATEGORIES]
    for i in range(10):
        image, objects = scene(rng, 96)
        objects = objects if i != 0 else []
        entry = {'bbox': [o['bbox'] for o in objects], 'category': [ids.index(o['category_id']) for o in objects],
                 'segmentation': [o['segmentation'] for o in objects], 'iscrowd': [0] * len(objects)}
        if i == 1:
            entry['iscrowd'][0] = 1
        if i == 2:
            entry['bbox'][0] = [80, 80, 40, 40]  # clipped to the image
            entry['segmentation'][0] = [[80, 80, 95, 80, 95, 95, 80, 95]]
        if i == 3:
            entry['bbox'].append([10, 10, 0, 5])  # no area: dropped
            entry['category'].append(0)
            entry['segmentation'].append([[10, 10, 10, 15, 10, 12]])
            entry['iscrowd'].append(0)
        rows['image'].append(Image.fromarray(image))
        rows['objects'].append(entry)
    features = datasets.Features({'image': datasets.Image(), 'objects': {
        'bbox': datasets.Sequence(datasets.Sequence(datasets.Value('float32'), length=4)),
        'category': datasets.Sequence(datasets.ClassLabel(names=[c['name'] for c in CATEGORIES])),
        'segmentation': datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value('float32')))),
        'iscrowd': datasets.Sequence(datasets.Value('int64'))}})
    ds = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(train=ds.select(range(6)), validation=ds.select(range(6, 10))).save_to_disk(str(path))


def test_mask_rcnn_on_a_hub_style_dataset_exports_reloads_and_pushes(tmp_path, hub):
    """Mask R-CNN on the Hub's detection layout (empty image, crowd, clipped and degenerate boxes); box and mask
    AP reported; the exported model, reloaded by one call, holds exactly the trained weights; --freeze-stages 1
    keeps the stem's dense weights but trains FDConv's modulation."""
    path = tmp_path / 'ds'
    hf_detection_dataset(path)
    args = build_parser().parse_args([*SMALL, '--detector', 'mask_rcnn', '--dataset', str(path), '--batch-size', '2',
                                      '--max-steps', '2', '--epochs', '1', '--workers', '0', '--freeze-stages', '1',
                                      '--lr', '0.08', '--warmup-iters', '0',
                                      '--output-dir', str(tmp_path / 'run'), '--push-to-hub', '--hub-repo-id',
                                      'zoo-test/det-mask'])
    results = train(args)
    assert results['images'] == 4 and 'mask_AP' in results and 'box_AP50' in results
    model, config = load_detector(tmp_path / 'run' / 'model')
    assert config['label_names'] == ['brick', 'gravel'] and 'random initialisation' in config['notes']
    saved = load_file(str(tmp_path / 'run' / 'model' / 'model.safetensors'))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    from accelerate.utils import set_seed
    set_seed(0)
    init = build_detector(config).state_dict()
    assert torch.equal(init['backbone.body.conv1.weight'], saved['backbone.body.conv1.weight'])  # frozen stem
    # from scratch, BatchNorm is live (torchvision's convention without backbone weights)
    assert config['frozen_bn'] is False and isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)
    assert not torch.equal(init['backbone.body.bn1.running_mean'], saved['backbone.body.bn1.running_mean'])
    for key in ('backbone.body.layer1.0.conv1.ksm_global.fc.weight',  # frozen stage 0's modulation trains
                'backbone.body.layer2.0.conv1.fdw.spectrum'):
        assert not torch.equal(init[key], saved[key]), key
    card = hub.state.repos['zoo-test/det-mask'].files['README.md'].decode()
    assert 'model-index' in card and 'box_AP50' in card


def test_bad_annotations_are_one_error_naming_them(coco, tmp_path, capsys):
    source = json.loads((coco / 'train' / 'annotations.json').read_text())

    def fails(coco_json: dict, expected: str) -> None:
        ann = tmp_path / 'bad.json'
        ann.write_text(json.dumps(coco_json))
        assert main([*SMALL, '--train-ann', str(ann), '--train-images', str(coco / 'train' / 'images'),
                     '--val-ann', str(ann), '--val-images', str(coco / 'train' / 'images'), '--max-steps', '1',
                     '--output-dir', str(tmp_path / 'o')]) == 2
        err = capsys.readouterr().err
        assert expected in err and 'Traceback' not in err, err
    missing = json.loads(json.dumps(source))
    missing['images'][0]['file_name'] = 'nope.jpg'
    fails(missing, f"image 100 file {coco / 'train' / 'images' / 'nope.jpg'} not found")
    orphan = json.loads(json.dumps(source))
    orphan['annotations'][0]['image_id'] = 999
    fails(orphan, "annotation 1 refers to image 999, which is not in 'images'")
    category = json.loads(json.dumps(source))
    category['annotations'][1]['category_id'] = 5
    fails(category, "annotation 2 has category 5, not in 'categories' [3, 7]")
    assert main([*SMALL, *coco_args(coco), '--detector', 'yolo', '--output-dir', str(tmp_path / 'o')]) == 2
    assert "unknown --detector 'yolo'" in capsys.readouterr().err
    assert not (tmp_path / 'o' / 'model').exists()
    # the documented repair: a box reaching outside its image is clipped to it, one without area is dropped
    clipped = json.loads(json.dumps(source))
    clipped['annotations'][0]['bbox'] = [-10, 50, 200, 30]
    clipped['annotations'][1]['bbox'] = [20, 20, 0, 10]
    ann = tmp_path / 'clipped.json'
    ann.write_text(json.dumps(clipped))
    records, names = load_coco(str(ann), str(coco / 'train' / 'images'))
    assert names == ['brick', 'gravel'] and records[0]['boxes'][0] == [0.0, 50.0, 96.0, 80.0]
    assert sum(len(r['boxes']) for r in records) == len(source['annotations']) - 1


def test_hub_dataset_is_decoded_lazily_and_streams(tmp_path, monkeypatch):
    """No image of a Hugging Face detection dataset is decoded before the loader asks for it (memory does not
    grow with the dataset), and --streaming trains on the stream to --max-steps."""
    path = tmp_path / 'ds'
    hf_detection_dataset(path)
    decoded = []
    original = datasets.Image.decode_example
    monkeypatch.setattr(datasets.Image, 'decode_example',
                        lambda self, value, **kw: decoded.append(1) or original(self, value, **kw))
    from fdconv_zoo.apps.detect import load_hf
    args = build_parser().parse_args([*SMALL, '--dataset', str(path)])
    train_records, val_records, names = load_hf(args)
    assert names == ['brick', 'gravel'] and len(train_records) == 6 and len(val_records) == 4
    assert decoded == []
    record = train_records[3]
    assert len(decoded) == 1 and record['name'] == 'train example 3' and len(record['boxes']) >= 1
    results = train(build_parser().parse_args([
        *SMALL, '--dataset', str(path), '--streaming', '--batch-size', '2', '--max-steps', '4', '--lr', '0.04',
        '--workers', '0', '--num-visualized', '0', '--output-dir', str(tmp_path / 'run')]))
    assert results['steps'] == 4 and results['images'] == 4  # 6 training rows: the stream's second pass
    assert 'box_AP50' in results
