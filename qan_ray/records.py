"""Parquet logs through pyarrow, one schema for every control step of every run.

Files are written per flush (one part file per flush), so a crash loses at most what was not yet
flushed; `read_parts` reads a folder of parts back as one table.

Also the small pieces of crash safety every writer here shares: `fault_point` (a named step where a
test can kill the process: QAN_FAULT=name or name:count makes the count-th pass `os._exit(86)`),
`swap_dir` (replace a folder by a complete new one; the old stays until the new is in place),
`write_json` (temp file + rename) and `writable_dir` (an output folder checked before any work).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

STEP_SCHEMA = pa.schema([
    ("run", pa.string()),
    ("episode", pa.int64()),
    ("step", pa.int64()),
    ("action", pa.int64()),
    ("lr", pa.float64()),
    ("train_loss", pa.float64()),
    ("val_loss", pa.float64()),
    ("val_accuracy", pa.float64()),
    ("reward", pa.float64()),
    ("q_values", pa.list_(pa.float32())),
    ("batches", pa.int64()),
    ("diverged", pa.bool_()),
    ("actor", pa.string()),
    ("task", pa.string()),
    ("wall_time", pa.float64()),
    ("global_episode", pa.int64()),
    ("seed", pa.int64()),
    ("truncated", pa.bool_()),
    ("rescued", pa.bool_()),
    ("cut", pa.string()),
])
"""`episode`: the full episode's number in commit order (null for a truncated one);
`global_episode` and `seed`: the index the run's episode counter handed out and the seed
derived from it (actors.episode_seed); `truncated`: the episode was cut and is not counted as a
full episode, `cut` says why: "actor" (its trainer actor died) or "generation" (a population's
generation over a task distribution ended while it ran); `rescued`: the rescue guard rolled this
step back (null in logs written before the guard)."""

FAULT_ENV = "QAN_FAULT"
FAULT_EXIT = 86
_fault_passes: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named step of a commit sequence. With QAN_FAULT=name (or name:count) the process ends at
    once (`os._exit(86)`, no cleanup: what a SIGKILL or power cut leaves) on the count-th pass
    (default 1st); name:count:raise raises FaultInjected instead, and name:count:sigint (sigterm)
    sends the process a SIGINT, a Ctrl-C (a SIGTERM, `ray job stop`) at a known point. Tests use
    it to check that a restart finds the old state or the new one."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    count, _, action = rest.partition(":")
    _fault_passes[name] = _fault_passes.get(name, 0) + 1
    if _fault_passes[name] == int(count or 1):
        if action == "raise":  # in-process tests: the same on-disk state, the process lives
            raise FaultInjected(name)
        if action in ("sigint", "sigterm"):  # a real Ctrl-C / kill, at this point, not a timer
            import signal

            os.kill(os.getpid(), signal.SIGINT if action == "sigint" else signal.SIGTERM)
            return
        os._exit(FAULT_EXIT)


class FaultInjected(BaseException):
    """Raised at a fault point with QAN_FAULT=name:count:raise (not an Exception, so no handler
    on the way swallows it)."""


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """`data` as JSON at `path`, atomically (temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike, what: str, fix: str) -> Any:
    """JSON from `path`; a corrupt file is a ValueError naming it, what it is and the fix."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} ({what}) is not valid JSON ({err.__class__.__name__}: {err}); "
                         f"it may be truncated. {fix}") from None


def swap_dir(new: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Make the complete folder `new` the folder `final`: `final` -> `final.old`, `new` ->
    `final`, then remove `final.old`. A crash in between leaves `final.old` (the previous
    state), which `recover_dir` puts back."""
    new, final = Path(new), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    fault_point("swap-dir")
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover_dir(final: str | os.PathLike) -> Path | None:
    """After a crash inside `swap_dir`: put `final.old` back if `final` is missing; drop a
    leftover `final.old` / `final.tmp` otherwise. Returns `final` if it exists afterwards."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    tmp = final.with_name(final.name + ".tmp")
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    return final if final.exists() else None


def writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Check, before any work, that `path` is (or can become) a folder this process can write:
    it must not be a file, nor lie under one, and a probe file must be writable there. Creates the
    folder. ValueError naming the value, the rule and the fix otherwise."""
    path = Path(path)
    fix = f"Pass a writable folder, e.g. {flag} runs/out."
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{flag} is {str(path)!r} but {str(parent)!r} is a file; it must be "
                             f"a folder (existing or new). {fix}")
        if parent.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".qan-write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{flag} is {str(path)!r}, which cannot be written "
                         f"({err.strerror or err}); it must be a writable folder. {fix}") from None
    return path


def _column(rows: list[dict[str, Any]], field: pa.Field) -> list:
    default = [] if pa.types.is_list(field.type) else None
    return [row.get(field.name, default) for row in rows]


def to_table(rows: list[dict[str, Any]], schema: pa.Schema = STEP_SCHEMA) -> pa.Table:
    return pa.table({f.name: pa.array(_column(rows, f), type=f.type) for f in schema},
                    schema=schema)


def append_parts(folder: str | os.PathLike, rows: list[dict[str, Any]],
                 schema: pa.Schema = STEP_SCHEMA, name: str | None = None) -> Path | None:
    """Write `rows` as a new part file in `folder` (atomically: temp file, then rename); `name`
    (default: the next index + a random tag) names it `part-<name>.parquet`."""
    if not rows:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if name is None:
        name = f"{len(list(folder.glob('part-*.parquet'))):05d}-{uuid.uuid4().hex[:8]}"
    path = folder / f"part-{name}.parquet"
    tmp = path.with_suffix(".tmp")
    pq.write_table(to_table(rows, schema), tmp)
    os.replace(tmp, path)
    return path


def read_parts(folder: str | os.PathLike, schema: pa.Schema = STEP_SCHEMA) -> pa.Table:
    """All part files of `folder` as one table, in name (= commit) order, read as one
    pyarrow.dataset with `schema`: parts from before a column was added get it as nulls (empty
    table with the schema if there is no part). A part that cannot be read is a ValueError
    naming it."""
    import pyarrow.dataset as ds

    parts = sorted(Path(folder).glob("part-*.parquet"))  # not the .tmp of a write under way
    if not parts:
        return schema.empty_table()
    try:
        return ds.dataset([str(p) for p in parts], schema=schema, format="parquet").to_table()
    except (pa.ArrowInvalid, OSError) as err:
        bad = next((p for p in parts if not _readable(p)), Path(folder))
        raise ValueError(f"{bad} is not a readable Parquet part ({err}); it may be truncated. "
                         "Move it out of the folder (its episodes are lost) and --resume "
                         "again.") from None


def _readable(path: Path) -> bool:
    try:
        pq.read_metadata(path)
        return True
    except (pa.ArrowInvalid, OSError):
        return False


def write_table(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """A small result table (e.g. an evaluation summary) with an inferred schema. Its columns
    are every key of any row, in first-seen order (a key missing from a row is null there;
    pyarrow's from_pylist alone would keep only the first row's keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows]),
                   path)
    return path
