"""Trainers: one small trainer per algorithm over shared parts.

config (jaxpt.config)  typed run configs, YAML + overrides
state.py       TrainState, AdamW + schedule, the pure step (accumulation, non-finite skip)
lora.py        LoRA adapters merged into the base weights inside the step
logprobs.py    sequence_token_logprobs: model + batch -> per-token log-probs
checkpoint.py  orbax checkpoints (async, keep-N, atomic), SIGTERM flag
metrics.py     JSONL / TensorBoard / W&B, progress bar, throughput and MFU
loop.py        the loop every trainer runs (Trainer, BatchSource, run)
common.py      model bundle, train state with or without LoRA, data records
registry.py    algorithm name -> trainer, for `jaxpt train`
sft.py         the SFT trainer
export.py      checkpoint -> Hugging Face dir (LoRA merged)
"""
