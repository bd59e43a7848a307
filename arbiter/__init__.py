"""Arbiter: best-of-N reranking with Direct Preference Heads.

Sub-packages: ``arbiter.heads`` (reward heads; torch + safetensors + pydantic only),
``arbiter.service`` (the online server) and ``arbiter.training`` (the offline CLI). The service never
imports training; heads imports neither. ``arbiter.backbone`` loads models and holds the one chat
encoding both halves share.
"""

__version__ = "0.1.0"
