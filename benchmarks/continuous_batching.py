"""Continuous batching vs micro-batching vs one-at-a-time, through the API, in one run.

Two `arbiter serve` processes on the embedded model (HF engine, same dtype and threads), both up for the whole
run: one with continuous batching (the default), one with `ARBITER_CONTINUOUS_BATCHING=false` (a request that
arrives while a batch decodes waits for the whole batch). K clients send the same K requests (seed fixed per
request, max_tokens fixed) in three arrival patterns: one at a time (each after the previous answer), a burst (all
at once), staggered (one every --gap seconds). Modes: plain (n=1) and rerank N=4 (head `helpful`). Every repeat
runs every (mode, pattern, server) cell once, the servers' order alternating between repeats, so a slow phase of
the shared machine hits both servers. Reported per cell, as medians over the repeats: wall time from the first
send to the last answer, completion tokens per second, the p50 / max latency of the late arrivals (the second
half of the clients); and each ratio both as the median of per-repeat ratios and the ratio of medians.
Writes benchmarks/reports/continuous_batching.md (and .json). Usage:
    python benchmarks/continuous_batching.py [--clients 8] [--gap 0.5] [--max-tokens 64] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time
from pathlib import Path

import httpx

import _serve  # benchmarks/ is on sys.path: the script's own directory
from _provenance import Run, ratio_stats, ratio_text

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
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    run = Run("benchmarks/continuous_batching.py")
    servers: dict[str, tuple] = {}
    runs: dict[str, dict[str, list[dict]]] = {}  # mode -> cell -> one result per repeat
    try:
        for name, continuous in (("continuous", True), ("micro_batching", False)):
            log = ROOT / "runs" / f"continuous_batching_{name}.log"
            proc, url = start(continuous, args.threads, log)
            servers[name] = (proc, url)
        model = httpx.get(f"{servers['continuous'][1]}/v1/models").json()["data"][0]["id"]
        for _, url in servers.values():
            httpx.post(f"{url}/v1/chat/completions", json=body(model, 0, "plain", 4), timeout=120).raise_for_status()
        for rep in range(args.repeats):
            order = ["continuous", "micro_batching"][:: 1 if rep % 2 == 0 else -1]
            for mode in ("plain", "rerank"):
                for pattern in ("one_at_a_time", "burst", "staggered"):
                    for name in order:
                        if pattern == "one_at_a_time" and name != "continuous":
                            continue  # one at a time never overlaps: the same for both servers
                        r = run_pattern(servers[name][1], model, pattern, mode, args.clients, args.gap, args.max_tokens)
                        cell = pattern if pattern == "one_at_a_time" else f"{name}:{pattern}"
                        runs.setdefault(mode, {}).setdefault(cell, []).append(r)
                        print(rep, mode, cell, {k: v for k, v in r.items() if k != "latency_s"}, flush=True)
    finally:
        for proc, _ in servers.values():
            _serve.stop_server(proc)
    meta = {**run.finish(), **vars(args)}
    med = statistics.median
    table: dict = {}
    for mode, cells in runs.items():
        base = [r["tok_per_s"] for r in cells["one_at_a_time"]]
        for cell, rs in cells.items():
            tps = [r["tok_per_s"] for r in rs]
            table.setdefault(mode, {})[cell] = {
                "wall_s": round(med(r["wall_s"] for r in rs), 2), "tok_per_s": round(med(tps), 1),
                "late_p50_s": round(med(r["late_p50_s"] for r in rs), 2),
                "late_max_s": round(med(r["late_max_s"] for r in rs), 2),
                "throughput_vs_one_at_a_time": ratio_stats(tps, base)}
        for pattern in ("burst", "staggered"):
            table[mode][f"continuous_over_micro:{pattern}"] = ratio_stats(
                [r["tok_per_s"] for r in cells[f"continuous:{pattern}"]],
                [r["tok_per_s"] for r in cells[f"micro_batching:{pattern}"]])
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": table, "runs": runs}, indent=2) + "\n")
    lines = ["# Continuous batching through the API", "", Run.header(meta), "",
             f"{args.clients} clients, max_tokens {args.max_tokens}, staggered arrivals every {args.gap} s; embedded "
             f"SmolLM2-135M, HF engine, dtype auto, {args.threads} threads; both servers up for the whole run, every "
             f"cell run once per repeat ({args.repeats} repeats, the servers' order alternating). Same requests and "
             "seeds in every cell. Figures are medians over the repeats.", "",
             "| mode | arrivals | server | wall (s) | tok/s | throughput vs one at a time | late arrivals p50 / max latency (s) |",
             "|---|---|---|---|---|---|---|"]
    for mode, rows in table.items():
        label = {"plain": "plain n=1", "rerank": "rerank N=4"}[mode]
        for key, r in rows.items():
            if key.startswith("continuous_over_micro"):
                continue
            server, _, pattern = key.partition(":") if ":" in key else ("either", "", key)
            lines.append(f"| {label} | {pattern.replace('_', ' ')} | {server.replace('_', '-')} | {r['wall_s']} | "
                         f"{r['tok_per_s']} | {ratio_text(r['throughput_vs_one_at_a_time'])} | "
                         f"{r['late_p50_s']} / {r['late_max_s']} |")
    lines += [""]
    for mode, rows in table.items():
        for pattern in ("burst", "staggered"):
            lines.append(f"- {mode}, {pattern}: continuous / micro-batching throughput "
                         f"{ratio_text(rows[f'continuous_over_micro:{pattern}'])}")
    lines += ["", "Late arrivals = the second half of the clients. Micro-batching: a request that arrives while a batch "
              "decodes waits for that whole batch; continuous: it is prefilled and joins the running batch at the next "
              "decode step, and every request is answered as soon as its own rows finish. Staggered arrivals cannot "
              f"beat (one-at-a-time wall) / ({(args.clients - 1) * args.gap:.1f} s of arrivals + one request's time)."]
    REPORT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
