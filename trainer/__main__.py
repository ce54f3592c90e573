"""`python -m trainer COMMAND ...`: each command lives in its own module, imported on demand."""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny": (
        "trainer.cli.make_tiny",
        "Write a tiny random Qwen3-VL model folder with the real Qwen tokenizer",
    ),
    "plan": (
        "trainer.cli.plan",
        "Print the epoch plan (packs per rank and step) of a config or shard sets",
    ),
    "train": ("trainer.cli.train", "Train with DeepSpeed (python, deepspeed or torchrun launchers)"),
    "export": ("trainer.cli.export", "Export a checkpoint as a PEFT adapter folder, optionally merged"),
    "generate": ("trainer.cli.generate", "Generate answers with MDLM sampling"),
    "evaluate": ("trainer.cli.evaluate", "Evaluate on held-out shards: NELBO and generation metrics"),
    "demo": ("trainer.cli.demo", "Synthetic demo: build shards, train, evaluate, report"),
}


def usage() -> str:
    lines = [
        "usage: python -m trainer COMMAND [options]   (installed as qwen3vl-mdlm COMMAND)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "python -m trainer COMMAND --help: the command's options (train --help: every config key)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher puts --local_rank=N right after `-m trainer`, before the command; the
    # rank is read from the LOCAL_RANK environment variable instead.
    argv = [arg for arg in argv if not arg.startswith("--local_rank")]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
