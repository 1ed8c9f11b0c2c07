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


@dataclass
class FlatChunks:
    """Per-sequence chunks flattened into one row of tokens (host lists): what every step's inputs are made of."""

    token_ids: list[int]
    positions: list[int]
    slot_blocks: list[int]  # block of the KV slot each token writes
    slot_offsets: list[int]
    query_starts: list[int]  # per sequence
    query_lens: list[int]
    context_lens: list[int]  # cached + new
    sample_indices: list[int]  # rows whose logits are sampled: the sampling chunks' last rows, in chunk order


def flatten_chunks(
    token_chunks: list[list[int]], start_positions: list[int], block_tables: list[list[int]], sample_mask: list[bool], block_size: int
) -> FlatChunks:
    """Chunk i's tokens sit at positions start_positions[i]... of its sequence, whose KV blocks are block_tables[i]."""
    flat = FlatChunks([], [], [], [], [], [], [], [])
    for chunk, start, sample, table in zip(token_chunks, start_positions, sample_mask, block_tables):
        flat.query_starts.append(len(flat.token_ids))
        flat.query_lens.append(len(chunk))
        flat.context_lens.append(start + len(chunk))
        flat.token_ids.extend(chunk)
        span = range(start, start + len(chunk))
        flat.positions.extend(span)
        flat.slot_blocks.extend(table[p // block_size] for p in span)
        if sample:
            flat.sample_indices.append(len(flat.token_ids) - 1)
    flat.slot_offsets = [p % block_size for p in flat.positions]
    return flat


def build_batch(
    token_chunks: list[list[int]],
    start_positions: list[int],
    block_tables: list[list[int]],
    sample_mask: list[bool],
    block_size: int,
    device: torch.device | str,
    with_device_meta: bool = False,
) -> ForwardBatch:
    """Flatten per-sequence chunks (tokens from `start_positions[i]` on) into one ForwardBatch.

    With device metadata (the GPU path) every input travels in two host-to-device copies (one int64,
    one int32 buffer) from pinned memory, queued behind the work already on the stream: building a batch
    never waits for the device, so the worker can prepare one model's step while another's runs. (A
    copy from pageable memory, as `torch.tensor(..., device="cuda")` makes, synchronises the stream.)
    """
    device = torch.device(device)
    flat = flatten_chunks(token_chunks, start_positions, block_tables, sample_mask, block_size)
    int64_fields = [flat.token_ids, flat.positions, flat.slot_blocks, flat.slot_offsets, flat.sample_indices]
    meta = None
    if with_device_meta:
        width = max(len(t) for t in block_tables)
        padded = [block for table in block_tables for block in (*table, *([0] * (width - len(table))))]
        tables, context_t, starts_t, lens_t = _upload([padded, flat.context_lens, flat.query_starts, flat.query_lens], torch.int32, device)
        meta = DeviceMeta(
            block_tables=tables.view(len(block_tables), width),
            context_lens=context_t,
            query_starts=starts_t,
            query_lens=lens_t,
            max_query_len=max(flat.query_lens),
        )
        int64_fields.append(padded)  # the torch attention path's per-sequence tables: views of one upload
    token_t, position_t, slot_block_t, offset_t, sample_t, *rest = _upload(int64_fields, torch.int64, device)
    if meta is not None:
        padded_t = rest[0].view(len(block_tables), -1)
        tables_t = [padded_t[row, : len(table)] for row, table in enumerate(block_tables)]
    else:
        tables_t = [torch.tensor(t, dtype=torch.int64, device=device) for t in block_tables]
    return ForwardBatch(
        token_ids=token_t,
        positions=position_t,
        slot_block_ids=slot_block_t,
        slot_offsets=offset_t,
        query_starts=flat.query_starts,
        query_lens=flat.query_lens,
        context_lens=flat.context_lens,
        block_tables=tables_t,
        sample_indices=sample_t,
        decode_only=all(n == 1 for n in flat.query_lens),
        device_meta=meta,
    )


def _upload(fields: list[list[int]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Integer lists as tensors on `device`: one buffer, one copy (from pinned memory, not waited for).

    Every field starts on a 16-byte boundary: Triton specialises pointer arguments on 16-byte alignment,
    so a misaligned view would compile (about a second) a kernel variant the warm-up did not cover.
    """
    per_16_bytes = 16 // dtype.itemsize
    sizes = [-(-len(field) // per_16_bytes) * per_16_bytes for field in fields]
    flat: list[int] = []
    for field, size in zip(fields, sizes):
        flat += field
        flat += [0] * (size - len(field))
    host = torch.tensor(flat, dtype=dtype)
    if device.type != "cpu":
        host = host.pin_memory().to(device, non_blocking=True)
    return [chunk[: len(field)] for chunk, field in zip(host.split(sizes), fields)]
