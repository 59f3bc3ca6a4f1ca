"""Rollout rows as typed pytrees, in two layouts, and the completion tokens' log-probs.

Axis legend: B prompts (groups), G completions per prompt, R = B*G rollout rows, P prompt
length (left padded), C completion length (right padded), S = P + C.

Flat layout (:class:`TokenRows`, one row per completion): ``[pad.. prompt | completion
..pad]``. Because prompts are left padded, the last prompt token always sits at P-1, so the
log-prob of completion token j is read from sequence position P-1+j for every row:
:func:`completion_logprobs` slices ``[:, P-1 : P-1+C]`` and no per-row gather is needed.

Shared-prompt layout (:class:`GroupRows`, one row per group): the G rows of a group repeat
one prompt, so they are packed as ONE row ``[prompt | completion 0 | ... | completion
G-1]`` (length P + G*C) in which completion i is segment i+2 and the prompt's keys are
flagged shared (``Decoder(shared_BT=...)``): each completion sees the prompt and itself, as
in its own row, while the prompt goes through the decoder once instead of G times.
Attention runs over the prompt and each completion's own block only
(``Decoder(prefix_blocks=(P, C))``), so the layout never costs more than G separate rows.
Completion token j of completion i is read from the hidden state at P-1 (j = 0: the shared
last prompt token) or P + i*C + j-1.

A rollout batch is a frozen dataclass with a ``rows`` field (either layout) and per-row
fields ([R, ...] beside flat rows, [B, G, ...] beside group rows; ``None`` where unused):
:func:`to_shared_prompt` converts a flat one, :func:`per_row_view` gives any one's per-row
fields as [R, ...].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt.engine.logprobs import hidden_token_logprobs
from jaxpt.sharding import batch_divisor


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenRows:
    """Flat rollout rows: the batch contract of ``jaxpt.data.packing`` [R, S] plus the
    completion mask [R, C] (1 for the completion tokens that get a loss)."""

    input_ids: Any
    targets: Any
    positions: Any
    segment_ids: Any
    completion_mask: Any

    @property
    def completion_mask_RC(self):
        return self.completion_mask

    @property
    def widths(self) -> tuple[int, int]:
        """(P, C)."""
        C = self.completion_mask.shape[1]
        return self.input_ids.shape[1] - C, C

    def padded(self, P: int, C: int, pad_id: int) -> TokenRows:
        """The rows re-padded to prompt width P (left) and completion width C (right): the
        layout survives (the last prompt token stays at P-1)."""
        p0, c0 = self.widths
        pad = lambda x, fill: np.pad(x, ((0, 0), (P - p0, C - c0)), constant_values=fill)  # noqa: E731
        return TokenRows(
            input_ids=pad(self.input_ids, pad_id), targets=pad(self.targets, pad_id),
            positions=pad(self.positions, 0), segment_ids=pad(self.segment_ids, 0),
            completion_mask=np.pad(self.completion_mask, ((0, 0), (0, C - c0))))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupRows:
    """Shared-prompt rows (module doc): ``input_ids``, ``positions``, ``segment_ids``,
    ``shared`` [B, P + G*C]; ``completion_ids``, ``completion_mask`` [B, G, C]."""

    input_ids: Any
    positions: Any
    segment_ids: Any
    shared: Any
    completion_ids: Any
    completion_mask: Any

    @property
    def completion_mask_RC(self):
        B, G, C = self.completion_mask.shape
        return self.completion_mask.reshape(B * G, C)


def rollout_tokens(batch) -> int:
    """Non-padding tokens of a served rollout batch's rows on this process (an on-policy
    algorithm's ``Trainer.tokens_fn``; the loop sums them over processes)."""
    return int(np.sum(batch.rows.segment_ids > 0))


def rollout_sequences(
    prompt_ids_RP, prompt_mask_RP, completion_ids_RC, completion_mask_RC, *, pad_id: int = 0
) -> TokenRows:
    """Flat rollout rows from left-padded prompts and right-padded completions."""
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
    return TokenRows(input_ids=input_ids_RS, targets=targets_RS, positions=positions_RS,
                     segment_ids=real_RS.astype(np.int32),
                     completion_mask=completion_mask_RC.astype(np.float32))


def group_rows(rows: TokenRows, G: int) -> GroupRows:
    """Flat rows (rows r*G .. r*G+G-1 share prompt r) in the shared-prompt layout."""
    ids_RS = np.asarray(rows.input_ids)
    R, S = ids_RS.shape
    P, C = rows.widths
    if R % G:
        raise ValueError(f"group_rows: {R} rows do not form groups of {G}")
    B = R // G
    seg_RS, pos_RS = np.asarray(rows.segment_ids), np.asarray(rows.positions)
    prompt_BGP, prompt_seg_BGP = ids_RS[:, :P].reshape(B, G, P), seg_RS[:, :P].reshape(B, G, P)
    # Same padding, and the same token wherever the prompt is real.
    same_BGP = (prompt_seg_BGP == prompt_seg_BGP[:, :1]) & (
        (prompt_BGP == prompt_BGP[:, :1]) | (prompt_seg_BGP == 0))
    bad = np.flatnonzero(~same_BGP.all(axis=(1, 2)))
    if bad.size:
        g = int(bad[0])
        raise ValueError(f"group_rows: rows {g * G}..{g * G + G - 1} do not share one "
                         "prompt (rollout rows must come in groups of num_generations)")
    mask_BGC = np.asarray(rows.completion_mask).reshape(B, G, C)
    completion_BGC = ids_RS[:, P:].reshape(B, G, C)
    # Which completion tokens are real comes from the rows' segment ids, not from the loss
    # mask: tokens that do not train (an environment's turns, truncated rows) are still
    # attended by the tokens after them.
    real_BGC = seg_RS[:, P:].reshape(B, G, C) > 0
    seg_BGC = np.where(real_BGC, np.arange(2, G + 2, dtype=np.int32)[None, :, None], 0)
    prompt_real_BP = prompt_seg_BGP[:, 0] > 0
    return GroupRows(
        input_ids=np.concatenate(
            [prompt_BGP[:, 0], completion_BGC.reshape(B, G * C)], axis=1).astype(np.int32),
        positions=np.concatenate(
            [pos_RS[:, :P].reshape(B, G, P)[:, 0], pos_RS[:, P:].reshape(B, G * C)], axis=1
        ).astype(np.int32),
        segment_ids=np.concatenate(
            [prompt_real_BP.astype(np.int32), seg_BGC.reshape(B, G * C)], axis=1
        ).astype(np.int32),
        shared=np.concatenate(
            [prompt_real_BP, np.zeros((B, G * C), bool)], axis=1).astype(np.int32),
        completion_ids=completion_BGC.astype(np.int32),
        completion_mask=mask_BGC,
    )


def to_shared_prompt(batch, G: int):
    """A flat rollout batch (host, numpy) in the shared-prompt layout: ``rows`` grouped,
    every other field [R, ...] -> [B, G, ...]."""
    rest = dataclasses.replace(batch, rows=None)
    rest = jax.tree.map(lambda v: v.reshape(-1, G, *v.shape[1:]), rest)
    return dataclasses.replace(rest, rows=group_rows(batch.rows, G))


def per_row_view(batch):
    """A rollout batch's per-row fields as [R, ...] in either layout (``rows`` unchanged)."""
    if isinstance(batch.rows, TokenRows):
        return batch
    rest = dataclasses.replace(batch, rows=None)
    rest = jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), rest)
    return dataclasses.replace(rest, rows=batch.rows)


def grouped_ndims(batch_ndims):
    """The leaf ndims of a flat rollout batch's tree (ints) -> those of its shared-prompt
    form (for ``engine.state.batch_shardings``)."""
    rest = jax.tree.map(lambda n: n + 1, dataclasses.replace(batch_ndims, rows=None))
    return dataclasses.replace(rest, rows=GroupRows(2, 2, 2, 2, 3, 3))


def completion_logprobs(logprobs_RS, completion_len: int):
    """Log-probs of the completion tokens, [R, C], from next-token log-probs [R, S]."""
    P = logprobs_RS.shape[1] - completion_len
    return logprobs_RS[:, P - 1 : P - 1 + completion_len]


def completion_token_logprobs(
    model: Any, rows: TokenRows | GroupRows, *, impl: str = "auto", temperature: float = 1.0,
    with_entropy: bool = False,
):
    """(logprobs_RC, entropy_RC | None) of the real completion tokens (0 at padding), rows
    in the flat order (row g*G + i = completion i of group g) in either layout. The LM head
    runs only at the positions that predict a real completion token (TRL's
    ``logits_to_keep``, plus the padding of short completions)."""
    mask_RC = rows.completion_mask_RC > 0
    if isinstance(rows, GroupRows):
        B, G, C = rows.completion_ids.shape
        P = rows.input_ids.shape[1] - G * C
        hidden_BTE, _ = model(rows.input_ids, rows.positions, rows.segment_ids,
                              shared_BT=rows.shared > 0, prefix_blocks=(P, C))
        i_G1, j_1C = jnp.arange(G)[:, None], jnp.arange(C)[None, :]
        source_GC = jnp.where(j_1C == 0, P - 1, P + i_G1 * C + j_1C - 1)
        hidden_RCE = hidden_BTE[:, source_GC.reshape(-1)].reshape(B * G, C, -1)
        lp_RC, ent_RC, _ = hidden_token_logprobs(
            hidden_RCE, model.lm_head, rows.completion_ids.reshape(B * G, C), impl=impl,
            temperature=temperature, with_entropy=with_entropy, valid_BT=mask_RC)
        return lp_RC, ent_RC
    C = mask_RC.shape[1]
    S = rows.input_ids.shape[1]
    hidden_BTE, _ = model(rows.input_ids, rows.positions, rows.segment_ids)
    # Position P-1+j (P = S-C) predicts completion token j.
    lp_RS, ent_RS, _ = hidden_token_logprobs(
        hidden_BTE, model.lm_head, rows.targets, impl=impl, temperature=temperature,
        with_entropy=with_entropy, valid_BT=jnp.pad(mask_RC, ((0, 0), (S - C - 1, 1))))
    ent_RC = None if ent_RS is None else completion_logprobs(ent_RS, C)
    return completion_logprobs(lp_RS, C), ent_RC


def use_shared_prompt(mode: str, *, group_size: int, batch_size: int, grad_accum: int, mesh,
                      where: str) -> bool:
    """Whether the train step takes the shared-prompt layout: ``mode`` "never"; "auto"
    where whole groups fit every micro-batch and batch shard; "always" raises (naming
    ``where``) where they do not."""
    if mode == "never":
        return False
    G, groups, problem = group_size, batch_size // group_size, None
    if batch_size % G:
        problem = f"train.batch_size={batch_size} is not a multiple of num_generations={G}"
    elif groups % grad_accum:
        problem = f"its {groups} groups do not split into train.grad_accum={grad_accum}"
    elif groups % batch_divisor(mesh):
        problem = f"its {groups} groups do not split over the {batch_divisor(mesh)} batch shards"
    if problem is not None:
        if mode == "always":
            raise ValueError(f"{where}: grpo.share_prompt=always packs each group of {G} "
                             f"completions into one row, but {problem}")
        return False
    return True
