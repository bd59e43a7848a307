"""THE chat encoding, shared by the service, the training data and evaluation (docs/features.md).

Two jobs, both here so that a head is trained on exactly the tokens it is served on:

1. **Messages -> template turns** (``template_messages``). OpenAI's message forms are mapped onto the roles a
   plain chat template knows (system / user / assistant). SmolLM2's ChatML template has no tool role, so tool
   traffic uses a fixed, documented fallback (the Hermes / Qwen convention the SmolLM2 family was tuned on):

   * ``developer`` -> ``system``;
   * an assistant turn's ``tool_calls`` (and the deprecated ``function_call``) are appended to its text, one
     ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` block per call (``arguments`` parsed
     as JSON when it is JSON, else kept as the string);
   * ``tool`` and the deprecated ``function`` results become a **user** turn that wraps each result in
     ``<tool_response>\\n...\\n</tool_response>``; consecutive results share one user turn;
   * assistant ``refusal`` text (the field or ``{"type": "refusal"}`` parts) is the turn's text.

2. **Content is text, never control** (``prompt_ids`` / ``answer_ids``). Special-token strings typed inside
   message content (``<|im_start|>``, ``<|im_end|>``, ...) are tokenised as ordinary text, so a user cannot
   forge a system or assistant turn. The template is rendered once with a sentinel in place of each
   message's content; every special token found in that rendering is the template's own. The text between
   two template special tokens (with the real contents put back) is tokenised with special-token matching
   off. Content without special-token text takes the plain rendering's tokens unchanged (the common case,
   and no extra work); a Hugging Face tokenizer splits text at special tokens before it pre-tokenises, so
   the two paths agree on everything but the forged tokens (a test checks both).
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

# Private-use code points: never produced by a tokenizer's decode of normal text, and not special tokens.
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (a template error, or a template that rewrites content)."""


def _call_text(name: str, arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass  # not JSON: keep the string as the model wrote it
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def _tool_calls(m: dict[str, Any]) -> list[str]:
    out = []
    for call in m.get("tool_calls") or ():
        if call.get("type", "function") == "custom" or "custom" in call:
            c = call.get("custom") or {}
            out.append(_call_text(str(c.get("name", "")), c.get("input", "")))
        else:
            f = call.get("function") or {}
            out.append(_call_text(str(f.get("name", "")), f.get("arguments", "")))
    fc = m.get("function_call")
    if fc:
        out.append(_call_text(str(fc.get("name", "")), fc.get("arguments", "")))
    return out


def template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-shaped messages (``role``, ``content`` text, optional ``tool_calls`` / ``function_call`` /
    ``refusal`` / ``tool_call_id`` / ``name``) -> ``[{"role", "content"}]`` in system / user / assistant."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        content = m.get("content") or ""
        if role == "developer":
            role = "system"
        if role in ("tool", "function"):
            block = f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        if role == "assistant":
            if not content and m.get("refusal"):
                content = m["refusal"]
            calls = _tool_calls(m)
            if calls:
                content = "\n".join([content, *calls]) if content else "\n".join(calls)
        out.append({"role": role, "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def _special_tokens(tokenizer: Any) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials = {t.content for t in decoder.values() if getattr(t, "special", False)}
    specials.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted((s for s in specials if s), key=len, reverse=True)


def _special_re(tokenizer: Any) -> re.Pattern[str] | None:
    # Cached on the tokenizer object: the set of special tokens does not change while it lives.
    cached = getattr(tokenizer, "_arbiter_special_re", None)
    if cached is None:
        specials = _special_tokens(tokenizer)
        cached = re.compile("|".join(re.escape(s) for s in specials)) if specials else False
        try:
            tokenizer._arbiter_special_re = cached
        except AttributeError:
            pass
    return cached if isinstance(cached, re.Pattern) else None


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with special-token matching off (special-token strings become plain text)."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    try:
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False))
    except Exception as e:  # jinja raises its own exception types (e.g. roles out of order)
        raise ChatTemplateError(str(e)) from None


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the conversation followed by the assistant generation prompt (content as plain text)."""
    turns = template_messages(messages)
    real = _render(tokenizer, turns, add_generation_prompt)
    contents = [t["content"] for t in turns]
    special = _special_re(tokenizer)
    if special is None or not any(special.search(c) for c in contents):
        # Nothing in the content looks like a special token: the plain rendering is already safe.
        return list(tokenizer(real, add_special_tokens=False)["input_ids"])
    return _segmented_ids(tokenizer, turns, add_generation_prompt, real, special)


def _segmented_ids(tokenizer: Any, turns: list[dict[str, Any]], add_generation_prompt: bool, real: str, special: re.Pattern[str]) -> list[int]:
    """Token ids of the rendering where only the template's own special tokens are special (module doc)."""
    contents = [t["content"] for t in turns]
    marked = [{"role": t["role"], "content": _SENTINEL.format(i)} for i, t in enumerate(turns)]
    skeleton = _render(tokenizer, marked, add_generation_prompt)
    restored = _SENTINEL_RE.sub(lambda mt: contents[int(mt.group(1))], skeleton)
    if restored != real or len(_SENTINEL_RE.findall(skeleton)) != len(turns):
        # The template rewrites content (e.g. strips it): the sentinels do not mark where content lands.
        raise ChatTemplateError(
            "message content contains special-token text, and this model's chat template rewrites content, "
            "so it cannot be encoded as plain text safely")
    ids: list[int] = []
    pos = 0
    for mt in special.finditer(skeleton):
        ids += _text_ids(tokenizer, _SENTINEL_RE.sub(lambda s: contents[int(s.group(1))], skeleton[pos:mt.start()]))
        ids.append(int(tokenizer.convert_tokens_to_ids(mt.group(0))))
        pos = mt.end()
    ids += _text_ids(tokenizer, _SENTINEL_RE.sub(lambda s: contents[int(s.group(1))], skeleton[pos:]))
    return ids


def answer_ids(tokenizer: Any, answer: str, end_id: int, *, close: bool = True) -> list[int]:
    """Token ids of an assistant answer (plain text), closed by the end-of-turn token (the position the head
    reads)."""
    ids = _text_ids(tokenizer, answer)
    return ids + [end_id] if close else ids


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, Any]], answer: str, end_id: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids ending in the end-of-turn token) for one prompt and one answer."""
    return prompt_ids(tokenizer, messages), answer_ids(tokenizer, answer, end_id)
