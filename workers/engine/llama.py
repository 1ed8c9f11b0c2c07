"""Llama-family decoder (Llama 2/3, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm) over paged KV.

Plain tensors and functions, no nn.Module: the weights are a few fused matrices per layer (q/k/v in one,
gate/up in one), and `forward` runs a flattened batch of every sequence's new tokens. The elementwise
steps and attention come from an ops object (workers/engine/ops.py): torch ops in transformers' exact
order on the CPU (greedy output matches it token for token), fused Triton kernels on GPUs.
"""

from __future__ import annotations

import copy
import threading

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from workers.engine.batch import ForwardBatch
from workers.engine.ops import TorchOps, TritonOps
from workers.contract.sizing import Arch
from workers.weights.layout import WeightLayout, fill


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


_TRANSFORMERS_IMPORT = threading.Lock()  # transformers' lazy imports are not safe from two threads at once


def rope_inv_freq(hf_config: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling exactly as transformers computes them (all rope types)."""
    with _TRANSFORMERS_IMPORT:
        from transformers import AutoConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    # A copy: transformers rewrites a config's rope_scaling in place, and the spec that holds this dict is
    # how a worker tells whether a model changed (it did, every time, so every activation built its
    # engine again and captured its CUDA graphs again).
    config = AutoConfig.for_model(**copy.deepcopy(hf_config))
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
        ops: str = "torch",
    ):
        self.arch = arch
        self.layers = layers
        self.embed = embed
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.dtype = embed.dtype
        self.device = embed.device
        self.scale = arch.head_dim**-0.5
        inv_freq, rope_scaling = rope_inv_freq(hf_config)
        self.ops = (TritonOps if ops == "triton" else TorchOps)(inv_freq.to(self.device, torch.float32), rope_scaling)
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_views(cls, arch: Arch, hf_config: dict, views: dict[str, torch.Tensor], ops: str = "torch") -> LlamaModel:
        """A model over weight tensors laid out by WeightLayout (views into one image; nothing is copied)."""
        layers = []
        for i in range(arch.num_layers):
            p = f"layers.{i}."
            layers.append(
                LayerWeights(
                    input_norm=views[p + "input_norm"],
                    qkv=views[p + "qkv"],
                    qkv_bias=views.get(p + "qkv_bias"),
                    q_norm=views.get(p + "q_norm"),
                    k_norm=views.get(p + "k_norm"),
                    o=views[p + "o"],
                    post_norm=views[p + "post_norm"],
                    gate_up=views[p + "gate_up"],
                    down=views[p + "down"],
                )
            )
        lm_head = views["embed"] if arch.tie_word_embeddings else views["lm_head"]
        return cls(arch, hf_config, layers, views["embed"], views["final_norm"], lm_head, ops)

    @classmethod
    def from_checkpoint(
        cls,
        arch: Arch,
        hf_config: dict,
        tensors: Iterable[tuple[str, torch.Tensor]],
        device: torch.device | str,
        dtype: torch.dtype,
        ops: str = "torch",
    ) -> LlamaModel:
        """Build from (HF name, tensor) pairs into a fresh device image (tests and tools; engines use pool pages)."""
        layout = WeightLayout.of(arch, dtype)
        views = layout.views(torch.empty(layout.num_bytes, dtype=torch.uint8, device=device))
        fill(layout, views, tensors)
        return cls.from_views(arch, hf_config, views, ops)

    # --- forward --------------------------------------------------------------------------------

    def forward(self, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """Hidden states after the final norm for the rows in `batch.sample_indices`, [S, hidden]."""
        ops, eps, layers = self.ops, self.arch.rms_norm_eps, self.layers
        residual = F.embedding(batch.token_ids, self.embed)
        x = ops.rms_norm(residual, layers[0].input_norm, eps)
        for index, layer in enumerate(layers):
            delta = self._attention_block(index, layer, x, batch, kv_cache)
            x, residual = ops.add_rms_norm(delta, residual, layer.post_norm, eps)
            delta = self._mlp_block(layer, x)
            next_norm = layers[index + 1].input_norm if index + 1 < len(layers) else self.final_norm
            x, residual = ops.add_rms_norm(delta, residual, next_norm, eps)
        return x[batch.sample_indices]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()

    def _attention_block(self, index: int, layer: LayerWeights, x: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        arch, ops = self.arch, self.ops
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, arch.num_heads, arch.head_dim)
        k = k.view(-1, arch.num_kv_heads, arch.head_dim)
        v = v.view(-1, arch.num_kv_heads, arch.head_dim)
        q = ops.rope_and_cache(q, k, v, batch, kv_cache, index, layer.q_norm, layer.k_norm, arch.rms_norm_eps)
        out = ops.attention(q, kv_cache, index, batch, self.scale)
        return F.linear(out.reshape(-1, self.q_size), layer.o)

    def _mlp_block(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ops.silu_and_mul(F.linear(x, layer.gate_up)), layer.down)
