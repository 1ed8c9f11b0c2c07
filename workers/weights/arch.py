"""The shape of a Llama-family model, read from its Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# model_type -> (qkv bias, q/k norm). Llama and Mistral take `attention_bias` from the config.
SUPPORTED_MODEL_TYPES = {
    "llama": (None, False),
    "mistral": (None, False),
    "qwen2": (True, False),
    "qwen3": (None, True),
}


class UnsupportedModel(ValueError):
    """The config describes a model the built-in engine cannot run; the operator must pick another."""


@dataclass(frozen=True)
class Arch:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, config: dict) -> Arch:
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"model_type {model_type!r} is not supported by the built-in engine "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
        if config.get("sliding_window") and config.get("use_sliding_window", model_type == "mistral"):
            raise UnsupportedModel("sliding-window attention is not supported by the built-in engine")
        qkv_bias, qk_norm = SUPPORTED_MODEL_TYPES[model_type]
        num_heads = config["num_attention_heads"]
        return cls(
            model_type=model_type,
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", False)) if qkv_bias is None else qkv_bias,
            qk_norm=qk_norm,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize

    def num_parameters(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size + 2 * h
        per_layer += (q + 2 * kv) if self.qkv_bias else 0
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h
