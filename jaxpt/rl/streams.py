"""Named random streams: every random draw of an on-policy run, by what it is for.

All streams derive from ``train.seed`` and a counter (the epoch, rollout, sampling round or
step the draw belongs to), so a run is reproducible and a resumed run draws what an
uninterrupted one would. Host streams are ``np.random.RandomState([seed, counter, *tag])``;
the tags are the integers the streams were told apart by before they had names, kept so
that draws stay bit-identical:

==================  ===================  ==============================================
stream              seed words           draws
==================  ===================  ==============================================
prompt_order        [seed, epoch]        the permutation of the prompts in each epoch
minibatch_shuffle   [seed, rollout, 1]   the order of a rollout's groups (mini-batches)
prefix_fractions    [seed, round, 2]     Prefix-RFT's prefix lengths of a sampling round
sasr                [seed, step, 3]      SASR's SFT-or-RL choice of a step
distill_on_policy   [seed, round, 40]    distillation's on-policy-or-dataset choice
==================  ===================  ==============================================

The decode loop's sampling key of sampling round ``k`` is ``fold_in(key(seed), k)``
(:meth:`RandomStreams.sampling_key`). The engine keeps its own draws (the train state's
``rng``, LoRA's init in ``engine/build.py``); they are not streams of this module.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

# stream -> the seed words after (seed, counter)
HOST_STREAMS: dict[str, tuple[int, ...]] = {
    "prompt_order": (),
    "minibatch_shuffle": (1,),
    "prefix_fractions": (2,),
    "sasr": (3,),
    "distill_on_policy": (40,),
}


@dataclasses.dataclass(frozen=True)
class RandomStreams:
    seed: int

    def host(self, stream: str, counter: int) -> np.random.RandomState:
        """The host generator of ``stream`` at ``counter`` (module doc)."""
        if stream not in HOST_STREAMS:
            raise KeyError(f"no random stream {stream!r}; known: {', '.join(HOST_STREAMS)}")
        return np.random.RandomState([self.seed, counter, *HOST_STREAMS[stream]])

    def sampling_key(self, round_no: int) -> jax.Array:
        """The decode loop's key for sampling round ``round_no``."""
        return jax.random.fold_in(jax.random.key(self.seed), round_no)
