"""One run-directory layout for every recipe (head, adapter, joint, sae), and one resume rule.

``<out>/``
    ``checkpoints/step-N/``  trainable tensors, optimizer + RNG, ``state.json`` (with the run's ``config``)
    ``metrics.jsonl``        one JSON object per logged step (``step`` first), appended as the run goes
    ``result.json``          the final metrics, written atomically when the run has finished
    the artifact             ``head/``, ``adapter/`` or ``sae/``, written atomically

A new run refuses an out directory that already holds a run unless ``overwrite=true`` (which deletes the old
checkpoints, log and result first); ``--resume`` continues from the latest checkpoint, but only under the same
config: every key not in the recipe's ``free`` set (settings that do not change what is computed: logging,
checkpoint cadence, the step budget, progress bars, ...) must equal the checkpoint's, else ``ConfigError`` names
each changed key. Imports no torch (the head recipe's module stays light).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import IO, Any, Collection, Sequence

from arbiter.training.artifacts import METRICS_FILE, truncate_metrics
from arbiter.training.config import ConfigError

log = logging.getLogger("arbiter.training.rundir")

RESULT_FILE = "result.json"
CHECKPOINTS = "checkpoints"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict[str, Any], current: dict[str, Any], free: Collection[str] = ()) -> list[str]:
    """'key: checkpoint X, now Y' for every dotted key outside ``free`` whose value differs (JSON-normalised)."""
    a = flatten(json.loads(json.dumps(saved, default=str)))
    b = flatten(json.loads(json.dumps(current, default=str)))
    return [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if k not in free and a.get(k) != b.get(k)]


def prepare_run_dir(out: str | Path, *, resume: bool, overwrite: bool, artifacts: Collection[str] = ()) -> Path:
    """Create ``out``; a fresh run (no ``resume``) in a directory holding checkpoints, a log, a result or one of
    ``artifacts`` is refused, or with ``overwrite`` starts over (checkpoints, log and result deleted; the
    artifact is replaced atomically when the new run saves it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        return out
    found = [p for p in (CHECKPOINTS, METRICS_FILE, RESULT_FILE, *artifacts) if (out / p).exists()]
    if found:
        if not overwrite:
            raise ConfigError(
                f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it, overwrite=true to "
                "replace it, or choose another out directory"
            )
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        for name in (METRICS_FILE, RESULT_FILE):
            (out / name).unlink(missing_ok=True)
    return out


def resumable_checkpoint(out: str | Path, config: dict[str, Any], free: Collection[str], resume: bool) -> Path | None:
    """The checkpoint to continue from (None: start fresh). Refuses a checkpoint written under another config."""
    from arbiter.training.checkpoint import latest_checkpoint

    if not resume:
        return None
    path = latest_checkpoint(out)
    if path is None:
        log.warning("--resume: no checkpoint under %s; starting from scratch", out)
        return None
    saved = json.loads((path / "state.json").read_text()).get("config", {})
    diff = config_diff(saved, config, free)
    if diff:
        raise ConfigError(f"cannot resume {path}: the config changed ({'; '.join(diff)})")
    return path


class MetricsLog:
    """``<out>/metrics.jsonl``, appended one record a line; on resume the lines after the checkpoint's step are
    dropped first (a killed run may have logged past its last checkpoint)."""

    def __init__(self, out: str | Path, *, resumed_at: int | None = None, enabled: bool = True,
                 report_to: Sequence[str] = ("jsonl",), config: dict[str, Any] | None = None):
        self.path = Path(out) / METRICS_FILE
        self.enabled = enabled
        if enabled and resumed_at is not None:
            truncate_metrics(self.path, resumed_at)
        self._f: IO[str] | None = open(self.path, "a", encoding="utf-8") if enabled else None
        self.trackers = None  # TensorBoard / W&B (arbiter.training.trackers): the same records, main process only
        if enabled and any(t != "jsonl" for t in report_to):
            from arbiter.training.trackers import Trackers

            self.trackers = Trackers(out, report_to, config=config, resumed_at=resumed_at)

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record, default=float) + "\n")
            if self.trackers is not None and "step" in record:
                self.trackers.log(record)

    def summary(self, metrics: dict[str, Any]) -> None:
        """The run's final metrics: a ``{"final": ...}`` line and the trackers' summary."""
        if self._f is not None:
            self._f.write(json.dumps({"final": metrics}, default=float) + "\n")
            if self.trackers is not None:
                self.trackers.summary(metrics)

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()
            if self.trackers is not None:
                self.trackers.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
