"""load_pairs / save_pairs / split_pairs: builtin preference sources and TRL files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Sequence

from .choice import CHOICE_BUILTINS, choices_to_pairs, load_choices
from .io import _data_file, _iter_jsonl, _read_table
from .records import HH_SPLITS, DataError, DataReport, PreferencePair, _prompt_key
from .rows import _PAIR_COLUMNS, _hh_convert, _RowError, _rows_to_pairs, _trl_convert


def _load_hh(split: str) -> tuple[list[PreferencePair], DataReport]:
    source = f"hh-rlhf/{split}"
    report = DataReport(source)
    rows = _iter_jsonl(_data_file("hh_rlhf", split, "test.jsonl.gz"), report)
    return _rows_to_pairs(rows, report, source, _hh_convert), report


def _builtin_pairs(name: str, seed: int) -> tuple[list[PreferencePair], DataReport] | None:
    """Pairs of a builtin source, or None if ``name`` is not a builtin."""
    if name == "hh-rlhf":
        out: list[PreferencePair] = []
        rep: DataReport | None = None
        for split in ("helpful-online", "helpful-rejection-sampled"):
            p, r = _load_hh(split)
            out += p
            rep = r if rep is None else rep.merge(r)
        assert rep is not None
        rep.source = "hh-rlhf"
        return out, rep
    if name.startswith("hh-rlhf/"):
        split = name.split("/", 1)[1]
        if split not in HH_SPLITS:
            raise DataError(f"unknown hh-rlhf split {split!r}; available: {', '.join(HH_SPLITS)}")
        return _load_hh(split)
    if name == "pandalm":
        return _load_pandalm()
    if name == "autoj":
        report = DataReport("autoj")
        rows = _iter_jsonl(_data_file("autoj", "autoj_pairwise.jsonl.gz"), report)
        return _rows_to_pairs(rows, report, "autoj", _autoj_convert), report
    if name in CHOICE_BUILTINS:
        questions, report = load_choices(name)
        # load_choices already counted the unusable rows; each usable question makes exactly one pair.
        return choices_to_pairs(questions, seed=seed), report
    return None


def _pandalm_convert(row: Any):
    """PandaLM: majority vote of 3 annotators (1: response1 better, 2: response2 better, 0: tie)."""
    if not isinstance(row, dict):
        raise _RowError("unparseable", f"row is {type(row).__name__}, not an object")
    for k in ("instruction", "response1", "response2", "annotator1", "annotator2", "annotator3"):
        if row.get(k) is None:
            raise _RowError("missing_field", f"no {k!r} field")
    votes = [row["annotator1"], row["annotator2"], row["annotator3"]]
    if any(v not in (0, 1, 2) for v in votes):
        raise _RowError("unparseable", f"labels {votes} are not all in 0/1/2")
    winner = next((v for v in (1, 2, 0) if votes.count(v) >= 2), None)
    if winner in (None, 0):  # a majority for "tie", or a 1/2/0 split: no preference to learn
        raise _RowError("tie", f"labels {votes}")
    instruction, inp = str(row["instruction"]).strip(), str(row.get("input") or "").strip()
    if not instruction:
        raise _RowError("missing_field", "empty instruction")
    prompt = [{"role": "user", "content": f"{instruction}\n\n{inp}" if inp else instruction}]
    # str(): a few responses are JSON booleans (rows 157-164 hold `true` for a model that answered "True").
    r1, r2 = str(row["response1"]).strip(), str(row["response2"]).strip()
    chosen, rejected = (r1, r2) if winner == 1 else (r2, r1)
    extra = {"idx": row.get("idx"), "cmp_key": row.get("cmp_key"), "votes": votes}
    return prompt, chosen, rejected, extra


def _autoj_convert(row: Any):
    """Auto-J Eval-P: ``label`` 0 = "response 1" preferred, 1 = "response 2", 2 = tie (dropped); single-turn."""
    if not isinstance(row, dict):
        raise _RowError("unparseable", f"row is {type(row).__name__}, not an object")
    for k in ("prompt", "response 1", "response 2", "label"):
        if row.get(k) is None:
            raise _RowError("missing_field", f"no {k!r} field")
    if row["label"] == 2:
        raise _RowError("tie", "label 2")
    if row["label"] not in (0, 1):
        raise _RowError("unparseable", f"label {row['label']!r} is not 0, 1 or 2")
    prompt = str(row["prompt"]).strip()
    if not prompt:
        raise _RowError("missing_field", "empty prompt")
    r1, r2 = str(row["response 1"]).strip(), str(row["response 2"]).strip()
    chosen, rejected = (r1, r2) if row["label"] == 0 else (r2, r1)
    return [{"role": "user", "content": prompt}], chosen, rejected, {"scenario": row.get("scenario")}


def _load_pandalm() -> tuple[list[PreferencePair], DataReport]:
    report = DataReport("pandalm")
    with open(_data_file("pandalm", "testset-v1.json"), encoding="utf-8") as f:
        rows = json.load(f)
    return _rows_to_pairs(enumerate(rows), report, "pandalm", _pandalm_convert), report


def load_pairs(source: str, *, limit: int | None = None, seed: int = 0) -> tuple[list[PreferencePair], DataReport]:
    """Preference pairs from a file path or a builtin name, in a seeded shuffled order.

    The order is a seeded shuffle of all usable pairs, so ``load_pairs(s, limit=n)`` is the first n of
    ``load_pairs(s)`` for the same seed. Usable pairs beyond ``limit`` are counted as ``beyond_limit`` so
    that ``total == kept + sum(dropped)`` still holds. Raises DataError if no row is usable.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    source = str(source)
    builtin = _builtin_pairs(source, seed)
    if builtin is not None:
        pairs, report = builtin
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(
                f"data source {source!r} is neither an existing file nor a builtin "
                f"(builtins: {', '.join(PAIR_BUILTINS)})"
            )
        report = DataReport(str(path))
        pairs = _rows_to_pairs(_read_table(path, report), report, str(path), _trl_convert)
    return report.take(pairs, seed=seed, limit=limit), report


def save_pairs(pairs: Sequence[PreferencePair], path: str | os.PathLike) -> Path:
    """Write pairs as TRL conversational JSONL (prompt messages, one-message chosen/rejected, meta columns).

    ``load_pairs`` reads the file back into equal pairs (meta keys other than source/row come back as meta).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pairs:
            row = {k: v for k, v in p.meta.items() if k not in _PAIR_COLUMNS}
            row["prompt"] = p.prompt
            row["chosen"] = [{"role": "assistant", "content": p.chosen}]
            row["rejected"] = [{"role": "assistant", "content": p.rejected}]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def split_pairs(pairs: Sequence, *, dev_fraction: float, seed: int) -> tuple[list, list]:
    """(train, dev), deterministic for a seed; both keep the input order.

    Pairs with the same prompt always land in the same split (hh-rlhf and sampled math pairs can repeat a
    prompt), so the dev set never shares a prompt with training. The dev set is the first groups of a
    seeded shuffle until it holds at least round(dev_fraction * n) pairs.
    """
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    n = len(pairs)
    want = round(dev_fraction * n)
    if want == 0:
        return list(pairs), []
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        prompt = p.prompt if hasattr(p, "prompt") else p.prompt_ids
        groups.setdefault(_prompt_key(prompt), []).append(i)
    keys = sorted(groups)  # independent of input order
    random.Random(seed).shuffle(keys)
    dev_idx: set[int] = set()
    for k in keys:
        if len(dev_idx) >= want:
            break
        dev_idx.update(groups[k])
    if len(dev_idx) == n:
        raise DataError(f"cannot split {n} pairs: they share too few distinct prompts to leave any for training")
    train = [p for i, p in enumerate(pairs) if i not in dev_idx]
    dev = [p for i, p in enumerate(pairs) if i in dev_idx]
    return train, dev


# Builtin names accepted by load_pairs.
PAIR_BUILTINS = ["hh-rlhf", *(f"hh-rlhf/{s}" for s in HH_SPLITS), "pandalm", "autoj", *CHOICE_BUILTINS]
