"""The batch-level loss registry (``arbiter.training.batch``): a PreferenceBatch checks its shapes once, splits the
policy / reference passes (collate_pairs order: chosen rows, then rejected rows) into chosen and rejected, and
``LOSSES[name](batch, **hparams)`` calls the tensor function of losses.py with the right fields.

The formulas themselves are tested against reference values in tests/test_losses.py; here: the dispatch (against
the tensor functions called by hand on independently split tensors), the defaults (against the functions' own
signatures), and the errors."""

from __future__ import annotations

import inspect

import pytest
import torch

from arbiter.training import losses
from arbiter.training.batch import LOSSES, PreferenceBatch

B, K, F = 3, 2, 5


def _passes(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pol = {"logps": -torch.rand(2 * B, generator=g) * 10, "lengths": torch.tensor([3, 4, 5, 2, 6, 7]),
           "layer_logps": -torch.rand(K, 2 * B, generator=g) * 10, "features": torch.rand(2 * B, F, generator=g),
           "head_rewards": torch.randn(2 * B, generator=g)}
    ref = {"logps": -torch.rand(2 * B, generator=g) * 10, "layer_logps": -torch.rand(K, 2 * B, generator=g) * 10,
           "features": torch.rand(2 * B, F, generator=g)}
    return pol, ref


def test_from_passes_splits_chosen_rows_then_rejected_rows():
    pol, ref = _passes()
    b = PreferenceBatch.from_passes(pol, ref)
    assert torch.equal(b.policy_chosen_logps, pol["logps"][:B]) and torch.equal(b.policy_rejected_logps, pol["logps"][B:])
    assert torch.equal(b.chosen_lengths, torch.tensor([3, 4, 5])) and torch.equal(b.rejected_lengths, torch.tensor([2, 6, 7]))
    assert torch.equal(b.layer_ref_rejected_logps, ref["layer_logps"][:, B:])  # [K, B]: the batch is the last dim
    assert torch.equal(b.policy_chosen_features, pol["features"][:B])  # [B, F]: the batch is the first dim
    assert torch.equal(b.head_rejected_rewards, pol["head_rewards"][B:])
    assert PreferenceBatch.from_passes({"logps": pol["logps"]}).present == ("policy_chosen_logps", "policy_rejected_logps")


@pytest.mark.parametrize("name,hparams", [
    ("dpo", {"beta": 0.3}), ("cdpo", {"beta": 0.2, "eps": 0.2}), ("ipo", {"beta": 0.5}),
    ("simpo", {"beta": 2.5, "gamma": 0.3}), ("mipo", {"beta": 10.0, "modulation": "identity"}),
    ("fpo", {"beta": 0.1, "alpha": 0.7, "top_k": 2}),
    ("intermediate_dpo", {"beta": 0.1, "inter_weight": 0.5, "weight_on": "final"}),
    ("dph_separable", {"eps": 0.2}), ("dph_contrastive", {"eps": 0.05}),
    ("joint", {"beta": 0.6, "cdpo_eps": 0.25, "dph_eps": 0.1, "dph_loss": "contrastive", "alpha1": 0.5, "alpha2": 2.0}),
])
def test_each_loss_dispatches_to_its_tensor_function(name, hparams):
    pol, ref = _passes(1)
    pc, pr = pol["logps"][:B], pol["logps"][B:]
    rc, rr = ref["logps"][:B], ref["logps"][B:]
    lc, lr = pol["lengths"][:B], pol["lengths"][B:]
    by_hand = {
        "dpo": lambda: losses.dpo(pc, pr, rc, rr, **hparams),
        "cdpo": lambda: losses.cdpo(pc, pr, rc, rr, **hparams),
        "ipo": lambda: losses.ipo(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **hparams),
        "simpo": lambda: losses.simpo(pc, pr, chosen_lengths=lc, rejected_lengths=lr, **hparams),
        "mipo": lambda: losses.mipo(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **hparams),
        "fpo": lambda: losses.fpo(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr,
                                  policy_chosen_features=pol["features"][:B], policy_rejected_features=pol["features"][B:],
                                  ref_chosen_features=ref["features"][:B], ref_rejected_features=ref["features"][B:],
                                  **hparams),
        "intermediate_dpo": lambda: losses.intermediate_dpo(
            pc, pr, rc, rr, layer_policy_chosen_logps=pol["layer_logps"][:, :B],
            layer_policy_rejected_logps=pol["layer_logps"][:, B:], layer_ref_chosen_logps=ref["layer_logps"][:, :B],
            layer_ref_rejected_logps=ref["layer_logps"][:, B:], **hparams),
        "dph_separable": lambda: losses.dph_separable(pol["head_rewards"][:B], pol["head_rewards"][B:], **hparams),
        "dph_contrastive": lambda: losses.dph_contrastive(pol["head_rewards"][:B], pol["head_rewards"][B:], **hparams),
        "joint": lambda: losses.joint(pc, pr, rc, rr, head_chosen_rewards=pol["head_rewards"][:B],
                                      head_rejected_rewards=pol["head_rewards"][B:], **hparams),
    }[name]()
    got = LOSSES[name](PreferenceBatch.from_passes(pol, ref), **hparams)
    torch.testing.assert_close(got.losses, by_hand.losses, rtol=0, atol=0)
    torch.testing.assert_close(got.chosen_rewards, by_hand.chosen_rewards, rtol=0, atol=0)


def test_registry_covers_every_loss_with_the_functions_own_defaults():
    for name, entry in LOSSES.items():
        params = inspect.signature(entry.fn).parameters
        tensors = {p for p, v in params.items() if v.default is inspect.Parameter.empty}
        positional = [p for p, v in params.items() if v.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert len(positional) == len(entry.inputs), name  # the positional tensors, in order
        assert tensors == set(positional) | set(entry.named), name  # every tensor the function needs, no more
        assert {p: params[p].default for p in entry.defaults} == dict(entry.defaults), name
        assert set(entry.defaults) == set(params) - tensors, name  # every hyper-parameter is named


def test_shapes_are_checked_once_and_errors_name_the_field():
    with pytest.raises(ValueError, match="ref_chosen_logps has B = 2"):
        PreferenceBatch(policy_chosen_logps=torch.zeros(3), ref_chosen_logps=torch.zeros(2))
    with pytest.raises(ValueError, match=r"layer_policy_chosen_logps must be \[K, B\]"):
        PreferenceBatch(layer_policy_chosen_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="policy_rejected_features has F = 4"):
        PreferenceBatch(policy_chosen_features=torch.zeros(3, 5), policy_rejected_features=torch.zeros(3, 4))
    pol, _ = _passes()
    no_ref = PreferenceBatch.from_passes(pol)
    with pytest.raises(ValueError, match="needs ref_chosen_logps, ref_rejected_logps"):
        LOSSES["dpo"](no_ref)
    assert LOSSES["simpo"](no_ref).losses.shape == (B,)  # reference-free
    with pytest.raises(TypeError, match="takes no hyper-parameter gamma"):
        LOSSES["dpo"](PreferenceBatch.from_passes(*_passes()), gamma=1.0)


def test_each_losss_facts_come_from_its_one_registry_entry():
    import dataclasses

    from arbiter.training.head_trainer import HEAD_LOSSES
    from arbiter.training.recipes.adapter import ADAPTER_LOSSES, AdapterConfig, loss_hparams
    from arbiter.training.reference import decide_reference

    assert ADAPTER_LOSSES == ("dpo", "cdpo", "ipo", "simpo", "mipo", "fpo", "intermediate_dpo")
    assert HEAD_LOSSES == ("dph_separable", "dph_contrastive")
    # "needs a reference" is derived from the inputs: SimPO (reference-free, Meng et al.) and the head losses
    assert {n for n, e in LOSSES.items() if not e.needs_reference} == {"simpo", "dph_separable", "dph_contrastive"}
    assert {n for n, e in LOSSES.items() if e.precomputed_reference} == {"mipo", "fpo"}
    assert decide_reference("simpo", "auto", [], "x") == "none"
    with pytest.raises(Exception, match="needs precomputed reference"):
        decide_reference("mipo", "auto", [], "x")
    # every hyper-parameter the tensor function takes is configured, by name, from its section (or beta)
    for name in ADAPTER_LOSSES:
        cfg = dataclasses.replace(AdapterConfig(), loss=name)
        assert set(loss_hparams(cfg)) == set(LOSSES[name].defaults), name
    cfg = dataclasses.replace(AdapterConfig(), loss="intermediate_dpo")
    cfg.intermediate.weight = 0.25
    assert loss_hparams(cfg)["inter_weight"] == 0.25
