"""The one typed configuration tree of a training run.

Resolution order: dataclass defaults -> ``--config FILE.yaml`` -> dotted CLI overrides
(``--optim.lr 1e-4``) and Hugging Face ``Trainer``-style flat aliases (``--learning_rate 1e-4``).
Unknown keys are rejected with the closest valid name. The DeepSpeed JSON is derived from a template
in ``ds_configs/`` (or the user's file) with batch sizes, gradient accumulation, precision and clipping
filled in from this tree; a value in the JSON that contradicts the tree is an error.

Pure Python: importing this module imports neither torch nor deepspeed (the dry run and the error
paths must answer before any process group starts).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import importlib.resources
import importlib.util
import json
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_tools.fileio import atomic_write_text
from trainer.config.attention_names import CONFIG_CHOICES

DEFAULT_T_GRID: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
"""Midpoints of 5 equal bins of (0, 1): the NELBO quadrature (``eval.t_grid``, ``evaluate --t-grid``)."""
DEFAULT_ACCURACY_T: tuple[float, ...] = (0.15, 0.5, 1.0)
"""Times at which masked-token accuracy is reported (``eval.accuracy_t``)."""

# The templates are package data of `ds_configs` (a plain file path in a checkout or any install).
DS_TEMPLATE_DIR = Path(str(importlib.resources.files("ds_configs")))
DS_TEMPLATES = ("zero2", "zero3", "zero3_offload")


@dataclass
class ModelConfig:
    name_or_path: str = "Qwen/Qwen3-VL-2B-Instruct"
    """Hugging Face model folder (or hub id available in the local cache) of a Qwen3-VL checkpoint."""
    attn_implementation: str = "auto"
    """Packed bidirectional attention backend: auto | flash | flex | sdpa (auto = best installed)."""
    gradient_checkpointing: bool = False
    """Recompute language-model activations in backward to save memory."""
    compile: bool = False
    """``torch.compile`` (inductor) each language-model decoder layer on its own (regional
    compilation; ZeRO-0/1/2, not ZeRO-3). It compiles at the first step, once more at the first new
    packed length (the length then stays dynamic) and for the held-out evaluation's no-grad forwards;
    the ``export``, ``generate`` and ``evaluate`` commands run eager."""
    freeze_vision: bool = True
    """Keep the vision tower frozen and outside the DeepSpeed engine (docs/DESIGN.md §2)."""
    freeze_merger: bool = True
    """Keep the vision merger (and deepstack mergers) frozen."""
    train_embeddings: bool = True
    """With ``lora.enabled`` false: also train the [vocab, hidden] token embedding and LM head. False
    keeps them frozen but for the ``<|mask|>`` row: far less optimizer state and gradient traffic."""


@dataclass
class LoraConfig:
    enabled: bool = True
    """Train LoRA adapters on the language model; False trains the whole language model."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA alpha (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the language-model linear layers that get adapters."""


@dataclass
class DiffusionConfig:
    schedule: str = "linear"
    """Masking schedule alpha(t): linear (p_mask = t) or cosine."""
    eps: float = 1e-3
    """Smallest t drawn, t in [eps, 1)."""
    stratified_t: bool = True
    """Stratify t across the sub-sequences of a micro-batch (lower-variance estimator)."""
    shift: bool = False
    """Position i-1 predicts token i (Dream / DiffuLLaMA style AR adaptation)."""
    normalizer: str = "answer_tokens"
    """Loss normaliser: answer_tokens, the global count across micro-batches and ranks (the only one:
    the gradient then does not depend on packing or sharding; docs/DESIGN.md §3)."""
    pad_weight: float = 1.0
    """What the pad targets after one answer (data_tools build --answer-padding) weigh together in the
    loss and in its normaliser, in answer tokens: each of a sample's P pads weighs min(1, pad_weight /
    P), so a short answer keeps its share of the gradient however long its pad tail (docs/DESIGN.md
    §10). 0 = no cap: every pad weighs one answer token (the weighting before 2026-12-07)."""
    mask_prompt_loss: bool = True
    """Only answer tokens are masked and scored; prompt/image/template tokens never are (MDLM SFT)."""
    ce_chunk_size: int = 1024
    """Masked positions per LM-head chunk when computing the cross-entropy."""


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training shard sets: directories holding index.json and shard-*.tar, each optionally DIR:WEIGHT."""
    test: str = ""
    """Held-out shard set for evaluation ("" = no evaluation)."""
    limit_train: int = 0
    """Use only the first N training samples (0 = all); with ``source``, build only its first N rows."""
    limit_test: int = 0
    """Use only the first N held-out samples (0 = all); with ``source``, build only M held-out rows."""
    max_tokens: int = 2048
    """Tokens per packed row (longer samples are skipped and counted)."""
    packing: bool = True
    """Pack several samples into one row with block-diagonal attention."""
    max_skip_fraction: float = 0.001
    """Stop the run (non-zero exit, a table of reasons and shards) once the samples skipped as
    corrupt, mismatched or out of vocabulary exceed this fraction of the samples read (all ranks)."""
    drop_remainder: bool = False
    """Drop the packs left over at the end of an epoch (fewer than one global step) instead of
    carrying them into the next epoch's stream."""
    num_workers: int = 2
    """DataLoader worker processes per rank (reading, image decoding, collation; 0 = in the main process)."""
    source: str = ""
    """A raw dataset to build shards from once (hub name, save_to_disk folder, parquet/arrow files,
    JSON/JSONL; what ``--dataset_args SOURCE[train:N,test:M]`` sets): global rank 0 builds them into
    ``cache_dir`` (the other ranks wait), ``train``/``test`` then point there, and a later run with the
    same source, slice, tokenizer and build settings reuses them. The held-out set is the source's
    ``test`` (or ``validation``) split, else the rows after the training rows."""
    source_format: str = ""
    """Row layout of ``source``: messages | llava | kodoc ("" = detected from the first rows)."""
    cache_dir: str = ""
    """Where shards built from ``source`` go ("" = ``shard-cache/`` beside ``output_dir``; it must be
    on a filesystem every node sees)."""


@dataclass
class OptimConfig:
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 = no clipping)."""


@dataclass
class ScheduleConfig:
    epochs: float = 3.0
    """Training epochs (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to train (0 = epochs * steps per epoch)."""
    micro_batch_size: int = 4
    """Packed rows per rank per micro-batch (DeepSpeed train_micro_batch_size_per_gpu)."""
    grad_accum_steps: int = 2
    """Micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps)."""
    global_batch_size: int = 0
    """Rows per optimizer step over all ranks; 0 = micro_batch_size * grad_accum_steps * world size."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warmup: cosine | linear | constant."""
    warmup_ratio: float = 0.03
    """Warmup as a fraction of the total steps."""
    warmup_steps: int = 0
    """Warmup steps (overrides warmup_ratio when > 0)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak (cosine / linear)."""
    time_limit_s: float = 0.0
    """Wall-clock limit; when reached, all ranks checkpoint and exit 0 (0 = none)."""
    exit_after_steps: int = 0
    """Checkpoint and exit 0 after this many optimizer steps of this launch, the schedule still
    spanning the whole run (Megatron's ``--exit-interval``; for chains of short jobs). 0 = never."""
    max_consecutive_skips: int = 5
    """Stop with an error after this many non-finite steps in a row."""


@dataclass
class CheckpointConfig:
    save_every: int = 0
    """Save every N optimizer steps (0 = only at the end and on stop signals)."""
    keep_last: int = 2
    """Keep the newest N committed checkpoints (0 = keep all)."""
    resume: str = ""
    """"" = start fresh, "auto" = newest committed checkpoint in output_dir (error if none), or a path."""
    save_at_end: bool = True
    """Save a checkpoint when training finishes."""
    overwrite_output_dir: bool = False
    """Start fresh in an output_dir that holds another run's checkpoints, removing them and its
    metrics first (HF ``--overwrite_output_dir``); without it such a start is refused."""
    allow_config_change: bool = False
    """Resume even though the config changes what the run computes (data, seed, model, LoRA shape,
    max tokens); the differences are logged."""


REPORT_TO_CHOICES: tuple[str, ...] = ("tensorboard", "wandb")
"""Where metrics can go besides metrics.jsonl (``logging.report_to``; also ``all`` and ``none``)."""


@dataclass
class LoggingConfig:
    log_every: int = 1
    """Write a metrics.jsonl line (and the report_to scalars) every N steps."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides metrics.jsonl: tensorboard (output_dir/tensorboard), wandb (needs
    pip install -e '.[wandb]'; WANDB_MODE=offline works without network), a comma-separated list of
    them, all (every installed one) or none."""
    run_name: str = ""
    """Run name shown by wandb ("" = the name of output_dir)."""
    wandb_project: str = ""
    """wandb project ("" = the WANDB_PROJECT environment variable, else wandb's default)."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate on data.test every N steps (0 = only at the end)."""
    at_end: bool = True
    """Evaluate once more when training finishes (when data.test is set)."""
    t_grid: list[float] = field(default_factory=lambda: list(DEFAULT_T_GRID))
    """Fixed t values of the NELBO estimate (fixed masks, comparable across runs)."""
    accuracy_t: list[float] = field(default_factory=lambda: list(DEFAULT_ACCURACY_T))
    """t values at which masked-token accuracy is reported."""
    max_samples: int = 256
    """Held-out samples used per evaluation (0 = all)."""


@dataclass
class DeepSpeedConfig:
    config: str = "zero2"
    """DeepSpeed template: zero2 | zero3 | zero3_offload (from ds_configs/) or a path to a JSON file."""
    precision: str = "auto"
    """auto | bf16 | fp16 | fp32 (auto = bf16 on a GPU that supports it, fp32 on CPU)."""
    tf32: bool = True
    """Allow TF32 matmuls on Ampere and newer GPUs."""


@dataclass
class DistributedConfig:
    timeout_s: float = 600.0
    """Collective timeout: a rank that waits this long for a dead or stuck peer fails with an error
    naming the collective and the step, instead of hanging (the launcher then ends the job)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Run directory: resolved config, DeepSpeed JSON, metrics.jsonl, TensorBoard, checkpoints."""
    seed: int = 42
    """Seed of the data order, the diffusion noise and the initialisation of new weights."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model assembly."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """MDLM objective."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards and packing."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Batch sizes, length of training, learning-rate schedule, limits."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during training."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed template and precision."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Process-group settings."""


# Hugging Face Trainer-style flat names -> dotted keys. Entries mapped to None need a custom
# translation (see _expand_alias).
ALIASES: dict[str, str | None] = {
    "model_name_or_path": "model.name_or_path",
    "lora": "lora.enabled",
    "r": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.target_modules",
    "freeze_vision": "model.freeze_vision",
    "freeze_merger": "model.freeze_merger",
    "dataset_args": None,
    "mask_prompt_loss": "diffusion.mask_prompt_loss",
    "max_seq_length": "data.max_tokens",
    "output_dir": "output_dir",
    "num_train_epochs": "schedule.epochs",
    "per_device_train_batch_size": "schedule.micro_batch_size",
    "gradient_accumulation_steps": "schedule.grad_accum_steps",
    "learning_rate": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "adam_beta1": "optim.beta1",
    "adam_beta2": "optim.beta2",
    "adam_epsilon": "optim.eps",
    "max_grad_norm": "optim.max_grad_norm",
    "warmup_ratio": "schedule.warmup_ratio",
    "warmup_steps": "schedule.warmup_steps",
    "lr_scheduler_type": "schedule.lr_scheduler",
    "bf16": None,
    "fp16": None,
    "tf32": "deepspeed.tf32",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "torch_compile": "model.compile",
    "dataloader_num_workers": "data.num_workers",
    "dataloader_drop_last": "data.drop_remainder",
    "attn_implementation": "model.attn_implementation",
    "max_steps": "schedule.max_steps",
    "save_steps": "checkpoint.save_every",
    "save_total_limit": "checkpoint.keep_last",
    "logging_steps": "logging.log_every",
    "report_to": "logging.report_to",
    "run_name": "logging.run_name",
    "eval_steps": "eval.every",
    "seed": "seed",
    "resume_from_checkpoint": "checkpoint.resume",
    "overwrite_output_dir": "checkpoint.overwrite_output_dir",
    "allow_config_change": "checkpoint.allow_config_change",
    "resume": "checkpoint.resume",
    "deepspeed": "deepspeed.config",
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.attn_implementation": CONFIG_CHOICES,
    "diffusion.schedule": ("linear", "cosine"),
    "diffusion.normalizer": ("answer_tokens",),
    "schedule.lr_scheduler": ("cosine", "linear", "constant"),
    "deepspeed.precision": ("auto", "bf16", "fp16", "fp32"),
}


class ConfigError(ValueError):
    """A user error in the configuration: its message is one line naming the input and the fix."""


def resolve_report_to(names: str | list[str]) -> list[str]:
    """``logging.report_to`` as the backends to start: ``all`` = every installed one, ``none`` = none."""
    chosen = [n.strip().lower() for n in (names.split(",") if isinstance(names, str) else names)]
    if len(chosen) > 1 and {"all", "none"} & set(chosen):
        raise ConfigError(f"logging.report_to {','.join(chosen)}: 'all' and 'none' stand alone")
    if chosen == ["none"]:
        return []
    if chosen == ["all"]:  # as in Hugging Face's Trainer: every installed backend
        return [n for n in REPORT_TO_CHOICES if n != "wandb" or importlib.util.find_spec("wandb")]
    for name in chosen:
        if name not in REPORT_TO_CHOICES:
            raise ConfigError(
                f"logging.report_to {name!r} is not one of {', '.join(REPORT_TO_CHOICES)}, all, none"
            )
    if "wandb" in chosen and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "logging.report_to wandb needs the wandb package: pip install -e '.[wandb]' (or --report_to tensorboard)"
        )
    return list(dict.fromkeys(chosen))


# ---------------------------------------------------------------------------------------------
# Dataclass <-> dict


def to_dict(config: Any) -> dict[str, Any]:
    """The config tree as plain nested dicts/lists (YAML/JSON serialisable)."""
    return dataclasses.asdict(config)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, hint in _field_types(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


@functools.cache
def _flat_names() -> dict[str, str]:
    """Flat names -> the key (or multi-key alias) they set: the aliases, then the last component of each
    dotted key ("lr" -> optim.lr). One-letter names are left out: by edit distance they are close to
    every short typo ("--lr" is not "--r")."""
    names: dict[str, str] = {alias: target or alias for alias, target in ALIASES.items()}
    for key in _all_keys():
        names.setdefault(key.rsplit(".", 1)[-1], key)
    return {name: target for name, target in names.items() if len(name) > 1}


def _closest_target(key: str) -> str | None:
    """The key (or multi-key alias) a mistyped name most likely meant; None when nothing is close."""
    underscored = {dotted.replace(".", "_"): dotted for dotted in _all_keys()}
    if key in underscored:  # "--eval_every" for eval.every
        return underscored[key]
    similarity = difflib.SequenceMatcher
    scored = [(similarity(None, key.rsplit(".", 1)[-1], n).ratio(), t) for n, t in _flat_names().items()]
    if "." in key:
        scored += [(similarity(None, key, dotted).ratio(), dotted) for dotted in _all_keys()]
    score, target = max(scored, key=lambda pair: pair[0])
    return target if score >= 0.7 else None


def _suggest(key: str, source: str) -> str:
    """``; did you mean ...?`` or "". A dotted key gets a dotted key; a flat name gets the Hugging Face
    alias closest to it and the key it sets (``'--learning_rate' (optim.lr)``)."""
    target = _closest_target(key)
    if target is None:
        return ""
    flag = "--" if source == "command line" else ""
    if target in ALIASES and ALIASES[target] is None:
        return f"; did you mean {flag + target!r}?"
    aliases = [a for a, t in ALIASES.items() if t == target and a != target and len(a) > 1]
    if "." in key or not aliases:
        return f"; did you mean {target!r}?"
    alias = max(aliases, key=lambda a: difflib.SequenceMatcher(None, key, a).ratio())
    return f"; did you mean {flag + alias!r} ({target})?"


def _unknown_key(key: str, source: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r} in {source}{_suggest(key, source)}")


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        (item_hint,) = typing.get_args(hint)[:1]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{key} in {source} must be a list (YAML list or comma-separated), got {value!r}"
            )
        return [_coerce(v, item_hint, key, source) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise AssertionError(f"union types are not used in the config tree ({key})")
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "y", "on"):
                return True
            if text in ("0", "false", "no", "n", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if hint is str:
            return "" if value is None else str(value)
    except ValueError:
        raise ConfigError(
            f"{key} in {source} must be of type {getattr(hint, '__name__', hint)}, got {value!r}"
        ) from None
    raise AssertionError(f"unsupported field type {hint!r} for {key}")


def _merge(config: Any, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Merge a nested dict into the dataclass tree in place, rejecting unknown keys."""
    hints = _field_types(type(config))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown_key(key, source)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} in {source} must be a mapping of its fields, got {value!r}")
            _merge(getattr(config, name), value, source, f"{key}.")
        else:
            setattr(config, name, _coerce(value, hint, key, source))


def _set_dotted(config: TrainConfig, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    _merge(config, nested, source)


_DATASET_LIMITS = re.compile(r"^(?P<path>.*?)(\[(?P<limits>[^\]]*)\])?$")


def _expand_dataset_args(value: str, source: str) -> dict[str, Any]:
    """``--dataset_args SOURCE[train:N,test:M]``: a shard set, a folder holding ``train/`` and ``test/``
    shard sets, or a raw dataset (hub name, ``save_to_disk`` folder, parquet/arrow, JSON/JSONL) that the
    run builds into shards once (``data.source``, trainer.dataset_cache); N and M take the first rows."""
    match = _DATASET_LIMITS.match(str(value).strip())
    assert match is not None
    path = match.group("path").strip()
    if not path:
        raise ConfigError(
            f"--dataset_args in {source} is empty; give a dataset or a shard directory, e.g. data/shards[train:1000]"
        )
    root = Path(path)
    # Every key, so that a later --dataset_args replaces an earlier one whole.
    out: dict[str, Any] = {"data.train": [], "data.test": "", "data.source": ""}
    if (root / "index.json").is_file():
        out["data.train"] = [path]
    elif (root / "train" / "index.json").is_file():
        out["data.train"] = [str(root / "train")]
        if (root / "test" / "index.json").is_file():
            out["data.test"] = str(root / "test")
    elif root.exists() or not (root.is_absolute() or path.startswith(".")):
        out["data.source"] = path  # a local dataset, or a hub name
    else:
        raise ConfigError(
            f"--dataset_args {path!r} in {source} does not exist; give a shard set, a folder of train/ and "
            "test/ shard sets, or a dataset (save_to_disk folder, parquet, JSON/JSONL file, hub name)"
        )
    for item in (match.group("limits") or "").split(","):
        if not item.strip():
            continue
        split, _, count = item.partition(":")
        split = split.strip()
        if split not in ("train", "test") or not count.strip().isdigit():
            raise ConfigError(
                f"--dataset_args limit {item!r} in {source} is not understood; use [train:N,test:M]"
            )
        out[f"data.limit_{split}"] = int(count)
    return out


def _expand_alias(name: str, value: Any, source: str) -> dict[str, Any]:
    """Translate one flat alias to dotted keys."""
    if name == "dataset_args":
        return _expand_dataset_args(value, source)
    if name in ("bf16", "fp16"):
        on = _coerce(value, bool, f"--{name}", source)
        return {"deepspeed.precision": name if on else "fp32"}
    target = ALIASES[name]
    assert target is not None
    return {target: value}


# ---------------------------------------------------------------------------------------------
# Loading


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """Split ``--key value`` / ``--key=value`` pairs; a bare ``--flag`` before another flag means True."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"unexpected argument {arg!r}; overrides look like --optim.lr 1e-4 or --learning_rate=1e-4"
            )
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = body, argv[i + 1]
            i += 2
        else:
            key, value = body, "true"
            i += 1
        pairs.append((key.replace("-", "_") if "." not in key else key, value))
    return pairs


def _apply(config: TrainConfig, key: str, value: Any, source: str) -> None:
    valid = set(_all_keys())
    if key in ALIASES and key not in valid:
        for dotted, v in _expand_alias(key, value, source).items():
            _set_dotted(config, dotted, v, source)
        return
    if key not in valid:
        # A group name given as a flat key ("--optim") or a misspelling.
        raise _unknown_key(key, source)
    _set_dotted(config, key, value, source)


def load_config(
    config_file: str | os.PathLike[str] | Mapping[str, Any] | TrainConfig | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> TrainConfig:
    """Build a ``TrainConfig``: defaults -> YAML file -> overrides (argv list or {dotted key: value}).

    ``config_file`` may also be a mapping shaped like the YAML file, or a ``TrainConfig`` (copied)
    (see :func:`build_config`). Raises ``ConfigError`` (a ``ValueError``) with a one-line message on
    any user error.
    """
    config = build_config(config_file, overrides)
    validate(config)
    return config


def build_config(
    base: str | os.PathLike[str] | Mapping[str, Any] | TrainConfig | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> TrainConfig:
    """:func:`load_config` without :func:`validate`, for callers that fill in more before validating
    (the Python API sets ``data.source`` from a list of conversations). ``base``: a YAML file, a mapping
    of the same shape, or a ``TrainConfig`` (copied, never changed)."""
    if isinstance(base, TrainConfig):
        config = copy.deepcopy(base)
    else:
        config = TrainConfig()
        if isinstance(base, Mapping):
            _merge_document(config, dict(base), "the config mapping")
        elif base:
            _merge_document(config, _read_yaml(Path(base)), str(base))
    items: list[tuple[str, Any]]
    if overrides is None:
        items = []
    elif isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = parse_overrides(list(overrides))
    for key, value in items:
        _apply(config, key, value, "overrides" if isinstance(overrides, dict) else "command line")
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass --config with a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "parse error"
        raise ConfigError(f"config file {str(path)!r} is not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of config groups")
    return data


def _merge_document(config: TrainConfig, data: dict[str, Any], source: str) -> None:
    """A config file's content: nested groups, and HF-style flat aliases at the top level."""
    nested = {k: v for k, v in data.items() if isinstance(v, dict) or k not in ALIASES}
    _merge(config, nested, source)
    for key, value in data.items():
        if key in ALIASES and not isinstance(value, dict) and key not in nested:
            _apply(config, key, value, source)


def validate(config: TrainConfig) -> None:
    """Static checks that need no file system, no torch and no process group."""
    # The tree keeps the backends to start (`all` / `none` expanded); a missing package fails here.
    config.logging.report_to = resolve_report_to(config.logging.report_to)
    for key, choices in _CHOICES.items():
        group, name = key.split(".")
        value = getattr(getattr(config, group), name)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(choices)}")
    s = config.schedule
    positive = {
        "schedule.micro_batch_size": s.micro_batch_size,
        "schedule.grad_accum_steps": s.grad_accum_steps,
        "data.max_tokens": config.data.max_tokens,
        "logging.log_every": config.logging.log_every,
        "lora.r": config.lora.r,
        "schedule.max_consecutive_skips": s.max_consecutive_skips,
        "distributed.timeout_s": config.distributed.timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    nonneg = {
        "schedule.max_steps": s.max_steps,
        "schedule.global_batch_size": s.global_batch_size,
        "schedule.warmup_steps": s.warmup_steps,
        "schedule.exit_after_steps": s.exit_after_steps,
        "checkpoint.save_every": config.checkpoint.save_every,
        "checkpoint.keep_last": config.checkpoint.keep_last,
        "eval.every": config.eval.every,
        "data.limit_train": config.data.limit_train,
        "data.limit_test": config.data.limit_test,
        "data.num_workers": config.data.num_workers,
    }
    for key, value in nonneg.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if s.max_steps == 0 and s.epochs <= 0:
        raise ConfigError("schedule.epochs must be positive when schedule.max_steps is 0")
    if not 0.0 <= s.warmup_ratio < 1.0:
        raise ConfigError(f"schedule.warmup_ratio must be in [0, 1), got {s.warmup_ratio}")
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {config.optim.lr}")
    if not 0.0 <= config.data.max_skip_fraction <= 1.0:
        raise ConfigError(f"data.max_skip_fraction must lie in [0, 1], got {config.data.max_skip_fraction}")
    if not 0.0 <= config.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {config.lora.dropout}")
    if not 0.0 < config.diffusion.eps < 1.0:
        raise ConfigError(f"diffusion.eps must be in (0, 1), got {config.diffusion.eps}")
    if config.diffusion.pad_weight < 0:
        raise ConfigError(
            f"diffusion.pad_weight must be >= 0 (0 = no cap), got {config.diffusion.pad_weight}"
        )
    if not config.diffusion.mask_prompt_loss:
        raise ConfigError(
            "mask_prompt_loss False is not supported: MDLM fine-tuning masks and scores only answer tokens "
            "(choose what counts as answer when building shards: data_tools build --train-on)"
        )
    if config.lora.enabled and not config.lora.target_modules:
        raise ConfigError("lora.target_modules is empty; name the layers, e.g. q_proj,k_proj,v_proj,o_proj")
    if s.global_batch_size and s.global_batch_size % (s.micro_batch_size * s.grad_accum_steps):
        raise ConfigError(
            f"schedule.global_batch_size {s.global_batch_size} is not a multiple of micro_batch_size * "
            f"grad_accum_steps = {s.micro_batch_size * s.grad_accum_steps}; fix one of them"
        )
    if not config.model.name_or_path:
        raise ConfigError(
            "model.name_or_path is not set; pass --model_name_or_path PATH or set model.name_or_path"
        )
    if config.data.source_format not in ("", "messages", "llava", "kodoc"):
        raise ConfigError(f"data.source_format {config.data.source_format!r}: use messages, llava or kodoc")
    if not config.data.train and not config.data.source:
        raise ConfigError(
            "data.train is not set; pass --dataset_args DATASET_OR_SHARDS[train:N,test:M] or set data.train "
            "to a shard directory"
        )


def check_paths(config: TrainConfig) -> None:
    """File-system checks (model folder, shard sets): one-line errors before any process group starts."""
    model = Path(config.model.name_or_path)
    looks_local = model.is_absolute() or config.model.name_or_path.startswith(".") or model.exists()
    if looks_local and not (model / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path {config.model.name_or_path!r} is not a model folder (no config.json); "
            "pass a Hugging Face Qwen3-VL folder (python -m trainer make-tiny DIR writes a tiny one)"
        )
    if not looks_local and "/" not in config.model.name_or_path:
        raise ConfigError(
            f"model.name_or_path {config.model.name_or_path!r} does not exist; pass a Qwen3-VL model folder"
        )
    sets = [("data.train", _shard_dir(spec)) for spec in config.data.train]
    for key, path in [*sets, ("data.test", config.data.test)]:
        if path and not (Path(path) / "index.json").is_file():
            raise ConfigError(
                f"{key} {path!r} has no index.json; build shards with `python -m data_tools build` and pass their directory"
            )


def _shard_dir(spec: str) -> str:
    """``DIR`` of a ``DIR[:WEIGHT]`` shard-set spec."""
    head, sep, tail = spec.rpartition(":")
    try:
        float(tail)
    except ValueError:
        return spec
    return head if sep and head else spec


def config_hash(config: TrainConfig) -> str:
    """Hash of the settings that define the training trajectory (not where it is written or resumed from)."""
    data = to_dict(config)
    data["checkpoint"].pop("resume", None)
    data.pop("output_dir", None)
    data["logging"] = {}
    data.pop("distributed", None)
    data["schedule"].pop("time_limit_s", None)
    data["schedule"].pop("exit_after_steps", None)
    for key in ("overwrite_output_dir", "allow_config_change"):
        data["checkpoint"].pop(key, None)
    text = json.dumps(data, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


RESUME_DEFINING_KEYS: tuple[str, ...] = (
    "seed",
    "model.name_or_path",
    "model.freeze_vision",
    "model.freeze_merger",
    "model.train_embeddings",
    "lora.enabled",
    "lora.r",
    "lora.alpha",
    "lora.target_modules",
    "data.train",
    "data.max_tokens",
)
"""Settings a resume may not change without ``checkpoint.allow_config_change``: they change what the
run computes (the global batch and the ZeRO stage are checked separately, always)."""


def resume_changes(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """``key: old -> new`` for every :data:`RESUME_DEFINING_KEYS` entry that differs from ``saved``
    (a checkpoint's stored config)."""
    now = to_dict(config)
    changes = []
    for key in RESUME_DEFINING_KEYS:
        group, _, name = key.rpartition(".")
        old = (saved.get(group, {}) if group else saved).get(name)
        new = (now[group] if group else now)[name]
        if old is not None and old != new:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes


def dump_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML (loadable again with ``load_config``)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON


def resolve_precision(config: TrainConfig, cuda: bool, bf16_supported: bool) -> str:
    """The concrete precision: bf16 / fp16 / fp32."""
    precision = config.deepspeed.precision
    if precision == "auto":
        return "bf16" if cuda and bf16_supported else "fp32"
    return precision


def global_batch_size(config: TrainConfig, world_size: int) -> int:
    """Rows per optimizer step over all ranks; checks the configured value against the world size."""
    s = config.schedule
    derived = s.micro_batch_size * s.grad_accum_steps * world_size
    if s.global_batch_size and s.global_batch_size != derived:
        raise ConfigError(
            f"schedule.global_batch_size {s.global_batch_size} != micro_batch_size {s.micro_batch_size} * "
            f"grad_accum_steps {s.grad_accum_steps} * world size {world_size} = {derived}; fix one of them"
        )
    return derived


def _load_template(name_or_path: str) -> tuple[dict[str, Any], str]:
    if name_or_path in DS_TEMPLATES:
        path = DS_TEMPLATE_DIR / f"{name_or_path}.json"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(
                f"deepspeed.config {name_or_path!r} is neither a template ({', '.join(DS_TEMPLATES)}) nor a JSON file"
            )
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"DeepSpeed config {str(path)!r} is not valid JSON ({err.msg}, line {err.lineno})"
        ) from None


def _fill(ds: dict[str, Any], key: str, value: Any, source: str, ours: str, path: str = "") -> None:
    """Set ``ds[key]`` unless the JSON already holds a concrete value, which must then agree
    (``path``: where ``ds`` sits in the JSON, for the message)."""
    current = ds.get(key, "auto")
    if current == "auto" or current is None:
        ds[key] = value
    elif current != value and not (
        isinstance(current, (int, float))
        and isinstance(value, (int, float))
        and float(current) == float(value)
    ):
        raise ConfigError(
            f"DeepSpeed config {source} sets {path}{key} = {current!r} but the trainer config gives {value!r} "
            f'({ours}); set it to "auto" or make them agree'
        )


def _fill_precision(ds: dict[str, Any], precision: str, source: str) -> None:
    """``bf16.enabled`` / ``fp16.enabled`` from the resolved precision."""
    for name in ("bf16", "fp16"):
        section = dict(ds.get(name) or {})
        wanted = precision == name
        enabled = section.get("enabled", "auto")
        if enabled not in ("auto", None) and bool(enabled) != wanted:
            raise ConfigError(
                f"DeepSpeed config {source} sets {name}.enabled = {enabled!r} but the precision is {precision} "
                f'(deepspeed.precision / --bf16); set it to "auto" or make them agree'
            )
        section["enabled"] = wanted
        if name == "bf16" and wanted:
            # Non-finite gradients skip the step on every rank (DeepSpeed only checks bf16 when asked).
            section.setdefault("check_grad_overflow", True)
        ds[name] = section


HIDDEN_SIZE_AUTO_KEYS: tuple[str, ...] = (
    "reduce_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
)
"""The ``zero_optimization`` sizes that the Hugging Face Trainer fills from the model's hidden size."""


def _language_hidden_size(name_or_path: str) -> int | None:
    """``hidden_size`` of the language model in a local model folder's config.json; None if unreadable."""
    if not name_or_path:
        return None
    try:
        model_config = json.loads((Path(name_or_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    text_config = model_config.get("text_config") if isinstance(model_config, dict) else None
    for section in (text_config, model_config):
        hidden = section.get("hidden_size") if isinstance(section, dict) else None
        if isinstance(hidden, int) and not isinstance(hidden, bool):
            return hidden
    return None


def _fill_zero_sizes(zero: dict[str, Any], model_path: str, source: str) -> None:
    """Fill ``"auto"`` bucket sizes as HF's ``trainer_config_finalize`` does (h = hidden size):
    reduce bucket h^2, stage-3 prefetch bucket 0.9 h^2, stage-3 persistence threshold 10 h."""
    for key, value in zero.items():
        if value == "auto" and key not in HIDDEN_SIZE_AUTO_KEYS:
            raise ConfigError(
                f'DeepSpeed config {source} has zero_optimization.{key} = "auto", which the trainer cannot fill; give a value'
            )
    autos = [key for key in HIDDEN_SIZE_AUTO_KEYS if zero.get(key) == "auto"]
    if not autos:
        return
    hidden = _language_hidden_size(model_path)
    if hidden is None:
        for key in autos:
            del zero[key]
        print(
            f'deepspeed: {source}: zero_optimization {", ".join(autos)} = "auto" left to DeepSpeed\'s defaults '
            f"(no hidden_size readable from {model_path!r}/config.json)",
            file=sys.stderr,
        )
        return
    sizes = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key in autos:
        zero[key] = sizes[key]


def _fill_optimizer(ds: dict[str, Any], config: TrainConfig, source: str, keep: bool) -> None:
    """``optimizer.params`` from ``optim.*``; ``keep`` False drops the section after the check (the
    trainer then passes a torch AdamW client optimizer: DeepSpeed's CPU Adam JIT-compiles for ~50 s)."""
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}}) if keep else ds.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        o = config.optim
        for key, value, ours in (
            ("lr", o.lr, "optim.lr"),
            ("betas", [o.beta1, o.beta2], "optim.beta1, optim.beta2"),
            ("eps", o.eps, "optim.eps"),
            ("weight_decay", o.weight_decay, "optim.weight_decay"),
        ):
            _fill(params, key, value, source, ours, "optimizer.params.")
    if not keep:
        ds.pop("optimizer", None)
        ds["zero_force_ds_cpu_optimizer"] = False


DS_SCHEDULERS: dict[str, str] = {
    "WarmupLR": "constant",
    "WarmupDecayLR": "linear",
    "WarmupCosineLR": "cosine",
}
"""DeepSpeed scheduler type -> the ``schedule.lr_scheduler`` that does the same after its warmup."""


def _drop_scheduler(ds: dict[str, Any], config: TrainConfig, source: str) -> None:
    """Remove a ``scheduler`` section once it agrees with ``schedule.*``: the trainer builds the
    schedule itself (linear warmup, then schedule.lr_scheduler), the same for every launcher and resume."""
    scheduler = ds.pop("scheduler", None)
    if scheduler is None:
        return
    kind = DS_SCHEDULERS.get(scheduler.get("type"))
    if kind != config.schedule.lr_scheduler:
        fix = f"pass --lr_scheduler_type {kind}" if kind else f"use one of {', '.join(DS_SCHEDULERS)}"
        raise ConfigError(
            f"DeepSpeed config {source} has scheduler {scheduler.get('type')!r} but schedule.lr_scheduler is "
            f"{config.schedule.lr_scheduler}; {fix} or remove the scheduler section"
        )
    known = {"warmup_min_lr": 0, "warmup_max_lr": config.optim.lr, "warmup_type": "linear"}
    params = dict(scheduler.get("params") or {})
    for key, value in params.items():
        if key in known:
            _fill(params, key, known[key], source, "the trainer's schedule", "scheduler.params.")
        elif value != "auto":
            raise ConfigError(
                f"DeepSpeed config {source} sets scheduler.params.{key} = {value!r}; the trainer computes it from "
                'schedule.* (warmup_ratio / warmup_steps, max_steps / epochs, min_lr_ratio): set it to "auto"'
            )


def build_deepspeed_config(
    config: TrainConfig, world_size: int, cuda: bool = False, bf16_supported: bool = False
) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: the template (or a JSON written for the Hugging Face Trainer or
    LLaMA-Factory) with every ``"auto"`` filled from the config as HF's Trainer fills it; a concrete value
    that contradicts the config is an error."""
    ds, source = _load_template(config.deepspeed.config)
    ds = copy.deepcopy(ds)
    s = config.schedule
    _fill(ds, "train_micro_batch_size_per_gpu", s.micro_batch_size, source, "schedule.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", s.grad_accum_steps, source, "schedule.grad_accum_steps")
    _fill(ds, "train_batch_size", global_batch_size(config, world_size), source, "schedule.global_batch_size")
    _fill(ds, "gradient_clipping", float(config.optim.max_grad_norm), source, "optim.max_grad_norm")
    _fill_precision(ds, resolve_precision(config, cuda, bf16_supported), source)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if config.model.compile and zero_stage(ds) == 3:
        # Seen on the tiny model: 35 compiled graphs over 4 steps (a break at every hooked module), ZeRO-2: 2.
        raise ConfigError(
            f"model.compile with ZeRO-3 ({source}): ZeRO-3's parameter hooks on every module break each "
            "compiled layer into pieces; use --deepspeed zero2 or leave model.compile off"
        )
    _fill_zero_sizes(zero, config.model.name_or_path, source)
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    # GPU: DeepSpeed's fused Adam (CPU Adam when the optimizer is offloaded); CPU: torch AdamW.
    _fill_optimizer(ds, config, source, keep=cuda or offload)
    _drop_scheduler(ds, config, source)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed JSON (0 when absent)."""
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def write_run_files(config: TrainConfig, ds_config: dict[str, Any]) -> Path:
    """Write ``config.yaml`` and ``ds_config.json`` into the run directory (atomically); return it."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("config.yaml", dump_yaml(config)),
        ("ds_config.json", json.dumps(ds_config, indent=2) + "\n"),
    ):
        atomic_write_text(out / name, text)
    return out
