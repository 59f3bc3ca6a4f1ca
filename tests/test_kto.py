"""KTO: the loss against hand-computed values (TRL's formula, trl/trainer/kto_trainer.py
``_compute_loss``, TRL 1.10: z0 at line 1554, desirable loss line 1563, undesirable line
1580, mean line 1657), the mismatched pairs TRL forms, unpaired data (paired rows unpaired,
errors naming file / row / key), and a tiny run of ``jaxpt train`` (online == precomputed
reference, metrics logged)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from train_utils import make_tiny_tokenizer_and_model, read_metrics

from jaxpt.data.formats import DataError, records_from_rows
from jaxpt.data.unpaired import mismatched_partners, prepare_unpaired, with_mismatched
from jaxpt.losses.kto import KTOLossConfig, kto_loss

# Four rows: desirable, undesirable, desirable, undesirable.
LOGPS = np.array([-10.0, -12.0, -8.0, -9.0])
REF = np.array([-11.0, -11.0, -9.0, -8.0])  # log-ratios r = +1, -1, +1, -1
LABEL = np.array([1.0, 0.0, 1.0, 0.0])
KL = np.array([-20.0, -15.0, -18.0, -25.0])
REF_KL = np.array([-22.0, -16.0, -19.0, -24.0])  # KL diffs 2, 1, 1, -1: mean 0.75


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_kto_loss_hand_computed():
    cfg = KTOLossConfig(beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    loss, m = kto_loss(cfg, LOGPS, REF, LABEL, KL, REF_KL)
    # z0 = max(0, 0.75) = 0.75.
    # desirable:   2 * (1 - sigmoid(0.5 * (1 - 0.75)))  = 2 * (1 - sigmoid(0.125))
    # undesirable: 1 * (1 - sigmoid(0.5 * (0.75 + 1)))  = 1 - sigmoid(0.875)
    # sigmoid(0.125) = 0.5312093733737563, sigmoid(0.875) = 0.7057850278370112
    desirable = 2 * (1 - 0.5312093733737563)
    undesirable = 1 - 0.7057850278370112
    assert math.isclose(sigmoid(0.125), 0.5312093733737563, rel_tol=1e-12)
    expected = (2 * desirable + 2 * undesirable) / 4  # 0.6158981127077381
    assert math.isclose(expected, 0.6158981127077381, rel_tol=1e-12)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    want = {"kl": 0.75, "rewards/chosen": 0.5, "rewards/rejected": -0.5,
            "rewards/margins": 1.0, "logps/chosen": -9.0, "logps/rejected": -10.5,
            "count/chosen": 2.0, "count/rejected": 2.0}
    assert set(m) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(float(m[k]), v, rtol=1e-6, err_msg=k)


def test_kto_reference_point_clamped_at_zero_and_detached():
    cfg = KTOLossConfig(beta=1.0)
    # KL diffs -2, -1, -1, +1: mean -0.75 -> z0 = 0, so the loss is 1 - sigmoid(+-r)
    # with r = +1 (desirable) and -1 (undesirable): every row 1 - sigmoid(1).
    loss, m = kto_loss(cfg, LOGPS, REF, LABEL, REF_KL, KL)
    np.testing.assert_allclose(float(loss), 1 - sigmoid(1.0), rtol=1e-6)
    assert float(m["kl"]) == 0.0
    # z0 carries no gradient (TRL's .detach()); the row log-probs do.
    g_kl = jax.grad(lambda k: kto_loss(cfg, LOGPS, REF, LABEL, k, REF_KL)[0])(jnp.asarray(KL))
    g_lp = jax.grad(lambda lp: kto_loss(cfg, lp, REF, LABEL, KL, REF_KL)[0])(jnp.asarray(LOGPS))
    assert np.all(np.asarray(g_kl) == 0.0)
    # d/dr (1 - sigmoid(r - z0)) = -sigmoid' ; rows are divided by B = 4.
    s = sigmoid(1.0 - 0.75)
    np.testing.assert_allclose(float(g_lp[0]), -s * (1 - s) / 4, rtol=1e-5)


def test_apo_zero_unpaired_and_micro_batch_normalization():
    cfg = KTOLossConfig(loss_type="apo_zero_unpaired", beta=0.5)
    loss, m = kto_loss(cfg, LOGPS, REF, LABEL)  # no mismatched pairs needed
    # desirable 1 - sigmoid(0.5), undesirable sigmoid(-0.5) = 1 - sigmoid(0.5)
    np.testing.assert_allclose(float(loss), 1 - sigmoid(0.5), rtol=1e-6)
    assert float(m["kl"]) == 0.0
    # Two micro-batches normalized by the whole batch's counts add up to the full batch.
    parts = [kto_loss(cfg, LOGPS[s], REF[s], LABEL[s], num_rows=4, num_desirable=2,
                      num_undesirable=2) for s in (slice(0, 1), slice(1, 4))]
    np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(loss), rtol=1e-6)
    for k in m:
        np.testing.assert_allclose(sum(float(p[1][k]) for p in parts), float(m[k]), rtol=1e-6,
                                   atol=1e-7, err_msg=k)


def test_kto_config_and_input_errors():
    with pytest.raises(ValueError, match="loss_type: 'sigmoid'"):
        KTOLossConfig(loss_type="sigmoid")
    with pytest.raises(ValueError, match="desirable_weight: must be a finite number >= 0"):
        KTOLossConfig(desirable_weight=-1.0)
    with pytest.raises(ValueError, match="needs kl_logps and ref_kl_logps"):
        kto_loss(KTOLossConfig(), LOGPS, REF, LABEL)
    with pytest.raises(ValueError, match="must all have shape"):
        kto_loss(KTOLossConfig(), LOGPS, REF[:3], LABEL, KL, REF_KL)


def test_mismatched_partners_rotate_within_chunks():
    # TRL: KL_completion_ids = [c[-1]] + c[:-1] per chunk of per_device_train_batch_size.
    assert mismatched_partners(8, 4).tolist() == [3, 0, 1, 2, 7, 4, 5, 6]
    assert mismatched_partners(7, 3).tolist() == [2, 0, 1, 5, 3, 4, 5]  # last chunk of 1
    assert mismatched_partners(2, 8).tolist() == [1, 0]
    with pytest.raises(ValueError, match="at least 2 rows"):
        mismatched_partners(1, 4)


@pytest.fixture(scope="module")
def tok(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("tiny_kto")
    return make_tiny_tokenizer_and_model(root, data_dir), data_dir


def test_paired_rows_are_unpaired_as_trl(tok):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok[0]))
    rows = [{"prompt": "Add 1 and 2.", "chosen": "3", "rejected": "4"},
            {"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "5"}]
    ex, stats = prepare_unpaired(records_from_rows(rows), tokenizer, max_length=64)
    # All chosen rows first (desirable), then all rejected ones (TRL unpair_preference_dataset).
    assert [e.label for e in ex] == [True, True, False, False]
    texts = [tokenizer.decode(e.completion_ids) for e in ex]
    assert texts == ["3<|im_end|>", "4<|im_end|>", "4<|im_end|>", "5<|im_end|>"]
    assert stats.examples == 4
    pairs, labels = with_mismatched(ex, chunk=4, max_length=64)
    assert labels.tolist() == [1.0, 1.0, 0.0, 0.0]
    # Row 0 (prompt "Add 1 and 2.") is scored with row 3's completion "5", row 1 with row 0's.
    assert tokenizer.decode(pairs[0].rejected_ids) == "5<|im_end|>"
    assert tokenizer.decode(pairs[1].rejected_ids) == "3<|im_end|>"
    assert np.array_equal(pairs[1].prompt_ids, ex[1].prompt_ids)


def test_unpaired_rows_and_their_errors(tok):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok[0]))
    rows = [{"prompt": [{"role": "user", "content": "Hi"}],
             "completion": [{"role": "assistant", "content": "Hello"}], "label": True},
            {"prompt": [{"role": "user", "content": "Hi"}],
             "completion": [{"role": "assistant", "content": "Go away"}], "label": False}]
    ex, _ = prepare_unpaired(records_from_rows(rows, "kto.jsonl"), tokenizer, max_length=64)
    assert [e.label for e in ex] == [True, False]
    assert tokenizer.decode(ex[0].prompt_ids).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ex[0].completion_ids) == "Hello<|im_end|>"
    bad = [dict(rows[0]), {**rows[1], "label": "no"}]
    with pytest.raises(DataError, match=r"kto.jsonl row 2, key 'label': must be true or false"):
        prepare_unpaired(records_from_rows(bad, "kto.jsonl"), tokenizer, max_length=64)
    with pytest.raises(DataError, match=r"kto.jsonl row 1, key 'label': missing"):
        prepare_unpaired(records_from_rows([{"prompt": "a", "completion": "b"}], "kto.jsonl"),
                         tokenizer, max_length=64)


def write_kto_config(path, model_dir, data_dir, out_dir, **kto):
    cfg = {
        "algorithm": "kto", "out_dir": str(out_dir), "model": {"name": str(model_dir)},
        "data": {"train": str(data_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz"),
                 "format": "hh_rlhf", "skip_invalid": True, "max_train_rows": 40,
                 "max_length": 160, "shuffle": False},
        "optim": {"lr": 1e-2, "schedule": "constant"},
        "train": {"max_steps": 2, "batch_size": 4, "seed": 0, "eval_every": 2,
                  "eval_batch_size": 4, "eval_batches": 1, "logprob_impl": "reference"},
        "checkpoint": {"every": 0}, "logging": {"progress": False, "every": 1},
        "kto": {"eval_holdout": 8, **kto},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tiny_kto_run_online_equals_precomputed(tok, tmp_path):
    """Two steps of ``jaxpt train`` on the tiny model with hh-rlhf pairs unpaired: the online
    reference (a frozen copy, scored per batch) and the precomputed table give the same
    losses and metrics; step 1's policy is the reference, so rewards and z0 are 0 and the
    loss is 1 - sigmoid(0) = 0.5 for every row."""
    from jaxpt.cli import main

    model_dir, data_dir = tok
    runs = {}
    for pre in (False, True):
        out = tmp_path / f"pre{pre}"
        cfg = write_kto_config(tmp_path / f"kto{pre}.yaml", model_dir, data_dir, out,
                               precompute_ref_logps=pre, desirable_weight=1.5)
        assert main(["train", str(cfg)]) == 0
        runs[pre] = [r for r in read_metrics(out) if "loss" in r]
    online, pre = runs[False], runs[True]
    assert [r["step"] for r in online] == [1, 2]
    first = online[0]
    n_c, n_r = first["count/chosen"], first["count/rejected"]
    assert n_c + n_r == 4
    np.testing.assert_allclose(first["loss"], 0.5 * (1.5 * n_c + n_r) / 4, rtol=1e-5)
    assert abs(first["kl"]) < 1e-6 and abs(first["rewards/margins"]) < 1e-6
    assert online[1]["loss"] != first["loss"]
    for a, b in zip(online, pre, strict=True):
        for k in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    evals = [r for r in read_metrics(tmp_path / "preFalse") if "eval_loss" in r]
    assert evals and evals[-1]["eval_num_rows"] == 4.0
