"""A trained reward model as a reward function: ``reward_funcs: ["rm:path/to/rm"]``.

The path is a Hugging Face sequence-classification checkpoint dir (what ``jaxpt export``
writes for a reward run, or any one-label ``XForSequenceClassification`` of a llama /
qwen2 / qwen3 decoder). It is loaded once; each call scores its completions in batches of
``batch_size`` rows (``"rm:PATH(batch_size=32)"``; default 16) through one jitted forward
(rows padded to a bucketed length, so few programs compile) and returns one float per
completion. The model sits on the first device (a reward model is scored, not trained).

A prompt + completion becomes the row the reward model was trained on: the preference
tokenization of ``jaxpt.algorithms.reward`` (``tokenize_preference``) with the completion
on both sides: a conversational prompt is rendered with the chat template and generation
prompt, the completion (TRL's ``[{"role": "assistant", "content": ...}]``) continues it
up to its end-of-turn; plain strings are prompt (with special tokens) + completion + EOS.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxpt.data.packing import bucket_length, collate_padded
from jaxpt.data.tokenize import tokenize_preference
from jaxpt.models.scalar_head import load_reward_model, sequence_scores

PREFIX = "rm:"


class RewardModelReward:
    """``fn(prompts=..., completions=..., **columns) -> [float]``: the reward model's score of
    each prompt + completion (module doc)."""

    def __init__(self, path: str | Path, *, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"rm:{path}: batch_size must be >= 1, got {batch_size}")
        self.path, self.batch_size = str(path), int(batch_size)
        self.rm = load_reward_model(path)
        self.__name__ = f"rm_{Path(self.path).name}"
        rm = self.rm

        @jax.jit
        def score(params, head, ids_BT, positions_BT, segment_ids_BT):
            model = nnx.merge(rm.graphdef, params)
            return sequence_scores(
                model, head, ids_BT, positions_BT, segment_ids_BT, pad_id=rm.pad_id
            )

        self._score = score
        self._lock = threading.Lock()  # one scoring call at a time (reward worker threads)

    def row_ids(self, prompt, completion) -> np.ndarray:
        """The token ids the reward model scores for one prompt + completion."""
        # The chosen side is tokenized on its own; the rejected one only has to differ
        # (identical pairs are refused by the preference checks).
        other = (
            completion + " ." if isinstance(completion, str)
            else [*completion[:-1], {**completion[-1], "content": completion[-1]["content"] + " ."}]
        )
        row = {"prompt": prompt, "chosen": completion, "rejected": other}
        ids = tokenize_preference(self.rm.tokenizer, row).sequence("chosen").input_ids
        limit = self.rm.cfg.max_position_embeddings
        if len(ids) > limit:
            raise ValueError(
                f"rm:{self.path}: prompt + completion is {len(ids)} tokens, more than the "
                f"reward model's max_position_embeddings {limit}"
            )
        return ids

    def __call__(self, prompts, completions, **_) -> list[float]:
        from jaxpt.data.tokenize import TokenizedExample

        rows = [self.row_ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        out = np.zeros(len(rows), np.float32)
        with self._lock:
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                length = bucket_length(max(map(len, chunk)))
                examples = [TokenizedExample(ids, np.zeros(len(ids), bool)) for ids in chunk]
                examples += [examples[-1]] * (self.batch_size - len(chunk))  # one shape
                batch = collate_padded(examples, length, pad_id=self.rm.pad_id)
                scores = self._score(
                    self.rm.params, self.rm.head, batch["input_ids"], batch["positions"],
                    batch["segment_ids"],
                )
                out[start : start + len(chunk)] = np.asarray(scores)[: len(chunk)]
        return [float(x) for x in out]


@functools.lru_cache(maxsize=8)
def _load(path: str, batch_size: int) -> RewardModelReward:
    return RewardModelReward(path, batch_size=batch_size)


def parse_rm_spec(spec: str) -> tuple[str, dict]:
    """``"rm:PATH"`` or ``"rm:PATH(batch_size=32)"`` -> (PATH, options)."""
    from jaxpt.rewards.registry import parse_reward_spec

    body = spec[len(PREFIX) :].strip()
    options: dict = {}
    if body.endswith(")") and "(" in body:
        body, _, opts = body.rpartition("(")
        _, options = parse_reward_spec(f"rm({opts}")
    if not body.strip():
        raise ValueError(f"reward function {spec!r}: write the reward model's dir after 'rm:'")
    unknown = set(options) - {"batch_size"}
    if unknown:
        raise ValueError(f"reward function {spec!r}: unknown options {sorted(unknown)}; "
                         "the one option is batch_size")
    return body.strip(), options


def reward_model_function(spec: str, **options) -> RewardModelReward:
    """``"rm:PATH"`` (options in the string or as keywords: ``batch_size``) -> the reward
    function of the model at PATH, loaded once per (path, batch_size) in this process."""
    path, in_spec = parse_rm_spec(spec)
    options = {**in_spec, **options}
    unknown = set(options) - {"batch_size"}
    if unknown:
        raise ValueError(f"reward function {spec!r}: unknown options {sorted(unknown)}")
    return _load(str(Path(path).expanduser()), int(options.get("batch_size", 16)))
