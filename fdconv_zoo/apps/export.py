"""Export FDConv models with a dynamic batch: ``torch.export`` programs (.pt2, the fdconv operators kept; load
with ``import fdconv_zoo``) and ONNX (the operators decomposed into layers/ops/portable.py: the inverse FFTs
as matrix products), each checked against eager PyTorch after writing."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils._sympy.numbers import int_oo

from ..atomic import publish
from ..layers.ops.portable import portable_dynamic_conv

FORMATS = ('onnx', 'pt2')
VERIFY_BATCHES = (1, 3, 8)


def input_size(model: nn.Module, img_size: list[int] | None) -> tuple[int, int]:
    if img_size:
        if len(img_size) not in (1, 2) or min(img_size) < 1:
            raise ValueError(f"--img-size {img_size}: give H [W], positive")
        return img_size[0], img_size[-1]
    size = getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224))
    return size[1], size[2]


def program(model: nn.Module, size: tuple[int, int]) -> torch.export.ExportedProgram:
    """torch.export of the model in eval mode with a free batch dimension and, where the architecture allows it
    (ResNet, ConvNeXt; not Swin, whose windows fix the size), a free height and width: torch.export decides
    (Dim.AUTO) and records the range it proved in the program."""
    batch = torch.export.Dim('batch', min=1, max=4096)
    example = torch.randn(2, 3, *size)
    try:
        return torch.export.export(model.eval(), (example,),
                                   dynamic_shapes=({0: batch, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},))
    except Exception as e:  # what torch.export refuses is one line naming the reason
        raise ValueError(f"{type(model).__name__} does not export: {str(e).strip().splitlines()[0]}") from e


def input_ranges(exported: torch.export.ExportedProgram) -> list[tuple[int, int] | int]:
    """Per input dimension, its size if fixed or the (min, max) range the program accepts (max -1: unbounded)."""
    shape = next(n.meta['val'].shape for n in exported.graph.nodes if n.op == 'placeholder'
                 and n.name in exported.graph_signature.user_inputs)
    ranges = []
    for dim in shape:
        if isinstance(dim, int) or dim.node.expr.is_number:  # fixed (a symbol torch.export specialised)
            ranges.append(int(dim))
            continue
        bounds = exported.range_constraints[dim.node.expr]
        ranges.append((int(bounds.lower), -1 if bounds.upper == int_oo else int(bounds.upper)))
    return ranges


def runner(fmt: str, path: str | os.PathLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """An exported file as a callable on tensors: the program by torch, the ONNX model by onnxruntime's CPU
    provider."""
    if fmt == 'pt2':
        module = torch.export.load(str(path)).module()
        return lambda x: module(x)
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def check_shapes(size: tuple[int, int], ranges: list) -> list[tuple[int, ...]]:
    """The inputs a written file is checked on: batches 1, 3 and 8 at the export size, and where the height and
    width are free, batch 2 at another, non-square size inside their ranges."""
    shapes = [(batch, 3, *size) for batch in VERIFY_BATCHES]
    if not isinstance(ranges[2], int):
        other = []
        for n, (low, high), step in zip(size, ranges[2:], (32, 64), strict=True):
            other.append(n + step if high == -1 or n + step <= high else max(low, n - step))
        shapes.append((2, 3, *other))
    return shapes


def verify(model: nn.Module, fmt: str, path: Path, shapes: list[tuple[int, ...]], seed: int = 0) -> dict[str, float]:
    """Largest difference relative to the largest eager output, per input shape ('BxCxHxW'), of the exported
    file run (the program by torch, the ONNX model by onnxruntime's CPU provider) against eager PyTorch."""
    run = runner(fmt, path)
    gen = torch.Generator().manual_seed(seed)
    errors = {}
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            expected = model(x)
            got = run(x)
        errors['x'.join(map(str, shape))] = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    return errors


def export(model: nn.Module, fmt: str, out: str | os.PathLike, img_size: list[int] | None = None, opset: int = 20,
           check: bool = True, tolerance: float = 1e-4) -> dict[str, Any]:
    """Write ``model`` to ``out`` as ``fmt`` ('pt2' or 'onnx') with a free batch (and height and width where the
    architecture allows); with ``check``, run it against eager PyTorch (check_shapes) before it takes its name.
    Nothing is left at ``out`` if any step fails."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: one of {list(FORMATS)}")
    if fmt == 'onnx' and not 18 <= opset <= 23:
        raise ValueError(f"--opset {opset}: torch.onnx.export(dynamo=True) writes opsets 18 to 23")
    devices = {p.device.type for p in model.parameters()}
    if devices - {'cpu'}:
        raise ValueError(f"export traces and checks on the CPU, the model is on {sorted(devices)}: pass model.cpu()")
    model = model.eval()
    size = input_size(model, img_size)
    exported = program(model, size)
    ranges = input_ranges(exported)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{out.name}.', suffix=f'.{fmt}', dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if fmt == 'pt2':
            torch.export.save(exported, str(tmp))
        else:
            decomposed = exported.run_decompositions({torch.ops.fdconv.dynamic_conv.default: portable_dynamic_conv})
            # without the onnxscript optimizer: 4 of ResNet-50's 5 export minutes here, and onnxruntime optimizes
            # the graph at load (same latency measured either way)
            onnx_program = torch.onnx.export(decomposed, dynamo=True, opset_version=opset, verbose=False,
                                             optimize=False)
            onnx_program.save(str(tmp))
        errors = verify(model, fmt, tmp, check_shapes(size, ranges)) if check else {}
        worst = max(errors.values(), default=0.0)
        if worst > tolerance:
            raise ValueError(f"the exported {fmt} model differs from eager PyTorch by {worst:.2e} relative "
                             f"(inputs {errors}), more than {tolerance:.0e}")
        publish(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return {'path': str(out), 'format': fmt, 'input_size': list(size), 'input_ranges': ranges, 'errors': errors}
