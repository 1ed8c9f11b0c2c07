"""Typed messages between the controller and a worker (msgpack over one ZMQ channel per worker).

Controller -> worker: Activate, Evict, Forget, Generate, Abort, Shutdown.
Worker -> controller: WorkerReady, ModelActivated, ModelEvicted, StepOutputs, Heartbeat.

Pydantic never crosses the process boundary: these are msgspec structs, tagged so that one decoder
reads every message type of a direction.
"""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class ModelSpec(msgspec.Struct, frozen=True):
    """Everything a worker needs to host one model; paths are local to the worker's host."""

    name: str
    weights_dir: str | None  # prepared HF directory (config.json + safetensors); None for dummy
    hf_config: dict  # the model's Hugging Face config
    load_format: str  # "safetensors" | "dummy"
    dtype: str  # "float32" | "bfloat16" | "float16"
    max_model_len: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    eos_token_ids: list[int]
    seed: int = 0
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.2
    priority: int = 0
    cuda_graphs: bool = True  # capture decode steps and steps with prompts up to 512 tokens as CUDA graphs (GPU only)
    kv_budget_bytes: int | None = None  # a fixed cap on this model's KV (static partitioning); None: elastic


# Controller -> worker


class Activate(msgspec.Struct, tag=True):
    """Make the model resident: map and fill its weights (creating its engine on first use)."""

    spec: ModelSpec


class Evict(msgspec.Struct, tag=True):
    """Unmap the model's weights and KV now; its unfinished requests fail (the controller drained first)."""

    name: str
    reason: str = ""


class Forget(msgspec.Struct, tag=True):
    """Evict the model and drop its engine (the model left the registry)."""

    name: str


class Generate(msgspec.Struct, tag=True):
    req_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_s: float  # controller's wall clock (time.time()) at arrival


class Abort(msgspec.Struct, tag=True):
    req_ids: list[str]


class Shutdown(msgspec.Struct, tag=True):
    pass


ToWorker = Activate | Evict | Forget | Generate | Abort | Shutdown


# Worker -> controller


class WorkerReady(msgspec.Struct, tag=True):
    worker_id: str
    device: str
    pid: int
    pool_budget_bytes: int


class ModelActivated(msgspec.Struct, tag=True):
    name: str
    error: str | None  # None: resident and ready
    error_kind: str | None = None  # "no_memory" (evict something and retry) | "failed"
    weight_bytes: int = 0
    num_kv_blocks: int = 0
    stage_s: float = 0.0
    map_copy_s: float = 0.0
    build_s: float = 0.0
    graphs_s: float = 0.0
    total_s: float = 0.0


class ModelEvicted(msgspec.Struct, tag=True):
    name: str
    evict_s: float = 0.0
    num_failed: int = 0


class TokenDelta(msgspec.Struct, array_like=True):
    """New tokens of one request from one engine step; `finish_reason` set on its last delta."""

    req_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    error_kind: str | None = None  # with "error": "invalid_request" (client's fault) | "internal" | "unavailable"


class StepOutputs(msgspec.Struct, tag=True):
    deltas: list[TokenDelta]


class ModelStats(msgspec.Struct):
    name: str
    active: bool
    num_waiting: int
    num_running: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    kv_pages_mapped: int
    weight_bytes: int
    num_steps: int = 0  # since the worker started, as the counters below
    num_scheduled_tokens: int = 0
    num_preemptions: int = 0
    step_device_s: float = 0.0
    prefill_tokens_per_s: float = 0.0  # the local scheduler's estimate (its prior until a prefill is measured)


class PoolStats(msgspec.Struct):
    budget_bytes: int
    page_bytes: int
    pages_mapped: int
    pages_free: int
    pages_reserved: int  # ready pages kept off the hot path
    kv_pages_by_model: dict[str, int]
    weight_pages_by_model: dict[str, int]


GC_PAUSE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)  # upper bounds; then +Inf


class GcStats(msgspec.Struct):
    """A process's garbage collections since it started (`workers/gc_heap.py`), per generation 0, 1, 2."""

    pause_counts: list[list[int]]  # [generation][bucket]: collections whose pause fell in each bucket (not cumulative)
    pause_s: list[float]  # [generation]: their pause time in all
    frozen_objects: int  # objects in the permanent generation, which collections skip


class Heartbeat(msgspec.Struct, tag=True):
    worker_id: str
    models: list[ModelStats]
    pool: PoolStats
    num_steps: int
    device_busy_s: float = 0.0  # device time of all steps so far (CUDA events, host gaps inside a step included; wall time on the CPU)
    gc: GcStats | None = None  # None from a worker that does not report it


FromWorker = WorkerReady | ModelActivated | ModelEvicted | StepOutputs | Heartbeat

_to_worker_encoder = msgspec.msgpack.Encoder()
_to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
_from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)


def encode(message: ToWorker | FromWorker) -> bytes:
    return _to_worker_encoder.encode(message)


def decode_to_worker(data: bytes) -> ToWorker:
    return _to_worker_decoder.decode(data)


def decode_from_worker(data: bytes) -> FromWorker:
    return _from_worker_decoder.decode(data)
