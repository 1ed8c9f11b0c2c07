"""The flattened inputs of one engine step (vLLM-style varlen batch: all sequences' new tokens in a row)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class DeviceMeta:
    """Attention metadata as device tensors, for kernels (and CUDA graphs) that cannot read Python lists."""

    block_tables: torch.Tensor  # [S, max_blocks] int32, padded
    context_lens: torch.Tensor  # [S] int32
    query_starts: torch.Tensor  # [S] int32
    query_lens: torch.Tensor  # [S] int32
    max_query_len: int


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [T] int64: the new tokens of every sequence, concatenated
    positions: torch.Tensor  # [T] int64
    slot_block_ids: torch.Tensor  # [T] int64: block of the KV slot each token writes
    slot_offsets: torch.Tensor  # [T] int64: offset of that slot inside its block
    query_starts: list[int]  # per sequence: index of its first new token in the row
    query_lens: list[int]  # per sequence: number of new tokens
    context_lens: list[int]  # per sequence: tokens in its KV after this step (cached + new)
    block_tables: list[torch.Tensor]  # per sequence: [num_blocks] int64 block ids
    sample_indices: torch.Tensor  # [S] int64: rows whose logits are sampled (last new token of a sequence)
    decode_only: bool = False  # every sequence has exactly one new token
    device_meta: DeviceMeta | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.decode_only

    @cached_property
    def padded_context(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables padded to one width ([S, max_blocks] int64; padding repeats a row's first block)
        and the mask of real context tokens ([S, 1, 1, max_context_len] bool), built once per step."""
        width = max(int(t.shape[0]) for t in self.block_tables)
        tables = torch.stack([torch.cat([t, t[:1].expand(width - t.shape[0])]) for t in self.block_tables])
        max_ctx = max(self.context_lens)
        lens = torch.tensor(self.context_lens, device=tables.device)
        mask = torch.arange(max_ctx, device=tables.device).unsqueeze(0) < lens.unsqueeze(1)
        return tables, mask[:, None, None, :]


def build_batch(
    token_chunks: list[list[int]],
    start_positions: list[int],
    block_tables: list[list[int]],
    sample_mask: list[bool],
    block_size: int,
    device: torch.device | str,
    with_device_meta: bool = False,
) -> ForwardBatch:
    """Flatten per-sequence chunks (tokens from `start_positions[i]` on) into one ForwardBatch."""
    token_ids: list[int] = []
    positions: list[int] = []
    query_starts, query_lens, context_lens, sample_indices = [], [], [], []
    for chunk, start, sample in zip(token_chunks, start_positions, sample_mask):
        query_starts.append(len(token_ids))
        query_lens.append(len(chunk))
        context_lens.append(start + len(chunk))
        token_ids.extend(chunk)
        positions.extend(range(start, start + len(chunk)))
        if sample:
            sample_indices.append(len(token_ids) - 1)
    positions_t = torch.tensor(positions, dtype=torch.int64)
    slot_blocks = []
    for table, start, chunk in zip(block_tables, start_positions, token_chunks):
        slot_blocks.extend(table[p // block_size] for p in range(start, start + len(chunk)))
    meta = None
    if with_device_meta:
        width = max(len(t) for t in block_tables)
        tables = torch.zeros(len(block_tables), width, dtype=torch.int32)
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
        meta = DeviceMeta(
            block_tables=tables.to(device, non_blocking=True),
            context_lens=torch.tensor(context_lens, dtype=torch.int32).to(device, non_blocking=True),
            query_starts=torch.tensor(query_starts, dtype=torch.int32).to(device, non_blocking=True),
            query_lens=torch.tensor(query_lens, dtype=torch.int32).to(device, non_blocking=True),
            max_query_len=max(query_lens),
        )
    return ForwardBatch(
        token_ids=torch.tensor(token_ids, dtype=torch.int64, device=device),
        positions=positions_t.to(device),
        slot_block_ids=torch.tensor(slot_blocks, dtype=torch.int64, device=device),
        slot_offsets=(positions_t % block_size).to(device),
        query_starts=query_starts,
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=[torch.tensor(t, dtype=torch.int64, device=device) for t in block_tables],
        sample_indices=torch.tensor(sample_indices, dtype=torch.int64, device=device),
        decode_only=all(n == 1 for n in query_lens),
        device_meta=meta,
    )
