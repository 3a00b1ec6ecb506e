"""Shared test setup, done before huggingface_hub is imported (it reads these at import): an isolated HF
cache, and a Hub-protocol server on 127.0.0.1 (tests/hub_server.py) as HF_ENDPOINT. Nothing reaches the
network; test helpers in this folder are importable."""
import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer  # noqa: E402

_HUB = HubServer().start()
os.environ['HF_HOME'] = tempfile.mkdtemp(prefix='fdconv-zoo-hf-')
os.environ['HF_ENDPOINT'] = _HUB.url
os.environ['HF_HUB_DISABLE_XET'] = '1'
os.environ['HF_HUB_DISABLE_TELEMETRY'] = '1'
os.environ['HF_HUB_ETAG_TIMEOUT'] = '5'
os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ['HF_TOKEN'] = 'hf_test_token_never_printed'
for var in ('HF_HUB_OFFLINE', 'HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE'):
    os.environ.pop(var, None)


@pytest.fixture
def hub() -> HubServer:
    """The session's Hub-protocol server (its repos persist across tests; use unique repo names)."""
    return _HUB


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's process-wide state reset around a test that trains in this process (each train() call
    builds its own Accelerator)."""
    from accelerate.state import AcceleratorState, PartialState
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def rel_err(a, b) -> float:
    """Largest difference relative to the largest value of ``b`` (0 where both are all zeros), in float32."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@pytest.fixture(params=['fused', 'torch'])
def loops(request) -> str:
    """Run a float32 CPU test with the fused loops of ``native`` (the operators' CPU kernels) and again with the
    operators' PyTorch code (what CUDA and other devices run), through the public switch."""
    from fdconv_zoo.layers import native_kernels
    from fdconv_zoo.layers.ops import native
    if request.param == 'fused':
        assert native.library() is not None, "the fused CPU loops did not build on this machine"
    with native_kernels(request.param == 'fused'):
        yield request.param


def _devices() -> list:
    import torch
    params = [pytest.param(('cpu', torch.float32), id='cpu')]
    if torch.cuda.is_available():
        params += [pytest.param(('cuda', torch.float32), id='cuda'),
                   pytest.param(('cuda', torch.bfloat16), id='cuda-bf16')]
    return params


@pytest.fixture(params=_devices())
def device(request):
    """(device, dtype) to run on: the CPU, and where a GPU is present CUDA in float32 and bfloat16, so that a
    GPU machine checks the CUDA path against the CPU one."""
    return request.param
