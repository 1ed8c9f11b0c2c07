"""Fused Triton kernels for the GPU decode path: RMSNorm (optionally with the residual add), SiLU-and-mul,
and RoPE with the paged KV-cache write. One launch each.

Why: a batch-1 decode step of an 8B model spends most of its launches on tiny element-wise work. Written
with torch ops (TorchOps in workers/engine/ops.py), one layer's two residual adds and norms, rotary
embedding, KV write and SiLU are about 40 launches of a microsecond or two each, even inside a CUDA
graph; these kernels make them four.

Arithmetic follows the torch path (which follows transformers) rounding step by rounding step, so that
greedy output stays token-for-token identical to it:

- every intermediate the torch path stores in the model dtype is rounded to that dtype here too (the
  residual sum, the normalized row before the weight, cos and sin, each product of the rotation);
- everything between those roundings is float32, as torch computes it internally (`opmath`);
- transcendental functions are libdevice's accurate `cosf`, `sinf` and `expf`, and the SiLU division is
  IEEE-rounded, as in torch's CUDA kernels; not the `.approx` instructions, which are specified only up
  to |x| of about 100*pi, while rotary angles reach 1.3e5 rad at a 128k context.

What remains different is the order of the float32 sum of squares in the norms, which moves a few
results in 1e4 by one unit in the last place of bf16/fp16.

All wrappers are CUDA-graph safe: no host sync and no tensor value read on the host; launch grids come
from tensor sizes only. Inputs may be strided views (rows of a larger buffer, q/k/v slices of a fused
projection, a KV cache viewed over a page pool); only the last dimension must be contiguous, which keeps
the loads 16 bytes wide.

Triton's interpreter (TRITON_INTERPRET=1, used by the CPU tests) has no libdevice and truncates
float32 -> bfloat16 casts instead of rounding to nearest even (seen with Triton 3.6); the kernels take
an `INTERPRETED` constexpr that swaps in numpy-backed math and an explicit round-to-nearest-even there.
Compiled code never sees that branch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction

MAX_NORM_WIDTH = 32768  # one program holds a whole row in registers; wider rows would need a looped kernel
SILU_BLOCK = 1024  # output columns per program: 16-byte bf16 accesses with 4 warps, 14 programs per row at I=14336
ROPE_ELEMENTS_PER_PROGRAM = 512  # heads * head_dim per program: ~10 programs per token at Llama-8B shapes

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- element-wise helpers -------------------------------------------------------------------------------


@triton.jit
def _round(x, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 `x` rounded to nearest-even in DTYPE, returned as float32 (exactly representable in DTYPE).

    This is where the torch path would store an intermediate in the model dtype. The interpreter's
    bf16 cast truncates, so there the rounding is done on the bits (NaN passed through unchanged).
    """
    if INTERPRETED and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _exp(x, INTERPRETED: tl.constexpr):
    """expf as torch's CUDA kernels compute it (tl.exp lowers to the approximate ex2)."""
    if INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def _cos_sin(x, INTERPRETED: tl.constexpr):
    """cosf and sinf with full range reduction (angles reach position * 1.0 rad for the first frequency)."""
    if INTERPRETED:
        return tl.cos(x), tl.sin(x)
    else:
        return libdevice.cos(x), libdevice.sin(x)


# --- RMSNorm --------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr,
    stride_x0, stride_x1, stride_r0, stride_o0, stride_o1,
    n_cols, eps,
    BLOCK_N: tl.constexpr, ADD_RESIDUAL: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """One row (program (i, j) is row [i, j] of a [R0, R1, N] view): optional residual add, then RMSNorm.

    The whole row sits in registers, so x is read once; with ADD_RESIDUAL the row of x is fully loaded
    before `out` is written, which makes `out` aliasing `x` safe.
    """
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + i * stride_x0 + j * stride_x1 + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # issued with x: one memory round trip
    if ADD_RESIDUAL:
        res_row = res_ptr + i * stride_r0 + cols
        x = _round(x + tl.load(res_row, mask=mask, other=0.0).to(tl.float32), dtype, INTERPRETED)
        tl.store(res_row, x.to(dtype), mask=mask)
    variance = tl.sum(x * x, axis=0) / n_cols
    normed = _round(x * tl.rsqrt(variance + eps), dtype, INTERPRETED)
    y = _round(normed * w, dtype, INTERPRETED)
    tl.store(out_ptr + i * stride_o0 + j * stride_o1 + cols, y.to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension of x ([T, N] or [T, H, N]) as the torch path's; returns `out`.

    Not in place unless `out` is x. The 3-D form serves Qwen3's per-head q/k norm on a slice of the
    fused projection. `out` (same shape and dtype as x) may be a strided view.
    """
    _check_norm_args(x, weight, "x")
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    _check_same_layout_kind(out, x, "out")
    x3, out3 = (t if t.dim() == 3 else t.unsqueeze(1) for t in (x, out))
    _launch_norm(x3, None, weight, out3, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`residual += x` in place (rounded to the dtype, as `hidden = hidden + delta`), then returns
    rms_norm(residual) in `out`.

    x, residual and out are [T, N] in one dtype; out may be x itself (each row of x is read before its
    row of out is written), which saves the allocation in a captured step.
    """
    _check_norm_args(x, weight, "x")
    _check_same_layout_kind(residual, x, "residual")
    if x.dim() != 2:
        raise ValueError(f"fused_add_rms_norm takes [T, N] rows, got x of shape {tuple(x.shape)}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    _check_same_layout_kind(out, x, "out")
    _launch_norm(x.unsqueeze(1), residual, weight, out.unsqueeze(1), eps)
    return out


def _launch_norm(x3: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, out3: torch.Tensor, eps: float) -> None:
    rows, inner, n_cols = x3.shape
    if rows * inner == 0:
        return
    res = residual if residual is not None else x3  # a placeholder pointer: unused without ADD_RESIDUAL
    block_n = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(rows, inner)](
        x3, res, weight, out3,
        x3.stride(0), x3.stride(1), res.stride(0), out3.stride(0), out3.stride(1),
        n_cols, float(eps),
        BLOCK_N=block_n, ADD_RESIDUAL=residual is not None, INTERPRETED=_INTERPRETED,
        num_warps=min(max(block_n // 512, 1), 16),
    )  # fmt: skip


# --- SiLU and mul ---------------------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr, out_ptr, stride_in, stride_out, width,
    BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """Columns [pid1 * BLOCK, +BLOCK) of one token: silu(gate) rounded to the dtype, times up, rounded."""
    tok = tl.program_id(0).to(tl.int64)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    row = gate_up_ptr + tok * stride_in + cols
    gate = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + width, mask=mask, other=0.0).to(tl.float32)
    silu = _round(tl.div_rn(gate, 1.0 + _exp(-gate, INTERPRETED)), dtype, INTERPRETED)
    y = _round(silu * up, dtype, INTERPRETED)
    tl.store(out_ptr + tok * stride_out + cols, y.to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [T, 2I] (gate columns first, as the fused gate/up projection) -> silu(gate) * up [T, I].

    Matches `F.silu(gate) * up` in the dtype. Not in place; `out` may be a strided view.
    """
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2 * I], got {tuple(gate_up.shape)}")
    _check_dtype(gate_up, "gate_up")
    _check_last_dim_contiguous(gate_up, "gate_up")
    tokens, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(tokens, width) if out is None else out
    if out.shape != (tokens, width) or out.dtype != gate_up.dtype or out.device != gate_up.device:
        raise ValueError(f"out must be [{tokens}, {width}] {gate_up.dtype}, got {tuple(out.shape)} {out.dtype}")
    _check_last_dim_contiguous(out, "out")
    if tokens == 0 or width == 0:
        return out
    block = min(SILU_BLOCK, triton.next_power_of_2(width))
    _silu_and_mul_kernel[(tokens, triton.cdiv(width, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), width,
        BLOCK=block, INTERPRETED=_INTERPRETED, num_warps=4 if block >= 512 else 1,
    )  # fmt: skip
    return out


# --- RoPE and the KV-cache write ------------------------------------------------------------------------


@triton.jit
def _rope_and_cache_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, cache_ptr, slot_blocks_ptr, slot_offsets_ptr,
    q_norm_ptr, k_norm_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ckv, stride_ct, stride_ch,
    scaling, eps,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, NUM_Q_GROUPS: tl.constexpr, QK_NORM: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """Program (t, g): token t, head group g. Groups below NUM_Q_GROUPS rotate BLOCK_H query heads in
    place; the others rotate BLOCK_H key heads in place and store them, with their value heads, into the
    token's cache slot.

    Splitting a token over head groups spreads batch-1 decode over ~10 multiprocessors instead of one.
    Both kinds of group run one branch-free body (pointers chosen by `is_kv`, cache stores masked), and
    every load is issued before the long cos/sin code so that their latencies overlap it.

    Rotate-half on the halves x1, x2 of a head, cos and sin being equal on both halves:
    out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin, each product and each sum rounded as torch does.
    A negative slot block id marks a padding row of a captured graph: its cache write is masked off
    (vLLM's slot_mapping == -1); its q and k are still rotated (harmless, nothing reads them).
    """
    tok = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    dtype: tl.constexpr = q_ptr.dtype.element_ty
    is_kv = group >= NUM_Q_GROUPS
    heads = tl.where(is_kv, group - NUM_Q_GROUPS, group) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    h = heads[:, None].to(tl.int64)
    mask = (heads[:, None] < tl.where(is_kv, NUM_KV_HEADS, NUM_HEADS)) & (d[None, :] < HALF)
    row = tl.where(is_kv, k_ptr + tok * stride_kt, q_ptr + tok * stride_qt)
    ptr1 = row + h * tl.where(is_kv, stride_kh, stride_qh) + d[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    block = tl.load(slot_blocks_ptr + tok).to(tl.int64)
    offset = tl.load(slot_offsets_ptr + tok).to(tl.int64)
    cache_mask = mask & is_kv & (block >= 0)
    v_ptr1 = v_ptr + tok * stride_vt + h * stride_vh + d[None, :]
    v1 = tl.load(v_ptr1, mask=cache_mask)
    v2 = tl.load(v_ptr1 + HALF, mask=cache_mask)
    pos = tl.load(pos_ptr + tok).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + d, mask=d < HALF, other=0.0)
    if QK_NORM:
        norm_ptr = tl.where(is_kv, k_norm_ptr, q_norm_ptr)
        w1 = tl.load(norm_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(norm_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
        r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        x1 = _round(_round(x1 * r, dtype, INTERPRETED) * w1, dtype, INTERPRETED)
        x2 = _round(_round(x2 * r, dtype, INTERPRETED) * w2, dtype, INTERPRETED)
    # cos and sin exactly as the torch path: float32 angles, scaled, rounded to the model dtype.
    cos, sin = _cos_sin(pos * inv_freq, INTERPRETED)
    cos = _round(cos * scaling, dtype, INTERPRETED)[None, :]
    sin = _round(sin * scaling, dtype, INTERPRETED)[None, :]
    out1 = _round(_round(x1 * cos, dtype, INTERPRETED) - _round(x2 * sin, dtype, INTERPRETED), dtype, INTERPRETED)
    out2 = _round(_round(x2 * cos, dtype, INTERPRETED) + _round(x1 * sin, dtype, INTERPRETED), dtype, INTERPRETED)
    tl.store(ptr1, out1.to(dtype), mask=mask)
    tl.store(ptr1 + HALF, out2.to(dtype), mask=mask)
    dst = cache_ptr + block * stride_cb + offset * stride_ct + h * stride_ch + d[None, :]
    tl.store(dst, out1.to(dtype), mask=cache_mask)
    tl.store(dst + HALF, out2.to(dtype), mask=cache_mask)
    tl.store(dst + stride_ckv, v1, mask=cache_mask)
    tl.store(dst + stride_ckv + HALF, v2, mask=cache_mask)


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    kv_cache: torch.Tensor,
    layer: int,
    slot_block_ids: torch.Tensor,
    slot_offsets: torch.Tensor,
    *,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    norm_eps: float | None = None,
) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] in place with rotate-half RoPE, and store the rotated k and
    v [T, KVH, D] at cache slot (slot_block_ids[t], slot_offsets[t]) of `layer`, in one launch.

    Same arithmetic as TorchOps.rope_and_cache (workers/engine/ops.py); with `q_norm`/`k_norm` [D]
    and `norm_eps`, Qwen3's per-head RMSNorm of q and k comes first, in the same launch. positions and
    slot tensors are [T] int32/int64; inv_freq is [D/2] float32 (as `rope_inv_freq` gives); kv_cache is [num_blocks, num_layers, 2,
    block_size, KVH, D], any strides with a contiguous last dimension. A negative slot block id leaves
    that token's cache slot unwritten. Returns nothing: q, k and the cache are the outputs.
    """
    tokens, num_heads, head_dim = _check_rope_args(q, k, v, positions, inv_freq, kv_cache, layer, slot_block_ids, slot_offsets)
    qk_norm = q_norm is not None
    if (k_norm is not None) != qk_norm or (norm_eps is not None) != qk_norm:
        raise ValueError("q_norm, k_norm and norm_eps go together: pass all three or none")
    if qk_norm:
        for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
            if w.shape != (head_dim,) or w.dtype != q.dtype or w.device != q.device or w.stride(0) != 1:
                raise ValueError(f"{name} must be a contiguous [{head_dim}] {q.dtype} tensor on {q.device}")
    if tokens == 0:
        return
    num_kv_heads = k.shape[1]
    half = head_dim // 2
    block_d = 2 * triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(num_heads, num_kv_heads)), ROPE_ELEMENTS_PER_PROGRAM // block_d))
    q_groups = triton.cdiv(num_heads, block_h)
    cache = kv_cache.select(1, layer)  # [num_blocks, 2, block_size, KVH, D]
    norms = (q_norm, k_norm) if qk_norm else (inv_freq, inv_freq)  # placeholder pointers without QK_NORM
    _rope_and_cache_kernel[(tokens, q_groups + triton.cdiv(num_kv_heads, block_h))](
        q, k, v, positions, inv_freq, cache, slot_block_ids, slot_offsets, *norms,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        float(attention_scaling), float(norm_eps) if qk_norm else 0.0,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_H=block_h, NUM_Q_GROUPS=q_groups, QK_NORM=qk_norm, INTERPRETED=_INTERPRETED,
        num_warps=1,  # 256-element half tiles: 16-byte accesses per thread, and the q/k-norm sum stays in one warp
    )  # fmt: skip


# --- argument checks (host side, shapes and dtypes only: nothing here syncs) ----------------------------


def _check_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dimension (stride 1), got strides {t.stride()}")


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be [T, N] or [T, H, N], got shape {tuple(x.shape)}")
    _check_dtype(x, name)
    _check_last_dim_contiguous(x, name)
    n_cols = x.shape[-1]
    if not 0 < n_cols <= MAX_NORM_WIDTH:
        raise ValueError(f"rows of {n_cols} elements are outside (0, {MAX_NORM_WIDTH}]")
    if weight.shape != (n_cols,) or weight.dtype != x.dtype or weight.device != x.device or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [{n_cols}] {x.dtype} tensor on {x.device}, got {tuple(weight.shape)} {weight.dtype}")


def _check_same_layout_kind(t: torch.Tensor, like: torch.Tensor, name: str) -> None:
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} must match x ({tuple(like.shape)} {like.dtype}), got {tuple(t.shape)} {t.dtype}")
    _check_last_dim_contiguous(t, name)


def _check_rope_args(q, k, v, positions, inv_freq, kv_cache, layer, slot_block_ids, slot_offsets) -> tuple[int, int, int]:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"q must be [T, H, D] and k, v [T, KVH, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    tokens, num_heads, head_dim = q.shape
    if kv_cache.dim() != 6 or k.shape[0] != tokens or k.shape[2] != head_dim or kv_cache.shape[4:] != k.shape[1:]:
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, kv_cache {tuple(kv_cache.shape)}")
    if head_dim % 2:
        raise ValueError(f"rotate-half RoPE needs an even head_dim, got {head_dim}")
    _check_dtype(q, "q")
    for name, t in (("q", q), ("k", k), ("v", v), ("kv_cache", kv_cache)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
        _check_last_dim_contiguous(t, name)
    if not 0 <= layer < kv_cache.shape[1]:
        raise ValueError(f"layer {layer} out of range [0, {kv_cache.shape[1]})")
    if inv_freq.shape != (head_dim // 2,) or inv_freq.dtype != torch.float32 or inv_freq.device != q.device or inv_freq.stride(0) != 1:
        raise ValueError(f"inv_freq must be a contiguous [{head_dim // 2}] float32 tensor on {q.device}")
    for name, t in (("positions", positions), ("slot_block_ids", slot_block_ids), ("slot_offsets", slot_offsets)):
        if t.shape != (tokens,) or t.dtype not in (torch.int32, torch.int64) or t.device != q.device:
            raise ValueError(f"{name} must be [{tokens}] int32/int64 on {q.device}, got {tuple(t.shape)} {t.dtype}")
        if tokens > 1 and t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous")
    return tokens, num_heads, head_dim


# Decided when the kernels were decorated, exactly as Triton decided it (TRITON_INTERPRET at import).
_INTERPRETED = isinstance(_rms_norm_kernel, InterpretedFunction)
