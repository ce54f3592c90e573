"""``python -m trainer train``: argv -> config -> a run (or a dry-run report); errors become exit codes.

python -m trainer train --config configs/demo.yaml [--optim.lr 1e-4 ...] [--dry-run]
deepspeed --num_gpus 8 --module trainer train --config ...
torchrun --nproc_per_node 8 -m trainer train --config ...
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch.distributed

from trainer.cli.train_help import train_help
from trainer.config import ConfigError, load_config
from trainer.run import checkpoint as ckpt
from trainer.run import distributed
from trainer.run.dry_run import dry_run_report
from trainer.run.loop import TrainingError, run_prepared
from trainer.run.preflight import prepare


def split_argv(argv: list[str]) -> tuple[str | None, bool, list[str]]:
    """Pull out --config, --dry-run and the launcher's --local_rank; the rest are overrides."""
    config_file: str | None = None
    dry_run = False
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--dry-run", "--dry_run"):
            dry_run = True
        elif arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file")
            config_file = argv[i + 1]
            i += 1
        elif arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg.startswith(("--local_rank", "--local-rank")):
            # deepspeed's launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
            if "=" not in arg:
                i += 1
        else:
            rest.append(arg)
        i += 1
    return config_file, dry_run, rest


def report_failure(text: str) -> None:
    """This rank's traceback, every line prefixed by the rank (the launchers interleave ranks' output)."""
    prefix = f"[rank {os.environ.get('RANK', '0')}] "
    sys.stderr.write("".join(prefix + line + "\n" for line in ("train: error", *text.rstrip().splitlines())))
    sys.stderr.flush()


def leave(code: int) -> int:
    """Exit now. With a live process group no teardown is attempted: a peer may be dead or inside
    another collective, so waiting for it could hang (docs/DESIGN.md §9); the launcher (deepspeed,
    torchrun) ends the other ranks when this one exits non-zero."""
    sys.stdout.flush()
    sys.stderr.flush()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        os._exit(code)
    return code


def main(argv: list[str]) -> int:
    """``python -m trainer train``: exit 0 on success (also after a signal/time-limit checkpoint)."""
    if any(a in ("-h", "--help") for a in argv):
        print(train_help())
        return 0
    try:
        config_file, dry_run, overrides = split_argv(argv)
        config = load_config(config_file, overrides)
        resume_dir, ds_config = prepare(config)
        if dry_run:
            print(dry_run_report(config, ds_config, distributed.env_world_size()))
            if resume_dir is not None:
                print(f"resume from: {resume_dir}")
            return 0
    except (ConfigError, ckpt.ResumeError, ValueError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    try:
        result = run_prepared(config, resume_dir, ds_config)
    except ckpt.RunLockError as err:  # before any process group
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:  # raised on every rank at the same step: one line from rank 0
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train: error: {err}", file=sys.stderr)
        return leave(1)
    except Exception:
        report_failure(traceback.format_exc())
        return leave(1)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {
            "step": result.step,
            "stopped_early": result.stopped_early,
            "last_checkpoint": result.last_checkpoint,
        }
        if result.losses:
            summary["last_loss"] = result.losses[-1]
        if result.eval:
            summary["eval"] = result.eval
        print("train: done " + json.dumps(summary))
    return 0
