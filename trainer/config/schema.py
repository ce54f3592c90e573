"""The configuration tree of a training run: its dataclasses, their defaults and choices (``Literal`` types).

``trainer.config`` re-exports every public name (``from trainer.config import TrainConfig``); the
rest of the room reads and checks this tree: ``overrides`` (YAML, dotted CLI overrides, Hugging Face
``Trainer``-style aliases), ``validate`` (static checks, resume-defining keys), ``deepspeed`` (the
DeepSpeed JSON filled from the tree).

Pure Python: importing this module imports neither torch nor deepspeed (the dry run and the error
paths must answer before any process group starts).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from data_tools.sources import InputFormat
from trainer.config.attention_names import AttnImplementation

DEFAULT_T_GRID: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
"""Midpoints of 5 equal bins of (0, 1): the NELBO quadrature (``eval.t_grid``, ``evaluate --t-grid``)."""
DEFAULT_ACCURACY_T: tuple[float, ...] = (0.15, 0.5, 1.0)
"""Times at which masked-token accuracy is reported (``eval.accuracy_t``)."""


@dataclass
class ModelConfig:
    name_or_path: str = "Qwen/Qwen3-VL-2B-Instruct"
    """Hugging Face model folder (or hub id available in the local cache) of a Qwen3-VL checkpoint."""
    attn_implementation: AttnImplementation = "auto"
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
    schedule: Literal["linear", "cosine"] = "linear"
    """Masking schedule alpha(t): linear (p_mask = t) or cosine."""
    eps: float = 1e-3
    """Smallest t drawn, t in [eps, 1)."""
    stratified_t: bool = True
    """Stratify t across the sub-sequences of a micro-batch (lower-variance estimator)."""
    shift: bool = False
    """Position i-1 predicts token i (Dream / DiffuLLaMA style AR adaptation)."""
    normalizer: Literal["answer_tokens"] = "answer_tokens"
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
    source_format: Literal["", InputFormat] = ""
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
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
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
    """Resume even though the config changes what the run computes (the resume-defining keys: data
    and its plan, seed, model, LoRA shape); the run goes on from the saved step with the new settings
    and the differences are printed. Other settings may change on a resume without it."""


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
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
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


class ConfigError(ValueError):
    """A user error in the configuration: its message is one line naming the input and the fix."""


# ---------------------------------------------------------------------------------------------
# Dataclass <-> dict


def to_dict(config: Any) -> dict[str, Any]:
    """The config tree as plain nested dicts/lists (YAML/JSON serialisable)."""
    return dataclasses.asdict(config)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def choice_fields(cls: type = TrainConfig, prefix: str = "") -> dict[str, tuple[Any, ...]]:
    """Dotted key -> the values its ``Literal`` type allows, for every choice field of the tree (the
    one list of each choice: ``validate`` checks them, ``train --help`` shows them)."""
    choices: dict[str, tuple[Any, ...]] = {}
    for name, hint in _field_types(cls).items():
        if dataclasses.is_dataclass(hint):
            choices.update(choice_fields(hint, f"{prefix}{name}."))
        elif typing.get_origin(hint) is Literal:
            choices[f"{prefix}{name}"] = typing.get_args(hint)
    return choices


def _all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, hint in _field_types(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys
