"""Run under torchrun with 2 CPU processes (gloo): a resnet18_fdconv sharded with FSDP2's fully_shard trains two
steps, then goes through the project's export (fdconv_zoo.apps.training.plain_copy, fdconv_zoo.save_for_hf, and a
push to the Hub server at HF_ENDPOINT). Rank 0 also writes the full weights it gathered itself, to compare."""
import sys
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

import fdconv_zoo
from fdconv_zoo.apps.training import plain_copy
from fdconv_zoo.hub import push

KWARGS = dict(num_classes=4, channels=[16, 16, 32, 32], stem_width=16, layers=[1, 1, 1, 1], num_freq_groups=8)


def main(out: Path, repo: str) -> None:
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = timm.create_model('resnet18_fdconv', **KWARGS)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        fully_shard(stage)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 4, (4,), generator=gen)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    full = {k: v.full_tensor() if hasattr(v, 'full_tensor') else v for k, v in model.state_dict().items()}
    export = plain_copy(model, lambda: timm.create_model('resnet18_fdconv', **KWARGS))
    assert (export is None) == (rank != 0)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, str(out / 'gathered.safetensors'))
        fdconv_zoo.save_for_hf(export, out / 'model', model_config={'label_names': ['a', 'b', 'c', 'd']})
        push(out / 'model', repo)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    main(Path(sys.argv[1]), sys.argv[2])
