"""KTO: unpaired rows (prompt, completion, desirable or not) -> one policy forward over each
row and its mismatched pair -> ``jaxpt.losses.kto.kto_loss`` against a frozen reference.

Axis legend: B rows in the optimizer step's batch, b rows in one micro-batch (B / k).

Data (``jaxpt.data.unpaired``): TRL's unpaired format (``prompt`` / ``completion`` /
``label``, standard or conversational), or paired rows unpaired as TRL does (hh-rlhf pairs
become a desirable and an undesirable row). Each row is paired with the completion of
another row for KTO's reference point z0, fixed per row as TRL's KTOTrainer does (rotation
by one within chunks of ``train.batch_size`` rows per process in data order; with
``data.shuffle: false`` and ``grad_accum: 1`` a batch's mismatched completions are exactly
its own completions, TRL's sequential-sampler setting; shuffled, they are other rows' of the
same data). A row is a preference pair of ``jaxpt.data.pairs`` (chosen = its completion,
rejected = the mismatched one), so the flat and shared-prompt layouts, the loaders and the
reference scoring (online on ``state.frozen``, or precomputed once, ``RefLogps`` [B] per
side) are DPO's.

The loss of a micro-batch runs the policy ONCE over both sequences of its rows (the shared
layout puts the prompt through the decoder once); the mismatched side's log-probs are
gradient-stopped (TRL computes them under ``no_grad``; here they ride in the same forward,
whose backward then also covers that side). ``kto_loss`` normalizes by whole-batch counts
(``stats``), so micro-batches sum to the step's mean loss and metrics; z0 is each
micro-batch's, a mean over its rows on all devices (TRL: per device batch, gathered across
processes). Metrics use TRL's names: ``kl``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``entropy`` (desirable and
undesirable completions, not the mismatched ones), plus ``count/chosen`` /
``count/rejected``; TRL's ``logits/chosen`` (mean logit over the vocab) is not logged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.algorithms.dpo import DPOSource
from jaxpt.algorithms.dpo import make_eval_fn as pairs_eval_fn
from jaxpt.algorithms.registry import register_builder
from jaxpt.config import RunConfig, register_section
from jaxpt.data.pairs import SHARE_PROMPT, PairLayout, PairRows, SharedPairRows, choose_layout
from jaxpt.data.pipeline import INDEX_KEY
from jaxpt.data.unpaired import read_unpaired, with_mismatched
from jaxpt.engine import build
from jaxpt.engine.logprobs import pair_token_logprobs
from jaxpt.engine.loop import Trainer
from jaxpt.engine.state import batch_shardings
from jaxpt.losses.kto import KTOLossConfig, kto_loss
from jaxpt.models.config import decoder_forward_flops
from jaxpt.rl.scoring import RefLogps, make_ref_logps_fn, precompute_ref_table
from jaxpt.sharding import replicated


@register_section("kto")
@dataclasses.dataclass(frozen=True)
class KTOSection(KTOLossConfig):
    """The ``kto:`` section (TRL ``KTOConfig`` names): the loss (``KTOLossConfig``: ``beta``,
    ``desirable_weight``, ``undesirable_weight``, ``loss_type`` kto | apo_zero_unpaired) and

    precompute_ref_logps: the reference log-probs of every row and its mismatched pair in
      one pass before training; no reference model during training.
    eval_holdout: hold out the last N rows of ``data.train`` (before unpairing) as the
      evaluation set, never trained on (instead of ``data.eval``).
    share_prompt: auto | always | never: one row per example, [prompt | completion |
      mismatched completion] (``jaxpt.data.pairs``).
    """

    precompute_ref_logps: bool = False
    eval_holdout: int = 0
    share_prompt: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.share_prompt not in SHARE_PROMPT:
            raise ValueError(f"share_prompt: {self.share_prompt!r}; use 'auto', 'always' or "
                             "'never'")
        if self.eval_holdout < 0:
            raise ValueError(f"eval_holdout: must be >= 0, got {self.eval_holdout}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KTOBatch:
    """A step's rows as pairs (chosen = the row's completion, rejected = its mismatched
    completion), ``label`` [B] (1.0 desirable), and the reference's summed log-probs of both
    (None until the online reference is attached)."""

    pairs: PairRows | SharedPairRows
    label: Any
    ref: RefLogps | None = None

    def num_tokens(self) -> int:
        """Non-padding tokens of this process's rows (``Trainer.tokens_fn``)."""
        return self.pairs.num_tokens()


# ----------------------------------------------------------------------------- the math


def kto_batch_stats(state, batch: KTOBatch) -> dict[str, jax.Array]:
    """Whole-batch counts every micro-batch normalizes by."""
    own, _ = batch.pairs.trained()
    desirable = jnp.sum(batch.label > 0.5, dtype=jnp.float32)
    rows = jnp.float32(batch.label.shape[0])
    return {"num_rows": rows, "num_desirable": desirable, "num_undesirable": rows - desirable,
            "num_completion_tokens": jnp.sum(own, dtype=jnp.float32)}


def row_logps(model, pairs, *, impl="auto", with_entropy=False):
    """(own log-probs [b], mismatched log-probs [b] (gradient-stopped), entropy summed over
    the own completions' tokens or None): one forward over both sequences of every row."""
    lp_2bT, ent_2bT, _, mask_2bT = pair_token_logprobs(model, pairs, impl=impl,
                                                       with_entropy=with_entropy)
    logps_b2 = jnp.sum(jnp.where(mask_2bT, lp_2bT, 0.0), axis=-1).reshape(-1, 2)
    entropy = None
    if ent_2bT is not None:
        own_rows = (jnp.arange(mask_2bT.shape[0]) % 2 == 0)[:, None]
        entropy = jnp.sum(jnp.where(mask_2bT & own_rows, jax.lax.stop_gradient(ent_2bT), 0.0))
    return logps_b2[:, 0], jax.lax.stop_gradient(logps_b2[:, 1]), entropy


def make_kto_loss_fn(graphdef, loss_cfg: KTOLossConfig, *, impl="auto", with_entropy=False):
    """``loss_fn(model_params, micro_batch, rng, stats) -> (loss, metrics)`` for
    ``make_train_step``: ``kto_loss`` of the micro-batch normalized by the step's counts."""

    def loss_fn(params, mb: KTOBatch, rng, stats):
        del rng  # no sampling in the loss (LoRA dropout gets its own key)
        logps, kl_logps, entropy = row_logps(nnx.merge(graphdef, params), mb.pairs, impl=impl,
                                             with_entropy=with_entropy)
        loss, metrics = kto_loss(loss_cfg, logps, mb.ref.chosen, mb.label, kl_logps,
                                 mb.ref.rejected, num_rows=stats["num_rows"],
                                 num_desirable=stats["num_desirable"],
                                 num_undesirable=stats["num_undesirable"])
        if entropy is not None:
            metrics["entropy"] = entropy / jnp.maximum(stats["num_completion_tokens"], 1.0)
        return loss, metrics

    return loss_fn


def make_kto_eval_step(graphdef, params_fn, loss_cfg: KTOLossConfig, *, impl: str = "auto"):
    """``eval_step(state, batch) -> metrics``: ``kto_loss`` and its metrics under the current
    policy (means over the batch's rows)."""

    def eval_step(state, batch: KTOBatch):
        model = nnx.merge(graphdef, params_fn(state.params, state.frozen, None))
        logps, kl_logps, _ = row_logps(model, batch.pairs, impl=impl)
        loss, metrics = kto_loss(loss_cfg, logps, batch.ref.chosen, batch.label, kl_logps,
                                 batch.ref.rejected)
        return {"loss": loss, **metrics}

    return eval_step


# ----------------------------------------------------------------------------- batches


class KTOSource(DPOSource):
    """The loader's dicts -> device :class:`KTOBatch`s: labels looked up by each row's
    ``example_index``, reference log-probs from ``table`` [N, 2] or computed by ``ref_fn``
    on ``state.frozen`` once the rows are on the devices (``DPOSource``)."""

    def __init__(self, loader, layout: PairLayout, labels: np.ndarray, batch_sh: KTOBatch, *,
                 ref_fn=None, table=None):
        super().__init__(loader, layout, batch_sh, ref_fn=ref_fn, table=table)
        self.labels = labels

    def host_batch(self, host: dict, ref: RefLogps | None) -> KTOBatch:
        return KTOBatch(self.layout.rows.from_dict(host), self.labels[host[INDEX_KEY]], ref)


# ----------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class KTOParts(build.RunParts):
    layout: PairLayout
    batch_sh: KTOBatch
    train_rows: list  # TokenizedPreference (own, mismatched) per row
    train_labels: np.ndarray


def build_kto_trainer(cfg: RunConfig, *, mesh=None) -> Trainer:
    """Data, model, state (with the reference where online), reference log-probs, jitted step
    and eval of a KTO run (module doc)."""
    kto: KTOSection = cfg.section("kto")
    t, n_proc = cfg.train, jax.process_count()
    bundle = build.start_run(cfg, mesh)
    mesh = bundle.mesh
    local_bs = t.batch_size // n_proc
    train_ex, train_stats, eval_ex = read_unpaired(
        functools.partial(build.read_data_records, cfg), bundle.tokenizer, cfg.data,
        holdout=kto.eval_holdout, source=cfg.source)
    eval_bs = build.eval_batch_size(cfg, mesh if eval_ex is not None else None)
    rows, labels = with_mismatched(train_ex, chunk=local_bs, max_length=cfg.data.max_length)
    eval_rows = eval_labels = None
    if eval_ex is not None:
        eval_rows, eval_labels = with_mismatched(eval_ex, chunk=eval_bs // n_proc,
                                                 max_length=cfg.data.max_length)
    pad_id = bundle.tokenizer.pad_token_id
    layout = choose_layout(kto.share_prompt, [*rows, *(eval_rows or ())],
                           max_length=cfg.data.max_length, pad_id=0 if pad_id is None else pad_id,
                           forward_flops=functools.partial(decoder_forward_flops, bundle.model_cfg))
    loader = layout.loader(rows, batch_size=local_bs, seed=t.seed, shuffle=cfg.data.shuffle,
                           stats=train_stats)
    total = t.max_steps or max(1, math.ceil(t.num_epochs * loader.batches_per_epoch))
    batch_sh = batch_shardings(KTOBatch(layout.rows.ndims(), 1, RefLogps(1, 1)), mesh)
    ref_logps = make_ref_logps_fn(bundle.graphdef, impl=t.logprob_impl, grad_accum=t.grad_accum)
    tables: dict[str, np.ndarray] = {}
    if kto.precompute_ref_logps:
        splits = {"train": rows, **({"eval": eval_rows} if eval_rows else {})}
        t0 = time.perf_counter()
        tables = precompute_ref_table(
            ref_logps, bundle.params, splits,
            rows_of=lambda pairs: layout.rows.from_dict(layout.collate(pairs)),
            rows_per_call=local_bs, rows_sh=batch_sh.pairs, params_sh=bundle.params_sh)
        print(f"kto: precomputed reference log-probs of {sum(map(len, splits.values()))} rows "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
    loss_fn = make_kto_loss_fn(bundle.graphdef, kto, impl=t.logprob_impl,
                               with_entropy=t.with_entropy)
    program = build.train_program(cfg, bundle, total, loss_fn, batch_sh,
                                  batch_stats_fn=kto_batch_stats,
                                  reference=not kto.precompute_ref_logps)
    ts = program.trainable

    def online(fn):  # jitted reference forward on state.frozen, run by the source
        return jax.jit(fn, in_shardings=(ts.shardings.frozen, batch_sh.pairs),
                       out_shardings=batch_sh.ref)

    online_ref = None if kto.precompute_ref_logps else online(ref_logps)
    eval_fn = None
    if eval_rows is not None:
        eval_loader = layout.loader(eval_rows, batch_size=eval_bs // n_proc, shuffle=False,
                                    num_epochs=1)
        eval_ref = online_ref
        if online_ref is not None and eval_bs != t.batch_size:  # the train micro-batches
            eval_ref = online(make_ref_logps_fn(bundle.graphdef, impl=t.logprob_impl))
        eval_step = jax.jit(make_kto_eval_step(bundle.graphdef, ts.params_fn, kto,
                                               impl=t.logprob_impl),
                            in_shardings=(ts.shardings, batch_sh), out_shardings=replicated(mesh))
        per_pair = pairs_eval_fn(
            eval_step,
            lambda: KTOSource(eval_loader, layout, eval_labels, batch_sh, ref_fn=eval_ref,
                              table=tables.get("eval")),
            t.eval_batches if t.eval_batches is not None else eval_loader.batches_per_epoch,
            eval_bs)

        def eval_fn(state):  # DPO's held-out loop; its rows are KTO rows, not pairs
            out = per_pair(state)
            out["eval_num_rows"] = out.pop("eval_num_pairs")
            return out

    source = KTOSource(loader, layout, labels, batch_sh, ref_fn=online_ref,
                       table=tables.get("train"))
    return Trainer(
        cfg=cfg, mesh=mesh, state=ts.state, step_fn=program.step_fn, source=source,
        put_batch=lambda batch: batch,  # the source serves device batches (online reference)
        total_steps=total, eval_fn=eval_fn, tokens_fn=KTOBatch.num_tokens,
        num_params=bundle.num_params, batches_per_epoch=loader.batches_per_epoch,
        data_stats=train_stats,
        parts=KTOParts(bundle, ts, program.tx, layout, batch_sh, rows, labels),
    )


train_kto = register_builder("kto", build_kto_trainer)
