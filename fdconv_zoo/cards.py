"""Hub model cards and the zoo manifest (models/*.json: one file per published checkpoint)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .atomic import write_text

MANIFEST_FIELDS = ('architecture', 'tag', 'hub_repo', 'source_checkpoint', 'recipe', 'metrics', 'params',
                   'gflops', 'throughput', 'license', 'sha256')
METRIC_FIELDS = ('dataset', 'split', 'name', 'value')


def load_manifest_entry(path: str | os.PathLike) -> dict[str, Any]:
    """One manifest file, checked for every field (the message names the file and the field)."""
    with open(path) as f:
        try:
            entry = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in MANIFEST_FIELDS if k not in entry]
    if missing:
        raise ValueError(f"{path}: missing manifest fields {missing}")
    for i, metric in enumerate(entry['metrics']):
        absent = [k for k in METRIC_FIELDS if k not in metric]
        if absent:
            raise ValueError(f"{path}: metrics[{i}] lacks {absent}")
    return entry


def _card_data(architecture: str, license_: str | None, metrics: list[dict[str, Any]], repo_id: str,
               datasets: list[str]):
    from huggingface_hub import EvalResult, ModelCardData
    results = [EvalResult(task_type='image-classification', dataset_type=m['dataset'], dataset_name=m['dataset'],
                          dataset_split=m['split'], metric_type=m['name'], metric_value=m['value'])
               for m in metrics]
    return ModelCardData(
        library_name='timm', license=license_, tags=['image-classification', 'timm', 'fdconv'],
        datasets=datasets or None, model_name=repo_id, eval_results=results or None,
        pipeline_tag='image-classification', base_model=None)


def model_card(folder: str | os.PathLike, repo_id: str, model: torch.nn.Module | None = None,
               entry: dict[str, Any] | None = None) -> str:
    """Card text with Hub YAML metadata (library_name timm, tags, datasets, model-index) and a usage snippet."""
    from huggingface_hub import ModelCard
    folder = Path(folder)
    config = json.loads((folder / 'config.json').read_text()) if (folder / 'config.json').is_file() else {}
    arch = (entry or {}).get('architecture') or config.get('architecture', 'unknown')
    metrics = (entry or {}).get('metrics', [])
    results_path = folder / 'results.json'
    if not metrics and results_path.is_file():  # a fine-tuning run's final evaluation
        results = json.loads(results_path.read_text())
        dataset, split = results.get('dataset', 'custom'), results.get('split', 'validation')
        metrics = [{'dataset': dataset, 'split': split, 'name': k, 'value': results[k]}
                   for k in ('top1', 'top5') if k in results]
    datasets = sorted({m['dataset'] for m in metrics})
    license_ = (entry or {}).get('license') or config.get('pretrained_cfg', {}).get('license')
    params = (entry or {}).get('params') or (sum(p.numel() for p in model.parameters()) if model else None)
    lines = [
        f'# {repo_id}', '',
        f'`{arch}`: a [timm](https://github.com/huggingface/pytorch-image-models) model with Frequency Dynamic '
        'Convolution layers ([FDConv, CVPR 2025](https://arxiv.org/abs/2503.18783)), built with fdconv-zoo.', '',
        '## Usage', '', '```python', 'import timm', 'import fdconv_zoo  # registers the FDConv architectures', '',
        f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()',
        'config = timm.data.resolve_data_config({}, model=model)',
        'transform = timm.data.create_transform(**config)', '```', '', '## Details', '']
    if params:
        lines.append(f'- parameters: {params / 1e6:.2f}M')
    for key, label in (('source_checkpoint', 'source checkpoint'), ('recipe', 'training recipe'),
                       ('gflops', 'GFLOPs (FFTs counted)'), ('sha256', 'sha256 of model.safetensors')):
        if entry and entry.get(key) is not None:
            lines.append(f'- {label}: {entry[key]}')
    if config.get('model_args'):
        lines.append(f"- model arguments: `{json.dumps(config['model_args'])}`")
    if metrics:
        lines += ['', '| dataset | split | metric | value |', '|---|---|---|---|']
        lines += [f"| {m['dataset']} | {m['split']} | {m['name']} | {m['value']} |" for m in metrics]
    card = ModelCard.from_template(
        _card_data(arch, license_, metrics, repo_id, datasets), template_str='---\n{{ card_data }}\n---\n\n'
        + '\n'.join(lines) + '\n')
    return str(card)


def task_card(repo_id: str, *, task: str, library: str, metrics: dict[str, Any], dataset: str, body: str) -> str:
    """Card of a task model (segmentation, detection): the scores in the Hub's model-index metadata, then
    ``body`` (what it is and how to load it)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    evals = [EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset, dataset_split='validation',
                        metric_type=name, metric_value=round(value, 2))
             for name, value in metrics.items() if isinstance(value, float)]
    data = ModelCardData(library_name=library, tags=[task, 'fdconv', 'timm'], model_name=repo_id,
                         eval_results=evals or None, pipeline_tag=task)
    return str(ModelCard.from_template(data, template_str='---\n{{ card_data }}\n---\n\n' + body))


def write_card(entry_path: str | os.PathLike, out_root: str | os.PathLike = 'model_cards') -> Path:
    """model_cards/<repo>/README.md from one manifest entry (written atomically)."""
    entry = load_manifest_entry(entry_path)
    target = Path(out_root) / entry['hub_repo'].split('/')[-1] / 'README.md'
    return write_text(target, model_card(Path(entry_path).parent, entry['hub_repo'], entry=entry))
