"""The byte layout of a model's (fused) weights: one contiguous image, the same in host memory and in pool pages.

Every engine parameter (q/k/v fused, gate/up fused, norms, embeddings) gets a fixed offset computed from
the architecture alone. A model's weights can then be built once into a host image (shared memory) and
activated by copying that image, as one contiguous range, into the model's weight range of the page pool;
the engine's tensors are views at the same offsets. No per-tensor work happens on activation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from workers.contract.sizing import Arch, Slot, weight_slots

# Engine parameter -> the checkpoint tensors it is made of, concatenated along dim 0 (in this order).
FUSED = {
    "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "qkv_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "input_norm": ("input_layernorm.weight",),
    "post_norm": ("post_attention_layernorm.weight",),
    "o": ("self_attn.o_proj.weight",),
    "down": ("mlp.down_proj.weight",),
    "q_norm": ("self_attn.q_norm.weight",),
    "k_norm": ("self_attn.k_norm.weight",),
}
TOP_LEVEL = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class WeightLayout:
    """The contract's slots (`weight_slots`, the bytes the controller plans for) as typed tensor views."""

    arch: Arch
    dtype: torch.dtype
    slots: tuple[Slot, ...]
    num_bytes: int

    @classmethod
    def of(cls, arch: Arch, dtype: torch.dtype) -> WeightLayout:
        return cls(arch, dtype, *weight_slots(arch, DTYPES[dtype]))

    def views(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed tensors over a uint8 image of at least `num_bytes` (host or device), keyed by slot."""
        assert image.dtype == torch.uint8 and image.numel() >= self.num_bytes
        size = self.dtype.itemsize
        return {s.key: image[s.offset : s.offset + s.numel * size].view(self.dtype).view(s.shape) for s in self.slots}


def checkpoint_key(name: str) -> tuple[str, int] | None:
    """Map a checkpoint tensor name to (slot key, its index among the parts of that slot); None if unused."""
    for key, hf_name in TOP_LEVEL.items():
        if name == hf_name:
            return key, 0
    if not name.startswith("model.layers."):
        return None
    _, _, index, rest = name.split(".", 3)
    for key, parts in FUSED.items():
        if rest in parts:
            return f"layers.{index}.{key}", parts.index(rest)
    return None


def fill(layout: WeightLayout, views: dict[str, torch.Tensor], tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into their slots (fused parts at their row offsets); check nothing is missing."""
    filled: dict[str, int] = {}
    for name, tensor in tensors:
        target = checkpoint_key(name)
        if target is None or target[0] not in views:
            continue
        key, part = target
        destination = views[key]
        row = _part_offset(layout.arch, key, part)
        destination[row : row + tensor.shape[0]].copy_(tensor)
        filled[key] = filled.get(key, 0) + tensor.shape[0]
    for key, view in views.items():
        if filled.get(key, 0) != view.shape[0]:
            raise ValueError(f"checkpoint is missing weights for {key!r} ({filled.get(key, 0)} of {view.shape[0]} rows)")


def _part_offset(arch: Arch, key: str, part: int) -> int:
    if part == 0:
        return 0
    name = key.rsplit(".", 1)[-1]
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    if name in ("qkv", "qkv_bias"):
        return (0, q, q + kv)[part]
    if name == "gate_up":
        return arch.intermediate_size
    raise ValueError(f"{key} has no part {part}")
