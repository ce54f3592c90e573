"""Loading a trained run back for inference (generate, evaluate, export): its model and its run settings.

:func:`load_run` loads any trained model (a checkpoint, an adapter on its base, or a merged folder) with
its run settings (:mod:`trainer.run.run_settings`); ``trainer.inference.generate.load_model`` is the model
alone. :func:`load_trained_model` rebuilds a checkpoint's model as the run built it, trained weights loaded.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig, load_config
from trainer.model import build_mdlm_model
from trainer.model.peft_tokens import quiet_peft_wrapping
from trainer.run.checkpoint import STATE_FILE, ResumeError, find_resume, load_trainable_state, read_state
from trainer.run.run_settings import SETTINGS_FILE, read_settings


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
