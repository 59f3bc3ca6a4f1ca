"""Weights in and out: Hugging Face safetensors and GGUF into jaxpt params, and back out.

Every source is read as Hugging Face tensor names in Hugging Face layout (GGUF names are
translated and llama.cpp's q/k row permutation undone), then converted to jaxpt's layout
one parameter at a time and placed straight into its target sharding with
`jax.make_array_from_callback`: the host holds one parameter at a time, never a second
full copy of the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import Decoder, abstract_model
from jaxpt.tree import path_names, path_str


class WeightsError(ValueError):
    """A checkpoint jaxpt cannot load; the message names the file and the tensor."""


# -- Tensor sources (Hugging Face names, Hugging Face layout) -------------------------------


class SafetensorsSource:
    """A local Hugging Face checkpoint dir: one `model.safetensors` or shards + index."""

    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise WeightsError(f"{self.dir}: no *.safetensors files and no index")
            weight_map = None
        self._handles = {}
        self._where = {}
        for name in files:
            path = self.dir / name
            if not path.exists():
                raise WeightsError(f"{index}: shard {name} is missing")
            handle = safe_open(str(path), framework="numpy")
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self._where:
                    raise WeightsError(
                        f"{self.dir / name}: tensor {key!r} listed in index is missing"
                    )
        self.description = str(self.dir)

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise WeightsError(f"{self.description}: missing tensor {name!r}")
        return self._handles[self._where[name]].get_tensor(name)


# GGUF tensor names -> Hugging Face names (per layer `blk.{i}.` -> `model.layers.{i}.`).
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
SUPPORTED_GGUF_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q6_K",
    "Q4_K",
    "Q5_K",
)


def _hf_name_from_gguf(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if rest in _GGUF_LAYER:
            return f"model.layers.{idx}.{_GGUF_LAYER[rest]}"
    return None


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of q/k rows (interleaved RoPE pairs)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """A GGUF file, dequantized per tensor to fp32 on read."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.exists():
            raise WeightsError(f"{self.path}: GGUF file not found")
        self.reader = gguf.GGUFReader(str(self.path))
        self.arch = gguf_field(self.reader, "general.architecture")
        self._tensors = {}
        for t in self.reader.tensors:
            hf = _hf_name_from_gguf(t.name)
            if hf is not None:
                self._tensors[hf] = t
        self.description = str(self.path)
        self._n_heads = gguf_field(self.reader, f"{self.arch}.attention.head_count")
        self._n_kv = (
            gguf_field(self.reader, f"{self.arch}.attention.head_count_kv") or self._n_heads
        )

    def has(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors.get(name)
        if t is None:
            raise WeightsError(f"{self.description}: missing tensor {name!r}")
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED_GGUF_TYPES:
            raise WeightsError(
                f"{self.description}: tensor {t.name!r} has quantization type {qtype}, "
                f"which jaxpt does not dequantize (supported: {', '.join(SUPPORTED_GGUF_TYPES)})"
            )
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(shape)
        if self.arch == "llama":
            if name.endswith("q_proj.weight"):
                w = _unpermute_rows(w, self._n_heads)
            elif name.endswith("k_proj.weight"):
                w = _unpermute_rows(w, self._n_kv)
        return w


def gguf_field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def gguf_hf_config(path: str | Path) -> dict:
    """A Hugging Face-style config dict from a GGUF file's metadata."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = gguf_field(reader, "general.architecture")
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(arch)
    if model_type is None:
        raise WeightsError(
            f"{path}: general.architecture={arch!r} is not supported "
            "(supported: llama, qwen2, qwen3)"
        )
    f = lambda k, d=None: v if (v := gguf_field(reader, f"{arch}.{k}")) is not None else d  # noqa: E731
    names = {t.name for t in reader.tensors}
    vocab = f("vocab_size") or len(gguf_field(reader, "tokenizer.ggml.tokens"))
    n_heads = f("attention.head_count")
    hidden = f("embedding_length")
    head_dim = f("attention.key_length") or f("rope.dimension_count") or hidden // n_heads
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    cfg = {
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(f("feed_forward_length")),
        "num_hidden_layers": int(f("block_count")),
        "num_attention_heads": int(n_heads),
        "num_key_value_heads": int(f("attention.head_count_kv", n_heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(f("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(f("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(f("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
    }
    scaling_type = f("rope.scaling.type")
    if scaling_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(f("rope.scaling.factor"))}
    elif "rope_freqs.weight" in names:
        raise WeightsError(
            f"{path}: llama3 rope_freqs tables in GGUF are not supported yet; "
            "load the Hugging Face checkpoint instead"
        )
    return cfg


# -- jaxpt layout -------------------------------------------------------------------------


# jaxpt per-layer param -> (Hugging Face suffix, converter from HF layout).
def _layer_table(cfg: ModelConfig) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    E, N, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    table = {
        "attn_norm_E": ("input_layernorm.weight", lambda w: w),
        "wq_END": ("self_attn.q_proj.weight", lambda w: w.T.reshape(E, N, D)),
        "wk_EKD": ("self_attn.k_proj.weight", lambda w: w.T.reshape(E, K, D)),
        "wv_EKD": ("self_attn.v_proj.weight", lambda w: w.T.reshape(E, K, D)),
        "wo_NDE": ("self_attn.o_proj.weight", lambda w: w.T.reshape(N, D, E)),
        "mlp_norm_E": ("post_attention_layernorm.weight", lambda w: w),
        "w_gate_EF": ("mlp.gate_proj.weight", lambda w: w.T),
        "w_up_EF": ("mlp.up_proj.weight", lambda w: w.T),
        "w_down_FE": ("mlp.down_proj.weight", lambda w: w.T),
    }
    if cfg.attention_bias:
        table["bq_ND"] = ("self_attn.q_proj.bias", lambda w: w.reshape(N, D))
        table["bk_KD"] = ("self_attn.k_proj.bias", lambda w: w.reshape(K, D))
        table["bv_KD"] = ("self_attn.v_proj.bias", lambda w: w.reshape(K, D))
    if cfg.qk_norm:
        table["q_norm_D"] = ("self_attn.q_norm.weight", lambda w: w)
        table["k_norm_D"] = ("self_attn.k_norm.weight", lambda w: w)
    return table


def _global_table(cfg: ModelConfig) -> dict[str, str]:
    table = {"embed_VE": "model.embed_tokens.weight", "final_norm_E": "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        table["lm_head_VE"] = "lm_head.weight"
    return table


def _np_dtype(dtype) -> np.dtype:
    return (
        np.dtype(ml_dtypes.bfloat16)
        if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16)
        else np.dtype(dtype)
    )


def load_params(source, cfg: ModelConfig, shardings=None) -> nnx.State:
    """Read `source` into jaxpt's param state. `shardings` is a state-shaped tree of
    `jax.sharding.Sharding` (default: the first device); each parameter is built directly
    in its sharding, one host slice at a time."""
    graphdef, abstract = nnx.split(abstract_model(cfg))
    layer_table, global_table = _layer_table(cfg), _global_table(cfg)
    expected = set(layer_table) | set(global_table)
    device = jax.devices()[0]
    single = jax.sharding.SingleDeviceSharding(device)
    shard_leaves = None
    if shardings is not None:
        shard_leaves = {path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}

    def host_tensor(name: str, layer: int | None) -> np.ndarray:
        if layer is None:
            hf_name = global_table[name]
            convert = lambda w: w  # noqa: E731
        else:
            suffix, convert = layer_table[name]
            hf_name = f"model.layers.{layer}.{suffix}"
        w = source.get(hf_name)
        return convert(np.asarray(w))

    def build(path, leaf):
        keys = path_names(path)
        name = keys[-1]
        if name not in expected:
            raise WeightsError(f"{source.description}: jaxpt param {path_str(path)} has no source")
        in_layers = keys[0] == "layers"
        dtype = _np_dtype(leaf.dtype)
        sharding = shard_leaves.get(path_str(path), single) if shard_leaves else single

        def check(arr, want, label):
            if arr.shape != tuple(want):
                raise WeightsError(
                    f"{source.description}: tensor for {label} has shape {arr.shape}, "
                    f"expected {tuple(want)} from the config"
                )
            return arr

        def callback(index):
            if not in_layers:
                full = check(host_tensor(name, None), leaf.shape, name)
                return full[index].astype(dtype)
            layer_idx = range(*index[0].indices(leaf.shape[0]))
            rest = index[1:]
            parts = [
                check(host_tensor(name, i), leaf.shape[1:], f"layer {i} {name}")[rest].astype(dtype)
                for i in layer_idx
            ]
            return np.stack(parts)

        return jax.make_array_from_callback(leaf.shape, sharding, callback)

    leaves = jax.tree_util.tree_map_with_path(build, abstract)
    return leaves


def load_model(source, cfg: ModelConfig, shardings=None) -> Decoder:
    graphdef, _ = nnx.split(abstract_model(cfg))
    return nnx.merge(graphdef, load_params(source, cfg, shardings))


# -- Export --------------------------------------------------------------------------------


def export_hf(
    model_or_params,
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer=None,
    dtype: str | None = None,
    max_shard_bytes: int = 2 << 30,
    overwrite: bool = False,
    protect: tuple[str | Path, ...] = (),
    extra_tensors: dict[str, np.ndarray] | None = None,
    config_updates: dict | None = None,
    lm_head: bool = True,
) -> Path:
    """Write a Hugging Face checkpoint dir (config.json, safetensors shards + index,
    tokenizer files) that `transformers.AutoModelForCausalLM.from_pretrained` loads.
    A head beside the decoder (``jaxpt.models.scalar_head``) adds ``extra_tensors`` (HF
    names), ``config_updates`` to config.json and leaves out the LM head (``lm_head``).
    Written into a temp dir beside ``out_dir`` and renamed into place, so a crash leaves
    nothing half-written. An existing non-empty ``out_dir`` is an error unless
    ``overwrite``; even then `check_export_target` refuses the current directory, its
    parents, run dirs and ``protect`` (and their parents)."""
    import shutil
    import tempfile

    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    replaces = check_export_target(out_dir, overwrite=overwrite, protect=protect)
    params = (
        nnx.split(model_or_params)[1]
        if isinstance(model_or_params, nnx.Module)
        else model_or_params
    )
    out_dtype = _np_dtype(dtype_name_to_np(dtype or cfg.param_dtype))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tensors: dict[str, np.ndarray] = {}
        flat = {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}

        def get(name):
            return np.asarray(jax.device_get(flat[name]))

        E = cfg.hidden_size
        for name, hf in _global_table(cfg).items():
            if lm_head or name != "lm_head_VE":
                tensors[hf] = get(name)
        inverse = {
            "wq_END": lambda w: w.reshape(E, -1).T,
            "wk_EKD": lambda w: w.reshape(E, -1).T,
            "wv_EKD": lambda w: w.reshape(E, -1).T,
            "wo_NDE": lambda w: w.reshape(-1, E).T,
            "w_gate_EF": lambda w: w.T,
            "w_up_EF": lambda w: w.T,
            "w_down_FE": lambda w: w.T,
            "bq_ND": lambda w: w.reshape(-1),
            "bk_KD": lambda w: w.reshape(-1),
            "bv_KD": lambda w: w.reshape(-1),
        }
        for name, (suffix, _) in _layer_table(cfg).items():
            stacked = get(f"layers.{name}")
            for i in range(cfg.num_layers):
                w = inverse.get(name, lambda w: w)(stacked[i])
                tensors[f"model.layers.{i}.{suffix}"] = w
        tensors.update(extra_tensors or {})
        tensors = {k: np.ascontiguousarray(v.astype(out_dtype)) for k, v in tensors.items()}

        shards, current, size = [], {}, 0
        for k in sorted(tensors):
            nbytes = tensors[k].nbytes
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[k] = tensors[k]
            size += nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(v.nbytes for v in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        hf_cfg = cfg.to_hf_dict()
        hf_cfg["torch_dtype"] = (
            "bfloat16" if out_dtype == np.dtype(ml_dtypes.bfloat16) else "float32"
        )
        hf_cfg.update(config_updates or {})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _swap_into_place(tmp, out_dir, replaces)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _looks_like_run_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists()


def check_export_target(
    out_dir: str | Path, *, overwrite: bool = False, protect: tuple[str | Path, ...] = ()
) -> bool:
    """Whether writing an export to ``out_dir`` replaces an existing dir (True) or
    creates it (False). Raises ValueError where the export would destroy something:
    a non-empty dir without ``overwrite``, a file, and always (overwrite or not) the
    current directory or a parent of it, a training run dir, or any of ``protect``
    (the run being exported) or their parents."""
    out = Path(out_dir)
    if not out.exists():
        return False
    if not out.is_dir():
        raise ValueError(f"{out}: export target exists and is not a directory")
    real = out.resolve()
    guarded = [Path.cwd().resolve()] + [Path(p).resolve() for p in protect]
    for g in guarded:
        if real == g or real in g.parents:
            what = "the current directory" if g == guarded[0] else g
            raise ValueError(
                f"{out}: refusing to export into {what} or a directory that contains it; "
                "choose a new output dir"
            )
    in_checkpoints = any(
        p.name == "checkpoints" and _looks_like_run_dir(p.parent) for p in (real, *real.parents)
    )
    if in_checkpoints or _looks_like_run_dir(real):
        raise ValueError(
            f"{out}: is a training run dir (checkpoints/ or metrics.jsonl inside) or part of "
            "its checkpoints; refusing to replace it; choose a new output dir"
        )
    if not any(out.iterdir()):
        return True
    if not overwrite:
        raise ValueError(
            f"{out}: exists and is not empty; choose a new output dir or pass --overwrite "
            "to replace it"
        )
    return True


def _swap_into_place(tmp: Path, out_dir: Path, replaces: bool) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; an old ``out_dir`` is moved aside first
    and removed only once the new one is in place."""
    import shutil
    import tempfile

    if not replaces:
        os.replace(tmp, out_dir)  # fails (no data lost) if out_dir appeared meanwhile
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    os.replace(out_dir, old / "dir")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old / "dir", out_dir)
        old.rmdir()
        raise
    shutil.rmtree(old)


def dtype_name_to_np(name: str):
    from jaxpt.models.config import dtype_from_name

    return dtype_from_name(name)
