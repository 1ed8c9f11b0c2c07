"""Python's garbage collector in the serving processes: the start-up heap frozen, every pause counted.

Why this matters: a collection of the oldest generation walks every container object the process
tracks. After start-up that is ~170k objects in a worker (torch; ~350k once SmolLM2's GGUF is loaded)
and ~330k in the controller (transformers, tokenizers, FastAPI), nearly all of them alive until the
process exits; one such pass pauses the process for 100-230 ms on a 2-core CPU. In the worker the pause
stops the step loop (the device idles once the step in flight ends); in the controller it stops the
event loop (no request admitted, no token streamed). Every request in the system is then late by the
pause, which is as long as a small model's whole TTFT SLO.

`freeze_heap()` collects once, then moves every surviving object into the permanent generation
(`gc.freeze`), so later collections walk only what was allocated since: 0.1 ms right after the freeze on
the same heap, growing with what is alive and new (about a hundred objects per request in flight in the
controller). The serving loops' own garbage is still collected as before. The processes freeze after
start-up, and a worker again after each activation (a new engine's modules and graphs join its heap).
vLLM freezes its API server, engine core and GPU worker heaps the same way. Frozen objects that are
dropped later are freed by reference counting as usual; only reference cycles among them wait for
`collect_frozen()`, which a worker runs when it removes a model.

`GcPauses` times every collection through `gc.callbacks`, per generation, for `/metrics`.
"""

from __future__ import annotations

import bisect
import gc
import time
from dataclasses import dataclass
from typing import Callable

from workers.contract.messages import GC_PAUSE_BUCKETS_S, GcStats

__all__ = ["FreezeReport", "GcPauses", "collect_frozen", "freeze_heap"]


@dataclass(frozen=True)
class FreezeReport:
    """What one freeze did: objects now frozen, and the pause of the full collection that preceded it."""

    frozen_objects: int
    full_pause_before_s: float  # what a full pass cost until now

    def describe(self) -> str:
        return f"froze {self.frozen_objects} objects; the full collection before the freeze took {self.full_pause_before_s * 1e3:.1f} ms"


_frozen_objects = 0  # as of the last freeze: counting them again walks the whole permanent generation


def freeze_heap() -> FreezeReport:
    """Collect garbage, then freeze what survives (everything alive now is taken to live for good). One
    collection: a second one after the freeze, only to report what a full pass costs from then on, doubled
    the pause (on an H100 worker, 70 ms each after a capture), and a request can arrive during it."""
    global _frozen_objects
    before_s = _timed_collection()
    gc.freeze()
    _frozen_objects = gc.get_freeze_count()
    return FreezeReport(_frozen_objects, before_s)


def collect_frozen() -> FreezeReport:
    """Let the collector see the frozen heap again for one pass (reference cycles in it are freed), then
    freeze anew: for when many frozen objects were just dropped (a model removed)."""
    gc.unfreeze()
    return freeze_heap()


def _timed_collection() -> float:
    started = time.perf_counter()
    gc.collect()
    return time.perf_counter() - started


class GcPauses:
    """Counts collections and their pauses per generation (0, 1, 2) while installed, in the buckets of
    `GC_PAUSE_BUCKETS_S`; explicit `gc.collect()` calls (a freeze's) count as they pause the process too."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.pause_counts = [[0] * (len(GC_PAUSE_BUCKETS_S) + 1) for _ in range(3)]
        self.pause_s = [0.0, 0.0, 0.0]
        self._started_s: float | None = None

    def install(self) -> GcPauses:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        return self

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def stats(self) -> GcStats:
        """Cheap: the frozen count is the one recorded at the last freeze. `gc.get_freeze_count()` walks the
        permanent generation; on an H200 worker with eight models that stalled every heartbeat by ~54 ms."""
        return GcStats([list(c) for c in self.pause_counts], list(self.pause_s), _frozen_objects)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started_s = self.clock()
            return
        if self._started_s is None:  # installed in the middle of a collection
            return
        pause_s = self.clock() - self._started_s
        self._started_s = None
        generation = info["generation"]
        self.pause_counts[generation][bisect.bisect_left(GC_PAUSE_BUCKETS_S, pause_s)] += 1
        self.pause_s[generation] += pause_s
