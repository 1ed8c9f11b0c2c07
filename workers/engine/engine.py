"""The built-in engine: one model on one device, its weights and KV in the device's page pool.

An engine is created once per (model, worker) and then activated and deactivated any number of times.
Creation reserves address space only (weights range, KV range). Preparation (`prepare`, off the device
loop's thread) builds the model's tensor views over the still unmapped weight range and stages its
host image (filled once per host, pinned); on a GPU, `capture_graphs` then captures its CUDA graphs once,
over the pool's capture scratch mapped across the weights' range for the capture alone, while the device
is idle. Activation maps the weight pages (in
64 MiB physical chunks: one driver call each) and copies the host image into them (its pinned pieces by
DMA on several streams, the rest through bounce buffers: host_copy.py); whatever preparation has not done
yet it does first, except the graphs when the device loop asks (it captures them between steps).
Deactivation unmaps every page (the memory serves other models at once) but keeps the address ranges,
the views and the graphs, so the next activation is map + copy and nothing else (Prism's engine pool).

The engine does not decide what runs: the worker's local scheduler hands it a StepPlan with KV blocks
already allocated; `execute(plan)` runs that step and returns the sampled tokens.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from dataclasses import dataclass

import torch

from memory import CappedKV, KVSpace, MemoryKind, PagePool
from memory.host_store import HostWeightStore, image_key
from scheduler.local import ScheduledChunk, StepPlan
from workers.engine.batch import build_batch
from workers.engine import host_copy
from workers.engine.cuda_graphs import DecodeGraphs, PrefillGraphs
from workers.engine.llama import LlamaModel
from workers.engine.sampler import Sampler
from workers.contract.messages import ModelSpec
from workers.contract.sizing import Arch
from workers.weights.checkpoint import iter_dummy, iter_safetensors
from workers.weights.layout import WeightLayout, fill

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A step of decodes plus prefill chunks runs its decodes as a decode-graph replay and its chunks apart
# (a prefill-graph replay, or eager when too large), from this many decodes on. Below it the whole step
# goes through one prefill graph: its decode rows then take the prefill attention kernel, which reads a
# sequence's KV once per query head, not once per KV head. On the H200 an 8B step of 128 decodes and a
# 16-token prompt took 22 ms eager against 7.4 ms for the decodes graphed (benchmarks/results/
# step_cost-h200.json); the split costs one more read of the weights.
SPLIT_MIN_DECODES = 64
PREFILL_GRAPH_PROMPTS = 8  # prompt chunks a prefill graph takes beside SPLIT_MIN_DECODES decodes
CAPTURE_KV_PAGES = 64  # free pages beyond the capture scratch's that a capture ahead of activation wants (warm-up KV)


def _single_tokens_first(chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
    """The step's chunks with the one-token ones (decodes) first, each group in plan order."""
    singles, rest = [], []
    for chunk in chunks:
        (singles if chunk.num_new_tokens == 1 else rest).append(chunk)
    return singles + rest if singles and rest else chunks


class NotEnoughMemory(MemoryError):
    """The pool cannot back this model's weights now; nothing is mapped. The controller evicts and retries."""


@dataclass
class ActivationTimes:
    stage_s: float = 0.0  # waiting for the host image (built, or found and pinned) on the activation's path
    map_copy_s: float = 0.0  # pages mapped and weights copied in
    build_s: float = 0.0  # tensor views and model (when preparation has not built them)
    graphs_s: float = 0.0  # CUDA graphs captured in line (`capture_graphs=True` and none captured ahead)
    pinned_fraction: float = 1.0  # of the image copied by DMA; the rest went through bounce buffers
    total_s: float = 0.0


class StepTimer:
    """A step's device time: CUDA events around its kernels on a GPU, the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self._events = None
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._started = time.perf_counter()
        self._elapsed_s: float | None = None

    def stop(self) -> StepTimer:
        if self._events is None:
            self._elapsed_s = time.perf_counter() - self._started
        else:
            self._events[1].record()
        return self

    def wait(self) -> float:
        """Block until the step's work is done; return its device seconds."""
        if self._elapsed_s is None:
            self._events[1].synchronize()
            self._elapsed_s = self._events[0].elapsed_time(self._events[1]) / 1e3
        return self._elapsed_s


class PendingStep:
    """A launched step: `result()` waits for its kernels and returns its sampled tokens by request id."""

    def __init__(self, req_ids: list[str], tokens: torch.Tensor | None, timer: StepTimer):
        self.req_ids = req_ids
        self._tokens = tokens
        self._timer = timer

    def result(self) -> dict[str, int]:
        self._timer.wait()
        if self._tokens is None:
            return {}
        return dict(zip(self.req_ids, self._tokens.tolist()))

    @property
    def device_s(self) -> float:
        """The step's time on the device (waits for it)."""
        return self._timer.wait()


class Engine:
    def __init__(self, spec: ModelSpec, device: torch.device, pool: PagePool, store: HostWeightStore | None = None):
        self.spec = spec
        self.device = device
        self.pool = pool
        self.store = store
        self.dtype = DTYPES[spec.dtype]
        self.arch = Arch.from_hf_config(spec.hf_config)
        self.layout = WeightLayout.of(self.arch, self.dtype)
        self.weight_bytes = self.layout.num_bytes
        self.block_size = spec.block_size
        self.kv_block_shape = (self.arch.num_layers, 2, spec.block_size, self.arch.num_kv_heads, self.arch.head_dim)
        block_bytes = self.arch.kv_bytes_per_token(spec.dtype) * spec.block_size
        self.weights = pool.reserve_range(spec.name, MemoryKind.WEIGHTS, self.weight_bytes)
        # On a GPU an unmap waits for the device: pages emptied by finished sequences are unmapped by the
        # worker between steps (`trim`), not inside the scheduler's update while the next step runs.
        self.kv = KVSpace.for_model(pool, spec.name, block_bytes, trim_on_free=device.type != "cuda")
        self.kv_cache = self.kv.tensor(self.dtype, self.kv_block_shape)
        self.block_bytes = block_bytes
        self.allocator: KVSpace | CappedKV = self.kv  # set again by each activation (a static KV share caps it)
        self.sampler = Sampler(device, seed=None)
        self.model: LlamaModel | None = None
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.graph_bytes = 0  # device memory its capture left held (graph pools, warm-up buffers): torch's, not the pool's
        self.split_min_decodes = SPLIT_MIN_DECODES
        self._scratch: list[int] | None = None
        self.weights_mapped = False
        self.last_activation = ActivationTimes()

    # --- preparation ------------------------------------------------------------------------------

    @property
    def prepared(self) -> bool:
        """Its module is built and, with a host store, its image staged there: an activation is map + copy
        (and, on a GPU without `graphs_captured`, the capture). The store may drop an idle image to keep
        within its budget; the model is then prepared again."""
        return self.model is not None and (self.store is None or self.store.has(self.image_key))

    @property
    def graphs_captured(self) -> bool:
        return self.graphs is not None or self.device.type != "cuda" or not self.spec.cuda_graphs

    def prepare(self) -> None:
        """Build the module and stage the host image (an image built here is pinned as it is filled; one
        found in the store, from another worker or this worker's previous life, is pinned later by
        `pin_image`). Runs on a staging thread: it touches no page of the pool (views over an unmapped range
        read nothing), and dummy weights are generated on a stream of its own."""
        if self.model is None:
            self._build()
        if self.store is None:
            return
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            image = self.store.acquire(self.image_key, self.weight_bytes, self._fill_image, pin_device=str(self.device))
            try:
                if stream is not None:
                    stream.synchronize()
            finally:
                self.store.release(image)

    @property
    def image_pinned(self) -> bool:
        """Activations copy at line rate: the image is pinned whole (or there is nothing to pin)."""
        return self.store is None or self.device.type != "cuda" or self.store.is_pinned(self.image_key)

    def pin_image(self) -> None:
        """Page-lock the staged image, a piece at a time (a background thread's work: an activation
        meanwhile copies the pinned pieces by DMA and the rest through bounce buffers)."""
        if self.image_pinned or not self.store.has(self.image_key):
            return
        image = self.store.acquire(self.image_key, self.weight_bytes, self._fill_image, pin_device=str(self.device))
        try:
            image.pin(str(self.device))
        finally:
            self.store.release(image)

    def _build(self) -> None:
        views = self.layout.views(self.pool.tensor(self.weights)[: self.weight_bytes])
        ops = "triton" if self.device.type == "cuda" else "torch"
        self.model = LlamaModel.from_views(self.arch, self.spec.hf_config, views, ops)

    def capture_graphs(self) -> bool:
        """Capture the CUDA graphs once. An active engine captures over its own weights, between steps
        (it ran eager until then). Before the first activation they are captured over the pool's capture
        scratch mapped across the weights' range (`PagePool.map_scratch`: at most a chunk and a page of
        the budget, whatever the model's size; the graphs record addresses, the warm-up's output is thrown
        away) and unmapped after it. False, doing nothing, when the pool cannot lend the scratch and the
        warm-up's KV pages now, or an active engine has no free KV block for its padded rows."""
        if self.graphs_captured or self.model is None:
            return self.graphs_captured
        if self.weights_mapped:
            if self._scratch is None and self.spec.cuda_graphs:
                self._scratch = self.kv.allocate(1)
                if self._scratch is None:
                    return False  # its running requests hold every KV block the pool can back: later
            self._prepare_graphs()
            return True
        if self.pool.scratch_pages_for(self.weights) + CAPTURE_KV_PAGES > self.pool.num_free_pages:
            return False
        if not self.pool.map_scratch(self.weights):
            return False
        try:
            self._prepare_graphs()
        finally:
            if self._scratch is not None:
                self.kv.free(self._scratch)
                self._scratch = None
            self.kv.trim(0)
            self.pool.unmap_scratch(self.weights)
        return True

    # --- activation -------------------------------------------------------------------------------

    def activate(self, kv_budget_bytes: int | None = None, capture_graphs: bool = True) -> ActivationTimes:
        """Map and fill the weights; raise NotEnoughMemory (nothing mapped) if the pool cannot back them.
        `kv_budget_bytes`: a fixed cap on this model's KV (the static baseline's share); None: elastic.
        `capture_graphs=False` (the device loop): graphs not captured ahead are not captured here either;
        the engine runs eager until `capture_graphs()`."""
        assert not self.weights_mapped
        times = ActivationTimes()
        started = time.perf_counter()
        shortfall = self.weights.num_pages - self.pool.num_free_pages
        if shortfall > 0 and not self.pool.reclaim_idle(shortfall):
            raise NotEnoughMemory(
                f"{self.spec.name} needs {self.weights.num_pages} pages for weights; "
                f"{self.pool.num_free_pages} of {self.pool.budget_pages} are free"
            )
        self.allocator = CappedKV(self.kv, kv_budget_bytes // self.block_bytes) if kv_budget_bytes else self.kv
        if self.store is not None:
            # Prepared: the image is in the store and this is a lookup; else it is staged here, on the path.
            image = self.store.acquire(self.image_key, self.weight_bytes, self._fill_image, pin_device=str(self.device))
            try:
                times.stage_s = time.perf_counter() - started
                times.pinned_fraction = image.pinned_bytes / self.weight_bytes if self.device.type == "cuda" else 1.0
                mark = time.perf_counter()
                self._map_and_copy(image.tensor, list(image.pinned_pieces))
                times.map_copy_s = time.perf_counter() - mark
            finally:
                self.store.release(image)
        else:
            mark = time.perf_counter()
            self._map_and_copy(None, [])
            times.map_copy_s = time.perf_counter() - mark
        try:
            mark = time.perf_counter()
            if self.model is None:
                self._build()
            times.build_s = time.perf_counter() - mark
            mark = time.perf_counter()
            if capture_graphs or self.graphs is not None:
                self._prepare_graphs()  # with graphs captured ahead: only their scratch block
            times.graphs_s = time.perf_counter() - mark
        except BaseException:
            self._unmap_weights()
            raise
        self.weights_mapped = True
        times.total_s = time.perf_counter() - started
        self.last_activation = times
        return times

    def deactivate(self) -> None:
        """Unmap weights and KV (every sequence must be gone); keep address ranges, views and graphs."""
        if not self.weights_mapped:
            return
        if self._scratch is not None:
            self.kv.free(self._scratch)
            self._scratch = None
        assert self.kv.num_used_blocks == 0, "deactivating an engine that still holds KV blocks"
        self.kv.trim(0)
        self._unmap_weights()
        self.weights_mapped = False

    @functools.cached_property
    def image_key(self) -> str:
        spec = self.spec
        source = spec.weights_dir if spec.load_format != "dummy" else f"dummy-{spec.seed}"
        return image_key(source, json.dumps(spec.hf_config, sort_keys=True), spec.dtype)

    def _checkpoint(self, device: str):
        if self.spec.load_format == "dummy":
            return iter_dummy(self.arch, self.spec.seed, device, self.dtype)
        return iter_safetensors(self.spec.weights_dir, "cpu", self.dtype)

    def _fill_image(self, image: torch.Tensor) -> None:
        # Dummy weights are generated on the device (fast) and copied down; files are read on the host.
        fill(self.layout, self.layout.views(image), self._checkpoint(str(self.device)))

    def _map_and_copy(self, image: torch.Tensor | None, pinned_pieces: list[int]) -> None:
        """Map every weight page, then copy the image in (its pinned pieces by DMA on several streams, at
        PCIe line rate; the rest through bounce buffers: workers/engine/host_copy.py).

        The pool maps a weight range in runs of `chunk_pages` pages, one physical allocation each, so
        mapping a whole model costs one driver call per 64 MiB (18 ms for an 8B model on an H100),
        against about 0.3 s for the copy: there is nothing left to overlap.
        """
        if not self.pool.map_pages(self.weights, range(self.weights.num_pages)):
            raise NotEnoughMemory(f"{self.spec.name}: the pool ran out of pages while mapping weights")
        target = self.pool.tensor(self.weights)[: self.weight_bytes]
        try:
            if image is None:  # no host image: place tensors one by one (the naive path)
                fill(self.layout, self.layout.views(target), self._checkpoint(str(self.device)))
            elif self.device.type == "cuda":
                chunk = self.pool.chunk_pages * self.pool.page_bytes
                host_copy.for_device(self.device).copy(image[: self.weight_bytes], pinned_pieces, target, chunk)
            else:
                target.copy_(image[: self.weight_bytes])
        except BaseException:
            self._unmap_weights()
            raise

    def _unmap_weights(self) -> None:
        mapped = [i for i in range(self.weights.num_pages) if self.weights.is_mapped(i)]
        self.pool.unmap_pages(self.weights, mapped)

    def _take_scratch(self) -> None:
        if self._scratch is None:
            self._scratch = self.kv.allocate(1)  # padded graph rows write here while the engine is active
        if self._scratch is None:
            raise NotEnoughMemory(f"{self.spec.name}: no KV block for the CUDA graphs' scratch space")
        if self.graphs is not None:
            self.graphs.scratch_block = self._scratch[0]

    def _prepare_graphs(self) -> None:
        if self.device.type != "cuda" or not self.spec.cuda_graphs:
            return
        self._take_scratch()
        if self.graphs is None:
            # Cached blocks nobody uses go back first: a capture that reused them would hold them without
            # growing what torch reserves, and they would be charged to no one.
            torch.cuda.empty_cache()
            held_before = torch.cuda.memory_reserved(self.device)
            self._warm_up_prefill()
            max_blocks = -(-self.spec.max_model_len // self.block_size)
            self.graphs = DecodeGraphs(
                self.model, self.kv_cache, self.block_size, self.spec.max_num_seqs,
                max_blocks_per_seq=max_blocks, scratch_block=self._scratch[0],
            )
            self.graphs.capture()
            self.prefill_graphs = PrefillGraphs(
                self.model, self.kv_cache, self.block_size, min(self.spec.max_num_seqs, SPLIT_MIN_DECODES + PREFILL_GRAPH_PROMPTS),
                max_tokens=self.spec.max_num_batched_tokens, max_blocks_per_seq=max_blocks,
            )
            self.prefill_graphs.capture()
            self.graph_bytes = max(0, torch.cuda.memory_reserved(self.device) - held_before)

    @torch.inference_mode()
    def _warm_up_prefill(self) -> None:
        """Compile the prefill kernels' variants before the first request does (a cold compile costs ~1 s).

        Triton specialises every integer argument on whether it is 1, a multiple of 16 or neither; in
        prefill the one that follows the request is the block table's row stride (its width in blocks).
        So: chunks one, three and sixteen blocks wide, alone and batched, and a one-token chunk.
        """
        lengths = (1, 2, 2 * self.block_size + 1, 16 * self.block_size)
        lengths = tuple(n for n in lengths if n <= self.spec.max_model_len)
        blocks = self.kv.allocate(sum(-(-n // self.block_size) for n in lengths))
        if blocks is None:
            return
        tables, start = [], 0
        for n in lengths:
            count = -(-n // self.block_size)
            tables.append(blocks[start : start + count])
            start += count
        batches = [[i] for i in range(len(lengths))] + [list(range(len(lengths)))]
        try:
            for members in batches:
                batch = build_batch(
                    [[1] * lengths[i] for i in members], [0] * len(members), [tables[i] for i in members],
                    [True] * len(members), self.block_size, self.device, with_device_meta=True,
                )
                self.model.logits(self.model.forward(batch, self.kv_cache))
            torch.cuda.synchronize(self.device)
        finally:
            self.kv.free(blocks)

    # --- steps ------------------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> dict[str, int]:
        """Run one step and wait for it; return the sampled token of every sequence whose chunk reached its end."""
        return self.launch(plan).result()

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> PendingStep:
        """Queue one step's kernels (forward, logits, sampling, the tokens' copy home) without waiting for them."""
        assert self.weights_mapped, f"{self.spec.name} is not active"
        timer = StepTimer(self.device)
        if not plan.chunks:
            return PendingStep([], None, timer.stop())
        chunks = _single_tokens_first(plan.chunks)
        logits = self._logits(chunks)
        sampling = [c.seq for c in chunks if c.samples]
        if not sampling:
            return PendingStep([], None, timer.stop())
        banned = [
            sorted(s.eos_token_ids | s.stop_token_ids) if s.num_output_tokens < s.min_tokens else []
            for s in sampling
        ]
        tokens = self.sampler.sample(logits, [s.req_id for s in sampling], [s.sampling for s in sampling], banned)
        if tokens.is_cuda:
            tokens = tokens.to("cpu", non_blocking=True)  # into pinned memory; ready when the timer stops
        return PendingStep([s.req_id for s in sampling], tokens, timer.stop())

    def _logits(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        """Logits of the sampled rows, in chunk order (single-token chunks first): a decode-graph replay
        for a decode batch; for decodes plus prefill chunks, the decodes replayed and the chunks apart
        (from `split_min_decodes` decodes on); else the whole step in one prefill graph or eager forward."""
        graphs = self.graphs
        if graphs is not None:
            num_single = next((i for i, c in enumerate(chunks) if c.num_new_tokens != 1), len(chunks))
            if num_single == len(chunks) and graphs.can_run(num_single):
                return self._replay(chunks)
            if num_single >= self.split_min_decodes and graphs.can_run(num_single):
                decoded = self._replay(chunks[:num_single])  # queued first: the device runs it while the host launches the rest
                parts = [t for t in (decoded, self._prefill(chunks[num_single:])) if t is not None]
                return torch.cat(parts) if len(parts) == 2 else parts[0] if parts else None
        return self._prefill(chunks)

    def _prefill(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        """A step with prompt chunks: a prefill-graph replay where one fits, else the eager forward."""
        graphs = self.prefill_graphs
        if graphs is not None and graphs.can_run(sum(c.num_new_tokens for c in chunks), len(chunks)):
            return graphs.run(
                [c.seq.token_ids(c.start, c.start + c.num_new_tokens) for c in chunks],
                [c.start for c in chunks],
                [c.seq.block_ids for c in chunks],
                [c.samples for c in chunks],
            )
        return self._eager(chunks)

    def _replay(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        logits = self.graphs.run(
            [c.seq.token_ids(c.start, c.start + 1)[0] for c in chunks],
            [c.start for c in chunks],
            [c.seq.block_ids for c in chunks],
        )
        sampled = [i for i, c in enumerate(chunks) if c.samples]  # a one-token prompt chunk short of its end samples nothing
        if len(sampled) == len(chunks):
            return logits
        if not sampled:
            return None
        rows = torch.tensor(sampled)
        if logits.is_cuda:
            rows = rows.pin_memory().to(logits.device, non_blocking=True)  # a pageable copy would wait for the replay
        return logits[rows]

    def _eager(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        batch = build_batch(
            token_chunks=[c.seq.token_ids(c.start, c.start + c.num_new_tokens) for c in chunks],
            start_positions=[c.start for c in chunks],
            block_tables=[c.seq.block_ids for c in chunks],
            sample_mask=[c.samples for c in chunks],
            block_size=self.block_size,
            device=self.device,
            with_device_meta=self.device.type == "cuda",
        )
        hidden = self.model.forward(batch, self.kv_cache)
        return self.model.logits(hidden) if hidden.shape[0] else None

    def release(self, req_id: str) -> None:
        """Forget per-request state (its seeded generator); the scheduler has freed its blocks."""
        self.sampler.forget(req_id)

    def close(self) -> None:
        """Deactivate and give the address ranges back (the model is removed from this worker)."""
        self.deactivate()
        self.graphs = self.prefill_graphs = None
        self.model = None
        del self.kv_cache
        self.kv.close()
        self.pool.release_range(self.weights)
