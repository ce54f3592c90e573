"""The config room: the one typed configuration tree of a training run (torch-free).

Resolution order: dataclass defaults -> ``--config FILE.yaml`` -> dotted CLI overrides
(``--optim.lr 1e-4``) and Hugging Face ``Trainer``-style flat aliases (``--learning_rate 1e-4``).

- `schema`: the dataclass tree, its defaults and choices (``Literal`` fields, ``choice_fields``), ``ConfigError``.
- `overrides`: YAML, dotted CLI overrides, HF aliases, coercion (``load_config``, ``build_config``).
- `validate`: static and file-system checks, the resume rule (``RESUME_DEFINING_KEYS``, ``resume_changes``).
- `deepspeed`: the DeepSpeed JSON filled from the tree (``build_deepspeed_config``), run files.
- `attention_names`: the attention backend names; `launch_env`: RANK / WORLD_SIZE from the launcher.

Every public name is re-exported here: ``from trainer.config import TrainConfig, load_config``.
"""

from trainer.config.deepspeed import (
    DS_SCHEDULERS,
    DS_TEMPLATE_DIR,
    DS_TEMPLATES,
    HIDDEN_SIZE_AUTO_KEYS,
    build_deepspeed_config,
    global_batch_size,
    resolve_precision,
    write_run_files,
    zero_stage,
)
from trainer.config.overrides import ALIASES, build_config, dump_yaml, load_config, parse_overrides
from trainer.config.schema import (
    DEFAULT_ACCURACY_T,
    DEFAULT_T_GRID,
    REPORT_TO_CHOICES,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    DiffusionConfig,
    DistributedConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    _all_keys,
    choice_fields,
    to_dict,
)
from trainer.config.validate import (
    RESUME_DEFINING_KEYS,
    RESUME_IGNORED_KEYS,
    check_paths,
    config_hash,
    other_resume_changes,
    parse_shard_spec,
    parse_shard_specs,
    resolve_report_to,
    resume_changes,
    validate,
)

__all__ = [
    "ALIASES",
    "DEFAULT_ACCURACY_T",
    "DEFAULT_T_GRID",
    "DS_SCHEDULERS",
    "DS_TEMPLATES",
    "DS_TEMPLATE_DIR",
    "HIDDEN_SIZE_AUTO_KEYS",
    "REPORT_TO_CHOICES",
    "RESUME_DEFINING_KEYS",
    "RESUME_IGNORED_KEYS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "DiffusionConfig",
    "DistributedConfig",
    "EvalConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "_all_keys",
    "build_config",
    "build_deepspeed_config",
    "check_paths",
    "choice_fields",
    "config_hash",
    "dump_yaml",
    "global_batch_size",
    "load_config",
    "other_resume_changes",
    "parse_overrides",
    "parse_shard_spec",
    "parse_shard_specs",
    "resolve_precision",
    "resolve_report_to",
    "resume_changes",
    "to_dict",
    "validate",
    "write_run_files",
    "zero_stage",
]
