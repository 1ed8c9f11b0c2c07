"""A step of decodes and prompt chunks, run as the engine routes it (its decodes replayed as a decode graph
and its chunks through a prefill graph, or the whole step through a prefill graph), gives the tokens that
one eager forward of the whole step gives.

On the CPU the graphs are replaced at their boundary by `EagerGraphs` and `EagerPrefillGraphs` (the
graphs' interfaces, each batch run through the same eager forward), which shows the routing; on the
device machine the real graphs run: `pytest -m gpu tests/workers/test_mixed_steps.py`.
"""

from __future__ import annotations

import pytest
import torch

from tests.factories import make_pool, make_spec, make_tiny_checkpoint
from workers.engine.batch import build_batch
from workers.engine.engine import Engine
from workers.contract.messages import SamplingParams
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


class EagerPrefillGraphs:
    """PrefillGraphs' interface with an eager forward behind it; refuses steps above `max_tokens`."""

    def __init__(self, engine: Engine, max_tokens: int = 10**9):
        self.engine = engine
        self.max_tokens = max_tokens
        self.batches: list[tuple[int, int]] = []  # (chunks, of which single tokens) per replay

    def can_run(self, num_tokens: int, num_seqs: int) -> bool:
        return num_tokens <= self.max_tokens

    def run(self, token_chunks, start_positions, block_tables, sample_mask) -> torch.Tensor | None:
        self.batches.append((len(token_chunks), sum(len(c) == 1 for c in token_chunks)))
        engine = self.engine
        batch = build_batch(token_chunks, start_positions, block_tables, sample_mask, engine.block_size, engine.device)
        hidden = engine.model.forward(batch, engine.kv_cache)
        return engine.model.logits(hidden) if hidden.shape[0] else None


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


def eager_and_graphed(spec, device: str, split_min_decodes: int, stand_ins: bool = False):
    """The staggered workload on an engine with every step one eager forward, and on one with graphs
    (`stand_ins`: EagerGraphs and EagerPrefillGraphs in place of the CUDA graphs, on the CPU). Returns both
    outputs, the graphed engine's step kinds and its (decode, prefill) graphs."""
    eager, graphed = runner_on(spec, device), runner_on(spec, device)
    try:
        eager.engine.graphs = eager.engine.prefill_graphs = None
        if stand_ins:
            graphed.engine.graphs = EagerGraphs(graphed.engine)
            graphed.engine.prefill_graphs = EagerPrefillGraphs(graphed.engine)
        graphed.engine.split_min_decodes = split_min_decodes
        graphs = graphed.engine.graphs, graphed.engine.prefill_graphs  # closing the engine drops them
        kinds = StepKinds(graphed.engine)
        expected = staggered_run(eager, spec.hf_config["vocab_size"])
        got = staggered_run(graphed, spec.hf_config["vocab_size"])
    finally:
        eager.close()
        graphed.close()
    return expected, got, kinds, graphs


def test_a_split_step_gives_the_tokens_of_one_eager_forward(spec):
    expected, got, kinds, (graphs, prefills) = eager_and_graphed(spec, "cpu", split_min_decodes=1, stand_ins=True)
    assert got == expected
    assert all(len(tokens) == GREEDY.max_tokens for tokens in got)
    mixed = kinds.kinds.count("mixed")
    assert mixed > 0, kinds.kinds
    assert len(graphs.batches) == kinds.kinds.count("decodes") + mixed  # every mixed step replayed its decodes
    # ...and sent only its prompt chunks to the prefill graphs, as did every step without decodes
    assert len(prefills.batches) == mixed + kinds.kinds.count("chunks")
    assert all(singles == 0 for _, singles in prefills.batches)


def test_below_the_threshold_a_mixed_step_runs_whole_in_a_prefill_graph(spec):
    expected, got, kinds, (graphs, prefills) = eager_and_graphed(spec, "cpu", split_min_decodes=100, stand_ins=True)
    assert got == expected
    assert kinds.kinds.count("mixed") > 0
    assert len(graphs.batches) == kinds.kinds.count("decodes")  # only decode-only steps replayed decode graphs
    assert sum(singles > 0 for _, singles in prefills.batches) == kinds.kinds.count("mixed")  # decodes went along


def test_a_step_too_large_for_the_prefill_graphs_runs_eager(spec):
    runner = runner_on(spec, "cpu")
    try:
        runner.engine.graphs = EagerGraphs(runner.engine)
        prefills = runner.engine.prefill_graphs = EagerPrefillGraphs(runner.engine, max_tokens=0)
        kinds = StepKinds(runner.engine)
        staggered_run(runner, spec.hf_config["vocab_size"])
    finally:
        runner.close()
    assert kinds.kinds.count("chunks") > 0 and prefills.batches == []


@pytest.mark.gpu
@pytest.mark.parametrize("split_min_decodes", [1, 100])
def test_gpu_graphed_steps_give_the_tokens_of_one_eager_forward(spec, split_min_decodes):
    """The real graphs (fp32 weights, as `make_spec` makes them, so graphs change no greedy token), with
    every mixed step split and with every mixed step whole in a prefill graph."""
    assert spec.dtype == "float32" and spec.cuda_graphs
    expected, got, kinds, (_, prefills) = eager_and_graphed(spec, "cuda:0", split_min_decodes)
    assert got == expected
    assert kinds.kinds.count("mixed") > 0
    assert prefills is not None and prefills.num_replays == kinds.kinds.count("mixed") + kinds.kinds.count("chunks")
