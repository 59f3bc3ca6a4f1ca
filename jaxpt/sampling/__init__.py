"""Sampling: KV-cache prefill, a jitted `lax.while_loop` decode loop, samplers.

from jaxpt.sampling import Sampler, generate
result = generate(graphdef, params, ids_BP, mask_BP, sampler=Sampler(temperature=1.0),
                  max_new_tokens=256, eos_ids=(2,), rng=0, num_samples=8, pad_id=2)
"""

from jaxpt.sampling.loop import decode, generate, result_from_state
from jaxpt.sampling.prefill import PackedPrompts, pack_prompts, prefill, prefill_packed
from jaxpt.sampling.samplers import Sampler, SamplerError
from jaxpt.sampling.state import (
    FINISH_LENGTH,
    FINISH_REASONS,
    FINISH_STOP,
    DecodeState,
    GenerationError,
    GenerationResult,
    bucket_length,
    finish_reason_names,
)
from jaxpt.sampling.text import (
    Completion,
    PromptError,
    default_stop_ids,
    encode_prompts,
    generate_text,
    left_pad,
)
from jaxpt.sharding import DecodeSharding, ShardingError, decode_sharding

__all__ = [
    "FINISH_LENGTH",
    "FINISH_REASONS",
    "FINISH_STOP",
    "Completion",
    "DecodeSharding",
    "DecodeState",
    "GenerationError",
    "GenerationResult",
    "PackedPrompts",
    "PromptError",
    "Sampler",
    "SamplerError",
    "ShardingError",
    "bucket_length",
    "decode",
    "decode_sharding",
    "default_stop_ids",
    "encode_prompts",
    "finish_reason_names",
    "generate",
    "generate_text",
    "left_pad",
    "pack_prompts",
    "prefill",
    "prefill_packed",
    "result_from_state",
]
