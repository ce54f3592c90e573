"""JSON and JSONL files as row sequences that keep only a byte-offset index in memory.

Opening a file makes one streaming pass that records, per row, its byte range and the line it
starts on (`array('q')`, 24 bytes a row); `rows[i]` seeks, reads and parses that row alone, so
memory is bounded by the largest row whatever the file size.

- JSONL: every non-blank line is a row.
- JSON: the elements of a top-level list, of the list under a top-level object's "data", "rows" or
  "records" key, or else the top-level object as the only row. A bracket scanner (a compiled regex
  over chunks, strings skipped whole) splits the list without parsing it, so an element that is
  itself invalid JSON is one bad row, while a file that cannot be split at all (unbalanced brackets,
  an unterminated string, text after the list) is a `BuildError`.

A row that cannot be used becomes `{"__error__": (reason, message)}` (see `sources.normalise_row`),
reasons `non_utf8`, `invalid_json` and `too_deeply_nested`; messages name the file and line.
"""

from __future__ import annotations

import codecs
import json
import re
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from data_tools.errors import BuildError

CHUNK_BYTES = 1 << 20  # read size of the indexing passes
MAX_DEPTH = 64  # deeper rows are rejected: pickling them to workers would hit the recursion limit
LIST_KEYS = ("data", "rows", "records")  # a top-level object holding the rows under one of these

_NON_SPACE = re.compile(rb"[^ \t\r\n]")
# Skip text and whole strings up to group 1: the next bracket (or comma, where elements are split),
# a quote that opens a string not terminated in the buffer, or the end of the buffer.
_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_TO_BRACKET = re.compile(rb'(?:[^"\[\]{}]+|' + _STRING + rb')*([\[\]{}"]|\Z)', re.DOTALL)
_TO_SEPARATOR = re.compile(rb'(?:[^"\[\]{},]+|' + _STRING + rb')*([\[\]{},"]|\Z)', re.DOTALL)
_SPACES = re.compile(rb"[ \t\r\n]*")
_KEY = re.compile(rb'("[^"\\]*(?:\\.[^"\\]*)*")[ \t\r\n]*:[ \t\r\n]*', re.DOTALL)
_KEY_PREFIX_BYTES = 4096  # a member whose key and value start are not within these is not the rows
_QUOTE, _COMMA = ord('"'), ord(",")
_OPENERS = {ord("["): ord("]"), ord("{"): ord("}")}


def _error_row(reason: str, message: str) -> dict[str, Any]:
    return {"__error__": (reason, message)}


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists/dicts nest deeper than `limit` (iterative: deep rows must not recurse here)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def parse_row(data: bytes, where: str) -> Any:
    """One row's bytes -> its value, or an error row."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return _error_row("non_utf8", f"{where} is not valid UTF-8 (byte {e.start} of the row)")
    try:
        value = json.loads(text)
    except RecursionError:
        return _error_row("too_deeply_nested", f"{where} nests lists/objects too deeply to parse")
    except json.JSONDecodeError as e:
        return _error_row(
            "invalid_json", f"{where} is not valid JSON ({e.msg} at character {e.pos} of the row)"
        )
    except ValueError as e:  # e.g. an integer over Python's digit limit
        return _error_row("invalid_json", f"{where} is not valid JSON ({e})")
    if isinstance(value, dict | list) and _too_deep(value):
        return _error_row("too_deeply_nested", f"{where} nests lists/objects deeper than {MAX_DEPTH}")
    return value


class OffsetRows(Sequence[Any]):
    """Rows of `path` given by byte ranges `[starts[i], ends[i])` that start on line `lines[i]`."""

    def __init__(self, path: Path, starts: array[int], ends: array[int], lines: array[int]) -> None:
        self.path = path
        self._starts, self._ends, self._lines = starts, ends, lines

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices; IndexError past the end
        with open(self.path, "rb") as f:
            f.seek(self._starts[i])
            data = f.read(self._ends[i] - self._starts[i])
        return parse_row(data, self.where(i))

    def where(self, i: int) -> str:
        """Where row `i` is, for reject reports: e.g. `data.jsonl line 12`."""
        return f"{self.path.name} line {self._lines[range(len(self))[i]]}"


def _bom_length(f: BinaryIO) -> int:
    f.seek(0)
    n = len(codecs.BOM_UTF8) if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
    f.seek(n)
    return n


def index_jsonl(path: Path) -> OffsetRows:
    """Every non-blank line of a JSONL file, in one pass over `CHUNK_BYTES` chunks."""
    starts, ends, lines = array("q"), array("q"), array("q")
    with open(path, "rb") as f:
        offset = line_start = _bom_length(f)
        line_no, blank = 1, True
        while chunk := f.read(CHUNK_BYTES):
            pos = 0
            while (nl := chunk.find(b"\n", pos)) >= 0:
                if not blank or _NON_SPACE.search(chunk, pos, nl):
                    starts.append(line_start)
                    ends.append(offset + nl)
                    lines.append(line_no)
                line_no, line_start, blank, pos = line_no + 1, offset + nl + 1, True, nl + 1
            blank = blank and not _NON_SPACE.search(chunk, pos)
            offset += len(chunk)
        if not blank:
            starts.append(line_start)
            ends.append(offset)
            lines.append(line_no)
    return OffsetRows(path, starts, ends, lines)


def _unsplittable(path: Path, offset: int, line: int, problem: str) -> BuildError:
    return BuildError(
        f"--source {path}: cannot read it as UTF-8 JSON (byte {offset}, line {line}: {problem}); "
        "fix the file or convert it to JSONL (one record per line)"
    )


def _skip_space(f: BinaryIO, offset: int) -> tuple[int, int]:
    """`(offset of the first non-whitespace byte at or after offset, or -1 at EOF, newlines skipped)`."""
    f.seek(offset)
    newlines = 0
    while chunk := f.read(CHUNK_BYTES):
        m = _NON_SPACE.search(chunk)
        if m:
            return offset + m.start(), newlines + chunk.count(b"\n", 0, m.start())
        offset += len(chunk)
        newlines += chunk.count(b"\n")
    return -1, newlines


class _Split:
    """The elements of one list or object found by `_split_container`, and where it ends."""

    def __init__(self) -> None:
        self.starts, self.ends, self.lines = array("q"), array("q"), array("q")
        self.end = self.end_line = 0

    def add(self, start: int, end: int, line: int) -> None:
        self.starts.append(start)
        self.ends.append(end)
        self.lines.append(line)


def _split_container(path: Path, f: BinaryIO, start: int, line: int) -> _Split:
    """Byte ranges of the elements (members, for an object) of the list/object opening at `start`.

    `line` is the line of `start`; newlines are only counted where an element starts."""
    out = _Split()
    f.seek(start)
    buf, buf_off = b"", start  # unscanned bytes and the file offset of buf[0]
    line_off = start  # `line` is the line at this offset
    depth, opener, elem_start, elem_line = 0, 0, start, line

    def line_at(pos: int) -> int:  # pos: an index into buf at or after line_off
        nonlocal line, line_off
        line += buf.count(b"\n", line_off - buf_off, pos)
        line_off = buf_off + pos
        return line

    while True:
        chunk = f.read(max(CHUNK_BYTES, len(buf)))  # grows geometrically while a token is unfinished
        eof, buf, pos = not chunk, buf + chunk, 0
        while True:
            m = (_TO_SEPARATOR if depth <= 1 else _TO_BRACKET).match(buf, pos)
            at = m.start(1)
            token = buf[at] if at < len(buf) else None
            if token is None or token == _QUOTE:  # the end of buf, or an unterminated string
                if eof:
                    problem = "unterminated string" if token == _QUOTE else "a list or object is not closed"
                    raise _unsplittable(path, buf_off + at, line_at(at), problem)
                break
            if token == _COMMA or depth == 0:  # an element starts at the next non-space byte
                ws_end = _SPACES.match(buf, at + 1).end()
                if ws_end == len(buf) and not eof:
                    break  # the spaces may go on in the next chunk: scan this token again then
            pos = at + 1
            if token in _OPENERS:
                depth += 1
                if depth > 1:
                    continue
                opener = token
            elif token == _COMMA:
                out.add(elem_start, buf_off + at, elem_line)
            elif depth > 1:
                depth -= 1
                continue
            else:  # the container closes
                if token != _OPENERS[opener]:
                    raise _unsplittable(
                        path, buf_off + at, line_at(at), f"{chr(token)} closes a {chr(opener)}"
                    )
                if elem_start < buf_off + at or len(out.starts):
                    out.add(elem_start, buf_off + at, elem_line)
                out.end, out.end_line = buf_off + pos, line_at(at)
                return out
            elem_start, elem_line = buf_off + ws_end, line_at(ws_end)
        keep = len(buf) if token is None else at
        line_at(keep)
        buf, buf_off = buf[keep:], buf_off + keep


def _rows_of_object(path: Path, f: BinaryIO, members: _Split, start: int, line: int) -> _Split:
    """The list under a top-level "data"/"rows"/"records" key (the last duplicate wins, as in
    `json.loads`), else the object itself as the only row."""
    lists: dict[str, tuple[int, int] | None] = {}
    for m_start, m_end, m_line in zip(members.starts, members.ends, members.lines, strict=True):
        f.seek(m_start)
        prefix = f.read(min(m_end - m_start, _KEY_PREFIX_BYTES))
        m = _KEY.match(prefix)
        if m is None:
            continue
        try:
            key = json.loads(m.group(1))
        except ValueError:  # a bad escape or non-UTF-8 key: not one of ours
            continue
        if key in LIST_KEYS:
            is_list = prefix[m.end() : m.end() + 1] == b"["
            lists[key] = (m_start + m.end(), m_line + prefix.count(b"\n", 0, m.end())) if is_list else None
    found = next((lists[k] for k in LIST_KEYS if lists.get(k)), None)
    if found is not None:
        return _split_container(path, f, *found)
    whole = _Split()
    whole.add(start, members.end, line)
    return whole


def index_json(path: Path) -> OffsetRows:
    """The rows of a JSON file (see the module docstring); `BuildError` when it cannot be split."""
    with open(path, "rb") as f:
        first, newlines = _skip_space(f, _bom_length(f))
        if first < 0:
            return OffsetRows(path, array("q"), array("q"), array("q"))
        line = 1 + newlines
        f.seek(first)
        if f.read(1) not in (b"[", b"{"):
            raise _unsplittable(path, first, line, "expected a list of records or an object")
        split = _split_container(path, f, first, line)
        rest, newlines = _skip_space(f, split.end)
        if rest >= 0:
            raise _unsplittable(path, rest, split.end_line + newlines, "text after the top-level value")
        f.seek(first)
        if f.read(1) == b"{":
            split = _rows_of_object(path, f, split, first, line)
    return OffsetRows(path, split.starts, split.ends, split.lines)
