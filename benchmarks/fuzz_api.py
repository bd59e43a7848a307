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
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from arbiter.testing.fuzz import CONTEXT, SMALL_LIMITS, FuzzResult, fuzz, live_app

from _provenance import git_commit  # benchmarks/ is on sys.path: the script's own directory

ROOT = Path(__file__).resolve().parents[1]


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

    from tqdm import tqdm

    from arbiter.backbone import load_backbone
    from arbiter.testing.fakes import ServerThread

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
