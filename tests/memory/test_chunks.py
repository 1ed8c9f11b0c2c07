"""ChunkSet books: free chunks by size, whole chunks destroyed last, the chunk's own page tuples."""

from __future__ import annotations

import pytest

from memory.chunks import ChunkSet, PhysicalChunk


def make_set(*sizes: int, chunk_pages: int = 4) -> tuple[ChunkSet, list[PhysicalChunk]]:
    chunks = ChunkSet(chunk_pages)
    made = [PhysicalChunk(i, size) for i, size in enumerate(sizes)]
    for chunk in made:
        chunks.add(chunk, free=True)
    return chunks, made


def test_a_run_takes_a_free_chunk_of_exactly_its_size():
    chunks, (whole, tail, single) = make_set(4, 3, 1)
    assert chunks.take(2) is None, "no chunk of 2 pages: a chunk is mapped whole or not at all"
    assert chunks.take(3) is tail and chunks.take(1) is single and chunks.take(4) is whole
    assert (chunks.num_free, chunks.num_pages) == (0, 8)
    chunks.put(tail)
    assert chunks.num_free == 3 and chunks.num_free_of_size(3) == 1
    chunks.audit({whole: 4, single: 1})


def test_victims_spare_whole_chunks_and_take_the_largest_others_first():
    chunks, (whole, tail, a, b) = make_set(4, 3, 1, 1)
    assert chunks.victims(1, keep_size=1) == [tail], "room for a page: the tail, not a whole chunk"
    assert chunks.victims(4, keep_size=4) == [tail, a], "room for a whole chunk: fewest destroys"
    assert chunks.victims(6, keep_size=1) == [tail, whole], "whole chunks last"
    assert chunks.victims(10, keep_size=0) == [], "not enough free pages"


def test_only_free_chunks_can_be_removed_and_pages_are_the_chunks_own_tuples():
    chunks, (a, b) = make_set(4, 1)
    assert chunks.take(4) is a and a.pages[2] == (a, 2)
    with pytest.raises(AssertionError):
        chunks.remove(a)
    chunks.remove(b)
    assert (chunks.num_chunks, chunks.num_pages, chunks.num_free) == (1, 4, 0)
    assert chunks.free_chunks() == [] and chunks.num_free_chunks == 0
    chunks.audit({a: 4})
