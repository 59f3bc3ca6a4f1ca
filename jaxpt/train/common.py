"""Building blocks every trainer uses: the mesh, the model in its shardings, the tokenizer,
the optimizer and the train state (with or without LoRA), and the jitted step.

A trainer is, in order::

    bundle = load_model_bundle(cfg)                      # mesh, params in shardings, tokenizer
    tx, schedule = make_optimizer(cfg.optim, total_steps)
    ts = build_train_state(bundle, cfg, tx)              # LoRA or full; frozen base / reference
    step = make_train_step(loss_fn, tx, schedule, grad_accum=..., params_fn=ts.params_fn)
    step_fn = compile_step(step, ts.shardings, batch_sh, bundle.mesh)

After the first step the state is donated: use ``trainer.state`` (``state.frozen`` holds the
LoRA base or the reference params), never ``bundle.params`` again.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxpt.config import RunConfig
from jaxpt.models import hub
from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import abstract_model
from jaxpt.sharding import check_batch_size, make_mesh, param_shardings
from jaxpt.train import lora as lora_lib
from jaxpt.train.state import TrainState, identity_params, init_state


@dataclasses.dataclass
class ModelBundle:
    mesh: Mesh
    graphdef: Any  # nnx graphdef of the Decoder: nnx.merge(graphdef, params) -> model
    params: dict  # pure dict of arrays in `params_sh`
    params_sh: dict
    model_cfg: ModelConfig
    resolved: hub.ResolvedModel
    tokenizer: Any

    @property
    def num_params(self) -> int:
        return self.model_cfg.num_params()

    def model(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, params)


def build_mesh(cfg: RunConfig) -> Mesh:
    return make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)


def check_train_batch(cfg: RunConfig, mesh: Mesh) -> None:
    """``train.batch_size`` must split evenly over the mesh's batch axes (data x fsdp);
    raises ShardingError naming it, its size and the axes."""
    check_batch_size(cfg.train.batch_size, mesh, what=f"{cfg.source}: train.batch_size")


def load_tokenizer(cfg: RunConfig, resolved: hub.ResolvedModel):
    if cfg.model.tokenizer:
        from jaxpt.data.tokenizers import load_tokenizer as load

        return load(cfg.model.tokenizer)
    return resolved.tokenizer()


def load_model_bundle(cfg: RunConfig, mesh: Mesh | None = None) -> ModelBundle:
    """Resolve ``cfg.model``, load its weights straight into the training shardings."""
    mesh = mesh or build_mesh(cfg)
    resolved = hub.resolve(cfg.model.name)
    model_cfg = resolved.config(
        param_dtype=cfg.model.param_dtype,
        compute_dtype=cfg.model.compute_dtype,
        remat=cfg.model.remat,
    )
    graphdef, abstract = nnx.split(abstract_model(model_cfg))
    abstract = abstract.to_pure_dict()
    params_sh = param_shardings(abstract, mesh)
    from jaxpt.models.weights import load_params

    params = load_params(resolved.source(), model_cfg, params_sh)
    params = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    tokenizer = load_tokenizer(cfg, resolved)
    return ModelBundle(mesh, graphdef, params, params_sh, model_cfg, resolved, tokenizer)


@dataclasses.dataclass
class TrainableState:
    state: TrainState
    shardings: TrainState
    params_fn: Any  # (params, frozen, rng) -> model params
    lora: lora_lib.LoraSpec | None


def _copy(tree, shardings):
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def build_train_state(
    bundle: ModelBundle, cfg: RunConfig, tx, *, reference: bool = False
) -> TrainableState:
    """The train state for ``bundle``'s params.

    * LoRA (``lora.rank > 0``): ``params`` = adapters, ``frozen`` = the base params (also the
      reference model: adapters off).
    * Full fine-tuning: ``params`` = the model params; ``frozen`` = a copy of them when
      ``reference`` (DPO / GRPO KL reference), else None.
    """
    spec = lora_lib.LoraSpec.from_config(cfg.lora)
    mesh = bundle.mesh
    if spec is not None:
        abstract = lora_lib.lora_shapes(bundle.params, spec)
        sh = lora_lib.lora_shardings(abstract, mesh)
        key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 1)
        adapters = jax.jit(
            functools.partial(lora_lib.init_lora, bundle.params, spec), out_shardings=sh
        )(key)
        state, shardings = init_state(
            adapters,
            tx,
            seed=cfg.train.seed,
            params_sh=sh,
            mesh=mesh,
            frozen=bundle.params,
            frozen_sh=bundle.params_sh,
        )

        def params_fn(params, frozen, rng):
            return lora_lib.apply_lora(frozen, params, spec, rng=rng)

        return TrainableState(state, shardings, params_fn, spec)
    frozen = _copy(bundle.params, bundle.params_sh) if reference else None
    state, shardings = init_state(
        bundle.params,
        tx,
        seed=cfg.train.seed,
        params_sh=bundle.params_sh,
        mesh=mesh,
        frozen=frozen,
        frozen_sh=bundle.params_sh if reference else None,
    )
    return TrainableState(state, shardings, identity_params, None)


def model_params(ts_or_fn, state: TrainState):
    """The full model params of ``state`` (LoRA merged, no dropout)."""
    fn = ts_or_fn.params_fn if hasattr(ts_or_fn, "params_fn") else ts_or_fn
    return fn(state.params, state.frozen, None)


def read_data_records(cfg: RunConfig, which: str = "train", *, gsm8k_mode: str = "sft", stats=None):
    """Records of ``data.train`` / ``data.eval`` (first ``max_*_rows``), converted from
    GSM8K rows when ``data.format`` is ``gsm8k`` (``gsm8k_mode``: "sft" or "prompt") and
    from hh-rlhf transcripts to preference rows when it is ``hh_rlhf``."""
    import os

    from jaxpt.data import read_records
    from jaxpt.data.gsm8k import convert_gsm8k
    from jaxpt.data.hh_rlhf import convert_hh_rlhf

    d = cfg.data
    path = d.train if which == "train" else d.eval
    split = d.train_split if which == "train" else d.eval_split
    limit = d.max_train_rows if which == "train" else d.max_eval_rows
    if path is None:
        raise ValueError(f"{cfg.source}: data.{which} is not set")
    looks_local = path.endswith((".jsonl", ".json", ".gz", ".parquet")) or path.startswith(
        (".", "/", "~")
    )
    if looks_local and not os.path.exists(path):
        raise FileNotFoundError(
            f"{cfg.source}: data.{which}={path!r} does not exist (relative paths are relative "
            f"to the working directory {os.getcwd()})"
        )
    records = read_records(path, split=split, skip_invalid=d.skip_invalid, stats=stats)
    if limit is not None:
        if stats is not None:
            stats.beyond_max_rows += max(0, len(records) - limit)
        records = records[:limit]
    if d.format == "gsm8k":
        records = convert_gsm8k(records, mode=gsm8k_mode, skip_invalid=d.skip_invalid, stats=stats)
    elif d.format == "hh_rlhf":
        records = convert_hh_rlhf(records, skip_invalid=d.skip_invalid, stats=stats)
    return records
