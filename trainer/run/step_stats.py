"""The numbers of one optimizer step: this rank's sums over its micro-batches, their one all-rank
reduction, and the step's global statistics (what ``Trainer.train_step`` returns and the run logs).

Nothing here reads the device inside the micro-batch loop: the host counts each micro-batch from its
host tensors and the noise drawn on the host (:meth:`StepSums.count_host`), the loss sums stay on the
device (:func:`loss_sums`) until :meth:`StepSums.reduced` reads them with the all-reduce of the step.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING

import torch

from trainer.run import distributed
from trainer.run.flops import FlopsModel, step_flops, sum_sq_doc_len

if TYPE_CHECKING:
    from trainer.data import PackedBatch
    from trainer.model import MDLMOutput
    from trainer.model.diffusion import MaskedTargets

NUM_LOSS_SUMS = 3
"""weighted_ce, ce and num_nonfinite: the first :class:`StepSums`, added up on the device."""


def loss_sums(out: MDLMOutput) -> torch.Tensor:
    """One micro-batch's weighted CE, CE and non-finite flag on its device (float64, added up there)."""
    # A non-finite loss gives non-finite gradients: DeepSpeed then skips the update on every rank
    # (the global norm is invalid everywhere); it is counted here.
    finite = torch.isfinite(out.weighted_ce_sum) & torch.isfinite(out.loss.detach())
    return torch.stack([out.weighted_ce_sum, out.ce_sum, (~finite).float()]).double()


@dataclass
class StepStats:
    """Global (all-rank) numbers of one optimizer step."""

    loss: float
    """sum(loss_weight * CE) over masked tokens / what the answer tokens weigh (the objective)."""
    ce_per_masked: float
    """Plain CE per masked token."""
    grad_norm: float
    """Global gradient norm before clipping (inf/nan when the step was skipped)."""
    skipped: bool
    """The update was skipped on every rank (non-finite loss or gradients)."""
    num_tokens: int
    num_answer_tokens: int
    """Answer tokens, pads included."""
    num_masked: int
    num_samples: int
    mean_t: float
    """Mean diffusion time over sub-sequences."""
    flops: float
    """Model FLOPs (see trainer.run.flops.step_flops)."""
    num_read: int = 0
    """Samples the loaders tried to read for this step (all ranks)."""
    num_skipped: int = 0
    """Of those, skipped."""


@dataclass
class StepSums:
    """One rank's sums over its micro-batches; summed over ranks in one all-reduce (:meth:`reduced`).

    The first :data:`NUM_LOSS_SUMS` come from the loss and stay on the device until then
    (:func:`loss_sums`); the host counts the rest (:meth:`count_host`)."""

    weighted_ce: float = 0.0
    """sum(loss_weight * CE) over masked tokens."""
    ce: float = 0.0
    """Plain CE over masked tokens."""
    num_nonfinite: float = 0.0
    """Micro-batches whose loss was not finite."""
    num_masked: float = 0.0
    num_tokens: float = 0.0
    """Real (non-padding) tokens."""
    num_samples: float = 0.0
    t_sum: float = 0.0
    """Sum of t over the sub-sequences present."""
    t_count: float = 0.0
    sum_sq_doc_len: float = 0.0
    """Attention cost (see trainer.run.flops)."""
    num_vision_tokens: float = 0.0
    """Patch tokens through the vision tower."""
    num_read: float = 0.0
    """Samples the loader tried to read for this step."""
    num_skipped: float = 0.0
    """Of those, skipped (corrupt, mismatched, out of vocabulary)."""

    def count_host(self, batch: PackedBatch, targets: MaskedTargets, t_BS: torch.Tensor) -> None:
        """Add one micro-batch's counts from its host tensors, its masked tokens and t [B, S]."""
        present = torch.zeros_like(t_BS, dtype=torch.bool)
        for row, seq in enumerate(batch.seq_ids):
            present[row, : int(seq.max().clamp(min=-1)) + 1] = True
        self.num_masked += targets.num_masked
        self.num_tokens += batch.num_real_tokens
        self.num_samples += sum(len(keys) for keys in batch.keys)
        self.t_sum += float(t_BS[present].sum())
        self.t_count += float(present.sum())
        self.sum_sq_doc_len += sum_sq_doc_len(batch.seq_ids)
        if batch.pixel_values is not None:
            self.num_vision_tokens += int(batch.pixel_values.shape[0])

    def reduced(self, loss_sums: torch.Tensor) -> StepSums:
        """The sums over all ranks (float64, so counts stay exact), the loss sums from ``loss_sums``
        (this rank's, on its device): one collective and one read from the device per step."""
        host = torch.tensor(astuple(self)[NUM_LOSS_SUMS:], dtype=torch.float64)
        return StepSums(*distributed.all_reduce_sum(torch.cat([loss_sums, host.to(loss_sums.device)])))

    def stats(
        self, num_answer_tokens: float, normaliser: float, grad_norm: float, fm: FlopsModel
    ) -> StepStats:
        """The step's numbers from all-rank sums; ``normaliser``: what the answer tokens weigh
        (``num_answer_tokens`` unless ``diffusion.pad_weight`` caps the pads)."""
        return StepStats(
            loss=self.weighted_ce / max(normaliser, 1.0),
            ce_per_masked=self.ce / max(self.num_masked, 1.0),
            grad_norm=grad_norm,
            # The norm is global (identical on all ranks); the loss flag was summed: one decision.
            skipped=self.num_nonfinite > 0 or not math.isfinite(grad_norm),
            num_tokens=int(self.num_tokens),
            num_answer_tokens=int(num_answer_tokens),
            num_masked=int(self.num_masked),
            num_samples=int(self.num_samples),
            mean_t=self.t_sum / max(self.t_count, 1.0),
            flops=step_flops(
                fm,
                int(self.num_tokens),
                int(self.sum_sq_doc_len),
                int(self.num_masked),
                int(self.num_vision_tokens),
            ),
            num_read=int(self.num_read),
            num_skipped=int(self.num_skipped),
        )
