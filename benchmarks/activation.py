"""Model activation on the GPU: time to ready and cold TTFT, vs the PCIe limit and vs a naive load, one run.

    python benchmarks/activation.py [--models llama-3.2-1b llama-3.2-3b llama-3.1-8b] [--repeats 3]

For each dummy model (bf16), the engine is created once (address ranges reserved) and activated from the
host weight store: the first activation builds the host image and captures CUDA graphs; the measured
ones are re-activations after an eviction (map pages + copy the pinned image on several streams), which
is what a request for an evicted model waits for. Cold TTFT adds the prefill of a 128-token prompt and
the first token. Baselines in the same run: the PCIe limit (weight bytes / measured pinned host-to-device
bandwidth) and a naive load (the same weights as pageable host tensors, copied one by one on one stream).
Writes JSON with command, date and card; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memory import PagePool  # noqa: E402
from memory.cuda_backend import CudaBackend  # noqa: E402
from memory.host_store import HostWeightStore  # noqa: E402
from scheduler.local import LocalScheduler  # noqa: E402
from scheduler.sequence import Sequence  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.step_loop import model_queue  # noqa: E402
from workers.contract.messages import ModelSpec, SamplingParams  # noqa: E402


def pinned_bandwidth(num_bytes: int = 1024**3) -> tuple[float, float]:
    """Host-to-device bytes/s from pinned and from pageable memory."""
    device = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    results = []
    for pin in (True, False):
        host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=pin)
        host.fill_(1)
        device.copy_(host, non_blocking=pin)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            device.copy_(host, non_blocking=pin)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        results.append(num_bytes / statistics.median(times))
    return results[0], results[1]


def spec_for(name: str) -> ModelSpec:
    config = json.loads((ROOT / "configs" / "shapes" / f"{name}.json").read_text())
    return ModelSpec(
        name=name, weights_dir=None, hf_config=config, load_format="dummy", dtype="bfloat16", max_model_len=4096,
        block_size=16, max_num_seqs=32, max_num_batched_tokens=2048, eos_token_ids=[], seed=0, ttft_slo_s=2.0, tpot_slo_s=0.2,
    )


def first_token_s(engine: Engine, prompt_len: int = 128) -> float:
    """Prefill a prompt and sample its first token on an active engine (scheduler included)."""
    scheduler = LocalScheduler("fcfs")
    scheduler.add_model(model_queue(engine))
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    seq = Sequence("ttft", engine.spec.name, list(range(1, prompt_len + 1)), 1, time.time(), params)
    scheduler.add(seq)
    started = time.perf_counter()
    while scheduler.has_work():
        plan = scheduler.schedule()
        scheduler.update(plan, engine.execute(plan))
    return time.perf_counter() - started


def naive_load_s(engine: Engine, pool: PagePool) -> float:
    """Pageable host tensors, copied one by one on the default stream, into freshly mapped pages."""
    host = torch.empty(engine.weight_bytes, dtype=torch.uint8)
    host.copy_(pool.tensor(engine.weights)[: engine.weight_bytes])  # the real weights, pageable
    host_views = engine.layout.views(host)
    engine.deactivate()
    torch.cuda.synchronize()
    started = time.perf_counter()
    pool.map_pages(engine.weights, range(engine.weights.num_pages))
    device_views = engine.layout.views(pool.tensor(engine.weights)[: engine.weight_bytes])
    for key, view in host_views.items():
        device_views[key].copy_(view)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    pool.unmap_pages(engine.weights, range(engine.weights.num_pages))
    return elapsed


def map_and_copy_apart(engine: Engine, pool: PagePool, image: torch.Tensor) -> tuple[float, float]:
    """(map-only s, copy-only s) for the engine's weight range: how much the activation pipeline overlaps."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    for first in range(0, engine.weights.num_pages, 32):
        pool.map_pages(engine.weights, range(first, min(first + 32, engine.weights.num_pages)))
    map_s = time.perf_counter() - started
    target = pool.tensor(engine.weights)
    streams = [torch.cuda.Stream() for _ in range(4)]
    torch.cuda.synchronize()
    started = time.perf_counter()
    chunk = 32 * pool.page_bytes
    for index, start in enumerate(range(0, engine.weight_bytes, chunk)):
        end = min(start + chunk, engine.weight_bytes)
        with torch.cuda.stream(streams[index % 4]):
            target[start:end].copy_(image[start:end], non_blocking=True)
    torch.cuda.synchronize()
    copy_s = time.perf_counter() - started
    pool.unmap_pages(engine.weights, range(engine.weights.num_pages))
    return map_s, copy_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-gib", type=float, default=40)
    parser.add_argument("--store-root", default="/dev/shm")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    card = torch.cuda.get_device_name()
    pinned_bw, pageable_bw = pinned_bandwidth()
    budget = int(args.budget_gib * 1024**3)
    pool = PagePool(CudaBackend("cuda:0"), budget, reserve_pages=budget // (2 * 1024**2))
    pool.replenish_reserve()  # every page created up front, as the worker does
    store = HostWeightStore(80 * 1024**3, root=Path(args.store_root), prefix=f"prism-bench-{os.getpid()}-")
    rows = {}
    try:
        for name in args.models:
            engine = Engine(spec_for(name), torch.device("cuda:0"), pool, store)
            first = engine.activate()
            engine.deactivate()
            totals, copies, ttfts = [], [], []
            for _ in range(args.repeats):
                torch.cuda.synchronize()
                arrival = time.perf_counter()
                times = engine.activate()
                ready = time.perf_counter() - arrival
                ttft = ready + first_token_s(engine)
                totals.append(ready)
                copies.append(times.map_copy_s)
                ttfts.append(ttft)
                engine.deactivate()
            image = store.acquire(engine.image_key, engine.weight_bytes, engine._fill_image)
            map_only, copy_only = map_and_copy_apart(engine, pool, image.tensor)
            store.release(image)
            engine.activate()
            naive = naive_load_s(engine, pool)
            engine.close()
            rows[name] = {
                "weight_bytes": engine.weight_bytes,
                "first_activation": vars(first),
                "activation_s": statistics.median(totals),
                "map_copy_s": statistics.median(copies),
                "map_only_s": map_only,
                "copy_only_s": copy_only,
                "cold_ttft_s": statistics.median(ttfts),
                "pcie_limit_s": engine.weight_bytes / pinned_bw,
                "naive_load_s": naive,
                "vs_pcie_limit": statistics.median(totals) / (engine.weight_bytes / pinned_bw),
                "speedup_vs_naive": naive / statistics.median(totals),
            }
    finally:
        store.drop_all(unlink=True)
    result = {
        "benchmark": "activation",
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "card": card,
        "pinned_h2d_gb_s": pinned_bw / 1e9,
        "pageable_h2d_gb_s": pageable_bw / 1e9,
        "models": rows,
    }
    slug = card.lower().replace("nvidia ", "").replace(" ", "-")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"activation-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"card {card}  pinned H2D {pinned_bw / 1e9:.1f} GB/s  pageable {pageable_bw / 1e9:.1f} GB/s")
    print(f"{'model':>14} {'GB':>6} {'ready s':>8} {'map+copy':>9} {'map':>6} {'copy':>6} {'cold TTFT':>10} {'PCIe s':>7} {'naive s':>8} {'x naive':>7}")
    for name, r in rows.items():
        print(f"{name:>14} {r['weight_bytes'] / 1e9:>6.2f} {r['activation_s']:>8.3f} {r['map_copy_s']:>9.3f} "
              f"{r['map_only_s']:>6.3f} {r['copy_only_s']:>6.3f} "
              f"{r['cold_ttft_s']:>10.3f} {r['pcie_limit_s']:>7.3f} {r['naive_load_s']:>8.3f} {r['speedup_vs_naive']:>7.1f}")


if __name__ == "__main__":
    main()
