"""The flattened inputs of one engine step (vLLM-style varlen batch: all sequences' new tokens in a row)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens)


def build_batch(
    token_chunks: list[list[int]],
    start_positions: list[int],
    block_tables: list[list[int]],
    sample_mask: list[bool],
    block_size: int,
    device: torch.device | str,
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
    )
