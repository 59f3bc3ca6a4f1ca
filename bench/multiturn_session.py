"""Multi-turn rollouts: re-submitting the whole history each turn vs a decode session that
keeps each row's KV cache and feeds only the new tokens (`jaxpt.sampling.session`).

SmolLM2-135M-Instruct (fp32), --rows arithmetic questions, greedy, --turns model turns per
episode: after each answer the environment asks the model to check it (a fixed user turn),
so every row runs all turns. Both paths go through `jaxpt.rl.multiturn.run_episodes`
(the same trajectories; the script checks the tokens are equal). Each path runs one
warm-up episode (compiles), then a timed one; reported: seconds per turn (wall time of
each turn's generate / start / resume call) and in all.

    python bench/multiturn_session.py              # 8 rows, 3 turns, 48 new tokens a turn

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/multiturn_session.py` from a checkout
    sys.path.insert(0, str(REPO))


class CheckAgainEnv:
    tool_schemas = ()

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, messages, completion):
        from jaxpt.rl.environments import StepResult

        return StepResult(messages=({"role": "user",
                                     "content": "Check your answer and correct it if needed."},))


class Timed:
    """Wall time of each call of a generate (a callable, or a session's start / resume)."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, []
        if hasattr(inner, "resume"):
            self.max_total_tokens = inner.max_total_tokens
            self.start = self._timed(inner.start)
            self.resume = self._timed(inner.resume)
            self.close = inner.close

    def _timed(self, fn):
        def call(*args):
            t = time.perf_counter()
            out = fn(*args)
            self.seconds.append(time.perf_counter() - t)
            return out

        return call

    def __call__(self, *args):  # the plain-callable form
        return self._timed(self.inner)(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-total-tokens", type=int, default=512)
    args = ap.parse_args()

    from flax import nnx

    from jaxpt.data.tokenizers import smollm2_tokenizer
    from jaxpt.models import hub
    from jaxpt.rl.multiturn import run_episodes, sampling_generate, session_generate
    from jaxpt.sampling import Sampler

    tok = smollm2_tokenizer()
    model, _, _ = hub.load("smollm2-135m-instruct")
    graphdef, params = nnx.split(model)
    rows = [{"prompt": f"What is {17 + 7 * i} * {23 + 5 * i}? Answer with the number."}
            for i in range(args.rows)]
    kw = dict(sampler=Sampler.greedy(), max_new_tokens=args.max_new_tokens)
    makers = {
        "full_resubmit": lambda: sampling_generate(graphdef, params, tok, **kw),
        "session": lambda: session_generate(graphdef, params, tok,
                                            max_total_tokens=args.max_total_tokens, **kw),
    }
    report, tokens = {"rows": args.rows, "turns": args.turns,
                      "max_new_tokens": args.max_new_tokens}, {}
    for name, make in makers.items():
        for _phase in ("warmup", "timed"):
            gen = Timed(make())
            t = time.perf_counter()
            trajs = run_episodes(CheckAgainEnv, rows, gen, tok, max_turns=args.turns,
                                 max_total_tokens=args.max_total_tokens)
            total = time.perf_counter() - t
        tokens[name] = [tr.completion_ids for tr in trajs]
        report[name] = {"seconds_per_turn": [round(s, 3) for s in gen.seconds],
                        "seconds_total": round(total, 3),
                        "trajectory_tokens": sum(len(tr.prompt_ids) + len(tr.completion_ids)
                                                 for tr in trajs),
                        "turns": [tr.turns for tr in trajs]}
    report["same_tokens"] = tokens["full_resubmit"] == tokens["session"]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
