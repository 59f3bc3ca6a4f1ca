"""Several trained modules in one train state: the tiny decoder (group "policy") and a
value head (``nnx.Linear`` on its hidden states, group "value") trained by one loss with
one optimizer config per group. Gradients reach both groups, each group steps with its own
lr (== optax's chain on that group), accumulated == full batch, a non-finite update of any
group skips the whole step, LoRA + head through ``build_train_state``, and a run through
the loop stops, resumes from its one checkpoint and logs what an uninterrupted run logs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tolerances import assert_reordered_close, assert_trees_reordered_close

from jaxpt.config import (
    CheckpointConfig,
    LoggingConfig,
    LoraConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from jaxpt.data.packing import collate_padded
from jaxpt.data.tokenize import TokenizedExample
from jaxpt.engine.build import ModelBundle, build_train_state
from jaxpt.engine.logprobs import hidden_token_logprobs
from jaxpt.engine.loop import SourceBase, Trainer, run
from jaxpt.engine.state import (
    accumulate_grads,
    batch_shardings,
    compile_step,
    init_state,
    make_optimizer,
    make_train_step,
    put_batch,
)
from jaxpt.engine.update import GroupOptimizer
from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import init_model
from jaxpt.sharding import make_mesh, param_shardings, replicated
from jaxpt.tree import path_names

V, E = 64, 32
CFG = ModelConfig(
    model_type="llama",
    vocab_size=V,
    hidden_size=E,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
N_RED = 6 * E  # reduction lengths and depth for tests/tolerances.py (as test_train_step)
DEPTH = CFG.num_layers + 3
POLICY = OptimConfig(lr=1e-2, schedule="constant", max_grad_norm=1.0, weight_decay=0.1)
VALUE = OptimConfig(lr=0.1, schedule="constant", max_grad_norm=None)


@pytest.fixture(scope="module")
def parts():
    graphdef, model = nnx.split(init_model(CFG, seed=1))
    head_gd, head = nnx.split(nnx.Linear(E, 1, rngs=nnx.Rngs(2)))
    return graphdef, head_gd, {"policy": model.to_pure_dict(), "value": head.to_pure_dict()}


def make_batch(seed=0, rows=4, T=16):
    rng = np.random.RandomState(seed)
    ex = []
    for n in rng.randint(6, T, rows):
        mask = np.zeros(n, bool)
        mask[rng.randint(1, n - 1) :] = True
        ex.append(TokenizedExample(rng.randint(1, V, n).astype(np.int32), mask))
    batch = collate_padded(ex, max_length=T)
    batch["returns"] = rng.uniform(-1, 1, (rows, T)).astype(np.float32)
    return batch


def batch_stats(state, batch):
    return {"n": jnp.sum(batch["loss_mask"] > 0, dtype=jnp.float32)}


def loss_fn_for(graphdef, head_gd):
    """NLL of the policy + 0.5 x squared error of the value head on the same tokens, both
    summed over target tokens / the whole batch's target count."""

    def loss_fn(params, mb, rng, stats):
        model = nnx.merge(graphdef, params["policy"])
        hidden_BTE, _ = model(mb["input_ids"], mb["positions"], mb["segment_ids"])
        lp_BT, _, _ = hidden_token_logprobs(hidden_BTE, model.lm_head, mb["targets"],
                                            impl="reference")
        value_BT = nnx.merge(head_gd, params["value"])(hidden_BTE)[..., 0]
        mask = mb["loss_mask"] > 0
        nll = jnp.sum(jnp.where(mask, -lp_BT, 0.0)) / stats["n"]
        value_loss = 0.5 * jnp.sum(jnp.where(mask, (value_BT - mb["returns"]) ** 2, 0.0))
        value_loss = value_loss / stats["n"]
        return nll + value_loss, {"value_loss": value_loss}

    return loss_fn


def one_device_mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])  # one device, whatever the count


def shardings_of(params, mesh):
    return {"policy": param_shardings(params["policy"], mesh),
            "value": jax.tree.map(lambda _: replicated(mesh), params["value"])}


def compiled_step(parts, tx, schedule, mesh, *, grad_accum=1, params=None):
    graphdef, head_gd, p0 = parts
    params = jax.tree.map(jnp.copy, p0 if params is None else params)
    state, sh = init_state(params, tx, seed=0, params_sh=shardings_of(params, mesh), mesh=mesh)
    step = make_train_step(loss_fn_for(graphdef, head_gd), tx, schedule,
                           grad_accum=grad_accum, batch_stats_fn=batch_stats)
    batch_sh = batch_shardings({k: 2 for k in make_batch()}, mesh)
    return state, compile_step(step, sh, batch_sh, mesh), batch_sh


def grads_of(parts, batch, grad_accum):
    graphdef, head_gd, params = parts
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    @jax.jit
    def go(params, batch):
        return accumulate_grads(loss_fn_for(graphdef, head_gd), params, None, batch,
                                jax.random.PRNGKey(0), batch_stats(None, batch),
                                grad_accum=grad_accum)

    return go(params, batch)


def test_gradients_reach_both_groups_and_accumulated_equals_full_batch(parts):
    batch = make_batch()
    loss1, m1, g1 = grads_of(parts, batch, 1)
    loss2, m2, g2 = grads_of(parts, batch, 2)
    for group in ("policy", "value"):
        assert float(optax.global_norm(g1[group])) > 1e-4, group
    # the value loss reaches the decoder through the hidden states
    assert float(jnp.abs(g1["policy"]["final_norm_E"]).max()) > 0
    assert_reordered_close(loss2, loss1, n=N_RED, depth=DEPTH)
    assert_reordered_close(m2["value_loss"], m1["value_loss"], n=N_RED, depth=DEPTH)
    assert_trees_reordered_close(g2, g1, n=N_RED, depth=DEPTH)


def test_each_group_steps_with_its_own_optimizer(parts):
    mesh = one_device_mesh()
    tx, schedules = make_optimizer({"policy": POLICY, "value": VALUE}, total_steps=10)
    assert isinstance(tx, GroupOptimizer) and tx.groups == ("policy", "value")
    state, step_fn, _ = compiled_step(parts, tx, schedules, mesh)
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    _, _, grads = grads_of(parts, batch, 1)
    p0 = jax.device_get(state.params)
    state, m = step_fn(state, batch)
    assert float(m["skipped"]) == 0.0
    assert float(m["learning_rate/policy"]) == pytest.approx(POLICY.lr)
    assert float(m["learning_rate/value"]) == pytest.approx(VALUE.lr)
    assert float(m["learning_rate"]) == pytest.approx(POLICY.lr)  # the first group's
    norms = {g: float(optax.global_norm(grads[g])) for g in ("policy", "value")}
    for g in norms:
        assert float(m[f"grad_norm/{g}"]) == pytest.approx(norms[g], rel=1e-4)
    assert float(m["grad_norm"]) == pytest.approx(np.hypot(*norms.values()), rel=1e-4)
    # Each group's new params are optax's chain of that group's config (the policy
    # clipped by its own norm, the value head not clipped and with its own lr).
    for g in ("policy", "value"):
        chain = tx.txs[g].tx
        updates, _ = chain.update(grads[g], chain.init(p0[g]), p0[g])
        want = optax.apply_updates(p0[g], updates)
        n = sum(x.size for x in jax.tree.leaves(p0[g]))
        assert_trees_reordered_close(jax.device_get(state.params[g]), want, n=n, depth=DEPTH)
    # AdamW's first step moves every param with a gradient by ~lr: each group by its own.
    moved = {g: max(float(jnp.abs(a - b).max()) for a, b in
                    zip(jax.tree.leaves(state.params[g]), jax.tree.leaves(p0[g]), strict=True))
             for g in ("policy", "value")}
    assert moved["value"] == pytest.approx(VALUE.lr, rel=0.01)
    assert moved["policy"] < 2 * POLICY.lr
    assert step_fn._cache_size() == 1


def test_one_group_is_the_single_module_step(parts):
    """{"policy": params} under a one-group GroupOptimizer makes the single-module update."""
    graphdef, _, params = parts
    mesh = one_device_mesh()
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}

    def nll(p, mb, r, s):
        model = nnx.merge(graphdef, p["policy"] if "policy" in p else p)
        hidden_BTE, _ = model(mb["input_ids"], mb["positions"], mb["segment_ids"])
        lp_BT, _, _ = hidden_token_logprobs(hidden_BTE, model.lm_head, mb["targets"],
                                            impl="reference")
        return jnp.sum(jnp.where(mb["loss_mask"] > 0, -lp_BT, 0.0)) / s["n"], {}

    outs = []
    single = (POLICY, params["policy"])
    for optim, p in (single, ({"policy": POLICY}, {"policy": params["policy"]})):
        tx, sched = make_optimizer(optim, 10)
        psh = param_shardings(params["policy"], mesh)
        state, sh = init_state(jax.tree.map(jnp.copy, p), tx, seed=0,
                               params_sh=psh if optim is POLICY else {"policy": psh}, mesh=mesh)
        step = make_train_step(nll, tx, sched, batch_stats_fn=batch_stats)
        step_fn = compile_step(step, sh, batch_shardings({k: 2 for k in batch}, mesh), mesh)
        for _ in range(2):
            state, m = step_fn(state, batch)
        outs.append((jax.device_get(state.params), {k: float(v) for k, v in m.items()}))
    (single, m_single), (grouped, m_grouped) = outs
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(grouped["policy"]), strict=True):
        np.testing.assert_array_equal(a, b)
    for k in ("loss", "grad_norm", "learning_rate", "skipped"):
        assert m_single[k] == pytest.approx(m_grouped[k], rel=1e-6), k


@pytest.mark.parametrize("what", ["value lr nan", "value loss nan", "plain optax group"])
def test_a_nonfinite_group_skips_the_whole_step(parts, what):
    mesh = one_device_mesh()
    if what == "plain optax group":  # a staged (non-fused) group whose update is nan
        tx = GroupOptimizer({"policy": make_optimizer(POLICY, 10)[0],
                             "value": optax.sgd(float("nan"))})
        schedules = {"policy": make_optimizer(POLICY, 10)[1], "value": lambda c: jnp.nan}
    else:
        value = OptimConfig(lr=float("nan")) if what == "value lr nan" else VALUE
        tx, schedules = make_optimizer({"policy": POLICY, "value": value}, 10)
    state, step_fn, _ = compiled_step(parts, tx, schedules, mesh)
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    if what == "value loss nan":
        batch["returns"] = jnp.full_like(batch["returns"], jnp.nan)
    before = jax.device_get((state.params, state.opt_state))
    state, m = step_fn(state, batch)
    assert float(m["skipped"]) == 1.0
    after = jax.device_get((state.params, state.opt_state))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit: no group moved
    assert int(state.step) == 1  # the batch was consumed


def test_lora_policy_and_value_head_through_build_train_state(parts):
    graphdef, head_gd, params = parts
    mesh = one_device_mesh()
    psh = param_shardings(params["policy"], mesh)
    bundle = ModelBundle(mesh, graphdef, jax.device_put(params["policy"], psh), psh, CFG,
                         resolved=None, tokenizer=None)
    cfg = RunConfig(lora=LoraConfig(rank=4, targets="wq|wv"), train=TrainConfig(seed=0))
    tx, schedules = make_optimizer({"policy": POLICY, "value": VALUE}, 10)
    head_sh = jax.tree.map(lambda _: replicated(mesh), params["value"])
    ts = build_train_state(bundle, cfg, tx,
                           heads={"value": (jax.tree.map(jnp.copy, params["value"]), head_sh)})
    assert set(ts.state.params) == {"policy", "value"}
    trained = jax.tree_util.tree_leaves_with_path(ts.state.params["policy"])
    assert {path_names(p)[-1] for p, _ in trained} == {"lora_a", "lora_b"}
    full = ts.params_fn(ts.state.params, ts.state.frozen, None)
    assert set(full) == {"policy", "value"}
    assert jax.tree.structure(full["policy"]) == jax.tree.structure(params["policy"])
    step = make_train_step(loss_fn_for(graphdef, head_gd), tx, schedules,
                           batch_stats_fn=batch_stats, params_fn=ts.params_fn)
    batch = make_batch()
    batch_sh = batch_shardings({k: 2 for k in batch}, mesh)
    step_fn = compile_step(step, ts.shardings, batch_sh, mesh)
    base = jax.device_get(ts.state.frozen)
    v0 = jax.device_get(ts.state.params["value"])
    state, m = step_fn(ts.state, put_batch(batch, batch_sh))
    state, m = step_fn(state, put_batch(batch, batch_sh))
    assert float(m["skipped"]) == 0.0 and float(m["grad_norm/policy"]) > 0
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(state.frozen), strict=True):
        np.testing.assert_array_equal(a, b)  # the base stays frozen
    assert float(jnp.abs(state.params["value"]["kernel"] - v0["kernel"]).max()) > 0.05


class Batches(SourceBase):
    """Batch i is make_batch(seed=i); its position is the resume state."""

    def __init__(self):
        self.i = 0

    def next(self, state):
        self.i += 1
        return make_batch(seed=self.i)

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def grouped_trainer(parts, out_dir, **train):
    mesh = one_device_mesh()
    tx, schedules = make_optimizer({"policy": POLICY, "value": VALUE}, 4)
    state, step_fn, batch_sh = compiled_step(parts, tx, schedules, mesh)
    cfg = RunConfig(out_dir=str(out_dir), train=TrainConfig(max_steps=4, batch_size=4, **train),
                    checkpoint=CheckpointConfig(every=2, async_save=False),
                    logging=LoggingConfig(progress=False))
    return Trainer(cfg=cfg, mesh=mesh, state=state, step_fn=step_fn, source=Batches(),
                   put_batch=lambda b: put_batch(b, batch_sh), total_steps=4)


@pytest.mark.e2e
def test_checkpoint_round_trip_and_resume(parts, tmp_path):
    from train_utils import read_metrics

    whole = run(grouped_trainer(parts, tmp_path / "whole"))
    first = run(grouped_trainer(parts, tmp_path / "split", stop_after_steps=2))
    assert first.reason == "stop_after" and first.step == 2
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["2"]
    resumed = run(grouped_trainer(parts, tmp_path / "split"))
    assert resumed.step == 4
    for a, b in zip(jax.tree.leaves(whole.state.saveable()),
                    jax.tree.leaves(resumed.state.saveable()), strict=True):
        np.testing.assert_array_equal(a, b)  # both groups, their moments, step and rng

    def logged(d):
        keys = ("loss", "value_loss", "grad_norm", "grad_norm/policy", "grad_norm/value",
                "learning_rate/value", "skipped")
        return [{k: r[k] for k in ("step", *keys)} for r in read_metrics(d) if "loss" in r]

    assert logged(tmp_path / "whole") == logged(tmp_path / "split")
    assert [r["step"] for r in logged(tmp_path / "whole")] == [1, 2, 3, 4]
