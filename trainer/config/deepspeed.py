"""The DeepSpeed JSON of a run: a template in ``ds_configs/`` (or the user's file) with batch sizes,
gradient accumulation, precision and clipping filled in from the config tree; a value in the JSON that
contradicts the tree is an error. Also writes a run's ``config.yaml`` and ``ds_config.json``.

Pure Python: importing this module imports neither torch nor deepspeed.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import sys
from pathlib import Path
from typing import Any

from data_tools.fileio import atomic_write_text
from trainer.config.overrides import dump_yaml
from trainer.config.schema import ConfigError, TrainConfig

# The templates are package data of `ds_configs` (a plain file path in a checkout or any install).
DS_TEMPLATE_DIR = Path(str(importlib.resources.files("ds_configs")))
DS_TEMPLATES = ("zero2", "zero3", "zero3_offload")


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
