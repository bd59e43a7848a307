"""Token ids -> OpenAI's ``logprobs`` entries (``token``, ``logprob``, ``bytes``, ``top_logprobs``).

``bytes`` are the token's raw UTF-8 bytes. For byte-level BPE vocabularies (GPT-2 style, SmolLM2's) the
token string maps back to bytes through GPT-2's byte <-> unicode table, so a token holding half of a
multi-byte character still has its exact bytes; its ``token`` text is then the bytes decoded with
replacement characters, as OpenAI shows such tokens. Other vocabularies use the decoded token text.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

from arbiter.generation.base import TokenLogprob


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # GPT-2's bytes_to_unicode table, inverted: printable bytes map to themselves, the rest to 256 + k.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Cached (token text, bytes) per token id for one tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def piece(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        raw: bytes | None = None
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        tok = convert(int(token_id)) if callable(convert) else None
        if isinstance(tok, str) and tok:
            dec = _byte_decoder()
            if all(ch in dec for ch in tok):
                raw = bytes(dec[ch] for ch in tok)
        if raw is None:
            raw = self.tokenizer.decode([int(token_id)], skip_special_tokens=False).encode("utf-8")
        out = (raw.decode("utf-8", errors="replace"), list(raw))
        self._cache[token_id] = out
        return out

    def entry(self, lp: TokenLogprob) -> dict[str, Any]:
        text, raw = self.piece(lp.token_id)
        top = []
        for tid, v in lp.top:
            t, b = self.piece(tid)
            top.append({"token": t, "logprob": v, "bytes": b})
        return {"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}

    def logprobs(self, lps: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        """The ``logprobs`` object of a choice (or a chunk), or None when none were asked for."""
        if lps is None:
            return None
        return {"content": [self.entry(x) for x in lps], "refusal": None}
