"""Multi-turn rollouts on the host, token in / token out, with any sampler.

``run_episodes(make_env, rows, generate, tokenizer)`` runs one environment per row: it
renders the environment's opening messages into prompt ids once, then alternates

    generate(list of token-id prompts) -> completions     # the model's turn, every active row
    env.step(messages, completion text) -> StepResult      # tool results, feedback, or done

and appends the environment's turns as *new tokens only* (:meth:`ToolChat.continuation_text`
rendered, then tokenized on its own), never re-tokenizing the history. So a trajectory's
tokens are exactly the sampled ones plus the environment's, and its loss mask is 1 on the
sampled tokens and 0 on every token the environment or the template added (tool outputs,
feedback turns, turn ends, the next generation prompt), as verl's agent loop and TRL's tool
rollouts mask them. Sampling log-probs, when the sampler returns them, are kept per token
(0 where the mask is 0).

``generate`` is any callable from a list of prompt id lists to one completion per prompt:
a list of ids, or an object / dict with ``token_ids`` (and optionally ``logprobs``); the
driver then re-submits each row's full sequence every turn. A ``generate`` with a
``resume`` method (a :class:`jaxpt.sampling.session.DecodeSession`, e.g. from
:func:`session_generate`) keeps each row's KV cache on the device instead: turn 1 is
``generate.start(prompts)``, every later turn ``generate.resume(rows, continuations)``
feeds only the environment's new tokens. Trajectories, masks and continuation ids are the
same either way; the session's own ``max_total_tokens`` also bounds the run's (a turn the
session cuts at that limit ends the trajectory with ``finish="length"``).

A turn has ended when its last token is a stop token (``stop_token_ids``, by default the
sampler's: the EOS and the template's end-of-turn tokens). Limits: ``max_turns`` model
turns; ``max_total_tokens`` for prompt + all turns (the environment's next turn that would
pass it is not appended and the trajectory ends, ``finish="length"``; the sampler's own
``max_new_tokens`` bounds each turn). A turn that did not end with a stop token (cut by the
sampler's length limit) ends the trajectory (``finish="truncated"``) after the environment
has seen it.

Metrics (:func:`multiturn_metrics`) use TRL's names where it has them:
``tools/call_frequency`` (tool calls per trajectory), ``tools/failure_frequency`` (failed
calls / calls), plus ``turns/mean``, ``turns/max`` and ``tools/<name>/call_frequency``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxpt.data.tokenize import encode
from jaxpt.rl.environments import Environment
from jaxpt.tools.parsing import ToolChat


@dataclasses.dataclass
class Trajectory:
    """One row's conversation, as tokens the trainer can use directly."""

    row: Mapping[str, Any]
    messages: list[dict]  # environment form: reset messages, then assistant / env turns
    prompt_ids: list[int]
    prompt_messages: int = 0  # how many of `messages` the environment opened with
    completion_ids: list[int] = dataclasses.field(default_factory=list)  # all turns after it
    loss_mask: list[int] = dataclasses.field(default_factory=list)  # 1 = sampled by the model
    logprobs: list[float] = dataclasses.field(default_factory=list)
    turns: int = 0
    tool_calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    tool_failures: int = 0
    reward_parts: dict[str, float] = dataclasses.field(default_factory=dict)
    info: dict[str, float] = dataclasses.field(default_factory=dict)
    finish: str = ""  # done | max_turns | length | truncated
    final_completion: str = ""  # the last model turn: what reward functions judge

    @property
    def num_tool_calls(self) -> int:
        return sum(self.tool_calls.values())


def _step(args: tuple[Environment, list[dict], str]) -> Any:
    env, messages, text = args
    return env.step(messages, text)


def _map_in_threads(fn: Callable, items: list, *, workers: int) -> list:
    """``[fn(x) for x in items]``, in ``workers`` threads when that is more than one."""
    if workers > 1 and len(items) > 1:
        with concurrent.futures.ThreadPoolExecutor(min(workers, len(items))) as pool:
            return list(pool.map(fn, items))
    return [fn(x) for x in items]


def _completion_parts(out: Any) -> tuple[list[int], list[float] | None]:
    if isinstance(out, Mapping):
        ids, lps = out["token_ids"], out.get("logprobs")
    elif hasattr(out, "token_ids"):
        ids, lps = out.token_ids, getattr(out, "logprobs", None)
    else:
        ids, lps = out, None
    ids = [int(t) for t in ids]
    if lps is not None:
        lps = [float(x) for x in lps]
        if len(lps) != len(ids):
            raise ValueError(f"generate returned {len(lps)} log-probs for {len(ids)} tokens")
    return ids, lps


def run_episodes(
    make_env: Callable[[], Environment],
    rows: Sequence[Mapping[str, Any]],
    generate: Callable[[list[list[int]]], Sequence[Any]],
    tokenizer: Any,
    *,
    max_turns: int = 4,
    max_total_tokens: int = 4096,
    stop_token_ids: Sequence[int] | None = None,
    chat_template_kwargs: dict | None = None,
    step_workers: int = 1,
    map_steps: Callable[[Callable, list, list[int], Callable], list] | None = None,
) -> list[Trajectory]:
    """Run one fresh environment per row to the end (see the module docstring).

    ``step_workers`` > 1 runs the rows' ``env.step`` calls of a turn in that many threads
    (tools such as the sandbox spend their time in another process); results are applied
    in row order either way, so trajectories do not depend on it. ``map_steps(fn, calls,
    rows, local_map)`` replaces how a turn's calls run, e.g. spread over processes
    (``jaxpt.rl.processes.map_owned``: each row's environment steps on one process, every
    process gets every result); it must return ``fn`` of every call, in order."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if stop_token_ids is None:
        from jaxpt.sampling.text import default_stop_ids

        stop_token_ids = default_stop_ids(tokenizer)
    stops = {int(t) for t in stop_token_ids}
    session = generate if hasattr(generate, "resume") else None
    if session is not None:
        max_total_tokens = min(max_total_tokens, session.max_total_tokens)
    envs: list[Environment] = []
    chats, histories, trajs = [], [], []
    for i, row in enumerate(rows):
        env = make_env()
        messages = env.reset(row)
        chat = ToolChat(tokenizer, list(getattr(env, "tool_schemas", ()) or ()),
                        chat_template_kwargs)
        history = chat.prompt_messages(messages)
        prompt_ids = encode(tokenizer, chat.render(history, add_generation_prompt=True),
                            add_special_tokens=False)
        if len(prompt_ids) >= max_total_tokens:
            raise ValueError(f"row {i}: the prompt has {len(prompt_ids)} tokens, not fewer "
                             f"than max_total_tokens={max_total_tokens}")
        envs.append(env)
        chats.append(chat)
        histories.append(history)
        trajs.append(Trajectory(row=row, messages=list(messages), prompt_ids=prompt_ids,
                                prompt_messages=len(messages)))

    active = list(range(len(trajs)))
    conts: list[list[int]] = [[] for _ in trajs]  # each row's last continuation
    while active:
        if session is None:
            outs = generate([trajs[i].prompt_ids + trajs[i].completion_ids for i in active])
        elif all(t.turns == 0 for t in trajs):  # turn 1: open the rows
            outs = session.start([t.prompt_ids for t in trajs])
        else:
            outs = session.resume(active, [conts[i] for i in active])
        if len(outs) != len(active):
            raise ValueError(f"generate returned {len(outs)} completions for {len(active)} "
                             "prompts")
        parts = [_completion_parts(out) for out in outs]
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in parts]
        step_args = [(envs[i], list(trajs[i].messages), text) for i, text in zip(active, texts,
                                                                                 strict=True)]
        local_map = functools.partial(_map_in_threads, workers=step_workers)
        if map_steps is None:
            results = local_map(_step, step_args)
        else:
            results = map_steps(_step, step_args, list(active), local_map)
        still = []
        for i, (ids, lps), text, result, out in zip(active, parts, texts, results, outs,
                                                     strict=True):
            t, chat = trajs[i], chats[i]
            t.completion_ids += ids
            t.loss_mask += [1] * len(ids)
            t.logprobs += lps if lps is not None else [0.0] * len(ids)
            t.turns += 1
            t.final_completion = text
            ended = bool(ids) and ids[-1] in stops
            t.tool_calls.update(result.tool_calls)
            t.tool_failures += result.tool_failures
            for k, v in result.reward_parts.items():
                t.reward_parts[k] = t.reward_parts.get(k, 0.0) + float(v)
            t.info.update(result.info)
            assistant = {"role": "assistant", "content": text}
            t.messages.append(assistant)
            if result.done:
                t.finish = "done"
                continue
            if not ended:  # cut by the sampler's turn limit, or by the session's capacity
                capped = isinstance(out, Mapping) and out.get("finish") == "capacity"
                t.finish = "length" if capped else "truncated"
                continue
            if t.turns >= max_turns:
                t.finish = "max_turns"
                continue
            new_msgs = chat.template_messages(result.messages)
            templated_assistant = chat.assistant_message(text)
            stop_text = tokenizer.convert_ids_to_tokens(ids[-1])
            cont = encode(tokenizer, chat.continuation_text(
                histories[i], templated_assistant, new_msgs, stop_text=stop_text),
                add_special_tokens=False)
            if len(t.prompt_ids) + len(t.completion_ids) + len(cont) >= max_total_tokens:
                t.finish = "length"  # no room for the next turn
                continue
            conts[i] = cont
            t.completion_ids += cont
            t.loss_mask += [0] * len(cont)
            t.logprobs += [0.0] * len(cont)
            t.messages += [dict(m) for m in result.messages]
            histories[i] = [*histories[i], templated_assistant, *new_msgs]
            still.append(i)
        active = still
    if session is not None:
        session.close()
    return trajs


def sampling_generate(graphdef, params, tokenizer, *, sampler, max_new_tokens: int,
                      seed: int = 0, batch_size: int | None = None, shardings=None,
                      eos_ids: Sequence[int] | None = None
                      ) -> Callable[[list[list[int]]], list[Any]]:
    """A `generate` for :func:`run_episodes` from jaxpt's sampler
    (:func:`jaxpt.sampling.text.sample_completions`, one sample per prompt, the tokenizer's
    stop tokens unless ``eos_ids``). Each call draws from its own seed (``seed``,
    ``seed + 1``, ...), so the turns of a run are independent draws and the run is
    reproducible. It re-prefills every row's whole history each turn; see
    :func:`session_generate` for the KV-cache-resuming form."""
    from jaxpt.sampling.text import sample_completions, stop_and_pad_ids

    eos_ids, pad_id = stop_and_pad_ids(tokenizer, eos_ids, None)
    calls = [0]

    def generate(prompts: list[list[int]]) -> list[Any]:
        _, batches = sample_completions(
            graphdef, params, tokenizer, prompts, 1, sampler=sampler,
            max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
            seed=seed + calls[0], batch_size=batch_size, shardings=shardings)
        calls[0] += 1
        out: list[Any] = [None] * len(prompts)
        for batch in batches:
            for s in batch:
                out[s.index] = s.completion
        return out

    return generate


def session_generate(graphdef, params, tokenizer, *, sampler, max_new_tokens: int,
                     max_total_tokens: int, seed: int = 0, shardings=None,
                     eos_ids: Sequence[int] | None = None, layer_loop: str = "auto"):
    """A `generate` for :func:`run_episodes` that keeps each row's KV cache between turns
    (:class:`jaxpt.sampling.session.DecodeSession`: only the environment's new tokens are
    fed each turn). The tokenizer's stop tokens unless ``eos_ids``; ``max_total_tokens``
    per trajectory sizes the cache (and bounds the run). Token t of row r's k-th turn is
    drawn from (seed, r, k, t), so a row's samples do not depend on the other rows; they
    differ from :func:`sampling_generate`'s draws (greedy tokens are the same)."""
    from jaxpt.sampling.session import DecodeSession
    from jaxpt.sampling.text import stop_and_pad_ids

    eos, pad_id = stop_and_pad_ids(tokenizer, eos_ids, None)
    return DecodeSession(graphdef, params, sampler=sampler, max_new_tokens=max_new_tokens,
                         max_total_tokens=max_total_tokens, eos_ids=eos, pad_id=pad_id,
                         seed=seed, shardings=shardings, layer_loop=layer_loop)


def multiturn_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Tool and turn statistics of a batch (TRL's names for the tool ones)."""
    n = len(trajectories)
    if n == 0:
        return {}
    calls = sum(t.num_tool_calls for t in trajectories)
    failures = sum(t.tool_failures for t in trajectories)
    per_tool: collections.Counter = collections.Counter()
    for t in trajectories:
        per_tool.update(t.tool_calls)
    metrics = {
        "tools/call_frequency": calls / n,
        "tools/failure_frequency": failures / calls if calls else 0.0,
        "turns/mean": sum(t.turns for t in trajectories) / n,
        "turns/max": float(max(t.turns for t in trajectories)),
    }
    for name, count in sorted(per_tool.items()):
        metrics[f"tools/{name or '<malformed>'}/call_frequency"] = count / n
    parts = sorted({k for t in trajectories for k in t.reward_parts})
    for k in parts:
        metrics[f"env_rewards/{k}/mean"] = sum(t.reward_parts.get(k, 0.0)
                                               for t in trajectories) / n
    return metrics
