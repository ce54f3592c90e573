"""Export: a checkpoint -> PEFT adapter / merged folder -> stock peft + transformers give our logits."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from trainer.model.processor import load_processor
from trainer.run.checkpoint import checkpoint_root
from trainer.run.run_settings import read_settings

RunCmd = Callable[..., subprocess.CompletedProcess[str]]
HUB_ID = "tiny-org/tiny-qwen3vl"


def _hub_cache(root: Path, model_dir: Path, repo_id: str) -> Path:
    """A Hugging Face hub cache holding `model_dir` as `repo_id`: offline loads resolve the id there."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return root


def _our_logits(ckpt: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the trained model as the engine computes them (packed bidirectional path)."""
    from trainer.inference.loading import load_trained_model
    from trainer.model.positions import mrope_position_ids

    model, _ = load_trained_model(ckpt)
    cfg = model.config
    position_ids = mrope_position_ids(
        input_ids[0],
        None,
        spatial_merge_size=cfg.vision_config.spatial_merge_size,
        image_token_id=cfg.image_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
    )[:, None, :]
    seq_ids = torch.zeros_like(input_ids)
    with torch.no_grad():
        hidden = model.engine_module(input_ids, position_ids, seq_ids, None)
        return model.engine_module.lm_head(hidden).float()


def _stock_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


@pytest.mark.slow
def test_export_adapter_and_merge_load_in_stock_libraries(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, run_cmd: RunCmd, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    out = tmp_path / "run"
    run_cmd([
        sys.executable, "-m", "trainer", "train", "--model_name_or_path", str(tiny_model_dir),
        "--dataset_args", str(mixed_shards), "--output_dir", str(out), "--lora", "True", "--learning_rate", "5e-2",
        "--max_steps", "2", "--data.num_workers", "0", "--logging.progress", "false", "--eval.at_end", "false",
        "--data.max_tokens", "96", "--per_device_train_batch_size", "2",
    ])  # fmt: skip
    ckpt = checkpoint_root(out) / "step-00000002"
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    run_cmd([sys.executable, "-m", "trainer", "export", "--checkpoint", str(out), "--output", str(adapter)])
    # The merge names its base by hub id (offline, from a local hub cache): the processor files must
    # come through transformers, as no base folder is there to copy them from.
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", tiny_model_dir, HUB_ID)))
    run_cmd([
        sys.executable, "-m", "trainer", "export", "--checkpoint", str(ckpt), "--output", str(merged), "--merge",
        "--base", HUB_ID,
    ])  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    assert mask_id == 151669
    text = "<|im_start|>user\nWhat colour?<|im_end|>\n<|im_start|>assistant\n"
    input_ids = torch.tensor([tokenizer(text)["input_ids"] + [mask_id, mask_id, 151645]])
    ours = _our_logits(ckpt, input_ids)
    keep = torch.ones(ours.shape[-1], dtype=torch.bool)
    keep[mask_id] = False  # the mask logit is never a prediction (-inf in training)

    # Stock transformers + stock peft, bidirectional via the config flag.
    base = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.config.text_config.is_causal = False
    for layer in base.model.language_model.layers:
        layer.self_attn.is_causal = False
    untrained = _stock_logits(base, input_ids)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    stock = _stock_logits(peft_model, input_ids)
    torch.testing.assert_close(stock[..., keep], ours[..., keep], atol=2e-4, rtol=1e-4)
    # The export carries training: without the adapter the logits differ (mask row and LoRA).
    assert (untrained[..., keep] - ours[..., keep]).abs().max() > 1e-2

    merged_model = Qwen3VLForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
    assert merged_model.config.text_config.is_causal is False
    torch.testing.assert_close(
        _stock_logits(merged_model, input_ids)[..., keep], ours[..., keep], atol=2e-4, rtol=1e-4
    )

    # The run's settings travel with the checkpoint and both exports (mixed_shards: 64x64 to 128x128
    # pixels, answers padded to 8 targets, so a one-block canvas).
    settings = read_settings(ckpt)
    assert settings is not None and settings == read_settings(adapter) == read_settings(merged)
    assert settings["shift"] is False and (settings["min_pixels"], settings["max_pixels"]) == (
        64 * 64,
        128 * 128,
    )
    assert settings["answer_padding"]["pad_answer_to"] == 8
    assert (settings["max_new_tokens"], settings["block_size"]) == (32, 32)
    # The merged folder alone gives the processor: image processor and tokenizer with <|mask|>.
    processor = load_processor(merged)
    assert processor.tokenizer.convert_tokens_to_ids("<|mask|>") == mask_id
    assert processor.image_processor.patch_size == 16 and (merged / "preprocessor_config.json").is_file()
