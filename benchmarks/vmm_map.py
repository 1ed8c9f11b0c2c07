"""How fast can 2 MiB pages be mapped? Raw CUDA VMM variants, to choose how weights are mapped.

    python benchmarks/vmm_map.py [--pages 1024]

Variants (µs per 2 MiB of mapped memory): the pool's map_pages in 32-page chunks; raw cuMemMap per page
plus one cuMemSetAccess per 32-page run; raw with 64 MiB physical handles (one map + one set-access per
handle); raw per-page mapping from 2 and 4 threads on disjoint runs. Prints a table, writes JSON.
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


def pool_map(num_pages: int) -> float:
    pool = PagePool(CudaBackend("cuda:0"), num_pages * PAGE, reserve_pages=num_pages)
    pool.replenish_reserve()
    vrange = pool.reserve_range("bench", MemoryKind.WEIGHTS, num_pages * PAGE)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for first in range(0, num_pages, 32):
        pool.map_pages(vrange, range(first, first + 32))
    elapsed = time.perf_counter() - started
    pool.release_range(vrange)
    pool.close()
    return elapsed / num_pages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pages", type=int, default=1024)
    parser.add_argument("--out", default="vmm_map.json")
    args = parser.parse_args()
    torch.cuda.init()
    torch.empty(1, device="cuda")
    n = args.pages
    rows = {
        "pool.map_pages, 32-page chunks": pool_map(n),
        "raw, 2 MiB handles, set-access per 32 pages": raw(n, 1, 32, 1),
        "raw, 2 MiB handles, set-access per page": raw(n, 1, 1, 1),
        "raw, 64 MiB handles": raw(n, 32, 32, 1),
        "raw, 2 MiB handles, 2 threads": raw(n, 1, 32, 2),
        "raw, 2 MiB handles, 4 threads": raw(n, 1, 32, 4),
    }
    result = {"benchmark": "vmm_map", "command": " ".join(["python", *sys.argv]), "card": torch.cuda.get_device_name(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "us_per_2mib_page": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, value in rows.items():
        print(f"{name:>48}: {value:7.1f} us/page")


if __name__ == "__main__":
    main()
