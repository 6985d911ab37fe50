#!/usr/bin/env python3
"""Set up a development environment in .venv: torch (CPU build pinned when absent) and udaseg.

Usage: python3 scripts/bootstrap.py        (idempotent; a second run only checks)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
TORCH_PIN = "torch==2.13.0"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main() -> int:
    if not venv_python().exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    py = str(venv_python())
    has_torch = subprocess.run([py, "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        # An unpinned torch would pull the CUDA build (several GB); the pinned CPU build is local.
        run(py, "-m", "pip", "install", "--quiet", TORCH_PIN)
    stamp = VENV / ".udaseg-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        run(py, "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[dev]")
        stamp.write_text(digest)
    print("environment ready: .venv", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
