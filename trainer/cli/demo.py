"""`python -m trainer demo`: the synthetic demo (trainer/demo.py: tiny Qwen3-VL -> shards -> training
-> evaluation before/after with controls -> report)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from trainer.demo import DemoConfig, run_demo


def main(argv: list[str]) -> int:
    """`python -m trainer demo [--output runs/demo] [--train-seconds S] ...`."""
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="python -m trainer demo",
        description="Synthetic demo: tiny Qwen3-VL -> shards -> DeepSpeed training on CPU (configs/demo.yaml) "
        "-> evaluation before/after with blank- and shuffled-image controls -> OUT/report.json and OUT/loss.png.",
    )
    parser.add_argument("--output", default=defaults.output, help="run directory (recreated)")
    parser.add_argument("--num-train", type=int, default=defaults.num_train, help="training samples")
    parser.add_argument("--num-test", type=int, default=defaults.num_test, help="held-out samples")
    parser.add_argument("--tasks", default=defaults.tasks, help="synthetic tasks (data_tools synth --tasks)")
    parser.add_argument(
        "--train-seconds", type=float, default=defaults.train_seconds, help="training budget (0 = none)"
    )
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="step budget")
    parser.add_argument("--nproc", type=int, default=defaults.nproc, help="CPU ranks")
    parser.add_argument("--recipe", default=defaults.recipe, help="training config file")
    parser.add_argument("--lora", action="store_true", help="train LoRA instead of the whole language model")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"lora.enabled": True} if args.lora else {}
    if args.lr is not None:
        overrides["optim.lr"] = args.lr
    config = DemoConfig(
        output=args.output, num_train=args.num_train, num_test=args.num_test, tasks=args.tasks,
        train_seconds=args.train_seconds, max_steps=args.max_steps, nproc=args.nproc, recipe=args.recipe,
        overrides=overrides,
    )  # fmt: skip
    if config.nproc < 1 or config.num_train < 1 or config.num_test < 2 or config.train_seconds < 0:
        print(
            "demo: error: --nproc, --num-train >= 1, --num-test >= 2 and --train-seconds >= 0",
            file=sys.stderr,
        )
        return 2
    try:
        run_demo(config)
    except (RuntimeError, ValueError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    return 0
