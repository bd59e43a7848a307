"""Prometheus metrics, one registry per app (so tests can build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("arbiter_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("arbiter_request_latency_seconds", "Request latency", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.candidates_scored = Counter("arbiter_candidates_scored", "Candidates scored by reward heads", registry=r)
        self.tokens_generated = Counter("arbiter_completion_tokens", "Completion tokens generated", registry=r)
        self.admitted_rows = Counter("arbiter_admitted_rows", "Sequences that joined a running decode batch "
                                     "(continuous batching)", registry=r)
        self.tokens_saved = Counter("arbiter_adaptive_tokens_saved",
                                    "Completion tokens adaptive rerank did not spend: candidates left unsampled x the "
                                    "request's mean tokens per sampled candidate (an estimate)", registry=r)
        self.prompt_tokens = Counter("arbiter_prompt_tokens", "Prompt tokens processed", registry=r)
        self.queue_depth = Gauge("arbiter_queue_depth", "Requests waiting for the engine worker", registry=r)
        self.batch_rows = Histogram("arbiter_batch_rows", "Sequences per generation batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.rejected = Counter("arbiter_rejected", "Requests rejected before running", ["reason"], registry=r)
        self.heads_loaded = Gauge("arbiter_heads_loaded", "Reward heads currently loaded", registry=r)
