"""``train --dry-run`` (the resolved config, the plan and a per-device memory estimate, no weights
loaded) and the plan of a training config that the ``plan`` command prints (trainer/cli/plan.py)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from trainer.config import TrainConfig, dump_yaml, global_batch_size, zero_stage

if TYPE_CHECKING:
    from trainer.data import Catalog, EpochPlan


def config_plan(config: TrainConfig, world_size: int, epoch: int = 0) -> tuple[Catalog, EpochPlan]:
    """The catalog of ``data.train`` and the plan of one epoch, as every rank's loader computes it."""
    from trainer.data import Planner, PlanSpec, load_catalog, parse_shard_specs

    dirs, _ = parse_shard_specs(config.data.train, "data.train")
    catalog = load_catalog(dirs, config.data.limit_train)
    return catalog, Planner(catalog, PlanSpec.from_config(config, world_size)).plan(epoch)


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
