"""GSM8K rows -> SFT / GRPO rows.

GSM8K rows are ``{"question": str, "answer": str}`` where ``answer`` is a worked solution
with calculator annotations (``<<16-3-4=9>>``) ending in ``#### <number>``.

* :func:`gsm8k_to_sft`: prompt-completion row (conversational by default); the completion is
  the worked solution (annotations removed), still ending in ``#### <number>``.
* :func:`gsm8k_to_prompt`: prompt-only row with an ``answer`` column holding the final
  number as a string (commas removed), for GRPO rewards and evaluation.

The generated arithmetic task (:mod:`jaxpt.data.tasks.arithmetic`) makes GSM8K-shaped rows,
so both converters apply to its rows too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from jaxpt.data.formats import DataError, DataStats, Record, convert_records

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


def _prompt_and_answer(
    row: dict[str, Any], conversational: bool, system_prompt: str | None, instruction: str | None
) -> tuple[Any, str]:
    """The row's prompt and its final answer; a DataError names a missing or bad column."""
    question = _question(row)
    answer = extract_gsm8k_answer(row.get("answer"))
    return _prompt(question, conversational, system_prompt, instruction), answer


def gsm8k_to_sft(
    row: dict[str, Any],
    *,
    conversational: bool = True,
    system_prompt: str | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> dict[str, Any]:
    """GSM8K row -> prompt-completion row (message lists, or strings when not conversational)."""
    prompt, _ = _prompt_and_answer(row, conversational, system_prompt, instruction)
    solution = strip_calculator_annotations(row["answer"]).strip()
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
    prompt, answer = _prompt_and_answer(row, conversational, system_prompt, instruction)
    return {"prompt": prompt, "answer": answer}


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
    return convert_records(records, lambda row: fn(row, **kwargs), skip_invalid=skip_invalid,
                           stats=stats, skip_reason="invalid gsm8k row")
