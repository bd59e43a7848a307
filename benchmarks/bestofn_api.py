"""Best-of-N through the API: does rerank return better answers than plain sampling, on questions no head saw?

Starts `arbiter serve` (embedded SmolLM2-135M, the committed heads, dtype auto) and sends held-out questions
through `/v1/chat/completions` with the official `openai` client. Per question, on the same seeds:
  greedy      temperature 0, n=1;
  rerank N    one request `rerank: {candidates: N, heads: [<task head>], return_candidates: true}` with NO `select`:
              the server applies the head's own rule ("head rule", reported in `rerank.rule`); from the same N
              returned candidates and rewards also n=1 (candidate 0: plain sampling), argmax, weighted vote and
              majority vote (the server's `rerank.select` code) and oracle pass@N (any candidate right).
Questions that share no text with any head's training data:
  sst2   rows of the shared `sst2/dev` with no substring relation (either direction, after lower-casing and
         collapsing whitespace) to any SST-2 row a committed head trained on (for a verifier head: every question
         it sampled, whatever its split; for a pair head: its `limit` first rows); exact duplicates once;
  mc     the `mc` verifier head's test questions (split by a hash of the question text with exact-text
         de-duplication, re-derived from the head's provenance: never trained on, never used to pick);
  svamp / gsm8k  the first 100 problems of each source's seeded order (head `math`; its pairs came from later ones);
  user:<head>    a user's task: the test split of verifier head <head> (a user JSONL, re-derived from its
                 provenance), served from --heads-dir.
The free baselines, from the same N candidates (docs/methods.md "Confidence baselines"): the confidences the server
computed for each candidate while decoding it (returned with `return_candidates`), under the server's training-free
policies: mean log-prob, DeepConf and self-certainty argmax, DeepConf's weighted vote (all candidates, top 90 %,
top 10 %), self-certainty's Borda vote and CISC (`arbiter.confidence.RULES`).
For `select: verify` the report also gives the extra forward's share of each request's wall time.
Writes benchmarks/reports/<report>.md (and .json). Usage:
    python benchmarks/bestofn_api.py [--questions 150] [--n 8] [--temperature 1.0] [--tasks sst2 mc user:<head>]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import torch  # noqa: E402

from arbiter import confidence  # noqa: E402
from arbiter.selection import AdaptiveRule, select, settled  # noqa: E402
from arbiter.training.data import load_choices, load_math, math_prompt  # noqa: E402
from arbiter.training.stats import accuracy_se, paired_gain  # noqa: E402
from arbiter.training.verifier import (  # noqa: E402
    CHOICE_SPEC,
    MATH_SPEC,
    SST2_SPEC,
    AnswerSpec,
    normalise_text,
    spec_of,
)

import _serve  # benchmarks/ is on sys.path: the script's own directory
from _provenance import git_commit  # benchmarks/ is on sys.path: the script's own directory

ROOT = Path(__file__).resolve().parents[1]
HEADS = ROOT / "heads"
ADAPTIVE = AdaptiveRule(round=2, margin=1.0, supermajority=0.75)  # the server's defaults
MATH_HELD = 100
TASK_HEAD = {"sst2": "sst2", "mc": "mc", "svamp": "math", "gsm8k": "math"}
TASK_SPEC = {"sst2": SST2_SPEC, "mc": CHOICE_SPEC, "svamp": MATH_SPEC, "gsm8k": MATH_SPEC}
MAX_TOKENS = {"sst2": 16, "mc": 24, "svamp": 200, "gsm8k": 200}
# The head rule must beat the best free baseline by this much (issue: answer-level verification), and reach MIN_ACC.
GOALS = {"sst2": 0.25, "mc": 0.12}
MIN_ACC = {"sst2": 0.80}
RULES = ("argmax", "weighted_vote", "majority_vote")
BASELINES = ("n1", "majority_vote", "weighted_vote", *(key for key, _, _, _ in confidence.RULES))


def _provenance(head: str, heads: Path = HEADS) -> dict[str, Any]:
    return json.loads((heads / head / "head_config.json").read_text()).get("provenance", {})


def sst2_training_texts() -> tuple[list[str], list[str]]:
    """(normalised SST-2 texts any committed head trained on, which heads they came from)."""
    from arbiter.training.verifier import seen_questions

    texts, used = [], []
    for cfg in sorted(HEADS.glob("*/head_config.json")):
        prov = json.loads(cfg.read_text()).get("provenance", {})
        data = prov.get("data", [])
        if not any(str(d).startswith("sst2") for d in data):
            continue
        used.append(cfg.parent.name)
        if prov.get("recipe") == "verifier":
            texts += [normalise_text(q.text) for q in seen_questions(prov)]  # answer_limit's extra questions too
        else:  # a pair head: its first `limit` rows of the seeded order per source
            for src in data:
                if str(src).startswith("sst2"):
                    qs, _ = load_choices(str(src), limit=prov.get("limit"), seed=prov.get("seed", 0))
                    texts += [normalise_text(q.meta["sentence"]) for q in qs]
    return texts, used


def sst2_disjoint(limit: int) -> tuple[list[Any], dict[str, Any]]:
    """SST-2 dev questions with no substring relation to any training text (module docstring)."""
    train, heads = sst2_training_texts()
    joined = "\n".join(train)
    train_set = sorted(set(train), key=len)
    dev, _ = load_choices("sst2/dev", seed=0)
    kept, seen, stats = [], set(), {"dev_rows": len(dev), "duplicate": 0, "inside_training_text": 0,
                                    "contains_training_text": 0, "heads": heads, "training_texts": len(train)}
    for q in dev:
        d = normalise_text(q.meta["sentence"])
        if d in seen:
            stats["duplicate"] += 1
            continue
        seen.add(d)
        if d in joined:
            stats["inside_training_text"] += 1
            continue
        if any(t in d for t in train_set if len(t) <= len(d)):
            stats["contains_training_text"] += 1
            continue
        kept.append(q)
    stats["disjoint"] = len(kept)
    return kept[:limit], stats


def tasks(n: int, only: list[str] | None, heads_dir: Path = HEADS) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    from arbiter.training.verifier import held_out_questions

    out: dict[str, list[dict]] = {}
    info: dict[str, Any] = {}
    if not only or "sst2" in only:
        qs, info["sst2"] = sst2_disjoint(n)
        out["sst2"] = [{"messages": q.prompt, "gold": SST2_SPEC.canonical(q.options[q.answer])} for q in qs]
    if not only or "mc" in only:
        prov = _provenance("mc")
        if prov.get("recipe") != "verifier":
            raise SystemExit("heads/mc is not a verifier head: its test split cannot be re-derived")
        held = held_out_questions(prov, "test")
        info["mc"] = {"test_questions": len(held), "sources": prov["data"], "limit": prov["limit"],
                      "split": prov["splits"]}
        out["mc"] = [{"messages": q.messages, "gold": q.gold} for q in held[:n]]
    for src in ("svamp", "gsm8k"):
        if only and src in only:
            probs, _ = load_math(src, seed=0)
            out[src] = [{"messages": math_prompt(p), "gold": p.answer} for p in probs[: min(MATH_HELD, n)]]
    for task in only or ():
        if task.startswith("user:"):
            head = task.split(":", 1)[1]
            prov = _provenance(head, heads_dir)
            held = held_out_questions(prov, "test")
            info[task] = {"test_questions": len(held), "sources": prov["data"], "limit": prov["limit"],
                          "split": prov["splits"]}
            TASK_HEAD[task] = head
            TASK_SPEC[task] = spec_of(prov)
            MAX_TOKENS[task] = prov["sampling"]["max_tokens"]
            # a row's own options travel as rerank.choices (a user's options may span lines the prompt cannot list)
            out[task] = [{"messages": q.messages, "gold": q.gold, **({"choices": q.meta["options"]}
                                                                     if q.meta.get("options") else {})} for q in held[:n]]
    return out, info


def _spec_of(card: dict[str, Any], task: str) -> AnswerSpec:
    """The extractor the vote columns use: the head's rule's, else the task's."""
    rule = card.get("selection") or {}
    if rule.get("extractor"):
        return AnswerSpec(rule["extractor"], rule.get("pattern"), rule.get("field"),
                          tuple(rule["labels"]) if rule.get("labels") else None,
                          finished_only=TASK_SPEC[task].finished_only)
    return TASK_SPEC[task]


def rerender(report: Path) -> None:
    """Rewrite ``report``.md from its .json (the markdown's wording changed, the measurements did not)."""
    data = json.loads(report.with_suffix(".json").read_text())
    report.with_suffix(".md").write_text(markdown(data["meta"], data["results"], argparse.Namespace(n=data["meta"]["n"])) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=150, help="questions per task")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", nargs="*", default=["sst2", "mc"], help="sst2, mc, svamp, gsm8k")
    ap.add_argument("--report", default="bestofn_api", help="report name under benchmarks/reports/")
    ap.add_argument("--concurrency", type=int, default=4, help="questions in flight at once (the server batches them)")
    ap.add_argument("--heads-dir", default=str(HEADS), help="the heads the server loads (user:<head> tasks' heads)")
    ap.add_argument("--merge", action="store_true", help="add these tasks to the report's existing ones (each task "
                                                          "keeps the command, commit and date of its own run)")
    args = ap.parse_args()
    report = ROOT / "benchmarks" / "reports" / args.report
    commit = git_commit()
    heads_dir = Path(args.heads_dir).resolve()
    qsets, qinfo = tasks(args.questions, args.tasks, heads_dir)
    log_path = ROOT / "runs" / f"{args.report}_server.log"  # runs/ is not committed
    proc, url = _serve.start_server({"ARBITER_HEADS_DIR": str(heads_dir), "ARBITER_THREADS": str(args.threads),
                                     "ARBITER_LOG_LEVEL": "info", "ARBITER_MAX_CANDIDATES": "16",
                                     "ARBITER_REQUEST_TIMEOUT_S": "900"}, log_path)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
    model = client.models.list().data[0].id
    dtype_line = next((ln for ln in log_path.read_text().splitlines() if "backbone dtype" in ln), "")
    cards = {h["id"]: h for h in httpx.get(f"{url}/v1/heads").json()["data"]}
    results: dict[str, Any] = {}
    t_start = time.monotonic()
    try:
        for task, qs in qsets.items():
            head = TASK_HEAD[task]
            if head not in cards:
                print(f"skipping {task}: head {head!r} is not committed", flush=True)
                continue
            spec = _spec_of(cards[head], task)
            fn = spec.fn()

            def answer(text: str, finish: str, spec: AnswerSpec = spec, fn: Any = fn) -> str | None:
                return None if spec.finished_only and finish != "stop" else fn(text)

            def ask(i: int, q: dict, head: str = head, task: str = task, answer: Any = answer) -> dict:
                g = client.chat.completions.create(model=model, messages=q["messages"], temperature=0,
                                                   max_tokens=MAX_TOKENS[task])
                t_req = time.monotonic()
                r = client.chat.completions.create(
                    model=model, messages=q["messages"], temperature=args.temperature, seed=1000 + i,
                    max_tokens=MAX_TOKENS[task],
                    extra_body={"rerank": {"candidates": args.n, "heads": [head], "return_candidates": True,
                                           **({"choices": q["choices"]} if "choices" in q else {})}})
                wall = time.monotonic() - t_req
                info = r.model_extra["rerank"]
                rows = info["candidates"]
                answers = [answer(c["text"], c["finish_reason"]) for c in rows]
                right = [a is not None and a == q["gold"] for a in answers]
                rew = torch.tensor([[c["rewards"][head]] for c in rows])
                out = {"gold": q["gold"], "greedy": answer(g.choices[0].message.content, g.choices[0].finish_reason) == q["gold"],
                       "n1": right[0], "head_rule": right[info["chosen"][0]], "rule": info["rule"],
                       "oracle": any(right), "tokens": sum(c["completion_tokens"] for c in rows),
                       "answers": answers, "rewards": rew[:, 0].tolist(), "right": right,
                       "texts": [c["text"] for c in rows], "completion_tokens": [c["completion_tokens"] for c in rows],
                       "messages": q["messages"], "wall_s": wall, "confidences": [c.get("confidence") for c in rows],
                       "verify": info.get("verify"), "verify_tokens": (r.usage.model_extra or {}).get("verify_tokens")}
                for rule in RULES:
                    out[rule] = right[select(rew, rule, answers).order[0]]
                # Adaptive N replayed on the same candidates with the server's stopping rule (rerank.settled):
                # candidate i is seeded per index, so a server running rounds of 2 samples exactly this prefix.
                for rule in ("argmax", "majority_vote"):
                    k = 2
                    while k < len(rows) and not settled(rew[:k], rule, answers[:k], ADAPTIVE):
                        k += 2
                    k = min(k, len(rows))
                    out[f"adaptive_{rule}"] = right[select(rew[:k], rule, answers[:k]).order[0]]
                    out[f"adaptive_{rule}_k"] = k
                    out[f"adaptive_{rule}_tokens"] = sum(c["completion_tokens"] for c in rows[:k])
                return out

            t0 = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                rows = list(pool.map(ask, range(len(qs)), qs))
            seconds = round(time.monotonic() - t0, 1)
            mismatched = free_baselines(rows)
            n = len(rows)
            cols = ("greedy", "n1", "head_rule", *RULES, *(key for key, _, _, _ in confidence.RULES), "oracle",
                    "adaptive_argmax", "adaptive_majority_vote")
            res: dict[str, Any] = {"head": head, "questions": n, "seconds": seconds, "confidence_missing": mismatched,
                                   "rule": rows[0]["rule"] if rows else None, "tokens_fixed_n": sum(x["tokens"] for x in rows)}
            for k in cols:
                acc = sum(x[k] for x in rows) / n
                res[k] = {"acc": acc, "se": accuracy_se(acc, n), "wins": sum(x[k] and not x["n1"] for x in rows),
                          "losses": sum(x["n1"] and not x[k] for x in rows)}
            for k in ("adaptive_argmax", "adaptive_majority_vote"):
                res[k].update(mean_candidates=sum(x[f"{k}_k"] for x in rows) / n,
                              tokens=sum(x[f"{k}_tokens"] for x in rows))
            golds = [x["gold"] for x in rows]
            res["majority_class"] = max(golds.count(g) for g in set(golds)) / n if task == "sst2" else None
            best = max(BASELINES, key=lambda k: res[k]["acc"])
            gain, se = paired_gain([x["head_rule"] for x in rows], [x[best] for x in rows])
            res["best_baseline"] = {"column": best, "acc": res[best]["acc"], "gain": gain, "gain_se": se,
                                    "wins": sum(x["head_rule"] and not x[best] for x in rows),
                                    "losses": sum(x[best] and not x["head_rule"] for x in rows)}
            if task in GOALS:
                bar = max(res[best]["acc"] + GOALS[task], MIN_ACC.get(task, 0.0))
                res["goal"] = {"bar": bar, "met": res["head_rule"]["acc"] >= bar}
            shares = [x["verify"]["seconds"] / x["wall_s"] for x in rows if x.get("verify") and x["wall_s"] > 0]
            if shares:
                res["verify_cost"] = {"mean_share_of_wall": sum(shares) / len(shares),
                                      "max_share_of_wall": max(shares),
                                      "mean_answers_scored": sum(x["verify"]["answers_scored"] for x in rows if x.get("verify")) / len(shares),
                                      "mean_tokens": sum(x["verify"]["tokens"] for x in rows if x.get("verify")) / len(shares)}
            for x in rows:
                del x["messages"]
            res["rows"] = rows
            results[task] = res
            print(task, n, {k: round(res[k]["acc"], 3) for k in cols}, flush=True)
    finally:
        _serve.stop_server(proc)
    seconds = time.monotonic() - t_start
    meta = {"command": "python " + " ".join(["benchmarks/bestofn_api.py", *sys.argv[1:]]), "commit": commit,
            "n": args.n, "temperature": args.temperature, "threads": args.threads, "model": model,
            "server_dtype": dtype_line[-200:], "seconds": round(seconds, 1), "questions": qinfo,
            "cpu": _cpu(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for r in results.values():
        r["run"] = {k: meta[k] for k in ("command", "commit", "date", "seconds", "cpu", "server_dtype")}
    if args.merge and report.with_suffix(".json").is_file():
        old = json.loads(report.with_suffix(".json").read_text())
        results = {**{k: v for k, v in old["results"].items() if k not in results}, **results}
        meta["questions"] = {**old["meta"].get("questions", {}), **meta["questions"]}
    report.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    report.with_suffix(".md").write_text(markdown(meta, results, args) + "\n")
    print(markdown(meta, results, args))


def free_baselines(rows: list[dict]) -> int:
    """Each row's confidence columns (arbiter.confidence.RULES) from the same candidates: the confidences the server
    computed while decoding them (``rerank.candidates[].confidence``: the decode step's full distribution, exact)
    under the server's selection code (``confidence.picks``). Returns how many candidates came back without one."""
    missing = 0
    for x in rows:
        # a candidate with no answer tokens has no confidence: the API sends its scores as null (JSON has no -inf)
        conf = [confidence.Confidence(**{k: float("-inf") if v is None else v for k, v in c.items()}) if c else None
                for c in x["confidences"]]
        missing += sum(c is None for c in conf)
        x["confidence"] = {name: [c.score(name) if c and c.tokens else None for c in conf] for name in confidence.SCORE_NAMES}
        for col, pick in confidence.picks(conf, x["answers"]).items():
            x[col] = x["right"][pick]
    return missing


def _cpu() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def markdown(meta: dict, results: dict, args: Any) -> str:
    n = args.n
    cols = [("greedy", "greedy"), ("n1", "n=1"), ("head_rule", "**head rule** (the server's pick)"),
            ("argmax", "argmax"), ("weighted_vote", "weighted vote"), ("majority_vote", f"majority of {n}"),
            ("oracle", f"oracle pass@{n}")]
    free = [(key, label) for key, label, _, _ in confidence.RULES]
    lines = ["# Best-of-N through the API, on questions no head trained on", "",
             *[f"{task}: `{r['run']['command']}` on commit `{r['run']['commit']}`, {r['run']['date']}, "
               f"{r['run']['seconds'] / 60:.1f} min, {r['run']['cpu']}; server log: `{r['run']['server_dtype'][-140:]}`."
               for task, r in results.items() if "run" in r],
             "", f"`arbiter serve` on {meta['model']} with the heads of `--heads-dir`, {meta['threads']} threads.", "",
             f"Per question: one greedy request, and one rerank request (N={n}, temperature {meta['temperature']}, seed "
             "1000 + question index, `return_candidates`, no `select`: the server applies the head's own rule). "
             "n=1 (candidate 0), argmax, weighted vote, majority vote and oracle are read from the same candidates "
             "and rewards with the server's selection code; the training-free columns (the model's own confidence, "
             "free: docs/methods.md \"Confidence baselines\") from the confidences the server computed for the same "
             "candidates while decoding them, under the server's training-free policies. Accuracy +- standard error; "
             "(wins / losses) are paired against n=1 on the same questions.", "",
             "| task | questions | " + " | ".join(c for _, c in cols) + " | tokens (fixed N) |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    def cell(r: dict, k: str) -> str:
        c = r.get(k)
        if c is None:
            return "-"
        return f"{c['acc']:.3f} +- {c['se']:.3f}" + (f" ({c['wins']} / {c['losses']})" if k not in ("greedy", "n1") else "")

    for task, r in results.items():
        lines.append(f"| {task} (head `{r['head']}`, rule `{(r['rule'] or {}).get('select')}`) | {r['questions']} | "
                     + " | ".join(cell(r, k) for k, _ in cols) + f" | {r['tokens_fixed_n']} |")
    lines += ["", "Training-free rules on the same candidates (no head; `select` = confidence, deepconf_vote, borda, "
              "cisc with the score named; DeepConf's group confidences over 2048-token windows equal the trace mean "
              "on answers this short):", "",
              "| task | " + " | ".join(c for _, c in free) + " |", "|---|" + "---|" * len(free)]
    for task, r in results.items():
        lines.append(f"| {task} | " + " | ".join(cell(r, k) for k, _ in free) + " |")
    lines += ["", "The head's rule against the best baseline a user gets at the same N (the best of n=1, the majority "
              "vote and every training-free rule above, all free, and the weighted vote, which uses the head's text "
              "rewards; paired over the same questions):", ""]
    for task, r in results.items():
        b = r["best_baseline"]
        line = (f"- {task}: head rule {r['head_rule']['acc']:.3f} vs {b['column']} {b['acc']:.3f}: gain {b['gain']:+.3f} "
                f"+- {b['gain_se']:.3f} (wins / losses {b['wins']} / {b['losses']})")
        if "goal" in r:
            line += (f"; goal >= {r['goal']['bar']:.3f} (best baseline + {GOALS[task]:.2f}"
                     + (f", and >= {MIN_ACC[task]:.2f}" if task in MIN_ACC else "") + f"): **{'met' if r['goal']['met'] else 'not met'}**")
        if r.get("majority_class"):
            line += f". Majority-class baseline: {r['majority_class']:.3f}"
        lines.append(line + ".")
    costs = {t: r["verify_cost"] for t, r in results.items() if r.get("verify_cost")}
    if costs:
        lines += ["", "What verification cost (`rerank.verify`: the one extra score pass over the distinct answers in "
                  "canonical form, measured by the server; its share of each request's wall time as the client saw it):", ""]
        for t, c in costs.items():
            lines.append(f"- {t}: {c['mean_answers_scored']:.2f} answers scored per request, {c['mean_tokens']:.0f} tokens; "
                         f"{c['mean_share_of_wall']:.1%} of the request's wall time on average (max {c['max_share_of_wall']:.1%}).")
    missing = {t: r["confidence_missing"] for t, r in results.items() if "confidence_missing" in r}
    if missing:
        lines += ["", "Candidates the server returned without a confidence: "
                  + ", ".join(f"{t} {m}" for t, m in missing.items()) + "."]
    lines += ["", f"Adaptive N (rounds of 2 up to {n}, replayed on the same candidates with the server's stopping rule "
              f"`rerank.settled`: argmax stops when the best reward beats the runner-up by > {ADAPTIVE.margin}, majority "
              f"when one answer holds >= {ADAPTIVE.supermajority} of the answered votes):", "",
              "| task | adaptive argmax (mean N, tokens vs fixed N) | adaptive majority (mean N, tokens vs fixed N) |",
              "|---|---|---|"]
    for task, r in results.items():
        tf = max(r["tokens_fixed_n"], 1)
        lines.append(f"| {task} | " + " | ".join(
            f"{r[k]['acc']:.3f} +- {r[k]['se']:.3f} (N {r[k]['mean_candidates']:.1f}, {r[k]['tokens'] / tf:.0%})"
            for k in ("adaptive_argmax", "adaptive_majority_vote")) + " |")
    q = meta["questions"]
    lines += ["", "Questions:"]
    if "sst2" in q:
        s = q["sst2"]
        lines.append(f"- sst2: of {s['dev_rows']} `sst2/dev` rows, {s['duplicate']} exact duplicates, "
                     f"{s['inside_training_text']} inside and {s['contains_training_text']} containing one of the "
                     f"{s['training_texts']} SST-2 texts that heads {', '.join(f'`{h}`' for h in s['heads'])} trained on; "
                     f"{s['disjoint']} disjoint rows, the first {results.get('sst2', {}).get('questions', 0)} of the seeded order used.")
    if "mc" in q:
        m = q["mc"]
        lines.append(f"- mc: the `mc` head's test split ({m['test_questions']} questions of {', '.join(m['sources'])}, "
                     f"limit {m['limit']} per source, split {m['split']['by']}, test fraction {m['split']['test_fraction']}); "
                     f"the first {results.get('mc', {}).get('questions', 0)} used.")
    for t in results:
        if t.startswith("user:"):
            m = q[t]
            lines.append(f"- {t}: head `{results[t]['head']}`'s test split ({m['test_questions']} questions of "
                         f"{', '.join(m['sources'])}, limit {m['limit']}, split {m['split']['by']}); the first "
                         f"{results[t]['questions']} used.")
    for t in ("svamp", "gsm8k"):
        if t in results:
            lines.append(f"- {t}: the first {MATH_HELD} problems of the seeded order (head `math`'s pairs came from later ones).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
