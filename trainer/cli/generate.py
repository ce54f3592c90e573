"""`python -m trainer generate`: answer questions about images with MDLM sampling
(:func:`trainer.inference.generate.generate`), and the model and decoding flags it shares with ``evaluate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainer.inference.generate import (
    RUN_FLAG_DEFAULTS,
    GenerationConfig,
    build_prompt,
    decode_generations,
    generate,
)
from trainer.model.tokens import SpecialTokens
from trainer.run.run_settings import resolve_flags, set_image_size


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model` and one of `--adapter` / `--checkpoint`: what `load_model` takes (generate, evaluate)."""
    parser.add_argument(
        "--model", required=True, help="Qwen3-VL folder or hub id (the base, or a merged export)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--adapter", help="exported PEFT adapter folder (python -m trainer export)")
    source.add_argument(
        "--checkpoint", help="trainer checkpoint (OUTPUT_DIR/checkpoints/step-N, or OUTPUT_DIR: its latest)"
    )


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding and image-size flags of `generate` and `evaluate`. Those a run's
    `mdlm_generation.json` holds default to None: the run's value, else the built-in default
    (:func:`resolve_run_flags`); read back with :func:`generation_config_from_args`."""
    defaults = GenerationConfig()
    run = "default: the run's, else"
    parser.add_argument("--max-new-tokens", type=int, help=f"answer canvas ({run} {defaults.max_new_tokens})")
    parser.add_argument("--steps", type=int, help="denoising steps in total (default: --max-new-tokens)")
    parser.add_argument("--block-size", type=int, help=f"semi-AR block length ({run} {defaults.block_size})")
    parser.add_argument(
        "--remasking", choices=["low_confidence", "random"], default=defaults.remasking, help="what to commit"
    )
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--no-stop-at-eos", action="store_true", help="fill the whole canvas")
    parser.add_argument(
        "--shift", action=argparse.BooleanOptionalAction, help=f"diffusion.shift decoding ({run} off)"
    )
    parser.add_argument("--min-pixels", type=int, help=f"image resize floor ({run} the processor's)")
    parser.add_argument("--max-pixels", type=int, help=f"image resize cap ({run} the processor's)")


def resolve_run_flags(args: argparse.Namespace, settings: dict[str, Any] | None, source: str | None) -> None:
    """Fill the unset flags from the run's settings, else :data:`RUN_FLAG_DEFAULTS`; print the line
    that says which values came from the run."""
    print(resolve_flags(args, settings, source, RUN_FLAG_DEFAULTS), file=sys.stderr)


def generation_config_from_args(args: argparse.Namespace) -> GenerationConfig:
    """The validated :class:`GenerationConfig` of parsed (and resolved) `add_generation_arguments` flags."""
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        steps=args.max_new_tokens if args.steps is None else args.steps,
        block_size=args.block_size,
        remasking=args.remasking,
        temperature=args.temperature,
        seed=args.seed,
        stop_at_eos=not args.no_stop_at_eos,
    )
    config.validate()
    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer generate",
        description="Answer questions about images with MDLM sampling (semi-autoregressive blocks, "
        "low-confidence or random remasking).",
    )
    add_model_arguments(parser)
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--prompt", action="append", default=[], help="question (repeat: one batch)")
    parser.add_argument(
        "--prompts-file", help='JSON lines {"prompt": str, "images": [path, ...]}: one request per line'
    )
    add_generation_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    parser.add_argument("--attn-implementation", default="sdpa", help="sdpa | eager | flex | flash")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument("--json", action="store_true", help="print JSON with tokens and commit steps")
    return parser


def _requests(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    requests = [(prompt, list(args.image)) for prompt in args.prompt]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts-file {str(path)!r} does not exist")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                requests.append((str(item["prompt"]), [str(p) for p in item.get("images", [])]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f'--prompts-file {str(path)!r} line {number}: expected {{"prompt": ..., "images": [...]}} ({err})'
                ) from err
    if not requests:
        raise ValueError("nothing to answer: pass --prompt TEXT (with --image FILE) or --prompts-file")
    return requests


def _open_image(path: str) -> Any:
    """Decode `--image` like the shard build does: format allowlist, pixel cap, modes by their range."""
    from data_tools.images import ImageError, open_image_safely

    if not Path(path).is_file():
        raise ValueError(f"--image {path!r} does not exist")
    try:
        return open_image_safely(Path(path).read_bytes())
    except ImageError as err:
        raise ValueError(f"--image {path!r} is not a readable image ({err.reason}: {err})") from err


def main(argv: list[str]) -> int:
    """`python -m trainer generate`: print the answers (or JSON with `--json`)."""
    args = _parser().parse_args(argv)
    try:
        requests = _requests(args)
        images = {path: _open_image(path) for _, paths in requests for path in paths}
        from trainer.inference.loading import load_run
        from trainer.model.processor import load_processor

        model, settings, source = load_run(
            args.model, adapter=args.adapter, checkpoint=args.checkpoint, dtype=args.dtype,
            attn_implementation=args.attn_implementation, device=args.device,
        )  # fmt: skip
        resolve_run_flags(args, settings, source)
        config = generation_config_from_args(args)
        processor = load_processor(args.model)
        set_image_size(processor, args.min_pixels, args.max_pixels)
        prompts = [build_prompt(processor, text, [images[p] for p in paths]) for text, paths in requests]
        tokens = SpecialTokens.from_tokenizer(model.tokenizer, model.config)
        generations = generate(model, prompts, config, tokens, shift=args.shift)
    except (ValueError, OSError) as err:
        # OSError: transformers' "not a model folder / not found on the hub".
        print(f"error: {err}", file=sys.stderr)
        return 2
    decode_generations(model.tokenizer, generations)
    if not args.json:
        for generation in generations:
            print(generation.text)
        return 0
    report = {
        "config": asdict(config),
        "shift": args.shift,
        "image_size": {"min_pixels": args.min_pixels, "max_pixels": args.max_pixels},
        "generations": [
            {
                "prompt": text,
                "images": paths,
                "image_grid_thw": prompt.image_grid_thw.tolist() if prompt.image_grid_thw is not None else [],
                "text": generation.text,
                "finished": generation.finished,
                "num_steps": generation.num_steps,
                "eos_step": generation.eos_step,
                "tokens": [
                    {"id": token_id, "token": model.tokenizer.convert_ids_to_tokens(token_id), "step": step}
                    for token_id, step in zip(generation.token_ids, generation.commit_steps, strict=True)
                ],
            }
            for (text, paths), prompt, generation in zip(requests, prompts, generations, strict=True)
        ],
    }
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0
