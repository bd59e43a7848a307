"""Preference data: loading, converting, tokenising and collating (prompt, chosen, rejected) pairs.

Everything that feeds training goes through here:

* ``load_pairs(source)`` reads TRL-format files (.jsonl / .json / .parquet; ``prompt``/``chosen``/``rejected``
  as text or as chat-message lists, including TRL's implicit-prompt form) or a builtin dataset under the
  shared data root (hh-rlhf, PandaLM, multiple-choice sets and SST-2 converted to pairs).
* ``load_choices`` / ``choices_to_pairs``: multiple-choice questions and the DPH paper's recipe for turning
  them into pairs (chosen = the correct option, rejected = a wrong option drawn uniformly, seeded).
* ``load_math`` / ``extract_final_answer`` / ``sample_math_pairs``: verifiable math problems and pairs made
  from the model's own samples (a correct sample vs an incorrect one).
* ``tokenize_pairs`` / ``collate_pairs``: THE tokenisation (``arbiter.backbone.encode_chat``) and padding.

Bad rows are never silently dropped and never crash a run: each is counted in a ``DataReport`` under a
reason with up to three short examples; a source with zero usable rows raises ``DataError`` naming the counts.

The data root is ``$ARBITER_DATA_DIR``, else ``/work/shared/data`` if it exists, else ``<repo>/../shared/data``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

MAX_EXAMPLES = 3  # examples kept per drop reason
_EXAMPLE_CHARS = 160


class DataError(ValueError):
    """A data source cannot be used (not found, unreadable, or zero usable rows)."""


# --------------------------------------------------------------------------------------------------
# Reports and records
# --------------------------------------------------------------------------------------------------


@dataclass
class DataReport:
    """What happened to a source's rows: ``total == kept + sum(dropped.values())`` for every loader here.

    ``stats`` holds extra numbers that are not row outcomes (e.g. sample counts of ``sample_math_pairs``).
    """

    source: str
    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def drop(self, reason: str, example: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            example = " ".join(str(example).split())  # one line
            if len(example) > _EXAMPLE_CHARS:
                example = example[: _EXAMPLE_CHARS - 3] + "..."
            ex.append(example)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: "DataReport") -> "DataReport":
        """A new report adding both (sources joined with '+'); neither input is modified."""
        out = DataReport(
            source=self.source if self.source == other.source else f"{self.source}+{other.source}",
            total=self.total + other.total,
            kept=self.kept + other.kept,
            dropped=dict(self.dropped),
            examples={k: list(v) for k, v in self.examples.items()},
            stats=dict(self.stats),
        )
        for reason, n in other.dropped.items():
            out.dropped[reason] = out.dropped.get(reason, 0) + n
        for reason, exs in other.examples.items():
            mine = out.examples.setdefault(reason, [])
            mine.extend(exs[: max(0, MAX_EXAMPLES - len(mine))])
        for k, v in other.stats.items():
            out.stats[k] = out.stats.get(k, 0) + v
        return out

    def summary(self) -> str:
        line = f"{self.source}: read {self.total}, kept {self.kept}, dropped {self.n_dropped}"
        if self.dropped:
            line += " (" + ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped.items())) + ")"
        if self.stats:
            line += "; " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.stats.items())
        return line

    def to_dict(self) -> dict:
        return asdict(self)

    def raise_if_empty(self) -> None:
        if self.kept == 0:
            detail = "; ".join(
                f"{r}: {n} (e.g. {' | '.join(self.examples.get(r, [])[:2])})" for r, n in sorted(self.dropped.items())
            )
            raise DataError(
                f"{self.source}: zero usable rows out of {self.total} read"
                + (f"; dropped per reason: {detail}" if detail else "")
            )


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.4g}"


@dataclass
class PreferencePair:
    prompt: list[dict]  # chat messages [{"role", "content"}, ...], ends with a user turn
    chosen: str  # assistant answer text
    rejected: str
    meta: dict = field(default_factory=dict)  # {"source", "row", ...}; may carry precomputed ref log-probs


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # ends with <|im_end|>
    rejected_ids: list[int]  # ends with <|im_end|>
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Data root and raw readers
# --------------------------------------------------------------------------------------------------


def data_root() -> Path:
    env = os.environ.get("ARBITER_DATA_DIR")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DataError(f"ARBITER_DATA_DIR={env} is not a directory")
        return p
    candidates = [Path("/work/shared/data"), Path(__file__).resolve().parents[2].parent / "shared" / "data"]
    for p in candidates:
        if p.is_dir():
            return p
    raise DataError(
        "cannot find the shared data directory: set ARBITER_DATA_DIR (looked in "
        + ", ".join(str(c) for c in candidates)
        + ")"
    )


def _data_file(*parts: str) -> Path:
    p = data_root().joinpath(*parts)
    if not p.is_file():
        raise DataError(f"data file {p} is missing (data root {data_root()})")
    return p


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _iter_jsonl(path: Path, report: DataReport) -> Iterator[tuple[int, Any]]:
    """(row index, parsed object) per non-blank line; lines that are not JSON are counted as unparseable."""
    with _open_text(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                report.total += 1
                report.drop("unparseable", f"row {i}: invalid JSON ({e.msg}): {line}")


def _read_table(path: Path, report: DataReport) -> list[tuple[int, Any]]:
    """Rows of a .jsonl/.json/.parquet file (optionally .gz) as (row index, dict).

    The ``datasets`` library reads the file first (the TRL convention, and the only reader for parquet).
    Arrow needs one schema for the whole file, so a JSON file with one malformed line or columns whose type
    changes between rows fails there as a whole; JSON is then re-read line by line so that the bad rows
    are counted instead of failing the run.
    """
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        kind = "json"
    elif name.endswith((".json", ".json.gz")):
        kind = "json"
    elif name.endswith(".parquet"):
        kind = "parquet"
    else:
        raise DataError(f"{path}: unsupported file type (expected .jsonl, .json or .parquet)")
    try:
        import datasets  # lazy: a [train] extra

        datasets.disable_progress_bars()
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        return list(enumerate(ds))
    except ImportError as e:
        if kind == "parquet":
            raise DataError(f"{path}: reading parquet needs the 'datasets' package (pip install arbiter[train])") from e
    except Exception as e:  # noqa: BLE001 - arrow errors have many types; fall back below
        if kind == "parquet":
            raise DataError(f"{path}: cannot read parquet file: {e}") from e
    # Plain JSON fallback: a top-level array, an object holding one array, or JSON Lines.
    with _open_text(path) as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return list(_iter_jsonl(path, report))
    if isinstance(obj, dict):
        arrays = [v for v in obj.values() if isinstance(v, list)]
        if len(arrays) == 1:
            obj = arrays[0]
        else:
            obj = [obj]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of rows or JSON Lines, got {type(obj).__name__}")
    return list(enumerate(obj))


# --------------------------------------------------------------------------------------------------
# Row conversion (TRL formats and hh-rlhf text dialogues)
# --------------------------------------------------------------------------------------------------

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}
_PAIR_COLUMNS = {"prompt", "chosen", "rejected"}


class _RowError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_hh_dialogue(text: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    if not isinstance(text, str):
        raise _RowError("missing_field", f"dialogue is {type(text).__name__}, not text")
    parts = _TURN.split(text)
    # parts = [before, role, content, role, content, ...]
    if parts[0].strip() or len(parts) < 3:
        raise _RowError("unparseable", f"not a \\n\\nHuman:/\\n\\nAssistant: dialogue: {text[:80]!r}")
    msgs = [{"role": _ROLE[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]
    return msgs


def _check_prompt(prompt: list[dict]) -> list[dict]:
    if not prompt:
        raise _RowError("missing_field", "empty prompt")
    if prompt[-1]["role"] != "user":
        raise _RowError("unparseable", f"prompt ends with a {prompt[-1]['role']!r} turn, not a user turn")
    prev = None
    for m in prompt:
        if m["role"] not in ("system", "user", "assistant"):
            raise _RowError("unparseable", f"unknown role {m['role']!r}")
        if m["role"] == prev and m["role"] != "system":
            raise _RowError("unparseable", f"two consecutive {m['role']!r} turns")
        if m["role"] == "user" and not m["content"].strip():
            raise _RowError("empty_prompt_turn", "a user turn is empty")
        prev = m["role"]
    return prompt


def hh_to_pair(chosen_text: str, rejected_text: str) -> tuple[list[dict], str, str]:
    """Split an hh-rlhf chosen/rejected dialogue pair into (prompt messages, chosen answer, rejected answer).

    Both dialogues must share every turn before their final Assistant turn; that shared prefix is the prompt.
    """
    c, r = parse_hh_dialogue(chosen_text), parse_hh_dialogue(rejected_text)
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise _RowError("unparseable", "dialogue does not end with an Assistant turn")
    if c[:-1] != r[:-1]:
        raise _RowError("unparseable", "chosen and rejected dialogues differ before the final Assistant turn")
    return _check_prompt(c[:-1]), c[-1]["content"], r[-1]["content"]


def _messages(value: Any, what: str) -> list[dict]:
    """A chat-message list from TRL's conversational form, with arrow's None-filled keys removed."""
    if not isinstance(value, (list, tuple)):
        raise _RowError("unparseable", f"{what} is {type(value).__name__}, expected text or a message list")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _RowError("unparseable", f"{what} holds a message without string role/content: {str(m)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(value: Any, what: str) -> str:
    """An answer given as text or as a conversational completion (exactly one assistant message)."""
    if value is None:
        raise _RowError("missing_field", f"{what} is missing")
    if isinstance(value, str):
        return value.strip()
    msgs = _messages(value, what)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise _RowError("unparseable", f"{what} must be one assistant message, got roles {[m['role'] for m in msgs]}")
    return msgs[0]["content"].strip()


def _common_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def row_to_pair(row: Any) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen, rejected) from one TRL-format row; raises _RowError with a drop reason.

    Accepted forms (TRL's preference formats):
      explicit prompt:  prompt = text | messages;  chosen/rejected = text | [one assistant message]
      implicit prompt:  no prompt; chosen/rejected = full conversations (message lists sharing every turn
                        but the last) or hh-rlhf style text dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ...").
    """
    if not isinstance(row, dict):
        raise _RowError("unparseable", f"row is {type(row).__name__}, not an object")
    for col in ("chosen", "rejected"):
        if row.get(col) is None:
            raise _RowError("missing_field", f"no {col!r} field")
    prompt = row.get("prompt")
    if prompt is None:  # implicit prompt
        c, r = row["chosen"], row["rejected"]
        if isinstance(c, str) and isinstance(r, str):
            return hh_to_pair(c, r)
        cm, rm = _messages(c, "chosen"), _messages(r, "rejected")
        n = _common_prefix(cm, rm)
        # The answers are what differs; both must be a single final assistant turn after the shared prompt.
        n = min(n, len(cm) - 1, len(rm) - 1)
        if len(cm) - n != 1 or len(rm) - n != 1:
            raise _RowError("unparseable", "implicit-prompt conversations differ in more than their final turn")
        return _check_prompt(cm[:n]), _answer(cm[n:], "chosen"), _answer(rm[n:], "rejected")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _RowError("missing_field", "empty prompt")
        pmsgs = [{"role": "user", "content": prompt}]
    else:
        pmsgs = _messages(prompt, "prompt")
    return _check_prompt(pmsgs), _answer(row["chosen"], "chosen"), _answer(row["rejected"], "rejected")


def _pair_checks(chosen: str, rejected: str) -> None:
    if not chosen or not rejected:
        raise _RowError("empty_answer", f"chosen={chosen[:60]!r} rejected={rejected[:60]!r}")
    if chosen == rejected:
        raise _RowError("identical", f"chosen == rejected: {chosen[:80]!r}")


def _json_safe(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)


def _rows_to_pairs(rows: Iterable[tuple[int, Any]], report: DataReport, source: str, convert) -> list[PreferencePair]:
    pairs = []
    for i, row in rows:
        report.total += 1
        try:
            prompt, chosen, rejected, extra = convert(row)
            _pair_checks(chosen, rejected)
        except _RowError as e:
            report.drop(e.reason, f"row {i}: {e.detail}")
            continue
        pairs.append(PreferencePair(prompt, chosen, rejected, {"source": source, "row": i, **extra}))
        report.kept += 1
    return pairs


def _trl_convert(row: Any):
    prompt, chosen, rejected = row_to_pair(row)
    # Extra columns (e.g. precomputed ref_chosen_logp) travel in meta so that saved files round-trip.
    extra = {k: _json_safe(v) for k, v in row.items() if k not in _PAIR_COLUMNS and k not in ("source", "row")}
    return prompt, chosen, rejected, extra


def _hh_convert(row: Any):
    if not isinstance(row, dict) or row.get("chosen") is None or row.get("rejected") is None:
        raise _RowError("missing_field", "no chosen/rejected field")
    return (*hh_to_pair(row["chosen"], row["rejected"]), {})


# --------------------------------------------------------------------------------------------------
# Builtin preference sources
# --------------------------------------------------------------------------------------------------

HH_SPLITS = ("helpful-online", "helpful-rejection-sampled", "harmless-base")


def _load_hh(split: str) -> tuple[list[PreferencePair], DataReport]:
    source = f"hh-rlhf/{split}"
    report = DataReport(source)
    rows = _iter_jsonl(_data_file("hh_rlhf", split, "test.jsonl.gz"), report)
    return _rows_to_pairs(rows, report, source, _hh_convert), report


def _builtin_pairs(name: str, seed: int) -> tuple[list[PreferencePair], DataReport] | None:
    """Pairs of a builtin source, or None if ``name`` is not a builtin."""
    if name == "hh-rlhf":
        out, rep = [], None
        for split in ("helpful-online", "helpful-rejection-sampled"):
            p, r = _load_hh(split)
            out += p
            rep = r if rep is None else rep.merge(r)
        rep.source = "hh-rlhf"
        return out, rep
    if name.startswith("hh-rlhf/"):
        split = name.split("/", 1)[1]
        if split not in HH_SPLITS:
            raise DataError(f"unknown hh-rlhf split {split!r}; available: {', '.join(HH_SPLITS)}")
        return _load_hh(split)
    return None


# Builtin names accepted by load_pairs (more are registered below this section).
PAIR_BUILTINS = ["hh-rlhf", *(f"hh-rlhf/{s}" for s in HH_SPLITS)]


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
    report.raise_if_empty()
    random.Random(seed).shuffle(pairs)
    if limit is not None and len(pairs) > limit:
        report.dropped["beyond_limit"] = report.dropped.get("beyond_limit", 0) + len(pairs) - limit
        report.kept = limit
        pairs = pairs[:limit]
    return pairs, report


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


def _prompt_key(prompt: list[dict]) -> str:
    return hashlib.sha1(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


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


# --------------------------------------------------------------------------------------------------
# Tokenising and collating
# --------------------------------------------------------------------------------------------------


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: Any,
    end_id: int,
    *,
    max_length: int,
    truncate_prompt: bool = False,
) -> tuple[list[TokenizedPair], DataReport]:
    """Token ids of each pair through ``arbiter.backbone.encode_chat`` (answers end with ``<|im_end|>``).

    Drops and counts: empty answers, chosen == rejected, and pairs whose prompt + longer answer exceeds
    ``max_length`` tokens. With ``truncate_prompt=True`` an over-long prompt is left-truncated instead (the
    most recent turns are kept); a pair is still dropped if its longer answer alone leaves no room.
    Raises DataError if pairs were given but none is usable.
    """
    from arbiter.backbone import answer_ids, prompt_ids

    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    report = DataReport("tokenize")
    out: list[TokenizedPair] = []
    prompt_cache: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        report.total += 1
        where = f"pair {i} ({p.meta.get('source', '?')} row {p.meta.get('row', '?')})"
        chosen, rejected = p.chosen.strip(), p.rejected.strip()
        if not chosen or not rejected:
            report.drop("empty_answer", f"{where}: chosen={p.chosen[:60]!r} rejected={p.rejected[:60]!r}")
            continue
        if p.chosen == p.rejected:
            report.drop("identical", f"{where}: {p.chosen[:80]!r}")
            continue
        key = _prompt_key(p.prompt)
        if key not in prompt_cache:
            prompt_cache[key] = prompt_ids(tokenizer, p.prompt)
        pids = prompt_cache[key]
        # Same calls as encode_chat(tokenizer, prompt, answer, end_id), with the prompt encoded once.
        cids = answer_ids(tokenizer, p.chosen, end_id)
        rids = answer_ids(tokenizer, p.rejected, end_id)
        longest = max(len(cids), len(rids))
        if len(pids) + longest > max_length:
            room = max_length - longest
            if not truncate_prompt or room < 1:
                report.drop(
                    "over_length",
                    f"{where}: prompt {len(pids)} + answer {longest} tokens > max_length {max_length}",
                )
                continue
            pids = pids[-room:]  # keep the end: the latest turns and the assistant generation prompt
        out.append(TokenizedPair(list(pids), cids, rids, dict(p.meta)))
        report.kept += 1
    if report.total:
        report.raise_if_empty()
    return out, report


def collate_texts(prompts_and_answers: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-padded batch of prompt+answer sequences.

    Returns (all torch.long):
      input_ids [N, T], attention_mask [N, T],
      answer_mask [N, T]    1 on answer tokens incl. the closing <|im_end|>,
      end_positions [N]     index of the closing <|im_end|> (last real token),
      answer_lengths [N]    answer tokens incl. <|im_end|>,
      prompt_lengths [N].
    """
    import torch

    if not prompts_and_answers:
        raise ValueError("cannot collate an empty batch")
    n = len(prompts_and_answers)
    lengths = [len(p) + len(a) for p, a in prompts_and_answers]
    t = max(lengths)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)  # [N, T]
    attention_mask = torch.zeros((n, t), dtype=torch.long)  # [N, T]
    answer_mask = torch.zeros((n, t), dtype=torch.long)  # [N, T]
    for i, (p, a) in enumerate(prompts_and_answers):
        if not a:
            raise ValueError(f"row {i} has an empty answer (it must at least hold the closing <|im_end|>)")
        lp, la = len(p), len(a)
        input_ids[i, : lp + la] = torch.tensor(list(p) + list(a), dtype=torch.long)
        attention_mask[i, : lp + la] = 1
        answer_mask[i, lp : lp + la] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "answer_mask": answer_mask,
        "end_positions": torch.tensor([x - 1 for x in lengths], dtype=torch.long),  # [N]
        "answer_lengths": torch.tensor([len(a) for _, a in prompts_and_answers], dtype=torch.long),  # [N]
        "prompt_lengths": torch.tensor([len(p) for p, _ in prompts_and_answers], dtype=torch.long),  # [N]
    }


def collate_pairs(batch: Sequence[TokenizedPair], pad_id: int) -> dict[str, "torch.Tensor"]:
    """``collate_texts`` over the chosen rows (0..B-1) then the rejected rows (B..2B-1): tensors [2B, T] / [2B]."""
    rows = [(tp.prompt_ids, tp.chosen_ids) for tp in batch] + [(tp.prompt_ids, tp.rejected_ids) for tp in batch]
    return collate_texts(rows, pad_id)
