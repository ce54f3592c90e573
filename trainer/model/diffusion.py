"""MDLM objective: noise schedules, t sampling, masking of answer tokens, the masked-position loss.

Pure torch (no deepspeed, no torch.distributed). Names (one per quantity, used everywhere): ``t`` is the diffusion time of a
sub-sequence, ``p_mask`` the probability that one of its answer tokens is replaced by ``<|mask|>``
(``p_mask = 1 - alpha_t``), ``loss_weight`` the per-token weight ``-alpha'_t / (1 - alpha_t)`` (``1/t``
for the linear schedule), ``answer_mask`` the tokens that may be masked, ``masked`` those that were,
``noisy_input_ids`` the input with ``masked`` tokens replaced. Shape suffixes: B rows, L tokens,
S sub-sequences per row, M masked tokens, H hidden, V vocabulary.

:func:`gather_masked` lists the masked tokens (:class:`MaskedTargets`) where ``masked`` lies: the
trainer draws its noise on the host (a CPU generator) and gathers there, so the loss on the device
knows their count M without reading anything back.

The estimator (Sahoo et al. 2024; LLaDA SFT) for one sub-sequence x with answer tokens A:

    loss(x) = E_t E_{masked ~ Bernoulli(p_mask(t)) on A} [ sum_{i masked} loss_weight(t) * CE_i ]

and the batch loss is its sum over sub-sequences divided by a normaliser (see
:func:`masked_diffusion_loss`). Only masked positions go through the LM head, in chunks (or, where
liger-kernel runs, its fused linear cross-entropy: :func:`fused_linear_ce`): full logits for every
position would be [B, L, 151936].

``shift``: with ``shift=False`` the hidden state at position i predicts token i (the MDLM/LLaDA
convention). With ``shift=True`` the hidden state at position i-1 predicts token i (Dream /
DiffuLLaMA, which keep the next-token alignment of the autoregressive model they start from); the
masked token i itself is still the one replaced by ``<|mask|>`` in the input, and its target is
still ``target_ids[i]``. Position i-1 always exists inside the same sub-sequence because answers
follow a prompt.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

SCHEDULES: tuple[str, ...] = ("linear", "cosine")
"""Names accepted as ``schedule``."""


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


def answer_weights(
    input_ids_BL: torch.Tensor,
    answer_mask_BL: torch.Tensor,
    seq_ids_BL: torch.Tensor,
    *,
    pad_ids: tuple[int, ...],
    pad_weight: float,
) -> torch.Tensor:
    """[B, L] float32: what each answer token weighs in the loss and in its normaliser.

    An answer's own tokens weigh 1. The P pad targets after it (``pad_ids`` inside ``answer_mask``:
    ``data_tools build --answer-padding``; dataset text never encodes to them) weigh ``min(1,
    pad_weight / P)`` each, so a sample's pads together weigh at most ``pad_weight`` answer tokens
    however long its pad tail was drawn (``pad_weight`` 0: each weighs 1). 0 outside answers.
    """
    answer_BL = answer_mask_BL.bool() & (seq_ids_BL >= 0)
    weights_BL = answer_BL.float()
    if pad_weight <= 0 or not pad_ids:
        return weights_BL
    pad_BL = answer_BL & torch.isin(input_ids_BL, torch.tensor(pad_ids, device=input_ids_BL.device))
    width = int(seq_ids_BL.max().clamp(min=0)) + 1
    num_pads_BS = torch.zeros(seq_ids_BL.shape[0], width, device=seq_ids_BL.device)
    num_pads_BS.scatter_add_(1, seq_ids_BL.clamp(min=0), pad_BL.float())
    per_pad_BS = (pad_weight / num_pads_BS.clamp(min=1.0)).clamp(max=1.0)
    return torch.where(pad_BL, per_token(per_pad_BS, seq_ids_BL), weights_BL)


def apply_masking(
    input_ids_BL: torch.Tensor,
    answer_mask_BL: torch.Tensor,
    seq_ids_BL: torch.Tensor,
    t_BS: torch.Tensor,
    *,
    mask_token_id: int,
    schedule: str = "linear",
    generator: torch.Generator | None = None,
    answer_weight_BL: torch.Tensor | None = None,
) -> MaskedBatch:
    """Mask each answer token of sub-sequence (b, s) independently with probability ``p_mask(t[b, s])``.

    Prompt, image, template and padding tokens are never masked (they are outside ``answer_mask``;
    padding is excluded again through ``seq_ids = -1``). ``answer_weight_BL`` (:func:`answer_weights`)
    scales each masked token's loss weight.
    """
    answer_mask_BL = answer_mask_BL.bool() & (seq_ids_BL >= 0)
    t_BL = per_token(t_BS, seq_ids_BL)
    p_mask_BL = torch.where(answer_mask_BL, p_mask_at(t_BL, schedule), torch.zeros_like(t_BL))
    gen_device = generator.device if generator is not None else "cpu"
    u_BL = torch.rand(input_ids_BL.shape, generator=generator, device=gen_device).to(input_ids_BL.device)
    masked_BL = answer_mask_BL & (u_BL < p_mask_BL)
    loss_weight_BL = torch.where(masked_BL, loss_weight_at(t_BL, schedule), torch.zeros_like(t_BL))
    if answer_weight_BL is not None:
        loss_weight_BL = loss_weight_BL * answer_weight_BL
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


@dataclass
class MaskedTargets:
    """The masked tokens of a batch in row-major order (:func:`gather_masked`): where the hidden state
    that predicts each one lies, its clean id and its loss weight. Their count M is a shape, known
    wherever the tensors lie: gathered on the host, it needs no read back from the device."""

    rows_M: torch.Tensor
    """[M] long: the row of each masked token."""
    source_M: torch.Tensor
    """[M] long: the position of the hidden state that predicts it (its own; the one before with ``shift``)."""
    targets_M: torch.Tensor
    """[M] long: its clean id."""
    weight_M: torch.Tensor
    """[M] float32: its loss weight."""

    @property
    def num_masked(self) -> int:
        """M."""
        return self.rows_M.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskedTargets:
        """The same targets on ``device``."""
        return MaskedTargets(
            self.rows_M.to(device, non_blocking=non_blocking),
            self.source_M.to(device, non_blocking=non_blocking),
            self.targets_M.to(device, non_blocking=non_blocking),
            self.weight_M.to(device, non_blocking=non_blocking),
        )


def gather_masked(
    target_ids_BL: torch.Tensor,
    masked_BL: torch.Tensor,
    loss_weight_BL: torch.Tensor,
    *,
    shift: bool = False,
    seq_ids_BL: torch.Tensor | None = None,
) -> MaskedTargets:
    """The masked tokens of ``masked_BL`` with their targets and loss weights (``shift`` as in the
    module docstring; ``seq_ids_BL`` lets it check that every predecessor lies in the same sub-sequence)."""
    rows_M, cols_M, source_M = gather_source_positions(masked_BL.bool(), shift=shift, seq_ids_BL=seq_ids_BL)
    return MaskedTargets(
        rows_M, source_M, target_ids_BL[rows_M, cols_M], loss_weight_BL[rows_M, cols_M].float()
    )


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
    chunk_size: int | None = 1024,
    checkpoint_chunks: bool = True,
) -> MaskedCE:
    """Per-token CE [M] of ``lm_head(hidden)`` against ``targets`` (and whether the argmax hit it),
    ``chunk_size`` rows at a time (None: all in one call).

    ``lm_head`` is called as a module (ZeRO-3 gathers its weight). With ``checkpoint_chunks`` (and
    grad enabled) each chunk's [chunk, V] logits are recomputed in backward instead of kept, so at
    most one chunk of logits is alive. Under ZeRO-3 every rank must call the head equally often,
    with no collective to agree on M: callers pass ``chunk_size=None`` (one call whatever M is) and,
    on a rank with nothing masked, call :func:`head_placeholder` instead (docs/DESIGN.md §4).
    """
    if hidden_MH.shape[0] == 0:
        empty = hidden_MH.new_zeros(0, dtype=torch.float32)
        return MaskedCE(empty, empty)
    width = chunk_size or hidden_MH.shape[0]
    ce_pieces, correct_pieces = [], []
    for start in range(0, hidden_MH.shape[0], width):
        h_CH = hidden_MH[start : start + width]
        y_C = targets_M[start : start + width]
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


FusedLinearCE = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(hidden [M, H], weight [V, H], targets [M], bias [V]) -> CE [M]`` float32, differentiable in
hidden, weight and bias, no [M, V] logits kept: liger-kernel's fused linear cross-entropy with
``reduction="none"`` (:func:`fused_linear_ce`)."""

LIGER_MIN_VERSION = "0.8.2"
"""The first liger-kernel whose ``reduction="none"`` backward weights each token by its own upstream
gradient (before, all took the first token's: linkedin/Liger-Kernel#1298); the loss weights need it."""


def fused_linear_ce(device: torch.device) -> FusedLinearCE | None:
    """liger-kernel's fused linear cross-entropy where it runs (installed, at least
    :data:`LIGER_MIN_VERSION`, and ``device`` is CUDA: Triton kernels), else None: the head then runs
    in chunks (:func:`masked_cross_entropy`)."""
    if device.type != "cuda":
        return None
    try:
        version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None
    from packaging.version import Version  # a dependency of transformers and of liger-kernel

    if Version(version) < Version(LIGER_MIN_VERSION):
        warnings.warn(
            f"liger-kernel {version} weights per-token gradients wrongly: the masked loss runs in chunks "
            f"(pip install 'liger-kernel>={LIGER_MIN_VERSION}' for the fused one)",
            stacklevel=2,
        )
        return None
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    # A trained head's gradient adds up over liger's many small chunks: in float32, not bf16.
    return functools.partial(liger_fused_linear_cross_entropy, reduction="none", accum_dtype=torch.float32)


def _fused_masked_ce(
    hidden_MH: torch.Tensor,
    targets_M: torch.Tensor,
    lm_head: nn.Module,
    mask_token_id: int,
    fused_ce: FusedLinearCE,
) -> torch.Tensor:
    """Per-token CE [M] through ``fused_ce`` on the head's one ``nn.Linear``: the head itself, or the
    base layer under trainer.model's trainable-tokens wrapper, whose logits are the base layer's but
    for the ``<|mask|>`` column, which is -inf here anyway."""
    linears = [module for module in lm_head.modules() if isinstance(module, nn.Linear)]
    if len(linears) != 1:
        raise ValueError(
            f"the fused masked loss needs a head with one nn.Linear; {type(lm_head).__name__} has {len(linears)}"
        )
    (linear,) = linears
    # The mask token is never a prediction: its logit is -inf, as the chunked path sets it.
    bias_V = hidden_MH.new_zeros(linear.out_features)
    bias_V[mask_token_id] = float("-inf")
    if linear.bias is not None:
        bias_V = linear.bias + bias_V
    return fused_ce(hidden_MH, linear.weight, targets_M, bias_V)


def masked_diffusion_loss(
    hidden_BLH: torch.Tensor,
    lm_head: nn.Module,
    targets: MaskedTargets,
    *,
    mask_token_id: int,
    num_normalizer: float | torch.Tensor | None = None,
    answer_mask_BL: torch.Tensor | None = None,
    chunk_size: int | None = 1024,
    checkpoint_chunks: bool = True,
    fused_ce: FusedLinearCE | None = None,
) -> DiffusionLoss:
    """The MDLM loss at the masked tokens ``targets`` (:func:`gather_masked`) only.

    ``sum(loss_weight * CE) / num_normalizer``: pass the number of answer tokens in
    ``num_normalizer`` (the trainer makes it global across micro-batches and ranks so the gradient
    does not depend on packing or sharding; docs/DESIGN.md §3); it defaults to this batch's
    ``answer_mask`` count. With ``fused_ce`` (:func:`fused_linear_ce`) the head and the CE run as one
    kernel on the gathered hidden states, no logits tensor at all; else :func:`masked_cross_entropy`
    runs ``lm_head`` in chunks of ``chunk_size``.
    """
    hidden_MH = hidden_BLH[targets.rows_M, targets.source_M]
    if fused_ce is not None and targets.num_masked:
        ce_M = _fused_masked_ce(hidden_MH, targets.targets_M, lm_head, mask_token_id, fused_ce)
    else:
        ce_M = masked_cross_entropy(
            hidden_MH,
            targets.targets_M,
            lm_head,
            mask_token_id=mask_token_id,
            chunk_size=chunk_size,
            checkpoint_chunks=checkpoint_chunks,
        ).ce
    weighted_M = targets.weight_M * ce_M

    total = weighted_M.sum()
    if num_normalizer is not None:
        divisor = num_normalizer
    else:
        if answer_mask_BL is None:
            raise ValueError("masked_diffusion_loss needs num_normalizer or answer_mask_BL")
        divisor = answer_mask_BL.bool().sum().clamp(min=1)
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(total.device, total.dtype)
    if not targets.num_masked:
        total = total + head_placeholder(hidden_BLH, lm_head)
    return DiffusionLoss(
        loss=total / divisor,
        weighted_ce_sum=weighted_M.sum().detach(),
        ce_sum=ce_M.sum().detach(),
        num_masked=hidden_BLH.new_full((), targets.num_masked, dtype=torch.long),
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
