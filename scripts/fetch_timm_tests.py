"""Fetch timm's own model test suite (tests/ of the source distribution matching the installed timm) into
.timm-tests/, with a conftest.py that imports fdconv_zoo so the FDConv models are collected. The wheel does
not ship the tests; this is an install step (it uses pip), the conformance test itself runs offline."""
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import timm

ROOT = Path(__file__).resolve().parent.parent
CONFTEST = "import fdconv_zoo  # noqa: F401  registers the FDConv models before timm's tests collect them\n"


def main() -> int:
    target = ROOT / '.timm-tests' / f'timm-{timm.__version__}'
    if (target / 'tests' / 'test_models.py').is_file():
        print(f'timm {timm.__version__} tests already in {target}')
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', '-q',
                        '-d', tmp, f'timm=={timm.__version__}'], check=True)
        sdist = next(Path(tmp).glob('timm-*.tar.gz'))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.split('/')[1:2] == ['tests']]
            tar.extractall(staging, members=members, filter='data')
        (staging / sdist.name[:-len('.tar.gz')] / 'conftest.py').write_text(CONFTEST)
        (staging / sdist.name[:-len('.tar.gz')]).rename(target)  # appears whole or not at all
        shutil.rmtree(staging)
    print(f'timm {timm.__version__} tests in {target}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
