"""Every device present against the CPU: the layers, their gradients and a whole model's training step. Here
the CPU's fused loops are checked against its PyTorch code; on a GPU machine the same tests add CUDA in float32
and under bf16 autocast (the ``device`` fixture of conftest.py), so that the path GPUs run is checked by the
suite, not only by the benchmark."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import timm
import torch
from conftest import rel_err
from naive import randomize_

import fdconv_zoo  # noqa: F401  registers the models
from fdconv_zoo import FDConv1d, FDConv2d, FDConv3d, FDLinear
from fdconv_zoo.apps.benchmark import liven_
from fdconv_zoo.layers import native_kernels

TINY_RESNET = dict(channels=[16, 16, 32, 32], stem_width=16, layers=[1, 1, 1, 1], num_freq_groups=8)


def _run(module: torch.nn.Module, x: torch.Tensor, device: str, dtype: torch.dtype):
    """Output, input gradient and parameter gradients (as float32 CPU tensors) of sum(y^2) on ``device``;
    bfloat16 runs under autocast with float32 parameters, as mixed-precision training does."""
    module = copy.deepcopy(module).to(device)
    inp = x.to(device).requires_grad_()
    amp = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else nullcontext()
    with amp:
        y = module(inp)
    y.float().square().sum().backward()
    grads = [p.grad.float().cpu() for p in module.parameters()]
    return [y.detach().float().cpu(), inp.grad.float().cpu(), *grads]


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 6e-2


@pytest.mark.parametrize('make,shape', [
    (lambda: FDConv2d(16, 24, 3, padding=1, num_freq_groups=8), (2, 16, 9, 7)),  # FBM, grouped convolution
    (lambda: FDConv2d(16, 48, 3, stride=2, padding=1, num_freq_groups=8), (2, 16, 6, 6)),  # small map: im2col
    (lambda: FDConv2d(16, 24, 1, num_freq_groups=5), (2, 16, 5, 5)),  # 1x1: matrix product
    (lambda: FDConv2d(16, 24, 3, padding=1, groups=4, num_freq_groups=4), (2, 16, 6, 5)),  # groups > 1
    (lambda: FDLinear(16, 24, num_freq_groups=6), (2, 7, 16)),  # tokens
    (lambda: FDConv1d(16, 24, 3, padding=1, num_freq_groups=6), (2, 16, 11)),  # sequences: FBM by FFT
    (lambda: FDConv3d(8, 12, 3, padding=1, num_freq_groups=6), (2, 8, 4, 6, 5)),  # volumes: FBM along 3 axes
    (lambda: FDConv3d(8, 12, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), num_freq_groups=6),
     (2, 8, 3, 7, 6)),  # R(2+1)D's spatial conv
], ids=['3x3', 'small-map', '1x1', 'groups', 'linear', '1d', '3d', '3d-(1,3,3)'])
def test_layer_and_gradients_match_the_cpu_reference(make, shape, device):
    """Outputs and every gradient on the device equal the CPU's PyTorch code in float32."""
    dev, dtype = device
    torch.manual_seed(0)
    layer = make()
    randomize_(layer, scale=0.2)
    x = torch.randn(shape)
    with native_kernels(False):
        expected = _run(layer, x, 'cpu', torch.float32)
    got = _run(layer, x, dev, dtype)
    for g, e in zip(got, expected, strict=True):
        assert rel_err(g, e) < _tolerance(dtype)


def test_model_training_step_matches_the_cpu_reference(device):
    """One SGD step of a small ResNet-FDConv: the same loss and the same updated weights as on the CPU."""
    dev, dtype = device
    torch.manual_seed(1)
    model = liven_(timm.create_model('resnet18_fdconv', num_classes=5, **TINY_RESNET))
    x, target = torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 3])

    def step(device_name: str, dtype: torch.dtype) -> tuple[float, torch.Tensor]:
        net = copy.deepcopy(model).to(device_name).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        amp = torch.autocast(device_name, dtype=dtype) if dtype != torch.float32 else nullcontext()
        with amp:
            loss = torch.nn.functional.cross_entropy(net(x.to(device_name)).float(), target.to(device_name))
        loss.backward()
        opt.step()
        return loss.item(), net.layer1[0].conv2.fdw.spectrum.detach().float().cpu()

    with native_kernels(False):
        loss_ref, spectrum_ref = step('cpu', torch.float32)
    loss, spectrum = step(dev, dtype)
    assert abs(loss - loss_ref) <= _tolerance(dtype) * abs(loss_ref)
    assert rel_err(spectrum, spectrum_ref) < _tolerance(dtype)
    assert not torch.equal(spectrum, model.layer1[0].conv2.fdw.spectrum.detach())  # the step moved it


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_corrupted_group_index_stops_a_cuda_forward():
    """On CUDA the group ids are checked by an asynchronous device assert (no synchronisation per call); a
    corrupted index stops the process's CUDA work at the next synchronisation instead of reading outside the
    attention. Run in a child process: a device assert ends the CUDA context."""
    code = ("import torch; from fdconv_zoo import FDConv2d\n"
            "layer = FDConv2d(16, 16, 3, padding=1, num_freq_groups=8).cuda()\n"
            "layer(torch.randn(1, 16, 6, 6, device='cuda')); torch.cuda.synchronize(); print('good run')\n"
            "layer.fdw.group_index[1, 1] = 77\n"
            "layer(torch.randn(1, 16, 6, 6, device='cuda')); torch.cuda.synchronize(); print('unchecked')\n")
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'CUDA_LAUNCH_BLOCKING': '1'})
    assert 'good run' in done.stdout and 'unchecked' not in done.stdout, done.stdout + done.stderr[-3000:]
    assert done.returncode != 0 and 'assert' in done.stderr.lower(), done.stderr[-3000:]
