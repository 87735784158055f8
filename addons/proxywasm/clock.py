"""Clocks the host reads time from: the wall clock, a scaled clock for demos, a virtual clock.

Every time the filter sees (`proxy_get_current_time_nanoseconds`, WASI `clock_time_get`), every
tick, every outbound-call deadline and every metric sample comes from one `Clock`, so that a
scaled or virtual run is consistent end to end.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of the current time in nanoseconds since the Unix epoch."""

    def now_ns(self) -> int:
        """Return the current time in nanoseconds since the epoch."""
        ...


class WallClock:
    """The real time of day."""

    now_ns = staticmethod(time.time_ns)
    """Return `time.time_ns()` (the builtin itself: no Python frame per read)."""


class ScaledClock:
    """Real time sped up by `speed` from the moment of creation (`wasm_clock_speed`).

    With `speed=60`, a 10-minute TTL passes in 10 real seconds. The clock starts at the real
    time of day and then runs `speed` times faster, so timestamps stay plausible.
    """

    def __init__(self, speed: float) -> None:
        if not speed > 0:
            raise ValueError(f"clock speed must be positive, got {speed}")
        self.speed = speed
        self._origin_ns = time.time_ns()
        self._origin_perf = time.perf_counter_ns()

    def now_ns(self) -> int:
        """Return the scaled time."""
        elapsed = time.perf_counter_ns() - self._origin_perf
        return self._origin_ns + int(elapsed * self.speed)


class VirtualClock:
    """A clock that moves only when told to: simulation in virtual time."""

    def __init__(self, start_ns: int = 1_575_158_400 * 10**9) -> None:
        # Default start: 2019-12-01T00:00:00Z, the first day of the EClog dataset.
        self._now_ns = start_ns

    def now_ns(self) -> int:
        """Return the virtual time."""
        return self._now_ns

    def set_ns(self, t_ns: int) -> None:
        """Move to `t_ns`; a virtual clock never goes backwards."""
        if t_ns < self._now_ns:
            raise ValueError(f"virtual clock cannot go back from {self._now_ns} to {t_ns}")
        self._now_ns = t_ns

    def advance(self, seconds: float) -> None:
        """Move forward by `seconds`."""
        self.set_ns(self._now_ns + int(seconds * 1e9))
