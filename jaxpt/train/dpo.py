"""DPO trainer: preference pairs -> one policy forward over chosen + rejected -> DPO-family loss.

Axis legend: B pairs in the optimizer step's batch, b pairs in one micro-batch (B / k),
T tokens (``data.max_length``), E hidden.

Per train step (``make_train_step`` with the loss below):

1. The batch holds ``chosen_*`` and ``rejected_*`` (the five SFT keys each, one pair per row,
   right-padded) plus, when the loss needs a reference, ``ref_chosen_logps`` and
   ``ref_rejected_logps`` [B]. Those are computed **outside the gradient**: by the batch
   source, with a separate jitted forward of the reference params (``ref_logps``), just
   before the step (online), or once for the whole data set before training
   (``dpo.precompute_ref_logps``; the batches then carry the stored values, looked up by the
   stable ``example_index`` every batch carries).
2. The loss of a micro-batch runs the policy ONCE on 2b rows: chosen and rejected rows of a
   pair are interleaved along the batch axis (row 2i = chosen i, row 2i+1 = rejected i; the
   order keeps each data shard's pairs on that shard, where a plain [chosen; rejected]
   concatenation of a batch-sharded array would move rows between shards). Per-token
   log-probs come from the fused log-prob kernel (``sequence_token_logprobs``), are summed
   over each row's completion (``loss_mask``) into a summed log-prob and a length, and split
   back into chosen / rejected for ``jaxpt.losses.dpo.dpo_loss``.

   ``dpo.share_prompt`` (``auto``: when it costs fewer FLOPs) instead puts each pair in
   ONE row, [prompt | chosen | rejected] (``collate_preference_shared``): the prompt, and
   any tokens both sides start with, goes through the decoder once, and each side's
   trained tokens are read from the hidden states that predict them. Same log-probs as
   the two padded rows (tested); the row length and trained-token width are fixed for the
   run from the longest pair, so one program serves every batch.

Reduction: ``dpo_loss`` returns the mean over the micro-batch's b pairs; it is scaled by
b / B, so summing the k micro-batches gives the mean over the whole batch's B pairs (loss and
every metric). ``entropy`` (all completion tokens) and ``mean_token_accuracy`` (chosen
completion tokens, as TRL) are normalized by whole-batch token counts.

Reference model:
  * full fine-tuning: ``state.frozen`` is a copy of the initial params (online), or nothing
    at all (precomputed: the initial params are used for the one pass, then trained in place);
  * LoRA: ``state.frozen`` is the base model (adapters off), the reference with no copy;
  * reference-free losses (``simpo``, ``orpo``, ``sft`` only): no reference anywhere.

Metrics use TRL's names (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``loss/<type>`` for mixed losses);
evaluation on held-out pairs logs the same names prefixed ``eval_`` (``eval_loss``,
``eval_rewards/accuracies``, ``eval_rewards/margins``, ...), averaged over pairs.

Config (``dpo:`` section, :class:`DPOSection`); hh-rlhf transcripts are converted with
``data.format: hh_rlhf`` (as GSM8K with ``data.format: gsm8k``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.config import RunConfig, register_section
from jaxpt.data import (
    BATCH_KEYS,
    SHARED_PAIR_KEYS,
    DataStats,
    bucket_length,
    collate_preference_shared,
    prepare_preference,
    shared_pair_shape,
)
from jaxpt.data.packing import collate_preference
from jaxpt.data.pipeline import INDEX_KEY, preference_loader
from jaxpt.data.tokenize import TokenizedPreference
from jaxpt.losses.dpo import LOSS_TYPES, DPOLossConfig, dpo_loss, needs_reference
from jaxpt.models.config import decoder_forward_flops
from jaxpt.sharding import check_batch_size, replicated
from jaxpt.train.common import (
    build_mesh,
    build_train_state,
    check_train_batch,
    load_model_bundle,
    read_data_records,
)
from jaxpt.train.logprobs import hidden_token_logprobs, sequence_token_logprobs
from jaxpt.train.loop import Trainer, count_tokens
from jaxpt.train.registry import register_builder
from jaxpt.train.scoring import precompute_ref_table
from jaxpt.train.state import (
    batch_shardings,
    compile_step,
    make_optimizer,
    make_train_step,
    put_batch,
    split_micro,
)

SIDES = ("chosen", "rejected")
PAIR_KEYS = tuple(f"{side}_{k}" for side in SIDES for k in BATCH_KEYS)
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


# ----------------------------------------------------------------------------- config


@register_section("dpo")
@dataclasses.dataclass(frozen=True)
class DPOSection:
    """The ``dpo:`` section of a run config (TRL ``DPOConfig`` names where they exist).

    loss_type: one name or a list from ``jaxpt.losses.dpo.LOSS_TYPES``; a list is combined as
      ``Σ_k w_k · mean(loss_k)`` (``[sigmoid, sft]`` with weights ``[1, α]`` is RPO).
    loss_weights: one weight per loss type (default all 1).
    beta, label_smoothing, simpo_gamma, orpo_lambda: see ``DPOLossConfig``.
    precompute_ref_logps: compute the reference log-probs of every training (and held-out)
      pair in one pass before training and keep no reference model during training.
    eval_holdout: hold out the last N rows of ``data.train`` (after ``max_train_rows``) as
      the evaluation set; they are never trained on. Use instead of ``data.eval`` when the
      preference data comes as one file.
    """

    loss_type: str | tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    precompute_ref_logps: bool = False
    eval_holdout: int = 0
    share_prompt: str = "auto"  # auto | always | never: one row per pair (module doc)

    def __post_init__(self):
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        object.__setattr__(self, "loss_type", types)
        for t in types:
            if t not in LOSS_TYPES:
                close = difflib.get_close_matches(str(t), LOSS_TYPES, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"loss_type: unknown loss type {t!r}{hint}; valid types are {list(LOSS_TYPES)}"
                )
        if self.share_prompt not in ("auto", "always", "never"):
            raise ValueError(
                f"share_prompt: {self.share_prompt!r}; use 'auto', 'always' or 'never'"
            )
        if self.eval_holdout < 0:
            raise ValueError(f"eval_holdout: must be >= 0, got {self.eval_holdout}")
        try:
            self.loss_config()
        except (TypeError, ValueError) as e:
            # DPOLossConfig names its fields "DPOLossConfig.<key>"; here they are dpo.<key>.
            raise ValueError(str(e).replace("DPOLossConfig.", "")) from None

    def loss_config(self) -> DPOLossConfig:
        return DPOLossConfig(
            loss_type=self.loss_type,
            loss_weights=self.loss_weights,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma,
            orpo_lambda=self.orpo_lambda,
        )


# ----------------------------------------------------------------------------- the math


def interleave_pairs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``chosen_<k>``, ``rejected_<k>`` [b, T] -> ``<k>`` [2b, T]; row 2i is chosen i, row
    2i+1 rejected i (a reshape, so a batch-sharded input stays on its shards)."""
    out = {}
    for k in BATCH_KEYS:
        c_bT, r_bT = batch[f"chosen_{k}"], batch[f"rejected_{k}"]
        out[k] = jnp.stack([c_bT, r_bT], axis=1).reshape(2 * c_bT.shape[0], *c_bT.shape[1:])
    return out


def _shared_pair_token_logprobs(model, batch, *, impl, with_entropy, with_accuracy):
    """(logprobs, entropy | None, correct | None, valid) [2b, C] of a shared-prefix batch
    (``collate_preference_shared``): one decoder pass per pair row, then the LM head on the
    hidden states that predict each side's trained tokens; row 2i = chosen i, 2i+1 =
    rejected i, as ``interleave_pairs``."""
    hidden_bTE, _ = model(
        batch["shared_input_ids"],
        batch["shared_positions"],
        batch["shared_segment_ids"],
        shared_BT=batch["shared_prefix"] > 0,
    )
    two = lambda k: jnp.stack(  # noqa: E731
        [batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=1
    )  # [b, 2, C]
    source_b2C = two("source")
    b, _, C = source_b2C.shape
    hidden_b2CE = jnp.take_along_axis(
        hidden_bTE[:, None], source_b2C[..., None], axis=2, mode="clip"
    )
    valid_2bC = two("valid").reshape(2 * b, C) > 0
    lp, ent, correct = hidden_token_logprobs(
        hidden_b2CE.reshape(2 * b, C, -1),
        model.lm_head,
        two("targets").reshape(2 * b, C),
        impl=impl,
        with_entropy=with_entropy,
        with_accuracy=with_accuracy,
        valid_BT=valid_2bC,
    )
    return lp, ent, correct, valid_2bC


def pair_logps(
    model: Any,
    batch: Mapping[str, jax.Array],
    *,
    impl: str = "auto",
    with_entropy: bool = False,
    with_accuracy: bool = False,
) -> dict[str, jax.Array]:
    """Summed completion log-probs of both sides of every pair in ONE forward: of 2b rows,
    or of b shared-prefix rows (``collate_preference_shared`` keys).

    Returns fp32 ``chosen_logps``, ``rejected_logps`` (sum of log p over each completion's
    target tokens, [b]), ``chosen_lengths``, ``rejected_lengths`` (target token counts, [b]),
    and when asked ``entropy_sum`` (entropy summed over every completion token of both
    sides) and ``chosen_correct`` (argmax hits over the chosen completion tokens), scalars.
    """
    if "shared_input_ids" in batch:
        lp_2bT, ent_2bT, correct_2bT, mask_2bT = _shared_pair_token_logprobs(
            model, batch, impl=impl, with_entropy=with_entropy, with_accuracy=with_accuracy
        )
    else:
        both = interleave_pairs(batch)
        mask_2bT = both["loss_mask"] > 0
        lp_2bT, ent_2bT, correct_2bT = sequence_token_logprobs(
            model,
            both,
            impl=impl,
            with_entropy=with_entropy,
            with_accuracy=with_accuracy,
            valid_BT=mask_2bT,  # the LM head runs on completion tokens only
        )
    logps_b2 = jnp.sum(jnp.where(mask_2bT, lp_2bT, 0.0), axis=-1).reshape(-1, 2)
    lengths_b2 = jnp.sum(mask_2bT, axis=-1, dtype=jnp.float32).reshape(-1, 2)
    out = {
        "chosen_logps": logps_b2[:, 0],
        "rejected_logps": logps_b2[:, 1],
        "chosen_lengths": lengths_b2[:, 0],
        "rejected_lengths": lengths_b2[:, 1],
    }
    if ent_2bT is not None:
        out["entropy_sum"] = jnp.sum(jnp.where(mask_2bT, jax.lax.stop_gradient(ent_2bT), 0.0))
    if correct_2bT is not None:
        chosen_rows = (jnp.arange(mask_2bT.shape[0]) % 2 == 0)[:, None]
        hits = correct_2bT & mask_2bT & chosen_rows
        out["chosen_correct"] = jnp.sum(hits, dtype=jnp.float32)
    return out


def dpo_batch_stats(state, batch) -> dict[str, jax.Array]:
    """Whole-batch counts every micro-batch normalizes by."""
    mask = "valid" if "shared_input_ids" in batch else "loss_mask"
    c = batch[f"chosen_{mask}"] > 0
    r = batch[f"rejected_{mask}"] > 0
    return {
        "num_pairs": jnp.float32(c.shape[0]),
        "num_completion_tokens": jnp.sum(c, dtype=jnp.float32) + jnp.sum(r, dtype=jnp.float32),
        "num_chosen_tokens": jnp.sum(c, dtype=jnp.float32),
    }


def _refs(batch, loss_cfg: DPOLossConfig):
    if not needs_reference(loss_cfg):
        return None, None
    return batch["ref_chosen_logps"], batch["ref_rejected_logps"]


def _pair_loss(loss_cfg: DPOLossConfig, out: Mapping[str, jax.Array], batch):
    """``dpo_loss`` of ``pair_logps`` output against the batch's reference log-probs."""
    ref_c, ref_r = _refs(batch, loss_cfg)
    return dpo_loss(
        loss_cfg,
        out["chosen_logps"],
        out["rejected_logps"],
        ref_c,
        ref_r,
        out["chosen_lengths"],
        out["rejected_lengths"],
    )


def make_dpo_loss_fn(
    graphdef,
    loss_cfg: DPOLossConfig,
    *,
    impl: str = "auto",
    with_entropy: bool = False,
    with_accuracy: bool = False,
):
    """``loss_fn(model_params, micro_batch, rng, stats) -> (loss, metrics)`` for
    ``make_train_step``: the micro-batch's ``dpo_loss`` (a mean over its b pairs) scaled by
    b / ``stats["num_pairs"]``, metrics likewise; token metrics over whole-batch counts."""

    def loss_fn(params, mb, rng, stats):
        del rng  # DPO has no sampling in the loss (LoRA dropout gets its own key)
        model = nnx.merge(graphdef, params)
        out = pair_logps(
            model, mb, impl=impl, with_entropy=with_entropy, with_accuracy=with_accuracy
        )
        loss, m = _pair_loss(loss_cfg, out, mb)
        share = out["chosen_logps"].shape[0] / stats["num_pairs"]
        metrics = {k: v * share for k, v in m.items() if k != "loss"}
        if "entropy_sum" in out:
            metrics["entropy"] = out["entropy_sum"] / jnp.maximum(
                stats["num_completion_tokens"], 1.0
            )
        if "chosen_correct" in out:
            metrics["mean_token_accuracy"] = out["chosen_correct"] / jnp.maximum(
                stats["num_chosen_tokens"], 1.0
            )
        return loss * share, metrics

    return loss_fn


def make_ref_logps_fn(graphdef, *, impl: str = "auto", grad_accum: int = 1):
    """``ref_logps(ref_params, batch) -> {"ref_chosen_logps", "ref_rejected_logps"}`` [B]:
    the summed completion log-probs under ``ref_params`` (no gradient). With ``grad_accum``
    k > 1 the forward runs on the same k micro-batches as the train step, one at a time, so
    its activation memory is that of one micro-batch."""

    def one(params, mb):
        out = pair_logps(nnx.merge(graphdef, params), mb, impl=impl)
        return out["chosen_logps"], out["rejected_logps"]

    def ref_logps(ref_params, batch):
        ref_params = jax.lax.stop_gradient(ref_params)
        data = {k: v for k, v in batch.items() if k in PAIR_KEYS or k in SHARED_PAIR_KEYS}
        if grad_accum == 1:
            c, r = one(ref_params, data)
        else:
            micro = split_micro(data, grad_accum)  # [k, b, T]: micro j holds rows j, j+k, ...
            c_kb, r_kb = jax.lax.map(lambda mb: one(ref_params, mb), micro)
            c, r = (jnp.swapaxes(x, 0, 1).reshape(-1) for x in (c_kb, r_kb))
        return {"ref_chosen_logps": c, "ref_rejected_logps": r}

    return ref_logps


def make_dpo_eval_step(graphdef, params_fn, loss_cfg: DPOLossConfig, *, impl: str = "auto"):
    """``eval_step(state, batch) -> metrics``: ``dpo_loss`` and its metrics (means over the
    batch's pairs) under the current policy, with the batch's reference log-probs."""

    def eval_step(state, batch):
        model = nnx.merge(graphdef, params_fn(state.params, state.frozen, None))
        return _pair_loss(loss_cfg, pair_logps(model, batch, impl=impl), batch)[1]

    return eval_step


# ----------------------------------------------------------------------------- data


class DPOSource:
    """Batch source: host batch -> device batch with the reference log-probs attached.

    ``table`` (precomputed, [N, 2]) is looked up by ``example_index``; otherwise ``ref_fn``
    (jitted ``(ref_params, batch) -> refs``) runs on ``state.frozen``; with neither the
    loss is reference-free. The device batch carries ``_num_tokens`` (host int) for the
    loop's token count.
    """

    def __init__(self, iterator, batch_sh, *, ref_fn=None, table=None, keys=PAIR_KEYS):
        self.keys = keys  # the batch layout's sequence keys (PAIR_KEYS or SHARED_PAIR_KEYS)
        self.iterator = iterator
        self.batch_sh = batch_sh
        self.ref_fn = ref_fn
        self.table = table

    def next(self, state) -> dict[str, Any]:
        host = dict(next(self.iterator))
        ntok = count_tokens(host)
        if self.table is not None:
            refs = self.table[host[INDEX_KEY]]
            host["ref_chosen_logps"], host["ref_rejected_logps"] = refs[:, 0], refs[:, 1]
        batch = put_batch(host, {k: v for k, v in self.batch_sh.items() if k in host})
        if self.ref_fn is not None:
            batch.update(self.ref_fn(state.frozen, {k: batch[k] for k in self.keys}))
        batch["_num_tokens"] = ntok
        return batch

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(state)


def pair_layout(
    share_prompt: str,
    model_cfg,
    pairs: Sequence[TokenizedPreference],
    *,
    max_length: int,
    pad_id: int,
) -> tuple[tuple[str, ...], Callable[[list[TokenizedPreference]], dict[str, np.ndarray]]]:
    """(sequence keys, collate) of the batch layout ``dpo.share_prompt`` picks for
    ``pairs`` (every pair the run will see: train and eval). The shared layout's row
    length and width are bucketed from the longest pair, fixed for the run; ``auto``
    takes it when one row of that length costs fewer decoder FLOPs than two of
    ``max_length``."""
    if share_prompt != "never":
        shapes = np.asarray([shared_pair_shape(p) for p in pairs])
        length = bucket_length(int(shapes[:, 0].max()))
        width = bucket_length(int(shapes[:, 1].max()))
        shared_cost = decoder_forward_flops(model_cfg, 1, length)
        if share_prompt == "always" or shared_cost < decoder_forward_flops(
            model_cfg, 2, max_length
        ):
            return SHARED_PAIR_KEYS, lambda ps: collate_preference_shared(
                ps, length, width, pad_id=pad_id
            )
    return PAIR_KEYS, lambda ps: collate_preference(ps, max_length, pad_id=pad_id)


def _device_batch(batch: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: batch[k] for k in keys}


def read_pairs(cfg: RunConfig, tokenizer, dpo: DPOSection):
    """(train pairs, train stats, eval pairs | None) from ``data.train`` / ``data.eval`` or
    ``dpo.eval_holdout``, validated and tokenized."""
    d = cfg.data

    def prepare(records, stats, what):
        pairs, stats = prepare_preference(
            records,
            tokenizer,
            max_length=d.max_length,
            truncation=d.truncation,
            skip_invalid=d.skip_invalid,
            stats=stats,
        )
        if not pairs:
            raise ValueError(f"{cfg.source}: {what} has no usable preference pairs ({stats})")
        return pairs, stats

    stats = DataStats()
    records = read_data_records(cfg, "train", stats=stats)
    eval_records = None
    if dpo.eval_holdout:
        if d.eval is not None:
            raise ValueError(f"{cfg.source}: set either data.eval or dpo.eval_holdout, not both")
        if dpo.eval_holdout >= len(records):
            raise ValueError(
                f"{cfg.source}: dpo.eval_holdout={dpo.eval_holdout} leaves no training rows "
                f"(data.train has {len(records)} rows after data.max_train_rows)"
            )
        records, eval_records = records[: -dpo.eval_holdout], records[-dpo.eval_holdout :]
    elif d.eval is not None:
        eval_records = read_data_records(cfg, "eval")
    train_pairs, stats = prepare(records, stats, "data.train")
    eval_pairs = None
    if eval_records is not None:
        what = "dpo.eval_holdout" if dpo.eval_holdout else "data.eval"
        eval_pairs, _ = prepare(eval_records, DataStats(rows_read=len(eval_records)), what)
    return train_pairs, stats, eval_pairs


# ----------------------------------------------------------------------------- trainer


def build_dpo_trainer(cfg: RunConfig, *, mesh=None) -> Trainer:
    """Data, model, state (with the reference where needed), ref forward, jitted step and
    eval for a DPO run (see the module doc)."""
    dpo: DPOSection = cfg.section("dpo")
    loss_cfg = dpo.loss_config()
    t = cfg.train
    n_proc = jax.process_count()
    if t.batch_size % n_proc:
        raise ValueError(
            f"{cfg.source}: train.batch_size={t.batch_size} is not divisible by the "
            f"{n_proc} processes"
        )
    mesh = mesh or build_mesh(cfg)
    check_train_batch(cfg, mesh)
    bundle = load_model_bundle(cfg, mesh)
    tok = bundle.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    local_bs = t.batch_size // n_proc
    train_pairs, train_stats, eval_pairs = read_pairs(cfg, tok, dpo)
    seq_keys, collate = pair_layout(
        dpo.share_prompt,
        bundle.model_cfg,
        [*train_pairs, *(eval_pairs or ())],
        max_length=cfg.data.max_length,
        pad_id=pad_id,
    )
    loader = preference_loader(
        train_pairs,
        batch_size=local_bs,
        max_length=cfg.data.max_length,
        collate=collate,
        seed=t.seed,
        shuffle=cfg.data.shuffle,
        pad_id=pad_id,
        stats=train_stats,
    )
    total = t.max_steps or max(1, math.ceil(t.num_epochs * loader.batches_per_epoch))
    tx, schedule = make_optimizer(cfg.optim, total)

    use_ref = needs_reference(loss_cfg)
    precompute = use_ref and dpo.precompute_ref_logps
    data_sh = batch_shardings({**{k: 2 for k in seq_keys}, INDEX_KEY: 1}, mesh)
    pair_sh = {k: data_sh[k] for k in seq_keys}
    ref_sh = batch_shardings({k: 1 for k in REF_KEYS}, mesh) if use_ref else {}
    ref_logps = make_ref_logps_fn(bundle.graphdef, impl=t.logprob_impl, grad_accum=t.grad_accum)
    eval_bs = t.eval_batch_size or t.batch_size // t.grad_accum
    if eval_pairs is not None and eval_bs % n_proc:
        raise ValueError(
            f"{cfg.source}: eval batch size {eval_bs} is not divisible by the {n_proc} processes"
        )
    if eval_pairs is not None:
        check_batch_size(eval_bs, mesh, what=f"{cfg.source}: eval batch size")

    tables: dict[str, np.ndarray] = {}
    if precompute:
        # One pass with the initial params (the reference) before they become the trained
        # state; afterwards no reference is kept (full FT) or it is the LoRA base anyway.
        def with_index(ref_params, batch):
            return {**ref_logps(ref_params, batch), INDEX_KEY: batch[INDEX_KEY]}

        pre = jax.jit(
            with_index, in_shardings=(bundle.params_sh, data_sh), out_shardings=replicated(mesh)
        )
        t0 = time.perf_counter()
        tables["train"] = precompute_ref_table(
            pre,
            bundle.params,
            train_pairs,
            batch_size=local_bs,
            collate=collate,
            batch_sh=data_sh,
        )
        if eval_pairs is not None:
            tables["eval"] = precompute_ref_table(
                pre,
                bundle.params,
                eval_pairs,
                batch_size=local_bs,
                collate=collate,
                batch_sh=data_sh,
            )
        n_pre = len(train_pairs) + (len(eval_pairs) if eval_pairs is not None else 0)
        print(
            f"dpo: precomputed reference log-probs of {n_pre} pairs in "
            f"{time.perf_counter() - t0:.1f}s",
            flush=True,
        )

    ts = build_train_state(bundle, cfg, tx, reference=use_ref and not precompute)
    online_ref = None
    if use_ref and not precompute:
        online_ref = jax.jit(
            ref_logps, in_shardings=(ts.shardings.frozen, pair_sh), out_shardings=ref_sh
        )

    step_keys = (*seq_keys, *(REF_KEYS if use_ref else ()))
    step_sh = {k: (data_sh | ref_sh)[k] for k in step_keys}
    loss_fn = make_dpo_loss_fn(
        bundle.graphdef,
        loss_cfg,
        impl=t.logprob_impl,
        with_entropy=t.with_entropy,
        with_accuracy=t.token_accuracy,
    )
    step = make_train_step(
        loss_fn,
        tx,
        schedule,
        grad_accum=t.grad_accum,
        batch_stats_fn=dpo_batch_stats,
        params_fn=ts.params_fn,
    )
    step_fn = compile_step(step, ts.shardings, step_sh, mesh)
    source = DPOSource(
        iter(loader),
        {**data_sh, **ref_sh},
        ref_fn=online_ref,
        table=tables.get("train"),
        keys=seq_keys,
    )

    eval_fn = None
    if eval_pairs is not None:
        eval_loader = preference_loader(
            eval_pairs,
            batch_size=eval_bs // n_proc,
            max_length=cfg.data.max_length,
            collate=collate,
            shuffle=False,
            num_epochs=1,
            pad_id=pad_id,
        )
        eval_ref = online_ref
        if online_ref is not None and eval_bs != t.batch_size:
            eval_ref = jax.jit(
                make_ref_logps_fn(bundle.graphdef, impl=t.logprob_impl),
                in_shardings=(ts.shardings.frozen, pair_sh),
                out_shardings=ref_sh,
            )
        eval_step = jax.jit(
            make_dpo_eval_step(bundle.graphdef, ts.params_fn, loss_cfg, impl=t.logprob_impl),
            in_shardings=(ts.shardings, step_sh),
            out_shardings=replicated(mesh),
        )
        eval_fn = make_eval_fn(
            eval_step,
            eval_loader,
            {**data_sh, **ref_sh},
            step_keys,
            t.eval_batches,
            ref_fn=eval_ref,
            table=tables.get("eval"),
            keys=seq_keys,
        )

    return Trainer(
        cfg=cfg,
        mesh=mesh,
        state=ts.state,
        step_fn=step_fn,
        source=source,
        put_batch=lambda b: _device_batch(b, step_keys),
        total_steps=total,
        eval_fn=eval_fn,
        tokens_fn=lambda b: b["_num_tokens"],
        num_params=bundle.num_params,
        batches_per_epoch=loader.batches_per_epoch,
        data_stats=train_stats,
        extras={
            "bundle": bundle,
            "trainable": ts,
            "loader": loader,
            "tx": tx,
            "loss_config": loss_cfg,
            "ref_logps": online_ref,
            "ref_tables": tables,
            "train_pairs": train_pairs,
            "eval_pairs": eval_pairs,
            "step_keys": step_keys,
            "sequence_keys": seq_keys,
        },
    )


def make_eval_fn(
    eval_step,
    loader,
    batch_sh,
    step_keys,
    max_batches: int | None,
    *,
    ref_fn=None,
    table=None,
    keys=PAIR_KEYS,
):
    """Evaluate on the held-out pairs: every ``dpo_loss`` metric averaged over pairs (all
    eval batches have the same size), prefixed ``eval_`` (``eval_loss``,
    ``eval_rewards/accuracies``, ``eval_rewards/margins``, ...)."""

    def eval_fn(state) -> dict[str, float]:
        source = DPOSource(iter(loader), batch_sh, ref_fn=ref_fn, table=table, keys=keys)
        outs = []
        for _ in range(max_batches if max_batches is not None else loader.batches_per_epoch):
            try:
                batch = source.next(state)
            except StopIteration:
                break
            outs.append(eval_step(state, _device_batch(batch, step_keys)))
        sums: dict[str, float] = {}
        for o in jax.device_get(outs):
            for k, v in o.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        res = {f"eval_{k}": v / max(len(outs), 1) for k, v in sums.items()}
        res["eval_num_pairs"] = float(len(outs) * loader.meta["batch_size"] * jax.process_count())
        return res

    return eval_fn


train_dpo = register_builder("dpo", build_dpo_trainer)
