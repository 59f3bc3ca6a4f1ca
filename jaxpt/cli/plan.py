"""`jaxpt plan CONFIG [key.sub=value ...] [--devices N]`: per-device memory of a training run,
before running it, for this machine or for a pod you do not have.

Nothing is loaded: the model config is read (packaged name, .gguf, checkpoint dir, a
``config.json`` path, or a hub id found in the local Hugging Face cache; ``--model-config``
overrides), parameters are ``jax.eval_shape``'d, and their shardings come from
``jaxpt.sharding.param_shardings`` over an abstract mesh of ``--devices`` devices shaped by the
config's ``mesh:`` (overridable like any key: ``mesh.fsdp=8 mesh.tensor=2``). A dimension that
does not divide its mesh axes raises the same error training would.

Axis legend: B rows per optimizer step (``train.batch_size``), k = ``train.grad_accum``,
B/k rows per micro-batch, S sequences per row (2 for DPO: chosen and rejected, else 1),
T tokens per sequence (``data.max_length``; GRPO: ``grpo.max_prompt_length +
grpo.max_completion_length``), P_b = data x fsdp (the mesh axes the batch is split over),
t = the tensor axis size, b = B / (k P_b) rows per device, n = b S T tokens per device,
E hidden, F mlp, N heads, K kv heads, D head_dim, L layers, V vocab, with N_t = N/t,
K_t = K/t, F_t = F/t, V_t = V/t where the tensor axis splits them; c = bytes of the compute
dtype, p = bytes of the param dtype.

Exact (from the shapes and shardings; per device = the shard each device holds):

* params: every weight in ``model.param_dtype`` (the master copy; with bf16 params there is
  no separate fp32 master). With LoRA these are the frozen base weights.
* frozen: LoRA -> 0 extra (the base is the params line); full fine-tuning with a reference
  model (DPO losses that need one without ``precompute_ref_logps``, GRPO with ``beta > 0``)
  -> one more copy of the params.
* optimizer: AdamW's ``mu`` and ``nu`` of the *trained* params (LoRA: adapters only), in
  their dtype and sharding, plus optax's step counters: ``jax.eval_shape`` of the run's
  own optimizer.
* gradients: one copy of the trained params; two when k > 1 (the accumulator and the
  micro-batch's gradient).

Estimated (what XLA keeps alive; real buffers can differ by its fusion and scheduling):

* activations kept for the backward pass, per layer:
  ``none``: n c (4E + 2 N_t D + 2 K_t D + 3 F_t) + b S N_t T^2 c
  (layer input, the two norm outputs, residual; q, k, v, attention output; gate, up,
  silu(gate) * up; the softmax probabilities), times L;
  ``dots``: n c (3E + N_t D + 2 K_t D + 2 F_t) per layer (layer input and the outputs of
  the weight matmuls) + one layer recomputed in the backward (the ``none`` amount);
  ``full``: n c E per layer (the layer input) + one layer recomputed;
  plus the attention mask b S T^2 (1 byte) and the final hidden states 2 n E c.
* log-prob core: ``auto`` / ``chunked`` / ``pallas`` keep 3 n fp32 values per token (log-p,
  log-sum-exp, entropy) and never the n x V logits; ``reference`` keeps the fp32 logits and
  log-softmax, 2 n V_t 4 bytes (3 with the entropy).
* transient (buffers of one layer or one tile at a time; summed, so an upper bound):
  the fp32 attention scores of one layer b S N_t T^2 4; with fsdp > 1 or c != p, one
  layer's weights as the layer uses them (gathered over fsdp, in the compute dtype) and
  their gradient before the reduce-scatter, 2 x that; the LM head gathered over fsdp
  V_t E c; the log-prob tiles (chunked: 2 x min(256, n) x min(8192, V_t) x 4); the
  accuracy argmax chunk min(1024, n) V_t 4 when ``train.token_accuracy``; LoRA's merged
  weights W + (alpha/r) A B and their gradient, 2 x the adapted weights' bytes.

On-policy runs (GRPO, PPO, online DPO, distillation) also get the rollout: the KV cache,
the prompts' prefill cache, the decode params and per-token buffers of one rollout, exact
from the decode preset's shardings, and the total while sampling (``plan_rollout``).

Not included: XLA workspace and fragmentation, the eval step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from jaxpt.cli.args import add_config_command

MiB = 2**20


# ----------------------------------------------------------------------------- model


def load_model_config(cfg, model_config: str | None = None):
    """The run's ModelConfig (architecture + the run's dtypes and remat) without weights."""
    from jaxpt.models import hub
    from jaxpt.models.config import ModelConfig

    run = dict(
        param_dtype=cfg.model.param_dtype,
        compute_dtype=cfg.model.compute_dtype,
        remat=cfg.model.remat,
    )
    if model_config:
        return ModelConfig.from_hf_file(model_config, **run)
    name = cfg.model.name
    path = Path(name).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"{cfg.source}: model.name={name!r}: no such config.json")
        return ModelConfig.from_hf_file(path, **run)
    local = path.exists() or name.lower() in hub.PACKAGED_MODELS
    if not local and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return ModelConfig.from_hf_file(_cached_hub_config(name, cfg.source), **run)
    return hub.resolve(name).config(**run)


def _cached_hub_config(repo_id: str, source: str) -> str:
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id, "config.json", local_files_only=True)
    except Exception as e:  # not in the cache, or no huggingface_hub
        raise FileNotFoundError(
            f"{source}: model.name={repo_id!r} is a hub id whose config.json is not in the "
            f"local Hugging Face cache ({type(e).__name__}); pass --model-config "
            "path/to/config.json (the model's Hugging Face config)"
        ) from None


def abstract_params(model_cfg) -> dict:
    """The model's param tree of ShapeDtypeStructs (nothing allocated)."""
    from flax import nnx

    from jaxpt.models.decoder import abstract_model

    _, state = nnx.split(abstract_model(model_cfg))
    return state.to_pure_dict()


# ----------------------------------------------------------------------------- mesh


def plan_mesh(mesh_cfg, n_devices: int):
    """An abstract (data, fsdp, tensor) mesh of ``n_devices``; one axis may be -1 (the rest),
    as ``jaxpt.sharding.make_mesh`` resolves it for real devices."""
    from jax.sharding import AbstractMesh

    from jaxpt.sharding import MESH_AXES, ShardingError

    sizes = {"data": mesh_cfg.data, "fsdp": mesh_cfg.fsdp, "tensor": mesh_cfg.tensor}
    if n_devices < 1:
        raise ShardingError(f"--devices must be >= 1, got {n_devices}")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ShardingError(f"mesh sizes must be positive, one of them may be -1: {sizes}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_devices % known:
            raise ShardingError(
                f"{n_devices} devices do not divide into mesh {sizes} "
                f"(the fixed axes need a multiple of {known})"
            )
        sizes[free[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ShardingError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices, planning for {n_devices}"
        )
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def local_bytes(tree, shardings) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs under ``shardings``."""
    import jax
    import numpy as np

    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        total += math.prod(sh.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def _gathered_layer_bytes(params, shardings, num_layers: int, itemsize: int) -> int:
    """One layer's weights as a device uses them: the stacked layer params divided by L,
    sharded over every mesh axis but fsdp, in a dtype of ``itemsize`` bytes."""
    import jax

    from jaxpt.tree import path_names

    total = 0
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), sh in zip(leaves, jax.tree.leaves(shardings), strict=True):
        if path_names(path)[0] != "layers":
            continue
        elems = math.prod(leaf.shape) // num_layers
        for part in sh.spec:
            for axis in (part,) if isinstance(part, str) else (part or ()):
                if axis != "fsdp":
                    elems //= sh.mesh.shape[axis]
        total += elems * itemsize
    return total


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per device; ``activation_parts`` / ``transient_parts`` itemize the estimates."""

    mesh: dict[str, int]
    n_devices: int
    rows_per_device: int  # b
    seqs_per_row: int  # S
    seq_len: int  # T
    trainable_params: int  # count (LoRA: adapters)
    params: int
    frozen: int
    opt_state: int
    grads: int
    activation_parts: dict[str, int]
    transient_parts: dict[str, int]
    # On-policy runs: what sampling a rollout holds beside the train state
    # (`jaxpt.cli.plan_rollout`); empty otherwise.
    rollout_parts: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def activations(self) -> int:
        return sum(self.activation_parts.values())

    @property
    def transient(self) -> int:
        return sum(self.transient_parts.values())

    @property
    def rollout(self) -> int:
        return sum(self.rollout_parts.values())

    @property
    def rollout_peak(self) -> int:
        """While sampling: the resident train state plus the rollout's buffers."""
        return self.params + self.frozen + self.opt_state + self.rollout if self.rollout else 0

    @property
    def total(self) -> int:
        return (
            self.params
            + self.frozen
            + self.opt_state
            + self.grads
            + self.activations
            + self.transient
        )


def _sequence_shape(cfg) -> tuple[int, int]:
    """(S, T) of the algorithm's train step."""
    if cfg.algorithm == "dpo":
        return 2, cfg.data.max_length
    g = _on_policy_section(cfg)
    if g is not None:
        return 1, g.max_prompt_length + g.max_completion_length
    return 1, cfg.data.max_length


def _on_policy_section(cfg):
    from jaxpt.config import ConfigError
    from jaxpt.rl.config import OnPolicySection

    try:
        sec = cfg.section(cfg.algorithm)
    except ConfigError:
        return None
    return sec if isinstance(sec, OnPolicySection) else None


def _has_reference(cfg) -> bool:
    if cfg.lora.rank > 0:
        return False  # the frozen base is the reference
    if cfg.algorithm == "dpo":
        from jaxpt.losses.dpo import needs_reference

        d = cfg.section("dpo")
        return needs_reference(d) and not d.precompute_ref_logps
    if cfg.algorithm == "grpo":
        return cfg.section("grpo").beta > 0
    if cfg.algorithm == "ppo":
        return cfg.section("ppo").kl_coef > 0
    return cfg.algorithm == "online_dpo"


def plan_memory(cfg, model_cfg, n_devices: int) -> MemoryPlan:
    """Per-device memory of ``cfg``'s train step on ``n_devices`` (see the module doc)."""
    import jax
    import numpy as np

    from jaxpt.cli.plan_rollout import rollout_memory
    from jaxpt.engine import lora as lora_lib
    from jaxpt.engine.state import make_optimizer, shardings_like_params
    from jaxpt.sharding import TRAIN_RULES, ShardingError, batch_divisor, param_shardings

    mesh = plan_mesh(cfg.mesh, n_devices)
    shape = dict(mesh.shape)
    params = abstract_params(model_cfg)
    params_sh = param_shardings(params, mesh)
    params_bytes = local_bytes(params, params_sh)

    spec = lora_lib.LoraSpec.from_config(cfg.lora)
    if spec is not None:
        trained = lora_lib.lora_shapes(params, spec)
        trained_sh = lora_lib.lora_shardings(trained, mesh)
    else:
        trained, trained_sh = params, params_sh
    trained_bytes = local_bytes(trained, trained_sh)
    n_trained = sum(math.prod(x.shape) for x in jax.tree.leaves(trained))
    frozen = params_bytes if _has_reference(cfg) else 0

    tx, _ = make_optimizer(cfg.optim, 1)
    opt = jax.eval_shape(tx.init, trained)
    opt_bytes = local_bytes(opt, shardings_like_params(opt, trained_sh, mesh))
    t = cfg.train
    grads = trained_bytes * (2 if t.grad_accum > 1 else 1)

    # -- activations
    S, T = _sequence_shape(cfg)
    micro = t.batch_size // t.grad_accum
    shards = batch_divisor(mesh, TRAIN_RULES)
    if micro % shards:
        raise ShardingError(
            f"{cfg.source}: batch dimension: train.batch_size / train.grad_accum = {micro} rows "
            f"per micro-batch do not divide over the batch mesh axes data x fsdp = "
            f"{shape['data']} x {shape['fsdp']} = {shards}"
        )
    b = micro // shards
    n = b * S * T
    m = model_cfg
    ts = shape["tensor"]
    split = lambda x: x // ts if x % ts == 0 else x  # noqa: E731  (as the param rules do)
    E, F, D, L, V = m.hidden_size, m.intermediate_size, m.head_dim, m.num_layers, m.vocab_size
    Nt, Kt, Ft, Vt = split(m.num_heads), split(m.num_kv_heads), split(F), split(V)
    c = np.dtype(m.dtype).itemsize
    p = np.dtype(m.weight_dtype).itemsize
    probs = b * S * Nt * T * T * c
    full_layer = n * c * (4 * E + 2 * Nt * D + 2 * Kt * D + 3 * Ft) + probs
    acts: dict[str, int] = {}
    if m.remat == "none":
        acts[f"layers: {L} x saved residuals"] = L * full_layer
    elif m.remat == "attention":  # probabilities recomputed, one layer's at a time
        acts[f"layers: {L} x saved residuals (attention probs recomputed)"] = L * (
            full_layer - probs)
        acts["one layer's attention probs in the backward"] = probs
    else:
        per = n * c * E if m.remat == "full" else n * c * (3 * E + Nt * D + 2 * Kt * D + 2 * Ft)
        acts[f"layers: {L} x saved ({m.remat} remat)"] = L * per
        acts["one layer recomputed in the backward"] = full_layer
    acts["attention mask"] = b * S * T * T
    acts["final hidden states"] = 2 * n * E * c
    impl = t.logprob_impl
    if impl == "reference":
        acts["log-prob core (fp32 logits)"] = (3 if t.with_entropy else 2) * n * Vt * 4
    else:
        acts["log-prob core (per-token stats)"] = 3 * n * 4

    trans: dict[str, int] = {"attention scores (fp32, one layer)": b * S * Nt * T * T * 4}
    if shape["fsdp"] > 1 or c != p:
        layer = _gathered_layer_bytes(params, params_sh, L, c)
        trans["one layer's weights + grads, gathered"] = 2 * layer
    if shape["fsdp"] > 1:
        trans["LM head gathered over fsdp"] = Vt * E * c
    if impl != "reference":
        trans["log-prob tiles"] = 2 * min(256, n) * min(8192, Vt) * 4
    if t.token_accuracy:
        trans["accuracy argmax chunk"] = min(1024, n) * Vt * 4
    if spec is not None:
        adapted = {tuple(names) for names in lora_lib.target_paths(params, spec)}
        trans["LoRA merged weights + grads"] = 2 * _adapted_bytes(params, params_sh, adapted)
    return MemoryPlan(
        mesh=shape,
        n_devices=n_devices,
        rows_per_device=b,
        seqs_per_row=S,
        seq_len=T,
        trainable_params=n_trained,
        params=params_bytes,
        frozen=frozen,
        opt_state=opt_bytes,
        grads=grads,
        activation_parts=acts,
        transient_parts=trans,
        rollout_parts=rollout_memory(cfg, model_cfg, mesh, params, local_bytes),
    )


def _adapted_bytes(params, params_sh, adapted: set[tuple[str, ...]]) -> int:
    import jax
    import numpy as np

    from jaxpt.tree import path_names

    total = 0
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), sh in zip(leaves, jax.tree.leaves(params_sh), strict=True):
        if tuple(path_names(path)) in adapted:
            total += math.prod(sh.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


# ----------------------------------------------------------------------------- CLI


def add_plan_parser(sub) -> argparse.ArgumentParser:
    p = add_config_command(
        sub,
        "plan",
        "per-device memory of a training run (params, optimizer, grads, activations)",
        "Per-device memory of `jaxpt train CONFIG` under its mesh and sharding "
        "rules, from shapes only (no weights loaded). Overrides as for train, e.g. "
        "mesh.fsdp=8 mesh.tensor=2 train.batch_size=64 model.remat=full lora.rank=16.",
        "YAML run config (configs/*.yaml)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="plan for this many devices (default: the devices JAX sees here)",
    )
    p.add_argument(
        "--model-config",
        default=None,
        metavar="config.json",
        help="the model's Hugging Face config.json (for hub ids not in the local cache)",
    )
    p.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        help="memory per device to compare the total with (e.g. 16 for TPU v5e, 80 for H100)",
    )
    p.add_argument(
        "--topology",
        default=None,
        metavar="NAME",
        help="plan for a Cloud TPU slice (v5e-4, v5e-8, v5e-16, v5p-8, v5p-16, v6e-4, v6e-8): "
        "its device count and HBM",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="with --topology: compile every program of the run with XLA's TPU compiler "
        "(libtpu, the [tpu] extra) and report each one's per-device HBM; exit 1 if one does "
        "not fit",
    )
    p.add_argument("--verbose", action="store_true", help="also list every param's sharding")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    p.set_defaults(func=run_plan)
    return p


def run_plan(args) -> int:
    from jaxpt import distributed  # noqa: F401  (registers the distributed: section)
    from jaxpt.cli.plan_format import format_param_table, format_plan, plan_to_dict
    from jaxpt.config_load import load_config

    cfg = load_config(args.config, args.overrides)
    model_cfg = load_model_config(cfg, args.model_config)
    if args.compile and not args.topology:
        raise ValueError("--compile needs --topology NAME (e.g. v5e-8)")
    if args.compile:
        from jaxpt.cli.plan_compile import run_compile

        return run_compile(args, cfg, model_cfg)
    n, memory_gib = args.devices, args.memory_gib
    if args.topology:
        from jaxpt.engine.aot import topology

        topo = topology(args.topology)
        n = n or math.prod(int(x) for x in topo.topology.split(":")[1].split("x"))
        memory_gib = memory_gib or topo.hbm_gib
    if n is None:
        import jax

        n = jax.device_count()
    plan = plan_memory(cfg, model_cfg, n)
    if args.json:
        print(json.dumps(plan_to_dict(plan)), flush=True)
        return 0
    print(format_plan(plan, cfg, model_cfg, memory_gib), flush=True)
    if args.verbose:
        print(format_param_table(model_cfg, cfg, n), flush=True)
    return 0
