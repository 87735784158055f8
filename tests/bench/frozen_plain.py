"""A script addon that only freezes the start-up heap when it loads, as the addon does
(`addons.wasm_auth.freeze_start_heap`), and has no flow hooks: the proxy benchmark's
`plain, heap frozen` control. Against it, the addon's ratio is its cost without the collector
time the freeze saves any mitmdump."""

from __future__ import annotations

import gc
from typing import Any


class FreezeStartHeap:
    def load(self, loader: Any) -> None:
        if not gc.get_freeze_count():
            gc.collect()
            gc.freeze()


addons = [FreezeStartHeap()]
