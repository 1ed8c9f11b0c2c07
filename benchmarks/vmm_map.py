"""How fast can 2 MiB pages be mapped? The pool's paths and raw CUDA VMM variants, on one card in one run.

    python benchmarks/vmm_map.py [--pages 1024] [--out vmm_map.json]

Variants (µs per 2 MiB of mapped or unmapped memory):
- the pool (every page created up front, as the worker does: whole 64 MiB chunks and a stock of single
  pages): map_pages of weights in aligned 32-page groups (one whole chunk each) and their unmap;
  map_pages / unmap_pages of single KV pages, one per call, from the stock and beyond it (created);
- raw: cuMemMap per 2 MiB handle plus one cuMemSetAccess per 32-page run or per page; 64 MiB handles
  (one map + one set-access per handle); per-page mapping from 2 and 4 threads on disjoint runs.
Also records what the driver accepts: cuMemMap of part of an allocation, cuMemUnmap of part of a mapping.
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda.bindings import driver as cu  # noqa: E402

from memory import PagePool  # noqa: E402
from memory.cuda_backend import CudaBackend  # noqa: E402
from memory.pool import MemoryKind  # noqa: E402

PAGE = 2 * 1024**2


def ok(result):
    error, *values = result
    assert error == cu.CUresult.CUDA_SUCCESS, error
    return values[0] if values else None


def props(size_hint):
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    access = cu.CUmemAccessDesc()
    access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = 0
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return prop, access


def probe_driver() -> dict[str, str]:
    """The CUresult of the calls the pool avoids: mapping part of an allocation, unmapping part of a mapping."""
    prop, _ = props(None)
    handle = ok(cu.cuMemCreate(4 * PAGE, prop, 0))
    base = int(ok(cu.cuMemAddressReserve(8 * PAGE, PAGE, 0, 0)))
    result = {}
    for label, offset in (("map 2 of 4 pages at offset 0", 0), ("map 2 of 4 pages at offset 2", 2 * PAGE)):
        (error,) = cu.cuMemMap(base, 2 * PAGE, offset, handle, 0)
        result[label] = getattr(error, "name", str(error))
        if error == cu.CUresult.CUDA_SUCCESS:
            cu.cuMemUnmap(base, 2 * PAGE)
    ok(cu.cuMemMap(base, 4 * PAGE, 0, handle, 0))
    (error,) = cu.cuMemUnmap(base, PAGE)
    result["unmap 1 page of a 4-page mapping"] = getattr(error, "name", str(error))
    for first in (0, 1) if error == cu.CUresult.CUDA_SUCCESS else (0,):  # clean up whatever is left
        cu.cuMemUnmap(base + first * PAGE, (4 - first) * PAGE)
    cu.cuMemRelease(handle)
    cu.cuMemAddressFree(base, 8 * PAGE)
    return result


def raw(num_pages: int, handle_pages: int, run_pages: int, threads: int) -> float:
    prop, access = props(None)
    handles = [ok(cu.cuMemCreate(handle_pages * PAGE, prop, 0)) for _ in range(num_pages // handle_pages)]
    base = int(ok(cu.cuMemAddressReserve(num_pages * PAGE, PAGE, 0, 0)))
    context = ok(cu.cuCtxGetCurrent())
    per_thread = len(handles) // threads

    def work(part: int) -> None:
        ok(cu.cuCtxSetCurrent(context))
        mine = range(part * per_thread, (part + 1) * per_thread)
        for start in range(mine.start, mine.stop, max(1, run_pages // handle_pages)):
            stop = min(start + max(1, run_pages // handle_pages), mine.stop)
            for i in range(start, stop):
                ok(cu.cuMemMap(base + i * handle_pages * PAGE, handle_pages * PAGE, 0, handles[i], 0))
            ok(cu.cuMemSetAccess(base + start * handle_pages * PAGE, (stop - start) * handle_pages * PAGE, [access], 1))

    torch.cuda.synchronize()
    started = time.perf_counter()
    pool = [threading.Thread(target=work, args=(p,)) for p in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    for i in range(len(handles)):
        ok(cu.cuMemUnmap(base + i * handle_pages * PAGE, handle_pages * PAGE))
        ok(cu.cuMemRelease(handles[i]))
    ok(cu.cuMemAddressFree(base, num_pages * PAGE))
    return elapsed / num_pages * 1e6


def pool_paths(num_pages: int, stock: int = 32) -> dict[str, float]:
    """µs per page through PagePool: weights in aligned 32-page groups, KV one page per call; map and unmap."""
    backend = CudaBackend("cuda:0")
    budget = num_pages + stock  # whole chunks for the weights, plus the stock of single pages
    pool = PagePool(backend, budget * PAGE, reserve_pages=budget)
    pool.replenish_reserve()  # every page created up front, as the worker does
    rows = {}
    weights = pool.reserve_range("bench", MemoryKind.WEIGHTS, num_pages * PAGE)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for first in range(0, num_pages, 32):
        assert pool.map_pages(weights, range(first, min(first + 32, num_pages)))
    rows["pool.map_pages, weights in 32-page groups"] = (time.perf_counter() - started) / num_pages * 1e6
    started = time.perf_counter()
    pool.unmap_pages(weights, range(num_pages))
    rows["pool.unmap_pages, weights (whole chunks)"] = (time.perf_counter() - started) / num_pages * 1e6
    pool.release_range(weights)
    kv = pool.reserve_range("bench", MemoryKind.KV, budget * PAGE)
    num_kv = min(num_pages, 512)
    for label, pages in (("from the stock", range(stock)), ("created on demand", range(stock, stock + num_kv))):
        started = time.perf_counter()
        for i in pages:
            assert pool.map_pages(kv, [i])
        rows[f"pool.map_pages, single KV pages {label}"] = (time.perf_counter() - started) / len(pages) * 1e6
    started = time.perf_counter()
    for i in range(stock + num_kv):
        pool.unmap_pages(kv, [i])
    rows["pool.unmap_pages, single KV pages"] = (time.perf_counter() - started) / (stock + num_kv) * 1e6
    pool.release_range(kv)
    pool.close()
    backend.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pages", type=int, default=1024)
    parser.add_argument("--out", default="vmm_map.json")
    args = parser.parse_args()
    torch.cuda.init()
    torch.empty(1, device="cuda")
    n = args.pages
    rows = {
        **pool_paths(n),
        "raw, 2 MiB handles, set-access per 32 pages": raw(n, 1, 32, 1),
        "raw, 2 MiB handles, set-access per page": raw(n, 1, 1, 1),
        "raw, 64 MiB handles": raw(n, 32, 32, 1),
        "raw, 2 MiB handles, 2 threads": raw(n, 1, 32, 2),
        "raw, 2 MiB handles, 4 threads": raw(n, 1, 32, 4),
    }
    driver = probe_driver()
    result = {"benchmark": "vmm_map", "command": " ".join(["python", *sys.argv]), "card": torch.cuda.get_device_name(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "us_per_2mib_page": rows,
              "driver_accepts": driver}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, value in rows.items():
        print(f"{name:>56}: {value:7.1f} us/page")
    for name, value in driver.items():
        print(f"{name:>56}: {value}")


if __name__ == "__main__":
    main()
