"""PNG plots beside every training and evaluation report (matplotlib, headless Agg backend).

* ``training_curves``: loss, accuracy and margin per step from a run's ``metrics.jsonl`` (train, and dev at each
  evaluation when present).
* ``reward_histograms``: chosen vs rejected rewards, and the margin ``r_chosen - r_rejected``.
* ``reliability_diagram``: calibration of ``sigmoid(margin)`` read as P(chosen is preferred). Each pair is
  counted both ways ((m, 1) and (-m, 0)), so the diagram is symmetric and a perfectly calibrated head lies on
  the diagonal; bins with their counts, plus the expected calibration error (ECE).

Every function writes one PNG atomically and returns its path; matplotlib is imported lazily (an optional
dependency of the training extra), so a missing matplotlib costs the plots, not the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

log = logging.getLogger("arbiter.training.plots")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a plot is an ordinary readable file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def training_curves(log_path: str | os.PathLike, png: str | os.PathLike, title: str = "") -> Path | None:
    """Loss / accuracy / margin curves of a ``metrics.jsonl`` (TRL metric names); None when it holds no steps."""
    rows = []
    for line in Path(log_path).read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "step" in r:
            rows.append(r)
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("loss", "rewards/accuracies", "rewards/margins"), ("loss", "accuracy", "margin")):
        steps = [r["step"] for r in rows if key in r]
        ax.plot(steps, [r[key] for r in rows if key in r], lw=0.8, alpha=0.7, label="train (per step)")
        dev = [(r["step"], r[f"eval_{key}"]) for r in rows if f"eval_{key}" in r]
        if dev:
            ax.plot(*zip(*dev), "o-", ms=3, lw=1.2, label="dev")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    out = _save(fig, Path(png))
    plt.close(fig)
    return out


def reward_histograms(chosen: Sequence[float], rejected: Sequence[float], png: str | os.PathLike,
                      title: str = "", labels: tuple[str, str] = ("chosen", "rejected")) -> Path:
    """Histograms of the two reward sets and of their pairwise margins."""
    plt = _pyplot()
    chosen, rejected = [float(x) for x in chosen], [float(x) for x in rejected]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = 30
    a.hist(chosen, bins=bins, alpha=0.55, label=labels[0])
    a.hist(rejected, bins=bins, alpha=0.55, label=labels[1])
    a.set_title("rewards")
    a.legend(fontsize=8)
    if len(chosen) == len(rejected):
        margins = [c - r for c, r in zip(chosen, rejected)]
        b.hist(margins, bins=bins, color="tab:green", alpha=0.7)
        b.axvline(0, color="k", lw=0.8)
        acc = sum(m > 0 for m in margins) / max(len(margins), 1)
        b.set_title(f"margin {labels[0]} - {labels[1]} (share > 0: {acc:.3f})")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    out = _save(fig, Path(png))
    plt.close(fig)
    return out


def calibration(margins: Sequence[float], bins: int = 10) -> tuple[list[dict], float]:
    """(per-bin rows, ECE) of sigmoid(margin) as P(chosen preferred), each pair counted both ways."""
    pts = []
    for m in margins:
        p = 1.0 / (1.0 + math.exp(-max(min(float(m), 60.0), -60.0)))
        pts += [(p, 1.0), (1.0 - p, 0.0)]
    rows, ece = [], 0.0
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        inside = [(p, y) for p, y in pts if lo <= p < hi or (k == bins - 1 and p == 1.0)]
        if not inside:
            continue
        conf = sum(p for p, _ in inside) / len(inside)
        freq = sum(y for _, y in inside) / len(inside)
        rows.append({"lo": lo, "hi": hi, "count": len(inside), "confidence": conf, "frequency": freq})
        ece += len(inside) / len(pts) * abs(conf - freq)
    return rows, ece


def reliability_diagram(margins: Sequence[float], png: str | os.PathLike, title: str = "", bins: int = 10) -> tuple[Path, float]:
    """The reliability diagram of sigmoid(margin); returns (path, ECE)."""
    plt = _pyplot()
    rows, ece = calibration(margins, bins)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="calibrated")
    ax.bar([r["lo"] for r in rows], [r["frequency"] for r in rows], width=1.0 / bins, align="edge", alpha=0.6,
           edgecolor="k", label="observed")
    ax.plot([r["confidence"] for r in rows], [r["frequency"] for r in rows], "o", ms=3, color="tab:red")
    ax.set_xlabel("sigmoid(margin)")
    ax.set_ylabel("share preferred")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title((title + "\n" if title else "") + f"ECE {ece:.3f}")
    ax.legend(fontsize=8, loc="upper left")
    out = _save(fig, Path(png))
    plt.close(fig)
    return out, ece


def safely(fn, *args, **kw):
    """Run a plot function; a plotting failure (e.g. no matplotlib) is logged, never fatal to the run."""
    try:
        return fn(*args, **kw)
    except Exception as e:  # plots are a by-product: the run's numbers are already written
        log.warning("plot %s skipped: %s", getattr(fn, "__name__", fn), e)
        return None
