"""Generation, under both halves: the engine interface and job types (``base``), the HF engine that samples N
candidates per prompt with the reward features captured in its decode loop (``hf``), and the set of LoRA adapters
switched per batch (``adapters``). The service's worker and the offline sampler (``training/sampling.py``) both
run on it; it imports neither ``arbiter.service`` nor ``arbiter.training`` (docs/architecture.md).
"""
