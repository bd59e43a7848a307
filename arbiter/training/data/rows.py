"""Row conversion: TRL formats (text or chat messages, implicit prompts) and hh-rlhf text dialogues -> pairs."""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

from arbiter.chat import template_messages

from .records import DataError, DataReport, PreferencePair

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
