"""Tests for jaxpt.losses.dpo against hand-computed values (plain Python ``math``)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.losses import dpo as D
from jaxpt.losses.dpo import DPOLossConfig, dpo_loss, needs_reference

ALL_TYPES = D.LOSS_TYPES
REF_FREE = ("sft", "simpo", "orpo")


# ----------------------------------------------------------------------------- references
# Scalar, per-pair re-derivations in plain Python, written from the papers / TRL formulas.


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def math_pair_loss(t, c, r, rc, rr, lc, lr, *, beta, eps, gamma, lam, delta=0.0):
    uc, ur = c - rc, r - rr
    h = uc - ur
    lc, lr = max(lc, 1.0), max(lr, 1.0)
    a, b = c / lc, r / lr
    if t == "sigmoid":
        return -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
    if t == "hinge":
        return max(0.0, 1 - beta * h)
    if t == "ipo":
        return (uc / lc - ur / lr - 1 / (2 * beta)) ** 2
    if t == "robust":
        return (-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps)
    if t == "exo_pair":
        z = beta * h
        return sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps))
    if t == "nca_pair":
        return -logsig(beta * uc) - 0.5 * logsig(-beta * uc) - 0.5 * logsig(-beta * ur)
    if t == "bco_pair":
        return -logsig(beta * uc - delta) - logsig(-(beta * ur - delta))
    if t == "sppo_hard":
        return (uc - 1 / (2 * beta)) ** 2 + (ur + 1 / (2 * beta)) ** 2
    if t == "apo_zero":
        return 1 - sig(beta * uc) + sig(beta * ur)
    if t == "apo_down":
        return sig(beta * uc) + 1 - sig(beta * h)
    if t == "sigmoid_norm":
        return -logsig(beta * (uc / lc - ur / lr))
    if t == "sft":
        return -a
    if t == "simpo":
        z = beta * (a - b) - gamma
        return -(1 - eps) * logsig(z) - eps * logsig(-z)
    if t == "orpo":
        log_odds = (a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b)))
        return -a - lam * logsig(log_odds)
    raise AssertionError(t)


# ----------------------------------------------------------------------------- one pair, literals
# c=-3, r=-4, ref_c=-3.5, ref_r=-3, L_c=2, L_r=4, beta=0.5, eps=0.1 (types that use it)
# => u_c = 0.5, u_r = -1, h = 1.5, a = -1.5, b = -1
ONE = dict(c=-3.0, r=-4.0, rc=-3.5, rr=-3.0, lc=2.0, lr=4.0)
ONE_LITERAL = {
    "sigmoid": 0.46187100611489995,  # 0.9*log(1+e^-0.75) + 0.1*log(1+e^0.75)
    "hinge": 0.25,  # 1 - 0.5*1.5
    "ipo": 0.25,  # (0.5/2 - (-1)/4 - 1)^2 = (-0.5)^2
    "robust": 0.2931210061148999,
    "exo_pair": 0.1827899810292743,
    "nca_pair": 1.2259476219083187,
    "bco_pair": 1.0500164040589501,
    "sppo_hard": 0.25,  # (0.5 - 1)^2 + (-1 + 1)^2
    "apo_zero": 0.8153641679123473,
    "apo_down": 0.8829978017104052,
    "sigmoid_norm": 0.5759394198788436,
    "sft": 1.5,  # -(-3)/2
    "simpo": 1.0618710061149,  # z = 0.5*(-0.5) - 0.5 = -0.75, eps-smoothed
    "orpo": 1.6107328174573632,  # 1.5 + 0.1*(-logsig(-0.70619...))
}


def _cfg(types, **kw):
    kw.setdefault("beta", 0.5)
    if set(types) & D.LABEL_SMOOTHING_LOSS_TYPES:
        kw.setdefault("label_smoothing", 0.1)
    return DPOLossConfig(loss_type=tuple(types), **kw)


def _arrays(d):
    return [jnp.asarray(d[k], jnp.float32) for k in ("c", "r", "rc", "rr", "lc", "lr")]


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_each_type_matches_literal_on_one_pair(loss_type):
    c, r, rc, rr, lc, lr = _arrays({k: [v] for k, v in ONE.items()})
    cfg = _cfg([loss_type])
    loss, metrics = dpo_loss(cfg, c, r, rc, rr, lc, lr)
    assert float(loss) == pytest.approx(ONE_LITERAL[loss_type], rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(ONE_LITERAL[loss_type], rel=1e-5)
    # the literal table itself agrees with the scalar derivation
    eps = cfg.label_smoothing
    ref = math_pair_loss(loss_type, **ONE, beta=0.5, eps=eps, gamma=0.5, lam=0.1)
    assert ONE_LITERAL[loss_type] == pytest.approx(ref, rel=1e-12)


def test_public_per_pair_functions_on_one_pair():
    uc, ur = jnp.array([0.5]), jnp.array([-1.0])
    c, r, lc, lr = jnp.array([-3.0]), jnp.array([-4.0]), jnp.array([2.0]), jnp.array([4.0])
    got = {
        "sigmoid": D.sigmoid_loss(uc, ur, beta=0.5, label_smoothing=0.1),
        "hinge": D.hinge_loss(uc, ur, beta=0.5),
        "ipo": D.ipo_loss(uc, ur, lc, lr, beta=0.5),
        "robust": D.robust_loss(uc, ur, beta=0.5, label_smoothing=0.1),
        "exo_pair": D.exo_pair_loss(uc, ur, beta=0.5, label_smoothing=0.1),
        "nca_pair": D.nca_pair_loss(uc, ur, beta=0.5),
        "bco_pair": D.bco_pair_loss(uc, ur, beta=0.5),
        "sppo_hard": D.sppo_hard_loss(uc, ur, beta=0.5),
        "apo_zero": D.apo_zero_loss(uc, ur, beta=0.5),
        "apo_down": D.apo_down_loss(uc, ur, beta=0.5),
        "sigmoid_norm": D.sigmoid_norm_loss(uc, ur, lc, lr, beta=0.5),
        "sft": D.chosen_nll_loss(c, lc),
        "simpo": D.simpo_loss(c, r, lc, lr, beta=0.5, gamma=0.5, label_smoothing=0.1),
        "orpo": D.orpo_loss(c, r, lc, lr, orpo_lambda=0.1),
    }
    assert set(got) == set(ALL_TYPES)
    for name, value in got.items():
        assert value.shape == (1,), name
        assert float(value[0]) == pytest.approx(ONE_LITERAL[name], rel=1e-5), name
    # sigmoid without smoothing is plain DPO: log(1 + e^-0.75)
    assert float(D.sigmoid_loss(uc, ur, beta=0.5)[0]) == pytest.approx(0.38687100611489994)
    # log odds for a=-1.5, b=-1
    log_odds = D.orpo_log_odds(c, r, lc, lr)
    assert float(log_odds[0]) == pytest.approx(-0.7061926864616279, rel=1e-5)


# ----------------------------------------------------------------------------- batch of three

BATCH = dict(
    c=[-3.0, -5.0, -2.0],
    r=[-4.0, -2.0, -6.0],
    rc=[-3.5, -5.0, -2.5],
    rr=[-3.0, -3.0, -5.0],
    lc=[2.0, 3.0, 0.0],  # a zero length is clipped to 1
    lr=[4.0, 1.0, 2.0],
)


def _math_mean(loss_type, cfg, batch=BATCH, delta=0.0):
    vals = [
        math_pair_loss(
            loss_type,
            *(batch[k][i] for k in ("c", "r", "rc", "rr", "lc", "lr")),
            beta=cfg.beta,
            eps=cfg.label_smoothing,
            gamma=cfg.simpo_gamma,
            lam=cfg.orpo_lambda,
            delta=delta,
        )
        for i in range(len(batch["c"]))
    ]
    return sum(vals) / len(vals)


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_each_type_batch_mean_matches_math(loss_type):
    cfg = _cfg([loss_type], beta=0.3, simpo_gamma=0.7, orpo_lambda=0.25)
    loss, _ = dpo_loss(cfg, *_arrays(BATCH))
    assert float(loss) == pytest.approx(_math_mean(loss_type, cfg), rel=1e-5)


def test_bco_delta_shifts_rewards():
    cfg = _cfg(["bco_pair"])
    one = _arrays({k: [v] for k, v in ONE.items()})
    loss, _ = dpo_loss(cfg, *one, bco_delta=0.2)
    assert float(loss) == pytest.approx(1.0716456968987442, rel=1e-5)
    # traced delta under jit
    f = jax.jit(lambda d: dpo_loss(cfg, *_arrays(BATCH), bco_delta=d)[0])
    assert float(f(jnp.float32(-0.4))) == pytest.approx(
        _math_mean("bco_pair", cfg, delta=-0.4), rel=1e-5
    )


# ----------------------------------------------------------------------------- edge cases


def test_equal_logps_give_the_textbook_values():
    z = [jnp.full((4,), -7.0)] * 4
    lens = [jnp.full((4,), 3.0)] * 2
    log2 = 0.6931471805599453
    cases = {
        "sigmoid": log2,
        "sigmoid_norm": log2,
        "hinge": 1.0,
        "ipo": (1 / (2 * 0.5)) ** 2,
        "sppo_hard": 2 * (1 / (2 * 0.5)) ** 2,
        "bco_pair": 2 * log2,
        "nca_pair": 2 * log2,
        "apo_zero": 1.0,
        "apo_down": 1.0,
    }
    for t, want in cases.items():
        loss, m = dpo_loss(DPOLossConfig(loss_type=(t,), beta=0.5), *z, *lens)
        assert float(loss) == pytest.approx(want, rel=1e-6), t
        assert float(m["rewards/margins"]) == 0.0
        assert float(m["rewards/accuracies"]) == 0.0  # strict >, as TRL
    # robust at h=0 is log 2 for every eps; cDPO too
    for t in ("robust", "sigmoid"):
        loss, _ = dpo_loss(DPOLossConfig(loss_type=(t,), label_smoothing=0.3), *z, *lens)
        assert float(loss) == pytest.approx(log2, rel=1e-6), t
    # exo at z=0: -log 2 - 0.5*log(eps*(1-eps))
    loss, _ = dpo_loss(DPOLossConfig(loss_type=("exo_pair",), label_smoothing=0.1), *z, *lens)
    assert float(loss) == pytest.approx(-log2 - 0.5 * math.log(0.1 * 0.9), rel=1e-6)
    # simpo with equal averages: -logsig(-gamma) = log(1 + e^gamma)
    loss, _ = dpo_loss(DPOLossConfig(loss_type=("simpo",), simpo_gamma=0.5), *z, *lens)
    assert float(loss) == pytest.approx(math.log1p(math.exp(0.5)), rel=1e-6)
    # orpo with equal averages: odds term is lambda*log 2, plus the NLL 7/3
    loss, _ = dpo_loss(DPOLossConfig(loss_type=("orpo",), orpo_lambda=0.1), *z, *lens)
    assert float(loss) == pytest.approx(7 / 3 + 0.1 * log2, rel=1e-6)


def _grads(cfg, args):
    def f(c, r):
        return dpo_loss(cfg, c, r, *args[2:])[0]

    return jax.grad(f, argnums=(0, 1))(args[0], args[1])


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_large_margins_stay_finite_in_value_and_gradient(loss_type):
    cfg = _cfg([loss_type])
    # pair 0: policy hugely prefers chosen; pair 1: hugely prefers rejected; pair 2: the
    # chosen completion has probability 1 (log-prob exactly 0, ORPO's log(1-p) edge)
    c = jnp.array([-1.0, -1e4, 0.0])
    r = jnp.array([-1e4, -1.0, -1e4])
    ref = jnp.array([-5e3, -5e3, -5e3])
    lens = jnp.ones((3,))
    args = (c, r, ref, ref, lens, lens)
    loss, metrics = dpo_loss(cfg, *args)
    assert np.isfinite(float(loss)), loss_type
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    gc, gr = _grads(cfg, args)
    assert np.all(np.isfinite(np.asarray(gc))) and np.all(np.isfinite(np.asarray(gr))), (
        loss_type,
        gc,
        gr,
    )


def test_large_margin_values_are_exact_not_saturated():
    # sigmoid at beta*h = -5000: -logsig(-5000) = 5000 (no overflow to inf)
    c, r = jnp.array([-1e4]), jnp.array([0.0])
    zero, one = jnp.zeros((1,)), jnp.ones((1,))
    loss, _ = dpo_loss(DPOLossConfig(beta=0.5), c, r, zero, zero, one, one)
    assert float(loss) == pytest.approx(5000.0, rel=1e-6)
    g = jax.grad(lambda c: dpo_loss(DPOLossConfig(beta=0.5), c, r, zero, zero, one, one)[0])(c)
    assert float(g[0]) == pytest.approx(-0.5, rel=1e-6)  # -beta * sigma(5000)
    # and at +5000 the loss underflows gracefully to ~0 with ~0 gradient
    loss, _ = dpo_loss(DPOLossConfig(beta=0.5), r, c, zero, zero, one, one)
    assert 0.0 <= float(loss) < 1e-30


# ----------------------------------------------------------------------------- label smoothing


def test_label_smoothing_mixes_both_directions():
    uc, ur = jnp.array([1.0, -2.0]), jnp.array([0.0, 0.5])
    eps = 0.2
    got = D.sigmoid_loss(uc, ur, beta=1.0, label_smoothing=eps)
    for i, h in enumerate((1.0, -2.5)):
        want = -(1 - eps) * logsig(h) - eps * logsig(-h)
        assert float(got[i]) == pytest.approx(want, rel=1e-6)
    # robust with eps=0 is plain DPO
    np.testing.assert_allclose(
        np.asarray(D.robust_loss(uc, ur, beta=1.0, label_smoothing=0.0)),
        [-logsig(1.0), -logsig(-2.5)],
        rtol=1e-6,
    )
    # cDPO is bounded below by the entropy of the smoothed label (minimum at sigma(h)=1-eps)
    h_star = math.log((1 - eps) / eps)
    at_min = D.sigmoid_loss(jnp.array([h_star]), jnp.zeros((1,)), beta=1.0, label_smoothing=eps)
    entropy = -(1 - eps) * math.log(1 - eps) - eps * math.log(eps)
    assert float(at_min[0]) == pytest.approx(entropy, rel=1e-6)


# ----------------------------------------------------------------------------- combiner


def test_weighted_combination_and_per_type_metrics():
    cfg = DPOLossConfig(
        loss_type=("sigmoid", "hinge", "ipo"), loss_weights=(1.0, 0.5, 2.0), beta=0.3
    )
    loss, m = dpo_loss(cfg, *_arrays(BATCH))
    parts = {t: _math_mean(t, cfg) for t in cfg.loss_type}
    want = parts["sigmoid"] + 0.5 * parts["hinge"] + 2.0 * parts["ipo"]
    assert float(loss) == pytest.approx(want, rel=1e-5)
    for t in cfg.loss_type:
        assert float(m[f"loss/{t}"]) == pytest.approx(parts[t], rel=1e-5)
    # default weights are all 1
    unweighted = DPOLossConfig(loss_type=("sigmoid", "hinge", "ipo"), beta=0.3)
    loss1, _ = dpo_loss(unweighted, *_arrays(BATCH))
    assert float(loss1) == pytest.approx(sum(parts.values()), rel=1e-5)
    # a single type logs no per-type component
    _, m1 = dpo_loss(DPOLossConfig(beta=0.3), *_arrays(BATCH))
    assert not any(k.startswith("loss/") for k in m1)


def test_rpo_is_sigmoid_plus_alpha_times_chosen_nll():
    alpha, beta = 0.7, 0.3
    cfg = DPOLossConfig(loss_type=("sigmoid", "sft"), loss_weights=(1.0, alpha), beta=beta)
    c, r, rc, rr, lc, lr = _arrays(BATCH)
    loss, m = dpo_loss(cfg, c, r, rc, rr, lc, lr)
    n = 3
    lcs = [max(x, 1.0) for x in BATCH["lc"]]
    hs = [(BATCH["c"][i] - BATCH["rc"][i]) - (BATCH["r"][i] - BATCH["rr"][i]) for i in range(n)]
    dpo = sum(-logsig(beta * h) for h in hs) / n
    nll = sum(-BATCH["c"][i] / lcs[i] for i in range(n)) / n
    assert float(loss) == pytest.approx(dpo + alpha * nll, rel=1e-5)
    assert float(m["loss/sigmoid"]) == pytest.approx(dpo, rel=1e-5)
    assert float(m["loss/sft"]) == pytest.approx(nll, rel=1e-5)
    # d loss / d c_i = (-beta * sigma(-beta h_i) - alpha / L_c,i) / B
    g = jax.grad(lambda c: dpo_loss(cfg, c, r, rc, rr, lc, lr)[0])(c)
    want = [(-beta * sig(-beta * hs[i]) - alpha / lcs[i]) / n for i in range(n)]
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5)
    assert needs_reference(cfg)


def test_reward_metrics_with_reference():
    beta = 0.3
    _, m = dpo_loss(DPOLossConfig(beta=beta), *_arrays(BATCH))
    uc = [BATCH["c"][i] - BATCH["rc"][i] for i in range(3)]  # 0.5, 0, 0.5
    ur = [BATCH["r"][i] - BATCH["rr"][i] for i in range(3)]  # -1, 1, -1
    assert float(m["rewards/chosen"]) == pytest.approx(beta * sum(uc) / 3, rel=1e-6)
    assert float(m["rewards/rejected"]) == pytest.approx(beta * sum(ur) / 3, rel=1e-6)
    assert float(m["rewards/margins"]) == pytest.approx(beta * (sum(uc) - sum(ur)) / 3, rel=1e-6)
    assert float(m["rewards/accuracies"]) == pytest.approx(2 / 3)
    assert float(m["logps/chosen"]) == pytest.approx(-10 / 3, rel=1e-6)
    assert float(m["logps/rejected"]) == pytest.approx(-4.0, rel=1e-6)


def test_reward_metrics_reference_free_use_length_averaged_policy_logps():
    beta = 2.0
    cfg = DPOLossConfig(loss_type=("simpo", "orpo"), beta=beta)
    assert not needs_reference(cfg)
    c, r, _, _, lc, lr = _arrays(BATCH)
    _, m = dpo_loss(cfg, c, r, None, None, lc, lr)
    a = [-1.5, -5 / 3, -2.0]  # c / max(L_c, 1)
    b = [-1.0, -2.0, -3.0]  # r / max(L_r, 1)
    assert float(m["rewards/chosen"]) == pytest.approx(beta * sum(a) / 3, rel=1e-6)
    assert float(m["rewards/rejected"]) == pytest.approx(beta * sum(b) / 3, rel=1e-6)
    assert float(m["rewards/accuracies"]) == pytest.approx(2 / 3)
    # ORPO extras with TRL's names
    log_odds = [
        (a[i] - b[i]) - (math.log(1 - math.exp(a[i])) - math.log(1 - math.exp(b[i])))
        for i in range(3)
    ]
    assert float(m["log_odds_chosen"]) == pytest.approx(sum(log_odds) / 3, rel=1e-5)
    assert float(m["log_odds_ratio"]) == pytest.approx(sum(map(logsig, log_odds)) / 3, rel=1e-5)
    assert float(m["nll_loss"]) == pytest.approx(-sum(a) / 3, rel=1e-6)
    # references, when passed anyway, are ignored by reference-free configs
    _, m2 = dpo_loss(cfg, *_arrays(BATCH))
    assert float(m2["rewards/chosen"]) == float(m["rewards/chosen"])


def test_needs_reference():
    assert needs_reference(DPOLossConfig())
    assert not needs_reference(DPOLossConfig(loss_type=("sft",)))
    assert not needs_reference(DPOLossConfig(loss_type=REF_FREE))
    assert needs_reference(DPOLossConfig(loss_type=("simpo", "hinge")))


def test_jit_matches_eager_for_every_type_mixed():
    cfg = DPOLossConfig(
        loss_type=ALL_TYPES,
        loss_weights=tuple(0.1 * (i + 1) for i in range(len(ALL_TYPES))),
        beta=0.3,
        label_smoothing=0.05,
    )
    args = _arrays(BATCH)
    eager_loss, eager_m = dpo_loss(cfg, *args, bco_delta=0.1)
    jit_fn = jax.jit(dpo_loss, static_argnums=0)
    jit_loss, jit_m = jit_fn(cfg, *args, bco_delta=0.1)
    want = sum(
        w * _math_mean(t, cfg, delta=0.1) for t, w in zip(cfg.loss_type, cfg.weights, strict=True)
    )
    assert float(eager_loss) == pytest.approx(want, rel=1e-5)
    assert float(jit_loss) == pytest.approx(float(eager_loss), rel=1e-6)
    assert set(jit_m) == set(eager_m)
    for k in eager_m:
        assert float(jit_m[k]) == pytest.approx(float(eager_m[k]), rel=1e-5, abs=1e-7), k
    g_eager = jax.grad(lambda c: dpo_loss(cfg, c, *args[1:])[0])(args[0])
    g_jit = jax.jit(jax.grad(lambda c: dpo_loss(cfg, c, *args[1:])[0]))(args[0])
    np.testing.assert_allclose(np.asarray(g_jit), np.asarray(g_eager), rtol=1e-5)


def test_bf16_inputs_are_computed_in_fp32():
    args = [a.astype(jnp.bfloat16) for a in _arrays(BATCH)]
    loss, m = dpo_loss(DPOLossConfig(beta=0.3), *args)
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(_math_mean("sigmoid", DPOLossConfig(beta=0.3)), rel=1e-5)


# ----------------------------------------------------------------------------- validation


def test_config_normalizes_lists_and_strings():
    cfg = DPOLossConfig(loss_type="ipo")
    assert cfg.loss_type == ("ipo",) and cfg.weights == (1.0,)
    cfg = DPOLossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1, 2])
    assert cfg.loss_type == ("sigmoid", "sft") and cfg.loss_weights == (1.0, 2.0)
    hash(cfg)  # usable as a static jit argument


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type=("sigmoid", "dpoo", "kto")), r"\['dpoo', 'kto'\].*valid types"),
        (dict(loss_type=()), "empty"),
        (dict(loss_type=("sigmoid", "sigmoid")), "more than once"),
        (dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0,)), "1 weight.*2 loss type"),
        (dict(loss_weights=(float("nan"),)), "finite"),
        (dict(beta=0.0), "beta"),
        (dict(beta=float("inf")), "beta"),
        (dict(label_smoothing=0.5), r"\[0, 0.5\)"),
        (dict(label_smoothing=-0.1), r"\[0, 0.5\)"),
        (dict(loss_type=("exo_pair",)), "exo_pair"),
        (dict(loss_type=("hinge", "ipo"), label_smoothing=0.1), "no effect"),
        (dict(loss_type=("orpo",), orpo_lambda=-1.0), "orpo_lambda"),
        (dict(loss_type=("simpo",), simpo_gamma=float("nan")), "simpo_gamma"),
    ],
)
def test_config_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOLossConfig(**kwargs)


def test_missing_reference_and_shape_errors():
    c, r, rc, rr, lc, lr = _arrays(BATCH)
    with pytest.raises(ValueError, match=r"ref_chosen_logps.*\['sigmoid'\]"):
        dpo_loss(DPOLossConfig(loss_type=("sigmoid", "sft")), c, r, None, rr, lc, lr)
    with pytest.raises(ValueError, match="rejected_logps"):
        dpo_loss(DPOLossConfig(), c, r[:2], rc, rr, lc, lr)
    with pytest.raises(ValueError, match=r"ref_chosen_logps.*\(B,\)"):
        dpo_loss(DPOLossConfig(), c, r, rc[:, None], rr, lc, lr)
