"""The in-process live-server harness: ``served()`` runs the real app under uvicorn on 127.0.0.1 with a fake engine
(``arbiter.testing.fakes``) or a real one, for every test of the HTTP surface (rerank, bad input and auth, overload and
faults, adapters) and the hardening benchmarks. Tests of the process itself (the real CLI, its settings from the
environment, exit codes) start ``arbiter serve`` (``fakes.ArbiterProcess``). Also a launcher run as a subprocess:

    python -m arbiter.testing.served --mode die|slow --port PORT [--delay-s S] [--default-host]

The launcher exists so that process-level behaviour (the exit code after the engine worker dies, SIGTERM
draining in-flight requests) is tested through the real ``arbiter serve`` code path (``arbiter.cli.main``)
with a fake engine substituted for ``arbiter.service.engine.load_engine``. No fault injection lives in
production code: the faults are in the fake engines used here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from arbiter.generation.base import Engine
from arbiter.heads import HeadRegistry
from arbiter.testing.fakes import FAKE_FINGERPRINT, LOOPBACK, FakeEngine, ServerThread, save_random_head

MODEL = "fake-backbone"
ERROR_KEYS = {"message", "type", "param", "code"}


def assert_error(r, status: int, *, type_: str | None = None, code: str | None = None, param: str | None = None,
                 in_message: str | None = None) -> dict:
    """``r`` (an httpx response) is ``status`` with exactly OpenAI's error shape; returns the error object."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert "Traceback" not in err["message"] and 'File "' not in err["message"], err
    if type_ is not None:
        assert err["type"] == type_, err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    if in_message is not None:
        assert in_message.lower() in err["message"].lower(), err
    return err


def wait_until(pred, timeout: float = 10.0, what: str = "condition", every_s: float = 0.01):
    """Poll ``pred`` until it returns something true (returned), or fail naming ``what`` after ``timeout`` s.
    THE waiting helper of the tests."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)


def heads_dir(root: str | os.PathLike, *names: str) -> HeadRegistry:
    """Real head files (fake backbone) under ``root/<name>``, each seeded by its position; loaded into a registry."""
    for k, name in enumerate(names):
        save_random_head(FAKE_FINGERPRINT, Path(root) / name, name=name, seed=k, scale=20.0)
    reg = HeadRegistry(root, FAKE_FINGERPRINT)
    loaded, errors = reg.load_all()
    assert not errors and sorted(loaded) == sorted(names), (loaded, errors)
    return reg


@contextlib.contextmanager
def served(engine: Engine | None = None, heads: HeadRegistry | None = None, *, start_timeout_s: float = 30.0,
           **settings) -> Iterator[ServerThread]:
    """The real app on 127.0.0.1 with ``engine`` (default a fake engine: no model; a real ``HFEngine`` works too)
    and ``heads`` (default: none), ``settings`` as ``Settings`` fields."""
    from arbiter.service.app import create_app
    from arbiter.service.settings import Settings

    engine = engine or FakeEngine()
    heads = heads if heads is not None else HeadRegistry(None, engine.fingerprint)
    app = create_app(Settings(**settings), engine=engine, heads=heads, exit_on_engine_death=False)
    with ServerThread(app, start_timeout_s=start_timeout_s) as srv:
        try:
            yield srv
        finally:
            gate = getattr(engine, "gate", None)
            if gate is not None:
                gate.set()  # never leave a fake engine's worker blocked behind a failed assertion


# --- subprocess launcher ---------------------------------------------------------------------------------


class SlowEngine(FakeEngine):
    """Every generate call takes ``delay_s`` (wall clock), like a long generation."""

    def __init__(self, delay_s: float, **kw):
        super().__init__(echo=True, **kw)
        self.delay_s = delay_s

    def generate(self, jobs, *, admit=None, deliver=None):
        time.sleep(self.delay_s)
        return super().generate(jobs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="`arbiter serve` with a fake engine (tests only)")
    p.add_argument("--mode", choices=["die", "slow"], required=True,
                   help="die: the engine worker thread dies on the first generation; slow: generations take --delay-s")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-s", type=float, default=2.0)
    p.add_argument("--default-host", action="store_true", help="pass no --host: the CLI's default bind")
    args = p.parse_args(argv)

    import arbiter.service.engine as engine_mod
    from arbiter import cli

    engine = FakeEngine(die=True) if args.mode == "die" else SlowEngine(args.delay_s)
    engine_mod.load_engine = lambda settings: engine  # the one substitution: no model load
    os.environ.setdefault("ARBITER_LOG_LEVEL", "warning")
    return cli.main(["serve", *([] if args.default_host else ["--host", LOOPBACK]), "--port", str(args.port)])


if __name__ == "__main__":
    sys.exit(main())
