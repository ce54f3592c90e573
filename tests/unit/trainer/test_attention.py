"""Packed bidirectional attention: kernels against the dense reference, and the model per backend.

docs/DESIGN.md §1: every backend in use must be shown bidirectional (a late token moves an early
logit), causal when the causal flags are set back, and padding invariant. flash-attn needs CUDA: here
its varlen kernel is replaced by a float64 loop over ``cu_seqlens``, so the wrapper's packing is tested.
"""

from __future__ import annotations

import itertools
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.data.batch import LoadedSample, collate_rows
from trainer.model import MDLMModel, attention, build_mdlm_model, set_text_causal

BACKENDS = attention.available_backends("cpu")  # sdpa, eager, flex here; flash only on CUDA


class _Module(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.is_causal = causal


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_ids: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Loop over rows and sub-sequences, plain softmax attention on each alone: [B, L, H, D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype)
    for b in range(q.shape[0]):
        for s in seq_ids[b].unique().tolist():
            if s < 0:
                continue
            idx = (seq_ids[b] == s).nonzero().flatten()
            scores = q[b][:, idx] @ k[b][:, idx].transpose(1, 2) / q.shape[-1] ** 0.5
            if causal:
                scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
            out[b, idx] = (scores.softmax(-1) @ v[b][:, idx]).transpose(0, 1)
    return out


def test_dense_mask_by_hand() -> None:
    seq_ids = torch.tensor([[0, 0, 1, -1]])
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool
    )  # padding attends only to itself
    assert torch.equal(attention.dense_block_mask(seq_ids)[0, 0], expected)
    assert torch.equal(attention.dense_block_mask(seq_ids, causal=True)[0, 0], expected & expected.tril())


def test_varlen_boundaries() -> None:
    seq_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0], [0, 1, -1, -1, -1, -1]])
    cu, max_len = attention.varlen_boundaries(seq_ids)
    # Row 1 has one sequence id 0 right after row 0's padding: a new segment at the row boundary.
    assert cu.tolist() == [0, 2, 5, 6, 12, 13, 14, 18]
    assert cu.dtype == torch.int32 and max_len == 6


@pytest.mark.parametrize("backend", [b for b in BACKENDS])
@pytest.mark.parametrize("causal", [False, True])
def test_backend_matches_per_sequence_reference(backend: str, causal: bool) -> None:
    torch.manual_seed(0)
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1, -1], [0] * 7 + [1] * 5])
    q = torch.randn(2, 4, 12, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 12, 16, dtype=torch.float64), torch.randn(2, 2, 12, 16, dtype=torch.float64)
    packed = attention.prepare_packed_attention(seq_ids, backend)
    function = attention._FUNCTIONS[backend]
    out, _ = function(_Module(causal), q, k, v, None, scaling=16**-0.5, **{attention.KWARG: packed})
    expected = _reference(q, k, v, seq_ids, causal)
    real = seq_ids >= 0
    assert out.shape == (2, 12, 4, 16)
    assert torch.allclose(out[real], expected[real], atol=1e-10)
    assert torch.isfinite(out).all()  # padding rows too


@pytest.fixture
def fake_flash(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """``flash_attn`` replaced by a module whose varlen function is a float64 loop over ``cu_seqlens``
    (flash-attn's contract: tokens [T, H, D], k/v heads shared by consecutive query heads); returns the
    ``cu_seqlens`` of every call."""
    calls: list[torch.Tensor] = []

    def flash_attn_varlen_func(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
        softmax_scale: float | None = None, causal: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
        longest = int(cu_seqlens_q.diff().max())
        assert int(cu_seqlens_q[-1]) == len(q) and max_seqlen_q == max_seqlen_k == longest
        assert dropout_p == 0.0 and (
            softmax_scale is None or softmax_scale == pytest.approx(q.shape[-1] ** -0.5)
        )
        calls.append(cu_seqlens_q)
        out = torch.empty_like(q)
        for start, end in itertools.pairwise(cu_seqlens_q.tolist()):
            # One segment alone is one sequence of the reference: [1, H, S, D].
            q_1HSD, k_1HSD, v_1HSD = (x[start:end].transpose(0, 1)[None].double() for x in (q, k, v))
            one_seq = torch.zeros(1, end - start, dtype=torch.long)
            out[start:end] = _reference(q_1HSD, k_1HSD, v_1HSD, one_seq, causal)[0].to(q.dtype)
        return out

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return calls


@pytest.mark.parametrize("causal", [False, True])
def test_flash_wrapper_packs_like_sdpa(fake_flash: list[torch.Tensor], causal: bool) -> None:
    """Flattening [B, H, L, D] to tokens, the segments (padding tails, a row that starts with the id its
    neighbour ended with) and the way back to [B, L, H, D] give the sdpa backend's output."""
    torch.manual_seed(0)
    seq_ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 3 + [-1] * 3, [0] * 13 + [1] * 7, [0] * 4 + [-1] * 16])
    q = torch.randn(3, 4, 20, 16)
    k, v = torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    module = _Module(causal)
    outputs = {}
    for backend in ("flash", "sdpa"):
        packed = attention.prepare_packed_attention(seq_ids, backend)
        function = attention._FUNCTIONS[backend]
        outputs[backend], _ = function(module, q, k, v, None, scaling=16**-0.5, **{attention.KWARG: packed})
    assert [c.tolist() for c in fake_flash] == [[0, 5, 14, 17, 20, 33, 40, 44, 60]]
    real = seq_ids >= 0
    assert outputs["flash"].shape == (3, 20, 4, 16) and torch.isfinite(outputs["flash"]).all()
    torch.testing.assert_close(outputs["flash"][real], outputs["sdpa"][real], atol=1e-6, rtol=1e-5)


def test_backends_are_registered_in_transformers() -> None:
    from transformers import AttentionInterface

    attention.register_attention_backends()
    for backend in attention.BACKENDS:
        assert attention.attn_implementation_name(backend) in AttentionInterface()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.attn_implementation_name("ring")


def test_registered_names_are_not_mistaken_for_transformers_kernels() -> None:
    """Transformers dispatches on words inside an implementation name (5.25 sends any name with
    "flash" to its hub kernel loader; "sdpa", "flex_attention", "paged|" and ``org/repo`` names have
    their own paths): ours contain none of them, so stock code treats them as plain registered functions."""
    from transformers.utils.generic import is_flash_attention_requested

    for backend in attention.BACKENDS:
        name = attention.attn_implementation_name(backend)
        assert not any(word in name for word in ("flash", "sdpa", "flex", "paged", "/", ":")), name
        assert not is_flash_attention_requested(requested_attention_implementation=name)


# ---------------------------------------------------------------------------------------------
# The assembled model, per backend


@pytest.fixture(scope="module")
def mdlm(tiny_model_dir: Path) -> Iterator[MDLMModel]:
    model = build_mdlm_model(
        ModelConfig(str(tiny_model_dir), attn_implementation="sdpa"), dtype=torch.float32
    )
    model.base_model.eval()
    yield model


def _conversation(tok: object, question: str, answer: str) -> tuple[torch.Tensor, int]:
    """Chat ids (text only) and the index of the first answer token."""
    prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(f"{answer}<|im_end|>\n", add_special_tokens=False)["input_ids"]
    return torch.tensor(prompt_ids + answer_ids), len(prompt_ids)


def _hidden(mdlm: MDLMModel, rows: list[torch.Tensor], pad_to: int | None = None) -> torch.Tensor:
    length = pad_to or max(len(r) for r in rows)
    pad_id = mdlm.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = torch.full((len(rows), length), pad_id)
    seq_ids = torch.full((len(rows), length), -1)
    pos = torch.zeros(3, len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)], seq_ids[b, : len(r)] = r, 0
        pos[:, b, : len(r)] = torch.arange(len(r))
    with torch.no_grad():
        return mdlm.engine_module(ids, pos, seq_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_bidirectional_causal_and_padding(mdlm: MDLMModel, backend: str) -> None:
    mdlm.set_attention(backend)
    try:
        tok = mdlm.tokenizer
        ids, first_answer = _conversation(tok, "What colour is the square?", "It is red")
        changed = ids.clone()
        changed[-1] = tok.convert_tokens_to_ids("<|vision_end|>")
        logits = mdlm.engine_module.lm_head(_hidden(mdlm, [ids, changed]))
        # Bidirectional: the last token reaches the first answer position.
        assert not torch.allclose(logits[0, first_answer], logits[1, first_answer], atol=1e-4)

        set_text_causal(mdlm.base_model, True)
        try:
            logits_causal = mdlm.engine_module.lm_head(_hidden(mdlm, [ids, changed]))
        finally:
            set_text_causal(mdlm.base_model, False)
        assert torch.allclose(logits_causal[0, :-1], logits_causal[1, :-1], atol=1e-6)

        # Padding invariance: a padded batch equals each row alone.
        short, _ = _conversation(tok, "Shape?", "circle")
        batch = _hidden(mdlm, [ids, short], pad_to=len(ids) + 5)
        assert torch.allclose(batch[0, : len(ids)], _hidden(mdlm, [ids])[0], atol=1e-5)
        assert torch.allclose(batch[1, : len(short)], _hidden(mdlm, [short])[0], atol=1e-5)
    finally:
        mdlm.set_attention("sdpa")


def test_model_flash_path_equals_sdpa_with_a_fake_kernel(
    mdlm: MDLMModel, fake_flash: list[torch.Tensor]
) -> None:
    """The flash backend inside the model: the batch's ``cu_seqlens`` reach every layer's kernel and
    the packed rows' hidden states equal sdpa's."""
    tok = mdlm.tokenizer
    samples = []
    for key, question, answer in (
        ("a", "Colour?", "red"),
        ("b", "Which shape is it?", "a wide blue oval"),
        ("c", "Hi", "hello"),
    ):
        ids, first_answer = _conversation(tok, question, answer)
        answer_mask = torch.arange(len(ids)) >= first_answer
        samples.append(LoadedSample(key, ids, answer_mask, torch.arange(len(ids)).expand(3, -1), None, None))
    batch = collate_rows([samples[:2], samples[2:]], tok.pad_token_id)
    with torch.no_grad():
        sdpa = mdlm.engine_module(batch.input_ids, batch.position_ids, batch.seq_ids)
        mdlm.set_attention("flash")
        try:
            text_config = mdlm.base_model.config.text_config
            assert text_config._attn_implementation == attention.attn_implementation_name("flash")
            flash = mdlm.engine_module(
                batch.input_ids, batch.position_ids, batch.seq_ids, cu_seqlens=batch.cu_seqlens,
                max_seqlen=batch.max_seqlen,
            )  # fmt: skip
        finally:
            mdlm.set_attention("sdpa")
    num_layers = len(mdlm.base_model.model.language_model.layers)
    assert [c.tolist() for c in fake_flash] == [batch.cu_seqlens.tolist()] * num_layers
    real = batch.seq_ids >= 0
    torch.testing.assert_close(flash[real], sdpa[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("stock", ["sdpa", "eager"])
def test_stock_transformers_path_is_bidirectional(mdlm: MDLMModel, stock: str) -> None:
    """Decision 1 on the stock code path (what a merged export runs): flags alone, no packing."""
    base = mdlm.base_model
    tok = mdlm.tokenizer
    ids, first_answer = _conversation(tok, "Which shape?", "a small blue triangle")
    changed = ids.clone()
    changed[-1] = tok.convert_tokens_to_ids("<|vision_end|>")
    short, _ = _conversation(tok, "Colour?", "red")
    base.set_attn_implementation({"text_config": stock})
    try:
        with torch.no_grad():
            logits = base(input_ids=torch.stack([ids, changed])).logits
            assert not torch.allclose(logits[0, first_answer], logits[1, first_answer], atol=1e-4)
            padded = torch.cat([short, torch.full((len(ids) - len(short),), tok.pad_token_id)])
            mask = torch.tensor([[1] * len(ids), [1] * len(short) + [0] * (len(ids) - len(short))])
            batch = base(input_ids=torch.stack([ids, padded]), attention_mask=mask).logits
            alone = base(input_ids=short[None]).logits
            assert torch.allclose(batch[1, : len(short)], alone[0], atol=1e-4)
    finally:
        mdlm.set_attention("sdpa")
