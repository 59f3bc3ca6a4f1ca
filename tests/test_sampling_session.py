"""Decode sessions (`jaxpt.sampling.session`): multi-turn rollouts that keep each row's KV
cache between turns give the same tokens as re-submitting the whole history, the resumed
turn's log-probs equal a fresh decode of that history, samples depend on the row only,
budgets end rows as the driver's rules say, and the sharded run equals one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import run_with_devices
from flax import nnx
from tolerances import assert_reordered_close

from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import init_model
from jaxpt.rl.environments import StepResult
from jaxpt.rl.multiturn import run_episodes, sampling_generate, session_generate
from jaxpt.sampling import Sampler, generate, left_pad
from jaxpt.sampling.session import DecodeSession
from jaxpt.sampling.state import GenerationError

HIDDEN, VOCAB = 16, 64


def tiny_model(vocab: int, seed: int = 0):
    cfg = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=HIDDEN,
                      intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=8)
    graphdef, params = nnx.split(init_model(cfg, seed=seed))
    return graphdef, jax.tree.map(lambda x: x * 4.0, params)  # sharper logits


class MoreEnv:
    """Scripted environment: after each model turn, a user turn whose length grows with the
    row (`k`) and the turn, so rows get continuations of different lengths."""

    tool_schemas = ()

    def reset(self, row):
        self.k, self.n = row["k"], 0
        return [{"role": "user", "content": f"Say something {row['k']}."}]

    def step(self, messages, completion):
        self.n += 1
        return StepResult(messages=({"role": "user", "content": "more " * (self.k + self.n)},))


def test_greedy_episode_equals_full_resubmit_and_fresh_decode():
    """3-turn episodes of 4 rows, greedy: the session's trajectories (tokens, masks,
    finishes) are the full-resubmit driver's, and every sampled log-prob equals the one a
    fresh prefill of the whole history gives (that is what the full-resubmit path
    computes each turn), to summation-order rounding."""
    from jaxpt.data.tokenizers import smollm2_tokenizer

    tok = smollm2_tokenizer()
    graphdef, params = tiny_model(len(tok))
    # A random model rarely emits <|im_end|>: a third of the vocabulary stops a turn, so
    # rows end turns at different steps (and some run out of max_new_tokens).
    stops = tuple(range(0, len(tok), 3))
    rows = [{"k": k} for k in range(4)]
    kw = dict(sampler=Sampler.greedy(), max_new_tokens=6, eos_ids=stops)
    full = run_episodes(MoreEnv, rows, sampling_generate(graphdef, params, tok, **kw), tok,
                        max_turns=3, stop_token_ids=stops)
    session = session_generate(graphdef, params, tok, max_total_tokens=160, **kw)
    kept = run_episodes(MoreEnv, rows, session, tok, max_turns=3, stop_token_ids=stops)
    assert [t.turns for t in kept] == [2, 3, 2, 3]  # turns of 2 and 3 model turns
    assert [t.finish for t in kept] == ["truncated", "max_turns", "truncated", "max_turns"]
    for a, b in zip(full, kept, strict=True):
        assert b.prompt_ids == a.prompt_ids
        assert b.completion_ids == a.completion_ids
        assert b.loss_mask == a.loss_mask
        assert (b.finish, b.turns, b.messages) == (a.finish, a.turns, a.messages)
        # One decode step vs one prefill forward: hidden 16, MLP 32, vocab 49152 reductions
        # through 2 layers, the head and the log-softmax.
        assert_reordered_close(np.asarray(b.logprobs), np.asarray(a.logprobs), n=len(tok),
                               depth=4)
    # The continuations differ in length between rows (the env's turn grows with k).
    conts = [len(t.completion_ids) - sum(t.loss_mask) for t in kept]
    assert len(set(conts)) == 4, conts
    assert session.num_rows == 4 and session._cache is None  # closed by the driver


def test_resumed_turn_equals_fresh_decode_of_the_history():
    """Turn 2 of a row, resumed from its cache, against `generate` on prompt + turn 1 +
    continuation from scratch (greedy): the same tokens; log-probs to rounding."""
    graphdef, params = tiny_model(VOCAB, seed=3)
    prompts = [[5, 9, 13, 2], [7, 3, 22, 41, 8, 30, 1], [11]]
    s = DecodeSession(graphdef, params, sampler=Sampler.greedy(), max_new_tokens=5,
                      max_total_tokens=40, eos_ids=(), pad_id=0)
    first = s.start(prompts)
    assert [len(o["token_ids"]) for o in first] == [5, 5, 5]
    assert all(o["finish"] == "length" for o in first)
    conts = [[17, 18], [], [40, 41, 42, 43, 44, 45, 46]]
    second = s.resume([0, 1, 2], conts)
    for r, (p, o1, c, o2) in enumerate(zip(prompts, first, conts, second, strict=True)):
        history = p + o1["token_ids"] + c
        ids, mask = left_pad([history], 0)
        fresh = generate(graphdef, params, ids, mask, sampler=Sampler.greedy(),
                         max_new_tokens=5, eos_ids=(), rng=0, pad_id=0)
        assert o2["token_ids"] == np.asarray(fresh.tokens)[0].tolist(), r
        assert_reordered_close(np.asarray(o2["logprobs"]), np.asarray(fresh.logprobs)[0],
                               n=VOCAB, depth=4, err_msg=f"row {r}")
        # and turn 1 against a fresh decode of the prompt alone
        ids, mask = left_pad([p], 0)
        fresh1 = generate(graphdef, params, ids, mask, sampler=Sampler.greedy(),
                          max_new_tokens=5, eos_ids=(), rng=0, pad_id=0)
        assert o1["token_ids"] == np.asarray(fresh1.tokens)[0].tolist(), r


def test_sampled_turns_reproducible_and_independent_of_other_rows():
    graphdef, params = tiny_model(VOCAB, seed=1)
    prompts = [[5, 9, 13], [7, 3, 22, 41, 8], [11], [60, 2, 33, 19]]
    kw = dict(sampler=Sampler(temperature=1.0), max_new_tokens=6, max_total_tokens=48,
              eos_ids=(3, 4), pad_id=0)

    def episode(seed, resume_rows):
        s = DecodeSession(graphdef, params, seed=seed, **kw)
        first = s.start(prompts)
        second = s.resume(resume_rows, [[21 + r] * (r + 1) for r in resume_rows])
        third = s.resume(resume_rows[:1], [[50]])
        return first, dict(zip(resume_rows, second, strict=True)), third

    a1, a2, a3 = episode(7, [1, 0, 2, 3])
    b1, b2, b3 = episode(7, [1])  # row 1 alone in turns 2 and 3
    c1, c2, _ = episode(7, [1, 0, 2, 3])
    assert a1 == b1 == c1 and a2 == c2
    assert a2[1] == b2[1] and a3 == b3  # same tokens and log-probs whoever else runs
    d1, d2, _ = episode(8, [1, 0, 2, 3])
    assert [o["token_ids"] for o in d1] != [o["token_ids"] for o in a1]  # the seed matters
    for o in [*a1, *a2.values(), *a3]:
        n = len(o["token_ids"])
        assert 1 <= n <= 6 and len(o["logprobs"]) == n and all(lp <= 0 for lp in o["logprobs"])
        assert o["finish"] == ("stop" if o["token_ids"][-1] in (3, 4) else "length")


def test_capacity_ends_rows_and_errors_name_the_row():
    graphdef, params = tiny_model(VOCAB, seed=2)
    s = DecodeSession(graphdef, params, sampler=Sampler.greedy(), max_new_tokens=8,
                      max_total_tokens=20, eos_ids=(), pad_id=0)
    outs = s.start([[1] * 15, [2] * 3])
    # row 0: 15 + 5 = 20 tokens, cut by max_total_tokens; row 1: its 8 new tokens
    assert [(len(o["token_ids"]), o["finish"]) for o in outs] == [(5, "capacity"), (8, "length")]
    (o,) = s.resume([1], [[9] * 4])  # 3 + 8 + 4 = 15 tokens, 5 left
    assert (len(o["token_ids"]), o["finish"]) == (5, "capacity")
    with pytest.raises(GenerationError, match="row 0 would hold 21 tokens"):
        s.resume([0], [[9]])
    with pytest.raises(GenerationError, match="row 5 is not in the session's 2 rows"):
        s.resume([5], [[9]])
    with pytest.raises(GenerationError, match="prompt row 1 has 20 tokens"):
        s.start([[1], [1] * 20])


class ScriptedSession:
    """A session with scripted turns (row r's k-th turn: script[r][k]); records what the
    driver feeds it. `capacity` rows report their last turn as cut by max_total_tokens."""

    max_total_tokens = 10_000

    def __init__(self, script, capacity=()):
        self.script, self.capacity, self.fed = script, set(capacity), []
        self.turns = [0] * len(script)

    def _turn(self, r):
        ids = self.script[r][self.turns[r]]
        self.turns[r] += 1
        last = self.turns[r] == len(self.script[r]) and r in self.capacity
        return {"token_ids": ids, "logprobs": [-0.25] * len(ids),
                "finish": "capacity" if last else "stop"}

    def start(self, prompts):
        return [self._turn(r) for r in range(len(prompts))]

    def resume(self, rows, new_ids):
        self.fed.append((list(rows), [list(x) for x in new_ids]))
        return [self._turn(r) for r in rows]

    def close(self):
        pass


def test_driver_feeds_the_session_exactly_the_continuation_ids():
    """run_episodes with a `resume`-able generate: the continuation ids it feeds are the
    ones the full-resubmit path appends (masked 0), a capacity cut ends with "length"."""
    from jaxpt.data.tokenizers import smollm2_tokenizer

    tok = smollm2_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    a, b, c = (tok("A b c", add_special_tokens=False)["input_ids"],
               tok("D", add_special_tokens=False)["input_ids"],
               tok("e f", add_special_tokens=False)["input_ids"])
    script = [[[*a, eos], [*b, eos], [*c, eos]], [[*c, eos], b]]  # row 1's turn 2: no stop
    session = ScriptedSession(script, capacity=[1])
    rows = [{"k": 0}, {"k": 2}]
    trajs = run_episodes(MoreEnv, rows, session, tok, max_turns=3)
    assert [(t.finish, t.turns) for t in trajs] == [("max_turns", 3), ("length", 2)]
    assert [r for r, _ in session.fed] == [[0, 1], [0]]
    t0 = trajs[0]
    fed0 = [ids for rows_, ids_ in session.fed for r, ids in zip(rows_, ids_, strict=True)
            if r == 0]
    # by hand: SmolLM2's template closes a turn with "<|im_end|>\n"; the sampled stop token
    # is that <|im_end|>, so each continuation starts at the "\n".
    want0 = [tok(f"\n<|im_start|>user\n{'more ' * n}<|im_end|>\n<|im_start|>assistant\n",
                 add_special_tokens=False)["input_ids"] for n in (1, 2)]
    assert fed0 == want0
    assert t0.completion_ids == [*a, eos, *want0[0], *b, eos, *want0[1], *c, eos]
    assert t0.loss_mask == ([1] * (len(a) + 1) + [0] * len(want0[0]) + [1] * (len(b) + 1)
                            + [0] * len(want0[1]) + [1] * (len(c) + 1))
    assert t0.logprobs == [-0.25 if m else 0.0 for m in t0.loss_mask]
    assert trajs[1].completion_ids[-len(b):] == b and trajs[1].loss_mask[-len(b):] == [1] * len(b)


SHARDED = """
import jax, numpy as np
from flax import nnx
from jaxpt.models.config import ModelConfig
from jaxpt.models.decoder import init_model
from jaxpt.sampling import Sampler, decode_sharding
from jaxpt.sampling.session import DecodeSession
from jaxpt.sharding import make_mesh

assert jax.device_count() == 8
cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
graphdef, params = nnx.split(init_model(cfg, seed=1))
params = jax.tree.map(lambda x: x * 8.0, params)
prompts = [[5, 9, 13], [7, 3, 22, 41, 8], [11], [60, 2, 33, 19]]
kw = dict(sampler=Sampler.greedy(), max_new_tokens=6, max_total_tokens=40, eos_ids=(3,),
          pad_id=0)

def episode(p, shardings=None):
    s = DecodeSession(graphdef, p, shardings=shardings, **kw)
    out = [s.start(prompts)]
    out.append(s.resume([0, 1, 2, 3], [[21], [22, 23], [], [24, 25, 26]]))
    out.append(s.resume([2], [[30, 31]]))
    return [[o["token_ids"] for o in turn] for turn in out]

want = episode(params)
ds = decode_sharding(make_mesh(2, 2, 2))
got = episode(ds.place_params(params), ds)
assert got == want, (got, want)
print("ok", want)
"""


def test_sharded_session_equals_one_device():
    out = run_with_devices(SHARDED)
    assert "ok" in out, out
