"""The serving processes' garbage collector: the start-up heap frozen out of full collections, pauses counted."""

from __future__ import annotations

import gc
import itertools
import time
import weakref

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import Metrics
from workers.contract.gc_heap import GcPauses, collect_frozen, freeze_heap
from workers.contract.messages import GC_PAUSE_BUCKETS_S, GcStats


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the collector frees it


@pytest.fixture
def thawed():
    """Whatever a test freezes goes back to the collector afterwards (the test process is shared)."""
    yield
    gc.unfreeze()


def test_pauses_are_counted_per_generation_in_their_bucket():
    ticks = itertools.chain([100.0, 100.03], itertools.repeat(100.03))  # the fake clock: a 30 ms collection
    pauses = GcPauses(clock=lambda: next(ticks)).install()
    try:
        gc.collect()
    finally:
        pauses.uninstall()
    stats = pauses.stats()
    bucket = GC_PAUSE_BUCKETS_S.index(0.05)  # 0.03 s falls in (0.025, 0.05]
    assert stats.pause_counts[2][bucket] == 1 and sum(map(sum, stats.pause_counts)) == 1
    assert stats.pause_s == pytest.approx([0.0, 0.0, 0.03])
    gc.collect()  # uninstalled: no longer counted
    assert sum(map(sum, pauses.stats().pause_counts)) == 1


def test_freeze_takes_the_live_heap_out_of_full_collections(thawed):
    survivor = [object()]
    report = freeze_heap()
    assert report.frozen_objects == gc.get_freeze_count() > 1000  # this process imported torch, pytest, ...
    assert not any(o is survivor for o in gc.get_objects())  # frozen objects are walked by no collection
    # What a full pass walks shrank to what was allocated since: on this heap, far less work.
    started = time.perf_counter()
    gc.collect()
    assert time.perf_counter() - started < report.full_pause_before_s
    assert "froze" in report.describe()


def test_a_cycle_frozen_and_dropped_waits_for_collect_frozen(thawed):
    node = Node()
    alive = weakref.ref(node)
    freeze_heap()
    del node
    gc.collect()
    assert alive() is not None  # in the permanent generation: the collector does not see it
    collect_frozen()  # what a worker does when it removes a model
    assert alive() is None
    assert gc.get_freeze_count() > 0  # and the rest is frozen again


def test_stats_report_the_count_recorded_at_the_freeze_without_walking_the_frozen_heap(thawed):
    """Regression: stats() called gc.get_freeze_count(), which walks every frozen object, once a heartbeat."""
    recorded = freeze_heap().frozen_objects
    extra = [[i] for i in range(1000)]
    gc.freeze()  # frozen behind gc_heap's back: a walk would count these, the recorded figure does not
    assert gc.get_freeze_count() >= recorded + len(extra)
    assert GcPauses().stats().frozen_objects == recorded


def test_metrics_render_gc_pauses_as_a_prometheus_histogram():
    counts = [[0] * (len(GC_PAUSE_BUCKETS_S) + 1) for _ in range(3)]
    counts[0][0] = 40  # forty young collections under 1 ms
    counts[2][GC_PAUSE_BUCKETS_S.index(0.25)] = 2  # two full ones of 100-250 ms
    stats = GcStats(counts, [0.01, 0.0, 0.3], frozen_objects=1234)
    text = Metrics(None, lambda: [("worker:cuda:0", stats)]).render().decode()
    samples = {(s.name, s.labels.get("generation"), s.labels.get("le")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples
               if s.labels.get("process") == "worker:cuda:0"}
    assert samples[("prism:gc_pause_seconds_bucket", "2", "0.1")] == 0
    assert samples[("prism:gc_pause_seconds_bucket", "2", "0.25")] == 2  # cumulative from there on
    assert samples[("prism:gc_pause_seconds_bucket", "2", "+Inf")] == 2
    assert samples[("prism:gc_pause_seconds_count", "0", None)] == 40
    assert samples[("prism:gc_pause_seconds_sum", "2", None)] == pytest.approx(0.3)
    assert samples[("prism:gc_frozen_objects", None, None)] == 1234
