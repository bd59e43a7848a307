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
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from arbiter.chat import template_messages

if TYPE_CHECKING:
    import torch

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
        # A throwaway cache: datasets keys its cache on path + mtime, which can serve a stale copy of a file
        # rewritten in place, and training data should not pile up under ~/.cache.
        with tempfile.TemporaryDirectory(prefix="arbiter-data-") as cache:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True)
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


class _RowError(DataError):
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


# Every role of OpenAI's chat format; how each is rendered: arbiter.chat.template_messages.
_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _check_prompt(prompt: list[dict]) -> list[dict]:
    if not prompt:
        raise _RowError("missing_field", "empty prompt")
    if prompt[-1]["role"] not in ("user", "tool", "function"):
        raise _RowError("unparseable", f"prompt ends with a {prompt[-1]['role']!r} turn, not a user or tool turn")
    prev = None
    for m in prompt:
        if m["role"] not in _ROLES:
            raise _RowError("unparseable", f"unknown role {m['role']!r}")
        # Consecutive tool results are normal (one per call); other roles alternate.
        if m["role"] == prev and m["role"] not in ("system", "developer", "tool", "function"):
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
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _RowError("unparseable", f"{what} holds a message without a string role: {str(m)[:80]}")
        content = m.get("content")
        calls = m.get("tool_calls") or m.get("function_call")
        if content is None and m["role"] == "assistant" and calls:
            content = ""  # an assistant turn that only calls tools
        if isinstance(content, list):  # OpenAI content parts: text (and refusal) parts only
            if not all(isinstance(p, dict) and p.get("type") in ("text", "refusal") for p in content):
                raise _RowError("unparseable", f"{what} holds a content part that is not text: {str(m)[:80]}")
            content = "".join(str(p.get(p["type"]) or "") for p in content)
        if not isinstance(content, str):
            raise _RowError("unparseable", f"{what} holds a message without string content: {str(m)[:80]}")
        msg = {"role": m["role"], "content": content}
        # What the shared chat encoder (arbiter.chat) renders besides role and content; arrow fills absent
        # keys with None, so only present values are kept.
        for key in ("tool_calls", "function_call", "tool_call_id", "name", "refusal"):
            if m.get(key) is not None:
                msg[key] = m[key]
        out.append(msg)
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
    # Tool calls and refusals render into the answer text exactly as the service renders them.
    return template_messages(msgs)[0]["content"].strip()


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
    if name == "pandalm":
        return _load_pandalm()
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
    raise_if_empty: bool = True,
) -> tuple[list[TokenizedPair], DataReport]:
    """Token ids of each pair through ``arbiter.backbone.encode_chat`` (answers end with ``<|im_end|>``).

    Drops and counts: empty answers, chosen == rejected, and pairs whose prompt + longer answer exceeds
    ``max_length`` tokens. With ``truncate_prompt=True`` an over-long prompt is left-truncated instead (the
    most recent turns are kept); a pair is still dropped if its longer answer alone leaves no room.
    Raises DataError if pairs were given but none is usable, unless ``raise_if_empty=False`` (callers that
    tokenize in chunks and judge emptiness on the whole source), which returns ``([], report)`` instead.
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
    if report.total and raise_if_empty:
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


# --------------------------------------------------------------------------------------------------
# Multiple choice (and SST-2) -> pairs
# --------------------------------------------------------------------------------------------------
#
# Lettered tasks show the options in the prompt (as the DPH paper does for ARC / OpenBookQA / CSQA) and each
# option's answer text is "<letter>. <option text>", e.g. "B. enforce": the letter ties the answer to the
# listing and the text keeps it meaningful on its own. SST-2 answers are the bare words "negative"/"positive".
# ``ChoiceQuestion.options`` holds these answer texts exactly, so scoring option i at evaluation scores the
# same text that training used as chosen / rejected.

LETTERS = "ABCDEFGHIJ"
CHOICE_BUILTINS = ("commonsense_qa", "arc_challenge", "openbookqa", "sst2", "sst2/dev")
SST2_LABELS = ("negative", "positive")  # label 0, label 1
_MC_INSTRUCTION = "Answer with the letter and the text of the correct option."
_SST2_INSTRUCTION = 'What is the sentiment of the following sentence? Answer with "negative" or "positive".'


@dataclass
class ChoiceQuestion:
    prompt: list[dict]  # chat messages ending with the user turn that shows the question (and options)
    options: list[str]  # the answer texts, e.g. ["A. ignore", "B. enforce", ...] or ["negative", "positive"]
    answer: int  # index of the correct option
    meta: dict = field(default_factory=dict)


def mc_prompt(question: str, choices: Sequence[str]) -> list[dict]:
    """The user turn for a lettered multiple-choice question."""
    listing = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return [{"role": "user", "content": f"{question}\n\n{listing}\n\n{_MC_INSTRUCTION}"}]


def sst2_prompt(sentence: str) -> list[dict]:
    return [{"role": "user", "content": f"{_SST2_INSTRUCTION}\n\nSentence: {sentence}"}]


def _lettered(question: Any, choices: Any, gold: Any) -> tuple[list[dict], list[str], int, list[str]]:
    if not isinstance(question, str) or not question.strip():
        raise _RowError("missing_field", "empty or missing question")
    if not isinstance(choices, list) or len(choices) < 2:
        raise _RowError("missing_field", f"needs >= 2 choices, got {str(choices)[:60]}")
    if len(choices) > len(LETTERS):
        raise _RowError("unparseable", f"{len(choices)} choices: more than {len(LETTERS)} letters")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise _RowError("empty_answer", f"a choice is empty: {choices}")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise _RowError("unparseable", f"gold index {gold!r} out of range for {len(choices)} choices")
    texts = [c.strip() for c in choices]
    # Exact (case-sensitive) comparison: ARC lists genotypes 'Rr', 'rr' and 'RR' as different options.
    if texts.count(texts[gold]) > 1:  # the correct text is also listed as a wrong option: ambiguous question
        raise _RowError("ambiguous", f"correct option {texts[gold]!r} appears twice in {texts}")
    options = [f"{LETTERS[i]}. {t}" for i, t in enumerate(texts)]
    return mc_prompt(question.strip(), texts), options, gold, texts


def _mc_rows(name: str, report: DataReport) -> Iterator[tuple[int, ChoiceQuestion]]:
    if name == "commonsense_qa":
        for i, row in _iter_jsonl(_data_file("commonsense_qa", "train_rand_split.jsonl.gz"), report):
            report.total += 1
            try:
                q = row.get("question") if isinstance(row, dict) else None
                if not isinstance(q, dict) or not isinstance(q.get("choices"), list):
                    raise _RowError("missing_field", "no question.choices")
                labels = [c.get("label") if isinstance(c, dict) else None for c in q["choices"]]
                key = row.get("answerKey")
                if key not in labels:
                    raise _RowError("missing_field", f"answerKey {key!r} not among labels {labels}")
                choices = [c.get("text") for c in q["choices"]]
                prompt, options, gold, texts = _lettered(q.get("stem"), choices, labels.index(key))
            except _RowError as e:
                report.drop(e.reason, f"row {i}: {e.detail}")
                continue
            yield i, ChoiceQuestion(prompt, options, gold, {"source": name, "row": i, "id": row.get("id"), "choices": texts})
    elif name in ("arc_challenge", "openbookqa"):
        path = _data_file("arc_challenge", "arc_challenge.jsonl") if name == "arc_challenge" else _data_file(
            "openbookqa", "openbook_qa.jsonl"
        )
        for i, row in _iter_jsonl(path, report):
            report.total += 1
            try:
                if not isinstance(row, dict):
                    raise _RowError("unparseable", "row is not an object")
                query = row.get("query")
                if isinstance(query, str) and query.startswith("Question: "):  # Eval Gauntlet prefix (ARC)
                    query = query[len("Question: "):]
                prompt, options, gold, texts = _lettered(query, row.get("choices"), row.get("gold"))
            except _RowError as e:
                report.drop(e.reason, f"row {i}: {e.detail}")
                continue
            yield i, ChoiceQuestion(prompt, options, gold, {"source": name, "row": i, "choices": texts})
    elif name in ("sst2", "sst2/dev"):
        path = _data_file("sst2", "train.tsv.gz" if name == "sst2" else "dev.tsv")
        with _open_text(path) as f:
            header = f.readline().rstrip("\n").split("\t")
            if header[:2] != ["sentence", "label"]:
                raise DataError(f"{path}: expected a 'sentence\\tlabel' header, got {header}")
            for i, line in enumerate(f, start=1):  # row = line number in the file (header is line 0)
                if not line.strip():
                    continue
                report.total += 1
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2 or parts[1].strip() not in ("0", "1"):
                    report.drop("unparseable", f"row {i}: {line}")
                    continue
                sentence = parts[0].strip()
                if not sentence:
                    report.drop("missing_field", f"row {i}: empty sentence")
                    continue
                yield i, ChoiceQuestion(
                    sst2_prompt(sentence), list(SST2_LABELS), int(parts[1]), {"source": name, "row": i, "sentence": sentence}
                )
    elif _is_user_file(name):
        # A user's JSONL: {"question": str, "choices": [str, ...], "answer": index | option text | letter}.
        for i, row in _iter_jsonl(Path(name).expanduser(), report):
            report.total += 1
            try:
                if not isinstance(row, dict):
                    raise _RowError("unparseable", "row is not an object")
                choices = row.get("choices")
                gold = _choice_index(row.get("answer"), choices)
                prompt, options, gold, texts = _lettered(row.get("question"), choices, gold)
            except _RowError as e:
                report.drop(e.reason, f"row {i}: {e.detail}")
                continue
            yield i, ChoiceQuestion(prompt, options, gold, {"source": name, "row": i, "choices": texts})
    else:
        raise DataError(f"unknown multiple-choice source {name!r}; available: {', '.join(CHOICE_BUILTINS)} "
                        "or a .jsonl file of {\"question\", \"choices\", \"answer\"}")


def _is_user_file(name: str) -> bool:
    return name.lower().endswith((".jsonl", ".jsonl.gz")) and Path(name).expanduser().is_file()


def _choice_index(answer: Any, choices: Any) -> int:
    """The gold index from an index, the option's exact text, or its letter (A, B, ...)."""
    if isinstance(answer, bool):
        raise _RowError("unparseable", f"answer {answer!r} is not an index, option text or letter")
    if isinstance(answer, int):
        return answer
    if isinstance(answer, str) and isinstance(choices, list):
        texts = [c.strip() if isinstance(c, str) else c for c in choices]
        if answer.strip() in texts:
            return texts.index(answer.strip())
        letter = answer.strip().rstrip(".").upper()
        if len(letter) == 1 and letter in LETTERS[: len(choices)]:
            return LETTERS.index(letter)
    raise _RowError("unparseable" if answer is not None else "missing_field",
                    f"answer {str(answer)[:40]!r} is not an index, one of the option texts, or an option letter")


def load_choices(source: str, *, limit: int | None = None, seed: int = 0) -> tuple[list[ChoiceQuestion], DataReport]:
    """Multiple-choice questions of a builtin source (commonsense_qa, arc_challenge, openbookqa, sst2, sst2/dev).

    Same ordering / limit / accounting rules as ``load_pairs``. Questions whose correct option text is
    listed twice are dropped as ``ambiguous``.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    report = DataReport(source)
    questions = []
    for _, q in _mc_rows(source, report):
        questions.append(q)
        report.kept += 1
    report.raise_if_empty()
    random.Random(seed).shuffle(questions)
    if limit is not None and len(questions) > limit:
        report.dropped["beyond_limit"] = report.dropped.get("beyond_limit", 0) + len(questions) - limit
        report.kept = limit
        questions = questions[:limit]
    return questions, report


def choices_to_pairs(questions: Sequence[ChoiceQuestion], *, seed: int) -> list[PreferencePair]:
    """One pair per question: chosen = the correct option, rejected = a wrong option drawn uniformly.

    Each question's draw uses its own RNG seeded by (seed, source, row), so a question's pair does not depend
    on which other questions are in the list or their order. Wrong options with the same text as the correct
    one are never drawn.
    """
    pairs = []
    for n, q in enumerate(questions):
        if not 0 <= q.answer < len(q.options):
            raise DataError(f"question {n} ({q.meta}): answer index {q.answer} out of range")
        texts = q.meta.get("choices", q.options)
        gold_text = str(texts[q.answer]).strip()
        wrong = [j for j in range(len(q.options)) if j != q.answer and str(texts[j]).strip() != gold_text]
        if not wrong:
            raise DataError(f"question {n} ({q.meta.get('source')} row {q.meta.get('row')}) has no wrong option")
        rng = random.Random(f"{seed}:{q.meta.get('source')}:{q.meta.get('row', n)}")
        j = rng.choice(wrong)
        meta = {**q.meta, "answer_index": q.answer, "rejected_index": j}
        meta.pop("choices", None)
        meta.pop("sentence", None)
        pairs.append(PreferencePair(list(q.prompt), q.options[q.answer], q.options[j], meta))
    return pairs


# Builtin names accepted by load_pairs.
PAIR_BUILTINS = ["hh-rlhf", *(f"hh-rlhf/{s}" for s in HH_SPLITS), "pandalm", *CHOICE_BUILTINS]


# --------------------------------------------------------------------------------------------------
# Math: verifiable problems, answer extraction, pairs from the model's own samples
# --------------------------------------------------------------------------------------------------

MATH_BUILTINS = ("gsm8k", "svamp")
_MATH_INSTRUCTION = 'Solve the problem step by step. End with a last line of the form "The answer is N".'


@dataclass
class MathProblem:
    question: str
    answer: str  # canonical number string (see canonical_number)
    meta: dict = field(default_factory=dict)


# canonical_number / extract_final_answer live in arbiter.answers (the server's vote extractors use them too).
from arbiter.answers import canonical_number, extract_final_answer  # noqa: E402


def is_correct(text: str, problem: MathProblem) -> bool:
    from decimal import Decimal

    got = extract_final_answer(text)
    return got is not None and Decimal(got) == Decimal(problem.answer)


def math_prompt(problem: MathProblem) -> list[dict]:
    """The chat prompt used for sampling (and as the prompt of the resulting pairs)."""
    return [{"role": "user", "content": f"{problem.question.strip()}\n\n{_MATH_INSTRUCTION}"}]


def _math_rows(name: str, report: DataReport) -> Iterator[MathProblem]:
    if name == "gsm8k":
        for i, row in _iter_jsonl(_data_file("gsm8k", "train.jsonl.gz"), report):
            report.total += 1
            q = row.get("question") if isinstance(row, dict) else None
            sol = row.get("answer") if isinstance(row, dict) else None
            if not isinstance(q, str) or not q.strip() or not isinstance(sol, str):
                report.drop("missing_field", f"row {i}: no question/answer")
                continue
            m = re.search(r"####\s*(.+?)\s*$", sol)
            ans = canonical_number(m.group(1)) if m else None
            if ans is None:
                report.drop("unparseable", f"row {i}: no '#### <number>' in the solution: {sol[-80:]}")
                continue
            yield MathProblem(q.strip(), ans, {"source": name, "row": i, "solution": sol})
    elif name == "svamp":
        with open(_data_file("svamp", "SVAMP.json"), encoding="utf-8") as f:
            rows = json.load(f)
        for i, row in enumerate(rows):
            report.total += 1
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("Body", "Question")):
                report.drop("missing_field", f"row {i}: no Body/Question")
                continue
            ans = canonical_number(row.get("Answer"))
            if ans is None:
                report.drop("unparseable", f"row {i}: Answer {row.get('Answer')!r} is not a number")
                continue
            q = f"{row['Body'].strip()} {row['Question'].strip()}".strip()
            meta = {"source": name, "row": i, "id": row.get("ID"), "equation": row.get("Equation"), "type": row.get("Type")}
            yield MathProblem(q, ans, meta)
    elif _is_user_file(name):
        # A user's JSONL: {"question": str, "answer": number (or a string holding one)}.
        for i, row in _iter_jsonl(Path(name).expanduser(), report):
            report.total += 1
            q = row.get("question") if isinstance(row, dict) else None
            if not isinstance(q, str) or not q.strip():
                report.drop("missing_field", f"row {i}: no question")
                continue
            ans = canonical_number(row.get("answer"))
            if ans is None:
                report.drop("unparseable", f"row {i}: answer {str(row.get('answer'))[:40]!r} is not a number")
                continue
            yield MathProblem(q.strip(), ans, {"source": name, "row": i})
    else:
        raise DataError(f"unknown math source {name!r}; available: {', '.join(MATH_BUILTINS)} "
                        "or a .jsonl file of {\"question\", \"answer\"}")


def load_math(source: str, *, limit: int | None = None, seed: int = 0) -> tuple[list[MathProblem], DataReport]:
    """Math problems of a builtin source ("gsm8k" train, "svamp"); same ordering / limit rules as load_pairs."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    report = DataReport(source)
    problems = []
    for p in _math_rows(source, report):
        problems.append(p)
        report.kept += 1
    report.raise_if_empty()
    random.Random(seed).shuffle(problems)
    if limit is not None and len(problems) > limit:
        report.dropped["beyond_limit"] = report.dropped.get("beyond_limit", 0) + len(problems) - limit
        report.kept = limit
        problems = problems[:limit]
    return problems, report


def sample_math_pairs(
    backbone: Any,
    problems: Sequence[MathProblem],
    *,
    k: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 8,
) -> tuple[list[PreferencePair], DataReport]:
    """Sample k answers per problem from the backbone and pair a correct one with an incorrect one.

    A sample is correct if it finished (emitted <|im_end|> within max_new_tokens) and its extracted final
    answer equals the problem's. Every other non-empty sample is incorrect (an unfinished sample is
    incorrect: it gave no answer in the budget; ``meta["rejected_finished"]`` tells them apart). For each
    problem with at least one correct and one incorrect sample, chosen and rejected are drawn uniformly
    among each (seeded per problem). Report: total = problems, kept = pairs, dropped "no_correct" /
    "no_incorrect"; stats count samples, correct, unfinished and empty ones. Never raises on zero pairs.
    """
    import torch
    from tqdm.auto import tqdm

    from arbiter.backbone import prompt_ids

    if k < 2:
        raise ValueError(f"k must be >= 2 to get both a correct and an incorrect sample, got {k}")
    if max_new_tokens < 1 or temperature <= 0 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1 and temperature > 0")
    tok, model, end_id = backbone.tokenizer, backbone.model, backbone.end_id
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else end_id
    stop_ids = sorted({end_id, *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
    device = next(model.parameters()).device
    report = DataReport("math-samples")
    report.stats.update(samples=0, correct=0, unfinished=0, empty=0)
    pairs: list[PreferencePair] = []
    sampler = {"k": k, "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}

    bar = tqdm(total=len(problems), desc="sampling math answers", unit="problem")
    for b0 in range(0, len(problems), batch_size):
        chunk = problems[b0 : b0 + batch_size]
        prompts = [math_prompt(p) for p in chunk]
        ids = [prompt_ids(tok, m) for m in prompts]
        width = max(len(x) for x in ids)
        # Left padding so every prompt ends at the same column and generation continues right after it.
        input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)  # [b, P]
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)  # [b, P]
        fork = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork), torch.inference_mode():
            torch.manual_seed(seed * 1_000_003 + b0)  # seeded per batch, global RNG left untouched
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=k,
                pad_token_id=pad_id,
                eos_token_id=stop_ids,
            )  # [b * k, P + new]; rows i*k .. i*k+k-1 belong to prompt i
        new = out[:, width:].tolist()
        for i, problem in enumerate(chunk):
            texts, finished = [], []
            for row in new[i * k : (i + 1) * k]:
                stop = next((t for t, x in enumerate(row) if x in stop_ids), None)
                finished.append(stop is not None)
                texts.append(tok.decode(row if stop is None else row[:stop], skip_special_tokens=True).strip())
            correct = [f and is_correct(t, problem) for t, f in zip(texts, finished)]
            report.total += 1
            report.stats["samples"] += k
            report.stats["correct"] += sum(correct)
            report.stats["unfinished"] += finished.count(False)
            report.stats["empty"] += sum(1 for t in texts if not t)
            good = [j for j in range(k) if correct[j] and texts[j]]
            bad = [j for j in range(k) if not correct[j] and texts[j]]
            where = f"{problem.meta.get('source', '?')} row {problem.meta.get('row', '?')}"
            answers = [extract_final_answer(t) for t in texts]
            if not good:
                report.drop("no_correct", f"{where}: gold {problem.answer}, sampled {answers}")
                continue
            if not bad:
                report.drop("no_incorrect", f"{where}: all {len(good)} non-empty samples correct ({problem.answer})")
                continue
            rng = random.Random(f"{seed}:{problem.meta.get('source')}:{problem.meta.get('row', b0 + i)}")
            c, r = rng.choice(good), rng.choice(bad)
            meta = {
                "source": problem.meta.get("source"),
                "row": problem.meta.get("row"),
                "gold": problem.answer,
                "chosen_answer": answers[c],
                "rejected_answer": answers[r],
                "rejected_finished": finished[r],
                "n_correct": len(good),
                "sampler": sampler,
            }
            pairs.append(PreferencePair(math_prompt(problem), texts[c], texts[r], meta))
            report.kept += 1
        bar.update(len(chunk))
    bar.close()
    return pairs, report
