"""vLLM engine (CUDA): vLLM samples the N candidates with its own ``n``; a second vLLM instance in pooling
mode computes the reward features in a separate pass.

Imported only when ``ARBITER_ENGINE=vllm`` (``pip install 'arbiter[vllm]'``). vLLM does not expose the
hidden state of a sampled sequence, so scoring is a pooling pass over prompt + answer + ``<|im_end|>``
with LAST pooling and no normalisation: the pooled vector is the hidden state after the final norm at the
closing ``<|im_end|>``, the same feature the HF engine captures in-loop (DESIGN.md "One feature path").
With prefix caching on, the shared prompt is computed once per request. Only heads on the final-norm
layer (layer -1) can be served by this engine.

Status: written against vLLM's offline ``LLM`` API; its end-to-end check needs a GPU with vLLM installed
and is not part of the CPU test suite.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .base import Candidate, GenerationJob, GenerationResult

log = logging.getLogger("arbiter.engine.vllm")

FINAL = -1


class VLLMEngine:
    supported_layers = frozenset({FINAL})

    def __init__(self, model_path: str, name: str, tokenizer, fingerprint, *, gpu_memory_utilization: float = 0.35,
                 max_model_len: int | None = None):
        from vllm import LLM  # noqa: WPS433 - lazy by design

        self.model_name = name
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        kw = dict(gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True)
        if max_model_len:
            kw["max_model_len"] = max_model_len
        self.llm = LLM(model=model_path, **kw)
        self.context_length = int(self.llm.llm_engine.model_config.max_model_len)
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.scorer = self._pooling_llm(model_path, kw)

    @staticmethod
    def _pooling_llm(model_path: str, kw: dict):
        from vllm import LLM

        try:  # vLLM >= 0.10: runner/convert + pooler_config
            from vllm.config import PoolerConfig

            return LLM(model=model_path, runner="pooling", convert="embed",
                       pooler_config=PoolerConfig(pooling_type="LAST", normalize=False), **kw)
        except TypeError:  # older vLLM: task + override_pooler_config
            from vllm.config import PoolerConfig

            return LLM(model=model_path, task="embed",
                       override_pooler_config=PoolerConfig(pooling_type="LAST", normalize=False), **kw)

    @classmethod
    def from_settings(cls, settings) -> "VLLMEngine":
        from arbiter.backbone import fingerprint, materialize, resolve_model
        from transformers import AutoConfig, AutoTokenizer

        source = resolve_model(settings.model)
        path = materialize(source, settings.cache_dir)  # vLLM reads the safetensors copy of a GGUF
        tok = AutoTokenizer.from_pretrained(str(path))
        cfg = AutoConfig.from_pretrained(str(path))
        return cls(str(path), source.name, tok, fingerprint(source.name, cfg, tok),
                   gpu_memory_utilization=settings.vllm_gpu_memory_utilization)

    def generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult]:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        live = [j for j in jobs if not j.cancelled.is_set() and j.n > 0]
        prompts = [TokensPrompt(prompt_token_ids=j.prompt_ids) for j in live]
        params = [VSP(n=j.n, temperature=j.params.temperature, top_p=j.params.top_p, max_tokens=j.params.max_tokens,
                      stop=list(j.params.stop) or None, seed=j.params.seed, skip_special_tokens=True) for j in live]
        outs = self.llm.generate(prompts, params, use_tqdm=False) if live else []
        by_job = {id(j): o for j, o in zip(live, outs)}
        results = []
        score_p, score_a, owners = [], [], []
        for j in jobs:
            o = by_job.get(id(j))
            if o is None:
                results.append(GenerationResult([], len(j.prompt_ids)))
                continue
            cands = []
            for c in o.outputs:
                ids = [t for t in c.token_ids if t != self.end_id]
                finish = "length" if c.finish_reason == "length" else "stop"
                cands.append(Candidate(ids, c.text, finish, None))
                if j.feature_layers:
                    # A stop string cuts the text: score the kept text, as the HF engine does.
                    ans = ids if not j.params.stop or c.stop_reason is None else self.tokenizer(c.text, add_special_tokens=False)["input_ids"]
                    score_p.append(j.prompt_ids)
                    score_a.append(ans)
                    owners.append(cands[-1])
            if j.on_delta is not None:
                for i, c in enumerate(cands):
                    j.on_delta(i, c.text)
            results.append(GenerationResult(cands, len(j.prompt_ids)))
        if score_p:
            feats = self.features(score_p, score_a, [FINAL])[FINAL]
            for cand, f in zip(owners, feats):
                cand.features = {FINAL: f}
        return results

    def features(self, prompt_ids, answer_ids, layers, *, cancelled=None) -> dict[int, torch.Tensor]:
        from vllm.inputs import TokensPrompt

        bad = set(layers) - self.supported_layers
        if bad:
            raise ValueError(f"the vLLM engine serves heads on the final-norm layer only, not layers {sorted(bad)}")
        seqs = [TokensPrompt(prompt_token_ids=list(p) + list(a) + [self.end_id]) for p, a in zip(prompt_ids, answer_ids)]
        outs = self.scorer.embed(seqs, use_tqdm=False)
        return {FINAL: torch.stack([torch.as_tensor(o.outputs.embedding, dtype=torch.float32) for o in outs])}
