"""Offline generation: one engine and the local scheduler in this process, no controller, no HTTP.

The same step loop as the worker (schedule -> execute -> update), for correctness tests against
transformers and for engine benchmarks.
"""

from __future__ import annotations

import itertools
import time

import torch

from memory import PagePool
from memory.host_store import HostWeightStore
from scheduler.local import LocalScheduler
from scheduler.sequence import Sequence
from workers.engine.engine import Engine
from workers.messages import ModelSpec, SamplingParams
from workers.step_loop import model_queue


class OfflineRunner:
    def __init__(self, spec: ModelSpec, device: str, pool: PagePool, store: HostWeightStore | None = None):
        self.spec = spec
        self.engine = Engine(spec, torch.device(device), pool, store)
        self.engine.activate()
        self.scheduler = LocalScheduler()
        self.scheduler.add_model(model_queue(self.engine))
        self._ids = itertools.count()
        self.num_steps = 0
        self.last_sequences: list[Sequence] = []

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[int]]:
        """Run all prompts to completion, batched as the scheduler sees fit; return their output ids."""
        seqs = self.last_sequences = [self._sequence(prompt, sampling) for prompt in prompts]
        for seq in seqs:
            self.scheduler.add(seq)
        while self.scheduler.has_work():
            self.step()
        return [seq.output_token_ids for seq in seqs]

    def step(self) -> None:
        plan = self.scheduler.schedule()
        if plan is None:
            raise RuntimeError("work is queued but nothing can be scheduled (the pool is too small)")
        sampled = self.engine.execute(plan)
        for seq in self.scheduler.update(plan, sampled):
            self.engine.release(seq.req_id)
        self.num_steps += 1

    def _sequence(self, prompt: list[int], sampling: SamplingParams) -> Sequence:
        spec = self.spec
        return Sequence(
            req_id=f"offline-{next(self._ids)}",
            model=spec.name,
            prompt_token_ids=list(prompt),
            max_tokens=sampling.max_tokens,
            arrival_s=time.time(),
            sampling=sampling,
            min_tokens=sampling.min_tokens,
            stop_token_ids=frozenset(sampling.stop_token_ids),
            eos_token_ids=frozenset() if sampling.ignore_eos else frozenset(spec.eos_token_ids),
            max_model_len=spec.max_model_len,
        )

    def close(self) -> None:
        self.engine.close()
