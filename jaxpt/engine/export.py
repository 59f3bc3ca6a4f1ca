"""Checkpoint -> Hugging Face checkpoint (LoRA adapters merged into the base weights); a
reward-model run -> a sequence-classification checkpoint (``jaxpt.trainers.reward``)."""

from __future__ import annotations

from pathlib import Path

import jax

from jaxpt.config_load import load_config
from jaxpt.engine import lora as lora_lib
from jaxpt.engine.build import load_model_bundle
from jaxpt.engine.checkpoint import Checkpointer, find_checkpoint_dir
from jaxpt.engine.state import TrainState, make_optimizer, state_shardings
from jaxpt.models.weights import check_export_target, export_hf
from jaxpt.sharding import make_mesh, replicated


def restore_model_params(checkpoint: str | Path, *, mesh=None, heads=None, model_group="policy"):
    """(full model params with LoRA merged, bundle, step) of a run's checkpoint.

    ``checkpoint`` is a run dir, its ``checkpoints/`` dir, or one step dir; the run's
    ``config.yaml`` (written by the loop) says which base model and LoRA setup to use.
    A run that trained heads beside the model (param groups, ``build_train_state(...,
    heads=...)``): ``heads`` ``{group: model_cfg -> abstract head params}``, every group
    trained with ``cfg.optim``; the params are then ``{model_group: model params,
    **heads}``, the heads replicated."""
    ckpt_dir, step = find_checkpoint_dir(checkpoint)
    run_dir = ckpt_dir.parent
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: the run config is missing; cannot rebuild the model")
    cfg = load_config(cfg_path)
    mesh = mesh or make_mesh(1, -1, 1)
    bundle = load_model_bundle(cfg, mesh)
    spec = lora_lib.LoraSpec.from_config(cfg.lora)
    groups = [model_group, *(heads or {})]
    tx, _ = make_optimizer({g: cfg.optim for g in groups} if heads else cfg.optim, 1)
    if spec is not None:
        abstract_params = lora_lib.lora_shapes(bundle.params, spec)
        params_sh = lora_lib.lora_shardings(abstract_params, mesh)
    else:
        abstract_params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), bundle.params
        )
        params_sh = bundle.params_sh
    if heads:
        abstract_params = {
            model_group: abstract_params,
            **{g: fn(bundle.model_cfg) for g, fn in heads.items()},
        }
        params_sh = {
            model_group: params_sh,
            **{g: jax.tree.map(lambda _: replicated(mesh), abstract_params[g]) for g in heads},
        }
    abstract = jax.eval_shape(
        lambda p: TrainState(p, tx.init(p), jax.numpy.zeros((), "int32"), jax.random.PRNGKey(0)),
        abstract_params,
    )
    sh = state_shardings(abstract, params_sh, None, mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        TrainState(abstract.params, abstract.opt_state, abstract.step, abstract.rng).saveable(),
        TrainState(sh.params, sh.opt_state, sh.step, sh.rng).saveable(),
    )
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint")
        restored, _ = ckpt.restore(step, target)
    finally:
        ckpt.close()
    params = restored["params"]
    model = params[model_group] if heads else params
    if spec is not None:
        model = jax.jit(lambda b, a: lora_lib.merge(b, a, spec), out_shardings=bundle.params_sh)(
            bundle.params, model
        )
    return ({**params, model_group: model} if heads else model), bundle, step


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
):
    """Write an HF checkpoint dir (config, safetensors, tokenizer) from a run checkpoint.

    The target is checked before the model loads: a non-empty ``out_dir`` needs
    ``overwrite``, and the run itself (or a parent of it) is never replaced."""
    ckpt_dir, _ = find_checkpoint_dir(checkpoint)
    protect = (ckpt_dir.parent, Path(checkpoint))
    check_export_target(out_dir, overwrite=overwrite, protect=protect)
    cfg_path = ckpt_dir.parent / "config.yaml"
    if cfg_path.exists() and load_config(cfg_path).algorithm == "reward":
        from jaxpt.trainers.reward import export_reward_checkpoint

        return export_reward_checkpoint(
            checkpoint, out_dir, dtype=dtype, overwrite=overwrite, protect=protect
        )
    params, bundle, step = restore_model_params(checkpoint)
    out = export_hf(
        params,
        bundle.model_cfg,
        out_dir,
        tokenizer=bundle.tokenizer,
        dtype=dtype,
        overwrite=overwrite,
        protect=protect,
    )
    return out, step
