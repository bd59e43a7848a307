"""Clients that leave in the middle of the expensive requests, on the real model through the HF engine's continuous
batch (SECURITY.md, "Faults"): a verified rerank, a pruned rerank and an adaptive rerank, each closed by its client
(the TCP connection dropped) once the engine has started its job. Each job's rows leave the decode batch before
they finish (every candidate comes back "cancelled" with fewer tokens than asked), an adaptive request starts no
further round, the worker goes idle with an empty queue, and after many such requests the server's memory is where
it was (no KV cache, job or row kept)."""

from __future__ import annotations

import json
import os
import queue
import socket
from urllib.parse import urlparse

import httpx
import pytest

from arbiter.testing.fakes import process_rss, save_random_head
from arbiter.testing.served import served, wait_until

pytestmark = pytest.mark.integration
MAX_TOKENS = 200  # far more than a candidate makes before its client leaves


class RecordingEngine:
    """An HFEngine that records each job it starts and each result it delivers (the engine itself unchanged)."""

    @staticmethod
    def make(backbone):
        from arbiter.generation.hf import HFEngine

        class Recording(HFEngine):
            def __init__(self, bb):
                super().__init__(bb)
                self.started: queue.Queue = queue.Queue()
                self.delivered: list = []

            def generate(self, jobs, *, admit=None, deliver=None):
                for j in jobs:
                    self.started.put(j)

                def admitted(rows):
                    new = list(admit(rows))
                    for j in new:
                        if j is not None:
                            self.started.put(j)
                    return new

                def delivered(job, res):
                    self.delivered.append((job, res))
                    if deliver is not None:
                        deliver(job, res)

                return super().generate(jobs, admit=admitted if admit is not None else None, deliver=delivered)

        return Recording(backbone)


def _leave_after_start(url: str, body: dict, engine) -> None:
    """Send ``body`` over a raw socket, wait (on the engine's event, not a clock) until the engine starts its job,
    then drop the connection without reading the answer."""
    u = urlparse(url)
    payload = json.dumps(body).encode()
    s = socket.create_connection((u.hostname, u.port), timeout=120)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
    engine.started.get(timeout=120)
    s.close()


def test_clients_leaving_verified_pruned_and_adaptive_reranks_leak_nothing(backbone, tmp_path):
    import gc

    from arbiter.heads import HeadRegistry
    from arbiter.service.worker import release_free_memory

    save_random_head(backbone.fingerprint, tmp_path / "rand", name="rand", seed=4)
    reg = HeadRegistry(str(tmp_path), backbone.fingerprint)
    reg.load("rand")
    engine = RecordingEngine.make(backbone)
    ask = [{"role": "user", "content": "Is the sea salty? Answer yes or no, then explain at length."}]
    kinds = {
        "verify": {"candidates": 6, "heads": ["rand"], "select": "verify", "extractor": "label_words",
                   "labels": ["yes", "no"], "canonical": "{answer}"},
        "pruned": {"candidates": 6, "heads": ["rand"], "prune": {"at": [150], "keep": 0.5}},
        "adaptive": {"candidates": 8, "heads": ["rand"], "adaptive": {"round": 2}},
    }
    with served(engine, reg, start_timeout_s=60) as srv:
        body = {"model": backbone.name, "messages": ask, "max_tokens": MAX_TOKENS, "temperature": 1.0}
        for rr in kinds.values():  # each kind's request is valid and runs to the end once (warm-up)
            r = httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "max_tokens": 8, "rerank": rr}, timeout=300)
            assert r.status_code == 200, r.text
        while not engine.started.empty():
            engine.started.get()
        wait_until(lambda: not srv.state.worker.busy, what="an idle worker", timeout=120)
        gc.collect()
        release_free_memory()
        before = process_rss(os.getpid())
        engine.delivered.clear()
        rounds = 5
        for _ in range(rounds):
            for rr in kinds.values():
                _leave_after_start(srv.url, {**body, "rerank": rr}, engine)
                # The next request waits until this one's job is back from the engine (its rows left the batch).
                wait_until(lambda: not srv.state.worker.busy, what="the worker idle again", timeout=120)
        assert srv.state.worker.depth() == 0
        jobs = list(engine.delivered)
        assert len(jobs) == rounds * len(kinds), len(jobs)  # one job each: no adaptive round after the client left
        for _job, res in jobs:
            assert not isinstance(res, BaseException), res
            # A candidate may have ended on its own (sampled its closing token) before the client left; the rest stop
            # where the cancel found them, far short of max_tokens.
            assert any(c.finish_reason == "cancelled" for c in res.candidates), res.candidates
            assert all(c.finish_reason in ("cancelled", "stop") and len(c.token_ids) < MAX_TOKENS
                       for c in res.candidates), [(c.finish_reason, len(c.token_ids)) for c in res.candidates]
        gc.collect()
        release_free_memory()
        after = process_rss(os.getpid())
        # Nothing kept: one job's KV cache at the end is 6-8 rows x ~230 positions (tens of MB); 15 leaked ones would
        # be hundreds of MB over the baseline.
        assert after - before < 96 * 2**20, f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
        # And the server still answers.
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=120)
        assert r.status_code == 200
