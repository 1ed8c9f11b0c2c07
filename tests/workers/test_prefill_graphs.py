"""PrefillGraphs. On the GPU: a replay gives the logits of the eager forward on the same inputs, for
chunks from position 0 and after a cached prefix, with decodes among them, at and between the captured
token counts, and writes the same KV (`pytest -m gpu tests/workers/test_prefill_graphs.py` on the device
machine: capture needs CUDA). On the CPU: the staging of a step's inputs (padding conventions included),
the captured sizes, and the refusal of a step no graph fits.
"""

from __future__ import annotations

import pytest
import torch

from tests.factories import make_pool, make_spec, make_tiny_checkpoint
from workers.engine.batch import build_batch
from workers.engine.cuda_graphs import PrefillGraphs
from workers.offline import OfflineRunner


@pytest.fixture(scope="module")
def cpu_model(tmp_path_factory):
    checkpoint = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama-cpu"), seed=6)
    runner = OfflineRunner(make_spec(checkpoint, name="llama"), "cpu", make_pool(256 * 1024**2))
    yield runner.engine
    runner.close()


def staged(engine, max_seqs: int = 4, max_tokens: int = 100) -> PrefillGraphs:
    return PrefillGraphs(engine.model, engine.kv_cache, engine.block_size, max_seqs, max_tokens, max_blocks_per_seq=8)


def test_staging_flattens_the_step_and_pads_with_tokens_that_write_no_kv(cpu_model):
    graphs = staged(cpu_model)
    # a 3-token chunk from position 14 (crossing into its second block), a decode, a chunk that samples nothing
    sampled = graphs._fill([[5, 6, 7], [9], [4, 4]], [14, 40, 0], [[3, 8], [1, 2, 4], [6]], [True, True, False])
    assert sampled == 2
    tokens, seqs, tables = graphs._host_tokens_np, graphs._host_seqs_np, graphs._host_tables_np
    assert tokens[:, :6].tolist() == [[5, 6, 7, 9, 4, 4], [14, 15, 16, 40, 0, 1], [3, 3, 8, 4, 6, 6], [14, 15, 0, 8, 0, 1]]
    assert (tokens[2, 6:] == -1).all() and (tokens[0, 6:] == 0).all()  # padding: slot block -1, masked off by the cache write
    assert seqs[:, :3].tolist() == [[0, 3, 4], [3, 1, 2], [17, 41, 2], [2, 3, 0]]  # starts, lengths, contexts, sampled rows
    assert (seqs[:3, 3:] == 0).all()  # a padding sequence has no query rows
    assert tables[:3, :3].tolist() == [[3, 8, 0], [1, 2, 4], [6, 0, 0]]


def test_a_smaller_step_leaves_nothing_of_the_one_before(cpu_model):
    graphs = staged(cpu_model)
    graphs._fill([[1] * 20, [2], [3]], [0, 7, 9], [[1, 2], [3], [4]], [True, True, True])
    assert graphs._fill([[8, 9]], [0], [[5]], [True]) == 1
    tokens, seqs = graphs._host_tokens_np, graphs._host_seqs_np
    assert tokens[:, :2].tolist() == [[8, 9], [0, 1], [5, 5], [0, 1]] and (tokens[2, 2:] == -1).all()
    assert seqs[:, 0].tolist() == [0, 2, 2, 1] and (seqs[:, 1:] == 0).all()


def test_token_counts_stop_at_the_step_budget():
    class Model:
        device = torch.device("cpu")

    sizes = lambda max_tokens: PrefillGraphs(Model(), None, 16, 4, max_tokens, 8).token_counts  # noqa: E731
    assert sizes(100) == [16, 32, 48, 64, 96, 100]  # the budget itself is the largest graph
    assert sizes(48) == [16, 32, 48]
    assert sizes(2048) == [16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512]  # larger steps run eager


def test_a_step_no_graph_fits_is_refused_with_the_sizes(cpu_model):
    graphs = staged(cpu_model)
    assert not graphs.can_run(16, 1)  # nothing captured (on the CPU nothing can be)
    with pytest.raises(ValueError, match="no prefill graph for 5 tokens in 1 chunks"):
        graphs.run([[1] * 5], [0], [[1]], [True])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from memory import PagePool
    from memory.cuda_backend import CudaBackend

    checkpoint = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=6)
    runner = OfflineRunner(make_spec(checkpoint, name="llama", max_num_batched_tokens=100), "cuda:0", PagePool(CudaBackend("cuda:0"), 1024**3))
    yield runner.engine
    runner.close()


def eager_logits(engine, chunks, starts, tables, samples):
    batch = build_batch(chunks, starts, tables, samples, engine.block_size, engine.device, with_device_meta=True)
    return engine.model.logits(engine.model.forward(batch, engine.kv_cache))


def random_step(engine, generator, spans: list[tuple[int, int]], samples: list[bool]):
    """Chunks covering positions [start, start + length) of fresh sequences; the prefixes are prefilled eager."""
    vocab, bs = engine.spec.hf_config["vocab_size"], engine.block_size
    tables = [engine.kv.allocate(-(-(start + length) // bs)) for start, length in spans]
    prompts = [torch.randint(0, vocab, (start + length,), generator=generator).tolist() for start, length in spans]
    prefixed = [i for i, (start, _) in enumerate(spans) if start]
    if prefixed:
        eager_logits(engine, [prompts[i][: spans[i][0]] for i in prefixed], [0] * len(prefixed), [tables[i] for i in prefixed], [True] * len(prefixed))
    chunks = [p[start:] for p, (start, _) in zip(prompts, spans)]
    return chunks, [start for start, _ in spans], tables


def step_slots(engine, spans, tables) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ids and offsets of the KV slots the step's tokens write."""
    bs = engine.block_size
    slots = [(table[p // bs], p % bs) for (start, length), table in zip(spans, tables) for p in range(start, start + length)]
    blocks, offsets = zip(*slots)
    return torch.tensor(blocks, device=engine.device), torch.tensor(offsets, device=engine.device)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "spans, samples",
    [
        ([(0, 5)], [True]),  # one short prompt: padded to the smallest graph
        ([(0, 16)], [True]),  # exactly a captured size
        ([(40, 1), (0, 33), (17, 9), (63, 1)], [True, True, False, True]),  # decodes, a prefix, a chunk that samples nothing
        ([(0, 100)], [True]),  # the largest graph (max_num_batched_tokens)
    ],
)
def test_a_replay_gives_the_eager_logits_and_writes_the_same_kv(engine, spans, samples):
    graphs = engine.prefill_graphs
    assert graphs is not None and graphs.token_counts[-1] == 100
    generator = torch.Generator().manual_seed(len(spans) * 100 + spans[0][1])
    chunks, starts, tables = random_step(engine, generator, spans, samples)
    try:
        assert graphs.can_run(sum(map(len, chunks)), len(chunks))
        blocks, offsets = step_slots(engine, spans, tables)
        replays = graphs.num_replays
        got = graphs.run(chunks, starts, tables, samples).clone()
        assert graphs.num_replays == replays + 1
        written = engine.kv_cache[blocks, :, :, offsets].clone()
        engine.kv_cache[blocks, :, :, offsets] = 0  # the eager run must write the step's KV again
        expected = eager_logits(engine, chunks, starts, tables, samples)
        torch.cuda.synchronize()
        assert got.shape == expected.shape == (sum(samples), engine.spec.hf_config["vocab_size"])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(written, engine.kv_cache[blocks, :, :, offsets])
        assert written.abs().sum() > 0
    finally:
        for table in tables:
            engine.kv.free(table)


@pytest.mark.gpu
def test_a_step_with_no_sampling_chunk_returns_nothing(engine):
    chunks, starts, tables = random_step(engine, torch.Generator().manual_seed(9), [(0, 20)], [False])
    try:
        assert engine.prefill_graphs.run(chunks, starts, tables, [False]) is None
    finally:
        engine.kv.free(tables[0])


@pytest.mark.gpu
def test_steps_beyond_the_graphs_are_refused(engine):
    graphs = engine.prefill_graphs
    assert not graphs.can_run(101, 1)
    assert not graphs.can_run(16, graphs.max_seqs + 1)
    assert graphs.can_run(16, graphs.max_seqs)
