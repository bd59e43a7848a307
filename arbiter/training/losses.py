"""Preference losses: pure functions over log-probs, rewards and features.

Every function here is pure: no model, no optimiser, no reduction over the batch. Inputs are tensors of
per-sequence quantities (``B`` = batch of preference pairs):

- ``*_logps``: per-sequence log-probabilities, i.e. the SUM over answer tokens of log pi(token) with the
  prompt masked out (what ``arbiter.training.logprobs`` returns). Losses that need average log-probs
  (IPO, SimPO, MIPO, FPO) take the answer lengths ``|y|`` and divide here, so the caller never has to know
  which method wants which normalisation.
- ``*_lengths``: number of answer tokens per sequence (int or float tensor, clamped to >= 1 like TRL).
- ``*_rewards``: scalar head rewards (DPH).
- ``*_features``: mean-pooled SAE activations (FPO).

Hyper-parameters are keyword-only. Computation happens in at least float32: bf16/fp16 inputs are upcast,
float64 inputs stay float64 (so ``torch.autograd.gradcheck`` can run on them). Log-sigmoids go through
``F.logsigmoid`` / ``F.softplus`` so nothing overflows.

Each loss returns a :class:`LossOutput` with UNREDUCED per-example losses (the recipe takes the mean),
detached chosen/rejected rewards for logging, and optional per-example diagnostics. Use
:func:`preference_metrics` to turn it into TRL-named scalars (``rewards/chosen``, ``rewards/margins``...).

Formulas: ``docs/methods.md`` (as the authors' code computes them). All of them are registered, with every fact
a recipe needs about each (family, reference, config section), in :data:`arbiter.training.batch.LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LossOutput",
    "cdpo",
    "dph_contrastive",
    "dph_separable",
    "dpo",
    "fpo",
    "intermediate_dpo",
    "ipo",
    "joint",
    "mipo",
    "preference_metrics",
    "prior_regularize_",
    "simpo",
]


@dataclass(frozen=True)
class LossOutput:
    """Result of a loss function.

    losses:            [B] per-example loss, not reduced (the recipe averages / weights it).
    chosen_rewards:    [B] detached reward of y_w (what TRL logs as ``rewards/chosen``).
    rejected_rewards:  [B] detached reward of y_l.
    metrics:           name -> detached [B] (or scalar) diagnostics, averaged by :func:`preference_metrics`.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def preference_metrics(out: LossOutput, prefix: str = "") -> dict[str, float]:
    """Batch-mean scalars with TRL's names (prefix e.g. ``"eval_"``).

    ``rewards/accuracies`` is the share of pairs with r_w > r_l (strict, as in TRL); ``loss`` is the mean
    of the per-example losses. Extra ``out.metrics`` entries are averaged under their own names.
    """
    chosen = _up(out.chosen_rewards.detach())
    rejected = _up(out.rejected_rewards.detach())
    metrics = {
        f"{prefix}rewards/chosen": chosen.mean().item(),
        f"{prefix}rewards/rejected": rejected.mean().item(),
        f"{prefix}rewards/margins": (chosen - rejected).mean().item(),
        f"{prefix}rewards/accuracies": (chosen > rejected).float().mean().item(),
        f"{prefix}loss": _up(out.losses.detach()).mean().item(),
    }
    for name, value in out.metrics.items():
        metrics[f"{prefix}{name}"] = _up(value.detach()).mean().item()
    return metrics


# --------------------------------------------------------------------------------------------------------------
# helpers


def _up(x: Tensor) -> Tensor:
    """Upcast to at least float32 (bf16/fp16/int -> fp32; fp64 stays fp64 for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _lengths(n: Tensor) -> Tensor:
    """Answer lengths as floats, clamped to >= 1 (TRL's ``.clamp(min=1.0)``) so empty answers cannot divide by 0."""
    return _up(n).clamp(min=1.0)


def _same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch between inputs: {shapes}")


def _check_inputs(pc: Tensor, pr: Tensor, rc: Tensor | None = None, rr: Tensor | None = None, *,
                  chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None) -> None:
    """The one shape check of a loss's per-pair inputs: policy (and reference) log-probs and lengths, all [B]."""
    given = {"policy_chosen_logps": pc, "policy_rejected_logps": pr, "ref_chosen_logps": rc, "ref_rejected_logps": rr,
             "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    _same_shape(**{k: v for k, v in given.items() if v is not None})


def _normalised_ratios(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, chosen_lengths: Tensor,
                       rejected_lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log-ratios (logp_theta(y) - logp_ref(y)) / |y| of the chosen and rejected answers, [B] each."""
    return (_up(pc) - _up(rc)) / _lengths(chosen_lengths), (_up(pr) - _up(rr)) / _lengths(rejected_lengths)


def _check_eps(eps: float, *, name: str, allow_zero: bool) -> None:
    lo_ok = eps >= 0.0 if allow_zero else eps > 0.0
    if not (lo_ok and eps <= 0.5):
        interval = "[0, 0.5]" if allow_zero else "(0, 0.5]"
        raise ValueError(f"{name} must lie in {interval}, got {eps}")


def _dpo_margin(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    """h = (logp_theta(y_w) - logp_ref(y_w)) - (logp_theta(y_l) - logp_ref(y_l)); any leading shape."""
    return (_up(pc) - _up(rc)) - (_up(pr) - _up(rr))


def _implicit_rewards(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """r(y) = beta * (logp_theta(y) - logp_ref(y)), detached, as TRL logs them."""
    chosen = (beta * (_up(pc) - _up(rc))).detach()  # [B]
    rejected = (beta * (_up(pr) - _up(rr))).detach()  # [B]
    return chosen, rejected


# --------------------------------------------------------------------------------------------------------------
# baselines


def dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290) Eq. 7; DPH paper Eq. 2.

    Inputs are SUMMED answer log-probs, each [B].
    h = (logp_theta(y_w) - logp_ref(y_w)) - (logp_theta(y_l) - logp_ref(y_l));  L = -log sigma(beta h).
    Rewards: r(y) = beta (logp_theta(y) - logp_ref(y)). Equals TRL's ``loss_type="sigmoid"``.
    """
    _check_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = _dpo_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # [B]
    losses = -F.logsigmoid(beta * h)  # [B]
    chosen, rejected = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )  # [B], [B]
    return LossOutput(losses, chosen, rejected)


def cdpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    eps: float = 0.1,
) -> LossOutput:
    """Conservative DPO (label smoothing), Mitchell 2023 "A note on DPO with noisy preferences"; DPH paper Eq. 3.

    Inputs are SUMMED answer log-probs, each [B]; eps in [0, 0.5] is the assumed label-flip probability.
    L = (1 - eps) L_DPO(y_w, y_l) + eps L_DPO(y_l, y_w) = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    eps = 0 is exactly DPO. Swapping chosen/rejected and eps <-> 1 - eps gives the same loss. This is TRL's
    ``label_smoothing`` up to v0.28 and OpenRLHF's ``DPOLoss`` (TRL's current ``robust`` is a different
    estimator). Rewards as in DPO.
    """
    _check_eps(eps, name="cdpo eps", allow_zero=True)
    _check_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = _dpo_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # [B]
    losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)  # [B]
    chosen, rejected = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )  # [B], [B]
    return LossOutput(losses, chosen, rejected)


def ipo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """IPO, Azar et al. 2023 (arXiv 2310.12036) Eq. 17, with beta playing the role of tau.

    Inputs are SUMMED answer log-probs [B] and answer lengths [B]; the log-ratios are divided by the
    lengths here (TRL's choice, confirmed with the IPO authors):
    h = (logp_theta(y_w) - logp_ref(y_w)) / |y_w| - (logp_theta(y_l) - logp_ref(y_l)) / |y_l|;
    L = (h - 1 / (2 beta))^2.
    Relation to DPO: same margin (length-normalised), but the logistic loss -log sigma(beta h), which keeps
    pushing h to infinity, is replaced by a squared loss with a finite target 1 / (2 beta).
    Rewards are logged like TRL does for every loss type: beta * (summed) log-ratio.
    """
    if beta <= 0:
        raise ValueError(f"ipo beta must be > 0, got {beta}")
    _check_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    chosen_ratio, rejected_ratio = _normalised_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths
    )  # [B], [B]
    h = chosen_ratio - rejected_ratio  # [B]
    losses = (h - 1.0 / (2.0 * beta)) ** 2  # [B]
    chosen, rejected = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )  # [B], [B]
    return LossOutput(losses, chosen, rejected)


def simpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> LossOutput:
    """SimPO, Meng et al. 2024 (arXiv 2405.14734) Eq. 6. Reference-free.

    Inputs are SUMMED policy answer log-probs [B] and answer lengths [B]; averaged here.
    L = -log sigma(beta avg logp_theta(y_w) - beta avg logp_theta(y_l) - gamma).
    Relation to DPO: length-normalised DPO with the reference log-ratio replaced by a constant target
    margin gamma (gamma = 0 and a reference with equal average log-probs on y_w and y_l gives
    length-normalised DPO). Rewards: r(y) = beta avg logp_theta(y) (SimPO's implicit reward).
    """
    _check_inputs(policy_chosen_logps, policy_rejected_logps, chosen_lengths=chosen_lengths,
                  rejected_lengths=rejected_lengths)
    chosen_avg = _up(policy_chosen_logps) / _lengths(chosen_lengths)  # [B]
    rejected_avg = _up(policy_rejected_logps) / _lengths(rejected_lengths)  # [B]
    losses = -F.logsigmoid(beta * chosen_avg - beta * rejected_avg - gamma)  # [B]
    return LossOutput(losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach())


# --------------------------------------------------------------------------------------------------------------
# MIPO (seed 002)


def mipo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 20.0,
    modulation: Literal["softplus", "identity"] = "softplus",
) -> LossOutput:
    """MIPO, arXiv 2409.17545 Sec. 4.2 (the L_MIPO objective), as ncsoft/MIPO computes it.

    Inputs are SUMMED answer log-probs [B] and answer lengths [B]; averaged here.
    K    = avg logp_ref(y_w) - avg logp_ref(y_l)            (how well the reference already prefers y_w)
    q(K) = log(1 + exp(K)) = softplus(K)                     (computed with F.softplus: no overflow at K = 1000)
    f    = avg logp_theta(y_w) - avg logp_theta(y_l)
    L    = -log sigma(beta (f - q(K)))
    Reduction to DPO: with ``modulation="identity"`` (q(K) = K) the loss is length-normalised DPO,
    -log sigma(beta [(avg logp_theta(y_w) - avg logp_ref(y_w)) - (avg logp_theta(y_l) - avg logp_ref(y_l))]).
    Softplus makes q(K) -> 0 for pairs the reference gets wrong (pure f, pushed hard) and -> K for pairs
    it gets right (held near the reference). The reference terms only enter through K: offline-able.
    beta is large (authors: 20, 5-25 safe). Rewards: r(y) = beta avg logp_theta(y) (the authors' code
    builds on SimPO's trainer); ``metrics`` carries K and q(K).
    """
    _check_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    len_w, len_l = _lengths(chosen_lengths), _lengths(rejected_lengths)  # [B], [B]
    chosen_avg = _up(policy_chosen_logps) / len_w  # [B]
    rejected_avg = _up(policy_rejected_logps) / len_l  # [B]
    k = _up(ref_chosen_logps) / len_w - _up(ref_rejected_logps) / len_l  # [B]
    if modulation == "softplus":
        q = F.softplus(k)  # [B]
    elif modulation == "identity":
        q = k  # [B]
    else:
        raise ValueError(f"unknown MIPO modulation {modulation!r}; expected 'softplus' or 'identity'")
    f = chosen_avg - rejected_avg  # [B]
    losses = -F.logsigmoid(beta * (f - q))  # [B]
    return LossOutput(
        losses,
        (beta * chosen_avg).detach(),
        (beta * rejected_avg).detach(),
        {"mipo/K": k.detach(), "mipo/qK": q.detach()},
    )


# --------------------------------------------------------------------------------------------------------------
# FPO (seed 003)


def _topk_mse(policy_features: Tensor, ref_features: Tensor, k: int) -> Tensor:
    """Mean squared policy-ref difference over the k largest POLICY features of each example. [B, F] -> [B]."""
    k = min(k, policy_features.shape[-1])
    # Indices come from the policy's own pooled values (the authors' choice); topk's indices carry no
    # gradient, the gathered values do.
    idx = policy_features.detach().topk(k, dim=-1).indices  # [B, k]
    diff = policy_features.gather(-1, idx) - ref_features.gather(-1, idx)  # [B, k]
    return diff.pow(2).mean(dim=-1)  # [B]


def fpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    policy_chosen_features: Tensor,
    policy_rejected_features: Tensor,
    ref_chosen_features: Tensor,
    ref_rejected_features: Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
    top_k: int = 50,
) -> LossOutput:
    """FPO, arXiv 2411.07618 Eq. 10 with the FPO row of Table 1, as the authors' released code computes it.

    Inputs: SUMMED answer log-probs [B] and answer lengths [B] (averaged here; the reference terms form one
    offline-able number per pair), and SAE features already mean-pooled over the real answer tokens,
    [B, n_features] each (the reference ones cached offline).
    u      = (avg logp_theta(y_w) - avg logp_ref(y_w)) - (avg logp_theta(y_l) - avg logp_ref(y_l))
    MSE_w  = mean over the top_k features of (policy_w - ref_w)^2, indices = top_k of the policy's pooled
             CHOSEN features; MSE_l likewise with indices from the policy's pooled REJECTED features
             (each answer selects its own features, chosen and rejected separately).
    L      = -log sigma(beta (u - alpha (MSE_l - stopgrad(MSE_w))))
    Reduction: alpha = 0 gives length-normalised DPO, i.e. SimPO's length-normalised policy difference minus
    the offline reference margin gamma_ref = avg logp_ref(y_w) - avg logp_ref(y_l), with beta.
    Rewards: r(y) = beta (avg logp_theta(y) - avg logp_ref(y)), so ``rewards/accuracies`` is the share u > 0.
    ``metrics`` carries ``fpo/mse_chosen`` and ``fpo/mse_rejected``.
    """
    if top_k < 1:
        raise ValueError(f"fpo top_k must be >= 1, got {top_k}")
    _check_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _same_shape(
        policy_chosen_features=policy_chosen_features,
        policy_rejected_features=policy_rejected_features,
        ref_chosen_features=ref_chosen_features,
        ref_rejected_features=ref_rejected_features,
    )
    chosen_ratio, rejected_ratio = _normalised_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths
    )  # [B], [B]
    u = chosen_ratio - rejected_ratio  # [B]
    mse_w = _topk_mse(_up(policy_chosen_features), _up(ref_chosen_features), top_k)  # [B]
    mse_l = _topk_mse(_up(policy_rejected_features), _up(ref_rejected_features), top_k)  # [B]
    losses = -F.logsigmoid(beta * (u - alpha * (mse_l - mse_w.detach())))  # [B]
    return LossOutput(
        losses,
        (beta * chosen_ratio).detach(),
        (beta * rejected_ratio).detach(),
        {"fpo/mse_chosen": mse_w.detach(), "fpo/mse_rejected": mse_l.detach()},
    )


# --------------------------------------------------------------------------------------------------------------
# Intermediate DPO (seed 000)


def intermediate_dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    layer_policy_chosen_logps: Tensor,
    layer_policy_rejected_logps: Tensor,
    layer_ref_chosen_logps: Tensor,
    layer_ref_rejected_logps: Tensor,
    beta: float = 0.1,
    inter_weight: float = 0.9,
    weight_on: Literal["intermediate", "final"] = "intermediate",
) -> LossOutput:
    """Intermediate DPO, arXiv 2408.02923 Sec. 3 (no public code; options per docs/methods.md).

    Inputs: final-layer SUMMED answer log-probs [B] as for DPO, and the same from K selected intermediate
    layers, [K, B] each (the reference's from its own same layers).
    L_inter = mean_k L_DPO(layer k);  default L = (1 - w) L_DPO + w L_inter with w = inter_weight = 0.9.
    The paper does not say which term its 0.9 multiplies: ``weight_on="intermediate"`` (default) puts w on
    L_inter as above, ``weight_on="final"`` gives L = w L_DPO + (1 - w) L_inter. The other two open choices
    (projection = the model's own final norm + LM head, i.e. a logit lens, vs a new shared linear layer)
    live where the layer log-probs are computed, not here. Reduction: the weight on L_inter = 0 is DPO.
    Rewards: the final layer's DPO rewards (decoding always uses the final layer); ``metrics`` carries
    ``inter/loss_final`` and ``inter/loss_intermediate``.
    """
    if not 0.0 <= inter_weight <= 1.0:
        raise ValueError(f"inter_weight must lie in [0, 1], got {inter_weight}")
    _same_shape(
        layer_policy_chosen_logps=layer_policy_chosen_logps,
        layer_policy_rejected_logps=layer_policy_rejected_logps,
        layer_ref_chosen_logps=layer_ref_chosen_logps,
        layer_ref_rejected_logps=layer_ref_rejected_logps,
    )
    if layer_policy_chosen_logps.dim() != 2 or layer_policy_chosen_logps.shape[1:] != policy_chosen_logps.shape:
        raise ValueError(
            "layer log-probs must be [K, B] with B matching the final-layer log-probs; got "
            f"{tuple(layer_policy_chosen_logps.shape)} vs {tuple(policy_chosen_logps.shape)}"
        )
    if layer_policy_chosen_logps.shape[0] < 1:
        raise ValueError("intermediate_dpo needs at least one intermediate layer (K >= 1)")
    final = dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta)
    h_layers = _dpo_margin(
        layer_policy_chosen_logps, layer_policy_rejected_logps, layer_ref_chosen_logps, layer_ref_rejected_logps
    )  # [K, B]
    loss_inter = (-F.logsigmoid(beta * h_layers)).mean(dim=0)  # [B]
    if weight_on == "intermediate":
        w_final, w_inter = 1.0 - inter_weight, inter_weight
    elif weight_on == "final":
        w_final, w_inter = inter_weight, 1.0 - inter_weight
    else:
        raise ValueError(f"unknown weight_on {weight_on!r}; expected 'intermediate' or 'final'")
    losses = w_final * final.losses + w_inter * loss_inter  # [B]
    return LossOutput(
        losses,
        final.chosen_rewards,
        final.rejected_rewards,
        {"inter/loss_final": final.losses.detach(), "inter/loss_intermediate": loss_inter.detach()},
    )


# --------------------------------------------------------------------------------------------------------------
# Direct Preference Heads (seed 001)


def dph_separable(chosen_rewards: Tensor, rejected_rewards: Tensor, *, eps: float = 0.1) -> LossOutput:
    """Separable DPH, DPH paper Eq. 5 (Theorem 1).

    Inputs: head rewards r_w, r_l = w_dph . f(h), [B] each (not log-probs).
    L = -[(1 - eps) log sigma(r_w) + eps log sigma(-r_w)] - [eps log sigma(r_l) + (1 - eps) log sigma(-r_l)].
    Minimised at r_w = log((1 - eps) / eps), r_l = -log((1 - eps) / eps): absolute scores.
    Relation to DPO: each term is cDPO's label-smoothed logistic loss applied to one reward alone
    (a binary classifier per answer) instead of to the margin.
    """
    _check_eps(eps, name="dph eps", allow_zero=False)
    _same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    r_w, r_l = _up(chosen_rewards), _up(rejected_rewards)  # [B], [B]
    loss_w = -(1.0 - eps) * F.logsigmoid(r_w) - eps * F.logsigmoid(-r_w)  # [B]
    loss_l = -eps * F.logsigmoid(r_l) - (1.0 - eps) * F.logsigmoid(-r_l)  # [B]
    return LossOutput(loss_w + loss_l, r_w.detach(), r_l.detach())


def dph_contrastive(chosen_rewards: Tensor, rejected_rewards: Tensor, *, eps: float = 0.1) -> LossOutput:
    """Contrastive DPH, DPH paper Eq. 6 (Theorem 2).

    Inputs: head rewards r_w, r_l, [B] each.
    L = -(1 - eps) log sigma(r_w - r_l) - eps log sigma(r_l - r_w); minimised at margin log((1 - eps) / eps).
    Relation to DPO: exactly cDPO with beta h replaced by the head margin r_w - r_l.
    """
    _check_eps(eps, name="dph eps", allow_zero=False)
    _same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    r_w, r_l = _up(chosen_rewards), _up(rejected_rewards)  # [B], [B]
    margin = r_w - r_l  # [B]
    losses = -(1.0 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)  # [B]
    return LossOutput(losses, r_w.detach(), r_l.detach())


_DPH_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "separable": dph_separable,
    "contrastive": dph_contrastive,
}


def joint(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    head_chosen_rewards: Tensor,
    head_rejected_rewards: Tensor,
    beta: float = 0.6,
    cdpo_eps: float = 0.25,
    dph_eps: float = 0.1,
    dph_loss: Literal["separable", "contrastive"] = "separable",
    alpha1: float = 1.0,
    alpha2: float = 1.0,
) -> LossOutput:
    """Joint cDPO + DPH, DPH paper Eq. 7: L = alpha1 L_cDPO + alpha2 L_DPH.

    Inputs: SUMMED answer log-probs [B] (for cDPO) and head rewards [B] (for DPH). Paper defaults:
    cDPO beta = 0.6, eps = 0.25; DPH eps = 0.1; alpha1 = alpha2 = 1. Pair with :func:`prior_regularize_`
    after each optimiser step instead of weight decay.
    Reduction: alpha2 = 0 and cdpo_eps = 0 is DPO. Rewards: the policy's implicit cDPO rewards (TRL names);
    the head's are in ``metrics`` as ``dph/chosen``, ``dph/rejected``, ``dph/accuracies``, with the two
    loss terms as ``loss/cdpo`` and ``loss/dph``.
    """
    if dph_loss not in _DPH_LOSSES:
        raise ValueError(f"unknown dph_loss {dph_loss!r}; expected one of {sorted(_DPH_LOSSES)}")
    policy = cdpo(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta, eps=cdpo_eps
    )
    head = _DPH_LOSSES[dph_loss](head_chosen_rewards, head_rejected_rewards, eps=dph_eps)
    if policy.losses.shape != head.losses.shape:
        raise ValueError(
            f"log-probs and head rewards disagree on the batch: {tuple(policy.losses.shape)} vs "
            f"{tuple(head.losses.shape)}"
        )
    losses = alpha1 * policy.losses + alpha2 * head.losses  # [B]
    return LossOutput(
        losses,
        policy.chosen_rewards,
        policy.rejected_rewards,
        {
            "loss/cdpo": policy.losses.detach(),
            "loss/dph": head.losses.detach(),
            "dph/chosen": head.chosen_rewards,
            "dph/rejected": head.rejected_rewards,
            "dph/accuracies": (head.chosen_rewards > head.rejected_rewards).float(),
        },
    )


@torch.no_grad()
def prior_regularize_(params: Iterable[Tensor], ref_params: Iterable[Tensor], *, lr: float, lam: float) -> None:
    """DPH prior regularisation (docs/methods.md "Joint"): theta <- theta - lr * lam * (theta - theta_ref), in place.

    Call after each optimiser step, instead of weight decay: decoupled like AdamW's decay, but towards the
    starting weights theta_ref (lam = 0.5 in the paper). ``params`` and ``ref_params`` are matched in order.
    """
    params, ref_params = list(params), list(ref_params)
    if len(params) != len(ref_params):
        raise ValueError(f"{len(params)} parameters but {len(ref_params)} reference parameters")
    step = lr * lam
    if step == 0.0:
        return
    for p, ref in zip(params, ref_params):
        if p.shape != ref.shape:
            raise ValueError(f"parameter shape {tuple(p.shape)} != reference shape {tuple(ref.shape)}")
        # lerp_(ref, w) = p + w (ref - p) = p - w (p - ref)
        p.lerp_(ref.to(device=p.device, dtype=p.dtype), step)

