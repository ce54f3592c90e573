"""Input formats -> normalised conversations.

Containers (detected from `--source`):
- a Hugging Face dataset folder written by `save_to_disk`, parquet or arrow files (a file or a
  folder of them), or a hub name (needs the hub);
- JSON (a list of records) or JSONL files; image paths are relative to the file (or `--image-root`).

Row layouts (`--format`, detected from the first row when not given):
- `messages`: OpenAI form, `{"id"?, "messages": [{"role", "content": str | [parts]}], "images"?: [...]}`
  with parts `{"type": "text", "text"}`, `{"type": "image"[, "image": path]}` or
  `{"type": "image_url", "image_url": {"url": path}}`; `<image>` markers in string content take
  images from `images` in order.
- `llava`: `{"id", "image": path | [paths], "conversations": [{"from": "human"|"gpt"|"system",
  "value": "...<image>..."}]}`.
- `kodoc`: the `jp1924/KoDocumentTableVisualSFT` layout: columns `id`, `image`, `conversations`,
  `metadata`; each message is `{"role", "content": JSON string of parts}`.

A normalised conversation is `messages = [{"role": "system"|"user"|"assistant", "content":
[{"type": "image"} | {"type": "text", "text": str}, ...]}]` plus the list of its images in order of
appearance (`bytes`, a file path, or `None` when absent).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_tools.errors import BuildError
from data_tools.samples import SampleError

ROW_FORMATS = ("messages", "llava", "kodoc", "records")
IMAGE_MARKER = "<image>"
ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}

ImageRef = bytes | str | None


@dataclass
class Conversation:
    """A normalised conversation: `messages` (see module docstring) and its images in order."""

    source_id: str
    messages: list[dict[str, Any]]
    images: list[ImageRef]
    meta: dict[str, Any] | None = None


@dataclass
class Source:
    """An opened input: per split, a sequence of raw rows (dicts), their row layout and base folder."""

    spec: str
    container: str
    row_format: str
    splits: dict[str, Sequence[Any]]
    base_dir: str | None

    def describe(self) -> str:
        """One line saying what was detected, e.g. for the build log."""
        sizes = ", ".join(f"{name}: {len(rows)} rows" for name, rows in self.splits.items())
        return f"source {self.spec}: {self.container} container, {self.row_format} rows ({sizes})"


class _JsonRows(Sequence[Any]):
    """JSON/JSONL rows; a JSONL line that is not valid UTF-8 or JSON becomes an error row."""

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: Any) -> Any:
        return self._rows[i]


def _read_json_rows(path: Path) -> list[Any]:
    raw = path.read_bytes()
    if path.suffix == ".jsonl":
        rows: list[Any] = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except UnicodeDecodeError:
                rows.append({"__error__": ("non_utf8", f"{path.name} line {n} is not valid UTF-8")})
            except json.JSONDecodeError as e:
                rows.append({"__error__": ("bad_record", f"{path.name} line {n} is not JSON ({e})")})
        return rows
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BuildError(
            f"--source {path}: cannot read it as UTF-8 JSON ({e}); fix the file or use JSONL"
        ) from e
    if isinstance(data, dict):
        for name in ("data", "rows", "records"):
            if isinstance(data.get(name), list):
                return data[name]
        return [data]
    if not isinstance(data, list):
        raise BuildError(f"--source {path}: expected a JSON list of records")
    return data


def _detect_row_format(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    conv = row.get("conversations")
    if isinstance(conv, list) and conv and isinstance(conv[0], dict):
        if "from" in conv[0]:
            return "llava"
        if "role" in conv[0]:
            return "kodoc" if isinstance(conv[0].get("content"), str) else "messages"
    return None


def _hf_without_image_decoding(ds: Any) -> Any:
    # Keep images as {"bytes", "path"}: workers decode them safely, the main process never does.
    from datasets import Image as HFImage
    from datasets import Sequence as HFSequence

    for name, feature in ds.features.items():
        if isinstance(feature, HFImage):
            ds = ds.cast_column(name, HFImage(decode=False))
        elif isinstance(feature, HFSequence) and isinstance(feature.feature, HFImage):
            ds = ds.cast_column(name, HFSequence(HFImage(decode=False)))
        elif isinstance(feature, list) and feature and isinstance(feature[0], HFImage):
            ds = ds.cast_column(name, [HFImage(decode=False)])
    return ds


def open_source(
    spec: str, row_format: str | None = None, splits: list[str] | None = None, image_root: str | None = None
) -> Source:
    """Open `spec` (see module docstring); `splits` names the splits to read (default: all / train)."""
    path = Path(spec)
    container: str
    base_dir = image_root
    data: dict[str, Sequence[Any]] = {}
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        container = path.suffix[1:]
        rows = _read_json_rows(path)
        data = {(splits or ["train"])[0]: _JsonRows(rows)}
        base_dir = base_dir or str(path.parent)
    else:
        import datasets

        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            container = "save_to_disk"
            loaded = datasets.load_from_disk(str(path))
        elif path.exists():
            files = (
                [path]
                if path.is_file()
                else sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".arrow"))
            )
            kinds = {p.suffix for p in files}
            if not files or len(kinds) != 1:
                raise BuildError(
                    f"--source {spec}: expected a save_to_disk folder, parquet/arrow files or a .json/.jsonl file"
                )
            container = kinds.pop()[1:]
            loaded = datasets.load_dataset(container, data_files=[str(p) for p in files])
        else:
            container = "hub"
            try:
                loaded = datasets.load_dataset(spec)
            except Exception as e:
                raise BuildError(
                    f"--source {spec}: not a local path and the hub dataset cannot be loaded ({e})"
                ) from e
        base_dir = base_dir or (str(path if path.is_dir() else path.parent) if path.exists() else None)
        if isinstance(loaded, datasets.DatasetDict):
            names = splits or list(loaded.keys())
            missing = [s for s in names if s not in loaded]
            if missing:
                raise BuildError(
                    f"--split {','.join(missing)}: not in {spec} (it has {', '.join(loaded.keys())})"
                )
            data = {s: _hf_without_image_decoding(loaded[s]) for s in names}
        else:
            data = {(splits or ["train"])[0]: _hf_without_image_decoding(loaded)}
    if row_format is None:
        first = next((rows[0] for rows in data.values() if len(rows)), None)
        row_format = _detect_row_format(first)
        if row_format is None:
            raise BuildError(
                f"--source {spec}: cannot tell the row layout from the first row; pass --format "
                "messages|llava|kodoc"
            )
    elif row_format not in ROW_FORMATS:
        raise BuildError(f"--format {row_format}: use one of {', '.join(ROW_FORMATS[:3])}")
    return Source(spec=spec, container=container, row_format=row_format, splits=data, base_dir=base_dir)


# ---------------------------------------------------------------- normalisation (runs in workers)


def _check_text(text: Any) -> str:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleError("non_utf8", "a message is not valid UTF-8") from e
    if not isinstance(text, str):
        raise SampleError("bad_record", f"message text is {type(text).__name__}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from a bad decode upstream
        raise SampleError("non_utf8", "a message holds text that is not valid Unicode") from e
    return text


def _image_ref(value: Any, base_dir: str | None) -> ImageRef:
    """bytes, an absolute path, or None, from the many ways datasets hold an image."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path") or value.get("url") or value.get("image")
        return _image_ref(value, base_dir)
    if isinstance(value, str):
        if value.startswith("file://"):
            value = value[len("file://") :]
        if "://" in value or value.startswith("data:"):
            raise SampleError("bad_record", f"remote or inline image URLs are not supported: {value[:60]}")
        if not os.path.isabs(value) and base_dir:
            value = os.path.join(base_dir, value)
        return value
    if hasattr(value, "save"):  # a decoded PIL image (a dataset that decodes on access)
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise SampleError("bad_record", f"cannot use an image given as {type(value).__name__}")


def _split_markers(text: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(text.split(IMAGE_MARKER)):
        if i:
            parts.append({"type": "image"})
        piece = piece.strip("\n") if len(text.split(IMAGE_MARKER)) > 1 else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _normalise_parts(
    content: Any, base_dir: str | None, inline: list[ImageRef | None]
) -> list[dict[str, Any]]:
    """Parts of one message; an image part that carries its own image appends it to `inline`,
    one without appends None (filled from the row's image list)."""
    if isinstance(content, str | bytes):
        parts = _split_markers(_check_text(content))
        inline.extend(None for p in parts if p["type"] == "image")
        return parts
    if not isinstance(content, list):
        raise SampleError("bad_record", f"message content is {type(content).__name__}")
    out: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, dict):
            raise SampleError("bad_record", "a content part is not an object")
        kind = part.get("type")
        if kind in ("image", "image_url") or (kind is None and ("image" in part or "image_url" in part)):
            value = part.get("image")
            if value is None and "image_url" in part:
                url = part["image_url"]
                value = url.get("url") if isinstance(url, dict) else url
            out.append({"type": "image"})
            inline.append(_image_ref(value, base_dir) if value is not None else None)
        elif kind == "text" or (kind is None and "text" in part):
            text = _check_text(part.get("text", ""))
            if text:
                out.append({"type": "text", "text": text})
        else:
            raise SampleError("bad_record", f"unsupported content part type {kind!r}")
    return out


def _assemble(
    source_id: str, turns: list[tuple[Any, Any]], row_images: list[Any], base_dir: str | None
) -> Conversation:
    if not turns:
        raise SampleError("empty_conversation", "the conversation has no messages")
    messages: list[dict[str, Any]] = []
    slots: list[ImageRef | None] = []
    for role, content in turns:
        norm_role = ROLE_ALIASES.get(str(role).lower()) if role is not None else None
        if norm_role is None:
            raise SampleError("bad_record", f"unknown role {role!r}")
        parts = _normalise_parts(content, base_dir, slots)
        if parts:
            messages.append({"role": norm_role, "content": parts})
    if not any(p.get("text", "").strip() for m in messages for p in m["content"]):
        raise SampleError("empty_conversation", "the conversation has no text")
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError("no_assistant_turn", "the conversation has no assistant turn")
    if not any(p.get("text", "").strip() for m in messages if m["role"] == "assistant" for p in m["content"]):
        raise SampleError("empty_answer", "every assistant turn is empty")
    # Image slots without their own image take the row's images in order; the counts must agree.
    pending = [_image_ref(v, base_dir) for v in row_images]
    num_unfilled = sum(1 for s in slots if s is None)
    if num_unfilled != len(pending):
        raise SampleError(
            "image_count_mismatch",
            f"{len(slots)} image markers but {len(pending) + len(slots) - num_unfilled} images",
        )
    it = iter(pending)
    images = [s if s is not None else next(it) for s in slots]
    return Conversation(source_id=source_id, messages=messages, images=images)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def normalise_row(row: Any, row_format: str, base_dir: str | None, fallback_id: str) -> Conversation:
    """One raw row -> `Conversation`; raises `SampleError(reason, ...)` for rows to reject."""
    if not isinstance(row, dict):
        raise SampleError("bad_record", f"a row is {type(row).__name__}, not an object")
    if "__error__" in row:
        raise SampleError(*row["__error__"])
    source_id = str(row.get("id", row.get("source_id", fallback_id)))
    if row_format in ("messages", "records"):
        messages = row.get("messages")
        if not isinstance(messages, list):
            raise SampleError("empty_conversation" if messages is None else "bad_record", "no messages list")
        turns = [(m.get("role"), m.get("content", "")) for m in messages if isinstance(m, dict)]
        images = _as_list(row.get("images", row.get("image")))
        conv = _assemble(source_id, turns, images, base_dir)
        if row_format == "records" and row.get("meta") is not None:
            conv.meta = row["meta"]
        return conv
    if row_format == "llava":
        convs = row.get("conversations")
        if not isinstance(convs, list):
            raise SampleError(
                "empty_conversation" if convs is None else "bad_record", "no conversations list"
            )
        turns = [(m.get("from"), m.get("value", "")) for m in convs if isinstance(m, dict)]
        return _assemble(source_id, turns, _as_list(row.get("image", row.get("images"))), base_dir)
    if row_format == "kodoc":
        convs = row.get("conversations")
        if not isinstance(convs, list):
            raise SampleError(
                "empty_conversation" if convs is None else "bad_record", "no conversations list"
            )
        turns = []
        for m in convs:
            content = m.get("content", "")
            if isinstance(content, bytes):
                content = _check_text(content)
            if isinstance(content, str) and content.lstrip().startswith("["):
                try:
                    content = json.loads(content)
                except json.JSONDecodeError as e:
                    raise SampleError("bad_record", f"message content is not valid JSON ({e})") from e
            turns.append((m.get("role"), content))
        return _assemble(source_id, turns, _as_list(row.get("image", row.get("images"))), base_dir)
    raise ValueError(f"unknown row format {row_format!r}")


def load_image_bytes(ref: ImageRef) -> bytes:
    """The bytes of an image reference; `SampleError("missing_image")` when it is absent."""
    if ref is None:
        raise SampleError("missing_image", "an image slot has no image")
    if isinstance(ref, bytes):
        if not ref:
            raise SampleError("missing_image", "an image is empty (0 bytes)")
        return ref
    try:
        with open(ref, "rb") as f:
            return f.read()
    except OSError as e:
        raise SampleError("missing_image", f"cannot read image {ref} ({e.strerror})") from e
