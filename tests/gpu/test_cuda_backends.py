"""On CUDA: every attention backend in use there (compiled flex, flash when installed, sdpa) is
bidirectional and packs exactly, and a bf16 MDLM step trains. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer import attention
from trainer.config import ModelConfig
from trainer.diffusion import apply_masking, sample_sequence_t
from trainer.model import build_mdlm_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _rows(tokenizer: object) -> list[torch.Tensor]:
    texts = [
        "<|im_start|>user\nWhat colour is the square?<|im_end|>\n<|im_start|>assistant\nIt is red<|im_end|>\n",
        "<|im_start|>user\nShape?<|im_end|>\n<|im_start|>assistant\ncircle<|im_end|>\n",
    ]
    return [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _packed(rows: list[torch.Tensor], pad_id: int, pad: int = 8) -> tuple[torch.Tensor, ...]:
    length = sum(len(r) for r in rows) + pad
    ids = torch.full((1, length), pad_id)
    seq_ids = torch.full((1, length), -1)
    pos = torch.zeros(3, 1, length, dtype=torch.long)
    start = 0
    for s, r in enumerate(rows):
        ids[0, start : start + len(r)], seq_ids[0, start : start + len(r)] = r, s
        pos[:, 0, start : start + len(r)] = torch.arange(len(r))
        start += len(r)
    return ids, pos, seq_ids


@pytest.mark.parametrize("backend", attention.available_backends("cuda") if torch.cuda.is_available() else [])
def test_cuda_backend_packs_exactly_and_is_bidirectional(tiny_model_dir: Path, backend: str) -> None:
    mdlm = build_mdlm_model(
        ModelConfig(str(tiny_model_dir), attn_implementation=backend), dtype=torch.bfloat16
    )
    mdlm.base_model.to("cuda").eval()
    tok = mdlm.tokenizer
    rows = _rows(tok)
    ids, pos, seq_ids = (x.cuda() for x in _packed(rows, tok.pad_token_id))
    with torch.no_grad():
        packed = mdlm.engine_module(ids, pos, seq_ids)
        start = 0
        for r in rows:
            alone_ids, alone_pos, alone_seq = (x.cuda() for x in _packed([r], tok.pad_token_id, pad=0))
            alone = mdlm.engine_module(alone_ids, alone_pos, alone_seq)
            torch.testing.assert_close(packed[0, start : start + len(r)], alone[0], atol=2e-2, rtol=2e-2)
            start += len(r)
        changed = ids.clone()
        changed[0, len(rows[0]) - 1] = tok.convert_tokens_to_ids("<|vision_end|>")
        moved = mdlm.engine_module(changed, pos, seq_ids)
    # Changing the last token of the first sub-sequence moves its first position, not the second's.
    assert not torch.equal(moved[0, 0], packed[0, 0])
    torch.testing.assert_close(moved[0, len(rows[0]) :], packed[0, len(rows[0]) :])


def test_bf16_mdlm_step_trains_on_cuda(tiny_model_dir: Path) -> None:
    backend = attention.available_backends("cuda")[0]
    mdlm = build_mdlm_model(
        ModelConfig(str(tiny_model_dir), attn_implementation=backend), dtype=torch.bfloat16
    )
    mdlm.base_model.to("cuda").train()
    tok = mdlm.tokenizer
    ids, pos, seq_ids = (x.cuda() for x in _packed(_rows(tok), tok.pad_token_id))
    answer_mask = torch.zeros_like(ids, dtype=torch.bool)
    answer_mask[0, 20:30] = True
    answer_mask &= seq_ids >= 0
    generator = torch.Generator(device="cuda").manual_seed(0)
    t_BS = sample_sequence_t(seq_ids, eps=1e-3, stratified=True, generator=generator)
    noisy = apply_masking(
        ids, answer_mask, seq_ids, t_BS, mask_token_id=mdlm.mask_token_id, generator=generator
    )
    params = [p for p in mdlm.engine_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(5):
        out = mdlm.engine_module(
            noisy.noisy_input_ids,
            pos,
            seq_ids,
            target_ids=noisy.target_ids,
            masked=noisy.masked,
            loss_weight=noisy.loss_weight,
            answer_mask=answer_mask,
            num_normalizer=int(answer_mask.sum()),
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
