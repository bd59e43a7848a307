"""Early rejection (`rerank.prune`) against fixed best-of-N and adaptive N, through the API.

Starts `arbiter serve` (HF engine, embedded SmolLM2-135M, the committed heads) and talks to it with the `openai`
client. Three parts, all on the same seeds:

1. Quality against tokens, replayed exactly. Per question ONE request: rerank N=16, `return_candidates`, and
   `prune: {at: <every checkpoint below>, keep: 1}`, which drops nothing and records each candidate's partial
   reward (the picking head on its prefix) at every checkpoint it reached, beside its final reward and tokens.
   Candidate i depends only on (seed, i), and the survivors of a pruned request sample exactly the unpruned
   tokens (tests/test_pruning_hf.py), so every policy is replayed from that one response with the server's own
   rules: fixed best-of-k (the first k candidates, k = 1..16), adaptive N (rounds of 2, `selection.settled`), and
   each pruning schedule (`PruneSpec.survivors`, ranked by partial reward, ties to the lower index) for N = 8, 16.
   Tasks (`sst2`, `mc`: questions no head trained on, as in bestofn_api.py, with their heads' own rules): accuracy
   +- standard error. Helpful prompts (written for this benchmark, in no training set; head `helpful`): the pick's
   final reward and how often it is fixed best-of-16's pick. Also how well a prefix ranks: at each checkpoint the
   Spearman correlation of partial with final rewards among the candidates alive there (mean over questions) and,
   for tasks, the AUC of the partial reward for "this candidate's answer is right".
2. Served wall time: a subset of questions, each sent interleaved (order rotating per question) as a single answer
   (plain n=1), fixed best-of-16, and rerank N=16 with each pruning schedule served for real; median wall time
   per request. The served pruned pick must equal part 1's replay of it (checked, reported).
3. Throughput under 8 concurrent clients: the helpful prompts as fixed best-of-16 and as the best pruning schedule
   of part 1 (alternating which mode runs first, repeated); requests/s and completion tokens/s.

Each schedule is replayed with prefixes scored two ways: "open" (the state at the prefix's last token, free) and
"closed" (`close: true`: as if the answer ended there, one extra decode step per checkpoint); parts 2 and 3 serve the
way whose replays kept fixed best-of-16's pick more often on the helpful prompts.

Writes benchmarks/reports/early_rejection.md (and .json, and early_rejection.png: accuracy / reward against
tokens). Usage:
    python benchmarks/early_rejection.py [--questions 60] [--helpful 16] [--timed 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import torch
from engines import PROMPTS as ENGINE_PROMPTS

from arbiter.generation.base import PruneSpec
from arbiter.selection import AdaptiveRule, select, settled
from arbiter.training.stats import accuracy_se

import _serve  # benchmarks/ is on sys.path: the script's own directory
from _provenance import Run
from bestofn_api import MAX_TOKENS, TASK_HEAD, _spec_of, tasks  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "reports" / "early_rejection"
N = 16
ADAPTIVE = AdaptiveRule()  # the server's defaults: rounds of 2, margin 1.0, supermajority 0.75
# Schedules as fractions of max_tokens (tasks answer in 16-24 tokens, helpful prompts in up to 96).
SCHEDULES = {"prune 1/4+1/2 keep 1/2": ((0.25, 0.5), 0.5),
             "prune 1/8+1/4 keep 1/2": ((0.125, 0.25), 0.5),
             "prune 1/8 keep 1/4": ((0.125,), 0.25)}
VARIANTS = {"open": "partial", "closed": "partial_closed"}  # prefix scored at its last token / as a closed answer
HELPFUL_MAX_TOKENS = 96
HELPFUL_PROMPTS = [  # engines.py's prompts, then six more written for this benchmark
    *ENGINE_PROMPTS,
    "How can I keep my houseplants alive while I travel for two weeks?",
    "What is a good way to prepare for a job interview?",
    "Explain the difference between weather and climate.",
    "How do I politely decline an invitation to a party?",
    "What are some easy exercises I can do at my desk?",
    "How does a bicycle stay upright when it is moving?",
]


def at_tokens(fractions: tuple[float, ...], max_tokens: int) -> tuple[int, ...]:
    """The server's conversion of `at_fraction` (serving._prune_spec)."""
    return tuple(sorted({max(1, round(f * max_tokens)) for f in fractions}))


def replay_prune(cands: list[dict], at: tuple[int, ...], keep: float, min_keep: int = 1,
                 key: str = "partial") -> list[int | None]:
    """Which checkpoint drops each candidate (None: survives), by the engine's rule (hf._Batch._prune): the live
    candidates at t are those with a partial reward at t that an earlier checkpoint did not drop. ``key``: the
    open ("partial") or closed ("partial_closed") prefix rewards."""
    spec = PruneSpec(at=at, keep=keep, min_keep=min_keep)
    pruned: list[int | None] = [None] * len(cands)
    for t in at:
        live = [i for i, c in enumerate(cands) if pruned[i] is None and t in c[key]]
        if not live:
            continue
        finished = len(cands) - len(live) - sum(p is not None for p in pruned)
        for k in spec.dropped([cands[i][key][t] for i in live], live, finished):
            pruned[live[k]] = t
    return pruned


def pick(cands: list[dict], rule: str, pruned: list[int | None] | None = None) -> int:
    """The server's selection over ``cands`` (pruned ones: reward -inf, no answer)."""
    pruned = pruned or [None] * len(cands)
    rew = torch.tensor([[c["final"] if p is None else float("-inf")] for c, p in zip(cands, pruned)])
    answers = [c["answer"] if p is None else None for c, p in zip(cands, pruned)]
    return select(rew, rule, answers if rule != "argmax" else None).order[0]


def tokens_of(cands: list[dict], pruned: list[int | None] | None = None) -> int:
    pruned = pruned or [None] * len(cands)
    return sum(c["tokens"] if p is None else p for c, p in zip(cands, pruned))


def spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    rx, ry = (torch.tensor(v).argsort().argsort().double() for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else None


def auc(scores: list[float], labels: list[bool]) -> float | None:
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    if not pos or not neg:
        return None
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def policies(cands: list[dict], rule: str, max_tokens: int) -> dict[str, dict]:
    """Every policy's pick (candidate index) and tokens on one question's 16 recorded candidates."""
    out: dict[str, dict] = {}
    for k in (1, 2, 4, 8, 16):
        out[f"best-of-{k}"] = {"pick": pick(cands[:k], rule), "tokens": tokens_of(cands[:k])}
    for cap in (8, 16):
        k = 2
        while k < cap and not settled(torch.tensor([[c["final"]] for c in cands[:k]]), rule,
                                      [c["answer"] for c in cands[:k]], ADAPTIVE):
            k += 2
        out[f"adaptive <= {cap}"] = {"pick": pick(cands[:k], rule), "tokens": tokens_of(cands[:k]), "k": k}
    for name, (fr, keep) in SCHEDULES.items():
        at = at_tokens(fr, max_tokens)
        for variant, key in VARIANTS.items():
            for n in (8, 16):
                pr = replay_prune(cands[:n], at, keep, key=key)
                out[f"{name} {variant}, N={n}"] = {"pick": pick(cands[:n], rule, pr), "tokens": tokens_of(cands[:n], pr),
                                                   "pruned": pr}
    return out


def record(client: openai.OpenAI, model: str, messages: list[dict], seed: int, head: str, max_tokens: int,
           answer: Any) -> dict:
    """Part 1's requests: N candidates, nothing dropped, partial rewards at every schedule's checkpoints; twice, open
    and closed prefixes (the same seeds: the same candidates, checked)."""
    at = sorted({t for fr, _ in SCHEDULES.values() for t in at_tokens(fr, max_tokens)})
    t0 = time.monotonic()
    got = {}
    for variant in VARIANTS:
        r = client.chat.completions.create(
            model=model, messages=messages, temperature=1.0, seed=seed, max_tokens=max_tokens,
            extra_body={"rerank": {"candidates": N, "heads": [head], "return_candidates": True,
                                   "prune": {"at": at, "keep": 1, "close": variant == "closed"}}})
        got[variant] = r.model_extra["rerank"]
    info = got["open"]
    cands = [{"final": c["rewards"][head], "tokens": c["completion_tokens"], "finish": c["finish_reason"],
              "partial": {p["tokens"]: p["reward"] for p in c["partial_rewards"]},
              "partial_closed": {p["tokens"]: p["reward"] for p in d["partial_rewards"]},
              "answer": answer(c["text"], c["finish_reason"]) if answer else None}
             for c, d in zip(info["candidates"], got["closed"]["candidates"])]
    same = sum(c["text"] == d["text"] for c, d in zip(info["candidates"], got["closed"]["candidates"]))
    return {"cands": cands, "rule": info["rule"]["select"], "wall_s": time.monotonic() - t0, "same_candidates": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=60, help="questions per task (sst2, mc) for part 1")
    ap.add_argument("--helpful", type=int, default=16, help="helpful prompts (at most 16)")
    ap.add_argument("--timed", type=int, default=8, help="questions per task (and helpful prompts) timed in part 2")
    ap.add_argument("--repeats", type=int, default=2, help="part 3 repeats per mode")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", nargs="*", default=["sst2", "mc"])
    args = ap.parse_args()
    run = Run("benchmarks/early_rejection.py")
    qsets, qinfo = tasks(args.questions, args.tasks)
    qsets["helpful"] = [{"messages": [{"role": "user", "content": p}], "gold": None} for p in HELPFUL_PROMPTS[: args.helpful]]
    log_path = ROOT / "runs" / "early_rejection_server.log"
    proc, url = _serve.start_server({"ARBITER_HEADS_DIR": str(ROOT / "heads"), "ARBITER_THREADS": str(args.threads),
                                     "ARBITER_LOG_LEVEL": "info", "ARBITER_MAX_CANDIDATES": str(N),
                                     "ARBITER_REQUEST_TIMEOUT_S": "900"}, log_path)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
    model = client.models.list().data[0].id
    cards = {h["id"]: h for h in httpx.get(f"{url}/v1/heads").json()["data"]}
    dtype_line = next((ln for ln in log_path.read_text().splitlines() if "backbone dtype" in ln), "")
    res: dict[str, Any] = {"tasks": {}, "timed": {}, "throughput": {}}
    recorded: dict[str, list[dict]] = {}
    try:
        # --- part 1 ------------------------------------------------------------------------------------------
        for task, qs in qsets.items():
            head = "helpful" if task == "helpful" else TASK_HEAD[task]
            mt = HELPFUL_MAX_TOKENS if task == "helpful" else MAX_TOKENS[task]
            answer = None
            if task != "helpful":
                spec = _spec_of(cards[head], task)
                fn = spec.fn()

                def answer(text: str, finish: str, spec: Any = spec, fn: Any = fn) -> str | None:
                    return None if spec.finished_only and finish != "stop" else fn(text)

            rows = []
            t0 = time.monotonic()
            for i, q in enumerate(qs):
                row = record(client, model, q["messages"], 1000 + i, head, mt, answer)
                row["gold"] = q["gold"]
                rows.append(row)
                print(f"part 1 {task} {i + 1}/{len(qs)} {row['wall_s']:.1f} s", flush=True)
            recorded[task] = rows
            res["tasks"][task] = summarise(task, head, rows, mt, time.monotonic() - t0)
        # --- part 2 ------------------------------------------------------------------------------------------
        variant = best_variant(res["tasks"])  # the prefix scoring served in parts 2 and 3
        res["served_variant"] = variant
        for task, qs in qsets.items():
            head = "helpful" if task == "helpful" else TASK_HEAD[task]
            mt = HELPFUL_MAX_TOKENS if task == "helpful" else MAX_TOKENS[task]
            modes = ["single answer", "best-of-16", *SCHEDULES]
            walls: dict[str, list[float]] = {m: [] for m in modes}
            toks: dict[str, list[int]] = {m: [] for m in modes}
            agree = []
            for i, q in enumerate(qs[: args.timed]):
                for m in modes[i % len(modes):] + modes[: i % len(modes)]:
                    kw: dict[str, Any] = dict(model=model, messages=q["messages"], temperature=1.0, seed=1000 + i, max_tokens=mt)
                    if m != "single answer":
                        rr: dict[str, Any] = {"candidates": N, "heads": [head]}
                        if m in SCHEDULES:
                            fr, keep = SCHEDULES[m]
                            rr["prune"] = {"at_fraction": list(fr), "keep": keep, "close": variant == "closed"}
                        kw["extra_body"] = {"rerank": rr}
                    t0 = time.monotonic()
                    r = client.chat.completions.create(**kw)
                    walls[m].append(time.monotonic() - t0)
                    toks[m].append(r.usage.completion_tokens)
                    if m in SCHEDULES:
                        want = res["tasks"][task]["rows"][i]["policies"][f"{m} {variant}, N=16"]["pick"]
                        agree.append(r.model_extra["rerank"]["chosen"][0] == want)
                print(f"part 2 {task} {i + 1}", {m: round(walls[m][-1], 2) for m in modes}, flush=True)
            res["timed"][task] = {"questions": len(walls["best-of-16"]),
                                  "wall_s_median": {m: round(statistics.median(v), 3) for m, v in walls.items()},
                                  "tokens_mean": {m: round(statistics.mean(v), 1) for m, v in toks.items()},
                                  "over_single": {m: round(statistics.median(v) / statistics.median(walls["single answer"]), 3)
                                                  for m, v in walls.items()},
                                  "served_pick_equals_replay": f"{sum(agree)}/{len(agree)}"}
        # --- part 3 ------------------------------------------------------------------------------------------
        best = best_schedule(res["tasks"], variant)
        fr, keep = SCHEDULES[best]
        prompts = qsets["helpful"]
        for rep in range(args.repeats):
            for m in (["best-of-16", best] if rep % 2 == 0 else [best, "best-of-16"]):
                def one(i: int, m: str = m) -> int:
                    rr: dict[str, Any] = {"candidates": N, "heads": ["helpful"]}
                    if m != "best-of-16":
                        rr["prune"] = {"at_fraction": list(fr), "keep": keep, "close": variant == "closed"}
                    r = client.chat.completions.create(model=model, messages=prompts[i]["messages"], temperature=1.0,
                                                       seed=2000 + i, max_tokens=HELPFUL_MAX_TOKENS,
                                                       extra_body={"rerank": rr})
                    return r.usage.completion_tokens

                t0 = time.monotonic()
                with ThreadPoolExecutor(args.clients) as pool:
                    spent = list(pool.map(one, range(len(prompts))))
                wall = time.monotonic() - t0
                res["throughput"].setdefault(m, []).append({"requests": len(spent), "wall_s": round(wall, 2),
                                                            "req_per_s": round(len(spent) / wall, 4),
                                                            "tokens_per_s": round(sum(spent) / wall, 1)})
                print("part 3", m, res["throughput"][m][-1], flush=True)
        res["throughput_schedule"] = best
    finally:
        _serve.stop_server(proc)
    meta = {**run.finish(), **vars(args), "model": model, "server_dtype": dtype_line[-160:], "questions": qinfo,
            "schedules": {k: {"at_fraction": list(v[0]), "keep": v[1]} for k, v in SCHEDULES.items()}}
    REPORT.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": res}, indent=2) + "\n")
    png = plot(res["tasks"], REPORT.with_suffix(".png"))
    md = markdown(meta, res, png)
    REPORT.with_suffix(".md").write_text(md + "\n")
    print(md)


def summarise(task: str, head: str, rows: list[dict], max_tokens: int, seconds: float) -> dict:
    rule = rows[0]["rule"]
    for row in rows:
        row["policies"] = policies(row["cands"], rule, max_tokens)
    names = list(rows[0]["policies"])
    n = len(rows)
    out: dict[str, Any] = {"head": head, "rule": rule, "questions": n, "max_tokens": max_tokens, "seconds": round(seconds, 1),
                           "policies": {}}
    for name in names:
        picks = [(row["cands"][row["policies"][name]["pick"]], row) for row in rows]
        tok = statistics.mean(row["policies"][name]["tokens"] for row in rows)
        p: dict[str, Any] = {"tokens_mean": round(tok, 1)}
        if task == "helpful":
            p["reward_mean"] = round(statistics.mean(c["final"] for c, _ in picks), 4)
            p["reward_se"] = round(statistics.stdev(c["final"] for c, _ in picks) / n ** 0.5, 4) if n > 1 else None
            p["same_pick_as_best_of_16"] = round(sum(row["policies"][name]["pick"] == row["policies"]["best-of-16"]["pick"]
                                                     for row in rows) / n, 3)
        else:
            acc = sum(c["answer"] is not None and c["answer"] == row["gold"] for c, row in picks) / n
            p["acc"], p["se"] = round(acc, 4), round(accuracy_se(acc, n), 4)
        out["policies"][name] = p
    # How well the prefix ranks: per checkpoint, over the candidates alive there.
    at = sorted({t for row in rows for c in row["cands"] for t in c["partial"]})
    prefix: dict[str, dict] = {}
    for variant, key in VARIANTS.items():
        for t in at:
            rhos, scores, labels = [], [], []
            for row in rows:
                alive = [c for c in row["cands"] if t in c[key]]
                rho = spearman([c[key][t] for c in alive], [c["final"] for c in alive])
                if rho is not None:
                    rhos.append(rho)
                if task != "helpful":
                    scores += [c[key][t] for c in alive]
                    labels += [c["answer"] is not None and c["answer"] == row["gold"] for c in alive]
            pr = {"variant": variant, "tokens": t,
                  "alive_mean": round(statistics.mean(sum(t in c[key] for c in row["cands"]) for row in rows), 2),
                  "spearman_partial_final": round(statistics.mean(rhos), 3) if rhos else None, "questions": len(rhos)}
            if task != "helpful":
                a = auc(scores, labels)
                pr["auc_partial_right"] = round(a, 3) if a is not None else None
            prefix[f"{variant} {t}"] = pr
    out["same_candidates_open_closed"] = f"{sum(row['same_candidates'] for row in rows)}/{N * n}"
    if task != "helpful":
        finals = [(c["final"], c["answer"] is not None and c["answer"] == row["gold"]) for row in rows for c in row["cands"]]
        a = auc([f for f, _ in finals], [y for _, y in finals])
        out["auc_final_right"] = round(a, 3) if a is not None else None
    out["prefix"] = prefix
    out["rows"] = rows
    return out


def best_variant(tasks_res: dict) -> str:
    """The prefix scoring (open / closed) whose N=16 replays on the helpful prompts kept fixed best-of-16's pick most
    often, summed over the schedules: what parts 2 and 3 serve."""
    pol = tasks_res["helpful"]["policies"]
    return max(VARIANTS, key=lambda v: sum(pol[f"{s} {v}, N=16"]["same_pick_as_best_of_16"] for s in SCHEDULES))


def best_schedule(tasks_res: dict, variant: str) -> str:
    """The schedule whose N=16 replay on the helpful prompts kept fixed best-of-16's pick most often (then fewer
    tokens): what part 3 serves."""
    pol = tasks_res["helpful"]["policies"]
    return max(SCHEDULES, key=lambda s: (pol[f"{s} {variant}, N=16"]["same_pick_as_best_of_16"],
                                         -pol[f"{s} {variant}, N=16"]["tokens_mean"]))


def plot(tasks_res: dict, png: Path) -> Path:
    from arbiter.training.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks_res), figsize=(5 * len(tasks_res), 4))
    axes = axes if len(tasks_res) > 1 else [axes]
    for ax, (task, t) in zip(axes, tasks_res.items()):
        key = "reward_mean" if task == "helpful" else "acc"
        groups = (("fixed best-of-k", "o-", lambda s: s.startswith("best-of-")), ("adaptive", "s", lambda s: s.startswith("adaptive")),
                  ("prune, open prefix", "^", lambda s: " open," in s), ("prune, closed prefix", "v", lambda s: " closed," in s))
        for label, marker, member in groups:
            pts = [(p["tokens_mean"], p[key], name) for name, p in t["policies"].items() if member(name)]
            if not pts:
                continue
            xs, ys, names = zip(*pts)
            ax.plot(xs, ys, marker, label=label)
            for x, y, lab in zip(xs, ys, names):
                short = lab.replace("prune ", "").replace(" open", "").replace(" closed", "").replace("best-of-", "k=")
                ax.annotate(short, (x, y), fontsize=5)
        ax.set_title(f"{task} (head {t['head']}, {t['questions']} questions)")
        ax.set_xlabel("completion tokens per request (mean)")
        ax.set_ylabel("accuracy" if key == "acc" else "mean reward of the pick (helpful)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, png)


def markdown(meta: dict, res: dict, png: Path | None) -> str:
    lines = ["# Early rejection: pruning vs fixed best-of-N vs adaptive N, through the API", "", Run.header(meta), "",
             f"Server: HF engine, {meta['threads']} threads; {meta['server_dtype']}. Seeds fixed per question "
             "(1000 + i). Part 1 replays every policy from one recorded N=16 request per question (module docstring: "
             "exact, by the server's rules); part 2 serves them for real; part 3 is 8 concurrent clients.", ""]
    if png is not None:
        lines += [f"![accuracy / reward against tokens]({png.name})", ""]
    for task, t in res["tasks"].items():
        key = "helpful" if task == "helpful" else "task"
        lines += [f"## {task}: head `{t['head']}` (rule {t['rule']}), {t['questions']} questions, max_tokens {t['max_tokens']}", ""]
        if key == "task":
            lines += ["| policy | accuracy +- SE | completion tokens / request | tokens vs best-of-16 |", "|---|---|---|---|"]
        else:
            lines += ["| policy | mean final reward of the pick +- SE | same pick as best-of-16 | completion tokens / request | tokens vs best-of-16 |",
                      "|---|---|---|---|---|"]
        full = t["policies"]["best-of-16"]["tokens_mean"]
        for name, p in t["policies"].items():
            share = f"{p['tokens_mean'] / full:.2f}" if full else "-"
            if key == "task":
                lines.append(f"| {name} | {p['acc']:.3f} +- {p['se']:.3f} | {p['tokens_mean']} | {share} |")
            else:
                lines.append(f"| {name} | {p['reward_mean']:.3f} +- {p['reward_se']:.3f} | {p['same_pick_as_best_of_16']:.2f} | "
                             f"{p['tokens_mean']} | {share} |")
        lines += ["", "How well a prefix ranks (candidates alive at the checkpoint):", "",
                  "| prefix scored | checkpoint (tokens) | alive (mean of 16) | Spearman partial vs final reward (mean over questions) |"
                  + (" AUC partial reward for a right answer |" if key == "task" else ""),
                  "|---|---|---|---|" + ("---|" if key == "task" else "")]
        for pr in t["prefix"].values():
            lines.append(f"| {pr['variant']} | {pr['tokens']} | {pr['alive_mean']} | {pr['spearman_partial_final']} "
                         f"({pr['questions']} q) |" + (f" {pr['auc_partial_right']} |" if key == "task" else ""))
        lines.append(f"Open and closed recordings returned the same candidates: {t['same_candidates_open_closed']}.")
        if key == "task":
            lines += ["", f"For comparison, the AUC of the FINAL reward for a right answer: {t['auc_final_right']}."]
        lines.append("")
    lines += [f"## Served wall time per request (part 2; prefixes scored {res['served_variant']})", "",
              "| data | questions | " + " | ".join(next(iter(res["timed"].values()))["wall_s_median"]) + " | served pruned pick = replay |",
              "|---|---|" + "---|" * (len(next(iter(res["timed"].values()))["wall_s_median"]) + 1)]
    for task, tm in res["timed"].items():
        cells = [f"{tm['wall_s_median'][m]} s ({tm['over_single'][m]:.2f}x; {tm['tokens_mean'][m]} tok)" for m in tm["wall_s_median"]]
        lines.append(f"| {task} | {tm['questions']} | " + " | ".join(cells) + f" | {tm['served_pick_equals_replay']} |")
    lines += ["", "Median wall time (x: over the single answer's median; mean completion tokens per request).", "",
              f"## Throughput, {meta['clients']} concurrent clients, helpful prompts (part 3)", "",
              "| mode | runs | requests/s (each run) | completion tokens/s (each run) |", "|---|---|---|---|"]
    for m, runs in res["throughput"].items():
        lines.append(f"| {m} | {len(runs)} | {', '.join(str(r['req_per_s']) for r in runs)} | "
                     f"{', '.join(str(r['tokens_per_s']) for r in runs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
