"""Generated arithmetic problems: a seeded generator of verifiable GSM8K-shaped rows, and the
one place that turns a run config's arithmetic keys into its :class:`ArithmeticConfig`.

:func:`generate_arithmetic` makes GSM8K-shaped rows (``question``, ``answer`` ending in
``#### <number>``), so :func:`jaxpt.data.gsm8k.convert_gsm8k` turns them into SFT or prompt
rows. It is deterministic for a seed, and its held-out split is disjoint from the train
split by construction: a problem's split is a hash of its arithmetic (numbers and
operations, not the names or wording), so no train problem appears in test.

Trainers that sample on the task (``grpo.task: arithmetic`` with flat ``grpo.arithmetic_*``
keys, ``rft.arithmetic:`` with the same names unprefixed) build its config with
:func:`arithmetic_config` and its rows with :func:`arithmetic_records`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Literal

from jaxpt.data.formats import Record, records_from_rows

_NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo")
_ITEMS = ("apples", "marbles", "stickers", "coins", "books", "shells", "cards", "pencils")


@dataclass(frozen=True)
class ArithmeticConfig:
    """Difficulty of generated problems.

    min_operands/max_operands: numbers in a problem (the start amount counts), >= 2.
    max_digits: digits of the start amount and of added/removed amounts.
    ops: allowed steps among ``+ - * /`` (``*`` by 2..9, ``/`` by an exact divisor 2..9).
    test_fraction: share of the problem space hashed into the ``"test"`` split.
    max_value: when set, the start amount and added/removed amounts are at most this
        (instead of ``10**max_digits - 1``).
    style: ``"word"`` (a story about someone's items) or ``"plain"`` (``Calculate 7 + 5 -
        3.``, evaluated left to right).
    """

    min_operands: int = 2
    max_operands: int = 3
    max_digits: int = 2
    ops: str = "+-"
    test_fraction: float = 0.1
    max_value: int | None = None
    style: Literal["word", "plain"] = "word"

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError("need 2 <= min_operands <= max_operands")
        if self.max_digits < 1:
            raise ValueError("max_digits must be >= 1")
        if not self.ops or set(self.ops) - set("+-*/"):
            raise ValueError(f"ops={self.ops!r} must be a non-empty subset of '+-*/'")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError("test_fraction must be in (0, 1)")
        if self.max_value is not None and self.max_value < 1:
            raise ValueError("max_value must be >= 1")
        if self.style not in ("word", "plain"):
            raise ValueError(f"style={self.style!r}; expected 'word' or 'plain'")


def problem_split(expression: str, test_fraction: float) -> Literal["train", "test"]:
    """Split of a problem from a hash of its canonical expression (stable across runs)."""
    h = int.from_bytes(hashlib.sha256(expression.encode()).digest()[:8], "big")
    return "test" if h / 2**64 < test_fraction else "train"


def _one_problem(rng: random.Random, cfg: ArithmeticConfig) -> dict[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    hi = cfg.max_value if cfg.max_value is not None else 10**cfg.max_digits - 1
    value = rng.randint(1, hi)
    plain, plain_prec = str(value), 3  # the plain-style text and its loosest operator
    sentences = [f"{name} has {value} {item}."]
    steps = [f"{name} starts with {value} {item}."]
    expr = str(value)
    for _ in range(rng.randint(cfg.min_operands, cfg.max_operands) - 1):
        op = rng.choice(cfg.ops)
        divisors = [d for d in range(2, 10) if value % d == 0]
        if (op == "-" and value == 0) or (op == "/" and not divisors):
            op = "+"
        if op == "+":
            n = rng.randint(1, hi)
            new = value + n
            sentences.append(f"Then {name} gets {n} more {item}.")
        elif op == "-":
            n = rng.randint(1, min(value, hi))
            new = value - n
            sentences.append(f"Then {name} gives away {n} {item}.")
        elif op == "*":
            n = rng.randint(2, 9)
            new = value * n
            sentences.append(f"Then the number of {item} {name} has becomes {n} times as large.")
        else:
            n = rng.choice(divisors)
            new = value // n
            sentences.append(
                f"Then {name} splits the {item} into {n} equal groups and keeps only one group."
            )
        sym = {"+": "+", "-": "-", "*": "*", "/": "/"}[op]
        prec = 2 if op in "*/" else 1
        if prec > plain_prec:  # "(3 + 4) x 2": precedence as written, no left-to-right rule
            plain = f"({plain})"
        plain = f"{plain} {dict(zip('+-*/', '+-x:', strict=True))[op]} {n}"
        plain_prec = min(plain_prec, prec)
        steps.append(f"{value} {sym} {n} = {new}.")
        expr = f"({expr}{sym}{n})"
        value = new
    if cfg.style == "plain":
        question = f"Calculate {plain}."
        steps = steps[1:]
    else:
        question = " ".join(sentences) + f" How many {item} does {name} have now?"
    answer = "\n".join(steps) + f"\n#### {value}"
    return {"question": question, "answer": answer, "expression": expr}


def generate_arithmetic(
    n: int,
    *,
    split: Literal["train", "test"] = "train",
    seed: int = 0,
    config: ArithmeticConfig | None = None,
) -> list[dict[str, str]]:
    """``n`` distinct GSM8K-shaped word problems of ``split`` (deterministic for ``seed``).

    Rows: ``question``, ``answer`` (worked steps ending ``#### <number>``), ``expression``
    (canonical arithmetic, e.g. ``((12+5)-3)``). Raises ValueError when the configured
    problem space has fewer than ``n`` distinct problems in the split.
    """
    cfg = config or ArithmeticConfig()
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; expected 'train' or 'test'")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(
                f"only {len(rows)} distinct {split} problems found for {cfg}; "
                "allow more digits or operands"
            )
        row = _one_problem(rng, cfg)
        if (
            row["expression"] in seen
            or problem_split(row["expression"], cfg.test_fraction) != split
        ):
            continue
        seen.add(row["expression"])
        rows.append(row)
    return rows


def arithmetic_config(section: Any, prefix: str = "") -> ArithmeticConfig:
    """The :class:`ArithmeticConfig` of a config section: each of its fields that the
    section holds as ``prefix + name`` (``grpo.arithmetic_max_value``,
    ``rft.arithmetic.max_value``); the others keep their defaults."""
    return ArithmeticConfig(**{
        f.name: getattr(section, prefix + f.name)
        for f in dataclasses.fields(ArithmeticConfig) if hasattr(section, prefix + f.name)
    })


def arithmetic_records(
    config: ArithmeticConfig, n: int, *, split: Literal["train", "test"], seed: int, source: str
) -> list[Record]:
    """``n`` generated problems of ``split`` as raw GSM8K records (``question``, ``answer``,
    ``expression``) named ``source`` in error messages."""
    return records_from_rows(generate_arithmetic(n, split=split, seed=seed, config=config),
                             source=source)
