"""The run machinery every algorithm shares; it knows no algorithm.

build.py       mesh, model in its shardings, tokenizer, train state (LoRA or full)
state.py       TrainState, AdamW + schedule, the pure step (accumulation, non-finite skip)
adamw.py       the fused AdamW update (optax's math, one pass)
update.py      one guarded update: one optimizer, or one per param group (policy + value head)
lora.py        LoRA adapters merged into the base weights inside the step
logprobs.py    sequence_token_logprobs: model + batch -> per-token log-probs
checkpoint.py  orbax checkpoints (async, keep-N, atomic), SIGTERM flag
metrics.py     JSONL / TensorBoard / W&B, progress bar, throughput and MFU
loop.py        the loop every trainer runs (Trainer, BatchSource, run)
export.py      checkpoint -> Hugging Face dir (LoRA merged)
report.py      the end-of-run summary (curves, before -> after)
"""
