"""Page-pool benchmark: what elastic memory costs next to torch's own allocator, on one card in one run.

Measures
  1. driver/OS cost per page of each backend call (create, map, set_access per page and per run, unmap,
     destroy) with one-page chunks, the same per page for whole 32-page chunks (one create, map,
     set_access, unmap and destroy per chunk), and the pool's single-page map/unmap with and without a
     reserve hit;
  2. activating weights (WeightSpace: one map_pages call over every page) per page and per GiB, and the
     pool's own Python cost per page (a backend that does nothing) for weights and single KV pages;
  3. KV block allocation latency (p50/p99) at steady state: a random mix of sequence arrivals (allocate
     1-8 blocks in one call) and completions (free a sequence's blocks), occupancy held around half the
     budget so that pages are really mapped and unmapped, for the 16-token bf16 blocks of three real
     models; the same operation sequence replayed with torch.empty (warm caching allocator) and, on a GPU,
     with torch.cuda.empty_cache() after every free (untimed), so that an allocation reaches cudaMalloc
     whenever no segment still held by live tensors fits it.

Usage (GPU machine or any CPU; --device defaults to cuda:0 when a GPU is visible, else the host backend):
    python benchmarks/pool.py [--device cuda:0|cpu] [--out PATH] [--ops 4000]
Writes JSON (command, date, card, results, ratios against torch) to --out, by default
benchmarks/results/pool-<card>.json, and prints a short table last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from memory import HostBackend, KVSpace, PagePool  # noqa: E402
from memory.backend import PageBackend  # noqa: E402
from tests.memory.weight_space import WeightSpace  # noqa: E402

MIB = 1024 * 1024
PAGE_BYTES = 2 * MIB
# 16-token bf16 KV blocks (../shared/model-shapes): one page, straddling pages, a quarter page.
BLOCKS = {"llama-3.1-8b": 16 * 128 * 1024, "llama-3.2-3b": 16 * 112 * 1024, "llama-3.2-1b": 16 * 32 * 1024}


def now_us() -> float:
    return time.perf_counter_ns() / 1000


def summarize(samples_us: list[float]) -> dict[str, float]:
    ordered = sorted(samples_us)
    return {
        "n": len(ordered),
        "p50_us": ordered[len(ordered) // 2],
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "mean_us": statistics.fmean(ordered),
    }


def timed_each(calls: list[Callable[[], Any]]) -> list[float]:
    samples = []
    for call in calls:
        start = now_us()
        call()
        samples.append(now_us() - start)
    return samples


# --- 1. backend and pool page operations --------------------------------------------------------


def measure_page_ops(backend: PageBackend, num_pages: int) -> dict[str, Any]:
    """Per-page cost of every backend call over `num_pages` one-page chunks, and set_access batched per run."""
    page = backend.page_bytes
    base = backend.reserve(num_pages * page)
    addresses = [base + i * page for i in range(num_pages)]
    handles: list[Any] = []
    create = timed_each([lambda: handles.append(backend.create_chunk(page)) for _ in range(num_pages)])
    pairs = list(zip(addresses, handles, strict=True))
    map_each = timed_each([lambda a=a, h=h: backend.map(a, page, h, 0) for a, h in pairs])
    access_each = timed_each([lambda a=a: backend.set_access(a, page) for a in addresses])
    backend.synchronize()
    unmap_each = timed_each([lambda a=a: backend.unmap(a, page) for a in addresses])
    for a, h in zip(addresses, handles, strict=True):
        backend.map(a, page, h, 0)
    start = now_us()
    backend.set_access(base, num_pages * page)
    access_run_us = now_us() - start
    start = now_us()
    backend.synchronize()
    synchronize_us = now_us() - start
    for a in addresses:
        backend.unmap(a, page)
    destroy = timed_each([lambda h=h: backend.destroy_chunk(h) for h in handles])
    backend.release(base, num_pages * page)
    return {
        "num_pages": num_pages,
        "create_page": summarize(create),
        "map": summarize(map_each),
        "set_access_per_page": summarize(access_each),
        "set_access_one_run_us_per_page": access_run_us / num_pages,
        "unmap": summarize(unmap_each),
        "destroy_page": summarize(destroy),
        "synchronize_idle_us": synchronize_us,
        "whole_chunks_us_per_page": measure_chunk_ops(backend, num_pages),
    }


def measure_chunk_ops(backend: PageBackend, num_pages: int, chunk_pages: int = 32) -> dict[str, float]:
    """µs per page when every call covers a whole chunk of `chunk_pages` pages (the weights path)."""
    chunk = chunk_pages * backend.page_bytes
    num_chunks = max(1, num_pages // chunk_pages)
    base = backend.reserve(num_chunks * chunk)
    addresses = [base + i * chunk for i in range(num_chunks)]
    handles: list[Any] = []
    per_call = {
        "create": timed_each([lambda: handles.append(backend.create_chunk(chunk)) for _ in range(num_chunks)]),
        "map": timed_each([lambda a=a, h=h: backend.map(a, chunk, h, 0) for a, h in zip(addresses, handles)]),
        "set_access": timed_each([lambda a=a: backend.set_access(a, chunk) for a in addresses]),
    }
    backend.synchronize()
    per_call["unmap"] = timed_each([lambda a=a: backend.unmap(a, chunk) for a in addresses])
    per_call["destroy"] = timed_each([lambda h=h: backend.destroy_chunk(h) for h in handles])
    backend.release(base, num_chunks * chunk)
    return {op: statistics.median(samples) / chunk_pages for op, samples in per_call.items()}


def measure_pool_single_page(backend: PageBackend, reserve_pages: int, repeats: int) -> dict[str, Any]:
    """map_pages/unmap_pages of one page, as KV growth does: from the reserve, or creating each page."""
    pool = PagePool(backend, 8 * backend.page_bytes, reserve_pages=reserve_pages)
    vrange = pool.reserve_range("bench", "kv", backend.page_bytes)
    pool.replenish_reserve()
    maps, unmaps = [], []
    for _ in range(repeats):
        start = now_us()
        assert pool.map_pages(vrange, [0])
        maps.append(now_us() - start)
        start = now_us()
        pool.unmap_pages(vrange, [0])
        unmaps.append(now_us() - start)
    pool.release_range(vrange)
    pool.close()
    return {"map_pages": summarize(maps), "unmap_pages": summarize(unmaps)}


# --- 2. weights ---------------------------------------------------------------------------------


def measure_weight_activation(backend: PageBackend, num_pages: int) -> dict[str, Any]:
    pool = PagePool(backend, num_pages * backend.page_bytes, reserve_pages=0)
    start = now_us()
    space = WeightSpace(pool, "bench", num_pages * backend.page_bytes)
    activate_us = now_us() - start
    start = now_us()
    space.close()
    evict_us = now_us() - start
    gib = num_pages * backend.page_bytes / 1024**3
    return {
        "num_pages": num_pages,
        "activate_us_per_page": activate_us / num_pages,
        "evict_us_per_page": evict_us / num_pages,
        "activate_ms_per_gib": activate_us / 1000 / gib,
        "evict_ms_per_gib": evict_us / 1000 / gib,
    }


class NullBackend:
    """Does nothing and remembers nothing: what is left of a pool call is the pool's own Python cost."""

    device = "cpu"

    def __init__(self, page_bytes: int = PAGE_BYTES):
        self.page_bytes = page_bytes
        self._next = 1 << 40

    def reserve(self, num_bytes: int) -> int:
        self._next += num_bytes + (1 << 30)
        return self._next

    def release(self, base: int, num_bytes: int) -> None: ...

    def create_chunk(self, num_bytes: int) -> object:
        return object()

    def destroy_chunk(self, handle: Any) -> None: ...

    def map(self, address: int, num_bytes: int, handle: Any, offset: int) -> None: ...

    def set_access(self, address: int, num_bytes: int) -> None: ...

    def synchronize(self) -> None: ...

    def unmap(self, address: int, num_bytes: int) -> None: ...

    def tensor(self, base: int, num_bytes: int) -> torch.Tensor:
        raise NotImplementedError("a null backend has no memory")


def measure_pool_overhead(backend: PageBackend, num_pages: int = 8192, num_kv: int = 4096) -> dict[str, float]:
    """µs per page through the pool: weights in aligned 32-page groups, KV pages one per call (from the
    pool's stock of single pages, then created on demand)."""
    stock = 32
    budget = num_pages + stock
    pool = PagePool(backend, budget * backend.page_bytes, reserve_pages=budget)
    pool.replenish_reserve()
    weights = pool.reserve_range("bench", "weights", num_pages * backend.page_bytes)
    start = now_us()
    for first in range(0, num_pages, 32):
        assert pool.map_pages(weights, range(first, min(first + 32, num_pages)))
    result = {"weights_map_us_per_page": (now_us() - start) / num_pages}
    start = now_us()
    pool.unmap_pages(weights, range(num_pages))
    result["weights_unmap_us_per_page"] = (now_us() - start) / num_pages
    pool.release_range(weights)
    kv = pool.reserve_range("bench", "kv", (stock + num_kv) * backend.page_bytes)
    for label, pages in (("stock", range(stock)), ("created", range(stock, stock + num_kv))):
        start = now_us()
        for i in pages:
            assert pool.map_pages(kv, [i])
        result[f"kv_map_{label}_us_per_page"] = (now_us() - start) / len(pages)
    start = now_us()
    for i in range(stock + num_kv):
        pool.unmap_pages(kv, [i])
    result["kv_unmap_us_per_page"] = (now_us() - start) / (stock + num_kv)
    pool.release_range(kv)
    pool.close()
    return result


# --- 3. KV steady state -------------------------------------------------------------------------


def kv_workload(num_ops: int, block_bytes: int, budget_bytes: int, seed: int) -> list[tuple[str, int]]:
    """("alloc", num_blocks) or ("free", index into the live sequences), holding ~half the budget live."""
    rng = random.Random(seed)
    target = budget_bytes // 2
    live: list[int] = []  # blocks per live sequence
    ops: list[tuple[str, int]] = []
    for _ in range(num_ops):
        live_bytes = sum(live) * block_bytes
        grow = rng.random() < (0.7 if live_bytes < target else 0.3)
        if grow or not live:
            num_blocks = rng.randint(1, 8)
            ops.append(("alloc", num_blocks))
            live.append(num_blocks)
        else:
            index = rng.randrange(len(live))
            ops.append(("free", index))
            live.pop(index)
    return ops


def run_pool_kv(
    backend: PageBackend, ops, block_bytes: int, budget_bytes: int, warmup: int, idle_pages: int
) -> dict[str, Any]:
    pool = PagePool(backend, budget_bytes)
    space = KVSpace(pool, "bench", block_bytes, budget_bytes // block_bytes, idle_pages=idle_pages)
    live: list[list[int]] = []
    alloc_us, free_us = [], []
    num_mapping_allocs = 0
    at_warmup = pool.snapshot()
    for i, (kind, arg) in enumerate(ops):
        if i == warmup:
            at_warmup = pool.snapshot()
        if i % 64 == 0:
            pool.replenish_reserve()  # the worker does this between steps, off the timed path
        mapped_before = pool.snapshot().num_pages_mapped_total if i >= warmup else 0
        start = now_us()
        if kind == "alloc":
            block_ids = space.allocate(arg)
            elapsed = now_us() - start
            assert block_ids is not None, "the workload keeps occupancy near half the budget"
            live.append(block_ids)
            samples = alloc_us

        else:
            block_ids = live.pop(arg)
            start = now_us()
            space.free(block_ids)
            elapsed = now_us() - start
            samples = free_us
        if i >= warmup:
            samples.append(elapsed)
            num_mapping_allocs += kind == "alloc" and pool.snapshot().num_pages_mapped_total > mapped_before
    end = pool.snapshot()
    num_measured = len(ops) - warmup
    result = {
        "idle_pages": idle_pages,
        "allocate": summarize(alloc_us),
        "free": summarize(free_us),
        "share_of_allocations_that_map": num_mapping_allocs / max(1, len(alloc_us)),
        "pages_mapped_per_op": (end.num_pages_mapped_total - at_warmup.num_pages_mapped_total) / num_measured,
        "pages_unmapped_per_op": (end.num_pages_unmapped_total - at_warmup.num_pages_unmapped_total) / num_measured,
        "pages_mapped_end": end.pages_mapped,
    }
    space.close()
    pool.close()
    return result


def run_torch_kv(device: str, ops, block_bytes: int, warmup: int, empty_cache: bool) -> dict[str, Any]:
    live: list[torch.Tensor] = []
    alloc_us, free_us = [], []
    for i, (kind, arg) in enumerate(ops):
        if kind == "alloc":
            start = now_us()
            live.append(torch.empty(arg * block_bytes, dtype=torch.uint8, device=device))
            elapsed, samples = now_us() - start, alloc_us
        else:
            tensor = live.pop(arg)
            start = now_us()
            del tensor
            elapsed, samples = now_us() - start, free_us
            if empty_cache:
                torch.cuda.empty_cache()  # untimed: return idle segments, so allocations reach cudaMalloc
        if i >= warmup:
            samples.append(elapsed)
    live.clear()
    if device != "cpu":
        torch.cuda.empty_cache()
    return {"allocate": summarize(alloc_us), "free": summarize(free_us)}


def measure_kv(
    backend: PageBackend, device: str, num_ops: int, budget_bytes: int, idle_pages: list[int]
) -> dict[str, Any]:
    """Per model: the pool at its default hysteresis ("pool") and at the others ("pool_idle_<n>")."""
    results = {}
    warmup = num_ops // 4
    for model, block_bytes in BLOCKS.items():
        ops = kv_workload(num_ops, block_bytes, budget_bytes, seed=0)
        runs = [run_pool_kv(backend, ops, block_bytes, budget_bytes, warmup, n) for n in idle_pages]
        entry = {
            "block_bytes": block_bytes,
            "pool": runs[0],
            **{f"pool_idle_{run['idle_pages']}": run for run in runs[1:]},
            "torch_cached": run_torch_kv(device, ops, block_bytes, warmup, empty_cache=False),
        }
        if device != "cpu":
            entry["torch_empty_cache"] = run_torch_kv(device, ops, block_bytes, warmup, empty_cache=True)
        for run in runs:
            for baseline in ("torch_cached", "torch_empty_cache"):
                if baseline in entry:
                    run[f"ratio_vs_{baseline}"] = {
                        f"{op}_{q}": run[op][q] / entry[baseline][op][q]
                        for op in ("allocate", "free")
                        for q in ("p50_us", "p99_us")
                    }
        results[model] = entry
    return results


# --- main ---------------------------------------------------------------------------------------


def make_backend(device: str) -> tuple[PageBackend, str]:
    if device == "cpu":
        return HostBackend(PAGE_BYTES), "cpu"
    from memory.cuda_backend import CudaBackend

    backend = CudaBackend(device, PAGE_BYTES)
    torch.empty(1, device=device)  # initialise torch's side of the context before timing anything
    return backend, torch.cuda.get_device_name(device)


def _p50(stats: dict[str, float]) -> str:
    return f"{stats['p50_us']:.1f}"


def _p50_p99(stats: dict[str, float]) -> str:
    return f"{stats['p50_us']:.1f}/{stats['p99_us']:.1f}"


def print_table(results: dict[str, Any]) -> None:
    ops, weights = results["page_ops"], results["weights"]
    print(f"\ncard: {results['card']}  (µs; p50 unless marked)")
    print(
        f"per page: create {_p50(ops['create_page'])}  map {_p50(ops['map'])}  "
        f"set_access {_p50(ops['set_access_per_page'])} (in one run: {ops['set_access_one_run_us_per_page']:.1f})  "
        f"unmap {_p50(ops['unmap'])}  destroy {_p50(ops['destroy_page'])}"
    )
    for label, key in (("pool 1-page, reserve hit", "pool_reserve_hit"), ("pool 1-page, create", "pool_create")):
        single = results[key]
        print(f"{label}: map_pages {_p50(single['map_pages'])}  unmap_pages {_p50(single['unmap_pages'])}")
    chunked = ops["whole_chunks_us_per_page"]
    print("per page, one call per 32-page chunk: " + "  ".join(f"{op} {us:.2f}" for op, us in chunked.items()))
    print(
        f"weights: activate {weights['activate_us_per_page']:.1f}/page = {weights['activate_ms_per_gib']:.1f} ms/GiB, "
        f"evict {weights['evict_ms_per_gib']:.1f} ms/GiB"
    )
    for name, row in results["pool_overhead"].items():
        print(f"pool per page ({name} backend): " + "  ".join(f"{key} {us:.2f}" for key, us in row.items()))
    print("KV allocate p50/p99 µs; pool: idle pages kept, share of allocations that mapped pages")
    print(f"{'KV block':<20}{'pool':>24}{'torch cached':>15}{'torch emptied':>15}{'pool/cached p50':>17}")
    for model, entry in results["kv"].items():
        cached = entry["torch_cached"]["allocate"]
        emptied = _p50_p99(entry["torch_empty_cache"]["allocate"]) if "torch_empty_cache" in entry else "-"
        for run in (entry[key] for key in entry if key.startswith("pool")):
            pool = run["allocate"]
            pool_text = f"{_p50_p99(pool)} i{run['idle_pages']} {run['share_of_allocations_that_map']:.0%}"
            print(
                f"{model + ' ' + str(entry['block_bytes'] // 1024) + 'K':<20}{pool_text:>24}"
                f"{_p50_p99(cached):>15}{emptied:>15}{pool['p50_us'] / cached['p50_us']:>17.2f}"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--ops", type=int, default=4000, help="operations per KV workload")
    parser.add_argument("--pages", type=int, default=512, help="pages for the page-op and weight measurements")
    parser.add_argument("--kv-budget-mib", type=int, default=2048)
    parser.add_argument(
        "--idle-pages", default="2,16", help="KV hysteresis values to compare; the first is the headline 'pool' run"
    )
    args = parser.parse_args(argv)

    backend, card = make_backend(args.device)
    results: dict[str, Any] = {
        "benchmark": "pool",
        "command": " ".join([sys.executable, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "card": card,
        "device": args.device,
        "torch": torch.__version__,
        "page_bytes": PAGE_BYTES,
        "page_ops": measure_page_ops(backend, args.pages),
        "pool_reserve_hit": measure_pool_single_page(backend, reserve_pages=4, repeats=500),
        "pool_create": measure_pool_single_page(backend, reserve_pages=0, repeats=500),
        "weights": measure_weight_activation(backend, args.pages),
        "pool_overhead": {
            "null": measure_pool_overhead(NullBackend(PAGE_BYTES)),
            "this_backend": measure_pool_overhead(backend, args.pages, num_kv=args.pages),
        },
        "kv": measure_kv(
            backend, args.device, args.ops, args.kv_budget_mib * MIB, [int(n) for n in args.idle_pages.split(",")]
        ),
    }
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    out = args.out or Path(__file__).resolve().parent / "results" / f"pool-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    print_table(results)
    return results


if __name__ == "__main__":
    main()
