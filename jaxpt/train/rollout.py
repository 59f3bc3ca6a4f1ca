"""GRPO rollouts: prompts -> sampled completions -> rewards -> advantages -> a train batch.

Axis legend: B prompts, G generations per prompt, R = B*G rollout rows, P prompt length
(left padded), C completion length (max_new_tokens, right padded), S = P + C.

A rollout row is laid out as `[pad.. prompt | completion ..pad]`. Because prompts are left
padded, the last prompt token always sits at P-1, so the log-prob of completion token j
is read from sequence position P-1+j for every row: `completion_logprobs` slices
`[:, P-1 : P-1+C]` and no per-row gather is needed.

Shared-prompt layout (`group_rollout_rows`, for the train step): the G rows of a group
repeat one prompt, so they are packed as ONE row `[prompt | completion 0 | ... |
completion G-1]` (length P + G*C) in which completion i is segment i+2 and the prompt's
keys are flagged shared (`Decoder(shared_BT=...)`): each completion sees the prompt and
itself, as in its own row, while the prompt goes through the decoder once instead of G
times. Attention runs over the prompt and each completion's own block only
(`Decoder(prefix_blocks=(P, C))`), so the layout never costs more than G separate rows.
`grouped_completion_logprobs` reads completion token j of completion i from the
hidden state at P-1 (j = 0: the shared last prompt token) or P + i*C + j-1.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxpt.rewards.advantages import compute_advantages
from jaxpt.rewards.registry import compute_rewards
from jaxpt.sampling import FINISH_LENGTH, Sampler, generate
from jaxpt.train.logprobs import hidden_token_logprobs, sequence_token_logprobs


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    num_generations: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    reward_funcs: tuple[str, ...] = ("math",)
    reward_weights: tuple[float, ...] | None = None
    reward_timeout_s: float = 60.0
    skip_nonfinite_rewards: bool = False  # NaN / inf reward: None + counted, not an error
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    advantage_estimator: str = "grpo"  # grpo | rloo
    mask_truncated_completions: bool = False

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}: GRPO needs >= 2 per "
                "prompt (advantages compare completions of one prompt)"
            )
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries for "
                f"{len(self.reward_funcs)} reward_funcs"
            )

    def sampler(self) -> Sampler:
        return Sampler(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p
        )


@dataclasses.dataclass
class Rollout:
    """Host-side result of one rollout round (numpy arrays, R rows)."""

    batch: dict[str, np.ndarray]  # rollout_sequences(...) + advantages_R
    completions: list[Any]
    rewards_R: np.ndarray
    metrics: dict[str, float]


def rollout_sequences(
    prompt_ids_RP, prompt_mask_RP, completion_ids_RC, completion_mask_RC, *, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Train-step inputs for rollout rows: the batch contract of `jaxpt.data.packing`
    (`input_ids, targets, positions, segment_ids`) plus `completion_mask` [R, C]."""
    prompt_ids_RP, completion_ids_RC = np.asarray(prompt_ids_RP), np.asarray(completion_ids_RC)
    prompt_mask_RP = np.asarray(prompt_mask_RP).astype(bool)
    completion_mask_RC = np.asarray(completion_mask_RC).astype(bool)
    if prompt_mask_RP.shape[1] and not prompt_mask_RP[:, -1].all():
        raise ValueError("prompts must be left padded (the last prompt column must be real)")
    real_RS = np.concatenate([prompt_mask_RP, completion_mask_RC], axis=1)
    input_ids_RS = np.where(
        real_RS, np.concatenate([prompt_ids_RP, completion_ids_RC], 1), pad_id
    ).astype(np.int32)
    positions_RS = np.maximum(np.cumsum(real_RS, axis=1) - 1, 0).astype(np.int32)
    targets_RS = np.concatenate(
        [input_ids_RS[:, 1:], np.full((len(input_ids_RS), 1), pad_id, np.int32)], axis=1
    )
    return {
        "input_ids": input_ids_RS,
        "targets": targets_RS,
        "positions": positions_RS,
        "segment_ids": real_RS.astype(np.int32),
        "completion_mask": completion_mask_RC.astype(np.float32),
    }


def completion_logprobs(logprobs_RS, completion_len: int):
    """Log-probs of the completion tokens, [R, C], from next-token log-probs [R, S]."""
    P = logprobs_RS.shape[1] - completion_len
    return logprobs_RS[:, P - 1 : P - 1 + completion_len]


def completion_token_logprobs(
    model: Any, batch, *, impl: str = "auto", temperature: float = 1.0,
    with_entropy: bool = False,
):
    """(logprobs_RC, entropy_RC | None) of the real completion tokens of rollout rows (0 at
    padding). The decoder runs over prompt + completion; the LM head only over the C
    positions that predict a real completion token (TRL's ``logits_to_keep``, plus the
    padding of short completions)."""
    mask_RC = batch["completion_mask"] > 0
    C = mask_RC.shape[1]
    S = batch["input_ids"].shape[1]
    # Position P-1+j (P = S-C) predicts completion token j.
    valid_RS = jnp.pad(mask_RC, ((0, 0), (S - C - 1, 1)))
    lp_RS, ent_RS, _ = sequence_token_logprobs(
        model, batch, impl=impl, temperature=temperature, with_entropy=with_entropy,
        valid_BT=valid_RS,
    )
    ent_RC = None if ent_RS is None else completion_logprobs(ent_RS, C)
    return completion_logprobs(lp_RS, C), ent_RC


# Flat-row keys that the shared-prompt layout replaces by its `group_*` keys.
FLAT_SEQUENCE_KEYS = ("input_ids", "targets", "positions", "segment_ids")
# The shared-prompt layout's sequence keys (one row per group: the prompt, then G completions).
GROUP_KEYS = ("group_input_ids", "group_positions", "group_segment_ids", "group_shared")


def group_rollout_rows(batch: dict[str, np.ndarray], G: int) -> dict[str, np.ndarray]:
    """A flat rollout batch (rows r*G .. r*G+G-1 share prompt r) in the shared-prompt
    layout (module doc): ``group_input_ids``, ``group_positions``, ``group_segment_ids``,
    ``group_shared`` [B, P + G*C]; ``completion_ids`` [B, G, C]; every other key of
    ``batch`` (per-row values, [R, ...]) reshaped to [B, G, ...]."""
    ids_RS = np.asarray(batch["input_ids"])
    R, S = ids_RS.shape
    C = batch["completion_mask"].shape[1]
    P = S - C
    if R % G:
        raise ValueError(f"group_rollout_rows: {R} rows do not form groups of {G}")
    B = R // G
    seg_RS, pos_RS = np.asarray(batch["segment_ids"]), np.asarray(batch["positions"])
    prompt_BGP, prompt_seg_BGP = ids_RS[:, :P].reshape(B, G, P), seg_RS[:, :P].reshape(B, G, P)
    # Same padding, and the same token wherever the prompt is real.
    same_BGP = (prompt_seg_BGP == prompt_seg_BGP[:, :1]) & (
        (prompt_BGP == prompt_BGP[:, :1]) | (prompt_seg_BGP == 0))
    bad = np.flatnonzero(~same_BGP.all(axis=(1, 2)))
    if bad.size:
        g = int(bad[0])
        raise ValueError(f"group_rollout_rows: rows {g * G}..{g * G + G - 1} do not share one "
                         "prompt (rollout rows must come in groups of num_generations)")
    mask_BGC = np.asarray(batch["completion_mask"]).reshape(B, G, C) > 0
    completion_BGC = ids_RS[:, P:].reshape(B, G, C)
    seg_BGC = np.where(mask_BGC, np.arange(2, G + 2, dtype=np.int32)[None, :, None], 0)
    prompt_real_BP = prompt_seg_BGP[:, 0] > 0
    out = {
        "group_input_ids": np.concatenate(
            [prompt_BGP[:, 0], completion_BGC.reshape(B, G * C)], axis=1).astype(np.int32),
        "group_positions": np.concatenate(
            [pos_RS[:, :P].reshape(B, G, P)[:, 0], pos_RS[:, P:].reshape(B, G * C)], axis=1
        ).astype(np.int32),
        "group_segment_ids": np.concatenate(
            [prompt_real_BP.astype(np.int32), seg_BGC.reshape(B, G * C)], axis=1
        ).astype(np.int32),
        "group_shared": np.concatenate(
            [prompt_real_BP, np.zeros((B, G * C), bool)], axis=1).astype(np.int32),
        "completion_ids": completion_BGC.astype(np.int32),
    }
    for k, v in batch.items():
        if k not in FLAT_SEQUENCE_KEYS and not k.startswith("_"):
            v = np.asarray(v)
            out[k] = v.reshape(B, G, *v.shape[1:])
    return out


def ungroup_rows(batch):
    """The per-row keys of a shared-prompt batch back in flat [R, ...] form (no group_*)."""
    B, G = batch["completion_ids"].shape[:2]
    return {k: v.reshape(B * G, *v.shape[2:]) for k, v in batch.items()
            if not k.startswith("group_")}


def grouped_completion_logprobs(
    model: Any, batch, *, impl: str = "auto", temperature: float = 1.0,
    with_entropy: bool = False,
):
    """``completion_token_logprobs`` for a shared-prompt batch: (logprobs_RC, entropy_RC or
    None), rows in the flat order (row g*G + i = completion i of group g)."""
    B, G, C = batch["completion_ids"].shape
    P = batch["group_input_ids"].shape[1] - G * C
    hidden_BTE, _ = model(
        batch["group_input_ids"], batch["group_positions"], batch["group_segment_ids"],
        shared_BT=batch["group_shared"] > 0, prefix_blocks=(P, C),
    )
    i_G1, j_1C = jnp.arange(G)[:, None], jnp.arange(C)[None, :]
    source_GC = jnp.where(j_1C == 0, P - 1, P + i_G1 * C + j_1C - 1)
    hidden_RCE = hidden_BTE[:, source_GC.reshape(-1)].reshape(B * G, C, -1)
    lp_RC, ent_RC, _ = hidden_token_logprobs(
        hidden_RCE, model.lm_head, batch["completion_ids"].reshape(B * G, C),
        impl=impl, temperature=temperature, with_entropy=with_entropy,
        valid_BT=batch["completion_mask"].reshape(B * G, C) > 0,
    )
    return lp_RC, ent_RC


def _decode(tokenizer, tokens_RC, lengths_R) -> list[str]:
    rows = [list(map(int, t[:n])) for t, n in zip(tokens_RC, lengths_R, strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def _repeat(values: Sequence[Any], n: int) -> list[Any]:
    return [v for v in values for _ in range(n)]


def _generate_after_prefixes(
    graphdef, params, prompt_batch, prefixes_R, *, cfg, eos_ids, rng, pad_id, shardings
):
    """Decode every rollout row from its own prompt + demonstration prefix (one row per
    sample: rows of a group no longer share a prompt). Returns completion tokens
    [R, max_prefix + max_new] = prefix then continuation, their lengths, the prefix
    lengths and the generation result (finish reasons)."""
    G = cfg.num_generations
    ids_BP = np.asarray(prompt_batch["prompt_ids"])
    mask_BP = np.asarray(prompt_batch["prompt_mask"]).astype(bool)
    rows = []
    for r, prefix in enumerate(prefixes_R):
        b = r // G
        rows.append(list(ids_BP[b][mask_BP[b]]) + [int(t) for t in prefix])
    width = max(len(x) for x in rows)
    ids_RP = np.full((len(rows), width), pad_id, np.int32)
    mask_RP = np.zeros((len(rows), width), np.int32)
    for r, x in enumerate(rows):  # left padded
        ids_RP[r, width - len(x) :] = x
        mask_RP[r, width - len(x) :] = 1
    gen = generate(
        graphdef,
        params,
        ids_RP,
        mask_RP,
        sampler=cfg.sampler(),
        max_new_tokens=cfg.max_new_tokens,
        eos_ids=tuple(eos_ids),
        rng=rng,
        num_samples=1,
        pad_id=pad_id,
        bucket=True,
        shardings=shardings,
    )
    new_RC, new_len_R = np.asarray(gen.tokens), np.asarray(gen.lengths)
    prefix_len_R = np.asarray([len(p) for p in prefixes_R], np.int32)
    # Completion width rounded up to a multiple of 16 so that prefix lengths do not compile
    # a new train step each rollout.
    C = -(-int(prefix_len_R.max()) // 16) * 16 + cfg.max_new_tokens
    tokens_RC = np.full((len(rows), C), pad_id, np.int32)
    for r, prefix in enumerate(prefixes_R):
        n = len(prefix)
        tokens_RC[r, :n] = prefix
        tokens_RC[r, n : n + new_len_R[r]] = new_RC[r, : new_len_R[r]]
    return tokens_RC, prefix_len_R + new_len_R, prefix_len_R, gen


def sample_rollouts(
    graphdef,
    params,
    prompt_batch: dict[str, Any],
    *,
    tokenizer,
    cfg: RolloutConfig,
    eos_ids: Sequence[int],
    rng,
    pad_id: int,
    reward_funcs: Sequence[Callable],
    shardings=None,
    prefixes_R: Sequence[Sequence[int]] | None = None,
) -> Rollout:
    """Sample G completions per prompt, score them, and build the train batch.

    prefixes_R (Prefix-RFT): per rollout row, demonstration tokens the completion starts
    with (empty: a plain rollout). The policy continues after the prefix; the completion
    (prefix + continuation, up to `len(prefix) + max_new_tokens` tokens) is what rewards
    see, and the batch gets `prefix_lengths` [R] so the loss can give the prefix the SFT
    loss and the continuation the RL loss (`jaxpt.losses.grpo.prefix_rft_masks`).
    """
    G = cfg.num_generations
    t0 = time.perf_counter()
    if prefixes_R is None or not any(len(p) for p in prefixes_R):
        prefixes_R = None
        gen = generate(
            graphdef,
            params,
            prompt_batch["prompt_ids"],
            prompt_batch["prompt_mask"],
            sampler=cfg.sampler(),
            max_new_tokens=cfg.max_new_tokens,
            eos_ids=tuple(eos_ids),
            rng=rng,
            num_samples=G,
            pad_id=pad_id,
            bucket=False,
            shardings=shardings,
        )
        tokens_RC = np.asarray(gen.tokens)
        lengths_R = np.asarray(gen.lengths)
        prefix_len_R = np.zeros(len(lengths_R), np.int32)
    else:
        tokens_RC, lengths_R, prefix_len_R, gen = _generate_after_prefixes(
            graphdef,
            params,
            prompt_batch,
            prefixes_R,
            cfg=cfg,
            eos_ids=eos_ids,
            rng=rng,
            pad_id=pad_id,
            shardings=shardings,
        )
    truncated_R = np.asarray(gen.finish_reason) == FINISH_LENGTH
    rollout_time = time.perf_counter() - t0

    columns = dict(prompt_batch.get("columns", {}))
    prompts = columns.pop("prompt", [None] * len(prompt_batch["prompt_ids"]))
    texts = _decode(tokenizer, tokens_RC, lengths_R)
    conversational = bool(prompts) and isinstance(prompts[0], list)
    # TRL's convention: conversational prompts get message-list completions.
    completions = (
        [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    )
    rows = prompt_batch.get("rows")
    rewards_R, _, reward_metrics = compute_rewards(
        reward_funcs,
        cfg.reward_weights,
        _repeat(prompts, G),
        completions,
        [list(map(int, t[:n])) for t, n in zip(tokens_RC, lengths_R, strict=True)],
        {k: _repeat(v, G) for k, v in columns.items()},
        _repeat(rows, G) if rows is not None else None,
        timeout_s=cfg.reward_timeout_s,
        skip_nonfinite=cfg.skip_nonfinite_rewards,
    )
    advantages_R, adv_metrics = compute_advantages(
        rewards_R, G, scale_rewards=cfg.scale_rewards, estimator=cfg.advantage_estimator
    )

    steps = np.arange(tokens_RC.shape[1])
    completion_mask_RC = steps[None, :] < lengths_R[:, None]
    train_mask_RC = completion_mask_RC & ~(truncated_R[:, None] & cfg.mask_truncated_completions)
    batch = rollout_sequences(
        np.repeat(np.asarray(prompt_batch["prompt_ids"]), G, axis=0),
        np.repeat(np.asarray(prompt_batch["prompt_mask"]), G, axis=0),
        tokens_RC,
        completion_mask_RC,
        pad_id=pad_id,
    )
    batch["completion_mask"] = train_mask_RC.astype(np.float32)
    batch["advantages"] = np.asarray(advantages_R, np.float32)
    if prefixes_R is not None:
        batch["prefix_lengths"] = prefix_len_R

    terminated = lengths_R[~truncated_R]
    metrics = {
        **{k: float(v) for k, v in adv_metrics.items()},
        **{k: float(v) for k, v in reward_metrics.items()},
        "completions/mean_length": float(lengths_R.mean()),
        "completions/min_length": float(lengths_R.min()),
        "completions/max_length": float(lengths_R.max()),
        "completions/clipped_ratio": float(truncated_R.mean()),
        "completions/mean_terminated_length": float(terminated.mean()) if len(terminated) else 0.0,
        **(
            {
                "prefix/rows_frac": float(np.mean(prefix_len_R > 0)),
                "prefix/mean_length": float(prefix_len_R[prefix_len_R > 0].mean()),
            }
            if prefixes_R is not None
            else {}
        ),
        "time/rollout": rollout_time,
        "time/rewards": time.perf_counter() - t0 - rollout_time,
    }
    return Rollout(batch=batch, completions=completions, rewards_R=rewards_R, metrics=metrics)
