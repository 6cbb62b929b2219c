"""Parquet logs through pyarrow, one schema for every control step of every run.

Files are written per flush (one part file per flush), so a crash loses at most what was not yet
flushed; `read_parts` reads a folder of parts back as one table.
"""

from __future__ import annotations

import os
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
    ("wall_time", pa.float64()),
])


def _column(rows: list[dict[str, Any]], field: pa.Field) -> list:
    default = [] if pa.types.is_list(field.type) else None
    return [row.get(field.name, default) for row in rows]


def to_table(rows: list[dict[str, Any]], schema: pa.Schema = STEP_SCHEMA) -> pa.Table:
    return pa.table({f.name: pa.array(_column(rows, f), type=f.type) for f in schema},
                    schema=schema)


def append_parts(folder: str | os.PathLike, rows: list[dict[str, Any]],
                 schema: pa.Schema = STEP_SCHEMA) -> Path | None:
    """Write `rows` as a new part file in `folder` (atomically: temp file, then rename)."""
    if not rows:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = len(list(folder.glob("part-*.parquet")))
    path = folder / f"part-{index:05d}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = path.with_suffix(".tmp")
    pq.write_table(to_table(rows, schema), tmp)
    os.replace(tmp, path)
    return path


def read_parts(folder: str | os.PathLike, schema: pa.Schema = STEP_SCHEMA) -> pa.Table:
    """All part files of `folder` as one table (empty table with the schema if none)."""
    parts = sorted(Path(folder).glob("part-*.parquet"))
    if not parts:
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=schema) for p in parts])


def write_table(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """A small result table (e.g. an evaluation summary) with an inferred schema."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
