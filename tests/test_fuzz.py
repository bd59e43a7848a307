"""Short schemathesis run (the full >= 1000-case run is ``benchmarks/fuzz_api.py``): a live server on the real
embedded model and a real head, every operation of the service's own /openapi.json fuzzed in positive and
negative mode; no response may be a 5xx, violate its documented schema, use an undocumented status or content
type, or accept schema-violating data. Derandomized, so CI sees the same cases every run.
"""

from __future__ import annotations

import pytest

pytest.importorskip("schemathesis")

from arbiter.testing.fakes import ServerThread  # noqa: E402
from arbiter.testing.fuzz import fuzz, live_app  # noqa: E402

EXAMPLES = 10  # per (operation, mode): ~100 cases


def test_schemathesis_short_run_finds_no_5xx_and_no_schema_violation(backbone, tmp_path, one_torch_thread):
    app = live_app(backbone, str(tmp_path))
    with ServerThread(app, start_timeout_s=60) as srv:
        res = fuzz(srv.url, model_id=app.state.arbiter.model_id, examples=EXAMPLES, derandomize=True, deadline_s=90)
    ops = res.per_operation()
    schema = {f"{m.upper()} {path}" for path, item in app.openapi()["paths"].items() for m in item}
    assert len(schema) >= 14 and set(ops) == schema, sorted(schema ^ set(ops))  # every operation was exercised
    assert res.cases >= 50, res.counts
    # The steered positive cases reached the model and the admin paths: real completions, scores and swaps.
    for op in ("POST /v1/chat/completions", "POST /v1/score", "GET /v1/models/{model_id}", "PUT /v1/admin/heads/{name}"):
        assert ops[op][("positive", 200)] > 0, (op, ops[op])
    assert res.server_errors == 0, res.failures
    assert res.schema_violations == 0, res.failures
    assert res.failures == [], res.failures
