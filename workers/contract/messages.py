"""Typed messages between the controller and a worker (msgpack over one ZMQ channel per worker).

Controller -> worker: Configure, Prepare, Activate, CancelActivation, Evict, Forget, Generate, Abort, Shutdown.
Worker -> controller: Hello, WorkerReady, ModelActivated, ModelEvicted, StepOutputs, Heartbeat, Goodbye.

A worker's life on the channel: it connects and says `Hello`; the controller answers `Configure` (the
worker's whole configuration, once); the worker builds its page pool and says `WorkerReady`; then
requests, activations and evictions flow, and a `Heartbeat` every second reports what the worker holds.
Messages of one worker arrive in the order they were sent, and the worker sends its state just before
every reply to an activation or eviction, so the controller never sees a reply before the state that
goes with it. A worker that exits cleanly says `Goodbye` last: a worker the controller did not spawn
(it joined over the network) leaves at once instead of when its heartbeats stop.

Pydantic never crosses the process boundary: these are msgspec structs, tagged so that one decoder
reads every message type of a direction.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from workers.contract.config import WorkerConfig

# Why a model could not be activated, and so who acts: `no_memory` (transient: the scheduler makes room
# and retries), `failed` (the model is broken: its requests fail until the operator changes it),
# `cancelled` (the controller withdrew it: nobody waits for it any more).
ActivationErrorKind = Literal["no_memory", "failed", "cancelled"]
# Why a request ended with an error: `invalid_request` (the client's fault, 400), `unavailable` (retry:
# 503), `not_resident` (the worker does not hold the model the controller routed to: the controller
# repairs its view and routes again), `internal` (500).
RequestErrorKind = Literal["invalid_request", "unavailable", "not_resident", "internal"]


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
    ttft_slo_s: float
    tpot_slo_s: float
    seed: int = 0
    priority: int = 0
    cuda_graphs: bool = True  # capture decode steps and steps with prompts up to 512 tokens as CUDA graphs (GPU only)


# Controller -> worker


class Configure(msgspec.Struct, tag=True):
    """The answer to `Hello`: everything the worker needs to know, once."""

    config: WorkerConfig


class Prepare(msgspec.Struct, tag=True):
    """Get ready to activate the model fast, in the background: build its engine, stage its host image
    and, on a GPU while the device is idle, capture its CUDA graphs. No reply; heartbeats show progress."""

    spec: ModelSpec


class Activate(msgspec.Struct, tag=True):
    """Make the model resident: map and fill its weights (preparing it first if it is not prepared)."""

    spec: ModelSpec
    kv_budget_bytes: int | None = None  # a fixed cap on this model's KV (static partitioning); None: elastic


class Evict(msgspec.Struct, tag=True):
    """Unmap the model's weights and KV now; its unfinished requests fail (the controller drained first)."""

    name: str
    reason: str = ""


class CancelActivation(msgspec.Struct, tag=True):
    """Withdraw an activation that is still waiting for the model's preparation (its requests all left);
    the worker answers ModelActivated with kind `cancelled`, or nothing if the activation already ended."""

    name: str


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


ToWorker = Configure | Prepare | Activate | CancelActivation | Evict | Forget | Generate | Abort | Shutdown


# Worker -> controller


class Hello(msgspec.Struct, tag=True):
    """A worker that just connected: the controller answers with `Configure`."""

    worker_id: str
    device: str
    pid: int


class WorkerReady(msgspec.Struct, tag=True):
    worker_id: str
    device: str
    pid: int
    pool_budget_bytes: int


class ModelActivated(msgspec.Struct, tag=True):
    name: str
    error: str | None  # None: resident and ready
    error_kind: ActivationErrorKind | None = None
    weight_bytes: int = 0
    num_kv_blocks: int = 0
    stage_s: float = 0.0
    map_copy_s: float = 0.0
    build_s: float = 0.0
    total_s: float = 0.0
    graphs_captured: bool = True  # False: it runs eager until the worker captures its graphs between steps


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
    error_kind: RequestErrorKind | None = None  # with "error"


class StepOutputs(msgspec.Struct, tag=True):
    deltas: list[TokenDelta]


class ModelStats(msgspec.Struct):
    name: str
    resident: bool  # weights mapped and requests accepted (the worker's one answer: DeviceLoop.is_resident)
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
    # "prepared" (an activation is map + copy) | "staged, pinning" | "staged, graphs pending" | "staging" | "not prepared" | "failed: why"
    preparation: str = "prepared"
    graphs_captured: bool = True  # its CUDA graphs exist (always true on the CPU)


class PoolStats(msgspec.Struct):
    budget_bytes: int
    page_bytes: int
    pages_mapped: int
    pages_free: int
    pages_reserved: int  # ready pages kept off the hot path
    kv_pages_by_model: dict[str, int]
    weight_pages_by_model: dict[str, int]
    scratch_pages: int = 0  # the capture scratch, while a capture ahead holds it (in pages_mapped, under no model)
    ranges_reserved: int = 0  # virtual address ranges alive (weights and KV of each engine built)
    va_bytes_reserved: int = 0


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


class Goodbye(msgspec.Struct, tag=True):
    """The worker is exiting (shut down, or it lost its controller); nothing more comes from it."""

    worker_id: str
    pid: int
    reason: str


FromWorker = Hello | WorkerReady | ModelActivated | ModelEvicted | StepOutputs | Heartbeat | Goodbye

_to_worker_encoder = msgspec.msgpack.Encoder()
_to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
_from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)


def encode(message: ToWorker | FromWorker) -> bytes:
    return _to_worker_encoder.encode(message)


def decode_to_worker(data: bytes) -> ToWorker:
    return _to_worker_decoder.decode(data)


def decode_from_worker(data: bytes) -> FromWorker:
    return _from_worker_decoder.decode(data)
