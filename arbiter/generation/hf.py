"""Plain-transformers engine (the CPU default): a batched sampling loop that captures reward features.

Why a custom decode loop instead of ``model.generate``: the loop calls the decoder stack and the LM head
separately, so the hidden state after the final norm (what the LM head reads, and what a DPH head reads)
is in hand at every step at no cost: no ``output_hidden_states`` (which costs ~18% here), and heads that
name an intermediate layer get a forward hook on that block only. When a candidate samples
``<|im_end|>``, that token has not been fed yet; the row stays in the batch for one more decode step that
feeds it, and the hidden state of that step is the candidate's feature (docs/architecture.md, "One feature path").
Candidates cut off by ``max_tokens`` are fed ``<|im_end|>`` the same way, as if the answer closed there.
Finished rows leave the batch (their KV cache rows are dropped), so a long candidate never makes the
others pay, and a cancelled request frees its rows at the next step.

Prompts are prefilled once per request and the KV cache is then expanded to the request's N rows.
"""

from __future__ import annotations

import functools
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache

from arbiter.backbone import (
    FEATURE_BATCH_TOKENS,
    Backbone,
    Cancelled,
    LayerCapture,
    base_model,
    shared_prefix_end_features,
)
from arbiter.confidence import Trace, token_confidence
from arbiter.heads import head_rewards

from .base import (
    Abandoned,
    AdapterGone,
    Admit,
    Candidate,
    Deliver,
    Engine,
    GenerationJob,
    GenerationResult,
    SamplingParams,
    TokenLogprob,
    candidate_seed,
)

log = logging.getLogger("arbiter.engine.hf")

FINAL = -1  # the layer id of "after the final norm"


@dataclass
class _Row:
    job: int
    index: int  # candidate index within its job
    gen: torch.Generator
    params: SamplingParams
    capture: bool
    stream: bool
    tokens: list[int] = field(default_factory=list)
    lps: list[TokenLogprob] = field(default_factory=list)  # one per token, when params.logprobs is set
    lp_sent: int = 0  # log-prob entries already streamed
    state: str = "active"  # active | force_close (feed last token, then <|im_end|>) | closing | done
    finish: str | None = None
    text: str = ""
    emitted: int = 0
    stop_cut: bool = False  # ended on a stop string: cached tokens run past the answer, rescore
    features: dict[int, torch.Tensor] | None = None
    partials: list[tuple[int, float]] = field(default_factory=list)  # (tokens, the picking head's prefix reward)
    pruned_at: int | None = None
    trace: Trace | None = None  # GenerationJob.confidence: the answer tokens' confidences so far
    matcher: Any = None  # SamplingParams.structured: this candidate's llguidance matcher (arbiter.structured)



@functools.lru_cache(maxsize=256)
def _bias_tensors(bias: tuple[tuple[int, float], ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's logit_bias as (token ids [K], values [K]) on ``device``: cached by value, so each decode step of
    each row reuses them."""
    return (torch.tensor([i for i, _ in bias], device=device),
            torch.tensor([b for _, b in bias], device=device, dtype=torch.float32))


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class _Batch:
    """The running decode batch of the HF engine: rows of every job in it, their KV cache, mask and positions.

    ``join`` prefills new jobs (one row per prompt, left padded), expands them to N rows and merges their cache
    rows into the running cache (the shorter side is left padded with masked zeros, so every row keeps its
    own positions); ``step`` samples one token per active row, drops finished rows and runs one decode step.
    """

    def __init__(self, eng: "HFEngine", deliver: "Deliver | None"):
        self.e = eng
        self.deliver = deliver
        self.rows: list[_Row] = []  # rows in the batch, in batch order
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [K, T]
        self.next_pos: torch.Tensor | None = None  # [K]
        self.logits: torch.Tensor | None = None  # [K, V]
        self.jobs: list[GenerationJob] = []
        self.left: dict[int, int] = {}  # job id -> rows not done yet
        self.done_rows: dict[int, list[_Row]] = {}
        self.slots: dict[int, dict[int, GenerationResult] | None] = {}
        self.captures: dict[int, LayerCapture] = {}
        self.pruned: dict[int, int] = {}  # job id -> rows pruned so far

    @property
    def active(self) -> bool:
        return bool(self.rows)

    def add_result_slot(self, job: GenerationJob, results: dict[int, GenerationResult] | None) -> None:
        self.slots[id(job)] = results

    def _finish(self, job: GenerationJob) -> None:
        res = self.e._finish_job(job, self.done_rows.pop(id(job), []))
        slot = self.slots.pop(id(job), None)
        if slot is not None:
            slot[id(job)] = res
        if self.deliver is not None:
            self.deliver(job, res)

    def _row_done(self, r: _Row) -> None:
        job = self.jobs[r.job]
        self.done_rows.setdefault(id(job), []).append(r)
        self.left[id(job)] -= 1
        if self.left[id(job)] == 0:
            self._finish(job)

    def join(self, jobs: Sequence[GenerationJob]) -> None:
        e, dev = self.e, self.e.device
        live = []
        for job in jobs:
            if job.cancelled.is_set() or job.n <= 0:
                self.jobs.append(job)
                self.left[id(job)] = 0
                self.done_rows[id(job)] = []
                self._finish(job)
            else:
                live.append(job)
        if not live:
            return
        for job in live:
            if job.prune is not None and not job.heads:
                raise ValueError("a job with GenerationJob.prune needs its heads (the first one ranks the prefixes)")
        wanted = {l for j in live for l in (*j.feature_layers, *((j.heads[0].config.layer,) if j.prune else ()))}
        for layer in sorted(wanted - {FINAL} - set(self.captures)):
            self.captures[layer] = LayerCapture(e.model, layer)
        L = max(len(j.prompt_ids) for j in live)
        ids = torch.full((len(live), L), e.pad_id, dtype=torch.long, device=dev)  # [P, L]
        mask = torch.zeros((len(live), L), dtype=torch.long, device=dev)  # [P, L]
        for p, job in enumerate(live):
            ids[p, L - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids, device=dev)
            mask[p, L - len(job.prompt_ids) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, L]
        cache = DynamicCache(config=e.model.config)
        out = e.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        logits = e.lm_head(out.last_hidden_state[:, -1])  # [P, V]
        # --- expand to N rows per request -----------------------------------------------------------
        rows, src = [], []
        for p, job in enumerate(live):
            j = len(self.jobs)
            self.jobs.append(job)
            self.left[id(job)] = job.n
            sp = job.params
            base_seed = sp.seed if sp.seed is not None else secrets.randbits(62)
            for i in range(job.n):
                g = torch.Generator(device=dev).manual_seed(candidate_seed(base_seed, job.first_index + i))
                rows.append(_Row(j, i, g, sp, bool(job.feature_layers), job.on_delta is not None,
                                 trace=Trace(job.confidence.window) if job.confidence is not None else None,
                                 matcher=e.constrainer.matcher(sp.structured) if sp.structured is not None else None))
                src.append(p)
        sel = torch.tensor(src, device=dev)
        cache.batch_select_indices(sel)
        mask, logits = mask[sel], logits[sel]  # [R, L], [R, V]
        next_pos = mask.sum(-1)  # [R] position id of the next fed token
        if self.cache is None:
            self.cache, self.mask, self.next_pos, self.logits, self.rows = cache, mask, next_pos, logits, rows
            return
        assert self.mask is not None and self.next_pos is not None and self.logits is not None
        # --- merge into the running batch: left pad the shorter side (masked), concatenate rows -------
        t_cur, t_new = self.mask.shape[1], mask.shape[1]
        T = max(t_cur, t_new)
        cur_layers: list[Any] = list(self.cache.layers)  # DynamicLayer: .keys / .values [rows, heads, T, d]
        add_layers: list[Any] = list(cache.layers)
        for cur, add in zip(cur_layers, add_layers):
            cur.keys = torch.cat([_pad_left(cur.keys, T - t_cur, 2), _pad_left(add.keys, T - t_new, 2)], dim=0)
            cur.values = torch.cat([_pad_left(cur.values, T - t_cur, 2), _pad_left(add.values, T - t_new, 2)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, T - t_cur, 1), _pad_left(mask, T - t_new, 1)], dim=0)
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.logits = torch.cat([self.logits, logits.to(self.logits.dtype)])
        self.rows += rows

    def step(self) -> None:
        e, dev = self.e, self.e.device
        batch_rows = self.rows
        assert self.cache is not None and self.mask is not None and self.next_pos is not None and self.logits is not None
        # --- choose each row's next input token ------------------------------------------------------
        want = [k for k, r in enumerate(batch_rows) if r.state == "active"]
        sampled, sampled_lps = e._sample(self.logits[want], [batch_rows[k] for k in want]) if want else ([], [])
        confs = self._confidences(want, sampled)
        feed: list[int] = [e.end_id] * len(batch_rows)
        for k, t, lp in zip(want, sampled, sampled_lps):
            r = batch_rows[k]
            job = self.jobs[r.job]
            if job.cancelled.is_set():
                r.state, r.finish = "done", "cancelled"
                continue
            if t in e.stop_ids:  # the closing token, or another EOS: the closing token is fed next
                r.finish = "stop"
                r.state = "closing" if r.capture else "done"
                e._emit(r, job, final=True)
                continue
            r.tokens.append(t)
            if r.matcher is not None:
                r.matcher.consume_token(t)  # the mask allowed it: the matcher moves on (never into an error)
            if lp is not None:
                r.lps.append(lp)
            if r.trace is not None:
                r.trace.add(*confs[k])
                if self._confidence_stop(r, job):
                    continue
            if r.params.stop or r.stream:
                r.text = e._decode(r.tokens)
            if e._check_stop(r):
                r.finish, r.stop_cut, r.state = "stop", True, "done"
                e._emit(r, job, final=True)
                continue
            if len(r.tokens) >= r.params.max_tokens:
                r.finish = "length"
                r.state = "force_close" if r.capture else "done"
                if not (r.params.stop or r.stream):
                    r.text = e._decode(r.tokens)
                e._emit(r, job, final=True)
            else:
                e._emit(r, job, final=False)
            feed[k] = t
        # Rows not sampled this step are "closing": they feed the closing token (the default in ``feed``).
        # --- drop finished rows from the batch (a job whose last row finished is delivered now) ------------
        keep = [k for k, r in enumerate(batch_rows) if r.state != "done"]
        for r in batch_rows:
            if r.state == "done":
                self._row_done(r)
        if not keep:
            self.rows = []
            return
        if len(keep) < len(batch_rows):
            ksel = torch.tensor(keep, device=dev)
            self.cache.batch_select_indices(ksel)
            self.mask, self.next_pos = self.mask[ksel], self.next_pos[ksel]
            feed = [feed[k] for k in keep]
            batch_rows = [batch_rows[k] for k in keep]
            self.rows = batch_rows
            # Leading columns that are padding for every row left (the longest row finished) are dropped, so the
            # cache stays as long as its longest live row: under steady load the batch never ends and would
            # otherwise grow by a column per step forever. Positions are per row (next_pos), so this is exact.
            first = int(self.mask.any(dim=0).int().argmax())
            if first > 0:
                layers: list[Any] = list(self.cache.layers)
                for layer in layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
                self.mask = self.mask[:, first:]
        # --- one decode step -------------------------------------------------------------------------
        inp = torch.tensor(feed, device=dev)[:, None]  # [K, 1]
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)  # [K, T+1]
        out = e.decoder(input_ids=inp, attention_mask=self.mask, position_ids=self.next_pos[:, None],
                        past_key_values=self.cache, use_cache=True)
        self.next_pos = self.next_pos + 1
        h = out.last_hidden_state[:, -1]  # [K, d] after the final norm
        for k, r in enumerate(batch_rows):
            if r.state == "closing":
                # This step fed the closing token: its hidden state is the reward feature.
                job = self.jobs[r.job]
                feats = {FINAL: h[k].float().clone()}
                for layer in job.feature_layers:
                    if layer != FINAL:
                        feats[layer] = self.captures[layer].output[k, -1].float().clone()
                r.features, r.state = feats, "done"
            elif r.state == "force_close":
                r.state = "closing"  # fed its last token; the closing token goes in next step
        self._prune(batch_rows, h)
        self.logits = e.lm_head(h)  # [K, V]

    def _confidences(self, want: list[int], sampled: list[int]) -> dict[int, tuple[float, float, float]]:
        """Row position -> (log-prob, DeepConf confidence, self-certainty) of the token just sampled, from the full
        distribution of the model's logits (temperature 1, before any bias or penalty: arbiter.confidence's
        definitions, which tests/test_confidence.py checks against a teacher-forced forward), for the rows of jobs
        that asked (GenerationJob.confidence). One vectorised pass over those rows."""
        ks = [(n, k) for n, k in enumerate(want) if self.rows[k].trace is not None]
        if not ks:
            return {}
        assert self.logits is not None
        idx = torch.tensor([k for _, k in ks], device=self.logits.device)
        toks = torch.tensor([sampled[n] for n, _ in ks], device=self.logits.device)
        got = token_confidence(self.logits[idx], toks)
        cols = [got["logprob"].tolist(), got["deepconf"].tolist(), got["self_certainty"].tolist()]
        return {k: (cols[0][m], cols[1][m], cols[2][m]) for m, (_, k) in enumerate(ks)}

    def _confidence_stop(self, r: _Row, job: GenerationJob) -> bool:
        """DeepConf's online stop (GenerationJob.confidence.stop_below): the row's last full window fell below the
        threshold, and stopping it leaves at least ``min_keep`` of the job's candidates."""
        spec = job.confidence
        assert spec is not None and r.trace is not None
        if spec.stop_below is None:
            return False
        g = r.trace.group()
        if g is None or g >= spec.stop_below or job.n - self.pruned.get(id(job), 0) - 1 < spec.min_keep:
            return False
        r.state, r.finish, r.pruned_at = "done", "pruned", len(r.tokens)
        self.pruned[id(job)] = self.pruned.get(id(job), 0) + 1
        return True

    def _prune(self, rows: list[_Row], h: torch.Tensor) -> None:
        """Early rejection (GenerationJob.prune, docs/features.md "Pruning"). This step fed each live row's latest
        token, so ``h`` (and a capture hook's output) holds the state at its prefix's last token: the picking
        head's reward of the prefix costs the head alone. With ``PruneSpec.close`` the prefix is scored as a closed
        answer instead (``_closed_states``: one extra decode step, the batch's cache restored after it). At a
        checkpoint, the lowest-ranked live rows of the job are marked done ("pruned"); the next step drops them from
        the batch and its KV cache like finished rows."""
        live: dict[tuple[int, int], list[int]] = {}  # (job, tokens) -> row positions
        for k, r in enumerate(rows):
            spec = self.jobs[r.job].prune
            if r.state == "active" and spec is not None and len(r.tokens) in spec.at:
                live.setdefault((r.job, len(r.tokens)), []).append(k)
        closed: dict[int, torch.Tensor] | None = None
        if any(self.jobs[j].prune.close for j, _ in live):  # type: ignore[union-attr]
            closed = self._closed_states()
        for (j, t), ks in live.items():
            job = self.jobs[j]
            spec, head = job.prune, job.heads[0]
            assert spec is not None
            layer = head.config.layer
            idx = torch.tensor(ks, device=h.device)
            if spec.close:
                assert closed is not None
                feats = closed[layer][idx]
            else:
                feats = h[idx] if layer == FINAL else self.captures[layer].output[idx, -1]  # [L, d]
            got = head_rewards(head.module, feats.float()).tolist()
            for k, reward in zip(ks, got):
                rows[k].partials.append((t, reward))
            pruned_before = self.pruned.get(id(job), 0)
            finished = job.n - len(ks) - pruned_before  # ended (stop / length) or closing: they survive
            drop = spec.dropped(got, [rows[k].index for k in ks], finished)
            for i in drop:
                r = rows[ks[i]]
                r.state, r.finish, r.pruned_at = "done", "pruned", t
            self.pruned[id(job)] = pruned_before + len(drop)

    def _closed_states(self) -> dict[int, torch.Tensor]:
        """Every row's state as if its answer closed after the token it just fed: one extra decode step feeding the
        closing token at each row's next position; then the cache is cut back to what it was (the mask and positions
        were never changed), so the rows continue exactly as without it. layer -> [K, d] (FINAL and the captures)."""
        e = self.e
        assert self.cache is not None and self.mask is not None and self.next_pos is not None
        k = len(self.rows)
        inp = torch.full((k, 1), e.end_id, dtype=torch.long, device=e.device)
        mask = torch.cat([self.mask, self.mask.new_ones((k, 1))], dim=1)
        out = e.decoder(input_ids=inp, attention_mask=mask, position_ids=self.next_pos[:, None],
                        past_key_values=self.cache, use_cache=True)
        states = {FINAL: out.last_hidden_state[:, -1]}
        states.update({layer: c.output[:, -1] for layer, c in self.captures.items()})
        layers: list[Any] = list(self.cache.layers)
        for layer in layers:
            layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]
        return states

    def close(self) -> None:
        for c in self.captures.values():
            c.remove()
        self.captures = {}
        # Drop the cache now: transformers' cache objects sit in reference cycles, so without this the batch's KV
        # memory waits for Python's cyclic GC, and the next batch allocates its own beside it (two sequential
        # long requests peaked at twice one's RSS; tests/test_overload_and_faults.py).
        self.cache, self.mask, self.next_pos, self.logits = None, None, None, None


class HFEngine(Engine):
    continuous = True  # generate() takes admit / deliver: requests join the running decode batch
    prunes = True  # GenerationJob.prune: partial rewards from the state the decode loop holds (_Batch._prune)
    structured = True  # SamplingParams.structured: each row's logits masked by its grammar (_sample)

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.model = backbone.model
        self.decoder = base_model(backbone.model)
        self.lm_head = backbone.model.get_output_embeddings()
        self.tokenizer = backbone.tokenizer
        self.fingerprint = backbone.fingerprint
        # A merged adapter is served under its own id: the weights are no longer the base model's.
        self.adapter_name: str | None = backbone.adapter["name"] if backbone.adapter else None
        self.dtype = backbone.dtype
        self.model_name = self.adapter_name or backbone.name
        self.context_length = backbone.context_length
        self.end_id = backbone.end_id
        self.stop_ids = frozenset(backbone.stop_ids or (backbone.end_id,))
        self.vocab_size = int(self.lm_head.out_features)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        self.device = next(self.model.parameters()).device
        from arbiter.generation.adapters import AdapterSet

        self.adapters = AdapterSet(self.model)  # switchable LoRA adapters (ARBITER_ADAPTERS), one per batch
        self._constrainer: Any = None

    @property
    def constrainer(self) -> Any:
        """Structured outputs' matchers over this engine's tokenizer (arbiter.structured), built on first use."""
        if self._constrainer is None:
            from arbiter.structured import Constrainer

            self._constrainer = Constrainer(self.tokenizer, self.vocab_size, self.end_id)
        return self._constrainer

    def kv_bytes_per_token(self) -> int:
        """Keys + values of every layer for one position: 2 x layers x KV heads x head dim x element size."""
        c = self.model.config
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return int(2 * c.num_hidden_layers * heads * head_dim * next(self.model.parameters()).element_size())

    # ------------------------------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    @staticmethod
    def _adjust(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """OpenAI's logit_bias, frequency_penalty and presence_penalty, per row (SamplingParams); [R, V]."""
        for k, r in enumerate(rows):
            sp = r.params
            if sp.logit_bias:
                ids, vals = _bias_tensors(sp.logit_bias, str(logits.device))  # built once per request, not per step
                logits[k, ids] += vals.to(logits.dtype)
            if (sp.frequency_penalty or sp.presence_penalty) and r.tokens:
                count = torch.bincount(torch.tensor(r.tokens, device=logits.device), minlength=logits.shape[1])
                count = count[: logits.shape[1]].to(logits.dtype)  # [V]
                logits[k] -= count * sp.frequency_penalty + (count > 0).to(logits.dtype) * sp.presence_penalty
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Per-row temperature / top-p sampling with per-row generators (seed => same output); also the
        sampled tokens' log-probs for rows that asked for them."""
        logits = logits.float()  # [R, V]
        if any(r.params.logit_bias or r.params.frequency_penalty or r.params.presence_penalty for r in rows):
            logits = self._adjust(logits.clone(), rows)  # a copy only when some row adjusts its logits
        constrained = [k for k, r in enumerate(rows) if r.matcher is not None]
        if constrained:  # structured outputs: only the tokens each row's grammar allows next (arbiter.structured)
            idx = torch.tensor(constrained, device=logits.device)
            allowed = self.constrainer.allowed([rows[k].matcher for k in constrained]).to(logits.device)
            logits = logits.index_put((idx,), logits[idx].masked_fill(~allowed, float("-inf")))
        temps = torch.tensor([max(r.params.temperature, 1e-5) for r in rows], device=logits.device)
        probs = torch.softmax(logits / temps[:, None], dim=-1)  # [R, V]
        top_p = torch.tensor([r.params.top_p for r in rows], device=logits.device)
        if bool((top_p < 1.0).any()):
            sorted_p, order = probs.sort(dim=-1, descending=True)  # [R, V]
            cum = sorted_p.cumsum(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            sorted_p = sorted_p.masked_fill(cum - sorted_p > top_p[:, None], 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        # Exponential race (equivalent to multinomial sampling): argmax_i p_i / E_i with E_i ~ Exp(1) drawn
        # from each row's own generator. Vectorised, one host sync per step, works on CPU and CUDA alike.
        u = torch.stack([torch.rand(probs.shape[1], generator=r.gen, device=probs.device) for r in rows])  # [R, V]
        race = (probs / (-torch.log(u.clamp_min(1e-30)))).argmax(dim=-1)  # [R]
        greedy = torch.tensor([r.params.temperature <= 1e-5 for r in rows], device=probs.device)
        tokens = torch.where(greedy, logits.argmax(dim=-1), race)  # [R]
        lps: list[TokenLogprob | None] = [None] * len(rows)
        want = [k for k, r in enumerate(rows) if r.params.logprobs is not None]
        if want:
            idx = torch.tensor(want, device=logits.device)
            logp = torch.log_softmax(logits[idx], dim=-1)  # [W, V]
            chosen = logp.gather(1, tokens[idx][:, None])[:, 0].tolist()  # [W]
            k_max = max(rows[k].params.logprobs or 0 for k in want)
            top_v, top_i = logp.topk(k_max, dim=-1) if k_max else (logp[:, :0], logp[:, :0].long())
            top_vs, top_is = top_v.tolist(), top_i.tolist()
            toks = tokens.tolist()
            for w, k in enumerate(want):
                kk = rows[k].params.logprobs or 0
                lps[k] = TokenLogprob(toks[k], chosen[w], tuple(zip(top_is[w][:kk], top_vs[w][:kk])))
        return tokens.tolist(), lps

    def _check_stop(self, r: _Row) -> bool:
        """Cut the text at the first stop string; True when one was found."""
        if not r.params.stop:
            return False
        hits = [(i, -len(s)) for i, s in ((r.text.find(s), s) for s in r.params.stop) if i >= 0]
        if not hits:
            return False
        at, neg_len = min(hits)  # the earliest stop string (the longest of those starting there)
        r.text = r.text[: at - neg_len if r.params.include_stop else at]
        if r.lps or r.trace is not None:
            # Keep the log-probs and confidences of the tokens that make up the kept text (the first k whose decoded
            # text covers it), not of the tokens past the stop string.
            k = next((k for k in range(len(r.tokens) + 1) if len(self._decode(r.tokens[:k])) >= len(r.text)), len(r.tokens))
            del r.lps[k:]
            if r.trace is not None:
                r.trace.cut(k)
        return True

    def _emit(self, r: _Row, job: GenerationJob, final: bool) -> None:
        if not r.stream or job.on_delta is None:
            return
        if final:
            safe = len(r.text)
        else:
            hold = max((len(s) for s in r.params.stop), default=1) - 1
            safe = len(r.text) - hold
            while safe > r.emitted and r.text[safe - 1] == "\ufffd":  # incomplete UTF-8 sequence
                safe -= 1
        new_lps = r.lps[r.lp_sent :] if r.params.logprobs is not None else None
        if safe > r.emitted or new_lps:
            job.on_delta(r.index, r.text[r.emitted : max(safe, r.emitted)], new_lps)
            r.emitted = max(safe, r.emitted)
            r.lp_sent = len(r.lps)

    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, jobs: Sequence[GenerationJob], *, admit: Admit | None = None,
                 deliver: Deliver | None = None) -> list[GenerationResult]:
        """Sample every job's candidates in one batch; returns one result per job of ``jobs``.

        Continuous batching: with ``admit``, the loop asks between decode steps for new jobs (``admit(rows in the
        batch)`` -> jobs), prefills them and merges their KV rows into the running batch; with ``deliver``, each job
        (given or admitted) is handed over (``deliver(job, result)``) as soon as its last row finishes, so an early
        request never waits for a later one's decode.
        """
        jobs = list(jobs)
        results: dict[int, GenerationResult] = {}
        run = _Batch(self, deliver)
        adapter = jobs[0].adapter if jobs else None
        if any(j.adapter != adapter for j in jobs):
            raise ValueError("one generation batch serves one adapter")
        with self.adapters.lock:  # the weights stay this adapter's for the whole batch (admin unload waits)
            self._activate(adapter)
            return self._generate(jobs, results, run, admit, deliver)

    def _activate(self, adapter: str | None) -> None:
        from arbiter.generation.adapters import AdapterNotLoaded

        try:
            self.adapters.activate(adapter)
        except AdapterNotLoaded:
            raise AdapterGone(f"adapter {adapter!r} is not loaded (it was unloaded while this request waited)") from None

    def _generate(self, jobs: list[GenerationJob], results: dict[int, GenerationResult], run: _Batch,
                  admit: Admit | None, deliver: Deliver | None) -> list[GenerationResult]:
        try:
            for job in jobs:
                run.add_result_slot(job, results)
            run.join(jobs)
            while run.active:
                run.step()
                if admit is not None and run.active:
                    new = [j for j in admit(len(run.rows)) if j is not None]
                    for job in new:
                        run.add_result_slot(job, None)
                    run.join(new)
        finally:
            run.close()
        return [results[id(j)] for j in jobs]

    def _finish_job(self, job: GenerationJob, rows: list[_Row]) -> GenerationResult:
        self._rescore_stop_cut([job], [r for r in rows if r.capture and r.stop_cut])
        cands = []
        for r in sorted(rows, key=lambda r: r.index):
            if not r.stop_cut:
                r.text = self._decode(r.tokens)
            lps = list(r.lps) if job.params.logprobs is not None else None
            cands.append(Candidate(r.tokens, r.text, r.finish or "length", r.features, lps,
                                   partial_rewards=list(r.partials) if job.prune is not None else None,
                                   pruned_at=r.pruned_at, confidence=r.trace.summary() if r.trace is not None else None))
        return GenerationResult(cands, len(job.prompt_ids))

    def _rescore_stop_cut(self, jobs: Sequence[GenerationJob], rows: list[_Row]) -> None:
        """Rows cut by a stop string (all of ``jobs[0]``): the cache ran past the answer, so score the kept text afresh."""
        todo = [r for r in rows if r.capture and r.stop_cut]
        if not todo:
            return
        job = jobs[0]
        layers = sorted(set(job.feature_layers) | {FINAL})
        answers = [self.encode_answer(r.text) for r in todo]
        feats = self._features([job.prompt_ids for _ in todo], answers, layers, batch_size=16, cancelled=None)  # batch weights
        for i, r in enumerate(todo):
            r.features = {l: feats[l][i] for l in layers}

    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def features(self, prompt_ids: Sequence[list[int]], answers: Sequence[list[int]], layers: Sequence[int], *,
                 batch_size: int = 16, cancelled: Callable[[], bool] | None = None,
                 adapter: str | None = None) -> dict[int, torch.Tensor]:
        """One batched forward per chunk over prompt + answer + the closing token; layer -> [N, d].

        ``cancelled`` (a callable) is polled before every block of every chunk: a pass nobody waits for
        stops within one block and raises ``Abandoned``. ``adapter``: under that switchable adapter."""
        with self.adapters.lock:
            if adapter is not None or self.adapters.active is not None:
                self._activate(adapter)
            return self._features(prompt_ids, answers, layers, batch_size=batch_size, cancelled=cancelled)

    @torch.inference_mode()
    def prompt_logprobs(self, ids: Sequence[int], top_k: int, *, adapter: str | None = None) -> list[TokenLogprob | None]:
        with self.adapters.lock:
            if adapter is not None or self.adapters.active is not None:
                self._activate(adapter)
            x = torch.tensor([list(ids)], device=self.device)
            logp = torch.log_softmax(self.lm_head(self.decoder(input_ids=x, use_cache=False).last_hidden_state[0, :-1]).float(),
                                     dim=-1)  # [T-1, V]: row t predicts token t + 1
        chosen = logp.gather(1, x[0, 1:, None])[:, 0].tolist()
        tv, ti = logp.topk(top_k, dim=-1) if top_k else (logp[:, :0], logp[:, :0].long())
        out: list[TokenLogprob | None] = [None]
        for t, (c, vs, is_) in enumerate(zip(chosen, tv.tolist(), ti.tolist())):
            out.append(TokenLogprob(int(ids[t + 1]), c, tuple(zip(is_, vs))))
        return out

    def _features(self, prompt_ids: Sequence[list[int]], answers: Sequence[list[int]], layers_in: Sequence[int], *,
                  batch_size: int, cancelled: Callable[[], bool] | None) -> dict[int, torch.Tensor]:
        layers = sorted(set(layers_in) | {FINAL})
        # the answers of one prompt share its KV cache (the verify rule's canonical answers, /v1/score's candidates)
        try:
            return shared_prefix_end_features(self.model, prompt_ids, [list(a) + [self.end_id] for a in answers], layers,
                                              batch_tokens=FEATURE_BATCH_TOKENS, pad_id=self.pad_id, max_batch=batch_size,
                                              cancelled=cancelled)
        except Cancelled:
            raise Abandoned("the feature pass was abandoned: nobody waits for it any more") from None
