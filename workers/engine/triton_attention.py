"""Paged attention kernels in Triton for the GPU engine (decode and varlen prefill).

The KV cache of a model is one tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim],
a strided view into the page pool: the kernels take every stride from the tensor and assume no
contiguity. A sequence reads its keys and values through its block table, one physical block id per
`block_size` tokens.

Three properties matter beyond the arithmetic:

- Cache slots past a sequence's context hold whatever the pool held before (stale KV, another model's
  weights), so any bit pattern, NaN and Inf included. Every K and V load is masked to the context:
  multiplying a stale NaN value by a zero probability would still give NaN.
- Speed needs aligned layouts (16-byte aligned base pointers, every stride but the last divisible
  by 16; Triton specializes on that): loads are then 16-byte cp.async copies. Other layouts compute
  the same result through scalar loads.
- `decode_attention` runs inside captured CUDA graphs: it never reads a tensor value on the host, and
  its launch grid depends only on shapes (the batch size and the block table's width), so one capture
  serves every mix of context lengths up to the table's capacity.

Arithmetic: scores, softmax and the output accumulate in float32 (softmax in base 2 with the scale
folded in); the probabilities are rounded to the cache dtype before the P @ V product, as in
FlashAttention. float32 caches use exact ("ieee") products so that tests can hold them to 1e-4.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Split-K policy for decode: aim for this many programs per multiprocessor, and never cut a context
# into pieces shorter than MIN_SPLIT_TOKENS (below that the reduce costs more than the split saves).
PROGRAMS_PER_SM = 2
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel (block_m is unused by decode)."""

    block_n: int
    num_warps: int
    num_stages: int
    block_m: int = 0


# --- kernels ------------------------------------------------------------------------------------------


@triton.jit
def _kv_tile_offsets(table_row, toks, valid, max_blocks, BLOCK_SIZE: tl.constexpr, stride_block, stride_tok):
    """Element offsets of tokens `toks` of one sequence inside its layer's KV, through the block table.

    Block ids are widened to int64 before the multiply: a pool of many blocks overflows int32 offsets.
    """
    block_ids = tl.load(table_row + toks // BLOCK_SIZE, mask=valid & (toks // BLOCK_SIZE < max_blocks), other=0)
    return block_ids.to(tl.int64) * stride_block + (toks % BLOCK_SIZE).to(tl.int64) * stride_tok


@triton.jit
def _softmax_step(q, k, v, m_i, l_i, acc, score_mask, qk_scale, APPLY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one key tile into the running (max, sum, output) of an online softmax, in base 2.

    Each row must see at least one key of the first tile it folds (its max must turn finite there):
    key 0 is visible to every query, so starting at key 0 guarantees it.
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if APPLY_MASK:
        s = tl.where(score_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# Values that change from step to step are not specialized on (divisibility by 16, == 1): one compiled
# kernel serves every batch composition.
@triton.jit(do_not_specialize=["max_blocks", "num_splits"])
def _decode_split_kernel(
    q_ptr, kv_ptr, block_tables_ptr, context_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, max_blocks, num_splits, group,
    stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kkv, stride_kt, stride_kh, stride_kd,
    stride_bts,
    stride_os, stride_oh, stride_od,
    stride_ps, stride_ph, stride_pk, stride_pd,
    stride_ls, stride_lh, stride_lk,
    BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (sequence, kv head, split): the `group` query heads of that kv head over one slice of the context.

    Packing the query heads into the rows of one tile reads each K/V element once per kv head, and makes
    the score product a matrix product. Without SPLIT (one split) it writes the final output directly;
    otherwise it writes the slice's normalized output and base-2 log-sum-exp for `_decode_reduce_kernel`.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.minimum(tl.load(context_lens_ptr + seq), max_blocks * BLOCK_SIZE)
    # Splits are whole tiles, so that a tile never straddles two programs.
    split_len = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * group + offs_g
    g_mask = offs_g < group
    d_mask = offs_d < HEAD_DIM
    q_ptrs = q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bts
    head_ptr = kv_ptr + kv_head.to(tl.int64) * stride_kh + offs_d[None, :] * stride_kd
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile in range(start, end, BLOCK_N):
        toks = tile + offs_n
        valid = toks < end
        offs = _kv_tile_offsets(table_row, toks, valid, max_blocks, BLOCK_SIZE, stride_kb, stride_kt)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(head_ptr + offs[:, None], mask=kv_mask, other=0.0)
        v = tl.load(head_ptr + stride_kkv + offs[:, None], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, valid[None, :], qk_scale, True, DOT_PRECISION)

    # An empty slice (or an empty context: a padding slot of a captured batch) has l == 0: it writes
    # zeros and a log-sum-exp of -inf, which the reduce weighs as nothing.
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if not SPLIT:
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        row = seq.to(tl.int64) * stride_ps + heads * stride_ph + split * stride_pk
        tl.store(part_out_ptr + row[:, None] + offs_d[None, :] * stride_pd, o, mask=o_mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        lse_ptrs = part_lse_ptr + seq.to(tl.int64) * stride_ls + heads * stride_lh + split * stride_lk
        tl.store(lse_ptrs, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_ps, stride_ph, stride_pk, stride_pd,
    stride_ls, stride_lh, stride_lk,
    stride_os, stride_oh, stride_od, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):  # fmt: skip
    """One (sequence, query head): merge the splits' outputs, each weighted by its share of the softmax mass."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    k_mask = offs_k < num_splits
    d_mask = offs_d < HEAD_DIM
    lse_ptrs = part_lse_ptr + seq.to(tl.int64) * stride_ls + head * stride_lh + offs_k * stride_lk
    lse = tl.load(lse_ptrs, mask=k_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: every weight is 0, not NaN
    w = tl.exp2(lse - m)
    row = seq.to(tl.int64) * stride_ps + head * stride_ph
    o_ptrs = part_out_ptr + row + offs_k[:, None] * stride_pk + offs_d[None, :] * stride_pd
    o = tl.load(o_ptrs, mask=k_mask[:, None] & d_mask[None, :], other=0.0)
    num = tl.sum(o * w[:, None], 0)
    den = tl.sum(w, 0)
    res = num / tl.where(den > 0.0, den, 1.0)
    out_ptrs = out_ptr + seq.to(tl.int64) * stride_os + head * stride_oh + offs_d * stride_od
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit(do_not_specialize=["max_blocks"])
def _prefill_kernel(
    q_ptr, kv_ptr, block_tables_ptr, query_starts_ptr, query_lens_ptr, context_lens_ptr, out_ptr,
    qk_scale, max_blocks, group,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kkv, stride_kt, stride_kh, stride_kd,
    stride_bts,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (query tile, head, sequence) of a varlen batch, FlashAttention-style over the paged context.

    Query row i of a chunk sits at position prefix + i and sees keys 0 .. prefix + i. Key tiles that
    every row of the tile sees run without a mask; only the tiles on the diagonal pay for one.
    """
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_len = tl.load(query_lens_ptr + seq)
    if tile * BLOCK_M >= q_len:
        return
    q_start = tl.load(query_starts_ptr + seq)
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - q_len

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q_ptrs = q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bts
    head_ptr = kv_ptr + (head // group).to(tl.int64) * stride_kh + offs_d[None, :] * stride_kd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys below full_end are visible to every row of the tile: no mask. The rest, up to what the
    # tile's last row sees, lie on the diagonal and are masked per row.
    full_end = (prefix + tile * BLOCK_M + 1) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(ctx, prefix + (tile + 1) * BLOCK_M)
    for tile_n in range(0, full_end, BLOCK_N):
        offs = _kv_tile_offsets(table_row, tile_n + offs_n, offs_n >= 0, max_blocks, BLOCK_SIZE, stride_kb, stride_kt)
        k = tl.load(head_ptr + offs[:, None], mask=d_mask[None, :], other=0.0)
        v = tl.load(head_ptr + stride_kkv + offs[:, None], mask=d_mask[None, :], other=0.0)
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, None, qk_scale, False, DOT_PRECISION)
    last_key = prefix + offs_m  # row i's last visible key
    for tile_n in range(full_end, kv_end, BLOCK_N):
        toks = tile_n + offs_n
        valid = toks < kv_end
        offs = _kv_tile_offsets(table_row, toks, valid, max_blocks, BLOCK_SIZE, stride_kb, stride_kt)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(head_ptr + offs[:, None], mask=kv_mask, other=0.0)
        v = tl.load(head_ptr + stride_kkv + offs[:, None], mask=kv_mask, other=0.0)
        score_mask = (toks[None, :] <= last_key[:, None]) & valid[None, :]
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, score_mask, qk_scale, True, DOT_PRECISION)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# --- host side ----------------------------------------------------------------------------------------


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Attention of one new query per sequence over its whole cached context (the current token included).

    q: [S, H, D], query head h reading kv head h // (H / KVH) (transformers' repeat_kv order);
    block_tables: [S, max_blocks] int32 (rows padded with any block id); context_lens: [S] int32, at
    most max_blocks * block_size (longer contexts are cut to that, never read out of bounds); a context
    of 0 gives zeros. Returns `out` ([S, H, D], q's dtype; allocated when None). `num_splits` and
    `config` override the split-K policy (`choose_num_splits`) and the tiles (`decode_config`), for
    tests and tuning. Safe to capture in a CUDA graph: no host syncs, and the launch depends only on
    shapes.
    """
    _check_common(q, kv_cache, layer, block_tables, context_lens)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[4], kv_cache.shape[3]
    max_blocks = block_tables.shape[1]
    out = _output(q, out)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_blocks * block_size, _num_sms(q.device))
    elif num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
    cfg = config or decode_config(head_dim, q.dtype, q.device.type)
    group = num_heads // num_kv_heads
    block_d = _block_d(head_dim)
    kv = kv_cache.select(1, layer)  # [num_blocks, 2, block_size, kv_heads, head_dim]
    if num_splits > 1:
        part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:  # the kernel writes `out` directly; these are never read
        part_out, part_lse = out, out
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, kv, block_tables, context_lens, out, part_out, part_lse,
        scale * LOG2E, max_blocks, num_splits, group,
        *q.stride(), *kv.stride(), block_tables.stride(0), *out.stride(),
        *_strides(part_out, 4, num_splits), *_strides(part_lse, 3, num_splits),
        BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=cfg.block_n, SPLIT=num_splits > 1, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, *part_out.stride(), *part_lse.stride(), *out.stride(), num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SPLITS=triton.next_power_of_2(num_splits), num_warps=4 if head_dim >= 128 else 2,
        )  # fmt: skip
    return out


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Causal attention of a varlen batch of chunks over their cached prefixes (chunked prefill).

    q: [T, H, D], the new rows of every sequence concatenated (heads grouped over kv heads as in
    `decode_attention`); query_starts / query_lens / context_lens: [S] int32, context_len counting the
    cached prefix plus this chunk, whose K/V is already written (query_len <= context_len <=
    max_blocks * block_size); query row i of a sequence sees keys 0 .. context_len - query_len + i. `max_query_len` (a host int,
    at least every query_len) sizes the grid. Rows of q that no sequence covers are left untouched in
    `out`. Returns `out` ([T, H, D], q's dtype; allocated when None). `config` overrides the tiles
    (`prefill_config`), for tuning.
    """
    _check_common(q, kv_cache, layer, block_tables, context_lens)
    for name, t in (("query_starts", query_starts), ("query_lens", query_lens)):
        if t.dtype != torch.int32 or t.shape != context_lens.shape or t.device != q.device:
            raise ValueError(f"{name} must be int32 of shape {tuple(context_lens.shape)} on {q.device}")
    num_seqs = context_lens.shape[0]
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = kv_cache.shape[4], kv_cache.shape[3]
    out = _output(q, out)
    if num_seqs == 0 or max_query_len <= 0 or q.shape[0] == 0:
        return out
    cfg = config or prefill_config(head_dim, q.dtype, q.device.type)
    kv = kv_cache.select(1, layer)
    grid = (triton.cdiv(max_query_len, cfg.block_m), num_heads, num_seqs)
    _prefill_kernel[grid](
        q, kv, block_tables, query_starts, query_lens, context_lens, out,
        scale * LOG2E, block_tables.shape[1], num_heads // num_kv_heads,
        *q.stride(), *kv.stride(), block_tables.stride(0), *out.stride(),
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Programs per (sequence, kv head) for decode, from shapes only (so a captured graph stays valid).

    A batch of a few sequences has too few (sequence, kv head) pairs to keep every multiprocessor
    reading, so each context is cut into slices that run in parallel (flash-decoding) and a second
    kernel merges them; a large batch fills the GPU by itself and takes the single-kernel path.
    `max_context` is the block table's capacity, not a context length: the split count must not
    depend on tensor values.
    """
    wanted = triton.cdiv(PROGRAMS_PER_SM * num_sms, max(1, num_seqs * num_kv_heads))
    useful = triton.cdiv(max_context, MIN_SPLIT_TOKENS)
    return max(1, min(wanted, useful, MAX_SPLITS))


def decode_config(head_dim: int, dtype: torch.dtype, device_type: str = "cuda") -> KernelConfig:
    """Tiles for decode. 64 keys a step keep 32 KB of 16-bit K+V per stage in flight at head_dim 128
    (96 registers, no spills on sm_90 with Triton 3.6); float32 needs 16 keys to stay out of local
    memory. The interpreter (CPU) pays per operation, not per element: it gets the largest tiles."""
    if device_type == "cuda" and (dtype == torch.float32 or head_dim > 128):
        return KernelConfig(block_n=16, num_warps=4, num_stages=2)
    return KernelConfig(block_n=64, num_warps=4, num_stages=2)


def prefill_config(head_dim: int, dtype: torch.dtype, device_type: str = "cuda") -> KernelConfig:
    """Tiles for prefill. 128x64 for 16-bit head_dim <= 128 (FlashAttention-2's Hopper shape; wgmma,
    no spills on sm_90 with Triton 3.6). float32's exact products run on FMA units and spill above 16x16;
    head_dim 256 takes 64x32 tiles over 8 warps to fit registers. The interpreter gets the largest tiles."""
    if device_type != "cuda":
        return KernelConfig(block_m=128, block_n=64, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return KernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)
    if head_dim > 128:
        return KernelConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    return KernelConfig(block_m=128, block_n=64, num_warps=8 if head_dim > 64 else 4, num_stages=3)


def _check_common(q, kv_cache, layer, block_tables, context_lens) -> None:
    """Shape, dtype and device checks: host metadata only, so they cost nothing inside graph capture."""
    if q.dim() != 3 or kv_cache.dim() != 6:
        raise ValueError(f"q must be [tokens, heads, head_dim] and kv_cache 6-d, got {tuple(q.shape)}, {tuple(kv_cache.shape)}")
    num_blocks, num_layers, two, block_size, num_kv_heads, head_dim = kv_cache.shape
    if two != 2 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_cache {tuple(kv_cache.shape)} (heads must be a multiple of kv heads)")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range [0, {num_layers})")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if q.dtype != kv_cache.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q and kv_cache must share a dtype among fp16/bf16/fp32, got {q.dtype}, {kv_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables must be [S, max_blocks] int32 and context_lens [S] int32")
    if context_lens.shape != (block_tables.shape[0],):
        raise ValueError(f"context_lens {tuple(context_lens.shape)} does not match block_tables {tuple(block_tables.shape)}")
    if not (q.device == kv_cache.device == block_tables.device == context_lens.device):
        raise ValueError("q, kv_cache, block_tables and context_lens must be on one device")


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must match q: {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    return out


def _strides(t: torch.Tensor, ndim: int, num_splits: int) -> tuple[int, ...]:
    """Strides of a split-K buffer; zeros when the single-split path passes `out` in its place."""
    return t.stride() if num_splits > 1 else (0,) * ndim


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # 16-bit operands ignore it


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; the interpreter (CPU tensors) gets a small stand-in."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


__all__ = ["KernelConfig", "choose_num_splits", "decode_attention", "decode_config", "prefill_attention", "prefill_config"]
