"""Model assembly: split forward vs stock, packing with images, LoRA placement, frozen vision, export."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from trainer.config import LoraConfig, ModelConfig
from trainer.model import (
    MDLMModel,
    VisionFeatures,
    assemble_mdlm_model,
    build_mdlm_model,
    diffusion,
    ensure_mask_token,
    set_text_causal,
)

PATCH_DIM = 3 * 2 * 16 * 16  # channels * temporal patch * patch^2


@pytest.fixture(scope="module")
def mdlm(tiny_model_dir: Path) -> Iterator[MDLMModel]:
    model = build_mdlm_model(ModelConfig(str(tiny_model_dir)), dtype=torch.float32)
    model.base_model.eval()
    yield model


@pytest.fixture(scope="module")
def stock(tiny_model_dir: Path) -> Qwen3VLForConditionalGeneration:
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    set_text_causal(model, False)  # the same bidirectional config
    return model


def _sample(tok: Any, grid_hw: tuple[int, int] | None, question: str, answer: str) -> dict[str, Any]:
    """Chat ids of one sample (image first when given), its answer mask and random pixel patches."""
    image = ""
    if grid_hw is not None:
        image = "<|vision_start|>" + "<|image_pad|>" * (grid_hw[0] * grid_hw[1] // 4) + "<|vision_end|>"
    prompt = tok(
        f"<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )
    answer_ids = tok(f"{answer}<|im_end|>\n", add_special_tokens=False)["input_ids"]
    ids = torch.tensor(prompt["input_ids"] + answer_ids)
    answer_mask = torch.tensor([False] * len(prompt["input_ids"]) + [True] * (len(answer_ids) - 1) + [False])
    sample: dict[str, Any] = {"ids": ids, "answer_mask": answer_mask, "pixels": None, "thw": None}
    if grid_hw is not None:
        sample["thw"] = torch.tensor([[1, *grid_hw]])
        sample["pixels"] = torch.randn(grid_hw[0] * grid_hw[1], PATCH_DIM)
    return sample


def _positions(model: MDLMModel | Qwen3VLForConditionalGeneration, sample: dict[str, Any]) -> torch.Tensor:
    """Stock get_rope_index for one sequence: [3, L]."""
    base = model.base_model if isinstance(model, MDLMModel) else model
    ids = sample["ids"][None]
    types = (ids == base.config.image_token_id).int()
    pos, _ = base.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=sample["thw"])
    return pos[:, 0]


def _pack(model: MDLMModel, rows: list[list[dict[str, Any]]], length: int) -> dict[str, Any]:
    """Pack samples into rows (sub-sequences in order), pad to `length`, gather images row-major."""
    pad_id = model.tokenizer.pad_token_id
    batch = len(rows)
    out = {
        "input_ids": torch.full((batch, length), pad_id),
        "answer_mask": torch.zeros(batch, length, dtype=torch.bool),
        "seq_ids": torch.full((batch, length), -1),
        "position_ids": torch.zeros(3, batch, length, dtype=torch.long),
    }
    pixels, thw = [], []
    for b, samples in enumerate(rows):
        start = 0
        for s, sample in enumerate(samples):
            end = start + len(sample["ids"])
            out["input_ids"][b, start:end] = sample["ids"]
            out["answer_mask"][b, start:end] = sample["answer_mask"]
            out["seq_ids"][b, start:end] = s
            out["position_ids"][:, b, start:end] = _positions(model, sample)
            if sample["pixels"] is not None:
                pixels.append(sample["pixels"])
                thw.append(sample["thw"])
            start = end
    out["pixel_values"] = torch.cat(pixels) if pixels else None
    out["image_grid_thw"] = torch.cat(thw) if thw else None
    return out


def _vision(model: MDLMModel, batch: dict[str, Any]) -> VisionFeatures | None:
    if batch["pixel_values"] is None:
        return None
    return model.vision_features(batch["pixel_values"], batch["image_grid_thw"])


def test_split_forward_equals_stock_logits(mdlm: MDLMModel, stock: Qwen3VLForConditionalGeneration) -> None:
    torch.manual_seed(0)
    sample = _sample(mdlm.tokenizer, (4, 6), "What is written here?", "A short answer")
    ids = sample["ids"][None]
    with torch.no_grad():
        expected = stock(
            input_ids=ids,
            pixel_values=sample["pixels"],
            image_grid_thw=sample["thw"],
            mm_token_type_ids=(ids == stock.config.image_token_id).int(),
        ).logits
        vision = mdlm.vision_features(sample["pixels"], sample["thw"])
        hidden = mdlm.engine_module(ids, _positions(mdlm, sample)[:, None], torch.zeros_like(ids), vision)
        logits = mdlm.engine_module.lm_head(hidden)
    assert logits.shape == expected.shape
    assert torch.allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex"])
def test_packed_row_equals_sub_sequences_alone(mdlm: MDLMModel, backend: str) -> None:
    torch.manual_seed(1)
    tok = mdlm.tokenizer
    samples = [
        _sample(tok, (4, 4), "Colour?", "red"),
        _sample(tok, None, "Say hello", "hello there"),
        _sample(tok, (2, 6), "Which shape is it?", "a wide rectangle"),
    ]
    mdlm.set_attention(backend)
    try:
        length = sum(len(s["ids"]) for s in samples) + 5
        packed = _pack(mdlm, [samples], length)
        with torch.no_grad():
            hidden = mdlm.engine_module(
                packed["input_ids"], packed["position_ids"], packed["seq_ids"], _vision(mdlm, packed)
            )
            start = 0
            for sample in samples:
                alone = _pack(mdlm, [[sample]], len(sample["ids"]))
                hidden_alone = mdlm.engine_module(
                    alone["input_ids"], alone["position_ids"], alone["seq_ids"], _vision(mdlm, alone)
                )
                end = start + len(sample["ids"])
                assert torch.allclose(hidden[0, start:end], hidden_alone[0], atol=1e-5)
                start = end
    finally:
        mdlm.set_attention("sdpa")


def test_lora_only_on_language_model_attention(mdlm: MDLMModel) -> None:
    num_layers = mdlm.config.text_config.num_hidden_layers
    lora_modules = [name for name, module in mdlm.peft_model.named_modules() if hasattr(module, "lora_A")]
    pattern = re.compile(r"base_model\.model\.model\.language_model\.layers\.\d+\.self_attn\.[qkvo]_proj")
    assert len(lora_modules) == 4 * num_layers
    assert all(pattern.fullmatch(name) for name in lora_modules), lora_modules
    trainable = [name for name, p in mdlm.peft_model.named_parameters() if p.requires_grad]
    assert all(".lora_" in name or "trainable_tokens_delta" in name for name in trainable), trainable
    assert not any("visual" in name for name in trainable)
    # Only the mask row of the embedding is trainable, and the embedding was not resized.
    embed = mdlm.base_model.get_input_embeddings()
    weights = [p for name, p in embed.named_parameters() if name.endswith("weight") and not p.requires_grad]
    assert [tuple(w.shape) for w in weights] == [(151_936, mdlm.config.text_config.hidden_size)]
    assert mdlm.peft_model.peft_config["default"].trainable_token_indices == {"embed_tokens": [151_669]}
    assert mdlm.mask_token_id == mdlm.tokenizer.convert_tokens_to_ids("<|mask|>") == 151_669
    # The vision tower is not inside the DeepSpeed engine module.
    visual_ids = {id(p) for p in mdlm.visual.parameters()}
    assert not visual_ids & {id(p) for p in mdlm.engine_module.parameters()}
    assert mdlm.language is mdlm.engine_module


def _noisy_batch(model: MDLMModel, seed: int, length: int = 64) -> dict[str, Any]:
    torch.manual_seed(seed)
    tok = model.tokenizer
    rows = [
        [_sample(tok, (4, 4), "Colour?", "red and blue"), _sample(tok, None, "Hi", "hello there friend")],
        [_sample(tok, (2, 4), "Which shape is it?", "a wide rectangle")],
    ]  # 35 and 22 tokens
    batch = _pack(model, rows, length)
    gen = torch.Generator().manual_seed(seed)
    t_BS = diffusion.sample_sequence_t(batch["seq_ids"], generator=gen).clamp(min=0.6)  # mask plenty
    noised = diffusion.apply_masking(
        batch["input_ids"],
        batch["answer_mask"],
        batch["seq_ids"],
        t_BS,
        mask_token_id=model.mask_token_id,
        generator=gen,
    )
    batch["noised"] = noised
    return batch


def _loss(model: MDLMModel, batch: dict[str, Any], vision: VisionFeatures | None = None, **kw: Any) -> Any:
    noised = batch["noised"]
    return model.engine_module(
        noised.noisy_input_ids,
        batch["position_ids"],
        batch["seq_ids"],
        vision,
        target_ids=noised.target_ids,
        masked=noised.masked,
        loss_weight=noised.loss_weight,
        answer_mask=noised.answer_mask,
        **kw,
    )


def test_step_moves_only_lora_and_mask_row_and_exports(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    model = build_mdlm_model(ModelConfig(str(tiny_model_dir)), LoraConfig(dropout=0.0), dtype=torch.float32)
    batch = _noisy_batch(model, seed=2)
    assert bool(batch["noised"].masked.any())
    before = {name: p.detach().clone() for name, p in model.peft_model.named_parameters()}
    embed = model.base_model.get_input_embeddings()
    all_ids = torch.arange(151_936)
    with torch.no_grad():
        rows_before = embed(all_ids).clone()

    trainable = [p for p in model.engine_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model.engine_module.train()
    out = _loss(model, batch, _vision(model, batch))
    assert out.loss.requires_grad and torch.isfinite(out.loss)
    out.loss.backward()
    optimizer.step()

    for p in model.visual.parameters():
        assert not p.requires_grad and p.grad is None
    visual_ids = {id(p) for p in model.visual.parameters()}
    assert not visual_ids & {id(p) for p in optimizer.state}
    changed = [name for name, p in model.peft_model.named_parameters() if not torch.equal(p, before[name])]
    assert changed and all(".lora_" in name or "trainable_tokens_delta" in name for name in changed), changed
    assert any("trainable_tokens_delta" in name for name in changed)
    with torch.no_grad():
        rows_after = embed(all_ids)
    moved_rows = (rows_after != rows_before).any(dim=1).nonzero().flatten().tolist()
    assert moved_rows == [model.mask_token_id]

    # The adapter is standard: stock peft onto stock transformers gives the same logits.
    model.peft_model.save_pretrained(tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["trainable_token_indices"] == {"embed_tokens": [model.mask_token_id]}
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(reloaded, tmp_path / "adapter").eval()
    set_text_causal(reloaded, False)
    model.engine_module.eval()
    noised = batch["noised"]
    row = batch["seq_ids"][1] == 0  # row 1 holds one sample: the stock forward sees exactly it
    ids = noised.noisy_input_ids[1:, row]
    with torch.no_grad():
        hidden = model.engine_module(
            ids,
            batch["position_ids"][:, 1:, row],
            torch.zeros_like(ids),
            model.vision_features(batch["pixel_values"][-8:], batch["image_grid_thw"][-1:]),
        )
        expected = reloaded(
            input_ids=ids,
            pixel_values=batch["pixel_values"][-8:],
            image_grid_thw=batch["image_grid_thw"][-1:],
            mm_token_type_ids=(ids == reloaded.config.image_token_id).int(),
        ).logits
    # Equal everywhere but the <|mask|> column, which is never predicted (our head keeps its base row).
    keep = torch.arange(expected.shape[-1]) != model.mask_token_id
    assert torch.allclose(model.engine_module.lm_head(hidden)[..., keep], expected[..., keep], atol=1e-5)


def test_full_language_model_training_without_lora(tiny_model_dir: Path) -> None:
    model = build_mdlm_model(ModelConfig(str(tiny_model_dir)), LoraConfig(enabled=False), dtype=torch.float32)
    base = model.base_model
    trainable = {id(p) for p in base.parameters() if p.requires_grad}
    language = {id(p) for p in [*base.model.language_model.parameters(), *base.lm_head.parameters()]}
    assert trainable == language
    assert not any(p.requires_grad for p in base.model.visual.parameters())
    assert model.peft_model is base


def test_full_language_model_with_frozen_embeddings(tiny_model_dir: Path) -> None:
    """train_embeddings=False: layers and final norm train, the [V, H] matrix only in its mask row."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's wrapping warnings do not apply to MDLM (quiet_peft_wrapping)
        model = build_mdlm_model(
            ModelConfig(str(tiny_model_dir), train_embeddings=False),
            LoraConfig(enabled=False),
            dtype=torch.float32,
        )
    base = model.base_model
    language = base.model.language_model
    expected = {id(p) for p in [*language.layers.parameters(), *language.norm.parameters()]}
    trainable = [p for p in model.engine_module.parameters() if p.requires_grad]
    deltas = [
        n for n, p in model.engine_module.named_parameters() if p.requires_grad and "trainable_tokens" in n
    ]
    assert len(deltas) == 1
    assert {id(p) for p in trainable} - expected == {id(model.engine_module.get_parameter(deltas[0]))}
    embed_weight = language.embed_tokens.base_layer.weight
    assert not embed_weight.requires_grad
    before = embed_weight.detach().clone()
    norm_before = language.norm.weight.detach().clone()

    batch = _noisy_batch(model, seed=2)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    out = _loss(model, batch, _vision(model, batch))
    out.loss.backward()
    optimizer.step()
    assert torch.equal(embed_weight, before)
    assert not torch.equal(language.norm.weight, norm_before)
    # Export merges the trained mask row into a stock full model.
    merged = model.peft_model.merge_and_unload()
    moved = (merged.get_input_embeddings().weight != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == [model.mask_token_id]


def test_trainable_merger_runs_on_text_only_batches(tiny_model_dir: Path) -> None:
    model = build_mdlm_model(
        ModelConfig(str(tiny_model_dir), freeze_merger=False), LoraConfig(dropout=0.0), dtype=torch.float32
    )
    assert model.engine_module.visual is not None
    tok = model.tokenizer
    batch = _pack(model, [[_sample(tok, None, "Hi", "hello there friend")]], 24)
    batch["noised"] = diffusion.apply_masking(
        batch["input_ids"],
        batch["answer_mask"],
        batch["seq_ids"],
        torch.tensor([[0.9]]),
        mask_token_id=model.mask_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    out = _loss(model, batch)  # no pixel_values: the tower runs on a blank image, adds 0
    out.loss.backward()
    merger = [p for n, p in model.engine_module.visual.named_parameters() if p.requires_grad]
    assert merger and all(p.grad is not None and float(p.grad.abs().sum()) == 0.0 for p in merger)
    blocks = [p for n, p in model.engine_module.visual.named_parameters() if n.startswith("blocks.")]
    assert blocks and not any(p.requires_grad for p in blocks)
    with pytest.raises(ValueError, match="pass pixel_values"):
        model.engine_module(
            batch["input_ids"], batch["position_ids"], batch["seq_ids"], VisionFeatures(torch.zeros(0, 64))
        )


def test_gradient_checkpointing_same_loss_and_grads(tiny_model_dir: Path) -> None:
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA A init in both
        model = build_mdlm_model(
            ModelConfig(str(tiny_model_dir), gradient_checkpointing=checkpointing),
            LoraConfig(dropout=0.0),
            dtype=torch.float32,
        )
        assert model.base_model.model.language_model.gradient_checkpointing is checkpointing
        model.engine_module.train()
        batch = _noisy_batch(model, seed=3)
        out = _loss(model, batch, _vision(model, batch))
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.engine_module.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def _steps_over_lengths(model: MDLMModel, train: bool) -> Iterator[float]:
    """The loss the trainer computes (the engine module's forward with targets) on three batches of
    three packed lengths; with `train`, each followed by backward and a plain AdamW step (the update a
    DeepSpeed engine would make, without one)."""
    optimizer = torch.optim.AdamW([p for p in model.engine_module.parameters() if p.requires_grad], lr=1e-2)
    model.engine_module.train()
    for seed, length in enumerate((40, 56, 72)):  # multiples of 8, as the loader pads
        batch = _noisy_batch(model, seed, length)
        with torch.set_grad_enabled(train):
            loss = _loss(model, batch, _vision(model, batch)).loss
        if train:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        yield float(loss.detach())


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_compiled_decoder_layers_equal_eager_and_recompile_once(tiny_model_dir: Path, backend: str) -> None:
    """model.compile: three steps on three packed lengths give eager's losses; dynamo compiles the layer
    code (shared by all layers) once, and once more when the length first changes, never after.

    ``aot_eager`` stands in for inductor, the product's backend (about a minute on 2 CPU cores here).
    Flex has no backward on CPU: its steps are forwards only.

    Flex compiles once more at its first compiled step where transformers wraps the attention's forward
    with the ``kernels`` package (a dependency from transformers 5.25 on): that wrapper sets and resets
    a ``CompileableContextVar`` around the call, and dynamo does not replay the reset after a frame
    that holds the flex higher-order op (a 15-line module with flex_attention inside the same
    set/try/finally shows it; sdpa does not). The next layer's guard on the variable then fails once.
    It is one graph, no graph break, and no recompile after: a one-time compile cost, nothing per step."""
    from torch._dynamo.testing import CompileCounterWithBackend

    train = backend != "flex"
    losses: dict[bool, list[float]] = {}
    counter = CompileCounterWithBackend("aot_eager")
    frames = []
    torch._dynamo.reset()
    try:
        for compiled in (False, True):
            torch.manual_seed(0)  # the same LoRA init; no dropout (compiled random streams differ)
            model = build_mdlm_model(
                ModelConfig(str(tiny_model_dir), attn_implementation=backend),
                LoraConfig(dropout=0.0),
                dtype=torch.float32,
            )
            if compiled:
                model.compile_language_layers(counter)
            losses[compiled] = []
            for loss in _steps_over_lengths(model, train):
                losses[compiled].append(loss)
                frames.append(counter.frame_count)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=0.0)
    kernels_wrapped = hasattr(model.base_model.model.language_model.layers[0].self_attn, "_kernel_funcs")
    extra = int(backend == "flex" and kernels_wrapped)
    assert frames == [0, 0, 0, 1 + extra, 2 + extra, 2 + extra], frames  # eager steps, then compiled


def test_frozen_tower_sees_a_micro_batch_in_one_bf16_call(tiny_model_dir: Path) -> None:
    """docs/DESIGN.md §2: every image of a micro-batch (the loader's uint8 patches, as collated) goes
    through the frozen tower in one call, in bf16, under no_grad, with the backend's attention; the
    trainer makes this call once per micro-batch."""
    from trainer.data.batch import LoadedSample, collate_rows

    model = build_mdlm_model(ModelConfig(str(tiny_model_dir)), dtype=torch.bfloat16)
    assert model.config.vision_config._attn_implementation == "sdpa"
    torch.manual_seed(6)
    tok = model.tokenizer
    rows = [
        [_sample(tok, (4, 4), "Colour?", "red"), _sample(tok, (2, 6), "Shape?", "a wide rectangle")],
        [_sample(tok, None, "Hi", "hello"), _sample(tok, (4, 2), "Which?", "the tall one")],
    ]
    loaded = [
        [
            LoadedSample(
                key=f"{b}-{j}",
                input_ids=s["ids"],
                answer_mask=s["answer_mask"],
                position_ids=_positions(model, s),
                # The loader's patches: uint8, one frame (the model repeats it over the temporal patch).
                pixel_values=None
                if s["thw"] is None
                else torch.randint(0, 256, (len(s["pixels"]), PATCH_DIM // 2), dtype=torch.uint8),
                image_grid_thw=s["thw"],
            )
            for j, s in enumerate(row)
        ]
        for b, row in enumerate(rows)
    ]
    batch = collate_rows(loaded, tok.pad_token_id)
    calls = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((args[0].dtype, len(args[0]), len(kwargs["grid_thw"]), torch.is_grad_enabled()))

    hook = model.visual.register_forward_pre_hook(record, with_kwargs=True)
    try:
        vision = model.vision_features(batch.pixel_values, batch.image_grid_thw)
    finally:
        hook.remove()
    assert calls == [(torch.bfloat16, 16 + 12 + 8, 3, False)]
    assert vision.image_embeds.dtype == torch.bfloat16 and not vision.image_embeds.requires_grad
    assert len(vision.image_embeds) == int((batch.input_ids == model.config.image_token_id).sum())


def test_logits_at_excludes_mask(mdlm: MDLMModel) -> None:
    batch = _noisy_batch(mdlm, seed=4)
    noised = batch["noised"]
    with torch.no_grad():
        vision = _vision(mdlm, batch)
        logits = mdlm.engine_module.logits_at(
            noised.noisy_input_ids, batch["position_ids"], batch["seq_ids"], noised.masked, vision
        )
        hidden = mdlm.engine_module(noised.noisy_input_ids, batch["position_ids"], batch["seq_ids"], vision)
    assert logits.shape == (int(noised.masked.sum()), 151_936)
    assert bool(torch.isneginf(logits[:, mdlm.mask_token_id]).all())
    full = mdlm.engine_module.lm_head(hidden)[noised.masked]
    keep = torch.ones(151_936, dtype=torch.bool)
    keep[mdlm.mask_token_id] = False
    assert torch.allclose(logits[:, keep], full[:, keep], atol=1e-6)


def test_mask_token_added_to_a_stock_tokenizer() -> None:
    from trainer.model.tokenizer import build_qwen_tokenizer

    tok = build_qwen_tokenizer(with_mask_token=False)
    assert tok.convert_tokens_to_ids("<|mask|>") in (None, tok.unk_token_id)
    assert ensure_mask_token(tok, 151_936) == 151_669
    assert tok.convert_tokens_to_ids("<|mask|>") == 151_669
    with pytest.raises(ValueError, match="does not fit the embedding"):
        ensure_mask_token(tok, 151_000)


def test_meta_device_assembly_counts(mdlm: MDLMModel) -> None:
    """The parameter-count path of benchmarks/param_counts.py: meta device, same assembly."""
    with torch.device("meta"):
        meta_model = Qwen3VLForConditionalGeneration(mdlm.config)
    meta = assemble_mdlm_model(meta_model, mdlm.tokenizer)
    counts = meta.parameter_counts()
    assert counts == mdlm.parameter_counts()
    text = mdlm.config.text_config
    lora = (
        16
        * text.num_hidden_layers
        * (
            (text.hidden_size + text.num_attention_heads * text.head_dim) * 2
            + (text.hidden_size + text.num_key_value_heads * text.head_dim) * 2
        )
    )
    assert counts["trainable"] == lora + text.hidden_size  # LoRA q/k/v/o + the mask row


def test_vision_features_that_disagree_with_the_image_tokens_are_an_error(mdlm: MDLMModel) -> None:
    batch = _noisy_batch(mdlm, seed=5)
    vision = _vision(mdlm, batch)
    assert vision is not None
    doubled = torch.cat([batch["input_ids"]] * 2)  # twice the <|image_pad|> tokens, one set of features
    with torch.no_grad(), pytest.raises(RuntimeError, match="image_grid_thw and input_ids disagree"):
        mdlm.engine_module(
            doubled,
            torch.cat([batch["position_ids"]] * 2, dim=1),
            torch.cat([batch["seq_ids"]] * 2),
            vision,
        )


def test_sparse_trainable_tokens_equal_stock_peft(tiny_model_dir: Path) -> None:
    """The sparse <|mask|>-row forward gives stock PEFT's embedding outputs and gradients, and its
    head logits everywhere but in the never-predicted <|mask|> column."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    model = build_mdlm_model(ModelConfig(str(tiny_model_dir)), dtype=torch.float32)
    layers = [m for m in model.peft_model.modules() if isinstance(m, TrainableTokensLayer)]
    assert len(layers) == 2  # the embedding and the LM head tied to it
    embed = next(m for m in layers if isinstance(m.base_layer, torch.nn.Embedding))
    head = next(m for m in layers if isinstance(m.base_layer, torch.nn.Linear))
    delta = embed.trainable_tokens_delta["default"]
    with torch.no_grad():
        delta.add_(torch.randn_like(delta))  # a trained row differs from the base row
    mask_id = model.mask_token_id
    ids = torch.tensor([[9707, mask_id, 1879, mask_id, 151645]])
    adapters = embed.active_adapters

    embedded = {}
    for kind, forward in (("sparse", embed.forward_adapters), ("stock", embed._stock_forward_adapters)):
        delta.grad = None
        out = forward(ids, adapters)
        out.square().sum().backward()
        embedded[kind] = (out.detach(), delta.grad.clone())
    torch.testing.assert_close(embedded["sparse"][0], embedded["stock"][0])
    torch.testing.assert_close(embedded["sparse"][1], embedded["stock"][1])

    # The head: the same logits and input gradient but in the <|mask|> column, never predicted.
    keep = torch.arange(model.config.text_config.vocab_size) != mask_id
    logits = {}
    for kind, forward in (("sparse", head.forward_adapters), ("stock", head._stock_forward_adapters)):
        hidden = torch.randn(
            5, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0)
        )
        hidden.requires_grad_(True)
        out = forward(hidden, adapters)
        out[:, keep].square().sum().backward()
        logits[kind] = (out.detach()[:, keep], hidden.grad.clone())
    torch.testing.assert_close(logits["sparse"][0], logits["stock"][0])
    torch.testing.assert_close(logits["sparse"][1], logits["stock"][1])
    embedded_rows = embedded["sparse"][0][0]
    assert not torch.equal(embedded_rows[1], embed.base_layer.weight[mask_id])
