"""The training loop: one readable function with a fixed step order.

    python -m trainer train --config configs/demo.yaml [--optim.lr 1e-4 ...] [--dry-run]
    deepspeed --num_gpus 8 --module trainer train --config ...
    torchrun --nproc_per_node 8 -m trainer train --config ...

Python API::

    from trainer.config import load_config
    from trainer.train import run
    result = run(load_config("configs/demo.yaml", {"schedule.max_steps": 10}))

One optimizer step (``train_step``), in this order on every rank:
 1. fetch this rank's micro-batches of the global step (data wait is timed);
 2. count the answer tokens of the whole global step on all ranks (one all-reduce): the normaliser,
    so the gradient does not depend on how samples were packed or sharded;
 3. per micro-batch: frozen vision tower under no_grad (outside the engine, DESIGN decision 2),
    mask answer tokens at a per-sub-sequence t (DESIGN decision 3), engine forward, loss at masked
    positions, engine backward, engine step (DeepSpeed steps the optimizer at the accumulation
    boundary; a non-finite gradient norm makes it skip the update on every rank);
 4. agree across ranks on finiteness (loss, gradient norm) and count skipped steps;
then the loop logs, evaluates, checkpoints and agrees on stop signals (SIGTERM, time limit).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint as ckpt
from trainer import distributed
from trainer.config import (
    ConfigError,
    TrainConfig,
    build_deepspeed_config,
    check_paths,
    config_hash,
    dump_yaml,
    global_batch_size,
    load_config,
    resolve_precision,
    to_dict,
    write_run_files,
    zero_stage,
)

PEAK_TFLOPS_BF16: dict[str, float] = {
    # Dense bf16 tensor-core peak per device (no sparsity); MFU is reported against it.
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
}


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says what to change."""


@dataclass
class TrainResult:
    """What ``run`` returns (the same on every rank)."""

    step: int
    """Optimizer steps done (including steps before a resume)."""
    losses: list[float] = field(default_factory=list)
    """Loss of every step run in this call (global, normalised by answer tokens)."""
    stopped_early: bool = False
    """True when a signal or the time limit ended the run before the planned steps."""
    last_checkpoint: str | None = None
    """Directory of the newest committed checkpoint, if any."""
    eval: dict[str, float] = field(default_factory=dict)
    """Metrics of the last evaluation."""


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule and throughput accounting (pure functions)


def lr_lambda(step: int, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class FlopsModel:
    """Sizes that the FLOPs-per-token formula needs (read from the model config)."""

    num_lm_matmul_params: int
    """Parameters of the language model's linear layers (attention + MLP, no embeddings)."""
    num_layers: int
    """Language-model layers."""
    q_dim: int
    """Query heads * head dim (attention score/value matmul width)."""
    hidden: int
    """Hidden size (LM head input)."""
    vocab: int
    """LM head rows."""
    num_vision_params: int
    """Vision tower parameters (forward only while frozen)."""
    lora: bool
    """Frozen base with adapters (no weight gradients for the base)."""


def step_flops(
    fm: FlopsModel, num_tokens: int, sum_sq_doc_len: int, num_masked: int, num_vision_tokens: int
) -> float:
    """Model FLOPs of one optimizer step (forward + backward, no recomputation).

    Linear layers: forward 2N per token; backward 2N for activation gradients plus 2N for weight
    gradients only when the base is trained (6N full, 4N frozen base + LoRA; the adapters' own
    FLOPs are ~r/hidden of that and left out). Attention scores and values: 4 * q_dim * n^2 per
    layer forward for a document of n tokens (bidirectional: every pair), x3 with backward. The LM
    head runs only on masked positions (2 * hidden * vocab per token forward, x3 or x2 with
    backward). The frozen vision tower: forward only, 2 * params per patch token.
    """
    per_token = 4 if fm.lora else 6
    linear = per_token * fm.num_lm_matmul_params * num_tokens
    attention = 12 * fm.num_layers * fm.q_dim * sum_sq_doc_len
    head = per_token * fm.hidden * fm.vocab * num_masked
    vision = 2 * fm.num_vision_params * num_vision_tokens
    return float(linear + attention + head + vision)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for MFU (None when unknown, e.g. on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            # fp32 matmuls run on TF32 tensor cores at half the bf16 rate.
            return tflops * 1e12 * (0.5 if precision == "fp32" else 1.0)
    return None


def _sum_sq_doc_len(seq_ids_BL: torch.Tensor) -> int:
    total = 0
    for row in seq_ids_BL:
        counts = torch.bincount(row[row >= 0])
        total += int((counts.long() ** 2).sum())
    return total


# ---------------------------------------------------------------------------------------------
# Logging


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard) on rank 0; a no-op elsewhere."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.file = open(output_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self.tb: Any = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: the JSON lines still carry everything
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one JSON line and the numeric fields as TensorBoard scalars."""
        if not self.enabled or self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = int(record.get("step", 0))
            prefix = "eval/" if record.get("kind") == "eval" else "train/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        """Flush and close."""
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class StopSignal:
    """Remembers SIGTERM / SIGINT (e.g. Slurm before the time limit) until the loop agrees to stop."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Catch SIGTERM and SIGINT (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# Assembly


def _derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def resolve_attention(name: str, cuda: bool) -> str:
    """``auto`` -> flash (installed, GPU) > flex (GPU) > sdpa (CPU reference)."""
    if name != "auto":
        return name
    if cuda:
        from trainer.attention import flash_attn_available

        return "flash" if flash_attn_available() else "flex"
    return "sdpa"


def _torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def build_model(config: TrainConfig, dtype: torch.dtype, attn_implementation: str) -> Any:
    """The assembled ``MDLMModel`` (trainer.model) as the config asks (training and export)."""
    from trainer.model import build_mdlm_model

    return build_mdlm_model(
        config.model.name_or_path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        use_lora=config.lora.enabled,
        lora_r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        train_vision=not config.model.freeze_vision,
        train_merger=not config.model.freeze_merger,
        train_embeddings=config.model.train_embeddings,
        gradient_checkpointing=config.model.gradient_checkpointing,
    )


def flops_model(model: Any, lora: bool) -> FlopsModel:
    """Sizes for ``step_flops`` from the assembled model."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q_dim = text.num_attention_heads * head_dim
    kv_dim = text.num_key_value_heads * head_dim
    per_layer = text.hidden_size * (2 * q_dim + 2 * kv_dim) + 3 * text.hidden_size * text.intermediate_size
    return FlopsModel(
        num_lm_matmul_params=per_layer * text.num_hidden_layers,
        num_layers=text.num_hidden_layers,
        q_dim=q_dim,
        hidden=text.hidden_size,
        vocab=text.vocab_size,
        num_vision_params=model.parameter_counts()["vision"],
        lora=lora,
    )


def _shard_specs(specs: list[str]) -> tuple[list[str], list[float]]:
    from trainer.data import parse_shard_spec

    parsed = [parse_shard_spec(s) for s in specs]
    return [d for d, _ in parsed], [w for _, w in parsed]


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB


# ---------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepStats:
    """Global (all-rank) numbers of one optimizer step."""

    loss: float
    """sum(loss_weight * CE) over masked tokens / answer tokens (the objective)."""
    ce_per_masked: float
    """Plain CE per masked token."""
    grad_norm: float
    """Global gradient norm before clipping (inf/nan when the step was skipped)."""
    skipped: bool
    """The update was skipped on every rank (non-finite loss or gradients)."""
    num_tokens: int
    """Real (non-padding) tokens."""
    num_answer_tokens: int
    """Answer tokens (the normaliser)."""
    num_masked: int
    """Masked tokens."""
    num_samples: int
    """Samples."""
    mean_t: float
    """Mean diffusion time over sub-sequences."""
    flops: float
    """Model FLOPs (see step_flops)."""


def train_step(
    engine: Any,
    model: Any,
    micro_batches: list[Any],
    step: int,
    config: TrainConfig,
    info: Any,
    fm: FlopsModel,
    zero3: bool,
) -> StepStats:
    """Forward/backward every micro-batch of this rank and step the optimizer (see module docstring)."""
    from trainer.diffusion import apply_masking, sample_sequence_t

    # The normaliser: answer tokens of the whole global step, so the gradient is the same however
    # the samples were packed into rows, micro-batches and ranks.
    (global_answers,) = distributed.all_reduce_sum([sum(mb.num_answer_tokens for mb in micro_batches)])
    # DeepSpeed averages gradients over ranks: scale each rank's share back up by the world size.
    normaliser = max(global_answers, 1.0) / info.world_size
    train_vision = not (config.model.freeze_vision and config.model.freeze_merger)
    sums = [0.0] * 9  # weighted CE, CE, masked, non-finite, tokens, samples, t sum, t count, sum n^2
    vision_tokens = 0
    for index, batch in enumerate(micro_batches):
        batch = batch.to(info.device)
        # Noise and dropout are keyed by the micro-batch's place in the global step (the plan puts
        # micro-batch m of rank r at r * grad_accum + m), never by the rank alone: a resumed run is
        # exact, also at another world size with the same micro-batch size.
        global_index = info.rank * len(micro_batches) + index
        torch.manual_seed(_derived_seed(config.seed, step, global_index, 1))
        generator = torch.Generator().manual_seed(_derived_seed(config.seed, step, global_index, 2))
        t_BS = sample_sequence_t(
            batch.seq_ids,
            eps=config.diffusion.eps,
            stratified=config.diffusion.stratified_t,
            generator=generator,
        )
        noisy = apply_masking(
            batch.input_ids,
            batch.answer_mask,
            batch.seq_ids,
            t_BS,
            mask_token_id=model.mask_token_id,
            schedule=config.diffusion.schedule,
            generator=generator,
            eps=config.diffusion.eps,
        )
        vision_kwargs: dict[str, Any] = {}
        if batch.pixel_values is not None:
            vision_tokens += int(batch.pixel_values.shape[0])
        if train_vision:
            vision_kwargs = {"pixel_values": batch.pixel_values, "image_grid_thw": batch.image_grid_thw}
        elif batch.pixel_values is not None:
            # Frozen tower, outside the engine, no autograd (DESIGN decision 2).
            vision_kwargs = {"vision": model.vision_features(batch.pixel_values, batch.image_grid_thw)}
        chunk_size = config.diffusion.ce_chunk_size
        if zero3:
            # ZeRO-3 gathers lm_head's weight on every call, so every rank must call it equally
            # often: one chunk as wide as the largest masked count of any rank. Its logits are kept
            # for backward (no recompute): ZeRO-3 does not re-gather the weight inside a
            # torch.utils.checkpoint recompute.
            (max_masked,) = distributed.all_reduce_max([float(noisy.masked.sum())])
            chunk_size = max(1, int(max_masked))
        # The loss is computed inside the engine's forward: under ZeRO-3 the tied LM head and the
        # trained mask row are gathered there.
        out = engine(
            noisy.noisy_input_ids,
            batch.position_ids,
            batch.seq_ids,
            target_ids=noisy.target_ids,
            masked=noisy.masked,
            loss_weight=noisy.loss_weight,
            answer_mask=noisy.answer_mask,
            shift=config.diffusion.shift,
            normalization=config.diffusion.normalizer,
            num_normalizer=normaliser,
            cu_seqlens=batch.cu_seqlens,
            max_seqlen=batch.max_seqlen,
            chunk_size=chunk_size,
            checkpoint_chunks=not zero3,
            **vision_kwargs,
        )
        # A non-finite loss gives non-finite gradients: DeepSpeed then skips the update on every
        # rank (the global norm is invalid everywhere); we count it below.
        engine.backward(out.loss, scale_wrt_gas=False)
        engine.step()
        present = torch.zeros_like(t_BS, dtype=torch.bool)
        for row, seq in enumerate(batch.seq_ids):
            present[row, : int(seq.max().clamp(min=-1)) + 1] = True
        weighted = float(out.weighted_ce_sum)
        sums[0] += weighted
        sums[1] += float(out.ce_sum)
        sums[2] += float(out.num_masked)
        sums[3] += 0.0 if math.isfinite(weighted) and math.isfinite(float(out.loss.detach())) else 1.0
        sums[4] += batch.num_real_tokens
        sums[5] += sum(len(keys) for keys in batch.keys)
        sums[6] += float(t_BS[present].sum())
        sums[7] += float(present.sum())
        sums[8] += _sum_sq_doc_len(batch.seq_ids.cpu())
    sums.append(float(vision_tokens))
    g = distributed.all_reduce_sum(sums)
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float("nan") if grad_norm is None else float(grad_norm)
    # The norm is global (identical on all ranks); the loss flag was summed: one decision for all.
    skipped = g[3] > 0 or not math.isfinite(grad_norm)
    return StepStats(
        loss=g[0] / max(global_answers, 1.0),
        ce_per_masked=g[1] / max(g[2], 1.0),
        grad_norm=grad_norm,
        skipped=skipped,
        num_tokens=int(g[4]),
        num_answer_tokens=int(global_answers),
        num_masked=int(g[2]),
        num_samples=int(g[5]),
        mean_t=g[6] / max(g[7], 1.0),
        flops=step_flops(fm, int(g[4]), int(g[8]), int(g[2]), int(g[9])),
    )


# ---------------------------------------------------------------------------------------------
# The run


def _prepare(config: TrainConfig) -> tuple[Path | None, dict[str, Any]]:
    """Every check that can fail on user input, before any process group starts."""
    check_paths(config)
    resume_dir = ckpt.find_resume(config.output_dir, config.checkpoint.resume)
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    world_size = distributed.env_world_size()
    ds_config = build_deepspeed_config(config, world_size, cuda=cuda, bf16_supported=bf16)
    if resume_dir is not None:
        check_resume_geometry(resume_dir, config, ds_config, world_size)
    return resume_dir, ds_config


def check_resume_geometry(
    resume_dir: Path, config: TrainConfig, ds_config: dict[str, Any], world_size: int
) -> None:
    """Refuse a resume whose batch or ZeRO stage changed; route another world size to the universal load."""
    state = ckpt.read_state(resume_dir)
    assert state is not None  # find_resume returns committed checkpoints only
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


def run(config: TrainConfig) -> TrainResult:
    """Train as ``config`` says (the Python API of ``python -m trainer train``).

    Works in a plain process (world size 1) and under deepspeed / torchrun (one call per rank).
    Raises ``ConfigError`` / ``ResumeError`` on user errors before any process group starts.
    """
    resume_dir, ds_config = _prepare(config)
    info = distributed.setup()
    try:
        return _train(config, ds_config, resume_dir, info)
    finally:
        distributed.teardown()


def _train(config: TrainConfig, ds_config: dict[str, Any], resume_dir: Path | None, info: Any) -> TrainResult:
    import deepspeed

    from trainer.assets import load_processor
    from trainer.data import EvalLoader, TrainLoader

    cuda = info.device.type == "cuda"
    precision = resolve_precision(config, cuda, cuda and torch.cuda.is_bf16_supported())
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = config.deepspeed.tf32
        torch.backends.cudnn.allow_tf32 = config.deepspeed.tf32
    output_dir = Path(config.output_dir)
    if info.is_main:
        write_run_files(config, ds_config)
    distributed.barrier()
    resume_state = ckpt.read_state(resume_dir) if resume_dir is not None else None

    # Same initial adapter weights on every rank (DeepSpeed also broadcasts them).
    torch.manual_seed(config.seed)
    model = build_model(
        config, _torch_dtype(precision), resolve_attention(config.model.attn_implementation, cuda)
    )
    model.base_model.to(info.device)
    engine_module = model.engine_module
    trainable = [p for p in engine_module.parameters() if p.requires_grad]
    client_optimizer = None
    if "optimizer" not in ds_config:
        client_optimizer = torch.optim.AdamW(
            trainable,
            lr=config.optim.lr,
            betas=(config.optim.beta1, config.optim.beta2),
            eps=config.optim.eps,
            weight_decay=config.optim.weight_decay,
        )

    dirs, weights = _shard_specs(config.data.train)
    processor = load_processor(config.model.name_or_path)
    loader = TrainLoader(
        dirs,
        weights,
        rank=info.rank,
        world_size=info.world_size,
        micro_batch=config.schedule.micro_batch_size,
        grad_accum=config.schedule.grad_accum_steps,
        max_tokens=config.data.max_tokens,
        seed=config.seed,
        processor=processor,
        num_workers=config.data.num_workers,
        pin_memory=cuda,
        packing=config.data.packing,
        limit=config.data.limit_train,
        resume=resume_state["data"] if resume_state else None,
    )
    steps_per_epoch = loader.num_steps(0)
    total_steps = config.schedule.max_steps or max(1, math.ceil(config.schedule.epochs * steps_per_epoch))
    warmup = config.schedule.warmup_steps or int(config.schedule.warmup_ratio * total_steps)

    def make_scheduler(optimizer: Any) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_lambda(
                s, total_steps, warmup, config.schedule.lr_scheduler, config.schedule.min_lr_ratio
            ),
        )

    engine, _, _, scheduler = deepspeed.initialize(
        model=engine_module,
        model_parameters=trainable,
        optimizer=client_optimizer,
        lr_scheduler=make_scheduler,
        config=ds_config,
    )
    zero3 = zero_stage(ds_config) == 3
    step = 0
    skipped_steps = consecutive_skips = 0
    if resume_dir is not None:
        assert resume_state is not None
        if info.is_main and ckpt.needs_universal(resume_state, info.world_size):
            print(
                f"train: resuming {resume_dir} (written by {resume_state['world_size']} ranks) at world size "
                f"{info.world_size} through DeepSpeed's universal checkpoint",
                file=sys.stderr,
            )
        ckpt.load(engine, resume_dir, info.is_main)
        step = int(resume_state["step"])
        skipped_steps = int(resume_state.get("skipped_steps", 0))
        if info.is_main and resume_state.get("config_hash") != config_hash(config):
            print(
                f"train: warning: resuming {resume_dir} with a changed config (hash "
                f"{resume_state.get('config_hash')} -> {config_hash(config)})",
                file=sys.stderr,
            )

    eval_batches: list[Any] | None = None
    if config.data.test:
        eval_loader = EvalLoader(
            [config.data.test],
            rank=info.rank,
            world_size=info.world_size,
            micro_batch=config.schedule.micro_batch_size,
            max_tokens=config.data.max_tokens,
            processor=processor,
            packing=config.data.packing,
            limit=config.eval.max_samples or config.data.limit_test,
        )
        eval_batches = list(eval_loader)  # fixed batches, reused at every evaluation

    def evaluate() -> dict[str, float]:
        from trainer.evaluate import nelbo_eval

        assert eval_batches is not None
        return nelbo_eval(
            model,
            eval_batches,
            mask_token_id=model.mask_token_id,
            language=engine,
            t_grid=config.eval.t_grid,
            accuracy_t=config.eval.accuracy_t,
            schedule=config.diffusion.schedule,
            shift=config.diffusion.shift,
            seed=config.seed,
            chunk_size=config.diffusion.ce_chunk_size,
            device=info.device,
        )

    def save() -> Path:
        state = {
            "step": step,
            "data": loader.state(),
            "config_hash": config_hash(config),
            "world_size": info.world_size,
            "global_batch_size": global_batch_size(config, info.world_size),
            "skipped_steps": skipped_steps,
            "zero_stage": zero_stage(ds_config),
            "lora": config.lora.enabled,
            "model": config.model.name_or_path,
            "mask_token_id": model.mask_token_id,
            # The whole resolved config, so export needs nothing but the checkpoint directory.
            "config": to_dict(config),
        }
        return ckpt.save(engine, output_dir, step, state, config.checkpoint.keep_last, zero3, info.is_main)

    fm = flops_model(model, config.lora.enabled)
    peak = peak_flops(info.device, precision)
    writer = MetricsWriter(output_dir, info.is_main, config.logging.tensorboard)
    stop = StopSignal()
    stop.install()
    progress: Any = None
    if info.is_main and config.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)

    result = TrainResult(step=step)
    launch_start_step = step
    last_saved = step if resume_dir is not None else -1
    start = time.perf_counter()
    interval = {"time": 0.0, "wait": 0.0, "tokens": 0, "samples": 0, "flops": 0.0}
    eval_metrics: dict[str, float] = {}
    data_iter = iter(loader)
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            item = next(data_iter)  # the plan is endless and equal on every rank: no rank runs dry
            t1 = time.perf_counter()
            lr = float(scheduler.get_last_lr()[0])  # the rate this step's update uses
            stats = train_step(engine, model, item.micro_batches, step, config, info, fm, zero3)
            step += 1
            t2 = time.perf_counter()
            result.losses.append(stats.loss)
            if stats.skipped:
                skipped_steps += 1
                consecutive_skips += 1
                if consecutive_skips >= config.schedule.max_consecutive_skips:
                    raise TrainingError(
                        f"{consecutive_skips} non-finite steps in a row (last at step {step}): lower optim.lr, "
                        "check the data, or use bf16/fp32 instead of fp16"
                    )
            else:
                consecutive_skips = 0
            interval["time"] += t2 - t0
            interval["wait"] += t1 - t0
            interval["tokens"] += stats.num_tokens
            interval["samples"] += stats.num_samples
            interval["flops"] += stats.flops

            if step % config.logging.log_every == 0 or step == total_steps:
                skipped_samples = _all_ranks_counter(loader.num_skipped)
                seconds = max(interval["time"], 1e-9)
                record: dict[str, Any] = {
                    "step": step,
                    "epoch": item.epoch,
                    "loss": stats.loss,
                    "ce_per_masked": stats.ce_per_masked,
                    "lr": lr,
                    "grad_norm": stats.grad_norm if math.isfinite(stats.grad_norm) else None,
                    "tokens_per_s": interval["tokens"] / seconds,
                    "tokens_per_s_per_device": interval["tokens"] / seconds / info.world_size,
                    "samples_per_s": interval["samples"] / seconds,
                    "mfu": interval["flops"] / seconds / info.world_size / peak if peak else None,
                    "data_wait_fraction": interval["wait"] / seconds,
                    "peak_memory_gib": _peak_memory_gib(info.device),
                    "mean_t": stats.mean_t,
                    "num_tokens": stats.num_tokens,
                    "num_answer_tokens": stats.num_answer_tokens,
                    "num_masked": stats.num_masked,
                    "skipped_steps": skipped_steps,
                    "skipped_samples": skipped_samples,
                    "elapsed_s": time.perf_counter() - start,
                }
                writer.write(record)
                interval = {"time": 0.0, "wait": 0.0, "tokens": 0, "samples": 0, "flops": 0.0}
            if progress is not None:
                progress.update(1)
                progress.set_postfix(
                    loss=f"{stats.loss:.4f}", tok_s=f"{stats.num_tokens / max(t2 - t0, 1e-9):.0f}"
                )

            if eval_batches is not None and config.eval.every and step % config.eval.every == 0:
                eval_metrics = evaluate()
                writer.write({"kind": "eval", "step": step, **eval_metrics})
            if config.checkpoint.save_every and step % config.checkpoint.save_every == 0:
                result.last_checkpoint = str(save())
                last_saved = step
            # Stop signals and the limits: every rank checkpoints and leaves at the same step.
            timed_out = (
                bool(config.schedule.time_limit_s)
                and time.perf_counter() - start >= config.schedule.time_limit_s
            )
            steps_done = bool(config.schedule.exit_after_steps) and (
                step - launch_start_step >= config.schedule.exit_after_steps
            )
            (stop_now,) = distributed.agree_any(stop.received is not None or timed_out or steps_done)
            if stop_now and step < total_steps:
                if last_saved != step:
                    result.last_checkpoint = str(save())
                    last_saved = step
                result.stopped_early = True
                if info.is_main:
                    why = (
                        "signal"
                        if stop.received is not None
                        else "time limit"
                        if timed_out
                        else "schedule.exit_after_steps"
                    )
                    print(
                        f"train: stopped by {why} at step {step}; resume with --resume auto", file=sys.stderr
                    )
                break
        if not result.stopped_early:
            if (
                eval_batches is not None
                and config.eval.at_end
                and (not config.eval.every or step % config.eval.every)
            ):
                eval_metrics = evaluate()
                writer.write({"kind": "eval", "step": step, **eval_metrics})
            if config.checkpoint.save_at_end and last_saved != step:
                result.last_checkpoint = str(save())
    finally:
        stop.restore()
        writer.close()
        if progress is not None:
            progress.close()
    result.step = step
    result.eval = eval_metrics
    if result.last_checkpoint is None:
        latest = ckpt.latest_valid(ckpt.checkpoint_root(output_dir))
        result.last_checkpoint = str(latest) if latest else None
    return result


def _all_ranks_counter(counter: Any) -> dict[str, int]:
    """Sum a per-rank Counter of skip reasons over all ranks."""
    import torch.distributed as dist

    local = dict(counter)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    total: dict[str, int] = {}
    for part in gathered:
        for reason, count in part.items():
            total[reason] = total.get(reason, 0) + int(count)
    return total


# ---------------------------------------------------------------------------------------------
# Dry run


def dry_run_report(config: TrainConfig, ds_config: dict[str, Any], world_size: int) -> str:
    """Resolved config, world size, steps per epoch and a per-device memory estimate (no weights loaded)."""
    from trainer.data import Planner, PlanSpec, load_catalog

    lines = [dump_yaml(config).rstrip(), ""]
    dirs, weights = _shard_specs(config.data.train)
    catalog = load_catalog(dirs, config.data.limit_train)
    s = config.schedule
    spec = PlanSpec(
        weights=tuple(weights),
        seed=config.seed,
        max_tokens=config.data.max_tokens,
        packs_per_step=s.micro_batch_size * s.grad_accum_steps * world_size,
        packing=config.data.packing,
    )
    plan = Planner(catalog, spec).plan(0)
    total = s.max_steps or max(1, math.ceil(s.epochs * plan.num_steps))
    lines += [
        f"world size: {world_size}",
        f"global batch: {global_batch_size(config, world_size)} rows of <= {config.data.max_tokens} tokens "
        f"({s.micro_batch_size} per micro-batch x {s.grad_accum_steps} accumulation x {world_size} ranks)",
        f"samples: {len(catalog)} ({plan.num_too_long} longer than max_tokens), packing efficiency "
        f"{plan.packing_efficiency:.3f}",
        f"steps per epoch: {plan.num_steps}; total steps: {total}",
        f"zero stage: {zero_stage(ds_config)}; precision: {'bf16' if ds_config['bf16']['enabled'] else 'fp16' if ds_config['fp16']['enabled'] else 'fp32'}",
    ]
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


# ---------------------------------------------------------------------------------------------
# CLI


def _split_argv(argv: list[str]) -> tuple[str | None, bool, list[str]]:
    """Pull out --config, --dry-run and the launcher's --local_rank; the rest are overrides."""
    config_file: str | None = None
    dry_run = False
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--dry-run", "--dry_run"):
            dry_run = True
        elif arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file")
            config_file = argv[i + 1]
            i += 1
        elif arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg.startswith(("--local_rank", "--local-rank")):
            # deepspeed's launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
            if "=" not in arg:
                i += 1
        else:
            rest.append(arg)
        i += 1
    return config_file, dry_run, rest


USAGE = """usage: python -m trainer train [--config FILE.yaml] [--dry-run] [--group.key VALUE ...] [--hf_alias VALUE ...]

Overrides are dotted config keys (--optim.lr 1e-4, --schedule.max_steps 100) or Hugging Face
Trainer-style names (--learning_rate, --per_device_train_batch_size, --lora False, --resume auto, ...).
See trainer/config.py for every field."""


def main(argv: list[str]) -> int:
    """``python -m trainer train``: exit 0 on success (also after a signal/time-limit checkpoint)."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        config_file, dry_run, overrides = _split_argv(argv)
        config = load_config(config_file, overrides)
        resume_dir, ds_config = _prepare(config)
        if dry_run:
            print(dry_run_report(config, ds_config, distributed.env_world_size()))
            if resume_dir is not None:
                print(f"resume from: {resume_dir}")
            return 0
    except (ConfigError, ckpt.ResumeError, ValueError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    try:
        result = run(config)
    except TrainingError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {
            "step": result.step,
            "stopped_early": result.stopped_early,
            "last_checkpoint": result.last_checkpoint,
        }
        if result.losses:
            summary["last_loss"] = result.losses[-1]
        if result.eval:
            summary["eval"] = result.eval
        print("train: done " + json.dumps(summary))
    return 0
