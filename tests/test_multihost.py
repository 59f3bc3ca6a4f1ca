"""Multi-process training: how processes are joined (jaxpt.distributed), and a real run of
two CPU processes x 4 devices that logs the same losses as one process x 8 devices, stops
together on SIGTERM, saves one checkpoint collectively and resumes from it.

The e2e test starts its own processes (``launch/local_multiprocess.sh`` for the first leg,
two ``jaxpt train`` processes for the resumed leg), each in its own session with a
timeout; on any failure every process it started is killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_with_devices
from tolerances import assert_reordered_close, run_depth
from train_utils import (
    make_tiny_model_dir,
    make_tiny_tokenizer,
    make_tiny_tokenizer_and_model,
    read_metrics,
    tiny_run_config,
    train_losses,
)

from jaxpt.config_load import load_config
from jaxpt.distributed import (
    DistributedConfig,
    InitPlan,
    detect_method,
    plan_init,
    settings_from,
    settings_from_args,
)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300
# The GRPO / RFT runs compile more programs (rollout, scoring, eval): more room on a busy machine.
RL_TIMEOUT = 600

# ----------------------------------------------------------------------------- plan_init


def test_explicit_settings_switch_cluster_detection_off():
    s = DistributedConfig(coordinator="10.0.0.1:1234", num_processes=4, process_id=3)
    plan = plan_init(s, env={"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "8"})
    assert plan == InitPlan(
        "explicit",
        dict(
            coordinator_address="10.0.0.1:1234",
            num_processes=4,
            process_id=3,
            cluster_detection_method="deactivate",
            initialization_timeout=300,
        ),
    )
    with_ids = plan_init(settings_from(s, local_device_ids=[2]), env={})
    assert with_ids.kwargs["local_device_ids"] == [2]
    one = DistributedConfig(coordinator="h:1", num_processes=1, process_id=0)
    assert plan_init(one, env={}).method == "single"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(coordinator="h:1", num_processes=2), "without process_id"),
        (dict(process_id=0), "without coordinator, num_processes"),
        (dict(coordinator="host-without-port", num_processes=2, process_id=0), "host:port"),
        (dict(coordinator="h:1", num_processes=2, process_id=2), r"process_id=2 must be in"),
        (dict(coordinator="h:1", num_processes=0, process_id=0), "num_processes=0"),
    ],
)
def test_bad_explicit_settings_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        plan_init(DistributedConfig(**kw), env={})


@pytest.mark.parametrize(
    "env, method",
    [
        ({}, None),
        ({"SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, "slurm"),
        # a batch script outside srun, or a one-task step: a single process
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),
        ({"SLURM_STEP_NODELIST": "gpu01", "SLURM_NTASKS": "1"}, None),
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "1"}, None),
        ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, "tpu"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ],
)
def test_auto_detection(env, method):
    assert detect_method(env) == method
    plan = plan_init(DistributedConfig(), env=env)
    assert plan.method == (method or "single")
    if method:  # JAX reads the cluster's environment itself
        assert plan.kwargs == {"initialization_timeout": 300}
    assert plan_init(DistributedConfig(auto=False), env=env).method == "single"


def test_cli_flags_override_the_config_section(tmp_path):
    from jaxpt.cli import build_parser

    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(
        "algorithm: sft\ndistributed:\n  coordinator: 10.0.0.1:9000\n  num_processes: 4\n"
        "  process_id: 0\n  local_device_ids: [0, 1]\n"
    )
    args = build_parser().parse_args(
        ["train", str(cfg_path), "train.seed=1", "--process-id", "3", "--num-processes", "4"]
    )
    cfg = load_config(args.config, args.overrides)
    s = settings_from_args(cfg.distributed, args)
    assert (s.coordinator, s.num_processes, s.process_id) == ("10.0.0.1:9000", 4, 3)
    assert s.local_device_ids == (0, 1)
    (tmp_path / "bad.yaml").write_text("distributed:\n  coordinatr: h:1\n")
    with pytest.raises(ValueError, match="distributed.coordinatr.*did you mean coordinator"):
        load_config(tmp_path / "bad.yaml")


def test_metrics_writer_of_other_processes_writes_nothing(tmp_path):
    from jaxpt.engine.metrics import MetricsWriter

    w = MetricsWriter(tmp_path / "run", total_steps=3, progress=True, enabled=False)
    assert w.write(1, {"loss": 2.5}) == {"step": 1, "loss": 2.5}
    w.progress(1, {"loss": 2.5})
    w.close()
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with_devices(n: int) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
        # tests/ too: the GRPO / RFT runs load reward functions from test modules.
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]),
        PYTHON=sys.executable,
    )
    return env


class Procs:
    """Processes started in their own sessions; ``kill_all`` ends them and their children."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd, env, log: Path) -> subprocess.Popen:
        out = open(log, "w")  # noqa: SIM115
        p = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        self.procs.append(p)
        return p

    def wait_all(self, timeout: float, logs: list[Path]) -> None:
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                rc = p.wait(max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"timed out after {timeout}s:\n{tails(logs)}") from None
            if rc != 0:
                raise AssertionError(f"{p.args[:6]} exited with {rc}:\n{tails(logs)}")
        self.procs.clear()

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        self.procs.clear()


def tails(logs: list[Path]) -> str:
    return "\n".join(
        f"--- {log.name}\n{log.read_text()[-2500:] if log.exists() else '(none)'}" for log in logs
    )


def train_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxpt.cli", "train", str(config), *extra]


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.kill_all()


# Enough steps that the SIGTERM (sent once step 1 is logged, and honoured one or two steps
# later at JAX's preemption sync point) lands before the end even on a loaded CI machine:
# with 5 the run once finished all of them first.
STEPS = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data_dir) -> Path:
    return make_tiny_tokenizer_and_model(tmp_path_factory.mktemp("multihost"), data_dir)


@pytest.fixture(scope="module")
def config(model_dir, data_dir) -> Path:
    root = model_dir.parent
    return tiny_run_config(
        root / "run.yaml",
        model_dir,
        data_dir,
        root / "unused",
        train={"max_steps": STEPS, "batch_size": 8},
        checkpoint={"every": 0},
    )


def start_two(procs: Procs, config: Path, out_dirs: list[Path], logs: list[Path]) -> None:
    """Two `jaxpt train` processes x 4 devices joined with explicit flags."""
    port = free_port()
    for i in range(2):
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
        flags += ["--process-id", str(i)]
        cmd = train_cmd(config, f"out_dir={out_dirs[i]}", *flags)
        procs.start(cmd, env_with_devices(4), logs[i])


@pytest.mark.e2e
def test_two_processes_match_one_and_resume_together(tmp_path, config, procs):
    steps = STEPS

    # One process x 8 devices, uninterrupted: the reference.
    ref_dir, ref_log = tmp_path / "ref", tmp_path / "ref.log"
    procs.start(train_cmd(config, f"out_dir={ref_dir}"), env_with_devices(8), ref_log)
    procs.wait_all(TIMEOUT, [ref_log])
    reference = read_metrics(ref_dir)
    assert [r["step"] for r in reference] == list(range(1, steps + 1))

    # Two processes x 4 devices through the launch script; SIGTERM to the script once a
    # step is logged: it forwards the signal, both processes stop at the same step and
    # save one checkpoint together.
    run_dir, logs_dir = tmp_path / "multi", tmp_path / "logs"
    leg1 = tmp_path / "leg1.log"
    script = procs.start(
        [
            "bash",
            "launch/local_multiprocess.sh",
            "-n",
            "2",
            "-d",
            "4",
            "-l",
            str(logs_dir),
            str(config),
            f"out_dir={run_dir}",
        ],
        env_with_devices(4),
        leg1,
    )
    logs = [leg1, logs_dir / "process_1.log"]
    deadline = time.time() + TIMEOUT
    while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir):
        if script.poll() is not None or time.time() > deadline:
            raise AssertionError(f"no step logged ({script.poll()}):\n{tails(logs)}")
        time.sleep(0.05)
    script.send_signal(signal.SIGTERM)
    procs.wait_all(TIMEOUT, logs)
    out = leg1.read_text()
    stopped = max(r["step"] for r in read_metrics(run_dir))
    assert f"stopped by a preemption notice (SIGTERM) after step {stopped}" in out, tails(logs)
    assert stopped < steps, f"the SIGTERM arrived after the last step ({stopped})"
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [stopped]
    assert "Reached preemption sync point" in (logs_dir / "process_1.log").read_text()

    # Resume with two plain `jaxpt train` processes (explicit flags) to the end.
    leg2 = [tmp_path / f"leg2_process_{i}.log" for i in range(2)]
    start_two(procs, config, [run_dir, run_dir], leg2)
    procs.wait_all(TIMEOUT, leg2)
    assert f"resumed from checkpoint step {stopped}" in leg2[0].read_text()
    # Process 0 alone prints and logs: one metrics row per step, no duplicates.
    assert "resumed from" not in leg2[1].read_text()
    multi = read_metrics(run_dir)
    assert [r["step"] for r in multi] == list(range(1, steps + 1))
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [stopped, steps]

    # Same global batches, same math: the losses agree with one process (the all-reduces
    # run in another order over gloo, hence a tolerance, not equality) and the token counts
    # are the global batch's.
    ref_losses, multi_losses = train_losses(ref_dir), train_losses(run_dir)
    for s in range(1, steps + 1):
        assert_reordered_close(multi_losses[s], ref_losses[s], n=1000, depth=run_depth(s, 2),
                               err_msg=f"step {s}")
    assert [r["num_tokens"] for r in multi] == [r["num_tokens"] for r in reference]
    assert [r["num_target_tokens"] for r in multi] == [r["num_target_tokens"] for r in reference]


def test_batch_layout_must_follow_processes():
    """Two pretend processes over 8 CPU devices (ids 0-3: process 0, 4-7: process 1)."""
    out = run_with_devices(
        """
        import jax
        from jaxpt.distributed import check_batch_layout
        from jaxpt.sharding import make_mesh

        of = lambda d: d.id // 4
        devs = jax.devices()
        check_batch_layout(make_mesh(1, 8, 1), process_count=2, process_of=of)
        check_batch_layout(make_mesh(2, 2, 2), process_count=2, process_of=of)
        for mesh in (
            make_mesh(1, 8, 1, devices=devs[4:] + devs[:4]),  # process 1's devices first
            make_mesh(1, 1, 8),  # tensor spans both processes: one batch shard for two
            make_mesh(1, 4, 2, devices=devs[::2] + devs[1::2]),
        ):
            try:
                check_batch_layout(mesh, process_count=2, process_of=of)
                print("accepted", dict(mesh.shape))
            except ValueError as e:
                print("rejected:", e)
        """,
        n_devices=8,
    )
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("rejected:") for line in lines), out
    assert "holds batch rows [0, 1) of 8, outside process 1's block [4, 8)" in lines[0]
    assert "1 shard(s)" in lines[1] and "do not divide over 2 processes" in lines[1]
    assert "outside process" in lines[2]


@pytest.mark.e2e
def test_out_dir_that_is_not_shared_stops_every_process(tmp_path, config, procs):
    """Each process gets its own out_dir (as on hosts without a shared filesystem): every
    process fails with the same clear error before training, none hangs."""
    dirs = [tmp_path / "host0", tmp_path / "host1"]
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    start_two(procs, config, dirs, logs)
    deadline = time.time() + TIMEOUT
    for p in procs.procs:
        assert p.wait(max(1.0, deadline - time.time())) == 2, tails(logs)
    for log in logs:
        text = log.read_text()
        assert "is not shared by all 2 processes (process(es) [1] cannot read" in text, text
    assert not (dirs[0] / "checkpoints" / "1").exists()


def test_loading_any_recipe_starts_no_jax_backend():
    """`jaxpt train` loads the config (importing the trainer modules) before
    jax.distributed.initialize, which must come before any JAX computation."""
    out = run_with_devices(
        """
        import glob
        from jaxpt.cli import build_parser
        from jaxpt.config_load import load_config
        build_parser()
        for path in sorted(glob.glob("configs/*.yaml")):
            load_config(path)
        from jax._src import xla_bridge
        print("initialized:", xla_bridge.backends_are_initialized())
        """,
        n_devices=1,
    )
    assert out.strip() == "initialized: False"


# ----------------------------------------------------------------------------- GRPO / RFT

# Device metrics (summed over devices in another order on two processes: rounding) vs
# host metrics (rewards, lengths, dynamic-sampling counts: from the sampled tokens, equal).
DEVICE_METRICS = ("loss", "rl_loss", "entropy", "grad_norm", "kl", "clip_ratio/")
WALL_CLOCK = ("time/", "tokens_per_second", "samples_per_second", "steps_per_second", "mfu")


def launch(procs: Procs, config: Path, logs_dir: Path, log: Path, *overrides: str):
    """``launch/local_multiprocess.sh -n 2 -d 4 CONFIG overrides`` (process 0 -> ``log``)."""
    cmd = ["bash", "launch/local_multiprocess.sh", "-n", "2", "-d", "4", "-l", str(logs_dir),
           str(config), *overrides]
    return procs.start(cmd, env_with_devices(4), log)


def one_vs_two(procs: Procs, config: Path, tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    """``config`` run by 1 process x 8 devices and, beside it, by 2 processes x 4 devices
    (the launch script); waits for both. Returns (reference dir, 2-process dir, logs)."""
    ref_dir, run_dir, logs_dir = tmp_path / "ref", tmp_path / "multi", tmp_path / "logs"
    logs = [tmp_path / "ref.log", tmp_path / "multi.log", logs_dir / "process_1.log"]
    procs.start(train_cmd(config, f"out_dir={ref_dir}"), env_with_devices(8), logs[0])
    launch(procs, config, logs_dir, logs[1], f"out_dir={run_dir}")
    procs.wait_all(RL_TIMEOUT, logs)
    return ref_dir, run_dir, logs


def assert_same_run(multi: list[dict], reference: list[dict], num_layers: int = 2,
                    device: tuple[str, ...] = (), skip=lambda step, key: False) -> None:
    """Same steps and keys; host metrics equal; device metrics (``DEVICE_METRICS`` and
    ``device``) equal up to reordering; ``skip(step, key)``: not compared."""
    assert [r["step"] for r in multi] == [r["step"] for r in reference]
    for m, r in zip(multi, reference, strict=True):
        keys = {k for k in r if not k.startswith(WALL_CLOCK)}
        assert keys == {k for k in m if not k.startswith(WALL_CLOCK)}, (m, r)
        for k in sorted(keys):
            if skip(r["step"], k):
                continue
            if k.startswith(DEVICE_METRICS + device):
                # A loss near 0 is a sum of terms of size ~1 (advantages): scale 1.
                assert_reordered_close(m[k], r[k], n=1000, depth=run_depth(r["step"], num_layers),
                                       scale=max(1.0, abs(r[k])), err_msg=f"step {r['step']} {k}")
            else:
                assert m[k] == r[k], f"step {r['step']} {k}: {m[k]} != {r[k]}"


@pytest.fixture(scope="module")
def grpo_config(model_dir, data_dir) -> Path:
    """GRPO with the options whose statistics cross processes: mu = 2 passes over each
    rollout (old log-probs scored across processes), DAPO dynamic sampling (its rounds
    and stopping decision) and batch-scaled rewards (the whole batch's std)."""
    grpo = {"num_generations": 4, "max_completion_length": 8, "max_prompt_length": 128,
            "reward_funcs": ["tests.grpo_rewards:digit_fraction"], "temperature": 1.0,
            "num_iterations": 2, "dynamic_sampling": True, "max_sampling_rounds": 3,
            "scale_rewards": "batch"}
    return tiny_run_config(
        model_dir.parent / "grpo.yaml", model_dir, data_dir, model_dir.parent / "unused",
        algorithm="grpo", grpo=grpo, checkpoint={"every": 0},
        train={"max_steps": 4, "batch_size": 8, "seed": 0, "logprob_impl": "chunked"},
        optim={"lr": 1e-2, "schedule": "constant", "warmup_steps": 0},
    )


@pytest.mark.e2e
def test_grpo_two_processes_match_one_and_resume(tmp_path, grpo_config, procs):
    """GRPO on 2 processes x 4 devices (the launch script, stopped after the first rollout
    and resumed to the end) logs what 1 process x 8 devices logs uninterrupted."""
    ref_dir, ref_log = tmp_path / "ref", tmp_path / "ref.log"
    procs.start(train_cmd(grpo_config, f"out_dir={ref_dir}"), env_with_devices(8), ref_log)
    run_dir, logs_dir = tmp_path / "multi", tmp_path / "logs"
    legs = [tmp_path / "leg1.log", tmp_path / "leg2.log"]
    # Leg 1 runs beside the reference (the machine's two cores); both legs end by themselves.
    launch(procs, grpo_config, logs_dir, legs[0], f"out_dir={run_dir}", "train.stop_after_steps=2")
    procs.wait_all(RL_TIMEOUT, [ref_log, legs[0], logs_dir / "process_1.log"])
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [2]
    launch(procs, grpo_config, logs_dir, legs[1], f"out_dir={run_dir}")
    procs.wait_all(RL_TIMEOUT, [legs[1], logs_dir / "process_1.log"])
    assert "resumed from checkpoint step 2" in legs[1].read_text()
    assert "grpo: done at step 4" in legs[1].read_text()

    reference, multi = read_metrics(ref_dir), read_metrics(run_dir)
    assert [r["step"] for r in reference] == [1, 2, 3, 4]
    # The runs exercised what must be global: two rollouts (mu = 2), dynamic sampling
    # that took more than one round for one of them.
    assert [r.get("rollout") for r in reference] == [1.0, None, 2.0, None]
    assert max(r.get("dynamic_sampling/rounds", 0) for r in reference) > 1, reference
    assert_same_run(multi, reference)


@pytest.mark.e2e
def test_rft_two_processes_keep_the_same_samples(tmp_path, model_dir, procs):
    """RFT on 2 processes x 4 devices: the same samples, verdicts, DART rounds and kept rows
    as 1 process x 8 devices, written once; the SFT stage logs the same losses."""
    cfg = {
        "algorithm": "rft",
        "model": {"name": str(model_dir)},
        "data": {"max_length": 128, "packing": False},
        "optim": {"lr": 1.0e-3},
        "train": {"max_steps": 2, "batch_size": 8, "seed": 0},
        "checkpoint": {"every": 0},
        "logging": {"progress": False},
        "rft": {"num_samples": 3, "min_correct": 2, "keep_per_prompt": 2, "rounds": 2,
                "budget": 30, "max_samples_per_round": 4, "keep_truncated": True,
                "max_new_tokens": 4, "batch_size": 8, "temperature": 1.0,
                "verifier": "tests.test_rft:char_verifier",
                "arithmetic": {"train": 6, "eval": 0, "seed": 1}},
    }
    path = tmp_path / "rft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ref_dir, run_dir, logs = one_vs_two(procs, path, tmp_path)

    for name in ("samples.jsonl", "train.jsonl"):
        assert (run_dir / "rft" / name).read_text() == (ref_dir / "rft" / name).read_text()
    summary = json.loads((run_dir / "rft" / "summary.json").read_text())
    ref_summary = json.loads((ref_dir / "rft" / "summary.json").read_text())
    assert summary["rounds"] == ref_summary["rounds"] and len(summary["rounds"]) == 2
    assert summary["kept"] == ref_summary["kept"] > 0
    # Process 0 alone wrote and printed; process 1 read the same files.
    assert sorted(p.name for p in (run_dir / "rft").iterdir()) == [
        "samples.jsonl", "summary.json", "train.jsonl"]
    assert "rft: kept" in logs[1].read_text() and "rft: kept" not in logs[2].read_text()
    assert_same_run(read_metrics(run_dir), read_metrics(ref_dir))


def test_row_blocks_of_processes(monkeypatch):
    """Process p of P takes rows block p; blocks of the shared-prompt layout hold whole
    groups (pretend process 1 of 2)."""
    import jax

    from jaxpt.rl import processes

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert processes.row_block(8) == slice(4, 8)
    rows = {"ids": np.arange(16).reshape(8, 2)}
    np.testing.assert_array_equal(processes.local_rows(rows, 8)["ids"][:, 0], [8, 10, 12, 14])
    with pytest.raises(ValueError, match="7 rollout rows do not split over 2 processes"):
        processes.row_block(7, what="rollout rows")
    assert processes.rows_per_process(16, 4, where="run.yaml") == 8
    with pytest.raises(ValueError, match="run.yaml: train.batch_size=12 over 2 processes is 6 "
                                         "rows per process, not whole groups"):
        processes.rows_per_process(12, 4, where="run.yaml")
    assert processes.rows_per_process(12, None, where="run.yaml") == 6


def test_environment_steps_run_on_the_row_owner_only(monkeypatch):
    """``map_owned`` (pretend process 1 of 2): only the rows of this process's block run
    here, every result comes back in order (process 0's from the gather), and a row keeps
    its owner however many rows are still active."""
    import jax

    from jaxpt.rl import processes

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert [processes.row_owner(r, 5) for r in range(5)] == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="row 5 is not one of 5 rows"):
        processes.row_owner(5, 5)
    ran: list[int] = []

    def step(x):
        ran.append(x)
        return x * 10

    def gather(local):  # process 0 ran its rows (as x * 10) and sent them
        return [{k: rows[k] * 10 for k in range(len(rows)) if rows[k] < 3}, local]

    monkeypatch.setattr(processes, "gather_objects", gather)
    rows = [0, 2, 3, 4]  # the rows still active this turn
    assert processes.map_owned(step, rows, rows, num_rows=5) == [0, 20, 30, 40]
    assert ran == [3, 4]  # rows 0 and 2 belong to process 0


@pytest.fixture(scope="module")
def multiturn_config(tmp_path_factory, data_dir) -> Path:
    """Multi-turn GRPO with the two-turn ``AskTwiceEnv`` (its own turn counter: a row's
    steps must all run on one process) and a reward function beside its reward part; half
    the tiny vocabulary ends a turn, so the random policy's turns end."""
    root = tmp_path_factory.mktemp("multihost_multiturn")
    tok = make_tiny_tokenizer(root / "tok", data_dir)
    model_dir = make_tiny_model_dir(root / "model", tok)
    (model_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": list(range(1, len(tok), 2))}))
    grpo = {"num_generations": 4, "max_completion_length": 8, "max_prompt_length": 128,
            "reward_funcs": ["tests.grpo_rewards:digit_fraction"], "temperature": 1.0,
            "environment": "tests.grpo_rewards:AskTwiceEnv", "max_turns": 2}
    return tiny_run_config(
        root / "grpo.yaml", model_dir, data_dir, root / "unused",
        algorithm="grpo", grpo=grpo, checkpoint={"every": 0},
        train={"max_steps": 2, "batch_size": 8, "seed": 0, "logprob_impl": "chunked"},
        optim={"lr": 1e-2, "schedule": "constant", "warmup_steps": 0},
    )


@pytest.mark.e2e
def test_multi_turn_grpo_two_processes_match_one(tmp_path, multiturn_config, procs):
    """Multi-turn GRPO on 2 processes x 4 devices (one decode session over both hosts'
    devices; each row's environment steps on its owner process) logs what 1 process x 8
    devices logs: the same turns, environment rewards, losses."""
    ref_dir, run_dir, _ = one_vs_two(procs, multiturn_config, tmp_path)
    reference = read_metrics(ref_dir)
    assert [r["step"] for r in reference] == [1, 2]
    assert all(r["turns/mean"] > 1.0 for r in reference), reference  # the env asked again
    assert "env_rewards/second_turn_digits/mean" in reference[0]
    assert_same_run(read_metrics(run_dir), reference)


@pytest.mark.e2e
def test_online_dpo_two_processes_match_one(tmp_path, model_dir, procs):
    """Online DPO on 2 processes x 4 devices (pairs sampled over both hosts' devices, the
    ranking on every process, each process serving its block of the pairs; the held-out
    eval too) logs what 1 process x 8 devices logs."""
    cfg = {
        "algorithm": "online_dpo",
        "model": {"name": str(model_dir)},
        "data": {"max_train_rows": 32, "max_eval_rows": 8},
        "optim": {"lr": 1e-2, "schedule": "constant"},
        "train": {"max_steps": 2, "batch_size": 8, "seed": 0, "logprob_impl": "chunked",
                  "eval_every": 2},
        "checkpoint": {"every": 0},
        "logging": {"progress": False, "every": 1},
        "online_dpo": {"task": "arithmetic", "max_completion_length": 8, "temperature": 1.0,
                       "reward_funcs": ["tests.grpo_rewards:digit_fraction"],
                       "eval_prompts": 8, "eval_batch_size": 8, "missing_eos_penalty": 0.5},
    }
    path = tmp_path / "odpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ref_dir, run_dir, _ = one_vs_two(procs, path, tmp_path)
    reference = read_metrics(ref_dir)
    assert [r["step"] for r in reference if "loss" in r] == [1, 2]
    assert any("eval_accuracy" in r for r in reference)
    assert any(r.get("pairs/tied_frac", 1.0) < 1.0 for r in reference), reference  # pairs trained
    # The DPO statistics come from the device (log-probs): equal up to reordering. At step 1
    # the policy is the reference, so every implicit reward is rounding noise (~1e-7) and
    # the fraction of pairs with a positive margin is that noise's sign: not compared.
    assert abs(reference[0]["rewards/margins"]) < 1e-5
    dpo_device = ("logps/", "logits/", "rewards/chosen", "rewards/rejected", "rewards/margins",
                  "rewards/accuracies", "objective/kl", "objective/entropy",
                  "objective/non_score_reward", "objective/rlhf_reward")
    assert_same_run(read_metrics(run_dir), reference, device=dpo_device,
                    skip=lambda step, k: step == 1 and k == "rewards/accuracies")
