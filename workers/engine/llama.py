"""Llama-family decoder (Llama 2/3, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm) over paged KV.

Plain tensors and functions, no nn.Module: the weights are a few fused matrices per layer (q/k/v in one,
gate/up in one), and `forward` runs a flattened batch of every sequence's new tokens. The arithmetic
follows transformers' (RMSNorm in float32, rotate-half RoPE with cos/sin cast to the model dtype), so
that greedy output matches it token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from workers.engine.attention import paged_attention, write_kv
from workers.engine.batch import ForwardBatch
from workers.weights.arch import Arch

AttentionFn = Callable[[torch.Tensor, torch.Tensor, int, ForwardBatch, float], torch.Tensor]
Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_inv_freq(hf_config: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling exactly as transformers computes them (all rope types)."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.for_model(**hf_config)
    rotary = LlamaRotaryEmbedding(config=config)
    return rotary.inv_freq.detach().clone(), float(rotary.attention_scaling)


class LlamaModel:
    def __init__(
        self,
        arch: Arch,
        hf_config: dict,
        layers: list[LayerWeights],
        embed: torch.Tensor,
        final_norm: torch.Tensor,
        lm_head: torch.Tensor,
        attention: AttentionFn = paged_attention,
    ):
        self.arch = arch
        self.layers = layers
        self.embed = embed
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.attention = attention
        self.dtype = embed.dtype
        self.device = embed.device
        self.scale = arch.head_dim**-0.5
        inv_freq, self.rope_scaling = rope_inv_freq(hf_config)
        self.inv_freq = inv_freq.to(self.device, torch.float32)
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        arch: Arch,
        hf_config: dict,
        tensors: Iterable[tuple[str, torch.Tensor]],
        allocate: Allocate,
        attention: AttentionFn = paged_attention,
    ) -> LlamaModel:
        """Build from (HF name, tensor) pairs; `allocate(shape, dtype)` places each parameter (e.g. in pool pages)."""
        store: dict[str, torch.Tensor] = {}

        def put(shape_like: list[torch.Tensor]) -> torch.Tensor:
            merged_rows = sum(t.shape[0] for t in shape_like)
            out = allocate((merged_rows, *shape_like[0].shape[1:]), shape_like[0].dtype)
            torch.cat(shape_like, dim=0, out=out) if len(shape_like) > 1 else out.copy_(shape_like[0])
            return out

        pending: dict[str, torch.Tensor] = {}
        fused_groups = {
            "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            "qkv_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
            "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        }
        for name, tensor in tensors:
            if name.startswith("model.layers."):
                _, _, index, rest = name.split(".", 3)
                group = next((g for g, parts in fused_groups.items() if rest in parts), None)
                if group is None:
                    store[name] = put([tensor])
                    continue
                pending[name] = tensor
                keys = [f"model.layers.{index}.{part}" for part in fused_groups[group]]
                if all(k in pending for k in keys):
                    store[f"model.layers.{index}.{group}"] = put([pending.pop(k) for k in keys])
            elif name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
                store[name] = put([tensor])
        if pending:
            raise ValueError(f"checkpoint is missing parts of fused weights: {sorted(pending)[:3]}")

        def get(key: str, required: bool = True) -> torch.Tensor | None:
            if key not in store and required:
                raise ValueError(f"checkpoint has no tensor {key!r}")
            return store.get(key)

        layers = []
        for i in range(arch.num_layers):
            p = f"model.layers.{i}."
            layers.append(
                LayerWeights(
                    input_norm=get(p + "input_layernorm.weight"),
                    qkv=get(p + "qkv"),
                    qkv_bias=get(p + "qkv_bias", required=arch.qkv_bias),
                    q_norm=get(p + "self_attn.q_norm.weight", required=arch.qk_norm),
                    k_norm=get(p + "self_attn.k_norm.weight", required=arch.qk_norm),
                    o=get(p + "self_attn.o_proj.weight"),
                    post_norm=get(p + "post_attention_layernorm.weight"),
                    gate_up=get(p + "gate_up"),
                    down=get(p + "mlp.down_proj.weight"),
                )
            )
        embed = get("model.embed_tokens.weight")
        lm_head = embed if arch.tie_word_embeddings else get("lm_head.weight")
        return cls(arch, hf_config, layers, embed, get("model.norm.weight"), lm_head, attention)

    # --- forward --------------------------------------------------------------------------------

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(self.dtype)
        sin = (emb.sin() * self.rope_scaling).to(self.dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, head_dim]

    def forward(self, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """Hidden states after the final norm for the rows in `batch.sample_indices`, [S, hidden]."""
        hidden = F.embedding(batch.token_ids, self.embed)
        cos, sin = self.rope(batch.positions)
        for index, layer in enumerate(self.layers):
            hidden = hidden + self._attention_block(index, layer, hidden, batch, kv_cache, cos, sin)
            hidden = hidden + self._mlp_block(layer, hidden)
        return rms_norm(hidden[batch.sample_indices], self.final_norm, self.arch.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()

    def _attention_block(self, index, layer: LayerWeights, hidden, batch, kv_cache, cos, sin) -> torch.Tensor:
        arch = self.arch
        x = rms_norm(hidden, layer.input_norm, arch.rms_norm_eps)
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, arch.num_heads, arch.head_dim)
        k = k.view(-1, arch.num_kv_heads, arch.head_dim)
        v = v.view(-1, arch.num_kv_heads, arch.head_dim)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, arch.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, arch.rms_norm_eps)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        write_kv(kv_cache, index, batch, k, v)
        out = self.attention(q, kv_cache, index, batch, self.scale)
        return F.linear(out.reshape(-1, self.q_size), layer.o)

    def _mlp_block(self, layer: LayerWeights, hidden: torch.Tensor) -> torch.Tensor:
        x = rms_norm(hidden, layer.post_norm, self.arch.rms_norm_eps)
        gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.down)
