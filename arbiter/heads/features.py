"""THE one function that turns backbone hidden states into head features.

The training cache, the service's generation pass and the service's score endpoint all call
``end_features``: the hidden state at the position of the ``<|im_end|>`` that closes the assistant turn.
Keeping a single function is how a head sees at serving time exactly what it was trained on.
"""

from __future__ import annotations

import torch


def end_positions(attention_mask: torch.Tensor, answer_end: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the closing token per row.

    attention_mask: [B, T] (1 = real token). With right padding and no ``answer_end``, the closing
    ``<|im_end|>`` is the last real token. ``answer_end`` ([B]) overrides it with explicit positions.
    """
    if answer_end is not None:
        return answer_end.long()
    # Last index with mask 1; works for left and right padding alike.
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # [B, T]
    return torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values  # [B]


def end_features(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Gather hidden[b, positions[b]] -> [B, d] in float32.

    hidden: [B, T, d] (the layer the head names: after the final norm by default).
    """
    b = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[b, positions.to(hidden.device)].float()  # [B, d]
