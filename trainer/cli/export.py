"""Export a training checkpoint as standard Hugging Face folders (no DeepSpeed needed).

    python -m trainer export --checkpoint RUN/checkpoints/step-00001000 --output OUT [--merge]

The command around :func:`trainer.inference.export.export` (what the folders hold: see there).
"""

from __future__ import annotations

import argparse
import sys

from trainer.inference.export import export
from trainer.inference.loading import _resolve_checkpoint


def main(argv: list[str]) -> int:
    """``python -m trainer export --checkpoint DIR --output OUT [--merge] [--base MODEL]``."""
    parser = argparse.ArgumentParser(prog="python -m trainer export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="a checkpoint directory, or a run directory (newest)"
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--merge", action="store_true", help="merge LoRA into a full model folder")
    parser.add_argument("--base", default=None, help="base model folder, if it moved since training")
    args = parser.parse_args(argv)
    try:
        ckpt_dir = _resolve_checkpoint(args.checkpoint)
        out = export(ckpt_dir, args.output, merge=args.merge, base=args.base)
    except ValueError as err:  # ResumeError, ConfigError, an unreadable mdlm_generation.json
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    print(f"export: wrote {out} from {ckpt_dir}{' (merged)' if args.merge else ''}")
    return 0
