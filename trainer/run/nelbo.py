"""Held-out NELBO on a fixed t grid and masked-token accuracy (what the training loop evaluates).

`nelbo_eval(model, batches, ...)` runs on all ranks, inside or outside a DeepSpeed engine, ZeRO-2 or
ZeRO-3, and in the evaluate command. The masks are fixed: each answer token of a sample draws one
uniform u from a generator seeded by (seed, sample key), and it is masked at time t iff
u < p_mask(t). The same sample thus gets the same masks in every run, on every rank layout and with
any packing, so numbers are comparable across runs. NELBO per answer token is the midpoint-rule
integral over the t grid of sum_{masked} loss_weight(t) * CE / num_answer_tokens (the expectation of
the training loss).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from trainer.config import DEFAULT_ACCURACY_T, DEFAULT_T_GRID
from trainer.model.diffusion import (
    gather_source_positions,
    head_placeholder,
    loss_weight_at,
    masked_cross_entropy,
    p_mask_at,
)
from trainer.run import distributed
from trainer.run.seeding import key_seed


def fixed_uniforms(
    answer_mask_BL: torch.Tensor, seq_ids_BL: torch.Tensor, keys: Sequence[Sequence[str]], seed: int
) -> torch.Tensor:
    """One uniform in [0, 1) per answer token, a function of (seed, sample key, answer-token index)
    only; 2.0 (never masked) elsewhere. Masking at t is then `u < p_mask(t)` (nested in t)."""
    u_BL = torch.full(answer_mask_BL.shape, 2.0, dtype=torch.float32)
    answer_BL = (answer_mask_BL.bool() & (seq_ids_BL >= 0)).cpu()
    seq_ids_cpu = seq_ids_BL.cpu()
    for row, row_keys in enumerate(keys):
        for sub, key in enumerate(row_keys):
            where_L = answer_BL[row] & (seq_ids_cpu[row] == sub)
            count = int(where_L.sum())
            if count:
                generator = torch.Generator().manual_seed(key_seed(seed, key))
                u_BL[row, where_L] = torch.rand(count, generator=generator)
    return u_BL.to(answer_mask_BL.device)


def _masked_ce_at(
    language: nn.Module,
    lm_head: nn.Module,
    batch: Any,
    vision_kwargs: dict[str, Any],
    answer_BL: torch.Tensor,
    u_BL: torch.Tensor,
    t: float,
    *,
    schedule: str,
    shift: bool,
    mask_token_id: int,
) -> tuple[float, float, float]:
    """CE sum, correct predictions and masked count of one batch with its fixed masks at time ``t``."""
    p_mask = float(p_mask_at(torch.tensor(t, dtype=torch.float64), schedule))
    masked_BL = answer_BL & (u_BL < p_mask)
    noisy_BL = torch.where(masked_BL, torch.full_like(batch.input_ids, mask_token_id), batch.input_ids)
    hidden_BLH = language(noisy_BL, batch.position_ids, batch.seq_ids, **vision_kwargs)
    rows_M, cols_M, source_M = gather_source_positions(masked_BL, shift=shift, seq_ids_BL=batch.seq_ids)
    # Every rank calls the head once (ZeRO-3 gathers it; docs/DESIGN.md §4).
    if len(rows_M) == 0:
        head_placeholder(hidden_BLH, lm_head)
    masked_ce = masked_cross_entropy(
        hidden_BLH[rows_M, source_M], batch.input_ids[rows_M, cols_M], lm_head,
        mask_token_id=mask_token_id, chunk_size=None, checkpoint_chunks=False,
    )  # fmt: skip
    return float(masked_ce.ce.sum()), float(masked_ce.correct.sum()), float(masked_BL.sum())


def _metrics(
    flat: list[float], times: list[float], t_grid: Sequence[float], accuracy_t: Sequence[float]
) -> dict[str, float]:
    """The report from the all-rank sums (per time: weighted CE, CE, correct, masked; then samples
    and answer tokens)."""
    num_samples, num_answer_tokens = flat[-2], flat[-1]
    totals = {t: flat[4 * i : 4 * i + 4] for i, t in enumerate(times)}
    denominator = max(num_answer_tokens, 1.0)
    result: dict[str, float] = {
        "nelbo": sum(totals[t][0] for t in t_grid) / len(t_grid) / denominator,
        "num_samples": num_samples,
        "num_answer_tokens": num_answer_tokens,
    }
    for t in t_grid:
        result[f"ce@{t:g}"] = totals[t][1] / max(totals[t][3], 1.0)
    for t in accuracy_t:
        result[f"masked_accuracy@{t:g}"] = totals[t][2] / max(totals[t][3], 1.0)
    return result


def _check_times(t_grid: Sequence[float], accuracy_t: Sequence[float]) -> None:
    if not t_grid:
        raise ValueError("nelbo_eval: t_grid is empty: give at least one t in (0, 1]")
    if any(not 0.0 < t <= 1.0 for t in (*t_grid, *accuracy_t)):
        raise ValueError(
            f"nelbo_eval: every t must lie in (0, 1], got t_grid={t_grid} accuracy_t={accuracy_t}"
        )


@torch.no_grad()
def nelbo_eval(
    model: Any,
    batches: Iterable[Any],
    *,
    mask_token_id: int,
    language: nn.Module | None = None,
    t_grid: Sequence[float] = DEFAULT_T_GRID,
    accuracy_t: Sequence[float] = DEFAULT_ACCURACY_T,
    schedule: str = "linear",
    shift: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Held-out NELBO per answer token and masked-token accuracy, summed over all ranks.

    Args:
        model: the `MDLMModel` (its frozen `vision_features` runs outside the engine; its
            `language.lm_head` is called as a module, so ZeRO-3 gathers it).
        batches: this rank's fixed evaluation `PackedBatch`es (the same list at every call).
        mask_token_id: id of `<|mask|>`.
        language: the module to run the language model through: the DeepSpeed engine during
            training, `model.language` (the default) otherwise. Put in eval mode for the call and
            restored afterwards.
        t_grid: the NELBO quadrature points (midpoints of equal bins of (0, 1)).
        accuracy_t: times at which masked-token accuracy (argmax == target) is reported.
        schedule, shift: as the training objective (`trainer.model.diffusion`).
        seed: mask seed; keep it fixed to compare runs.
        device: where batches go (default: the language model's device).

    Every rank must call this (collectives inside when torch.distributed is initialised); ranks
    with fewer batches re-run their last one at zero weight so forward counts match.

    Returns: `{"nelbo", "num_samples", "num_answer_tokens", "ce@T" for T in t_grid,
    "masked_accuracy@T" for T in accuracy_t}` (floats), identical on every rank.
    """
    _check_times(t_grid, accuracy_t)
    language = model.language if language is None else language
    lm_head: nn.Module = model.language.lm_head
    if device is None:
        device = next(model.language.parameters()).device
    batches = list(batches)
    num_local = len(batches)
    # Agree on the loop length before any forward (a rank with nothing to do cannot take part).
    max_batches, neg_min_batches = distributed.all_reduce_max([float(num_local), float(-num_local)])
    if -neg_min_batches < 1:
        raise ValueError(
            "nelbo_eval: a rank has no evaluation batch: use more held-out samples or fewer ranks"
        )

    times = sorted(set(t_grid) | set(accuracy_t))
    index = {t: i for i, t in enumerate(times)}
    # Per time: [weighted CE sum, CE sum, correct, masked]; then samples and answer tokens.
    sums = [[0.0, 0.0, 0.0, 0.0] for _ in times]
    num_samples = num_answer_tokens = 0.0

    was_training = language.training
    language.eval()  # no LoRA dropout in evaluation
    try:
        for step in range(int(max_batches)):
            real = step < num_local
            batch = batches[min(step, num_local - 1)].to(device)
            weight = 1.0 if real else 0.0
            vision_kwargs: dict[str, Any] = {}
            if model.language.visual is not None:
                # The vision tower is trained inside the engine: it encodes the pixels itself.
                vision_kwargs = {"pixel_values": batch.pixel_values, "image_grid_thw": batch.image_grid_thw}
            elif batch.pixel_values is not None:
                vision_kwargs = {"vision": model.vision_features(batch.pixel_values, batch.image_grid_thw)}
            answer_BL = batch.answer_mask.bool() & (batch.seq_ids >= 0)
            u_BL = fixed_uniforms(batch.answer_mask, batch.seq_ids, batch.keys, seed)
            if real:
                num_samples += sum(len(row_keys) for row_keys in batch.keys)
                num_answer_tokens += float(answer_BL.sum())
            for t in times:
                ce_sum, correct, num_masked = _masked_ce_at(
                    language, lm_head, batch, vision_kwargs, answer_BL, u_BL, t,
                    schedule=schedule, shift=shift, mask_token_id=mask_token_id,
                )  # fmt: skip
                loss_weight = float(loss_weight_at(torch.tensor(t, dtype=torch.float64), schedule))
                acc = sums[index[t]]
                acc[0] += weight * loss_weight * ce_sum
                acc[1] += weight * ce_sum
                acc[2] += weight * correct
                acc[3] += weight * num_masked
    finally:
        language.train(was_training)

    flat = [value for per_t in sums for value in per_t] + [num_samples, num_answer_tokens]
    return _metrics(distributed.all_reduce_sum(flat), times, t_grid, accuracy_t)
