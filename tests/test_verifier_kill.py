"""``arbiter train verifier`` killed with SIGKILL in each phase (sampling, training the variants, writing the head):
``--resume`` continues to a complete run, and at no point is a half-written head loadable. A head directory the
server's watcher would load (a non-hidden directory holding a head config, ``arbiter.heads.registry``) always
loads whole; a killed write leaves only a hidden temporary (``arbiter.fsutil.atomic_dir``), which the watcher
skips. SECURITY.md, "Faults"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _argv(tmp: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "arbiter.cli", "train", "verifier", *(["--resume"] if resume else []),
            "data=[sst2]", "limit=12", "n=4", "max_tokens=8", "layers=[-1]", "batch_prompts=2", "epochs=20",
            "patience=20", "sweep=[{pooler: identity}, {pooler: affine_tanh, lr: 1.0e-4}]", "dev_fraction=0.3",
            "test_fraction=0.3", f"cache_dir={tmp / 'samples'}", f"out={tmp / 'run'}", f"head_dir={tmp / 'heads' / 'v'}",
            "progress=false"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ARBITER_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _loadable_heads_are_whole(root: Path, fingerprint) -> list[str]:
    """What the server's watcher would load under ``root`` (registry rules), each loaded in full."""
    from arbiter.heads import load_head

    seen = []
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir() or not (entry / "head_config.json").exists():
                continue
            load_head(entry, expected_backbone=fingerprint)  # raises on a partial head
            seen.append(entry.name)
    return seen


def _kill_when(tmp: Path, resume: bool, ready, what: str, timeout: float = 600.0) -> int:
    """Run the recipe; SIGKILL it as soon as ``ready()`` holds; returns its exit status (0 if it finished first)."""
    proc = subprocess.Popen(_argv(tmp, resume), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=str(Path(__file__).resolve().parents[1]))
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not reached within {timeout} s")
            time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -signal.SIGKILL), f"{what}: exit {proc.returncode}: {err[-2000:]}"
    return proc.returncode


def test_sigkill_in_every_phase_then_resume_and_never_a_partial_head(tmp_path, backbone):
    samples, sweep, heads = tmp_path / "samples", tmp_path / "run" / "sweep", tmp_path / "heads"

    def shards() -> int:
        return sum(1 for p in samples.rglob("*") if p.is_file()) if samples.exists() else 0

    phases = [
        ("sampling", lambda: shards() >= 2),
        ("training the variants", lambda: sweep.exists() and any(p.is_file() for p in sweep.rglob("*"))),
        ("writing the head", lambda: heads.exists() and any(p.name.startswith(".v.tmp-") for p in heads.iterdir())),
    ]
    killed = []  # the head's write takes milliseconds: its kill lands in it when the poll sees the temporary in time
    for i, (what, ready) in enumerate(phases):
        rc = _kill_when(tmp_path, i > 0, ready, what)
        killed.append((what, rc))
        assert _loadable_heads_are_whole(heads, backbone.fingerprint) in ([], ["v"]), what
    assert killed[0][1] == -signal.SIGKILL and killed[1][1] == -signal.SIGKILL, killed  # the slow phases are hit
    assert _kill_when(tmp_path, True, lambda: False, "the resumed run") == 0
    assert _loadable_heads_are_whole(heads, backbone.fingerprint) == ["v"]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    # Sampling resumed from the cache: the questions sampled before the first kill were not sampled again.
    assert result["sampler"]["questions_cached_before"] > 0
    assert sum(1 for p in heads.iterdir() if not p.name.startswith(".")) == 1
