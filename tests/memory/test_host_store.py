"""HostWeightStore on a plain folder: images built once per key, shared by name, dropped past the budget."""

from __future__ import annotations

from memory.host_store import HostWeightStore

MIB = 2**20


def filler(value: int, calls: list[int]):
    def fill(tensor) -> None:
        calls.append(value)
        tensor.fill_(value)
    return fill


def test_a_second_store_maps_the_image_the_first_built(tmp_path):
    calls: list[int] = []
    first = HostWeightStore(8 * MIB, tmp_path, "prism-test-")
    image = first.acquire("a", MIB, filler(7, calls))
    second = HostWeightStore(8 * MIB, tmp_path, "prism-test-")
    again = second.acquire("a", MIB, filler(9, calls))
    assert calls == [7] and int(again.tensor[0]) == 7, "built once; the second store maps the file"
    first.release(image)
    second.release(again)


def test_an_image_unlinked_by_drop_all_is_built_again_not_reported_missing(tmp_path):
    """Regression: dropping an image removed its file but not its completion marker, so the next acquire of
    the key found the marker, took the missing file for complete and failed with FileNotFoundError (on the
    GPU: every test after one that dropped its images failed to prepare its model)."""
    calls: list[int] = []
    store = HostWeightStore(8 * MIB, tmp_path, "prism-test-")
    store.release(store.acquire("a", MIB, filler(1, calls)))
    store.drop_all(unlink=True)
    assert not list(tmp_path.glob("prism-test-a*.complete")), "the marker went with its image"
    fresh = HostWeightStore(8 * MIB, tmp_path, "prism-test-")
    image = fresh.acquire("a", MIB, filler(2, calls))
    assert calls == [1, 2] and int(image.tensor[0]) == 2


def test_an_image_dropped_past_the_budget_is_built_again_when_asked_for(tmp_path):
    calls: list[int] = []
    store = HostWeightStore(2 * MIB, tmp_path, "prism-test-")
    for key, value in (("a", 1), ("b", 2), ("c", 3)):  # a third image of 1 MiB drops the least recent, "a"
        store.release(store.acquire(key, MIB, filler(value, calls)))
    assert not store.has("a") and not (tmp_path / "prism-test-a").exists()
    assert not (tmp_path / "prism-test-a.complete").exists()
    image = store.acquire("a", MIB, filler(4, calls))
    assert calls == [1, 2, 3, 4] and int(image.tensor[0]) == 4
