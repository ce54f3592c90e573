"""Input formats -> normalised conversations.

Containers (detected from `--source`):
- a Hugging Face dataset folder written by `save_to_disk`, parquet or arrow files (a file or a
  folder of them), or a hub name (needs the hub);
- JSON (a list of records) or JSONL files, read as streams (`data_tools.json_rows`).

Row layouts (`--format`, detected from the first recognisable row when not given):
- `messages`: OpenAI form, `{"id"?, "messages": [{"role", "content": str | [parts]}], "images"?: [...]}`
  with parts `{"type": "text", "text"}`, `{"type": "image"[, "image": path]}` or
  `{"type": "image_url", "image_url": {"url": path}}`; `<image>` markers in string content take
  images from `images` in order.
- `llava`: `{"id", "image": path | [paths], "conversations": [{"from": "human"|"gpt"|"system",
  "value": "...<image>..."}]}`.
- `kodoc`: the `jp1924/KoDocumentTableVisualSFT` layout: columns `id`, `image`, `conversations`,
  `metadata`; each message is `{"role", "content": JSON string of parts}`.

Images are bytes, decoded PIL images (stored as PNG/TIFF bytes) or local paths. The image root is
`--image-root` (a relative one from the working directory), else the JSON/JSONL file's folder, else
the local dataset folder; a hub dataset without `--image-root` has none. Relative paths join the
root; every path (`..` and symlinks resolved) must lie inside it unless `allow_outside_root`.
URLs are refused: nothing is downloaded.

A normalised conversation is `messages = [{"role": "system"|"user"|"assistant", "content":
[{"type": "image"} | {"type": "text", "text": str}, ...]}]` plus the list of its images in order of
appearance (`bytes`, a real file path, or `None` when absent).

Reject reasons raised here (`SampleError.reason`):
- the row: `row_not_object`, and from `json_rows` `non_utf8`, `invalid_json`, `too_deeply_nested`;
- messages: `empty_conversation`, `bad_messages`, `bad_content`, `bad_content_part`,
  `unknown_role`, `non_utf8`, `no_assistant_turn`, `empty_answer`;
- images: `image_count_mismatch`, `missing_image`, `remote_image`, `outside_image_root`,
  `bad_image_value`, `not_a_file`, `image_file_too_large`, `unreadable_image`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from data_tools import json_rows
from data_tools.errors import BuildError
from data_tools.samples import SampleError

InputFormat = Literal["messages", "llava", "kodoc"]
"""The type of a row layout a user names (``build --format``, the trainer's ``data.source_format``);
unnamed, the layout is detected from the first rows."""
INPUT_FORMATS: tuple[str, ...] = typing.get_args(InputFormat)
"""The row layouts a user names, in order."""
ROW_FORMATS: tuple[str, ...] = (*INPUT_FORMATS, "records")
"""Every layout the normaliser reads: the input formats and ``records`` (synth's rows, with meta)."""
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

DETECT_ROWS = 100  # rows looked at to detect the layout when --format is not given
MAX_ID_CHARS = 200
# Any URL scheme but file://: images are never downloaded.
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|data:", re.IGNORECASE)

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
    """An opened input: per split, a sequence of raw rows (dicts), and their row layout.

    `base_dir` is the image root as an absolute real path, or None (a hub dataset without one)."""

    spec: str
    container: str
    row_format: str
    splits: dict[str, Sequence[Any]]
    base_dir: str | None

    def describe(self) -> str:
        """One line saying what was detected, e.g. for the build log."""
        sizes = ", ".join(f"{name}: {len(rows)} rows" for name, rows in self.splits.items())
        return f"source {self.spec}: {self.container} container, {self.row_format} rows ({sizes})"


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


def _open_datasets(path: Path, spec: str, splits: list[str] | None) -> tuple[str, dict[str, Sequence[Any]]]:
    """`(container, split -> rows)` of a save_to_disk folder, parquet/arrow files or a hub dataset."""
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
    if not isinstance(loaded, datasets.DatasetDict):
        return container, {(splits or ["train"])[0]: _hf_without_image_decoding(loaded)}
    names = splits or list(loaded.keys())
    missing = [s for s in names if s not in loaded]
    if missing:
        raise BuildError(f"--split {','.join(missing)}: not in {spec} (it has {', '.join(loaded.keys())})")
    return container, {s: _hf_without_image_decoding(loaded[s]) for s in names}


def _first_row_format(data: dict[str, Sequence[Any]]) -> str | None:
    """The layout of the first recognisable row among the first few (a bad first row is just a reject)."""
    for rows in data.values():
        for i in range(min(len(rows), DETECT_ROWS)):
            detected = _detect_row_format(rows[i])
            if detected is not None:
                return detected
    return None


def open_source(
    spec: str, row_format: str | None = None, splits: list[str] | None = None, image_root: str | None = None
) -> Source:
    """Open `spec` (see module docstring); `splits` names the splits to read (default: all / train)."""
    path = Path(spec)
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        container = path.suffix[1:]
        rows = json_rows.index_jsonl(path) if container == "jsonl" else json_rows.index_json(path)
        data: dict[str, Sequence[Any]] = {(splits or ["train"])[0]: rows}
        default_root: Path | None = path.parent
    else:
        container, data = _open_datasets(path, spec, splits)
        default_root = (path if path.is_dir() else path.parent) if path.exists() else None
    # Image paths must resolve inside this folder: compare real paths (symlinks and `..` followed).
    root = image_root or default_root
    base_dir = os.path.realpath(os.path.abspath(root)) if root is not None else None
    if row_format is None:
        row_format = _first_row_format(data)
        if row_format is None:
            raise BuildError(
                f"--source {spec}: cannot tell the row layout from the first rows; pass --format "
                f"{'|'.join(INPUT_FORMATS)}"
            )
    elif row_format not in ROW_FORMATS:
        raise BuildError(f"--format {row_format}: use one of {', '.join(INPUT_FORMATS)}")
    return Source(spec=spec, container=container, row_format=row_format, splits=data, base_dir=base_dir)


# ---------------------------------------------------------------- normalisation (runs in workers)


def _check_text(text: Any) -> str:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleError("non_utf8", "a message is not valid UTF-8") from e
    if not isinstance(text, str):
        raise SampleError("bad_content", f"message text is {type(text).__name__}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from a bad decode upstream
        raise SampleError("non_utf8", "a message holds text that is not valid Unicode") from e
    return text


def _resolve_path(value: str, base_dir: str | None, allow_outside_root: bool) -> str:
    """The real path of an image path, which must lie inside `base_dir` (unless allowed outside).

    Decided on the path alone, never on whether the file exists: a reject must not tell which
    files exist outside the dataset."""
    if value.startswith("file://"):
        value = value[len("file://") :]
    elif _URL_SCHEME.match(value):
        raise SampleError(
            "remote_image",
            f"image {value[:60]!r} is a URL; no downloads: download the images and give local paths",
        )
    if not value.strip():
        raise SampleError("missing_image", "an image path is empty")
    if "\x00" in value:
        raise SampleError("bad_image_value", "an image path contains a NUL character")
    if allow_outside_root:
        return os.path.realpath(os.path.join(base_dir, value) if base_dir else value)
    if base_dir is None:
        raise SampleError(
            "outside_image_root", f"image path {value[:80]!r}: no image root; pass --image-root FOLDER"
        )
    root = os.path.realpath(base_dir)
    real = os.path.realpath(os.path.join(root, value))
    if os.path.commonpath([root, real]) != root:
        raise SampleError(
            "outside_image_root", f"image path {value[:80]!r} resolves outside the image root {root}"
        )
    return real


def _encoded_pil(image: Any) -> bytes:
    """A decoded PIL image (datasets that decode on access) as PNG, or TIFF for modes PNG cannot store."""
    import io

    for image_format in ("PNG", "TIFF"):
        buf = io.BytesIO()
        try:
            image.save(buf, format=image_format)
            return buf.getvalue()
        except (OSError, ValueError, KeyError):
            continue
    raise SampleError("bad_image_value", f"cannot store a decoded {image.mode} image as PNG or TIFF")


def _image_ref(value: Any, base_dir: str | None, allow_outside_root: bool = False) -> ImageRef:
    """bytes, a real path inside `base_dir`, or None, from the many ways datasets hold an image."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is not None and not isinstance(data, bytes | bytearray):
            raise SampleError("bad_image_value", f"image bytes given as {type(data).__name__}")
        if data:
            return bytes(data)
        value = value.get("path") or value.get("url") or value.get("image")
        return None if value is None else _image_ref(value, base_dir, allow_outside_root)
    if isinstance(value, str | os.PathLike):  # a PathLike from Python callers (trainer.api)
        return _resolve_path(os.fspath(value), base_dir, allow_outside_root)
    from PIL import Image

    if isinstance(value, Image.Image):
        return _encoded_pil(value)
    raise SampleError("bad_image_value", f"cannot use an image given as {type(value).__name__}")


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
    content: Any, base_dir: str | None, inline: list[ImageRef | None], allow_outside_root: bool = False
) -> list[dict[str, Any]]:
    """Parts of one message; an image part that carries its own image appends it to `inline`,
    one without appends None (filled from the row's image list)."""
    if isinstance(content, str | bytes):
        parts = _split_markers(_check_text(content))
        inline.extend(None for p in parts if p["type"] == "image")
        return parts
    if not isinstance(content, list):
        raise SampleError("bad_content", f"message content is {type(content).__name__}, not text or parts")
    out: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, dict):
            raise SampleError("bad_content_part", f"a content part is {type(part).__name__}, not an object")
        kind = part.get("type")
        if kind in ("image", "image_url") or (kind is None and ("image" in part or "image_url" in part)):
            value = part.get("image")
            if value is None and "image_url" in part:
                url = part["image_url"]
                value = url.get("url") if isinstance(url, dict) else url
            out.append({"type": "image"})
            inline.append(_image_ref(value, base_dir, allow_outside_root) if value is not None else None)
        elif kind == "text" or (kind is None and "text" in part):
            text = _check_text(part.get("text", ""))
            if text:
                out.append({"type": "text", "text": text})
        else:
            raise SampleError("bad_content_part", f"unsupported content part type {repr(kind)[:40]}")
    return out


def _role(role: Any) -> str:
    if not isinstance(role, str):
        raise SampleError("unknown_role", f"a message role is {type(role).__name__}, not a string")
    norm_role = ROLE_ALIASES.get(role.lower())
    if norm_role is None:
        raise SampleError("unknown_role", f"unknown role {role[:40]!r}")
    return norm_role


def _assemble(
    source_id: str,
    turns: list[tuple[Any, Any]],
    row_images: list[Any],
    base_dir: str | None,
    allow_outside_root: bool = False,
) -> Conversation:
    if not turns:
        raise SampleError("empty_conversation", "the conversation has no messages")
    messages: list[dict[str, Any]] = []
    slots: list[ImageRef | None] = []
    for role, content in turns:
        norm_role = _role(role)
        parts = _normalise_parts(content, base_dir, slots, allow_outside_root)
        if parts:
            messages.append({"role": norm_role, "content": parts})
    if not any(p.get("text", "").strip() for m in messages for p in m["content"]):
        raise SampleError("empty_conversation", "the conversation has no text")
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError("no_assistant_turn", "the conversation has no assistant turn")
    if not any(p.get("text", "").strip() for m in messages if m["role"] == "assistant" for p in m["content"]):
        raise SampleError("empty_answer", "every assistant turn is empty")
    # Image slots without their own image take the row's images in order; the counts must agree.
    pending = [_image_ref(v, base_dir, allow_outside_root) for v in row_images]
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


def _message_list(row: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """`row[key]` checked to be a list of objects."""
    messages = row.get(key)
    if messages is None:
        raise SampleError("empty_conversation", f"the row has no {key!r} list")
    if not isinstance(messages, list):
        raise SampleError("bad_messages", f"{key!r} is {type(messages).__name__}, not a list")
    for m in messages:
        if not isinstance(m, dict):
            raise SampleError("bad_messages", f"a message in {key!r} is {type(m).__name__}, not an object")
    return messages


def _kodoc_content(content: Any) -> Any:
    """A kodoc message's content: a JSON string of parts, parsed."""
    if isinstance(content, bytes):
        content = _check_text(content)
    if not (isinstance(content, str) and content.lstrip().startswith("[")):
        return content
    try:
        return json.loads(content)
    except RecursionError as e:
        raise SampleError("too_deeply_nested", "message content nests lists too deeply") from e
    except ValueError as e:
        raise SampleError("bad_content", f"message content is not valid JSON ({e})") from e


def row_source_id(row: Any, fallback_id: str) -> str:
    """The id a row names (`id`, else `source_id`, capped in length), else `fallback_id`.

    Never raises, so a reject can name the row even when `normalise_row` refuses it."""
    if not isinstance(row, dict):
        return fallback_id
    value = row.get("id", row.get("source_id"))
    return fallback_id if value is None else str(value)[:MAX_ID_CHARS]


def normalise_row(
    row: Any, row_format: str, base_dir: str | None, fallback_id: str, allow_outside_root: bool = False
) -> Conversation:
    """One raw row -> `Conversation`; raises `SampleError(reason, ...)` for rows to reject.

    Image paths must resolve inside `base_dir` unless `allow_outside_root`."""
    if not isinstance(row, dict):
        raise SampleError("row_not_object", f"a row is {type(row).__name__}, not an object")
    error = row.get("__error__")
    if isinstance(error, tuple):  # set by json_rows for a row it could not parse (JSON has no tuples)
        raise SampleError(*error)
    source_id = row_source_id(row, fallback_id)
    if row_format in ("messages", "records"):
        messages = _message_list(row, "messages")
        turns = [(m.get("role"), m.get("content", "")) for m in messages]
        images = _as_list(row.get("images", row.get("image")))
        conv = _assemble(source_id, turns, images, base_dir, allow_outside_root)
        if row_format == "records" and row.get("meta") is not None:
            conv.meta = row["meta"]
        return conv
    if row_format == "llava":
        turns = [(m.get("from"), m.get("value", "")) for m in _message_list(row, "conversations")]
    elif row_format == "kodoc":
        convs = _message_list(row, "conversations")
        turns = [(m.get("role"), _kodoc_content(m.get("content", ""))) for m in convs]
    else:
        raise ValueError(f"unknown row format {row_format!r}")
    images = _as_list(row.get("image", row.get("images")))
    return _assemble(source_id, turns, images, base_dir, allow_outside_root)


def _read_image_file(path: str, max_bytes: int) -> bytes:
    """At most `max_bytes + 1` bytes of a regular file; never blocks on a FIFO or reads a device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise SampleError("missing_image", f"image {path} does not exist") from e
    except OSError as e:
        raise SampleError("unreadable_image", f"cannot open image {path} ({e.strerror})") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SampleError("not_a_file", f"image {path} is not a regular file")
        if info.st_size > max_bytes:
            raise SampleError("image_file_too_large", f"image {path} has {info.st_size} bytes > {max_bytes}")
        with open(fd, "rb", closefd=False) as f:
            return f.read(max_bytes + 1)
    except OSError as e:
        raise SampleError("unreadable_image", f"cannot read image {path} ({e.strerror})") from e
    finally:
        os.close(fd)


def load_image_bytes(ref: ImageRef, max_bytes: int) -> bytes:
    """The bytes of an image reference, at most `max_bytes` of them; `SampleError` when unusable."""
    if ref is None:
        raise SampleError("missing_image", "an image slot has no image")
    data = ref if isinstance(ref, bytes) else _read_image_file(ref, max_bytes)
    if not data:
        raise SampleError("missing_image", "an image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise SampleError("image_file_too_large", f"an image has more than {max_bytes} bytes")
    return data
