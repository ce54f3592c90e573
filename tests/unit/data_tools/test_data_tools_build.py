"""Every source format through `build`, every rejection reason, user errors, settings, CLI defaults
and the resume check of finished shards.

Resume after a kill and reproducibility across worker counts: tests/integration/data_tools/."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from data_tools import shards, sources
from data_tools.__main__ import main as cli
from data_tools.build import run_build
from data_tools.errors import BuildError
from data_tools.index import read_index, read_table, shard_samples
from data_tools.output_dir import load_finished
from data_tools.settings import BuildSettings, with_model_pixels


def _png(colour: str = "red", size: tuple[int, int] = (80, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _build(source: str, out: Path, model: Path, *extra: str) -> int:
    argv = ["build", "--source", source, "--output", str(out), "--model", str(model), "--no-progress"]
    # No answer padding: these tests read the answers back (padding: test_data_tools_samples.py).
    return cli([*argv, "--min-pixels", "4096", "--max-pixels", "16384", "--pad-answer-to", "0", *extra])


def _samples(directory: Path) -> list[dict[str, Any]]:
    out = []
    for shard, samples in shard_samples(directory):
        for e in samples:
            out.append(shards.read_sample(directory / shard["name"], e["offset"], e["num_bytes"]))
    return out


def _rejects(directory: Path) -> list[str]:
    lines = (directory / shards.REJECTS_NAME).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["reason"] for line in lines]


def _answers(sample: dict[str, Any], tokenizer: Any) -> str:
    j = sample["json"]
    return tokenizer.decode([t for t, m in zip(j["input_ids"], j["answer_mask"], strict=True) if m])


def test_messages_jsonl_and_json(tmp_path: Path, tiny_model_dir: Path, data_tools_tokenizer: Any) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png("red"))
    (tmp_path / "img" / "b.png").write_bytes(_png("blue", (64, 64)))
    rows = [
        {  # OpenAI parts with the image path inline
            "id": "r0",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "img/a.png"}},
                        {"type": "text", "text": "colour?"},
                    ],
                },
                {"role": "assistant", "content": "red"},
            ],
        },
        {  # string content with an <image> marker and an images list
            "id": "r1",
            "messages": [
                {"role": "user", "content": "<image>\nwhat?"},
                {"role": "assistant", "content": "blue"},
            ],
            "images": ["img/b.png"],
        },
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ["d.jsonl", "d.json"]:
        out = tmp_path / f"out-{name}"
        assert _build(str(tmp_path / name), out, tiny_model_dir) == 0
        assert shards.verify(out) == []
        got = _samples(out)
        assert [s["json"]["source_id"] for s in got] == ["r0", "r1"]
        assert [_answers(s, data_tools_tokenizer) for s in got] == ["red<|im_end|>", "blue<|im_end|>"]
        assert got[1]["json"]["messages"][0]["content"] == [
            {"type": "image"},
            {"type": "text", "text": "what?"},
        ]
        assert got[0]["images"][0].size == (64, 64)  # 80x60: round(2.5) = 2 patches each way, as in HF
    assert sources.open_source(str(tmp_path / "d.jsonl")).row_format == "messages"


def test_llava_json_with_image_folder(
    tmp_path: Path, tiny_model_dir: Path, data_tools_tokenizer: Any
) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(_png("green"))
    rows = [
        {
            "id": "l0",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "green"},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "yes"},
            ],
        },
    ]
    (tmp_path / "llava.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    src = str(tmp_path / "llava.json")
    assert (
        _build(src, out, tiny_model_dir, "--image-root", str(tmp_path / "images"), "--train-on", "all") == 0
    )
    assert sources.open_source(src).row_format == "llava"
    (sample,) = _samples(out)
    assert _answers(sample, data_tools_tokenizer) == "green<|im_end|>yes<|im_end|>"
    assert [m["role"] for m in sample["json"]["messages"]] == ["user", "assistant", "user", "assistant"]


def _kodoc_dataset(images: list[bytes]) -> Any:
    import datasets

    def msg(role: str, parts: list[dict[str, Any]]) -> dict[str, str]:
        return {"role": role, "content": json.dumps(parts, ensure_ascii=False)}

    rows = []
    for i, image in enumerate(images):
        rows.append(
            {
                "id": f"doc-{i}",
                "image": {"bytes": image, "path": None},
                "conversations": [
                    msg("user", [{"type": "image"}, {"type": "text", "text": "이 표의 제목은 무엇입니까?"}]),
                    msg("assistant", [{"type": "text", "text": f"분기별 매출 {i}"}]),
                    msg("user", [{"type": "text", "text": "합계는 얼마입니까?"}]),
                    msg("assistant", [{"type": "text", "text": f"{i + 1},000원"}]),
                ],
                "metadata": json.dumps({"category": "table", "page": i}),
            }
        )
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "conversations": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "metadata": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def test_kodoc_save_to_disk_and_parquet(
    tmp_path: Path, tiny_model_dir: Path, data_tools_tokenizer: Any
) -> None:
    import datasets

    corrupt = _png("white")[:60]
    ds = _kodoc_dataset([_png("red"), corrupt, _png("blue", (100, 50)), _png("green")])
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "disk"))
    ds.to_parquet(str(tmp_path / "ko.parquet"))
    for name, extra in [("disk", ["--split", "train"]), ("ko.parquet", ["--format", "kodoc"])]:
        out = tmp_path / f"out-{name}"
        assert _build(str(tmp_path / name), out, tiny_model_dir, "--train-on", "all", *extra) == 0
        assert shards.verify(out) == []
        got = _samples(out)
        assert [s["json"]["source_id"] for s in got] == ["doc-0", "doc-2", "doc-3"]
        assert _rejects(out) == ["corrupt_image"]
        assert _answers(got[1], data_tools_tokenizer) == "분기별 매출 2<|im_end|>3,000원<|im_end|>"
        assert got[1]["json"]["messages"][2]["content"][0]["text"] == "합계는 얼마입니까?"
    assert sources.open_source(str(tmp_path / "disk"), splits=["train"]).row_format == "kodoc"
    # Two splits -> DIR/<split>/, each a complete shard set.
    out = tmp_path / "both"
    assert _build(str(tmp_path / "disk"), out, tiny_model_dir, "--split", "train,validation") == 0
    assert read_index(out / "validation")["num_samples"] == 1
    assert cli(["verify", str(out)]) == 0


def test_hf_messages_with_image_column(tmp_path: Path, tiny_model_dir: Path) -> None:
    import datasets

    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q{i}"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"a{i}"}]},
            ],
            "images": [{"bytes": _png(), "path": None}],
        }
        for i in range(20)
    ]
    features = datasets.Features(
        {
            "messages": [
                {
                    "role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
                }
            ],
            "images": datasets.Sequence(datasets.Image()),
        }
    )
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    assert _build(str(tmp_path / "ds"), out, tiny_model_dir, "--test-fraction", "0.3", "--seed", "1") == 0
    train, test = read_index(out / "train"), read_index(out / "test")
    assert train["num_samples"] + test["num_samples"] == 20 and test["num_samples"] > 0
    keys = {s["key"] for split in ("train", "test") for s in read_table(out / split).entries()}
    assert len(keys) == 20
    assert _build(str(tmp_path / "ds"), tmp_path / "five", tiny_model_dir, "--limit", "5") == 0
    assert read_index(tmp_path / "five")["num_samples"] == 5


def test_every_rejection_reason(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "bad.png").write_bytes(_png()[:70])
    (tmp_path / "big.png").write_bytes(_png(size=(400, 300)))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PPM")
    (tmp_path / "x.ppm").write_bytes(buf.getvalue())

    def row(images: list[str], user: str = "<image>q", answer: str | None = "a") -> dict[str, Any]:
        msgs = [{"role": "user", "content": user}]
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return {"messages": msgs, "images": images}

    lines = [
        json.dumps(row(["ok.png"])),
        json.dumps(row(["missing.png"])),  # missing_image
        json.dumps(row(["bad.png"])),  # corrupt_image
        json.dumps(row(["big.png"])),  # image_too_large (--max-image-pixels 100000)
        json.dumps(row(["x.ppm"])),  # image_format
        json.dumps({"messages": []}),  # empty_conversation
        json.dumps(row(["ok.png"], answer=None)),  # no_assistant_turn
        json.dumps(row(["ok.png"], user="<image><image>q")),  # image_count_mismatch (more markers)
        json.dumps(row(["ok.png", "ok.png"])),  # image_count_mismatch (more images)
        json.dumps(row(["ok.png"], answer="word " * 300)),  # too_many_tokens (--max-tokens 200)
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),  # unknown_role
        json.dumps(row(["ok.png"], answer="   ")),  # empty_answer
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n'
    (tmp_path / "d.jsonl").write_bytes(data)  # the last line is not UTF-8: non_utf8
    out = tmp_path / "out"
    common = ["--max-image-pixels", "100000", "--max-tokens", "200"]
    # Too many rejects: the build fails and says why.
    assert _build(str(tmp_path / "d.jsonl"), out, tiny_model_dir, *common) == 1
    assert "max-reject-fraction" in capsys.readouterr().err
    assert not (out / "index.json").exists() and shards.verify(out) != []
    assert _build(str(tmp_path / "d.jsonl"), out, tiny_model_dir, *common, "--max-reject-fraction", "1") == 0
    assert _rejects(out) == [
        "missing_image",
        "corrupt_image",
        "image_too_large",
        "image_format",
        "empty_conversation",
        "no_assistant_turn",
        "image_count_mismatch",
        "image_count_mismatch",
        "too_many_tokens",
        "unknown_role",
        "empty_answer",
        "non_utf8",
    ]
    index = read_index(out)
    assert (
        index["num_samples"] == 1
        and index["num_rejected"] == 12
        and index["rejects"]["image_count_mismatch"] == 2
    )


def test_unreadable_input_is_a_clear_error(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x.json").write_bytes(b"\xff not json")
    # The library raises BuildError; only the CLI turns it into one line on stderr and status 1.
    with pytest.raises(BuildError, match="cannot read it as UTF-8 JSON"):
        sources.open_source(str(tmp_path / "x.json"))
    assert _build(str(tmp_path / "x.json"), tmp_path / "o", tiny_model_dir) == 1
    err = capsys.readouterr().err
    assert err.startswith("data_tools: error: --source ") and "cannot read it as UTF-8 JSON" in err
    assert err.count("\n") == 1
    (tmp_path / "y.json").write_text(json.dumps([{"foo": 1}]))
    assert _build(str(tmp_path / "y.json"), tmp_path / "o", tiny_model_dir) == 1
    assert "pass --format" in capsys.readouterr().err


def test_build_settings_validate_and_cli_defaults(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        + "\n"
    )
    source = sources.open_source(str(tmp_path / "d.jsonl"))
    with pytest.raises(BuildError, match="--image-format gif: use one of jpeg, png, webp"):
        BuildSettings(image_format="gif").validate()
    with pytest.raises(BuildError, match="--workers 0: must be >= 1"):
        run_build(source, tmp_path / "o", str(tiny_model_dir), BuildSettings(), workers=0)
    # Without options, the CLI builds what BuildSettings() describes (pixels from the model folder).
    argv = ["build", "--source", str(tmp_path / "d.jsonl"), "--model", str(tiny_model_dir), "--no-progress"]
    assert cli([*argv, "--output", str(tmp_path / "cli")]) == 0
    settings = with_model_pixels(BuildSettings(), str(tiny_model_dir))
    run_build(source, tmp_path / "api", str(tiny_model_dir), settings, progress=False)
    for name in ("index.json", "shard-000000.tar"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes(), name


def _interrupted_build(monkeypatch: pytest.MonkeyPatch, num_shards: int, *args: Any) -> None:
    """`_build(*args)` stopped by a KeyboardInterrupt as it starts shard `num_shards`."""
    real_write_shard = shards.write_shard
    written: list[Path] = []

    def write_shard(path: Path, samples: Any) -> Any:
        if len(written) == num_shards:
            raise KeyboardInterrupt
        written.append(path)
        return real_write_shard(path, samples)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(shards, "write_shard", write_shard)
        _build(*args)


def test_changed_source_is_refused_and_force_rebuilds(
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    write_text_rows: Callable[..., None],
) -> None:
    src, out = tmp_path / "d.jsonl", tmp_path / "o"
    write_text_rows(src, 6)
    # Interrupt a build after its first shard, then change the source (one row more): no resume.
    _interrupted_build(monkeypatch, 1, str(src), out, tiny_model_dir, "--samples-per-shard", "2")
    write_text_rows(src, 7)
    assert _build(str(src), out, tiny_model_dir, "--samples-per-shard", "2") == 1
    err = capsys.readouterr().err
    assert "holds an interrupted build, and its source changed since" in err and "--force" in err
    assert _build(str(src), out, tiny_model_dir, "--samples-per-shard", "2", "--force") == 0
    assert read_index(out)["num_samples"] == 7
    # A complete set whose source changed is not taken as done either.
    write_text_rows(src, 5)
    assert _build(str(src), out, tiny_model_dir, "--samples-per-shard", "2") == 1
    assert "holds a complete shard set, and its source changed since" in capsys.readouterr().err
    assert _build(str(src), out, tiny_model_dir, "--samples-per-shard", "2", "--force") == 0
    assert read_index(out)["num_samples"] == 5 and not (out / "shard-000003.tar").exists()


def test_other_layout_in_output_is_refused_or_replaced(
    tmp_path: Path,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    write_text_rows: Callable[..., None],
) -> None:
    src, out = tmp_path / "d.jsonl", tmp_path / "o"
    write_text_rows(src, 8)
    split = ["--test-fraction", "0.5", "--seed", "1"]
    assert _build(str(src), out, tiny_model_dir) == 0  # flat: o/index.json
    assert _build(str(src), out, tiny_model_dir, *split) == 1  # now o/train/ and o/test/
    assert "holds another shard set" in capsys.readouterr().err and not (out / "train").exists()
    assert _build(str(src), out, tiny_model_dir, *split, "--force") == 0
    assert not (out / "index.json").exists() and not (out / "shard-000000.tar").exists()
    assert read_index(out / "train")["num_samples"] + read_index(out / "test")["num_samples"] == 8
    (out / "notes.txt").write_text("mine")  # --force removes only what builds write
    assert _build(str(src), out, tiny_model_dir) == 1  # and back to flat
    assert "holds another shard set" in capsys.readouterr().err
    assert _build(str(src), out, tiny_model_dir, "--force") == 0
    assert not (out / "train" / "index.json").exists() and not (out / "test" / "shard-000000.tar").exists()
    assert read_index(out)["num_samples"] == 8 and (out / "notes.txt").read_text() == "mine"


def test_resume_checks_finished_shards_without_hashing(
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    write_text_rows: Callable[..., None],
) -> None:
    src, out, clean = tmp_path / "d.jsonl", tmp_path / "o", tmp_path / "clean"
    write_text_rows(src, 30)
    per_shard = ("--samples-per-shard", "6")
    assert _build(str(src), clean, tiny_model_dir, *per_shard) == 0
    _interrupted_build(monkeypatch, 4, str(src), out, tiny_model_dir, *per_shard)
    names = [shards.SHARD_PATTERN.format(i) for i in range(5)]
    hashed: list[str] = []
    real_sha256 = shards.file_sha256

    def counted_sha256(path: Path) -> str:
        hashed.append(Path(path).name)
        return real_sha256(path)

    monkeypatch.setattr(shards, "file_sha256", counted_sha256)
    assert [r["entry"]["name"] for r in load_finished(out)] == names[:4] and hashed == []
    # Shard 3 truncated, then the JSON of shard 2's last sample (always among those read back) broken.
    os.truncate(out / names[3], (out / names[3]).stat().st_size - shards.TAR_BLOCK)
    assert len(load_finished(out)) == 3
    last = read_table(clean).shard_entries(2)[-1]
    with open(out / names[2], "r+b") as f:
        f.seek(last["offset"] + shards.TAR_BLOCK)  # the member's data, after its header
        f.write(b"x")
    assert len(load_finished(out)) == 2
    kept = {name: (out / name).stat().st_mtime_ns for name in names[:2]}
    assert _build(str(src), out, tiny_model_dir, *per_shard) == 0
    assert {name: (out / name).stat().st_mtime_ns for name in names[:2]} == kept
    assert hashed == names[2:]  # only the shards this run wrote
    files = {str(p.relative_to(clean)): p.read_bytes() for p in clean.rglob("*") if p.is_file()}
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
