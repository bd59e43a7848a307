"""Top-k SAE training steps (Gao et al. 2024): reconstruction + AuxK, unit-norm decoder rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .model import SparseAutoencoder

log = logging.getLogger("arbiter.training.sae")


# --------------------------------------------------------------------------------------------------------------
# Training (used by recipes/sae.py)


@dataclass
class StepResult:
    loss: float  # total loss (MSE + aux_coef * AuxK)
    mse: float  # reconstruction MSE in the training (scaled) space, mean over tokens and dims
    aux: float  # AuxK loss (0 when no latent is dead)
    l0: float  # mean number of active latents per token
    fired: Tensor  # [d_sae] bool: latents active on some token of this batch
    sq_err: float  # sum of squared reconstruction errors (for FVE)
    n_tokens: int


def auxk_loss(sae: SparseAutoencoder, pre: Tensor, residual: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """Gao et al. 2024 AuxK: reconstruct the main reconstruction's residual from the top ``aux_k``
    pre-activations among DEAD latents only (no bias), so dead latents get a gradient.

    pre [N, d_sae], residual [N, d_in] (x - x_hat, detached), dead [d_sae] bool -> scalar MSE.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k = min(aux_k, n_dead)
    masked = pre.masked_fill(~dead, float("-inf"))  # [N, d_sae]: only dead latents can win
    vals, idx = masked.topk(k, dim=-1, sorted=False)  # [N, k]
    z_aux = torch.zeros_like(pre).scatter(-1, idx, vals.relu())  # [N, d_sae]
    recon_aux = z_aux @ sae.W_dec  # [N, d_in]
    return (recon_aux - residual).pow(2).mean()


def train_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    *,
    dead: Tensor | None = None,
    aux_k: int = 256,
    aux_coef: float = 1.0 / 32.0,
    max_grad_norm: float | None = None,
) -> StepResult:
    """One optimisation step on activations x [N, d_in] (already in training scale).

    Loss = MSE(x_hat, x) + aux_coef * AuxK (if ``dead`` marks dead latents). Before the optimiser step the
    gradient component parallel to each decoder row is removed; after it the rows are renormalised to unit
    norm (Gao et al. 2024, Sec. 2.x / App. A). Raises FloatingPointError on a non-finite loss, before any
    parameter changes.
    """
    x = x.to(sae.W_enc.dtype)
    pre = sae.pre_activations(x)  # [N, d_sae]
    z = sae.activate(pre)  # [N, d_sae]
    recon = sae.decode(z)  # [N, d_in]
    err = recon - x  # [N, d_in]
    mse = err.pow(2).mean()
    aux = pre.new_zeros(())
    if dead is not None and aux_coef > 0 and bool(dead.any()):
        aux = auxk_loss(sae, pre, (x - recon).detach(), dead, aux_k)
    loss = mse + aux_coef * aux
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite SAE loss (mse={mse.item()}, aux={aux.item()})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_decoder_grad_()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
    optimizer.step()
    sae.normalize_decoder_()
    with torch.no_grad():
        active = z > 0  # [N, d_sae]
        return StepResult(
            loss=float(loss), mse=float(mse), aux=float(aux), l0=float(active.sum(1).float().mean()),
            fired=active.any(0), sq_err=float(err.pow(2).sum()), n_tokens=int(x.shape[0]),
        )


@torch.no_grad()
def reconstruction_stats(sae: SparseAutoencoder, x: Tensor, *, chunk: int = 4096) -> dict[str, Any]:
    """Metrics of an SAE on activations x [N, d_in] (in the SAE's own units).

    mse: mean over tokens and dims of (x_hat - x)^2; fve: fraction of variance explained
    1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2; l0: mean active latents per token; fired [d_sae] bool.
    """
    x = x.to(sae.W_enc.dtype)
    mean = x.mean(0, keepdim=True)  # [1, d_in]
    sq_err = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        recon, z = sae(xb)
        sq_err += float((recon - xb).pow(2).sum())
        l0 += float((z > 0).sum())
        fired |= (z > 0).any(0)
    var = float((x - mean).pow(2).sum())
    n = x.shape[0]
    return {
        "mse": sq_err / (n * sae.d_in),
        "fve": 1.0 - sq_err / var if var > 0 else float("nan"),
        "l0": l0 / n,
        "fired": fired,
        "n_tokens": n,
    }


def fold_input_scale(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """A copy of an SAE trained on ``scale * x`` that takes unscaled x, decoder rows unchanged.

    With x' = s x:  pre(x') = (s x - b_dec) W_enc + b_enc = s [(x - b_dec/s) W_enc + b_enc/s], and top-k /
    ReLU commute with a positive factor, so encode'(x) = encode(x') / s with b_enc' = b_enc / s,
    b_dec' = b_dec / s; decode'(z/s) = (z W_dec + b_dec) / s = decode(z) / s. W_enc and the unit-norm W_dec
    stay as they are, so latents come out in the model's own activation units. (JumpReLU: threshold / s.)
    """
    out = SparseAutoencoder(
        sae.d_in, sae.d_sae, activation=sae.activation, k=sae.k, apply_b_dec_to_input=sae.apply_b_dec_to_input,
        rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm, hook_layer=sae.hook_layer,
        hook_name=sae.hook_name, model_name=sae.model_name, dtype=sae.W_enc.dtype,
    )
    if not sae.apply_b_dec_to_input:
        raise ValueError("fold_input_scale assumes apply_b_dec_to_input=True")
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc)
        out.W_dec.copy_(sae.W_dec)
        out.b_enc.copy_(sae.b_enc / scale)
        out.b_dec.copy_(sae.b_dec / scale)
        if sae.threshold is not None and out.threshold is not None:
            out.threshold.copy_(sae.threshold / scale)
    return out


def default_d_sae(d_in: int, expansion: int = 8) -> int:
    """Default SAE width: 8 x d_in (4608 for SmolLM2-135M's d = 576)."""
    return expansion * d_in
