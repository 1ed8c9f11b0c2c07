"""Model facts both sides need, computed from a Hugging Face config without torch: the shape of a
Llama-family model (`Arch`), its dtype on a device, and the bytes its weights and KV take.

The controller sizes models with these for placement; the worker's weight layout
(`workers/weights/layout.py`) lays out the same slots, so the bytes the controller plans for are the
bytes the worker maps.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def kv_bytes_per_token(self, dtype: str) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype]

    def num_parameters(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size + 2 * h
        per_layer += (q + 2 * kv) if self.qkv_bias else 0
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ALIGN_BYTES = 256  # every weight slot starts on this boundary


def resolve_dtype(dtype: str, device: str) -> str:
    """A registry dtype on a device: `auto` is float32 on the CPU and bfloat16 on GPUs."""
    if dtype != "auto":
        return dtype
    return "float32" if device.startswith("cpu") else "bfloat16"


@dataclass(frozen=True)
class Slot:
    key: str  # "embed", "layers.3.qkv", ...
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the weight image

    @property
    def numel(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel


def weight_slots(arch: Arch, dtype: str) -> tuple[tuple[Slot, ...], int]:
    """Every engine parameter (q/k/v fused, gate/up fused, norms, embeddings) at its fixed, aligned byte
    offset in one contiguous image; and the image's size in bytes."""
    h, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed", (arch.vocab_size, h))]
    for i in range(arch.num_layers):
        p = f"layers.{i}."
        shapes += [
            (p + "input_norm", (h,)),
            (p + "qkv", (q + 2 * kv, h)),
            *([(p + "qkv_bias", (q + 2 * kv,))] if arch.qkv_bias else []),
            *([(p + "q_norm", (arch.head_dim,)), (p + "k_norm", (arch.head_dim,))] if arch.qk_norm else []),
            (p + "o", (h, q)),
            (p + "post_norm", (h,)),
            (p + "gate_up", (2 * arch.intermediate_size, h)),
            (p + "down", (h, arch.intermediate_size)),
        ]
    shapes.append(("final_norm", (h,)))
    if not arch.tie_word_embeddings:
        shapes.append(("lm_head", (arch.vocab_size, h)))
    slots, offset = [], 0
    for key, shape in shapes:
        slot = Slot(key, shape, offset)
        slots.append(slot)
        offset += -(-slot.numel * DTYPE_BYTES[dtype] // ALIGN_BYTES) * ALIGN_BYTES
    return tuple(slots), offset


@dataclass(frozen=True)
class ModelSize:
    """What a model takes on a device: the controller's placement input."""

    dtype: str
    weight_bytes: int
    kv_bytes_per_token: int

    @classmethod
    def of(cls, arch: Arch, dtype: str, device: str) -> ModelSize:
        dtype = resolve_dtype(dtype, device)
        return cls(dtype, weight_slots(arch, dtype)[1], arch.kv_bytes_per_token(dtype))


def mapped_bytes(num_bytes: int, page_bytes: int) -> int:
    """What the page pool maps for `num_bytes` of one model's weights: whole pages."""
    return -(-num_bytes // page_bytes) * page_bytes
