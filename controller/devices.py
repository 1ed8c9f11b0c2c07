"""What this machine can serve, decided before anything is launched: the devices a registry names (`auto`:
the visible GPUs), checked against the machine, and the models no CPU pool can hold.
"""

from __future__ import annotations

import os
import subprocess

from controller.catalog import CatalogEntry
from controller.registry import Registry
from workers.contract.sizing import mapped_bytes


class CannotStart(Exception):
    """The registry is valid but cannot be served on this machine (a device it lacks, budgets that hold no
    model): said at start-up, before anything is launched."""


def resolve_devices(devices: list[str] | str) -> list[str]:
    """`auto`: every GPU the NVIDIA driver lists that CUDA_VISIBLE_DEVICES leaves visible, else the CPU.
    Listed devices are checked: a `cuda:N` this machine does not have raises CannotStart."""
    if devices == "auto":
        return [f"cuda:{i}" for i in range(usable_gpus())] or ["cpu"]
    gpus = [d for d in devices if d.startswith("cuda:")]
    if gpus:
        usable = usable_gpus()
        missing = [d for d in gpus if int(d.split(":")[1]) >= usable]
        if missing:
            have = f"{usable} visible GPU(s) (nvidia-smi, CUDA_VISIBLE_DEVICES)" if usable else "no NVIDIA GPU (nvidia-smi lists none)"
            raise CannotStart(f"`devices` lists {', '.join(missing)}, but this machine has {have}; use cpu, or devices: auto")
    return list(devices)


def usable_gpus() -> int:
    """GPUs the NVIDIA driver lists (`nvidia-smi`: the controller does not import torch or CUDA) that
    CUDA_VISIBLE_DEVICES leaves visible to a worker."""
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        listed = len(listing.stdout.split()) if listing.returncode == 0 else 0
    except (OSError, subprocess.TimeoutExpired):  # no driver
        listed = 0
    return visible_gpus(listed, os.environ.get("CUDA_VISIBLE_DEVICES"))


def models_beyond_budget(registry: Registry, catalog: dict[str, CatalogEntry], devices: list[str]) -> dict[str, str]:
    """Models that fit no CPU worker's pool (weights and `min_kv_reserve_tokens` of KV beyond
    `memory.cpu_budget_bytes`), with why; only where every device is a CPU (a GPU's pool is known when its
    worker starts). Raises CannotStart when no model fits."""
    if not devices or not all(d.startswith("cpu") for d in devices):
        return {}
    budget = int(registry.memory.cpu_budget_bytes)
    tokens = registry.scheduler.min_kv_reserve_tokens
    too_big = {}
    for name, entry in catalog.items():
        size = entry.size(devices[0])
        need = mapped_bytes(size.weight_bytes, int(registry.memory.page_bytes)) + tokens * size.kv_bytes_per_token
        if need > budget:
            too_big[name] = (f"it needs {need / 2**20:.0f} MiB (weights and {tokens} tokens of KV), more than "
                             f"memory.cpu_budget_bytes ({budget / 2**20:.0f} MiB)")
    if catalog and len(too_big) == len(catalog):
        smallest = min(too_big, key=lambda n: catalog[n].size(devices[0]).weight_bytes)
        raise CannotStart(f"memory.cpu_budget_bytes holds none of the models; the smallest, {smallest!r}: {too_big[smallest]}")
    return too_big


def visible_gpus(listed: int, cuda_visible_devices: str | None) -> int:
    """How many of the `listed` GPUs a worker sees: CUDA stops at the first entry that names no device."""
    if cuda_visible_devices is None:
        return listed
    entries = [e.strip() for e in cuda_visible_devices.split(",")]
    usable = next((i for i, e in enumerate(entries) if not e or e.startswith("-")), len(entries))
    return min(listed, usable)
