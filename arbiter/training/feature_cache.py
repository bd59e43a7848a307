"""Head features of tokenized preference pairs through the frozen backbone, cached on disk.

With a frozen backbone the feature of every (prompt, answer) is fixed, so a task-specific head trains on a
cache instead of re-running the model every step (docs/methods.md "Task-specific heads"). Features come from
``arbiter.backbone.batched_end_features`` (or its prompt-once forms below, tested equal): the hidden state the service's heads read (after the final norm by
default, or block ``layer``'s raw output) at the closing ``<|im_end|>``.

Cache entry (one per shard of consecutive pairs): ``<cache_dir>/<key>/features.safetensors`` (``chosen`` [N, d], ``rejected`` [N, d], float32)
plus ``meta.json`` (the key's parts and the sha256 of the safetensors file). The key is a sha256 over
(backbone fingerprint, layer, max_length, data hash), the data hash a sha256 over every token id of every
pair, so any change of model, tokenisation, truncation or data gives a new entry. Entries are written with
``atomic_dir`` (whole or absent). On load the file's sha256 is checked against the sidecar; a mismatch, an
unreadable file or wrong shapes log a warning and the entry is rebuilt: a corrupted cache is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from arbiter.backbone import length_batches as _batches  # the feature pass's length-sorted batching
from arbiter.fsutil import atomic_dir

from .artifacts import file_sha256

log = logging.getLogger("arbiter.training.feature_cache")

FEATURES_FILE = "features.safetensors"
META_FILE = "meta.json"
CACHE_VERSION = 1
DEFAULT_BATCH_TOKENS = 4096  # padded tokens per forward (B * T_max); bounds activation memory
DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_PROMPTS = 64  # prompts per prompt pass of shared_prompt_features (short answers: fewer, larger passes)
DEFAULT_SHARD_SIZE = 128  # pairs per cache entry


def default_feature_dir() -> Path:
    from arbiter.backbone import default_cache_dir

    return default_cache_dir() / "features"


def data_hash(pairs: Sequence[Any]) -> str:
    """sha256 over the token ids of every pair (prompt, chosen, rejected), order-sensitive."""
    h = hashlib.sha256()
    for p in pairs:
        for part in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(len(part).to_bytes(4, "little"))
            h.update(array("q", part).tobytes())  # int64: any vocabulary size fits
        h.update(b"|")
    return h.hexdigest()


def cuts_hash(cuts: Sequence[Sequence[int]]) -> str:
    """sha256 over every pair's list of prefix cuts (``packed_prefix_features``), order-sensitive."""
    return hashlib.sha256(json.dumps([list(map(int, c)) for c in cuts]).encode()).hexdigest()


def cache_key(fingerprint: Any, *, layer: int, max_length: int, data_sha: str, dtype: str = "float32",
              cuts_sha: str | None = None) -> tuple[str, dict]:
    """(hex key, the parts it hashes). ``fingerprint`` is a heads.BackboneFingerprint (or a plain dict);
    ``cuts_sha``: the closed-prefix cuts' hash when the entry also holds prefix features."""
    fp = fingerprint.model_dump() if hasattr(fingerprint, "model_dump") else dict(fingerprint)
    if fp.get("end_token", "<|im_end|>") == "<|im_end|>":
        fp.pop("end_token", None)  # ChatML keys stay as they were before the closing token was recorded
    parts = {"version": CACHE_VERSION, "backbone": fp, "layer": int(layer), "max_length": int(max_length),
             "data_sha256": data_sha}
    if dtype != "float32":  # float32 keys stay as they were: existing caches remain valid
        parts["dtype"] = dtype
    if cuts_sha is not None:  # entries without prefixes keep their keys
        parts["cuts_sha256"] = cuts_sha
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return key, parts


@dataclass
class PairFeatures:
    chosen: torch.Tensor  # [N, d] float32
    rejected: torch.Tensor  # [N, d] float32
    key: str
    path: Path  # the cache directory holding the shard entries
    status: str  # "hit" | "miss" | "partial (k/n shards cached)" | "rebuilt (<why>)" | "uncached"
    seconds: float  # time spent computing (0 on a hit)
    tokens: int  # tokens fed forward (0 on a hit)
    # Closed-prefix features (``cuts`` given): [M, d] each, pair order then each pair's cut order
    prefix_chosen: torch.Tensor | None = None
    prefix_rejected: torch.Tensor | None = None


def _pad_id(backbone: Any) -> int:
    """The id padding positions hold (never read: masks and causality hide them): the tokenizer's, else the closing id."""
    pad = backbone.tokenizer.pad_token_id
    return int(backbone.end_id if pad is None else pad)


def compute_features(
    backbone: Any,
    sequences: Sequence[Sequence[int]],
    *,
    layer: int = -1,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    desc: str = "head features",
    progress: bool = True,
) -> torch.Tensor:
    """Features of full sequences (prompt + answer ending in <|im_end|>) -> [N, d] float32, input order.

    The one feature pass (``arbiter.backbone.batched_end_features``) with a progress bar: length-sorted,
    right-padded batches, read at each sequence's last token (its closing ``<|im_end|>``).
    """
    from tqdm.auto import tqdm

    from arbiter.backbone import batched_end_features

    if not sequences:
        return torch.zeros(0, backbone.hidden_size)
    with tqdm(total=sum(len(s) for s in sequences), desc=desc, unit="tok", unit_scale=True, disable=not progress,
              smoothing=0.05) as bar:
        return batched_end_features(backbone.model, sequences, [layer], batch_tokens=batch_tokens,
                                    pad_id=_pad_id(backbone), max_batch=max_batch, progress=bar.update)[layer]


def _prompt_groups(pairs: Sequence[Any], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Pair indices grouped for the prompt pass of :func:`shared_prompt_features`: sorted by prompt length
    (longest first) so prompts pad little; ``B * P_max <= batch_tokens`` and at most ``max_batch`` pairs."""
    plen = [len(p.prompt_ids) for p in pairs]
    return _batches(plen, batch_tokens, max_batch)


_MIN_SHARED_PREFIX = 8  # a shorter common prefix is not worth a forward of its own


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(x) for x in seqs)
    for k in range(n):
        t = first[k]
        if any(x[k] != t for x in seqs):
            return k
    return n


# Fixed cost of one extra forward, in padded-token equivalents (kernel launches, the attention over the
# prompt, Python): an answer sub-batch is split off only when it saves more padding than this.
_FORWARD_OVERHEAD_TOKENS = 256


def _answer_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Row indices of a group's answers split into sub-batches that minimise padded tokens plus a per-forward
    overhead (exact dynamic programme over the rows sorted by length, longest first); each sub-batch keeps
    ``rows * A_max <= batch_tokens`` unless it is a single row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    L = [lengths[i] for i in order]
    n = len(L)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # rows order[i:j] in one forward, padded to L[i]
            if j - i > 1 and (j - i) * L[i] > batch_tokens:
                continue
            c = best[i] + (j - i) * L[i] + _FORWARD_OVERHEAD_TOKENS
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(order[cut[j] : j])
        j = cut[j]
    return out[::-1]


def shared_prompt_features(
    backbone: Any,
    pairs: Sequence[Any],
    *,
    layer: int = -1,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_batch: int = DEFAULT_MAX_PROMPTS,
    desc: str = "head features",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [N, d], rejected [N, d]) features, running each pair's shared prompt through the model once.

    Pairs go in groups of similar prompt length (:func:`_prompt_groups`): the group's common prompt prefix
    runs once, then one forward over the rest of the group's prompts (left-padded) keeps their KV cache; the group's chosen and rejected answers (two rows per prompt) are then
    sorted by length and split into sub-batches (:func:`_answer_batches`, so a long answer does not make the
    short ones pay for padding), each a forward that continues from its rows of the prompt cache (right-padded,
    explicit position ids so padding never shifts a real token). That is ~prompt + |chosen| + |rejected|
    tokens per pair instead of 2 * prompt + both answers, in batched matmuls. The result equals
    ``forward_features`` over the full sequences up to float rounding (a test checks it).
    """
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from arbiter.backbone import LayerCapture, base_model
    from arbiter.heads import end_features

    device = next(backbone.model.parameters()).device
    dec = base_model(backbone.model)  # the decoder stack: last_hidden_state is after the final norm
    d = int(backbone.hidden_size)
    pad = _pad_id(backbone)
    out = torch.empty(2 * len(pairs), d, dtype=torch.float32)  # [2N, d]: row 2i chosen, 2i + 1 rejected
    total = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not progress, smoothing=0.05)
    capture = LayerCapture(backbone.model, layer) if layer >= 0 else None
    try:
        with torch.inference_mode():
            for idx in _prompt_groups(pairs, batch_tokens, max_batch):
                group = [pairs[i] for i in idx]
                b = len(group)
                plen = torch.tensor([len(p.prompt_ids) for p in group])  # [B]
                cache = DynamicCache(config=backbone.model.config)
                # The group's common prompt prefix (the chat template's system turn, a task instruction) runs
                # once and its cache is expanded to every row; each prompt keeps at least one token of its own.
                c = _common_prefix_len([p.prompt_ids for p in group])
                c = min(c, int(plen.min()) - 1) if c >= _MIN_SHARED_PREFIX and b > 1 else 0
                if c:
                    prefix = torch.tensor([list(group[0].prompt_ids[:c])], dtype=torch.long, device=device)  # [1, C]
                    dec(input_ids=prefix, past_key_values=cache, use_cache=True)
                    cache.batch_repeat_interleave(b)
                S = int(plen.max()) - c
                ids = torch.full((b, S), pad, dtype=torch.long)  # [B, S] left-padded prompt suffixes
                smask = torch.zeros((b, S), dtype=torch.long)  # [B, S]
                for r, p in enumerate(group):
                    ids[r, S - (len(p.prompt_ids) - c):] = torch.tensor(list(p.prompt_ids[c:]), dtype=torch.long)
                    smask[r, S - (len(p.prompt_ids) - c):] = 1
                pmask = torch.cat([torch.ones((b, c), dtype=torch.long), smask], dim=1)  # [B, C + S]
                spos = c + (smask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
                dec(input_ids=ids.to(device), attention_mask=pmask.to(device), position_ids=spos.to(device),
                    past_key_values=cache, use_cache=True)
                answers = [a for p in group for a in (p.chosen_ids, p.rejected_ids)]  # row r: prompt r // 2
                for rows in _answer_batches([len(a) for a in answers], batch_tokens):
                    prow = torch.tensor([r // 2 for r in rows])  # [R] the prompt row of each answer row
                    sub = DynamicCache(config=backbone.model.config)
                    for k, lay in enumerate(cache.layers):  # this sub-batch's rows of the prompt cache
                        sub.update(lay.keys[prow.to(device)], lay.values[prow.to(device)], k)  # type: ignore[union-attr, index]
                    alen = torch.tensor([len(answers[r]) for r in rows])  # [R]
                    A = int(alen.max())
                    aids = torch.full((len(rows), A), pad, dtype=torch.long)  # [R, A] right-padded answers
                    amask = torch.zeros((len(rows), A), dtype=torch.long)  # [R, A]
                    for k, r in enumerate(rows):
                        aids[k, : len(answers[r])] = torch.tensor(list(answers[r]), dtype=torch.long)
                        amask[k, : len(answers[r])] = 1
                    mask = torch.cat([pmask[prow], amask], dim=1)  # [R, P + A]
                    apos = plen[prow][:, None] + torch.arange(A)[None, :]  # [R, A] continue each prompt
                    o = dec(input_ids=aids.to(device), attention_mask=mask.to(device), position_ids=apos.to(device),
                            past_key_values=sub, use_cache=True)
                    hidden = o.last_hidden_state if capture is None else capture.output  # [R, A, d]
                    feats = end_features(hidden, (alen - 1).to(device)).float().cpu()  # [R, d] at the closing token
                    dest = torch.tensor([2 * idx[r // 2] + r % 2 for r in rows])
                    out[dest] = feats
                bar.update(int(plen.sum()) + sum(len(a) for a in answers))
    finally:
        if capture is not None:
            capture.remove()
    bar.close()
    return out[0::2].contiguous(), out[1::2].contiguous()


DEFAULT_PACKED_BATCH_TOKENS = 2048  # padded packed tokens per forward (measured faster than 4096 on 2 cores)
PACK_MIN_ANSWER_TOKENS = 8  # "auto" packs pairs whose answers average at least this many tokens


def packed_pair_features(
    backbone: Any,
    pairs: Sequence[Any],
    *,
    layer: int = -1,
    batch_tokens: int = DEFAULT_PACKED_BATCH_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    desc: str = "head features",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [N, d], rejected [N, d]) features from ONE packed row per pair: ``prompt | chosen | rejected``.

    A 4D attention mask keeps the rejected answer from seeing the chosen one (causal otherwise), and the
    rejected answer's position ids restart where the prompt ends, so each answer sees exactly ``prompt +
    itself`` at its own positions: the features equal ``forward_features`` over the two full sequences up to
    float rounding (a test checks it). The prompt runs once per pair as in :func:`shared_prompt_features`,
    but without copying a KV cache per answer row: on long, uneven answers (hh-rlhf) this runs as fast per
    token as a plain forward, while on short answers behind a shared instruction (SST-2) the shared-prompt
    path, which also runs the common prefix once per group, is faster (benchmarks/reports/feature_extraction_*.md).
    Rows are length-sorted and right-padded (padding comes after every real token, so causality hides it).
    """
    c, r, _, _ = packed_prefix_features(backbone, pairs, None, layer=layer, batch_tokens=batch_tokens,
                                        max_batch=max_batch, desc=desc, progress=progress)
    return c, r


def cut_lengths(pair: Any, k: int) -> tuple[int, int]:
    """Answer tokens (closing token not counted) that a cut after ``k`` generated tokens keeps of the chosen and
    the rejected answer: ``min(k, answer length)``, so an answer shorter than the cut stays whole (as a candidate
    that finished before a pruning checkpoint is scored whole)."""
    return min(k, len(pair.chosen_ids) - 1), min(k, len(pair.rejected_ids) - 1)


def packed_prefix_features(
    backbone: Any,
    pairs: Sequence[Any],
    cuts: Sequence[Sequence[int]] | None,
    *,
    layer: int = -1,
    batch_tokens: int = DEFAULT_PACKED_BATCH_TOKENS,
    max_batch: int = DEFAULT_MAX_BATCH,
    desc: str = "head features",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`packed_pair_features` plus CLOSED PREFIXES: (chosen [N, d], rejected [N, d], prefix chosen [M, d],
    prefix rejected [M, d]), the prefix rows in pair order, then ``cuts[i]`` order (M = total number of cuts).

    The feature of answer ``a`` cut after ``k`` tokens is the capture layer's state at a closing token fed right
    after ``a[:k]``: what the serving engine reads when pruning scores a closed prefix (docs/features.md,
    "Pruning"), and what a standalone forward of ``prompt + a[:k] + <|im_end|>`` gives. The answer tokens' states
    do not depend on what follows them (causal attention), so each closing token rides the pair's packed row as
    one extra position: ``prompt | chosen | rejected | close(chosen, k1) | close(rejected, k1) | ...``, each closing
    token at position ``len(prompt) + k`` attending to the prompt, its answer's first ``k`` tokens and itself.
    A cut costs two tokens instead of a forward of the prompt and both prefixes (tests check the equality).
    """
    from tqdm.auto import tqdm

    from arbiter.backbone import LayerCapture, base_model

    cuts = [()] * len(pairs) if cuts is None else [tuple(int(k) for k in c) for c in cuts]
    if len(cuts) != len(pairs):
        raise ValueError(f"cuts: {len(cuts)} lists for {len(pairs)} pairs")
    if any(k < 1 for c in cuts for k in c):
        raise ValueError("cuts: every cut keeps at least 1 answer token")
    device = next(backbone.model.parameters()).device
    dec = base_model(backbone.model)
    d = int(backbone.hidden_size)
    pad = _pad_id(backbone)
    end = int(backbone.end_id)
    lens = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    total = [a + b + c + 2 * len(cuts[i]) for i, (a, b, c) in enumerate(lens)]
    first = [0]  # index of pair i's first prefix row
    for c in cuts:
        first.append(first[-1] + len(c))
    out = torch.empty(2 * len(pairs), d, dtype=torch.float32)  # [2N, d]: row 2i chosen, 2i + 1 rejected
    pout = torch.empty(2 * first[-1], d, dtype=torch.float32)  # [2M, d]: the same interleaving for the cuts
    bar = tqdm(total=sum(total), desc=desc, unit="tok", unit_scale=True, disable=not progress, smoothing=0.05)
    capture = LayerCapture(backbone.model, layer) if layer >= 0 else None
    try:
        with torch.inference_mode():
            for idx in _batches(total, batch_tokens, max_batch):
                b, t = len(idx), max(total[i] for i in idx)
                ids = torch.full((b, t), pad, dtype=torch.long)  # [b, T]
                pos = torch.arange(t).repeat(b, 1)  # [b, T]
                mask = torch.ones(t, t, dtype=torch.bool).tril().repeat(b, 1, 1)  # [b, T, T] True = attend
                ncut = max(len(cuts[i]) for i in idx)
                ends = torch.zeros((b, 2 + 2 * ncut), dtype=torch.long)  # [b, 2 + 2C] positions read
                for r, i in enumerate(idx):
                    p, (np_, nc, nr) = pairs[i], lens[i]
                    ids[r, : np_ + nc + nr] = torch.tensor([*p.prompt_ids, *p.chosen_ids, *p.rejected_ids],
                                                           dtype=torch.long)
                    pos[r, np_ + nc : np_ + nc + nr] = torch.arange(np_, np_ + nr)
                    mask[r, np_ + nc : np_ + nc + nr, np_ : np_ + nc] = False  # rejected never sees chosen
                    ends[r, 0], ends[r, 1] = np_ + nc - 1, np_ + nc + nr - 1
                    q = np_ + nc + nr  # the closing tokens follow the two answers
                    for j, k in enumerate(cuts[i]):
                        kc, kr = cut_lengths(p, k)
                        for side, (start, kept) in enumerate(((np_, kc), (np_ + nc, kr))):
                            ids[r, q] = end
                            pos[r, q] = np_ + kept
                            mask[r, q, :] = False
                            mask[r, q, :np_] = True  # the prompt
                            mask[r, q, start : start + kept] = True  # its answer's first `kept` tokens
                            mask[r, q, q] = True
                            ends[r, 2 + 2 * j + side] = q
                            q += 1
                o = dec(input_ids=ids.to(device), attention_mask=mask[:, None].to(device), position_ids=pos.to(device),
                        use_cache=False)
                hidden = o.last_hidden_state if capture is None else capture.output  # [b, T, d]
                feats = hidden[torch.arange(b, device=device)[:, None], ends.to(device)].float().cpu()  # [b, 2+2C, d]
                rows = torch.tensor(idx)
                out[2 * rows], out[2 * rows + 1] = feats[:, 0], feats[:, 1]
                for r, i in enumerate(idx):
                    m = len(cuts[i])
                    pout[2 * first[i] : 2 * (first[i] + m)] = feats[r, 2 : 2 + 2 * m]
                bar.update(sum(total[i] for i in idx))
    finally:
        if capture is not None:
            capture.remove()
    bar.close()
    return out[0::2].contiguous(), out[1::2].contiguous(), pout[0::2].contiguous(), pout[1::2].contiguous()


def extraction_method(pairs: Sequence[Any]) -> str:
    """``"packed"`` when the answers average at least ``PACK_MIN_ANSWER_TOKENS`` tokens, else ``"shared"``."""
    mean_answer = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / (2 * max(1, len(pairs)))
    return "packed" if mean_answer >= PACK_MIN_ANSWER_TOKENS else "shared"


def prompt_once_features(backbone: Any, pairs: Sequence[Any], *, layer: int = -1, method: str = "auto",
                         batch_tokens: int | None = None, desc: str = "head features",
                         progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with each prompt run once per pair: ``method`` "packed", "shared" or "auto"
    (:func:`extraction_method`). ``batch_tokens`` None takes each method's default."""
    if method == "auto":
        method = extraction_method(pairs)
    if method == "packed":
        return packed_pair_features(backbone, pairs, layer=layer, desc=desc, progress=progress,
                                    batch_tokens=batch_tokens or DEFAULT_PACKED_BATCH_TOKENS)
    if method == "shared":
        return shared_prompt_features(backbone, pairs, layer=layer, desc=desc, progress=progress,
                                      batch_tokens=batch_tokens or DEFAULT_BATCH_TOKENS)
    raise ValueError(f"unknown extraction method {method!r}: expected auto, packed or shared")


def _read_entry(entry: Path, key: str, n: int, d: int, m: int | None = None) -> tuple[torch.Tensor, ...]:
    """Load and verify one cache entry; raises ValueError with the reason if anything is off."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path, feat_path = entry / META_FILE, entry / FEATURES_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable sidecar {meta_path.name} ({e})") from None
    if not isinstance(meta, dict) or meta.get("key") != key:
        raise ValueError("sidecar key does not match")
    try:
        digest = file_sha256(feat_path)
    except OSError as e:
        raise ValueError(f"unreadable {feat_path.name} ({e})") from None
    if digest != meta.get("sha256"):
        raise ValueError(f"sha256 mismatch ({digest[:12]} != {str(meta.get('sha256'))[:12]})")
    try:
        t = load_file(str(feat_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"unreadable safetensors ({e})") from None
    c, r = t.get("chosen"), t.get("rejected")
    if c is None or r is None or tuple(c.shape) != (n, d) or tuple(r.shape) != (n, d):
        raise ValueError(f"wrong tensors: expected chosen/rejected of shape [{n}, {d}]")
    got = [c, r]
    if m is not None:
        pc, pr = t.get("prefix_chosen"), t.get("prefix_rejected")
        if pc is None or pr is None or tuple(pc.shape) != (m, d) or tuple(pr.shape) != (m, d):
            raise ValueError(f"wrong tensors: expected prefix_chosen/prefix_rejected of shape [{m}, {d}]")
        got += [pc, pr]
    if not all(torch.isfinite(x).all() for x in got):
        raise ValueError("features contain NaN/Inf")
    return tuple(x.float() for x in got)


def _shard_features(backbone, shard, *, layer, max_length, root, batch_tokens, share_prompt, use_cache, progress, desc,
                    cuts=None):
    """(features, key, entry, status, seconds, tokens) of one shard of pairs; features: (chosen [n, d], rejected
    [n, d]) plus (prefix chosen [m, d], prefix rejected [m, d]) when ``cuts`` are given."""
    from safetensors.torch import save_file

    d = int(backbone.hidden_size)
    m = None if cuts is None else sum(len(c) for c in cuts)
    key, parts = cache_key(backbone.fingerprint, layer=layer, max_length=max_length, data_sha=data_hash(shard),
                           dtype=str(next(backbone.model.parameters()).dtype).removeprefix("torch."),
                           cuts_sha=None if cuts is None else cuts_hash(cuts))
    entry = root / key[:32]
    status = "miss"
    if use_cache and entry.exists():
        try:
            return _read_entry(entry, key, len(shard), d, m), key, entry, "hit", 0.0, 0
        except ValueError as e:
            log.warning("feature cache entry %s is corrupted or stale: %s; rebuilding it", entry, e)
            status = f"rebuilt ({e})"
            shutil.rmtree(entry, ignore_errors=True)
    t0 = time.perf_counter()
    feats: tuple[torch.Tensor, ...]
    if cuts is not None and m is not None:  # closed prefixes ride the packed rows (packed_prefix_features)
        feats = packed_prefix_features(backbone, shard, cuts, layer=layer, desc=desc, progress=progress)
        tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in shard) + 2 * m
    elif share_prompt:
        chosen, rejected = prompt_once_features(backbone, shard, layer=layer, desc=desc, progress=progress)
        tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in shard)
    else:
        seqs = [list(p.prompt_ids) + list(p.chosen_ids) for p in shard]
        seqs += [list(p.prompt_ids) + list(p.rejected_ids) for p in shard]
        every = compute_features(backbone, seqs, layer=layer, batch_tokens=batch_tokens, progress=progress, desc=desc)
        tokens = sum(len(x) for x in seqs)
        chosen, rejected = every[: len(shard)].contiguous(), every[len(shard):].contiguous()  # [n, d] each
    if cuts is None:
        feats = (chosen, rejected)
    seconds = time.perf_counter() - t0
    if not use_cache:
        return feats, key, entry, "uncached", seconds, tokens
    names = ("chosen", "rejected", "prefix_chosen", "prefix_rejected")
    with atomic_dir(entry) as tmp:
        save_file(dict(zip(names, feats)), str(tmp / FEATURES_FILE))
        meta = {"key": key, **parts, "sha256": file_sha256(tmp / FEATURES_FILE), "n_pairs": len(shard),
                "hidden_size": d, "tokens": tokens, "seconds": round(seconds, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if m is not None:
            meta["n_prefixes"] = m
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return feats, key, entry, status, seconds, tokens


def pair_features(
    backbone: Any,
    pairs: Sequence[Any],
    *,
    layer: int = -1,
    max_length: int,
    cache_dir: str | os.PathLike | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    shard_size: int = DEFAULT_SHARD_SIZE,
    share_prompt: bool = True,
    use_cache: bool = True,
    progress: bool = True,
    cuts: Sequence[Sequence[int]] | None = None,
) -> PairFeatures:
    """Chosen/rejected head features of tokenized pairs ([N, d] each), from the cache or computed and cached.

    ``pairs``: ``arbiter.training.data.TokenizedPair`` (prompt_ids, chosen_ids, rejected_ids ending in
    <|im_end|>). ``max_length`` is part of the key (it decided which pairs were kept or truncated).
    ``share_prompt`` (default): run each prompt once per pair (:func:`prompt_once_features`: packed rows for
    long answers, the shared-prompt KV cache for short ones); otherwise full sequences in length-sorted batches
    (:func:`compute_features`, ``batch_tokens``). Both read the same features (equal up to float rounding),
    so the cache key does not depend on the choice.
    The pairs are cached in shards of ``shard_size`` consecutive pairs, each its own entry: an interrupted
    extraction keeps its finished shards, and a larger ``limit`` later reuses all but the last shard.
    ``cuts``: per pair, token counts after which both answers are also read as closed prefixes
    (:func:`packed_prefix_features`, always packed; part of the key); they come back as ``prefix_chosen`` /
    ``prefix_rejected``.
    """
    import torch

    if cuts is not None and len(cuts) != len(pairs):
        raise ValueError(f"cuts: {len(cuts)} lists for {len(pairs)} pairs")
    if not pairs:
        raise ValueError("no pairs to compute features for")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    root = Path(cache_dir) if cache_dir else default_feature_dir()
    shards = [pairs[i : i + shard_size] for i in range(0, len(pairs), shard_size)]
    parts: list[tuple[torch.Tensor, ...]] = []
    keys, statuses = [], []
    seconds = 0.0
    tokens = 0
    for j, shard in enumerate(shards):
        desc = f"features of {len(pairs)} pairs" + (f" (shard {j + 1}/{len(shards)})" if len(shards) > 1 else "")
        lo = j * shard_size
        feats, key, entry, status, sec, tok = _shard_features(
            backbone, shard, layer=layer, max_length=max_length, root=root, batch_tokens=batch_tokens,
            share_prompt=share_prompt, use_cache=use_cache, progress=progress, desc=desc,
            cuts=None if cuts is None else cuts[lo : lo + len(shard)])
        parts.append(feats)
        keys.append(key)
        statuses.append(status)
        seconds += sec
        tokens += tok
    key = keys[0] if len(keys) == 1 else hashlib.sha256("".join(keys).encode()).hexdigest()
    hits = statuses.count("hit")
    rebuilt = [s for s in statuses if s.startswith("rebuilt")]
    if rebuilt:
        status = rebuilt[0] if len(shards) == 1 else f"rebuilt {len(rebuilt)}/{len(shards)} shards: {rebuilt[0]}"
    elif hits == len(shards):
        status = "hit"
    elif statuses[0] == "uncached":
        status = "uncached"
    elif hits == 0:
        status = "miss"
    else:
        status = f"partial ({hits}/{len(shards)} shards cached)"
    log.info("features of %d pairs: %s (%d tokens computed in %.1f s) under %s", len(pairs), status, tokens, seconds, root)
    cat = [torch.cat([f[i] for f in parts]) for i in range(len(parts[0]))]
    return PairFeatures(cat[0], cat[1], key, root, status, seconds, tokens,
                        *(cat[2:] if cuts is not None else ()))


def prefix_cuts(pairs: list[Any], copies: int, min_tokens: int, eval_at: list[int], seed: int) -> tuple[list[tuple[int, ...]], list[tuple[int, int, str]]]:
    """Each pair's closed-prefix cuts (``feature_cache.pair_features(cuts=...)``) and, per prefix row, (pair index,
    cut, "random" | "eval"). Random cuts: ``copies`` draws from [min_tokens, L - 1] (L: the longer answer's tokens,
    closing token not counted), seeded by (seed, pair index); eval cuts: each of ``eval_at`` below L (a cut at or
    past both answers' ends would be the whole pair again)."""
    import random

    cuts, rows = [], []
    for i, p in enumerate(pairs):
        longer = max(len(p.chosen_ids), len(p.rejected_ids)) - 1
        rng = random.Random(f"prefix-cuts:{seed}:{i}")
        mine = [("random", rng.randint(min_tokens, longer - 1)) for _ in range(copies)] if longer - 1 >= min_tokens else []
        mine += [("eval", k) for k in eval_at if k < longer]
        cuts.append(tuple(k for _, k in mine))
        rows += [(i, k, kind) for kind, k in mine]
    return cuts, rows


def prefix_accuracy(head: Any, feats: Any, rows: list[tuple[int, int, str]], split: list[int], k: int) -> tuple[float | None, int]:
    """(accuracy, pairs) of ``head`` on the closed prefixes cut at ``k`` of the pairs in ``split``."""
    import torch

    members = set(split)
    sel = [j for j, (i, kk, kind) in enumerate(rows) if kind == "eval" and kk == k and i in members]
    if not sel:
        return None, 0
    with torch.no_grad():
        t = torch.tensor(sel)
        return float((head(feats.prefix_chosen[t]) > head(feats.prefix_rejected[t])).float().mean()), len(sel)
