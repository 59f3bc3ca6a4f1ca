"""Building blocks every trainer uses: the mesh, the model in its shardings, the tokenizer,
the optimizer and the train state (with or without LoRA), and the jitted step.

A trainer is, in order::

    bundle = load_model_bundle(cfg)                      # mesh, params in shardings, tokenizer
    tx, schedule = make_optimizer(cfg.optim, total_steps)
    ts = build_train_state(bundle, cfg, tx)              # LoRA or full; frozen base / reference
    step = make_train_step(loss_fn, tx, schedule, grad_accum=..., params_fn=ts.params_fn)
    step_fn = compile_step(step, ts.shardings, batch_sh, bundle.mesh)

A module trained beside the model (a value head) is a param group:
``make_optimizer({"policy": cfg.optim, "value": ...})`` and ``build_train_state(...,
heads={"value": (params, shardings)})`` (see ``state.py``'s module doc).

After the first step the state is donated: use ``trainer.state`` (``state.frozen`` holds the
LoRA base or the reference params), never ``bundle.params`` again.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxpt.config import RunConfig
from jaxpt.engine import lora as lora_lib
from jaxpt.engine.state import (
    TrainState,
    compile_step,
    identity_params,
    init_state,
    is_abstract,
    make_optimizer,
    make_train_step,
    with_shardings,
)
from jaxpt.models import hub
from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import abstract_model
from jaxpt.sharding import check_batch_size, make_mesh, param_shardings


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


def eval_batch_size(cfg: RunConfig, mesh: Mesh | None = None) -> int:
    """The held-out batch size (``train.eval_batch_size``, default one micro-batch); with
    ``mesh``, checked to split over the processes and the mesh's batch axes."""
    t = cfg.train
    eval_bs = t.eval_batch_size or t.batch_size // t.grad_accum
    if mesh is not None:
        n_proc = jax.process_count()
        if eval_bs % n_proc:
            raise ValueError(f"{cfg.source}: eval batch size {eval_bs} is not divisible by the "
                             f"{n_proc} processes")
        check_batch_size(eval_bs, mesh, what=f"{cfg.source}: eval batch size")
    return eval_bs


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
        attention=cfg.model.attention, mesh=mesh,
    )
    graphdef, abstract = nnx.split(abstract_model(model_cfg))
    abstract = abstract.to_pure_dict()
    params_sh = param_shardings(abstract, mesh)
    from jaxpt.models.weights import load_params

    params = load_params(resolved.source(), model_cfg, params_sh)
    params = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    tokenizer = load_tokenizer(cfg, resolved)
    return ModelBundle(mesh, graphdef, params, params_sh, model_cfg, resolved, tokenizer)


def abstract_bundle(cfg: RunConfig, mesh: Mesh, model_cfg: ModelConfig) -> ModelBundle:
    """``cfg``'s model on ``mesh`` with shapes only (``jaxpt plan --compile``): params are
    ``ShapeDtypeStruct``s in their training shardings; no weights, no tokenizer. The
    attention kernel is chosen for ``mesh``'s devices."""
    check_train_batch(cfg, mesh)
    model_cfg = model_cfg.replace(attention=cfg.model.attention, mesh=mesh)
    graphdef, abstract = nnx.split(abstract_model(model_cfg))
    abstract = abstract.to_pure_dict()
    params_sh = param_shardings(abstract, mesh)
    params = with_shardings(abstract, params_sh)
    return ModelBundle(mesh, graphdef, params, params_sh, model_cfg, None, None)


@dataclasses.dataclass
class TrainableState:
    state: TrainState
    shardings: TrainState
    params_fn: Any  # (params, frozen, rng) -> model params
    lora: lora_lib.LoraSpec | None


def _copy(tree, shardings):
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def build_train_state(
    bundle: ModelBundle,
    cfg: RunConfig,
    tx,
    *,
    reference: bool = False,
    heads: Mapping[str, tuple[Any, Any]] | None = None,
    model_group: str = "policy",
) -> TrainableState:
    """The train state for ``bundle``'s params.

    * LoRA (``lora.rank > 0``): ``params`` = adapters, ``frozen`` = the base params (also the
      reference model: adapters off).
    * Full fine-tuning: ``params`` = the model params; ``frozen`` = a copy of them when
      ``reference`` (DPO / GRPO KL reference), else None.
    * ``heads`` ``{group: (params, shardings)}``: modules trained beside the model (a value
      head). ``params`` is then ``{model_group: the above, **heads}``, ``tx`` a
      ``GroupOptimizer`` of those groups (``make_optimizer({group: OptimConfig})``),
      ``params_fn`` gives ``{model_group: model params, **heads}`` (LoRA merged into the
      model's group only), and ``frozen`` is as above (the model's).

    A bundle whose params are ``ShapeDtypeStruct``s (:func:`abstract_bundle`) gives an
    abstract state of the same structure, for compiling without weights.
    """
    spec = lora_lib.LoraSpec.from_config(cfg.lora)
    mesh = bundle.mesh
    abstract = is_abstract(bundle.params)  # shapes only (jaxpt plan --compile)
    model_fn = identity_params
    if spec is not None:
        trained_sh = lora_lib.lora_shardings(lora_lib.lora_shapes(bundle.params, spec), mesh)
        key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 1)
        init = functools.partial(lora_lib.init_lora, bundle.params, spec)
        if abstract:
            trained = with_shardings(jax.eval_shape(init, key), trained_sh)
        else:
            trained = jax.jit(init, out_shardings=trained_sh)(key)
        frozen, frozen_sh = bundle.params, bundle.params_sh

        def model_fn(params, frozen, rng):
            return lora_lib.apply_lora(frozen, params, spec, rng=rng)

    else:
        trained, trained_sh = bundle.params, bundle.params_sh
        copy = (lambda p, _: p) if abstract else _copy
        frozen = copy(bundle.params, bundle.params_sh) if reference else None
        frozen_sh = bundle.params_sh if reference else None
    params_fn = model_fn
    if heads:
        if model_group in heads:
            raise ValueError(f"heads: group {model_group!r} is the model's (model_group)")
        trained = {model_group: trained, **{g: p for g, (p, _) in heads.items()}}
        trained_sh = {model_group: trained_sh, **{g: sh for g, (_, sh) in heads.items()}}
        if model_fn is not identity_params:

            def params_fn(params, frozen, rng):
                return {**params, model_group: model_fn(params[model_group], frozen, rng)}

    state, shardings = init_state(
        trained,
        tx,
        seed=cfg.train.seed,
        params_sh=trained_sh,
        mesh=mesh,
        frozen=frozen,
        frozen_sh=frozen_sh,
    )
    return TrainableState(state, shardings, params_fn, spec)


@dataclasses.dataclass
class RunParts:
    """What an algorithm built its run from (``Trainer.parts``), for code that continues
    after the loop: the model bundle (its params are donated after the first step: use the
    trainer's state), the trainable state's spec and the optimizer. Algorithms subclass
    it to add their own parts."""

    bundle: ModelBundle
    trainable: TrainableState
    tx: Any


def model_params(ts_or_fn, state: TrainState):
    """The full model params of ``state`` (LoRA merged, no dropout)."""
    fn = ts_or_fn.params_fn if hasattr(ts_or_fn, "params_fn") else ts_or_fn
    return fn(state.params, state.frozen, None)


def start_run(cfg: RunConfig, mesh: Mesh | None = None) -> ModelBundle:
    """The first step of every trainer: the mesh (``cfg.mesh`` unless given), the checks
    that ``train.batch_size`` splits over the mesh's batch axes and over the processes,
    then the model in its training shardings (``bundle.mesh`` is the mesh)."""
    mesh = mesh or build_mesh(cfg)
    check_train_batch(cfg, mesh)
    n_proc = jax.process_count()
    if cfg.train.batch_size % n_proc:
        raise ValueError(
            f"{cfg.source}: train.batch_size={cfg.train.batch_size} is not divisible by the "
            f"{n_proc} processes"
        )
    return load_model_bundle(cfg, mesh)


@dataclasses.dataclass
class TrainProgram:
    trainable: TrainableState  # the state, its shardings, params_fn (LoRA or full)
    tx: Any  # the optimizer
    step_fn: Any  # jitted (state, device batch) -> (state, metrics), state donated


def train_program(
    cfg: RunConfig,
    bundle: ModelBundle,
    total_steps: int,
    loss_fn,
    batch_sh,
    *,
    batch_stats_fn=None,
    reference: bool = False,
    heads: Mapping[str, tuple[Any, Any]] | None = None,
    optim=None,
    model_group: str = "policy",
) -> TrainProgram:
    """Optimizer (``cfg.optim`` over ``total_steps``), train state (``reference``: keep a
    frozen copy for a KL / DPO reference; see :func:`build_train_state`) and the pure step
    of ``loss_fn`` with ``train.grad_accum`` micro-batches, jitted once for batches in
    ``batch_sh`` (any pytree of shardings: a typed batch's). ``heads`` and ``optim``
    (``{group: OptimConfig}``, default ``cfg.optim``): modules trained beside the model, as
    in :func:`build_train_state` (PPO's value head; the model's group is ``model_group``)."""
    tx, schedule = make_optimizer(cfg.optim if optim is None else optim, total_steps)
    ts = build_train_state(bundle, cfg, tx, reference=reference, heads=heads,
                           model_group=model_group)
    step = make_train_step(
        loss_fn,
        tx,
        schedule,
        grad_accum=cfg.train.grad_accum,
        batch_stats_fn=batch_stats_fn,
        params_fn=ts.params_fn,
    )
    return TrainProgram(ts, tx, compile_step(step, ts.shardings, batch_sh, bundle.mesh))


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
