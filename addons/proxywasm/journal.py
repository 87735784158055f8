"""The request journal that warm restarts replay (SPEC §10 "Warm restart").

A filter instance keeps, for its current generation, the requests its state depends on, with
the answers their outbound calls got. A warm restart replays them into a fresh instance of the
module (`replay.py`), so the new generation starts with the old one's live cache and asks the
auth server nothing.

Which requests (the rule, and why)
----------------------------------
The host cannot see the filter's state, only what crosses the ABI. The rule:

1. An *anchor* is a request whose handling made at least one outbound call. It is journaled
   with its request headers, every call it made (cluster, headers, body, trailers), every
   answer with its time (None for a call that failed or timed out), every later phase the
   filter saw (request body and trailers, response headers, body and trailers, with their
   times), and its decision.
2. Its *credentials* are the pieces (the whole value, and each blank-separated word, of at
   least `MIN_CREDENTIAL` bytes) of its non-pseudo request headers that the filter copied into
   one of its calls: for the auth filter, `authorization: Bearer <token>`. They are what the
   call's answer is about.
3. A *dependent* is a later request that made no call but carries a credential of a live
   anchor in the same header (a hit, a logout). It attaches to the latest anchor of that
   credential and is replayed with it, so an eviction made since (a logout) is made again.
4. Anchors leave the journal when they closed more than `window_s` ago (the filter's TTL: what
   they inserted has expired), and their dependents with them. Requests that made no call
   and carry no live credential (a malformed token's 401, anonymous traffic) are not kept.

Why not "every request within the window"? A hit in the window whose anchor is older than the
window would, replayed into an empty cache, miss and make a call the journal has no answer for;
answering it anyway would insert an entry with a later expiry than the original one had. Why
not "anchors only"? A logout after a login would be lost and the token would come back alive.
The rule assumes what a cache does: a request that made a call did not find what it needed in
the filter's state, so nothing older than its anchor matters for a credential.

Bounded memory: the journal counts an estimate of its bytes. Past `max_bytes` it stops, frees
what it holds and marks itself overflowed until the next restart; a warm restart then falls
back to cold and the restart record says why.

Late start: a host may start journaling while its instances serve (`Host.start_journaling`,
so that journaling costs nothing until a warm restart is wanted). A journal started after its
generation made an outbound call, or while one of its streams was open, may lack anchors; it
counts as complete once a window has passed (what it lacks has expired) or after the next
restart, and a warm restart before then runs cold (`Journal.incomplete`).

Generations: the journal describes the current generation. A cold restart (or a crash) clears
it; a warm restart keeps it (the new generation holds what it describes) and remembers the old
generation, so a stream of the old generation that finishes after the swap is replayed into the
new one as soon as it is complete (`FilterInstance.late_replay`).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Literal, NamedTuple

from .calls import HttpCallResponse
from .headers import Pairs

MIN_CREDENTIAL = 8
"""Shorter pieces of a header value ('Bearer', 'GET', '1') are never credentials."""
DEFAULT_WINDOW_S = 600.0
"""When neither the option nor the filter configuration gives a TTL: the paper's 10 minutes."""
WINDOW_MARGIN_S = 1.0
"""Added to the TTL so an anchor closing just inside the TTL is never cut by clock rounding."""
REQUEST_BODY, REQUEST_TRAILERS, RESPONSE_HEADERS, RESPONSE_BODY, RESPONSE_TRAILERS = range(5)
"""The stream phases after the request headers, as the host runs them and the journal keeps
them (`Stream._phase`)."""
ENTRY_OVERHEAD = 480
"""Bytes counted per entry for the Python objects around the data (checked against
tracemalloc by tests/bench/warm.py)."""
CALL_OVERHEAD = 320
"""Bytes counted per journaled call (its record and its answer) besides the data."""
PAIR_OVERHEAD = 130
"""Bytes counted per header pair (a tuple of two bytes objects in a list) besides the data."""


@dataclass(frozen=True, slots=True)
class JournalConfig:
    """How much a filter instance journals for warm restarts."""

    window_s: float = DEFAULT_WINDOW_S + WINDOW_MARGIN_S
    """Anchors older than this (by the time they closed) are dropped: their entries expired."""
    max_bytes: int = 64 * 2**20
    """Estimated memory cap per instance; past it the journal overflows (warm → cold)."""


def window_from_config(plugin_configuration: bytes, window_s: float = 0.0) -> float:
    """The journal window: `window_s` if positive, else the configuration's `ttl_seconds`.

    The TTL is read from a flat JSON configuration (the reference filter's key); anything else
    gives the paper's default of 600 s. A margin of `WINDOW_MARGIN_S` is added either way.
    """
    if window_s > 0:
        return window_s + WINDOW_MARGIN_S
    ttl = DEFAULT_WINDOW_S
    try:
        config = json.loads(plugin_configuration or b"{}")
    except (ValueError, UnicodeDecodeError):
        config = None
    if isinstance(config, dict):
        value = config.get("ttl_seconds")
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            ttl = float(value)
    return ttl + WINDOW_MARGIN_S


class CallRecord:
    """One outbound call a journaled request made, and the answer it got."""

    __slots__ = ("answer", "answered", "answered_ns", "body", "cluster", "headers", "trailers")

    def __init__(self, cluster: str, headers: Pairs, body: bytes, trailers: Pairs) -> None:
        self.cluster = cluster
        self.headers = headers
        self.body = body
        self.trailers = trailers
        self.answered = False
        self.answered_ns = 0
        self.answer: HttpCallResponse | None = None
        """None: the call failed or timed out (the filter saw a failed call)."""

    def size(self) -> int:
        """Estimated bytes held."""
        n = len(self.cluster) + len(self.body) + _pairs_size(self.headers)
        n += _pairs_size(self.trailers)
        if self.answer is not None:
            a = self.answer
            n += len(a.body) + _pairs_size(a.headers) + _pairs_size(a.trailers)
        return n + CALL_OVERHEAD


class Outcome(NamedTuple):
    """What the filter decided for a journaled request (a replay must decide the same)."""

    action: Literal["continue", "respond", "reset", "none"]
    status: int | None = None


class Entry:
    """One request as the journal keeps it."""

    __slots__ = (
        "alive", "anchor", "call_ids", "calls", "closed_ns", "credentials", "end_of_stream",
        "generation", "outcome", "phases", "request_headers", "request_ns", "seq", "size",
    )

    def __init__(self, generation: int, request_ns: int,
                 request_headers: Sequence[tuple[bytes, bytes]], end_of_stream: bool) -> None:
        self.generation = generation
        self.request_ns = request_ns
        self.request_headers = request_headers
        self.end_of_stream = end_of_stream
        # Empty tuples until something is added: a journal of many thousand entries keeps
        # few containers for the garbage collector to scan.
        self.calls: list[CallRecord] | tuple[()] = ()
        self.call_ids: dict[int, int] | None = None
        """The original call id -> index in `calls` (while recording)."""
        self.phases: list[tuple[int, int, Pairs | bytes, bool]] | tuple[()] = ()
        """(time, phase, headers or body, end_of_stream) of every later phase, in order."""
        self.outcome = Outcome("none")
        self.closed_ns = 0
        self.anchor: Entry | None = None
        """For a dependent: the anchor it is replayed with."""
        self.credentials: tuple[tuple[bytes, bytes], ...] = ()
        self.alive = True
        self.size = 0
        self.seq = 0
        """Order of commit in its journal (1, 2, ...)."""

    # ---- recording (called by the host) ----

    def add_call(self, call_id: int, cluster: str, headers: Pairs, body: bytes,
                 trailers: Pairs) -> None:
        """The filter made an outbound call for this request."""
        if not isinstance(self.calls, list):
            self.calls, self.call_ids = [], {}
        assert self.call_ids is not None
        self.call_ids[call_id] = len(self.calls)
        self.calls.append(CallRecord(cluster, headers, body, trailers))

    def answer(self, call_id: int, now_ns: int, response: HttpCallResponse | None) -> None:
        """The call `call_id` got `response` (None: failed or timed out) at `now_ns`."""
        index = self.call_ids.get(call_id) if self.call_ids is not None else None
        if index is not None:
            record = self.calls[index]
            record.answered, record.answered_ns, record.answer = True, now_ns, response

    def saw_phase(self, now_ns: int, phase: int, data: Pairs | bytes,
                  end_of_stream: bool) -> None:
        """The filter ran on a later phase of the stream (`REQUEST_BODY` …)."""
        if not isinstance(self.phases, list):
            self.phases = []
        self.phases.append((now_ns, phase, data, end_of_stream))

    @property
    def complete(self) -> bool:
        """Every call this request made has its answer (or failed)."""
        return all(c.answered for c in self.calls)

    @property
    def replayable(self) -> bool:
        """An anchor, or a dependent whose anchor is still in the journal."""
        return self.alive and (self.anchor is None or self.anchor.alive)

    def events(self) -> list[tuple[int, int, int]]:
        """(time, kind, index) of what the replay does for this entry, in time order.

        Kinds: 0 request headers, 1 the answer to call `index`, 2 later phase `index`
        (`phases`), 3 close. Ties keep this order.
        """
        events = [(self.request_ns, 0, -1)]
        events += [(c.answered_ns, 1, i) for i, c in enumerate(self.calls)
                   if c.answered]  # an unanswered call was dropped with its stream
        events += [(p[0], 2, i) for i, p in enumerate(self.phases)]
        events.sort(key=lambda e: e[0])  # stable: at equal times, answers before phases
        events.append((max(self.closed_ns, self.request_ns), 3, -1))
        return events


def _pairs_size(pairs: Sequence[tuple[bytes, bytes]]) -> int:
    return sum(map(len, chain.from_iterable(pairs))) + PAIR_OVERHEAD * len(pairs)


def _pieces(value: bytes) -> Iterator[bytes]:
    """The whole value and each blank-separated word long enough to be a credential."""
    if len(value) >= MIN_CREDENTIAL:
        yield value
    words = value.split()
    if len(words) > 1:
        for w in words:
            if len(w) >= MIN_CREDENTIAL:
                yield w


def credentials_of(request_headers: Sequence[tuple[bytes, bytes]], calls: Sequence[CallRecord]
                   ) -> set[tuple[bytes, bytes]]:
    """(header name, piece) of the request that the filter copied into one of its calls."""
    blob = b"\0".join(
        [v for c in calls for _, v in c.headers] + [c.body for c in calls if c.body]
    )
    found: set[tuple[bytes, bytes]] = set()
    for name, value in request_headers:
        if name.startswith(b":"):
            continue
        for piece in _pieces(value):
            if piece in blob:
                found.add((name, piece))
    return found


class Journal:
    """The journal of one filter instance (see the module docstring for the rule)."""

    def __init__(self, config: JournalConfig, generation: int,
                 started_late_ns: int | None = None) -> None:
        self.config = config
        self.generation = generation
        self.started_late_ns = started_late_ns
        """When journaling started, if its generation had already done what the journal keeps
        (an outbound call, or a stream still open): until a window has passed, older anchors
        may be missing. None: the journal has seen all of its generation."""
        self.inherited: set[int] = set()
        """Older generations whose state the current one received by a warm restart."""
        self.entries: deque[Entry] = deque()
        self.bytes = 0
        self.overflowed: str | None = None
        self.epoch = 0
        """Changes at every restart: a replay prepared in another epoch is stale."""
        self.seq = 0
        """Entries committed so far (the last entry's `seq`)."""
        self._owner: dict[tuple[bytes, bytes], Entry] = {}  # credential -> latest anchor
        self._names: dict[bytes, int] = {}  # header name -> credentials of that name

    # ---- generations ----

    def reset(self, generation: int) -> None:
        """A cold start of `generation`: nothing carried over."""
        self.generation = generation
        self.inherited.clear()
        self.overflowed = None
        self.started_late_ns = None
        self.epoch += 1
        self._clear()

    def carry_to(self, generation: int) -> None:
        """A warm restart: `generation` holds what the journal describes."""
        self.inherited.add(self.generation)
        self.generation = generation
        self.started_late_ns = None  # (a warm restart needs a complete journal)
        self.epoch += 1

    def incomplete(self, now_ns: int) -> str | None:
        """Why the journal may lack requests its generation served (None: it lacks none; a
        late start is forgotten once a window has passed)."""
        started = self.started_late_ns
        if started is None:
            return None
        age = (now_ns - started) / 1e9
        if age >= self.config.window_s:
            self.started_late_ns = None  # what it missed has expired
            return None
        return (f"journaling started {age:.1f} s ago, when this generation had already called "
                f"out or had streams open: within the journal's window "
                f"({self.config.window_s:g} s) it may lack older requests (the next generation "
                "is journaled whole)")

    def _clear(self) -> None:
        for e in self.entries:
            e.alive = False
        self.entries.clear()
        self._owner.clear()
        self._names.clear()
        self.bytes = 0

    # ---- recording ----

    def wants(self, generation: int) -> bool:
        """Whether requests of `generation` are recorded."""
        return self.overflowed is None and (
            generation == self.generation or generation in self.inherited
        )

    def commit(self, entry: Entry, now_ns: int) -> bool:
        """Keep `entry` if the rule says so (call when its stream closed). Returns whether."""
        self.prune(now_ns)
        if self.overflowed is not None or not self.wants(entry.generation):
            return False
        entry.closed_ns = now_ns
        if entry.calls:
            creds = credentials_of(entry.request_headers, entry.calls)
            entry.credentials = tuple(creds)
            for cred in creds:
                if cred not in self._owner:
                    self._names[cred[0]] = self._names.get(cred[0], 0) + 1
                self._owner[cred] = entry
        else:
            anchor = self._anchor_of(entry.request_headers)
            if anchor is None:
                return False
            entry.anchor = anchor
        entry.call_ids = None
        entry.request_headers = tuple(entry.request_headers)  # (tuples: no GC tracking)
        entry.size = (ENTRY_OVERHEAD + _pairs_size(entry.request_headers)
                      + sum(c.size() for c in entry.calls)
                      + sum(PAIR_OVERHEAD + (len(d) if isinstance(d, bytes) else _pairs_size(d))
                            for _, _, d, _ in entry.phases))
        self.seq += 1
        entry.seq = self.seq
        self.entries.append(entry)
        self.bytes += entry.size
        if self.bytes > self.config.max_bytes:
            self.overflowed = (
                f"journal overflow: more than {self.config.max_bytes / 2**20:g} MiB "
                f"({len(self.entries)} requests) within {self.config.window_s:g} s"
            )
            self._clear()
        return True

    def _anchor_of(self, headers: Sequence[tuple[bytes, bytes]]) -> Entry | None:
        """The latest live anchor one of whose credentials `headers` carry."""
        names = self._names
        if not names:
            return None
        best: Entry | None = None
        owner = self._owner
        for name, value in headers:
            if name in names:
                a = owner.get((name, value))  # the whole value: the common case, no split
                if a is None:
                    for piece in _pieces(value):
                        a = owner.get((name, piece))
                        if a is not None:
                            break
                if a is not None and (best is None or a.closed_ns > best.closed_ns):
                    best = a
        return best

    def prune(self, now_ns: int) -> None:
        """Drop anchors (and what depends on them) that closed before the window."""
        cut = now_ns - int(self.config.window_s * 1e9)
        entries = self.entries
        while entries and entries[0].closed_ns < cut:
            e = entries.popleft()
            self.bytes -= e.size
            e.alive = False
            for cred in e.credentials:
                if self._owner.get(cred) is e:
                    del self._owner[cred]
                    left = self._names[cred[0]] - 1
                    if left:
                        self._names[cred[0]] = left
                    else:
                        del self._names[cred[0]]

    def replayable(self, now_ns: int) -> list[Entry]:
        """The entries a warm restart at `now_ns` replays, in the order they closed."""
        self.prune(now_ns)
        return [e for e in self.entries if e.replayable]

    def since(self, seq: int) -> list[Entry]:
        """The replayable entries committed after entry `seq`, in order."""
        out: list[Entry] = []
        for e in reversed(self.entries):
            if e.seq <= seq:
                break
            if e.replayable:
                out.append(e)
        out.reverse()
        return out
