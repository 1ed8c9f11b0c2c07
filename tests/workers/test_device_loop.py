"""The device loop's preparation: engines are prepared off the loop's thread, an activation waits for its
model's preparation without stopping the resident models, and a re-activation reuses the engine."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import time
from pathlib import Path

import pytest

from memory.host_store import HostWeightStore
from tests.factories import make_pool
from workers.contract import messages as m
from workers.contract.gc_heap import FreezeReport
from workers.device_loop import DeviceLoop
from workers.engine.llama import rope_inv_freq

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny-llama.json"
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}
GREEDY = m.SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6)
FREEZE_REPORT = FreezeReport(0, 0.0)


def spec(name: str, seed: int, **config) -> m.ModelSpec:
    hf_config = {**json.loads(TINY.read_text()), **config}
    return m.ModelSpec(name=name, weights_dir=None, hf_config=hf_config, load_format="dummy", dtype="float32", max_model_len=256,
                       block_size=16, max_num_seqs=8, max_num_batched_tokens=128, eos_token_ids=[], ttft_slo_s=2.0, tpot_slo_s=0.2,
                       seed=seed)


@pytest.fixture
def loop(tmp_path):
    store = HostWeightStore(256 * 2**20, tmp_path, "prism-test-")
    device_loop = DeviceLoop("test", "cpu", make_pool(256 * 2**20), store, local_policy="prism", tpot_target="request", overlap_steps=True)
    yield device_loop
    device_loop.close()


def replies(loop: DeviceLoop, kind: type) -> list:
    return [message for message in loop.take_outbox() if isinstance(message, kind)]


def test_building_a_model_leaves_its_spec_config_as_it_was():
    """Regression: transformers adds `rope_theta` to a config's rope_scaling in place, so the spec a worker
    kept no longer equaled the controller's, and every activation built the engine and its graphs again."""
    config = {**json.loads(TINY.read_text()), "rope_scaling": LLAMA3_ROPE}
    before = copy.deepcopy(config)
    rope_inv_freq(config)
    assert config == before


def test_reactivating_a_model_with_rope_scaling_reuses_its_prepared_engine(loop):
    model = spec("rope", 1, rope_scaling=LLAMA3_ROPE)
    loop.handle(m.Prepare(model))
    loop.settle()
    engine = loop.engines["rope"]
    assert engine.prepared and loop.model_stats()[0].preparation == "prepared"
    for _ in range(2):
        loop.handle(m.Activate(m.decode_to_worker(m.encode(m.Activate(model))).spec))  # as it arrives over the wire
        loop.settle()
        (activated,) = replies(loop, m.ModelActivated)
        assert activated.error is None and loop.is_resident("rope")
        assert loop.engines["rope"] is engine and activated.build_s < 1e-3  # built once, when prepared
        loop.handle(m.Evict("rope"))
        assert not loop.is_resident("rope") and engine.prepared  # its image stays staged for the next activation


def test_a_model_waiting_for_its_preparation_does_not_stop_a_resident_one(loop, tmp_path):
    resident, cold = spec("resident", 1), spec("cold", 2)
    loop.handle(m.Activate(resident))
    loop.settle()
    assert [r.error for r in replies(loop, m.ModelActivated)] == [None]
    image = tmp_path / f"prism-test-{loop._engine_for(cold).image_key}"
    with open(image.with_name(image.name + ".lock"), "w") as lock:  # another process on the host builds that image
        fcntl.flock(lock, fcntl.LOCK_EX)
        loop.handle(m.Activate(cold))  # returns at once: the cold model stages on a thread, blocked on the lock
        loop.handle(m.Generate("r1", "resident", [5, 6, 7], GREEDY, time.time()))
        tokens = []
        while loop.has_work():
            loop.step()
            tokens += [t for msg in loop.take_outbox() if isinstance(msg, m.StepOutputs) for d in msg.deltas for t in d.token_ids]
        assert len(tokens) == GREEDY.max_tokens  # the resident model finished its request meanwhile
        assert not loop.is_resident("cold") and {s.name: s.preparation for s in loop.model_stats()}["cold"] == "staging"
        fcntl.flock(lock, fcntl.LOCK_UN)
    loop.settle()
    (activated,) = replies(loop, m.ModelActivated)
    assert activated.name == "cold" and activated.error is None and loop.is_resident("cold")
    assert activated.stage_s > 0  # its wait for the preparation counts in its activation


def test_a_model_an_activation_waits_for_is_staged_before_models_asked_earlier(loop, tmp_path):
    """Regression: a restarted worker is sent a Prepare for every model, then its restore activations; the
    staging threads took them in order of arrival, so the last restored model waited for every preparation."""
    models = {name: spec(name, seed) for seed, name in enumerate(["a", "b", "c", "d", "urgent"], start=1)}
    locks = {}
    try:
        for name in ["a", "b", "c", "d"]:  # another process on the host builds these images
            image = tmp_path / f"prism-test-{loop._engine_for(models[name]).image_key}"
            locks[name] = open(image.with_name(image.name + ".lock"), "w")
            fcntl.flock(locks[name], fcntl.LOCK_EX)
        for name in ["a", "b", "c", "d", "urgent"]:  # a and b take both staging threads and block there
            loop.handle(m.Prepare(models[name]))
        loop.handle(m.Activate(models["urgent"]))
        fcntl.flock(locks["a"], fcntl.LOCK_UN)  # one thread free: it takes the urgent model, not c
        loop._staging["urgent"].result(timeout=60)  # with c taken first, this would time out (c stays locked)
        assert loop.engines["urgent"].prepared and not loop.engines["c"].prepared and not loop.engines["d"].prepared
    finally:
        for lock in locks.values():
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
    loop.settle()
    assert [r.name for r in replies(loop, m.ModelActivated) if r.error is None] == ["urgent"]
    assert all(engine.prepared for engine in loop.engines.values())


def test_an_activation_withdrawn_while_its_model_prepares_is_cancelled_and_the_model_still_prepared(loop, tmp_path):
    cold = spec("cold", 2)
    image = tmp_path / f"prism-test-{loop._engine_for(cold).image_key}"
    with open(image.with_name(image.name + ".lock"), "w") as lock:  # another process on the host builds that image
        fcntl.flock(lock, fcntl.LOCK_EX)
        loop.handle(m.Activate(cold))
        loop.handle(m.CancelActivation("cold"))
        (cancelled,) = replies(loop, m.ModelActivated)
        assert cancelled.error_kind == "cancelled"
        fcntl.flock(lock, fcntl.LOCK_UN)
    loop.settle()
    assert replies(loop, m.ModelActivated) == [] and not loop.is_resident("cold") and loop.engines["cold"].prepared
    loop.handle(m.CancelActivation("cold"))  # nothing left to cancel: no reply
    assert replies(loop, m.ModelActivated) == []


def test_a_failed_preparation_fails_the_activation_waiting_for_it(loop):
    broken = spec("broken", 3, hidden_act="gelu")  # the engine refuses it when it is built
    loop.handle(m.Activate(broken))
    loop.settle()
    (activated,) = replies(loop, m.ModelActivated)
    assert activated.error_kind == "failed" and "gelu" in activated.error


def test_graph_memory_is_charged_to_the_pool_while_the_engine_lives(loop):
    """What a capture leaves held on the device (torch's graph pools, outside the pool) comes off the pool's
    budget, once, and goes back when the model is removed. (The capture and its measurement are GPU-only:
    here the engine's measured bytes are set by hand; the GPU test measures them.)"""
    pool = loop.pool
    budget = pool.budget_pages
    loop.handle(m.Prepare(spec("a", 1)))
    loop.settle()
    engine = loop.engines["a"]
    engine.graph_bytes = 5 * pool.page_bytes + 1
    loop._charge_graph_memory("a", engine)
    loop._charge_graph_memory("a", engine)  # charged once
    assert pool.budget_pages == budget - 6 and loop.pool_stats().budget_bytes == (budget - 6) * pool.page_bytes
    loop.handle(m.Forget("a"))
    assert pool.budget_pages == budget


# --- on the GPU ---------------------------------------------------------------------------------------

SHAPES = Path(__file__).resolve().parents[2] / "configs" / "shapes"


def gpu_spec(cuda_graphs: bool) -> m.ModelSpec:
    config = {**json.loads((SHAPES / "llama-3.2-1b.json").read_text()), "num_hidden_layers": 4}
    return m.ModelSpec(name="m", weights_dir=None, hf_config=config, load_format="dummy", dtype="float32", max_model_len=1024,
                       block_size=16, max_num_seqs=16, max_num_batched_tokens=256, eos_token_ids=[], ttft_slo_s=2.0,
                       tpot_slo_s=0.2, seed=5, cuda_graphs=cuda_graphs)


def gpu_store() -> HostWeightStore:
    """A host store in /dev/shm under this test process's own prefix: a fresh one over the same files is what
    a restarted worker opens."""
    return HostWeightStore(8 * 2**30, Path("/dev/shm"), f"prism-test-{os.getpid()}-")


def gpu_loop(store: HostWeightStore, idle_before_capture_s: float = 0.0) -> DeviceLoop:
    """A device loop on cuda:0 with a 6 GiB pool and the prism local policy."""
    from memory import PagePool
    from memory.cuda_backend import CudaBackend

    return DeviceLoop("gpu", "cuda:0", PagePool(CudaBackend("cuda:0"), 6 * 2**30), store, local_policy="prism",
                      tpot_target="request", overlap_steps=True, idle_before_capture_s=idle_before_capture_s)


def generate(loop: DeviceLoop, prompts: list[list[int]]) -> list[list[int]]:
    params = m.SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)
    for i, prompt in enumerate(prompts):
        loop.handle(m.Generate(f"r{i}", "m", prompt, params, time.time()))
    outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while loop.has_work():
        loop.step()
        for message in loop.take_outbox():
            for delta in message.deltas if isinstance(message, m.StepOutputs) else []:
                outputs[delta.req_id] += delta.token_ids
    loop.finish_running_step()
    for message in loop.take_outbox():
        for delta in message.deltas if isinstance(message, m.StepOutputs) else []:
            outputs[delta.req_id] += delta.token_ids
    return [outputs[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.gpu
def test_gpu_graphs_captured_ahead_give_the_eager_tokens_and_a_reactivation_captures_nothing():
    import torch

    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 100, 300)]
    store = gpu_store()
    results = {}
    try:
        for graphs in (False, True):
            loop = gpu_loop(store)
            spec = gpu_spec(graphs)
            loop.handle(m.Prepare(spec))
            loop.settle()
            loop.step()  # the device is idle: the graphs are captured now, ahead of the activation
            engine = loop.engines["m"]
            assert engine.graphs_captured and (engine.graphs is not None) == graphs
            captured = engine.graphs
            runs = []
            for _ in range(2):
                loop.handle(m.Activate(spec))
                loop.settle()
                (activated,) = replies(loop, m.ModelActivated)
                assert activated.error is None and activated.graphs_captured and activated.build_s < 1e-3
                runs.append(generate(loop, prompts))
                loop.handle(m.Evict("m"))
                assert engine.graphs is captured  # kept across the eviction: nothing captured again
            assert runs[0] == runs[1]
            results[graphs] = runs[0]
            loop.close()
    finally:
        store.drop_all(unlink=True)
    assert results[True] == results[False] and all(len(out) == 12 for out in results[True])


@pytest.mark.gpu
def test_gpu_a_model_the_full_pool_cannot_hold_is_captured_ahead_over_the_scratch():
    """Regression for the 20-model start-up on an H100 leaving two models "staged, graphs pending": a
    capture ahead mapped the model's own weight pages, which a pool full of resident models could not lend.
    Over the capture scratch it borrows a chunk and a page; the tokens after activation are the eager ones."""
    import torch

    from memory import MemoryKind

    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 100, 300)]
    store = gpu_store()
    try:
        loop = gpu_loop(store)
        eager = gpu_spec(False)
        loop.handle(m.Activate(eager))
        loop.settle()
        expected = generate(loop, prompts)
        loop.close()

        loop = gpu_loop(store)
        pool = loop.pool
        filler = pool.reserve_range("resident", MemoryKind.KV, 6 * 2**30)
        assert pool.map_pages(filler, range(pool.budget_pages - 200))  # 400 MiB free: far less than the weights
        spec = gpu_spec(True)
        loop.handle(m.Prepare(spec))
        loop.settle()
        engine = loop.engines["m"]
        assert engine.weights.num_pages > pool.num_free_pages
        budget = pool.budget_pages
        torch.cuda.empty_cache()  # what the eager engine above left cached is not the capture's
        held = torch.cuda.memory_reserved()
        loop.step()  # idle: captured now, ahead of the activation
        assert engine.graphs is not None
        assert pool.snapshot().scratch_pages == 0
        # What the capture left held outside the pool came off its budget (so the filler is now over it).
        assert 0 < engine.graph_bytes == torch.cuda.memory_reserved() - held
        assert pool.budget_pages == budget - -(-engine.graph_bytes // pool.page_bytes)
        pool.release_range(filler)
        loop.handle(m.Activate(spec))
        loop.settle()
        (activated,) = replies(loop, m.ModelActivated)
        assert activated.error is None and activated.graphs_captured
        assert generate(loop, prompts) == expected
    finally:
        loop.close()
        store.drop_all(unlink=True)


@pytest.mark.gpu
def test_gpu_an_eager_model_with_no_kv_block_to_spare_captures_later_instead_of_failing():
    """Regression (the GPU chaos run): a model running eager had its graphs due while its requests held every
    KV block the pool could back; the capture raised "no KV block for the CUDA graphs' scratch space", the
    model was reported failed and ran eager for good, with a traceback in the log. Now it waits for a block."""
    from memory import MemoryKind

    store = gpu_store()
    loop = gpu_loop(store, idle_before_capture_s=0.2)
    try:
        loop.handle(m.Activate(gpu_spec(True)))
        loop.settle()
        (activated,) = replies(loop, m.ModelActivated)
        engine, pool = loop.engines["m"], loop.pool
        assert activated.error is None and not engine.graphs_captured  # eager: nothing was captured ahead
        filler = pool.reserve_range("resident", MemoryKind.KV, pool.num_free_pages * pool.page_bytes)
        assert pool.map_pages(filler, range(filler.num_pages))
        held = engine.kv.allocate(engine.kv.num_ready_blocks)
        assert engine.kv.allocate(1) is None, "no KV block left to spare"
        idle_until = time.perf_counter() + 0.5
        while time.perf_counter() < idle_until:  # idle past idle_before_capture_s: the loop tries to capture
            loop.step()
        assert engine.graphs is None and loop._preparation("m", engine) == "prepared", "not failed: waiting"
        engine.kv.free(held)
        pool.release_range(filler)
        deadline = time.perf_counter() + 60
        while engine.graphs is None:
            assert time.perf_counter() < deadline, "captured once a block is free"
            loop.step()
        assert generate(loop, [[5, 6, 7, 8]])[0]
    finally:
        loop.close()
        store.drop_all(unlink=True)


@pytest.mark.gpu
def test_gpu_the_heap_freeze_after_a_capture_ahead_waits_for_idleness(monkeypatch):
    """Regression for the first activation of a 1B on an H100 taking 0.12 s from the client against 0.055 s
    for a re-activation: the freeze after a capture ahead ran at the next idle turn, just as the model became
    "prepared" and its first request arrived (two full collections, ~70 ms each there)."""
    frozen = []
    monkeypatch.setattr("workers.device_loop.freeze_heap", lambda: frozen.append(time.perf_counter()) or FREEZE_REPORT)
    store = gpu_store()
    loop = gpu_loop(store, idle_before_capture_s=0.3)
    try:
        loop.handle(m.Prepare(gpu_spec(True)))
        loop.settle()
        engine = loop.engines["m"]
        deadline = time.perf_counter() + 60
        while engine.graphs is None:
            assert time.perf_counter() < deadline, "captured once idle"
            loop.step()
        captured_s = time.perf_counter()  # a little after the loop noted the capture's end
        loop.step()  # the next idle turn: a request for the model is likely in transit now
        assert frozen == []
        while not frozen and time.perf_counter() < deadline:
            loop.step()
        assert frozen and frozen[0] - captured_s >= 0.25  # before the fix: at the next turn, within milliseconds
    finally:
        loop.close()
        store.drop_all(unlink=True)


@pytest.mark.gpu
def test_gpu_a_restarted_worker_serves_from_surviving_images_before_pinning_or_capturing(monkeypatch):
    """Regression for the 33.5 s from `kill -9` to served again: the restarted worker pinned each surviving
    image and captured each model's graphs on the activation's path. Now the activation copies the unpinned
    image through bounce buffers and the model runs eager; the image is pinned (a piece at a time) and the
    graphs captured afterwards, and the tokens are the same throughout."""
    import torch

    from memory import host_store

    monkeypatch.setattr(host_store, "PIN_PIECE_BYTES", 256 * 2**20)  # several pieces for a small model
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 100, 300)]
    model = gpu_spec(True)

    def new_loop() -> DeviceLoop:  # a fresh store over the same files: what a restarted worker opens
        return gpu_loop(gpu_store())

    loop = new_loop()
    try:
        loop.handle(m.Prepare(model))
        loop.settle()
        assert loop.engines["m"].image_pinned
        loop.handle(m.Activate(model))
        loop.settle()
        before = generate(loop, prompts)
    finally:
        loop.close()  # the image stays in /dev/shm, as a killed worker's does
    loop = new_loop()
    try:
        loop.handle(m.Activate(model))
        loop.settle()
        (activated,) = replies(loop, m.ModelActivated)
        engine = loop.engines["m"]
        assert activated.error is None and not activated.graphs_captured
        assert engine.last_activation.pinned_fraction == 0.0  # copied through the bounce buffers
        assert engine.image_pinned  # pinned after the activation
        assert generate(loop, prompts) == before  # eager first; the idle loop captured the graphs at its end
        assert engine.graphs is not None
        assert generate(loop, prompts) == before
    finally:
        loop.close()
        loop.store.drop_all(unlink=True)
        for leftover in Path("/dev/shm").glob(loop.store.prefix + "*"):
            leftover.unlink()


def test_the_heap_freeze_after_an_activation_waits_for_idleness_not_for_the_first_idle_turn(tmp_path, monkeypatch):
    """Regression: the worker froze its heap (two full collections) at its first turn without work after an
    activation, which is the moment the request that caused it is on its way: its first token waited for them
    (34-56 ms on a 2-core CPU). Idleness from before the activation must not count."""
    frozen = []
    monkeypatch.setattr("workers.device_loop.freeze_heap", lambda: frozen.append(time.perf_counter()) or FREEZE_REPORT)
    store = HostWeightStore(256 * 2**20, tmp_path, "prism-test-")
    loop = DeviceLoop("test", "cpu", make_pool(256 * 2**20), store, local_policy="prism", tpot_target="request", overlap_steps=True,
                      idle_before_capture_s=0.3)
    try:
        idle_until = time.perf_counter() + 0.4
        while time.perf_counter() < idle_until:  # the device has been idle longer than that before the activation
            loop.step()
        loop.handle(m.Activate(spec("cold", 1)))
        loop.settle()
        activated_s = time.perf_counter()
        assert [r.error for r in replies(loop, m.ModelActivated)] == [None]
        loop.step()  # the first idle turn: the request is in transit
        assert frozen == []
        loop.handle(m.Generate("r1", "cold", [5, 6, 7], GREEDY, time.time()))
        while loop.has_work():
            loop.step()
        assert frozen == []  # not between its steps either
        deadline = time.perf_counter() + 30
        while not frozen and time.perf_counter() < deadline:
            loop.step()
        assert frozen and frozen[0] - activated_s >= 0.3  # once the device has been idle that long
    finally:
        loop.close()
