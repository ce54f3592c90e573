"""One optimizer step of MDLM training, with its dependencies named (:class:`TrainStep`).

In this order on every rank (``TrainStep.__call__``):
 1. weigh the answer tokens of the whole global step on all ranks (one all-reduce): the normaliser,
    so the gradient does not depend on how samples were packed or sharded (docs/DESIGN.md §3); pad
    targets weigh what ``diffusion.pad_weight`` lets them (docs/DESIGN.md §10);
 2. on the host, for every micro-batch: a per-sub-sequence t, the masked answer tokens, gathered
    (its host tensors and a CPU generator: no device work), and the counts of the step statistics;
 3. per micro-batch, with no host synchronisation: frozen vision tower under no_grad (outside the
    engine, docs/DESIGN.md §2), engine forward with the loss at masked positions, engine backward,
    engine step (DeepSpeed steps the optimizer at the accumulation boundary; a non-finite gradient
    norm makes it skip the update on every rank); the loss sums stay on the device;
 4. reduce the step's statistics in one all-reduce.
The loop (``trainer.run.loop.Trainer``) fetches the micro-batches before and logs, evaluates,
checkpoints and agrees on stopping after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from trainer.model.diffusion import (
    FusedLinearCE,
    MaskedTargets,
    answer_weights,
    apply_masking,
    fused_linear_ce,
    gather_masked,
    sample_sequence_t,
)
from trainer.model.tokens import answer_pad_ids
from trainer.run import distributed
from trainer.run.flops import FlopsModel, flops_model
from trainer.run.seeding import derived_seed
from trainer.run.step_stats import NUM_LOSS_SUMS, StepStats, StepSums, loss_sums

if TYPE_CHECKING:
    from trainer.config import DiffusionConfig, TrainConfig
    from trainer.data import PackedBatch
    from trainer.model import MDLMModel, MDLMOutput
    from trainer.run.distributed import DistInfo


@dataclass
class Noise:
    """One micro-batch's noise, drawn on the host (:meth:`TrainStep.draw_noise`)."""

    noisy_input_ids: torch.Tensor
    """[B, L] long: the input with the masked tokens replaced by ``<|mask|>``."""
    targets: MaskedTargets
    """The masked tokens, gathered."""
    t_BS: torch.Tensor
    """[B, S] diffusion time per sub-sequence."""


@dataclass
class TrainStep:
    """Forward/backward every micro-batch of this rank and step the optimizer (module docstring).

    ``engine`` is the DeepSpeed engine over ``model.engine_module`` (anything with its ``__call__``,
    ``backward``, ``step`` and ``get_global_grad_norm``). :meth:`for_model` fills in the rest from
    the config the way the trainer does."""

    model: MDLMModel
    engine: Any
    diffusion: DiffusionConfig
    seed: int
    info: DistInfo
    flops: FlopsModel
    """What the step's FLOPs are counted with (``trainer.run.flops.flops_model``)."""
    pad_ids: tuple[int, ...] = ()
    """The answer-padding ids (``trainer.model.tokens.answer_pad_ids``) that ``diffusion.pad_weight`` caps."""
    zero3: bool = False
    """ZeRO-3 partitions the head: one unchunked head call per micro-batch, no fused kernel."""
    fused_ce: FusedLinearCE | None = None
    """liger-kernel's fused head + CE (``trainer.model.diffusion.fused_linear_ce``), else the chunked head."""
    train_vision: bool = False
    """The vision tower or merger trains: it runs inside the engine, with autograd."""

    @classmethod
    def for_model(
        cls, config: TrainConfig, info: DistInfo, model: MDLMModel, engine: Any, zero3: bool = False
    ) -> TrainStep:
        """The trainer's step over ``engine``: pad ids from the model's tokenizer, the fused loss where
        liger-kernel runs (never under ZeRO-3, which partitions the head's weight that it reads)."""
        return cls(
            model=model, engine=engine, diffusion=config.diffusion, seed=config.seed, info=info,
            flops=flops_model(model, config.lora.enabled), pad_ids=answer_pad_ids(model.tokenizer),
            zero3=zero3, fused_ce=None if zero3 else fused_linear_ce(info.device),
            train_vision=not (config.model.freeze_vision and config.model.freeze_merger),
        )  # fmt: skip

    def __call__(
        self, micro_batches: list[PackedBatch], step: int, num_read: int = 0, num_skipped: int = 0
    ) -> StepStats:
        """Optimizer step ``step`` (0-based; it keys the noise) over this rank's micro-batches.

        ``num_read`` / ``num_skipped``: this rank's loader counts for the step (summed with the rest)."""
        info = self.info
        weights = [self.answer_weights(batch) for batch in micro_batches]
        global_answers, global_weight = distributed.all_reduce_sum(
            [sum(mb.num_answer_tokens for mb in micro_batches), sum(float(w.sum()) for w in weights)]
        )
        # DeepSpeed averages gradients over ranks: scale each rank's share back up by the world size.
        normaliser = max(global_weight, 1.0) / info.world_size
        sums = StepSums(num_read=float(num_read), num_skipped=float(num_skipped))
        # Noise and dropout are keyed by the micro-batch's place in the global step (the plan puts
        # micro-batch m of rank r at r * grad_accum + m), never by the rank alone: a resumed run is
        # exact, also at another world size with the same micro-batch size.
        first = info.rank * len(micro_batches)
        noises = []
        for index, batch in enumerate(micro_batches):
            generator = torch.Generator().manual_seed(derived_seed(self.seed, step, first + index, 2))
            noises.append(self.draw_noise(batch, generator, weights[index]))
            sums.count_host(batch, noises[-1].targets, noises[-1].t_BS)
        # From here to the reduction nothing reads the device: the host queues every micro-batch's
        # work without waiting for the previous one.
        device_sums = torch.zeros(NUM_LOSS_SUMS, dtype=torch.float64, device=info.device)
        for index, (batch, noise) in enumerate(zip(micro_batches, noises, strict=True)):
            # Pinned by the loader on CUDA: the copy queues behind the GPU's work, the host does not wait.
            batch = batch.to(info.device, non_blocking=True)
            torch.manual_seed(derived_seed(self.seed, step, first + index, 1))
            out = self.micro_step(batch, noise, normaliser)
            self.engine.backward(out.loss, scale_wrt_gas=False)
            self.engine.step()
            device_sums += loss_sums(out)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        return sums.reduced(device_sums).stats(global_answers, global_weight, grad_norm, self.flops)

    def answer_weights(self, batch: PackedBatch) -> torch.Tensor:
        """[B, L] what each answer token of a micro-batch weighs (``diffusion.pad_weight``)."""
        return answer_weights(
            batch.input_ids, batch.answer_mask, batch.seq_ids, pad_ids=self.pad_ids,
            pad_weight=self.diffusion.pad_weight,
        )  # fmt: skip

    def draw_noise(
        self, batch: PackedBatch, generator: torch.Generator, answer_weight_BL: torch.Tensor
    ) -> Noise:
        """A t per sub-sequence and the masked answer tokens of one micro-batch, gathered: from its host
        tensors with a CPU generator, so the masked count is known without a device read."""
        cfg = self.diffusion
        t_BS = sample_sequence_t(batch.seq_ids, eps=cfg.eps, stratified=cfg.stratified_t, generator=generator)
        noisy = apply_masking(
            batch.input_ids, batch.answer_mask, batch.seq_ids, t_BS, mask_token_id=self.model.mask_token_id,
            schedule=cfg.schedule, generator=generator, answer_weight_BL=answer_weight_BL,
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
        chunk_size = None if self.zero3 else self.diffusion.ce_chunk_size
        # The loss is computed inside the engine's forward: under ZeRO-3 the tied LM head and the
        # trained mask row are gathered there.
        return self.engine(
            noise.noisy_input_ids.to(device, non_blocking=True), batch.position_ids, batch.seq_ids,
            targets=noise.targets.to(device, non_blocking=True), num_normalizer=normaliser,
            cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen, chunk_size=chunk_size,
            checkpoint_chunks=not self.zero3, fused_ce=self.fused_ce, **vision_kwargs,
        )  # fmt: skip
