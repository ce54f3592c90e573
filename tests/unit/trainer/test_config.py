"""Config tree: defaults -> YAML -> overrides, aliases, unknown keys, DeepSpeed JSON derivation."""

from __future__ import annotations

import json
import re
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import yaml

from trainer.config import (
    HIDDEN_SIZE_AUTO_KEYS,
    RESUME_DEFINING_KEYS,
    ConfigError,
    TrainConfig,
    _all_keys,
    build_config,
    build_deepspeed_config,
    check_paths,
    choice_fields,
    config_hash,
    load_config,
    other_resume_changes,
    parse_shard_spec,
    parse_shard_specs,
    resume_changes,
    to_dict,
    write_run_files,
)

REPO = Path(__file__).resolve().parents[3]
# One packed row per optimizer step and rank (the defaults are the seed script's 4 x 2).
BASE = {
    "model.name_or_path": "/nonexistent/model",
    "data.train": "/nonexistent/shards",
    "schedule.micro_batch_size": 1,
    "schedule.grad_accum_steps": 1,
}


def _base_args() -> list[str]:
    return ["--model.name_or_path", "/m", "--data.train", "/d"]


def test_every_field_has_a_docstring() -> None:
    source = (REPO / "trainer" / "config" / "schema.py").read_text()
    lines = source.splitlines()
    for key in _all_keys():
        name = key.rsplit(".", 1)[-1]
        idx = [i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:")]
        assert idx, key
        assert any(lines[i + 1].strip().startswith('"""') for i in idx), f"{key} has no docstring"


def test_a_mapping_or_a_config_object_loads_like_the_yaml_file(tmp_path: Path) -> None:
    data = {"schedule": {"micro_batch_size": 3}, "learning_rate": 1e-3, "model": {"name_or_path": "/m"}}
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    overrides = {"data.train": "/d", "gradient_accumulation_steps": 4}
    from_file = load_config(cfg_file, overrides)
    assert from_file.optim.lr == 1e-3 and from_file.schedule.micro_batch_size == 3
    assert load_config(data, overrides) == from_file
    base = build_config(cfg_file)  # not validated: no data yet
    assert load_config(base, overrides) == from_file
    assert base.schedule.grad_accum_steps == 2 and base.data.train == []  # copied, never changed
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' in the config mapping"):
        load_config({"optim": {"lrr": 1}})


def test_defaults_yaml_then_overrides(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "optim": {"lr": 1e-3},
                "schedule": {"micro_batch_size": 3},
                "model": {"name_or_path": "/m"},
                "data": {"train": "/d"},
            }
        )
    )
    cfg = load_config(cfg_file, ["--optim.lr", "5e-5", "--schedule.grad_accum_steps=4"])
    assert cfg.optim.lr == 5e-5  # CLI beats YAML
    assert cfg.schedule.micro_batch_size == 3  # YAML beats default
    assert cfg.schedule.grad_accum_steps == 4
    assert cfg.optim.beta2 == TrainConfig().optim.beta2  # default kept


def test_hf_style_aliases(tmp_path: Path) -> None:
    for split in ("train", "test"):  # a folder of two shard sets
        (tmp_path / "set" / split).mkdir(parents=True)
        (tmp_path / "set" / split / "index.json").write_text("{}")
    argv = [
        "--model_name_or_path", "/m", "--lora", "False", "--r", "8", "--lora_alpha", "16",
        "--lora_dropout", "0.1", "--target_modules", "q_proj,v_proj", "--freeze_vision", "true",
        "--dataset_args", f"{tmp_path / 'set'}[train:100,test:10]", "--max_seq_length", "512",
        "--output_dir", "/tmp/o", "--num_train_epochs", "3", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--learning_rate", "1e-4", "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "linear", "--bf16", "True", "--tf32", "False", "--gradient_checkpointing",
        "--torch_compile", "--dataloader_num_workers", "0", "--max_steps", "7", "--save_steps", "5", "--logging_steps", "2",
        "--eval_steps", "3", "--seed", "1", "--resume_from_checkpoint", "auto", "--deepspeed", "zero3",
    ]  # fmt: skip
    cfg = load_config(None, argv)
    assert cfg.model.name_or_path == "/m" and cfg.lora.enabled is False
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16, 0.1)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.train == [str(tmp_path / "set" / "train")] and cfg.data.test == str(
        tmp_path / "set" / "test"
    )
    assert (cfg.data.limit_train, cfg.data.limit_test, cfg.data.max_tokens) == (100, 10, 512)
    assert cfg.output_dir == "/tmp/o" and cfg.schedule.epochs == 3.0
    assert (cfg.schedule.micro_batch_size, cfg.schedule.grad_accum_steps) == (4, 2)
    assert (
        cfg.optim.lr == 1e-4 and cfg.schedule.warmup_ratio == 0.03 and cfg.schedule.lr_scheduler == "linear"
    )
    assert cfg.deepspeed.precision == "bf16" and cfg.deepspeed.tf32 is False
    assert cfg.model.gradient_checkpointing is True and cfg.data.num_workers == 0
    assert cfg.model.compile is True and TrainConfig().model.compile is False
    assert (cfg.schedule.max_steps, cfg.checkpoint.save_every, cfg.logging.log_every, cfg.eval.every) == (
        7,
        5,
        2,
        3,
    )
    assert cfg.seed == 1 and cfg.checkpoint.resume == "auto" and cfg.deepspeed.config == "zero3"
    assert load_config(None, [*_base_args(), "--bf16", "false"]).deepspeed.precision == "fp32"


def test_aliases_also_work_flat_in_yaml(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model_name_or_path: /m\ndataset_args: org/dataset\nlearning_rate: 3.0e-4\n")
    cfg = load_config(cfg_file)
    assert cfg.model.name_or_path == "/m" and cfg.optim.lr == 3e-4
    assert cfg.data.source == "org/dataset" and cfg.data.train == []  # not shards: a dataset to build from


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--optim.lrr", "1"], "did you mean 'optim.lr'?"),
        (["--learning_rat", "1"], "did you mean '--learning_rate' (optim.lr)?"),
        (["--schedule.micro_batchsize", "1"], "did you mean 'schedule.micro_batch_size'?"),
        # The last component of a key, then the Hugging Face name users mean for it.
        (
            ["--lr", "1e-4"],
            "unknown config key 'lr' in command line; did you mean '--learning_rate' (optim.lr)?",
        ),
        (["--epochs", "2"], "did you mean '--num_train_epochs' (schedule.epochs)?"),
        (["--batch_size", "2"], "did you mean '--per_device_train_batch_size' (schedule.micro_batch_size)?"),
        (["--lora_rank", "8"], "did you mean '--lora_r' (lora.r)?"),
        (["--eval_every", "8"], "did you mean '--eval_steps' (eval.every)?"),
        (["--dataset", "/d"], "did you mean '--dataset_args'?"),
        (["--precision", "bf16"], "did you mean 'deepspeed.precision'?"),
    ],
)
def test_unknown_key_suggests_closest(argv: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        load_config(None, [*_base_args(), *argv])
    assert "\n" not in str(info.value)


def test_short_unknown_keys_never_suggest_one_letter_aliases(tmp_path: Path) -> None:
    for name in ("rr", "lx", "x"):
        with pytest.raises(ConfigError) as info:
            load_config(None, [*_base_args(), f"--{name}", "1"])
        assert str(info.value) == f"unknown config key {name!r} in command line"
    # Outside the command line the suggestion names the YAML key, without "--".
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=re.escape("did you mean 'learning_rate' (optim.lr)?")):
        load_config(cfg_file, _base_args())


def test_unknown_yaml_key_rejected(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate' in .*c.yaml"):
        load_config(cfg_file, _base_args())


def test_type_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"schedule.micro_batch_size .* must be of type int, got 'four'"):
        load_config(None, [*_base_args(), "--schedule.micro_batch_size", "four"])
    with pytest.raises(ConfigError, match=r"lr_scheduler = 'cosin' is not one of"):
        load_config(None, [*_base_args(), "--lr_scheduler_type", "cosin"])
    with pytest.raises(ConfigError, match=r"diffusion.pad_weight must be >= 0 \(0 = no cap\), got -1.0"):
        load_config(None, [*_base_args(), "--diffusion.pad_weight", "-1"])
    assert load_config(None, [*_base_args(), "--diffusion.pad_weight", "2"]).diffusion.pad_weight == 2.0


def test_missing_required_inputs() -> None:
    with pytest.raises(ConfigError, match=r"model.name_or_path is not set"):
        load_config(None, ["--data.train", "/d", "--model_name_or_path", ""])
    with pytest.raises(ConfigError, match=r"data.train is not set"):
        load_config(None, ["--model.name_or_path", "/m"])


def test_without_a_config_file_the_defaults_are_the_seed_scripts() -> None:
    cfg = load_config(None, ["--dataset_args", "jp1924/KoDocumentTableVisualSFT[train:1000,test:100]"])
    assert cfg.data.source == "jp1924/KoDocumentTableVisualSFT" and (
        cfg.data.limit_train,
        cfg.data.limit_test,
    ) == (1000, 100)
    assert cfg.model.name_or_path == "Qwen/Qwen3-VL-2B-Instruct" and cfg.lora.enabled
    s = cfg.schedule
    assert (s.epochs, s.micro_batch_size, s.grad_accum_steps, s.warmup_ratio, s.lr_scheduler) == (
        3.0,
        4,
        2,
        0.03,
        "cosine",
    )
    assert (cfg.optim.lr, cfg.data.max_tokens, cfg.diffusion.mask_prompt_loss) == (2e-4, 2048, True)
    assert cfg.deepspeed.precision == "auto" and cfg.deepspeed.tf32  # bf16 and tf32 where the GPU has them


def test_check_paths(tmp_path: Path) -> None:
    cfg = load_config(None, BASE)
    with pytest.raises(ConfigError, match=r"is not a model folder"):
        check_paths(cfg)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    cfg = load_config(None, {**BASE, "model.name_or_path": str(tmp_path / "model")})
    with pytest.raises(ConfigError, match=r"data.train '/nonexistent/shards' has no index.json"):
        check_paths(cfg)


@pytest.mark.parametrize("weight", ["-1", "inf", "nan"])
def test_a_bad_shard_weight_breaks_one_rule_named_by_where_it_came_from(
    weight: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.cli.plan import shards_main

    spec = f"{tmp_path}:{weight}"
    rule = f"{spec!r}: the weight must be a finite number >= 0"
    with pytest.raises(ConfigError) as config_error:
        load_config(None, {**BASE, "data.train": [spec]})
    assert str(config_error.value) == f"data.train {rule}"
    assert shards_main(["--shards", spec, "--max-tokens", "64"]) == 2
    assert capsys.readouterr().err == f"plan: --shards {rule}\n"
    # A suffix that is not a number is part of the folder name, in both places.
    assert parse_shard_spec(f"{tmp_path}:v2", "data.train") == (f"{tmp_path}:v2", 1.0)
    assert parse_shard_specs([f"{tmp_path}:0.5", str(tmp_path)], "--shards") == (
        [str(tmp_path)] * 2, [0.5, 1.0],
    )  # fmt: skip


def test_deepspeed_json_filled_from_config() -> None:
    cfg = load_config(
        None,
        {**BASE, "schedule.micro_batch_size": 2, "schedule.grad_accum_steps": 3, "optim.max_grad_norm": 0.5},
    )
    ds = build_deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # auto on CPU = fp32
    assert "optimizer" not in ds  # CPU: torch AdamW client optimizer
    gpu = build_deepspeed_config(cfg, world_size=8, cuda=True, bf16_supported=True)
    assert gpu["bf16"]["enabled"] is True and gpu["bf16"]["check_grad_overflow"] is True
    assert gpu["optimizer"]["type"] == "AdamW" and gpu["optimizer"]["params"]["lr"] == cfg.optim.lr
    z3 = build_deepspeed_config(load_config(None, {**BASE, "deepspeed.config": "zero3_offload"}), 1)
    assert (
        z3["zero_optimization"]["stage"] == 3
        and z3["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    )
    compiled = {**BASE, "model.compile": True}
    assert build_deepspeed_config(load_config(None, compiled), 1)["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match=r"model.compile with ZeRO-3 .*use --deepspeed zero2"):
        build_deepspeed_config(load_config(None, {**compiled, "deepspeed.config": "zero3"}), 1)


def test_contradictory_batch_sizes(tmp_path: Path) -> None:
    cfg = load_config(None, {**BASE, "schedule.global_batch_size": 16, "schedule.micro_batch_size": 2})
    with pytest.raises(ConfigError, match=r"global_batch_size 16 != .* world size 2 = 4"):
        build_deepspeed_config(cfg, world_size=2)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    cfg = load_config(None, {**BASE, "deepspeed.config": str(user), "schedule.micro_batch_size": 4})
    with pytest.raises(
        ConfigError, match=r"sets train_micro_batch_size_per_gpu = 8 but the trainer config gives 4"
    ):
        build_deepspeed_config(cfg, world_size=1)
    user.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"bf16.enabled = True but the precision is fp32"):
        build_deepspeed_config(
            load_config(None, {**BASE, "deepspeed.config": str(user), "deepspeed.precision": "fp32"}), 1
        )
    # A user file that agrees is accepted as is.
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}))
    cfg = load_config(None, {**BASE, "deepspeed.config": str(user), "schedule.micro_batch_size": 4})
    assert build_deepspeed_config(cfg, 1)["zero_optimization"]["stage"] == 3


def test_run_files_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(None, {**BASE, "output_dir": str(tmp_path / "run"), "optim.lr": 7e-5})
    out = write_run_files(cfg, build_deepspeed_config(cfg, 1))
    again = load_config(out / "config.yaml")
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert json.loads((out / "ds_config.json").read_text())["train_batch_size"] == 1
    # The hash ignores where a run is written or resumed from, not what it trains.
    assert config_hash(load_config(None, {**BASE, "checkpoint.resume": "auto"})) == config_hash(
        load_config(None, BASE)
    )
    assert config_hash(load_config(None, {**BASE, "optim.lr": 1.0})) != config_hash(load_config(None, BASE))


def test_shipped_recipes_load() -> None:
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.deepspeed.precision in ("fp32", "auto")
    ko = load_config(REPO / "configs" / "qwen3vl-2b-ko-doc.yaml")
    assert ko.model.name_or_path == "Qwen/Qwen3-VL-2B-Instruct"
    assert (ko.lora.r, ko.lora.alpha, ko.lora.dropout) == (16, 32, 0.05)
    assert ko.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (ko.optim.lr, ko.schedule.lr_scheduler, ko.schedule.warmup_ratio, ko.schedule.epochs) == (
        2e-4,
        "cosine",
        0.03,
        3,
    )
    assert (ko.schedule.micro_batch_size, ko.schedule.grad_accum_steps, ko.data.max_tokens) == (4, 2, 2048)
    assert ko.deepspeed.precision == "bf16" and ko.deepspeed.tf32 is True
    for name in ("zero2", "zero3", "zero3_offload"):
        json.loads((REPO / "ds_configs" / f"{name}.json").read_text())


def test_every_choice_is_a_literal_field_checked_in_one_place() -> None:
    from data_tools.sources import INPUT_FORMATS
    from trainer.cli.train_help import train_help
    from trainer.config.attention_names import CONFIG_CHOICES

    choices = choice_fields()
    assert choices["model.attn_implementation"] == CONFIG_CHOICES
    assert choices["data.source_format"] == ("", *INPUT_FORMATS)
    assert choices["schedule.lr_scheduler"] == ("cosine", "linear", "constant")
    text = train_help()
    for key, allowed in choices.items():
        shown = [str(choice) or '""' for choice in allowed]
        with pytest.raises(
            ConfigError, match=rf"^{re.escape(key)} = 'nope' is not one of {', '.join(shown)}$"
        ):
            load_config(None, {**BASE, key: "nope"})
        assert f"  --{key} {{{','.join(shown)}}} (default: " in text
        assert load_config(None, {**BASE, key: allowed[-1]})  # every listed value passes


def test_one_resume_rule_refuses_defining_changes_unless_allowed_and_only_reports_the_rest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from trainer.run.checkpoint import ResumeError
    from trainer.run.preflight import check_resume_config

    saved = to_dict(load_config(None, BASE))
    free = {"logging.log_every": 3, "eval.every": 5, "optim.lr": 1e-4, "checkpoint.resume": "auto"}
    config = load_config(None, {**BASE, **free})
    assert resume_changes(saved, config) == []
    assert other_resume_changes(saved, config) == [
        "optim.lr: 0.0002 -> 0.0001", "logging.log_every: 1 -> 3", "eval.every: 0 -> 5",
    ]  # fmt: skip
    check_resume_config(Path("CKPT"), {"config": saved}, config)  # allowed: one info line, no warning
    err = capsys.readouterr().err
    assert (
        err
        == "train: resuming with changed settings: " + "; ".join(other_resume_changes(saved, config)) + "\n"
    )
    # Every key that decides the data plan is a defining key (the loader's fingerprint is its guard).
    for key, value in {"data.packing": False, "data.drop_remainder": True, "data.limit_train": 9}.items():
        changed = load_config(None, {**BASE, key: value})
        assert key in RESUME_DEFINING_KEYS and resume_changes(saved, changed) == [
            f"{key}: {saved['data'][key[5:]]!r} -> {value!r}"
        ]
        with pytest.raises(ResumeError, match="--allow_config_change"):
            check_resume_config(Path("CKPT"), {"config": saved}, changed)
        allowed = load_config(None, {**BASE, key: value, "checkpoint.allow_config_change": True})
        check_resume_config(Path("CKPT"), {"config": saved}, allowed)
        assert "warning" not in capsys.readouterr().err


def test_only_the_global_answer_token_normaliser_is_accepted() -> None:
    with pytest.raises(
        ConfigError, match=r"diffusion\.normalizer = 'masked_tokens' is not one of answer_tokens"
    ):
        load_config(None, {"diffusion.normalizer": "masked_tokens"})


def test_drop_remainder_reaches_the_plan(tmp_path: Path) -> None:
    from trainer.data.plan import PlanSpec

    overrides = {
        "data.drop_remainder": True,
        "model.name_or_path": str(tmp_path),
        "data.train": [str(tmp_path)],
    }
    config = load_config(None, overrides)
    assert PlanSpec.from_config(config, world_size=2).drop_remainder is True


def _fake_wandb_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("wandb")
    module.__spec__ = ModuleSpec("wandb", loader=None)
    monkeypatch.setitem(sys.modules, "wandb", module)


def test_report_to_as_hugging_face_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TrainConfig().logging.report_to == ["tensorboard"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # wandb not installed
    assert load_config(None, [*_base_args(), "--report_to", "none"]).logging.report_to == []
    assert load_config(None, [*_base_args(), "--report_to", "all"]).logging.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match=re.escape("needs the wandb package: pip install -e '.[wandb]'")):
        load_config(None, [*_base_args(), "--report_to", "tensorboard,wandb"])
    with pytest.raises(ConfigError, match=r"'mlflow' is not one of tensorboard, wandb, all, none"):
        load_config(None, {**BASE, "logging.report_to": "mlflow"})
    with pytest.raises(ConfigError, match=r"'all' and 'none' stand alone"):
        load_config(None, {**BASE, "logging.report_to": ["none", "tensorboard"]})
    _fake_wandb_installed(monkeypatch)
    both = load_config(None, [*_base_args(), "--report_to", "wandb,tensorboard", "--run_name", "r1"])
    assert both.logging.report_to == ["wandb", "tensorboard"] and both.logging.run_name == "r1"
    assert load_config(None, [*_base_args(), "--report_to", "all"]).logging.report_to == [
        "tensorboard",
        "wandb",
    ]


def _llama_factory_ds(zero: dict) -> dict:
    """LLaMA-Factory's examples/deepspeed/ds_z{2,3}_config.json (written for the HF Trainer)."""
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                 "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
    }  # fmt: skip


LLAMA_FACTORY_Z3 = {
    "stage": 3, "overlap_comm": False, "contiguous_gradients": True, "sub_group_size": 1e9,
    "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
}  # fmt: skip
LLAMA_FACTORY_Z2 = {
    "stage": 2, "allgather_partitions": True, "allgather_bucket_size": 5e8, "overlap_comm": False,
    "reduce_scatter": True, "reduce_bucket_size": 5e8, "contiguous_gradients": True,
    "round_robin_gradients": True,
}  # fmt: skip


def test_llama_factory_deepspeed_json_runs_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 7, "text_config": {"hidden_size": 64}}))
    (tmp_path / "z3.json").write_text(json.dumps(_llama_factory_ds(LLAMA_FACTORY_Z3)))
    (tmp_path / "z2.json").write_text(json.dumps(_llama_factory_ds(LLAMA_FACTORY_Z2)))
    overrides = {**BASE, "model.name_or_path": str(model), "schedule.micro_batch_size": 2, "optim.lr": 1e-4}
    z3 = build_deepspeed_config(
        load_config(None, {**overrides, "deepspeed.config": str(tmp_path / "z3.json")}),
        world_size=4, cuda=True, bf16_supported=True,
    )  # fmt: skip
    zero = z3["zero_optimization"]
    # As HF's trainer_config_finalize fills them from the language model's hidden size (64).
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (64 * 64, int(0.9 * 64 * 64))
    assert zero["stage3_param_persistence_threshold"] == 640 and zero["sub_group_size"] == 1e9
    assert (z3["train_micro_batch_size_per_gpu"], z3["gradient_accumulation_steps"], z3["train_batch_size"]) == (
        2, 1, 8,
    )  # fmt: skip
    assert z3["gradient_clipping"] == 1.0 and z3["bf16"]["enabled"] is True and z3["fp16"]["enabled"] is False
    assert z3["optimizer"]["params"] == {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    z2 = build_deepspeed_config(
        load_config(None, {**overrides, "deepspeed.config": str(tmp_path / "z2.json")}), 1
    )
    assert z2["zero_optimization"] == LLAMA_FACTORY_Z2 and z2["train_batch_size"] == 2
    assert capsys.readouterr().err == ""
    # Without a readable hidden size the sizes are left to DeepSpeed's defaults, said in one line.
    hub = load_config(None, {**overrides, "model.name_or_path": "Qwen/Qwen3-VL-2B-Instruct",
                             "deepspeed.config": str(tmp_path / "z3.json")})  # fmt: skip
    zero = build_deepspeed_config(hub, 1)["zero_optimization"]
    assert not set(HIDDEN_SIZE_AUTO_KEYS) & set(zero)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "left to DeepSpeed's defaults" in err and "Qwen3-VL-2B-Instruct" in err


def test_deepspeed_json_values_must_agree_with_the_config(tmp_path: Path) -> None:
    user = tmp_path / "ds.json"
    cfg = load_config(None, {**BASE, "deepspeed.config": str(user), "schedule.lr_scheduler": "constant"})

    def build(ds: dict) -> dict:
        user.write_text(json.dumps({"zero_optimization": {"stage": 2}, **ds}))
        return build_deepspeed_config(cfg, 1, cuda=True)

    with pytest.raises(
        ConfigError, match=r"sets optimizer.params.lr = 0.1 but the trainer config gives 0.0002"
    ):
        build({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}})
    with pytest.raises(
        ConfigError, match=r'zero_optimization.allgather_bucket_size = "auto", which the trainer'
    ):
        build({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}})
    # HF's scheduler section: the trainer runs the same schedule itself, so the section goes.
    hf_scheduler = {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                   "warmup_num_steps": "auto"}}  # fmt: skip
    assert "scheduler" not in build({"scheduler": hf_scheduler})
    with pytest.raises(ConfigError, match=r"scheduler.params.warmup_num_steps = 100; .* set it to \"auto\""):
        build({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}}})
    with pytest.raises(ConfigError, match=r"scheduler 'WarmupDecayLR' .* pass --lr_scheduler_type linear"):
        build({"scheduler": {"type": "WarmupDecayLR", "params": {}}})
