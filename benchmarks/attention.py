"""Microbenchmark of the Triton paged attention kernels (workers/engine/triton_attention.py) on one GPU.

Decode is bound by memory: its floor is the K/V of every context read once, so it is reported as
achieved GB/s against the device-to-device copy bandwidth measured in the same run (bytes read plus
written). Prefill is bound by arithmetic: it is reported as TFLOP/s of causal attention against a bf16
matrix product measured in the same run. torch's scaled_dot_product_attention runs on the same data
gathered into dense tensors (the gather not timed): the best torch does without paging.

Shapes are Llama-3-8B's (32 query heads, 8 kv heads, head_dim 128), a cache of 32 layers in Prism's
layout [num_blocks, layers, 2, block_size, kv_heads, head_dim] with block 16 and shuffled block tables,
bf16. Times are medians of triton.testing.do_bench, which flushes L2 before every call; "graph" times
replay one CUDA graph of a decode over all 32 layers (as the engine runs it: no launch gaps) and divide
by 32.

Run from the repository root on the device machine:
    PYTHONPATH=. python3 benchmarks/attention.py [--out PATH] [--sweep]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from workers.engine import triton_attention as ta

HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 32, 8, 128, 32, 16
DTYPE = torch.bfloat16
DEVICE = "cuda"
DECODE_BATCHES = [1, 8, 32, 64]
DECODE_CONTEXTS = [512, 2048, 8192]
PREFILL = [(1, 512, 0), (1, 2048, 0), (4, 2048, 0), (1, 512, 3584)]  # (batch, chunk tokens, cached prefix)
SWEEP_DECODE = [(1, 8192), (8, 2048), (64, 2048)]  # (batch, context)
SWEEP_DECODE_TILES = [(n, w, s) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]  # (block_n, warps, stages)
SWEEP_PREFILL = [(1, 2048), (4, 2048)]  # (batch, tokens)
SWEEP_PREFILL_TILES = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2)]


def bench(fn) -> float:
    """Median milliseconds of fn, L2 flushed before each call."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def num_sms() -> int:
    return torch.cuda.get_device_properties(DEVICE).multi_processor_count


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


# --- ceilings --------------------------------------------------------------------------------------------


def measure_ceilings() -> dict:
    """Copy bandwidth (a 2 GiB device-to-device copy, bytes read + written) and bf16 matmul rate (8192^3)."""
    src = torch.randn(1 << 30, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    mm_ms = bench(lambda: a @ b)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": 2 * 2 * (1 << 30) / copy_ms / 1e6, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


# --- inputs ----------------------------------------------------------------------------------------------


def paged_inputs(batch: int, context: int, gen: torch.Generator):
    """A random bf16 cache of 32 layers holding `batch` contexts of `context` tokens, shuffled tables."""
    blocks_per_seq = triton.cdiv(context, BLOCK)
    num_blocks = batch * blocks_per_seq + 1
    cache = torch.empty(num_blocks, LAYERS, 2, BLOCK, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    cache.normal_(generator=gen)  # in place: no float32 temporary at the size of the cache
    order = torch.randperm(num_blocks - 1, device=DEVICE, generator=gen) + 1
    tables = order[: batch * blocks_per_seq].view(batch, blocks_per_seq).to(torch.int32)
    lens = torch.full((batch,), context, device=DEVICE, dtype=torch.int32)
    return cache, tables, lens


def dense_kv(cache, layer, tables, context) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer gathered through the tables, [batch, kv_heads, context, head_dim] each.

    One at a time, so that the largest configuration (a 69 GB cache) has room for the temporaries."""
    index = tables.long()
    k, v = (cache[:, layer, i][index].flatten(1, 2)[:, :context].transpose(1, 2).contiguous() for i in (0, 1))
    return k, v


def sdpa_runner(q, k, v, scale, is_causal=False, mask=None):
    """The fastest SDPA backend that accepts these inputs: flash, then memory-efficient, then cuDNN, each
    with native GQA, then with K/V expanded to every query head; math last. Returns (fn, backend)."""
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    for gqa in (True, False):
        if not gqa:  # expanded only when needed: G times the dense K/V
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            backends.append(SDPBackend.MATH)
        for backend in backends:

            def fn(backend=backend, k=k, v=v, gqa=gqa):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)

            try:
                fn()
            except RuntimeError:
                continue
            return fn, f"{backend.name.lower()}{'' if gqa else ' (K/V expanded)'}"
    raise RuntimeError("no SDPA backend accepted the inputs")


# --- decode ----------------------------------------------------------------------------------------------


def bench_decode(batch: int, context: int, gen: torch.Generator) -> dict:
    cache, tables, lens = paged_inputs(batch, context, gen)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
    scale = HEAD_DIM**-0.5
    out = torch.empty_like(q)
    triton_ms = bench(lambda: ta.decode_attention(q, cache, 0, tables, lens, scale, out=out))

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(LAYERS):
            ta.decode_attention(q, cache, layer, tables, lens, scale, out=out)
    graph_ms = bench(graph.replay) / LAYERS

    k, v = dense_kv(cache, 0, tables, context)
    sdpa, backend = sdpa_runner(q.unsqueeze(2), k, v, scale)
    sdpa_ms = bench(sdpa)
    ta.decode_attention(q, cache, 0, tables, lens, scale, out=out)
    err = rel_err(out, sdpa().squeeze(2))

    element = q.element_size()
    bytes_ = batch * context * KV_HEADS * HEAD_DIM * 2 * element + 2 * q.numel() * element + tables.numel() * 4
    num_splits = ta.choose_num_splits(batch, KV_HEADS, tables.shape[1] * BLOCK, num_sms())
    return {
        "batch": batch, "context": context, "bytes": bytes_, "num_splits": num_splits,
        "triton_us": triton_ms * 1e3, "triton_GBps": bytes_ / triton_ms / 1e6,
        "triton_graph_us": graph_ms * 1e3, "triton_graph_GBps": bytes_ / graph_ms / 1e6,
        "sdpa_us": sdpa_ms * 1e3, "sdpa_GBps": bytes_ / sdpa_ms / 1e6, "sdpa_backend": backend,
        "rel_err_vs_sdpa": err,
    }  # fmt: skip


# --- prefill ---------------------------------------------------------------------------------------------


def causal_flops(batch: int, chunk: int, prefix: int) -> int:
    """QK^T and PV products of `chunk` queries over a `prefix` + causal chunk, masked half not counted."""
    pairs = batch * (chunk * prefix + chunk * (chunk + 1) // 2)
    return 4 * pairs * HEADS * HEAD_DIM


def bench_prefill(batch: int, chunk: int, prefix: int, gen: torch.Generator, config=None) -> dict:
    context = prefix + chunk
    cache, tables, lens = paged_inputs(batch, context, gen)
    q = torch.randn(batch * chunk, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
    starts = torch.arange(batch, device=DEVICE, dtype=torch.int32) * chunk
    q_lens = torch.full((batch,), chunk, device=DEVICE, dtype=torch.int32)
    scale = HEAD_DIM**-0.5
    out = torch.empty_like(q)
    run = lambda: ta.prefill_attention(q, cache, 0, starts, q_lens, lens, tables, chunk, scale, out=out, config=config)  # noqa: E731
    triton_ms = bench(run)

    k, v = dense_kv(cache, 0, tables, context)
    q4 = q.view(batch, chunk, HEADS, HEAD_DIM).transpose(1, 2)
    if prefix:
        rows = torch.arange(chunk, device=DEVICE)[:, None] + prefix
        mask = torch.arange(context, device=DEVICE)[None, :] <= rows
        sdpa, backend = sdpa_runner(q4, k, v, scale, mask=mask)
    else:
        sdpa, backend = sdpa_runner(q4, k, v, scale, is_causal=True)
    sdpa_ms = bench(sdpa)
    run()
    err = rel_err(out, sdpa().transpose(1, 2).reshape(out.shape))
    flops = causal_flops(batch, chunk, prefix)
    return {
        "batch": batch, "chunk": chunk, "prefix": prefix, "flops": flops,
        "triton_us": triton_ms * 1e3, "triton_TFLOPs": flops / triton_ms / 1e9,
        "sdpa_us": sdpa_ms * 1e3, "sdpa_TFLOPs": flops / sdpa_ms / 1e9, "sdpa_backend": backend,
        "rel_err_vs_sdpa": err,
    }  # fmt: skip


# --- tile sweep (--sweep) --------------------------------------------------------------------------------


def sweep(gen: torch.Generator) -> list[dict]:
    """Time other tiles and split counts than the defaults, to retune decode_config / prefill_config."""
    rows = []
    for batch, context in SWEEP_DECODE:
        cache, tables, lens = paged_inputs(batch, context, gen)
        q = torch.randn(batch, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
        auto = ta.choose_num_splits(batch, KV_HEADS, tables.shape[1] * BLOCK, num_sms())
        bytes_ = batch * context * KV_HEADS * HEAD_DIM * 2 * q.element_size()
        for (block_n, warps, stages), splits in itertools.product(SWEEP_DECODE_TILES, sorted({max(1, auto // 2), auto, auto * 2})):
            cfg = ta.KernelConfig(block_n=block_n, num_warps=warps, num_stages=stages)
            ms = _try_bench(functools.partial(ta.decode_attention, q, cache, 0, tables, lens, 0.1, num_splits=splits, config=cfg))
            rows.append({"kind": "decode", "batch": batch, "context": context, "num_splits": splits, **cfg.__dict__,
                         "us": ms and ms * 1e3, "GBps": ms and bytes_ / ms / 1e6})  # fmt: skip
        del cache
        torch.cuda.empty_cache()
    for (block_m, block_n, warps, stages), (batch, tokens) in itertools.product(SWEEP_PREFILL_TILES, SWEEP_PREFILL):
        cfg = ta.KernelConfig(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            r = bench_prefill(batch, tokens, 0, gen, config=cfg)
        except Exception as e:  # a tile that does not compile or fit is a result of the sweep, not a failure
            r = {"batch": batch, "chunk": tokens, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append({"kind": "prefill", **cfg.__dict__, **r})
    return rows


def _try_bench(fn) -> float | None:
    try:
        return bench(fn)
    except Exception as e:  # e.g. out of shared memory for a tile: recorded as None
        print(f"  sweep point failed: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        return None


# --- main ------------------------------------------------------------------------------------------------


def guarded(fn, *args) -> dict:
    """Run one configuration; out of memory is a recorded skip, freed before the next."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError as e:
        return {"skipped": f"out of memory: {str(e)[:160]}"}
    finally:
        torch.cuda.empty_cache()


def print_table(result: dict) -> None:
    c = result["ceilings"]
    print(f"\n{result['card']}: copy {c['copy_GBps']:.0f} GB/s, bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    print(f"{'decode':>8} {'ctx':>6} {'splits':>6} {'triton us':>10} {'GB/s':>6} {'%copy':>6} {'graph us':>9} {'GB/s':>6} {'sdpa us':>9} {'GB/s':>6} {'x sdpa':>7} {'err':>8}")
    for r in result["decode"]:
        if "skipped" in r:
            print(f"{r['batch']:>8} {r['context']:>6} skipped: {r['skipped'][:60]}")
            continue
        print(f"{r['batch']:>8} {r['context']:>6} {r['num_splits']:>6} {r['triton_us']:>10.1f} {r['triton_GBps']:>6.0f} "
              f"{100 * r['triton_GBps'] / c['copy_GBps']:>5.0f}% {r['triton_graph_us']:>9.1f} {r['triton_graph_GBps']:>6.0f} "
              f"{r['sdpa_us']:>9.1f} {r['sdpa_GBps']:>6.0f} {r['sdpa_us'] / r['triton_us']:>7.2f} {r['rel_err_vs_sdpa']:>8.1e}")  # fmt: skip
    print(f"{'prefill':>8} {'chunk':>6} {'prefix':>6} {'triton us':>10} {'TFLOP/s':>8} {'sdpa us':>9} {'TFLOP/s':>8} {'x sdpa':>7} {'err':>8}  sdpa backend")
    for r in result["prefill"]:
        if "skipped" in r:
            print(f"{r['batch']:>8} {r['chunk']:>6} skipped: {r['skipped'][:60]}")
            continue
        print(f"{r['batch']:>8} {r['chunk']:>6} {r['prefix']:>6} {r['triton_us']:>10.1f} {r['triton_TFLOPs']:>8.0f} "
              f"{r['sdpa_us']:>9.1f} {r['sdpa_TFLOPs']:>8.0f} {r['sdpa_us'] / r['triton_us']:>7.2f} {r['rel_err_vs_sdpa']:>8.1e}  {r['sdpa_backend']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/attention-<card>.json)")
    parser.add_argument("--sweep", action="store_true", help="also time other tiles and split counts")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    card = torch.cuda.get_device_name()
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"attention-{re.sub(r'[^a-z0-9]+', '-', card.lower()).strip('-')}.json"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "card": card, "torch": torch.__version__, "triton": triton.__version__,
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "layers": LAYERS, "block_size": BLOCK, "dtype": str(DTYPE)},
        "ceilings": measure_ceilings(),
    }  # fmt: skip
    result["decode"] = [
        {"batch": b, "context": c, **guarded(bench_decode, b, c, gen)} for b in DECODE_BATCHES for c in DECODE_CONTEXTS
    ]
    result["prefill"] = [{"batch": b, "chunk": n, "prefix": p, **guarded(bench_prefill, b, n, p, gen)} for b, n, p in PREFILL]
    if args.sweep:
        result["sweep"] = sweep(gen)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")
    print_table(result)


if __name__ == "__main__":
    main()
