"""Fused element-wise kernels (workers/engine/triton_ops.py) against torch references, on the GPU or on the
CPU through Triton's interpreter.

Every test runs twice: `cuda` (marked gpu; skipped without CUDA) and `interpreter` (runs only with
TRITON_INTERPRET=1 and triton importable). Without either, everything skips.

Two references per output:
- float64, the function itself: ||out - ref|| / ||ref|| must stay under the dtype's tolerance;
- the model's torch path in the model dtype (the same roundings as transformers): in fp16/bf16 at least
  99% of the elements must be bit-identical. Only the float32 order of a norm's sum of squares may
  differ, which flips about one element in 1e4 by one unit in the last place; a kernel that skips or
  adds a rounding step (say, the product before the weight multiply) misses far more than 1%.

Inputs are fresh random draws, strided views (rows of wider buffers, q/k/v slices of a fused
projection, a KV cache over a NaN page pool with shuffled slots); outputs are NaN-poisoned before each
call, so unwritten elements fail, and guard elements around them must stay untouched.
"""

from __future__ import annotations

import os
import secrets

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-6, torch.float16: 3e-3, torch.bfloat16: 1e-2}  # ||out - ref64|| / ||ref64||
MIN_IDENTICAL = 0.99  # fp16/bf16: share of elements bit-identical to the torch path
TOKENS = [1, 3, 64]
GUARD = 7.0  # value of the elements around an output, which no kernel may write
EPS = 1e-5

# Llama-3.1-8B: 32 query heads, 8 kv heads, head_dim 128, hidden 4096, intermediate 14336.
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE = 32, 8, 128, 4096, 14336


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("interpreter")])
def device(request) -> str:
    if request.param == "interpreter":
        if not INTERPRET:
            pytest.skip("set TRITON_INTERPRET=1 (with triton installed) to run the kernels on the CPU")
        pytest.importorskip("triton")
        return "cpu"
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 runs the interpreter variant; unset it to run on the GPU")
    return "cuda"


@pytest.fixture
def ops(device):
    from workers.engine import triton_ops

    return triton_ops


@pytest.fixture
def gen() -> torch.Generator:
    """Fresh inputs for every run; failure messages carry the seed to replay one."""
    return torch.Generator().manual_seed(secrets.randbits(31))


# --- torch references (the model's path: workers/engine/ops.py TorchOps, i.e. transformers' order) -------


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def torch_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype).unsqueeze(1), (emb.sin() * scaling).to(dtype).unsqueeze(1)


def torch_rope(x, positions, inv_freq, scaling):
    cos, sin = torch_cos_sin(positions, inv_freq, scaling, x.dtype)
    return x * cos + rotate_half(x) * sin


def rms_norm64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double().cpu()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double().cpu()


def rope64(x, positions, inv_freq, scaling):
    """Exact rotation of the float32 angles that the model computes (the angle's own float32 rounding is
    part of the model's definition: at position 1e5 it moves the angle by 4e-3 rad)."""
    freqs = (positions.to(torch.float32).unsqueeze(-1) * inv_freq).double().cpu()
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    x64 = x.double().cpu()
    return x64 * emb.cos() * scaling + rotate_half(x64) * emb.sin() * scaling


# --- inputs and checks -----------------------------------------------------------------------------------


def randn(gen, *shape, dtype, device, scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale + shift).to(dtype).to(device)


def strided_rows(gen, rows, cols, dtype, device, scale=1.0) -> torch.Tensor:
    """Random [rows, cols] as a view into a wider buffer at a nonzero offset (rows not adjacent)."""
    buf = randn(gen, rows, cols + 24, dtype=dtype, device=device, scale=scale)
    view = buf[:, 8 : 8 + cols]
    assert not view.is_contiguous() or rows == 1
    return view


def poisoned_out(rows, cols, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): a NaN view of [rows, cols] inside a buffer of GUARD values."""
    buf = torch.full((rows, cols + 24), GUARD, dtype=dtype, device=device)
    view = buf[:, 8 : 8 + cols]
    view.fill_(float("nan"))
    return buf, view


def assert_guards_intact(buf: torch.Tensor, cols: int) -> None:
    assert (buf[:, :8] == GUARD).all() and (buf[:, 8 + cols :] == GUARD).all(), "wrote outside the output view"


def check(out, model_out, ref64, dtype, gen, bitwise: bool = True) -> None:
    seed = gen.initial_seed()
    assert torch.isfinite(out).all(), f"unwritten (NaN) or non-finite outputs (seed {seed})"
    err = float((out.double().cpu() - ref64).norm() / ref64.norm())
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} vs float64 (seed {seed})"
    if dtype != torch.float32 and bitwise:
        identical = float((out == model_out).double().mean())
        assert identical >= MIN_IDENTICAL, f"only {identical:.4f} bit-identical to the torch path (seed {seed})"


# --- RMSNorm ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [HIDDEN, 8192, 3584])
@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm_matches_torch(ops, device, gen, dtype, hidden, tokens):
    x = strided_rows(gen, tokens, hidden, dtype, device, scale=3.0)
    weight = randn(gen, hidden, dtype=dtype, device=device, scale=0.3, shift=1.0)
    buf, out = poisoned_out(tokens, hidden, dtype, device)
    assert ops.rms_norm(x, weight, EPS, out=out) is out
    check(out, torch_rms_norm(x, weight, EPS), rms_norm64(x, weight, EPS), dtype, gen)
    assert_guards_intact(buf, hidden)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_per_head_on_a_projection_slice(ops, device, gen, dtype):
    """Qwen3's q/k norm: [T, H, D] rows taken from the fused qkv output (strided over tokens)."""
    tokens = 5
    qkv = randn(gen, tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype, device=device)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    weight = randn(gen, HEAD_DIM, dtype=dtype, device=device, scale=0.3, shift=1.0)
    before = qkv.clone()
    out = ops.rms_norm(k, weight, EPS)
    check(out, torch_rms_norm(k, weight, EPS), rms_norm64(k, weight, EPS), dtype, gen)
    assert torch.equal(qkv, before), "rms_norm without out= must not write its input"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [HIDDEN, 3584])
@pytest.mark.parametrize("tokens", TOKENS)
def test_fused_add_rms_norm_matches_torch(ops, device, gen, dtype, hidden, tokens):
    """The residual must equal `residual + x` in the dtype bit for bit: this also pins the interpreter's
    bf16 cast, which truncates instead of rounding to nearest even (the kernels round explicitly there)."""
    x = strided_rows(gen, tokens, hidden, dtype, device)
    residual = strided_rows(gen, tokens, hidden, dtype, device, scale=4.0)
    weight = randn(gen, hidden, dtype=dtype, device=device, scale=0.3, shift=1.0)
    expected_residual = residual + x
    buf, out = poisoned_out(tokens, hidden, dtype, device)
    assert ops.fused_add_rms_norm(x, residual, weight, EPS, out=out) is out
    assert torch.equal(residual, expected_residual), f"residual differs from residual + x (seed {gen.initial_seed()})"
    check(out, torch_rms_norm(expected_residual, weight, EPS), rms_norm64(expected_residual, weight, EPS), dtype, gen)
    assert_guards_intact(buf, hidden)


def test_fused_add_rms_norm_may_write_over_its_input(ops, device, gen):
    """out=x (what a captured step does to save a buffer): every row is read before it is overwritten."""
    dtype, tokens = torch.bfloat16, 64
    x = strided_rows(gen, tokens, HIDDEN, dtype, device)
    residual = strided_rows(gen, tokens, HIDDEN, dtype, device)
    weight = randn(gen, HIDDEN, dtype=dtype, device=device, scale=0.3, shift=1.0)
    expected_residual = residual + x
    model_out = torch_rms_norm(expected_residual, weight, EPS)
    out = ops.fused_add_rms_norm(x, residual, weight, EPS, out=x)
    assert out is x
    assert torch.equal(residual, expected_residual)
    check(x, model_out, rms_norm64(expected_residual, weight, EPS), dtype, gen)


# --- SiLU and mul ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [INTERMEDIATE, 11008, 100])
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_and_mul_matches_torch(ops, device, gen, dtype, width, tokens):
    gate_up = strided_rows(gen, tokens, 2 * width, dtype, device, scale=3.0)
    gate, up = gate_up.chunk(2, dim=-1)
    buf, out = poisoned_out(tokens, width, dtype, device)
    assert ops.silu_and_mul(gate_up, out=out) is out
    g64, u64 = gate.double().cpu(), up.double().cpu()
    check(out, F.silu(gate) * up, g64 * torch.sigmoid(g64) * u64, dtype, gen)
    assert_guards_intact(buf, width)


# --- RoPE and the KV-cache write -------------------------------------------------------------------------


def llama_inv_freq(head_dim: int, base: float = 500000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


class PagedCache:
    """A [num_blocks, num_layers, 2, block_size, kv_heads, head_dim] view into a NaN page pool with a
    padded block stride and a nonzero offset; `slots` are distinct (block, offset) pairs in shuffled
    blocks, and one token of a multi-token batch is a padding row (block id -1)."""

    def __init__(self, gen, tokens, kv_heads, head_dim, dtype, device, block_size=16, num_layers=3):
        num_blocks = tokens // block_size + 4
        block_numel = num_layers * 2 * block_size * kv_heads * head_dim
        self.pool = torch.full((num_blocks + 1, block_numel + 40), float("nan"), dtype=dtype, device=device)
        self.block_numel = block_numel
        self.cache = self.pool[1:, :block_numel].view(num_blocks, num_layers, 2, block_size, kv_heads, head_dim)
        assert not self.cache.is_contiguous() and self.cache.storage_offset() > 0
        self.layer = int(torch.randint(num_layers, (1,), generator=gen))
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
        shuffled = torch.randperm(num_blocks, generator=gen)
        self.blocks = shuffled[slots // block_size]
        self.offsets = slots % block_size
        if tokens > 1:
            self.blocks[int(torch.randint(tokens, (1,), generator=gen))] = -1
        self.block_ids = self.blocks.to(device)
        self.offset_ids = self.offsets.to(torch.int32).to(device)  # int32 and int64 slot tensors both accepted

    def expected_after_write(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        expected = self.cache.clone()
        keep = self.blocks >= 0
        expected[self.blocks[keep], self.layer, 0, self.offsets[keep]] = k[keep.to(k.device)]
        expected[self.blocks[keep], self.layer, 1, self.offsets[keep]] = v[keep.to(v.device)]
        return expected

    def assert_nothing_else_written(self) -> None:
        assert torch.isnan(self.pool[0]).all() and torch.isnan(self.pool[1:, self.block_numel :]).all()


def qkv_views(gen, tokens, heads, kv_heads, head_dim, dtype, device):
    """q, k, v as the model gets them: strided slices of one fused projection output."""
    qkv = randn(gen, tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device, scale=2.0)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)


def random_positions(gen, tokens, device) -> torch.Tensor:
    """Positions up to Llama-3.1's 128k context, position 0 included: angles far past 2*pi need the
    accurate range reduction."""
    positions = torch.randint(0, 131072, (tokens,), generator=gen)
    if tokens > 1:
        positions[0] = 0
    return positions.to(device)


def run_rope(ops, gen, device, dtype, tokens, heads, kv_heads, head_dim, scaling=1.0, qk_norm=False):
    """Run rope_and_cache and check q, k and the cache against the torch path and float64."""
    q, k, v = qkv_views(gen, tokens, heads, kv_heads, head_dim, dtype, device)
    paged = PagedCache(gen, tokens, kv_heads, head_dim, dtype, device)
    positions = random_positions(gen, tokens, device)
    inv_freq = llama_inv_freq(head_dim).to(device)
    norms = {}
    q_in, k_in, v_in = q.clone(), k.clone(), v.clone()
    q64_in, k64_in = q_in.double().cpu(), k_in.double().cpu()
    if qk_norm:
        q_norm, k_norm = (randn(gen, head_dim, dtype=dtype, device=device, scale=0.3, shift=1.0) for _ in range(2))
        norms = {"q_norm": q_norm, "k_norm": k_norm, "norm_eps": 1e-6}
        q64_in, k64_in = rms_norm64(q_in, q_norm, 1e-6), rms_norm64(k_in, k_norm, 1e-6)
        q_in, k_in = torch_rms_norm(q_in, q_norm, 1e-6), torch_rms_norm(k_in, k_norm, 1e-6)
    result = ops.rope_and_cache(
        q, k, v, positions, inv_freq, scaling, paged.cache, paged.layer, paged.block_ids, paged.offset_ids, **norms
    )
    assert result is None
    # On the GPU, torch's cos/sin of large angles (positions up to 128k) round differently from libdevice's
    # in the last bit, so only the error bound applies there (measured: 75% bit-identical in fp16, H100).
    bitwise = not str(device).startswith("cuda")
    check(q, torch_rope(q_in, positions, inv_freq, scaling), rope64(q64_in, positions, inv_freq, scaling), dtype, gen, bitwise)
    check(k, torch_rope(k_in, positions, inv_freq, scaling), rope64(k64_in, positions, inv_freq, scaling), dtype, gen, bitwise)
    assert torch.equal(v, v_in), "v is an input only"
    expected = paged.expected_after_write(k, v)  # the cache must hold exactly the rotated k and v
    assert torch.equal(paged.cache.nan_to_num(0.5), expected.nan_to_num(0.5)), f"wrong cache slots (seed {gen.initial_seed()})"
    paged.assert_nothing_else_written()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(HEADS, KV_HEADS, HEAD_DIM), (12, 4, 64), (6, 2, 96)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tokens", TOKENS)
def test_rope_and_cache_matches_torch(ops, device, gen, dtype, shape, tokens):
    """Llama-8B heads; heads that fill only part of a program's head group (12/4 at 8 per group); a head
    dimension whose half (48) is not a power of two."""
    run_rope(ops, gen, device, dtype, tokens, *shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 64])
def test_rope_and_cache_with_qk_norm_and_attention_scaling(ops, device, gen, dtype, tokens):
    """Qwen3's per-head q/k RMSNorm folded in before the rotation; a YaRN-style cos/sin scaling."""
    run_rope(ops, gen, device, dtype, tokens, 16, 8, 128, scaling=1.2, qk_norm=True)


# --- graphs, edge cases and argument checks --------------------------------------------------------------


@pytest.mark.gpu
def test_one_layer_replays_in_a_cuda_graph_with_new_inputs(gen):
    """Captured once, replayed on new hidden states, positions and slots: no host sync, grids from shapes."""
    if INTERPRET:
        pytest.skip("CUDA graphs need the GPU path")
    from workers.engine import triton_ops as ops

    dtype, device, tokens = torch.bfloat16, "cuda", 4
    x = randn(gen, tokens, HIDDEN, dtype=dtype, device=device)
    residual = randn(gen, tokens, HIDDEN, dtype=dtype, device=device)
    weight = randn(gen, HIDDEN, dtype=dtype, device=device, scale=0.3, shift=1.0)
    normed = torch.empty_like(x)
    q, k, v = qkv_views(gen, tokens, HEADS, KV_HEADS, HEAD_DIM, dtype, device)
    paged = PagedCache(gen, tokens, KV_HEADS, HEAD_DIM, dtype, device)
    positions = torch.zeros(tokens, dtype=torch.int64, device=device)
    inv_freq = llama_inv_freq(HEAD_DIM).to(device)
    gate_up = randn(gen, tokens, 2 * INTERMEDIATE, dtype=dtype, device=device)
    act = torch.empty(tokens, INTERMEDIATE, dtype=dtype, device=device)

    def step():
        ops.fused_add_rms_norm(x, residual, weight, EPS, out=normed)
        ops.rope_and_cache(q, k, v, positions, inv_freq, 1.0, paged.cache, paged.layer, paged.block_ids, paged.offset_ids)
        ops.silu_and_mul(gate_up, out=act)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for t in (x, residual, q, k, v, gate_up):
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
    positions.copy_(random_positions(gen, tokens, "cpu"))
    inputs = {name: t.clone() for name, t in dict(x=x, residual=residual, q=q, k=k, gate_up=gate_up).items()}
    normed.fill_(float("nan"))
    act.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    new_residual = inputs["residual"] + inputs["x"]
    assert torch.equal(residual, new_residual)
    check(normed, torch_rms_norm(new_residual, weight, EPS), rms_norm64(new_residual, weight, EPS), dtype, gen)
    bitwise = not str(device).startswith("cuda")  # see run_rope: GPU cos/sin differ from torch's in the last bit
    check(q, torch_rope(inputs["q"], positions, inv_freq, 1.0), rope64(inputs["q"], positions, inv_freq, 1.0), dtype, gen, bitwise)
    check(k, torch_rope(inputs["k"], positions, inv_freq, 1.0), rope64(inputs["k"], positions, inv_freq, 1.0), dtype, gen, bitwise)
    gate, up = inputs["gate_up"].chunk(2, dim=-1)
    g64, u64 = gate.double().cpu(), up.double().cpu()
    check(act, F.silu(gate) * up, g64 * torch.sigmoid(g64) * u64, dtype, gen)
    assert torch.equal(paged.cache.nan_to_num(0.5), paged.expected_after_write(k, v).nan_to_num(0.5))


def test_empty_batches_launch_nothing(ops, device):
    """T = 0 (an idle step) returns empty outputs instead of launching a grid of size 0."""
    x = torch.empty(0, HIDDEN, dtype=torch.bfloat16, device=device)
    weight = torch.ones(HIDDEN, dtype=torch.bfloat16, device=device)
    assert ops.rms_norm(x, weight, EPS).shape == (0, HIDDEN)
    assert ops.fused_add_rms_norm(x, x.clone(), weight, EPS).shape == (0, HIDDEN)
    assert ops.silu_and_mul(torch.empty(0, 2 * 64, dtype=torch.bfloat16, device=device)).shape == (0, 64)
    q = torch.empty(0, 4, 64, dtype=torch.bfloat16, device=device)
    kv = torch.empty(0, 2, 64, dtype=torch.bfloat16, device=device)
    cache = torch.full((2, 1, 2, 16, 2, 64), float("nan"), dtype=torch.bfloat16, device=device)
    none = torch.empty(0, dtype=torch.int64, device=device)
    ops.rope_and_cache(q, kv, kv, none, llama_inv_freq(64).to(device), 1.0, cache, 0, none, none)
    assert torch.isnan(cache).all()


def test_rejects_mismatched_inputs(ops, device, gen):
    bf16 = torch.bfloat16
    x = randn(gen, 2, 256, dtype=bf16, device=device)
    w = torch.ones(256, dtype=bf16, device=device)
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(x, w.float(), EPS)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        ops.rms_norm(x.t().contiguous().t(), w, EPS)
    with pytest.raises(ValueError, match="residual"):
        ops.fused_add_rms_norm(x, x[:1].clone(), w, EPS)
    with pytest.raises(ValueError, match="out"):
        ops.silu_and_mul(x, out=torch.empty(2, 256, dtype=bf16, device=device))
    with pytest.raises(ValueError, match="2 \\* I"):
        ops.silu_and_mul(x[:, :255])
    q, k, v = qkv_views(gen, 3, 4, 2, 64, bf16, device)
    cache = torch.full((4, 2, 2, 16, 2, 64), float("nan"), dtype=bf16, device=device)
    ids = torch.arange(3, device=device)
    inv_freq = llama_inv_freq(64).to(device)
    args = (q, k, v, ids, inv_freq, 1.0, cache, 1, ids, ids)
    with pytest.raises(ValueError, match="layer"):
        ops.rope_and_cache(*args[:7], 2, *args[8:])
    with pytest.raises(ValueError, match="positions"):
        ops.rope_and_cache(q, k, v, ids.float(), *args[4:])
    with pytest.raises(ValueError, match="inv_freq"):
        ops.rope_and_cache(q, k, v, ids, inv_freq.to(bf16), *args[5:])
    with pytest.raises(ValueError, match="kv_cache"):
        ops.rope_and_cache(*args[:6], cache.half(), *args[7:])
    with pytest.raises(ValueError, match="go together"):
        ops.rope_and_cache(*args, q_norm=torch.ones(64, dtype=bf16, device=device))
    assert torch.isnan(cache).all(), "a rejected call must not have launched"
