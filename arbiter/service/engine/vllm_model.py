"""Imported only inside vLLM's processes: the model class that writes head rewards into reserved logit columns
(``reward_columns.py``) and the worker extension that loads the heads into it.

vLLM finds the class through Arbiter's plugin (the ``vllm.general_plugins`` entry point in pyproject.toml ->
``vllm_plugin.register``, run in every vLLM process) and the engine selects it with
``hf_overrides={"architectures": [...]}``: no vLLM patch. The subclass changes ``compute_logits`` only, so the
forward, the KV cache, LoRA and the sampler are vLLM's own. The heads arrive through
``collective_rpc("arbiter_set_heads", ...)`` as (column, head config JSON, safetensors bytes): the same two
files the registry validated, never pickle.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from vllm.model_executor.models.llama import LlamaForCausalLM

from arbiter.service.engine import reward_columns


class ArbiterRewardLlamaForCausalLM(LlamaForCausalLM):  # type: ignore[misc]  # vLLM is untyped where mypy runs
    """``LlamaForCausalLM`` whose logits also carry every loaded head's reward in its reserved column."""

    def __init__(self, *, vllm_config: Any, prefix: str = ""):  # vLLM reads this signature: keyword-only
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.arbiter_columns: list[tuple[int, torch.nn.Module]] = []
        self.arbiter_ref: int | None = None

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits: torch.Tensor | None = super().compute_logits(hidden_states)
        if logits is None or self.arbiter_ref is None:
            return logits  # not the rank that samples, or no head loaded: stock vLLM
        return reward_columns.write(logits, hidden_states, self.arbiter_columns, self.arbiter_ref)

    def compute_logits_local(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("batch-sharded sampling would bypass the reward columns")


def build_columns(heads: list[tuple[int, str, bytes]], device: Any) -> list[tuple[int, torch.nn.Module]]:
    from safetensors.torch import load as load_tensors

    from arbiter.heads import HeadConfig, build_head

    out: list[tuple[int, torch.nn.Module]] = []
    for col, config_json, weights in heads:
        cfg = HeadConfig.model_validate(json.loads(config_json))
        module = build_head(cfg)
        state = load_tensors(weights)
        module.load_state_dict(state, strict=True)
        dtype = next(iter(state.values())).dtype
        out.append((int(col), module.to(device=device, dtype=dtype).eval()))
    return out


class ArbiterWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): methods the engine calls with collective_rpc."""

    def arbiter_set_heads(self, heads: list[tuple[int, str, bytes]], ref: int | None) -> int:
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        if not hasattr(model, "arbiter_columns"):
            raise RuntimeError(f"{type(model).__name__} is not Arbiter's reward model class")
        device = next(model.parameters()).device
        columns = build_columns(heads, device)
        model.arbiter_columns, model.arbiter_ref = columns, (None if ref is None or not columns else int(ref))
        return len(columns)
