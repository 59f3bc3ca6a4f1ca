"""Run configs: YAML loading, base inheritance, overrides, type checks, clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jaxpt.config import ConfigError, RunConfig, config_to_dict, dump_config, register_section
from jaxpt.config_load import build_config, load_config, parse_override
from jaxpt.trainers.registry import get_trainer

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_yaml_in_configs_loads():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files, "configs/ has no YAML files"
    for f in files:
        cfg = load_config(f)
        assert callable(get_trainer(cfg.algorithm)), f  # every recipe names a real trainer
        assert cfg.source == str(f)


def test_values_and_defaults(tmp_path):
    f = write(
        tmp_path / "a.yaml", "optim: {lr: 1e-4, max_grad_norm: null}\ntrain: {batch_size: 6}\n"
    )
    cfg = load_config(f)
    # `1e-4` is a string to YAML 1.1; a float field takes it as the number.
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.max_grad_norm is None
    assert cfg.train.batch_size == 6
    assert cfg.train.grad_accum == 1  # default
    assert cfg.sft.masked_thought == 0.0  # registered section, defaults when absent


def test_unknown_key_names_file_and_key_path_with_suggestion(tmp_path):
    f = write(tmp_path / "x.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"{f.resolve()}: unknown key optim.lrr (did you mean lr?)"


def test_unknown_top_level_section(tmp_path):
    f = write(tmp_path / "x.yaml", "optimm: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"x.yaml: unknown key optimm \(did you mean optim\?\)"):
        load_config(f)


def test_wrong_types_are_named(tmp_path):
    f = write(tmp_path / "x.yaml", "train: {batch_size: four}\n")
    with pytest.raises(
        ConfigError, match=r"x.yaml: train.batch_size: expected an integer, got 'four'"
    ):
        load_config(f)
    f = write(tmp_path / "y.yaml", "optim: {schedule: cosin}\n")
    with pytest.raises(ConfigError, match=r"optim.schedule: 'cosin' is not one of"):
        load_config(f)
    f = write(tmp_path / "z.yaml", "data: {packing: 1}\n")
    with pytest.raises(ConfigError, match=r"data.packing: expected true/false"):
        load_config(f)
    f = write(tmp_path / "w.yaml", "train: 3\n")
    with pytest.raises(ConfigError, match=r"w.yaml: train must be a mapping"):
        load_config(f)


def test_cross_field_validation(tmp_path):
    f = write(tmp_path / "x.yaml", "train: {batch_size: 6, grad_accum: 4}\n")
    with pytest.raises(ConfigError, match="batch_size=6 is not divisible by grad_accum=4"):
        load_config(f)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.b1=1.5", "optim.b1"),
        ("optim.b2=-1", "optim.b2"),
        ("optim.weight_decay=-5", "optim.weight_decay"),
        ("optim.eps=-1e-8", "optim.eps"),
        ("optim.eps=0", "optim.eps"),
        ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
        ("optim.max_grad_norm=.nan", "optim.max_grad_norm"),
        ("optim.max_grad_norm=.inf", "optim.max_grad_norm"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("out_dir=''", "out_dir"),
        ("data.max_train_rows=-5", "data.max_train_rows"),
        ("data.max_eval_rows=0", "data.max_eval_rows"),
        ("train.num_epochs=.nan", "train.num_epochs"),
        ("train.eval_every=-1", "train.eval_every"),
        ("checkpoint.every=-2", "checkpoint.every"),
    ],
)
def test_every_optimizer_and_data_number_is_range_checked(tmp_path, override, key):
    f = write(tmp_path / "x.yaml", "optim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=rf"{key}: must"):
        load_config(f, [override])


def test_overrides_are_yaml_scalars(tmp_path):
    f = write(tmp_path / "x.yaml", "optim: {lr: 0.1}\ndata: {eval: e.jsonl}\n")
    cfg = load_config(
        f,
        [
            "optim.lr=3e-5",
            "lora.rank=8",
            "data.eval=null",
            "lora.targets=wq|wv",
            "out_dir=runs/a b",
            "sft.neftune_alpha=5",
        ],
    )
    assert cfg.optim.lr == 3e-5
    assert cfg.lora.rank == 8
    assert cfg.data.eval is None
    assert cfg.lora.targets == "wq|wv"
    assert cfg.out_dir == "runs/a b"
    assert cfg.sft.neftune_alpha == 5.0
    assert parse_override("train.max_steps=12") == (["train", "max_steps"], 12)


def test_override_errors_say_command_line(tmp_path):
    f = write(tmp_path / "x.yaml", "optim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"^command line: unknown key optim.betas"):
        load_config(f, ["optim.betas=1"])
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        load_config(f, ["optim.lr"])


def test_base_inheritance_and_error_origin(tmp_path):
    write(tmp_path / "full.yaml", "optim: {lr: 0.1, schedule: cosine}\ntrain: {max_steps: 100}\n")
    tiny = write(tmp_path / "tiny.yaml", "base: full.yaml\ntrain: {max_steps: 3}\n")
    cfg = load_config(tiny)
    assert cfg.train.max_steps == 3
    assert cfg.optim.lr == 0.1 and cfg.optim.schedule == "cosine"
    # A bad key inherited from the base file is reported against the base file.
    write(tmp_path / "bad.yaml", "optim: {lrr: 0.1}\n")
    child = write(tmp_path / "child.yaml", "base: bad.yaml\ntrain: {max_steps: 3}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key optim.lrr"):
        load_config(child)
    loop = write(tmp_path / "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="inheritance loops"):
        load_config(loop)


def test_dump_round_trip(tmp_path):
    f = write(tmp_path / "x.yaml", "optim: {lr: 0.001}\nsft: {neftune_alpha: 5}\nlora: {rank: 4}\n")
    cfg = load_config(f)
    dump_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again == cfg
    assert config_to_dict(again)["sft"]["neftune_alpha"] == 5.0


def test_algorithm_sections_plug_in_without_touching_the_loader():
    @register_section("toyalgo")
    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        beta: float = 0.1
        loss_type: str = "sigmoid"

    cfg = build_config({"algorithm": "toyalgo", "toyalgo": {"beta": 0.5}}, source="t.yaml")
    assert cfg.section("toyalgo") == ToyConfig(beta=0.5)
    assert cfg.toyalgo.loss_type == "sigmoid"
    with pytest.raises(
        ConfigError, match=r"t.yaml: unknown key toyalgo.bta \(did you mean beta\?\)"
    ):
        build_config({"toyalgo": {"bta": 1}}, source="t.yaml")
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize(
    "grpo, message",
    [
        # Accepted before, and then sft_weight -> 0 after step 0: SFT silently off.
        ("{sft_weight: 0.5, sft_schedule: linear}", "sft_schedule=linear needs grpo.sft_decay"),
        ("{sft_weight: 0.5, sft_schedule: warmup_then_rl}", "needs grpo.sft_warmup_steps >= 1"),
        ("{sft_schedule: linear, sft_decay_steps: 5}", "it needs grpo.sft_weight > 0"),
    ],
)
def test_hybrid_schedules_that_combine_badly_fail_at_load(tmp_path, grpo, message):
    f = write(tmp_path / "g.yaml", f"algorithm: grpo\ngrpo: {grpo}\n")
    with pytest.raises(ConfigError, match=message) as e:
        load_config(f)
    assert str(f) in str(e.value)
    ok = write(tmp_path / "ok.yaml", "algorithm: grpo\n"
               "grpo: {sft_weight: 0.5, sft_schedule: linear, sft_decay_steps: 5}\n")
    assert load_config(ok).grpo.sft_decay_steps == 5
