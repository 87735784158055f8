"""How long a filter keeps what an outbound call brought: the intervals at which one
generation repeats an identical outbound call.

A filter that caches an answer (an auth filter caching a token's verification) asks again for
the same thing only once its entry has expired, at the first request after that. So the
interval from an identical call's 2xx answer to its repetition is the entry's life plus the
wait for the next request, and a low quantile of those intervals is the life itself: the TTL,
seen by the host without reading the filter's memory (the paper's manager has to infer it
from page growth, which a small instance never shows). A filter that does not cache repeats
its calls at its traffic's pace, and the quantile is short; one whose calls never repeat (a
nonce in every call) reports nothing.

The host keeps one tracker per generation (a restart drops the cache, and with it the
meaning of the times it holds). Calls are identified by a hash of the cluster, headers, body
and trailers; only the hashes and their times are kept, never a header, and at most
:data:`MAX_KEYS` of them (the oldest answer goes first).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Final

MAX_KEYS: Final = 16_384
"""Distinct calls remembered per generation: about 120 bytes each, so at most 1.9 MiB per
instance (a flood of distinct tokens across the instance bound stays small beside the
instances' own memory). A call repeated after more than this many other calls were answered
is not seen; the quantile then comes from quieter times, or there is none. Calls in flight are
bounded alike: one whose stream closed first never gets its answer here."""
KEEP: Final = 256
"""The latest intervals kept: the quantile follows the filter's recent behaviour."""
MIN_INTERVALS: Final = 20
"""Fewer repetitions than this report nothing: a quantile of a handful is noise."""
QUANTILE: Final = 0.10
"""The quantile reported. The least interval is the TTL plus about a second on our traces;
the 10th percentile two to five seconds more, and it ignores a stray early repeat (a call
repeated while the first was still in flight, an entry evicted before its time)."""


class RefetchIntervals:
    """Intervals between a 2xx answer to an outbound call and the same call made again."""

    __slots__ = ("_answered", "_cached", "_intervals", "_pending")

    def __init__(self) -> None:
        self._answered: OrderedDict[int, float] = OrderedDict()  # key → time of its 2xx answer
        self._pending: dict[int, int] = {}  # call id → key
        self._intervals: deque[float] = deque(maxlen=KEEP)
        self._cached: float | None = None

    def started(self, call_id: int, key: int, now_s: float) -> None:
        """Call `call_id` (identified by `key`) starts at `now_s`."""
        answered = self._answered.pop(key, None)
        if answered is not None:
            self._intervals.append(now_s - answered)
            self._cached = None
        pending = self._pending
        pending[call_id] = key
        if len(pending) > MAX_KEYS:  # calls whose stream closed before their answer came
            del pending[next(iter(pending))]

    def answered(self, call_id: int, now_s: float, ok: bool) -> None:
        """Call `call_id` got its answer (`ok`: 2xx) or failed at `now_s`."""
        key = self._pending.pop(call_id, None)
        if key is None or not ok:
            return
        self._answered[key] = now_s
        if len(self._answered) > MAX_KEYS:
            self._answered.popitem(last=False)

    def interval_s(self) -> float | None:
        """The :data:`QUANTILE` of the kept intervals in seconds, or None (too few)."""
        n = len(self._intervals)
        if n < MIN_INTERVALS:
            return None
        if self._cached is None:
            ordered = sorted(self._intervals)
            self._cached = ordered[min(n - 1, max(0, math.ceil(QUANTILE * n) - 1))]
        return self._cached


def call_key(cluster: str, headers: list[tuple[bytes, bytes]], body: bytes,
             trailers: list[tuple[bytes, bytes]]) -> int:
    """What identifies a call: a hash of everything it sends (process-local, never stored)."""
    return hash((cluster, tuple(headers), body, tuple(trailers)))
