"""Reranking, batching, back-pressure and cancellation through the real app and a live uvicorn server, with a
scripted fake engine (``arbiter.testing.fakes``) so every reward is known exactly.

Script (layer -1 features): alpha (0.1, 0, ..), bravo (0.5, 0.2, ..), charlie (0.3, 0.9, ..), delta (0.5, -0.4, ..).
Head A reads feature[0] -> rewards [0.1, 0.5, 0.3, 0.5] (a tie between bravo and delta); head B reads
feature[1] -> [0, 0.2, 0.9, -0.4]. No model is loaded: the whole file runs in a few seconds.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import threading
import time

import httpx
import openai
import pytest

from arbiter.heads import HeadRegistry
from arbiter.service.app import create_app
from arbiter.service.settings import Settings
from arbiter.testing import served as served_fake
from arbiter.testing.fakes import FAKE_FINGERPRINT, FakeEngine, ServerThread, linear_head, registry_with
from arbiter.testing.served import wait_until

MODEL = "fake-backbone"
USER = [{"role": "user", "content": "pick one"}]
A_REWARDS = [0.1, 0.5, 0.3, 0.5]
B_REWARDS = [0.0, 0.2, 0.9, -0.4]
TEXTS = ["alpha", "bravo", "charlie", "delta"]


def heads_ab(**kw) -> HeadRegistry:
    return registry_with(linear_head("A", [1, 0, 0, 0]), linear_head("B", [0, 1, 0, 0]), **kw)


def served(engine: FakeEngine | None = None, heads: HeadRegistry | None = None, **settings):
    """The shared in-process harness (``arbiter.testing.served``) with heads A and B loaded by default."""
    return served_fake.served(engine, heads if heads is not None else heads_ab(), **settings)


def client(srv: ServerThread, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                         timeout=kw.pop("timeout", 20), **kw)


def rerank_call(c: openai.OpenAI, *, n: int = 1, **rerank):
    return c.chat.completions.create(model=MODEL, messages=USER, n=n, max_tokens=16, extra_body={"rerank": rerank})


# --- exact selection ---------------------------------------------------------------------------------------


def test_exact_argmax_ties_go_to_the_lower_index_and_n_returns_top_n_in_order():
    with served() as srv:
        c = client(srv)
        r = rerank_call(c, candidates=4, heads=["A", "B"], return_candidates=True)
        info = r.rerank
        assert info["heads"] == ["A", "B"] and info["candidates_scored"] == 4
        # bravo and delta tie at 0.5 under A: the lower index wins.
        assert info["chosen"] == [1]
        assert r.choices[0].message.content == "bravo" and r.choices[0].finish_reason == "stop"
        assert info["rewards"] == pytest.approx([0.5])
        # Every candidate carries a reward per head, the known values.
        assert [x["index"] for x in info["candidates"]] == [0, 1, 2, 3]
        assert [x["text"] for x in info["candidates"]] == TEXTS
        assert [x["rewards"]["A"] for x in info["candidates"]] == pytest.approx(A_REWARDS, abs=1e-6)
        assert [x["rewards"]["B"] for x in info["candidates"]] == pytest.approx(B_REWARDS, abs=1e-6)
        assert [x["completion_tokens"] for x in info["candidates"]] == [len(t) for t in TEXTS]
        # usage counts every candidate generated (the work done), not only the returned one.
        assert r.usage.completion_tokens == sum(len(t) for t in TEXTS)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

        # n > 1: the top n, best first, ties in index order.
        for n, want in [(2, [1, 3]), (3, [1, 3, 2]), (4, [1, 3, 2, 0])]:
            r = rerank_call(c, n=n, candidates=4, heads=["A"])
            assert r.rerank["chosen"] == want
            assert [ch.message.content for ch in r.choices] == [TEXTS[i] for i in want]
            assert [ch.index for ch in r.choices] == list(range(n))
            assert r.rerank["rewards"] == pytest.approx([A_REWARDS[i] for i in want], abs=1e-6)
            assert "candidates" not in r.rerank  # only with return_candidates


def test_the_first_head_picks_and_every_head_scores_on_its_own_layer():
    eng = FakeEngine()
    # C reads block 1 (feature = 3 x the layer -1 vector in the fake) with a negative weight: it prefers alpha.
    heads = registry_with(linear_head("A", [1, 0, 0, 0]), linear_head("B", [0, 1, 0, 0]),
                          linear_head("C", [-1, 0, 0, 0], layer=1))
    with served(eng, heads) as srv:
        c = client(srv)
        r = rerank_call(c, candidates=4, heads=["B", "A"], return_candidates=True)
        assert r.rerank["chosen"] == [2] and r.choices[0].message.content == "charlie"
        assert r.rerank["heads"] == ["B", "A"]
        assert [x["rewards"]["A"] for x in r.rerank["candidates"]] == pytest.approx(A_REWARDS, abs=1e-6)

        r = rerank_call(c, candidates=4, heads=["C", "A", "B"], return_candidates=True)
        assert r.rerank["chosen"] == [0] and r.choices[0].message.content == "alpha"
        c_rewards = [x["rewards"]["C"] for x in r.rerank["candidates"]]
        assert c_rewards == pytest.approx([-3 * a for a in A_REWARDS], abs=1e-6)
        assert r.rerank["rewards"] == pytest.approx([-0.3], abs=1e-6)
        # The engine was asked for both layers in one job, and only for what the heads need.
        assert eng.batches[-1][0].feature_layers == (-1, 1)
        assert eng.batches[0][0].feature_layers == (-1,)

        # Fewer candidates than the script: only those are scored.
        r = rerank_call(c, candidates=3, heads=["A"], return_candidates=True)
        assert r.rerank["candidates_scored"] == 3 and r.rerank["chosen"] == [1]


def test_default_head_setting_and_head_shorthand():
    with served(default_head="B") as srv:
        c = client(srv)
        r = rerank_call(c, candidates=4)
        assert r.rerank["heads"] == ["B"] and r.rerank["chosen"] == [2]
        r = rerank_call(c, candidates=4, head="A")
        assert r.rerank["heads"] == ["A"] and r.rerank["chosen"] == [1]
        heads = httpx.get(f"{srv.url}/v1/heads").json()
        assert heads["default"] == "B" and [h["id"] for h in heads["data"]] == ["A", "B"]
    with served() as srv:  # no default configured: the first loaded name in order
        r = rerank_call(client(srv), candidates=2)
        assert r.rerank["heads"] == ["A"]
        # default candidate count is max(default_candidates, n)
    with served(default_candidates=3) as srv:
        r = rerank_call(client(srv), n=1)
        assert r.rerank["candidates_scored"] == 3


def test_score_endpoint_gives_the_known_rewards_and_matches_rerank():
    eng = FakeEngine()
    with served(eng) as srv:
        cands = ["alpha", "charlie", "zulu", "charlie"]
        body = httpx.post(f"{srv.url}/v1/score", json={"model": MODEL, "messages": USER, "candidates": cands,
                                                        "heads": ["B", "A"]}).json()
        assert body["object"] == "score.list" and body["heads"] == ["B", "A"]
        want_b = [float(eng.feature(t)[1]) for t in cands]
        want_a = [float(eng.feature(t)[0]) for t in cands]
        assert [d["rewards"]["B"] for d in body["data"]] == pytest.approx(want_b, abs=1e-6)
        assert [d["rewards"]["A"] for d in body["data"]] == pytest.approx(want_a, abs=1e-6)
        assert body["best"] == max(range(4), key=lambda i: (want_b[i], -i))
        # The same text scored twice gets the same reward.
        assert body["data"][1]["rewards"] == body["data"][3]["rewards"]
        # One feature pass for all candidates.
        assert eng.feature_calls == [(4, (-1,))]
        # Score and rerank agree on the same candidate text.
        r = rerank_call(client(srv), candidates=4, heads=["B", "A"], return_candidates=True)
        assert r.rerank["candidates"][2]["rewards"] == pytest.approx(body["data"][1]["rewards"], abs=1e-6)


# --- streaming ---------------------------------------------------------------------------------------------


def _drain(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, chunks


def test_plain_stream_content_and_usage():
    with served(FakeEngine(echo=True)) as srv:
        c = client(srv)
        stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello there"}],
                                           max_tokens=64, stream=True, stream_options={"include_usage": True})
        text, chunks = _drain(stream)
        assert text == "hello there#0"
        assert chunks[0].choices[0].delta.role == "assistant"
        finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len("hello there#0")
        assert all(ch.usage is None for ch in chunks[:-1])


def test_rerank_stream_returns_the_winner_and_its_rerank_info():
    with served() as srv:
        stream = client(srv).chat.completions.create(
            model=MODEL, messages=USER, max_tokens=16, stream=True, stream_options={"include_usage": True},
            extra_body={"rerank": {"candidates": 4, "heads": ["B", "A"], "return_candidates": True}})
        text, chunks = _drain(stream)
        assert text == "charlie"
        final = next(ch for ch in chunks if ch.choices and ch.choices[0].finish_reason)
        info = final.rerank
        assert info["chosen"] == [2] and len(info["candidates"]) == 4
        assert [x["rewards"]["A"] for x in info["candidates"]] == pytest.approx(A_REWARDS, abs=1e-6)
        assert chunks[-1].usage.completion_tokens == sum(len(t) for t in TEXTS)


# --- batching, back-pressure, cancellation -----------------------------------------------------------------


def _ask(url: str, text: str, n: int = 1) -> str:
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], n=n, max_tokens=64)
    return r.choices[0].message.content


def test_concurrent_requests_are_merged_into_shared_batches():
    gate = threading.Event()
    eng = FakeEngine(echo=True, gate=gate)
    with served(eng, max_batch_rows=32) as srv, cf.ThreadPoolExecutor(8) as pool:
        first = pool.submit(_ask, srv.url, "first")
        wait_until(eng.started.is_set, what="the first batch to start")
        # While the worker is busy, six more requests arrive; they must all join the next batch.
        rest = {f"req{k}": pool.submit(_ask, srv.url, f"req{k}") for k in range(6)}
        wait_until(lambda: srv.state.worker.depth() == 6, what="six queued requests")
        gate.set()
        assert first.result(timeout=20) == "first#0"
        for text, fut in rest.items():
            assert fut.result(timeout=20) == f"{text}#0"  # each request got its own rows back
        assert [len(b) for b in eng.batches] == [1, 6]


def test_batches_respect_max_batch_rows():
    gate = threading.Event()
    eng = FakeEngine(echo=True, gate=gate)
    with served(eng, max_batch_rows=5) as srv, cf.ThreadPoolExecutor(8) as pool:
        first = pool.submit(_ask, srv.url, "first", 2)
        wait_until(eng.started.is_set, what="the first batch to start")
        rest = []
        for k in range(5):  # queued in order, 2 rows each
            rest.append(pool.submit(_ask, srv.url, f"r{k}", 2))
            wait_until(lambda: srv.state.worker.depth() == k + 1, what=f"request {k} queued")  # noqa: B023
        gate.set()
        assert first.result(timeout=20) == "first#0"
        assert [f.result(timeout=20) for f in rest] == [f"r{k}#0" for k in range(5)]
        # 2 rows per request, at most 5 rows per batch: 2 requests per batch, FIFO order kept.
        assert [len(b) for b in eng.batches] == [1, 2, 2, 1]
        assert all(sum(j.n for j in b) <= 5 for b in eng.batches)


def test_queue_overflow_gets_429_with_retry_after():
    gate = threading.Event()
    eng = FakeEngine(echo=True, gate=gate)
    with served(eng, max_queue=2) as srv, cf.ThreadPoolExecutor(4) as pool:
        running = pool.submit(_ask, srv.url, "running")
        wait_until(eng.started.is_set, what="the engine to be busy")
        queued = [pool.submit(_ask, srv.url, f"q{k}") for k in range(2)]
        wait_until(lambda: srv.state.worker.depth() == 2, what="a full queue")
        with pytest.raises(openai.RateLimitError) as ei:
            _ask(srv.url, "overflow")
        e = ei.value
        assert e.status_code == 429 and e.response.headers["retry-after"] == "1"
        assert e.body["type"] == "rate_limit_error" and e.body["code"] == "queue_full" and e.body["message"]
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'arbiter_rejected_total{reason="queue_full"} 1.0' in metrics
        gate.set()
        assert running.result(timeout=20) == "running#0"
        assert sorted(f.result(timeout=20) for f in queued) == ["q0#0", "q1#0"]
        # Once drained, new requests are accepted again.
        assert _ask(srv.url, "later") == "later#0"


@contextlib.contextmanager
def server_errors():
    """ERROR records uvicorn logs (e.g. 'Exception in ASGI application' with a traceback) while inside."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _post_and_give_up(url: str, text: str, timeout: float) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 64}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)  # closes the connection


def test_client_disconnect_cancels_the_running_job():
    gate = threading.Event()
    eng = FakeEngine(echo=True, gate=gate)
    with served(eng) as srv, server_errors() as errors:
        _post_and_give_up(srv.url, "abandoned", timeout=0.5)
        # The route polls for the disconnect and sets the job's cancelled flag, which the engine sees.
        assert eng.cancel_seen.wait(10), "the engine never saw the job cancelled"
        assert eng.batches[0][0].cancelled.is_set()
        gate.set()
        wait_until(lambda: srv.state.worker.depth() == 0 and not srv.state.worker.busy, what="an idle worker")
        assert _ask(srv.url, "next") == "next#0"  # the worker carries on
        # A client going away is routine: no error with a traceback in the server log, counted as 499.
        assert not errors, [r.getMessage() for r in errors]
        assert metric_samples(srv.url)[("arbiter_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "499")))] == 1


def test_client_disconnect_drops_queued_work_before_it_runs():
    gate = threading.Event()
    eng = FakeEngine(echo=True, gate=gate)
    with served(eng) as srv, cf.ThreadPoolExecutor(2) as pool, server_errors() as errors:
        running = pool.submit(_ask, srv.url, "running")
        wait_until(eng.started.is_set, what="the engine to be busy")
        _post_and_give_up(srv.url, "queued-and-abandoned", timeout=0.5)
        assert srv.state.worker.depth() == 1
        time.sleep(1.2)  # the route notices the disconnect within its 0.5 s poll
        gate.set()
        assert running.result(timeout=20) == "running#0"
        assert _ask(srv.url, "after") == "after#0"
        ran = [eng.tokenizer.decode(j.prompt_ids) for b in eng.batches for j in b]
        assert not any("queued-and-abandoned" in p for p in ran), "abandoned work reached the engine"
        assert len(eng.batches) == 2
        assert not errors, [r.getMessage() for r in errors]


def test_stream_disconnect_cancels_the_job():
    gate = threading.Event()
    eng = FakeEngine(echo=True, gate=gate)
    with served(eng) as srv, server_errors() as errors:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "stream me please"}], "max_tokens": 64,
                "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=10) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = []
            for line in lines:  # the role chunk, then the first half the fake emits before blocking
                if line.startswith("data: "):
                    got.append(json.loads(line[6:]))
                if len(got) == 2:
                    break
        assert got[1]["choices"][0]["delta"]["content"] == "stream me please#0"[:9]
        # Leaving the block closed the connection mid-stream.
        assert eng.cancel_seen.wait(10), "the engine never saw the streaming job cancelled"
        gate.set()
        wait_until(lambda: not srv.state.worker.busy, what="an idle worker")
        assert not errors, [r.getMessage() for r in errors]


def test_rerank_stream_disconnect_cancels_the_job():
    gate = threading.Event()
    eng = FakeEngine(gate=gate)
    with served(eng) as srv, server_errors() as errors:
        body = {"model": MODEL, "messages": USER, "max_tokens": 16, "stream": True, "rerank": {"candidates": 4}}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=10) as resp:
            assert resp.status_code == 200
            first = next(line for line in resp.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
            # The role chunk goes out before the worker picks the job up; disconnect once the engine runs it (a job
            # cancelled while still queued is dropped without reaching the engine: right, but not this test's path).
            assert eng.started.wait(30), "the engine never started the rerank job"
        assert eng.cancel_seen.wait(30), "the engine never saw the rerank job cancelled"
        gate.set()
        wait_until(lambda: not srv.state.worker.busy, what="an idle worker")
        assert not errors, [r.getMessage() for r in errors]


# --- failures ----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_engine_worker_death_turns_health_503_and_fails_requests_fast():
    eng = FakeEngine(die=True)
    with served(eng, request_timeout_s=60) as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        c = client(srv)
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as ei:
            c.chat.completions.create(model=MODEL, messages=USER, max_tokens=8)
        # The request in flight when the worker died is failed at once, not left to the 60 s deadline.
        assert time.monotonic() - t0 < 10
        assert ei.value.status_code == 503 and ei.value.body["code"] == "engine_dead"
        h = httpx.get(f"{srv.url}/health")
        assert h.status_code == 503 and h.json()["status"] == "unavailable"
        with pytest.raises(openai.InternalServerError) as ei:
            c.chat.completions.create(model=MODEL, messages=USER, max_tokens=8)
        assert ei.value.status_code == 503 and ei.value.body["type"] == "service_unavailable"
        assert srv.app.state.exit_code == 3  # `arbiter serve` exits non-zero so a supervisor restarts it


def test_a_failed_batch_is_a_500_and_the_worker_goes_on():
    eng = FakeEngine(fail=True)
    with served(eng) as srv:
        c = client(srv)
        with pytest.raises(openai.InternalServerError) as ei:
            c.chat.completions.create(model=MODEL, messages=USER, max_tokens=8)
        assert ei.value.status_code == 500 and ei.value.body["code"] == "engine_error"
        assert "Traceback" not in ei.value.body["message"] and "fake engine" not in ei.value.body["message"]
        eng.fail = False
        assert c.chat.completions.create(model=MODEL, messages=USER, max_tokens=8).choices[0].message.content == "alpha"
        assert httpx.get(f"{srv.url}/health").status_code == 200


def test_request_deadline_gives_504_and_cancels_the_job():
    gate = threading.Event()
    eng = FakeEngine(gate=gate)
    with served(eng, request_timeout_s=0.5) as srv:
        with pytest.raises(openai.APIStatusError) as ei:
            client(srv).chat.completions.create(model=MODEL, messages=USER, max_tokens=8)
        assert ei.value.status_code == 504 and ei.value.body["type"] == "timeout_error"
        assert eng.cancel_seen.wait(5)


# --- request errors that need a special app ----------------------------------------------------------------


def test_rerank_and_score_without_any_head_are_400():
    with served(heads=HeadRegistry(None, FAKE_FINGERPRINT)) as srv:
        with pytest.raises(openai.BadRequestError) as ei:
            rerank_call(client(srv), candidates=2)
        e = ei.value
        assert e.status_code == 400 and e.body["code"] == "no_head_loaded" and e.body["param"] == "rerank.heads"
        assert "head" in e.body["message"] and e.body["type"] == "invalid_request_error"
        r = httpx.post(f"{srv.url}/v1/score", json={"model": MODEL, "messages": USER, "candidates": ["x"]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_head_loaded"
        # Plain completions still work without heads.
        assert client(srv).chat.completions.create(model=MODEL, messages=USER, max_tokens=8).choices[0].message.content


def test_rerank_option_errors():
    with served(max_candidates=4) as srv:
        c = client(srv)
        cases = [
            (dict(n=3, candidates=2), openai.BadRequestError, "rerank.candidates"),
            (dict(candidates=5), openai.BadRequestError, "rerank.candidates"),
            (dict(heads=["A", "A"]), openai.BadRequestError, "rerank.heads"),
            (dict(heads=["nope"]), openai.NotFoundError, "rerank.heads"),
            (dict(heads=[]), openai.BadRequestError, "rerank.heads"),
            (dict(bogus=1), openai.BadRequestError, "rerank.bogus"),
        ]
        for opts, exc, param in cases:
            n = opts.pop("n", 1)
            with pytest.raises(exc) as ei:
                rerank_call(c, n=n, **opts)
            assert ei.value.body["param"] == param, (opts, ei.value.body)
            assert ei.value.body["message"]
        with pytest.raises(openai.NotFoundError) as ei:
            rerank_call(c, heads=["A", "missing"])
        assert ei.value.body["code"] == "head_not_found" and "missing" in ei.value.body["message"]


def test_auth_keys_and_disabled_admin():
    with served() as srv:  # no admin key configured: the admin API does not exist
        r = httpx.post(f"{srv.url}/v1/admin/heads", json={"path": "x"}, headers={"Authorization": "Bearer any"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "admin_disabled"
        assert httpx.delete(f"{srv.url}/v1/admin/heads/A").status_code == 404
    with served(api_key="user-key", admin_key="admin-key") as srv:
        with pytest.raises(openai.AuthenticationError) as ei:
            client(srv, api_key="wrong").chat.completions.create(model=MODEL, messages=USER, max_tokens=4)
        assert ei.value.status_code == 401 and ei.value.body["code"] == "invalid_api_key"
        r = httpx.get(f"{srv.url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        assert client(srv, api_key="user-key").models.list().data[0].id == MODEL
        assert client(srv, api_key="admin-key").models.list().data[0].id == MODEL
        # The user key may not manage heads; a wrong key is 401.
        r = httpx.delete(f"{srv.url}/v1/admin/heads/A", headers={"Authorization": "Bearer user-key"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        r = httpx.delete(f"{srv.url}/v1/admin/heads/A", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        # /health and /metrics stay open for probes.
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert httpx.get(f"{srv.url}/metrics").status_code == 200


def test_body_over_the_limit_is_413():
    with served(max_body_bytes=2048) as srv:
        big = [{"role": "user", "content": "x" * 4096}]
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": MODEL, "messages": big})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


# --- metrics ---------------------------------------------------------------------------------------------


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_by_route_and_status_and_scored_candidates():
    with served() as srv:
        c = client(srv)
        rerank_call(c, candidates=4, heads=["A", "B"])
        c.chat.completions.create(model=MODEL, messages=USER, max_tokens=8)
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=MODEL, messages=USER, n=99)
        httpx.post(f"{srv.url}/v1/score", json={"model": MODEL, "messages": USER, "candidates": ["a", "b", "c"]})
        httpx.get(f"{srv.url}/no/such/route")
        m = metric_samples(srv.url)
        chat = "/v1/chat/completions"
        assert m[("arbiter_requests_total", (("endpoint", chat), ("status", "200")))] == 2
        assert m[("arbiter_requests_total", (("endpoint", chat), ("status", "400")))] == 1
        assert m[("arbiter_requests_total", (("endpoint", "/v1/score"), ("status", "200")))] == 1
        assert m[("arbiter_requests_total", (("endpoint", "unmatched"), ("status", "404")))] == 1
        assert m[("arbiter_request_latency_seconds_count", (("endpoint", chat),))] == 3
        assert m[("arbiter_candidates_scored_total", ())] == 4 + 3
        assert m[("arbiter_completion_tokens_total", ())] == sum(len(t) for t in TEXTS) + len("alpha")
        assert m[("arbiter_heads_loaded", ())] == 2
        assert m[("arbiter_batch_rows_count", ())] == 2  # two generation batches


def test_admin_refuses_head_names_it_could_not_address_later(tmp_path):
    from arbiter.testing.fakes import save_random_head

    save_random_head(FAKE_FINGERPRINT, tmp_path / "h", name="h")
    app_heads = HeadRegistry(tmp_path, FAKE_FINGERPRINT)
    auth = {"Authorization": "Bearer k"}
    with served(heads=app_heads, heads_dir=str(tmp_path), admin_key="k") as srv:
        # A name with '/' (or '..', or spaces) could be loaded but never swapped or deleted by URL.
        for bad in ["a/b", "..", "has space", "-x"]:
            r = httpx.post(f"{srv.url}/v1/admin/heads", json={"path": "h", "name": bad}, headers=auth)
            assert r.status_code == 400 and r.json()["error"]["param"] == "name", (bad, r.text)
        assert httpx.get(f"{srv.url}/v1/heads").json()["data"] == []
        r = httpx.post(f"{srv.url}/v1/admin/heads", json={"path": "h", "name": "ok.name-1"}, headers=auth)
        assert r.status_code == 200 and r.json()["id"] == "ok.name-1"
        assert rerank_call(client(srv), candidates=2, head="ok.name-1").rerank["heads"] == ["ok.name-1"]
        assert httpx.delete(f"{srv.url}/v1/admin/heads/ok.name-1", headers=auth).status_code == 200


def test_a_model_that_fails_to_load_gives_503_with_the_reason(tmp_path):
    # No injected engine: the real background load path, pointed at a model that does not exist.
    app = create_app(Settings(model=str(tmp_path / "no-such-model"), device="cpu"), exit_on_engine_death=False)
    with ServerThread(app) as srv:
        wait_until(lambda: srv.state.load_error is not None, timeout=60, what="the load to fail")
        h = httpx.get(f"{srv.url}/health")
        assert h.status_code == 503 and h.json()["status"] == "unavailable" and "no-such-model" in h.json()["error"]
        with pytest.raises(openai.InternalServerError) as ei:
            client(srv).chat.completions.create(model=MODEL, messages=USER, max_tokens=4)
        assert ei.value.status_code == 503 and ei.value.body["code"] == "model_load_failed"
        assert "no-such-model" in ei.value.body["message"]


def test_an_engine_failure_inside_a_stream_arrives_as_an_error_event():
    eng = FakeEngine(fail=True)
    with served(eng) as srv:
        body = {"model": MODEL, "messages": USER, "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=10) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert resp.status_code == 200 and events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err == {"message": "the engine failed while serving this request", "type": "server_error",
                       "param": None, "code": "engine_error"}
        # The official client turns that event into an exception rather than a silently short answer.
        with pytest.raises(openai.APIError, match="engine failed"):
            list(client(srv).chat.completions.create(model=MODEL, messages=USER, max_tokens=8, stream=True))


class RefusingEngine(FakeEngine):
    """Refuses, like the vLLM engine's per-job validation, every job whose prompt mentions 'bad'."""

    def generate(self, jobs):
        from arbiter.generation.base import JobError

        out = super().generate(jobs)
        return [JobError("vLLM refused the sampling parameters: test") if "bad" in self.tokenizer.decode(j.prompt_ids)
                else r for j, r in zip(jobs, out)]


def test_a_job_the_engine_refuses_is_a_400_and_its_batch_mates_are_served():
    gate = threading.Event()
    eng = RefusingEngine(echo=True, gate=gate)
    with served(eng, max_batch_rows=32) as srv, cf.ThreadPoolExecutor(4) as pool:
        first = pool.submit(_ask, srv.url, "first")
        wait_until(eng.started.is_set, what="the first batch to start")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "bad one"}], "max_tokens": 8}
        bad = pool.submit(httpx.post, f"{srv.url}/v1/chat/completions", json=body, timeout=30)
        good = pool.submit(_ask, srv.url, "good one")
        wait_until(lambda: srv.state.worker.depth() == 2, what="two queued requests")
        gate.set()
        assert first.result(timeout=20) == "first#0"
        assert good.result(timeout=20) == "good one#0"
        resp = bad.result(timeout=20)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_sampling_parameters"
        assert [len(b) for b in eng.batches] == [1, 2]  # the refused job shared its batch with the served one


def test_heads_watch_picks_up_heads_added_and_removed_on_disk(tmp_path):
    import shutil

    from arbiter.testing.fakes import save_random_head

    save_random_head(FAKE_FINGERPRINT, tmp_path / "one", name="one", seed=1)
    app = create_app(Settings(heads_dir=str(tmp_path), heads_watch_s=0.05), engine=FakeEngine(),
                     exit_on_engine_death=False)
    with ServerThread(app) as srv:
        def heads():
            return sorted(h["id"] for h in httpx.get(f"{srv.url}/v1/heads", timeout=10).json()["data"])

        assert heads() == ["one"]
        save_random_head(FAKE_FINGERPRINT, tmp_path / "two", name="two", seed=2)
        wait_until(lambda: heads() == ["one", "two"], what="the new head to be loaded")
        shutil.rmtree(tmp_path / "one")
        wait_until(lambda: heads() == ["two"], what="the removed head to be unloaded")
        r = rerank_call(client(srv), candidates=2, heads=["two"])
        assert r.rerank["heads"] == ["two"]
