"""THE tokenisation of pairs (arbiter.backbone.encode_chat) and their padding into batches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch
from .records import DataReport, PreferencePair, TokenizedPair, _prompt_key

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
