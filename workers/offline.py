"""Offline generation: one model on a `DeviceLoop` in this process, no controller, no socket, no HTTP.

The worker's own loop (the same activation, admission, steps and outputs), for correctness tests against
transformers and for engine benchmarks. A request the loop refuses or fails (a prompt that can never
fit the KV space, an engine error) raises `GenerationFailed` naming it.
"""

from __future__ import annotations

import itertools
import time

from memory import PagePool
from memory.host_store import HostWeightStore
from scheduler.local import LocalScheduler
from scheduler.sequence import Sequence
from workers.contract import messages as m
from workers.contract.messages import ModelSpec, SamplingParams
from workers.device_loop import DeviceLoop
from workers.engine.engine import Engine


class GenerationFailed(RuntimeError):
    """The device loop finished a request with an error; the message names the request and why."""


class OfflineRunner:
    def __init__(self, spec: ModelSpec, device: str, pool: PagePool, store: HostWeightStore | None = None):
        self.spec = spec
        # Steps are finished before the next is planned: a caller that inspects the scheduler between
        # `step()` calls sees every step applied.
        self.loop = DeviceLoop("offline", device, pool, store, local_policy="fcfs", tpot_target="request", overlap_steps=False)
        self.loop.handle(m.Activate(spec))
        self.loop.settle()
        reply = next(msg for msg in self.loop.take_outbox() if isinstance(msg, m.ModelActivated))
        if reply.error is not None:
            self.loop.close()
            raise GenerationFailed(f"activating {spec.name} failed ({reply.error_kind}): {reply.error}")
        self.loop.capture_graphs_now(spec.name)  # the worker captures when idle; offline steps replay from the first
        self._ids = itertools.count()
        self.num_steps = 0
        self.last_sequences: list[Sequence] = []

    @property
    def engine(self) -> Engine:
        return self.loop.engines[self.spec.name]

    @property
    def scheduler(self) -> LocalScheduler:
        return self.loop.scheduler

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[int]]:
        """Run all prompts to completion, batched as the scheduler sees fit; return their output ids."""
        seqs = self.last_sequences = [self._sequence(prompt, sampling) for prompt in prompts]
        for seq in seqs:
            self.scheduler.add(seq)
        while self.scheduler.has_work():
            self.step()
        return [seq.output_token_ids for seq in seqs]

    def step(self) -> None:
        """One step of the loop; raises if nothing could be planned or the loop failed a request."""
        steps_before = self.loop.steps.num_steps
        self.loop.step()
        errors = [d for msg in self.loop.take_outbox() if isinstance(msg, m.StepOutputs) for d in msg.deltas if d.finish_reason == "error"]
        if errors:
            raise GenerationFailed("; ".join(f"{d.req_id}: {d.error} ({d.error_kind})" for d in errors))
        if self.loop.steps.num_steps == steps_before and self.scheduler.has_work():
            raise RuntimeError("work is queued but nothing can be scheduled (the pool is too small)")
        self.num_steps += 1

    def _sequence(self, prompt: list[int], sampling: SamplingParams) -> Sequence:
        """The loop's sequence for a prompt (validated as the worker validates a request)."""
        request = m.Generate(f"offline-{next(self._ids)}", self.spec.name, list(prompt), sampling, time.time())
        seq, error, kind = self.loop.sequence(request)
        if seq is None:
            raise GenerationFailed(f"{request.req_id}: {error} ({kind})")
        return seq

    def close(self) -> None:
        self.loop.close()
