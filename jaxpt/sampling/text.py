"""Host-side text generation: chat templates, batching, padding, decoding to text.

`sample_completions(graphdef, params, tokenizer, prompt_ids, counts, ...)` is the one
wrapper of `jaxpt.sampling.generate` from prompt rows to decoded completions:
`generate_text` (`jaxpt generate`, notebooks) encodes prompts with the chat template and
calls it; `jaxpt.evaluate.sample_and_verify` (`jaxpt eval`, RFT, GRPO's held-out eval)
verifies what it returns. GRPO rollouts call `generate` on token ids directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from jaxpt.sampling.continuous import ENGINES, generate_continuous
from jaxpt.sampling.loop import generate
from jaxpt.sampling.samplers import Sampler
from jaxpt.sampling.state import FINISH_REASONS, FINISH_STOP

# End-of-turn markers of common chat templates; one is a stop id when the tokenizer's
# chat template uses it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

Prompt = str | Sequence[dict[str, Any]]


class PromptError(ValueError):
    """A prompt jaxpt cannot turn into token ids; the message names the prompt index."""


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str  # decoded without the stop token, special tokens skipped
    token_ids: tuple[int, ...]  # new tokens, including the stop token if any
    logprobs: tuple[float, ...]  # per token, see GenerationResult.logprobs
    finish_reason: str  # "stop" | "length"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class Sampled(NamedTuple):
    """One completion of ``prompts[index]``: its sample number and the completion."""

    index: int
    sample: int
    completion: Completion


def default_stop_ids(tokenizer, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """The tokenizer's EOS, plus its chat template's end-of-turn token(s), plus `extra`."""
    ids = [int(i) for i in extra]
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates
        template = " ".join(template.values())
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in template and token in vocab:
            ids.append(int(vocab[token]))
    return tuple(dict.fromkeys(ids))


def encode_prompts(
    tokenizer, prompts: Sequence[Prompt], *, chat_template: bool = True
) -> list[list[int]]:
    """Token ids per prompt. With `chat_template`, a string becomes one user message and
    a message list is used as is; the template gets `add_generation_prompt=True`.
    Without it, strings are tokenized as plain text (messages are an error)."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            "the tokenizer has no chat template; pass chat_template=False "
            "(CLI: --no-chat-template) to tokenize prompts as plain text"
        )
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, Sequence) and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt
        ):
            messages = list(prompt)
        else:
            raise PromptError(
                f"prompt {i}: expected a string or a list of {{'role', 'content'}} messages, "
                f"got {type(prompt).__name__}"
            )
        if not messages:
            raise PromptError(f"prompt {i}: empty message list")
        if chat_template:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            if not isinstance(prompt, str):
                raise PromptError(
                    f"prompt {i}: a message list needs the chat template (chat_template=True)"
                )
            ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise PromptError(f"prompt {i}: tokenizes to zero tokens")
        out.append([int(t) for t in ids])
    return out


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """(ids [B, P] int32, mask [B, P] int32), each row right-aligned."""
    P = max(len(r) for r in rows) if length is None else length
    ids = np.full((len(rows), P), pad_id, np.int32)
    mask = np.zeros((len(rows), P), np.int32)
    for b, row in enumerate(rows):
        if len(row) > P:
            raise PromptError(f"prompt row {b} has {len(row)} tokens > length {P}")
        if row:
            ids[b, P - len(row) :] = row
            mask[b, P - len(row) :] = 1
    return ids, mask


def stop_and_pad_ids(
    tokenizer, eos_ids: Sequence[int] | None, pad_id: int | None, extra: Sequence[int] = ()
) -> tuple[tuple[int, ...], int]:
    """(stop ids, pad id): ``eos_ids`` or ``default_stop_ids(tokenizer, extra)``; ``pad_id``
    or the tokenizer's pad token, else the first stop id, else 0."""
    if eos_ids is None:
        eos_ids = default_stop_ids(tokenizer, extra)
    eos = tuple(int(e) for e in eos_ids)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = eos[0] if eos else 0
    return eos, int(pad_id)


def sample_completions(
    graphdef,
    params,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    counts: int | Sequence[int],
    *,
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    seed: int = 0,
    batch_size: int | None = None,
    shardings=None,
    layer_loop: str = "auto",
    engine: str = "static",
) -> tuple[int, Iterator[list[Sampled]]]:
    """Sample completions of token-id prompts; every non-rollout caller of `generate`
    (`generate_text`, `jaxpt.evaluate.sample_and_verify`) goes through here.

    counts: an int K (every prompt is one decoded row with K samples sharing its prefill)
        or one count per prompt (0 allowed; each sample is its own row, so a prompt may sit
        in several rows of a batch and gets independent samples).
    Returns (number of decode batches, iterator over them). Rows are batched in order of
    prompt length (less padding); every batch has exactly ``batch_size`` rows (default:
    all; the last one is filled with repeats, dropped from the output), so one compiled
    program serves the run per prompt-length bucket. The batch that starts at sorted row
    ``start`` draws with ``fold_in(key(seed), start)``. A batch is a list of `Sampled`.

    engine: "static" (the above) or "continuous": all rows in ONE batch decoded by
        `jaxpt.sampling.continuous.generate_continuous` with ``batch_size`` rows' worth of
        slots (the same cache rows as a static batch), a finished row's slot taking the
        next row; row j (in prompt order) draws with ``fold_in(key(seed), j)``.
    """
    if isinstance(counts, int):
        rows, sample_no, per_row = list(range(len(prompt_ids))), [0] * len(prompt_ids), counts
    else:
        rows = [i for i, c in enumerate(counts) for _ in range(c)]
        sample_no = [s for c in counts for s in range(c)]
        per_row = 1
    n = len(rows)
    batch_size = max(n, 1) if batch_size is None else batch_size
    if batch_size < 1:
        raise PromptError(f"batch_size={batch_size}: must be >= 1")
    order = sorted(range(n), key=lambda r: len(prompt_ids[rows[r]]))
    if engine not in ENGINES:
        raise PromptError(f"engine={engine!r}: use one of {ENGINES}")
    if engine == "continuous":
        return 1, _continuous_batch(
            graphdef, params, tokenizer, [prompt_ids[r] for r in rows], rows, sample_no,
            per_row, sampler=sampler, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
            pad_id=pad_id, seed=seed, num_slots=min(batch_size, max(n, 1)) * per_row,
            shardings=shardings, layer_loop=layer_loop)

    def batches() -> Iterator[list[Sampled]]:
        base = jax.random.key(seed)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            ids_b = [prompt_ids[rows[r]] for r in idx]
            ids_b += [ids_b[-1]] * (min(batch_size, n) - len(ids_b))
            ids, mask = left_pad(ids_b, pad_id)
            if shardings is not None:
                ids, mask = shardings.place_rows(ids), shardings.place_rows(mask)
            result = generate(
                graphdef,
                params,
                ids,
                mask,
                sampler=sampler,
                max_new_tokens=max_new_tokens,
                eos_ids=tuple(eos_ids),
                rng=jax.random.fold_in(base, start),
                num_samples=per_row,
                pad_id=pad_id,
                shardings=shardings,
                layer_loop=layer_loop,
            )
            result = jax.tree.map(np.asarray, result)
            completions = _decode(tokenizer, result, len(idx) * per_row)
            yield [
                Sampled(rows[r], sample_no[r] + s, completions[j * per_row + s])
                for j, r in enumerate(idx)
                for s in range(per_row)
            ]

    return -(-n // batch_size), batches()


def _continuous_batch(graphdef, params, tokenizer, prompts, rows, sample_no, per_row, *,
                      sampler, max_new_tokens, eos_ids, pad_id, seed, num_slots, shardings,
                      layer_loop) -> Iterator[list[Sampled]]:
    """`sample_completions`' one batch with the continuous engine."""
    if shardings is not None and shardings.mesh.size > 1:
        raise PromptError("engine='continuous' decodes on one device; use engine='static' "
                          f"on a {shardings.mesh.size}-device mesh")
    if not prompts:
        return
    ids, mask = left_pad(prompts, pad_id)
    result = generate_continuous(
        graphdef, params, ids, mask, sampler=sampler, max_new_tokens=max_new_tokens,
        eos_ids=tuple(eos_ids), rng=jax.random.key(seed), num_samples=per_row, pad_id=pad_id,
        num_slots=num_slots, layer_loop=layer_loop)
    completions = _decode(tokenizer, jax.tree.map(np.asarray, result), len(rows) * per_row)
    yield [
        Sampled(r, sample_no[j] + s, completions[j * per_row + s])
        for j, r in enumerate(rows)
        for s in range(per_row)
    ]


def _decode(tokenizer, result, num_rows: int) -> list[Completion]:
    """The first ``num_rows`` rows of a GenerationResult (numpy) as Completions."""
    ids, text_ids = [], []
    for r in range(num_rows):
        toks = tuple(int(t) for t in result.tokens[r, : int(result.lengths[r])])
        ids.append(toks)
        text_ids.append(list(toks[:-1] if int(result.finish_reason[r]) == FINISH_STOP else toks))
    texts = tokenizer.batch_decode(text_ids, skip_special_tokens=True)
    return [
        Completion(
            text=texts[r],
            token_ids=ids[r],
            logprobs=tuple(float(x) for x in result.logprobs[r, : len(ids[r])]),
            finish_reason=FINISH_REASONS[int(result.finish_reason[r])],
        )
        for r in range(num_rows)
    ]


def generate_text(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    sampler: Sampler | None = None,
    max_new_tokens: int = 256,
    num_samples: int = 1,
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    seed: int = 0,
    batch_size: int | None = 8,
    chat_template: bool = True,
    progress: bool = False,
    shardings=None,
    layer_loop: str = "auto",
) -> list[list[Completion]]:
    """Complete each prompt `num_samples` times; returns, in prompt order, a list of
    `num_samples` Completions per prompt.

    prompts: strings (one user turn) or message lists (`[{"role", "content"}, ...]`).
    sampler: default greedy. eos_ids: default the model config's EOS plus
    `default_stop_ids(tokenizer)`. pad_id: default the tokenizer's pad token, else the
    first stop id. `model` is an nnx Decoder (or a (graphdef, params) pair).
    """
    if not prompts:
        return []
    if isinstance(model, tuple):
        (graphdef, params), cfg_eos = model, ()
    else:
        (graphdef, params), cfg_eos = nnx.split(model), tuple(model.cfg.eos_token_ids)
    eos_ids, pad_id = stop_and_pad_ids(tokenizer, eos_ids, pad_id, extra=cfg_eos)
    ids = encode_prompts(tokenizer, prompts, chat_template=chat_template)
    total, batches = sample_completions(
        graphdef,
        params,
        tokenizer,
        ids,
        num_samples,
        sampler=Sampler.greedy() if sampler is None else sampler,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
        seed=seed,
        batch_size=batch_size,
        shardings=shardings,
        layer_loop=layer_loop,
    )
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=total, desc="generate", unit="batch")
    out: list[list[Completion]] = [[None] * num_samples for _ in ids]  # type: ignore[list-item]
    for batch in batches:
        for x in batch:
            out[x.index][x.sample] = x.completion
    return out
