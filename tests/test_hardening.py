"""Hardening, round 2, on the fake engine: batches admitted by a token budget, one failure failing one request,
an unrecoverable device error taking the server down, and client regexes that never block the event loop.

The real-model memory probe of the token budget is ``test_token_budget_bounds_real_kv_memory`` (integration,
tests/test_overload_and_faults.py). Everything binds to 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures as cf
import random
import threading
import time

import httpx
import pytest

from arbiter import answers
from arbiter.testing.fakes import FakeEngine, Scripted, last_user_message, linear_head, registry_with
from arbiter.testing.served import MODEL, assert_error, served, wait_until

CHAT = "/v1/chat/completions"


def body(text: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16, **kw}


# --- 1. memory admitted by tokens ------------------------------------------------------------------------


def _prompt_len(eng: FakeEngine, text: str) -> int:
    return len(eng.tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def test_a_request_over_the_token_budget_is_a_400_naming_the_limit():
    eng = FakeEngine(echo=True)
    span = _prompt_len(eng, "hi") + 16 + 1  # prompt + max_tokens + the closing token
    reg = registry_with(linear_head("h", [1.0, 0.0, 0.0, 0.0]))
    with served(eng, reg, max_batch_tokens=2 * span, max_tokens_limit=512) as srv, httpx.Client(timeout=30) as c:
        assert c.post(srv.url + CHAT, json=body("hi", n=2)).status_code == 200  # exactly at the budget: fits
        err = assert_error(c.post(srv.url + CHAT, json=body("hi", n=3)), 400, type_="invalid_request_error",
                           code="batch_token_budget", in_message="ARBITER_MAX_BATCH_TOKENS")
        assert str(2 * span) in err["message"] and str(3 * span) in err["message"]
        err = assert_error(c.post(srv.url + CHAT, json=body("hi", max_tokens=2 * span)), 400, code="batch_token_budget")
        # /v1/score counts each candidate as a row: three candidates of the prompt's length do not fit
        score = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "candidates": ["x" * 16] * 3}
        assert_error(c.post(srv.url + "/v1/score", json=score), 400, code="batch_token_budget")
        assert 'arbiter_rejected_total{reason="batch_token_budget"} 3.0' in c.get(srv.url + "/metrics").text
        assert c.get(srv.url + "/health").json()["status"] == "ok"
        assert sum(len(b) for b in eng.batches) == 1  # the refused requests never reached the engine


@pytest.mark.parametrize("budget_spans, merged", [(1, False), (4, True)])
def test_requests_that_fit_the_budget_only_apart_wait_for_separate_batches(budget_spans, merged):
    gate = threading.Event()
    eng = FakeEngine(echo=True, gate=gate)
    span = _prompt_len(eng, "q0") + 16 + 1
    with served(eng, max_batch_tokens=budget_spans * span) as srv, cf.ThreadPoolExecutor(4) as pool:
        first = pool.submit(httpx.post, srv.url + CHAT, json=body("q0"), timeout=30)
        wait_until(eng.started.is_set, what="the first batch")
        rest = [pool.submit(httpx.post, srv.url + CHAT, json=body(f"q{k}"), timeout=30) for k in (1, 2, 3)]
        wait_until(lambda: srv.state.worker.depth() == 3, what="three queued requests")
        gate.set()
        replies = [f.result() for f in [first, *rest]]
    for k, r in enumerate(replies):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == f"q{k}#0"
    sizes = [len(b) for b in eng.batches]
    # one span each: every request its own batch; four spans: the three that queued share one batch
    assert sizes == ([1, 3] if merged else [1, 1, 1, 1]), sizes


# --- 2. one failure fails one request -----------------------------------------------------------------


class PoisonEngine(FakeEngine):
    """Raises for any batch holding a prompt with POISON in it (a RuntimeError, like an out-of-memory), or with
    ``fatal`` a CUDA-style sticky error."""

    def __init__(self, *, fatal: bool = False, **kw):
        super().__init__(echo=True, **kw)
        self.fatal = fatal

    def generate(self, jobs):
        if any("POISON" in last_user_message(self.tokenizer.decode(j.prompt_ids)) for j in jobs):
            self.batches.append(list(jobs))
            if self.fatal:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            raise RuntimeError("the fake engine ran out of memory on this batch")
        return super().generate(jobs)


def test_one_poisoned_job_fails_alone_and_the_rest_of_its_batch_is_answered():
    gate = threading.Event()
    eng = PoisonEngine(gate=gate)
    texts = ["a0", "a1", "POISON", "a3"]
    with served(eng) as srv, cf.ThreadPoolExecutor(5) as pool:
        hold = pool.submit(httpx.post, srv.url + CHAT, json=body("hold"), timeout=30)
        wait_until(eng.started.is_set, what="the holding batch")
        futs = [pool.submit(httpx.post, srv.url + CHAT, json=body(t), timeout=30) for t in texts]
        wait_until(lambda: srv.state.worker.depth() == 4, what="four queued requests")
        gate.set()
        assert hold.result().status_code == 200
        replies = dict(zip(texts, (f.result() for f in futs)))
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    sizes = [len(b) for b in eng.batches]
    assert sizes == [1, 4, 1, 1, 1, 1], sizes  # the four shared a batch; it failed; each ran again alone
    for t, r in replies.items():
        if t == "POISON":
            assert_error(r, 500, type_="server_error", code="engine_error")
        else:
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == f"{t}#0"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker thread dies
def test_a_sticky_device_error_turns_health_503_and_asks_for_a_restart():
    eng = PoisonEngine(fatal=True)
    with served(eng) as srv, httpx.Client(timeout=30) as c:
        assert c.post(srv.url + CHAT, json=body("fine")).status_code == 200
        assert_error(c.post(srv.url + CHAT, json=body("POISON")), 503, code="engine_dead")
        wait_until(lambda: c.get(srv.url + "/health").status_code == 503, what="/health 503")
        assert srv.app.state.exit_code == 3  # `arbiter serve` exits with it (tests/test_overload_and_faults.py)
        assert_error(c.post(srv.url + CHAT, json=body("fine again")), 503, code="engine_dead")
    assert [len(b) for b in eng.batches] == [1, 1]  # no re-run on a dead device


# --- 3. nothing blocks the event loop ---------------------------------------------------------------


SLOW_PATTERN = r"(\w+)(?:.*\1){4}[^\w\s,]"  # backtracks for the whole of any time limit on ~2 KB of words


def _words(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    out = " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(n_chars // 3))
    return out[:n_chars]


def test_a_slow_client_regex_never_stalls_health_and_ends_in_a_400_naming_it():
    script = [Scripted(_words(2000, seed), (0.1 * seed, 0.0, 0.0, 0.0)) for seed in range(8)]
    eng = FakeEngine(script)
    reg = registry_with(linear_head("h", [1.0, 0.0, 0.0, 0.0]))
    req = body("q", max_tokens=2048, rerank={"heads": ["h"], "candidates": 8, "select": "majority_vote",
                                             "extractor": "regex", "pattern": SLOW_PATTERN, "adaptive": {"round": 1}})
    with served(eng, reg, max_tokens_limit=2048, extract_budget_s=1.0) as srv:
        with httpx.Client(timeout=30) as c:
            assert c.get(srv.url + "/health").status_code == 200
        result: list[httpx.Response] = []
        t = threading.Thread(target=lambda: result.append(httpx.post(srv.url + CHAT, json=req, timeout=60)))
        t0 = time.monotonic()
        t.start()
        lags = []
        with httpx.Client(timeout=30) as c:
            while t.is_alive():
                s = time.monotonic()
                assert c.get(srv.url + "/health").status_code == 200
                lags.append(time.monotonic() - s)
                time.sleep(0.02)
        took = time.monotonic() - t0
        t.join()
    assert_error(result[0], 400, code="extraction_timeout", param="rerank.pattern", in_message=SLOW_PATTERN)
    assert 0.9 < took < 10, took  # the budget (1 s) was spent, not one 50 ms slice per candidate per round
    assert len(lags) >= 5, lags  # /health was asked all along ...
    assert max(lags) < 0.5, max(lags)  # ... and always answered


def test_adaptive_rounds_extract_each_candidate_once(monkeypatch):
    calls: list[str] = []
    real = answers.extract_label_word

    def counting(text, labels):
        calls.append(text)
        return real(text, labels)

    monkeypatch.setattr(answers, "extract_label_word", counting)
    script = [Scripted(f"answer {w} ({k})", (0.1 * k, 0.0, 0.0, 0.0)) for k, w in enumerate(["yes", "no"] * 4)]
    reg = registry_with(linear_head("h", [1.0, 0.0, 0.0, 0.0]))
    req = body("q", max_tokens=64, rerank={"heads": ["h"], "candidates": 8, "select": "majority_vote",
                                           "extractor": "label_words", "labels": ["yes", "no"],
                                           "adaptive": {"round": 1}, "return_candidates": True})
    with served(FakeEngine(script), reg) as srv:
        r = httpx.post(srv.url + CHAT, json=req, timeout=30)
    assert r.status_code == 200, r.text
    info = r.json()["rerank"]
    assert info["adaptive"]["rounds"] == 8 and info["adaptive"]["candidates"] == 8, info["adaptive"]
    assert sorted(calls) == sorted(s.text for s in script), calls  # 8 calls, not 1 + 2 + ... + 8 = 36


# --- 5. files and paths ----------------------------------------------------------------------------------


def test_a_head_rewritten_200_times_under_a_50ms_watcher_is_listed_on_every_poll(tmp_path):
    from arbiter.testing.fakes import FAKE_FINGERPRINT, save_random_head
    from arbiter.testing.served import heads_dir

    reg = heads_dir(tmp_path, "h1")
    done = threading.Event()
    last: list = []

    def rewrite() -> None:
        try:
            for k in range(200):
                last[:] = [save_random_head(FAKE_FINGERPRINT, tmp_path / "h1", name="h1", seed=100 + k, scale=20.0)]
                time.sleep(0.005)
        finally:
            done.set()

    with served(FakeEngine(), reg, heads_dir=str(tmp_path), heads_watch_s=0.05) as srv, httpx.Client(timeout=30) as c:
        writer = threading.Thread(target=rewrite)
        writer.start()
        listed = []
        while not done.is_set():
            listed.append([h["id"] for h in c.get(srv.url + "/v1/heads").json()["data"]])
        writer.join()
        wait_until(lambda: srv.state.registry.get("h1").module.reward.weight.equal(last[0].reward.weight),
                   what="the last version swapped in")
    assert len(listed) >= 20, len(listed)
    assert all(ids == ["h1"] for ids in listed), [ids for ids in listed if ids != ["h1"]][:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h1"]  # no temporary or old directory left behind
