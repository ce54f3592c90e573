"""``python -m trainer train --help``: every config key with its Hugging Face aliases, type, default and
documentation, generated from the dataclass tree of ``trainer/config/schema.py`` (the string literal under each
field is its documentation). Torch-free, like the config."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import typing
from typing import Any

from trainer.config import ALIASES, TrainConfig

WIDTH = 100

USAGE = """usage: python -m trainer train [--config FILE.yaml] [--dry-run] [--KEY VALUE | --KEY=VALUE ...]

Settings resolve as: field defaults -> --config FILE.yaml (a mapping of the groups below) -> overrides,
as dotted keys (--optim.lr 1e-4) or Hugging Face Trainer names (--learning_rate 1e-4). A bare --flag
means true; lists are comma-separated; an unknown key is an error that names the closest one.

  --config FILE.yaml  the YAML config (e.g. configs/demo.yaml)
  --dry-run           print the resolved config, the data plan and a memory estimate; train nothing"""

MULTI_KEY_ALIASES: dict[str, tuple[str, str]] = {
    "dataset_args": (
        "DIR[train:N,test:M]",
        "data.train = DIR (DIR/train, and data.test = DIR/test, when DIR holds those folders); "
        "the optional [train:N,test:M] sets data.limit_train / data.limit_test",
    ),
    "bf16": ("BOOL", "deepspeed.precision = bf16 (false: fp32)"),
    "fp16": ("BOOL", "deepspeed.precision = fp16 (false: fp32)"),
}
"""The aliases that set several keys or translate their value (``ALIASES`` maps them to None):
metavar and effect."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal under the field in the class body, whitespace collapsed."""
    (class_def,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    assert isinstance(class_def, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(class_def.body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def type_name(hint: Any) -> str:
    """``int``, ``list[str]``, ``{linear,cosine}`` (a choice), ...: the type as the help shows it."""
    if typing.get_origin(hint) is typing.Literal:
        return "{" + ",".join(str(choice) or '""' for choice in typing.get_args(hint)) + "}"
    return str(hint) if typing.get_origin(hint) else hint.__name__


def format_default(value: Any) -> str:
    """A default as it is written on the command line (lists comma-separated, booleans lower case)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or '""'
    return '""' if value == "" else str(value)


def _aliases_by_key() -> dict[str, list[str]]:
    by_key: dict[str, list[str]] = {}
    for alias, target in ALIASES.items():
        if target is not None and alias != target:
            by_key.setdefault(target, []).append(alias)
    return by_key


def _wrap(text: str, indent: int) -> list[str]:
    pad = " " * indent
    return textwrap.wrap(text, WIDTH, initial_indent=pad, subsequent_indent=pad, break_on_hyphens=False)


def _section(group: Any, prefix: str, aliases: dict[str, list[str]]) -> list[str]:
    """One line per field (``--key TYPE (default: X); also --alias``) and its wrapped docstring."""
    lines: list[str] = []
    hints = typing.get_type_hints(type(group))
    docs = field_docs(type(group))
    for item in dataclasses.fields(group):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            continue
        key = prefix + item.name
        head = f"  --{key} {type_name(hint)} (default: {format_default(getattr(group, item.name))})"
        also = ", ".join(f"--{alias}" for alias in aliases.get(key, []))
        lines.append(f"{head}; also {also}" if also else head)
        lines += _wrap(docs[item.name], 6)
    return lines


def train_help() -> str:
    """The text of ``python -m trainer train --help``."""
    config = TrainConfig()
    aliases = _aliases_by_key()
    titles = field_docs(TrainConfig)
    lines = [USAGE, "", "top-level keys:", *_section(config, "", aliases)]
    for item in dataclasses.fields(config):
        group = getattr(config, item.name)
        if dataclasses.is_dataclass(group):
            lines += ["", f"{item.name}: {titles[item.name]}", *_section(group, f"{item.name}.", aliases)]
    lines += ["", "aliases that set several keys:"]
    for alias in [name for name, target in ALIASES.items() if target is None]:
        metavar, effect = MULTI_KEY_ALIASES[alias]
        lines += [f"  --{alias} {metavar}", *_wrap(effect, 6)]
    return "\n".join(lines)
