"""The worked example of docs/adding_an_algorithm.md: its loss against a hand computation,
label_smoothing=0 == the SFT loss exactly, a tiny `jaxpt train` run naming it by import
path, and the errors for an import path that does not import or registers no trainer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpt.algorithms.sft import SFTBatch, make_sft_loss_fn
from jaxpt.config import ConfigError, SFTConfig
from jaxpt.config_load import load_config
from jaxpt.data.packing import collate_padded
from jaxpt.data.tokenize import TokenizedExample
from jaxpt.engine.state import accumulate_grads
from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import init_model
from jaxpt.trainers.registry import get_trainer
from tests.algorithms_example.sft_smooth import SmoothBatch, batch_stats, make_loss_fn

V = 48
CFG = ModelConfig(model_type="llama", vocab_size=V, hidden_size=16, intermediate_size=32,
                  num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                  max_position_embeddings=32)


@pytest.fixture(scope="module")
def model_and_batch():
    graphdef, state = nnx.split(init_model(CFG, seed=0))
    rng = np.random.RandomState(0)
    ex = []
    for n in (7, 11, 5):
        mask = np.zeros(n, bool)
        mask[2:] = True
        ex.append(TokenizedExample(rng.randint(1, V, n).astype(np.int32), mask))
    batch = {k: jnp.asarray(v) for k, v in collate_padded(ex, max_length=12).items()}
    return graphdef, state.to_pure_dict(), batch


def typed(batch) -> SmoothBatch:
    return SmoothBatch(batch["input_ids"], batch["targets"], batch["loss_mask"],
                       batch["positions"], batch["segment_ids"])


def test_loss_equals_a_hand_computation(model_and_batch):
    graphdef, params, batch = model_and_batch
    eps = 0.2
    b = typed(batch)
    loss, m = jax.jit(lambda p, b: make_loss_fn(graphdef, eps, impl="reference")(
        p, b, None, batch_stats(None, b)))(params, b)
    # By hand, in float64 from the full logits: -(1-eps) log p(t) - eps mean_v log p(v).
    model = nnx.merge(graphdef, params)
    hidden, _ = model(b.input_ids, b.positions, b.segment_ids)
    logits = np.asarray(hidden, np.float64) @ np.asarray(model.lm_head, np.float64).T
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tgt = np.asarray(b.targets)
    lp_t = np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    per_token = -(1 - eps) * lp_t - eps * logp.mean(-1)
    mask = np.asarray(b.loss_mask) > 0
    want = per_token[mask].sum() / mask.sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["nll"]), -lp_t[mask].sum() / mask.sum(), rtol=1e-5)
    assert abs(want - -lp_t[mask].mean()) > 1e-3  # the smoothing term counts


def test_zero_smoothing_is_the_sft_loss_exactly(model_and_batch):
    graphdef, params, batch = model_and_batch
    sft = make_sft_loss_fn(graphdef, SFTConfig(), impl="reference", with_entropy=False,
                           with_accuracy=False)
    smooth = make_loss_fn(graphdef, 0.0, impl="reference")

    def grads(loss_fn, b):
        stats = {"num_target_tokens": jnp.sum(batch["loss_mask"] > 0, dtype=jnp.float32)}
        return jax.jit(lambda p: accumulate_grads(loss_fn, p, None, b, jax.random.key(0),
                                                  stats))(params)

    loss_s, _, g_s = grads(sft, SFTBatch(**batch))
    loss_l, _, g_l = grads(smooth, typed(batch))
    assert float(loss_l) == float(loss_s)
    for a, b in zip(jax.tree.leaves(g_l), jax.tree.leaves(g_s), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.e2e
def test_trains_by_import_path_through_jaxpt_train(tmp_path, data_dir, capsys):
    from train_utils import make_tiny_tokenizer_and_model, read_metrics, tiny_run_config

    from jaxpt.cli import main

    model_dir = make_tiny_tokenizer_and_model(tmp_path, data_dir)
    out = tmp_path / "run"
    config = tiny_run_config(tmp_path / "run.yaml", model_dir, data_dir, out,
                             algorithm="tests.algorithms_example.sft_smooth",
                             sft_smooth={"label_smoothing": 0.1}, train={"max_steps": 3})
    assert load_config(config).sft_smooth.label_smoothing == 0.1
    assert main(["train", str(config)]) == 0
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] != r["nll"] for r in rows)
    assert (out / "checkpoints" / "3").is_dir()
    assert "tests.algorithms_example.sft_smooth: done at step 3" in capsys.readouterr().out


def test_section_loads_and_checks_its_values(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("sft_smooth: {label_smoothing: 0.25}\n"  # before `algorithm`: still known
                 "algorithm: tests.algorithms_example.sft_smooth\n")
    assert load_config(f).sft_smooth.label_smoothing == 0.25
    with pytest.raises(ConfigError, match=r"run.yaml: sft_smooth: label_smoothing must be "
                                          r"in \[0, 1\), got 1.5"):
        load_config(f, ["sft_smooth.label_smoothing=1.5"])


def test_import_path_errors_name_the_key(tmp_path, monkeypatch):
    missing = tmp_path / "missing.yaml"
    missing.write_text("algorithm: nosuchpkg.my_algo\n")
    with pytest.raises(ConfigError, match=r"missing.yaml: algorithm: 'nosuchpkg.my_algo' is "
                                          r"not a jaxpt algorithm and no module"):
        load_config(missing)
    with pytest.raises(ValueError, match="no module 'nosuchpkg.my_algo'"):
        get_trainer("nosuchpkg.my_algo")
    (tmp_path / "quiet_algo.py").write_text("X = 1  # registers nothing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    quiet = tmp_path / "quiet.yaml"
    quiet.write_text("algorithm: quiet_algo.sub\n")
    with pytest.raises(ConfigError, match="no module 'quiet_algo.sub'"):
        load_config(quiet)
    (tmp_path / "quiet_pkg").mkdir()
    (tmp_path / "quiet_pkg" / "algo.py").write_text("X = 1\n")
    quiet.write_text("algorithm: quiet_pkg.algo\n")
    assert load_config(quiet).algorithm == "quiet_pkg.algo"
    with pytest.raises(ValueError, match=r"algorithm='quiet_pkg.algo': module quiet_pkg.algo "
                                         r"was imported but registered no trainer"):
        get_trainer("quiet_pkg.algo")
