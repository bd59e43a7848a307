"""Overload benchmark: 64 concurrent clients against a real `arbiter serve` on the CPU with a small queue.

Starts `python -m arbiter.cli serve` on 127.0.0.1 (the embedded SmolLM2-135M-Instruct, one real head, tiny
max_tokens, ARBITER_MAX_QUEUE small), then runs ``--clients`` threads, each sending exactly ``--requests``
chat completions (half plain, half reranked over 2 candidates) with its own httpx client and no retries.
Meanwhile it samples the server process's RSS every 50 ms and times a /health probe every 250 ms.

Counts: accepted (200), rejected (429; each must carry Retry-After), failed (anything else, including
transport errors and timeouts: must be 0); checks that every accepted request completed (choices with
content and finish_reason, usage); reports the server's peak RSS, latencies, and the /health latency
under load. Every loop is bounded (fixed request count, per-request timeout, overall deadline).

    python benchmarks/overload.py [--clients 64] [--requests 4] [--max-queue 8] [--max-tokens 4]

writes benchmarks/reports/overload.md (and overload.json); exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from _provenance import git_commit  # benchmarks/ is on sys.path: the script's own directory
from _serve import process_rss

ROOT = Path(__file__).resolve().parents[1]

LOOPBACK = "127.0.0.1"
ADMIN_KEY = "overload-admin-key"
PROMPTS = ["Say hi.", "What is 2+2?", "Name a colour.", "Give me a word that rhymes with cat.",
           "What day comes after Monday?", "Name a fruit."]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class RssSampler(threading.Thread):
    """Peak resident memory of a process and its children, sampled every ``period_s``."""

    def __init__(self, pid: int, period_s: float = 0.05):
        super().__init__(daemon=True)
        self.pid = pid
        self.period_s = period_s
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()

    def rss(self) -> int:
        return process_rss(self.pid)

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, self.rss())
            self.samples += 1
            time.sleep(self.period_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=4, help="requests per client (fixed, no retries)")
    p.add_argument("--max-queue", type=int, default=8)
    p.add_argument("--max-batch-rows", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="ARBITER_THREADS of the server (1: on a shared 2-core box two spin-waiting threads ran 10x slower)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per-request client timeout")
    p.add_argument("--swap-every-s", type=float, default=0.25, help="swap head h1 this often during the load (0: never)")
    p.add_argument("--deadline-s", type=float, default=1500.0, help="overall bound on the load phase")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "overload.md"))
    args = p.parse_args(argv)

    from arbiter.backbone import load_backbone
    from arbiter.testing.fakes import free_port, save_random_head

    fp = load_backbone().fingerprint  # only for the head's backbone fingerprint
    heads = tempfile.mkdtemp(prefix="arbiter-overload-heads-")
    save_random_head(fp, Path(heads) / "h1", name="h1", seed=0)
    save_random_head(fp, Path(heads) / "h1_v2", name="h1_v2", seed=1)  # swapped in for h1 during the load
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    env = {**os.environ, "ARBITER_HEADS_DIR": heads, "ARBITER_MAX_QUEUE": str(args.max_queue),
           "ARBITER_MAX_BATCH_ROWS": str(args.max_batch_rows), "ARBITER_MAX_TOKENS_LIMIT": str(args.max_tokens),
           "ARBITER_DEFAULT_MAX_TOKENS": str(args.max_tokens), "ARBITER_THREADS": str(args.threads),
           "ARBITER_REQUEST_TIMEOUT_S": str(args.timeout_s), "ARBITER_LOG_LEVEL": "warning", "ARBITER_DEVICE": "cpu",
           "ARBITER_ADMIN_KEY": ADMIN_KEY, "ARBITER_DEFAULT_HEAD": "h1"}
    log_path = Path(tempfile.mkstemp(prefix="arbiter-overload-", suffix=".log")[1])
    log = open(log_path, "wb")
    server = subprocess.Popen([sys.executable, "-m", "arbiter.cli", "serve", "--host", LOOPBACK, "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited during start-up:\n{log_path.read_text()[-3000:]}")
            try:
                h = httpx.get(f"{url}/health", timeout=2)
                if h.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not become ready in 180 s")
            time.sleep(0.25)
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        sampler = RssSampler(server.pid)
        rss_ready = sampler.rss()
        # One warm-up request, so the first timed requests do not pay one-off costs.
        httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": args.max_tokens}, timeout=args.timeout_s)
        rss_warm = sampler.rss()
        sampler.start()

        results: list[dict] = []
        lock = threading.Lock()
        load_done = threading.Event()
        t_end = time.monotonic() + args.deadline_s

        def client(k: int) -> None:
            with httpx.Client(timeout=args.timeout_s) as c:
                for i in range(args.requests):
                    if time.monotonic() > t_end:
                        break
                    body = {"model": model, "max_tokens": args.max_tokens,
                            "messages": [{"role": "user", "content": PROMPTS[(k + i) % len(PROMPTS)]}]}
                    rerank = (k + i) % 2 == 1
                    if rerank:
                        body["rerank"] = {"candidates": 2, "heads": ["h1"]}
                    t0 = time.monotonic()
                    rec = {"client": k, "i": i, "rerank": rerank}
                    try:
                        r = c.post(f"{url}/v1/chat/completions", json=body)
                        rec.update(status=r.status_code, retry_after=r.headers.get("retry-after"))
                        try:
                            rec["body"] = r.json()
                        except ValueError:
                            rec["body"] = r.text[:300]
                    except httpx.HTTPError as e:
                        rec.update(status=None, error=f"{type(e).__name__}: {e}")
                    rec["latency_s"] = time.monotonic() - t0
                    with lock:
                        results.append(rec)

        health_lat: list[float] = []

        def health_probe() -> None:
            with httpx.Client(timeout=30) as c:
                while not load_done.is_set():
                    t0 = time.monotonic()
                    try:
                        c.get(f"{url}/health")
                        health_lat.append(time.monotonic() - t0)
                    except httpx.HTTPError:
                        health_lat.append(float("inf"))
                    load_done.wait(0.25)

        swaps: list[int] = []  # status of every PUT /v1/admin/heads/h1 made during the load

        def swapper() -> None:
            # h1 is swapped back and forth between two weight files while reranked requests name it.
            with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
                k = 0
                while not load_done.is_set() and k < 10_000:
                    try:
                        swaps.append(c.put(f"{url}/v1/admin/heads/h1", json={"path": "h1_v2" if k % 2 == 0 else "h1"}).status_code)
                    except httpx.HTTPError:
                        swaps.append(-1)
                    k += 1
                    load_done.wait(args.swap_every_s)

        probe = threading.Thread(target=health_probe, daemon=True)
        probe.start()
        swap_thread = threading.Thread(target=swapper, daemon=True)
        if args.swap_every_s > 0:
            swap_thread.start()
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client, range(args.clients)))
        wall = time.monotonic() - t0
        load_done.set()
        probe.join(30)
        if swap_thread.is_alive():
            swap_thread.join(60)
        time.sleep(0.5)
        sampler.stop()
        after = httpx.get(f"{url}/health", timeout=10).json()
        metrics_text = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        log.close()
        shutil.rmtree(heads, ignore_errors=True)

    ok = [r for r in results if r.get("status") == 200]
    rejected = [r for r in results if r.get("status") == 429]
    failed = [r for r in results if r.get("status") not in (200, 429)]
    rej_no_retry = [r for r in rejected if not (r.get("retry_after") or "").isdigit()]

    def complete(r: dict) -> bool:
        b = r.get("body")
        return (isinstance(b, dict) and b.get("choices") and all(
            isinstance(ch["message"]["content"], str) and ch["finish_reason"] in ("stop", "length") for ch in b["choices"])
            and b["usage"]["completion_tokens"] >= 1 and (not r["rerank"] or b["rerank"]["candidates_scored"] == 2))

    incomplete = [r for r in ok if not complete(r)]
    rejected_counter = next((l.split()[-1] for l in metrics_text.splitlines()
                             if l.startswith('arbiter_rejected_total{reason="queue_full"}')), "0")
    summary = {
        "clients": args.clients, "requests_per_client": args.requests, "sent": len(results),
        "expected": args.clients * args.requests, "accepted_200": len(ok), "rejected_429": len(rejected),
        "rejected_without_retry_after": len(rej_no_retry), "failed_other": len(failed),
        "accepted_incomplete": len(incomplete), "server_rejected_counter": float(rejected_counter),
        "wall_s": round(wall, 1), "rss_ready_mib": round(rss_ready / 2**20, 1), "rss_warm_mib": round(rss_warm / 2**20, 1),
        "rss_peak_mib": round(sampler.peak / 2**20, 1), "rss_samples": sampler.samples,
        "accepted_latency_s": {"p50": round(pct([r["latency_s"] for r in ok], 0.5), 2),
                               "p95": round(pct([r["latency_s"] for r in ok], 0.95), 2),
                               "max": round(max((r["latency_s"] for r in ok), default=float("nan")), 2)},
        "rejected_latency_s": {"p50": round(pct([r["latency_s"] for r in rejected], 0.5), 3),
                               "max": round(max((r["latency_s"] for r in rejected), default=float("nan")), 3)},
        "health_latency_s": {"p50": round(pct(health_lat, 0.5), 3), "max": round(max(health_lat, default=float("nan")), 3),
                             "probes": len(health_lat)},
        "after_load": after, "server_exit_code": server.returncode,
        "head_swaps": {"made": len(swaps), "ok_200": swaps.count(200), "failed": len(swaps) - swaps.count(200)},
        "settings": {"ARBITER_MAX_QUEUE": args.max_queue, "ARBITER_MAX_BATCH_ROWS": args.max_batch_rows,
                     "ARBITER_MAX_TOKENS_LIMIT": args.max_tokens, "ARBITER_THREADS": args.threads},
        "failures": [{k: v for k, v in r.items() if k != "body"} | {"body": str(r.get("body"))[:300]} for r in failed[:10]],
    }
    passed = (not failed and not rej_no_retry and not incomplete and len(results) == args.clients * args.requests
              and summary["head_swaps"]["failed"] == 0)
    md = report(summary, passed, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(md)
    if passed:
        log_path.unlink(missing_ok=True)
    else:
        print(f"server log kept at {log_path}")
    return 0 if passed else 1


def report(s: dict, passed: bool, args) -> str:
    a, rj, h = s["accepted_latency_s"], s["rejected_latency_s"], s["health_latency_s"]
    return "\n".join([
        "# Overload: 64 concurrent clients against `arbiter serve` on the CPU",
        "",
        f"Command: `python benchmarks/overload.py --clients {args.clients} --requests {args.requests} "
        f"--max-queue {args.max_queue} --max-tokens {args.max_tokens} --threads {args.threads}`",
        "",
        "Server: `python -m arbiter.cli serve` on 127.0.0.1, embedded SmolLM2-135M-Instruct on the CPU, one real head",
        f"(`h1`, seeded random weights); `ARBITER_MAX_QUEUE={args.max_queue}`, `ARBITER_MAX_BATCH_ROWS={args.max_batch_rows}`,",
        f"`ARBITER_MAX_TOKENS_LIMIT={args.max_tokens}`, `ARBITER_THREADS={args.threads}`. Clients: {args.clients} threads, each",
        f"with its own httpx client, each sending exactly {args.requests} chat completions one after another (no",
        "retries; half plain, half `rerank` over 2 candidates with head `h1`), all started at once. Meanwhile an",
        "admin client swaps `h1` between two weight files, and a probe times `/health`.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other work while this ran).",
        f"Code: commit `{git_commit()}`.",
        "",
        "## Result: " + ("PASS (no request failed; every 429 carried Retry-After; every accepted request completed; "
                         "no head swap failed)"
                         if passed else "FAIL"),
        "",
        "| measure | value |",
        "|---|---|",
        f"| requests sent / planned | {s['sent']} / {s['expected']} |",
        f"| accepted (200) | {s['accepted_200']} |",
        f"| rejected (429) | {s['rejected_429']} (server's `arbiter_rejected_total{{reason=\"queue_full\"}}`: {s['server_rejected_counter']:g}) |",
        f"| 429 without a Retry-After header | {s['rejected_without_retry_after']} |",
        f"| failed (any other status, transport error or timeout) | {s['failed_other']} |",
        f"| accepted but incomplete (no choices/content/finish_reason/usage) | {s['accepted_incomplete']} |",
        f"| server RSS: ready / after one warm-up request / peak under load | {s['rss_ready_mib']} / {s['rss_warm_mib']} / "
        f"{s['rss_peak_mib']} MiB (peak over {s['rss_samples']} samples, 50 ms apart) |",
        f"| load phase wall time | {s['wall_s']} s |",
        f"| accepted latency p50 / p95 / max | {a['p50']} / {a['p95']} / {a['max']} s |",
        f"| 429 latency p50 / max | {rj['p50']} / {rj['max']} s |",
        f"| `/health` latency under load p50 / max ({h['probes']} probes) | {h['p50']} / {h['max']} s |",
        f"| `/health` after the load | {s['after_load']} |",
        f"| head swaps during the load (PUT /v1/admin/heads/h1, every {args.swap_every_s} s) | {s['head_swaps']['made']} made, "
        f"{s['head_swaps']['ok_200']} ok, {s['head_swaps']['failed']} failed |",
        f"| server exit after SIGTERM | {s['server_exit_code']} (-15 = terminated by the SIGTERM it was sent, after draining) |",
        "",
        "A rejection does no model work (the queue is full when the request arrives); its latency here is mostly",
        f"CPU contention between {args.clients} client threads and the server on the same cores. Accepted requests wait",
        "for the single engine worker, which merges queued requests into batches of up to ARBITER_MAX_BATCH_ROWS rows.",
        "",
    ] + ([] if not s["failures"] else ["## Failures", ""] + [f"- `{json.dumps(f)}`" for f in s["failures"]] + [""]))


if __name__ == "__main__":
    sys.exit(main())
