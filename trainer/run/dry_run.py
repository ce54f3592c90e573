"""``train --dry-run`` (the resolved config, the plan and a per-device memory estimate, no weights
loaded) and the ``plan`` command (the epoch plan of a training config, or of ``--shards`` sets)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING, Any

import torch

from trainer.config import TrainConfig, dump_yaml, global_batch_size, load_config, zero_stage
from trainer.data.dataset_cache import ensure_source_shards

if TYPE_CHECKING:
    from trainer.data import Catalog, EpochPlan, PlanSpec


def plan_spec(config: TrainConfig, world_size: int) -> PlanSpec:
    """The epoch-plan settings of a run (what every rank's loader plans with)."""
    from trainer.data import PlanSpec, parse_shard_specs

    _, weights = parse_shard_specs(config.data.train)
    s = config.schedule
    return PlanSpec(
        weights=tuple(weights),
        seed=config.seed,
        max_tokens=config.data.max_tokens,
        packs_per_step=s.micro_batch_size * s.grad_accum_steps * world_size,
        packing=config.data.packing,
        drop_remainder=config.data.drop_remainder,
    )


def config_plan(config: TrainConfig, world_size: int, epoch: int = 0) -> tuple[Catalog, EpochPlan]:
    """The catalog of ``data.train`` and the plan of one epoch, as every rank's loader computes it."""
    from trainer.data import Planner, load_catalog, parse_shard_specs

    dirs, _ = parse_shard_specs(config.data.train)
    catalog = load_catalog(dirs, config.data.limit_train)
    return catalog, Planner(catalog, plan_spec(config, world_size)).plan(epoch)


def plan_lines(config: TrainConfig, catalog: Catalog, plan: EpochPlan, world_size: int) -> list[str]:
    """World size, global batch, samples and steps of a run's plan, one fact per line."""
    s = config.schedule
    total = s.max_steps or max(1, math.ceil(s.epochs * plan.num_steps))
    return [
        f"world size: {world_size}",
        f"global batch: {global_batch_size(config, world_size)} rows of <= {config.data.max_tokens} tokens "
        f"({s.micro_batch_size} per micro-batch x {s.grad_accum_steps} accumulation x {world_size} ranks)",
        f"samples: {len(catalog)} ({plan.num_too_long} longer than max_tokens), packing efficiency "
        f"{plan.packing_efficiency:.3f}",
        f"steps per epoch: {plan.num_steps}; total steps: {total}",
    ]


def dry_run_report(config: TrainConfig, ds_config: dict[str, Any], world_size: int) -> str:
    """Resolved config, world size, steps per epoch and a per-device memory estimate (no weights loaded)."""
    catalog, plan = config_plan(config, world_size)
    lines = [dump_yaml(config).rstrip(), "", *plan_lines(config, catalog, plan, world_size)]
    precision = "bf16" if ds_config["bf16"]["enabled"] else "fp16" if ds_config["fp16"]["enabled"] else "fp32"
    lines.append(f"zero stage: {zero_stage(ds_config)}; precision: {precision}")
    lines.append(memory_estimate(config, ds_config, world_size))
    return "\n".join(lines)


PLAN_USAGE = """usage: python -m trainer plan [--config FILE.yaml] [--KEY VALUE ...] [--world-size N] [--epoch E] [--json]
       python -m trainer plan --shards DIR[:WEIGHT] ... --max-tokens N [...]  (plan --shards --help: its options)

The epoch plan (packs per rank and global step) from index.json alone. The first form plans the run a
training config describes: --config and overrides exactly as `python -m trainer train` takes them
(python -m trainer train --help lists every key); --json prints every step's packs."""


def main(argv: list[str]) -> int:
    """``python -m trainer plan``: the plan of a training config, or of ``--shards`` sets."""
    if any(arg == "--shards" or arg.startswith("--shards=") for arg in argv):
        from trainer.data import main as shards_plan_main

        return shards_plan_main(argv)
    if not argv or any(arg in ("-h", "--help") for arg in argv):
        print(PLAN_USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    parser = argparse.ArgumentParser(prog="python -m trainer plan", add_help=False, allow_abbrev=False)
    parser.add_argument("--config")
    parser.add_argument("--world-size", "--world_size", type=int, default=1)
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.world_size < 1 or args.epoch < 0:
            raise ValueError("--world-size must be >= 1 and --epoch >= 0")
        config = load_config(args.config, overrides)
        ensure_source_shards(config)
        catalog, plan = config_plan(config, args.world_size, args.epoch)
        lines = plan_lines(config, catalog, plan, args.world_size)
    except ValueError as err:  # ConfigError included
        print(f"plan: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        from trainer.data.plan import plan_summary

        print(json.dumps(plan_summary(plan, catalog, args.world_size)))
    else:
        tail = "dropped" if plan.drop_remainder else "carried out"
        head = f"epoch {plan.epoch}: {plan.num_carried_in} packs carried in, {len(plan.remainder)} {tail}"
        print("\n".join([head, *lines]))
    return 0


def memory_estimate(config: TrainConfig, ds_config: dict[str, Any], world_size: int) -> str:
    """A rough per-device memory estimate from the model config (meta device, no weights read)."""
    try:
        from transformers import AutoConfig, Qwen3VLForConditionalGeneration

        model_config = AutoConfig.from_pretrained(config.model.name_or_path)
        with torch.device("meta"):
            meta = Qwen3VLForConditionalGeneration._from_config(model_config)
    except (OSError, ValueError) as err:
        return f"memory estimate: unavailable ({str(err).splitlines()[0]})"
    text = model_config.text_config
    vision = sum(p.numel() for p in meta.model.visual.parameters())
    language = sum(p.numel() for p in meta.model.language_model.parameters())
    if not getattr(text, "tie_word_embeddings", getattr(model_config, "tie_word_embeddings", False)):
        language += meta.lm_head.weight.numel()
    if config.lora.enabled:
        trainable = text.hidden_size  # the mask row
        for name, module in meta.model.language_model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in config.lora.target_modules:
                trainable += config.lora.r * (module.in_features + module.out_features)
    else:
        trainable = language
    bf16 = ds_config["bf16"]["enabled"] or ds_config["fp16"]["enabled"]
    weight_bytes = 2 if bf16 else 4
    stage = zero_stage(ds_config)
    frozen_lm = (language - (trainable if not config.lora.enabled else 0)) * weight_bytes
    weights = vision * weight_bytes + (frozen_lm / world_size if stage == 3 else frozen_lm)
    # fp32 master + Adam m, v (12 B) + gradient, partitioned from stage 1 (states) / 2 (grads) / 3 (all).
    states = trainable * 12 / (world_size if stage >= 1 else 1)
    grads = trainable * weight_bytes / (world_size if stage >= 2 else 1)
    trainable_weights = trainable * weight_bytes / (world_size if stage == 3 else 1)
    if ((ds_config["zero_optimization"].get("offload_optimizer") or {}).get("device", "none")) != "none":
        states = 0.0
    tokens = config.schedule.micro_batch_size * config.data.max_tokens
    # Activations per token and layer, bytes (Korthikanti et al.: ~34 h per token without recompute,
    # ~2 h with full recomputation); plus one chunk of fp32 logits for the masked-token CE.
    per_layer = (2 if config.model.gradient_checkpointing else 34) * text.hidden_size * (weight_bytes / 2)
    activations = (
        tokens * per_layer * text.num_hidden_layers + config.diffusion.ce_chunk_size * text.vocab_size * 8
    )
    total = weights + states + grads + trainable_weights + activations
    gib = 2**30
    return (
        f"memory estimate per device: ~{total / gib:.1f} GiB (frozen weights {weights / gib:.2f}, trainable "
        f"{trainable:,} params: weights+grads+Adam {(trainable_weights + grads + states) / gib:.2f}, activations "
        f"{activations / gib:.2f}); language model {language:,} params, vision {vision:,}"
    )
