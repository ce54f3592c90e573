"""The micro-batch loop of `Trainer.train_step`: no host synchronisation, one ZeRO-3 head call per
micro-batch, the fused-loss dispatch (the real tiny model; no DeepSpeed, no process group)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import LoraConfig, ModelConfig, TrainConfig
from trainer.data.batch import LoadedSample, PackedBatch, collate_rows
from trainer.model import MDLMModel, build_mdlm_model
from trainer.model.positions import mrope_position_ids
from trainer.run.distributed import DistInfo
from trainer.run.loop import build_training_model
from trainer.run.step import TrainStep
from trainer.run.step_stats import StepSums

# What reads a tensor's value on the host: on a GPU each one waits for the device to catch up.
CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


class StandInEngine:
    """What `train_step` needs of a DeepSpeed engine: forward, backward, step, the gradient norm."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        loss.backward()

    def step(self) -> None:
        self.module.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> None:
        return None


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Iterator[MDLMModel]:
    yield build_mdlm_model(ModelConfig(str(tiny_model_dir)), LoraConfig(dropout=0.0), dtype=torch.float32)


def _sample(model: MDLMModel, key: str, question: str, answer: str) -> LoadedSample:
    tok = model.tokenizer
    prompt = tok(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    answer_ids = tok(f"{answer}<|im_end|>\n", add_special_tokens=False)["input_ids"]
    ids = torch.tensor(prompt["input_ids"] + answer_ids)
    answer_mask = torch.tensor([False] * len(prompt["input_ids"]) + [True] * (len(answer_ids) - 1) + [False])
    positions = mrope_position_ids(
        ids,
        None,
        spatial_merge_size=2,
        image_token_id=model.config.image_token_id,
        vision_start_token_id=model.config.vision_start_token_id,
    )
    return LoadedSample(key, ids, answer_mask, positions, None, None)


def _micro_batches(model: MDLMModel) -> list[PackedBatch]:
    pad = model.tokenizer.pad_token_id
    a = _sample(model, "a", "Colour?", "red and blue")
    b = _sample(model, "b", "Hi", "hello there friend")
    c = _sample(model, "c", "Which shape is it?", "a wide rectangle")
    # The last micro-batch is one dummy row: nothing masked, the head runs on a placeholder.
    return [collate_rows([[a, b], [c]], pad), collate_rows([[c, a]], pad), collate_rows([[]], pad)]


def _step(model: MDLMModel, *, zero3: bool, fused_ce: Any = None, chunk: int = 1024) -> TrainStep:
    """The trainer's step over a stand-in engine (no DeepSpeed engine, loader or process group)."""
    config = TrainConfig()
    config.diffusion.ce_chunk_size = chunk
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return replace(
        TrainStep.for_model(config, info, model, StandInEngine(model.engine_module), zero3=zero3),
        fused_ce=fused_ce,
    )


def fused_reference(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """liger-kernel's fused linear cross-entropy (reduction="none"), written out: float32 CE of
    hidden @ weight.T + bias per token."""
    return F.cross_entropy((hidden @ weight.t() + bias).float(), target, reduction="none")


@pytest.mark.parametrize(
    "head",
    [{"zero3": False, "chunk": 2}, {"zero3": True}, {"zero3": False, "fused_ce": fused_reference}],
    ids=["chunked", "zero3", "fused"],
)
def test_micro_batch_loop_reads_nothing_from_the_device(
    model: MDLMModel, monkeypatch: pytest.MonkeyPatch, head: dict[str, Any]
) -> None:
    """Between the first micro-batch's copy to the device and the step's one reduction, no tensor
    value is read on the host (the counts the host needs come from the noise it drew itself)."""
    state: dict[str, Any] = {"on": False, "calls": []}

    def counting(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if state["on"]:
                caller = sys._getframe(1).f_code
                state["calls"].append((Path(caller.co_filename).name, caller.co_name, name))
            return original(self, *args, **kwargs)

        return wrapper

    def switch(on: bool, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            state["on"] = on
            return original(*args, **kwargs)

        return wrapper

    for name in CONVERSIONS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    # The loop starts with the first batch's copy to the device and ends at the step's reduction.
    monkeypatch.setattr(PackedBatch, "to", switch(True, PackedBatch.to))
    monkeypatch.setattr(StepSums, "reduced", switch(False, StepSums.reduced))
    stats = _step(model, **head)(_micro_batches(model), step=3)
    monkeypatch.undo()

    assert stats.num_masked > 0 and torch.isfinite(torch.tensor(stats.loss))
    assert state["calls"] == []


def test_zero3_calls_the_head_once_per_micro_batch(model: MDLMModel) -> None:
    """Every rank calls the (ZeRO-3 gathered) head as often as the others with no collective: once
    per micro-batch, whatever its masked count (none: a placeholder call); the loss is unchanged."""
    calls: list[int] = []
    hook = model.engine_module.lm_head.register_forward_hook(lambda _m, args, _o: calls.append(len(args[0])))
    try:
        chunked = _step(model, zero3=False, chunk=2)(_micro_batches(model), step=3)
        num_chunked = len(calls)
        calls.clear()
        zero3 = _step(model, zero3=True)(_micro_batches(model), step=3)
    finally:
        hook.remove()
    assert len(calls) == 3 and calls[-1] == 1  # the dummy micro-batch: one placeholder row
    assert num_chunked > 3
    assert zero3.num_masked == chunked.num_masked > 0
    assert zero3.loss == pytest.approx(chunked.loss, rel=1e-6)


def test_trainer_passes_the_fused_loss_to_the_real_head(model: MDLMModel) -> None:
    """The fused path on the model's own head (PEFT trainable tokens over the tied linear) gives the
    chunked loss (the stand-in computes liger's math; tests/unit/trainer/test_diffusion.py has the
    dispatch and the gradients)."""
    chunked = _step(model, zero3=False)(_micro_batches(model), step=3)
    fused = _step(model, zero3=False, fused_ce=fused_reference)(_micro_batches(model), step=3)
    assert fused.loss == pytest.approx(chunked.loss, rel=1e-6)


def test_the_trained_half_is_in_train_mode_so_checkpointing_engages(tiny_model_dir: Path) -> None:
    """from_pretrained returns eval mode, where Hugging Face layers skip gradient checkpointing."""
    config = TrainConfig(model=ModelConfig(str(tiny_model_dir), gradient_checkpointing=True))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = build_training_model(config, "fp32", info)
    layers = model.base_model.model.language_model.layers
    assert model.engine_module.training and all(layer.training for layer in layers)
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not model.visual.training  # the frozen tower stays in eval mode
