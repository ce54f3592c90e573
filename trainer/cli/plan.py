"""`python -m trainer plan`: the epoch plan (packs per rank and global step) from index.json alone, of a
training config (:mod:`trainer.run.dry_run`) or of ``--shards`` sets (:mod:`trainer.data.plan`)."""

from __future__ import annotations

import argparse
import json
import sys

from trainer.config import load_config
from trainer.data.dataset_cache import ensure_source_shards
from trainer.data.plan import Planner, PlanSpec, load_catalog, parse_shard_spec, plan_summary
from trainer.run.dry_run import config_plan, plan_lines

PLAN_USAGE = """usage: python -m trainer plan [--config FILE.yaml] [--KEY VALUE ...] [--world-size N] [--epoch E] [--json]
       python -m trainer plan --shards DIR[:WEIGHT] ... --max-tokens N [...]  (plan --shards --help: its options)

The epoch plan (packs per rank and global step) from index.json alone. The first form plans the run a
training config describes: --config and overrides exactly as `python -m trainer train` takes them
(python -m trainer train --help lists every key); --json prints every step's packs."""


def main(argv: list[str]) -> int:
    """``python -m trainer plan``: the plan of a training config, or of ``--shards`` sets."""
    if any(arg == "--shards" or arg.startswith("--shards=") for arg in argv):
        return shards_main(argv)
    if not argv or any(arg in ("-h", "--help") for arg in argv):
        print(PLAN_USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    parser = argparse.ArgumentParser(prog="python -m trainer plan", add_help=False, allow_abbrev=False)
    parser.add_argument("--config")
    parser.add_argument("--world-size", "--world_size", type=int, default=1)
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.world_size < 1 or args.epoch < 0:
            raise ValueError("--world-size must be >= 1 and --epoch >= 0")
        config = load_config(args.config, overrides)
        ensure_source_shards(config)
        catalog, plan = config_plan(config, args.world_size, args.epoch)
        lines = plan_lines(config, catalog, plan, args.world_size)
    except ValueError as err:  # ConfigError included
        print(f"plan: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        from trainer.data.plan import plan_summary

        print(json.dumps(plan_summary(plan, catalog, args.world_size)))
    else:
        tail = "dropped" if plan.drop_remainder else "carried out"
        head = f"epoch {plan.epoch}: {plan.num_carried_in} packs carried in, {len(plan.remainder)} {tail}"
        print("\n".join([head, *lines]))
    return 0


def shards_main(argv: list[str]) -> int:
    """`python -m trainer plan --shards ...`: print the epoch plan computed from index.json (no tar is read)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m trainer plan",
        description="Print the epoch plan (packs per rank and global step) computed from index.json.",
    )
    parser.add_argument(
        "--shards",
        action="append",
        required=True,
        metavar="DIR[:WEIGHT]",
        help="shard set directory, optionally with a mixing weight (repeat for several sets)",
    )
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--window", type=int, default=64, help="open packs in the best-fit window")
    parser.add_argument(
        "--drop-remainder", action="store_true", help="drop, not carry, the last partial step"
    )
    parser.add_argument("--no-packing", action="store_true", help="one sample per row")
    parser.add_argument("--json", action="store_true", help="print the full plan as JSON")
    args = parser.parse_args(argv)
    try:
        for name in ("world_size", "micro_batch", "grad_accum", "max_tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        specs = [parse_shard_spec(s, "--shards") for s in args.shards]
        catalog = load_catalog([d for d, _ in specs])
        spec = PlanSpec.of_steps(
            [w for _, w in specs],
            seed=args.seed,
            max_tokens=args.max_tokens,
            micro_batch=args.micro_batch,
            grad_accum=args.grad_accum,
            world_size=args.world_size,
            drop_remainder=args.drop_remainder,
            window=args.window,
            packing=not args.no_packing,
        )
        plan = Planner(catalog, spec).plan(args.epoch)
    except ValueError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    summary = plan_summary(plan, catalog, args.world_size)
    summary.update(
        micro_batch=args.micro_batch, grad_accum=args.grad_accum, seed=args.seed, max_tokens=args.max_tokens
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"epoch {plan.epoch}: {plan.num_steps} global steps x {plan.packs_per_step} packs "
            f"({args.world_size} ranks x {args.grad_accum} micro-batches x {args.micro_batch} rows); "
            f"{plan.num_samples} samples in {plan.num_own_packs} packs of <= {plan.max_tokens} tokens, "
            f"packing efficiency {plan.packing_efficiency:.3f}; {plan.num_carried_in} packs carried in, "
            f"{len(plan.remainder)} {'dropped' if plan.drop_remainder else 'carried out'}; "
            f"{plan.num_too_long} samples longer than max_tokens excluded"
        )
    return 0
