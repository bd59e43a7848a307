"""The data root and the raw readers (JSON lines, JSON, parquet, TSV; gzip transparently)."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .records import DataError, DataReport

# --------------------------------------------------------------------------------------------------
# Data root and raw readers
# --------------------------------------------------------------------------------------------------


def data_root() -> Path:
    env = os.environ.get("ARBITER_DATA_DIR")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DataError(f"ARBITER_DATA_DIR={env} is not a directory")
        return p
    candidates = [Path("/work/shared/data"), Path(__file__).resolve().parents[3].parent / "shared" / "data"]
    for p in candidates:
        if p.is_dir():
            return p
    raise DataError(
        "cannot find the shared data directory: set ARBITER_DATA_DIR (looked in "
        + ", ".join(str(c) for c in candidates)
        + ")"
    )


def _data_file(*parts: str) -> Path:
    p = data_root().joinpath(*parts)
    if not p.is_file():
        raise DataError(f"data file {p} is missing (data root {data_root()})")
    return p


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _iter_jsonl(path: Path, report: DataReport) -> Iterator[tuple[int, Any]]:
    """(row index, parsed object) per non-blank line; lines that are not JSON are counted as unparseable."""
    with _open_text(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                report.total += 1
                report.drop("unparseable", f"row {i}: invalid JSON ({e.msg}): {line}")


def _read_table(path: Path, report: DataReport) -> list[tuple[int, Any]]:
    """Rows of a .jsonl/.json/.parquet file (optionally .gz) as (row index, dict).

    The ``datasets`` library reads the file first (the TRL convention, and the only reader for parquet).
    Arrow needs one schema for the whole file, so a JSON file with one malformed line or columns whose type
    changes between rows fails there as a whole; JSON is then re-read line by line so that the bad rows
    are counted instead of failing the run.
    """
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        kind = "json"
    elif name.endswith((".json", ".json.gz")):
        kind = "json"
    elif name.endswith(".parquet"):
        kind = "parquet"
    else:
        raise DataError(f"{path}: unsupported file type (expected .jsonl, .json or .parquet)")
    try:
        import datasets  # lazy: a [train] extra

        datasets.disable_progress_bars()
        # A throwaway cache: datasets keys its cache on path + mtime, which can serve a stale copy of a file
        # rewritten in place, and training data should not pile up under ~/.cache.
        with tempfile.TemporaryDirectory(prefix="arbiter-data-") as cache:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True)
            return list(enumerate(ds))
    except ImportError as e:
        if kind == "parquet":
            raise DataError(f"{path}: reading parquet needs the 'datasets' package (pip install arbiter[train])") from e
    except Exception as e:  # noqa: BLE001 - arrow errors have many types; fall back below
        if kind == "parquet":
            raise DataError(f"{path}: cannot read parquet file: {e}") from e
    # Plain JSON fallback: a top-level array, an object holding one array, or JSON Lines.
    with _open_text(path) as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return list(_iter_jsonl(path, report))
    if isinstance(obj, dict):
        arrays = [v for v in obj.values() if isinstance(v, list)]
        if len(arrays) == 1:
            obj = arrays[0]
        else:
            obj = [obj]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of rows or JSON Lines, got {type(obj).__name__}")
    return list(enumerate(obj))


def _is_user_file(name: str) -> bool:
    return name.lower().endswith((".jsonl", ".jsonl.gz")) and Path(name).expanduser().is_file()
