"""Unpaired preference rows (TRL's unpaired preference format, for KTO): ``prompt`` /
``completion`` / ``label`` (true: desirable, false: undesirable), standard (strings) or
conversational (message lists), tokenized as one side of a preference pair is
(``tokenize.tokenize_preference``). A paired data set (``chosen`` / ``rejected``, e.g.
``data.format: hh_rlhf``) is unpaired as TRL's ``unpair_preference_dataset`` does it: every
chosen completion becomes a desirable row and every rejected one an undesirable row, all
chosen rows first, then all rejected ones.

KTO's reference point is estimated from mismatched pairs: each row's prompt with another
row's completion. :func:`with_mismatched` fixes them per row as TRL's ``KTOTrainer`` does
(``add_kl_completion_ids``): within consecutive chunks of ``chunk`` rows (TRL: the per-device
batch size), row j takes the completion of row j-1 and the first row the chunk's last.
Each row becomes a :class:`~jaxpt.data.tokenize.TokenizedPreference` whose ``chosen`` side
is its own completion and whose ``rejected`` side is the mismatched one, so the preference
layouts, loaders and reference scoring of ``jaxpt.data.pairs`` serve KTO unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxpt.data.chat import render_chat
from jaxpt.data.formats import DataError, DataStats, Record, detect_format, validate_row
from jaxpt.data.pipeline import prepare_preference
from jaxpt.data.sources import read_with_holdout
from jaxpt.data.tokenize import TokenizedPreference, _completion_text, _with_eos, encode_bounded


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
    prompt_ids: np.ndarray  # int32 [P]
    completion_ids: np.ndarray  # int32 [C]
    label: bool  # desirable


def tokenize_unpaired(tokenizer: Any, row: dict[str, Any], *, max_length: int | None = None,
                      chat_template_kwargs: dict | None = None) -> UnpairedExample:
    """One ``prompt`` / ``completion`` / ``label`` row (raises DataError naming the key)."""
    if "label" not in row:
        raise DataError("missing (unpaired rows need a boolean label)", key="label")
    label = row["label"]
    if not isinstance(label, (bool, np.bool_)):
        raise DataError(f"must be true or false, got {label!r}", key="label")
    fmt = validate_row({k: v for k, v in row.items() if k != "label"}, "sft")
    if fmt.kind != "prompt_completion":
        raise DataError(f"unpaired rows need 'prompt' and 'completion'; row has keys "
                        f"{sorted(row)}", key="completion" if "prompt" in row else "prompt")
    enc = lambda text, special: encode_bounded(  # noqa: E731
        tokenizer, text, add_special_tokens=special, max_length=max_length)
    if not fmt.conversational:
        p = enc(row["prompt"], True)
        c = _with_eos(tokenizer, enc(row["completion"], False))
    else:
        kw = chat_template_kwargs
        prompt_text = render_chat(tokenizer, row["prompt"], add_generation_prompt=True,
                                  chat_template_kwargs=kw)
        c_text = _completion_text(tokenizer, prompt_text, row["prompt"], row["completion"],
                                  "completion", kw)
        p, c = enc(prompt_text, False), enc(c_text, False)
    return UnpairedExample(np.asarray(p, np.int32), np.asarray(c, np.int32), bool(label))


def _truncate(ex: UnpairedExample, max_length: int, truncation: str,
              stats: DataStats) -> UnpairedExample | None:
    p, c = len(ex.prompt_ids), len(ex.completion_ids)
    if p + c <= max_length:
        return ex
    if truncation == "drop" or p >= max_length:
        stats.dropped_too_long += 1
        return None
    stats.truncated += 1
    return dataclasses.replace(ex, completion_ids=ex.completion_ids[: max_length - p])


def prepare_unpaired(records: Sequence[Record], tokenizer: Any, *, max_length: int,
                     truncation: str = "keep_start", skip_invalid: bool = False,
                     stats: DataStats | None = None) -> tuple[list[UnpairedExample], DataStats]:
    """Validate, tokenize and truncate (``keep_start``: cut the completion's end; a prompt
    that fills ``max_length`` drops the row; ``drop``: drop any row that does not fit)
    unpaired rows, or paired rows unpaired (module doc). The first row decides which."""
    stats = stats if stats is not None else DataStats(rows_read=len(records))
    if truncation not in ("keep_start", "drop"):
        raise ValueError(f"data.truncation={truncation!r}: KTO rows take 'keep_start' or 'drop'")
    paired = bool(records) and detect_format(records[0].data).kind == "preference"
    if paired:
        pairs, stats = prepare_preference(records, tokenizer, max_length=max_length,
                                          truncation=truncation, skip_invalid=skip_invalid,
                                          stats=stats)
        out = [UnpairedExample(p.prompt_ids, p.chosen_ids, True) for p in pairs]
        out += [UnpairedExample(p.prompt_ids, p.rejected_ids, False) for p in pairs]
        stats.examples = len(out)
        return out, stats
    out = []
    for rec in records:
        try:
            ex = tokenize_unpaired(tokenizer, rec.data, max_length=max_length)
        except DataError as e:
            if not skip_invalid:
                raise e.at(rec.source, rec.row) from None
            stats.skip("invalid row")
            continue
        ex = _truncate(ex, max_length, truncation, stats)
        if ex is not None:
            out.append(ex)
            stats.tokens += len(ex.prompt_ids) + len(ex.completion_ids)
            stats.target_tokens += len(ex.completion_ids)
    stats.examples = len(out)
    return out, stats


def mismatched_partners(n: int, chunk: int) -> np.ndarray:
    """Row i's mismatched partner (whose completion it takes): TRL's rotation by one within
    consecutive chunks of ``chunk`` rows; a last chunk of one row takes the row before it."""
    if n < 2:
        raise ValueError(f"KTO needs at least 2 rows to pair prompts with other completions, "
                         f"got {n}")
    i = np.arange(n)
    start = i - i % chunk
    end = np.minimum(start + chunk, n)
    partner = np.where(i == start, end - 1, i - 1)
    return np.where(partner == i, i - 1, partner)


def with_mismatched(examples: Sequence[UnpairedExample], *, chunk: int,
                    max_length: int) -> tuple[list[TokenizedPreference], np.ndarray]:
    """(rows as pairs: ``chosen`` = own completion, ``rejected`` = the partner's, cut to fit
    ``max_length`` after this row's prompt; labels float32 [N], 1 = desirable)."""
    partner = mismatched_partners(len(examples), chunk)
    rows = []
    for ex, j in zip(examples, partner, strict=True):
        room = max_length - len(ex.prompt_ids)
        rows.append(TokenizedPreference(ex.prompt_ids, ex.completion_ids,
                                        examples[j].completion_ids[:room]))
    return rows, np.asarray([ex.label for ex in examples], np.float32)


def read_unpaired(read: Callable[..., list], tokenizer, data, *, holdout: int, source: str,
                  section: str = "kto"):
    """(train examples, train stats, held-out examples | None) from ``read(which, stats=...)``
    (the records of ``data.train`` / ``data.eval``); ``holdout`` > 0 holds out the last
    rows of ``data.train`` (before unpairing) instead of ``data.eval``."""

    def prepare(records, stats, what):
        ex, stats = prepare_unpaired(records, tokenizer, max_length=data.max_length,
                                     truncation=data.truncation,
                                     skip_invalid=data.skip_invalid, stats=stats)
        if len(ex) < 2:
            raise ValueError(f"{source}: {what} has {len(ex)} usable KTO rows; at least 2 "
                             f"are needed ({stats})")
        return ex, stats

    return read_with_holdout(read, prepare, data, holdout=holdout, source=source,
                             section=section)
