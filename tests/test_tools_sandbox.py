"""The sandboxed Python tool: hostile code ends as a tool error within its limits.

Limits are small so each case takes about a second; no timing thresholds beyond "it came
back", which a hung sandbox would never do (pytest's own timeout would fire instead).
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from jaxpt.tools.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(
    timeout_s=3, cpu_s=1, memory_bytes=256 << 20, max_processes=8, max_file_bytes=1 << 20,
    max_output_bytes=4096, use_namespaces=os.environ.get("JAXPT_TEST_SANDBOX_NS", "1") == "1",
)


def _live_processes_of(run_id: str) -> list[int]:
    """PIDs whose command line carries the run's id (every sandboxed interpreter's does)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if run_id.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_normal_computation_returns_its_output():
    r = run_python("import math\nprint(sum(i * i for i in range(10)), math.factorial(5))", LIMITS)
    assert r.ok and r.exit_code == 0 and r.stdout == "285 120\n", r
    assert r.as_tool_output() == "285 120\n"
    assert r.isolation in ("namespaces", "rlimits")
    assert not os.path.exists(os.path.join("/tmp", r.run_id))  # scratch dir removed


def test_infinite_loop_is_stopped():
    r = run_python("while True:\n    pass\n", dataclasses.replace(LIMITS, timeout_s=1.5))
    # the CPU limit (SIGXCPU) or, on a loaded machine, the wall clock stops it first
    assert not r.ok and (r.timed_out or "SIGXCPU" in r.error), r
    assert r.as_tool_output().startswith("Error: ")
    assert _live_processes_of(r.run_id) == []


def test_fork_bomb_is_contained_and_killed():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = run_python(bomb, dataclasses.replace(LIMITS, timeout_s=1.5))
    assert not r.ok and r.error, r
    assert _live_processes_of(r.run_id) == []  # nothing survives the run


def test_fork_is_refused_past_the_process_limit():
    count = (
        "import os, time\nn = 0\n"
        "for _ in range(64):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
        "    n += 1\n"
        "print(n, flush=True)\nos._exit(0)\n"
    )
    r = run_python(count, LIMITS)
    forked = int(r.stdout.split()[0])
    assert forked < LIMITS.max_processes, r  # RLIMIT_NPROC: fork fails with EAGAIN
    assert _live_processes_of(r.run_id) == []  # the sleeping children were killed too


def test_large_allocation_fails_with_memory_error():
    r = run_python("x = bytearray(1 << 30)\nprint('allocated')\n", LIMITS)
    assert not r.ok and "MemoryError" in r.error and "allocated" not in r.stdout, r


def test_write_outside_the_scratch_dir_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)  # so only the sandbox, not file permissions, can refuse it
    r = run_python(f"open({str(target)!r}, 'w').write('x')\n", LIMITS)
    assert not r.ok and not target.exists(), r
    # a shell child bypasses the audit hook; with namespaces the mount is read-only
    r = run_python(
        "import subprocess\n"
        f"subprocess.run(['sh', '-c', 'echo x > {target}'])\n"
        "open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n",
        LIMITS,
    )
    assert r.stdout.startswith("ok"), r  # writes inside the scratch dir work
    if r.isolation == "namespaces":
        assert not target.exists()


def test_huge_file_is_stopped_by_the_file_size_limit():
    r = run_python("open('big.bin', 'wb').write(b'0' * (4 << 20))\n", LIMITS)
    assert not r.ok and ("File too large" in r.error or "SIGXFSZ" in r.error), r


def test_ten_megabyte_print_is_truncated():
    r = run_python("print('x' * (10 << 20))\nprint('done')\n", LIMITS)
    assert r.ok and r.stdout_truncated, r.error
    assert r.stdout.startswith("x" * LIMITS.max_output_bytes)
    assert len(r.stdout) < LIMITS.max_output_bytes + 100  # the limit plus a one-line note
    assert r.stdout.endswith(f"[stdout truncated to {LIMITS.max_output_bytes} bytes]")


def test_crash_and_syntax_error_are_tool_errors():
    r = run_python("import ctypes\nctypes.string_at(0)\n", LIMITS)
    assert not r.ok and "SIGSEGV" in r.error, r
    r = run_python("def f(:\n", LIMITS)
    assert not r.ok and "SyntaxError" in r.error, r
    assert "SyntaxError" in r.as_tool_output()


def test_no_network_inside_namespaces():
    r = run_python(
        "import socket\ntry:\n    socket.create_connection(('192.0.2.1', 80), timeout=1)\n"
        "except OSError as e:\n    print('refused', e.errno)\n", LIMITS,
    )
    if r.isolation != "namespaces":
        pytest.skip("no user namespaces here: the sandbox runs with rlimits only")
    assert r.stdout.startswith("refused"), r


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)


def test_without_namespaces_rlimits_and_the_audit_hook_still_hold(tmp_path):
    """The fallback where the platform refuses namespaces: forks stop at the limit and
    Python-level writes outside the scratch dir are refused (a fence, not a jail)."""
    limits = dataclasses.replace(LIMITS, use_namespaces=False)
    r = run_python(
        "import os, time\nn = 0\nfor _ in range(32):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n"
        "        os._exit(0)\n    n += 1\nprint(n, flush=True)\nos._exit(0)\n", limits)
    assert r.isolation == "rlimits" and int(r.stdout.split()[0]) < LIMITS.max_processes, r
    assert _live_processes_of(r.run_id) == []
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)
    r = run_python(f"import os\nopen({str(target)!r}, 'w')\n", limits)
    assert not r.ok and "writing outside the scratch dir" in r.error and not target.exists(), r
    r = run_python(f"import os\nos.remove({str(tmp_path)!r})\n", limits)
    assert not r.ok and "os.remove outside the scratch dir" in r.error, r


def test_concurrent_runs_from_threads():
    """The driver runs tool calls of several rows in threads: runs stay independent."""
    import concurrent.futures

    codes = [f"import time\ntime.sleep(0.2)\nprint({i} * {i})" for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: run_python(c, LIMITS), codes))
    assert [r.stdout for r in results] == ["0\n", "1\n", "4\n", "9\n"], results
    assert len({r.run_id for r in results}) == 4
