"""Run untrusted Python (the model's code) in a separate, limited process.

What the limits are, honestly: this is a resource fence, not a jail. Every run is a fresh
interpreter (``python -I -B``: no site-packages of the user, no environment variables, no
bytecode written) in its own session, with

- a wall-clock timeout (the whole process group, or PID namespace, is killed with SIGKILL),
- ``RLIMIT_AS`` (address space: a 1 GB allocation fails with MemoryError), ``RLIMIT_CPU``
  (a busy loop gets SIGXCPU), ``RLIMIT_NPROC`` (a fork bomb gets EAGAIN), ``RLIMIT_FSIZE``
  (a huge file gets SIGXFSZ / EFBIG), ``RLIMIT_CORE`` 0,
- a scratch working directory that is removed afterwards,
- stdout / stderr read by the parent and cut to ``max_output_bytes`` each (the rest is
  drained and dropped, so a 10 MB print neither blocks nor floods the caller),
- an audit hook (PEP 578) in the child that refuses Python-level writes, renames and deletes
  outside the scratch dir; it stops ordinary code, not code that goes around Python
  (ctypes, a subprocess): audit hooks are not a security boundary.

Where the platform allows it without root (Linux user namespaces, the ``unshare`` tool of
util-linux >= 2.38), the child also runs in new user, network, mount and PID namespaces: no
network interface but a down loopback, every mount read-only except the scratch dir (so
writes outside it fail in the kernel, whatever the code does), and killing the namespace's
first process kills everything in it. Which isolation a run got is in
``SandboxResult.isolation`` ("namespaces" or "rlimits"); the probe is done once per process.

``RLIMIT_NPROC`` counts all processes of the real user id and is not enforced for root, so
when the parent is root the child drops to an unprivileged uid before it runs anything (the
scratch dir is handed to it): one of 64 uids of a range no account uses, a different one for
each of up to 64 concurrent runs of a process, so concurrent runs do not share a process
count (the probes run as ``nobody``). Otherwise the limit is set to the user's current
process count plus ``max_processes``, and concurrent runs of one user do share it.

Peers: TRL runs tools in the training process; verl's sandbox-fusion and SkyRL call a remote
sandbox service. jaxpt needs a local one that works on a laptop and a TPU VM alike, so this
module uses only the standard library and the ``unshare`` binary when it is there.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

NOBODY = 65534
# Unprivileged uids for runs started by root: 64 per parent process, picked by its pid.
_UID_SLOTS = 64
_UID_BASE = 3_000_000_000 + (os.getpid() % 10_000) * _UID_SLOTS
_run_counter = itertools.count()

# Runs first in the child: refuses Python-level writes outside the scratch dir (the cwd).
_CHILD_PRELUDE = r"""
import os as _os, sys as _sys
def _sandbox_guard():
    root = _os.path.realpath(_os.getcwd())
    write_flags = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC
    allowed_devices = {"/dev/null", "/dev/stdout", "/dev/stderr"}
    def inside(path):
        if isinstance(path, int):
            return True  # an fd that is already open
        p = _os.path.realpath(_os.fsdecode(path))
        return p == root or p.startswith(root + _os.sep) or p in allowed_devices
    # event -> which of its arguments are paths it changes
    mutating = {"os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,),
                "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.symlink": (1,),
                "os.link": (1,), "os.utime": (0,), "shutil.rmtree": (0,),
                "shutil.copyfile": (1,), "shutil.copytree": (1,)}
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(flags, int) and flags & write_flags) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writes and not inside(path):
                raise PermissionError(f"sandbox: writing outside the scratch dir: {path}")
        elif event in mutating:
            for a in (args[i] for i in mutating[event] if i < len(args)):
                if isinstance(a, (str, bytes, _os.PathLike)) and not inside(a):
                    raise PermissionError(f"sandbox: {event} outside the scratch dir: {a}")
    _sys.addaudithook(hook)
_sandbox_guard()
del _sandbox_guard
"""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. Memory and file sizes in bytes, times in seconds."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    max_processes: int = 32
    max_file_bytes: int = 16 << 20
    max_output_bytes: int = 16 << 10
    use_namespaces: bool = True

    def __post_init__(self):
        for name in ("timeout_s", "cpu_s", "memory_bytes", "max_processes", "max_file_bytes",
                     "max_output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What a run did. ``error`` is None for a clean exit with status 0."""

    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal; None: never started
    timed_out: bool
    stdout_truncated: bool
    stderr_truncated: bool
    isolation: str  # "namespaces" | "rlimits"
    duration_s: float
    error: str | None
    run_id: str = ""  # the scratch dir's name, also in every child's command line

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_tool_output(self) -> str:
        """The text a model sees: stdout (and stderr) of a clean run, else an error line."""
        if self.ok:
            return self.stdout + (f"\n[stderr]\n{self.stderr}" if self.stderr.strip() else "")
        tail = self.stderr.strip() or self.stdout.strip()
        return f"Error: {self.error}" + (f"\n{tail}" if tail else "")


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


_KILL_REASONS = {
    "SIGXCPU": "CPU time limit exceeded",
    "SIGXFSZ": "file size limit exceeded",
    "SIGSEGV": "crashed (segmentation fault)",
}


@functools.cache
def namespace_prefix(as_nobody: bool) -> tuple[str, ...] | None:
    """The ``unshare`` command line that puts a child in fresh user / net / mount / PID
    namespaces, or None when this platform refuses it (no binary, old util-linux, user
    namespaces disabled). Probed once per process, as the user the child will run as."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return None
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = (exe, "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork",
              "--kill-child")
    try:
        probe = subprocess.run(
            _launched([*prefix, "sh", "-c", "mount -o remount,bind,ro / && exec \"$0\" "
                       + _DROP_CAPS + " echo ok", setpriv], {}, NOBODY if as_nobody else None),
            capture_output=True, timeout=10, cwd="/",
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix if probe.returncode == 0 and probe.stdout.strip() == b"ok" else None


# The first program of every child: sets the rlimits, drops to the sandbox user, then
# execs the real command line. A separate program rather than subprocess's preexec_fn,
# which can deadlock in a parent with threads (JAX's runtime, the driver's step workers).
_LAUNCHER = (
    "import json, os, resource, sys\n"
    "spec = json.loads(sys.argv[1])\n"
    "for name, (soft, hard) in spec['rlimits'].items():\n"
    "    resource.setrlimit(getattr(resource, name), (soft, hard))\n"
    "if spec['uid'] is not None:\n"
    "    os.setgroups([]); os.setgid(spec['uid']); os.setuid(spec['uid'])\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _launched(argv: list[str], rlimits: dict[str, tuple[int, int]], uid: int | None
              ) -> list[str]:
    """`argv` (argv[0] an absolute path) behind the launcher, as `uid` (None: as is)."""
    spec = json.dumps({"rlimits": rlimits, "uid": uid})
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, spec, *argv]


def _user_process_count(uid: int) -> int:
    count = 0
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


# Inside the namespaces the child is root of its own user namespace (mapped to the outer
# user): a private bind of the scratch dir stays writable, every other mount becomes
# read-only, then setpriv drops every capability (bounding set included, so exec gives none
# back) and the interpreter replaces the shell: the code cannot remount anything again.
_DROP_CAPS = "--bounding-set=-all --inh-caps=-all --ambient-caps=-all --no-new-privs"
_MOUNT_SCRIPT = (
    'mount --bind "$SCRATCH" "$SCRATCH" && cd "$SCRATCH" || exit 97; '
    "for m in $(cut -d' ' -f2 /proc/self/mounts | sort -u); do "
    '[ "$m" = "$SCRATCH" ] || mount -o remount,bind,ro "$m" 2>/dev/null; done; '
    f'exec "$0" {_DROP_CAPS} "$@"'
)


@functools.cache
def sandbox_interpreter(as_nobody: bool) -> str:
    """The Python the child runs: this process's interpreter when the sandbox user can run
    it, else the system ``python3`` (a root parent's venv under /root is out of nobody's
    reach; the code then sees that interpreter's packages)."""
    candidates = [sys.executable, getattr(sys, "_base_executable", None),
                  shutil.which("python3"), "/usr/local/bin/python3", "/usr/bin/python3"]
    if not as_nobody:
        return sys.executable
    for exe in dict.fromkeys(c for c in candidates if c):
        try:
            probe = subprocess.run(_launched([exe, "-I", "-c", "pass"], {}, NOBODY),
                                   capture_output=True, timeout=30, cwd="/")
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return exe
    raise RuntimeError(f"no Python interpreter the sandbox user (uid {NOBODY}) can run: "
                       f"tried {candidates}")


def _rlimits(limits: SandboxLimits, nproc: int) -> dict[str, tuple[int, int]]:
    return {
        "RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
        "RLIMIT_CPU": (limits.cpu_s, limits.cpu_s + 1),  # SIGXCPU at the soft limit
        "RLIMIT_FSIZE": (limits.max_file_bytes, limits.max_file_bytes),
        "RLIMIT_NPROC": (nproc, nproc),
        "RLIMIT_CORE": (0, 0),
    }


def _session_members(sid: int) -> list[int]:
    """PIDs (zombies included: they still count against RLIMIT_NPROC) in session `sid`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 3 and int(fields[3]) == sid:
            pids.append(int(pid))
    return pids


def _kill_session(sid: int, grace_s: float = 5.0) -> None:
    """SIGKILL session `sid` until none of its processes is left (or `grace_s` passed), so
    the next run does not meet this one's dying processes in its process count."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            os.killpg(sid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not os.path.isdir("/proc") or not _session_members(sid) or time.monotonic() > deadline:
            return
        time.sleep(0.02)


def _drain(stream, limit: int, out: list, flag: list) -> None:
    """Keep the first `limit` bytes of a pipe, read and drop the rest until EOF."""
    kept = 0
    while chunk := stream.read(65536):
        if kept < limit:
            out.append(chunk[: limit - kept])
        if kept + len(chunk) > limit:
            flag[0] = True
        kept += len(chunk)
    stream.close()


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` with ``python -I -B`` under `limits`; never raises for anything the code
    does (crash, timeout, huge output, a refused write), only returns a result saying so."""
    limits = limits or SandboxLimits()
    as_nobody = os.geteuid() == 0
    prefix = namespace_prefix(as_nobody) if limits.use_namespaces else None
    nproc = limits.max_processes + (0 if as_nobody else _user_process_count(os.getuid()))
    uid = _UID_BASE + next(_run_counter) % _UID_SLOTS if as_nobody else None
    scratch = tempfile.mkdtemp(prefix="jaxpt_sandbox_")
    start = time.monotonic()
    try:
        if uid is not None:
            os.chown(scratch, uid, uid)
        script = os.path.join(scratch, "main.py")
        with open(script, "w") as f:
            f.write(code)
        # The code runs as __main__ after the prelude (tracebacks name main.py).
        run_id = os.path.basename(scratch)
        runner = (f"# {run_id}\n" + _CHILD_PRELUDE
                  + "import runpy\nrunpy.run_path('main.py', run_name='__main__')\n")
        argv = [sandbox_interpreter(as_nobody), "-I", "-B", "-c", runner]
        if prefix is not None:
            argv = [*prefix, "sh", "-c", _MOUNT_SCRIPT, shutil.which("setpriv"), *argv]
        argv = _launched(argv, _rlimits(limits, nproc), uid)
        env = {"PATH": "/usr/bin:/bin", "SCRATCH": scratch, "HOME": scratch, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen(
                argv, cwd=scratch, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True,
            )
        except OSError as e:
            return SandboxResult("", "", None, False, False, False,
                                 "namespaces" if prefix else "rlimits",
                                 time.monotonic() - start, f"could not start the sandbox: {e}",
                                 run_id)
        pieces = {"out": ([], [False]), "err": ([], [False])}
        readers = [
            threading.Thread(target=_drain, args=(s, limits.max_output_bytes, *pieces[k]),
                             daemon=True)
            for k, s in (("out", proc.stdout), ("err", proc.stderr))
        ]
        for r in readers:
            r.start()
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        # Kill the whole session: with namespaces the PID namespace dies with its first
        # process; without, forked children share the process group (unless they setsid).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()  # reaped here, so the session can empty
        _kill_session(proc.pid)
        for r in readers:
            r.join(timeout=5)
        out = b"".join(pieces["out"][0]).decode("utf-8", "replace")
        err = b"".join(pieces["err"][0]).decode("utf-8", "replace")
        code_ = proc.returncode
        error = None
        if timed_out:
            error = f"timed out after {limits.timeout_s:g} s (wall clock)"
        elif prefix is not None and code_ == 97:
            error = "the sandbox could not set up its mounts"
        elif code_ is not None and code_ < 0:
            name = _signal_name(-code_)
            error = f"killed by {name}: {_KILL_REASONS.get(name, 'terminated')}"
        elif code_ is not None and code_ > 128 and prefix is not None:
            # sh / unshare report a signal-killed child as 128 + signal
            name = _signal_name(code_ - 128)
            error = f"killed by {name}: {_KILL_REASONS.get(name, 'terminated')}"
        elif code_ != 0:
            last = err.strip().splitlines()[-1] if err.strip() else ""
            error = f"exit status {code_}" + (f": {last}" if last else "")
        if pieces["out"][1][0]:
            out += f"\n[stdout truncated to {limits.max_output_bytes} bytes]"
        if pieces["err"][1][0]:
            err += f"\n[stderr truncated to {limits.max_output_bytes} bytes]"
        return SandboxResult(
            stdout=out, stderr=err, exit_code=code_, timed_out=timed_out,
            stdout_truncated=pieces["out"][1][0], stderr_truncated=pieces["err"][1][0],
            isolation="namespaces" if prefix is not None else "rlimits",
            duration_s=time.monotonic() - start, error=error, run_id=run_id,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
