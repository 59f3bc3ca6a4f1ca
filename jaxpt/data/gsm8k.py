"""GSM8K rows -> SFT / GRPO rows, and a seeded generator of verifiable arithmetic word problems.

GSM8K rows are ``{"question": str, "answer": str}`` where ``answer`` is a worked solution
with calculator annotations (``<<16-3-4=9>>``) ending in ``#### <number>``.

* :func:`gsm8k_to_sft`: prompt-completion row (conversational by default); the completion is
  the worked solution (annotations removed), still ending in ``#### <number>``.
* :func:`gsm8k_to_prompt`: prompt-only row with an ``answer`` column holding the final
  number as a string (commas removed), for GRPO rewards and evaluation.

:func:`generate_arithmetic` makes GSM8K-shaped rows (same two keys, same ``####`` ending),
so both converters apply to them. It is deterministic for a seed, and its held-out split is
disjoint from the train split by construction: a problem's split is a hash of its arithmetic
(numbers and operations, not the names or wording), so no train problem appears in test.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from jaxpt.data.formats import DataError, DataStats, Record

DEFAULT_INSTRUCTION = (
    "Solve the problem step by step, then give the final answer on the last line as "
    "'#### <number>'."
)
_CALC = re.compile(r"<<[^<>]*>>")


def extract_gsm8k_answer(answer: Any) -> str:
    """The final number after the last ``####`` of a GSM8K solution (commas removed)."""
    if not isinstance(answer, str) or "####" not in answer:
        raise DataError("no '#### <number>' final answer", key="answer")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not re.fullmatch(r"-?\d+(\.\d+)?", final):
        raise DataError(f"final answer {final!r} is not a number", key="answer")
    return final


def strip_calculator_annotations(text: str) -> str:
    """Remove GSM8K calculator annotations ``<<expr=value>>``."""
    return _CALC.sub("", text)


def _question(row: dict[str, Any]) -> str:
    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        raise DataError("missing or empty question", key="question")
    return q.strip()


def _prompt_text(question: str, instruction: str | None) -> str:
    return f"{question}\n\n{instruction}" if instruction else question


def _prompt(
    question: str, conversational: bool, system_prompt: str | None, instruction: str | None
) -> Any:
    text = _prompt_text(question, instruction)
    if not conversational:
        return f"Question: {text}\nAnswer:"
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*msgs, {"role": "user", "content": text}]


def gsm8k_to_sft(
    row: dict[str, Any],
    *,
    conversational: bool = True,
    system_prompt: str | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> dict[str, Any]:
    """GSM8K row -> prompt-completion row (message lists, or strings when not conversational)."""
    question = _question(row)
    extract_gsm8k_answer(row.get("answer"))
    solution = strip_calculator_annotations(row["answer"]).strip()
    prompt = _prompt(question, conversational, system_prompt, instruction)
    if conversational:
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": solution}]}
    return {"prompt": prompt, "completion": " " + solution}


def gsm8k_to_prompt(
    row: dict[str, Any],
    *,
    conversational: bool = True,
    system_prompt: str | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> dict[str, Any]:
    """GSM8K row -> ``{"prompt": ..., "answer": "<final number>"}`` for GRPO / evaluation."""
    question = _question(row)
    answer = extract_gsm8k_answer(row.get("answer"))
    return {
        "prompt": _prompt(question, conversational, system_prompt, instruction),
        "answer": answer,
    }


def convert_gsm8k(
    records: Sequence[Record],
    *,
    mode: Literal["sft", "prompt"] = "sft",
    skip_invalid: bool = False,
    stats: DataStats | None = None,
    **kwargs: Any,
) -> list[Record]:
    """Convert GSM8K records (keeping source and row) with :func:`gsm8k_to_sft` or
    :func:`gsm8k_to_prompt`; bad rows raise DataError with file and row, or are skipped."""
    fn = {"sft": gsm8k_to_sft, "prompt": gsm8k_to_prompt}[mode]
    out = []
    for rec in records:
        try:
            out.append(Record(fn(rec.data, **kwargs), rec.source, rec.row))
        except DataError as e:
            if not skip_invalid:
                raise e.at(rec.source, rec.row) from None
            if stats is not None:
                stats.skip("invalid gsm8k row")
    return out


# ----------------------------------------------------------------------------- generator

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
