"""Reading a run's configuration: defaults, YAML, dotted CLI overrides and Hugging Face aliases.

Resolution order: dataclass defaults -> ``--config FILE.yaml`` -> dotted CLI overrides
(``--optim.lr 1e-4``) and Hugging Face ``Trainer``-style flat aliases (``--learning_rate 1e-4``).
Unknown keys are rejected with the closest valid name (values coerced to the field's type);
``load_config`` then validates the tree (``trainer.config.validate``).

Pure Python: importing this module imports neither torch nor deepspeed (the dry run and the error
paths must answer before any process group starts).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from trainer.config.schema import ConfigError, TrainConfig, _all_keys, _field_types, to_dict
from trainer.config.validate import validate

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
    if origin is typing.Literal:  # a choice: coerced to its values' type here, checked by validate
        hint = type(typing.get_args(hint)[0])
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
    run builds into shards once (``data.source``, trainer.data.dataset_cache); N and M take the first rows."""
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


def dump_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML (loadable again with ``load_config``)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
