"""Every check of a training run that can fail on user input, before any process group starts.

Each failure is one line naming the input and the fix (``ConfigError`` / ``ResumeError``): the paths,
the shard sets (files as their index lists them, the model's tokenizer), another run's checkpoints in
the output folder, and what a resume may change.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from trainer.config import (
    ConfigError,
    TrainConfig,
    build_deepspeed_config,
    check_paths,
    global_batch_size,
    other_resume_changes,
    resume_changes,
    zero_stage,
)
from trainer.data.dataset_cache import ensure_source_shards
from trainer.run import checkpoint as ckpt
from trainer.run import distributed


def prepare(config: TrainConfig) -> tuple[Path | None, dict[str, Any]]:
    """Build shards of ``data.source`` (once), check paths and resume, build the DeepSpeed JSON; raises
    ConfigError / ResumeError."""
    ensure_source_shards(config)
    check_paths(config)
    check_shard_sets(config)
    resume_dir = ckpt.find_resume(config.output_dir, config.checkpoint.resume)
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    world_size = distributed.env_world_size()
    ds_config = build_deepspeed_config(config, world_size, cuda=cuda, bf16_supported=bf16)
    if resume_dir is not None:
        state = ckpt.read_state(resume_dir)
        assert state is not None  # find_resume returns committed checkpoints only
        check_resume_geometry(resume_dir, state, config, ds_config, world_size)
        check_resume_config(resume_dir, state, config)
    elif (
        ckpt.list_checkpoints(ckpt.checkpoint_root(config.output_dir))
        and not config.checkpoint.overwrite_output_dir
    ):
        raise ckpt.ResumeError(
            f"output_dir {config.output_dir!r} holds another run's checkpoints: continue it with "
            "--resume_from_checkpoint auto, or start over with --overwrite_output_dir (removes its "
            "checkpoints and metrics)"
        )
    return resume_dir, ds_config


def check_shard_sets(config: TrainConfig) -> None:
    """Every shard set the run reads: files as `index.json` lists them, built with the model's tokenizer."""
    from data_tools.index import read_index
    from data_tools.samples import load_tokenizer, tokenizer_files_sha256, tokenizer_fingerprint
    from data_tools.shards import check_files
    from trainer.data import parse_shard_specs

    dirs, _ = parse_shard_specs(config.data.train, "data.train")
    model_files = tokenizer_files_sha256(config.model.name_or_path)
    model_fingerprint = None
    for directory in [*dirs, *([config.data.test] if config.data.test else [])]:
        index = read_index(directory)
        problems = check_files(directory, index)
        if problems:
            raise ConfigError(
                f"shard set {directory!r} no longer matches its index.json ({problems[0]}"
                f"{f'; {len(problems) - 1} more' if len(problems) > 1 else ''}); rebuild it or restore the files"
            )
        built = index.get("tokenizer", {})
        if model_files is not None and built.get("files_sha256") == model_files:
            continue  # the same tokenizer files: no need to load the tokenizer (~2 s per rank)
        if model_fingerprint is None:
            model_fingerprint = tokenizer_fingerprint(load_tokenizer(config.model.name_or_path))
        if built.get("fingerprint") != model_fingerprint:
            raise ConfigError(
                f"shard set {directory!r} was built with the tokenizer of {built.get('name_or_path')!r} "
                f"(fingerprint {str(built.get('fingerprint'))[:12]}), but model.name_or_path "
                f"{config.model.name_or_path!r} has {model_fingerprint[:12]}: rebuild the shards with "
                "--model set to the model you train"
            )


def check_resume_config(resume_dir: Path, state: dict[str, Any], config: TrainConfig) -> None:
    """The resume rule of ``RESUME_DEFINING_KEYS`` (trainer/config/validate.py): a change of what the run
    computes is refused unless allowed; allowed changes and free ones are reported on one line each."""
    saved = state.get("config") or {}
    changes = resume_changes(saved, config)
    if changes and not config.checkpoint.allow_config_change:
        raise ckpt.ResumeError(
            f"resuming {resume_dir} would change what the run computes ({'; '.join(changes)}); "
            "undo the change, or pass --allow_config_change"
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if changes:
        print(
            f"train: resuming with changes allowed by --allow_config_change: {'; '.join(changes)}",
            file=sys.stderr,
        )
    other = other_resume_changes(saved, config)
    if other:
        print(f"train: resuming with changed settings: {'; '.join(other)}", file=sys.stderr)


def check_resume_geometry(
    resume_dir: Path, state: dict[str, Any], config: TrainConfig, ds_config: dict[str, Any], world_size: int
) -> None:
    """Refuse a resume whose batch or ZeRO stage changed; route another world size to the universal load."""
    saved_batch = state.get("global_batch_size")
    new_batch = global_batch_size(config, world_size)
    if saved_batch is not None and int(saved_batch) != new_batch:
        raise ckpt.ResumeError(
            f"{resume_dir} was trained with a global batch of {saved_batch} rows, this run has {new_batch} "
            f"(micro batch * grad accum * {world_size} ranks); keep the global batch to resume, e.g. "
            "--gradient_accumulation_steps or schedule.global_batch_size"
        )
    saved_stage, stage = state.get("zero_stage"), zero_stage(ds_config)
    if saved_stage is not None and int(saved_stage) != stage:
        raise ckpt.ResumeError(
            f"{resume_dir} was trained with ZeRO-{saved_stage}, this run uses ZeRO-{stage}; "
            "resume with the same --deepspeed config"
        )
    if ckpt.needs_universal(state, world_size):
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
