"""Shared by the benchmark scripts: which code a report was measured on."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The commit the benchmark ran on, marked dirty when tracked arbiter/ or benchmarks/ files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "arbiter", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout
        files = sorted(line[3:] for line in dirty.splitlines() if line.strip())
        return head + (f"` plus uncommitted changes in `{', '.join(files)}" if files else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
