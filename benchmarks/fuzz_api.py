"""API fuzzing with schemathesis against a LIVE server: the real embedded model, a real head, small limits.

The server is the real app (``create_app``) on 127.0.0.1 in this process, with the HF engine on the embedded
SmolLM2-135M and one head saved to a temporary ARBITER_HEADS_DIR. Schemathesis reads the service's own
``/openapi.json`` and generates requests for every operation, in two modes:

  positive  bodies/parameters valid under the schema. Random model names and head names almost never match,
            so a share of positive cases (``--repair``) is steered to what exists: the served model, the real
            head, heads that earlier admin cases loaded, and the limits (n, candidates, max_tokens, stop), to
            reach generation, reranking, scoring and head load/swap/unload; the rest stay raw.
  negative  bodies/parameters that violate the schema (wrong types, missing fields, invalid JSON...).

Every response is checked with schemathesis' checks: no 5xx (``not_a_server_error``), the status code is
documented, the content type is documented, the body matches the documented schema
(``response_schema_conformance``), and negative data is rejected with a 4xx (``negative_data_rejection``).
Findings are recorded, not raised, so a run always finishes and reports everything.

    python benchmarks/fuzz_api.py [--examples 120] [--repair 0.7] [--seed 0] [--deadline-s 3600]

writes benchmarks/reports/fuzz.md (and fuzz.json). ``tests/test_fuzz.py`` runs a short version of the same.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/fakes.py: ServerThread, save_random_head

from _provenance import git_commit  # noqa: E402  (benchmarks/ is on sys.path: the script's own dir)

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
        op = op_result.ok()
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
    from fakes import save_random_head

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


def report_md(res: FuzzResult, args, wall_s: float) -> str:
    lines = [
        "# API fuzzing (schemathesis) against a live server",
        "",
        f"Command: `python benchmarks/fuzz_api.py --examples {args.examples} --repair {args.repair} --seed {args.seed}`",
        "",
        "Server: the real app on 127.0.0.1 (uvicorn), HF engine on the embedded SmolLM2-135M-Instruct (CPU), one real",
        "head (`h1`, seeded random weights) loaded from a temporary ARBITER_HEADS_DIR, API key and admin key set",
        "(the fuzzer sends the admin key, which every endpoint accepts). Small limits so generation stays cheap: "
        + ", ".join(f"`{k}={v}`" for k, v in SMALL_LIMITS.items())
        + f", and a context window of {args.context} tokens (prompt + answer; the model's own is 8192) enforced by the"
        " server's context check, which bounds the cost of any one request.",
        "",
        f"Schema: the service's own `/openapi.json`. Modes: positive (schema-valid; {args.repair:.0%} of cases steered to",
        "what exists: the served model, the real head, heads loaded by earlier admin cases, and the limits, so",
        "generation, scoring and head load/swap/unload run) and negative (schema-violating). Checks on every",
        "response: not_a_server_error, status_code_conformance, content_type_conformance,",
        "response_schema_conformance (JSON bodies and every server-sent event of a stream), negative_data_rejection",
        "(413 counted as a rejection, as 400 is).",
        "",
        f"Machine: {platform.machine()}, {_cpu()}; schemathesis {_version('schemathesis')}, hypothesis {_version('hypothesis')}.",
        f"Code: commit `{git_commit()}`.",
        "",
        "## Result",
        "",
        "| measure | value |",
        "|---|---|",
        f"| cases run | {res.cases} |",
        f"| responses with status >= 500 | {res.server_errors} |",
        f"| schema violations (response body vs documented schema) | {res.schema_violations} |",
        f"| all check failures (any check) | {len(res.failures)} |",
        f"| fuzzing time | {res.seconds:.0f} s (wall {wall_s:.0f} s incl. model load) |",
        f"| stopped early at the deadline | {'yes' if res.stopped_early else 'no'} |",
        "",
        "## Cases per endpoint (mode: status x count)",
        "",
        "| endpoint | cases | positive | negative |",
        "|---|---|---|---|",
    ]
    for op, c in res.per_operation().items():
        pos = ", ".join(f"{s}x{n}" for (m, s), n in sorted(c.items()) if m == "positive") or "-"
        neg = ", ".join(f"{s}x{n}" for (m, s), n in sorted(c.items()) if m == "negative") or "-"
        lines.append(f"| `{op}` | {sum(c.values())} | {pos} | {neg} |")
    lines += ["", "Operations without parameters (GET /health, /metrics, /v1/models, /v1/heads) have exactly one",
              "possible request, so Hypothesis runs them once and has no negative cases for them.", ""]
    lines += ["## Slowest cases", ""] + [f"- {s} s `{op}` -> {st}" for s, op, st in res.slowest] + [""]
    lines += ["## Failures", ""]
    if not res.failures:
        lines.append("None.")
    for f in res.failures[:20]:
        lines += [f"- `{f['operation']}` ({f['mode']}) -> {f['status']}: {', '.join(f['titles'])}",
                  f"  - request: `{f['request']}`", f"  - response: `{f['response']}`"]
    return "\n".join(lines) + "\n"


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                n = sum(1 for l in open("/proc/cpuinfo") if l.startswith("processor"))
                return f"{line.split(':', 1)[1].strip()} x{n}"
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=120, help="Hypothesis examples per (operation, mode)")
    p.add_argument("--repair", type=float, default=0.7, help="share of positive bodies steered to the real model/head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=3600.0, help="stop generating after this long (bounded run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--context", type=int, default=CONTEXT, help="context window the server enforces (tokens)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "fuzz.md"))
    args = p.parse_args(argv)

    from fakes import ServerThread
    from tqdm import tqdm

    from arbiter.backbone import load_backbone

    t0 = time.monotonic()
    bb = load_backbone(threads=args.threads)
    with tempfile.TemporaryDirectory() as heads_root:
        app = live_app(bb, heads_root, context_length=args.context)
        with ServerThread(app, start_timeout_s=120) as srv, tqdm(desc="fuzz cases", unit="case") as bar:
            res = fuzz(srv.url, model_id=app.state.arbiter.model_id, examples=args.examples,
                       repair_fraction=args.repair, seed=args.seed, deadline_s=args.deadline_s,
                       progress=lambda: bar.update(1))
    wall = time.monotonic() - t0
    md = report_md(res, args, wall)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps({
        "cases": res.cases, "server_errors": res.server_errors, "schema_violations": res.schema_violations,
        "check_failures": len(res.failures), "seconds": round(res.seconds, 1), "stopped_early": res.stopped_early,
        "per_operation": {op: {f"{m} {s}": n for (m, s), n in c.items()} for op, c in res.per_operation().items()},
        "failures": res.failures,
    }, indent=2) + "\n")
    print(md)
    return 0 if res.server_errors == 0 and not res.failures else 1


if __name__ == "__main__":
    sys.exit(main())
