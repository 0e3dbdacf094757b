"""Python's cyclic garbage collector while the service runs: a policy and a monitor.

A collection holds the GIL, so while it runs no stage thread can hand a frame on. Two
things make collections long or frequent in a live service:

- **A large heap.** A full (generation 2) collection walks every tracked object. After the
  imports and the model are loaded that is ~90,000 objects (~226,000 with torch); a full
  collection then takes 20–100 ms. Freezing the heap once started (:func:`gc.freeze`)
  moves those long-lived objects out of the collector's view.
- **Many short-lived containers per frame.** Measurements are a dict (and two lists) per
  object: ≈ 6,000 containers per 2048² frame of nuclei. With Python's default young
  threshold (700) building them triggers several collections per frame, which promote
  objects still in use and so bring on full collections. A threshold above one frame's
  worth lets them die young, uncollected.

:class:`GcPolicy` applies both when the service starts and restores the previous state
when it closes; :class:`GcMonitor` counts the collections and the time they took
(``status.gc``, the Prometheus endpoint, ``livemask bench``). Measured numbers are in
``docs/performance.md``.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger("livemask")

GENERATIONS = (0, 1, 2)


class GcPolicy:
    """Freeze the startup heap and set the young-generation threshold; undo on restore."""

    def __init__(self, *, freeze: bool, threshold: int | None) -> None:
        self.freeze = freeze
        self.threshold = threshold
        self._previous_threshold: tuple[int, int, int] | None = None
        self._froze = False
        # counted once: gc.get_freeze_count() walks the frozen list (8 ms for 90,000 objects)
        self.frozen_objects = 0

    def apply(self) -> None:
        """Collect once, freeze what survives (if ``freeze``), set the threshold."""
        if self.freeze:
            self._froze = gc.get_freeze_count() == 0  # otherwise someone else owns it
            gc.collect()
            gc.freeze()
            self.frozen_objects = gc.get_freeze_count()
            log.info("gc: %d startup objects frozen", self.frozen_objects)
        if self.threshold is not None:
            self._previous_threshold = gc.get_threshold()
            _, gen1, gen2 = self._previous_threshold
            gc.set_threshold(self.threshold, gen1, gen2)

    def restore(self) -> None:
        """Put the threshold back and unfreeze the heap if this policy froze it."""
        if self._previous_threshold is not None:
            gc.set_threshold(*self._previous_threshold)
            self._previous_threshold = None
        if self._froze:
            gc.unfreeze()
            self._froze = False
        self.frozen_objects = 0


class GcMonitor:
    """Collections per generation and the time they took, from :data:`gc.callbacks`.

    A collection runs in whichever thread allocated, with the GIL held, so collections never
    overlap and one start time is enough.
    """

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.pause_s = [0.0, 0.0, 0.0]
        self.max_pause_s = 0.0
        self._started: float | None = None
        self._running = False

    def start(self) -> None:
        """Begin counting (idempotent)."""
        if not self._running:
            gc.callbacks.append(self._on_gc)
            self._running = True

    def stop(self) -> None:
        """Stop counting; the totals stay."""
        if self._running:
            gc.callbacks.remove(self._on_gc)
            self._running = False

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:  # started counting mid-collection
            return
        took = time.perf_counter() - self._started
        self._started = None
        generation = int(info.get("generation", 2))
        self.collections[generation] += 1
        self.pause_s[generation] += took
        self.max_pause_s = max(self.max_pause_s, took)

    def report(self) -> dict[str, Any]:
        """Counts and pause times (ms) since :meth:`start`, and the current threshold.

        Cheap enough for every status message: it does not ask for the frozen count
        (:attr:`GcPolicy.frozen_objects` has it).
        """
        return {
            "collections": {str(g): self.collections[g] for g in GENERATIONS},
            "pause_ms": {str(g): round(self.pause_s[g] * 1e3, 3) for g in GENERATIONS},
            "max_pause_ms": round(self.max_pause_s * 1e3, 3),
            "threshold": list(gc.get_threshold()),
        }

