"""`python -m data_tools COMMAND ...`: each command lives in its own module, imported on demand.

The one place where a user error ends the process: library code raises `BuildError`, and this
entry point prints it as one line (`data_tools: error: ...`) on stderr and returns exit status 1.
"""

from __future__ import annotations

import importlib
import sys

from data_tools.errors import BuildError

# name -> (module, entry function, help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "build": (
        "data_tools.build",
        "main",
        "Build pre-tokenised WebDataset shards + index.json from a dataset",
    ),
    "verify": (
        "data_tools.report",
        "verify_main",
        "Check every sample of a shard set against its index.json",
    ),
    "inspect": ("data_tools.report", "main", "Summary table and token-length histogram of a shard set"),
    "synth": (
        "data_tools.synth",
        "main",
        "Render the synthetic demo dataset (shapes, colours, labels) as shards",
    ),
    "upgrade-index": (
        "data_tools.report",
        "upgrade_main",
        "Rewrite an older shard set's index.json in place (tars kept)",
    ),
}


def usage() -> str:
    """The command list."""
    lines = [
        "usage: python -m data_tools COMMAND [options]   (installed as qwen3vl-mdlm-data COMMAND)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<13} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the command's entry function, `data_tools.<module>.<entry>(argv)`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, entry_name, _ = COMMANDS[command]
    entry = getattr(importlib.import_module(module_name), entry_name)
    try:
        return int(entry(rest) or 0)
    except BuildError as err:
        print(f"data_tools: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
