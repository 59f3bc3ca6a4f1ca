"""The programs of an on-policy run for ``jaxpt plan --compile``: the rollout's prefill and
decode loop (the KV cache included) and the train step on a rollout batch, on abstract
inputs that carry their shardings, so XLA's compiler for the target (a TPU slice) reports
their per-device memory.

Axis legend: B prompts of a rollout, G samples per prompt, R = B*G rows, P prompt width,
C completion width (``max_completion_length``).

RFT samples and evaluates through ``jaxpt.sampling.generate`` without the decode preset
(:func:`sampling_programs` with no shardings).

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

from jaxpt.engine.aot import AotProgram, compile_lowered, train_step_flops
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
    G = section.num_generations
    return sampling_programs(bundle, "rollout", prompts=rows // G,
                             prompt_length=section.max_prompt_length, num_samples=G,
                             max_new_tokens=section.max_completion_length,
                             sampler=section.rollout().sampler(),
                             shardings=decode_sharding(bundle.mesh))


def sampling_programs(bundle, what: str, *, prompts: int, prompt_length: int,
                      num_samples: int, max_new_tokens: int, sampler,
                      shardings=None) -> list[AotProgram]:
    """Prefill and decode loop of one ``jaxpt.sampling.generate`` call: B = ``prompts``
    prompts of ``prompt_length`` tokens (bucketed, as ``generate`` pads them), R = B x
    ``num_samples`` rows of ``max_new_tokens`` new tokens; names start with ``what``.

    ``shardings``: the decode preset (``jaxpt.sharding.DecodeSharding``), as an on-policy
    rollout decodes. None: as ``generate`` runs without one (RFT's rejection sampling, its
    held-out evaluation): the params in their training shardings, the prompts replicated,
    and the loop carry where the compiled prefill leaves it (the compiler's choice, read from
    the prefill compiled here). Prompts of one length are not packed (``pack_prompts``
    takes no fewer rows), so the padded prefill is the one that runs."""
    mesh, M = bundle.mesh, max_new_tokens
    B, P, R = prompts, bucket_length(prompt_length), prompts * num_samples
    if shardings is None:
        params = bundle.params
        ids = jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=replicated(mesh))
    else:
        params = _abstract(bundle.params, shardings.params(bundle.params))
        ids = jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=shardings.rows(2, B))
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh))
    on_tpu = mesh.devices.flat[0].platform == "tpu"
    static = dict(sampler=sampler, max_new_tokens=M, eos_ids=(0,), pad_id=0,
                  shardings=shardings)
    pre = Bound(prefill, bundle.graphdef, {**static, "num_samples": num_samples})
    pre_args = (params, ids, ids, rng)
    shapes = jax.eval_shape(pre, *pre_args)
    pre_compiled = None
    if shardings is None:
        try:
            pre_compiled = compile_lowered(pre.lower(*pre_args))
            state_sh = pre_compiled.output_shardings
        except Exception:  # noqa: BLE001 - compile_all reports the prefill's own error
            state_sh = jax.tree.map(lambda _: replicated(mesh), shapes)
    else:
        # The loop carry as the prefill leaves it: rows over the batch axes, the cache by
        # CACHE_AXES (what `prefill` constrains it to), counters and key replicated.
        rows_sh = lambda x: shardings.rows(x.ndim, R) if x.ndim else replicated(mesh)  # noqa: E731
        state_sh = dataclasses.replace(jax.tree.map(rows_sh, shapes),
                                       cache=shardings.cache(shapes.cache),
                                       rng=replicated(mesh))
    state = _abstract(shapes, state_sh)
    loop = Bound(decode, bundle.graphdef, {**static, "layer_loop": "scan" if on_tpu else "unroll"})
    m = bundle.model_cfg
    return [
        AotProgram(f"{what} prefill ({B} prompts x {P} tokens)", pre, pre_args,
                   float(decoder_forward_flops(m, B, P)), compiled=pre_compiled),
        AotProgram(f"{what} decode ({R} rows x {M} new tokens, cache {P + M - 1} slots)",
                   loop, (params, state), float(decoder_forward_flops(m, R, 1) * M)),
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
