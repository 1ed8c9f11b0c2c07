"""A step of decodes and prompt chunks, split: its decodes replayed as a CUDA graph and only its chunks run
eager, gives the tokens that one eager forward of the whole step gives.

On the CPU the graphs are replaced at their boundary by `EagerGraphs` (DecodeGraphs' interface, each
decode batch run through the same eager forward); on the device machine the real graphs run:
`pytest -m gpu tests/workers/test_mixed_steps.py`.
"""

from __future__ import annotations

import pytest
import torch

from tests.factories import make_pool, make_spec, make_tiny_checkpoint
from workers.engine.batch import build_batch
from workers.engine.engine import Engine
from workers.messages import SamplingParams
from workers.offline import OfflineRunner

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10)


class EagerGraphs:
    """DecodeGraphs' interface with an eager forward behind it: what the split sends to the graphs."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.batches: list[int] = []

    def can_run(self, batch_size: int) -> bool:
        return True

    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        self.batches.append(len(token_ids))
        engine = self.engine
        batch = build_batch([[t] for t in token_ids], positions, block_tables, [True] * len(token_ids), engine.block_size, engine.device)
        return engine.model.logits(engine.model.forward(batch, engine.kv_cache))


class StepKinds:
    """Records, per step, whether it held decodes only, chunks only, or both (a mixed step)."""

    def __init__(self, engine: Engine):
        self.kinds: list[str] = []
        logits = engine._logits

        def spy(chunks):
            singles = sum(c.num_new_tokens == 1 for c in chunks)
            self.kinds.append("decodes" if singles == len(chunks) else "chunks" if singles == 0 else "mixed")
            return logits(chunks)

        engine._logits = spy


def staggered_run(runner: OfflineRunner, vocab_size: int) -> list[list[int]]:
    """Six requests start decoding, then three longer prompts arrive while they do: mixed steps."""
    generator = torch.Generator().manual_seed(3)
    first = [runner._sequence(torch.randint(0, vocab_size, (n,), generator=generator).tolist(), GREEDY) for n in (3, 9, 14, 5, 30, 21)]
    later = [runner._sequence(torch.randint(0, vocab_size, (n,), generator=generator).tolist(), GREEDY) for n in (40, 2, 70)]
    for seq in first:
        runner.scheduler.add(seq)
    for _ in range(3):
        runner.step()
    for seq in later:
        runner.scheduler.add(seq)
    while runner.scheduler.has_work():
        runner.step()
    return [seq.output_token_ids for seq in first + later]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    checkpoint = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=4)
    return make_spec(checkpoint, name="llama", max_num_batched_tokens=48)


def runner_on(spec, device: str) -> OfflineRunner:
    return OfflineRunner(spec, device, make_pool(256 * 1024**2) if device == "cpu" else _gpu_pool())


def _gpu_pool():
    from memory import PagePool
    from memory.cuda_backend import CudaBackend

    return PagePool(CudaBackend("cuda:0"), 1024**3)


def eager_and_split(spec, device: str, stand_in: type[EagerGraphs] | None = None) -> tuple[list[list[int]], list[list[int]], StepKinds, object]:
    """The staggered workload on an engine with every step one eager forward, and on one that splits
    every mixed step (`stand_in`: what replaces the CUDA graphs, on the CPU). Returns both outputs, the
    split engine's step kinds and its graphs."""
    eager, split = runner_on(spec, device), runner_on(spec, device)
    try:
        eager.engine.graphs = None
        if stand_in is not None:
            split.engine.graphs = stand_in(split.engine)
        split.engine.split_min_decodes = 1
        graphs = split.engine.graphs  # closing the engine drops it
        kinds = StepKinds(split.engine)
        expected = staggered_run(eager, spec.hf_config["vocab_size"])
        got = staggered_run(split, spec.hf_config["vocab_size"])
    finally:
        eager.close()
        split.close()
    return expected, got, kinds, graphs


def test_a_split_step_gives_the_tokens_of_one_eager_forward(spec):
    expected, got, kinds, graphs = eager_and_split(spec, "cpu", EagerGraphs)
    assert got == expected
    assert all(len(tokens) == GREEDY.max_tokens for tokens in got)
    mixed = kinds.kinds.count("mixed")
    assert mixed > 0, kinds.kinds
    assert len(graphs.batches) == kinds.kinds.count("decodes") + mixed  # every mixed step replayed its decodes


def test_below_the_threshold_a_mixed_step_runs_eager_whole(spec):
    runner = runner_on(spec, "cpu")
    try:
        graphs = runner.engine.graphs = EagerGraphs(runner.engine)
        runner.engine.split_min_decodes = 100  # more decodes than this workload ever has at once
        kinds = StepKinds(runner.engine)
        staggered_run(runner, spec.hf_config["vocab_size"])
    finally:
        runner.close()
    assert kinds.kinds.count("mixed") > 0
    assert len(graphs.batches) == kinds.kinds.count("decodes")  # only decode-only steps replayed


@pytest.mark.gpu
def test_gpu_a_split_step_gives_the_tokens_of_one_eager_forward(spec):
    """The real graphs (fp32 weights, as `make_spec` makes them, so the split changes no greedy token)."""
    assert spec.dtype == "float32" and spec.cuda_graphs
    expected, got, kinds, _ = eager_and_split(spec, "cuda:0")
    assert got == expected
    assert kinds.kinds.count("mixed") > 0
