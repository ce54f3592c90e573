"""Checking a run's configuration: static checks, file-system checks and what a resume may not change.

Pure Python: importing this module imports neither torch nor deepspeed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.config.schema import (
    REPORT_TO_CHOICES,
    ConfigError,
    TrainConfig,
    _all_keys,
    choice_fields,
    to_dict,
)


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


def validate(config: TrainConfig) -> None:
    """Static checks that need no file system, no torch and no process group."""
    # The tree keeps the backends to start (`all` / `none` expanded); a missing package fails here.
    config.logging.report_to = resolve_report_to(config.logging.report_to)
    for key, choices in choice_fields().items():
        group, _, name = key.rpartition(".")
        value = getattr(getattr(config, group) if group else config, name)
        if value not in choices:
            shown = ", ".join(str(choice) or '""' for choice in choices)
            raise ConfigError(f"{key} = {value!r} is not one of {shown}")
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
    parse_shard_specs(config.data.train, "data.train")  # the weights
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
    sets = [("data.train", path) for path in parse_shard_specs(config.data.train, "data.train")[0]]
    for key, path in [*sets, ("data.test", config.data.test)]:
        if path and not (Path(path) / "index.json").is_file():
            raise ConfigError(
                f"{key} {path!r} has no index.json; build shards with `python -m data_tools build` and pass their directory"
            )


def parse_shard_spec(spec: str, source: str) -> tuple[str, float]:
    """A ``DIR[:WEIGHT]`` shard-set spec: ``"DIR"`` -> (DIR, 1.0); ``"DIR:WEIGHT"`` -> (DIR, WEIGHT). A
    suffix that is not a number stays in DIR. The one parser of the config's ``data.train`` and the
    ``plan --shards`` flag; ``source`` names where the spec came from in the error ("data.train")."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{source} {spec!r}: the weight must be a finite number >= 0")
        return head, weight
    return spec, 1.0


def parse_shard_specs(specs: Sequence[str], source: str) -> tuple[list[str], list[float]]:
    """Several ``DIR[:WEIGHT]`` specs -> (dirs, weights); see :func:`parse_shard_spec`."""
    parsed = [parse_shard_spec(spec, source) for spec in specs]
    return [d for d, _ in parsed], [w for _, w in parsed]


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
    "data.packing",
    "data.drop_remainder",
    "data.limit_train",
)
"""The settings a resume may not change unless allowed: what the model is and what it trains on (the
model, the LoRA shape, the seed, the data and its plan). The one resume rule (``preflight`` applies it
before any process group starts; docs/CONTRACTS.md, "Checkpoints and resume"):

- the global batch and the ZeRO stage never change on a resume (``ResumeError``);
- a change of one of these keys is a ``ResumeError`` listing the changes, unless
  ``checkpoint.allow_config_change`` (``--allow_config_change``): the run then goes on from the saved
  step with the new settings (a changed data plan from the saved epoch and step) and reports the
  changes on one line;
- any other setting (logging, evaluation and checkpoint cadence, workers, limits, optimizer and
  schedule values, ...) may change: the change is reported on one line (:func:`other_resume_changes`),
  never refused.

The loader's plan fingerprint is the data-side guard of the same rule: shards rebuilt under the same
folder change the plan without a key changing, and are refused the same way."""
RESUME_IGNORED_KEYS: tuple[str, ...] = (
    "output_dir",
    "checkpoint.resume",
    "checkpoint.overwrite_output_dir",
    "checkpoint.allow_config_change",
)
"""Keys that say how this launch starts, not what the run is: never reported as resume changes."""


def resume_changes(
    saved: dict[str, Any], config: TrainConfig, keys: Sequence[str] = RESUME_DEFINING_KEYS
) -> list[str]:
    """``key: old -> new`` for every entry of ``keys`` (:data:`RESUME_DEFINING_KEYS`) that differs
    from ``saved`` (a checkpoint's stored config; keys it lacks are not compared)."""
    now = to_dict(config)
    changes = []
    for key in keys:
        group, _, name = key.rpartition(".")
        old = (saved.get(group, {}) if group else saved).get(name)
        new = (now[group] if group else now)[name]
        if old is not None and old != new:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes


def other_resume_changes(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """The changes a resume may make freely: every key outside :data:`RESUME_DEFINING_KEYS` (and
    :data:`RESUME_IGNORED_KEYS`) that differs from ``saved``."""
    fixed = {*RESUME_DEFINING_KEYS, *RESUME_IGNORED_KEYS}
    return resume_changes(saved, config, [key for key in _all_keys() if key not in fixed])
