"""Pre-fill the Hugging Face cache (HF_HOME, set by conftest.py) so that pretrained loads resolve offline."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def prefill_hf_cache(repo_id: str, files: dict[str, bytes], revision: str = 'main') -> Path:
    """Write ``files`` as the snapshot of model repo ``repo_id`` in the HF cache layout; returns the snapshot."""
    root = Path(os.environ['HF_HOME']) / 'hub' / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode() + b''.join(sorted(files.values()))).hexdigest()
    snapshot = root / 'snapshots' / commit
    (root / 'blobs').mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = root / 'blobs' / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        target = snapshot / name
        target.unlink(missing_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    (root / 'refs').mkdir(exist_ok=True)
    (root / 'refs' / revision).write_text(commit)
    return snapshot
