"""Hardening under load and faults: overload gives 429 with Retry-After and nothing else fails; the per-request
deadline gives a 504 instead of a hang; heads swapped or unloaded during traffic fail no request; a client
that disconnects frees the real engine's batch slot; a dead engine worker makes ``arbiter serve`` exit
non-zero; SIGTERM drains in-flight requests.

The scale version of the overload test is ``benchmarks/overload.py`` (64 clients, real model). Every loop
here is bounded in count and time, and everything binds to 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from arbiter.heads import HeadRegistry
from arbiter.testing.fakes import FAKE_FINGERPRINT, LOOPBACK, FakeEngine, ServerThread, free_port, save_random_head
from arbiter.testing.served import MODEL, SlowEngine, assert_error, heads_dir, served, wait_until

TESTS = Path(__file__).resolve().parent
CHAT = "/v1/chat/completions"


def ask(client: httpx.Client, url: str, text: str, **kw) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 64, **kw}
    return client.post(url + CHAT, json=body)


# --- 5. overload ------------------------------------------------------------------------------------------


def test_overload_gives_429_with_retry_after_and_nothing_else_fails():
    clients, per_client = 16, 4
    eng = SlowEngine(0.05)  # each batch takes 50 ms: 16 concurrent clients overrun a queue of 4
    results: list[tuple[str, int, str | None, dict | None]] = []
    lock = threading.Lock()
    with served(eng, max_queue=4, max_batch_rows=4, request_timeout_s=30) as srv:

        def client_loop(k: int) -> None:
            with httpx.Client(timeout=30) as c:
                for i in range(per_client):
                    text = f"c{k}-r{i}"
                    r = ask(c, srv.url, text)
                    body = r.json()
                    with lock:
                        results.append((text, r.status_code, r.headers.get("retry-after"), body))

        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(clients) as pool:
            list(pool.map(client_loop, range(clients)))
        elapsed = time.monotonic() - t0
        assert len(results) == clients * per_client  # every request got an answer (none hung)
        ok = [r for r in results if r[1] == 200]
        rejected = [r for r in results if r[1] == 429]
        other = [r for r in results if r[1] not in (200, 429)]
        assert other == [], other[:3]
        assert ok and rejected, (len(ok), len(rejected))  # the queue really overflowed, and work still got done
        for text, _, _, body in ok:  # every accepted request completed with its own answer
            assert body["choices"][0]["message"]["content"] == f"{text}#0"
        for _, _, retry_after, body in rejected:
            assert retry_after is not None and int(retry_after) >= 1
            assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
        wait_until(lambda: srv.state.worker.depth() == 0 and not srv.state.worker.busy, what="an idle worker")
        h = httpx.get(srv.url + "/health").json()
        assert h["status"] == "ok" and h["queue_depth"] == 0
        metrics = httpx.get(srv.url + "/metrics").text
        assert f'arbiter_rejected_total{{reason="queue_full"}} {float(len(rejected))}' in metrics
        assert elapsed < 45


def test_request_deadline_is_a_504_not_a_hang_and_the_server_recovers():
    eng = SlowEngine(3.0)
    with served(eng, request_timeout_s=0.5) as srv, httpx.Client(timeout=20) as c:
        t0 = time.monotonic()
        r = ask(c, srv.url, "slow")
        assert time.monotonic() - t0 < 2.5  # the deadline (0.5 s) plus one poll, not the engine's 3 s
        assert_error(r, 504, type_="timeout_error", code="timeout", in_message="0.5 s")
        # A streamed request past the deadline ends with an error event, then [DONE]: no hang either.
        t0 = time.monotonic()
        with c.stream("POST", srv.url + CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "s"}],
                                                    "max_tokens": 8, "stream": True}) as resp:
            assert resp.status_code == 200
            lines = [l for l in resp.iter_lines() if l.startswith("data: ")]
        assert time.monotonic() - t0 < 2.5
        assert lines[-1] == "data: [DONE]" and '"timeout_error"' in lines[-2], lines
        eng.delay_s = 0.0
        wait_until(lambda: not srv.state.worker.busy and srv.state.worker.depth() == 0, timeout=15, what="idle")
        r = ask(c, srv.url, "fast now")
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fast now#0"


# --- 6. heads swapped / unloaded under traffic ------------------------------------------------------------


def test_swapping_a_head_under_traffic_fails_no_request(tmp_path):
    reg = heads_dir(tmp_path, "h1")
    save_random_head(FAKE_FINGERPRINT, tmp_path / "h1_v2", name="h1", seed=7, scale=20.0)
    cands = ["alpha", "bravo", "charlie"]
    eng = SlowEngine(0.01)
    with served(eng, reg, heads_dir=str(tmp_path), admin_key="adm", max_queue=256) as srv, \
            httpx.Client(timeout=30) as c:
        adm = {"Authorization": "Bearer adm"}
        score_body = {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "candidates": cands, "heads": ["h1"]}

        def rewards() -> tuple[float, ...]:
            r = c.post(srv.url + "/v1/score", json=score_body)
            assert r.status_code == 200, r.text
            return tuple(d["rewards"]["h1"] for d in r.json()["data"])

        v1 = rewards()
        assert c.put(srv.url + "/v1/admin/heads/h1", json={"path": "h1_v2"}, headers=adm).status_code == 200
        v2 = rewards()
        assert v1 != v2
        assert c.put(srv.url + "/v1/admin/heads/h1", json={"path": "h1"}, headers=adm).status_code == 200

        stop = threading.Event()
        seen: list[tuple[str, int, object]] = []
        lock = threading.Lock()

        def traffic(k: int) -> None:
            with httpx.Client(timeout=30) as tc:
                for i in range(15):
                    if i % 2:
                        r = tc.post(srv.url + "/v1/score", json=score_body)
                        got = tuple(d["rewards"]["h1"] for d in r.json()["data"]) if r.status_code == 200 else r.text
                        kind = "score"
                    else:
                        r = ask(tc, srv.url, f"t{k}-{i}", rerank={"heads": ["h1"], "candidates": 3})
                        got = r.json().get("rerank", {}).get("heads") if r.status_code == 200 else r.text
                        kind = "rerank"
                    with lock:
                        seen.append((kind, r.status_code, got))

        def swapper() -> int:
            n = 0
            with httpx.Client(timeout=30) as sc:
                while not stop.is_set() and n < 60:
                    path = "h1_v2" if n % 2 == 0 else "h1"
                    r = sc.put(srv.url + "/v1/admin/heads/h1", json={"path": path}, headers=adm)
                    assert r.status_code == 200, r.text
                    n += 1
                    time.sleep(0.005)
            return n

        with cf.ThreadPoolExecutor(6) as pool:
            swaps = pool.submit(swapper)
            list(pool.map(traffic, range(4)))
            stop.set()
            n_swaps = swaps.result(timeout=60)
        failures = [s for s in seen if s[1] != 200]
        assert len(seen) == 60 and failures == [], failures[:3]
        assert n_swaps >= 5, n_swaps  # swaps really interleaved with the traffic
        # Every score came from one whole head version: never a mix of old and new weights. Equal up to float
        # rounding: a score batched with other requests' candidates runs in other matmul shapes (README: "same
        # output only for the same batch composition"); the two versions differ far beyond that rounding.
        def version(s: tuple) -> tuple | None:
            return next((v for v in (v1, v2) if all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(s, v))), None)

        assert max(abs(a - b) for a, b in zip(v1, v2)) > 1e-2
        scores = [got for kind, _, got in seen if kind == "score"]
        assert all(version(s) is not None for s in scores), scores
        assert all(got == ["h1"] for kind, _, got in seen if kind == "rerank")


def test_unloading_a_head_lets_in_flight_requests_finish_and_later_ones_get_404(tmp_path):
    reg = heads_dir(tmp_path, "h1", "h2")
    gate = threading.Event()
    eng = FakeEngine(gate=gate)
    with served(eng, reg, admin_key="adm") as srv, cf.ThreadPoolExecutor(1) as pool, httpx.Client(timeout=30) as c:
        in_flight = pool.submit(ask, httpx.Client(timeout=30), srv.url, "x", rerank={"heads": ["h2"], "candidates": 2})
        wait_until(eng.started.is_set, what="the rerank request to be in the engine")
        r = c.delete(srv.url + "/v1/admin/heads/h2", headers={"Authorization": "Bearer adm"})
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert_error(ask(c, srv.url, "y", rerank={"heads": ["h2"]}), 404, code="head_not_found")
        gate.set()
        done = in_flight.result(timeout=20)
        assert done.status_code == 200, done.text  # accepted before the unload: scored with the head it named
        assert done.json()["rerank"]["heads"] == ["h2"] and len(done.json()["rerank"]["rewards"]) == 1
        assert ask(c, srv.url, "z", rerank={"heads": ["h1"]}).status_code == 200


# --- 6. a disconnect frees the real engine's batch slot ---------------------------------------------------


def test_client_disconnect_stops_a_long_real_generation_early(backbone):
    from arbiter.generation.hf import HFEngine
    from arbiter.service.app import create_app
    from arbiter.service.settings import Settings

    engine = HFEngine(backbone)
    calls: list[tuple[float, float, list]] = []  # (start, end, finish reasons and lengths)
    real_generate = engine.generate

    def recording_generate(jobs, **kw):
        t0 = time.monotonic()
        res = real_generate(jobs, **kw)
        calls.append((t0, time.monotonic(), [(c.finish_reason, len(c.token_ids)) for r in res for c in r.candidates]))
        return res

    engine.generate = recording_generate
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        app = create_app(Settings(max_tokens_limit=400), engine=engine, heads=HeadRegistry(None, backbone.fingerprint),
                         exit_on_engine_death=False)
        with ServerThread(app, start_timeout_s=60) as srv:
            model = app.state.arbiter.model_id
            body = {"model": model, "messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}],
                    "max_tokens": 400, "temperature": 0, "n": 2}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(srv.url + CHAT, json=body, timeout=1.5)  # gives up and closes the connection
            gone = time.monotonic()
            wait_until(lambda: calls, timeout=60, what="the generation to return")
            start, end, rows = calls[0]
            assert [f for f, _ in rows] == ["cancelled", "cancelled"], rows
            assert all(n < 400 for _, n in rows), rows
            assert end - gone < 5, f"the engine ran {end - gone:.1f} s after the client left"
            wait_until(lambda: not srv.state.worker.busy and srv.state.worker.depth() == 0, what="an idle worker")
            r = httpx.post(srv.url + CHAT, json={**body, "max_tokens": 4, "n": 1}, timeout=60)
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        torch.set_num_threads(before)


# --- 6. worker death and graceful shutdown, as a real `arbiter serve` process ----------------------------


class Launched:
    """``python -m arbiter.testing.served`` (``arbiter serve`` with a fake engine) as a subprocess on 127.0.0.1."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log = tmp_path / f"serve-{self.port}.log"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}, "PYTHONUNBUFFERED": "1",
               **(env or {})}
        self._fh = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "arbiter.testing.served", "--port", str(self.port), *args],
                                     stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=str(TESTS.parent))

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready:\n{self.log.read_text()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._fh.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_worker_death_turns_health_503_then_the_process_exits_nonzero(tmp_path):
    # In-process: /health says 503 once the worker is dead (the process would exit right after).
    with served(FakeEngine(die=True)) as srv:
        r = httpx.post(srv.url + CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, timeout=20)
        assert_error(r, 503, type_="service_unavailable", code="engine_dead")
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "unavailable"
        assert srv.app.state.exit_code == 3
    # As a process: `arbiter serve` exits non-zero on its own, so a supervisor restarts it.
    s = Launched(tmp_path, "--mode", "die")
    try:
        s.wait_ready()
        try:
            r = httpx.post(s.url + CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, timeout=20)
            assert_error(r, 503, code="engine_dead")
        except httpx.TransportError:
            pass  # the process may already be closing the connection
        try:
            h = httpx.get(s.url + "/health", timeout=2)
            assert h.status_code == 503, h.text  # if it still answers, it must not claim to be healthy
        except httpx.TransportError:
            pass  # already stopped listening
        code = s.proc.wait(timeout=45)
        assert code == 3, f"exit code {code}:\n{s.log.read_text()[-3000:]}"
    finally:
        s.close()


def test_sigterm_drains_the_in_flight_request_then_exits(tmp_path):
    s = Launched(tmp_path, "--mode", "slow", "--delay-s", "3")
    try:
        s.wait_ready()
        with cf.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(ask, httpx.Client(timeout=30), s.url, "in flight")
            time.sleep(1.0)  # the request is inside the 3 s generation
            assert not fut.done()
            t_term = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            r = fut.result(timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "in flight#0"
        code = s.proc.wait(timeout=30)
        # A drained stop is a clean exit: status 0, not "terminated by SIGTERM".
        assert code == 0, f"exit code {code}:\n{s.log.read_text()[-3000:]}"
        assert "Traceback" not in s.log.read_text()
        assert time.monotonic() - t_term >= 1.0  # it waited for the request instead of dropping it
    finally:
        s.close()


# --- tokenizing a huge prompt must not stall the event loop ----------------------------------------------


def test_a_huge_prompt_does_not_stall_other_requests(backbone):
    # The real tokenizer (which releases the GIL) on a ~1.6 MB prompt takes seconds on this CPU. Done on the
    # event loop, every other request (health probes included) would wait that long.
    eng = FakeEngine(context_length=backbone.context_length)
    eng.tokenizer = backbone.tokenizer
    big = {"model": MODEL, "messages": [{"role": "user", "content": "hello world " * 140_000}], "max_tokens": 4}
    with served(eng, max_body_bytes=4 << 20) as srv, cf.ThreadPoolExecutor(1) as pool, httpx.Client(timeout=30) as c:
        assert c.get(srv.url + "/health").status_code == 200
        t0 = time.monotonic()
        fut = pool.submit(httpx.post, srv.url + CHAT, json=big, timeout=120)
        lags = []
        while not fut.done() and time.monotonic() - t0 < 60:
            t1 = time.monotonic()
            assert c.get(srv.url + "/health").status_code == 200
            lags.append(time.monotonic() - t1)
            time.sleep(0.05)
        r = fut.result(timeout=60)
        took = time.monotonic() - t0
    assert_error(r, 400, code="context_length_exceeded")
    assert took > 0.5 and len(lags) >= 3, (took, lags)  # the probes really overlapped the tokenization
    # Before the fix /health waited for the whole tokenization (3.5 s of a 3.7 s request on a loaded 2-core box).
    assert max(lags) < min(1.0, took / 3), f"/health waited {max(lags):.2f} s while a {took:.1f} s request was tokenized"


class PollingScorer(FakeEngine):
    """A feature pass that runs until its ``cancelled`` poll says stop (or 20 s), like a long real pass."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.abandoned = threading.Event()
        self.finished = threading.Event()

    def features(self, prompt_ids, answer_ids, layers, *, cancelled=None, adapter=None):
        from arbiter.generation.base import Abandoned

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if cancelled is not None and cancelled():
                self.abandoned.set()
                raise Abandoned("nobody waits")
            time.sleep(0.01)
        self.finished.set()
        return super().features(prompt_ids, answer_ids, layers)


def test_a_score_pass_past_its_deadline_is_abandoned_by_the_worker(tmp_path):
    """The client gets its 504 and the worker stops computing (it does not finish the pass for nobody)."""
    eng = PollingScorer()
    reg = heads_dir(tmp_path, "h1")
    with served(eng, reg, request_timeout_s=0.5) as srv, httpx.Client(timeout=30) as c:
        r = c.post(srv.url + "/v1/score", json={"model": MODEL, "messages": [{"role": "user", "content": "q"}],
                                                "candidates": ["a", "b"]})
        assert_error(r, 504, type_="timeout_error", code="timeout")
        assert eng.abandoned.wait(10) and not eng.finished.is_set()
        wait_until(lambda: not srv.state.worker.busy, timeout=10, what="idle")
        assert ask(c, srv.url, "next").status_code == 200  # the worker is free for the next request


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim, every arena), so that a baseline RSS counts
    live memory only: without it the blocks an earlier run freed stay resident, lower the next run's measured rise
    and turn a comparison between runs into one of heap histories (a CI run saw three unbudgeted requests rise less
    than three budgeted ones measured before them)."""
    import gc

    from arbiter.service.worker import release_free_memory

    gc.collect()
    release_free_memory()


class PeakRss(threading.Thread):
    """This process's peak RSS (the server runs in it), sampled every 5 ms."""

    def __init__(self):
        import psutil

        super().__init__(daemon=True)
        self.proc = psutil.Process()
        trim_heap()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> "PeakRss":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.halt.set()
        self.join(5)

    @property
    def delta(self) -> int:
        return self.peak - self.base


MT = 32  # tokens per candidate in the KV-budget test: long enough that unbudgeted requests overlap


def test_the_token_budget_bounds_the_kv_memory_of_long_prompts(backbone):
    """Long prompts with 16 candidates each: one request needs its prompt's KV cache copied to 16 rows (~1.4 GB
    in float32 here). Three of them at once under a budget that fits one run one after the other, and the peak RSS
    stays within twice one request's (the bound stated here: the heap may keep one batch's freed blocks while the
    next allocates); without a budget the three share a batch and exceed that bound."""
    import gc

    from arbiter.generation.hf import HFEngine

    eng = HFEngine(backbone)
    words = " ".join(f"item{k}" for k in range(500))  # ~1900 tokens
    bodies = [{"model": backbone.name, "messages": [{"role": "user", "content": f"{tag}: {words}"}], "n": 16,
               "max_tokens": MT, "temperature": 1.0} for tag in ("first", "second", "third")]
    span = len(eng.encode_prompt(bodies[0]["messages"])) + MT + 1  # the worker's span: prompt + max_tokens + 1
    kv = eng.kv_bytes_per_token() * 16 * span

    def peak(budget: int | None, parallel: int) -> tuple[int, bool]:
        """(the RSS rise, whether two requests' rows were ever in one batch: a batch of more than 16 rows, or rows
        admitted into a running batch; the worker's own metrics)."""
        gc.collect()
        with served(eng, start_timeout_s=60, max_batch_tokens=budget, max_tokens_limit=MT, max_batch_rows=64, max_n=16) as srv, \
                cf.ThreadPoolExecutor(parallel) as pool:
            httpx.post(srv.url + CHAT, json={**bodies[0], "n": 1}, timeout=300)  # warm-up
            gc.collect()
            with PeakRss() as rss:
                replies = list(pool.map(lambda b: httpx.post(srv.url + CHAT, json=b, timeout=600), bodies[:parallel]))
            for r in replies:
                assert r.status_code == 200 and len(r.json()["choices"]) == 16, r.text[:300]
            m = srv.state.metrics
            samples = {(x.name, x.labels.get("le")): x.value for x in next(iter(m.batch_rows.collect())).samples}
            started = samples[("arbiter_batch_rows_count", None)]
            at_most_16 = max(v for (name, le), v in samples.items() if name.endswith("_bucket") and le is not None
                             and float(le) <= 16)
            admitted = next(iter(m.admitted_rows.collect())).samples[0].value
            return rss.delta, admitted > 0 or at_most_16 < started

    one, _ = peak(None, 1)
    assert one > 0.5 * kv, (one, kv)  # the probe sees the cache: one request's peak is of the KV cache's size
    bounded, bounded_shared = peak(16 * span + 10, 3)  # fits one request, not two
    unbounded, unbounded_shared = peak(None, 3)
    # The mechanism: the budget kept the three requests' rows apart; without it they shared a batch (max_tokens MT
    # keeps each request decoding long enough for the others to join: a CI run with 4 tokens saw them run one after
    # another unbudgeted too, and the control below then compared three equal peaks).
    assert not bounded_shared and unbounded_shared
    mib = 2**20
    # Within about twice one request's: the heap's freed blocks and the page cache move a peak by a few percent
    # (a CI run measured 2.0006x, 3117 / 1558 MiB, under this bound at 2.0), so the margin is 2.25x; the control
    # below shows the budget is what keeps it there.
    assert bounded <= 2.25 * one, f"three requests under a one-request budget peaked at {bounded / mib:.0f} MiB, one alone at {one / mib:.0f} MiB"
    # The control: without the budget the same traffic breaks the bound above (the three share a batch). Not a
    # ratio to 3x one: one request's peak includes transients (prefill activations, the heap) that three in one batch
    # do not triple; a CI run measured 2.47x (6467 / 2623 MiB). Each baseline is taken after trim_heap, so a run does
    # not start on the pages the run before it freed (a CI run without it: unbounded 2079 < bounded 2590 MiB);
    # with it, on a 2-core EPYC: one 1553-1634, bounded 2828-2906, unbounded 6667-6884 MiB.
    assert unbounded > 2.0 * one and unbounded > bounded, (
        f"without a budget three requests peaked at {unbounded / mib:.0f} MiB (bounded {bounded / mib:.0f}), one alone at {one / mib:.0f} MiB")


def test_serve_binds_loopback_by_default_logs_admin_actions_and_never_a_key(tmp_path):
    """SECURITY.md "Exposure" and "What is logged", through the real `arbiter serve` (fake engine)."""
    import psutil

    heads = tmp_path / "heads"
    save_random_head(FAKE_FINGERPRINT, heads / "h1", name="h1", seed=0)
    save_random_head(FAKE_FINGERPRINT, heads / "h1_v2", name="h1", seed=1)
    api, admin, wrong = "api-3f9c1b7e", "adm-8d2e4a60", "guess-5b7c9d1f"
    s = Launched(tmp_path, "--mode", "slow", "--delay-s", "0", "--default-host",
                 env={"ARBITER_API_KEY": api, "ARBITER_ADMIN_KEY": admin, "ARBITER_HEADS_DIR": str(heads),
                      "ARBITER_LOG_LEVEL": "info", "ARBITER_LOG_PROMPTS": "false"})
    try:
        s.wait_ready()
        listening = [c.laddr for c in psutil.Process(s.proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
        body = {"model": MODEL, "messages": [{"role": "user", "content": "secret prompt text"}], "max_tokens": 4}
        with httpx.Client(timeout=30) as c:
            auth = {"Authorization": f"Bearer {api}"}
            adm = {"Authorization": f"Bearer {admin}"}
            assert c.post(s.url + CHAT, json=body, headers=auth).status_code == 200
            assert c.post(s.url + CHAT, json=body, headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
            assert c.put(s.url + "/v1/admin/heads/h1", json={"path": "h1_v2"}, headers=auth).status_code == 403
            assert c.put(s.url + "/v1/admin/heads/h1", json={"path": "h1_v2"}, headers=adm).status_code == 200
            assert c.delete(s.url + "/v1/admin/heads/h1", headers=adm).status_code == 200
            assert c.post(s.url + "/v1/admin/heads", json={"path": "h1"}, headers=adm).status_code == 200
            assert c.post(s.url + "/v1/admin/adapters", json={"name": "x", "path": "a"}, headers=auth).status_code == 403
            assert c.delete(s.url + "/v1/admin/adapters/x", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(30)
    finally:
        s.close()
    log = s.log.read_text()
    for secret in (api, admin, wrong, "secret prompt text"):
        assert secret not in log, secret
    for line in ("swapped head h1 to h1_v2", "unloaded head h1", "loaded head h1 from h1"):
        assert line in log, (line, log[-3000:])
