"""One micro-batch's preference quantities as a typed, frozen :class:`PreferenceBatch` (chosen and rejected already
split, shapes checked once), and the batch-level loss registry every recipe dispatches through:

    LOSSES[name](batch, **hparams) -> LossOutput

Each entry is a :class:`BatchLoss` over a tensor function of ``losses.py`` (the formulas, with reference values and
gradient checks in tests/test_losses.py; docs/methods.md): it names the batch fields the function reads; its
hyper-parameters and their defaults are the function's own keyword arguments; the entry also says which recipe
trains it, whether it needs a (precomputed) reference, and where its config section is. A loss asked of a batch that lacks
a field it needs fails naming the field; an unknown hyper-parameter fails naming the loss's own.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Any, Callable, Literal, Mapping

from torch import Tensor

from . import losses as L
from .logprobs import split_pairs
from .losses import LossOutput

_PER_PAIR = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
             "chosen_lengths", "rejected_lengths", "head_chosen_rewards", "head_rejected_rewards")
_PER_LAYER = ("layer_policy_chosen_logps", "layer_policy_rejected_logps", "layer_ref_chosen_logps",
              "layer_ref_rejected_logps")
_PER_FEATURE = ("policy_chosen_features", "policy_rejected_features", "ref_chosen_features", "ref_rejected_features")


@dataclass(frozen=True)
class PreferenceBatch:
    """B preference pairs. Every field is optional (a recipe fills what its loss reads); present fields must agree
    on B (and on K layers, F features), checked when the batch is made."""

    policy_chosen_logps: Tensor | None = None  # [B] summed answer log-probs under the policy
    policy_rejected_logps: Tensor | None = None  # [B]
    ref_chosen_logps: Tensor | None = None  # [B] under the reference model
    ref_rejected_logps: Tensor | None = None  # [B]
    chosen_lengths: Tensor | None = None  # [B] answer tokens
    rejected_lengths: Tensor | None = None  # [B]
    layer_policy_chosen_logps: Tensor | None = None  # [K, B] intermediate-layer log-probs (intermediate DPO)
    layer_policy_rejected_logps: Tensor | None = None  # [K, B]
    layer_ref_chosen_logps: Tensor | None = None  # [K, B]
    layer_ref_rejected_logps: Tensor | None = None  # [K, B]
    policy_chosen_features: Tensor | None = None  # [B, F] pooled SAE features (FPO)
    policy_rejected_features: Tensor | None = None  # [B, F]
    ref_chosen_features: Tensor | None = None  # [B, F]
    ref_rejected_features: Tensor | None = None  # [B, F]
    head_chosen_rewards: Tensor | None = None  # [B] DPH head rewards
    head_rejected_rewards: Tensor | None = None  # [B]

    def __post_init__(self) -> None:
        sizes: dict[str, int] = {}

        def agree(what: str, n: int, name: str) -> None:
            if sizes.setdefault(what, n) != n:
                raise ValueError(f"PreferenceBatch: {name} has {what} = {n}, other fields have {sizes[what]}")

        for names, dims in ((_PER_PAIR, ("B",)), (_PER_LAYER, ("K", "B")), (_PER_FEATURE, ("B", "F"))):
            for name in names:
                t = getattr(self, name)
                if t is None:
                    continue
                if t.dim() != len(dims):
                    raise ValueError(f"PreferenceBatch: {name} must be [{', '.join(dims)}], got {tuple(t.shape)}")
                for what, n in zip(dims, t.shape):
                    agree(what, int(n), name)

    @property
    def present(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if getattr(self, f.name) is not None)

    def need(self, *names: str) -> tuple[Tensor, ...]:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"this loss needs {', '.join(missing)}; the batch has {', '.join(self.present) or 'nothing'}")
        return tuple(getattr(self, n) for n in names)

    @classmethod
    def from_passes(cls, policy: Mapping[str, Tensor], ref: Mapping[str, Tensor] | None = None) -> PreferenceBatch:
        """From the policy pass (``PolicyModule``: ``logps`` / ``lengths`` [2B], ``layer_logps`` [K, 2B],
        ``features`` [2B, F], ``head_rewards`` [2B]) and the reference (``logps``, ``layer_logps``, ``features``),
        all in collate_pairs row order (chosen rows, then rejected rows)."""
        kw: dict[str, Tensor] = {}

        def put(prefix: str, suffix: str, t: Tensor | None, *, rows_last: bool = False) -> None:
            if t is None:
                return
            c, r = split_pairs(t) if rows_last else t.chunk(2, dim=0)
            kw[f"{prefix}chosen{suffix}"], kw[f"{prefix}rejected{suffix}"] = c, r

        put("policy_", "_logps", policy.get("logps"))
        put("", "_lengths", policy.get("lengths"))
        put("layer_policy_", "_logps", policy.get("layer_logps"), rows_last=True)
        put("policy_", "_features", policy.get("features"))
        put("head_", "_rewards", policy.get("head_rewards"))
        if ref is not None:
            device = policy["logps"].device if "logps" in policy else None
            ref = {k: (v.to(device) if device is not None else v) for k, v in ref.items()}
            put("ref_", "_logps", ref.get("logps"))
            put("layer_ref_", "_logps", ref.get("layer_logps"), rows_last=True)
            put("ref_", "_features", ref.get("features"))
        return cls(**kw)


@dataclass(frozen=True)
class BatchLoss:
    """A loss over a :class:`PreferenceBatch`: ``fn(*batch[inputs], **batch[named], **hparams)``, and every fact the
    recipes need about it, in one place: which recipe trains it (``family``), whether it reads a reference model
    (derived from its inputs), whether that reference must be precomputed, and which config section holds its
    hyper-parameters (``section``: hyper-parameter -> field of that section; beta is top-level)."""

    fn: Callable[..., LossOutput]  # the tensor function (losses.py)
    inputs: tuple[str, ...]  # batch fields passed positionally
    named: tuple[str, ...] = ()  # batch fields passed by name (the function's keyword of the same name)
    family: Literal["adapter", "head", "joint"] = "adapter"  # the recipe that trains it
    precomputed_reference: bool = False  # trained from `arbiter train ref` columns only, never a live reference
    section: tuple[str, tuple[tuple[str, str], ...]] | None = None  # (config section, ((hparam, field), ...))

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference-model quantities (any ``ref_`` field)."""
        return any(f.startswith(("ref_", "layer_ref_")) for f in self.inputs + self.named)

    def hparams_from(self, cfg: Any) -> dict[str, Any]:
        """This loss's section hyper-parameters read from a recipe config (``cfg.<section>.<field>``)."""
        if self.section is None:
            return {}
        sec = getattr(cfg, self.section[0])
        return {hp: getattr(sec, f) for hp, f in self.section[1]}

    @property
    def defaults(self) -> dict[str, Any]:
        """The hyper-parameters the function takes (its keyword arguments with a default) and their defaults."""
        return {p.name: p.default for p in inspect.signature(self.fn).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}

    def __call__(self, batch: PreferenceBatch, **hparams: Any) -> LossOutput:
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise TypeError(f"{self.fn.__name__} takes no hyper-parameter {', '.join(unknown)} "
                            f"(it takes {', '.join(self.defaults) or 'none'})")
        named = dict(zip(self.named, batch.need(*self.named)))
        return self.fn(*batch.need(*self.inputs), **named, **hparams)


_LOGPS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
_LENGTHS = ("chosen_lengths", "rejected_lengths")
_HEAD = ("head_chosen_rewards", "head_rejected_rewards")

LOSSES: dict[str, BatchLoss] = {
    "dpo": BatchLoss(L.dpo, _LOGPS),
    "cdpo": BatchLoss(L.cdpo, _LOGPS, section=("cdpo", (("eps", "eps"),))),
    "ipo": BatchLoss(L.ipo, _LOGPS, _LENGTHS),
    "simpo": BatchLoss(L.simpo, _LOGPS[:2], _LENGTHS, section=("simpo", (("gamma", "gamma"),))),
    "mipo": BatchLoss(L.mipo, _LOGPS, _LENGTHS, precomputed_reference=True,
                      section=("mipo", (("modulation", "modulation"),))),
    "fpo": BatchLoss(L.fpo, _LOGPS, _LENGTHS + _PER_FEATURE, precomputed_reference=True,
                     section=("fpo", (("alpha", "alpha"), ("top_k", "top_k")))),
    "intermediate_dpo": BatchLoss(L.intermediate_dpo, _LOGPS, _PER_LAYER,
                                  section=("intermediate", (("inter_weight", "weight"), ("weight_on", "weight_on")))),
    "dph_separable": BatchLoss(L.dph_separable, _HEAD, family="head"),
    "dph_contrastive": BatchLoss(L.dph_contrastive, _HEAD, family="head"),
    "joint": BatchLoss(L.joint, _LOGPS, _HEAD, family="joint"),
}


def losses_of(family: str) -> tuple[str, ...]:
    """The names of the losses one recipe family trains, in registry order."""
    return tuple(n for n, e in LOSSES.items() if e.family == family)
