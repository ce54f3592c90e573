"""Export a training checkpoint as standard Hugging Face folders (no DeepSpeed needed).

    python -m trainer export --checkpoint RUN/checkpoints/step-00001000 --output OUT [--merge]

- LoRA runs: ``OUT`` is a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
  LoRA on the language model and the trained ``<|mask|>`` embedding row via PEFT trainable tokens)
  plus the tokenizer with ``<|mask|>``. Stock ``peft`` loads it onto stock ``transformers``
  Qwen3-VL; set ``config.text_config.is_causal = False`` on the base first (the model is a
  bidirectional MDLM).
- ``--merge`` (and every full-LM run): ``OUT`` is a full model folder with the adapters merged,
  ``text_config.is_causal = false``, the tokenizer and the image processor; stock
  ``Qwen3VLForConditionalGeneration.from_pretrained(OUT)`` loads it.

The weights come from ``trainable.safetensors`` (gathered at save time, also under ZeRO-3) and
the model settings from the run config stored in ``trainer_state.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import ResumeError, find_resume, load_trainable_state, read_state
from trainer.config import ConfigError, TrainConfig, load_config
from trainer.model import build_mdlm_model

# Files of the base model folder that a merged export carries over unchanged.
_PROCESSOR_FILES = (
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _resolve_checkpoint(path: str) -> Path:
    found = find_resume(path, path)
    assert found is not None  # a non-empty resume path either resolves or raises
    return found


def load_trained_model(
    ckpt_dir: str | Path, base: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, TrainConfig]:
    """The ``MDLMModel`` of a checkpoint: the base rebuilt as in training, trained weights loaded.

    ``base`` overrides the model path stored in the run config (a moved model folder).
    """
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    if state is None or "config" not in state:
        raise ResumeError(
            f"{str(ckpt_dir)!r} is not a committed checkpoint of this trainer (no trainer_state.json)"
        )
    config = load_config(None, _flatten(state["config"]) | ({"model.name_or_path": base} if base else {}))
    model = build_mdlm_model(replace(config.model, attn_implementation="sdpa"), config.lora, dtype=dtype)
    weights = load_trainable_state(ckpt_dir)
    params = dict(model.engine_module.named_parameters())
    unknown = sorted(set(weights) - set(params))
    untrained = sorted(n for n, p in params.items() if p.requires_grad and n not in weights)
    if unknown or untrained:
        raise ResumeError(
            f"{str(ckpt_dir)!r} does not match the model rebuilt from its config "
            f"(unknown {unknown[:3]}, missing {untrained[:3]}); export with the trainer version that wrote it"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))
    model.engine_module.eval()
    return model, config


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def export(ckpt_dir: str | Path, output: str | Path, merge: bool = False, base: str | None = None) -> Path:
    """Write the adapter folder (or with ``merge`` the full model folder) of a checkpoint; return it."""
    from trainer.model import set_text_causal

    model, config = load_trained_model(ckpt_dir, base)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model.tokenizer.save_pretrained(out)
    if config.lora.enabled and not merge:
        model.peft_model.save_pretrained(out)
        return out
    # LoRA, or the mask row of a full-LM run with frozen embeddings, lives in a PEFT wrapper.
    merged = (
        model.peft_model.merge_and_unload() if model.peft_model is not model.base_model else model.peft_model
    )
    set_text_causal(merged, False)
    # Stock attention names: our packed backends are registered only inside this trainer.
    merged.set_attn_implementation("sdpa")
    merged.save_pretrained(out)
    base_dir = Path(base or config.model.name_or_path)
    for name in _PROCESSOR_FILES:
        if (base_dir / name).is_file() and not (out / name).exists():
            shutil.copy2(base_dir / name, out / name)
    return out


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
    except (ResumeError, ConfigError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    print(f"export: wrote {out} from {ckpt_dir}{' (merged)' if args.merge else ''}")
    return 0
