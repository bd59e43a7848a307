"""Atomic artifact writes: build in a temporary sibling directory, fsync, rename into place.

A killed run never leaves a partial head, adapter, SAE, cache or checkpoint where a loader would find it:
the target either does not exist, or is the old complete version, or the new complete version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_COMMAND: list[str] | None = None  # the `arbiter train ...` command line of this process (set by training/cli.py)


def set_command(argv: list[str]) -> None:
    global _COMMAND
    _COMMAND = list(argv)


def command_line() -> str | None:
    """The command that is making this artifact (``arbiter train head --config ...``), for provenance; None when a
    recipe runs from Python."""
    import shlex

    return shlex.join(_COMMAND) if _COMMAND else None


METRICS_FILE = "metrics.jsonl"  # every recipe's per-step log (TRL metric names), one JSON object a line


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop the step lines written after the checkpoint we continue from (they are redone), and any
    line without a step (a finished run's closing summary, written again when the resumed run finishes)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            at = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue  # a line torn by the kill
        if isinstance(at, int) and at <= step:
            keep.append(line)
    atomic_write_text(path, "".join(x + "\n" for x in keep))
