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
# One set of static settings for the greedy tiny-model tests: they share compiled programs.
GREEDY = dict(sampler=Sampler.greedy(), max_new_tokens=6, max_total_tokens=40, eos_ids=(),
              pad_id=0, cache_slots=48)  # bucket_length(40): no growth, one turn program


def tiny_model(vocab: int, seed: int = 0, layers: int = 2):
    cfg = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=HIDDEN,
                      intermediate_size=32, num_layers=layers, num_heads=2, num_kv_heads=1,
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
    """2-turn episodes of 3 rows, greedy: the session's trajectories (tokens, masks,
    finishes) are the full-resubmit driver's, and every sampled log-prob equals the one a
    fresh prefill of the whole history gives (that is what the full-resubmit path
    computes each turn), to summation-order rounding."""
    from jaxpt.data.tokenizers import smollm2_tokenizer

    tok = smollm2_tokenizer()
    graphdef, params = tiny_model(len(tok), layers=1)
    # A random model rarely emits <|im_end|>: a third of the vocabulary stops a turn, so
    # rows end turns at different steps (and some run out of max_new_tokens).
    stops = tuple(range(0, len(tok), 3))
    rows = [{"k": k} for k in range(3)]
    kw = dict(sampler=Sampler.greedy(), max_new_tokens=4, eos_ids=stops)
    full = run_episodes(MoreEnv, rows, sampling_generate(graphdef, params, tok, **kw), tok,
                        max_turns=2, stop_token_ids=stops)
    session = session_generate(graphdef, params, tok, max_total_tokens=120, **kw)
    kept = run_episodes(MoreEnv, rows, session, tok, max_turns=2, stop_token_ids=stops)
    assert [(t.turns, t.finish) for t in kept] == [(2, "max_turns")] * 3
    for a, b in zip(full, kept, strict=True):
        assert b.prompt_ids == a.prompt_ids
        assert b.completion_ids == a.completion_ids
        assert b.loss_mask == a.loss_mask
        assert (b.finish, b.turns, b.messages) == (a.finish, a.turns, a.messages)
        # One decode step vs one prefill forward: hidden 16, MLP 32, vocab 49152 reductions
        # through 1 layer, the head and the log-softmax.
        assert_reordered_close(np.asarray(b.logprobs), np.asarray(a.logprobs), n=len(tok),
                               depth=3)
    # The continuations differ in length between rows (the env's turn grows with k).
    conts = [len(t.completion_ids) - sum(t.loss_mask) for t in kept]
    assert len(set(conts)) == 3, conts
    assert session.num_rows == 3 and session._cache is None  # closed by the driver


def test_resumed_turn_equals_fresh_decode_of_the_history():
    """Turn 2 of each row, resumed from its cache, against `generate` on prompt + turn 1 +
    continuation from scratch (greedy): the same tokens; log-probs to rounding. Turn 1
    against `generate` on the prompt alone."""
    graphdef, params = tiny_model(VOCAB, seed=3)
    prompts = [[5, 9, 13, 2], [7, 3, 22, 41, 8, 30, 1], [11]]
    s = DecodeSession(graphdef, params, **GREEDY)
    first = s.start(prompts)
    conts = [[17, 18], [], [40, 41, 42, 43, 44, 45, 46]]  # 3, 1 and 8 forced tokens
    second = s.resume([0, 1, 2], conts)
    assert [o["finish"] for o in first + second] == ["length"] * 6
    histories = [p + o["token_ids"] + c for p, o, c in zip(prompts, first, conts, strict=True)]
    for outs, rows in ((first, prompts), (second, histories)):
        # one padded length, no packing: both calls share one compiled program
        fresh = generate(graphdef, params, *left_pad(rows, 0, length=32), pack=False,
                         sampler=Sampler.greedy(), max_new_tokens=6, eos_ids=(), rng=0,
                         pad_id=0)
        assert [o["token_ids"] for o in outs] == np.asarray(fresh.tokens).tolist()
        # hidden 16, MLP 32, vocab 64 reductions; 2 layers, the head, the log-softmax
        assert_reordered_close(np.asarray([o["logprobs"] for o in outs]),
                               np.asarray(fresh.logprobs), n=VOCAB, depth=4)


def test_sampled_turns_reproducible_and_independent_of_other_rows():
    graphdef, params = tiny_model(VOCAB, seed=1)
    prompts = [[5, 9, 13], [7, 3, 22, 41, 8], [11], [60, 2, 33, 19]]
    kw = {**GREEDY, "sampler": Sampler(temperature=1.0), "eos_ids": (3, 4)}

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
    s = DecodeSession(graphdef, params, **GREEDY)
    outs = s.start([[1] * 36, [2] * 30])
    # row 0: 36 + 4 = 40 tokens, cut by max_total_tokens; row 1: its 6 new tokens
    assert [(len(o["token_ids"]), o["finish"]) for o in outs] == [(4, "capacity"), (6, "length")]
    (o,) = s.resume([1], [[9]])  # 30 + 6 + 1 = 37 tokens: 3 left
    assert (len(o["token_ids"]), o["finish"]) == (3, "capacity")
    with pytest.raises(GenerationError, match="row 0 would hold 41 tokens"):
        s.resume([0], [[9]])
    with pytest.raises(GenerationError, match="row 5 is not in the session's 2 rows"):
        s.resume([5], [[9]])
    with pytest.raises(GenerationError, match="prompt row 1 has 40 tokens"):
        s.start([[1], [1] * 40])


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
          pad_id=0, cache_slots=48)

def episode(p, shardings=None):
    s = DecodeSession(graphdef, p, shardings=shardings, **kw)
    out = [s.start(prompts)]
    out.append(s.resume([0, 2, 3], [[21], [], [24, 25, 26]]))
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
