"""Decode steps as CUDA graph replays: one graph per batch size, inputs copied into static buffers.

A decode step of a small batch is dominated by kernel launches, not by the GPU's work; capturing the
whole forward pass plus the logits once per batch size and replaying it removes the launch overhead.
A batch is padded up to the next captured size: padded rows read and write a scratch KV block that no
sequence owns, and their logits are dropped.
"""

from __future__ import annotations

import torch

from workers.engine.batch import DeviceMeta, ForwardBatch
from workers.engine.llama import LlamaModel

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


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
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: kernel compilation, cuBLAS workspaces
                    self.model.logits(self.model.forward(batch, self.kv_cache))
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self.model.logits(self.model.forward(batch, self.kv_cache))
            if self._pool is None:
                self._pool = graph.pool()
            self._graphs[batch_size] = (graph, logits)
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
