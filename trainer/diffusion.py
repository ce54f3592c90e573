"""MDLM objective: noise schedules, t sampling, masking of answer tokens, the masked-position loss.

Pure torch (no deepspeed, no torch.distributed). Names (one per quantity, used everywhere): ``t`` is the diffusion time of a
sub-sequence, ``p_mask`` the probability that one of its answer tokens is replaced by ``<|mask|>``
(``p_mask = 1 - alpha_t``), ``loss_weight`` the per-token weight ``-alpha'_t / (1 - alpha_t)`` (``1/t``
for the linear schedule), ``answer_mask`` the tokens that may be masked, ``masked`` those that were,
``noisy_input_ids`` the input with ``masked`` tokens replaced. Shape suffixes: B rows, L tokens,
S sub-sequences per row, M masked tokens, H hidden, V vocabulary.

The estimator (Sahoo et al. 2024; LLaDA SFT) for one sub-sequence x with answer tokens A:

    loss(x) = E_t E_{masked ~ Bernoulli(p_mask(t)) on A} [ sum_{i masked} loss_weight(t) * CE_i ]

and the batch loss is its sum over sub-sequences divided by a normaliser (see
:func:`masked_diffusion_loss`). Only masked positions go through the LM head, in chunks: full logits
for every position would be [B, L, 151936].

``shift``: with ``shift=False`` the hidden state at position i predicts token i (the MDLM/LLaDA
convention). With ``shift=True`` the hidden state at position i-1 predicts token i (Dream /
DiffuLLaMA, which keep the next-token alignment of the autoregressive model they start from); the
masked token i itself is still the one replaced by ``<|mask|>`` in the input, and its target is
still ``target_ids[i]``. Position i-1 always exists inside the same sub-sequence because answers
follow a prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SCHEDULES: tuple[str, ...] = ("linear", "cosine")
"""Names accepted as ``schedule``."""

"""Names accepted as ``normalization``."""


# ----------------------------------------------------------------------------------------------
# Schedules


def alpha(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """Probability that a token is still clean at time t: linear ``1 - t``, cosine ``cos(pi t / 2)``."""
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":
        return torch.cos(0.5 * math.pi * t)
    raise ValueError(f"unknown noise schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


def alpha_derivative(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """d alpha / d t."""
    if schedule == "linear":
        return -torch.ones_like(t)
    if schedule == "cosine":
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)
    raise ValueError(f"unknown noise schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


def p_mask_at(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """Masking probability ``1 - alpha_t``."""
    return 1.0 - alpha(t, schedule)


def loss_weight_at(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """ELBO weight ``-alpha'_t / (1 - alpha_t)``; ``1/t`` for the linear schedule."""
    if schedule == "linear":
        return 1.0 / t  # exact, avoids 1 - (1 - t) rounding for small t
    return -alpha_derivative(t, schedule) / p_mask_at(t, schedule)


# ----------------------------------------------------------------------------------------------
# t sampling


def sample_t(
    num: int,
    *,
    eps: float = 1e-3,
    stratified: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``num`` diffusion times in ``[eps, 1)``.

    ``stratified``: ``[0, 1)`` is cut into ``num`` equal strata, one uniform draw in each, mapped to
    ``[eps, 1)`` and shuffled (so which sub-sequence gets a small t does not depend on its place in
    the batch). Lower variance than independent draws at the same expectation.
    """
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"t eps must be in [0, 1), got {eps}")
    gen_device = generator.device if generator is not None else "cpu"
    u_N = torch.rand(num, generator=generator, device=gen_device, dtype=torch.float64)
    if stratified and num > 0:
        order_N = torch.randperm(num, generator=generator, device=gen_device)
        u_N = (order_N.to(torch.float64) + u_N) / num
    t_N = eps + (1.0 - eps) * u_N
    # float64 maths, float32 result; guard the open end against rounding up to 1.
    t_N = t_N.float().clamp(max=1.0 - 1e-7)
    return t_N.to(device) if device is not None else t_N


def sample_sequence_t(
    seq_ids_BL: torch.Tensor,
    *,
    eps: float = 1e-3,
    stratified: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One t per sub-sequence of a packed batch: ``t_BS`` [B, S], S = max(seq_ids) + 1.

    Stratification runs over all sub-sequences present in the batch. Slots of rows with fewer than
    S sub-sequences get 1.0 (never used: no token carries that seq_id).
    """
    batch = seq_ids_BL.shape[0]
    num_seqs_B = seq_ids_BL.max(dim=1).values.clamp(min=-1) + 1
    width = int(num_seqs_B.max().item()) if batch else 0
    width = max(width, 1)
    present_BS = torch.arange(width, device=seq_ids_BL.device)[None, :] < num_seqs_B[:, None]
    t_N = sample_t(int(present_BS.sum().item()), eps=eps, stratified=stratified, generator=generator)
    t_BS = torch.ones(batch, width, device=seq_ids_BL.device)
    t_BS[present_BS] = t_N.to(seq_ids_BL.device)
    return t_BS


# ----------------------------------------------------------------------------------------------
# Masking


@dataclass
class MaskedBatch:
    """Result of :func:`apply_masking`."""

    noisy_input_ids: torch.Tensor
    """[B, L] long: input with masked tokens replaced by ``<|mask|>``."""
    target_ids: torch.Tensor
    """[B, L] long: the clean tokens (targets at masked positions)."""
    masked: torch.Tensor
    """[B, L] bool: tokens replaced by ``<|mask|>`` (always a subset of ``answer_mask``)."""
    answer_mask: torch.Tensor
    """[B, L] bool: the answer tokens that could be masked."""
    p_mask: torch.Tensor
    """[B, L] float: masking probability of each token (0 outside answers)."""
    loss_weight: torch.Tensor
    """[B, L] float: ``-alpha'_t / (1 - alpha_t)`` at masked tokens, 0 elsewhere."""
    t: torch.Tensor
    """[B, S] float: diffusion time of each sub-sequence."""


def per_token(values_BS: torch.Tensor, seq_ids_BL: torch.Tensor) -> torch.Tensor:
    """Spread a per-sub-sequence value [B, S] to tokens [B, L] (padding takes slot 0; mask it out)."""
    return values_BS.gather(1, seq_ids_BL.clamp(min=0))


def apply_masking(
    input_ids_BL: torch.Tensor,
    answer_mask_BL: torch.Tensor,
    seq_ids_BL: torch.Tensor,
    t_BS: torch.Tensor,
    *,
    mask_token_id: int,
    schedule: str = "linear",
    generator: torch.Generator | None = None,
) -> MaskedBatch:
    """Mask each answer token of sub-sequence (b, s) independently with probability ``p_mask(t[b, s])``.

    Prompt, image, template and padding tokens are never masked (they are outside ``answer_mask``;
    padding is excluded again through ``seq_ids = -1``).
    """
    answer_mask_BL = answer_mask_BL.bool() & (seq_ids_BL >= 0)
    t_BL = per_token(t_BS, seq_ids_BL)
    p_mask_BL = torch.where(answer_mask_BL, p_mask_at(t_BL, schedule), torch.zeros_like(t_BL))
    gen_device = generator.device if generator is not None else "cpu"
    u_BL = torch.rand(input_ids_BL.shape, generator=generator, device=gen_device).to(input_ids_BL.device)
    masked_BL = answer_mask_BL & (u_BL < p_mask_BL)
    loss_weight_BL = torch.where(masked_BL, loss_weight_at(t_BL, schedule), torch.zeros_like(t_BL))
    noisy_BL = torch.where(masked_BL, torch.full_like(input_ids_BL, mask_token_id), input_ids_BL)
    return MaskedBatch(
        noisy_input_ids=noisy_BL,
        target_ids=input_ids_BL,
        masked=masked_BL,
        answer_mask=answer_mask_BL,
        p_mask=p_mask_BL,
        loss_weight=loss_weight_BL,
        t=t_BS,
    )


# ----------------------------------------------------------------------------------------------
# Loss at masked positions


@dataclass
class MaskedCE:
    """What :func:`masked_cross_entropy` returns."""

    ce: torch.Tensor
    """[M] float32 cross-entropy per masked position."""
    correct: torch.Tensor
    """[M] 1.0 where the argmax (mask logit excluded) is the target, else 0.0 (no gradient)."""


@dataclass
class DiffusionLoss:
    """Output of :func:`masked_diffusion_loss`."""

    loss: torch.Tensor
    """Scalar to back-propagate: weighted CE sum divided by the normaliser."""
    weighted_ce_sum: torch.Tensor
    """Scalar, detached: sum over masked tokens of ``loss_weight * CE`` (before normalisation)."""
    ce_sum: torch.Tensor
    """Scalar, detached: sum over masked tokens of the plain CE (for logging)."""
    num_masked: torch.Tensor
    """Scalar long: number of masked tokens in this micro-batch."""


def gather_source_positions(
    masked_BL: torch.Tensor, *, shift: bool, seq_ids_BL: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row, target position and hidden-state position of every masked token, in row-major order.

    The hidden-state position is the target position, or the one before it with ``shift``.
    """
    rows_M, cols_M = masked_BL.nonzero(as_tuple=True)
    if not shift:
        return rows_M, cols_M, cols_M
    if bool((cols_M == 0).any()):
        raise ValueError("shift=True cannot predict a masked token at position 0: it has no predecessor")
    source_M = cols_M - 1
    if seq_ids_BL is not None and not bool(
        (seq_ids_BL[rows_M, source_M] == seq_ids_BL[rows_M, cols_M]).all()
    ):
        raise ValueError("shift=True: a masked token is the first of its sub-sequence and has no predecessor")
    return rows_M, cols_M, source_M


def _chunk_ce(
    hidden_MH: torch.Tensor,
    targets_M: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    mask_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits_MV = lm_head(hidden_MH).float()
    logits_MV[:, mask_id] = float("-inf")  # the mask token is never a prediction
    correct_M = (logits_MV.detach().argmax(dim=-1) == targets_M).float()
    return F.cross_entropy(logits_MV, targets_M, reduction="none"), correct_M


def masked_cross_entropy(
    hidden_MH: torch.Tensor,
    targets_M: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    *,
    mask_token_id: int,
    chunk_size: int = 1024,
    checkpoint_chunks: bool = True,
) -> MaskedCE:
    """Per-token CE [M] of ``lm_head(hidden)`` against ``targets`` (and whether the argmax hit it),
    ``chunk_size`` rows at a time.

    ``lm_head`` is called as a module (ZeRO-3 gathers its weight). With ``checkpoint_chunks`` (and
    grad enabled) each chunk's [chunk, V] logits are recomputed in backward instead of kept, so at
    most one chunk of logits is alive. Under ZeRO-3 every rank must call the head equally often:
    callers pass one chunk as wide as the largest masked count of any rank
    (:func:`trainer.distributed.agreed_head_chunk`) and, on a rank with nothing masked, call
    :func:`head_placeholder` instead.
    """
    if hidden_MH.shape[0] == 0:
        empty = hidden_MH.new_zeros(0, dtype=torch.float32)
        return MaskedCE(empty, empty)
    ce_pieces, correct_pieces = [], []
    for start in range(0, hidden_MH.shape[0], chunk_size):
        h_CH = hidden_MH[start : start + chunk_size]
        y_C = targets_M[start : start + chunk_size]
        if checkpoint_chunks and torch.is_grad_enabled() and h_CH.requires_grad:
            ce_C, correct_C = checkpoint(_chunk_ce, h_CH, y_C, lm_head, mask_token_id, use_reentrant=False)
        else:
            ce_C, correct_C = _chunk_ce(h_CH, y_C, lm_head, mask_token_id)
        ce_pieces.append(ce_C)
        correct_pieces.append(correct_C)
    return MaskedCE(torch.cat(ce_pieces), torch.cat(correct_pieces))


def head_placeholder(
    hidden_BLH: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """An exact 0 that depends on one ``lm_head`` call: a rank with nothing masked adds it to its
    loss so that it runs (and back-propagates through) the head as often as the other ranks."""
    return 0.0 * lm_head(hidden_BLH[:1, :1]).float().sum()


def masked_diffusion_loss(
    hidden_BLH: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    target_ids_BL: torch.Tensor,
    masked_BL: torch.Tensor,
    loss_weight_BL: torch.Tensor,
    *,
    mask_token_id: int,
    num_normalizer: float | torch.Tensor | None = None,
    answer_mask_BL: torch.Tensor | None = None,
    seq_ids_BL: torch.Tensor | None = None,
    shift: bool = False,
    chunk_size: int = 1024,
    checkpoint_chunks: bool = True,
) -> DiffusionLoss:
    """The MDLM loss at masked positions only.

    ``sum(loss_weight * CE) / num_normalizer``: pass the number of answer tokens in
    ``num_normalizer`` (the trainer makes it global across micro-batches and ranks so the gradient
    does not depend on packing or sharding; docs/DESIGN.md §3); it defaults to this batch's
    ``answer_mask`` count.
    """
    masked_BL = masked_BL.bool()
    rows_M, cols_M, source_M = gather_source_positions(masked_BL, shift=shift, seq_ids_BL=seq_ids_BL)
    ce_M = masked_cross_entropy(
        hidden_BLH[rows_M, source_M],
        target_ids_BL[rows_M, cols_M],
        lm_head,
        mask_token_id=mask_token_id,
        chunk_size=chunk_size,
        checkpoint_chunks=checkpoint_chunks,
    ).ce
    weight_M = loss_weight_BL[rows_M, cols_M].float()
    weighted_M = weight_M * ce_M
    num_masked = masked_BL.sum()

    total = weighted_M.sum()
    if num_normalizer is not None:
        divisor = num_normalizer
    else:
        if answer_mask_BL is None:
            raise ValueError("masked_diffusion_loss needs num_normalizer or answer_mask_BL")
        divisor = answer_mask_BL.bool().sum().clamp(min=1)
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(total.device, total.dtype)
    if ce_M.numel() == 0:
        total = total + head_placeholder(hidden_BLH, lm_head)
    return DiffusionLoss(
        loss=total / divisor,
        weighted_ce_sum=weighted_M.sum().detach(),
        ce_sum=ce_M.sum().detach(),
        num_masked=num_masked,
    )


def logits_at_positions(
    hidden_BLH: torch.Tensor,
    positions_BL: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    *,
    mask_token_id: int,
    shift: bool = False,
    seq_ids_BL: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float logits [N, V] at the True positions of ``positions_BL`` (row-major), mask logit = -inf.

    For sampling and evaluation; ``shift`` as in the module docstring.
    """
    rows_N, _, source_N = gather_source_positions(positions_BL.bool(), shift=shift, seq_ids_BL=seq_ids_BL)
    logits_NV = lm_head(hidden_BLH[rows_N, source_N]).float()
    logits_NV[:, mask_token_id] = float("-inf")
    return logits_NV
