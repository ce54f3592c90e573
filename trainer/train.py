"""The training loop: one ``Trainer`` with a fixed step order.

Python API::

    from trainer.config import load_config
    from trainer.train import run
    result = run(load_config("configs/demo.yaml", {"schedule.max_steps": 10}))

One optimizer step (:meth:`Trainer.train_step`), in this order on every rank:
 1. fetch this rank's micro-batches of the global step (data wait is timed);
 2. count the answer tokens of the whole global step on all ranks (one all-reduce): the normaliser,
    so the gradient does not depend on how samples were packed or sharded (docs/DESIGN.md §3);
 3. on the host, for every micro-batch: a per-sub-sequence t, the masked answer tokens, gathered
    (its host tensors and a CPU generator: no device work), and the counts of the step statistics;
 4. per micro-batch, with no host synchronisation: frozen vision tower under no_grad (outside the
    engine, docs/DESIGN.md §2), engine forward with the loss at masked positions, engine backward,
    engine step (DeepSpeed steps the optimizer at the accumulation boundary; a non-finite gradient
    norm makes it skip the update on every rank); the loss sums stay on the device;
 5. reduce the step's statistics in one all-reduce; agree on finiteness and count skipped steps;
then :meth:`Trainer.train` logs, evaluates, checkpoints and agrees on stopping (signals, limits).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer import checkpoint as ckpt
from trainer import distributed
from trainer.config import (
    TrainConfig,
    config_hash,
    global_batch_size,
    resolve_precision,
    to_dict,
    write_run_files,
    zero_stage,
)
from trainer.diffusion import MaskedTargets, apply_masking, fused_linear_ce, gather_masked, sample_sequence_t
from trainer.distributed import DistInfo
from trainer.flops import flops_model, peak_flops
from trainer.model import MDLMModel, MDLMOutput, build_mdlm_model
from trainer.optim import client_optimizer, schedule_lengths, scheduler_factory
from trainer.preflight import prepare
from trainer.run_log import MetricsWriter, Throughput, peak_memory_gib
from trainer.run_settings import generation_settings
from trainer.run_state import RunState
from trainer.seeding import derived_seed
from trainer.step_stats import NUM_LOSS_SUMS, StepStats, StepSums, loss_sums
from trainer.stopping import StopAgreement

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from trainer.data import PackedBatch, TrainLoader


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
    """True when a signal or a limit ended the run before the planned steps."""
    last_checkpoint: str | None = None
    """Directory of the newest committed checkpoint, if any."""
    eval: dict[str, float] = field(default_factory=dict)
    """Metrics of the last evaluation."""


@dataclass
class Noise:
    """One micro-batch's noise, drawn on the host (:meth:`Trainer.draw_noise`)."""

    noisy_input_ids: torch.Tensor
    """[B, L] long: the input with the masked tokens replaced by ``<|mask|>``."""
    targets: MaskedTargets
    """The masked tokens, gathered."""
    t_BS: torch.Tensor
    """[B, S] diffusion time per sub-sequence."""


# ---------------------------------------------------------------------------------------------
# Assembly (small functions that Trainer.__init__ calls in order)


def build_training_model(config: TrainConfig, precision: str, info: DistInfo) -> MDLMModel:
    """The assembled model on this rank's device (same initial adapter weights on every rank)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    torch.manual_seed(config.seed)
    model = build_mdlm_model(config.model, config.lora, dtype=dtype)
    model.base_model.to(info.device)
    frozen_tower = config.model.freeze_vision and config.model.freeze_merger
    if frozen_tower and info.device.type == "cuda" and torch.cuda.is_bf16_supported():
        # docs/DESIGN.md §2: the frozen tower runs in bf16 on GPU whatever the training precision (its
        # features take the language model's dtype where they are scattered in).
        model.visual.to(torch.bfloat16)
    # from_pretrained returns the model in eval mode, where Hugging Face layers skip gradient
    # checkpointing: the trainable half trains in train mode (the frozen tower stays in eval).
    model.engine_module.train()
    if config.model.compile:
        model.compile_language_layers()
    return model


def build_engine(
    config: TrainConfig, ds_config: dict[str, Any], model: MDLMModel, total_steps: int, warmup_steps: int
) -> tuple[DeepSpeedEngine, torch.optim.lr_scheduler.LambdaLR]:
    """The DeepSpeed engine over the trainable half of the model, and its learning-rate scheduler."""
    import deepspeed

    trainable = [p for p in model.engine_module.parameters() if p.requires_grad]
    ckpt.keep_frozen_weights_out_of_state_dict(model.engine_module)
    optimizer = None if "optimizer" in ds_config else client_optimizer(config, trainable)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model.engine_module,
        model_parameters=trainable,
        optimizer=optimizer,
        lr_scheduler=scheduler_factory(config, total_steps, warmup_steps),
        config=ds_config,
    )
    return engine, scheduler


def build_train_loader(
    config: TrainConfig, info: DistInfo, processor: Any, resume_state: dict[str, Any] | None
) -> TrainLoader:
    """This rank's ``TrainLoader``, positioned at the resumed step."""
    from trainer.data import TrainLoader, parse_shard_specs

    dirs, weights = parse_shard_specs(config.data.train)
    return TrainLoader(
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
        pin_memory=info.device.type == "cuda",
        packing=config.data.packing,
        drop_remainder=config.data.drop_remainder,
        limit=config.data.limit_train,
        resume=resume_state["data"] if resume_state else None,
    )


@dataclass
class EvalSet:
    """The fixed held-out batches of this rank, and the samples skipped building them (all ranks)."""

    batches: list[PackedBatch]
    skipped: dict[str, int]


def build_eval_set(config: TrainConfig, info: DistInfo, processor: Any) -> EvalSet | None:
    """This rank's fixed held-out batches, reused at every evaluation (None without a test set).

    Corrupt held-out samples are skipped and counted like training ones (every rank takes part in
    the count, a collective); the count goes into every evaluation record."""
    from trainer.data import EvalLoader

    if not config.data.test:
        return None
    loader = EvalLoader(
        [config.data.test],
        rank=info.rank,
        world_size=info.world_size,
        micro_batch=config.schedule.micro_batch_size,
        max_tokens=config.data.max_tokens,
        processor=processor,
        packing=config.data.packing,
        limit=config.eval.max_samples or config.data.limit_test,
    )
    batches = list(loader)
    skipped = distributed.all_ranks_counter(loader.num_skipped)
    if skipped and info.is_main:
        print(f"train: warning: held-out samples skipped: {skipped}", file=sys.stderr)
    return EvalSet(batches, skipped)


def restore(
    engine: DeepSpeedEngine, resume_dir: Path, state: dict[str, Any], config: TrainConfig, info: DistInfo
) -> None:
    """Load a checkpoint into the engine (through the universal format at another world size)."""
    if info.is_main and ckpt.needs_universal(state, info.world_size):
        print(
            f"train: resuming {resume_dir} (written by {state['world_size']} ranks) at world size "
            f"{info.world_size} through DeepSpeed's universal checkpoint",
            file=sys.stderr,
        )
    ckpt.load(engine, resume_dir, info.is_main)
    if info.is_main and state.get("config_hash") != config_hash(config):
        print(
            f"train: warning: resuming {resume_dir} with a changed config (hash "
            f"{state.get('config_hash')} -> {config_hash(config)})",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Model, engine, loaders, checkpointer, metrics and stop agreement of one run on one rank."""

    def __init__(
        self, config: TrainConfig, ds_config: dict[str, Any], resume_dir: Path | None, info: DistInfo
    ):
        self.config, self.ds_config, self.info = config, ds_config, info
        cuda = info.device.type == "cuda"
        self.precision = resolve_precision(config, cuda, cuda and torch.cuda.is_bf16_supported())
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = config.deepspeed.tf32
            torch.backends.cudnn.allow_tf32 = config.deepspeed.tf32
        self.output_dir = Path(config.output_dir)
        if info.is_main:
            if resume_dir is None and config.checkpoint.overwrite_output_dir:
                ckpt.clear_run(self.output_dir)
            write_run_files(config, ds_config)
        # Rank 0 creates the run folder before any rank opens files in it.
        distributed.barrier()
        resume_state = ckpt.read_state(resume_dir) if resume_dir is not None else None

        self.model = build_training_model(config, self.precision, info)
        processor = self.model.processor  # loaded with the model (a Qwen tokenizer takes ~2 s to load)
        self.loader = build_train_loader(config, info, processor, resume_state)
        self.total_steps, warmup = schedule_lengths(config, self.loader.num_steps(0))
        self.engine, self.scheduler = build_engine(config, ds_config, self.model, self.total_steps, warmup)
        self.zero3 = zero_stage(ds_config) == 3
        # The fused head + CE reads the head's weight, which ZeRO-3 partitions (only a call of the
        # module gathers it): ZeRO-3 keeps the chunked head.
        self.fused_ce = None if self.zero3 else fused_linear_ce(info.device)
        self.train_vision = not (config.model.freeze_vision and config.model.freeze_merger)
        self.state = RunState()
        self.last_saved = -1
        if resume_dir is not None:
            assert resume_state is not None
            restore(self.engine, resume_dir, resume_state, config, info)
            self.state = RunState.from_state(resume_state)
            self.last_saved = self.state.step
            if info.is_main:  # the metrics sum the ranks' counters: the saved totals continue once
                self.loader.num_skipped.update(self.state.skipped_by_reason)
                self.loader.num_skipped_where.update(self.state.skipped_where)
        self.eval_set = build_eval_set(config, info, processor)
        self.flops_model = flops_model(self.model, config.lora.enabled)
        self.peak_flops = peak_flops(info.device, self.precision)
        self.writer = MetricsWriter(
            self.output_dir, info.is_main, config.logging, to_dict(config), resuming=resume_dir is not None
        )
        self.stop = StopAgreement(config.schedule, start_step=self.state.step)
        self.generation_settings = generation_settings(config) if info.is_main else None  # rank 0 saves them

    # -- one optimizer step -----------------------------------------------------------------------

    def train_step(
        self, micro_batches: list[PackedBatch], num_read: int = 0, num_skipped: int = 0
    ) -> StepStats:
        """Forward/backward every micro-batch of this rank and step the optimizer (module docstring).

        ``num_read`` / ``num_skipped``: this rank's loader counts for the step (summed with the rest)."""
        info = self.info
        # The normaliser: answer tokens of the whole global step.
        (global_answers,) = distributed.all_reduce_sum([sum(mb.num_answer_tokens for mb in micro_batches)])
        # DeepSpeed averages gradients over ranks: scale each rank's share back up by the world size.
        normaliser = max(global_answers, 1.0) / info.world_size
        sums = StepSums(num_read=float(num_read), num_skipped=float(num_skipped))
        # Noise and dropout are keyed by the micro-batch's place in the global step (the plan puts
        # micro-batch m of rank r at r * grad_accum + m), never by the rank alone: a resumed run is
        # exact, also at another world size with the same micro-batch size.
        first = info.rank * len(micro_batches)
        noises = []
        for index, batch in enumerate(micro_batches):
            generator = torch.Generator().manual_seed(
                derived_seed(self.config.seed, self.state.step, first + index, 2)
            )
            noises.append(self.draw_noise(batch, generator))
            sums.count_host(batch, noises[-1].targets, noises[-1].t_BS)
        # From here to the reduction nothing reads the device: the host queues every micro-batch's
        # work without waiting for the previous one.
        device_sums = torch.zeros(NUM_LOSS_SUMS, dtype=torch.float64, device=info.device)
        for index, (batch, noise) in enumerate(zip(micro_batches, noises, strict=True)):
            # Pinned by the loader on CUDA: the copy queues behind the GPU's work, the host does not wait.
            batch = batch.to(info.device, non_blocking=True)
            torch.manual_seed(derived_seed(self.config.seed, self.state.step, first + index, 1))
            out = self.micro_step(batch, noise, normaliser)
            self.engine.backward(out.loss, scale_wrt_gas=False)
            self.engine.step()
            device_sums += loss_sums(out)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        return sums.reduced(device_sums).stats(global_answers, grad_norm, self.flops_model)

    def draw_noise(self, batch: PackedBatch, generator: torch.Generator) -> Noise:
        """A t per sub-sequence and the masked answer tokens of one micro-batch, gathered: from its host
        tensors with a CPU generator, so the masked count is known without a device read."""
        cfg = self.config.diffusion
        t_BS = sample_sequence_t(batch.seq_ids, eps=cfg.eps, stratified=cfg.stratified_t, generator=generator)
        noisy = apply_masking(
            batch.input_ids, batch.answer_mask, batch.seq_ids, t_BS, mask_token_id=self.model.mask_token_id,
            schedule=cfg.schedule, generator=generator,
        )  # fmt: skip
        targets = gather_masked(
            noisy.target_ids, noisy.masked, noisy.loss_weight, shift=cfg.shift, seq_ids_BL=batch.seq_ids
        )
        return Noise(noisy.noisy_input_ids, targets, t_BS)

    def micro_step(self, batch: PackedBatch, noise: Noise, normaliser: float) -> MDLMOutput:
        """The engine's forward with the loss: one micro-batch on the device, its noise from the host."""
        device = self.info.device
        vision_kwargs: dict[str, Any] = {}
        if self.train_vision:
            vision_kwargs = {"pixel_values": batch.pixel_values, "image_grid_thw": batch.image_grid_thw}
        elif batch.pixel_values is not None:
            # Frozen tower, outside the engine, no autograd (docs/DESIGN.md §2).
            vision_kwargs = {"vision": self.model.vision_features(batch.pixel_values, batch.image_grid_thw)}
        # ZeRO-3 gathers the head at every call, so every rank calls it once per micro-batch: one
        # chunk, whatever this rank's masked count (a rank with none calls it on a placeholder), no
        # collective. Its logits are kept for backward: ZeRO-3 does not re-gather a weight inside a
        # checkpoint recompute.
        chunk_size = None if self.zero3 else self.config.diffusion.ce_chunk_size
        # The loss is computed inside the engine's forward: under ZeRO-3 the tied LM head and the
        # trained mask row are gathered there.
        return self.engine(
            noise.noisy_input_ids.to(device, non_blocking=True), batch.position_ids, batch.seq_ids,
            targets=noise.targets.to(device, non_blocking=True), num_normalizer=normaliser,
            cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen, chunk_size=chunk_size,
            checkpoint_chunks=not self.zero3, fused_ce=self.fused_ce, **vision_kwargs,
        )  # fmt: skip

    # -- the loop ---------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """The fixed step order (:meth:`step_once`) until the schedule ends or the ranks agree to stop."""
        result = TrainResult(step=self.state.step)
        meter = Throughput()
        progress = self.progress_bar()
        # The plan is endless and equal on every rank: no rank runs dry. Closing it ends the workers.
        with self.stop, self.writer, contextlib.closing(iter(self.loader)) as data:
            while self.state.step < self.total_steps and not result.stopped_early:
                try:
                    self.step_once(data, result, meter, progress)
                except Exception as err:
                    # A collective's timeout names the collective; this says where in the run it was.
                    if hasattr(err, "add_note"):
                        err.add_note(
                            f"after optimizer step {self.state.step} of {self.total_steps} on rank {self.info.rank}"
                        )
                    raise
            if not result.stopped_early:
                result.eval = self.finish(result) or result.eval
        if progress is not None:
            progress.close()
        result.step = self.state.step
        if result.last_checkpoint is None:
            latest = ckpt.latest_valid(ckpt.checkpoint_root(self.output_dir))
            result.last_checkpoint = str(latest) if latest else None
        return result

    def step_once(self, data: Any, result: TrainResult, meter: Throughput, progress: Any) -> None:
        """One optimizer step, then skip counts, the log line, evaluation, checkpoint and stop agreement."""
        t0 = time.perf_counter()
        item = next(data)
        t1 = time.perf_counter()
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step's update uses
        stats = self.train_step(item.micro_batches, item.num_read, sum(item.skipped.values()))
        self.state.step += 1
        t2 = time.perf_counter()
        result.losses.append(stats.loss)
        self.count_skips(stats)
        self.check_skip_budget(stats)
        meter.add(t2 - t0, t1 - t0, stats.num_tokens, stats.num_samples, stats.flops)
        if self.state.step % self.config.logging.log_every == 0 or self.state.step == self.total_steps:
            self.log_step(stats, lr, item.epoch, meter)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                loss=f"{stats.loss:.4f}", tok_s=f"{stats.num_tokens / max(t2 - t0, 1e-9):.0f}"
            )
        if (
            self.eval_set is not None
            and self.config.eval.every
            and self.state.step % self.config.eval.every == 0
        ):
            result.eval = self.evaluate()
        if self.config.checkpoint.save_every and self.state.step % self.config.checkpoint.save_every == 0:
            result.last_checkpoint = str(self.save())
        why = self.stop.check(self.state.step)
        if why is not None and self.state.step < self.total_steps:
            result.last_checkpoint = self.stop_early(why) or result.last_checkpoint
            result.stopped_early = True

    def progress_bar(self) -> Any:
        """A tqdm bar on rank 0 when ``logging.progress`` (else None)."""
        if not (self.info.is_main and self.config.logging.progress):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps, initial=self.state.step, desc="train", dynamic_ncols=True, file=sys.stderr
        )

    def count_skips(self, stats: StepStats) -> None:
        """Count skipped (non-finite) steps; too many in a row end the run."""
        if not stats.skipped:
            self.state.consecutive_skips = 0
            return
        self.state.skipped_steps += 1
        self.state.consecutive_skips += 1
        if self.state.consecutive_skips >= self.config.schedule.max_consecutive_skips:
            raise TrainingError(
                f"{self.state.consecutive_skips} non-finite steps in a row (last at step {self.state.step}): lower optim.lr, "
                "check the data, or use bf16/fp32 instead of fp16"
            )

    def check_skip_budget(self, stats: StepStats) -> None:
        """Stop (every rank together: the counts are global) once too many samples were skipped."""
        self.state.samples_read += stats.num_read
        self.state.samples_skipped += stats.num_skipped
        if self.state.samples_skipped <= self.config.data.max_skip_fraction * self.state.samples_read:
            return
        where = distributed.all_ranks_counter(self.loader.num_skipped_where)
        table = "\n".join(f"  {count:>8}  {reason:<20} {shard}" for (reason, shard), count in sorted(
            ((tuple(key.split(" ", 1)), count) for key, count in where.items()), key=lambda kv: -kv[1]
        ))  # fmt: skip
        raise TrainingError(
            f"{self.state.samples_skipped} of {self.state.samples_read} samples read were skipped by step {self.state.step} "
            f"(more than data.max_skip_fraction = {self.config.data.max_skip_fraction}); check the shards with "
            f"`python -m data_tools verify DIR`, or raise data.max_skip_fraction:\n    count  reason               shard\n{table}"
        )

    def log_step(self, stats: StepStats, lr: float, epoch: int, meter: Throughput) -> None:
        """One metrics line (every rank takes part: skipped samples are summed over ranks)."""
        skipped_samples = distributed.all_ranks_counter(self.loader.num_skipped)
        self.writer.write({
            "step": self.state.step, "epoch": epoch, "loss": stats.loss, "ce_per_masked": stats.ce_per_masked,
            "lr": lr, "grad_norm": stats.grad_norm if math.isfinite(stats.grad_norm) else None,
            **meter.record(self.info.world_size, self.peak_flops),
            "peak_memory_gib": peak_memory_gib(self.info.device), "mean_t": stats.mean_t,
            "num_tokens": stats.num_tokens, "num_answer_tokens": stats.num_answer_tokens,
            "num_masked": stats.num_masked, "skipped_steps": self.state.skipped_steps,
            "skipped_samples": skipped_samples, "elapsed_s": time.perf_counter() - self.stop.start_time,
        })  # fmt: skip

    def evaluate(self) -> dict[str, float]:
        """Held-out NELBO and masked accuracy on every rank (logged by rank 0)."""
        from trainer.nelbo import nelbo_eval

        assert self.eval_set is not None
        cfg = self.config
        metrics = nelbo_eval(
            self.model, self.eval_set.batches, mask_token_id=self.model.mask_token_id, language=self.engine,
            t_grid=cfg.eval.t_grid, accuracy_t=cfg.eval.accuracy_t, schedule=cfg.diffusion.schedule,
            shift=cfg.diffusion.shift, seed=cfg.seed, device=self.info.device,
        )  # fmt: skip
        self.writer.write(
            {"kind": "eval", "step": self.state.step, **metrics, "skipped_samples": self.eval_set.skipped}
        )
        return metrics

    def save(self) -> Path:
        """Commit a checkpoint of this step (every rank calls it)."""
        cfg, info = self.config, self.info
        self.state.skipped_by_reason = distributed.all_ranks_counter(self.loader.num_skipped)
        self.state.skipped_where = distributed.all_ranks_counter(self.loader.num_skipped_where)
        state = {
            **self.state.to_state(), "data": self.loader.state(), "config_hash": config_hash(cfg),
            "world_size": info.world_size, "global_batch_size": global_batch_size(cfg, info.world_size),
            "zero_stage": zero_stage(self.ds_config),
            "lora": cfg.lora.enabled, "model": cfg.model.name_or_path, "mask_token_id": self.model.mask_token_id,
            # The whole resolved config, so export needs nothing but the checkpoint directory.
            "config": to_dict(cfg),
        }  # fmt: skip
        path = ckpt.save(
            self.engine, self.output_dir, self.state.step, state, cfg.checkpoint.keep_last, self.zero3, info.is_main,
            self.generation_settings,
        )  # fmt: skip
        self.last_saved = self.state.step
        return path

    def stop_early(self, why: str) -> str | None:
        """Checkpoint (unless this step just was) and say so; returns the new checkpoint, if any."""
        path = str(self.save()) if self.last_saved != self.state.step else None
        if self.info.is_main:
            print(
                f"train: stopped by {why} at step {self.state.step}; resume with --resume auto",
                file=sys.stderr,
            )
        return path

    def finish(self, result: TrainResult) -> dict[str, float] | None:
        """The end-of-run evaluation and checkpoint (unless the last step already did them)."""
        metrics = None
        cfg = self.config
        if (
            self.eval_set is not None
            and cfg.eval.at_end
            and (not cfg.eval.every or self.state.step % cfg.eval.every)
        ):
            metrics = self.evaluate()
        if cfg.checkpoint.save_at_end and self.last_saved != self.state.step:
            result.last_checkpoint = str(self.save())
        return metrics


def run(config: TrainConfig) -> TrainResult:
    """Train as ``config`` says (the Python API of ``python -m trainer train``).

    Works in a plain process (world size 1) and under deepspeed / torchrun (one call per rank).
    Raises ``ConfigError`` / ``ResumeError`` on user errors before any process group starts.
    """
    return run_prepared(config, *prepare(config))


def run_prepared(config: TrainConfig, resume_dir: Path | None, ds_config: dict[str, Any]) -> TrainResult:
    """:func:`run` after :func:`trainer.preflight.prepare` (which the CLI calls itself, for --dry-run)."""
    lock = ckpt.RunLock(config.output_dir)
    if distributed.env_rank() == 0:
        lock.acquire()  # before any process group: a second run on this output_dir ends here
    try:
        info = distributed.setup(config.distributed.timeout_s)
        # An error leaves at once, entering no collective (no teardown barrier): the peers are in
        # their own next collective, and the launcher ends them when this process exits non-zero.
        result = Trainer(config, ds_config, resume_dir, info).train()
        distributed.teardown()
    finally:
        lock.release()  # a local file: safe on the error path, and a Python caller may run again
    return result
