"""The flattened step inputs: what each token writes where, and buffers laid out as the GPU kernels need."""

from __future__ import annotations

import torch

from workers.engine.batch import build_batch


def test_chunks_flatten_into_positions_slots_and_padded_tables():
    # Sequence 0: a 3-token chunk from position 14 (crosses into its second block); sequence 1: a decode.
    batch = build_batch([[5, 6, 7], [9]], [14, 40], [[3, 8], [1, 2, 4]], [True, True], 16, "cpu", with_device_meta=True)
    assert batch.token_ids.tolist() == [5, 6, 7, 9]
    assert batch.positions.tolist() == [14, 15, 16, 40]
    assert batch.slot_block_ids.tolist() == [3, 3, 8, 4] and batch.slot_offsets.tolist() == [14, 15, 0, 8]
    assert batch.sample_indices.tolist() == [2, 3] and batch.context_lens == [17, 41]
    meta = batch.device_meta
    assert meta.block_tables.tolist() == [[3, 8, 0], [1, 2, 4]] and meta.block_tables.dtype == torch.int32
    assert meta.context_lens.tolist() == [17, 41] and meta.query_starts.tolist() == [0, 3] and meta.query_lens.tolist() == [3, 1]
    assert [t.tolist() for t in batch.block_tables] == [[3, 8], [1, 2, 4]] and not batch.is_decode_only


def test_every_input_starts_on_a_16_byte_boundary():
    """Triton specialises pointers on 16-byte alignment: a misaligned input would compile a new variant."""
    for lengths in ([1], [3, 1, 1], [7, 2, 5, 1, 1]):
        chunks = [list(range(n)) for n in lengths]
        tables = [[i] * (1 + i) for i in range(len(lengths))]
        batch = build_batch(chunks, [0] * len(lengths), tables, [True] * len(lengths), 16, "cpu", with_device_meta=True)
        meta = batch.device_meta
        tensors = [batch.token_ids, batch.positions, batch.slot_block_ids, batch.slot_offsets, batch.sample_indices,
                   meta.block_tables, meta.context_lens, meta.query_starts, meta.query_lens]
        assert all(t.data_ptr() % 16 == 0 for t in tensors), [t.data_ptr() % 16 for t in tensors]
