"""Checkpoint -> Hugging Face checkpoint (LoRA adapters merged into the base weights)."""

from __future__ import annotations

from pathlib import Path

import jax

from jaxpt.config import load_config
from jaxpt.engine import lora as lora_lib
from jaxpt.engine.build import load_model_bundle
from jaxpt.engine.checkpoint import Checkpointer, find_checkpoint_dir
from jaxpt.engine.state import TrainState, make_optimizer, state_shardings
from jaxpt.models.weights import check_export_target, export_hf
from jaxpt.sharding import make_mesh


def restore_model_params(checkpoint: str | Path, *, mesh=None):
    """(full model params with LoRA merged, bundle, step) of a run's checkpoint.

    ``checkpoint`` is a run dir, its ``checkpoints/`` dir, or one step dir; the run's
    ``config.yaml`` (written by the loop) says which base model and LoRA setup to use."""
    ckpt_dir, step = find_checkpoint_dir(checkpoint)
    run_dir = ckpt_dir.parent
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: the run config is missing; cannot rebuild the model")
    cfg = load_config(cfg_path)
    mesh = mesh or make_mesh(1, -1, 1)
    bundle = load_model_bundle(cfg, mesh)
    spec = lora_lib.LoraSpec.from_config(cfg.lora)
    tx, _ = make_optimizer(cfg.optim, 1)
    if spec is not None:
        abstract_params = lora_lib.lora_shapes(bundle.params, spec)
        params_sh = lora_lib.lora_shardings(abstract_params, mesh)
    else:
        abstract_params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), bundle.params
        )
        params_sh = bundle.params_sh
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
    if spec is not None:
        params = jax.jit(lambda b, a: lora_lib.merge(b, a, spec), out_shardings=bundle.params_sh)(
            bundle.params, params
        )
    return params, bundle, step


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
