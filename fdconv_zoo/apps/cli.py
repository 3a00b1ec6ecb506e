"""The ``fdconv-zoo`` command: demo, list, bench, and the Hub operations convert, push, pull, info, card."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import timm
import torch

from .. import models as _models  # noqa: F401  registers the FDConv families with timm
from ..errors import USER_ERRORS, report
from ..models import create_model
from ..models._fdconv import fdconv_checkpoint_filter
from .benchmark import count_flops, count_params, liven_


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def demo(args: argparse.Namespace) -> int:
    """Dense timm model -> FDConv model through the pretrained filter; outputs, params, FLOPs, latency."""
    torch.manual_seed(0)
    dense_name = args.model.replace('_fdconv', '')
    dense = liven_(timm.create_model(dense_name)).eval()
    model = timm.create_model(args.model).eval()
    model.load_state_dict(fdconv_checkpoint_filter(dense.state_dict(), model))
    size = args.img_size or model.pretrained_cfg['input_size'][-1]
    x = torch.randn(args.batch_size, 3, size, size)
    with torch.no_grad():
        y_dense, y_fd = dense(x), model(x)
        err = ((y_fd - y_dense).abs().max() / y_dense.abs().max()).item()
        dense_ms = _median_ms(lambda: dense(x), args.repeats)
        fd_ms = _median_ms(lambda: model(x), args.repeats)
    flops_dense = count_flops(dense, tuple(x.shape))['total']
    flops_fd = count_flops(model, tuple(x.shape))
    print(f"{dense_name} -> {args.model}, input {tuple(x.shape)}")
    print(f"  outputs at step 0: max relative error {err:.2e} (same predictions: "
          f"{bool((y_fd.argmax(-1) == y_dense.argmax(-1)).all())})")
    print(f"  params: {count_params(dense) / 1e6:.2f}M dense -> {count_params(model) / 1e6:.2f}M FDConv")
    print(f"  GFLOPs: {flops_dense / 1e9:.2f} dense -> {flops_fd['total'] / 1e9:.2f} FDConv "
          f"({flops_fd['fft'] / 1e9:.2f} in FFTs)")
    print(f"  eval latency (median of {args.repeats}): {dense_ms:.1f} ms dense, {fd_ms:.1f} ms FDConv "
          f"({fd_ms / dense_ms:.2f}x)")
    return 0 if err <= 1e-5 else 1


def list_models(args: argparse.Namespace) -> int:
    """Architectures by timm family with parameter counts, then every pretrained tag and the Hub repo it loads."""
    from timm.models import model_entrypoint
    families: dict[str, list[str]] = {}
    for name in timm.list_models('*_fdconv'):
        dense = name[:-len('_fdconv')]
        family = model_entrypoint(dense).__module__.rpartition('.')[2] if timm.is_model(dense) else 'other'
        families.setdefault(family, []).append(name)
    for family, names in families.items():
        print(f"{family}:")
        for name in names:
            with torch.device('meta'):  # shapes only, nothing allocated
                params = count_params(timm.create_model(name)) / 1e6
            print(f"  {name:42s} {params:7.2f}M params")
            default = f"{name}.{timm.models.get_pretrained_cfg(name).tag}"
            for tag in timm.list_pretrained(f'{name}.*'):
                mark = ' (default)' if tag == default else ''
                print(f"      {tag:52s} <- hf-hub:{timm.models.get_pretrained_cfg(tag).hf_hub_id}{mark}")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Dense vs FDConv: eval latency per batch size, a training step with peak memory, per-part breakdown."""
    from ..atomic import write_json
    from .benchmark import NETWORKS, check_backend, compare, dense_counterpart, part_breakdown
    for name in args.models:
        dense_counterpart(name)  # a dense name is refused before anything runs
    check_backend(args.backend, 'eval', args.device, args.amp, args.compile)
    rows = []
    for name in args.models:
        for bs in args.batch_sizes:
            for backend in dict.fromkeys(('eager', args.backend)):  # the same model eager, then in the backend
                rows.append(compare(name, 'eval', bs, args.img_size, args.repeats, device=args.device, amp=args.amp,
                                    compile=args.compile, backend=backend))
                print(_bench_line(rows[-1]), flush=True)
        if args.train_batch_size and args.backend == 'eager':
            train_size = args.train_img_size or (None if name in NETWORKS else 160)
            rows.append(compare(name, 'train', args.train_batch_size, train_size, args.repeats,
                                device=args.device, amp=args.amp, compile=args.compile))
            print(_bench_line(rows[-1]), flush=True)
    result = {'device': str(args.device), 'amp_bf16': args.amp, 'compiled': args.compile, 'backend': args.backend,
              'torch': torch.__version__,
              'threads': torch.get_num_threads(), 'rows': [r.to_dict() for r in rows]}
    if args.breakdown:
        result['breakdown'] = {}
        for name in args.models:
            parts = part_breakdown(name, args.batch_sizes[-1], args.img_size, device=args.device)
            result['breakdown'][name] = parts
            print(f"{name} eval batch {args.batch_sizes[-1]} parts (ms): "
                  + ', '.join(f"{k.removeprefix('fdconv.')} {v:.1f}" for k, v in parts.items()), flush=True)
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


def _bench_line(r) -> str:
    line = (f"{r.model:38s} {r.mode:5s} {r.backend:11s} batch {r.batch_size:3d} @{r.img_size}: "
            f"dense {r.dense_ms:8.1f} ms, FDConv {r.fdconv_ms:8.1f} ms, ratio {r.time_ratio:5.2f}x")
    if r.ratio_q1 is not None:
        line += f" ({r.ratio_q1:.2f}-{r.ratio_q3:.2f})"
    if r.memory_ratio is not None:
        line += (f" | peak memory dense {r.dense_peak_mb:7.0f} MB, FDConv {r.fdconv_peak_mb:7.0f} MB, "
                 f"ratio {r.memory_ratio:4.2f}x")
    return line


def convert_cmd(args: argparse.Namespace) -> int:
    from ..hub import convert
    out = convert(args.source, args.out_dir, arch=args.arch)
    print(f"wrote {out}/model.safetensors and config.json")
    return 0


def push_cmd(args: argparse.Namespace) -> int:
    from ..hub import push
    card = None
    if args.manifest:
        from ..cards import load_manifest_entry, model_card
        card = model_card(args.dir, args.repo_id, entry=load_manifest_entry(args.manifest))
    repo = push(args.dir, args.repo_id, org=args.org, private=args.private, card=card)
    print(f"pushed {args.dir} to {repo}")
    return 0


def pull_cmd(args: argparse.Namespace) -> int:
    from ..hub import pull
    print(pull(args.repo_id, args.out_dir, revision=args.revision, org=args.org))
    return 0


def info_cmd(args: argparse.Namespace) -> int:
    import json

    from ..hub import info
    print(json.dumps(info(args.path_or_repo, revision=args.revision), indent=1))
    return 0


def card_cmd(args: argparse.Namespace) -> int:
    from ..cards import write_card
    for entry in args.entries:
        print(write_card(entry, args.out_root))
    return 0


def _load_model(spec: str, no_pretrained: bool) -> torch.nn.Module:
    """A zoo name or tag (a tag's weights unless ``no_pretrained``), an hf-hub: id, or a folder written by
    save_for_hf or a training script (its model/ subfolder)."""
    from pathlib import Path

    from ..hub import load_checkpoint
    path = Path(spec)
    if path.is_dir():
        return load_checkpoint(path / 'model' if (path / 'model' / 'config.json').is_file() else path)
    tagged = '.' in spec or spec.startswith('hf-hub:')
    return create_model(spec, pretrained=tagged and not no_pretrained)


def export_cmd(args: argparse.Namespace) -> int:
    """A classifier, or a segmentation folder written by scripts/segment.py (at its crop size by default)."""
    from pathlib import Path

    from .export import export
    from .segment import META, load_segmenter
    img_size = args.img_size
    if (Path(args.model) / META).is_file():
        model, meta = load_segmenter(args.model)
        img_size = img_size or meta['crop_size']
    else:
        model = _load_model(args.model, args.no_pretrained)
    result = export(model, args.format, args.out, img_size, args.opset, check=not args.no_verify)
    checked = ', '.join(f'{shape}: {e:.1e}' for shape, e in result['errors'].items()) or 'not checked'
    dims = ', '.join(f'{name} {r}' if isinstance(r, int) else f"{name} {r[0]}..{r[1] if r[1] != -1 else ''}"
                     for name, r in zip(('batch', 'channels', 'height', 'width'), result['input_ranges'], strict=True))
    print(f"wrote {result['path']} ({args.format}; input {dims}; relative difference from eager: {checked})")
    return 0


def _load_inputs(path: str) -> torch.Tensor:
    """A batch of model inputs saved as a tensor (.pt, torch.save) or an array (.npy)."""
    import numpy as np
    try:
        if path.endswith('.npy'):
            return torch.from_numpy(np.load(path)).float()
        loaded = torch.load(path, map_location='cpu', weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"inputs {path} cannot be read ({e})") from None
    if not isinstance(loaded, torch.Tensor):
        raise ValueError(f"inputs {path} hold a {type(loaded).__name__}, expected one tensor (B, C, ...)")
    return loaded.float()


def analyze_cmd(args: argparse.Namespace) -> int:
    """The frequency picture of a model: report.py's PNGs, JSON and index.html."""
    from ..conversion import convert_to_fdconv
    from .analysis import compare_groups
    from .benchmark import NETWORKS, build_pair, dense_counterpart
    from .report import analyze, summary_line
    inputs = _load_inputs(args.inputs) if args.inputs else None
    sample_shape = None
    if args.model in NETWORKS:  # converted from outside timm, random dense weights
        net = NETWORKS[args.model]
        torch.manual_seed(0)
        model, sample_shape = build_pair(args.model)['fdconv'], net.sample_shape(net.default_size)

        def build(n: int) -> torch.nn.Module:
            torch.manual_seed(0)
            return convert_to_fdconv(liven_(net.build()), num_freq_groups=n)
    else:
        model = _load_model(args.model, args.no_pretrained)
        arch = model.pretrained_cfg.get('architecture') or args.model.split('.')[0]

        def build(n: int) -> torch.nn.Module:
            torch.manual_seed(0)
            dense = liven_(timm.create_model(dense_counterpart(arch)))
            fd = timm.create_model(arch, num_freq_groups=n)
            fd.load_state_dict(fdconv_checkpoint_filter(dense.state_dict(), fd))
            return fd
    compare = compare_groups(build, args.compare_groups) if args.compare_groups else None
    out = analyze(model, args.out, args.images, args.layers, compare, inputs=inputs, sample_shape=sample_shape)
    print(summary_line(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='fdconv-zoo', description=__doc__)
    parser.add_argument('--debug', action='store_true', help='show the traceback of an error')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('demo', help='convert a dense model to FDConv and show that outputs match, and the cost')
    p.add_argument('--model', default='resnet50_fdconv', help='registered FDConv architecture')
    p.add_argument('--img-size', type=int, default=None, help='input resolution (default: the model cfg)')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--repeats', type=int, default=5)
    p.set_defaults(func=demo)
    p = sub.add_parser('list', help='architectures and pretrained tags with their parameter counts')
    p.set_defaults(func=list_models)
    p = sub.add_parser('bench', help='dense vs FDConv latency, training step, peak memory, per-part breakdown')
    p.add_argument('--models', nargs='+', default=['resnet50_fdconv'],
                   help='timm FDConv architectures, or networks converted from outside timm: '
                        'r3d_18_fdconv, r2plus1d_18_fdconv (16-frame clips), sequence_resnet_fdconv (12 x length)')
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 8], help='eval batch sizes')
    p.add_argument('--img-size', type=int, default=None,
                   help="eval resolution (a clip's height and width, a sequence's length); default: the model's")
    p.add_argument('--train-batch-size', type=int, default=8, help='0 skips the training step')
    p.add_argument('--train-img-size', type=int, default=None, help="default: 160, or the converted network's")
    p.add_argument('--repeats', type=int, default=5, help='timed repeats (interleaved dense/FDConv)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', action='store_true', help='bf16 autocast')
    p.add_argument('--compile', action='store_true', help='time torch.compile(model, fullgraph=True) of both models')
    p.add_argument('--breakdown', action='store_true', help='also profile the FDConv parts')
    p.add_argument('--backend', choices=['eager', 'onnxruntime'], default='eager',
                   help='onnxruntime: also time both models exported to ONNX in onnxruntime (CPU), next to eager; '
                        'no training step')
    p.add_argument('--out', default=None, help='write the results as JSON here')
    p.set_defaults(func=bench)
    org_help = 'Hub organisation for repo ids without one (default: $FDCONV_ZOO_ORG or fdconv-zoo)'
    p = sub.add_parser('convert', help='dense timm checkpoint (name/tag, hf-hub:id or local file) -> FDConv folder')
    p.add_argument('source', help="e.g. resnet50.a1_in1k, hf-hub:timm/resnet50.a1_in1k or weights.safetensors")
    p.add_argument('out_dir', help='output folder (model.safetensors + config.json)')
    p.add_argument('--arch', help='FDConv architecture (default: the source architecture + _fdconv)')
    p.set_defaults(func=convert_cmd)
    p = sub.add_parser('push', help='upload a checkpoint folder or fine-tuning output to a Hub repo')
    p.add_argument('dir')
    p.add_argument('repo_id', help="'name' (uses --org) or 'org/name'")
    p.add_argument('--org', help=org_help)
    p.add_argument('--private', action='store_true')
    p.add_argument('--manifest', help='models/<entry>.json to build the model card from')
    p.set_defaults(func=push_cmd)
    p = sub.add_parser('pull', help='download a checkpoint to the HF cache or a folder')
    p.add_argument('repo_id')
    p.add_argument('out_dir', nargs='?', default=None)
    p.add_argument('--revision')
    p.add_argument('--org', help=org_help)
    p.set_defaults(func=pull_cmd)
    p = sub.add_parser('info', help='what a checkpoint (folder, .safetensors file or Hub repo) holds')
    p.add_argument('path_or_repo')
    p.add_argument('--revision')
    p.set_defaults(func=info_cmd)
    p = sub.add_parser('analyze', help='frequency picture of an FDConv model: PNGs, JSON and index.html')
    p.add_argument('model', help='zoo name or tag, hf-hub: id, a folder written by save_for_hf or a training script, '
                                 'or a network converted from outside timm (r3d_18_fdconv, r2plus1d_18_fdconv, '
                                 'sequence_resnet_fdconv; random weights)')
    p.add_argument('--images', nargs='+', help='image files or folders for the per-image views')
    p.add_argument('--inputs', help='a batch of model inputs (.pt tensor or .npy array: clips, volumes, sequences) '
                                    'for the per-input views of a model that does not take images')
    p.add_argument('--layers', help="glob of layer names for the detailed pages (e.g. 'layer3.*'; default: the "
                                    "first FDConv layer of each stage)")
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--compare-groups', type=int, nargs='+', metavar='N',
                   help='also compare these numbers of frequency groups on the same dense weights')
    p.add_argument('--no-pretrained', action='store_true', help='a tag without its weights (random init)')
    p.set_defaults(func=analyze_cmd)
    p = sub.add_parser('export', help='torch.export program (.pt2) or ONNX model with a dynamic batch, checked')
    p.add_argument('model', help='zoo name or tag, hf-hub: id, or a folder written by save_for_hf or a training script '
                                 '(classification or segmentation)')
    p.add_argument('--format', required=True, help='onnx or pt2')
    p.add_argument('--out', required=True, help='output file')
    p.add_argument('--img-size', type=int, nargs='+', help='input H [W] (default: the model cfg)')
    p.add_argument('--opset', type=int, default=20, help='ONNX opset')
    p.add_argument('--no-verify', action='store_true', help='skip the check against eager PyTorch')
    p.add_argument('--no-pretrained', action='store_true', help='a tag without its weights (random init)')
    p.set_defaults(func=export_cmd)
    p = sub.add_parser('card', help='generate model_cards/<repo>/README.md from manifest entries')
    p.add_argument('entries', nargs='+', help='models/*.json')
    p.add_argument('--out-root', default='model_cards')
    p.set_defaults(func=card_cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        return report(f'fdconv-zoo {args.command}', e, ' (--debug shows the traceback)')


if __name__ == '__main__':
    sys.exit(main())
