"""Poolers and the reward vector of a Direct Preference Head (DPH paper, section 3; docs/methods.md).

r = w_dph . f(h): h is the backbone hidden state at the closing ``<|im_end|>``, f a pooler, w_dph a
``Linear(d, 1, bias=False)`` initialised N(0, 0.02) as in the authors' code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import HeadConfig


class IdentityPooler(nn.Module):
    """f(h) = dropout(h)."""

    def __init__(self, d: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, d] -> [B, d]
        out: torch.Tensor = self.dropout(h)
        return out


class AffineTanhPooler(nn.Module):
    """f(h) = dropout(tanh(W h + b)), BERT's pooler; W: d x d."""

    def __init__(self, d: int, dropout: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, d] -> [B, d]
        out: torch.Tensor = self.dropout(torch.tanh(self.dense(h)))
        return out


class SwiGLUTanhPooler(nn.Module):
    """Inverted SwiGLU bottleneck: [x, g] = W_in h; f(h) = dropout(tanh(W_out (x * silu(g))))."""

    def __init__(self, d: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.w_in = nn.Linear(d, 2 * d_ff)
        self.w_out = nn.Linear(d_ff, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, d] -> [B, d]
        x, g = self.w_in(h).chunk(2, dim=-1)  # [B, d_ff] each
        out: torch.Tensor = self.dropout(torch.tanh(self.w_out(x * F.silu(g))))
        return out


class DPHHead(nn.Module):
    """Pooler + reward vector: features [B, d] -> rewards [B]."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        d = config.hidden_size
        if config.pooler == "identity":
            self.pooler: nn.Module = IdentityPooler(d, config.dropout)
        elif config.pooler == "affine_tanh":
            self.pooler = AffineTanhPooler(d, config.dropout)
        elif config.pooler == "swiglu_tanh":
            assert config.ffn_size is not None
            self.pooler = SwiGLUTanhPooler(d, config.ffn_size, config.dropout)
        else:  # pragma: no cover - HeadConfig validates the name
            raise ValueError(f"unknown pooler {config.pooler!r}")
        self.reward = nn.Linear(d, 1, bias=False)
        nn.init.normal_(self.reward.weight, mean=0.0, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, d] -> [B]
        rewards: torch.Tensor = self.reward(self.pooler(features.to(self.reward.weight.dtype))).squeeze(-1)
        return rewards


def build_head(config: HeadConfig) -> DPHHead:
    return DPHHead(config)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def head_rewards(module: nn.Module, features: torch.Tensor, *, batch: int = 4096) -> torch.Tensor:
    """THE way a head scores feature rows: [N, d] -> [N] float32 on the CPU, in the head's own device and dtype,
    eval mode, no grad, ``batch`` rows at a time (serving, ``/v1/score``, evaluation and the recipes' reports)."""
    p = next(module.parameters())
    if module.training:
        module.eval()
    with torch.inference_mode():
        out = [module(features[i : i + batch].to(p.device, p.dtype)).float().cpu() for i in range(0, len(features), batch)]
    return torch.cat(out) if out else torch.zeros(0)
