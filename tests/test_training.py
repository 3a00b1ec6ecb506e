"""Defaults of the training scripts that follow the run and the data (fdconv_zoo.apps.training and the tasks)."""
from __future__ import annotations

import pytest


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
