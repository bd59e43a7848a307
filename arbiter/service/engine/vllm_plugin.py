"""Arbiter's vLLM plugin (the ``vllm.general_plugins`` entry point in pyproject.toml): vLLM runs ``register`` in each
of its processes, which makes the reward model class of ``vllm_model.py`` known by name. Nothing is imported
until vLLM asks for the class, and nothing changes for a vLLM that never selects it."""

from __future__ import annotations

REWARD_ARCHITECTURES = {"LlamaForCausalLM": "ArbiterRewardLlamaForCausalLM"}  # served architecture -> reward class


def register() -> None:
    from vllm import ModelRegistry

    for name in REWARD_ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"arbiter.service.engine.vllm_model:{name}")
