"""KTO (Kahneman-Tversky Optimization) on unpaired rows: one completion per row, labelled
desirable or undesirable, against a frozen reference.

Axis legend: B rows of the call (a micro-batch).

Follows TRL's ``KTOTrainer._compute_loss`` (trl/trainer/kto_trainer.py, TRL 1.10): with
``r = log pi(y|x) - log pi_ref(y|x)`` (summed over the completion tokens) and the reference
point ``z0 = max(0, mean_B(log pi(y'|x) - log pi_ref(y'|x)))`` estimated from mismatched
pairs (x paired with another row's completion y'), detached,

    desirable:   loss = desirable_weight   * (1 - sigmoid(beta * (r - z0)))   (paper Eq. 7)
    undesirable: loss = undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

and ``apo_zero_unpaired`` (APO-zero, unpaired; no reference point): ``1 - sigmoid(beta * r)``
and ``sigmoid(beta * r)``. The loss is the mean over the rows (TRL's ``losses.nanmean()``).

TRL takes z0 per device batch, gathered and averaged across processes; here the mean runs
over every row of the call (a global mean under jit, whatever the sharding), so one call
per optimizer step (``grad_accum`` 1) is TRL's number on any mesh, and each of k
micro-batches gets its own z0 as each of TRL's accumulation steps does.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclasses.dataclass(frozen=True)
class KTOLossConfig:
    """TRL ``KTOConfig`` names and defaults: ``beta`` 0.1, ``desirable_weight`` and
    ``undesirable_weight`` 1.0, ``loss_type`` "kto"."""

    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: {self.loss_type!r}; use one of {list(LOSS_TYPES)}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta: must be a finite number > 0, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            w = getattr(self, name)
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"{name}: must be a finite number >= 0, got {w}")

    @property
    def uses_kl(self) -> bool:
        return self.loss_type == "kto"


def kl_reference_point(kl_logps_B, ref_kl_logps_B) -> jax.Array:
    """z0 = max(0, mean(policy - reference log-probs of the mismatched pairs)), detached."""
    diff = jnp.asarray(kl_logps_B, jnp.float32) - jnp.asarray(ref_kl_logps_B, jnp.float32)
    return jax.lax.stop_gradient(jnp.maximum(jnp.mean(diff), 0.0))


def kto_loss(
    cfg: KTOLossConfig,
    logps_B,
    ref_logps_B,
    label_B,
    kl_logps_B=None,
    ref_kl_logps_B=None,
    *,
    num_rows=None,
    num_desirable=None,
    num_undesirable=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KTO loss of B rows and TRL-named metrics (module doc for the formula).

    Args:
      logps_B, ref_logps_B: policy / reference log-probs summed over each completion.
      label_B: 1 (or True) for desirable rows, 0 for undesirable ones.
      kl_logps_B, ref_kl_logps_B: the same for each row's mismatched pair (x_i, y'_i); needed
        by ``kto`` (its z0), unused by ``apo_zero_unpaired`` (z0 = 0, as TRL).
      num_rows, num_desirable, num_undesirable: whole-batch counts to normalize by (default:
        this call's), so that the calls on the micro-batches of a step sum to the step's mean
        loss and metrics.

    Returns ``(loss, metrics)``: ``loss`` = sum of the weighted per-row losses / num_rows;
    metrics (gradient-stopped) ``kl`` (z0, times B / num_rows so micro-batches sum to their
    mean), ``rewards/chosen`` / ``rewards/rejected`` (beta * r summed over desirable /
    undesirable rows / their counts), ``rewards/margins`` (chosen minus rejected),
    ``logps/chosen`` / ``logps/rejected`` (same means of the policy log-probs),
    ``count/chosen`` / ``count/rejected`` (this call's rows of each label).
    """
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    logps, ref = f32(logps_B), f32(ref_logps_B)
    desirable = f32(label_B) > 0.5
    if logps.ndim != 1 or logps.shape != ref.shape or logps.shape != desirable.shape:
        raise ValueError(
            f"kto_loss: logps {logps.shape}, ref_logps {ref.shape} and label {desirable.shape} "
            "must all have shape (B,)"
        )
    B = logps.shape[0]
    if cfg.uses_kl:
        if kl_logps_B is None or ref_kl_logps_B is None:
            raise ValueError("kto_loss: loss_type 'kto' needs kl_logps and ref_kl_logps (the "
                             "mismatched pairs' log-probs)")
        z0 = kl_reference_point(kl_logps_B, ref_kl_logps_B)
    else:
        z0 = jnp.zeros((), jnp.float32)
    n_des = jnp.sum(desirable, dtype=jnp.float32)
    n_rows = jnp.float32(B) if num_rows is None else f32(num_rows)
    n_c = n_des if num_desirable is None else f32(num_desirable)
    n_r = (jnp.float32(B) - n_des) if num_undesirable is None else f32(num_undesirable)

    logratio = logps - ref
    b = cfg.beta
    if cfg.loss_type == "kto":
        chosen_l = 1.0 - jax.nn.sigmoid(b * (logratio - z0))
        rejected_l = 1.0 - jax.nn.sigmoid(b * (z0 - logratio))
    else:  # apo_zero_unpaired
        chosen_l = 1.0 - jax.nn.sigmoid(b * logratio)
        rejected_l = jax.nn.sigmoid(b * logratio)
    per_row = jnp.where(desirable, cfg.desirable_weight * chosen_l,
                        cfg.undesirable_weight * rejected_l)
    loss = jnp.sum(per_row) / jnp.maximum(n_rows, 1.0)

    sg = jax.lax.stop_gradient
    rewards = sg(b * logratio)

    def mean_over(mask, x, n):
        return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(n, 1.0)

    chosen_r = mean_over(desirable, rewards, n_c)
    rejected_r = mean_over(~desirable, rewards, n_r)
    metrics = {
        "kl": z0 * B / jnp.maximum(n_rows, 1.0),
        "rewards/chosen": chosen_r,
        "rewards/rejected": rejected_r,
        "rewards/margins": chosen_r - rejected_r,
        "logps/chosen": mean_over(desirable, sg(logps), n_c),
        "logps/rejected": mean_over(~desirable, sg(logps), n_r),
        "count/chosen": n_des,
        "count/rejected": jnp.float32(B) - n_des,
    }
    return loss, metrics
