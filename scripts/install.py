"""Install angelptm into ./.venv, reusing a compatible torch where one is installed.

    python3 scripts/install.py [--extras test,bench]

The virtual environment sees the system's packages, so a torch >= 2.6 that is already installed
is used as it is (nothing is downloaded). Without one, a machine with no NVIDIA driver gets the
CPU build of torch instead of the multi-GB CUDA build that a plain `pip install torch` would
fetch; a machine with a driver gets the default (CUDA) build.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
MIN_TORCH = (2, 6)
# The CPU build we test against: a local wheel where one is provided, else PyTorch's CPU index.
CPU_TORCH = "torch==2.13.0+cpu"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def run(*cmd: str, check: bool = True) -> bool:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check).returncode == 0


def torch_version(python: Path) -> tuple[int, ...] | None:
    probe = "import torch, sys; sys.stdout.write(torch.__version__.split('+')[0])"
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return tuple(int(p) for p in out.stdout.split(".")[:2] if p.isdigit())


def install_torch(python: Path) -> None:
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    if shutil.which("nvidia-smi"):
        run(*pip, f"torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}")
        return
    # CPU only: the pinned CPU wheel from the configured indexes, then PyTorch's CPU index,
    # and only as a last resort the default index.
    if run(*pip, CPU_TORCH, check=False):
        return
    if run(*pip, "--timeout", "20", "--retries", "1", "--index-url", CPU_INDEX,
           f"torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}", check=False):
        return
    run(*pip, f"torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="", help="comma-separated extras, e.g. test or test,bench")
    args = parser.parse_args()
    if not venv_python().exists():
        try:
            venv.create(VENV, system_site_packages=True, with_pip=True)
        except Exception as e:  # e.g. Debian's python3 without the python3-venv package
            print(f"install: cannot create {VENV} ({e}); install Python's venv module "
                  "(Debian/Ubuntu: apt install python3-venv) and rerun", file=sys.stderr)
            return 2
    python = venv_python()
    version = torch_version(python)
    if version is None or version < MIN_TORCH:
        install_torch(python)
    target = f".[{args.extras}]" if args.extras else "."
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-e", target], cwd=ROOT, check=True)
    print(f"angelptm is installed in {VENV}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
