"""Model configuration: one decoder config for Llama, SmolLM2, Qwen2 and Qwen3.

The architecture fields mirror a Hugging Face `config.json`; `param_dtype`, `compute_dtype`,
`remat` and the attention kernel (with the mesh it is compiled for) are run-time choices
that do not change the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxpt.kernels.attention import IMPLS as ATTENTION_IMPLS

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
REMAT_POLICIES = ("none", "attention", "full", "dots")
_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
}


class ConfigError(ValueError):
    """A model config that jaxpt cannot build; the message names the file and key."""


def dtype_from_name(name: str | Any, *, what: str = "dtype"):
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in _DTYPES:
        raise ConfigError(f"{what}={name!r} is not supported; use one of {sorted(_DTYPES)}")
    return jnp.dtype(_DTYPES[name])


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Hugging Face `rope_scaling` as a sorted tuple of items (hashable, so the config
    # can be a static jit argument); None means plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Run-time choices.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    # auto | xla | splash | cudnn (jaxpt/kernels/attention.py): the attention of the
    # forward without a KV cache; auto picks by `mesh`'s devices (None: xla).
    attention: str = "auto"
    # The mesh programs are compiled for (a jax.sharding.Mesh, abstract TPU devices too):
    # it picks `auto`'s kernel and splash runs in shard_map over it.
    mesh: Any = None
    attention_interpret: bool = False  # splash in Pallas interpret mode (CPU tests)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat={self.remat!r}; use one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention={self.attention!r}; use one of {ATTENTION_IMPLS}")
        dtype_from_name(self.param_dtype, what="param_dtype")
        dtype_from_name(self.compute_dtype, what="compute_dtype")

    @property
    def dtype(self):
        return dtype_from_name(self.compute_dtype)

    @property
    def weight_dtype(self):
        return dtype_from_name(self.param_dtype)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # -- Hugging Face config.json -------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json", **overrides):
        model_type = hf.get("model_type")
        if model_type is None:
            raise ConfigError(f"{source}: missing key 'model_type'")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key):
            if key not in hf:
                raise ConfigError(f"{source}: missing key {key!r}")
            return hf[key]

        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = hf.get("head_dim") or hidden // num_heads
        rope_scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in ("default", "llama3", "linear"):
                raise ConfigError(
                    f"{source}: rope_scaling type {rope_type!r} is not supported "
                    "(supported: default, llama3, linear)"
                )
            theta = rope_scaling.get("rope_theta")
            rope_scaling = {k: v for k, v in rope_scaling.items() if k != "rope_theta"}
            if rope_type == "default":
                rope_scaling = None
            if theta is not None and "rope_theta" not in hf:
                hf = {**hf, "rope_theta": theta}
        eos = hf.get("eos_token_id")
        eos_ids = (
            tuple(eos) if isinstance(eos, list | tuple) else ((eos,) if eos is not None else ())
        )
        if model_type == "qwen2":
            attention_bias = True
        else:
            attention_bias = bool(hf.get("attention_bias", False))
        kwargs = dict(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (silu)")
        if hf.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_hf_file(cls, path: str | Path, **overrides) -> ModelConfig:
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(hf, source=str(path), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        arch = {
            "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }[self.model_type]
        hf = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.param_dtype,
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            ids = list(self.eos_token_ids)
            hf["eos_token_id"] = ids[0] if len(ids) == 1 else ids
        return hf

    # -- sizes ----------------------------------------------------------------------------

    def num_params(self) -> int:
        E, F, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        N, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        attn = E * N * D + 2 * E * K * D + N * D * E
        if self.attention_bias:
            attn += N * D + 2 * K * D
        if self.qk_norm:
            attn += 2 * D
        layer = attn + 3 * E * F + 2 * E
        embed = V * E * (1 if self.tie_word_embeddings else 2)
        return L * layer + embed + E


def decoder_forward_flops(cfg: ModelConfig, rows: int, length: int) -> int:
    """Forward FLOPs of the decoder layers (no LM head) over ``rows`` rows of ``length``
    tokens with dense attention: what a batch layout costs, to choose between layouts."""
    E, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    qkvo = E * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    per_token = 2 * L * (qkvo + 3 * E * F)
    per_key = 4 * L * cfg.num_heads * cfg.head_dim  # QK^T and PV, per query and key
    return rows * length * (per_token + per_key * length)
