"""Token sequences for an SAE and the deterministic stream of their activations (the SAE recipe's data side).

Sequences come from preference pairs (prompt + chosen once, plus the rejected answer's tokens) or plain text;
each says from which position its activations are used. :class:`ActivationStream` runs them through the model
a chunk at a time (block ``layer``'s raw output through :func:`arbiter.training.sae.block_output`, which stops
the forward there), shuffles each chunk's activations with a seed of (epoch, chunk) and cuts them into SAE
batches: a position (epoch, chunk, batch) says exactly what comes next, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import ConfigError
from .features import block_output


@dataclass
class TokenSequence:
    ids: list[int]
    start: int  # first position whose activation is used


def _pair_sequences(tokenized: Any, data: Any) -> list[TokenSequence]:
    """Prompt + chosen once (prompt tokens included if tokens == 'all'), plus the rejected answer tokens
    (its prompt would only repeat the chosen sequence's prompt activations exactly)."""
    out = []
    for tp in tokenized:
        p = len(tp.prompt_ids)
        first = max(data.skip_first, 0 if data.tokens == "all" else p)
        out.append(TokenSequence(list(tp.prompt_ids) + list(tp.chosen_ids), first))
        out.append(TokenSequence(list(tp.prompt_ids) + list(tp.rejected_ids), max(data.skip_first, p)))
    return out


def _read_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"data.source {str(path)!r}: no such file (format=text reads .txt, .jsonl or .json)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix in (".jsonl", ".json"):
        raw = path.read_text(encoding="utf-8")
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()] if suffix == ".jsonl" else json.loads(raw)
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
            raise ConfigError(f"{path}: format=text needs rows with a string 'text' field")
        return [r["text"].strip() for r in rows if r["text"].strip()]
    raise ConfigError(f"{path}: format=text reads .txt (one document per line), .jsonl or .json")


def load_sequences(data: Any, backbone: Any) -> tuple[list[TokenSequence], list[TokenSequence], dict]:
    """(train sequences, eval sequences, data report dict) from the SAE recipe's ``data`` section (``format``,
    ``source``, ``limit``, ``seed``, ``max_length``, ``skip_first``, ``tokens``, ``eval_examples``)."""
    if data.format == "text":
        texts = _read_texts(Path(data.source))
        g = torch.Generator().manual_seed(data.seed)
        texts = [texts[i] for i in torch.randperm(len(texts), generator=g).tolist()]
        if data.limit:
            texts = texts[: data.limit]
        seqs = []
        for t in texts:
            ids = list(backbone.tokenizer(t, add_special_tokens=False)["input_ids"])[: data.max_length]
            if len(ids) > data.skip_first:
                seqs.append(TokenSequence(ids, data.skip_first))
        if len(seqs) <= data.eval_examples:
            raise ConfigError(f"{data.source}: {len(seqs)} usable texts, need more than data.eval_examples={data.eval_examples}")
        report = {"source": data.source, "kept": len(seqs)}
        return seqs[data.eval_examples:], seqs[: data.eval_examples], report

    from arbiter.training.data import load_pairs, tokenize_pairs

    pairs, rep = load_pairs(data.source, limit=data.limit, seed=data.seed)
    rep.raise_if_empty()
    tokenized, trep = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=data.max_length)
    if len(tokenized) <= data.eval_examples:
        raise ConfigError(f"{data.source}: {len(tokenized)} usable pairs, need more than data.eval_examples={data.eval_examples}")
    # load_pairs already shuffled with the seed: the first pairs are the held-out ones.
    ev, tr = tokenized[: data.eval_examples], tokenized[data.eval_examples:]
    report = {"load": rep.to_dict(), "tokenize": trep.to_dict()}
    return _pair_sequences(tr, data), _pair_sequences(ev, data), report


# --------------------------------------------------------------------------------------------------------------
# Activation stream


def _pad(seqs: list[TokenSequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [B, T], attention_mask [B, T], use_mask [B, T] (positions to train on)."""
    t = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    att = torch.zeros(len(seqs), t, dtype=torch.long)
    use = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        att[i, : len(s.ids)] = 1
        use[i, s.start: len(s.ids)] = True
    return ids, att, use


@torch.inference_mode()
def sequence_activations(model, seqs: list[TokenSequence], layer: int, *, batch_size: int, pad_id: int) -> torch.Tensor:
    """Block ``layer``'s raw output at every used position of ``seqs``: [n_tokens, d] float32 on CPU."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))  # similar lengths together: less padding
    out = []
    for i in range(0, len(order), batch_size):
        group = [seqs[j] for j in order[i: i + batch_size]]
        ids, att, use = _pad(group, pad_id)
        hidden = block_output(model, ids.to(device), att.to(device), layer)  # [b, T, d]
        out.append(hidden[use.to(device)].float().cpu())  # [n_used, d]
    return torch.cat(out) if out else torch.zeros(0)


class ActivationStream:
    """Deterministic stream of SAE batches; a position (epoch, chunk, batch) says exactly what comes next."""

    def __init__(self, model, seqs: list[TokenSequence], layer: int, *, chunk_sequences: int, batch_size: int,
                 batch_tokens: int, seed: int, pad_id: int):
        if not seqs:
            raise ConfigError("no training sequences")
        self.model, self.seqs, self.layer = model, seqs, layer
        self.chunk_sequences, self.batch_size, self.batch_tokens = chunk_sequences, batch_size, batch_tokens
        self.seed, self.pad_id = seed, pad_id
        self.n_chunks = math.ceil(len(seqs) / chunk_sequences)
        self._cache: tuple[tuple[int, int], list[torch.Tensor]] | None = None

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.seqs), generator=g).tolist()

    def batches(self, epoch: int, chunk: int) -> list[torch.Tensor]:
        """The SAE batches of one chunk: its activations shuffled (seeded) and split into near-equal parts."""
        if self._cache is not None and self._cache[0] == (epoch, chunk):
            return self._cache[1]
        idx = self._order(epoch)[chunk * self.chunk_sequences: (chunk + 1) * self.chunk_sequences]
        x = sequence_activations(self.model, [self.seqs[i] for i in idx], self.layer,
                                 batch_size=self.batch_size, pad_id=self.pad_id)  # [n, d]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + chunk)
        x = x[torch.randperm(x.shape[0], generator=g)]
        parts = list(torch.tensor_split(x, max(1, x.shape[0] // self.batch_tokens))) if x.shape[0] else []
        self._cache = ((epoch, chunk), parts)
        return parts

    def iterate(self, position: tuple[int, int, int]) -> Iterator[tuple[torch.Tensor, tuple[int, int, int]]]:
        """Yield (batch [n, d], position of the NEXT batch) forever, starting at ``position``."""
        epoch, chunk, b = position
        empty_chunks = 0
        while True:
            parts = self.batches(epoch, chunk)
            empty_chunks = 0 if parts else empty_chunks + 1
            if empty_chunks > self.n_chunks:
                raise ConfigError("the data yields no usable tokens (every sequence is shorter than data.skip_first?)")
            while b < len(parts):
                nxt = (epoch, chunk, b + 1) if b + 1 < len(parts) else (
                    (epoch, chunk + 1, 0) if chunk + 1 < self.n_chunks else (epoch + 1, 0, 0))
                yield parts[b], nxt
                b += 1
            epoch, chunk, b = (epoch, chunk + 1, 0) if chunk + 1 < self.n_chunks else (epoch + 1, 0, 0)
