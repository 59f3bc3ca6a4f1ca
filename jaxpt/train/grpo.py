"""GRPO (and its loss family, with the SFT+RL hybrids) on the shared training spine.

Axis legend: B prompts per rollout, G = num_generations, R = B*G rollout rows, b rows per
optimizer step (`train.batch_size`, completions), P prompt length, C completion length.

One rollout samples `train.batch_size * steps_per_generation` completions (G per prompt)
with the jitted decode loop from the *current* policy, scores them and computes
advantages; then `num_iterations` (mu) passes over it in `steps_per_generation`
mini-batches, one optimizer step each (TRL's generation batch / mu semantics). The loop
(`jaxpt.train.loop.run`) sees an ordinary batch source: `GRPOSource.next(state)` returns
the next mini-batch and rolls out again when the current rollout is used up.

Log-probs the loss needs besides the current policy's are computed outside the gradient
with one jitted scoring pass: the old policy's at rollout time (only when a rollout is
reused, i.e. mu > 1 or several steps per generation; otherwise old = stop_gradient(new),
as in TRL) and the reference's when `beta > 0` (the frozen copy, or the LoRA base).

Hybrids (none of TRL, Tunix, MaxText has these as options):
- `sft_weight` > 0: adds `sft_weight * NLL` of the dataset's demonstrations for the same
  prompts (a `completion` column, or GSM8K's worked answers) to the RL loss, with a
  schedule (`sft_schedule`: constant, linear decay, ReFT-style warm-up then RL).
Prefix-RFT (demonstration prefixes inside rollouts) has its masks in
`jaxpt.losses.grpo.prefix_rft_masks` but is not wired into rollouts yet.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.config import RunConfig, register_section
from jaxpt.data import DataStats
from jaxpt.data.formats import records_from_rows
from jaxpt.data.gsm8k import ArithmeticConfig, convert_gsm8k, generate_arithmetic
from jaxpt.data.pipeline import prepare_prompts, prompt_batch
from jaxpt.losses.grpo import GRPOLossConfig, grpo_loss, sft_weight_schedule
from jaxpt.rewards.registry import get_reward_function
from jaxpt.sampling import Sampler, generate
from jaxpt.sharding import decode_sharding, replicated
from jaxpt.train.checkpoint import StopFlag
from jaxpt.train.common import (
    build_mesh,
    build_train_state,
    check_train_batch,
    load_model_bundle,
    read_data_records,
)
from jaxpt.train.logprobs import sequence_token_logprobs
from jaxpt.train.loop import LoopResult, Trainer, run
from jaxpt.train.registry import register_trainer
from jaxpt.train.rollout import RolloutConfig, completion_logprobs, sample_rollouts
from jaxpt.train.state import (
    batch_shardings,
    compile_step,
    make_optimizer,
    make_train_step,
    put_batch,
)


@register_section("grpo")
@dataclasses.dataclass(frozen=True)
class GRPOSection:
    """GRPO settings; names follow TRL's GRPOConfig where TRL has the option."""

    # Prompts: the run's data (`data.train`, GSM8K or prompt rows), or generated arithmetic
    # word problems (`task: arithmetic`, no download; `data.max_train_rows` /
    # `data.max_eval_rows` problems, disjoint train / held-out splits).
    task: Literal["data", "arithmetic"] = "data"
    instruction: str | None = None  # appended to each GSM8K / arithmetic question
    arithmetic_min_operands: int = 2
    arithmetic_max_operands: int = 2
    arithmetic_max_digits: int = 2
    arithmetic_ops: str = "+-"
    max_prompt_length: int = 256
    # Rollouts.
    num_generations: int = 4
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    reward_funcs: tuple[str, ...] = ("math",)  # built-in names or "package.module:function"
    reward_weights: tuple[float, ...] | None = None
    reward_timeout_s: float = 60.0
    scale_rewards: Literal["group", "batch", "none"] = "group"
    advantage_estimator: Literal["grpo", "rloo"] = "grpo"
    mask_truncated_completions: bool = False
    # Optimization over a rollout.
    num_iterations: int = 1  # mu: passes over each rollout
    steps_per_generation: int = 1  # optimizer steps (mini-batches) per pass
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"] = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # clip-higher (DAPO); None = epsilon
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence = GSPO
    beta: float = 0.0  # KL to the reference (k3); 0: no reference is kept
    cispo_epsilon_max: float = 5.0
    # SFT+RL hybrids.
    sft_weight: float = 0.0  # weight of the demonstration NLL (0: pure RL)
    sft_schedule: Literal["constant", "linear", "warmup_then_rl"] = "constant"
    sft_warmup_steps: int = 0  # warmup_then_rl: SFT only for these steps, then RL only
    sft_decay_steps: int = 0  # linear: sft_weight -> 0 over these steps
    max_demo_length: int = 256
    # Held-out evaluation (greedy): accuracy of the first reward function.
    eval_prompts: int = 64
    eval_batch_size: int = 32
    eval_max_completion_length: int | None = None  # default: max_completion_length

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(f"grpo.num_generations={self.num_generations}: must be >= 2")

    def rollout(self) -> RolloutConfig:
        return RolloutConfig(
            num_generations=self.num_generations, max_new_tokens=self.max_completion_length,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            reward_funcs=self.reward_funcs, reward_weights=self.reward_weights,
            reward_timeout_s=self.reward_timeout_s, scale_rewards=self.scale_rewards,
            advantage_estimator=self.advantage_estimator,
            mask_truncated_completions=self.mask_truncated_completions,
        )

    def loss(self) -> GRPOLossConfig:
        return GRPOLossConfig(
            loss_type=self.loss_type, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
            importance_sampling_level=self.importance_sampling_level, beta=self.beta,
            max_completion_length=self.max_completion_length,
            cispo_epsilon_max=self.cispo_epsilon_max,
        )

    def uses_demonstrations(self) -> bool:
        return self.sft_weight > 0


# -- prompts -------------------------------------------------------------------------------


def _prompt_rows(cfg: RunConfig, grpo: GRPOSection, which: str) -> list[dict]:
    """Prompt rows (`prompt` + `answer` + other columns; `completion` = demonstration)."""
    if grpo.task == "arithmetic":
        n = cfg.data.max_train_rows if which == "train" else cfg.data.max_eval_rows
        if not n:
            raise ValueError(f"{cfg.source}: grpo.task=arithmetic needs data.max_"
                             f"{'train' if which == 'train' else 'eval'}_rows")
        arith = ArithmeticConfig(
            min_operands=grpo.arithmetic_min_operands, max_operands=grpo.arithmetic_max_operands,
            max_digits=grpo.arithmetic_max_digits, ops=grpo.arithmetic_ops,
        )
        rows = generate_arithmetic(n, split="train" if which == "train" else "test",
                                   seed=cfg.train.seed, config=arith)
        records = records_from_rows(rows, source=f"arithmetic:{which}")
    else:
        # GSM8K rows are read raw: both the prompt and (for hybrids) the demonstration
        # come from them below.
        raw = cfg.replace(data=dataclasses.replace(cfg.data, format="auto"))
        records = read_data_records(raw, which)
    if grpo.task == "arithmetic" or cfg.data.format == "gsm8k":
        kw = {} if grpo.instruction is None else {"instruction": grpo.instruction}
        prompts = convert_gsm8k(records, mode="prompt", **kw)
        if grpo.uses_demonstrations():
            demos = convert_gsm8k(records, mode="sft", **kw)
            for p, d in zip(prompts, demos, strict=True):
                p.data["completion"] = d.data["completion"]
        return prompts
    return records


def _demo_text(completion: Any) -> str:
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")
    return str(completion)


# -- the batch source ----------------------------------------------------------------------


class GRPOSource:
    """Rollouts from the current policy, served as `steps_per_generation * num_iterations`
    optimizer mini-batches each. Checkpointed state: the prompt order and the rollout
    count; a resume restarts at the next rollout boundary (the partly used rollout is
    sampled again from the restored policy)."""

    def __init__(self, *, prompts, grpo: GRPOSection, rows_per_step: int, tokenizer,
                 eos_ids, pad_id, reward_funcs, graphdef, params_of_state, score_fn, seed,
                 shardings=None):
        self.prompts = prompts
        self.shardings = shardings  # the decode preset (`jaxpt.sharding.DecodeSharding`)
        self.grpo = grpo
        self.rollout_cfg = grpo.rollout()
        self.rows_per_step = rows_per_step
        self.prompts_per_rollout = rows_per_step * grpo.steps_per_generation // \
            grpo.num_generations
        self.tokenizer, self.eos_ids, self.pad_id = tokenizer, tuple(eos_ids), pad_id
        self.reward_funcs = reward_funcs
        self.graphdef, self.params_of_state, self.score_fn = graphdef, params_of_state, score_fn
        self.seed = seed
        self.rollouts = 0  # rollouts completed (also the prompt cursor)
        self.served = 0
        self.buffer: list[dict] = []
        self.metrics: dict[str, float] = {}

    # BatchSource protocol
    def get_state(self) -> dict:
        return {"rollouts": self.rollouts, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"checkpoint data state was written with train.seed="
                             f"{state.get('seed')}, this run has {self.seed}")
        self.rollouts, self.buffer, self.served = int(state["rollouts"]), [], 0

    def _prompt_indices(self, k: int) -> np.ndarray:
        """Prompts of rollout k: a fresh seeded permutation per epoch over the prompts."""
        n = len(self.prompts)
        start = k * self.prompts_per_rollout
        idx = []
        for i in range(start, start + self.prompts_per_rollout):
            epoch, pos = divmod(i, n)
            perm = np.random.RandomState([self.seed, epoch]).permutation(n)
            idx.append(perm[pos])
        return np.asarray(idx)

    def next(self, state) -> dict[str, Any]:
        if not self.buffer:
            self._rollout(state)
        batch = self.buffer.pop(0)
        batch["_metrics"] = dict(self.metrics) if self.served == 0 else {}
        self.served += 1
        return batch

    def _rollout(self, state) -> None:
        grpo = self.grpo
        chosen = [self.prompts[i] for i in self._prompt_indices(self.rollouts)]
        pb = prompt_batch(chosen, pad_id=self.pad_id, max_prompt_length=grpo.max_prompt_length)
        params = self.params_of_state(state)
        rng = jax.random.fold_in(jax.random.key(self.seed), self.rollouts)
        ro = sample_rollouts(
            self.graphdef, params, pb, tokenizer=self.tokenizer, cfg=self.rollout_cfg,
            eos_ids=self.eos_ids, rng=rng, pad_id=self.pad_id, reward_funcs=self.reward_funcs,
            shardings=self.shardings,
        )
        batch = ro.batch
        R = len(batch["advantages"])
        if grpo.uses_demonstrations():
            batch.update(self._demonstrations(chosen, pb))
        reuse = grpo.num_iterations > 1 or grpo.steps_per_generation > 1
        if reuse or grpo.beta > 0:
            scores = self.score_fn(state, batch, old=reuse, ref=grpo.beta > 0)
            batch.update(scores)
        order = np.random.RandomState([self.seed, self.rollouts, 1]).permutation(R)
        b = self.rows_per_step
        minis = []
        for s in range(grpo.steps_per_generation):
            rows = order[s * b:(s + 1) * b]
            minis.append({k: v[rows] for k, v in batch.items()})
        self.buffer = [dict(m) for _ in range(grpo.num_iterations) for m in minis]
        self.served = 0
        self.rollouts += 1
        self.metrics = {**ro.metrics, "rollout": float(self.rollouts)}

    def _demonstrations(self, chosen, pb) -> dict[str, np.ndarray]:
        """SFT rows for the demonstrations of this rollout's prompts (one per rollout row,
        so mini-batches split them with the rollout)."""
        G = self.grpo.num_generations
        tok = self.tokenizer
        T = self.grpo.max_demo_length
        rows = []
        for ex in chosen:
            demo = ex.columns.get("completion")
            ids = [] if demo is None else tok(_demo_text(demo), add_special_tokens=False)[
                "input_ids"]
            if tok.eos_token_id is not None:
                ids = ids + [tok.eos_token_id]
            rows.append(ids[:T])
        demo_ids = np.full((len(chosen), T), self.pad_id, np.int32)
        demo_mask = np.zeros((len(chosen), T), np.float32)
        for i, ids in enumerate(rows):
            demo_ids[i, :len(ids)] = ids
            demo_mask[i, :len(ids)] = 1.0
        # Prompt + demonstration as one row, laid out like a rollout row.
        from jaxpt.train.rollout import rollout_sequences

        seq = rollout_sequences(pb["prompt_ids"], pb["prompt_mask"], demo_ids, demo_mask,
                                pad_id=self.pad_id)
        out = {f"demo_{k}": np.repeat(v, G, axis=0) for k, v in seq.items()}
        # Each prompt's demonstration appears G times (once per rollout row): weight 1/G.
        out["demo_completion_mask"] = out["demo_completion_mask"] / G
        return out


# -- loss, scoring, evaluation --------------------------------------------------------------


def make_grpo_loss_fn(graphdef, grpo: GRPOSection, *, impl: str, with_entropy: bool):
    loss_cfg = grpo.loss()
    T = grpo.temperature if grpo.temperature > 0 else 1.0

    def loss_fn(params, mb, rng, stats):
        model = nnx.merge(graphdef, params)
        C = mb["completion_mask"].shape[1]
        lp_RS, ent_RS, _ = sequence_token_logprobs(
            model, mb, impl=impl, with_entropy=with_entropy, temperature=T)
        lp_RC = completion_logprobs(lp_RS, C)
        ent_RC = None if ent_RS is None else completion_logprobs(ent_RS, C)
        share = mb["advantages"].shape[0] / stats["rows"]
        rl_weight = stats.get("rl_weight", 1.0)
        loss, metrics = grpo_loss(
            loss_cfg, lp_RC, mb.get("old_logprobs"), mb["advantages"], mb["completion_mask"],
            ref_logprobs_BT=mb.get("ref_logprobs"), num_items_in_batch=stats["num_items"],
            entropy_BT=ent_RC, rl_weight=rl_weight,
        )
        if loss_cfg.loss_type not in ("dapo", "cispo"):
            loss = loss * share  # per-micro-batch means: average over micro-batches
        metrics = {k: v * share for k, v in metrics.items()}
        if "demo_input_ids" in mb:
            demo = {k[5:]: v for k, v in mb.items() if k.startswith("demo_")}
            Td = demo["completion_mask"].shape[1]
            lp_demo, _, _ = sequence_token_logprobs(model, demo, impl=impl)
            lp_demo = completion_logprobs(lp_demo, Td)
            nll = -jnp.sum(lp_demo * demo["completion_mask"]) / jnp.maximum(
                stats["demo_tokens"], 1e-6)
            loss = loss + stats["sft_weight"] * nll
            metrics["sft_loss"] = nll
            metrics["sft_weight"] = stats["sft_weight"] * share
        return loss, metrics

    return loss_fn


def make_batch_stats(grpo: GRPOSection):
    def stats(state, batch):
        out = {
            "num_items": jnp.sum(batch["completion_mask"] > 0, dtype=jnp.float32),
            "rows": batch["advantages"].shape[0],
        }
        if "demo_input_ids" in batch:
            kind = grpo.sft_schedule
            w = sft_weight_schedule(
                state.step, kind=kind, initial_weight=grpo.sft_weight, final_weight=0.0,
                decay_steps=max(grpo.sft_decay_steps, 1), warmup_steps=grpo.sft_warmup_steps,
            ) if kind != "constant" else jnp.asarray(grpo.sft_weight, jnp.float32)
            out["sft_weight"] = w
            out["demo_tokens"] = jnp.sum(batch["demo_completion_mask"])
            if kind == "warmup_then_rl":
                out["rl_weight"] = (state.step >= grpo.sft_warmup_steps).astype(jnp.float32)
        return out

    return stats


def make_score_fn(graphdef, params_fn, *, impl: str, temperature: float, batch_sh, mesh,
                  shardings, rows_per_call: int):
    """(state, host batch, old, ref) -> {"old_logprobs", "ref_logprobs"} [R, C] numpy."""

    def score(params, batch):
        model = nnx.merge(graphdef, params)
        C = batch["completion_mask"].shape[1]
        lp, _, _ = sequence_token_logprobs(model, batch, impl=impl, temperature=temperature)
        return completion_logprobs(lp, C)

    keys = ("input_ids", "targets", "positions", "segment_ids", "completion_mask")
    jitted = jax.jit(score, out_shardings=replicated(mesh))
    current = jax.jit(lambda s: params_fn(s.params, s.frozen, None))

    def score_fn(state, batch, *, old: bool, ref: bool) -> dict[str, np.ndarray]:
        out = {}
        targets = ([("old_logprobs", current(state))] if old else []) + (
            [("ref_logprobs", state.frozen)] if ref else [])
        R = len(batch["advantages"])
        for name, params in targets:
            parts = []
            for s in range(0, R, rows_per_call):
                sub = {k: batch[k][s:s + rows_per_call] for k in keys}
                parts.append(np.asarray(jitted(params, put_batch(sub, {k: batch_sh[k]
                                                                     for k in keys}))))
            out[name] = np.concatenate(parts).astype(np.float32)
        return out

    return score_fn


def make_eval_fn(graphdef, params_of_state, prompts, grpo: GRPOSection, *, tokenizer, eos_ids,
                 pad_id, reward_funcs):
    """Greedy held-out accuracy: `eval_accuracy` (first reward == 1), `eval_reward`
    (weighted reward, mean) and `eval_mean_length`."""
    from jaxpt.rewards.registry import compute_rewards

    max_new = grpo.eval_max_completion_length or grpo.max_completion_length
    eval_prompts = prompts[:grpo.eval_prompts]

    def eval_fn(state) -> dict[str, float]:
        params = params_of_state(state)
        correct, rewards, lengths = [], [], []
        for s in range(0, len(eval_prompts), grpo.eval_batch_size):
            chunk = eval_prompts[s:s + grpo.eval_batch_size]
            pb = prompt_batch(chunk, pad_id=pad_id, max_prompt_length=grpo.max_prompt_length)
            res = generate(graphdef, params, pb["prompt_ids"], pb["prompt_mask"],
                           sampler=Sampler.greedy(), max_new_tokens=max_new,
                           eos_ids=tuple(eos_ids), rng=0, pad_id=pad_id)
            toks, lens = np.asarray(res.tokens), np.asarray(res.lengths)
            texts = tokenizer.batch_decode([t[:n] for t, n in zip(toks, lens, strict=True)],
                                           skip_special_tokens=True)
            cols = dict(pb["columns"])
            prompts_col = cols.pop("prompt", [None] * len(chunk))
            comps = ([[{"role": "assistant", "content": t}] for t in texts]
                     if prompts_col and isinstance(prompts_col[0], list) else texts)
            total, per_fn, _ = compute_rewards(
                reward_funcs, grpo.reward_weights, prompts_col, comps,
                [list(t[:n]) for t, n in zip(toks, lens, strict=True)], cols, pb["rows"],
                timeout_s=grpo.reward_timeout_s)
            first = next(iter(per_fn.values()))
            correct.extend((np.nan_to_num(first) >= 1.0).tolist())
            rewards.extend(np.nan_to_num(total).tolist())
            lengths.extend(lens.tolist())
        return {"eval_accuracy": float(np.mean(correct)), "eval_reward": float(np.mean(rewards)),
                "eval_mean_length": float(np.mean(lengths))}

    return eval_fn


# -- the trainer ---------------------------------------------------------------------------


def build_grpo_trainer(cfg: RunConfig, *, mesh=None) -> Trainer:
    grpo: GRPOSection = cfg.section("grpo")
    t = cfg.train
    G = grpo.num_generations
    if t.batch_size % G:
        raise ValueError(f"{cfg.source}: train.batch_size={t.batch_size} (completions per step)"
                         f" must be a multiple of grpo.num_generations={G}")
    if (t.batch_size * grpo.steps_per_generation) % G:
        raise ValueError(f"{cfg.source}: a rollout of train.batch_size x steps_per_generation "
                         f"completions must hold whole groups of {G}")
    if jax.process_count() > 1:
        raise NotImplementedError("multi-process GRPO rollouts are not supported yet")
    mesh = mesh or build_mesh(cfg)
    check_train_batch(cfg, mesh)
    bundle = load_model_bundle(cfg, mesh)
    tok = bundle.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos_ids = set(bundle.resolved.generation_eos_ids())
    if tok.eos_token_id is not None:
        eos_ids.add(tok.eos_token_id)
    reward_funcs = [get_reward_function(f) for f in grpo.reward_funcs]

    def prompts(which):
        stats = DataStats()
        rows = _prompt_rows(cfg, grpo, which)
        ex, stats = prepare_prompts(rows, tok, max_prompt_length=grpo.max_prompt_length,
                                    skip_invalid=cfg.data.skip_invalid, stats=stats)
        if not ex:
            raise ValueError(f"{cfg.source}: no usable {which} prompts ({stats})")
        return ex

    train_prompts = prompts("train")
    total = t.max_steps
    if total is None:
        steps_per_epoch = len(train_prompts) * G / t.batch_size
        total = max(1, math.ceil(t.num_epochs * steps_per_epoch * grpo.num_iterations))
    tx, schedule = make_optimizer(cfg.optim, total)
    ts = build_train_state(bundle, cfg, tx, reference=grpo.beta > 0)
    loss_fn = make_grpo_loss_fn(bundle.graphdef, grpo, impl=t.logprob_impl,
                                with_entropy=t.with_entropy)
    step = make_train_step(loss_fn, tx, schedule, grad_accum=t.grad_accum,
                           batch_stats_fn=make_batch_stats(grpo), params_fn=ts.params_fn)
    keys = {"input_ids": 2, "targets": 2, "positions": 2, "segment_ids": 2,
            "completion_mask": 2, "advantages": 1}
    reuse = grpo.num_iterations > 1 or grpo.steps_per_generation > 1
    if reuse:
        keys["old_logprobs"] = 2
    if grpo.beta > 0:
        keys["ref_logprobs"] = 2
    if grpo.uses_demonstrations():
        keys.update({f"demo_{k}": 2 for k in ("input_ids", "targets", "positions",
                                                "segment_ids", "completion_mask")})
    batch_sh = batch_shardings(keys, mesh)
    step_fn = compile_step(step, ts.shardings, batch_sh, mesh)
    # Rollouts decode under the decode preset: the policy is resharded to tensor-only
    # weights once per rollout, and the decoded rows are split over data x fsdp.
    decode_sh = decode_sharding(mesh)
    params_of_state = jax.jit(lambda s: ts.params_fn(s.params, s.frozen, None),
                              out_shardings=decode_sh.params(bundle.params))
    score_fn = make_score_fn(bundle.graphdef, ts.params_fn, impl=t.logprob_impl,
                             temperature=grpo.temperature if grpo.temperature > 0 else 1.0,
                             batch_sh=batch_sh, mesh=mesh, shardings=ts.shardings,
                             rows_per_call=t.batch_size)
    source = GRPOSource(
        prompts=train_prompts, grpo=grpo, rows_per_step=t.batch_size, tokenizer=tok,
        eos_ids=sorted(eos_ids), pad_id=pad_id, reward_funcs=reward_funcs,
        graphdef=bundle.graphdef, params_of_state=params_of_state, score_fn=score_fn,
        seed=t.seed, shardings=decode_sh,
    )
    eval_fn = None
    if grpo.task == "arithmetic" or cfg.data.eval is not None:
        eval_fn = make_eval_fn(bundle.graphdef, params_of_state, prompts("eval"), grpo,
                               tokenizer=tok, eos_ids=sorted(eos_ids), pad_id=pad_id,
                               reward_funcs=reward_funcs)

    def host_batch(b):
        return put_batch({k: v for k, v in b.items() if k in keys}, batch_sh)

    return Trainer(
        cfg=cfg, mesh=mesh, state=ts.state, step_fn=step_fn, source=source,
        put_batch=host_batch, total_steps=total, eval_fn=eval_fn,
        tokens_fn=lambda b: int(np.sum(b["segment_ids"] > 0)), num_params=bundle.num_params,
        extras={"bundle": bundle, "trainable": ts, "tx": tx},
    )


@register_trainer("grpo")
def train_grpo(
    cfg: RunConfig,
    *,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
    stop: StopFlag | None = None,
) -> LoopResult:
    trainer = build_grpo_trainer(cfg)
    result = run(trainer, callbacks=callbacks, stop=stop)
    from jaxpt.train.report import print_run_summary

    print_run_summary(cfg.out_dir, curve_key="reward", eval_key="eval_accuracy")
    return result
