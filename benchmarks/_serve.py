"""Shared by the benchmark scripts: start `arbiter serve` on a free loopback port and wait for /health 200; the
resident memory of a server process and its children."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from arbiter.testing.fakes import process_rss  # noqa: F401  (re-exported: the benchmarks' RSS probe)

ROOT = Path(__file__).resolve().parents[1]


def start_server(settings: dict[str, str], log_path: Path, *, python: str = sys.executable,
                 timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    """``arbiter serve`` with the caller's ARBITER_* variables dropped and ``settings`` set; returns (process, url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}
    env.update(settings)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([python, "-m", "arbiter.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"arbiter serve exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"arbiter serve did not become healthy within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
