"""Export a training checkpoint as standard Hugging Face folders (no DeepSpeed needed).

    python -m trainer export --checkpoint RUN/checkpoints/step-00001000 --output OUT [--merge]

- LoRA runs: ``OUT`` is a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
  LoRA on the language model and the trained ``<|mask|>`` embedding row via PEFT trainable tokens)
  plus the tokenizer with ``<|mask|>``. Stock ``peft`` loads it onto stock ``transformers``
  Qwen3-VL; set ``config.text_config.is_causal = False`` on the base first (the model is a
  bidirectional MDLM).
- ``--merge`` (and every full-LM run): ``OUT`` is a full model folder with the adapters merged,
  ``text_config.is_causal = false``, the tokenizer and the base's image processor (whatever the base:
  folder or hub id); stock ``Qwen3VLForConditionalGeneration.from_pretrained(OUT)`` loads it.

Both carry ``mdlm_generation.json`` (:mod:`trainer.run.run_settings`: shift, image size, suggested
canvas), which ``generate`` and ``evaluate`` read. The weights come from ``trainable.safetensors``
(gathered at save time, also under ZeRO-3) and the model settings from the run config stored in
``trainer_state.json``.

:func:`load_run` loads any trained model back for inference (a checkpoint, an adapter on its base,
or a merged folder) with its run settings; ``trainer.inference.generate.load_model`` is the model alone.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig, load_config
from trainer.model import build_mdlm_model
from trainer.model.peft_tokens import quiet_peft_wrapping
from trainer.run.checkpoint import STATE_FILE, ResumeError, find_resume, load_trainable_state, read_state
from trainer.run.run_settings import SETTINGS_FILE, read_settings, write_settings


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
    # What the weights are needs the model, LoRA and diffusion sections; logging (report_to may name
    # a backend this machine lacks; older runs stored `logging.tensorboard`) never changes them.
    stored = {k: v for k, v in state["config"].items() if k != "logging"}
    config = load_config(None, _flatten(stored) | ({"model.name_or_path": base} if base else {}))
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


def checkpoint_settings(ckpt_dir: str | Path, config: TrainConfig) -> tuple[dict[str, Any], str]:
    """The checkpoint's run settings and where they came from: its ``mdlm_generation.json``, or for a
    checkpoint written before checkpoints carried one, its config's ``shift`` (the one setting that
    changes what the weights mean)."""
    settings = read_settings(ckpt_dir)
    if settings is None:
        return {"shift": bool(config.diffusion.shift)}, str(Path(ckpt_dir) / STATE_FILE)
    return settings, str(Path(ckpt_dir) / SETTINGS_FILE)


def export(ckpt_dir: str | Path, output: str | Path, merge: bool = False, base: str | None = None) -> Path:
    """Write the adapter folder (or with ``merge`` the full model folder) of a checkpoint; return it."""
    from trainer.model import set_text_causal
    from trainer.model.processor import load_processor

    model, config = load_trained_model(ckpt_dir, base)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    write_settings(out, checkpoint_settings(ckpt_dir, config)[0])
    if config.lora.enabled and not merge:
        model.tokenizer.save_pretrained(out)
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
    # The base's image (and video) processor in the stock layout, read through transformers, so a
    # hub-id base gives the same files as a local folder.
    processor = load_processor(config.model.name_or_path)
    for part in ("image_processor", "video_processor"):
        if getattr(processor, part, None) is not None:
            getattr(processor, part).save_pretrained(out)
    model.tokenizer.save_pretrained(out)  # with <|mask|> and the chat template
    return out


# ------------------------------------------------------------------------------------------------
# Loading a trained model back for inference (generate, evaluate)


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_run(
    model: str,
    *,
    adapter: str | None = None,
    checkpoint: str | None = None,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    device: torch.device | str | None = None,
) -> tuple[Any, dict[str, Any] | None, str | None]:
    """An `MDLMModel` for inference, in eval mode on `device`, and its run's settings
    (`trainer.run.run_settings`) with the file they came from (None, None when there are none).

    `model`: a Qwen3-VL folder or hub id (the base, or a merged export: its `mdlm_generation.json`).
    `adapter`: an exported PEFT adapter folder (LoRA + the trained `<|mask|>` row), merged into the
    base weights. `checkpoint`: a trainer checkpoint directory (or a run directory: its latest),
    rebuilt as the run built it with its trained weights. `dtype` "auto" = bfloat16 on GPU, float32
    on CPU.
    """
    from trainer.config import LoraConfig, ModelConfig
    from trainer.model import assemble_mdlm_model

    device = torch.device(device) if device is not None else default_device()
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"--dtype {dtype!r} is not a torch dtype: use auto, bfloat16, float16 or float32")
    if adapter is not None and checkpoint is not None:
        raise ValueError("give --adapter or --checkpoint, not both")
    if adapter is not None:
        _check_adapter_folder(adapter)
        from peft import PeftModel
        from transformers import Qwen3VLForConditionalGeneration

        from trainer.model.processor import load_processor

        processor = load_processor(model)
        base = Qwen3VLForConditionalGeneration.from_pretrained(model, dtype=torch_dtype)
        # Merging gives plain weights: one forward per step with no adapter indirection.
        with quiet_peft_wrapping():
            merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        mdlm = assemble_mdlm_model(
            merged,
            processor.tokenizer,
            ModelConfig(model, attn_implementation=attn_implementation),
            LoraConfig(enabled=False),
            image_processor=processor.image_processor,
        )
        settings, source = read_settings(adapter), str(Path(adapter) / SETTINGS_FILE)
    elif checkpoint is not None:
        mdlm, settings, source = _load_from_checkpoint(model, checkpoint, torch_dtype, attn_implementation)
    else:
        mdlm = build_mdlm_model(
            ModelConfig(model, attn_implementation=attn_implementation),
            LoraConfig(enabled=False),
            dtype=torch_dtype,
        )
        # A merged export carries its run's settings; a base folder or a hub id has none.
        settings = read_settings(model) if Path(model).is_dir() else None
        source = str(Path(model) / SETTINGS_FILE)
    mdlm.peft_model.to(device)
    mdlm.peft_model.eval()
    mdlm.peft_model.requires_grad_(False)
    return mdlm, settings, source if settings is not None else None


def _check_adapter_folder(adapter: str) -> None:
    """A one-line error unless `adapter` holds a PEFT adapter; a full model folder is named as such."""
    folder = Path(adapter)
    if (folder / "adapter_config.json").is_file():
        return
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if (folder / "config.json").is_file() and any((folder / name).is_file() for name in weights):
        raise ValueError(
            f"--adapter {adapter!r} holds a full model (config.json and weights), not an adapter: "
            f"pass it as --model {adapter} without --adapter"
        )
    raise ValueError(
        f"--adapter {adapter!r} holds no adapter (no adapter_config.json): pass the folder that "
        "`python -m trainer export` wrote"
    )


def _load_from_checkpoint(
    model: str, checkpoint: str, dtype: torch.dtype, attn_implementation: str
) -> tuple[Any, dict[str, Any], str]:
    """The model as the run built it (settings from the checkpoint's stored config), trained weights
    loaded (:func:`load_trained_model`; `model` overrides the base path), and its run settings."""
    # A run directory (or its checkpoints/) means its committed latest checkpoint: say which.
    resolved = _resolve_checkpoint(checkpoint)
    print(f"using checkpoint {resolved}", file=sys.stderr)
    mdlm, config = load_trained_model(resolved, base=model, dtype=dtype)
    if attn_implementation != mdlm.backend:
        mdlm.set_attention(attn_implementation)
    # A run that trained the vision tower (or merger) carries it inside the language model, which then
    # wants pixels at every forward; generation runs the same module, trained weights and all, once per
    # request instead (`MDLMModel.vision_features`) and reuses its features at every step.
    mdlm.engine_module.visual = None
    return mdlm, *checkpoint_settings(resolved, config)


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
