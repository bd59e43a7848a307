"""The API fuzzer of a live server (schemathesis over the service's own ``/openapi.json``), shared by
``tests/test_fuzz.py`` (a short derandomized run) and ``benchmarks/fuzz_api.py`` (the full run and its report).

Positive cases (schema-valid) are partly steered towards what exists: the served model, the real head, heads that
earlier admin cases loaded, and the limits, so they reach generation, reranking, scoring and head swaps; negative
cases violate the schema. Every response is checked with schemathesis' own checks (no 5xx, documented status and
content type, the documented body schema, negative data rejected with a 4xx). Findings are recorded, not raised.
Needs ``schemathesis`` (a test dependency), imported when :func:`fuzz` runs.
"""

from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from arbiter.testing.fakes import save_random_head

AUTH = "fuzz-admin-key"
HEAD = "h1"
SMALL_LIMITS = dict(max_tokens_limit=8, default_max_tokens=8, max_n=2, max_candidates=3, default_candidates=2,
                    max_score_candidates=3, max_stop=4, max_stop_length=16, max_messages=16, max_queue=64,
                    max_body_bytes=16384, request_timeout_s=120.0)

CONTEXT = 256  # tokens: the context window the fuzzed server enforces (the model's own is 8192)

SCHEMA_CLASSES = {"JsonSchemaError", "MalformedJson", "ContentDeserializationError", "DiscriminatorMismatch"}


@dataclass
class FuzzResult:
    counts: collections.Counter = field(default_factory=collections.Counter)  # (operation, mode, status) -> n
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False
    slowest: list[tuple[float, str, int]] = field(default_factory=list)

    @property
    def cases(self) -> int:
        return sum(self.counts.values())

    @property
    def server_errors(self) -> int:
        return sum(n for (_, _, status), n in self.counts.items() if status >= 500)

    def failures_of(self, kinds: set[str]) -> list[dict]:
        return [f for f in self.failures if any(k in kinds for k in f["kinds"])]

    @property
    def schema_violations(self) -> int:
        return len(self.failures_of(SCHEMA_CLASSES))

    def per_operation(self) -> dict[str, collections.Counter]:
        out: dict[str, collections.Counter] = {}
        for (op, mode, status), n in sorted(self.counts.items()):
            out.setdefault(op, collections.Counter())[(mode, status)] += n
        return out


def steer(case, op: str, rng: random.Random, model_id: str, limits: dict, created: list[str]) -> None:
    """Steer a schema-valid case towards things that exist (the served model, the real head, heads loaded by
    earlier cases) and within the limits, so positive cases reach the model and the admin code paths."""
    body = case.body if isinstance(case.body, dict) else None
    if op == "GET /v1/models/{model_id}":
        case.path_parameters["model_id"] = model_id
    elif op == "POST /v1/admin/heads" and body is not None:
        body["path"] = HEAD  # a valid head directory; loaded under the generated name (or h1: a 409)
    elif op == "PUT /v1/admin/heads/{name}" and body is not None:
        case.path_parameters["name"] = rng.choice([HEAD, *created])
        body["path"] = HEAD
    elif op == "DELETE /v1/admin/heads/{name}" and created:
        case.path_parameters["name"] = created.pop(rng.randrange(len(created)))  # never h1 itself
    elif body is not None and "model" in body:
        repair(body, rng, model_id, HEAD, limits)


def repair(body: dict, rng: random.Random, model_id: str, head: str, limits: dict) -> None:
    """Steer a schema-valid request body towards the served model, the real head and the limits (in place)."""
    body["model"] = model_id
    if isinstance(body.get("heads"), list):
        body["heads"] = [head]
    if isinstance(body.get("candidates"), list):
        body["candidates"] = body["candidates"][: limits["max_score_candidates"]]
    if isinstance(body.get("n"), int):
        body["n"] = max(1, min(body["n"], limits["max_n"]))
    for k in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(k), int):
            body[k] = max(1, min(body[k], limits["max_tokens_limit"]))
    if isinstance(body.get("stop"), list):
        body["stop"] = [s for s in body["stop"] if s][: limits["max_stop"]]
    elif body.get("stop") == "":
        body["stop"] = None
    rr = body.get("rerank")
    if isinstance(rr, dict):
        if isinstance(rr.get("heads"), list):
            rr["heads"] = [head]
        if "head" in rr:
            rr["head"] = head
        if isinstance(rr.get("candidates"), int):
            rr["candidates"] = min(max(rr["candidates"], body.get("n", 1)), limits["max_candidates"])
    if isinstance(body.get("messages"), list) and rng.random() < 0.8:
        body["messages"].append({"role": "user", "content": rng.choice(["Say hi.", "What is 2+2?", "Name a colour."])})


def fuzz(base_url: str, *, model_id: str, examples: int, repair_fraction: float = 0.7, seed: int = 0,
         deadline_s: float = 3600.0, limits: dict | None = None, derandomize: bool = False, progress=None) -> FuzzResult:
    """Run schemathesis over every operation of ``base_url``'s /openapi.json; record, never raise."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    limits = limits or SMALL_LIMITS
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    # A body over the size limit is refused with 413 before it is parsed: that is a rejection too (the
    # check's default list of rejecting statuses has 400/422/... but not 413).
    ndr = schema.config.checks.negative_data_rejection
    ndr.expected_statuses = [*ndr.expected_statuses, "413"]
    rng = random.Random(seed)
    created: list[str] = []  # heads loaded by fuzzed admin calls (DELETE cases may remove them)
    res = FuzzResult()
    t_start = time.monotonic()
    headers = {"Authorization": f"Bearer {AUTH}"}

    class _OutOfTime(Exception):
        pass

    for op_result in schema.get_all_operations():
        op = op_result.ok()  # type: ignore[union-attr]  # schemathesis' Result: Ok here (the schema is ours)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
                      print_blob=False)
            def one(case):  # noqa: B023 - hypothesis runs it within this iteration
                if time.monotonic() - t_start > deadline_s:
                    raise _OutOfTime()
                if mode == GenerationMode.POSITIVE and rng.random() < repair_fraction:
                    steer(case, op.label, rng, model_id, limits, created)
                t0 = time.monotonic()
                resp = case.call(base_url=base_url, headers=headers, timeout=limits["request_timeout_s"] + 30)
                dt = time.monotonic() - t0
                res.counts[(op.label, mode.value, resp.status_code)] += 1
                if op.label == "POST /v1/admin/heads" and resp.status_code == 200:
                    created.append(resp.json()["id"])
                res.slowest = sorted(res.slowest + [(round(dt, 2), op.label, resp.status_code)], reverse=True)[:5]
                try:
                    case.validate_response(resp, checks=checks)
                except FailureGroup as group:
                    res.failures.append({
                        "operation": op.label, "mode": mode.value, "status": resp.status_code,
                        "kinds": sorted({type(f).__name__ for f in group.exceptions}),
                        "titles": sorted({f.title for f in group.exceptions}),
                        "request": case.as_curl_command(headers={"Authorization": "Bearer ..."})[:600],
                        "response": resp.text[:400],
                    })
                if progress:
                    progress()

            if res.stopped_early:
                continue
            try:
                seed_fn = hypothesis.seed(seed) if not derandomize else (lambda f: f)
                seed_fn(one)()
            except hypothesis.errors.Unsatisfiable:
                pass  # e.g. negative cases for an operation without parameters: there are none
            except _OutOfTime:
                res.stopped_early = True
    res.seconds = time.monotonic() - t_start
    return res


def live_app(backbone, heads_root: str, *, context_length: int | None = CONTEXT, **overrides):
    """The real app on the real model, with head ``h1`` saved under ``heads_root``; returns the app.

    ``context_length`` shrinks the window the server enforces (prompt + answer), which bounds the cost of
    any one fuzzed request on a CPU; requests beyond it get the server's own 400 context_length_exceeded."""
    from arbiter.generation.hf import HFEngine
    from arbiter.heads import HeadRegistry
    from arbiter.service.app import create_app
    from arbiter.service.settings import Settings

    fp = backbone.fingerprint
    save_random_head(fp, Path(heads_root) / HEAD, name=HEAD, seed=0)
    reg = HeadRegistry(heads_root, fp)
    loaded, errors = reg.load_all()
    assert loaded == [HEAD] and not errors, (loaded, errors)
    settings = Settings(heads_dir=heads_root, admin_key=AUTH, api_key="fuzz-user-key", **{**SMALL_LIMITS, **overrides})
    engine = HFEngine(backbone)
    if context_length is not None:
        engine.context_length = min(engine.context_length, context_length)
    return create_app(settings, engine=engine, heads=reg, exit_on_engine_death=False)
