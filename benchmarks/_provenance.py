"""Shared by the benchmark scripts: which code and machine a report was measured on, the conditions of the run,
and the two honest summaries of a ratio (README, "Benchmarks")."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # the ones that decide CPU kernel speed and dtype


def git_commit() -> str:
    """The commit the benchmark ran on, marked dirty when tracked code (arbiter/, benchmarks/ but not its reports) differs."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "arbiter", "benchmarks",
                                ":(exclude)benchmarks/reports"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout
        files = sorted(line[3:] for line in dirty.splitlines() if line.strip())
        return head + (f"` plus uncommitted changes in `{', '.join(files)}" if files else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    """CPU model, core count and the instruction-set flags that matter here (read from /proc/cpuinfo)."""
    model, flags = "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "flags": [f for f in _FLAGS if f in flags]}


class Run:
    """One benchmark run's provenance: the command, the commit (read at the start: later edits do not count), the
    machine, the UTC start time, and the 1-minute load average at start and end (how busy the shared machine was)."""

    def __init__(self, script: str):
        self.command = "python " + " ".join([script, *sys.argv[1:]])
        self.commit = git_commit()
        self.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        self.machine = machine()
        self.load_start = os.getloadavg()[0]
        self.t0 = time.monotonic()

    def finish(self) -> dict:
        return {"command": self.command, "commit": self.commit, "date": self.started, **self.machine,
                "load_1min_start": round(self.load_start, 2), "load_1min_end": round(os.getloadavg()[0], 2),
                "wall_s": round(time.monotonic() - self.t0, 1)}

    @staticmethod
    def header(meta: dict) -> str:
        flags = ", ".join(meta["flags"]) or "none of " + ", ".join(_FLAGS)
        return (f"Command: `{meta['command']}` on commit `{meta['commit']}`, {meta['date']}; {meta['cpu']} "
                f"({meta['cores']} cores; flags: {flags}). Load average (1 min) {meta['load_1min_start']} at the start, "
                f"{meta['load_1min_end']} at the end; the run took {meta['wall_s']} s.")


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> dict:
    """A ratio of two modes measured in paired runs, both ways: the median of the per-run ratios (robust to a slow
    phase of the machine that hits both modes of one run) and the ratio of the medians (robust to one mode's
    outliers). When they disagree, the figure is noise-bound and the report says both."""
    if len(num) != len(den) or not num:
        raise ValueError("ratio_stats needs paired, non-empty runs")
    per_run = [a / b for a, b in zip(num, den)]
    return {"median_of_ratios": round(statistics.median(per_run), 3),
            "ratio_of_medians": round(statistics.median(num) / statistics.median(den), 3),
            "min": round(min(per_run), 3), "max": round(max(per_run), 3), "runs": len(per_run)}


def ratio_text(r: dict) -> str:
    return (f"{r['median_of_ratios']:.3f} (median of {r['runs']} per-run ratios, range {r['min']:.3f}-{r['max']:.3f}; "
            f"ratio of medians {r['ratio_of_medians']:.3f})")
