"""The worker's configuration: built by the controller from the validated registry and sent once, as the
controller's answer to a worker's `Hello`. The worker's command line names only how to reach the
controller and which device to drive; everything else arrives here, so a default is never declared twice
(the registry's pydantic models declare them, this struct has none).
"""

from __future__ import annotations

import msgspec


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    cpu_budget_bytes: int
    """A CPU worker's page pool."""
    gpu_memory_utilization: float
    """Share of the GPU's memory that the worker may use (the pool plus `gpu_reserved_bytes`)."""
    gpu_reserved_bytes: int
    """GPU memory kept outside the pool: activations, CUDA graph pools, cuBLAS workspaces."""
    page_bytes: int
    host_store_bytes: int
    """Shared host memory for staged weight images."""
    host_store_dir: str
    """Where weight images live (a tmpfs: /dev/shm)."""
    store_prefix: str
    """File name prefix of this controller's weight images, so that they can be told apart and removed."""
    compile_cache_dir: str
    """Where compiled kernels (Triton's) are kept across worker restarts: under the server's cache directory."""
    local_policy: str
    """Step order across models: `prism` or `fcfs`."""
    tpot_target: str
    overlap_steps: bool
