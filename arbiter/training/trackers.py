"""Where a training run's metrics go besides ``metrics.jsonl``: TensorBoard and Weights & Biases (``report_to``).

Every recipe takes ``report_to`` (default ``["jsonl"]``), as TRL's / transformers' ``TrainingArguments.report_to``:
- ``jsonl``: ``<out>/metrics.jsonl``, one record a line. Always written whatever ``report_to`` says: resume, the
  run's report and its plots read it.
- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` event files under ``<out>/tensorboard``; each numeric
  key of a record is a scalar at the record's ``step`` (the same TRL names: ``loss``, ``rewards/accuracies``, ...).
  A resumed run writes with ``purge_step`` = its checkpoint's step, so TensorBoard drops the killed run's later
  points as ``metrics.jsonl`` does.
- ``wandb``: ``wandb.init(dir=<out>, mode=<WANDB_MODE or offline when no API key is set>)``, the config as the run's
  config, each record through ``run.log(values, step=step)``, the final metrics in ``run.summary``. The run id is
  kept in ``<out>/wandb_run_id`` so ``--resume`` continues the same W&B run. Offline runs sync later with
  ``wandb sync <out>/wandb/offline-run-*``.

Only the main process (rank 0) reports. Trackers are optional dependencies (``pip install 'arbiter[trackers]'``); a
run asking for one that is not installed stops before training with the install command.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence, cast

from arbiter.training.config import ConfigError

log = logging.getLogger("arbiter.training.trackers")

TRACKERS = ("jsonl", "tensorboard", "wandb")
_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb"}  # what each tracker imports


def check_report_to(report_to: Any, where: str = "report_to") -> list[str]:
    """The validated list (a string is one tracker); ConfigError for unknown or missing ones."""
    if isinstance(report_to, str):
        report_to = [report_to]
    if not isinstance(report_to, (list, tuple)) or not all(isinstance(t, str) for t in report_to):
        raise ConfigError(f"{where}: a list of trackers ({', '.join(TRACKERS)}), got {report_to!r}")
    for t in report_to:
        if t not in TRACKERS:
            raise ConfigError(f"{where}: {t!r} is not one of {list(TRACKERS)}")
        if t in _MODULE:
            import importlib.util

            if importlib.util.find_spec(_MODULE[t]) is None:
                raise ConfigError(f"{where}: {t} is not installed: pip install 'arbiter[trackers]' (or pip install {t})")
    return list(dict.fromkeys(report_to))


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numeric values (bools and the step itself excluded)."""
    out = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


class Trackers:
    """The trackers of one run directory (module docstring); ``log`` a step record, ``summary`` the final
    metrics, ``close`` at the end (idempotent)."""

    def __init__(self, out: str | Path, report_to: Sequence[str], *, config: dict[str, Any] | None = None,
                 resumed_at: int | None = None, name: str | None = None):
        self.out = Path(out)
        self.report_to = check_report_to(list(report_to))
        self._tb: Any = None
        self._wandb: Any = None
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out / "tensorboard"), purge_step=resumed_at)
        if "wandb" in self.report_to:
            import wandb

            id_file = self.out / "wandb_run_id"
            run_id = id_file.read_text().strip() if resumed_at is not None and id_file.is_file() else None
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self._wandb = wandb.init(dir=str(self.out), mode=cast(Any, mode), id=run_id,
                                     resume="allow" if run_id else None, name=name or self.out.name,
                                     config=config or {}, reinit="create_new")
            id_file.write_text(self._wandb.id + "\n")
            log.info("W&B run %s (%s) in %s", self._wandb.id, mode, self.out / "wandb")

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        values = _scalars(record)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def summary(self, metrics: dict[str, Any]) -> None:
        values = _scalars(metrics)
        if self._wandb is not None:
            self._wandb.summary.update(values)
        if self._tb is not None:
            self._tb.add_text("final", "\n".join(f"{k}: {v:.6g}" for k, v in sorted(values.items())))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
