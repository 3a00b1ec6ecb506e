"""Defaults of the training scripts that follow the run and the data (fdconv_zoo.apps.training and the tasks)."""
from __future__ import annotations

import pytest
import torch


class _Printer:
    def __init__(self):
        self.lines: list[str] = []

    def print(self, line: str) -> None:
        self.lines.append(line)


def test_warmup_longer_than_a_quarter_of_the_run_is_shortened_with_one_line():
    from fdconv_zoo.apps.training import fit_warmup
    printer = _Printer()
    assert fit_warmup(printer, 20, 100, '--warmup-iters') == 20 and printer.lines == []
    assert fit_warmup(printer, 500, 120, '--warmup-iters') == 30
    assert printer.lines == ['warning: --warmup-iters gives 500 warmup updates for a run of 120; using 30 '
                             '(a quarter of the run)']


@pytest.mark.parametrize('crop, scale, expected', [
    (['512'], None, [512, 2048]),  # mmseg's ADE20K
    (['64'], None, [64, 256]),
    (['64', '96'], None, [64, 384]),
    (['64'], ['100', '200'], [100, 200]),
])
def test_segmentation_resize_scale_follows_the_crop(crop, scale, expected):
    from fdconv_zoo.apps.segment import build_parser, resize_scale
    argv = ['--crop-size', *crop] + (['--scale', *scale] if scale else [])
    assert resize_scale(build_parser().parse_args(argv)) == expected


def test_detection_freezes_only_what_pretrained_weights_bring():
    from fdconv_zoo.apps.detect import build_parser
    scratch = build_parser().parse_args(['--no-pretrained'])
    assert scratch.freeze_stages is None and scratch.frozen_bn is None  # resolved in train(): 0 and live BatchNorm
    assert build_parser().parse_args(['--frozen-bn']).frozen_bn is True


def test_plain_copy_for_export_leaves_the_trained_model_alone():
    """The export copy is plain (BatchNorm2d where training used SyncBatchNorm), float32 and on the CPU, with the
    trained values; the live model keeps its modules, dtype and values."""
    import torch.nn as nn

    from fdconv_zoo.apps.training import plain_copy

    def build():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    torch.manual_seed(0)
    live = nn.SyncBatchNorm.convert_sync_batchnorm(build())
    with torch.no_grad():
        live[1].running_mean.uniform_()
        live[1].weight.uniform_()
    live = live.to(torch.bfloat16)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    plain = plain_copy(live, build)
    assert type(plain[1]) is nn.BatchNorm2d and type(live[1]) is nn.SyncBatchNorm
    assert all(p.dtype == torch.float32 and p.device.type == 'cpu' for p in plain.state_dict().values()
               if p.is_floating_point())
    assert all(v.dtype == torch.bfloat16 for v in live.state_dict().values() if v.is_floating_point())
    for key, value in live.state_dict().items():
        assert torch.equal(value, before[key])
        assert torch.equal(plain.state_dict()[key], value.to(plain.state_dict()[key].dtype))
