"""A script addon that measures Python's cyclic collector in a live mitmdump, for
`tests.bench.collector`: from `running` to `done`, each generation's collections and the
time they took (`gc.callbacks`), and at `done` how many objects a full collection walks
(generation 2, the frozen ones left out) and how many are frozen. Writes JSON to the path in
$WASM_RECLAIM_COLLECTOR_OUT. It neither freezes nor collects anything itself."""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import Any


class CollectorProbe:
    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.started = 0.0
        self.on = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if not self.on:
            return
        if phase == "start":
            self.started = time.perf_counter()
        else:
            generation = info["generation"]
            self.counts[generation] += 1
            self.seconds[generation] += time.perf_counter() - self.started

    def running(self) -> None:
        gc.callbacks.append(self._callback)
        self.on = True

    def done(self) -> None:
        self.on = False
        out = os.environ.get("WASM_RECLAIM_COLLECTOR_OUT")
        if out:
            Path(out).write_text(json.dumps({
                "collections": self.counts, "seconds": self.seconds,
                "walked_by_a_full_collection": len(gc.get_objects(generation=2)),
                "frozen": gc.get_freeze_count()}))


addons = [CollectorProbe()]
