"""Compile jaxpt's SFT train step (fused AdamW, checked update) for a v5e-8 slice on this CPU
with XLA's real TPU compiler (libtpu, the [tpu] extra) and print its per-device HBM as one
JSON line: fsdp=8, fp32 master weights, bf16 compute, remat full. ATTENTION (model.attention,
default auto = jax's splash kernel on TPU; xla = the written-out B x N x T x T scores).

    # MODEL_DIR SEQ ROWS [ATTENTION]
    python bench/compile_sft_tpu.py ../shared/models/qwen3-1.7b 4096 8 splash
"""
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies

from jaxpt import sharding
from jaxpt.algorithms.sft import SFT_BATCH_NDIMS, make_sft_loss_fn, sft_batch_stats
from jaxpt.config import OptimConfig, SFTConfig
from jaxpt.engine.state import (
                               TrainState,
                               batch_shardings,
                               compile_step,
                               make_optimizer,
                               make_train_step,
                               state_shardings,
)
from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import abstract_model

model_dir, T, B = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
attention = sys.argv[4] if len(sys.argv) > 4 else "auto"
devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4",
    chip_config_name="default", chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
mesh = sharding.make_mesh(1, len(devices), 1, devices=devices)
cfg = ModelConfig.from_hf_file(f"{model_dir}/config.json").replace(
    compute_dtype="bfloat16", remat="full", attention=attention, mesh=mesh)
graphdef, abstract = nnx.split(abstract_model(cfg))
abstract = abstract.to_pure_dict()
psh = sharding.param_shardings(abstract, mesh)
tx, sched = make_optimizer(OptimConfig(lr=1e-5), 1000)
astate = jax.eval_shape(lambda p: TrainState(p, tx.init(p), jnp.zeros((), jnp.int32),
                                             jax.random.PRNGKey(0)), abstract)
ssh = state_shardings(astate, psh, None, mesh)
bsh = batch_shardings(SFT_BATCH_NDIMS, mesh)
step = make_train_step(make_sft_loss_fn(graphdef, SFTConfig(), impl="auto"), tx, sched,
                       batch_stats_fn=sft_batch_stats)
fn = compile_step(step, ssh, bsh, mesh)
sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
state_in = jax.tree.map(sds, astate, ssh)
batch_in = jax.tree.map(lambda s: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=s), bsh)
compiled = fn.lower(state_in, batch_in).compile()
m = compiled.memory_analysis()
gib = lambda x: round(x / 2**30, 2)
print(json.dumps({"model": model_dir.rstrip("/").split("/")[-1], "seq": T, "rows": B,
    "attention": attention,
    "devices": "v5e-8 (fsdp=8)", "hbm_gib": 15.75, "args_gib": gib(m.argument_size_in_bytes),
    "temp_gib": gib(m.temp_size_in_bytes), "out_gib": gib(m.output_size_in_bytes),
    "alias_gib": gib(m.alias_size_in_bytes),
    "total_gib": gib(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                     - m.alias_size_in_bytes)}))
