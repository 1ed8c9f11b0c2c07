"""GPU microbenchmark: each fused kernel of workers/engine/triton_ops.py against the torch op sequence it
replaces (the TorchOps path, workers/engine/ops.py), at Llama-3.1-8B shapes in bf16.

    python benchmarks/ops.py [--tokens 1 64] [--out FILE]

Each case is timed two ways, median over repeats: as a CUDA-graph replay (what a captured decode step
pays: kernel time plus the gaps between a sequence's kernels) and eagerly (adds the host launch path).
Before timing, each fused output is checked against the torch one (>= 99% bit-identical), so a number
never comes from a broken kernel. At these sizes every input lives in L2, as in a real decode step where
the producing GEMM has just written it. Prints a table; writes JSON with command, date and card.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine import triton_ops as ops  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE = 32, 8, 128, 4096, 14336
BLOCK_SIZE, NUM_LAYERS, EPS, DTYPE = 16, 32, 1e-5, torch.bfloat16
MIN_IDENTICAL = 0.99


def torch_rms_norm(x, weight, eps):
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def torch_rope_and_cache(q, k, v, positions, inv_freq, kv_cache, layer, blocks, offsets):
    """TorchOps.rope_and_cache: cos/sin per call, both rotations, two index_put writes."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype).unsqueeze(1), emb.sin().to(q.dtype).unsqueeze(1)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    kv_cache[blocks, layer, 0, offsets] = k
    kv_cache[blocks, layer, 1, offsets] = v
    return q, k


def cases(tokens: int) -> dict[str, tuple[Callable, Callable, Callable]]:
    """name -> (torch version, fused version, check); inputs bound in closures. The fused versions update
    their in-place outputs on every timed call (the residual, q and k); `check` runs each version once on
    a saved copy of the inputs and compares."""
    randn = lambda *shape, scale=1.0: (torch.randn(*shape, device="cuda") * scale).to(DTYPE)  # noqa: E731
    x, residual = randn(tokens, HIDDEN), randn(tokens, HIDDEN, scale=4.0)
    weight = randn(HIDDEN, scale=0.3) + 1
    gate_up = randn(tokens, 2 * INTERMEDIATE, scale=3.0)
    qkv = randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, scale=2.0)
    q, k, v = (t.view(tokens, -1, HEAD_DIM) for t in qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1))
    num_blocks = tokens // BLOCK_SIZE + 8
    kv_cache = randn(num_blocks, NUM_LAYERS, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:tokens]
    blocks, offsets = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    normed = torch.empty_like(x)
    rope_args = (v, positions, inv_freq)
    cache_args = (kv_cache, 3, blocks, offsets)

    def check_add_rms_norm():
        saved = residual.clone()
        ref = torch_rms_norm(saved + x, weight, EPS)
        identical(ref, ops.fused_add_rms_norm(x, residual, weight, EPS, out=normed))
        identical(saved + x, residual)

    def check_rope():
        q0, k0 = q.clone(), k.clone()
        ref_q, ref_k = torch_rope_and_cache(q0, k0, *rope_args, kv_cache.clone(), *cache_args[1:])
        ops.rope_and_cache(q, k, *rope_args, 1.0, *cache_args)
        close(ref_q, q), close(ref_k, k)  # GPU cos/sin round differently from torch's in the last bit
        close(ref_k, kv_cache[blocks, 3, 0, offsets])

    return {
        "rms_norm": (
            lambda: torch_rms_norm(x, weight, EPS),
            lambda: ops.rms_norm(x, weight, EPS, out=normed),
            lambda: identical(torch_rms_norm(x, weight, EPS), ops.rms_norm(x, weight, EPS)),
        ),
        "add_rms_norm": (
            lambda: torch_rms_norm(residual + x, weight, EPS),
            lambda: ops.fused_add_rms_norm(x, residual, weight, EPS, out=normed),
            check_add_rms_norm,
        ),
        "silu_and_mul": (
            lambda: F.silu(gate_up[:, :INTERMEDIATE]) * gate_up[:, INTERMEDIATE:],
            lambda: ops.silu_and_mul(gate_up),
            lambda: identical(F.silu(gate_up[:, :INTERMEDIATE]) * gate_up[:, INTERMEDIATE:], ops.silu_and_mul(gate_up)),
        ),
        "rope_and_cache": (
            lambda: torch_rope_and_cache(q, k, *rope_args, *cache_args),
            lambda: ops.rope_and_cache(q, k, *rope_args, 1.0, *cache_args),
            check_rope,
        ),
    }


def close(ref: torch.Tensor, out: torch.Tensor) -> None:
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert err < 1e-2, f"fused output differs from torch by {err:.2e}"


def identical(ref: torch.Tensor, out: torch.Tensor) -> None:
    share = float((ref == out).double().mean())
    assert share >= MIN_IDENTICAL, f"fused output only {share:.4f} bit-identical to torch"


def time_us(fn: Callable, graph: bool) -> float:
    if graph:
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    return 1e3 * triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ops-gpu.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for tokens in args.tokens:
        for name, (torch_fn, fused_fn, check) in cases(tokens).items():
            check()
            torch.cuda.synchronize()
            row = {"op": name, "tokens": tokens}
            for mode in ("graph", "eager"):
                row[f"torch_{mode}_us"] = time_us(torch_fn, mode == "graph")
                row[f"fused_{mode}_us"] = time_us(fused_fn, mode == "graph")
            rows.append(row)
    result = {
        "benchmark": "ops",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shapes": f"Llama-3.1-8B bf16: hidden {HIDDEN}, intermediate {INTERMEDIATE}, heads {HEADS}/{KV_HEADS}x{HEAD_DIM}",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"card: {result['card']}   median us   (graph = CUDA-graph replay, eager = host launches)")
    print(f"{'op':>15} {'T':>3} {'torch graph':>12} {'fused graph':>12} {'torch eager':>12} {'fused eager':>12}")
    for r in rows:
        print(
            f"{r['op']:>15} {r['tokens']:>3} {r['torch_graph_us']:>12.2f} {r['fused_graph_us']:>12.2f}"
            f" {r['torch_eager_us']:>12.2f} {r['fused_eager_us']:>12.2f}"
        )


if __name__ == "__main__":
    main()
