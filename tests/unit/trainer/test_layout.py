"""The package split by imports (docs/CONTRACTS.md, Layout): rooms that import only downwards, pure
rooms that import no distributed code, and a module map that names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DISTRIBUTED = ("deepspeed", "torch.distributed")
# Rooms that must stay pure (every module in them): the config and the model; also all of data_tools.
PURE_TRAINER_ROOMS = ("config", "model")
PURE_TRAINER_MODULES = ("inference/scoring.py",)
# The rooms of trainer/, lowest first; the rest of the package (cli/, api.py, demo.py, __main__.py,
# __init__.py) is the top and may import any room.
ROOMS = ("config", "model", "data", "run", "inference")
# (importer, imported) pairs allowed to import upwards, each with its reason. Keep it empty.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


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
    paths = [ROOT / "trainer" / name for name in PURE_TRAINER_MODULES]
    for room in PURE_TRAINER_ROOMS:
        paths += sorted((ROOT / "trainer" / room).rglob("*.py"))
    assert len(paths) > len(PURE_TRAINER_ROOMS) + len(PURE_TRAINER_MODULES)
    for path in paths:
        assert path.exists(), path
        assert not offending(path, DISTRIBUTED), path


def test_the_config_room_imports_no_torch() -> None:
    for path in sorted((ROOT / "trainer" / "config").rglob("*.py")):
        assert not offending(path, ("torch", *DISTRIBUTED)), path


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
        assert len(text.splitlines()) <= 600, path
        if path.name != "__main__.py":
            assert "raise SystemExit" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 100, f"{path}:{node.name}"  # type: ignore[operator]


def module_files() -> dict[str, Path]:
    """Dotted name -> file of every module of trainer and data_tools."""
    modules = {}
    for package in ("trainer", "data_tools"):
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return modules


def room_of(module: str) -> int:
    """The layer of a trainer module: its room's index in ROOMS; the top (cli, api, demo, ...) above all."""
    parts = module.split(".")
    return ROOMS.index(parts[1]) if len(parts) > 1 and parts[1] in ROOMS else len(ROOMS)


def trainer_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The trainer modules a file imports (module level and inside functions); ``from pkg import mod``
    counts as importing ``pkg.mod``."""

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(owner(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else owner(node.module))
    return {name for name in found if name is not None and name.split(".")[0] == "trainer"}


def test_imports_go_down_the_rooms() -> None:
    modules = module_files()
    assert all(name in modules for name in (f"trainer.{room}" for room in ROOMS))
    upward = []
    for name, path in modules.items():
        if name.split(".")[0] != "trainer":
            continue
        for target in sorted(trainer_imports(path, modules)):
            if room_of(target) > room_of(name) and (name, target) not in ALLOWED_UPWARD:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports up the rooms (config < model < data < run < inference < cli): " + ", ".join(
        upward
    )


def layout_map_files() -> set[str]:
    """The file paths the Layout map of docs/CONTRACTS.md names (its tree: folders end in '/')."""
    text = (ROOT / "docs" / "CONTRACTS.md").read_text(encoding="utf-8")
    block = text.split("## Layout\n```\n", 1)[1].split("```", 1)[0]
    files: set[str] = set()
    folders: list[tuple[int, str]] = []
    for line in block.splitlines():
        match = re.match(r"^( *)(\w+/|\w+\.py)(\s|$)", line)
        if not match or len(match.group(1)) > 8:  # deeper: a description's continuation line
            continue
        indent, entry = len(match.group(1)), match.group(2)
        folders = [(i, f) for i, f in folders if i < indent]
        if entry.endswith("/"):
            folders.append((indent, entry))
        elif folders:
            files.add("".join(f for _, f in folders) + entry)
    return files


def test_the_layout_map_names_every_module() -> None:
    named = layout_map_files()
    present = {p.relative_to(ROOT).as_posix() for p in module_files().values()}
    assert not present - named, f"modules missing from docs/CONTRACTS.md, Layout: {sorted(present - named)}"
    assert not named - present, f"docs/CONTRACTS.md, Layout names missing files: {sorted(named - present)}"


def test_generation_and_evaluation_do_not_import_the_export_module() -> None:
    modules = module_files()
    for name in (
        "trainer.inference.generate",
        "trainer.inference.evaluate",
        "trainer.cli.generate",
        "trainer.cli.evaluate",
    ):
        assert "trainer.inference.export" not in trainer_imports(modules[name], modules), name
