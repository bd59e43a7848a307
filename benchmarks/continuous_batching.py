"""Continuous batching vs micro-batching vs one-at-a-time, through the API, in one run.

Two `arbiter serve` processes on the embedded model (HF engine, same dtype and threads): one with continuous
batching (the default), one with `ARBITER_CONTINUOUS_BATCHING=false` (a request that arrives while a batch decodes
waits for the whole batch). K clients send the same K requests (seed fixed per request, max_tokens fixed) in three
arrival patterns: one at a time (each after the previous answer), a burst (all at once), staggered (one every
--gap seconds). Modes: plain (n=1) and rerank N=4 (head `helpful`). Reported per pattern: wall time from the first
send to the last answer, completion tokens per second, throughput ratio against one-at-a-time, and the p50 / max
latency of the late arrivals (the second half of the clients).
Writes benchmarks/reports/continuous_batching.md (and .json). Usage:
    python benchmarks/continuous_batching.py [--clients 8] [--gap 0.5] [--max-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _serve  # noqa: E402
from _provenance import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "reports" / "continuous_batching"
PROMPTS = ["Give me three tips for staying focused while studying.", "How do I make a simple tomato sauce?",
           "Explain what a hash table is to a beginner.", "What should I pack for a weekend hiking trip?",
           "Write a short thank-you note to a colleague.", "Why is the sky blue?",
           "How can I start learning to play the guitar?", "What are the pros and cons of working from home?",
           "Suggest a name for a friendly robot.", "How do vaccines train the immune system?",
           "What is a good way to learn a new language?", "Describe a sunset over the sea."]


def start(continuous: bool, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    return _serve.start_server({"ARBITER_HEADS_DIR": str(ROOT / "heads"), "ARBITER_THREADS": str(threads),
                                "ARBITER_LOG_LEVEL": "warning", "ARBITER_CONTINUOUS_BATCHING": str(continuous).lower(),
                                "ARBITER_REQUEST_TIMEOUT_S": "600", "ARBITER_DEVICE": "cpu"}, log)


def body(model: str, i: int, mode: str, max_tokens: int) -> dict:
    b = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
         "max_tokens": max_tokens, "seed": 1000 + i, "temperature": 1.0}
    if mode == "rerank":
        b["rerank"] = {"candidates": 4, "heads": ["helpful"]}
    return b


def run_pattern(url: str, model: str, pattern: str, mode: str, k: int, gap: float, max_tokens: int) -> dict:
    sent, done, tokens = [0.0] * k, [0.0] * k, [0] * k

    def one(i: int) -> None:
        sent[i] = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", json=body(model, i, mode, max_tokens), timeout=600)
        r.raise_for_status()
        done[i] = time.monotonic()
        tokens[i] = r.json()["usage"]["completion_tokens"]

    t0 = time.monotonic()
    if pattern == "one_at_a_time":
        for i in range(k):
            one(i)
    else:
        threads = []
        for i in range(k):
            if pattern == "staggered" and i:
                time.sleep(max(0.0, t0 + i * gap - time.monotonic()))
            t = threading.Thread(target=one, args=(i,))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
    wall = max(done) - t0
    lat = [d - s for s, d in zip(sent, done)]
    late = lat[k // 2:]
    return {"wall_s": round(wall, 2), "tokens": sum(tokens), "tok_per_s": round(sum(tokens) / wall, 1),
            "latency_s": [round(x, 2) for x in lat], "late_p50_s": round(statistics.median(late), 2),
            "late_max_s": round(max(late), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--gap", type=float, default=0.5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    commit = git_commit()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res: dict = {}
    for continuous in (True, False):
        name = "continuous" if continuous else "micro_batching"
        log = ROOT / "runs" / f"continuous_batching_{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        proc, url = start(continuous, args.threads, log)
        try:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            httpx.post(f"{url}/v1/chat/completions", json=body(model, 0, "plain", 4), timeout=120)  # warm-up
            for mode in ("plain", "rerank"):
                for pattern in ("one_at_a_time", "burst", "staggered"):
                    if pattern == "one_at_a_time" and not continuous:
                        continue  # one at a time never overlaps: the same for both servers
                    r = run_pattern(url, model, pattern, mode, args.clients, args.gap, args.max_tokens)
                    res.setdefault(mode, {})[f"{name}:{pattern}" if pattern != "one_at_a_time" else pattern] = r
                    print(mode, name, pattern, {k: v for k, v in r.items() if k != "latency_s"}, flush=True)
        finally:
            _serve.stop_server(proc)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    meta = {"command": "python " + " ".join(["benchmarks/continuous_batching.py", *sys.argv[1:]]), "commit": commit,
            "date": started, "cpu": cpu, "cores": os.cpu_count(), **vars(args)}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": res}, indent=2) + "\n")
    lines = ["# Continuous batching through the API", "",
             f"Command: `{meta['command']}` on commit `{commit}`, {started}; {cpu}, {meta['cores']} cores; "
             f"{args.clients} clients, max_tokens {args.max_tokens}, staggered arrivals every {args.gap} s; embedded "
             f"SmolLM2-135M, HF engine, dtype auto, {args.threads} threads. Same requests and seeds in every row.", "",
             "| mode | arrivals | server | wall (s) | tok/s | throughput vs one at a time | late arrivals p50 / max latency (s) |",
             "|---|---|---|---|---|---|---|"]
    for mode, rows in res.items():
        base = rows["one_at_a_time"]["tok_per_s"]
        for key, r in rows.items():
            server, _, pattern = key.partition(":") if ":" in key else ("either", "", key)
            label = {"plain": "plain n=1", "rerank": "rerank N=4"}[mode]
            lines.append(f"| {label} | {pattern.replace('_', ' ')} | {server.replace('_', '-')} | {r['wall_s']} | "
                         f"{r['tok_per_s']} | {r['tok_per_s'] / base:.2f}x | {r['late_p50_s']} / {r['late_max_s']} |")
    lines += ["", "Late arrivals = the second half of the clients. Micro-batching: a request that arrives while a batch "
              "decodes waits for that whole batch; continuous: it is prefilled and joins the running batch at the next "
              "decode step, and every request is answered as soon as its own rows finish."]
    REPORT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
