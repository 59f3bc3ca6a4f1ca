"""DPO trainer: one forward over chosen + rejected, the reference outside the gradient
(online == precomputed), LoRA keeps no second copy, mixed loss types, config errors, and
real learning on hh-rlhf with SmolLM2 (e2e).

Tiny runs use the tiny random llama + BPE tokenizer of ``train_utils`` on real hh-rlhf pairs
(``data.format: hh_rlhf``), a few steps each.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from tolerances import assert_reordered_close, assert_trees_reordered_close, rejects, run_depth
from train_utils import make_tiny_tokenizer_and_model, read_metrics

from jaxpt.algorithms.dpo import DPOBatch, DPOSection, dpo_batch_stats, make_dpo_loss_fn
from jaxpt.config import ConfigError
from jaxpt.config_load import load_config
from jaxpt.data.packing import (
    collate_preference,
    collate_preference_shared,
    shared_pair_shape,
)
from jaxpt.data.pairs import PairRows, SharedPairRows, choose_layout
from jaxpt.data.tokenize import TokenizedPreference
from jaxpt.engine.logprobs import pair_logps, sequence_token_logprobs
from jaxpt.engine.loop import run
from jaxpt.engine.state import accumulate_grads
from jaxpt.losses.dpo import DPOLossConfig
from jaxpt.models.config import decoder_forward_flops
from jaxpt.models.decoder import init_model
from jaxpt.rl.scoring import RefLogps
from jaxpt.trainers.dpo import build_dpo_trainer
from jaxpt.tree import path_names

LOG2 = math.log(2.0)


def hh_path(data_dir):
    return data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("tiny_dpo")
    model_dir = make_tiny_tokenizer_and_model(root, data_dir)
    return model_dir, data_dir


def write_config(path, model_dir, data_dir, out_dir, **sections):
    cfg = {
        "algorithm": "dpo",
        "out_dir": str(out_dir),
        "model": {"name": str(model_dir)},
        "data": {
            "train": str(hh_path(data_dir)),
            "format": "hh_rlhf",
            "skip_invalid": True,
            "max_train_rows": 40,
            "max_length": 128,
        },
        "optim": {"lr": 3.0e-3, "schedule": "constant"},
        "train": {"max_steps": 3, "batch_size": 4, "seed": 5},
        "checkpoint": {"every": 0},
        "logging": {"progress": False},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    path.write_text(yaml.safe_dump(cfg))
    return path


def config(tiny, tmp_path, name="run", **sections):
    model_dir, data_dir = tiny
    return load_config(
        write_config(tmp_path / f"{name}.yaml", model_dir, data_dir, tmp_path / name, **sections)
    )


def rows_with(run_dir, key):
    return [r for r in read_metrics(run_dir) if key in r]


# ----------------------------------------------------------------------------- the forward


def random_pairs(rng, vocab, n):
    pairs = []
    for _ in range(n):
        p, c, r = rng.randint(2, 9, size=3)
        pairs.append(
            TokenizedPreference(
                rng.randint(1, vocab, p), rng.randint(1, vocab, c), rng.randint(1, vocab, r)
            )
        )
    return pairs


def test_concatenated_forward_equals_two_separate_forwards():
    from train_utils import tiny_model_config

    cfg = tiny_model_config(97)
    model = init_model(cfg, seed=1)
    rng = np.random.RandomState(0)
    pairs = random_pairs(rng, 97, 3)
    batch = collate_preference(pairs, 24, pad_id=0)
    out = jax.jit(lambda b: pair_logps(model, b))(PairRows.from_dict(batch))
    for side in ("chosen", "rejected"):
        one = {
            k: batch[f"{side}_{k}"] for k in ("input_ids", "targets", "positions", "segment_ids")
        }
        lp_BT = jax.jit(lambda b: sequence_token_logprobs(model, b, impl="reference")[0])(one)
        lp_BT = np.asarray(lp_BT, np.float64)
        # Independent sum: completion tokens are the targets at positions P-1 .. P+C-2.
        for i, pair in enumerate(pairs):
            P = len(pair.prompt_ids)
            C = len(pair.chosen_ids if side == "chosen" else pair.rejected_ids)
            want = lp_BT[i, P - 1 : P + C - 1].sum()
            # <= 97 terms (hidden 32, MLP 64, vocab 97), 2 layers + head + softmax + sum.
            assert_reordered_close(out[f"{side}_logps"][i], want, n=97, depth=5)
            assert out[f"{side}_lengths"][i] == C


def test_shared_prefix_rows_give_the_padded_rows_logps_and_gradients():
    """One [prefix | chosen | rejected] row per pair == the two padded rows: summed
    log-probs, lengths, entropy, accuracy and parameter gradients (fp32)."""
    from train_utils import tiny_model_config

    cfg = tiny_model_config(83)
    graphdef, params = nnx.split(init_model(cfg, seed=4))
    params = params.to_pure_dict()
    rng = np.random.RandomState(3)
    pairs = random_pairs(rng, 83, 3) + [
        TokenizedPreference([5, 6, 7], [8, 9, 10], [8, 9, 11, 12]),  # prefix past the prompt
        TokenizedPreference([5], [13, 14], [13, 14]),  # identical completions
        TokenizedPreference([5, 6], [15], [15, 16, 17]),  # chosen is a prefix of rejected
    ]
    flat = PairRows.from_dict(collate_preference(pairs, 20, pad_id=0))
    shapes = np.asarray([shared_pair_shape(p) for p in pairs])
    length, width = int(shapes[:, 0].max()) + 2, int(shapes[:, 1].max()) + 1
    shared = SharedPairRows.from_dict(collate_preference_shared(pairs, length, width, pad_id=0))
    assert shared.input_ids.shape[1] < 2 * 20

    def logps(params, batch):
        out = pair_logps(
            nnx.merge(graphdef, params),
            batch,
            impl="reference",
            with_entropy=True,
            with_accuracy=True,
        )
        weights = jnp.arange(1.0, 1.0 + out["chosen_logps"].shape[0])
        loss = jnp.sum(weights * (out["chosen_logps"] - 0.5 * out["rejected_logps"]))
        return loss, out

    grad_fn = jax.jit(jax.value_and_grad(logps, has_aux=True))
    (_, want), want_g = grad_fn(params, flat)
    (_, got), got_g = grad_fn(params, shared)
    assert set(got) == set(want)
    # <= 83 terms (hidden 32, MLP 64, vocab 83, 40 positions), 2 layers + head + softmax +
    # the sum over tokens; the gradients one backward more.
    for k in want:
        assert_reordered_close(got[k], want[k], n=83, depth=5, err_msg=k)
    assert_trees_reordered_close(got_g, want_g, n=83, depth=6)
    # Mutation: the rejected side reading the chosen side's tokens (shared rows whose
    # segments no longer separate the two answers) must fail.
    seg = np.asarray(shared.segment_ids)
    leaky = dataclasses.replace(shared, segment_ids=np.where(seg > 0, 1, 0).astype(seg.dtype))
    (_, bad), _ = grad_fn(params, leaky)
    assert rejects(assert_reordered_close, bad["rejected_logps"], want["rejected_logps"],
                   n=83, depth=5)
    stats_flat = dpo_batch_stats(None, DPOBatch(flat))
    stats_shared = dpo_batch_stats(None, DPOBatch(shared))
    for k in stats_flat:
        np.testing.assert_allclose(stats_shared[k], stats_flat[k], err_msg=k)


def test_accumulated_micro_batches_equal_full_batch_with_mixed_losses():
    """The b/B scaling: 2 micro-batches sum to the full batch (loss, metrics, gradients)."""
    from train_utils import tiny_model_config

    cfg = tiny_model_config(61)
    graphdef, params = nnx.split(init_model(cfg, seed=2))
    params = params.to_pure_dict()
    rng = np.random.RandomState(1)
    pairs = PairRows.from_dict(collate_preference(random_pairs(rng, 61, 4), 20))
    ref_chosen = rng.uniform(-40, -20, 4).astype(np.float32)
    batch = DPOBatch(pairs, RefLogps(ref_chosen, rng.uniform(-40, -20, 4).astype(np.float32)))
    loss_cfg = DPOLossConfig(loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.5))
    loss_fn = make_dpo_loss_fn(graphdef, loss_cfg, with_entropy=True, with_accuracy=True)
    stats = dpo_batch_stats(None, batch)
    key = jax.random.PRNGKey(0)
    grads_of = jax.jit(
        lambda k: accumulate_grads(loss_fn, params, None, batch, key, stats, grad_accum=k),
        static_argnums=0,
    )
    full, acc = grads_of(1), grads_of(2)
    loss, metrics, grads = full
    assert set(metrics) >= {
        "loss/sigmoid",
        "loss/sft",
        "rewards/accuracies",
        "entropy",
        "mean_token_accuracy",
        "logps/chosen",
    }
    assert_reordered_close(loss, metrics["loss/sigmoid"] + 0.5 * metrics["loss/sft"], n=2)
    # <= 61 terms (hidden 32, MLP 64, vocab 61), 2 layers + head + softmax + the sums.
    assert_reordered_close(acc[0], loss, n=64, depth=5)
    for k in metrics:
        assert_reordered_close(acc[1][k], metrics[k], n=64, depth=5, err_msg=k)
    assert_trees_reordered_close(acc[2], grads, n=64, depth=6)


def test_reference_loss_on_a_batch_without_reference_logps_fails_naming_the_types():
    """A config whose loss needs the reference (sigmoid) refuses a batch whose ``ref`` is
    None, naming the loss types that need it; a reference-free config trains on it."""
    from train_utils import tiny_model_config

    graphdef, params = nnx.split(init_model(tiny_model_config(61), seed=2))
    params = params.to_pure_dict()
    pairs = collate_preference(random_pairs(np.random.RandomState(2), 61, 2), 20)
    batch = DPOBatch(PairRows.from_dict(pairs))
    assert batch.ref is None
    stats, key = dpo_batch_stats(None, batch), jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"\['sigmoid'\] need reference log-probs"):
        make_dpo_loss_fn(graphdef, DPOSection(loss_type=["sigmoid", "sft"]))(
            params, batch, key, stats
        )
    loss, _ = make_dpo_loss_fn(graphdef, DPOSection(loss_type="simpo"))(params, batch, key, stats)
    assert np.isfinite(float(loss))


# ----------------------------------------------------------------------------- the trainer


def test_precomputed_reference_gives_the_online_losses(tiny, tmp_path):
    common = dict(
        dpo={"eval_holdout": 8}, train={"eval_batch_size": 4, "max_steps": 3, "grad_accum": 2}
    )
    online_cfg = config(tiny, tmp_path, "online", **common)
    pre_cfg = config(
        tiny,
        tmp_path,
        "pre",
        **{**common, "dpo": {"eval_holdout": 8, "precompute_ref_logps": True}},
    )
    online = build_dpo_trainer(online_cfg)
    pre = build_dpo_trainer(pre_cfg)
    # Online full FT keeps a reference copy; precomputed keeps no reference at all.
    assert online.state.frozen is not None and pre.state.frozen is None
    assert online.parts.batch_sh.ref is not None
    table = pre.parts.ref_tables["train"]
    assert table.shape == (len(pre.parts.train_pairs), 2) and np.all(table < 0)
    run(online)
    run(pre)
    lo = rows_with(online_cfg.out_dir, "rewards/chosen")
    lp = rows_with(pre_cfg.out_dir, "rewards/chosen")
    assert [r["step"] for r in lo] == [r["step"] for r in lp] == [1, 2, 3]
    assert lo[0]["loss"] == pytest.approx(LOG2, abs=1e-6)  # policy == reference at step 1
    assert lo[-1]["loss"] != pytest.approx(LOG2, abs=1e-4)  # and then it moves
    # The reference's log-probs come from another program (the precompute pass): sums of
    # <= 1000 terms (the tiny tokenizer's vocab), carried through the run's steps.
    # Rewards are beta x differences of summed log-probs: their rounding is relative to
    # beta x those sums, not to the (cancelled) difference; at step 1 (policy == reference)
    # the margins are rounding noise, so which side wins (the accuracy) is not compared.
    beta = online_cfg.dpo.beta
    for a, b in zip(lo, lp, strict=True):
        depth = run_depth(a["step"], 2)
        logps_scale = beta * max(abs(a["logps/chosen"]), abs(a["logps/rejected"]))
        for k in ("loss", "grad_norm"):
            assert_reordered_close(b[k], a[k], n=1000, depth=depth, err_msg=k)
        assert_reordered_close(b["rewards/margins"], a["rewards/margins"], n=1000, depth=depth,
                               scale=logps_scale)
        if a["step"] > 1:
            assert b["rewards/accuracies"] == a["rewards/accuracies"]
    eo = rows_with(online_cfg.out_dir, "eval_loss")[-1]
    ep = rows_with(pre_cfg.out_dir, "eval_loss")[-1]
    assert eo["eval_num_pairs"] == ep["eval_num_pairs"] > 0
    assert_reordered_close(ep["eval_loss"], eo["eval_loss"], n=1000, depth=run_depth(3, 2))


def test_shared_prompt_rows_train_like_padded_rows(tiny, tmp_path):
    """dpo.share_prompt: always (one row per pair) and never (two padded rows) log the same
    train and eval metrics."""
    train = {"eval_batch_size": 4, "max_steps": 3, "grad_accum": 2, "with_entropy": True}
    logged = {}
    for mode in ("never", "always"):
        cfg = config(
            tiny, tmp_path, mode, dpo={"eval_holdout": 8, "share_prompt": mode}, train=train
        )
        trainer = build_dpo_trainer(cfg)
        assert trainer.parts.layout.shared == (mode == "always")
        run(trainer)
        logged[mode] = (
            rows_with(cfg.out_dir, "rewards/chosen"),
            rows_with(cfg.out_dir, "eval_loss")[-1],
        )
    (flat, flat_eval), (shared, shared_eval) = logged["never"], logged["always"]
    assert [r["step"] for r in flat] == [r["step"] for r in shared] == [1, 2, 3]
    keys = ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm", "entropy")
    for a, b in zip(flat, shared, strict=True):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (k, a["step"])
    assert shared_eval["eval_loss"] == pytest.approx(flat_eval["eval_loss"], rel=1e-4, abs=1e-5)
    # The shared rows go through the decoder with fewer tokens.
    assert shared[0]["num_tokens"] < flat[0]["num_tokens"]


def test_auto_shares_the_prompt_when_the_row_costs_less():
    from train_utils import tiny_model_config

    cfg = tiny_model_config(50)
    ids = lambda n, start=1: list(range(start, start + n))  # noqa: E731
    long_prompt = [TokenizedPreference(ids(100), ids(10, 200), ids(12, 300))]
    long_answers = [TokenizedPreference(ids(4), ids(120, 200), ids(124, 400))]
    flops = functools.partial(decoder_forward_flops, cfg)
    shared = lambda mode, pairs: choose_layout(  # noqa: E731
        mode, pairs, max_length=128, pad_id=0, forward_flops=flops
    ).shared
    assert shared("auto", long_prompt)  # 128 tokens instead of 2 x 128
    assert not shared("auto", long_answers)  # a 256-token row costs more
    assert shared("always", long_answers)
    assert not shared("never", long_prompt)


def _nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_lora_dpo_keeps_no_second_copy_and_base_is_the_reference(tiny, tmp_path):
    cfg = config(
        tiny,
        tmp_path,
        "lora",
        lora={"rank": 4, "alpha": 8.0},
        optim={"lr": 3.0e-2, "schedule": "constant"},
    )
    trainer = build_dpo_trainer(cfg)
    bundle, state = trainer.parts.bundle, trainer.state
    # frozen IS the loaded base (the same buffers, no copy) ...
    base_leaves = jax.tree.leaves(bundle.params)
    assert [id(x) for x in jax.tree.leaves(state.frozen)] == [id(x) for x in base_leaves]
    # ... params are only the adapters, and optimizer state mirrors them.
    names = {path_names(p)[-1] for p, _ in jax.tree_util.tree_leaves_with_path(state.params)}
    assert names == {"lora_a", "lora_b"}
    big = {x.shape for x in base_leaves if x.size >= 32 * 32}
    others = jax.tree.leaves((state.params, state.opt_state, state.step, state.rng))
    assert not [x.shape for x in others if x.shape in big]
    assert _nbytes((state.params, state.opt_state)) < 0.25 * _nbytes(bundle.params)

    # The reference log-probs are the base model's (independent forward on numpy copies).
    base_np = jax.tree.map(np.asarray, bundle.params)
    model = nnx.merge(bundle.graphdef, base_np)
    source = trainer.source
    batch = source.next(state)
    want = {}
    for side in ("chosen", "rejected"):
        rows = batch.pairs.side(side)
        lp_BT, _, _ = sequence_token_logprobs(model, rows, impl="reference")
        mask = np.asarray(rows["loss_mask"]) > 0
        want[side] = np.where(mask, np.asarray(lp_BT), 0.0).sum(-1)
        assert_reordered_close(getattr(batch.ref, side), want[side], n=1000, depth=5)

    run(trainer)
    state = trainer.state
    ad_norm = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(state.params))
    assert ad_norm > 0
    ref = trainer.parts.ref_logps(state.frozen, batch.pairs)
    for side in ("chosen", "rejected"):
        assert_reordered_close(getattr(ref, side), want[side], n=1000, depth=5)
    rows = rows_with(cfg.out_dir, "rewards/chosen")
    assert rows[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert rows[-1]["rewards/margins"] != 0.0  # adapters moved the policy off the base


def test_mixed_and_reference_free_loss_types_log_per_type_metrics(tiny, tmp_path):
    cfg = config(
        tiny,
        tmp_path,
        "mixed",
        dpo={"loss_type": ["simpo", "sft"], "loss_weights": [1.0, 0.5]},
        train={"max_steps": 2, "with_entropy": False, "token_accuracy": False},
    )
    trainer = build_dpo_trainer(cfg)
    # Reference-free: no reference params, no reference keys in the batch.
    assert trainer.state.frozen is None
    assert trainer.parts.batch_sh.ref is None
    run(trainer)
    rows = rows_with(cfg.out_dir, "loss/simpo")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss/simpo"] + 0.5 * r["loss/sft"], rel=1e-5)
        # sft is a mean NLL; SimPO rewards are beta * length-averaged log-probs (< 0).
        assert r["loss/sft"] > 0 and r["rewards/chosen"] < 0


def test_bad_loss_type_fails_at_config_load_naming_the_key(tiny, tmp_path):
    model_dir, data_dir = tiny
    path = write_config(
        tmp_path / "bad.yaml",
        model_dir,
        data_dir,
        tmp_path / "bad",
        dpo={"loss_type": ["sigmoid", "sigmiod"]},
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path.resolve()) in msg and "dpo" in msg and "loss_type" in msg
    assert "'sigmiod'" in msg and "did you mean 'sigmoid'" in msg
    path = write_config(
        tmp_path / "bad2.yaml",
        model_dir,
        data_dir,
        tmp_path / "bad2",
        dpo={"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]},
    )
    with pytest.raises(ConfigError, match=r"dpo: loss_weights has 1 weight\(s\) for 2"):
        load_config(path)
    with pytest.raises(ConfigError, match="dpo: eval_holdout: must be >= 0"):
        load_config(path, ["dpo.loss_weights=null", "dpo.eval_holdout=-1"])
    with pytest.raises(ConfigError, match="dpo: share_prompt: 'sometimes'; use 'auto'"):
        load_config(path, ["dpo.loss_weights=null", "dpo.share_prompt=sometimes"])


# ----------------------------------------------------------------------------- e2e


@pytest.mark.e2e
def test_dpo_smollm2_learns_on_held_out_hh_rlhf_pairs(data_dir, tmp_path, capsys):
    """configs/dpo_hh_smollm2_tiny.yaml: full-FT DPO (sigmoid) of SmolLM2 on 32 hh-rlhf
    harmless-base pairs, evaluated on 24 held-out pairs at steps 0, 2, 4.

    At step 0 the policy is the reference: every reward is 0, so the held-out loss is log 2
    and the accuracy 0 (a tie is not a win, as in TRL). Afterwards the held-out accuracy
    rises above that (issue #6's acceptance). Measured 2026-11-21: accuracy 0 -> 0.54 but
    the mean held-out margin went slightly negative (-0.017) and the loss above log 2, so
    these 4 steps are not yet convincing learning; a longer run is tracked in issue #6."""
    from conftest import REPO

    cfg = load_config(
        REPO / "configs" / "dpo_hh_smollm2_tiny.yaml",
        [
            f"data.train={hh_path(data_dir)}",
            f"out_dir={tmp_path / 'run'}",
            "logging.progress=false",
            "train.with_entropy=false",  # CPU time: no extra entropy / accuracy work
            "train.token_accuracy=false",
        ],
    )
    result = run(build_dpo_trainer(cfg))
    evals = rows_with(cfg.out_dir, "eval_rewards/accuracies")
    curve = [
        (
            r["step"],
            round(r["eval_loss"], 5),
            round(r["eval_rewards/accuracies"], 4),
            round(r["eval_rewards/margins"], 5),
        )
        for r in evals
    ]
    with capsys.disabled():
        print("\nheld-out (step, eval_loss, eval_rewards/accuracies, eval_rewards/margins):", curve)
    assert result.step == cfg.train.max_steps == 4
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["eval_num_pairs"] == 24 for r in evals)
    first, last = evals[0], evals[-1]
    assert first["eval_loss"] == pytest.approx(LOG2, abs=1e-6)
    assert first["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert last["eval_rewards/accuracies"] > first["eval_rewards/accuracies"]


@pytest.mark.e2e
def test_sharded_precomputed_run_matches_single_device_online(tiny, tmp_path):
    """4 fake devices (data=2 x fsdp=2), precomputed reference: the same losses and eval
    as one device with the online reference (interleaved pairs stay on their shards)."""
    from conftest import run_with_devices

    model_dir, data_dir = tiny
    paths = {}
    for name, mesh, pre in (
        ("single", {"data": 1, "fsdp": 1}, False),
        ("sharded", {"data": 2, "fsdp": 2}, True),
    ):
        paths[name] = write_config(
            tmp_path / f"{name}.yaml",
            model_dir,
            data_dir,
            tmp_path / name,
            mesh=mesh,
            dpo={"eval_holdout": 8, "precompute_ref_logps": pre},
            train={
                "grad_accum": 2,
                "eval_batch_size": 4,
                "with_entropy": False,
                "token_accuracy": False,
            },
        )
    out = run_with_devices(
        f"""
        import json, jax
        from jaxpt.config_load import load_config
        from jaxpt.sharding import make_mesh
        from jaxpt.trainers.dpo import build_dpo_trainer
        from jaxpt.engine.loop import run
        single = make_mesh(1, 1, 1, devices=jax.devices()[:1])
        for name, path in {{"single": {str(paths["single"])!r},
                            "sharded": {str(paths["sharded"])!r}}}.items():
            tr = build_dpo_trainer(load_config(path), mesh=single if name == "single" else None)
            print(name, json.dumps(len(tr.mesh.devices.flat)))
            run(tr)
    """,
        n_devices=4,
        timeout=600,
    )
    assert "single 1" in out and "sharded 4" in out
    a = read_metrics(tmp_path / "single")
    b = read_metrics(tmp_path / "sharded")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        depth = run_depth(ra["step"], 2)
        for k in ("loss", "eval_loss"):
            if k in ra:
                assert_reordered_close(rb[k], ra[k], n=1000, depth=depth,
                                       err_msg=f"step {ra['step']} {k}")
        for k, logps in (("rewards/margins", "logps/chosen"),
                         ("eval_rewards/margins", "eval_logps/chosen")):
            if k in ra:  # beta x summed log-probs is the scale (see the test above)
                assert_reordered_close(rb[k], ra[k], n=1000, depth=depth,
                                       scale=0.1 * abs(ra[logps]), err_msg=f"step {ra['step']} {k}")
