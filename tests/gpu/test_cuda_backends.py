"""On CUDA, per attention backend (flash where flash-attn is installed, compiled flex, sdpa): two
DeepSpeed ZeRO-2 bf16 steps of the trainer's own `Trainer` on packed rows with images, whose
sub-sequences start and end inside flex's 128-token blocks. Each backend's first-step gradients of
every trained weight (LoRA, the <|mask|> row) and its frozen vision tower's features (that tower
runs flash_attention_2 under flash) equal sdpa's within bf16 rounding. Skipped without a GPU."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from loader_shards import write_shard_set

from trainer.config import build_deepspeed_config, load_config
from trainer.model import attention
from trainer.run import distributed
from trainer.run.distributed import DistInfo

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BACKENDS = [
    pytest.param(
        "flash",
        marks=pytest.mark.skipif(
            not attention.flash_attn_available(), reason="flash-attn is not installed: pip install '.[flash]'"
        ),
    ),
    "flex",
    "sdpa",
]
# (question words, image grids) of samples of 53-231 tokens: packed to 512 tokens, the two steps' rows
# hold one to five samples each (boundaries off flex's 128-token blocks) and padding tails.
LAYOUT = [
    [
        (120, [(16, 16)]), (40, [(8, 12), (4, 4)]), (200, []), (90, [(12, 8)]), (60, [(8, 8)]),
        (150, [(16, 12)]), (30, [(4, 8)]), (110, [(8, 8), (8, 8)]), (70, []), (180, [(12, 12)]),
        (50, [(8, 4)]), (100, [(16, 8)]),
    ]
]  # fmt: skip
MAX_TOKENS = 512
# Relative error (norm) against sdpa. Kernels that sum in another order differ by bf16 rounding: eager,
# on the CPU, by at most 1.5e-2 on any trained weight; sub-sequences that see each other move them by
# 0.2-0.5. A boundary one token off (2-5e-2) hides in bf16's noise: tests/unit checks that in float32.
TOLERANCE = 5e-2


@dataclass
class Run:
    """What one backend's two steps leave behind (on the host)."""

    losses: list[float]
    gradients: dict[str, torch.Tensor]
    """Every trained weight's full gradient of the first step, before its update, float32."""
    image_embeds: list[torch.Tensor]
    """The frozen tower's merged image tokens of each micro-batch, float32."""
    seq_ids: list[torch.Tensor]
    """Each micro-batch's ``seq_ids``."""
    vision_attention: str


@pytest.fixture(scope="module")
def shards(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("packed-image-shards")
    write_shard_set(directory, AutoTokenizer.from_pretrained(tiny_model_dir), LAYOUT)
    return directory


@pytest.fixture(scope="module")
def process_group() -> Iterator[DistInfo]:
    """A one-rank NCCL group, as a plain `python -m trainer train` makes, for the whole module."""
    with mock.patch.dict(os.environ):  # setup sets RANK, MASTER_PORT, ... for itself
        info = distributed.setup()
        yield info
        distributed.teardown()


def _draw_lora_b(build: Callable[..., Any]) -> Callable[..., Any]:
    """`build_training_model` with LoRA B drawn instead of zero, before DeepSpeed copies the weights:
    the adapters then act in the forward and LoRA A gets a gradient at the first step."""

    def build_model(*args: Any) -> Any:
        model = build(*args)
        generator = torch.Generator().manual_seed(0)
        for name, param in model.engine_module.named_parameters():
            if "lora_B" in name:
                param.data.copy_(0.02 * torch.randn(param.shape, generator=generator))
        return model

    return build_model


def _train_two_steps(backend: str, model_dir: Path, shards: Path, output_dir: Path, info: DistInfo) -> Run:
    from deepspeed.utils import safe_get_full_grad

    from trainer.run import loop as train

    config = load_config(None, {
        "model.name_or_path": str(model_dir), "model.attn_implementation": backend, "lora.dropout": 0.0,
        "data.train": [str(shards)], "data.max_tokens": MAX_TOKENS, "data.num_workers": 0,
        "schedule.micro_batch_size": 2, "schedule.grad_accum_steps": 1, "schedule.max_steps": 2,
        "deepspeed.precision": "bf16", "checkpoint.save_at_end": False, "logging.report_to": [],
        "logging.progress": False, "output_dir": str(output_dir), "seed": 0,
    })  # fmt: skip
    # Built as for a CPU run: the client torch AdamW, not DeepSpeed's fused Adam (a JIT build of ~45 s;
    # the gradients compared are taken before any update).
    ds_config = build_deepspeed_config(config, world_size=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "build_training_model", _draw_lora_b(train.build_training_model))
        trainer = train.Trainer(config, ds_config, None, info)

    batches: list[Any] = []
    micro_step = trainer.micro_step

    def micro_step_keeping_batches(batch: Any, *args: Any) -> Any:
        batches.append(batch)
        return micro_step(batch, *args)

    engine = trainer.engine
    gradients: dict[str, torch.Tensor] = {}
    engine_step = engine.step

    def step_keeping_first_gradients() -> None:
        if not gradients:
            gradients.update({
                name: safe_get_full_grad(param).float().cpu()
                for name, param in engine.module.named_parameters() if param.requires_grad
            })  # fmt: skip
        engine_step()

    trainer.micro_step = micro_step_keeping_batches
    engine.step = step_keeping_first_gradients
    result = trainer.train()
    image_embeds = [
        trainer.model.vision_features(b.pixel_values, b.image_grid_thw).image_embeds.float().cpu()
        for b in batches
    ]
    return Run(
        result.losses, gradients, image_embeds, [b.seq_ids.cpu() for b in batches],
        trainer.model.visual.config._attn_implementation,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(
    tiny_model_dir: Path, shards: Path, tmp_path_factory: pytest.TempPathFactory, process_group: DistInfo
) -> Callable[[str], Run]:
    """Each backend's run, once per module (sdpa's is every other backend's reference)."""
    done: dict[str, Run] = {}

    def run(backend: str) -> Run:
        if backend not in done:
            output_dir = tmp_path_factory.mktemp(f"run-{backend}")
            done[backend] = _train_two_steps(backend, tiny_model_dir, shards, output_dir, process_group)
        return done[backend]

    return run


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_deepspeed_bf16_steps_per_backend_match_sdpa(runs: Callable[[str], Run], backend: str) -> None:
    run, reference = runs(backend), runs("sdpa")
    # The batches: rows past three flex blocks, several sub-sequences in a row, segments that end
    # inside a block, images.
    for seq_ids, embeds in zip(run.seq_ids, run.image_embeds, strict=True):
        cu_seqlens, _ = attention.varlen_boundaries(seq_ids)
        assert seq_ids.shape[1] > 3 * 128 and int(seq_ids.max()) >= 2
        assert (cu_seqlens % 128 != 0).any() and len(embeds) > 0
    assert run.vision_attention == ("flash_attention_2" if backend == "flash" else "sdpa")
    assert len(run.losses) == 2 and all(math.isfinite(loss) for loss in run.losses)
    assert run.losses[0] == pytest.approx(reference.losses[0], rel=1e-2)

    for embeds, reference_embeds in zip(run.image_embeds, reference.image_embeds, strict=True):
        assert _relative_error(embeds, reference_embeds) < TOLERANCE
    assert run.gradients.keys() == reference.gradients.keys()
    assert (
        sum("lora_A" in name for name in run.gradients) == sum("lora_B" in name for name in run.gradients) > 0
    )
    for name, gradient in run.gradients.items():
        assert reference.gradients[name].norm() > 0, name
        assert _relative_error(gradient, reference.gradients[name]) < TOLERANCE, name
