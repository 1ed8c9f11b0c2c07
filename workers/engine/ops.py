"""The per-layer operations of the model, in two implementations with one interface.

`TorchOps` (CPU; the reference) uses plain torch ops in exactly transformers' order, so greedy output is
token-identical to it. `TritonOps` (GPU) fuses the small elementwise steps (residual add + RMSNorm, RoPE +
KV-cache write, SiLU-and-mul) and uses paged-attention kernels that read block tables from tensors, so a
decode step is a short, fixed sequence of launches that a CUDA graph can replay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.engine.attention import paged_attention, write_kv
from workers.engine.batch import ForwardBatch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TorchOps:
    name = "torch"

    def __init__(self, inv_freq: torch.Tensor, rope_scaling: float):
        self.inv_freq = inv_freq
        self.rope_scaling = rope_scaling

    def rms_norm(self, x, weight, eps):
        return rms_norm(x, weight, eps)

    def add_rms_norm(self, delta, residual, weight, eps):
        """(residual + delta, rms_norm of it): the residual stream update and the next norm."""
        residual = residual + delta
        return rms_norm(residual, weight, eps), residual

    def rope_and_cache(self, q, k, v, batch: ForwardBatch, kv_cache, layer, q_norm=None, k_norm=None, eps=0.0):
        """Rotate q and k (after Qwen3's per-head q/k norm, if given); store k and v in the cache; return q."""
        if q_norm is not None:
            q = rms_norm(q, q_norm, eps)
            k = rms_norm(k, k_norm, eps)
        cos, sin = self._cos_sin(batch.positions, q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        write_kv(kv_cache, layer, batch, k, v)
        return q

    def attention(self, q, kv_cache, layer, batch, scale):
        return paged_attention(q, kv_cache, layer, batch, scale)

    def silu_and_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _cos_sin(self, positions, dtype):
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(dtype)
        sin = (emb.sin() * self.rope_scaling).to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)


class TritonOps:
    """Fused GPU kernels (workers/engine/triton_ops.py, triton_attention.py); needs CUDA and Triton."""

    name = "triton"

    def __init__(self, inv_freq: torch.Tensor, rope_scaling: float):
        from workers.engine import triton_attention, triton_ops

        self._kernels = triton_ops
        self._attention = triton_attention
        self.inv_freq = inv_freq
        self.rope_scaling = rope_scaling

    def rms_norm(self, x, weight, eps):
        return self._kernels.rms_norm(x, weight, eps)

    def add_rms_norm(self, delta, residual, weight, eps):
        normed = self._kernels.fused_add_rms_norm(delta, residual, weight, eps)
        return normed, residual  # residual was updated in place

    def rope_and_cache(self, q, k, v, batch: ForwardBatch, kv_cache, layer, q_norm=None, k_norm=None, eps=0.0):
        self._kernels.rope_and_cache(
            q, k, v, batch.positions, self.inv_freq, self.rope_scaling, kv_cache, layer, batch.slot_block_ids,
            batch.slot_offsets, q_norm=q_norm, k_norm=k_norm, norm_eps=eps if q_norm is not None else None,
        )
        return q

    def attention(self, q, kv_cache, layer, batch: ForwardBatch, scale):
        meta = batch.device_meta
        if batch.decode_only:
            return self._attention.decode_attention(q, kv_cache, layer, meta.block_tables, meta.context_lens, scale)
        return self._attention.prefill_attention(
            q, kv_cache, layer, meta.query_starts, meta.query_lens, meta.context_lens, meta.block_tables, meta.max_query_len, scale
        )

    def silu_and_mul(self, gate_up):
        return self._kernels.silu_and_mul(gate_up)
