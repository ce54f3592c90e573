"""`python -m trainer make-tiny OUT_DIR`: write a tiny random Qwen3-VL model folder (trainer.model.tiny)."""

from __future__ import annotations

import argparse
import json

from trainer.model.tiny import make_tiny


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer make-tiny",
        description="Write a tiny random Qwen3-VL model folder with the real Qwen tokenizer (offline).",
    )
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--hidden-size", type=int, default=64, help="text hidden size")
    parser.add_argument("--num-layers", type=int, default=2, help="text decoder layers")
    parser.add_argument("--num-heads", type=int, default=4, help="text attention heads")
    parser.add_argument("--num-kv-heads", type=int, default=2, help="text key/value heads")
    parser.add_argument("--intermediate-size", type=int, default=128, help="text MLP width")
    parser.add_argument("--vision-hidden-size", type=int, default=32, help="vision hidden size")
    parser.add_argument("--vision-depth", type=int, default=2, help="vision blocks")
    parser.add_argument("--vision-heads", type=int, default=2, help="vision attention heads")
    parser.add_argument(
        "--initializer-range", type=float, default=0.02, help="std of the random text weights"
    )
    parser.add_argument("--min-pixels", type=int, default=None, help="image resize floor (default 65536)")
    parser.add_argument("--max-pixels", type=int, default=None, help="image resize cap (default 16777216)")
    args = parser.parse_args(argv)
    try:
        out = make_tiny(
            args.out_dir,
            seed=args.seed,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads,
            intermediate_size=args.intermediate_size,
            vision_hidden_size=args.vision_hidden_size,
            vision_depth=args.vision_depth,
            vision_heads=args.vision_heads,
            initializer_range=args.initializer_range,
        )
    except ValueError as err:
        parser.error(str(err))
    config = json.loads((out / "config.json").read_text())
    print(
        f"wrote {out} (text hidden {config['text_config']['hidden_size']}, "
        f"{config['text_config']['num_hidden_layers']} layers)"
    )
    return 0
