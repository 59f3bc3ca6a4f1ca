"""Host-side text generation: chat templates, batching, padding, decoding to text.

`generate_text(model, tokenizer, prompts, ...)` is the convenience entry point (the CLI,
eval and notebooks use it); the GRPO trainer calls `jaxpt.sampling.generate` on token ids
directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from flax import nnx

from jaxpt.sampling.loop import FINISH_REASONS, FINISH_STOP, generate
from jaxpt.sampling.samplers import Sampler

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


def iter_generate_ids(
    graphdef,
    params,
    prompt_ids: Sequence[Sequence[int]],
    *,
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    seed: int = 0,
    num_samples: int = 1,
    batch_size: int | None = None,
    shardings=None,
    layer_loop: str = "auto",
) -> Iterator[tuple[list[int], Any]]:
    """Yield (prompt indices, GenerationResult as numpy) batch by batch. Prompts are
    batched in order of length (less padding); every batch has exactly `batch_size`
    prompts (the last one is filled with repeats, dropped from the output), so one
    compiled program serves the whole run per prompt-length bucket."""
    import jax

    n = len(prompt_ids)
    batch_size = n if batch_size is None else batch_size
    if batch_size < 1:
        raise PromptError(f"batch_size={batch_size}: must be >= 1")
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]))
    base = jax.random.key(seed)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        rows = [prompt_ids[i] for i in idx]
        rows += [rows[-1]] * (min(batch_size, n) - len(rows))
        ids, mask = left_pad(rows, pad_id)
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
            num_samples=num_samples,
            pad_id=pad_id,
            shardings=shardings,
            layer_loop=layer_loop,
        )
        result = jax.tree.map(np.asarray, result)
        keep = len(idx) * num_samples
        yield idx, jax.tree.map(lambda x, k=keep: x[:k], result)


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
    sampler = Sampler.greedy() if sampler is None else sampler
    if isinstance(model, tuple):
        graphdef, params = model
        cfg_eos = ()
    else:
        graphdef, params = nnx.split(model)
        cfg_eos = tuple(model.cfg.eos_token_ids)
    if eos_ids is None:
        eos_ids = default_stop_ids(tokenizer, extra=cfg_eos)
    eos_ids = tuple(int(e) for e in eos_ids)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = eos_ids[0] if eos_ids else 0
    ids = encode_prompts(tokenizer, prompts, chat_template=chat_template)
    batches = iter_generate_ids(
        graphdef,
        params,
        ids,
        sampler=sampler,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=int(pad_id),
        seed=seed,
        num_samples=num_samples,
        batch_size=batch_size,
        shardings=shardings,
        layer_loop=layer_loop,
    )
    if progress:
        from tqdm.auto import tqdm

        bs = len(ids) if batch_size is None else batch_size
        batches = tqdm(batches, total=-(-len(ids) // bs), desc="generate", unit="batch")
    out: list[list[Completion] | None] = [None] * len(ids)
    for idx, result in batches:
        for j, i in enumerate(idx):
            out[i] = [
                _completion(tokenizer, result, j * num_samples + s) for s in range(num_samples)
            ]
    return out  # type: ignore[return-value]


def _completion(tokenizer, result, r: int) -> Completion:
    n = int(result.lengths[r])
    reason = int(result.finish_reason[r])
    tokens = [int(t) for t in result.tokens[r, :n]]
    text_tokens = tokens[:-1] if reason == FINISH_STOP else tokens
    return Completion(
        text=tokenizer.decode(text_tokens, skip_special_tokens=True),
        token_ids=tuple(tokens),
        logprobs=tuple(float(x) for x in result.logprobs[r, :n]),
        finish_reason=FINISH_REASONS[reason],
    )
