"""Kill a training run with SIGKILL right after a checkpoint, resume it, and compare with a run never killed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def kill_and_resume_equals_uninterrupted(launch: list[str], args: list[str], out: Path, first: str,
                                         weights: str = 'model/model.safetensors', exact: bool = True) -> list[str]:
    """Run to the end; run again and SIGKILL it (its whole process group) as soon as checkpoint ``first`` is
    complete; resume that run with --resume latest. Returns the names of saved tensors that differ at all.
    Not ``exact`` (a streamed run: datasets does not save its shuffle buffer), only the updates up to the
    resumed checkpoint must be the same, and the run must end at the same update."""
    env = {**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1'}
    full = subprocess.run([*launch, *args, '--output-dir', str(out / 'full')], env=env, capture_output=True,
                          text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-5000:]
    killed = subprocess.Popen([*launch, *args, '--output-dir', str(out / 'part')], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (out / 'part' / 'checkpoints' / first).is_dir():
            assert killed.poll() is None, 'the run ended before its first checkpoint'
            time.sleep(0.005)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    assert not (out / 'part' / 'results.json').exists()  # killed mid-run, not after the end
    resumed = subprocess.run([*launch, *args, '--output-dir', str(out / 'part'), '--resume', 'latest'], env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert 'resumed from' in resumed.stdout
    a, b = (load_file(str(out / run / weights)) for run in ('full', 'part'))
    assert a.keys() == b.keys()
    history = [json.loads((out / run / 'results.json').read_text())['train_loss'] for run in ('full', 'part')]
    if not exact:
        resumed_at = int(resumed.stdout.split('resumed from')[1].split('at update')[1].split()[0])
        assert len(history[1]) == len(history[0]) and history[0][:resumed_at] == history[1][:resumed_at]
        return []
    assert history[0] == history[1]  # the loss of every update, the ones before the kill included
    return [key for key in a if not torch.equal(a[key], b[key])]
