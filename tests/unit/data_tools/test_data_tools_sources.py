"""Hostile inputs to `data_tools.sources` / `json_rows`: streamed JSON/JSONL row indexes, image paths
kept inside their root, image files read without blocking or overreading, and a specific reject
reason for every bad record (never an exception other than `SampleError`)."""

from __future__ import annotations

import io
import json
import os
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from data_tools import json_rows, sources
from data_tools.errors import BuildError
from data_tools.samples import SampleError


def _reason(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(SampleError) as info:
        fn(*args, **kwargs)
    return info.value.reason


def _row_reason(row: Any) -> str | None:
    """The reason a parsed row is an error row, or None for a good one."""
    return row["__error__"][0] if isinstance(row, dict) and "__error__" in row else None


def _chat(images: list[Any] | None = None, user: Any = "<image>q") -> dict[str, Any]:
    row: dict[str, Any] = {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "a"}]
    }
    if images is not None:
        row["images"] = images
    return row


# ------------------------------------------------------------------------------- JSONL


def test_jsonl_index_blank_lines_crlf_and_bad_lines(tmp_path: Path) -> None:
    long_text = "x" * (json_rows.CHUNK_BYTES + 1000)  # this line crosses the first chunk boundary
    data = b"".join(
        [
            b'{"a": 1}\r\n',
            b"\r\n   \n",
            json.dumps({"long": long_text}).encode() + b"\n",
            b"\n",
            b'{"a": tru}\n',
            b'{"a": "\xff\xfe"}\n',
            b"[" * 100_000 + b"\n",
            b'{"a": 2}',  # no final newline
        ]
    )
    (tmp_path / "d.jsonl").write_bytes(data)
    rows = json_rows.index_jsonl(tmp_path / "d.jsonl")
    assert len(rows) == 6
    assert rows[0] == {"a": 1} and rows[-1] == {"a": 2}
    assert rows[1] == {"long": long_text}
    assert [_row_reason(rows[i]) for i in range(6)] == [
        None,
        None,
        "invalid_json",
        "non_utf8",
        "too_deeply_nested",
        None,
    ]
    assert [rows.where(i) for i in range(6)] == [f"d.jsonl line {n}" for n in (1, 4, 6, 7, 8, 9)]
    assert "d.jsonl line 6" in rows[2]["__error__"][1]
    with pytest.raises(IndexError):
        rows[6]


def test_rows_nested_deeper_than_the_limit_are_rejected() -> None:
    deep = b'{"a": ' + b"[" * json_rows.MAX_DEPTH + b"]" * json_rows.MAX_DEPTH + b"}"
    assert _row_reason(json_rows.parse_row(deep, "x line 1")) == "too_deeply_nested"
    ok = b"[" * json_rows.MAX_DEPTH + b"]" * json_rows.MAX_DEPTH
    assert json_rows.parse_row(ok, "x line 1") is not None
    assert _row_reason(json_rows.parse_row(b"1" * 5000, "x line 1")) == "invalid_json"  # digit limit


def test_empty_files_have_no_rows(tmp_path: Path) -> None:
    for name, text in [("a.jsonl", ""), ("b.jsonl", "\n \n"), ("c.json", ""), ("d.json", " [ \n ] ")]:
        (tmp_path / name).write_text(text)
        reader = json_rows.index_jsonl if name.endswith("l") else json_rows.index_json
        assert len(reader(tmp_path / name)) == 0, name


def _write_rows(tmp_path: Path, text_len: int, count: int) -> bytes:
    """`rows.jsonl` and `rows.json` with `count` copies of one row; returns its JSONL line."""
    line = json.dumps(_chat(["img/a.png"], user="<image>" + "w" * text_len)).encode() + b"\n"
    (tmp_path / "rows.jsonl").write_bytes(line * count)
    (tmp_path / "rows.json").write_bytes(b"[" + b",".join([line] * count) + b"]")
    return line


def test_indexing_scales_linearly_to_100k_rows(tmp_path: Path) -> None:
    """Ten times the rows costs about ten times the time (a per-row rescan would cost a hundred): a
    ratio measured side by side, not a wall-clock limit that a busy machine breaks."""
    seconds = {}
    for count in (10_000, 100_000):
        line = _write_rows(tmp_path, 20, count)
        start = time.perf_counter()
        for rows in (
            json_rows.index_jsonl(tmp_path / "rows.jsonl"),
            json_rows.index_json(tmp_path / "rows.json"),
        ):
            assert len(rows) == count and rows[-1] == json.loads(line)
            assert rows.where(count - 1).endswith(f" line {count}")
        seconds[count] = time.perf_counter() - start
    assert seconds[100_000] < 30 * seconds[10_000] + 0.05, seconds


def test_indexing_memory_is_bounded(tmp_path: Path) -> None:
    _write_rows(tmp_path, 10_000, 2_000)  # 20 MB
    for name, reader in (("rows.jsonl", json_rows.index_jsonl), ("rows.json", json_rows.index_json)):
        tracemalloc.start()
        try:
            assert len(reader(tmp_path / name)) == 2_000
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 5 * json_rows.CHUNK_BYTES, name  # a few chunks, not the 20 MB file


def test_reading_rows_holds_one_row_at_a_time(tmp_path: Path) -> None:
    line = _write_rows(tmp_path, 10_000, 2_000)  # 20 MB of 10 kB rows
    expected = json.loads(line)
    for name in ("rows.jsonl", "rows.json"):
        tracemalloc.start()
        try:
            rows = sources.open_source(str(tmp_path / name)).splits["train"]  # what the build reads
            held = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            assert sum(1 for row in rows if row == expected) == 2_000
            peak = tracemalloc.get_traced_memory()[1] - held
        finally:
            tracemalloc.stop()
        assert held < 64 * 2_000, (name, held)  # the offset index (24 bytes a row), no rows
        assert peak < 8 * len(line), (name, peak)  # one row's bytes, text and value: not the file


# ------------------------------------------------------------------------------- JSON


_TRICKY = [
    {"s": 'a\\"]', "t": "x,y}{"},
    {"nested": [[1, {"k": "]]"}], {"q": '"'}], "u": "é 한"},
    3,
    "plain, string",
    [],
    {},
    None,
    {"esc": "\\", "b": '\\\\"[', "long": "z" * 50},
]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_json_list_splits_like_json_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(json_rows, "CHUNK_BYTES", chunk)  # elements and strings cross chunk boundaries
    (tmp_path / "compact.json").write_text(json.dumps(_TRICKY, ensure_ascii=False))
    (tmp_path / "pretty.json").write_text("\ufeff\n" + json.dumps(_TRICKY, indent=2), encoding="utf-8")
    for name in ("compact.json", "pretty.json"):
        rows = json_rows.index_json(tmp_path / name)
        assert list(rows) == _TRICKY, name
    rows = json_rows.index_json(tmp_path / "pretty.json")
    text_lines = (tmp_path / "pretty.json").read_text(encoding="utf-8").splitlines()
    for i in range(len(rows)):
        line = int(rows.where(i).rsplit(" ", 1)[1])
        assert text_lines[line - 1].strip().startswith(json.dumps(_TRICKY[i])[:1])


def test_json_object_layouts_and_bad_elements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_rows, "CHUNK_BYTES", 5)
    cases = {
        '{"meta": {"data": 1}, "data": [{"a": 1}, {"a": tru}, {"a": 3}]}': [
            {"a": 1},
            "invalid_json",
            {"a": 3},
        ],
        '{"rows": "no", "records": [1, 2]}': [1, 2],
        '{"data": [1], "data": "last wins"}': [{"data": "last wins"}],
        '{"messages": []}': [{"messages": []}],
        "[1, 2,]": [1, 2, "invalid_json"],
        '[{"a": "\xff"}, [1}]': ["non_utf8", "invalid_json"],
        "[" + "[" * 100_000 + "]" * 100_000 + ", 1]": ["too_deeply_nested", 1],
    }
    for i, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"{i}.json"
        path.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
        rows = json_rows.index_json(path)
        assert [_row_reason(r) or r for r in rows] == expected, text


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[{"a": 1},\n {"a": 2}', "byte 20, line 2: a list or object is not closed"),
        ('[{"a": 1}]\n]', "byte 11, line 2: text after the top-level value"),
        ('[{"a": "x}]', "byte 7, line 1: unterminated string"),
        ('{"a": [1, 2]]', "byte 12, line 1: ] closes a {"),
        ("[1}", "byte 2, line 1: } closes a ["),
        ("\n\n42", "byte 2, line 3: expected a list of records or an object"),
    ],
)
def test_unsplittable_json_is_a_build_error(tmp_path: Path, text: str, where: str) -> None:
    (tmp_path / "x.json").write_text(text)
    with pytest.raises(BuildError, match="JSONL") as info:
        json_rows.index_json(tmp_path / "x.json")
    assert str(tmp_path / "x.json") in str(info.value) and where in str(info.value)


def test_open_source_json_rows_and_image_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    lines = ["not json", json.dumps(_chat([], user="q"))]  # a bad first row does not stop detection
    (tmp_path / "real" / "d.jsonl").write_text("\n".join(lines) + "\n")
    source = sources.open_source(str(tmp_path / "link" / "d.jsonl"))
    assert source.row_format == "messages" and source.base_dir == str((tmp_path / "real").resolve())
    assert source.splits["train"].where(1) == "d.jsonl line 2"  # type: ignore[attr-defined]
    assert "train: 2 rows" in source.describe()
    monkeypatch.chdir(tmp_path)
    source = sources.open_source(str(tmp_path / "real" / "d.jsonl"), image_root="link/../real")
    assert source.base_dir == str((tmp_path / "real").resolve())


# ------------------------------------------------------------------------------- image paths


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "img").mkdir(parents=True)
    (tmp_path / "root" / "img" / "a.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (tmp_path / "root" / "out").symlink_to(tmp_path / "secret.png")
    (tmp_path / "root" / "in").symlink_to(tmp_path / "root" / "img" / "a.png")
    return tmp_path / "root"


@pytest.mark.parametrize(
    "value",
    [
        "../secret.png",
        "img/../../secret.png",
        "../does-not-exist.png",
        "out",
        "/etc/passwd",
        "file:///etc/passwd",
        {"path": "../secret.png"},
    ],
)
def test_paths_outside_the_root_are_rejected(root: Path, value: Any) -> None:
    assert _reason(sources._image_ref, value, str(root)) == "outside_image_root"


def test_paths_inside_the_root_and_allowed_outside(root: Path) -> None:
    real_a = str((root / "img" / "a.png").resolve())
    assert sources._image_ref("img/a.png", str(root)) == real_a
    assert sources._image_ref("in", str(root)) == real_a  # a symlink that stays inside
    assert sources._image_ref(f"file://{root}/img/./a.png", str(root)) == real_a
    assert sources._image_ref({"bytes": None, "path": "img/a.png"}, str(root)) == real_a
    secret = str((root.parent / "secret.png").resolve())
    assert sources._image_ref("out", str(root), allow_outside_root=True) == secret
    assert sources._image_ref("img/a.png", None, allow_outside_root=True) == os.path.realpath("img/a.png")
    with pytest.raises(SampleError, match="--image-root") as info:
        sources._image_ref("img/a.png", None)
    assert info.value.reason == "outside_image_root"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("http://example.com/a.png", "remote_image"),
        ("HTTPS://example.com/a.png", "remote_image"),
        ("s3://bucket/a.png", "remote_image"),
        ("data:image/png;base64,AAAA", "remote_image"),
        ({"url": "gs://bucket/a.png"}, "remote_image"),
        ({"bytes": "not bytes"}, "bad_image_value"),
        ({"bytes": [1, 2]}, "bad_image_value"),
        (5, "bad_image_value"),
        ([["a.png"]], "bad_image_value"),
        ({"path": 3.5}, "bad_image_value"),
        ("img/a\x00.png", "bad_image_value"),
        (" ", "missing_image"),
    ],
)
def test_bad_image_values(root: Path, value: Any, reason: str) -> None:
    assert _reason(sources._image_ref, value, str(root)) == reason


@pytest.mark.parametrize("mode", ["RGB", "F", "CMYK", "I;16", "I;16B", "1", "P"])
def test_decoded_pil_images_become_bytes(mode: str) -> None:
    data = sources._image_ref(Image.new(mode, (4, 3)), None)
    assert isinstance(data, bytes)
    assert Image.open(io.BytesIO(data)).size == (4, 3)


# ------------------------------------------------------------------------------- image files


def test_load_image_bytes(root: Path, tmp_path: Path) -> None:
    path = str(root / "img" / "a.png")
    assert sources.load_image_bytes(path, max_bytes=3) == b"png"
    assert _reason(sources.load_image_bytes, path, max_bytes=2) == "image_file_too_large"
    assert sources.load_image_bytes(b"abc", 3) == b"abc"
    assert _reason(sources.load_image_bytes, b"abcd", 3) == "image_file_too_large"
    assert _reason(sources.load_image_bytes, b"", 3) == "missing_image"
    assert _reason(sources.load_image_bytes, None, 3) == "missing_image"
    assert _reason(sources.load_image_bytes, str(root / "nope.png"), 3) == "missing_image"
    assert _reason(sources.load_image_bytes, path + "/x.png", 3) == "missing_image"
    (tmp_path / "empty.png").write_bytes(b"")
    assert _reason(sources.load_image_bytes, str(tmp_path / "empty.png"), 3) == "missing_image"
    assert _reason(sources.load_image_bytes, str(root / "img"), 3) == "not_a_file"
    assert _reason(sources.load_image_bytes, "/dev/zero", 3) == "not_a_file"
    (tmp_path / "locked.png").write_bytes(b"x")
    (tmp_path / "locked.png").chmod(0)
    if not os.access(tmp_path / "locked.png", os.R_OK):  # root reads anything
        assert _reason(sources.load_image_bytes, str(tmp_path / "locked.png"), 3) == "unreadable_image"


def test_a_fifo_is_rejected_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.png")
    result: list[str] = []
    reader = threading.Thread(
        target=lambda: result.append(_reason(sources.load_image_bytes, str(tmp_path / "fifo.png"), 10)),
        daemon=True,
    )
    reader.start()
    reader.join(timeout=2)
    assert result == ["not_a_file"]


# ------------------------------------------------------------------------------- record reasons


@pytest.mark.parametrize(
    ("row", "row_format", "reason"),
    [
        ([1, 2], "messages", "row_not_object"),
        ("text", "messages", "row_not_object"),
        ({"__error__": ("invalid_json", "d.jsonl line 3 ...")}, "messages", "invalid_json"),
        ({}, "messages", "empty_conversation"),
        ({"messages": {"role": "user"}}, "messages", "bad_messages"),
        ({"messages": ["hi"]}, "messages", "bad_messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages", "bad_content"),
        ({"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages", "bad_content"),
        ({"messages": [{"role": "user", "content": [7]}]}, "messages", "bad_content_part"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages", "bad_content_part"),
        ({"messages": [{"role": "user", "content": [{"type": {"a": 1}}]}]}, "messages", "bad_content_part"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            "messages",
            "bad_content",
        ),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "unknown_role"),
        ({"messages": [{"role": ["user"], "content": "x"}]}, "messages", "unknown_role"),
        ({"messages": [{"content": "x"}]}, "messages", "unknown_role"),
        (_chat([b"png"], user="q"), "messages", "image_count_mismatch"),
        (_chat(["http://x/a.png"]), "messages", "remote_image"),
        (_chat([{"bytes": "abc"}]), "records", "bad_image_value"),
        ({"conversations": "x"}, "llava", "bad_messages"),
        ({"conversations": [{"from": 1, "value": "x"}]}, "llava", "unknown_role"),
        ({"conversations": [None]}, "kodoc", "bad_messages"),
        ({"conversations": [{"role": "user", "content": "[{"}]}, "kodoc", "bad_content"),
        ({"conversations": [{"role": "user", "content": "[" * 100_000}]}, "kodoc", "too_deeply_nested"),
        ({"conversations": [{"role": "user", "content": 3}]}, "kodoc", "bad_content"),
    ],
)
def test_bad_records_have_specific_reasons(row: Any, row_format: str, reason: str) -> None:
    assert _reason(sources.normalise_row, row, row_format, None, "k-1") == reason


def test_odd_ids_and_the_happy_path(root: Path) -> None:
    row = _chat(["img/a.png"]) | {"id": {"nested": "x" * 500}}
    conv = sources.normalise_row(row, "messages", str(root), fallback_id="k-1")
    assert conv.source_id.startswith("{'nested'") and len(conv.source_id) == sources.MAX_ID_CHARS
    assert conv.images == [str((root / "img" / "a.png").resolve())]
    assert (
        sources.normalise_row(_chat([], user="q") | {"id": None}, "messages", None, "k-2").source_id == "k-2"
    )
    # A JSON row cannot forge an error row: "__error__" only counts as a tuple.
    conv = sources.normalise_row(_chat([b"x"]) | {"__error__": ["a", "b"]}, "messages", None, "k-3")
    assert conv.images == [b"x"]
    outside = _chat(["../../secret.png"])
    assert _reason(sources.normalise_row, outside, "messages", str(root), "k") == "outside_image_root"
    conv = sources.normalise_row(outside, "messages", str(root / "img"), "k", allow_outside_root=True)
    assert conv.images == [str((root.parent / "secret.png").resolve())]
