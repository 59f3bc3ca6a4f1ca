"""Prompt rows of an on-policy run: the run's data (``data.train`` / ``data.eval``, GSM8K or
prompt rows) or generated arithmetic word problems (``jaxpt.data.tasks.arithmetic``, no
download; ``data.max_train_rows`` / ``data.max_eval_rows`` problems, disjoint train and
held-out splits), tokenized. Every column besides the prompt is kept for the rewards
(``answer``) and the hybrids (``completion``: the demonstration)."""

from __future__ import annotations

import dataclasses

from jaxpt.config import RunConfig
from jaxpt.data import DataStats
from jaxpt.data.gsm8k import convert_gsm8k
from jaxpt.data.pipeline import PromptExample, prepare_prompts
from jaxpt.data.tasks.arithmetic import ArithmeticConfig, arithmetic_records
from jaxpt.engine.build import read_data_records


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    task: str  # "data" | "arithmetic"
    max_prompt_length: int
    instruction: str | None = None  # appended to each GSM8K / arithmetic question
    arithmetic: ArithmeticConfig | None = None  # the generator's settings (task arithmetic)
    demonstrations: bool = False  # keep GSM8K's worked answers as `completion`
    section: str = "grpo"  # the config section of these keys (for messages)


def prompt_rows(cfg: RunConfig, spec: PromptSpec, which: str, stats=None) -> list:
    """Prompt rows (`prompt` + `answer` + other columns; `completion` = demonstration)."""
    if spec.task == "arithmetic":
        n = cfg.data.max_train_rows if which == "train" else cfg.data.max_eval_rows
        if not n:
            raise ValueError(f"{cfg.source}: {spec.section}.task=arithmetic needs data.max_"
                             f"{'train' if which == 'train' else 'eval'}_rows")
        records = arithmetic_records(
            spec.arithmetic, n, split="train" if which == "train" else "test",
            seed=cfg.train.seed, source=f"arithmetic:{which}")
        if stats is not None:
            stats.rows_read += len(records)
    else:
        # GSM8K rows are read raw: both the prompt and (for hybrids) the demonstration
        # come from them below.
        raw = cfg.replace(data=dataclasses.replace(cfg.data, format="auto"))
        records = read_data_records(raw, which, stats=stats)
    if spec.task == "arithmetic" or cfg.data.format == "gsm8k":
        kw = {} if spec.instruction is None else {"instruction": spec.instruction}
        prompts = convert_gsm8k(records, mode="prompt", **kw)
        if spec.demonstrations:
            demos = convert_gsm8k(records, mode="sft", **kw)
            for p, d in zip(prompts, demos, strict=True):
                p.data["completion"] = d.data["completion"]
        return prompts
    return records


def load_prompts(cfg: RunConfig, spec: PromptSpec, tokenizer,
                 which: str) -> tuple[list[PromptExample], DataStats]:
    """The tokenized prompts of split ``which`` ("train" / "eval") and what reading them
    came to; no usable prompt is an error naming the config."""
    stats = DataStats()
    rows = prompt_rows(cfg, spec, which, stats=stats)
    ex, stats = prepare_prompts(rows, tokenizer, max_prompt_length=spec.max_prompt_length,
                                skip_invalid=cfg.data.skip_invalid, stats=stats)
    if not ex:
        raise ValueError(f"{cfg.source}: no usable {which} prompts ({stats})")
    return ex, stats
