"""SFT with label smoothing: the worked example of ``docs/adding_an_algorithm.md``, an
algorithm outside jaxpt (``algorithm: tests.algorithms_example.sft_smooth``).

Axis legend: B rows, T tokens, E hidden, V vocab.

Loss: per target token ``(1 - eps) * -log p(target) + eps * -mean_v log p(v)`` (the target
smoothed toward the uniform distribution, as torch's ``label_smoothing``), summed over the
step's target tokens and divided by their count in the whole batch, so accumulation equals
one full batch. ``mean_v log p(v) = h . mean_v W_v - logsumexp(h W^T)`` and ``logsumexp =
h . W_target - log p(target)``: two dot products beside the per-token log-probs, never
B x T x V logits. ``eps = 0`` is the SFT loss exactly.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt.config import RunConfig, register_section
from jaxpt.data import DataStats, prepare_sft, sft_loader
from jaxpt.engine.build import read_data_records, start_run, train_program
from jaxpt.engine.logprobs import hidden_token_logprobs
from jaxpt.engine.loop import IteratorSource, Trainer
from jaxpt.engine.state import batch_shardings, put_batch
from jaxpt.losses.sft import sft_loss
from jaxpt.trainers.registry import register_builder


@register_section("sft_smooth")
@dataclasses.dataclass(frozen=True)
class SmoothConfig:
    label_smoothing: float = 0.1  # eps: the weight of the uniform target

    def __post_init__(self):
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SmoothBatch:
    """Packed SFT rows, [B, T] each (``jaxpt.data.packing``)."""

    input_ids: jax.Array
    targets: jax.Array
    loss_mask: jax.Array
    positions: jax.Array
    segment_ids: jax.Array


def batch_stats(state, batch: SmoothBatch) -> dict[str, jax.Array]:
    return {"num_target_tokens": jnp.sum(batch.loss_mask > 0, dtype=jnp.float32)}


def make_loss_fn(graphdef, eps: float, *, impl: str = "auto"):
    def loss_fn(params, mb: SmoothBatch, rng, stats):
        model = nnx.merge(graphdef, params)
        hidden_BTE, _ = model(mb.input_ids, mb.positions, mb.segment_ids)
        mask_BT = mb.loss_mask > 0
        lp_BT, _, _ = hidden_token_logprobs(
            hidden_BTE, model.lm_head, mb.targets, impl=impl, valid_BT=mask_BT
        )
        h_BTE, w_VE = hidden_BTE.astype(jnp.float32), model.lm_head.astype(jnp.float32)
        z_target_BT = jnp.einsum("bte,bte->bt", h_BTE, w_VE[mb.targets])
        uniform_BT = z_target_BT - h_BTE @ w_VE.mean(0) - lp_BT  # -mean_v log p(v)
        n = stats["num_target_tokens"]
        nll, m = sft_loss(lp_BT, mb.loss_mask, num_target_tokens=n)
        uniform = jnp.sum(jnp.where(mask_BT, uniform_BT, 0.0)) / jnp.maximum(n, 1.0)
        loss = (1.0 - eps) * nll + eps * uniform
        return loss, {"nll": nll, "num_target_tokens": m["num_tokens"]}

    return loss_fn


class SmoothSource(IteratorSource):
    """The SFT loader's dict batches as typed batches."""

    def next(self, state) -> SmoothBatch:
        b = super().next(state)
        return SmoothBatch(**{f.name: b[f.name] for f in dataclasses.fields(SmoothBatch)})


def build_trainer(cfg: RunConfig) -> Trainer:
    t, d = cfg.train, cfg.data
    bundle = start_run(cfg)  # mesh, batch checks, model in its shardings
    tok = bundle.tokenizer
    stats = DataStats()
    examples, stats = prepare_sft(
        read_data_records(cfg, "train", stats=stats), tok, max_length=d.max_length,
        truncation=d.truncation, completion_only=d.completion_only,
        assistant_only=d.assistant_only, skip_invalid=d.skip_invalid, stats=stats,
    )
    loader = sft_loader(
        examples, batch_size=t.batch_size // jax.process_count(), max_length=d.max_length,
        packing=d.packing, seed=t.seed, shuffle=d.shuffle, pad_id=tok.pad_token_id or 0,
        stats=stats,
    )
    total = t.max_steps or max(1, math.ceil(t.num_epochs * loader.batches_per_epoch))
    loss_fn = make_loss_fn(bundle.graphdef, cfg.sft_smooth.label_smoothing, impl=t.logprob_impl)
    batch_sh = batch_shardings(SmoothBatch(2, 2, 2, 2, 2), bundle.mesh)
    # optimizer, train state (full or LoRA) and the jitted step, state donated
    program = train_program(cfg, bundle, total, loss_fn, batch_sh, batch_stats_fn=batch_stats)
    return Trainer(
        cfg=cfg, mesh=bundle.mesh, state=program.trainable.state, step_fn=program.step_fn,
        source=SmoothSource(iter(loader)),
        put_batch=lambda b: put_batch(b, batch_sh),
        total_steps=total, num_params=bundle.num_params,
        batches_per_epoch=loader.batches_per_epoch, data_stats=stats,
    )


train_sft_smooth = register_builder(__name__, build_trainer)
