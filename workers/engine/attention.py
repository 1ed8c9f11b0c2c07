"""Paged attention with torch ops (the CPU path, and the reference for GPU kernels).

The KV cache of a model is one tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
over the model's KV space in the page pool: a block holds K and V of all layers for `block_size` tokens.
Each sequence reads its keys and values through its block table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.engine.batch import ForwardBatch


def write_kv(kv_cache: torch.Tensor, layer: int, batch: ForwardBatch, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store this step's keys and values ([T, kv_heads, head_dim]) into their slots."""
    kv_cache[batch.slot_block_ids, layer, 0, batch.slot_offsets] = k
    kv_cache[batch.slot_block_ids, layer, 1, batch.slot_offsets] = v


def gather_kv(kv_cache: torch.Tensor, layer: int, block_table: torch.Tensor, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one sequence's first `context_len` tokens, [context_len, kv_heads, head_dim]."""
    blocks = kv_cache.select(1, layer).index_select(0, block_table)  # [n, 2, block_size, kv_heads, head_dim]
    k = blocks[:, 0].flatten(0, 1)[:context_len]
    v = blocks[:, 1].flatten(0, 1)[:context_len]
    return k, v


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, batch: ForwardBatch, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new queries ([T, heads, head_dim]) over its cached context."""
    if batch.is_decode_only and len(batch.query_lens) > 1:
        return _decode_batched(q, kv_cache, layer, batch, scale)
    out = torch.empty_like(q)
    for start, q_len, ctx_len, table in zip(batch.query_starts, batch.query_lens, batch.context_lens, batch.block_tables):
        k, v = gather_kv(kv_cache, layer, table, ctx_len)
        q_s = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, d]
        k_s = k.transpose(0, 1).unsqueeze(0)
        v_s = v.transpose(0, 1).unsqueeze(0)
        if q_len == ctx_len:
            o = F.scaled_dot_product_attention(q_s, k_s, v_s, is_causal=q_len > 1, scale=scale, enable_gqa=True)
        elif q_len == 1:
            o = F.scaled_dot_product_attention(q_s, k_s, v_s, scale=scale, enable_gqa=True)
        else:  # a chunk after a cached prefix: query i sees keys 0 .. ctx_len - q_len + i
            rows = torch.arange(q_len, device=q.device).unsqueeze(1) + (ctx_len - q_len)
            mask = torch.arange(ctx_len, device=q.device).unsqueeze(0) <= rows
            o = F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + q_len] = o.squeeze(0).transpose(0, 1)
    return out


def _decode_batched(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, batch: ForwardBatch, scale: float) -> torch.Tensor:
    """One query per sequence: every context gathered in one indexing call, padded and masked to the longest."""
    tables, mask = batch.padded_context
    num_seqs, max_ctx = tables.shape[0], mask.shape[-1]
    layer_kv = kv_cache.select(1, layer)  # index_select of one layer's view: about 2x faster than kv_cache[tables, layer]
    blocks = layer_kv.index_select(0, tables.flatten()).unflatten(0, tables.shape)  # [S, max_blocks, 2, block_size, kv_heads, head_dim]
    keys = blocks[:, :, 0].flatten(1, 2)[:, :max_ctx]  # [S, max_ctx, kv_heads, head_dim]
    values = blocks[:, :, 1].flatten(1, 2)[:, :max_ctx]
    # Masked slots hold other tokens' (finite) K/V: their softmax weight is exactly 0.
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True
    )  # [S, heads, 1, d]
    return o.squeeze(2)
