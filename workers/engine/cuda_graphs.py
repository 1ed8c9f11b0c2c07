"""Engine steps as CUDA graph replays, inputs copied into static buffers.

A step whose device work is small is dominated by kernel launches (the host spends ~0.4 ms a layer on
an eager forward); capturing the forward once per shape and replaying it removes that cost.

- `DecodeGraphs`: one graph per batch size of a decode step (one new token per sequence), logits
  included. A batch is padded up to the next captured size: padded rows read and write a scratch KV
  block that no sequence owns, and their logits are dropped.
- `PrefillGraphs`: one graph per token count of a step with prompt chunks (varlen, as the eager forward,
  through the prefill attention kernel), up to `max_seqs` chunks. Padding tokens write no KV (slot block
  -1, which the cache-write kernel masks off), padding sequences have no query rows (their attention
  programs return at once), and only the rows that sample leave the graph: the LM head runs eager on
  those, so no graph holds a [tokens, vocab] buffer.
"""

from __future__ import annotations

from typing import Callable

import torch

from workers.engine.batch import DeviceMeta, ForwardBatch, flatten_chunks
from workers.engine.llama import LlamaModel

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Token counts of the prefill graphs: a step is padded up to the next one, so they are close together
# where a step's device time grows with its tokens (on the H200 a 264-token 8B step padded to 512 took
# 13.2 ms, against 10.9 ms eager). Above 512 tokens even a 1B model's step is mostly device work (an 8B
# layer at 512 tokens is ~0.4 ms of matmuls, as much as its eager launches): those run eager.
DEFAULT_PREFILL_TOKENS = (16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


def capture_graph(step: Callable[[], torch.Tensor], pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`step` run twice on a side stream (kernel compilation, cuBLAS workspaces), then captured into a
    graph on memory `pool` (None: a new pool); returns the graph and its static output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,
        block_size: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.batch_sizes = sorted({b for b in batch_sizes if b < max_num_seqs} | {max_num_seqs})
        self.max_batch = self.batch_sizes[-1]
        device = model.device
        # Staging on the host (pinned) and static inputs on the device: one copy each per step.
        self._host_fields = torch.zeros(5, self.max_batch, dtype=torch.int32, pin_memory=True)
        self._host_tables = torch.zeros(self.max_batch, max_blocks_per_seq, dtype=torch.int32, pin_memory=True)
        self._host_fields_np = self._host_fields.numpy()  # numpy views: fast writes from Python lists
        self._host_tables_np = self._host_tables.numpy()
        self._fields = torch.zeros(5, self.max_batch, dtype=torch.int32, device=device)
        self._tables = torch.zeros(self.max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._sample_indices = torch.arange(self.max_batch, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def _static_batch(self, batch_size: int) -> ForwardBatch:
        token_ids, positions, slot_blocks, slot_offsets, context_lens = (f[:batch_size] for f in self._fields)
        meta = DeviceMeta(
            block_tables=self._tables[:batch_size],
            context_lens=context_lens,
            query_starts=self._sample_indices[:batch_size].to(torch.int32),
            query_lens=torch.ones(batch_size, dtype=torch.int32, device=self.model.device),
            max_query_len=1,
        )
        return ForwardBatch(
            token_ids=token_ids, positions=positions, slot_block_ids=slot_blocks, slot_offsets=slot_offsets,
            query_starts=list(range(batch_size)), query_lens=[1] * batch_size, context_lens=[1] * batch_size,
            block_tables=[], sample_indices=self._sample_indices[:batch_size], decode_only=True, device_meta=meta,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first, sharing one memory pool."""
        self._fill([], [], [])  # every row a padding row
        self._fields.copy_(self._host_fields)
        self._tables.copy_(self._host_tables)
        for batch_size in reversed(self.batch_sizes):
            batch = self._static_batch(batch_size)
            graph, logits = capture_graph(lambda b=batch: self.model.logits(self.model.forward(b, self.kv_cache)), self._pool)
            self._graphs[batch_size] = (graph, logits)
            if self._pool is None:  # the first (largest) capture's pool, shared by the rest
                self._pool = graph.pool()
        torch.cuda.synchronize()

    def can_run(self, batch_size: int) -> bool:
        return bool(self._graphs) and batch_size <= self.max_batch

    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Logits [len(token_ids), vocab] of one decode step (the caller has allocated every KV slot)."""
        num_seqs = len(token_ids)
        graph_size = next(b for b in self.batch_sizes if b >= num_seqs)
        self._fill(token_ids, positions, block_tables)
        self._fields[:, :graph_size].copy_(self._host_fields[:, :graph_size], non_blocking=True)
        self._tables[:graph_size].copy_(self._host_tables[:graph_size], non_blocking=True)
        graph, logits = self._graphs[graph_size]
        graph.replay()
        return logits[:num_seqs]

    def _fill(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> None:
        n, bs = len(token_ids), self.block_size
        fields, tables = self._host_fields_np, self._host_tables_np
        fields[0, :n] = token_ids
        fields[1, :n] = positions
        fields[2, :n] = [t[p // bs] for t, p in zip(block_tables, positions)]
        fields[3, :n] = [p % bs for p in positions]
        fields[4, :n] = [p + 1 for p in positions]
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = table
        # Padding rows: a one-token context on the scratch block.
        fields[:, n:] = ((0,), (0,), (self.scratch_block,), (0,), (1,))
        tables[n:, :] = self.scratch_block


class PrefillGraphs:
    """Steps with prompt chunks (and any decodes among them) as graph replays, by padded token count."""

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,
        block_size: int,
        max_seqs: int,
        max_tokens: int,
        max_blocks_per_seq: int,
        token_counts: tuple[int, ...] = DEFAULT_PREFILL_TOKENS,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.max_seqs = max_seqs
        self.token_counts = sorted({n for n in token_counts if n < max_tokens} | {min(max_tokens, max(token_counts))})
        device = model.device
        width = self.token_counts[-1]
        # Per token: id, position, slot block, slot offset. Per sequence: query start, query length,
        # context length, sampled row (the sampling chunks' last rows first, in chunk order).
        pin = device.type == "cuda"  # on the CPU only the staging runs (tests); capture needs CUDA
        self._host_tokens = torch.zeros(4, width, dtype=torch.int32, pin_memory=pin)
        self._host_seqs = torch.zeros(4, max_seqs, dtype=torch.int32, pin_memory=pin)
        self._host_tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
        self._host_tokens_np, self._host_seqs_np, self._host_tables_np = (
            t.numpy() for t in (self._host_tokens, self._host_seqs, self._host_tables)
        )
        self._tokens = torch.zeros(4, width, dtype=torch.int32, device=device)
        self._seqs = torch.zeros(4, max_seqs, dtype=torch.int32, device=device)
        self._tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.num_replays = 0

    def _static_batch(self, num_tokens: int) -> ForwardBatch:
        token_ids, positions, slot_blocks, slot_offsets = (f[:num_tokens] for f in self._tokens)
        query_starts, query_lens, context_lens, sampled = self._seqs
        meta = DeviceMeta(
            block_tables=self._tables, context_lens=context_lens, query_starts=query_starts, query_lens=query_lens,
            max_query_len=num_tokens,
        )
        return ForwardBatch(
            token_ids=token_ids, positions=positions, slot_block_ids=slot_blocks, slot_offsets=slot_offsets,
            query_starts=[], query_lens=[], context_lens=[], block_tables=[], sample_indices=sampled,
            decode_only=False, device_meta=meta,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every token count, largest first, sharing one memory pool (inputs all padding)."""
        self._fill([], [], [], [])
        self._copy_inputs(self.token_counts[-1])
        for num_tokens in reversed(self.token_counts):
            batch = self._static_batch(num_tokens)
            graph, hidden = capture_graph(lambda b=batch: self.model.forward(b, self.kv_cache), self._pool)
            self._graphs[num_tokens] = (graph, hidden)
            if self._pool is None:  # the first (largest) capture's pool, shared by the rest
                self._pool = graph.pool()
        torch.cuda.synchronize()

    def can_run(self, num_tokens: int, num_seqs: int) -> bool:
        return bool(self._graphs) and num_tokens <= self.token_counts[-1] and num_seqs <= self.max_seqs

    def run(self, token_chunks: list[list[int]], start_positions: list[int], block_tables: list[list[int]], sample_mask: list[bool]) -> torch.Tensor | None:
        """Logits of the sampling chunks' last tokens, in chunk order (None if no chunk samples); the
        caller has allocated every KV slot. Same inputs as `build_batch`."""
        num_tokens = sum(len(c) for c in token_chunks)
        if not self.can_run(num_tokens, len(token_chunks)):
            raise ValueError(f"no prefill graph for {num_tokens} tokens in {len(token_chunks)} chunks "
                             f"(captured: up to {self.token_counts[-1]} tokens, {self.max_seqs} chunks; see can_run)")
        graph_tokens = next(n for n in self.token_counts if n >= num_tokens)
        num_sampled = self._fill(token_chunks, start_positions, block_tables, sample_mask)
        self._copy_inputs(graph_tokens)
        graph, hidden = self._graphs[graph_tokens]
        graph.replay()
        self.num_replays += 1
        return self.model.logits(hidden[:num_sampled]) if num_sampled else None

    def _copy_inputs(self, num_tokens: int) -> None:
        self._tokens[:, :num_tokens].copy_(self._host_tokens[:, :num_tokens], non_blocking=True)
        self._seqs.copy_(self._host_seqs, non_blocking=True)
        self._tables.copy_(self._host_tables, non_blocking=True)

    def _fill(self, token_chunks: list[list[int]], start_positions: list[int], block_tables: list[list[int]], sample_mask: list[bool]) -> int:
        """Stage one step's inputs in the host buffers; return how many rows sample."""
        flat = flatten_chunks(token_chunks, start_positions, block_tables, sample_mask, self.block_size)
        tokens, seqs, tables = self._host_tokens_np, self._host_seqs_np, self._host_tables_np
        n, s, k = len(flat.token_ids), len(flat.query_lens), len(flat.sample_indices)
        tokens[:, :n] = (flat.token_ids, flat.positions, flat.slot_blocks, flat.slot_offsets)
        tokens[:, n:] = ((0,), (0,), (-1,), (0,))  # padding tokens: no sequence, no KV write
        seqs[:3, :s] = (flat.query_starts, flat.query_lens, flat.context_lens)
        seqs[:3, s:] = 0  # padding sequences: no query rows
        seqs[3, :k] = flat.sample_indices
        seqs[3, k:] = 0
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = table
        return k
