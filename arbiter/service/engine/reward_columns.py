"""Head rewards out of the generating vLLM instance, through reserved vocabulary columns (docs/features.md,
"The vLLM engine: rewards from the generating instance").

vLLM returns no hidden states of sampled sequences, but its model's ``compute_logits`` receives the post-norm
hidden state that produced each token, and a request can ask for the raw log-probs of chosen token ids
(``SamplingParams.logprob_token_ids``). So the engine's model class (``vllm_model.py``, registered by a vLLM
plugin) writes, in float32, ``reward_h - OFFSET`` into one reserved column per loaded head and ``-OFFSET`` into
one reference column, and the engine reads ``logprob(column_h) - logprob(reference)`` = ``reward_h`` (the
log-softmax normaliser cancels). Reserved columns are special tokens the chat never emits (SmolLM2's ids
3-16: ``<repo_name>``, ``<file_sep>``, ...). ``OFFSET`` keeps their probability below ``exp(-OFFSET + |r|)``
(~1e-16 for |r| < 4), so they are never sampled and the other tokens' log-probs do not move at float32
precision; the read-out's rounding error is about one ulp of ``OFFSET + logsumexp`` (~4e-6), against rewards of
order 1.

Everything here is torch only, so the codec is tested without vLLM (tests/test_reward_columns.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

OFFSET = 40.0


def reserved_ids(tokenizer: Any, keep: Iterable[int]) -> list[int]:
    """Special-token ids the chat never emits, lowest first: the tokenizer's added special tokens minus ``keep``
    (the closing token, the turn opener, BOS / EOS / PAD / UNK and every id the chat template itself renders)."""
    keep = set(keep)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            keep.add(v)
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    try:  # every id the template writes around a turn (``<|im_start|>``, role names, ...)
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        keep |= set(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception:  # no chat template: keep only the attributes above
        pass
    special = set()
    for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            special.add(int(tid))
    return sorted(special - keep)


def write(logits: torch.Tensor, hidden: torch.Tensor, columns: Sequence[tuple[int, nn.Module]], ref: int) -> torch.Tensor:
    """The model side: logits [B, V] (any dtype) -> float32 logits with ``reward - OFFSET`` in each head's column
    (the head applied to ``hidden`` [B, d] in float32, as ``arbiter.heads.end_features`` gives it in training) and
    ``-OFFSET`` in the reference column."""
    out = logits.float()
    if not columns or out.shape[0] == 0:
        return out
    h = hidden.float()
    with torch.inference_mode():
        for col, module in columns:
            p = next(module.parameters())
            out[:, col] = module(h.to(p.device, p.dtype)).float().to(out.device) - OFFSET
        out[:, ref] = -OFFSET
    return out


def read(logprobs: Mapping[int, Any], columns: Sequence[int], ref: int) -> list[float]:
    """The engine side: one generated position's log-probs (token id -> float or an object with ``.logprob``) ->
    the rewards of ``columns``."""

    def lp(t: int) -> float:
        v = logprobs[t]
        return float(getattr(v, "logprob", v))

    base = lp(ref)
    return [lp(c) - base for c in columns]


class ColumnsExhausted(RuntimeError):
    """More distinct heads are in use at once than there are reserved columns."""


@dataclass
class ColumnTable:
    """Which loaded head (by object: a swapped head is a new object) sits in which reserved column.

    A job pins its heads' columns from the moment its candidates start until their rewards are read, so a
    head swapped or unloaded meanwhile keeps its column for that job; an unpinned column goes to a new head
    (least recently used first). ``version`` counts changes: the engine pushes the table to vLLM's workers
    whenever it moves."""

    free: list[int]
    ref: int
    slots: dict[int, tuple[Any, int]] = field(default_factory=dict)  # column -> (LoadedHead, pins)
    used: dict[int, int] = field(default_factory=dict)  # column -> last use (a counter)
    version: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _clock: int = 0

    @classmethod
    def of(cls, reserved: Sequence[int]) -> ColumnTable:
        if len(reserved) < 2:
            raise ValueError(f"reward columns need at least 2 reserved token ids, the tokenizer has {len(reserved)}")
        return cls(free=list(reserved[1:]), ref=int(reserved[0]))

    @property
    def capacity(self) -> int:
        return len(self.free) + len(self.slots)

    def column_of(self, head: Any) -> int | None:
        return next((c for c, (h, _) in self.slots.items() if h is head), None)

    def pin(self, heads: Sequence[Any]) -> tuple[list[int], bool]:
        """Columns for ``heads`` (pinned once more each); True when the table changed (push it first)."""
        with self.lock:
            changed = False
            cols: list[int] = []
            for head in heads:
                c = self.column_of(head)
                if c is None:
                    c = self._take(exclude=cols)
                    self.slots[c] = (head, 0)
                    changed = True
                h, pins = self.slots[c]
                self.slots[c] = (h, pins + 1)
                self._clock += 1
                self.used[c] = self._clock
                cols.append(c)
            if changed:
                self.version += 1
            return cols, changed

    def unpin(self, cols: Sequence[int]) -> None:
        with self.lock:
            for c in cols:
                h, pins = self.slots[c]
                self.slots[c] = (h, max(0, pins - 1))

    def drop(self, head: Any) -> None:
        """Forget ``head`` (unloaded) when nothing pins it; a pinned one goes when its column is next needed."""
        with self.lock:
            c = self.column_of(head)
            if c is not None and self.slots[c][1] == 0:
                del self.slots[c]
                self.used.pop(c, None)
                self.free.append(c)
                self.version += 1

    def _take(self, exclude: Sequence[int]) -> int:
        if self.free:
            return self.free.pop(0)
        idle = [c for c, (_, pins) in self.slots.items() if pins == 0 and c not in exclude]
        if not idle:
            raise ColumnsExhausted(f"{len(self.slots)} heads are in use at once; the vLLM engine has "
                                   f"{self.capacity} reward columns")
        c = min(idle, key=lambda x: self.used.get(x, 0))
        del self.slots[c]
        return c

    def snapshot(self) -> tuple[int, list[tuple[int, Any]]]:
        """(version, [(column, head)]) taken together."""
        with self.lock:
            return self.version, sorted(((c, h) for c, (h, _) in self.slots.items()), key=lambda x: x[0])
