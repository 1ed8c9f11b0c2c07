"""Triton paged attention against a float64 reference, on the GPU or on the CPU through Triton's interpreter.

Every test runs twice: `cuda` (marked gpu; skipped without CUDA) and `interpreter` (runs only with
TRITON_INTERPRET=1 and triton importable, at smaller sizes). Without either, everything skips.

The cache is built to catch wrong addressing: it is a strided view into a larger NaN-filled pool
(padded block stride, nonzero offset), block tables are shuffled and padded with a NaN block, block 0
(where a masked-off table read lands) is NaN, and only the slots inside each context of the tested
layer hold data. A read of another layer, a slot past the context, a padding entry of a table or an
unmasked V value turns the output NaN. Outputs are filled with NaN before each call, so an unwritten
element fails too. Inputs are fresh random draws each run; a failure prints the seed.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import pytest
import torch

from workers.engine.attention import gather_kv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}  # ||out - ref|| / ||ref||
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class Target:
    device: str
    kv_heads: int  # kv heads per test model
    long: int  # the "1000+" context length
    longest: int  # a long prompt for prefill


@pytest.fixture(
    params=[pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("interpreter")],
)
def target(request) -> Target:
    if request.param == "interpreter":
        if not INTERPRET:
            pytest.skip("set TRITON_INTERPRET=1 (with triton installed) to run the kernels on the CPU")
        pytest.importorskip("triton")
        return Target("cpu", kv_heads=2, long=1100, longest=700)
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 runs the interpreter variant; unset it to run on the GPU")
    return Target("cuda", kv_heads=8, long=4099, longest=2048)


def skip_interpreter_bf16(target: Target, dtype: torch.dtype) -> None:
    """Triton's interpreter multiplies the raw bit patterns of bf16 operands in tl.dot (triton-lang/triton
    #11584, "not supported yet"), so bf16 attention is checked on the GPU only; fp16 runs the same code."""
    if target.device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bf16 tl.dot (triton-lang/triton#11584)")


@pytest.fixture
def ta(target):
    from workers.engine import triton_attention

    return triton_attention


@pytest.fixture
def gen() -> torch.Generator:
    """Fresh inputs for every run (METHOD: the kernel must compute the function on any valid input);
    failure messages carry the seed to replay one."""
    return torch.Generator().manual_seed(secrets.randbits(31))


# --- building paged inputs -------------------------------------------------------------------------------


@dataclass
class Paged:
    cache: torch.Tensor  # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim], strided, NaN outside contexts
    layer: int
    tables: torch.Tensor  # [S, max_blocks] int32
    context_lens: torch.Tensor  # [S] int32


def make_paged(gen, device, context_lens, kv_heads, head_dim, dtype, block_size=16, num_layers=3, pad=32) -> Paged:
    """A NaN pool holding random K/V for each sequence's context in one layer, through shuffled tables.

    Each pool row (block) is `pad` elements longer than a block's K/V: 32 keeps strides 16-aligned, the
    layout the fast path needs; 24 does not, and takes the scalar-load path."""
    needed = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(needed) + 2 + 6  # + block 0 and the padding block, NaN, + unused blocks
    block_numel = num_layers * 2 * block_size * kv_heads * head_dim
    pool = torch.full((num_blocks + 1, block_numel + pad), float("nan"), dtype=dtype, device=device)
    cache = pool[1:, :block_numel].view(num_blocks, num_layers, 2, block_size, kv_heads, head_dim)
    assert not cache.is_contiguous() and cache.storage_offset() > 0
    # Block 0 stays NaN too: it is where a masked-off table read lands (other=0).
    order = 1 + torch.randperm(num_blocks - 1, generator=gen)
    pad_block, free = int(order[0]), order[1:].tolist()
    max_blocks = max(needed, default=0) + 2  # padded rows
    tables = torch.full((len(context_lens), max_blocks), pad_block, dtype=torch.int32)
    layer = int(torch.randint(num_layers, (1,), generator=gen))
    blocks, offsets = [], []
    for i, (ctx, n) in enumerate(zip(context_lens, needed)):
        tables[i, :n] = torch.tensor(free[:n], dtype=torch.int32)
        free = free[n:]
        blocks += [int(tables[i, t // block_size]) for t in range(ctx)]
        offsets += [t % block_size for t in range(ctx)]
    if blocks:
        values = torch.randn(len(blocks), 2, kv_heads, head_dim, generator=gen).to(dtype)
        cache[torch.tensor(blocks), layer, :, torch.tensor(offsets)] = values.to(device)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return Paged(cache, layer, tables.to(device), lens.to(device))


def make_q(gen, device, tokens, heads, head_dim, dtype) -> torch.Tensor:
    """Queries as a strided view: the q part of a fused qkv row, as the model produces them."""
    qkv = torch.randn(tokens, heads + 2, head_dim, generator=gen).to(dtype).to(device)
    return qkv[:, :heads]


def poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def reference(q, paged: Paged, query_starts, query_lens, scale) -> torch.Tensor:
    """float64 attention, causal with the prefix: row i of a chunk sees keys 0 .. ctx - q_len + i."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // paged.cache.shape[4]
    block_size = paged.cache.shape[3]
    for i, (start, q_len) in enumerate(zip(query_starts, query_lens)):
        ctx = int(paged.context_lens[i])
        if ctx == 0:
            continue
        table = paged.tables[i, : -(-ctx // block_size)].long()
        k, v = (t.double().cpu().repeat_interleave(group, dim=1) for t in gather_kv(paged.cache, paged.layer, table, ctx))
        qs = q[start : start + q_len].double().cpu()
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        visible = torch.arange(ctx)[None, :] <= (ctx - q_len + torch.arange(q_len))[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double().cpu() - ref).norm() / ref.norm())


def check(out, ref, dtype, gen):
    assert torch.isfinite(out).all(), f"unwritten or NaN-reading outputs (seed {gen.initial_seed()})"
    err = rel_err(out, ref)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} (seed {gen.initial_seed()})"


def run_decode(ta, gen, target, context_lens, group, head_dim, dtype, block_size=16, num_splits=None, pad=32):
    kv_heads = target.kv_heads
    paged = make_paged(gen, target.device, context_lens, kv_heads, head_dim, dtype, block_size, pad=pad)
    q = make_q(gen, target.device, len(context_lens), kv_heads * group, head_dim, dtype)
    out = poisoned(q.shape, dtype, target.device)
    scale = head_dim**-0.5
    res = ta.decode_attention(q, paged.cache, paged.layer, paged.tables, paged.context_lens, scale, out=out, num_splits=num_splits)
    assert res is out
    n = len(context_lens)
    return out, reference(q, paged, range(n), [1] * n, scale)


# --- decode ----------------------------------------------------------------------------------------------


def mixed_lengths(target: Target) -> list[int]:
    return [1, 15, 16, 17, 100, target.long]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_decode_matches_reference(ta, target, gen, dtype, head_dim, group):
    skip_interpreter_bf16(target, dtype)
    out, ref = run_decode(ta, gen, target, mixed_lengths(target), group, head_dim, dtype)
    check(out, ref, dtype, gen)


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
def test_decode_split_counts_agree(ta, target, gen, num_splits):
    """Any split count computes the same function, including splits left empty (64 slices of 100 keys:
    a slice is at least one 64-key tile, so most of them get nothing)."""
    out, ref = run_decode(ta, gen, target, mixed_lengths(target), 4, 128, torch.float32, num_splits=num_splits)
    check(out, ref, torch.float32, gen)


@pytest.mark.parametrize("block_size", [8, 32, 128])
def test_decode_block_sizes(ta, target, gen, block_size):
    """Blocks smaller and larger than the kernel's key tile (64)."""
    out, ref = run_decode(ta, gen, target, mixed_lengths(target), 4, 128, torch.float16, block_size=block_size)
    check(out, ref, torch.float16, gen)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_empty_context_gives_zeros(ta, target, gen, num_splits):
    """A padding slot of a captured batch (context 0) yields zeros, not NaN, and leaves the others right."""
    out, ref = run_decode(ta, gen, target, [0, 37, 0, 300], 2, 64, torch.float32, num_splits=num_splits)
    assert torch.equal(out[[0, 2]].cpu(), torch.zeros_like(out[[0, 2]].cpu()))
    check(out[[1, 3]], ref[[1, 3]], torch.float32, gen)


def test_decode_writes_a_strided_out_and_nothing_else(ta, target, gen):
    lens = [5, 200]
    paged = make_paged(gen, target.device, lens, target.kv_heads, 64, torch.float16)
    heads = target.kv_heads * 4
    q = make_q(gen, target.device, len(lens), heads, 64, torch.float16)
    buf = torch.full((len(lens), heads + 3, 64), 7.0, dtype=torch.float16, device=target.device)
    out = buf[:, 2 : 2 + heads]
    out.fill_(float("nan"))
    ta.decode_attention(q, paged.cache, paged.layer, paged.tables, paged.context_lens, 0.125, out=out)
    check(out, reference(q, paged, range(2), [1, 1], 0.125), torch.float16, gen)
    assert (buf[:, :2] == 7.0).all() and (buf[:, 2 + heads :] == 7.0).all()


@pytest.mark.gpu
def test_decode_replays_in_a_cuda_graph_with_new_lengths(gen):
    """Captured once, replayed on other contexts, tables and queries: no host sync, grid from shapes only."""
    if INTERPRET:
        pytest.skip("CUDA graphs need the GPU path")
    from workers.engine import triton_attention as ta

    batch, kv_heads, group, head_dim, dtype = 8, 8, 4, 128, torch.bfloat16
    second = make_paged(gen, "cuda", [1, 0, 2000, 16, 17, 999, 100, 5], kv_heads, head_dim, dtype)
    tables = second.tables.roll(1, 0).contiguous()  # captured with other tables and lengths
    lens = torch.full_like(second.context_lens, 64)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen).to(dtype).cuda()
    out = torch.empty_like(q)
    run = lambda cache: ta.decode_attention(q, cache, second.layer, tables, lens, 0.1, out=out)  # noqa: E731
    run(second.cache)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(second.cache)
    tables.copy_(second.tables)
    lens.copy_(second.context_lens)
    q.copy_(torch.randn(q.shape, generator=gen).to(dtype))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
    keep = [0, 2, 3, 4, 5, 6, 7]
    check(out[keep], reference(q, second, range(batch), [1] * batch, 0.1)[keep], dtype, gen)


def test_num_splits_follow_shapes_only(ta):
    """Batch 1 is split to fill the GPU, a large batch is not, and short tables are never split."""
    sms = 132
    assert ta.choose_num_splits(1, 8, 8192, sms) * 8 >= sms
    assert ta.choose_num_splits(64, 8, 8192, sms) == 1
    assert ta.choose_num_splits(1, 8, ta.MIN_SPLIT_TOKENS, sms) == 1
    assert ta.choose_num_splits(1, 1, 1 << 20, sms) == ta.MAX_SPLITS


# --- prefill ---------------------------------------------------------------------------------------------


def run_prefill(ta, gen, target, chunks, group, head_dim, dtype, padding_rows=3, pad=32):
    """chunks: (query_len, context_len) per sequence. Returns the output and reference of covered rows,
    and the rows past the last sequence, which no sequence covers and must stay untouched."""
    kv_heads = target.kv_heads
    q_lens = [q for q, _ in chunks]
    paged = make_paged(gen, target.device, [c for _, c in chunks], kv_heads, head_dim, dtype, pad=pad)
    starts = [sum(q_lens[:i]) for i in range(len(chunks))]
    total = sum(q_lens)
    q = make_q(gen, target.device, total + padding_rows, kv_heads * group, head_dim, dtype)
    out = poisoned(q.shape, dtype, target.device)
    scale = head_dim**-0.5
    as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=target.device)  # noqa: E731
    res = ta.prefill_attention(
        q, paged.cache, paged.layer, as_int32(starts), as_int32(q_lens), paged.context_lens, paged.tables, max(q_lens), scale, out=out
    )
    assert res is out
    return out[:total], reference(q, paged, starts, q_lens, scale)[:total], out[total:]


def mixed_chunks(target: Target) -> list[tuple[int, int]]:
    """A fresh prompt, chunks after short and 1000+ prefixes, decode rows, chunks on block edges."""
    return [(100, 100), (17, target.long + 17), (1, 1), (1, 16), (64, 79), (16, 32), (15, 15), (130, target.long // 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_prefill_matches_reference(ta, target, gen, dtype, head_dim, group):
    skip_interpreter_bf16(target, dtype)
    out, ref, padding = run_prefill(ta, gen, target, mixed_chunks(target), group, head_dim, dtype)
    check(out, ref, dtype, gen)
    assert torch.isnan(padding).all(), "rows outside every sequence were written"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_long_prompt(ta, target, gen, dtype):
    """Many query tiles of one sequence, each with its own diagonal."""
    skip_interpreter_bf16(target, dtype)
    out, ref, _ = run_prefill(ta, gen, target, [(target.longest, target.longest), (3, 3)], 4, 128, dtype)
    check(out, ref, dtype, gen)


def test_prefill_of_single_rows_equals_decode(ta, target, gen):
    """A batch of one-row chunks is decode: the two kernels must agree on it."""
    lens = mixed_lengths(target)
    kv_heads, heads = target.kv_heads, target.kv_heads * 4
    paged = make_paged(gen, target.device, lens, kv_heads, 128, torch.float32)
    q = make_q(gen, target.device, len(lens), heads, 128, torch.float32)
    ones = torch.ones(len(lens), dtype=torch.int32, device=target.device)
    starts = torch.arange(len(lens), dtype=torch.int32, device=target.device)
    pre = ta.prefill_attention(q, paged.cache, paged.layer, starts, ones, paged.context_lens, paged.tables, 1, 0.1)
    dec = ta.decode_attention(q, paged.cache, paged.layer, paged.tables, paged.context_lens, 0.1)
    assert rel_err(pre, dec.double().cpu()) < 1e-5


def test_unaligned_cache_strides(ta, target, gen):
    """A block stride that is no multiple of 16 elements loses the 16-byte copies, not correctness."""
    out, ref = run_decode(ta, gen, target, mixed_lengths(target), 4, 128, torch.float16, num_splits=3, pad=24)
    check(out, ref, torch.float16, gen)
    out, ref, _ = run_prefill(ta, gen, target, mixed_chunks(target), 4, 128, torch.float16, pad=24)
    check(out, ref, torch.float16, gen)


# --- argument checks -----------------------------------------------------------------------------------


def test_rejects_mismatched_inputs(ta, target, gen):
    paged = make_paged(gen, target.device, [20], 2, 64, torch.float16)
    q = make_q(gen, target.device, 1, 4, 64, torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        ta.decode_attention(q.float(), paged.cache, paged.layer, paged.tables, paged.context_lens, 1.0)
    with pytest.raises(ValueError, match="int32"):
        ta.decode_attention(q, paged.cache, paged.layer, paged.tables.long(), paged.context_lens, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        ta.decode_attention(q[:, :3], paged.cache, paged.layer, paged.tables, paged.context_lens, 1.0)
    with pytest.raises(ValueError, match="layer"):
        ta.decode_attention(q, paged.cache, 3, paged.tables, paged.context_lens, 1.0)
