"""The programs of an on-policy run for ``jaxpt plan --compile``: the rollout's prefill and
decode loop (the KV cache included) and the train step on a rollout batch, on abstract
inputs that carry their shardings, so XLA's compiler for the target (a TPU slice) reports
their per-device memory.

Axis legend: B prompts of a rollout, G samples per prompt, R = B*G rows, P prompt width,
C completion width (``max_completion_length``).

The rollout is what a step samples: ``train.batch_size * steps_per_generation`` rows
(``R``), decoded all at once by the static engine in the decode preset
(``jaxpt.sharding.DecodeSharding``; layers scanned on a TPU). Its cache is R rows x
(P + C - 1) slots per layer, for keys and values, in the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt.engine.aot import AotProgram, train_step_flops
from jaxpt.models.config import decoder_forward_flops
from jaxpt.rl import layout
from jaxpt.rl.config import OnPolicySection
from jaxpt.sampling import bucket_length, decode, prefill
from jaxpt.sharding import decode_sharding, replicated


@dataclasses.dataclass(frozen=True)
class Bound:
    """A jitted ``fn(graphdef, *args, **static)`` with the graphdef and its static keyword
    arguments bound (``AotProgram.fn``)."""

    fn: Any
    graphdef: Any
    static: dict

    def __call__(self, *args):
        return self.fn(self.graphdef, *args, **self.static)

    def lower(self, *args):
        return self.fn.lower(self.graphdef, *args, **self.static)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def rollout_programs(section: OnPolicySection, bundle, rows: int) -> list[AotProgram]:
    """Prefill and decode loop of a rollout of ``rows`` completions (``section``'s prompt
    and completion lengths, G samples per prompt) in the decode preset on
    ``bundle.mesh``."""
    mesh, G, M = bundle.mesh, section.num_generations, section.max_completion_length
    ds = decode_sharding(mesh)
    params = _abstract(bundle.params, ds.params(bundle.params))
    B, P = rows // G, bucket_length(section.max_prompt_length)
    ids = jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=ds.rows(2, B))
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh))
    on_tpu = mesh.devices.flat[0].platform == "tpu"
    static = dict(sampler=section.rollout().sampler(), max_new_tokens=M, eos_ids=(0,),
                  pad_id=0, shardings=ds)
    pre = Bound(prefill, bundle.graphdef, {**static, "num_samples": G})
    pre_args = (params, ids, ids, rng)
    shapes = jax.eval_shape(pre, *pre_args)
    # The loop carry as the prefill leaves it: rows over the batch axes, the cache by
    # CACHE_AXES (what `prefill` constrains it to), counters and key replicated.
    rows_sh = lambda x: ds.rows(x.ndim, rows) if x.ndim else replicated(mesh)  # noqa: E731
    state_sh = dataclasses.replace(jax.tree.map(rows_sh, shapes), cache=ds.cache(shapes.cache),
                                   rng=replicated(mesh))
    state = _abstract(shapes, state_sh)
    loop = Bound(decode, bundle.graphdef, {**static, "layer_loop": "scan" if on_tpu else "unroll"})
    m = bundle.model_cfg
    return [
        AotProgram(f"rollout prefill ({B} prompts x {P} tokens)", pre, pre_args,
                   float(decoder_forward_flops(m, B, P))),
        AotProgram(f"rollout decode ({rows} rows x {M} new tokens, cache {P + M - 1} slots)",
                   loop, (params, state), float(decoder_forward_flops(m, rows, 1) * M)),
    ]


def full_rows(rows: int, prompt: int, completion: int) -> layout.TokenRows:
    """Flat rollout rows of ``prompt`` + ``completion`` tokens, every token real: the
    shapes a step trains on."""
    ones = lambda w: np.ones((rows, w), np.int32)  # noqa: E731
    return layout.rollout_sequences(ones(prompt), ones(prompt), ones(completion),
                                    ones(completion))


def train_step_program(program, batch, batch_sh, bundle, *, rows: int, length: int,
                       forwards: int = 0) -> AotProgram:
    """The train step of ``program`` (``engine.build.TrainProgram``) on ``batch`` (host
    arrays of the step's shapes) placed as ``batch_sh``."""
    args = (program.trainable.state, _abstract(batch, batch_sh))
    return AotProgram("train step", program.step_fn, args,
                      train_step_flops(bundle.model_cfg, rows, length, forwards=forwards))
