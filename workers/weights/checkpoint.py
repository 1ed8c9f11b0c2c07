"""Checkpoint tensors by Hugging Face name: read from safetensors files, or made up (`dummy`, seeded).

Both sources yield the same thing, a mapping of HF parameter names to tensors, so a dummy model can be
loaded into transformers for a correctness comparison exactly as the engine loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from workers.contract.sizing import Arch


def iter_safetensors(weights_dir: str | Path, device: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every *.safetensors file of a directory, cast to `dtype` on `device`."""
    files = sorted(Path(weights_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {weights_dir}")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


def hf_parameter_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Llama-family checkpoint's parameters, as transformers names them."""
    h, q, kv, inter = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, arch.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if arch.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)}
        if arch.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (arch.head_dim,), p + "self_attn.k_norm.weight": (arch.head_dim,)}
    return shapes


def iter_dummy(arch: Arch, seed: int, device: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights of the real shapes: N(0, 0.02) matrices, norms near 1 (as transformers initialises).

    Seeded per tensor name, so the same seed gives the same weights on any device and in any order.
    """
    for name, shape in hf_parameter_shapes(arch).items():
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + _stable_hash(name))
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        elif name.endswith(".bias"):
            tensor = 0.02 * torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            tensor = torch.empty(shape, device=device, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
        yield name, tensor.to(dtype)


def _stable_hash(text: str) -> int:
    value = 0
    for byte in text.encode():
        value = (value * 131 + byte) % 2_147_483_629
    return value


def read_hf_config(weights_dir: str | Path) -> dict:
    return json.loads((Path(weights_dir) / "config.json").read_text())
