"""The package split by imports (DESIGN.md, Layout): the pure parts import no distributed code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTED = ("deepspeed", "torch.distributed")
# Modules that must stay pure: the math, the model assembly and all of data_tools.
PURE_TRAINER_MODULES = ("assets", "attention", "diffusion", "model", "positions", "metrics")


def imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offending(path: Path, banned: tuple[str, ...]) -> list[str]:
    return sorted(n for n in imported_names(path) if any(n == b or n.startswith(b + ".") for b in banned))


def test_data_tools_imports_no_distributed_and_no_trainer() -> None:
    files = sorted((ROOT / "data_tools").rglob("*.py"))
    assert files
    for path in files:
        assert not offending(path, (*DISTRIBUTED, "trainer")), path


def test_pure_trainer_modules_import_no_distributed() -> None:
    for name in PURE_TRAINER_MODULES:
        path = ROOT / "trainer" / f"{name}.py"
        if path.exists():
            assert not offending(path, DISTRIBUTED), path


def test_importing_the_packages_does_not_import_deepspeed() -> None:
    code = "import sys, trainer, data_tools; assert 'deepspeed' not in sys.modules, 'deepspeed imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
