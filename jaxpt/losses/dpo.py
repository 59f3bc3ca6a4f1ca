r"""Pairwise preference losses (DPO family, SimPO, ORPO) on per-sequence log-probs.

Axis legend:
  B  preference pairs in the batch (one chosen + one rejected completion each)

Every input is a per-sequence quantity of shape (B,):
  chosen_logps / rejected_logps          policy log p(completion | prompt), SUMMED over the
                                         completion tokens (fp32 log-softmax upstream)
  ref_chosen_logps / ref_rejected_logps  the same under the frozen reference model
                                         (None for reference-free loss types)
  chosen_lengths / rejected_lengths      number of completion tokens (for length
                                         normalization); clipped to >= 1 everywhere

Notation used in the docstrings (all per pair, shape (B,)):
  c, r      = chosen_logps, rejected_logps
  L_c, L_r  = max(chosen_lengths, 1), max(rejected_lengths, 1)
  a, b      = c / L_c, r / L_r                 (length-averaged policy log-probs)
  u_c, u_r  = c - ref_c, r - ref_r             (policy/reference log-ratios)
  h         = u_c - u_r                         (the DPO "logits")
  σ, logσ   = sigmoid, log-sigmoid (``jax.nn.log_sigmoid``, stable for any argument)
  ε         = label_smoothing,  β = beta

Each ``*_loss`` function returns the per-pair loss (B,) and is a pure jnp function
(no Python control flow on traced values). ``dpo_loss`` combines loss types as TRL 1.16's
``DPOTrainer`` does: ``loss = Σ_k w_k · mean_B(loss_k)``.

Definitions follow TRL 1.16 (``trl/trainer/dpo_trainer.py``, ``experimental/cpo``,
``experimental/orpo``) with these documented differences:
  * ``sigmoid`` takes ``label_smoothing`` (conservative DPO / cDPO, as TRL's DPOTrainer did
    before 1.x); with ε = 0 it is exactly TRL 1.16's sigmoid loss.
  * ``bco_pair`` takes an explicit reward shift δ (older TRL used a running mean of the
    rewards; TRL 1.16 uses δ = 0, our default).
  * ``sft`` is the per-pair token-mean NLL of the chosen completion, ``-c / L_c``, averaged
    over pairs. TRL 1.16's DPO ``sft`` term is the token mean over the whole batch
    (``Σ -c / Σ L_c``); both agree when all chosen completions have the same length.
  * ``orpo``'s NLL term is over the chosen completion tokens only (the loss never sees the
    prompt); TRL's ORPOTrainer takes it over prompt + completion.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp

__all__ = [
    "LOSS_TYPES",
    "REFERENCE_FREE_LOSS_TYPES",
    "LABEL_SMOOTHING_LOSS_TYPES",
    "DPOLossConfig",
    "dpo_loss",
    "needs_reference",
    "sigmoid_loss",
    "hinge_loss",
    "ipo_loss",
    "robust_loss",
    "exo_pair_loss",
    "nca_pair_loss",
    "bco_pair_loss",
    "sppo_hard_loss",
    "apo_zero_loss",
    "apo_down_loss",
    "sigmoid_norm_loss",
    "chosen_nll_loss",
    "simpo_loss",
    "orpo_log_odds",
    "orpo_loss",
]

LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "sigmoid_norm",
    "sft",
    "simpo",
    "orpo",
)
REFERENCE_FREE_LOSS_TYPES: frozenset[str] = frozenset({"sft", "simpo", "orpo"})
LABEL_SMOOTHING_LOSS_TYPES: frozenset[str] = frozenset({"sigmoid", "robust", "exo_pair", "simpo"})

# Length-averaged log-probs are clipped to <= -_ORPO_MAX_AVG_LOGP inside the odds term so that
# log(1 - exp(x)) stays finite (and its gradient too) when a completion has probability ~1.
_ORPO_MAX_AVG_LOGP = 1e-6


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _len(lengths) -> jax.Array:
    return jnp.maximum(_f32(lengths), 1.0)


def _smoothed_logistic(z: jax.Array, label_smoothing) -> jax.Array:
    """-(1-ε)·logσ(z) - ε·logσ(-z)."""
    eps = _f32(label_smoothing)
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


# ------------------------------------------------------------------ reference-based losses


def sigmoid_loss(chosen_logratios, rejected_logratios, *, beta, label_smoothing=0.0) -> jax.Array:
    r"""DPO (Rafailov et al. 2023), conservative with label smoothing (cDPO).

    ``loss = -(1-ε)·logσ(β·h) - ε·logσ(-β·h)`` per pair, with ``h = u_c - u_r``.
    ε = 0 is plain DPO (TRL 1.16 ``loss_type="sigmoid"``); at h = 0 the loss is log 2.
    """
    h = _f32(chosen_logratios) - _f32(rejected_logratios)
    return _smoothed_logistic(beta * h, label_smoothing)


def hinge_loss(chosen_logratios, rejected_logratios, *, beta) -> jax.Array:
    r"""SLiC hinge: ``loss = max(0, 1 - β·h)`` per pair."""
    h = _f32(chosen_logratios) - _f32(rejected_logratios)
    return jax.nn.relu(1.0 - beta * h)


def ipo_loss(
    chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, *, beta
) -> jax.Array:
    r"""IPO (Azar et al. 2023, eq. 17) on length-normalized log-ratios, as TRL.

    ``loss = (u_c/L_c - u_r/L_r - 1/(2β))²`` per pair; β is the paper's τ.
    """
    d = _f32(chosen_logratios) / _len(chosen_lengths) - _f32(rejected_logratios) / _len(
        rejected_lengths
    )
    return (d - 1.0 / (2.0 * beta)) ** 2


def robust_loss(chosen_logratios, rejected_logratios, *, beta, label_smoothing) -> jax.Array:
    r"""Robust DPO (Chowdhury et al. 2024): unbiased under label-flip probability ε < 1/2.

    ``loss = (-(1-ε)·logσ(β·h) + ε·logσ(-β·h)) / (1 - 2ε)`` per pair.
    """
    z = beta * (_f32(chosen_logratios) - _f32(rejected_logratios))
    eps = _f32(label_smoothing)
    return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def exo_pair_loss(chosen_logratios, rejected_logratios, *, beta, label_smoothing) -> jax.Array:
    r"""EXO-pref (Ji et al. 2024, eq. 16): KL(softmax(β·u) || [1-ε, ε]) over {chosen, rejected}.

    With ``z = β·h``:
    ``loss = σ(z)·(logσ(z) - log(1-ε)) + σ(-z)·(logσ(-z) - log ε)`` per pair (needs 0 < ε < 1).
    """
    z = beta * (_f32(chosen_logratios) - _f32(rejected_logratios))
    eps = _f32(label_smoothing)
    return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - jnp.log(eps)
    )


def nca_pair_loss(chosen_logratios, rejected_logratios, *, beta) -> jax.Array:
    r"""NCA (Chen et al. 2024), pairwise.

    ``loss = -logσ(β·u_c) - ½·logσ(-β·u_c) - ½·logσ(-β·u_r)`` per pair.
    """
    zc = beta * _f32(chosen_logratios)
    zr = beta * _f32(rejected_logratios)
    return -jax.nn.log_sigmoid(zc) - 0.5 * jax.nn.log_sigmoid(-zc) - 0.5 * jax.nn.log_sigmoid(-zr)


def bco_pair_loss(chosen_logratios, rejected_logratios, *, beta, delta=0.0) -> jax.Array:
    r"""BCO (Jung et al. 2024), pairwise.

    ``loss = -logσ(β·u_c - δ) - logσ(-(β·u_r - δ))`` per pair.

    δ is the reward shift: the paper (and TRL before 1.x) uses a running mean over training
    of the batch rewards ``mean(concat(β·u_c, β·u_r))``, which the caller can keep from the
    ``rewards/chosen`` and ``rewards/rejected`` metrics and pass in. TRL 1.16 uses δ = 0,
    the default here.
    """
    zc = beta * _f32(chosen_logratios) - _f32(delta)
    zr = beta * _f32(rejected_logratios) - _f32(delta)
    return -jax.nn.log_sigmoid(zc) - jax.nn.log_sigmoid(-zr)


def sppo_hard_loss(chosen_logratios, rejected_logratios, *, beta) -> jax.Array:
    r"""SPPO (Wu et al. 2024) with hard win probabilities (1 for chosen, 0 for rejected).

    ``loss = (u_c - 1/(2β))² + (u_r + 1/(2β))²`` per pair.
    """
    half = 0.5 / beta
    return (_f32(chosen_logratios) - half) ** 2 + (_f32(rejected_logratios) + half) ** 2


def apo_zero_loss(chosen_logratios, rejected_logratios, *, beta) -> jax.Array:
    r"""APO-zero (D'Oosterlinck et al. 2024, eq. 7): raise chosen, lower rejected likelihood.

    ``loss = (1 - σ(β·u_c)) + σ(β·u_r)`` per pair (computed as ``σ(-β·u_c) + σ(β·u_r)``).
    """
    return jax.nn.sigmoid(-beta * _f32(chosen_logratios)) + jax.nn.sigmoid(
        beta * _f32(rejected_logratios)
    )


def apo_down_loss(chosen_logratios, rejected_logratios, *, beta) -> jax.Array:
    r"""APO-down (D'Oosterlinck et al. 2024, eq. 8): lower both, rejected more.

    ``loss = σ(β·u_c) + (1 - σ(β·h))`` per pair (computed as ``σ(β·u_c) + σ(-β·h)``).
    """
    uc = _f32(chosen_logratios)
    h = uc - _f32(rejected_logratios)
    return jax.nn.sigmoid(beta * uc) + jax.nn.sigmoid(-beta * h)


def sigmoid_norm_loss(
    chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, *, beta
) -> jax.Array:
    r"""Length-normalized DPO: ``loss = -logσ(β·(u_c/L_c - u_r/L_r))`` per pair."""
    d = _f32(chosen_logratios) / _len(chosen_lengths) - _f32(rejected_logratios) / _len(
        rejected_lengths
    )
    return -jax.nn.log_sigmoid(beta * d)


# ------------------------------------------------------------------ reference-free losses


def chosen_nll_loss(chosen_logps, chosen_lengths) -> jax.Array:
    r"""NLL of the chosen completion (TRL ``loss_type="sft"``; with ``sigmoid`` it makes RPO).

    ``loss = -c / L_c`` per pair (token-mean NLL of each chosen completion).
    """
    return -_f32(chosen_logps) / _len(chosen_lengths)


def simpo_loss(
    chosen_logps,
    rejected_logps,
    chosen_lengths,
    rejected_lengths,
    *,
    beta,
    gamma,
    label_smoothing=0.0,
) -> jax.Array:
    r"""SimPO (Meng et al. 2024), as TRL's ``CPOTrainer(loss_type="simpo")`` (reference-free).

    With ``z = β·(a - b) - γ`` (γ is TRL's ``simpo_gamma``, the target reward margin):
    ``loss = -(1-ε)·logσ(z) - ε·logσ(-z)`` per pair. TRL writes z as
    ``β·((a - b) - γ/β)``, the same number.
    """
    z = beta * (
        _f32(chosen_logps) / _len(chosen_lengths) - _f32(rejected_logps) / _len(rejected_lengths)
    ) - _f32(gamma)
    return _smoothed_logistic(z, label_smoothing)


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, branching at -log 2; both branches see safe inputs."""
    cut = -math.log(2.0)
    small = x < cut
    x_small = jnp.where(small, x, cut - 1.0)
    x_big = jnp.where(small, cut / 2.0, x)
    return jnp.where(small, jnp.log1p(-jnp.exp(x_small)), jnp.log(-jnp.expm1(x_big)))


def orpo_log_odds(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths) -> jax.Array:
    r"""ORPO log odds ratio (Hong et al. 2024, eqs. 4 and 7) on length-averaged log-probs.

    ``log_odds = (a - b) - (log(1 - e^a) - log(1 - e^b))`` per pair, i.e.
    ``log odds(y_w) - log odds(y_l)`` with ``odds(y) = P/(1-P)`` and ``log P = a`` (resp. b).
    ``a`` and ``b`` are clipped to ``<= -1e-6`` (probability ``<= 1 - 1e-6``) so the value
    and its gradient stay finite when a completion has probability ~1.
    """
    a = jnp.minimum(_f32(chosen_logps) / _len(chosen_lengths), -_ORPO_MAX_AVG_LOGP)
    b = jnp.minimum(_f32(rejected_logps) / _len(rejected_lengths), -_ORPO_MAX_AVG_LOGP)
    return (a - b) - (_log1mexp(a) - _log1mexp(b))


def orpo_loss(
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, orpo_lambda
) -> jax.Array:
    r"""ORPO (Hong et al. 2024), reference-free, as TRL's ``ORPOTrainer``.

    ``loss = -a + λ·(-logσ(log_odds))`` per pair: token-mean NLL of the chosen completion
    plus the odds-ratio term (see ``orpo_log_odds``). λ is TRL's ``ORPOConfig.beta``.
    """
    nll = chosen_nll_loss(chosen_logps, chosen_lengths)
    log_odds = orpo_log_odds(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)
    return nll - _f32(orpo_lambda) * jax.nn.log_sigmoid(log_odds)


# ------------------------------------------------------------------ combiner


def _as_tuple(value, field: str) -> tuple:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence):
        return tuple(value)
    raise TypeError(f"DPOLossConfig.{field} must be a string or a sequence, got {type(value)!r}")


@dataclass(frozen=True)
class DPOLossConfig:
    """Which preference losses to combine and their hyper-parameters (static under jit).

    Attributes:
      loss_type: loss names from ``LOSS_TYPES`` (TRL's ``loss_type``). Several names are
        combined as ``Σ_k w_k · mean_B(loss_k)``; ``("sigmoid", "sft")`` with weights
        ``(1, α)`` is RPO. A single string is accepted and wrapped.
      loss_weights: one weight per loss type (TRL's ``loss_weights``); None = all 1.0.
      beta: β of every reference-based loss and of SimPO (TRL's ``beta``, default 0.1); for
        ``ipo`` it is the paper's τ. It also scales the logged rewards.
      label_smoothing: ε (TRL's ``label_smoothing``); used by ``sigmoid`` (cDPO), ``robust``
        (label-flip rate), ``exo_pair`` (must be > 0) and ``simpo`` (as TRL's CPO). Must be in
        [0, 0.5), and 0 unless one of those types is selected (it would be ignored).
      simpo_gamma: γ, SimPO's target reward margin (TRL's ``CPOConfig.simpo_gamma``, 0.5).
      orpo_lambda: λ, weight of ORPO's odds-ratio term. TRL's ``ORPOConfig`` calls this
        ``beta`` (default 0.1); we keep it separate from ``beta`` so that ORPO can be mixed with
        β-based losses, with the same default 0.1. ``ORPOConfig(beta=x)`` == ``orpo_lambda=x``.
    """

    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1

    def __post_init__(self):
        types = _as_tuple(self.loss_type, "loss_type")
        object.__setattr__(self, "loss_type", types)
        if not types:
            raise ValueError(f"DPOLossConfig.loss_type is empty; choose from {list(LOSS_TYPES)}")
        unknown = [t for t in types if t not in LOSS_TYPES]
        if unknown:
            close = [m for t in unknown for m in difflib.get_close_matches(str(t), LOSS_TYPES, 1)]
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(
                f"DPOLossConfig.loss_type: unknown loss type(s) {unknown}{hint}; "
                f"valid types are {list(LOSS_TYPES)}"
            )
        dupes = sorted({t for t in types if types.count(t) > 1})
        if dupes:
            raise ValueError(
                f"DPOLossConfig.loss_type lists {dupes} more than once; give each type once and "
                "use loss_weights to scale it"
            )
        if self.loss_weights is not None:
            weights = tuple(float(w) for w in _as_tuple(self.loss_weights, "loss_weights"))
            if len(weights) != len(types):
                raise ValueError(
                    f"DPOLossConfig.loss_weights has {len(weights)} weight(s) for "
                    f"{len(types)} loss type(s) {list(types)}; give one weight per loss type"
                )
            bad = [w for w in weights if not math.isfinite(w)]
            if bad:
                raise ValueError(f"DPOLossConfig.loss_weights must be finite, got {list(weights)}")
            object.__setattr__(self, "loss_weights", weights)
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"DPOLossConfig.beta must be a finite number > 0, got {self.beta}")
        eps = self.label_smoothing
        if not (0.0 <= eps < 0.5):
            raise ValueError(
                f"DPOLossConfig.label_smoothing must lie in [0, 0.5), got {eps} "
                "(it is the probability that a preference label is flipped)"
            )
        if "exo_pair" in types and eps == 0.0:
            raise ValueError(
                "DPOLossConfig.label_smoothing must be > 0 for loss_type 'exo_pair' "
                "(EXO's ε; the paper recommends 1e-3)"
            )
        if eps > 0.0 and not (set(types) & LABEL_SMOOTHING_LOSS_TYPES):
            raise ValueError(
                f"DPOLossConfig.label_smoothing={eps} has no effect on loss types {list(types)}; "
                f"only {sorted(LABEL_SMOOTHING_LOSS_TYPES)} use it. Set it to 0."
            )
        if not math.isfinite(self.simpo_gamma):
            raise ValueError(f"DPOLossConfig.simpo_gamma must be finite, got {self.simpo_gamma}")
        if not (math.isfinite(self.orpo_lambda) and self.orpo_lambda >= 0):
            raise ValueError(
                f"DPOLossConfig.orpo_lambda must be a finite number >= 0, got {self.orpo_lambda}"
            )

    @property
    def weights(self) -> tuple[float, ...]:
        """Loss weights with the default (all 1.0) filled in."""
        if self.loss_weights is None:
            return (1.0,) * len(self.loss_type)
        return self.loss_weights


def needs_reference(cfg: DPOLossConfig) -> bool:
    """True unless every selected loss type is reference-free (``sft``, ``simpo``, ``orpo``)."""
    return not set(cfg.loss_type) <= REFERENCE_FREE_LOSS_TYPES


def _per_pair_loss(cfg: DPOLossConfig, loss_type: str, x: dict, bco_delta) -> jax.Array:
    beta, eps = cfg.beta, cfg.label_smoothing
    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        c, r, lc, lr = x["c"], x["r"], x["lc"], x["lr"]
        if loss_type == "sft":
            return chosen_nll_loss(c, lc)
        if loss_type == "simpo":
            return simpo_loss(c, r, lc, lr, beta=beta, gamma=cfg.simpo_gamma, label_smoothing=eps)
        return orpo_loss(c, r, lc, lr, orpo_lambda=cfg.orpo_lambda)
    uc, ur = x["uc"], x["ur"]
    if loss_type == "sigmoid":
        return sigmoid_loss(uc, ur, beta=beta, label_smoothing=eps)
    if loss_type == "hinge":
        return hinge_loss(uc, ur, beta=beta)
    if loss_type == "ipo":
        return ipo_loss(uc, ur, x["lc"], x["lr"], beta=beta)
    if loss_type == "robust":
        return robust_loss(uc, ur, beta=beta, label_smoothing=eps)
    if loss_type == "exo_pair":
        return exo_pair_loss(uc, ur, beta=beta, label_smoothing=eps)
    if loss_type == "nca_pair":
        return nca_pair_loss(uc, ur, beta=beta)
    if loss_type == "bco_pair":
        return bco_pair_loss(uc, ur, beta=beta, delta=bco_delta)
    if loss_type == "sppo_hard":
        return sppo_hard_loss(uc, ur, beta=beta)
    if loss_type == "apo_zero":
        return apo_zero_loss(uc, ur, beta=beta)
    if loss_type == "apo_down":
        return apo_down_loss(uc, ur, beta=beta)
    if loss_type == "sigmoid_norm":
        return sigmoid_norm_loss(uc, ur, x["lc"], x["lr"], beta=beta)
    raise ValueError(f"unknown loss type {loss_type!r}; valid types are {list(LOSS_TYPES)}")


def _check_inputs(named: dict[str, jax.Array]) -> None:
    shape = None
    for name, value in named.items():
        if value.ndim != 1:
            raise ValueError(
                f"dpo_loss: `{name}` must have shape (B,) (one value per preference pair), "
                f"got shape {value.shape}"
            )
        if shape is None:
            shape = value.shape
        elif value.shape != shape:
            first = next(iter(named))
            raise ValueError(
                f"dpo_loss: `{name}` has shape {value.shape} but `{first}` has shape {shape}; "
                "all inputs must have the same batch dimension B"
            )


def dpo_loss(
    cfg: DPOLossConfig,
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    *,
    bco_delta=0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Weighted sum of preference losses and TRL-named metrics.

    ``loss = Σ_k w_k · (1/B)·Σ_b loss_k[b]`` over ``cfg.loss_type`` / ``cfg.weights``: each
    type's per-pair loss is averaged over the B pairs of this batch (so equal-size
    micro-batches average to the full-batch loss), then weighted and summed.

    Args:
      cfg: static config (hashable: pass it as a static argument under ``jax.jit``).
      chosen_logps, rejected_logps: (B,) policy log-probs summed over completion tokens.
      ref_chosen_logps, ref_rejected_logps: (B,) reference log-probs, or None when
        ``needs_reference(cfg)`` is False (they are ignored then).
      chosen_lengths, rejected_lengths: (B,) completion token counts (clipped to >= 1).
      bco_delta: δ of ``bco_pair`` (scalar, may be traced); see ``bco_pair_loss``.

    Returns:
      ``(loss, metrics)`` with scalar metrics (batch means, gradient-stopped):
        ``loss``;
        ``rewards/chosen``, ``rewards/rejected``: mean of ``β·(c - ref_c)`` and
          ``β·(r - ref_r)`` when the config needs a reference (TRL's DPOTrainer). When every
          type is reference-free they are ``β·a`` and ``β·b`` (β times the length-averaged
          policy log-probs, as TRL's CPO(SimPO) and ORPO log them);
        ``rewards/accuracies``: fraction of pairs with chosen reward > rejected reward;
        ``rewards/margins``: mean of chosen minus rejected reward;
        ``logps/chosen``, ``logps/rejected``: mean summed policy log-probs;
        ``loss/<type>``: each type's unweighted batch-mean loss, when more than one type;
        ``nll_loss``, ``log_odds_ratio`` (mean ``logσ(log_odds)``) and ``log_odds_chosen``
          (mean ``log_odds``): when ``orpo`` is selected, with TRL ORPOTrainer's names.
    """
    c, r = _f32(chosen_logps), _f32(rejected_logps)
    lc, lr = _len(chosen_lengths), _len(rejected_lengths)
    named = {
        "chosen_logps": c,
        "rejected_logps": r,
        "chosen_lengths": lc,
        "rejected_lengths": lr,
    }
    x = {"c": c, "r": r, "lc": lc, "lr": lr}
    use_ref = needs_reference(cfg)
    if use_ref:
        refs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
        missing = [n for n, v in refs.items() if v is None]
        if missing:
            ref_types = [t for t in cfg.loss_type if t not in REFERENCE_FREE_LOSS_TYPES]
            raise ValueError(
                f"dpo_loss: {missing} is None but loss type(s) {ref_types} need reference "
                f"log-probs; only {sorted(REFERENCE_FREE_LOSS_TYPES)} are reference-free"
            )
        named["ref_chosen_logps"] = _f32(ref_chosen_logps)
        named["ref_rejected_logps"] = _f32(ref_rejected_logps)
    _check_inputs(named)
    if use_ref:
        x["uc"], x["ur"] = c - named["ref_chosen_logps"], r - named["ref_rejected_logps"]

    sg = jax.lax.stop_gradient
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    for loss_type, weight in zip(cfg.loss_type, cfg.weights, strict=True):
        per_type = jnp.mean(_per_pair_loss(cfg, loss_type, x, bco_delta))
        total = total + weight * per_type
        if len(cfg.loss_type) > 1:
            metrics[f"loss/{loss_type}"] = sg(per_type)

    if use_ref:
        chosen_rewards, rejected_rewards = cfg.beta * x["uc"], cfg.beta * x["ur"]
    else:
        chosen_rewards, rejected_rewards = cfg.beta * c / lc, cfg.beta * r / lr
    chosen_rewards, rejected_rewards = sg(chosen_rewards), sg(rejected_rewards)
    metrics.update(
        {
            "loss": sg(total),  # same value as the returned loss, without its gradient
            "rewards/chosen": jnp.mean(chosen_rewards),
            "rewards/rejected": jnp.mean(rejected_rewards),
            "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
            "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
            "logps/chosen": jnp.mean(sg(c)),
            "logps/rejected": jnp.mean(sg(r)),
        }
    )
    if "orpo" in cfg.loss_type:
        log_odds = sg(orpo_log_odds(c, r, lc, lr))
        metrics["nll_loss"] = jnp.mean(sg(chosen_nll_loss(c, lc)))
        metrics["log_odds_ratio"] = jnp.mean(jax.nn.log_sigmoid(log_odds))
        metrics["log_odds_chosen"] = jnp.mean(log_odds)
    return total, metrics
