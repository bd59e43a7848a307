"""Two user tasks that no shipped head or builtin covers, written as the JSONL a user would bring to
`arbiter train verifier` (README "Verifying answers"), for benchmarks/bestofn_api.py's `user:<head>` tasks:

  kind     "Is this a math word problem?" yes / no: GSM8K problems (yes) against CommonsenseQA and OpenBookQA
           question stems (no), shuffled, balanced. A task this model can read (label words yes / no).
  judge    "Which response follows the instruction better?" A / B: PandaLM's human-labelled pairs (majority of
           three annotators, ties dropped), both orders of each pair so that the letter carries no prior; the
           options ride in the row's "choices" (choice_letter, canonical "{answer}. {option}"). A task this model
           barely reads.

Writes runs/user_tasks/{kind,judge}.jsonl (runs/ is not committed; the rows are a deterministic function of the
shared data and the seed, so the heads' provenance re-derives their held-out rows). Usage:
    python benchmarks/user_tasks.py [--rows 600]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "runs" / "user_tasks"
KIND_Q = "Is the following a math word problem? Answer yes or no.\n\n{text}"
JUDGE_Q = ("Which response follows the instruction better?\n\nInstruction: {instruction}{input}\n\n"
           "A. {a}\nB. {b}\n\nAnswer with the letter.")


def _jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def kind_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    math = [r["question"].strip() for r in _jsonl_gz(DATA / "gsm8k" / "train.jsonl.gz")]
    other = [r["question"]["stem"].strip() for r in _jsonl_gz(DATA / "commonsense_qa" / "train_rand_split.jsonl.gz")]
    other += [json.loads(line)["query"].strip()
              for line in (DATA / "openbookqa" / "openbook_qa.jsonl").read_text().splitlines() if line.strip()]
    rng.shuffle(math)
    rng.shuffle(other)
    rows = [{"question": KIND_Q.format(text=t), "answer": "yes"} for t in math[: n // 2]]
    rows += [{"question": KIND_Q.format(text=t), "answer": "no"} for t in other[: n - n // 2]]
    rng.shuffle(rows)
    return rows


def judge_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for r in json.loads((DATA / "pandalm" / "testset-v1.json").read_text()):
        votes = [int(r[f"annotator{k}"]) for k in (1, 2, 3)]
        best = max((1, 2), key=votes.count)
        if votes.count(best) < 2:
            continue  # no majority for either response (ties dropped)
        good, bad = (r["response1"], r["response2"]) if best == 1 else (r["response2"], r["response1"])
        if not isinstance(good, str) or not isinstance(bad, str):
            continue  # a response stored as a JSON value, not text
        if not good.strip() or not bad.strip() or good.strip() == bad.strip():
            continue
        inp = f"\nInput: {r['input']}" if r.get("input") else ""
        flip = rng.random() < 0.5
        a, b = (bad, good) if flip else (good, bad)
        rows.append({"question": JUDGE_Q.format(instruction=r["instruction"], input=inp, a=a.strip(), b=b.strip()),
                     "choices": [a.strip(), b.strip()], "answer": "B" if flip else "A"})
    rng.shuffle(rows)
    return rows[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("kind", kind_rows(args.rows, args.seed)), ("judge", judge_rows(args.rows, args.seed))):
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        answers = {a: sum(r["answer"] == a for r in rows) for a in sorted({r["answer"] for r in rows})}
        print(f"{path}: {len(rows)} rows, answers {answers}")


if __name__ == "__main__":
    main()
