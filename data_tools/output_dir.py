"""The output folder of a build: resume records, the build's identity, the layout, `--force`.

After each finished shard a small record (`DIR/.build/shard-NNNNNN.json`: its index entry, the input
position it ends at and its rejects) is written atomically; a re-run with the same source and
settings keeps those shards (their sizes and a few samples read back, no hashing) and continues
after them. `DIR/.build/settings.json` holds what the build was started with (settings, source
identity, tokenizer): a re-run that differs is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from data_tools import shards
from data_tools.errors import BuildError
from data_tools.fileio import atomic_write_text
from data_tools.index import COLUMNS_PREFIX, INDEX_NAME

STATE_DIR = ".build"
RESUME_CHECK_SAMPLES = 4  # samples of each finished shard read back when a build resumes


def state_path(directory: Path, shard_id: int) -> Path:
    return directory / STATE_DIR / f"shard-{shard_id:06d}.json"


def _checked_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first, the last and evenly spaced samples between them (the same ones on every resume)."""
    n = len(samples)
    if n <= RESUME_CHECK_SAMPLES:
        return samples
    step = (n - 1) / (RESUME_CHECK_SAMPLES - 1)
    return [samples[round(i * step)] for i in range(RESUME_CHECK_SAMPLES)]


def _shard_looks_intact(directory: Path, entry: dict[str, Any]) -> bool:
    """Whether a finished shard still has its recorded size and a few of its samples read back as
    recorded. Not a hash: re-hashing every finished shard made resuming a large build slow; the full
    sha256 check is `verify`'s."""
    tar = directory / entry["name"]
    try:
        if tar.stat().st_size != entry["num_bytes"]:
            return False
        for s in _checked_samples(entry["samples"]):
            if shards.check_sample(shards.read_sample(tar, s["offset"], s["num_bytes"]), s, entry["name"]):
                return False
    except Exception:  # any failure to read it back (missing file, tar, JSON, UTF-8, image codecs)
        return False
    return True


def load_finished(directory: Path) -> list[dict[str, Any]]:
    """Finished shard records of an interrupted build whose tar looks intact, in order."""
    done: list[dict[str, Any]] = []
    while (p := state_path(directory, len(done))).is_file():
        try:
            record = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            break
        if not _shard_looks_intact(directory, record["entry"]):
            break
        done.append(record)
    return done


def claim_directory(directory: Path, identity: dict[str, Any]) -> None:
    """Make `directory` this build's: a fresh one records `identity`, an interrupted one must match it."""
    state_dir = directory / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    settings_file = state_dir / "settings.json"
    if settings_file.is_file():
        recorded = json.loads(settings_file.read_text(encoding="utf-8"))
        if recorded != identity:
            raise BuildError(
                f"--output {directory}: holds an interrupted build, and {what_changed(recorded['build'], identity['build'])}; "
                "re-run with the same source and options to resume it, or add --force to rebuild from scratch"
            )
    else:
        if any(shards.SHARD_RE.match(p.name) for p in directory.iterdir()):
            raise BuildError(
                f"--output {directory}: holds shards from another build; choose an empty directory "
                "or add --force to replace them"
            )
        atomic_write_text(settings_file, json.dumps(identity, sort_keys=True))


def what_changed(recorded: dict[str, Any], build_info: dict[str, Any]) -> str:
    if recorded.get("source_identity") != build_info["source_identity"]:
        return "its source changed since (data files, sizes, modification times or row count)"
    changed = sorted(k for k in build_info.keys() | recorded.keys() if recorded.get(k) != build_info.get(k))
    return f"it was made with other settings ({', '.join(changed) or 'the tokenizer'})"


def _removed_column_folder(p: Path) -> bool:
    """Remove `p` if it is a sample-column folder (of the set, or one written just before a crash
    without its index.json) or a writer's unfinished staging folder; whether it was one."""
    if p.is_dir() and (p.name.startswith(COLUMNS_PREFIX) or ".tmp-" in p.name):
        shutil.rmtree(p)
        return True
    return False


def _holds_shard_set(directory: Path) -> bool:
    """Whether `directory` holds a shard set, complete or interrupted (what `--force` removes)."""
    return directory.is_dir() and any(
        p.name in (INDEX_NAME, STATE_DIR) or shards.SHARD_RE.match(p.name) for p in directory.iterdir()
    )


def _remove_shard_set(directory: Path) -> None:
    """Remove the files a build writes in `directory` (shards, index, rejects, resume state), nothing else."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if _removed_column_folder(p):
            continue
        if p.name in (INDEX_NAME, shards.REJECTS_NAME) or shards.SHARD_RE.match(p.name) or ".tmp-" in p.name:
            p.unlink()
    shutil.rmtree(directory / STATE_DIR, ignore_errors=True)


def prepare_output(output: Path, targets: list[Path], force: bool) -> None:
    """Make `output` ready for shard sets in `targets`: with `force`, remove what earlier builds left
    there; without it, refuse a folder that holds the other layout (a flat set where `train/` and
    `test/` are to be written, or the reverse), so `inspect` and `verify` never read a stale set."""
    if targets == [output]:
        stale = (
            [d for d in sorted(output.iterdir()) if d.is_dir() and _holds_shard_set(d)]
            if output.is_dir()
            else []
        )
    else:
        stale = [output] if _holds_shard_set(output) else []
        if output.is_dir():
            stale += [d for d in sorted(output.iterdir()) if d not in targets and _holds_shard_set(d)]
    if force:
        for directory in [*stale, *targets]:
            _remove_shard_set(directory)
    elif stale:
        names = ", ".join(str(d) for d in stale)
        raise BuildError(
            f"--output {output}: holds another shard set ({names}) that this build would not replace; "
            "add --force to remove it, or choose another --output"
        )


def discard_unfinished(directory: Path, finished: list[dict[str, Any]]) -> None:
    """Remove what an interrupted run wrote after its last intact shard (tars, temp files, records)."""
    keep = {r["entry"]["name"] for r in finished}
    for p in directory.iterdir():
        if _removed_column_folder(p):
            continue
        if (shards.SHARD_RE.match(p.name) and p.name not in keep) or ".tmp-" in p.name:
            p.unlink()
    for p in (directory / STATE_DIR).glob("shard-*.json"):
        if int(p.stem.split("-")[1]) >= len(finished):
            p.unlink()
