"""The Python API: the MDLM model for a Hugging Face-style script, and training in this process.

    from trainer.api import load_mdlm_model, train

    model, processor = load_mdlm_model("Qwen/Qwen3-VL-2B-Instruct", freeze_vision=True, freeze_merger=True)
    result = train("configs/qwen3vl-2b-ko-doc.yaml", per_device_train_batch_size=4)
    result = train(conversations=rows, model_name_or_path="Qwen/Qwen3-VL-2B-Instruct", output_dir="runs/mine")

``train`` is ``python -m trainer train`` as a call: a plain process trains at world size 1; under
deepspeed or torchrun every rank calls it with the same arguments. It builds the model itself, on
every rank, from the config that its checkpoints record (export and generation rebuild the model
from that record), so it takes the model's options (``model_name_or_path``, ``freeze_vision``,
``freeze_merger``, ``lora``, ...) instead of a model object.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from data_tools.fileio import atomic_write_bytes, atomic_write_text
from data_tools.samples import SampleError
from data_tools.settings import BuildSettings
from data_tools.sources import load_image_bytes, normalise_row, row_source_id
from trainer.config import (
    ConfigError,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    build_config,
    check_paths,
    validate,
)
from trainer.model import MDLMModel, build_mdlm_model
from trainer.run.metrics_log import read_jsonl

CONVERSATIONS_DIR = "conversations"
"""Folder of ``output_dir`` where :func:`train` writes the rows passed as ``conversations``."""


class LoadedModel(NamedTuple):
    """What :func:`load_mdlm_model` returns (``model, processor = load_mdlm_model(...)``)."""

    model: MDLMModel
    """The assembled model (``trainer.model.MDLMModel``: ``.peft_model``, ``.engine_module``,
    ``.tokenizer``, ``.mask_token_id``, ``.parameter_counts()``)."""
    processor: Any
    """The model's Qwen3-VL processor; its tokenizer knows ``<|mask|>`` like the model's."""


def load_mdlm_model(
    name_or_path: str | os.PathLike[str],
    *,
    freeze_vision: bool = True,
    freeze_merger: bool = True,
    lora: bool | LoraConfig = True,
    dtype: torch.dtype | str = torch.bfloat16,
    attn_implementation: str = "auto",
    gradient_checkpointing: bool = False,
    train_embeddings: bool = True,
) -> LoadedModel:
    """Qwen3-VL from a model folder (or a cached hub id) as the MDLM model training builds: bidirectional
    attention, the ``<|mask|>`` token, LoRA on the language model (``lora=False``: the whole language
    model trains; a ``LoraConfig`` sets its shape), the vision tower and merger frozen unless
    ``freeze_vision`` / ``freeze_merger`` say otherwise. The keywords are ``ModelConfig``'s fields."""
    model_config = ModelConfig(
        name_or_path=str(name_or_path),
        attn_implementation=attn_implementation,
        gradient_checkpointing=gradient_checkpointing,
        freeze_vision=freeze_vision,
        freeze_merger=freeze_merger,
        train_embeddings=train_embeddings,
    )
    if isinstance(lora, bool):
        lora = LoraConfig(enabled=lora)
    elif not isinstance(lora, LoraConfig):
        raise ConfigError(
            f"lora={lora!r}: pass True, False or a trainer.config.LoraConfig(r=..., alpha=..., target_modules=[...])"
        )
    check_paths(TrainConfig(model=model_config))  # a missing folder fails here, in one line
    model = build_mdlm_model(model_config, lora, dtype=dtype)
    return LoadedModel(model, model.processor)  # its tokenizer is the model's (with <|mask|>)


@dataclass
class TrainOutput:
    """What :func:`train` returns (on every rank)."""

    output_dir: Path
    """The run folder: config.yaml, ds_config.json, metrics.jsonl, checkpoints/."""
    step: int
    """Optimizer steps done (including steps before a resume)."""
    last_checkpoint: Path | None
    """The newest committed checkpoint (``export --checkpoint`` / ``generate --checkpoint`` take it)."""
    metrics: dict[str, Any]
    """The last training record of metrics.jsonl (loss, lr, grad_norm, tokens_per_s, ...)."""
    eval: dict[str, float]
    """Metrics of the last held-out evaluation (empty without ``data.test``)."""
    losses: list[float] = field(default_factory=list)
    """Loss of every step run in this call."""
    stopped_early: bool = False
    """A signal or a time / step limit ended the run before the planned steps (resume it)."""
    config: TrainConfig = field(default_factory=TrainConfig)
    """The resolved config (with ``conversations``: ``data.train`` names the shards built from them)."""


def train(
    config: TrainConfig | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    conversations: Iterable[Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> TrainOutput:
    """Train in this process (module docstring) and return where the run is and how it ended.

    ``config``: a ``TrainConfig``, a YAML file or a mapping shaped like one (None: the defaults).
    ``overrides``: what ``python -m trainer train`` takes after ``--``: Hugging Face names
    (``per_device_train_batch_size=4``, ``learning_rate=1e-4``, ``lora=False``) or dotted keys
    (``**{"optim.lr": 1e-4}``). ``conversations``: rows in the README's messages format (OpenAI-style
    ``messages``; images as file paths, relative ones from the working directory, or PIL images), the
    training data instead of ``data.train`` / ``--dataset_args``: they are written under
    ``output_dir/conversations/`` and built into shards in ``data.cache_dir`` like a
    ``--dataset_args`` file (a second call with the same rows reuses them). A row the build cannot
    use is an error naming it. Raises ``ConfigError`` / ``ResumeError`` (``ValueError``s) on user errors.
    """
    from trainer.run.loop import run_prepared  # the loop (deepspeed) only when training
    from trainer.run.preflight import prepare

    if "model" in overrides:
        raise ConfigError(
            "train() builds the model from the config on every rank; pass the model's options instead of a "
            "model: model_name_or_path=..., freeze_vision=..., freeze_merger=..., lora=..."
        )
    cfg = build_config(config, overrides)
    if conversations is not None:
        use_conversations(cfg, conversations)
    validate(cfg)
    resume_dir, ds_config = prepare(cfg)
    if conversations is not None:
        check_no_rejects(cfg)
    result = run_prepared(cfg, resume_dir, ds_config)
    metrics_file = Path(cfg.output_dir) / "metrics.jsonl"
    records = read_jsonl(metrics_file) if metrics_file.is_file() else []
    steps = [r for r in records if r.get("kind") != "eval"]
    return TrainOutput(
        output_dir=Path(cfg.output_dir),
        step=result.step,
        last_checkpoint=Path(result.last_checkpoint) if result.last_checkpoint else None,
        metrics=steps[-1] if steps else {},
        eval=result.eval,
        losses=result.losses,
        stopped_early=result.stopped_early,
        config=cfg,
    )


def use_conversations(config: TrainConfig, conversations: Iterable[Mapping[str, Any]]) -> None:
    """Make ``conversations`` the run's data source (``data.source``, messages format)."""
    data = config.data
    set_keys = [key for key, value in (("data.train", data.train), ("data.test", data.test),
                                       ("data.source", data.source)) if value]  # fmt: skip
    if set_keys:
        raise ConfigError(
            f"conversations= is the training data: leave {' / '.join(set_keys)} unset (also --dataset_args), "
            "or pass no conversations"
        )
    data.source = str(write_conversations(conversations, Path(config.output_dir) / CONVERSATIONS_DIR))
    data.source_format = "messages"


def write_conversations(conversations: Iterable[Mapping[str, Any]], folder: Path) -> Path:
    """Check every row with the build's own parser, then write ``folder/conversations-HASH.jsonl`` and
    its images (``folder/images/HASH``, PIL images as PNG); returns the JSONL file.

    Files are named by their content and written once: the same rows give the same file, unchanged
    (size and modification time are the shard cache's key), so a second call or a resume finds the
    same shards. Global rank 0 writes; the other ranks wait for the file (written last)."""
    from trainer.run.distributed import env_rank

    writer = env_rank() == 0
    if isinstance(conversations, str | bytes | Mapping) or not isinstance(conversations, Iterable):
        raise ConfigError(
            f"conversations must be a list of rows like {{'messages': [...], 'images': [...]}}, "
            f"got {type(conversations).__name__}"
        )
    max_image_bytes = BuildSettings().max_image_bytes
    lines: list[str] = []
    for i, row in enumerate(conversations):
        where = f"conversations[{i}]"
        raw = dict(row) if isinstance(row, Mapping) else row
        try:
            # No image root: paths are the caller's own files, taken from the working directory.
            conv = normalise_row(raw, "messages", None, where, allow_outside_root=True)
            blobs = [load_image_bytes(ref, max_image_bytes) for ref in conv.images]
        except SampleError as err:
            name = row_source_id(raw, where)
            label = where if name == where else f"{where} (id {name!r})"
            raise ConfigError(
                f"{label}: {err} ({err.reason}); fix the row: OpenAI-style messages with an assistant answer, "
                "images as file paths or PIL images (README: Input formats)"
            ) from None
        names = [f"images/{hashlib.sha256(blob).hexdigest()[:32]}" for blob in blobs]
        # Written as they come, so that the images of all rows are never in memory at once.
        for name, blob in zip(names, blobs, strict=True):
            if writer and not (folder / name).is_file():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(folder / name, blob)
        row_json = {"id": conv.source_id, "messages": conv.messages, "images": names}
        lines.append(json.dumps(row_json, ensure_ascii=False) + "\n")
    if not lines:
        raise ConfigError("conversations is empty; pass at least one row")
    text = "".join(lines)
    path = folder / f"conversations-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if writer and not path.is_file():
        atomic_write_text(path, text)
    while not path.is_file():  # rank 0 fails on the same rows first; the launcher then ends this rank
        time.sleep(0.5)
    return path


def check_no_rejects(config: TrainConfig) -> None:
    """Refuse a run whose conversations lost rows in the shard build (too long, undecodable image, ...):
    the build skips such rows, but a caller who passed the list wants them all, or to hear which."""
    from data_tools.shards import REJECTS_NAME

    for directory in [*config.data.train, config.data.test]:
        path = Path(directory) / REJECTS_NAME if directory else None
        if path is None or not path.is_file():
            continue
        rejects = read_jsonl(path)
        if rejects:
            named = "; ".join(f"{r['source_id']}: {r['detail']} ({r['reason']})" for r in rejects[:3])
            more = f"; {len(rejects) - 3} more" if len(rejects) > 3 else ""
            raise ConfigError(
                f"{len(rejects)} of the conversations cannot be trained on: {named}{more} (listed in {path}); "
                "fix or drop these rows (or, for too_many_tokens, raise max_seq_length)"
            )
