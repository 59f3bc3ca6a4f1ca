"""Exact resume: runs interrupted by SIGTERM, or by kill -9 after a completed save, and
then resumed log the same per-step losses as an uninterrupted run, bit for bit on CPU.

Each run is a real `jaxpt train` subprocess on the tiny model; a test-only callback sleeps
after every step so the test can signal the process mid-run.
"""

from __future__ import annotations

import signal
import time

import pytest
from train_utils import (
    make_tiny_tokenizer_and_model,
    read_metrics,
    start_training,
    tiny_run_config,
    train_losses,
)

TIMEOUT = 240


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("resume")
    model_dir = make_tiny_tokenizer_and_model(root, data_dir)
    config = tiny_run_config(
        root / "run.yaml",
        model_dir,
        data_dir,
        root / "unused",
        train={"max_steps": 10},
        checkpoint={"every": 5},
    )
    reference = root / "reference"
    proc = start_training(config, f"out_dir={reference}", log=root / "reference.log")
    assert proc.wait(TIMEOUT) == 0, (root / "reference.log").read_text()[-3000:]
    losses = train_losses(reference)
    assert sorted(losses) == list(range(1, 11))
    return root, config, losses


def wait_for(predicate, proc, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def logged_steps(run_dir) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    except (FileNotFoundError, ValueError):
        return []


def resume_and_compare(root, config, run_dir, reference_losses, saved_at: int):
    before = [r for r in read_metrics(run_dir) if r["step"] <= saved_at]
    log = root / f"{run_dir.name}-2.log"
    proc = start_training(config, f"out_dir={run_dir}", log=log)
    assert proc.wait(TIMEOUT) == 0, log.read_text()[-3000:]
    # It really resumed (a fresh run would reproduce the losses too): it says so, and the
    # rows logged before the checkpoint (timings included) are kept as they were.
    assert f"resumed from checkpoint step {saved_at}" in log.read_text()
    after = read_metrics(run_dir)
    assert after[: len(before)] == before
    assert [r["step"] for r in after[len(before) :] if "loss" in r] == list(range(saved_at + 1, 11))
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 11))
    # Bit for bit: float equality of every step, before and after the interruption.
    assert losses == reference_losses, (saved_at, losses, reference_losses)


def test_sigterm_saves_and_resume_is_exact(setup):
    root, config, reference = setup
    run_dir = root / "sigterm"
    log = root / "sigterm-1.log"
    proc = start_training(config, f"out_dir={run_dir}", step_delay=0.4, log=log)
    wait_for(lambda: len(logged_steps(run_dir)) >= 3, proc, "step 3")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert "stopped by signal" in out
    stopped = max(logged_steps(run_dir))
    assert 3 <= stopped < 10, "the run should have stopped early"
    ckpts = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir())
    assert ckpts[-1] == stopped  # saved at the step boundary where it stopped
    resume_and_compare(root, config, run_dir, reference, stopped)


def test_kill_9_after_a_save_resumes_exactly(setup):
    root, config, reference = setup
    run_dir = root / "kill9"
    log = root / "kill9-1.log"
    proc = start_training(config, f"out_dir={run_dir}", step_delay=0.4, log=log)
    # A completed save is the committed (renamed) step dir with orbax's commit marker.
    done = run_dir / "checkpoints" / "5" / "commit_success.txt"
    wait_for(done.exists, proc, "the step-5 checkpoint")
    wait_for(lambda: max(logged_steps(run_dir), default=0) >= 6, proc, "step 6")
    proc.kill()
    proc.wait(TIMEOUT)
    assert max(logged_steps(run_dir)) >= 6  # it logged steps the checkpoint does not have
    resume_and_compare(root, config, run_dir, reference, 5)
