"""Data layer: rows -> token ids + loss masks + segment ids -> batch dicts (see packing.py).

Typical use (all validation/tokenization happens up front, before training)::

    stats = DataStats()
    records = read_records("train.jsonl", stats=stats)
    examples, stats = prepare_sft(records, tokenizer, max_length=1024, stats=stats)
    loader = sft_loader(examples, batch_size=8, max_length=1024, seed=0)
    it = iter(loader); batch = next(it)
"""

from jaxpt.data.formats import (
    ChatTemplateError,
    DataError,
    DataStats,
    Record,
    RowFormat,
    detect_format,
    records_from_rows,
    validate_records,
    validate_row,
)
from jaxpt.data.packing import (
    BATCH_KEYS,
    SHARED_PAIR_KEYS,
    best_fit_decreasing,
    bucket_length,
    collate_packed,
    collate_padded,
    collate_preference,
    collate_preference_shared,
    collate_prompts,
    shared_pair_shape,
    truncate_example,
    truncate_preference,
    truncate_prompt,
)
from jaxpt.data.pipeline import (
    BatchIterator,
    Loader,
    PromptExample,
    preference_loader,
    prepare_preference,
    prepare_prompts,
    prepare_sft,
    prompt_batch,
    sft_loader,
)
from jaxpt.data.sources import read_records
from jaxpt.data.tokenize import (
    TokenizedExample,
    TokenizedPreference,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)

__all__ = [
    "BATCH_KEYS",
    "BatchIterator",
    "ChatTemplateError",
    "DataError",
    "DataStats",
    "Loader",
    "PromptExample",
    "Record",
    "RowFormat",
    "TokenizedExample",
    "TokenizedPreference",
    "best_fit_decreasing",
    "bucket_length",
    "collate_packed",
    "collate_padded",
    "collate_preference",
    "collate_preference_shared",
    "shared_pair_shape",
    "SHARED_PAIR_KEYS",
    "collate_prompts",
    "detect_format",
    "prepare_preference",
    "prepare_prompts",
    "prepare_sft",
    "preference_loader",
    "prompt_batch",
    "read_records",
    "records_from_rows",
    "sft_loader",
    "tokenize_preference",
    "tokenize_prompt",
    "tokenize_sft",
    "truncate_example",
    "truncate_preference",
    "truncate_prompt",
    "validate_records",
    "validate_row",
]
