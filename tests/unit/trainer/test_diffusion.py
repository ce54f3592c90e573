"""MDLM objective: schedules, t sampling, masking, the masked-position loss (pure torch, CPU)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.model import diffusion

MASK_ID = 7
VOCAB = 11
HIDDEN = 6


def _head(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(HIDDEN, VOCAB, bias=False)


def test_linear_schedule_weight_is_one_over_t() -> None:
    t = torch.tensor([0.001, 0.25, 0.5, 0.999])
    assert torch.allclose(diffusion.p_mask_at(t, "linear"), t)
    assert torch.allclose(diffusion.loss_weight_at(t, "linear"), 1.0 / t)


def test_cosine_schedule_weight_matches_numeric_derivative() -> None:
    t = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    h = 1e-6
    numeric = (diffusion.alpha(t + h, "cosine") - diffusion.alpha(t - h, "cosine")) / (2 * h)
    expected = -numeric / (1.0 - diffusion.alpha(t, "cosine"))
    assert torch.allclose(diffusion.loss_weight_at(t, "cosine"), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        diffusion.alpha(t, "quadratic")


def test_stratified_t_one_draw_per_stratum() -> None:
    eps, num = 0.01, 16
    gen = torch.Generator().manual_seed(3)
    t = diffusion.sample_t(num, eps=eps, stratified=True, generator=gen)
    assert t.shape == (num,)
    assert bool(((t >= eps) & (t < 1.0)).all())
    strata = torch.floor((t.double() - eps) / (1 - eps) * num).long()
    assert sorted(strata.tolist()) == list(range(num))
    # Shuffled: the stratum is not the position in the batch (fails with probability 1/16!).
    assert strata.tolist() != list(range(num))


def test_independent_t_range_and_seed() -> None:
    t1 = diffusion.sample_t(1000, eps=0.05, stratified=False, generator=torch.Generator().manual_seed(1))
    t2 = diffusion.sample_t(1000, eps=0.05, stratified=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t1, t2)
    assert bool(((t1 >= 0.05) & (t1 < 1.0)).all())
    strata = torch.floor((t1.double() - 0.05) / 0.95 * 1000).long()
    assert len(set(strata.tolist())) < 1000  # independent draws collide in some stratum


def test_sequence_t_one_per_sub_sequence() -> None:
    seq_ids = torch.tensor([[0, 0, 1, 1, 2, -1], [0, 0, 0, 0, -1, -1]])
    t_BS = diffusion.sample_sequence_t(seq_ids, eps=0.0, generator=torch.Generator().manual_seed(0))
    assert t_BS.shape == (2, 3)
    assert bool((t_BS[0] < 1.0).all()) and t_BS[1, 0] < 1.0
    assert torch.equal(t_BS[1, 1:], torch.ones(2))  # absent slots
    strata = torch.floor(torch.tensor([*t_BS[0].tolist(), t_BS[1, 0].item()]) * 4).long()
    assert sorted(strata.tolist()) == [0, 1, 2, 3]


def _packed_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Row 0: two sub-sequences (prompt 3 + answer 3, prompt 2 + answer 2), padding; row 1: one.
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 1, 2, 8, 9, 0, 0], [1, 2, 3, 4, 5, 6, 8, 9, 10, 4, 0, 0]])
    answer = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0]]).bool()
    seq_ids = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1], [0] * 10 + [-1, -1]])
    return input_ids, answer, seq_ids


def test_masking_only_answer_tokens_with_per_sequence_t() -> None:
    input_ids, answer, seq_ids = _packed_example()
    # Even an answer mask that (wrongly) covers padding never masks it: seq_ids = -1 wins.
    answer_with_pad = answer.clone()
    answer_with_pad[:, -1] = True
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        t_BS = diffusion.sample_sequence_t(seq_ids, generator=gen)
        out = diffusion.apply_masking(
            input_ids, answer_with_pad, seq_ids, t_BS, mask_token_id=MASK_ID, generator=gen
        )
        assert not bool((out.masked & ~answer).any())
        assert torch.equal(out.noisy_input_ids, torch.where(out.masked, MASK_ID, input_ids))
        assert torch.equal(out.target_ids, input_ids)
    # t per (row, seq_id): sub-sequence 0 of row 0 almost never masked, sub-sequence 1 always.
    t_BS = torch.tensor([[1e-6, 1.0 - 1e-7], [0.5, 1.0]])
    out = diffusion.apply_masking(input_ids, answer, seq_ids, t_BS, mask_token_id=MASK_ID, generator=gen)
    assert not bool(out.masked[0, :6].any())
    assert bool(out.masked[0, 8:10].all())
    expected_weight = torch.where(out.masked, 1.0 / diffusion.per_token(t_BS, seq_ids), 0.0)
    assert torch.allclose(out.loss_weight, expected_weight)
    assert torch.allclose(out.p_mask[0, 8:10], torch.full((2,), 1.0 - 1e-7))
    assert float(out.p_mask[0, :3].sum()) == 0.0  # prompt tokens have p_mask 0


def test_pad_targets_of_a_sample_weigh_at_most_pad_weight_together() -> None:
    # Pads are ids 9 and 10 (an eos and a rainbow pad) inside the answer mask; 0 is row padding.
    input_ids, answer, seq_ids = _packed_example()
    pads = (9, 10)
    weights = diffusion.answer_weights(input_ids, answer, seq_ids, pad_ids=pads, pad_weight=1.0)
    # Row 0, sub-sequence 1: answer 8 + one pad (9): the pad weighs min(1, 1/1) = 1.
    assert weights[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]
    # Row 1: answer 5, 6, 8, then pads 9, 10 and a 4 (not a pad id): the two pads share a weight of 1.
    assert weights[1].tolist() == [0, 0, 0, 0, 1, 1, 1, 0.5, 0.5, 1, 0, 0]
    half = diffusion.answer_weights(input_ids, answer, seq_ids, pad_ids=pads, pad_weight=0.5)
    assert half[0, 9].item() == 0.5 and half[1, 7:9].tolist() == [0.25, 0.25]
    # 0 = no cap (every answer token weighs 1), also without pad ids.
    uncapped = answer.float()
    assert torch.equal(
        diffusion.answer_weights(input_ids, answer, seq_ids, pad_ids=pads, pad_weight=0.0), uncapped
    )
    assert torch.equal(
        diffusion.answer_weights(input_ids, answer, seq_ids, pad_ids=(), pad_weight=1.0), uncapped
    )
    # Masking scales each masked token's loss weight by its answer weight (same draws: same mask).
    t_BS = torch.tensor([[0.4, 0.7], [0.9, 1.0]])
    plain, weighted = [
        diffusion.apply_masking(
            input_ids,
            answer,
            seq_ids,
            t_BS,
            mask_token_id=MASK_ID,
            generator=torch.Generator().manual_seed(3),
            answer_weight_BL=w,
        )
        for w in (None, weights)
    ]
    assert torch.equal(plain.masked, weighted.masked)
    assert torch.allclose(weighted.loss_weight, plain.loss_weight * weights)
    assert bool(weighted.masked[1, 7:9].any())  # the check above saw a pad's halved weight


def _reference_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    masked: torch.Tensor,
    weight: torch.Tensor,
    shift: bool = False,
) -> torch.Tensor:
    """Full [B, L, V] logits: the computation the chunked loss must equal."""
    logits = head(hidden).float()
    logits[..., MASK_ID] = float("-inf")
    if shift:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # position i reads logits of i-1
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none").reshape(
        targets.shape
    )
    return torch.where(masked, weight * ce, torch.zeros_like(ce))


def _loss_inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    input_ids, answer, seq_ids = _packed_example()
    gen = torch.Generator().manual_seed(seed)
    t_BS = torch.tensor([[0.4, 0.7], [0.5, 1.0]])
    out = diffusion.apply_masking(input_ids, answer, seq_ids, t_BS, mask_token_id=MASK_ID, generator=gen)
    torch.manual_seed(seed)
    hidden = torch.randn(2, 12, HIDDEN, requires_grad=True)
    return hidden, out.target_ids, out.masked, out.loss_weight, answer, seq_ids


def test_masked_ce_equals_full_logits_and_normaliser() -> None:
    hidden, targets, masked, weight, answer, seq_ids = _loss_inputs()
    head = _head()
    ref_BL = _reference_loss(hidden, head, targets, masked, weight)
    n_masked = int(masked.sum())
    assert n_masked > 0
    common = {"mask_token_id": MASK_ID, "answer_mask_BL": answer, "chunk_size": 3}
    gathered = diffusion.gather_masked(targets, masked, weight, seq_ids_BL=seq_ids)
    assert gathered.num_masked == n_masked

    out = diffusion.masked_diffusion_loss(hidden, head, gathered, **common)
    assert int(answer.sum()) == 11  # by hand: 3 + 2 in row 0, 6 in row 1
    assert torch.allclose(out.loss, ref_BL.sum() / 11)
    assert torch.allclose(out.weighted_ce_sum, ref_BL.sum())
    assert int(out.num_masked) == n_masked

    # The global count passed in from outside wins.
    out = diffusion.masked_diffusion_loss(hidden, head, gathered, num_normalizer=40, **common)
    assert torch.allclose(out.loss, ref_BL.sum() / 40)


def test_chunked_loss_gradients_match_full_logits() -> None:
    hidden, targets, masked, weight, _, _ = _loss_inputs(seed=1)
    head = _head(1)
    ref = _reference_loss(hidden, head, targets, masked, weight).sum()
    grad_h_ref, grad_w_ref = torch.autograd.grad(ref, [hidden, head.weight])
    gathered = diffusion.gather_masked(targets, masked, weight)
    for chunk_size in (2, None):  # None: one head call (ZeRO-3)
        out = diffusion.masked_diffusion_loss(
            hidden, head, gathered, mask_token_id=MASK_ID, num_normalizer=1.0, chunk_size=chunk_size
        )
        grad_h, grad_w = torch.autograd.grad(out.loss, [hidden, head.weight])
        assert torch.allclose(grad_h, grad_h_ref, atol=1e-6)
        assert torch.allclose(grad_w, grad_w_ref, atol=1e-6)


def test_mask_logit_is_never_predicted() -> None:
    hidden, targets, masked, weight, _, _ = _loss_inputs()
    head = _head()
    with torch.no_grad():
        head.weight[MASK_ID] = 100.0 * hidden.detach().reshape(-1, HIDDEN).mean(0)  # a dominant mask logit
    out = diffusion.masked_diffusion_loss(
        hidden,
        head,
        diffusion.gather_masked(targets, masked, weight),
        mask_token_id=MASK_ID,
        num_normalizer=1.0,
    )
    keep = [v for v in range(VOCAB) if v != MASK_ID]
    logits = head(hidden)[masked][:, keep]
    remap = torch.tensor([keep.index(int(y)) for y in targets[masked]])
    expected = (weight[masked] * F.cross_entropy(logits, remap, reduction="none")).sum()
    assert torch.allclose(out.loss, expected, atol=1e-5)
    logits_at = diffusion.logits_at_positions(hidden, masked, head, mask_token_id=MASK_ID)
    assert logits_at.shape == (int(masked.sum()), VOCAB)
    assert bool(torch.isneginf(logits_at[:, MASK_ID]).all())


def test_shift_uses_previous_hidden_state() -> None:
    hidden, targets, masked, weight, _, seq_ids = _loss_inputs(seed=2)
    head = _head(2)
    ref = _reference_loss(hidden, head, targets, masked, weight, shift=True).sum()
    shifted = diffusion.gather_masked(targets, masked, weight, shift=True, seq_ids_BL=seq_ids)
    out = diffusion.masked_diffusion_loss(hidden, head, shifted, mask_token_id=MASK_ID, num_normalizer=1.0)
    assert torch.allclose(out.loss, ref, atol=1e-5)
    # Documented alignment, stated directly: the hidden state at i-1 scores target i.
    rows, cols = masked.nonzero(as_tuple=True)
    logits = head(hidden[rows, cols - 1]).float()
    logits[:, MASK_ID] = float("-inf")
    direct = (weight[rows, cols] * F.cross_entropy(logits, targets[rows, cols], reduction="none")).sum()
    assert torch.allclose(out.loss, direct, atol=1e-5)
    unshifted = diffusion.masked_diffusion_loss(
        hidden,
        head,
        diffusion.gather_masked(targets, masked, weight),
        mask_token_id=MASK_ID,
        num_normalizer=1.0,
    )
    assert not torch.allclose(out.loss, unshifted.loss)
    # A masked first token of a sub-sequence has no predecessor inside it.
    bad = torch.zeros_like(masked)
    bad[0, 6] = True
    with pytest.raises(ValueError, match="no predecessor"):
        diffusion.gather_masked(targets, bad, weight, shift=True, seq_ids_BL=seq_ids)


def test_nothing_masked_gives_zero_loss_with_a_graph() -> None:
    hidden, targets, masked, weight, answer, _ = _loss_inputs()
    head = _head()
    nothing = diffusion.gather_masked(targets, torch.zeros_like(masked), weight)
    out = diffusion.masked_diffusion_loss(hidden, head, nothing, mask_token_id=MASK_ID, answer_mask_BL=answer)
    assert float(out.loss.detach()) == 0.0 and int(out.num_masked) == 0
    out.loss.backward()
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) == 0.0
    assert math.isfinite(float(hidden.grad.abs().sum()))


LIGER_STAND_IN = '''"""liger-kernel's fused linear cross-entropy, written out for a machine without Triton."""
import torch.nn.functional as F


def liger_fused_linear_cross_entropy(input, weight, target, bias=None, reduction="mean", accum_dtype=None):
    logits = input @ weight.t() if bias is None else input @ weight.t() + bias
    return F.cross_entropy(logits.float(), target, reduction=reduction)
'''


def _install_liger_stand_in(root: Path, version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed `liger-kernel` distribution of `version` at the front of sys.path: its functional
    API computes the same math as the real kernel (float32 CE of hidden @ weight.T + bias)."""
    package = root / "liger_kernel" / "transformers"
    package.mkdir(parents=True)
    (root / "liger_kernel" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "functional.py").write_text(LIGER_STAND_IN)
    (root / f"liger_kernel-{version}.dist-info").mkdir()
    (root / f"liger_kernel-{version}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: liger-kernel\nVersion: {version}\n"
    )
    for name in [n for n in sys.modules if n.split(".")[0] == "liger_kernel"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(root))


def test_fused_loss_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """liger-kernel's fused CE where it runs (installed, new enough, CUDA); else None: the chunked head."""
    assert diffusion.fused_linear_ce(torch.device("cpu")) is None  # Triton kernels: CUDA only
    _install_liger_stand_in(tmp_path / "old", "0.8.1", monkeypatch)
    with pytest.warns(UserWarning, match=r"liger-kernel 0\.8\.1 .* runs in chunks"):
        assert diffusion.fused_linear_ce(torch.device("cuda")) is None
    _install_liger_stand_in(tmp_path / "new", "0.8.5", monkeypatch)
    fused = diffusion.fused_linear_ce(torch.device("cuda"))
    assert fused is not None
    y = torch.tensor([1, 2])
    h, w, b = torch.randn(2, HIDDEN), torch.randn(VOCAB, HIDDEN), torch.zeros(VOCAB)
    assert torch.equal(fused(h, w, y, b), F.cross_entropy(h @ w.t(), y, reduction="none"))  # per token


@pytest.mark.parametrize("shift", [False, True])
def test_fused_loss_equals_the_chunked_loss_and_gradients(shift: bool) -> None:
    """The fused path (here a reference of liger's math) gives the chunked path's loss and gradients:
    loss weights per token, the mask logit excluded (a dominant mask row would win otherwise), a head
    that wraps its one linear (as PEFT's trainable tokens do), a bias."""
    hidden, targets, masked, weight, _, seq_ids = _loss_inputs(seed=3)
    gathered = diffusion.gather_masked(targets, masked, weight, shift=shift, seq_ids_BL=seq_ids)
    torch.manual_seed(3)
    head = nn.Sequential(nn.Linear(HIDDEN, VOCAB, bias=shift))
    with torch.no_grad():
        head[0].weight[MASK_ID] = 100.0 * hidden.detach().reshape(-1, HIDDEN).mean(0)

    def reference(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((h @ w.t() + b).float(), y, reduction="none")

    results = []
    for fused_ce in (None, reference):
        out = diffusion.masked_diffusion_loss(
            hidden, head, gathered, mask_token_id=MASK_ID, num_normalizer=7.0, chunk_size=2, fused_ce=fused_ce
        )
        params = [hidden, *head.parameters()]
        results.append((out.loss, out.ce_sum, *torch.autograd.grad(out.loss, params)))
    assert int(out.num_masked) == int(masked.sum()) > 0
    for chunked, fused in zip(*results, strict=True):
        assert torch.allclose(chunked, fused, rtol=1e-5, atol=1e-6)
    two_linears = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, VOCAB))
    with pytest.raises(ValueError, match=r"one nn\.Linear"):
        diffusion.masked_diffusion_loss(
            hidden, two_linears, gathered, mask_token_id=MASK_ID, fused_ce=reference
        )
