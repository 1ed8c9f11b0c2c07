"""The worker's device loop and its step loop: models' steps overlapped (one launched while the other runs) change no token,
an engine failure fails only its step's requests, and on a GPU launching a step does not wait for the
device. The GPU tests run on the device machine: `pytest -m gpu tests/workers/test_step_loop.py`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from scheduler.sequence import Sequence
from tests.factories import make_pool, make_spec, make_tiny_checkpoint
from workers.contract import messages as m
from workers.contract.messages import ModelSpec, SamplingParams
from workers.device_loop import DeviceLoop

SHAPES = Path(__file__).resolve().parents[2] / "configs" / "shapes"
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)


class Device:
    """The worker's device loop hosting several models, driven by messages as the worker process drives it."""

    def __init__(self, specs: list[ModelSpec], device: str, pool, overlap: bool):
        self.loop = DeviceLoop("test", device, pool, None, local_policy="prism", tpot_target="request", overlap_steps=overlap)
        for spec in specs:
            self.loop.handle(m.Activate(spec))
        self.loop.settle()
        replies = [msg for msg in self.loop.take_outbox() if isinstance(msg, m.ModelActivated)]
        assert [r.error for r in replies] == [None] * len(specs)
        if device.startswith("cuda"):  # as the worker does once the device is idle (activations never capture)
            for spec in specs:
                self.loop.capture_graphs_now(spec.name)
        self.engines, self.scheduler, self.steps = self.loop.engines, self.loop.scheduler, self.loop.steps

    def generate(self, requests: dict[str, tuple[str, list[int]]], params: SamplingParams = GREEDY) -> dict[str, list[int] | None]:
        """Run requests (id -> model, prompt) to the end; outputs by request id (None: the request failed)."""
        for req_id, (model, prompt) in requests.items():
            self.loop.handle(m.Generate(req_id, model, prompt, params, time.time()))
        outputs: dict[str, list[int] | None] = {req_id: [] for req_id in requests}
        while self.loop.has_work():
            self.loop.step()
            self._collect(outputs)
        self.loop.finish_running_step()
        self._collect(outputs)
        return outputs

    def _collect(self, outputs: dict[str, list[int] | None]) -> None:
        for message in self.loop.take_outbox():
            for delta in message.deltas if isinstance(message, m.StepOutputs) else []:
                if delta.finish_reason == "error":
                    outputs[delta.req_id] = None
                elif outputs[delta.req_id] is not None:
                    outputs[delta.req_id] += delta.token_ids

    def close(self) -> None:
        self.loop.close()


def prompts(vocab_size: int, lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def mixed_requests(names: list[str], vocab_size: int) -> dict[str, tuple[str, list[int]]]:
    """Requests for every model, interleaved, with prompts long enough to take several prefill chunks."""
    lengths = (5, 40, 300, 17)
    per_model = {name: prompts(vocab_size, lengths, seed) for seed, name in enumerate(names)}
    return {f"{name}-{i}": (name, per_model[name][i]) for i in range(len(lengths)) for name in names}


def only(model: str, requests: dict[str, tuple[str, list[int]]]) -> dict[str, tuple[str, list[int]]]:
    return {req_id: request for req_id, request in requests.items() if request[0] == model}


@pytest.fixture(scope="module")
def tiny_specs(tmp_path_factory) -> list[ModelSpec]:
    llama = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=1)
    qwen = make_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2"), seed=2)
    return [make_spec(llama, name="llama", max_num_batched_tokens=128), make_spec(qwen, name="qwen", max_num_batched_tokens=128)]


def test_overlapped_steps_give_every_model_the_tokens_it_gives_alone(tiny_specs):
    requests = mixed_requests([s.name for s in tiny_specs], vocab_size=512)
    alone = {}
    for spec in tiny_specs:
        device = Device([spec], "cpu", make_pool(), overlap=False)
        alone.update(device.generate(only(spec.name, requests)))
        device.close()
    device = Device(tiny_specs, "cpu", make_pool(), overlap=True)
    together = device.generate(requests)
    assert device.steps.num_overlapped > 0  # steps of one model were launched while the other's ran
    device.close()
    assert together == alone and all(len(out) == 12 for out in alone.values())


def test_without_overlap_every_step_is_finished_before_the_next_is_planned(tiny_specs):
    device = Device(tiny_specs, "cpu", make_pool(), overlap=False)
    requests = mixed_requests([s.name for s in tiny_specs], vocab_size=512)
    outputs = device.generate(requests)
    assert device.steps.num_overlapped == 0 and device.steps.num_steps > 0
    assert device.steps.device_busy_s > 0  # the steps' device time (wall time on the CPU), summed
    counts = device.steps.counts
    assert sum(c.steps for c in counts.values()) == device.steps.num_steps
    assert sum(c.device_s for c in counts.values()) == pytest.approx(device.steps.device_busy_s)
    for spec in tiny_specs:  # each prompt prefilled once, then one token per decode (the last is never fed)
        mine = [prompt for model, prompt in requests.values() if model == spec.name]
        assert counts[spec.name].tokens == sum(len(p) + GREEDY.max_tokens - 1 for p in mine)
        assert counts[spec.name].preemptions == 0
    assert all(out is not None and len(out) == 12 for out in outputs.values())
    device.close()


def test_an_engine_failure_fails_only_that_steps_requests(tiny_specs, monkeypatch):
    device = Device(tiny_specs, "cpu", make_pool(), overlap=True)
    broken = device.engines["qwen"]
    real_launch = broken.launch
    calls = {"n": 0}

    def launch_failing_once(plan):
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step, mid-generation
            raise RuntimeError("injected engine failure")
        return real_launch(plan)

    monkeypatch.setattr(broken, "launch", launch_failing_once)
    outputs = device.generate({"l": ("llama", [1, 2, 3]), "q1": ("qwen", [4, 5, 6]), "q2": ("qwen", [7, 8])})
    assert outputs["q1"] is None and outputs["q2"] is None  # both were in the failed step
    assert len(outputs["l"]) == 12
    assert device.scheduler.num_unfinished() == 0 and broken.kv.num_used_blocks == 0  # nothing leaked
    assert len(device.generate({"q3": ("qwen", [4, 5, 6])})["q3"]) == 12  # the model keeps serving
    device.close()


# --- on the GPU ---------------------------------------------------------------------------------------


def gpu_specs(num_models: int) -> list[ModelSpec]:
    config = json.loads((SHAPES / "llama-3.2-1b.json").read_text())
    config["num_hidden_layers"] = 4
    return [
        ModelSpec(
            name=f"m{i}", weights_dir=None, hf_config=config, load_format="dummy", dtype="float32", max_model_len=1024,
            block_size=16, max_num_seqs=16, max_num_batched_tokens=128, eos_token_ids=[], seed=i, ttft_slo_s=2.0, tpot_slo_s=0.2,
        )
        for i in range(num_models)
    ]


def cuda_pool(budget_bytes: int):
    from memory import PagePool
    from memory.cuda_backend import CudaBackend

    return PagePool(CudaBackend("cuda:0"), budget_bytes)


@pytest.mark.gpu
def test_gpu_overlapped_steps_give_every_model_the_tokens_it_gives_alone():
    specs = gpu_specs(3)
    vocab = specs[0].hf_config["vocab_size"]
    requests = mixed_requests([s.name for s in specs], vocab)
    alone = Device(specs, "cuda:0", cuda_pool(8 * 1024**3), overlap=False)
    serial = alone.generate(requests)
    assert alone.steps.num_overlapped == 0
    alone.close()
    device = Device(specs, "cuda:0", cuda_pool(8 * 1024**3), overlap=True)
    overlapped = device.generate(requests)
    assert device.steps.num_overlapped > device.steps.num_steps // 2
    device.close()
    assert overlapped == serial and all(len(out) == 12 for out in serial.values())


@pytest.mark.gpu
@torch.inference_mode()
def test_gpu_launching_a_step_does_not_wait_for_the_device():
    """Prefill (eager) and decode (CUDA graph) steps are queued behind running work, not after it."""
    device = Device(gpu_specs(1), "cuda:0", cuda_pool(4 * 1024**3), overlap=True)
    engine = device.engines["m0"]
    seq = Sequence("r", "m0", list(range(1, 101)), 4, time.time(), GREEDY, min_tokens=4)  # one prefill chunk
    device.scheduler.add(seq)
    for kind in ("prefill", "decode"):
        plan = device.scheduler.schedule()
        assert (plan.chunks[0].num_new_tokens > 1) == (kind == "prefill")
        torch.cuda._sleep(2_000_000_000)  # about a second of device time queued ahead of the step
        before = torch.cuda.Event()
        before.record()
        pending = engine.launch(plan)
        assert not before.query(), f"launching a {kind} step waited for the device"
        tokens = pending.result()
        assert before.query() and set(tokens) == {"r"} and pending.device_s > 0
        device.scheduler.update(plan, tokens)
    device.scheduler.abort("r")
    device.close()
