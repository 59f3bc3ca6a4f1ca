"""`jaxpt generate MODEL --prompt ... | --prompts-file rows.jsonl`.

Wire-up (jaxpt/cli/__init__.py): `add_generate_parser(subparsers)` registers the subcommand and
sets `func=run_generate`; `run_generate(args)` returns a process exit code.

Each output line is one JSON object per (prompt, sample):
  {"index": i, "sample": j, "prompt": <as given>, "completion": "...",
   "num_tokens": n, "finish_reason": "stop" | "length"}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


class PromptFileError(ValueError):
    """A prompts file row jaxpt cannot use; the message names the file and line."""


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="sample completions from a model (chat templates applied)",
        description="Sample completions with jaxpt's jitted KV-cache decode loop.",
    )
    p.add_argument(
        "model",
        help="packaged name (smollm2-135m-instruct), .gguf file, checkpoint dir or hub id",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prompt", action="append", help="a prompt (user message); repeat for several"
    )
    src.add_argument(
        "--prompts-file",
        type=Path,
        help="JSONL file, one object per line holding --prompt-key (a string or a "
        "list of {role, content} messages) or 'messages'",
    )
    p.add_argument("--prompt-key", default="prompt", help="key read in --prompts-file rows")
    p.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="tokenize prompts as plain text instead of applying the chat template",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0.0 = off")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--dtype", default=None, help="compute dtype (float32, bfloat16)")
    p.add_argument("--output", "-o", type=Path, default=None, help="JSONL file (default stdout)")
    p.set_defaults(func=run_generate)
    return p


def read_prompts_file(path: Path, key: str = "prompt") -> list[Any]:
    """Prompts from a JSONL file: row[key], else row['messages'] (a trailing assistant
    turn is dropped so a chat transcript prompts for that turn)."""
    if not path.exists():
        raise PromptFileError(f"{path}: file not found")
    prompts = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise PromptFileError(f"{path}:{lineno}: expected a JSON object")
            if key in row:
                prompt = row[key]
            elif "messages" in row:
                prompt = list(row["messages"])
                while (
                    prompt
                    and isinstance(prompt[-1], dict)
                    and prompt[-1].get("role") == ("assistant")
                ):
                    prompt.pop()
            else:
                raise PromptFileError(
                    f"{path}:{lineno}: no key {key!r} (or 'messages'); keys: {sorted(row)}"
                )
            ok = isinstance(prompt, str) or (
                isinstance(prompt, list)
                and prompt
                and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
            )
            if not ok:
                raise PromptFileError(
                    f"{path}:{lineno}: key {key!r} must be a string or a non-empty list of "
                    "{role, content} messages"
                )
            prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts


def run_generate(args: argparse.Namespace) -> int:
    from jaxpt.models import hub
    from jaxpt.sampling.samplers import Sampler, SamplerError
    from jaxpt.sampling.text import default_stop_ids, generate_text

    try:
        sampler = Sampler(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p
        )
    except SamplerError as e:
        print(f"jaxpt generate: {e}", file=sys.stderr)
        return 2
    for name in ("max_new_tokens", "num_samples", "batch_size"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            print(f"jaxpt generate: {flag}={getattr(args, name)} must be >= 1", file=sys.stderr)
            return 2
    if args.prompts_file is not None:
        try:
            prompts = read_prompts_file(args.prompts_file, args.prompt_key)
        except PromptFileError as e:
            print(f"jaxpt generate: {e}", file=sys.stderr)
            return 2
    else:
        prompts = list(args.prompt)

    overrides = {"compute_dtype": args.dtype} if args.dtype else {}
    model, cfg, resolved = hub.load(args.model, **overrides)
    tokenizer = resolved.tokenizer()
    eos_ids = default_stop_ids(tokenizer, extra=resolved.generation_eos_ids())
    completions = generate_text(
        model,
        tokenizer,
        prompts,
        sampler=sampler,
        max_new_tokens=args.max_new_tokens,
        num_samples=args.num_samples,
        eos_ids=eos_ids,
        seed=args.seed,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
        progress=args.prompts_file is not None,
    )
    out = args.output.open("w") if args.output else sys.stdout
    try:
        for i, (prompt, samples) in enumerate(zip(prompts, completions, strict=True)):
            for j, c in enumerate(samples):
                row = {
                    "index": i,
                    "sample": j,
                    "prompt": prompt,
                    "completion": c.text,
                    "num_tokens": c.num_tokens,
                    "finish_reason": c.finish_reason,
                }
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
    finally:
        if args.output:
            out.close()
    return 0
