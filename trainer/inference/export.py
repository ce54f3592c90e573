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

The command is trainer/cli/export.py; loading a trained model back: :mod:`trainer.inference.loading`.
"""

from __future__ import annotations

from pathlib import Path

from trainer.inference.loading import checkpoint_settings, load_trained_model
from trainer.run.run_settings import write_settings


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
