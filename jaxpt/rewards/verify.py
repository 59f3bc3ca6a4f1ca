"""Symbolic answer equivalence through ``math-verify``, with a hard per-call time limit.

``math-verify`` (Hugging Face; the verifier of TRL's ``accuracy_reward`` and open-r1) parses
LaTeX and plain expressions into sympy and compares them numerically and symbolically:
fractions and radicals (``\\frac{\\sqrt2}{2}`` = ``\\frac{1}{\\sqrt2}``), polynomials
(``(x+1)^2`` = its expansion), tuples, intervals, sets, equations (``x = 5`` = ``5``),
percentages. We use it rather than writing our own symbolic comparison (DESIGN.md,
principle 16).

Why a worker process: math-verify's own time limit uses ``signal.alarm``, which only works
on the main thread, and jaxpt calls reward functions from worker threads
(:mod:`jaxpt.rewards.registry`); and neither a signal nor an exception raised in a thread
can stop one long C call, such as the integer power sympy computes for ``9^{9^{9}}``. So
comparisons run in one long-lived child process (``python -c ...serve()``, started on the
first call, ~1-2 s to import sympy), one JSON line per pair; the caller waits at most
``timeout_s`` for the answer, and on a timeout kills the child (a fresh one starts on the
next call) and scores the pair as not equal. Inside the child, math-verify runs on the main
thread with its own timeouts off. Calls from several threads take turns (a lock).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import threading

__all__ = ["symbolic_equal", "serve", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 2.0
STARTUP_TIMEOUT_S = 120.0  # importing sympy on a busy machine
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the child


def _as_latex(answer: str) -> str:
    """An extracted answer as math-verify's LaTeX extraction reads it: one ``$...$`` span."""
    s = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) > len(left) + len(right):
            s = s[len(left) : -len(right)].strip()
            break
    return f"${s}$"


def _equal_in_process(predicted: str, reference: str) -> bool:
    """math-verify on two extracted answers, no time limit (the child's work)."""
    import math_verify
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    config = (LatexExtractionConfig(), ExprExtractionConfig())
    gold = math_verify.parse(_as_latex(reference), extraction_config=config, parsing_timeout=None)
    pred = math_verify.parse(_as_latex(predicted), extraction_config=config, parsing_timeout=None)
    if not gold or not pred:
        return False
    return bool(math_verify.verify(gold, pred, timeout_seconds=None))


def serve() -> None:
    """The child's loop: read ``[predicted, reference]`` JSON lines on stdin, answer ``1`` /
    ``0`` lines on stdout, until stdin closes."""
    logging.disable(logging.CRITICAL)  # math-verify warns that its timeouts are off
    import math_verify  # noqa: F401 - fail here, before "ready", if it is missing

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            predicted, reference = json.loads(line)
            ok = _equal_in_process(predicted, reference)
        except Exception:  # noqa: BLE001 - an unreadable answer is not equal
            ok = False
        out.write("1\n" if ok else "0\n")
        out.flush()


# ----------------------------------------------------------------------------- the parent


class _Worker:
    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.timeouts = 0

    def _readline(self, timeout_s: float | None) -> bytes | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        return self.proc.stdout.readline()

    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from jaxpt.rewards.verify import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
            bufsize=0,
        )  # fmt: skip
        line = self._readline(STARTUP_TIMEOUT_S)
        if line != b"ready\n":
            self.stop()
            self._stderr.seek(0)
            err = self._stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(
                "the math-verify worker process did not start (jaxpt's math reward needs "
                f"math-verify: pip install 'math-verify[antlr4_13_2]'):\n{err}"
            )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def equal(self, predicted: str, reference: str, timeout_s: float | None) -> bool | None:
        """True / False, or None on a timeout (the child is killed)."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            assert self.proc is not None and self.proc.stdin is not None
            try:
                self.proc.stdin.write((json.dumps([predicted, reference]) + "\n").encode())
            except BrokenPipeError:  # the child died: start again once
                self.stop()
                self._start()
                self.proc.stdin.write((json.dumps([predicted, reference]) + "\n").encode())
            line = self._readline(timeout_s)
            if line is None:
                self.timeouts += 1
                self.stop()
                return None
            if not line:  # the child crashed on this pair
                self.stop()
                return False
            return line.strip() == b"1"


_WORKER = _Worker()
atexit.register(_WORKER.stop)


def symbolic_equal(
    predicted: str, reference: str, timeout_s: float | None = DEFAULT_TIMEOUT_S
) -> bool:
    """True when math-verify finds ``predicted`` equivalent to ``reference``.

    Both are single extracted answers (LaTeX or plain), not whole completions: each is
    parsed as one expression. ``timeout_s`` bounds the call (parse both + verify); a
    timeout or a parse error returns False.
    """
    result = _WORKER.equal(predicted, reference, timeout_s)
    if result is None:
        logger.warning(
            "math-verify took longer than %.3g s on %r vs %r; scored as not equal",
            timeout_s, predicted[:80], reference[:80],
        )  # fmt: skip
        return False
    return result


