"""The training loop: one ``Trainer`` with a fixed step order.

Python API::

    from trainer.config import load_config
    from trainer.run.loop import run
    result = run(load_config("configs/demo.yaml", {"schedule.max_steps": 10}))

One optimizer step, in this order on every rank:
 1. fetch this rank's micro-batches of the global step (data wait is timed);
 2. run them (``trainer.run.step.TrainStep``: the normaliser, the noise drawn on the host, forward,
    backward and the engine's step, the step's statistics in one all-reduce);
 3. agree on finiteness and count skipped steps;
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

from trainer.config import (
    TrainConfig,
    config_hash,
    global_batch_size,
    resolve_precision,
    to_dict,
    write_run_files,
    zero_stage,
)
from trainer.model import MDLMModel, build_mdlm_model
from trainer.run import checkpoint as ckpt
from trainer.run import distributed
from trainer.run.distributed import DistInfo
from trainer.run.flops import peak_flops
from trainer.run.metrics_log import MetricsWriter, Throughput, peak_memory_gib
from trainer.run.optim import client_optimizer, schedule_lengths, scheduler_factory
from trainer.run.preflight import prepare
from trainer.run.run_settings import generation_settings
from trainer.run.run_state import RunState
from trainer.run.step import TrainStep
from trainer.run.step_stats import StepStats
from trainer.run.stopping import StopAgreement

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
    from trainer.data import TrainLoader, parse_shard_specs, plan_args

    dirs, _ = parse_shard_specs(config.data.train, "data.train")
    return TrainLoader(
        dirs,
        **plan_args(config),  # what PlanSpec.from_config (the dry run, `plan`) plans with
        rank=info.rank,
        world_size=info.world_size,
        processor=processor,
        num_workers=config.data.num_workers,
        pin_memory=info.device.type == "cuda",
        limit=config.data.limit_train,
        resume=resume_state["data"] if resume_state else None,
        allow_plan_change=config.checkpoint.allow_config_change,
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


def restore(engine: DeepSpeedEngine, resume_dir: Path, state: dict[str, Any], info: DistInfo) -> None:
    """Load a checkpoint into the engine (through the universal format at another world size). What the
    config may have changed was settled before any process group (``preflight``, the resume rule)."""
    if info.is_main and ckpt.needs_universal(state, info.world_size):
        print(
            f"train: resuming {resume_dir} (written by {state['world_size']} ranks) at world size "
            f"{info.world_size} through DeepSpeed's universal checkpoint",
            file=sys.stderr,
        )
    ckpt.load(engine, resume_dir, info.is_main)


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
        self.train_step = TrainStep.for_model(config, info, self.model, self.engine, zero3=self.zero3)
        self.state = RunState()
        self.last_saved = -1
        if resume_dir is not None:
            assert resume_state is not None
            restore(self.engine, resume_dir, resume_state, info)
            self.state = RunState.from_state(resume_state)
            self.last_saved = self.state.step
            if info.is_main:  # the metrics sum the ranks' counters: the saved totals continue once
                self.loader.num_skipped.update(self.state.skipped_by_reason)
                self.loader.num_skipped_where.update(self.state.skipped_where)
        self.eval_set = build_eval_set(config, info, processor)
        self.peak_flops = peak_flops(info.device, self.precision)
        self.writer = MetricsWriter(
            self.output_dir, info.is_main, config.logging, to_dict(config), resuming=resume_dir is not None
        )
        self.stop = StopAgreement(config.schedule, start_step=self.state.step)
        self.generation_settings = generation_settings(config) if info.is_main else None  # rank 0 saves them

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
        stats = self.train_step(
            item.micro_batches, self.state.step, item.num_read, sum(item.skipped.values())
        )
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
            "num_tokens": stats.num_tokens, "num_samples": stats.num_samples,
            "num_answer_tokens": stats.num_answer_tokens, "num_masked": stats.num_masked, "skipped_steps": self.state.skipped_steps,
            "skipped_samples": skipped_samples, "elapsed_s": time.perf_counter() - self.stop.start_time,
        })  # fmt: skip

    def evaluate(self) -> dict[str, float]:
        """Held-out NELBO and masked accuracy on every rank (logged by rank 0)."""
        from trainer.run.nelbo import nelbo_eval

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
    """:func:`run` after :func:`trainer.run.preflight.prepare` (which the CLI calls itself, for --dry-run)."""
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
