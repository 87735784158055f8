"""Warm restart: replay a generation's journal into a fresh instance (SPEC §10).

The new VM does not see the host while it is replayed. It sees `ReplayServices`, which stand
in for the host's services:

- **the clock** is set to each journaled event's original time (the request, each call's
  answer, the response, the close), in the order they happened across requests, and the
  VM's own ticks run at their times in between, so what the filter computes from time (an
  entry's expiry) is what it computed the first time;
- **outbound calls** never leave the process: the k-th call a replayed request makes is
  compared with the k-th call it made originally (cluster, headers, body, trailers) and gets
  the original answer at the original time;
- **shared data** is a copy of the host's, so a replay changes nothing outside the new VM;
- releasing contexts and tick schedules are the replay's own business.

The contract (what a filter must satisfy for a warm restart to rebuild its state): it is
deterministic given its configuration, the request headers (and response headers), the time
and its calls' answers; its state after a request that made a call does not depend on earlier
requests carrying the same credentials (what a cache does: it called because it had nothing);
and it makes outbound calls only while handling a request. When the replay can tell that this
does not hold, it raises `ReplayError` and the host restarts cold instead, recording why:

- the replay trapped or was interrupted;
- a replayed request made a call the journal cannot answer (more calls than recorded, or one
  that differs from the recorded call), or fewer calls than recorded;
- a call from outside a request (a tick, the root context);
- a replayed request was decided differently (continue / respond with another status / reset);
- a replayed stream was left open.

A filter that breaks the contract without showing it (say, reading `random_get` into its
state) gets a warm generation that differs from the old one; that is the contract's limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _wasmtime as raw
from .abi import Action, Status
from .calls import HttpCallResponse
from .clock import Clock
from .headers import Pairs
from .journal import (
    REQUEST_BODY,
    REQUEST_TRAILERS,
    RESPONSE_BODY,
    RESPONSE_HEADERS,
    RESPONSE_TRAILERS,
    Entry,
    Outcome,
)
from .shared import SharedQueues

if TYPE_CHECKING:
    from .context import PendingCall, StreamContext
    from .vm import HostServices, Vm


class ReplayError(Exception):
    """The journal could not be replayed; the message says why (the restart goes cold)."""


class ReplayResult(NamedTuple):
    """A VM rebuilt from a journal."""

    vm: Vm
    requests: int
    """Journaled requests replayed."""
    calls: int
    """Outbound calls answered from the journal."""
    duration_s: float


class _Clock:
    __slots__ = ("now",)

    def __init__(self, now: int) -> None:
        self.now = now

    def now_ns(self) -> int:
        return self.now


class _Replayed:
    """The stream object of a replayed request's context."""

    __slots__ = ("action", "call_ids", "ctx", "decided", "entry", "next_call")

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.ctx: StreamContext | None = None
        self.action = int(Action.PAUSE)
        self.decided: Outcome | None = None
        """The request's decision (what the original's `Stream.decision` recorded)."""
        self.next_call = 0
        self.call_ids: dict[int, int] = {}  # call index in the entry -> call id in this VM


class ReplayServices:
    """What a VM sees instead of its host while it is replayed (`vm.HostServices`)."""

    def __init__(self, host: HostServices, start_ns: int) -> None:
        self._host = host
        self.time = _Clock(start_ns)
        """The replay's clock, set by the replay."""
        self.clock: Clock = self.time
        self.limits = host.limits
        self.plugin_name = host.plugin_name
        self.root_id = host.root_id
        self.vm_id = host.vm_id
        self.plugin_configuration = host.plugin_configuration
        self.vm_configuration = host.vm_configuration
        self.shared_data: dict[bytes, tuple[bytes, int]] = dict(host.shared_data)
        self.shared_queues = SharedQueues()
        """A replay's queues are its own: what it enqueues reaches no live filter."""
        self.failure: str | None = None

    def queue_ready(self, queue_id: int) -> None:
        """Nothing to tell during a replay."""

    def random_bytes(self, n: int) -> bytes:
        """The host's randomness (a filter whose state depends on it breaks the contract)."""
        return self._host.random_bytes(n)

    def start_call(self, vm: Vm, call: PendingCall, headers: Pairs, body: bytes,
                   trailers: Pairs) -> int:
        """Accept the call if it is the one the request made originally; never send it.
        Returns a `Status`: OK, or INTERNAL_FAILURE when the journal cannot answer it."""
        ctx = vm.contexts.get(call.context_id)
        replayed = ctx.stream if ctx is not None else None
        if not isinstance(replayed, _Replayed):
            self.fail("the filter made an outbound call outside a request (from its root "
                      "context or a tick); the journal cannot answer it")
            return Status.INTERNAL_FAILURE
        entry, k = replayed.entry, replayed.next_call
        if k >= len(entry.calls):
            self.fail(f"a replayed request made {k + 1} outbound calls, the original "
                      f"{len(entry.calls)}; the journal cannot answer the extra one")
            return Status.INTERNAL_FAILURE
        recorded = entry.calls[k]
        if (recorded.cluster, recorded.headers, recorded.body, recorded.trailers) != (
                call.cluster, headers, body, trailers):
            self.fail(f"a replayed request's outbound call to {call.cluster} differs from the "
                      "recorded one; the journal cannot answer it")
            return Status.INTERNAL_FAILURE
        replayed.call_ids[k] = call.id
        replayed.next_call = k + 1
        return Status.OK

    def context_released(self, vm: Vm) -> None:
        """Nothing drains during a replay."""

    def schedule_changed(self) -> None:
        """The replay runs the VM's ticks itself."""

    def fail(self, reason: str) -> None:
        """Remember the first reason the replay cannot go on."""
        if self.failure is None:
            self.failure = reason


def outcome_of(ctx: StreamContext, action: int) -> Outcome:
    """What the filter decided for a stream so far (as `Stream.settle` reads it)."""
    if ctx.local_response is not None:
        return Outcome("respond", ctx.local_response.status)
    if ctx.closed:
        return Outcome("reset")
    if action == Action.CONTINUE or ctx.resumed:
        return Outcome("continue")
    return Outcome("none")


def _deliver(vm: Vm, call: PendingCall, response: HttpCallResponse | None) -> None:
    """Hand a recorded answer to the filter exactly as the host does."""
    if response is None:
        vm.on_http_call_response(call, 0, [], b"", [])
    else:
        headers = [(b":status", str(response.status).encode()), *response.headers]
        vm.on_http_call_response(call, response.status, headers, response.body,
                                 response.trailers)


class _Replayer:
    """Feeds journaled entries into a VM, event by event, in the order they happened."""

    def __init__(self, vm: Vm, services: ReplayServices, ticks: bool) -> None:
        self.vm = vm
        self.services = services
        self.ticks = ticks
        self.calls = 0
        self.requests = 0
        self._events: list[tuple[int, int, int, int, _Replayed]] = []
        self._next = 0
        self._opened: list[_Replayed] = []
        self._undecided: list[_Replayed] = []
        """Opened streams not decided yet: a call's answer may decide any of them (a filter
        that lets concurrent requests wait on one call), as `Host._settle` does live."""
        self._batch = 0

    def add(self, entries: Sequence[Entry]) -> None:
        """Queue `entries` (in the order they closed) after everything queued before.

        Within one call, events are merged by their original times. Entries added later are
        replayed after the earlier ones; their times are clamped so the clock never goes back.
        """
        self._batch += 1
        events: list[tuple[int, int, int, int, _Replayed]] = []
        for index, entry in enumerate(entries):
            replayed = _Replayed(entry)
            last = 0
            for seq, (t, phase, k) in enumerate(entry.events()):
                last = max(last, t)
                events.append((last, index, seq, (phase << 16) | (k & 0xFFFF), replayed))
        events.sort(key=lambda e: (e[0], e[1], e[2]))
        del self._events[:self._next]
        self._next = 0
        self._events.extend(events)
        self.requests += len(entries)

    @property
    def pending(self) -> int:
        """Events queued and not yet replayed."""
        return len(self._events) - self._next

    def advance(self, t: int) -> None:
        """Move the clock to `t`, running the VM's ticks due on the way at their times."""
        vm, clock = self.vm, self.services.time
        if self.ticks:
            while vm.tick_period_ns and vm.next_tick_ns <= t:
                clock.now = max(clock.now, vm.next_tick_ns)
                vm.on_tick()
                self._check()
                vm.next_tick_ns = clock.now + vm.tick_period_ns
        clock.now = max(clock.now, t)

    def _check(self) -> None:
        if self.services.failure is not None:
            raise ReplayError(self.services.failure)

    def step(self, max_events: int) -> bool:
        """Replay up to `max_events` queued events; True when none is left."""
        vm, events = self.vm, self._events
        end = min(len(events), self._next + max_events)
        while self._next < end:
            t, _, _, code, replayed = events[self._next]
            self._next += 1
            self.advance(t)
            phase, k = code >> 16, code & 0xFFFF
            if phase == 0:
                ctx = replayed.ctx = vm.new_context(replayed)
                self._opened.append(replayed)
                self._undecided.append(replayed)
                ctx.request_headers = list(replayed.entry.request_headers)
                replayed.action = vm.on_request_headers(ctx, replayed.entry.end_of_stream)
            elif phase == 1:
                self._answer(replayed, k)
            elif phase == 2:
                self._phase(replayed, k)
            else:
                self._close(replayed)
            self._check()
            now_ctx = replayed.ctx
            if replayed.decided is None and now_ctx is not None and phase != 3:
                decided = outcome_of(now_ctx, replayed.action)
                if decided.action != "none":
                    replayed.decided = decided
            if phase == 1:  # an answer may have decided other streams waiting on that call
                self._settle_undecided()
        return self._next >= len(events)

    def _settle_undecided(self) -> None:
        still = []
        for other in self._undecided:
            ctx = other.ctx
            if other.decided is not None or ctx is None or ctx.id not in self.vm.contexts:
                continue
            decided = outcome_of(ctx, other.action)
            if decided.action != "none":
                other.decided = decided
            else:
                still.append(other)
        self._undecided = still

    def finish(self, until_ns: int | None) -> None:
        """Replay what is queued, advance to `until_ns`, and check nothing was left open."""
        self.step(len(self._events))
        if until_ns is not None:
            self.advance(until_ns)
        vm = self.vm
        left = sum(1 for r in self._opened if r.ctx is not None and r.ctx.id in vm.contexts)
        if left:
            raise ReplayError(f"{left} replayed stream(s) were left open")

    def _answer(self, replayed: _Replayed, k: int) -> None:
        vm = self.vm
        call_id = replayed.call_ids.get(k)
        call = vm.calls.pop(call_id, None) if call_id is not None else None
        if call is None:
            raise ReplayError(
                f"a replayed request made {replayed.next_call} outbound call(s), the original "
                f"{len(replayed.entry.calls)}: the filter did not decide as it did")
        ctx = replayed.ctx
        if ctx is not None:
            ctx.calls.discard(call.id)
        _deliver(vm, call, replayed.entry.calls[k].answer)
        self.calls += 1

    def _phase(self, replayed: _Replayed, index: int) -> None:
        """A later phase of the stream, as `Stream._phase` runs it."""
        vm, ctx = self.vm, replayed.ctx
        if ctx is None or ctx.id not in vm.contexts:
            return
        _, phase, data, end_of_stream = replayed.entry.phases[index]
        ctx.resumed = False
        ctx.local_response = None
        if phase == REQUEST_BODY and isinstance(data, bytes):
            ctx.request_body = data
            replayed.action = vm.on_request_body(ctx, len(data), end_of_stream)
        elif phase == REQUEST_TRAILERS and isinstance(data, list):
            ctx.request_trailers = list(data)
            replayed.action = vm.on_request_trailers(ctx)
        elif phase == RESPONSE_HEADERS and isinstance(data, list):
            ctx.response_headers = list(data)
            replayed.action = vm.on_response_headers(ctx, end_of_stream)
        elif phase == RESPONSE_BODY and isinstance(data, bytes):
            ctx.response_body = data
            replayed.action = vm.on_response_body(ctx, len(data), end_of_stream)
        elif phase == RESPONSE_TRAILERS and isinstance(data, list):
            ctx.response_trailers = list(data)
            replayed.action = vm.on_response_trailers(ctx)

    def _close(self, replayed: _Replayed) -> None:
        vm, ctx = self.vm, replayed.ctx
        if ctx is None or ctx.id not in vm.contexts:
            return
        got, want = replayed.decided or Outcome("none"), replayed.entry.outcome
        if got != want:
            raise ReplayError(
                f"a replayed request was decided {_show(got)}, originally {_show(want)}: the "
                "filter is not deterministic given headers, time and call answers")
        vm.finish_context(ctx)


def _show(o: Outcome) -> str:
    return o.action if o.status is None else f"{o.action} {o.status}"


def _trap_reason(e: raw.GuestTrap) -> str:
    kind = "was interrupted after its deadline" if e.interrupted else "trapped"
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    return f"the replay {kind}: {first}"


class Replay:
    """A new generation being rebuilt from a journal, in steps.

    The old generation keeps serving while the replay runs (`step` between requests), so a
    request never waits for more than one step; what the journal records meanwhile is added
    (`add`) and replayed too, and `finish` hands the VM over. Every method raises
    `ReplayError` when the replay shows the filter breaks the contract; the VM is then closed.
    """

    def __init__(self, host: HostServices, new_vm: Callable[[ReplayServices], Vm],
                 entries: Sequence[Entry], now_ns: int) -> None:
        """`new_vm(services)` creates the VM against the given services (it may raise
        `FilterStartError`)."""
        self.t0 = time.perf_counter()
        self.host = host
        start = min((e.request_ns for e in entries), default=now_ns)
        self.services = ReplayServices(host, min(start, now_ns))
        self.vm = new_vm(self.services)
        self._replayer = _Replayer(self.vm, self.services, ticks=True)
        self._replayer.add(entries)

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except raw.GuestTrap as e:
            self.vm.close()
            raise ReplayError(_trap_reason(e)) from e
        except ReplayError:
            self.vm.close()
            raise

    def add(self, entries: Sequence[Entry]) -> None:
        """Replay `entries` too (journaled since the replay began)."""
        self._replayer.add(entries)

    def step(self, max_events: int) -> bool:
        """Replay up to `max_events` events; True when everything added so far is replayed."""
        return bool(self._guard(lambda: self._replayer.step(max_events)))

    @property
    def pending(self) -> int:
        """Events added and not yet replayed."""
        return self._replayer.pending

    def abort(self) -> None:
        """Give up: drop the VM."""
        self.vm.close()

    def finish(self, now_ns: int) -> ReplayResult:
        """Replay what is left, catch the ticks up to `now_ns`, and return the VM, which
        sees the real host again; its request and call counters start at zero (replayed work
        is not traffic; the result counts it)."""
        self._guard(lambda: self._replayer.finish(now_ns))
        vm = self.vm
        vm.host = self.host
        vm.requests = vm.outbound = 0
        vm.started_ns = now_ns
        vm.tick_armed = False
        r = self._replayer
        return ReplayResult(vm, r.requests, r.calls, time.perf_counter() - self.t0)


def replay(host: HostServices, new_vm: Callable[[ReplayServices], Vm], entries: Sequence[Entry],
           now_ns: int) -> ReplayResult:
    """A fresh VM with `entries` replayed into it at once, ready to serve at `now_ns`."""
    return Replay(host, new_vm, entries, now_ns).finish(now_ns)


def replay_into(vm: Vm, entry: Entry) -> None:
    """Replay one entry into a serving VM (a request of the old generation that finished
    after a warm restart), at its original times, without ticks.

    Raises `ReplayError` if it does not replay as recorded (the VM keeps serving; the entry's
    effect may be partial) and lets `GuestTrap` through (the host handles a crash).
    """
    host = vm.host
    services = ReplayServices(host, entry.request_ns)
    requests, outbound = vm.requests, vm.outbound
    vm.host = services
    replayer = _Replayer(vm, services, ticks=False)
    replayer.add([entry])
    try:
        replayer.finish(None)
    finally:
        vm.host = host
        vm.requests, vm.outbound = requests, outbound
