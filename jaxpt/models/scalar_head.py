"""A scalar head on the decoder: one score per sequence, as Hugging Face's
``XForSequenceClassification`` with ``num_labels: 1`` computes it, and that checkpoint in
and out.

Axis legend: B rows, T tokens, E hidden.

The head is ``score`` [1, E] (Hugging Face layout, no bias), applied to the decoder's final
hidden state (after the final norm) at each row's LAST NON-PAD token. Which token that is
follows transformers' ``GenericForSequenceClassification.forward``
(``transformers/modeling_layers.py``): the rightmost position whose id is not
``config.pad_token_id``, ``argmax(arange(T) * (ids != pad))`` (right or left padding
alike). A row that ends with a real token equal to the pad id (pad = EOS, as in SmolLM2)
is therefore read one token earlier, in training as in transformers: the rule is the same
on both sides, so an exported model scores what the trained one scored.

Out: :func:`export_reward_model` writes the decoder's tensors without the LM head, plus
``score.weight``, with ``architectures: [<Llama|Qwen2|Qwen3>ForSequenceClassification]``,
``num_labels: 1`` and ``pad_token_id``, which ``AutoModelForSequenceClassification``
loads. In: :func:`load_reward_model` reads such a checkpoint (or any Hugging Face dir with
a ``score.weight`` [1, E]) back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.models.config import ModelConfig

SCORE = "score_1E"  # the head's only parameter, [num_labels = 1, E]
HF_SCORE = "score.weight"


def init_score_head(cfg: ModelConfig, seed: int = 0) -> dict[str, jax.Array]:
    """``{"score_1E": normal(0, 0.02)}`` in the model's param dtype: transformers'
    ``_init_weights`` for a ``nn.Linear`` (``initializer_range`` 0.02)."""
    w = 0.02 * jax.random.normal(jax.random.PRNGKey(seed), (1, cfg.hidden_size), jnp.float32)
    return {SCORE: w.astype(cfg.weight_dtype)}


def score_head_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    return {SCORE: jax.ShapeDtypeStruct((1, cfg.hidden_size), cfg.weight_dtype)}


def last_token_index(input_ids_BT: jax.Array, pad_id: int) -> jax.Array:
    """[B] int32: each row's rightmost position whose id is not ``pad_id`` (0 for a row of
    padding only), transformers' rule for sequence classification."""
    T = input_ids_BT.shape[-1]
    not_pad_BT = (input_ids_BT != pad_id).astype(jnp.int32)
    return jnp.argmax(jnp.arange(T, dtype=jnp.int32) * not_pad_BT, axis=-1).astype(jnp.int32)


def sequence_scores(
    model, head: dict[str, jax.Array], input_ids_BT, positions_BT, segment_ids_BT, *, pad_id: int
) -> jax.Array:
    """fp32 [B]: the head's score of each row's last non-pad token (module doc). Rows are
    the SFT row contract (right-padded, padding segment 0)."""
    hidden_BTE, _ = model(input_ids_BT, positions_BT, segment_ids_BT)
    last_B = last_token_index(input_ids_BT, pad_id)
    hidden_BE = jnp.take_along_axis(hidden_BTE, last_B[:, None, None], axis=1)[:, 0]
    return jnp.einsum(
        "be,e->b", hidden_BE.astype(jnp.float32), head[SCORE][0].astype(jnp.float32)
    )


def resolve_pad_id(tokenizer) -> int:
    """The pad id a reward model reads rows with: the tokenizer's pad token, else its EOS
    (TRL's ``RewardTrainer``: ``pad_token or eos_token``)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError(
            "reward model: the tokenizer has neither a pad token nor an EOS token; "
            "sequence scores are read at the last non-pad token, so one is needed"
        )
    return int(pad)


def sequence_classification_config(cfg: ModelConfig, pad_id: int) -> dict[str, Any]:
    """The ``config.json`` entries that make a causal-LM config a one-label
    ``XForSequenceClassification`` one."""
    arch = cfg.to_hf_dict()["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")
    return {
        "architectures": [arch],
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "pad_token_id": int(pad_id),
    }


def export_reward_model(
    params, head, cfg: ModelConfig, out_dir, *, pad_id: int, tokenizer=None, **kw
) -> Path:
    """Write decoder ``params`` + ``head`` as a Hugging Face sequence-classification
    checkpoint (module doc); ``kw`` go to ``export_hf`` (``dtype``, ``overwrite``, ...)."""
    from jaxpt.models.weights import export_hf

    score = np.asarray(jax.device_get(head[SCORE]))
    return export_hf(
        params,
        cfg,
        out_dir,
        tokenizer=tokenizer,
        extra_tensors={HF_SCORE: score},
        config_updates=sequence_classification_config(cfg, pad_id),
        lm_head=False,
        **kw,
    )


@dataclasses.dataclass
class RewardModel:
    """A loaded reward model: decoder ``graphdef`` + ``params``, ``head``, its config,
    tokenizer and the pad id rows are read with."""

    graphdef: Any
    params: dict
    head: dict
    cfg: ModelConfig
    tokenizer: Any
    pad_id: int

    def model(self):
        return nnx.merge(self.graphdef, self.params)


def load_reward_model(path: str | Path, *, compute_dtype: str = "float32") -> RewardModel:
    """A Hugging Face sequence-classification checkpoint dir (``score.weight`` [1, E]) ->
    :class:`RewardModel` on the first device. The pad id is ``config.json``'s
    ``pad_token_id`` (what transformers reads rows with), else the tokenizer's."""
    import json

    from jaxpt.models import hub
    from jaxpt.models.decoder import abstract_model
    from jaxpt.models.weights import WeightsError, load_params

    resolved = hub.resolve(path)
    if resolved.kind != "hf":
        raise ValueError(f"{path}: a reward model is a Hugging Face checkpoint dir, not a GGUF")
    hf = json.loads((resolved.path / "config.json").read_text())
    if int(hf.get("num_labels", len(hf.get("id2label", {})) or 1)) != 1:
        raise ValueError(
            f"{resolved.path / 'config.json'}: num_labels={hf.get('num_labels')}; a reward "
            "model has one label (one score per sequence)"
        )
    # The LM head is never used and a sequence-classification checkpoint has none: load
    # the decoder as if tied, which reads no lm_head tensor.
    cfg = resolved.config(compute_dtype=compute_dtype, tie_word_embeddings=True)
    source = resolved.source()
    if not source.has(HF_SCORE):
        raise WeightsError(
            f"{resolved.path}: no {HF_SCORE!r} tensor; not a sequence-classification "
            "checkpoint (export a reward run with `jaxpt export`)"
        )
    score = np.asarray(source.get(HF_SCORE))
    if score.shape != (1, cfg.hidden_size):
        raise WeightsError(
            f"{resolved.path}: {HF_SCORE} has shape {score.shape}, expected "
            f"(1, {cfg.hidden_size}) (one label, hidden_size {cfg.hidden_size})"
        )
    params = load_params(source, cfg)
    params = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    graphdef, _ = nnx.split(abstract_model(cfg))
    tokenizer = resolved.tokenizer()
    pad_id = hf.get("pad_token_id")
    pad_id = resolve_pad_id(tokenizer) if pad_id is None else int(pad_id)
    head = {SCORE: jnp.asarray(score.astype(np.dtype(cfg.weight_dtype)))}
    return RewardModel(graphdef, params, head, cfg, tokenizer, pad_id)
