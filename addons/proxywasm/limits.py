"""Resource limits and failure handling shared by every instance of a host."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits and failure handling for every instance of a host."""

    memory_bytes: int = 256 * 2**20
    """Linear-memory cap per instance; `memory.grow` past it fails (0: no cap)."""
    deadline_ms: float = 100.0
    """A guest call whose own (guest) time exceeds this is interrupted (see `_wasmtime`)."""
    crash_window_s: float = 60.0
    """Crashes closer together than this count as a crash loop."""
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 30.0
    module_crash_threshold: int = 3
    """Crashes of the module (any of its instances) within `crash_window_s` after which the
    whole module backs off: no new instance starts and no crashed one restarts until then."""
    stream_timeout_s: float = 30.0
    """A paused stream with no pending call that gets no decision in this time fails."""
