"""The critic of PPO-style algorithms: a value head on the policy.

Axis legend: R rows, S tokens per row, C completion tokens, E hidden size.

A linear map (``nnx.Linear(E, 1)``) of the policy's final hidden state at each token, its
own param group beside the decoder's (TRL's older ``AutoModelForCausalLMWithValueHead``, and
the ReFT paper's setup): one decoder forward gives the completion tokens' log-probs and
their values.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxpt.engine.logprobs import hidden_token_logprobs
from jaxpt.rl.layout import TokenRows, completion_logprobs


def init_value_head(hidden_size: int, seed: int):
    """(graphdef, params) of the value head: ``nnx.Linear(E, 1)``, LeCun-normal kernel, zero
    bias, float32."""
    graphdef, head = nnx.split(nnx.Linear(hidden_size, 1, rngs=nnx.Rngs(seed)))
    return graphdef, head.to_pure_dict()


def policy_and_values(model, head, rows: TokenRows, *, impl: str, temperature: float,
                      with_entropy: bool = False, extra_value: bool = False):
    """(logprobs_RC, entropy_RC | None, values_RC) of the completion tokens from one forward
    of the decoder; value t is the head at the hidden state that predicts token t (the state
    before it). ``extra_value``: values [R, C + 1], the last one the state after token C-1
    (the bootstrap value of a truncated row)."""
    mask_RC = rows.completion_mask > 0
    C, S = mask_RC.shape[1], rows.input_ids.shape[1]
    P = S - C
    hidden_BTE, _ = model(rows.input_ids, rows.positions, rows.segment_ids)
    lp_RS, ent_RS, _ = hidden_token_logprobs(
        hidden_BTE, model.lm_head, rows.targets, impl=impl, temperature=temperature,
        with_entropy=with_entropy, valid_BT=jnp.pad(mask_RC, ((0, 0), (P - 1, 1))))
    width = C + 1 if extra_value else C
    values = head(hidden_BTE[:, P - 1:P - 1 + width].astype(jnp.float32))[..., 0]
    ent_RC = None if ent_RS is None else completion_logprobs(ent_RS, C)
    return completion_logprobs(lp_RS, C), ent_RC, values
