"""Engines that sample candidates and capture head features: ``hf`` (plain transformers, the CPU default) and
``vllm`` (AsyncLLM sampling, the heads' rewards computed inside vLLM); ``base`` holds the protocol and job types they share.
:func:`load_engine` builds the one ``ARBITER_ENGINE`` names from the service settings."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from arbiter.generation.base import Engine

log = logging.getLogger("arbiter.service")


def resolve_device(settings: Any) -> str:
    """ARBITER_DEVICE, with "auto" meaning CUDA when available, else CPU."""
    if settings.device != "auto":
        return str(settings.device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_engine(settings: Any) -> "Engine":
    """Load the backbone and the engine ``settings.engine`` names (ARBITER_ENGINE). vLLM is imported only when chosen."""
    device = resolve_device(settings)
    if settings.engine == "vllm":
        from .vllm import EngineStartError, VLLMEngine  # lazy: never imported by the CPU default

        if settings.adapters:
            raise EngineStartError("ARBITER_ADAPTERS (several switchable adapters) is served by the HF engine only; "
                                   "the vLLM engine serves one adapter (ARBITER_ADAPTER)")

        return VLLMEngine.from_settings(settings, device)
    from arbiter.backbone import load_backbone
    from arbiter.generation.hf import HFEngine

    # "auto": bfloat16 on CUDA; on CPU only with native bf16 matmul measured faster (arbiter.backbone.resolve_dtype).
    bb = load_backbone(settings.model, cache_dir=settings.cache_dir, device=device, dtype=settings.dtype,
                       threads=settings.threads)
    if settings.adapter:
        from arbiter.backbone import merge_lora

        info = merge_lora(bb.model, settings.adapter)
        log.info("merged adapter %s (%d modules)", info["name"], info["merged_modules"])
        bb.adapter = info
    eng = HFEngine(bb)
    from arbiter.service.adapters import parse_adapters_setting

    for name, path in parse_adapters_setting(settings.adapters):
        ad = eng.adapters.load(name, path)
        log.info("adapter %s loaded from %s (%d modules; switched per batch)", name, path, len(ad.deltas))
    return eng
