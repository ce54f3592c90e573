"""Held-out NELBO on a fixed t grid with fixed masks, and masked-token accuracy (tiny real model)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from test_sampling import build_shards, save_run

from data_tools.index import read_index
from trainer.cli.evaluate import main as evaluate_main
from trainer.config import ModelConfig
from trainer.data import LoadedSample, PackedBatch, collate_rows
from trainer.inference.evaluate import ImageSwapper, choose_metric
from trainer.inference.generate import build_prompt, load_model
from trainer.model.diffusion import gather_masked, masked_diffusion_loss
from trainer.model.pixels import PixelNormaliser
from trainer.model.positions import mrope_position_ids
from trainer.model.processor import load_processor
from trainer.run.nelbo import fixed_uniforms, nelbo_eval
from trainer.run.run_settings import read_settings


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def samples(tiny_model_dir: Path, model: Any) -> list[LoadedSample]:
    """Four chat samples (two with an image) whose answers are real tokenised text."""
    processor = load_processor(tiny_model_dir)
    tokenizer = processor.tokenizer
    config = model.config
    items = [
        ("What colour is it?", "red", Image.new("RGB", (64, 64), (220, 20, 20))),
        ("Name a shape.", "a triangle with three sides", None),
        ("What is shown?", "blue square", Image.new("RGB", (96, 64), (20, 20, 220))),
        ("Count to three.", "one two three", None),
    ]
    out = []
    for number, (question, answer, image) in enumerate(items):
        prompt = build_prompt(processor, question, [image] if image is not None else [])
        answer_ids = [*tokenizer.encode(answer), tokenizer.convert_tokens_to_ids("<|im_end|>")]
        tail = tokenizer.encode("\n")
        input_ids = torch.tensor(prompt.input_ids + answer_ids + tail)
        answer_mask = torch.zeros(len(input_ids), dtype=torch.bool)
        answer_mask[len(prompt.input_ids) : len(prompt.input_ids) + len(answer_ids)] = True
        position_ids = mrope_position_ids(
            input_ids,
            prompt.image_grid_thw,
            spatial_merge_size=config.vision_config.spatial_merge_size,
            image_token_id=config.image_token_id,
            vision_start_token_id=config.vision_start_token_id,
        )
        out.append(
            LoadedSample(
                f"s{number}", input_ids, answer_mask, position_ids, prompt.pixel_values, prompt.image_grid_thw
            )
        )
    return out


def _batches(samples: list[LoadedSample], layout: list[list[list[int]]], pad: int) -> list[PackedBatch]:
    return [collate_rows([[samples[i] for i in row] for row in batch], pad) for batch in layout]


def test_fixed_masks_are_keyed_by_sample_and_nested(samples: list[LoadedSample], model: Any) -> None:
    pad = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    (one,) = _batches(samples, [[[0, 1], [2, 3]]], pad)
    (other,) = _batches(samples, [[[3], [1, 2, 0]]], pad)
    u_one = fixed_uniforms(one.answer_mask, one.seq_ids, one.keys, seed=0)
    u_other = fixed_uniforms(other.answer_mask, other.seq_ids, other.keys, seed=0)
    # Sample s0's answer tokens draw the same uniforms wherever it is packed.
    where_one = one.answer_mask[0] & (one.seq_ids[0] == 0)
    where_other = other.answer_mask[1] & (other.seq_ids[1] == 2)
    assert torch.equal(u_one[0][where_one], u_other[1][where_other])
    assert (u_one[~one.answer_mask] == 2.0).all()  # never masked outside answers
    assert not torch.equal(u_one, fixed_uniforms(one.answer_mask, one.seq_ids, one.keys, seed=1))
    answer = one.answer_mask
    assert ((u_one < 0.15) <= (u_one < 0.5)).all() and torch.equal(u_one < 1.0, answer)


def test_nelbo_is_fixed_across_packings_and_calls(samples: list[LoadedSample], model: Any) -> None:
    pad = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    mask = model.mask_token_id
    packed = nelbo_eval(model, _batches(samples, [[[0, 1], [2, 3]]], pad), mask_token_id=mask)
    again = nelbo_eval(model, _batches(samples, [[[0, 1], [2, 3]]], pad), mask_token_id=mask)
    unpacked = nelbo_eval(model, _batches(samples, [[[3]], [[1], [2]], [[0]]], pad), mask_token_id=mask)
    assert packed == again
    assert packed["num_samples"] == 4 and packed["num_answer_tokens"] == sum(
        int(s.answer_mask.sum()) for s in samples
    )
    for key, value in packed.items():
        assert value == pytest.approx(unpacked[key], rel=1e-4, abs=1e-6), key
    # A random model over a 151k vocabulary: CE near log(V), accuracy near 0.
    assert 0.5 * math.log(151_936) < packed["ce@0.5"] < 2 * math.log(151_936)
    assert packed["masked_accuracy@1"] < 0.2
    assert set(packed) >= {
        "nelbo",
        "masked_accuracy@0.15",
        "masked_accuracy@0.5",
        "masked_accuracy@1",
        "ce@0.1",
    }
    reseeded = nelbo_eval(model, _batches(samples, [[[0, 1], [2, 3]]], pad), mask_token_id=mask, seed=7)
    assert reseeded["nelbo"] != packed["nelbo"]


def test_nelbo_matches_the_training_loss_with_the_same_masks(samples: list[LoadedSample], model: Any) -> None:
    """At one grid point t the NELBO is the training objective (answer-token normalised) with the
    fixed masks: the same number the model's own loss gives."""
    pad = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    (batch,) = _batches(samples, [[[0, 1], [2, 3]]], pad)
    result = nelbo_eval(model, [batch], mask_token_id=model.mask_token_id, t_grid=(0.5,), accuracy_t=(1.0,))
    u_BL = fixed_uniforms(batch.answer_mask, batch.seq_ids, batch.keys, seed=0)
    masked_BL = batch.answer_mask & (u_BL < 0.5)
    noisy_BL = torch.where(masked_BL, model.mask_token_id, batch.input_ids)
    with torch.no_grad():
        vision = model.vision_features(batch.pixel_values, batch.image_grid_thw)
        hidden = model.language(noisy_BL, batch.position_ids, batch.seq_ids, vision)
        loss = masked_diffusion_loss(
            hidden,
            model.language.lm_head,
            gather_masked(batch.input_ids, masked_BL, masked_BL.float() * 2.0),  # loss_weight 1/t
            mask_token_id=model.mask_token_id,
            answer_mask_BL=batch.answer_mask,
        )
    assert result["nelbo"] == pytest.approx(float(loss.loss), rel=1e-5)


def test_nelbo_eval_restores_train_mode_and_rejects_bad_t(samples: list[LoadedSample], model: Any) -> None:
    pad = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batches = _batches(samples, [[[0]]], pad)
    model.language.train()
    try:
        nelbo_eval(model, batches, mask_token_id=model.mask_token_id, t_grid=(0.5,), accuracy_t=())
        assert model.language.training
    finally:
        model.language.eval()
    with pytest.raises(ValueError, match="every t must lie"):
        nelbo_eval(model, batches, mask_token_id=model.mask_token_id, t_grid=(0.0,))


def test_nelbo_with_the_vision_merger_inside_the_engine(
    tiny_model_dir: Path, samples: list[LoadedSample]
) -> None:
    """--freeze_merger False: the engine module encodes pixels itself; evaluation passes them in."""
    from trainer.model import build_mdlm_model

    trained = build_mdlm_model(ModelConfig(str(tiny_model_dir), freeze_merger=False), dtype=torch.float32)
    assert trained.language.visual is not None
    pad = trained.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batches = _batches(samples, [[[0, 1], [2, 3]]], pad)
    result = nelbo_eval(trained, batches, mask_token_id=trained.mask_token_id)
    assert math.isfinite(result["nelbo"]) and result["num_samples"] == 4


def test_blank_control_keeps_a_loader_batch_in_uint8_patches(tiny_model_dir: Path) -> None:
    """`--image-mode blank` on the NELBO batches: white uint8 patches, which the model normalises into
    the processor's white image."""
    image_processor = load_processor(tiny_model_dir).image_processor
    swapper = ImageSwapper("blank", image_processor)
    grid_thw = torch.tensor([[1, 2, 4], [1, 4, 2]])
    blank = swapper.swap(torch.zeros(16, 3 * 16 * 16, dtype=torch.uint8), grid_thw)
    white = swapper.swap(torch.zeros(16, 3 * 2 * 16 * 16), grid_thw)
    assert blank.dtype == torch.uint8 and blank.eq(255).all()
    assert torch.equal(PixelNormaliser(image_processor)(blank), white)


# ------------------------------------------------------------------------------------------------
# The evaluate command: the metric the shard set records, and the run's settings


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """`train/` and `test/` built with `--metric anls` and images of 64x64 to 128x128 pixels."""
    return build_shards(tmp_path_factory.mktemp("eval-shards"), tiny_model_dir)


def test_metric_auto_is_what_the_shard_set_records_never_its_path(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = read_index(shards / "test")
    assert choose_metric("auto", index) == "anls" and capsys.readouterr().err == ""
    assert choose_metric("relaxed_accuracy", index) == "relaxed_accuracy"
    # Nothing recorded: exact match, and a note on how to record one (a path such as
    # /home/docker/docvqa/test no longer matters: the set's own metadata decides).
    index["build"]["metric"] = ""
    assert choose_metric("auto", index) == "exact_match"
    assert "data_tools build --metric" in capsys.readouterr().err
    assert choose_metric("auto", {**index, "synth": {"tasks": {}}}) == "exact_match"
    assert capsys.readouterr().err == ""  # the synthetic demo set is exact match by design
    index["build"]["metric"] = "bleu"
    with pytest.raises(ValueError, match="records metric 'bleu'"):
        choose_metric("auto", index)
    with pytest.raises(ValueError, match="--metric 'bleu'"):
        choose_metric("bleu", index)


def test_evaluate_reads_the_run_settings_of_a_checkpoint(
    shards: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run trained with diffusion.shift (and the merger) is evaluated with shift, no flag needed."""
    overrides = {"diffusion.shift": True, "model.freeze_merger": False}
    checkpoint, _ = save_run(tmp_path / "run", tiny_model_dir, shards / "train", overrides)
    argv = ["--model", str(tiny_model_dir), "--checkpoint", str(checkpoint), "--data", str(shards)]
    argv += [
        "--limit",
        "2",
        "--steps",
        "2",
        "--max-pixels",
        str(256 * 256),
        "--output",
        str(tmp_path / "e.json"),
    ]
    assert evaluate_main(argv) == 0
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "e.json").read_text())
    settings = read_settings(checkpoint)
    assert settings is not None
    assert report["shift"] is True and report["metric"] == "anls"
    assert report["generation"]["max_new_tokens"] == settings["max_new_tokens"]
    assert math.isfinite(report["nelbo"]["nelbo"]) and report["num_samples"] == 2
    (line,) = [line for line in err.splitlines() if line.startswith("run settings from")]
    taken = f"shift=True, max_new_tokens={settings['max_new_tokens']}, block_size=32, min_pixels=4096"
    assert line.endswith(f"mdlm_generation.json: {taken}")
    # The held-out images are used as stored: a model told to read another size hears about it.
    assert f"{shards / 'test'} was built with max_pixels 16384, the model reads 65536" in err
