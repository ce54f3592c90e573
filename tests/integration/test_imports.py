"""Importing the packages stays cheap: no DeepSpeed until the loop starts (a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_packages_does_not_import_deepspeed() -> None:
    code = "import sys, trainer, data_tools; assert 'deepspeed' not in sys.modules, 'deepspeed imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
