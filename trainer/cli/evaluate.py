"""`python -m trainer evaluate`: generation metrics (exact match / ANLS / relaxed accuracy) and NELBO
on a held-out shard set (:func:`trainer.inference.evaluate.evaluate_shards`); a JSON report and a short table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.cli.generate import (
    add_generation_arguments,
    add_model_arguments,
    generation_config_from_args,
    resolve_run_flags,
)
from trainer.inference.evaluate import IMAGE_MODES, evaluate_shards, format_table, note_image_size
from trainer.run.run_settings import set_image_size


def main(argv: list[str]) -> int:
    """`python -m trainer evaluate`: generation metrics + NELBO on held-out shards; JSON + table."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer evaluate",
        description="Evaluate a model on held-out shards: generation metrics (exact match, ANLS, relaxed "
        "accuracy) and the NELBO per answer token; per-task accuracy and chance for synthetic shards.",
    )
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="held-out shard set (a DIR with test/ uses DIR/test)")
    parser.add_argument("--limit", type=int, default=0, help="first N samples (0 = all)")
    parser.add_argument(
        "--metric",
        default="auto",
        help="auto (as the shard set records) | exact_match | anls | relaxed_accuracy",
    )
    parser.add_argument(
        "--image-mode", choices=IMAGE_MODES, default="normal", help="controls: blank, shuffled"
    )
    parser.add_argument("--no-nelbo", action="store_true", help="skip the NELBO pass")
    add_generation_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per packed NELBO row")
    parser.add_argument("--seed", type=int, default=0, help="mask / shuffle seed")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument("--output", help="write the JSON report here (predictions beside it as .jsonl)")
    args = parser.parse_args(argv)
    try:
        data = Path(args.data)
        if (data / "test" / "index.json").is_file() and not (data / "index.json").is_file():
            data = data / "test"
        if not (data / "index.json").is_file():
            raise ValueError(f"--data {args.data!r} has no index.json: pass a shard set built by data_tools")
        from trainer.inference.loading import load_run
        from trainer.model.processor import load_processor

        model, settings, source = load_run(
            args.model, adapter=args.adapter, checkpoint=args.checkpoint, dtype=args.dtype, device=args.device
        )
        resolve_run_flags(args, settings, source)
        generation = generation_config_from_args(args)
        processor = load_processor(args.model)
        set_image_size(processor, args.min_pixels, args.max_pixels)
        note_image_size(data, args.min_pixels, args.max_pixels)
        report = evaluate_shards(
            model,
            data,
            processor,
            generation=generation,
            metric=args.metric,
            limit=args.limit,
            image_mode=args.image_mode,
            with_nelbo=not args.no_nelbo,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            shift=args.shift,
            seed=args.seed,
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    predictions = report.pop("predictions")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        lines = [json.dumps(p, ensure_ascii=False) for p in predictions]
        out.with_suffix(".predictions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "per_task"}, indent=2, ensure_ascii=False))
    print(format_table({args.image_mode: report}))
    return 0
