"""On CUDA with liger-kernel: the fused masked loss (liger's linear cross-entropy on the gathered
hidden states) gives the chunked head's loss and gradients at Qwen's vocabulary, without a logits
tensor. Skipped without a GPU or liger-kernel."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from trainer.model import diffusion

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel"),
]

VOCAB, MASK_ID, HIDDEN, NUM_MASKED = 151_936, 151_669, 1024, 4096


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, nn.Linear, diffusion.MaskedTargets]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, NUM_MASKED, HIDDEN, device="cuda", generator=generator).to(dtype)
    head = nn.Linear(HIDDEN, VOCAB, bias=False, device="cuda", dtype=dtype)
    nn.init.normal_(head.weight, std=HIDDEN**-0.5, generator=generator)
    rows = torch.arange(NUM_MASKED, device="cuda") % 2
    targets = diffusion.MaskedTargets(
        rows_M=rows,
        source_M=torch.arange(NUM_MASKED, device="cuda"),
        targets_M=torch.randint(0, MASK_ID, (NUM_MASKED,), device="cuda", generator=generator),
        # 1/t of a few sub-sequences: per-token weights that differ.
        weight_M=1.0 / (0.05 + 0.9 * torch.rand(NUM_MASKED, device="cuda", generator=generator)),
    )
    return hidden.requires_grad_(), head, targets


def _loss_and_grads(
    hidden: torch.Tensor, head: nn.Linear, targets: diffusion.MaskedTargets, fused_ce: object
) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = diffusion.masked_diffusion_loss(
        hidden, head, targets, mask_token_id=MASK_ID, num_normalizer=float(NUM_MASKED), fused_ce=fused_ce
    )
    grads = torch.autograd.grad(out.loss, [p for p in (hidden, head.weight) if p.requires_grad])
    torch.cuda.synchronize()
    return out.loss.detach(), [g.float() for g in grads], torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_liger_fused_loss_equals_the_chunked_head(dtype: torch.dtype, tolerance: float) -> None:
    fused_ce = diffusion.fused_linear_ce(torch.device("cuda"))
    assert fused_ce is not None, "liger-kernel is installed: the fused path must be chosen"
    hidden, head, targets = _inputs(dtype)
    loss, grads, _ = _loss_and_grads(hidden, head, targets, None)
    fused_loss, fused_grads, _ = _loss_and_grads(hidden, head, targets, fused_ce)
    assert float(fused_loss) == pytest.approx(float(loss), rel=tolerance)
    for grad, fused_grad in zip(grads, fused_grads, strict=True):
        assert float((fused_grad - grad).norm() / grad.norm()) < tolerance
    # No [M, V] logits: with the head frozen (LoRA), the fused peak stays far below one float32
    # logits tensor (the chunked path keeps a chunk of them).
    head.weight.requires_grad_(False)
    *_, fused_peak = _loss_and_grads(hidden, head, targets, fused_ce)
    assert fused_peak < 0.1 * NUM_MASKED * VOCAB * 4
