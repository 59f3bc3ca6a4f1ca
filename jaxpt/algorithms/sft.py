"""SFT trainer: token-level NLL on completion / assistant tokens, packed batches.

Axis legend: B rows, T tokens, E hidden.

Variants (``sft:`` section):
  * Masked Thought (``masked_thought: p``): each response *input* token (a token that is
    itself a training target, i.e. ``loss_mask`` at the previous position) is replaced by
    ``mask_token_id`` with probability p; targets and loss mask are unchanged.
  * NEFTune (``neftune_alpha: a``): uniform noise in +-a/sqrt(T*E) is added to the input
    embeddings during training (not in evaluation).

Batch: :class:`SFTBatch`, the token rows of ``jaxpt.data.packing`` (packed or padded). The
loader yields them as dicts; ``put`` in ``build_sft_trainer`` converts them where they go
to the devices (train and eval alike).

Loss (``jaxpt.losses.sft.sft_loss``): the sum of -log p over every target token of the
optimizer step's batch divided by that batch's target-token count (all micro-batches), so
accumulation equals one full batch. ``mean_token_accuracy`` and ``entropy`` are means over
the same target tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt.algorithms.registry import register_builder
from jaxpt.config import RunConfig, SFTConfig
from jaxpt.data import BATCH_KEYS, DataStats, prepare_sft, sft_loader
from jaxpt.engine.aot import AotProgram, train_step_flops
from jaxpt.engine.build import (
    RunParts,
    eval_batch_size,
    read_data_records,
    start_run,
    train_program,
)
from jaxpt.engine.logprobs import sequence_token_logprobs
from jaxpt.engine.loop import IteratorSource, Trainer
from jaxpt.engine.state import batch_shardings, put_batch
from jaxpt.losses.sft import sft_loss
from jaxpt.sharding import replicated


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SFTBatch:
    """The SFT step's batch: the ``jaxpt.data.packing`` row contract, every field [B, T]."""

    input_ids: Any  # int32
    targets: Any  # int32: the next token in the same segment, else 0
    loss_mask: Any  # float32: 1 where ``targets`` is trained
    positions: Any  # int32: restart at 0 in every segment
    segment_ids: Any  # int32: 1, 2, ... per packed example, 0 on padding


# Each field's ndim, for ``batch_shardings``.
SFT_BATCH_NDIMS = SFTBatch(**{k: 2 for k in BATCH_KEYS})


@dataclasses.dataclass
class SFTParts(RunParts):
    loader: Any  # the train data loader (grain)


def sft_batch_stats(state, batch: SFTBatch) -> dict[str, jax.Array]:
    """Whole-batch statistics every micro-batch normalizes by."""
    return {"num_target_tokens": jnp.sum(batch.loss_mask > 0, dtype=jnp.float32)}


def mask_response_inputs(ids_BT, loss_mask_BT, rng, p: float, mask_token_id: int):
    """Masked Thought: replace response input tokens with ``mask_token_id`` w.p. ``p``.
    Token t is a response input iff it is the target of position t-1 (loss_mask[t-1])."""
    response_BT = jnp.pad(loss_mask_BT[:, :-1] > 0, ((0, 0), (1, 0)))
    drop_BT = jax.random.bernoulli(rng, p, ids_BT.shape) & response_BT
    return jnp.where(drop_BT, jnp.asarray(mask_token_id, ids_BT.dtype), ids_BT)


def neftune_embeddings(model, ids_BT, rng, alpha: float):
    """Input embeddings plus uniform noise of magnitude alpha / sqrt(T * E)."""
    x_BTE = model.embed(ids_BT)
    T, E = x_BTE.shape[1:]
    mag = alpha / math.sqrt(T * E)
    noise = jax.random.uniform(rng, x_BTE.shape, jnp.float32, -mag, mag)
    return (x_BTE.astype(jnp.float32) + noise).astype(x_BTE.dtype)


def make_sft_loss_fn(
    graphdef,
    sft: SFTConfig,
    *,
    impl: str = "auto",
    with_entropy: bool = True,
    with_accuracy: bool = True,
    mask_token_id: int | None = None,
):
    """``loss_fn(model_params, micro_batch, rng, stats) -> (loss, metrics)`` for
    ``make_train_step``; every value is normalized by ``stats["num_target_tokens"]``."""

    def loss_fn(params, mb: SFTBatch, rng, stats):
        model = nnx.merge(graphdef, params)
        r_mask, r_noise = jax.random.split(rng)
        ids_BT = mb.input_ids
        if sft.masked_thought > 0:
            ids_BT = mask_response_inputs(
                ids_BT, mb.loss_mask, r_mask, sft.masked_thought, mask_token_id
            )
        emb_BTE = None
        if sft.neftune_alpha:
            emb_BTE = neftune_embeddings(model, ids_BT, r_noise, sft.neftune_alpha)
        lp_BT, ent_BT, correct_BT = sequence_token_logprobs(
            model,
            {**vars(mb), "input_ids": ids_BT},
            impl=impl,
            with_entropy=with_entropy,
            with_accuracy=with_accuracy,
            input_embeddings_BTE=emb_BTE,
            valid_BT=mb.loss_mask > 0,  # the LM head runs on target tokens only
        )
        total = stats["num_target_tokens"]
        loss, m = sft_loss(
            lp_BT,
            mb.loss_mask,
            num_target_tokens=total,
            correct_BT=correct_BT,
            entropy_BT=ent_BT,
        )
        # Re-weight this micro-batch's means by its share of the whole batch's targets, so
        # the sum over micro-batches is the whole-batch mean.
        share = m["num_tokens"] / jnp.maximum(total, 1.0)
        metrics = {"num_target_tokens": m["num_tokens"]}
        for k in ("mean_token_accuracy", "entropy"):
            if k in m:
                metrics[k] = m[k] * share
        return loss, metrics

    return loss_fn


def make_sft_eval_step(graphdef, params_fn, *, impl, with_entropy, with_accuracy):
    """``eval_step(state, batch) -> sums`` (nll, target tokens, correct, entropy)."""

    def eval_step(state, batch: SFTBatch):
        model = nnx.merge(graphdef, params_fn(state.params, state.frozen, None))
        mask = batch.loss_mask > 0
        lp_BT, ent_BT, correct_BT = sequence_token_logprobs(
            model,
            vars(batch),
            impl=impl,
            with_entropy=with_entropy,
            with_accuracy=with_accuracy,
            valid_BT=mask,
        )
        out = {
            "nll": jnp.sum(jnp.where(mask, -lp_BT, 0.0)),
            "n": jnp.sum(mask, dtype=jnp.float32),
        }
        if correct_BT is not None:
            out["correct"] = jnp.sum(jnp.where(mask, correct_BT, False), dtype=jnp.float32)
        if ent_BT is not None:
            out["entropy"] = jnp.sum(jnp.where(mask, ent_BT, 0.0))
        return out

    return eval_step


def default_mask_token_id(tokenizer, sft: SFTConfig) -> int | None:
    if sft.masked_thought <= 0:
        return None
    if sft.mask_token_id is not None:
        return sft.mask_token_id
    for tid in (getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "pad_token_id", None)):
        if tid is not None:
            return int(tid)
    raise ValueError("sft.masked_thought needs sft.mask_token_id (the tokenizer has no unk/pad)")


def sft_programs(cfg: RunConfig, bundle, total: int, mask_token_id, *, with_eval: bool):
    """The run's train program (state, optimizer, jitted step), its batch shardings and the
    jitted eval step (None without ``with_eval``): what the trainer runs and what ``jaxpt
    plan --compile`` compiles."""
    t = cfg.train
    common = dict(impl=t.logprob_impl, with_entropy=t.with_entropy, with_accuracy=t.token_accuracy)
    loss_fn = make_sft_loss_fn(
        bundle.graphdef, cfg.section("sft"), mask_token_id=mask_token_id, **common
    )
    batch_sh = batch_shardings(SFT_BATCH_NDIMS, bundle.mesh)
    program = train_program(cfg, bundle, total, loss_fn, batch_sh, batch_stats_fn=sft_batch_stats)
    eval_step = None
    if with_eval:
        ts = program.trainable
        eval_step = jax.jit(
            make_sft_eval_step(bundle.graphdef, ts.params_fn, **common),
            in_shardings=(ts.shardings, batch_sh),
            out_shardings=replicated(bundle.mesh),
        )
    return program, batch_sh, eval_step


def aot_programs(cfg: RunConfig, bundle) -> list[AotProgram]:
    """The train step and (with ``data.eval``) the eval step on ``train.batch_size`` rows of
    ``data.max_length`` tokens (eval: ``train.eval_batch_size`` rows), for ``jaxpt plan
    --compile`` (``bundle``: :func:`~jaxpt.engine.build.abstract_bundle`)."""
    t, T = cfg.train, cfg.data.max_length
    mask_id = 0 if cfg.section("sft").masked_thought > 0 else None  # any id: shapes only
    program, batch_sh, eval_step = sft_programs(
        cfg, bundle, t.max_steps or 1000, mask_id, with_eval=cfg.data.eval is not None
    )

    def batch(rows):
        dtype = lambda k: jnp.float32 if k == "loss_mask" else jnp.int32  # noqa: E731
        return SFTBatch(**{k: jax.ShapeDtypeStruct((rows, T), dtype(k),
                                                   sharding=getattr(batch_sh, k))
                           for k in BATCH_KEYS})

    state, m = program.trainable.state, bundle.model_cfg
    out = [AotProgram("train step", program.step_fn, (state, batch(t.batch_size)),
                      train_step_flops(m, t.batch_size, T))]
    if eval_step is not None:
        rows = eval_batch_size(cfg)
        out.append(AotProgram("eval step", eval_step, (state, batch(rows)),
                              train_step_flops(m, rows, T) / 3))
    return out


def build_sft_trainer(cfg: RunConfig, *, mesh=None) -> Trainer:
    """Data, model, state, jitted step and eval for an SFT run (see module doc)."""
    sft: SFTConfig = cfg.section("sft")
    t = cfg.train
    bundle = start_run(cfg, mesh)
    mesh, tok, n_proc = bundle.mesh, bundle.tokenizer, jax.process_count()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def examples(which):
        stats = DataStats()
        records = read_data_records(cfg, which, stats=stats)
        ex, stats = prepare_sft(
            records,
            tok,
            max_length=cfg.data.max_length,
            truncation=cfg.data.truncation,
            completion_only=cfg.data.completion_only,
            assistant_only=cfg.data.assistant_only,
            skip_invalid=cfg.data.skip_invalid,
            stats=stats,
        )
        if not ex:
            raise ValueError(f"{cfg.source}: data.{which} has no usable examples ({stats})")
        return ex, stats

    train_ex, train_stats = examples("train")
    loader = sft_loader(
        train_ex,
        batch_size=t.batch_size // n_proc,
        max_length=cfg.data.max_length,
        packing=cfg.data.packing,
        seed=t.seed,
        shuffle=cfg.data.shuffle,
        pad_id=pad_id,
        stats=train_stats,
    )
    total = t.max_steps or max(1, math.ceil(t.num_epochs * loader.batches_per_epoch))
    program, batch_sh, eval_step = sft_programs(
        cfg, bundle, total, default_mask_token_id(tok, sft), with_eval=cfg.data.eval is not None
    )
    ts = program.trainable

    def put(host: dict) -> SFTBatch:  # the loaders' dicts -> the step's typed batch
        return put_batch(SFTBatch(**host), batch_sh)

    eval_fn = None
    if cfg.data.eval is not None:
        eval_ex, _ = examples("eval")
        eval_bs = eval_batch_size(cfg, mesh)
        eval_loader = sft_loader(
            eval_ex,
            batch_size=eval_bs // n_proc,
            max_length=cfg.data.max_length,
            packing=cfg.data.packing,
            shuffle=False,
            num_epochs=1,
            pad_id=pad_id,
            seed=0,
        )
        eval_fn = make_eval_fn(eval_step, eval_loader, put, t.eval_batches)

    return Trainer(
        cfg=cfg,
        mesh=mesh,
        state=ts.state,
        step_fn=program.step_fn,
        source=IteratorSource(iter(loader)),
        put_batch=put,
        total_steps=total,
        eval_fn=eval_fn,
        num_params=bundle.num_params,
        batches_per_epoch=loader.batches_per_epoch,
        parts=SFTParts(bundle, ts, program.tx, loader),
        data_stats=train_stats,
    )


def make_eval_fn(eval_step, loader, put, max_batches: int | None):
    """Evaluate on the held-out loader: token-weighted ``eval_loss``,
    ``eval_mean_token_accuracy``, ``eval_entropy`` and ``eval_num_tokens``."""

    def eval_fn(state) -> dict[str, float]:
        outs = []
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            outs.append(eval_step(state, put(batch)))
        sums: dict[str, float] = {}
        for o in jax.device_get(outs):
            for k, v in o.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        n = max(sums.get("n", 0.0), 1.0)
        res = {"eval_loss": sums.get("nll", 0.0) / n, "eval_num_tokens": sums.get("n", 0.0)}
        if "correct" in sums:
            res["eval_mean_token_accuracy"] = sums["correct"] / n
        if "entropy" in sums:
            res["eval_entropy"] = sums["entropy"] / n
        return res

    return eval_fn


train_sft = register_builder("sft", build_sft_trainer)
