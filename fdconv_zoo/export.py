"""Export FDConv models with a dynamic batch: ``torch.export`` programs (.pt2, the fdconv operators kept; load
with ``import fdconv_zoo``) and ONNX (the operators decomposed into ops.portable_dynamic_conv, FFTs as ONNX
DFT), each checked against eager PyTorch after writing."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .atomic import publish
from .layers import ops

FORMATS = ('onnx', 'pt2')
VERIFY_BATCHES = (1, 3, 8)


def _exact_dynamic_conv(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial,
                        filter_attention, bias, kernel_size, groups, stride, padding, dilation, pre_pad, padding_mode,
                        cutoffs):
    """The ONNX decomposition: kernels made in float64, because onnxruntime's DFT on lengths that are not
    powers of two is a plain float32 sum otherwise (1e-5 relative per layer)."""
    return ops.portable_dynamic_conv(x, band_scale, spectrum, group_index, attention, taps, windows, channel, spatial,
                                     filter_attention, bias, kernel_size, groups, stride, padding, dilation, pre_pad,
                                     padding_mode, cutoffs, synthesis_dtype=torch.float64)


def input_size(model: nn.Module, img_size: list[int] | None) -> tuple[int, int]:
    if img_size:
        if len(img_size) not in (1, 2) or min(img_size) < 1:
            raise ValueError(f"--img-size {img_size}: give H [W], positive")
        return img_size[0], img_size[-1]
    size = model.pretrained_cfg.get('input_size', (3, 224, 224))
    return size[1], size[2]


def program(model: nn.Module, size: tuple[int, int]) -> torch.export.ExportedProgram:
    """torch.export of the model in eval mode with a free batch dimension (the spatial size is fixed: FBM's
    band bases and Swin's windows are built for it)."""
    batch = torch.export.Dim('batch', min=1, max=4096)
    example = torch.randn(2, 3, *size)
    try:
        return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # what torch.export refuses is one line naming the reason
        raise ValueError(f"{type(model).__name__} does not export: {str(e).strip().splitlines()[0]}") from e


def _runner(fmt: str, path: Path):
    if fmt == 'pt2':
        module = torch.export.load(str(path)).module()
        return lambda x: module(x)
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def verify(model: nn.Module, fmt: str, path: Path, size: tuple[int, int], seed: int = 0) -> dict[int, float]:
    """Largest difference relative to the largest eager output, per batch size, of the exported file run (the
    program by torch, the ONNX model by onnxruntime's CPU provider) against eager PyTorch."""
    run = _runner(fmt, path)
    gen = torch.Generator().manual_seed(seed)
    errors = {}
    for batch in VERIFY_BATCHES:
        x = torch.randn((batch, 3, *size), generator=gen)
        with torch.no_grad():
            expected = model(x)
            got = run(x)
        errors[batch] = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    return errors


def export(model: nn.Module, fmt: str, out: str | os.PathLike, img_size: list[int] | None = None, opset: int = 20,
           check: bool = True, tolerance: float = 1e-4) -> dict[str, Any]:
    """Write ``model`` to ``out`` as ``fmt`` ('pt2' or 'onnx'); with ``check``, run it against eager PyTorch on
    batches of 1, 3 and 8 before it takes its name. Nothing is left at ``out`` if any step fails."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: one of {list(FORMATS)}")
    if fmt == 'onnx' and not 18 <= opset <= 23:
        raise ValueError(f"--opset {opset}: the exporter writes opsets 18 to 23 (DFT as used here needs 18+)")
    model = model.eval()
    size = input_size(model, img_size)
    exported = program(model, size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{out.name}.', suffix=f'.{fmt}', dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if fmt == 'pt2':
            torch.export.save(exported, str(tmp))
        else:
            decomposed = exported.run_decompositions({torch.ops.fdconv.dynamic_conv.default: _exact_dynamic_conv})
            onnx_program = torch.onnx.export(decomposed, dynamo=True, opset_version=opset, verbose=False)
            onnx_program.save(str(tmp))
        errors = verify(model, fmt, tmp, size) if check else {}
        worst = max(errors.values(), default=0.0)
        if worst > tolerance:
            raise ValueError(f"the exported {fmt} model differs from eager PyTorch by {worst:.2e} relative "
                             f"(batches {errors}), more than {tolerance:.0e}")
        publish(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return {'path': str(out), 'format': fmt, 'input_size': list(size), 'errors': errors}
