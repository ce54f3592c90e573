"""The package split by imports (docs/CONTRACTS.md, Layout): the pure parts import no distributed code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
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


def project_imports() -> dict[str, set[str]]:
    """Module -> project modules it imports (module level and inside functions)."""
    modules = {}
    for package in ("trainer", "data_tools"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {owner(imported) for imported in imported_names(path)} - {None, name}
        graph[name] = {t for t in targets if t is not None}
    return graph


def test_no_import_circle_among_project_modules() -> None:
    graph = project_imports()
    # A package's __init__ re-exporting its modules is not a circle (trainer.data -> trainer.data.plan).
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not t.startswith(name + ".")}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(node) :], node]))
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, [*stack, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_sizes_and_no_exits_in_library_code() -> None:
    for path in sorted([*(ROOT / "trainer").rglob("*.py"), *(ROOT / "data_tools").rglob("*.py")]):
        text = path.read_text(encoding="utf-8")
        if path.name != "config.py":
            assert len(text.splitlines()) <= 600, path
        if path.name != "__main__.py":
            assert "raise SystemExit" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 100, f"{path}:{node.name}"  # type: ignore[operator]
