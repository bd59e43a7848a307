"""Numbers for every loss in arbiter.training.losses.

Per loss: a reference value derived by hand with plain ``math`` (not the module's tensor code), its
reduction identities, a float64 gradcheck, and agreement with TRL 1.16's DPOTrainer loss (DPO, IPO) and
OpenRLHF's DPOLoss formula (cDPO).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from arbiter.training import losses as L
from arbiter.training.batch import LOSSES
from arbiter.training.losses import LossOutput, preference_metrics

FUNCTIONS = {name: entry.fn for name, entry in LOSSES.items()}


def logsig(x: float) -> float:
    """log sigma(x) in plain math, stable for either sign."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def softplus(x: float) -> float:
    return -logsig(-x)


def t(*xs, dtype=torch.float64, grad=False):
    return torch.tensor(xs, dtype=dtype, requires_grad=grad)


# Two preference pairs, summed answer log-probs and answer lengths.
PC, PR, RC, RR = [-10.0, -4.0], [-12.0, -3.0], [-11.0, -5.0], [-11.5, -3.5]
LC, LR = [5.0, 2.0], [4.0, 3.0]


def logps(dtype=torch.float64, grad=False):
    return t(*PC, dtype=dtype, grad=grad), t(*PR, dtype=dtype, grad=grad), t(*RC, dtype=dtype), t(*RR, dtype=dtype)


def lengths():
    return {"chosen_lengths": torch.tensor(LC), "rejected_lengths": torch.tensor(LR)}


def assert_close(actual: torch.Tensor, expected, *, tol=1e-10):
    exp = torch.as_tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, exp, atol=tol, rtol=tol), (actual, exp)


# --------------------------------------------------------------------------------------------------- registry


def test_losses_dict_has_every_method():
    assert set(FUNCTIONS) == {
        "dpo", "cdpo", "ipo", "simpo", "mipo", "fpo", "intermediate_dpo",
        "dph_separable", "dph_contrastive", "joint",
    }  # fmt: skip
    assert all(callable(fn) for fn in FUNCTIONS.values())


def test_hyperparameters_are_keyword_only():
    with pytest.raises(TypeError):
        L.dpo(*logps(), 0.1)  # beta positional must be refused


# --------------------------------------------------------------------------------------------------- hand values


def test_dpo_hand_value():
    beta = 0.1
    out = L.dpo(*logps(), beta=beta)
    # pair 0: h = (-10 + 11) - (-12 + 11.5) = 1 + 0.5 = 1.5; pair 1: h = (-4 + 5) - (-3 + 3.5) = 1 - 0.5 = 0.5
    h = [1.5, 0.5]
    assert_close(out.losses, [-logsig(beta * x) for x in h])
    assert_close(out.losses[0], math.log(1 + math.exp(-0.15)))
    assert_close(out.chosen_rewards, [0.1 * 1.0, 0.1 * 1.0])
    assert_close(out.rejected_rewards, [0.1 * -0.5, 0.1 * 0.5])
    assert not out.chosen_rewards.requires_grad


def test_dpo_hand_value_negative_margin():
    out = L.dpo(t(-3.0), t(-1.0), t(-2.0), t(-2.0), beta=0.5)
    # h = (-3 + 2) - (-1 + 2) = -2; L = -log sigma(-1) = log(1 + e)
    assert_close(out.losses, [math.log(1 + math.e)])


def test_cdpo_hand_value():
    beta, eps = 0.1, 0.25
    out = L.cdpo(*logps(), beta=beta, eps=eps)
    assert_close(out.losses, [-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h) for h in (1.5, 0.5)])


def test_ipo_hand_value():
    beta = 0.1
    out = L.ipo(*logps(), **lengths(), beta=beta)
    # pair 0: (-10 + 11)/5 - (-12 + 11.5)/4 = 0.2 + 0.125 = 0.325
    # pair 1: (-4 + 5)/2 - (-3 + 3.5)/3 = 0.5 - 1/6
    h = [0.325, 0.5 - 1 / 6]
    assert_close(out.losses, [(x - 1 / (2 * beta)) ** 2 for x in h])
    assert_close(out.losses[0], (0.325 - 5.0) ** 2)


def test_simpo_hand_value():
    beta, gamma = 2.0, 0.5
    out = L.simpo(t(*PC), t(*PR), **lengths(), beta=beta, gamma=gamma)
    # pair 0: 2 * (-10/5) - 2 * (-12/4) - 0.5 = -4 + 6 - 0.5 = 1.5
    # pair 1: 2 * (-4/2) - 2 * (-3/3) - 0.5 = -4 + 2 - 0.5 = -2.5
    assert_close(out.losses, [-logsig(1.5), -logsig(-2.5)])
    assert_close(out.chosen_rewards, [-4.0, -4.0])
    assert_close(out.rejected_rewards, [-6.0, -2.0])


def test_mipo_hand_value():
    beta = 20.0
    out = L.mipo(*logps(), **lengths(), beta=beta)
    # pair 0: K = -11/5 - (-11.5/4) = -2.2 + 2.875 = 0.675; f = -2 + 3 = 1
    # pair 1: K = -5/2 - (-3.5/3) = -2.5 + 1.1666.. ; f = -4/2 - (-3/3) = -1
    k = [0.675, -2.5 + 3.5 / 3]
    f = [1.0, -1.0]
    assert_close(out.losses, [-logsig(beta * (fi - math.log(1 + math.exp(ki)))) for fi, ki in zip(f, k)])
    assert_close(out.metrics["mipo/K"], k)
    assert_close(out.metrics["mipo/qK"], [math.log1p(math.exp(ki)) for ki in k])


def fpo_features(grad=False):
    # 1 pair, 4 features. Policy chosen top-2 by value: idx 2 (0.9), 0 (0.5). Ref's own top-2 would be 1, 3.
    pcf = torch.tensor([[0.5, 0.1, 0.9, 0.3]], dtype=torch.float64, requires_grad=grad)
    rcf = torch.tensor([[0.4, 1.0, 0.6, 0.8]], dtype=torch.float64)
    # Policy rejected top-2: idx 1 (0.7), 3 (0.6).
    prf = torch.tensor([[0.2, 0.7, 0.0, 0.6]], dtype=torch.float64, requires_grad=grad)
    rrf = torch.tensor([[0.9, 0.2, 0.5, 0.1]], dtype=torch.float64)
    return pcf, prf, rcf, rrf


def test_fpo_hand_value():
    beta, alpha = 0.1, 0.5
    pcf, prf, rcf, rrf = fpo_features()
    out = L.fpo(
        t(-10.0), t(-12.0), t(-11.0), t(-11.5),
        chosen_lengths=torch.tensor([5]), rejected_lengths=torch.tensor([4]),
        policy_chosen_features=pcf, policy_rejected_features=prf,
        ref_chosen_features=rcf, ref_rejected_features=rrf,
        beta=beta, alpha=alpha, top_k=2,
    )  # fmt: skip
    u = (-10 + 11) / 5 - (-12 + 11.5) / 4  # 0.325
    mse_w = ((0.9 - 0.6) ** 2 + (0.5 - 0.4) ** 2) / 2  # indices 2, 0
    mse_l = ((0.7 - 0.2) ** 2 + (0.6 - 0.1) ** 2) / 2  # indices 1, 3
    assert_close(out.losses, [-logsig(beta * (u - alpha * (mse_l - mse_w)))])
    assert_close(out.metrics["fpo/mse_chosen"], [mse_w])
    assert_close(out.metrics["fpo/mse_rejected"], [mse_l])
    assert_close(out.chosen_rewards, [beta * 0.2])
    assert_close(out.rejected_rewards, [beta * -0.125])


def test_fpo_stopgrad_on_chosen_mse_and_topk_clamp():
    pcf, prf, rcf, rrf = fpo_features(grad=True)
    args = (t(-10.0), t(-12.0), t(-11.0), t(-11.5))
    kw = dict(chosen_lengths=torch.tensor([5]), rejected_lengths=torch.tensor([4]),
              ref_chosen_features=rcf, ref_rejected_features=rrf, alpha=0.5)  # fmt: skip
    out = L.fpo(*args, policy_chosen_features=pcf, policy_rejected_features=prf, top_k=2, **kw)
    out.losses.sum().backward()
    assert pcf.grad is None or torch.count_nonzero(pcf.grad) == 0  # stopgrad(MSE_w): no gradient path at all
    assert torch.count_nonzero(prf.grad) == 2  # only the 2 selected rejected features
    # top_k larger than the SAE width: all features
    out_all = L.fpo(*args, policy_chosen_features=pcf, policy_rejected_features=prf, top_k=1000, **kw)
    mse_w = sum((a - b) ** 2 for a, b in zip([0.5, 0.1, 0.9, 0.3], [0.4, 1.0, 0.6, 0.8])) / 4
    assert_close(out_all.metrics["fpo/mse_chosen"], [mse_w])


def test_intermediate_dpo_hand_value():
    beta, w = 0.1, 0.9
    # final layer h = 1.5 (pair 0 of PC/PR/RC/RR). Layers: h_1 = (-9 + 11) - (-13 + 11.5) = 3.5,
    # h_2 = (-10 + 10) - (-11 + 12) = -1 (the reference has its own layer log-probs).
    out = L.intermediate_dpo(
        t(-10.0), t(-12.0), t(-11.0), t(-11.5),
        layer_policy_chosen_logps=t(-9.0, -10.0).unsqueeze(1),
        layer_policy_rejected_logps=t(-13.0, -11.0).unsqueeze(1),
        layer_ref_chosen_logps=t(-11.0, -10.0).unsqueeze(1),
        layer_ref_rejected_logps=t(-11.5, -12.0).unsqueeze(1),
        beta=beta, inter_weight=w,
    )  # fmt: skip
    final = -logsig(0.15)
    inter = (-logsig(0.35) - logsig(-0.1)) / 2
    assert_close(out.losses, [(1 - w) * final + w * inter])
    assert_close(out.metrics["inter/loss_final"], [final])
    assert_close(out.metrics["inter/loss_intermediate"], [inter])


def test_dph_separable_hand_value():
    eps = 0.1
    out = L.dph_separable(t(1.0, -0.5), t(-2.0, 0.25), eps=eps)
    expected = [
        -((1 - eps) * logsig(rw) + eps * logsig(-rw)) - (eps * logsig(rl) + (1 - eps) * logsig(-rl))
        for rw, rl in [(1.0, -2.0), (-0.5, 0.25)]
    ]
    assert_close(out.losses, expected)
    assert_close(out.chosen_rewards, [1.0, -0.5])


def test_dph_contrastive_hand_value():
    eps = 0.1
    out = L.dph_contrastive(t(1.0, -0.5), t(-2.0, 0.25), eps=eps)
    expected = [-(1 - eps) * logsig(m) - eps * logsig(-m) for m in (3.0, -0.75)]
    assert_close(out.losses, expected)


@pytest.mark.parametrize("kind", ["separable", "contrastive"])
def test_joint_hand_value(kind):
    beta, ce, de = 0.6, 0.25, 0.1
    out = L.joint(
        t(-10.0), t(-12.0), t(-11.0), t(-11.5),
        head_chosen_rewards=t(1.0), head_rejected_rewards=t(-2.0),
        beta=beta, cdpo_eps=ce, dph_eps=de, dph_loss=kind, alpha1=1.0, alpha2=0.5,
    )  # fmt: skip
    x = beta * 1.5
    l_cdpo = -(1 - ce) * logsig(x) - ce * logsig(-x)
    if kind == "separable":
        l_dph = -((1 - de) * logsig(1.0) + de * logsig(-1.0)) - (de * logsig(-2.0) + (1 - de) * logsig(2.0))
    else:
        l_dph = -(1 - de) * logsig(3.0) - de * logsig(-3.0)
    assert_close(out.losses, [l_cdpo + 0.5 * l_dph])
    assert_close(out.chosen_rewards, [beta * 1.0])  # policy implicit reward, not the head's
    assert_close(out.metrics["dph/chosen"], [1.0])
    assert_close(out.metrics["dph/accuracies"], [1.0])


# --------------------------------------------------------------------------------------------------- identities


def test_cdpo_eps0_is_dpo():
    a = L.cdpo(*logps(), beta=0.3, eps=0.0)
    b = L.dpo(*logps(), beta=0.3)
    assert torch.equal(a.losses, b.losses)
    assert torch.equal(a.chosen_rewards, b.chosen_rewards)


def test_cdpo_swap_symmetry():
    pc, pr, rc, rr = logps()
    eps = 0.2
    # cDPO = (1 - eps) DPO(w, l) + eps DPO(l, w)  (the swap written out)
    mixed = (1 - eps) * L.dpo(pc, pr, rc, rr, beta=0.1).losses + eps * L.dpo(pr, pc, rr, rc, beta=0.1).losses
    assert_close(L.cdpo(pc, pr, rc, rr, beta=0.1, eps=eps).losses, mixed)
    # eps = 0.5: the labels carry no information, swapping chosen and rejected changes nothing
    assert_close(L.cdpo(pc, pr, rc, rr, eps=0.5).losses, L.cdpo(pr, pc, rr, rc, eps=0.5).losses)
    with pytest.raises(ValueError):
        L.cdpo(pc, pr, rc, rr, eps=0.6)


def test_mipo_identity_modulation_is_length_normalised_dpo():
    beta = 3.0
    pc, pr, rc, rr = logps()
    lc, lr = torch.tensor(LC, dtype=torch.float64), torch.tensor(LR, dtype=torch.float64)
    out = L.mipo(pc, pr, rc, rr, **lengths(), beta=beta, modulation="identity")
    # DPO on average log-probs, with the same beta
    ln_dpo = L.dpo(pc / lc, pr / lr, rc / lc, rr / lr, beta=beta)
    assert_close(out.losses, ln_dpo.losses, tol=1e-12)


def test_mipo_softplus_does_not_overflow():
    # K = 0/1 - (-1000/1) = 1000: the authors' log(1 + exp(K)) is inf in float32
    assert math.isinf(torch.log(1 + torch.exp(torch.tensor(1000.0))).item())
    pc = torch.tensor([-1.0], requires_grad=True)  # float32 on purpose
    pr = torch.tensor([-1001.5])
    out = L.mipo(pc, pr, torch.tensor([0.0]), torch.tensor([-1000.0]),
                 chosen_lengths=torch.tensor([1]), rejected_lengths=torch.tensor([1]), beta=20.0)  # fmt: skip
    assert out.losses.dtype == torch.float32
    assert torch.isfinite(out.losses).all()
    assert_close(out.metrics["mipo/qK"], [1000.0], tol=1e-6)
    # f - q(K) = 1000.5 - 1000 = 0.5: the pair the reference already gets right is held near it
    assert_close(out.losses, [-logsig(20 * 0.5)], tol=1e-6)
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all()


def test_fpo_alpha0_is_length_normalised_reference_margin_form():
    beta = 0.1
    pc, pr, rc, rr = logps()
    lc, lr = torch.tensor(LC, dtype=torch.float64), torch.tensor(LR, dtype=torch.float64)
    feats = torch.rand(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = L.fpo(pc, pr, rc, rr, **lengths(), policy_chosen_features=feats, policy_rejected_features=feats * 2,
                ref_chosen_features=feats * 0, ref_rejected_features=feats + 1, beta=beta, alpha=0.0)  # fmt: skip
    # SimPO-style length-normalised difference minus the offline reference margin gamma_ref
    gamma_ref = rc / lc - rr / lr
    expected = -torch.nn.functional.logsigmoid(beta * (pc / lc - pr / lr) - beta * gamma_ref)
    assert_close(out.losses, expected, tol=1e-12)


def test_intermediate_weight0_is_dpo_and_weight_on_option():
    pc, pr, rc, rr = logps()
    layers = {
        "layer_policy_chosen_logps": torch.stack([pc, pc - 1]).detach(),
        "layer_policy_rejected_logps": torch.stack([pr, pr + 2]).detach(),
        "layer_ref_chosen_logps": torch.stack([rc, rc]),
        "layer_ref_rejected_logps": torch.stack([rr, rr]),
    }
    out = L.intermediate_dpo(pc, pr, rc, rr, **layers, beta=0.2, inter_weight=0.0)
    assert_close(out.losses, L.dpo(pc, pr, rc, rr, beta=0.2).losses)
    # weight on the final term instead: inter_weight = 1 with weight_on="final" is DPO too
    out_f = L.intermediate_dpo(pc, pr, rc, rr, **layers, beta=0.2, inter_weight=1.0, weight_on="final")
    assert_close(out_f.losses, L.dpo(pc, pr, rc, rr, beta=0.2).losses)


@pytest.mark.parametrize("kind", ["separable", "contrastive"])
def test_dph_minimum_at_log_odds(kind):
    eps = 0.1
    star = math.log((1 - eps) / eps)
    # gradient is zero at the optimum
    if kind == "separable":
        rw, rl = t(star, grad=True), t(-star, grad=True)
        L.dph_separable(rw, rl, eps=eps).losses.sum().backward()
    else:
        rw, rl = t(star + 0.7, grad=True), t(0.7, grad=True)  # only the margin matters
        L.dph_contrastive(rw, rl, eps=eps).losses.sum().backward()
    assert abs(rw.grad.item()) < 1e-12 and abs(rl.grad.item()) < 1e-12
    # numeric scan: the minimum over a fine grid sits at log((1 - eps) / eps)
    grid = torch.linspace(-6, 6, 120_001, dtype=torch.float64)  # step 1e-4
    if kind == "separable":
        zeros = torch.zeros_like(grid)
        best_w = grid[L.dph_separable(grid, zeros - star, eps=eps).losses.argmin()].item()
        best_l = grid[L.dph_separable(zeros + star, grid, eps=eps).losses.argmin()].item()
        assert abs(best_w - star) < 2e-4 and abs(best_l + star) < 2e-4
    else:
        best_margin = grid[L.dph_contrastive(grid, torch.zeros_like(grid), eps=eps).losses.argmin()].item()
        assert abs(best_margin - star) < 2e-4


def test_joint_reduces_to_dpo():
    pc, pr, rc, rr = logps()
    out = L.joint(pc, pr, rc, rr, head_chosen_rewards=t(1.0, 2.0), head_rejected_rewards=t(0.0, 0.0),
                  beta=0.6, cdpo_eps=0.0, alpha2=0.0)  # fmt: skip
    assert_close(out.losses, L.dpo(pc, pr, rc, rr, beta=0.6).losses)


def test_low_precision_inputs_computed_in_float32():
    pc, pr, rc, rr = (x.to(torch.bfloat16) for x in logps())
    out = L.dpo(pc, pr, rc, rr, beta=0.1)
    assert out.losses.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32
    out = L.simpo(pc, pr, chosen_lengths=torch.tensor([5, 2]), rejected_lengths=torch.tensor([4, 3]))
    assert out.losses.dtype == torch.float32


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        L.dpo(t(1.0, 2.0), t(1.0), t(1.0), t(1.0))


# --------------------------------------------------------------------------------------------------- gradcheck


def _g(*xs):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=True)


GRADCHECK_CASES = {
    "dpo": lambda pc, pr, rc, rr: L.dpo(pc, pr, rc, rr, beta=0.3),
    "cdpo": lambda pc, pr, rc, rr: L.cdpo(pc, pr, rc, rr, beta=0.3, eps=0.2),
    "ipo": lambda pc, pr, rc, rr: L.ipo(pc, pr, rc, rr, **lengths(), beta=0.3),
    "simpo": lambda pc, pr, rc, rr: L.simpo(pc, pr, **lengths()),
    "mipo": lambda pc, pr, rc, rr: L.mipo(pc, pr, rc, rr, **lengths(), beta=5.0),
    "intermediate_dpo": lambda pc, pr, rc, rr: L.intermediate_dpo(
        pc, pr, rc, rr,
        layer_policy_chosen_logps=torch.stack([pc * 1.1, pc - 0.3]),
        layer_policy_rejected_logps=torch.stack([pr * 0.9, pr + 0.2]),
        layer_ref_chosen_logps=torch.stack([rc, rc * 1.2]),
        layer_ref_rejected_logps=torch.stack([rr, rr - 0.4]),
        beta=0.3,
    ),  # fmt: skip
    "dph_separable": lambda pc, pr, rc, rr: L.dph_separable(pc / 5, pr / 5, eps=0.1),
    "dph_contrastive": lambda pc, pr, rc, rr: L.dph_contrastive(pc / 5, pr / 5, eps=0.1),
    "joint": lambda pc, pr, rc, rr: L.joint(
        pc, pr, rc, rr, head_chosen_rewards=rc / 5, head_rejected_rewards=rr / 5, dph_loss="contrastive"
    ),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_gradcheck(name):
    inputs = (_g(*PC), _g(*PR), _g(*RC), _g(*RR))
    fn = GRADCHECK_CASES[name]
    assert torch.autograd.gradcheck(lambda *xs: fn(*xs).losses, inputs)


def test_gradcheck_fpo():
    # distinct feature values, so the top-k selection is stable under gradcheck's 1e-6 perturbations
    gen = torch.Generator().manual_seed(1)
    pcf, prf, rcf, rrf = (torch.randperm(12, generator=gen).double().div(12).reshape(2, 6) for _ in range(4))
    # The chosen-side features only enter through stopgrad(MSE_w): their analytic gradient is zero by design
    # (checked in test_fpo_stopgrad_on_chosen_mse_and_topk_clamp), so finite differences would disagree.
    # Gradcheck everything else.
    inputs = (_g(*PC), _g(*PR), _g(*RC), _g(*RR), prf.requires_grad_(), rrf.requires_grad_())

    def fn(pc, pr, rc, rr, prf, rrf):
        return L.fpo(pc, pr, rc, rr, **lengths(), policy_chosen_features=pcf, policy_rejected_features=prf,
                     ref_chosen_features=rcf, ref_rejected_features=rrf, alpha=2.0, top_k=3).losses  # fmt: skip

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_covers_every_loss():
    assert set(GRADCHECK_CASES) | {"fpo"} == set(FUNCTIONS)


# --------------------------------------------------------------------------------------------------- TRL


def _trl_dpo_loss(loss_type: str, beta: float, pc, pr, rc, rr, lc, lr):
    """Run TRL 1.16's own ``DPOTrainer._compute_loss`` on given per-sequence log-probs.

    TRL computes the loss inline in ``_compute_loss`` (no standalone loss function), starting from a model
    forward. So we call the unbound method with a stub ``self`` carrying only the attributes that code path
    reads, and a stub model whose ``log_probs`` output sums (over the completion) to the log-probs we want.
    Reference log-probs go in as ``precompute_ref_log_probs`` would supply them. Batch is [chosen; rejected].
    """
    from trl import DPOTrainer

    b = len(pc)
    seq = 1 + int(max(lc + lr))  # one prompt token + room for the longest answer
    lens = torch.tensor(lc + lr, dtype=torch.long)  # [2B]
    completion_mask = (torch.arange(seq)[None, :] >= seq - lens[:, None]).long()  # [2B, seq]: answers at the end
    # per-token log-probs (shifted, [2B, seq-1]): the whole sequence log-prob on the last answer token
    per_token = torch.zeros(2 * b, seq - 1, dtype=torch.float64)
    per_token[:, -1] = torch.tensor(pc + pr, dtype=torch.float64)

    class StubModel:
        training = True

        def __call__(self, **kwargs):
            n = kwargs["input_ids"].shape[0]
            return SimpleNamespace(
                log_probs=per_token,
                entropy=torch.zeros(n, seq - 1),
                mean_logits=torch.zeros(n, seq - 1),
                is_top1=torch.zeros(n, seq - 1, dtype=torch.bool),
            )

    model = StubModel()
    metrics = defaultdict(lambda: defaultdict(list))
    stub = SimpleNamespace(
        model=model, ref_model=None, args=SimpleNamespace(),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0, loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, router_aux_loss_coef=0.0, _metrics=metrics, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.ones(2 * b, seq, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, seq, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(rc, dtype=torch.float64),
        "ref_rejected_logps": torch.tensor(rr, dtype=torch.float64),
    }
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(beta):
    trl_loss, trl_metrics = _trl_dpo_loss("sigmoid", beta, PC, PR, RC, RR, LC, LR)
    out = L.dpo(*logps(), beta=beta)
    assert_close(out.losses.mean(), trl_loss.item(), tol=1e-12)
    ours = preference_metrics(out)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours[name] == pytest.approx(trl_metrics[name], abs=1e-12), name


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_trl(beta):
    trl_loss, trl_metrics = _trl_dpo_loss("ipo", beta, PC, PR, RC, RR, LC, LR)
    out = L.ipo(*logps(), **lengths(), beta=beta)
    assert_close(out.losses.mean(), trl_loss.item(), tol=1e-12)
    assert preference_metrics(out)["rewards/margins"] == pytest.approx(trl_metrics["rewards/margins"], abs=1e-12)


# --------------------------------------------------------------------------------------------------- OpenRLHF


def _openrlhf_dpo_loss(pc, pr, rc, rr, *, beta, label_smoothing):
    """OpenRLHF ``openrlhf/models/loss.py::DPOLoss.forward`` (non-IPO branch), written from memory since
    OpenRLHF is not installed:

        pi_logratios = policy_chosen_logps - policy_rejected_logps
        ref_logratios = reference_chosen_logps - reference_rejected_logps
        logits = pi_logratios - ref_logratios
        losses = (-F.logsigmoid(self.beta * logits) * (1 - self.label_smoothing)
                  - F.logsigmoid(-self.beta * logits) * self.label_smoothing)
        loss = losses.mean()
        chosen_rewards = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()
    """
    f = torch.nn.functional
    logits = (pc - pr) - (rc - rr)
    losses = -f.logsigmoid(beta * logits) * (1 - label_smoothing) - f.logsigmoid(-beta * logits) * label_smoothing
    return losses.mean(), beta * (pc - rc).detach(), beta * (pr - rr).detach()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25, 0.5])
def test_cdpo_matches_openrlhf(eps):
    pc, pr, rc, rr = logps()
    loss, chosen, rejected = _openrlhf_dpo_loss(pc, pr, rc, rr, beta=0.6, label_smoothing=eps)
    out = L.cdpo(pc, pr, rc, rr, beta=0.6, eps=eps)
    assert_close(out.losses.mean(), loss.item(), tol=1e-12)
    assert torch.allclose(out.chosen_rewards, chosen) and torch.allclose(out.rejected_rewards, rejected)


# --------------------------------------------------------------------------------------------------- metrics


def test_preference_metrics_names_and_values():
    out = LossOutput(
        losses=torch.tensor([1.0, 3.0]),
        chosen_rewards=torch.tensor([0.5, -1.0]),
        rejected_rewards=torch.tensor([0.0, -0.5]),
        metrics={"mipo/K": torch.tensor([2.0, 4.0])},
    )
    m = preference_metrics(out)
    assert m == pytest.approx({
        "rewards/chosen": -0.25, "rewards/rejected": -0.25, "rewards/margins": 0.0,
        "rewards/accuracies": 0.5, "loss": 2.0, "mipo/K": 3.0,
    })  # fmt: skip
    assert set(preference_metrics(out, prefix="eval_")) == {f"eval_{k}" for k in m}
    assert all(isinstance(v, float) for v in m.values())


def test_preference_metrics_ties_are_not_accurate():
    out = L.dph_contrastive(t(1.0, 2.0), t(1.0, 0.0))
    assert preference_metrics(out)["rewards/accuracies"] == 0.5


# --------------------------------------------------------------------------------------------------- prior reg.


def test_prior_regularize_moves_towards_reference():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    ref = torch.tensor([0.0, 0.0, 1.0])
    L.prior_regularize_([p], [ref], lr=0.1, lam=0.5)
    # theta - lr * lam * (theta - theta_ref) = theta - 0.05 (theta - ref)
    assert torch.allclose(p.data, torch.tensor([0.95, -1.9, 2.9]))
    assert p.grad is None and p.requires_grad
    with pytest.raises(ValueError):
        L.prior_regularize_([p], [], lr=0.1, lam=0.5)
