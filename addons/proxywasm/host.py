"""The Proxy-Wasm host: filter instances, their generations, streams, timers and restarts.

- `Host` holds one compiled `FilterModule` and the filter instances made from it, keyed by
  instance id (for example the upstream host: the paper's one filter per site). It owns the
  timers (ticks, outbound-call deadlines, crash back-off) on one `Clock`, so the same code runs
  on the wall clock, a scaled clock, or a virtual clock stepped by a simulation.
- `FilterInstance` is a managed instance: its current `Vm` (one *generation*), the older
  generations still draining, and its restart and crash history.
- `Stream` is one HTTP request going through the filter; `Decision` is what the filter decided.

A restart gives a fresh instance of the compiled module and a new generation number. Streams
already in flight finish on the old generation, which is dropped (its memory freed) as soon as
its last stream is closed, so no request fails because of a restart. A trap fails the streams
of that generation by the fail policy and restarts the instance, with exponential back-off
when crashes repeat.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from addons.logsafe import escape  # an admin's reason is any text

from . import _wasmtime as raw
from .abi import WASM_PAGE_SIZE, Action, Status
from .calls import Dispatcher, HttpCall, HttpCallResponse
from .clock import Clock, WallClock
from .context import LocalResponse, PendingCall, StreamContext
from .headers import Pairs
from .journal import (
    REQUEST_BODY,
    REQUEST_TRAILERS,
    RESPONSE_BODY,
    RESPONSE_HEADERS,
    RESPONSE_TRAILERS,
    Entry,
    Journal,
    JournalConfig,
    Outcome,
)
from .limits import Limits
from .module import FilterModule
from .properties import Attributes
from .refetch import call_key
from .replay import Replay, ReplayError, ReplayServices, replay_into
from .shared import SharedQueues
from .vm import FilterStartError, Vm

logger = logging.getLogger(__name__)
guest_logger = logging.getLogger("wasm_reclaim.guest")


class Decision(NamedTuple):
    """What happens to a request after the filter ran."""

    action: Literal["continue", "respond", "reset"]
    request_headers: Pairs
    """The request headers to forward (the filter may have changed them)."""
    response: LocalResponse | None = None
    outbound: int = 0
    """Outbound calls the filter made for this stream (0: decided from its own state)."""
    generation: int = 0
    error: str | None = None
    """Set when the fail policy decided because the filter failed."""
    modified: bool = False
    """The filter changed the request headers (forward `request_headers`, not the original)."""
    failed_calls: int = 0
    """Outbound calls of this stream that got no 2xx answer (failed, timed out, or refused)."""


_NO_METRICS: Mapping[str, int] = MappingProxyType({})


class Observation(NamedTuple):
    """What the host observes of an instance (the paper's three metrics and more). A named
    tuple, as `Decision`: one is made per instance and sample (a simulated day has 17,280)."""

    id: str
    tenant: str
    generation: int
    started_at: float
    """Start of the current generation, seconds since the epoch on the host clock."""
    allocated_pages: int
    allocated_bytes: int
    requests: int
    """Requests processed by the current generation."""
    outbound: int
    """Outbound calls made by the current generation."""
    metrics: Mapping[str, int] = _NO_METRICS
    """The filter's own metrics (ground truth such as live entries and live bytes)."""
    draining: int = 0
    """Older generations still finishing streams."""
    state: Literal["running", "down"] = "running"
    memory_cap_hits: int = 0
    """Generations of this instance that reached the linear-memory cap (memory.grow failing)."""
    refetch_interval_s: float | None = None
    """How long after a 2xx answer the generation makes an identical outbound call again (a
    low quantile: the filter's cache TTL as the host sees it; None: too few repeats yet)."""


@dataclass(frozen=True, slots=True)
class RestartRecord:
    """One restart, as written to the `restarts` collection."""

    instance: str
    tenant: str
    time: float
    reason: str
    requested_by: str
    generation_before: int
    generation: int
    allocated_bytes_before: int
    allocated_bytes_after: int
    duration_s: float
    mode: RestartMode = "cold"
    """How the new generation started: `warm` (the old one's journal replayed) or `cold`."""
    fallback: str | None = None
    """Why a warm restart that was asked for ran cold (None: it ran as asked)."""
    replayed: int = 0
    """Journaled requests replayed into the new generation (warm only)."""


CallOutcome = Literal["ok", "timeout", "error", "cancelled"]
"""How an outbound call ended: answered, timed out, failed (unreachable, reset), or cancelled
(its stream's client left: the host stopped it, as Envoy cancels a deleted context's calls)."""


class AuthCallRecord(NamedTuple):
    """One outbound call, as written to the `auth_calls` collection."""

    instance: str
    tenant: str
    generation: int
    time: float
    cluster: str
    path: str
    status: int | None
    """HTTP status, or None when the call failed, timed out or was cancelled."""
    outcome: CallOutcome
    latency_s: float


class HostEvents:
    """Receives what the host does; the addon writes these to the store. Defaults do nothing."""

    def on_auth_call(self, record: AuthCallRecord) -> None:
        """An outbound call finished (or timed out)."""

    def on_restart(self, record: RestartRecord) -> None:
        """An instance restarted."""

    def on_crash(self, instance: str, generation: int, error: str) -> None:
        """A generation trapped."""


RestartMode = Literal["cold", "warm"]
RESTART_MODES: tuple[RestartMode, ...] = ("cold", "warm")


class RestartError(Exception):
    """An explicit restart failed; the old generation keeps serving."""


# --------------------------------------------------------------------------------------------


class Stream:
    """One HTTP request/response pair through one filter instance (one stream context).

    The phases run in Envoy's order: `request_headers()`, `request_body()`,
    `request_trailers()`, then `response_headers()`, `response_body()`, `response_trailers()`,
    and `close()` (`proxy_on_log`, `proxy_on_done`, `proxy_on_delete`). Each phase returns a
    `Decision`, or None while the filter has paused it (waiting for an outbound call, or for
    `proxy_continue_stream`), in which case `on_decision` is called when it decides. What the
    filter changed is in `ctx` (header maps, bodies; `ctx.dirty` says which) until `close()`.
    """

    __slots__ = ("after_calls", "attributes", "ctx", "decision", "entry", "failed_calls",
                 "instance", "last", "on_decision", "phase_ns", "started_ns", "vm", "waiting")

    def __init__(self, instance: FilterInstance, vm: Vm | None) -> None:
        self.instance = instance
        self.vm = vm
        self.ctx: StreamContext | None = None
        self.decision: Decision | None = None
        """The request's decision (from its first phase): what the records report."""
        self.last: Decision | None = None
        """The decision of the latest phase."""
        self.waiting = False
        """A phase has run and its decision is still pending (the filter paused it)."""
        self.on_decision: Callable[[Decision], None] | None = None
        self.started_ns = 0
        self.phase_ns = 0
        """When the latest phase began (a paused phase fails after `stream_timeout_s`)."""
        self.after_calls = False
        """Held until the stream's outbound calls are answered, then continued."""
        self.entry: Entry | None = None
        """This request as the journal records it (None when nothing is journaled)."""
        self.attributes: Attributes | None = None
        """What the embedder knows of this stream, as properties (`request.*`, …)."""
        self.failed_calls = 0

    @property
    def generation(self) -> int:
        """The generation serving this stream."""
        return self.vm.generation if self.vm is not None else self.instance.generation

    @property
    def open(self) -> bool:
        """The stream context is alive (not closed, its generation did not fail)."""
        vm, ctx = self.vm, self.ctx
        return vm is not None and ctx is not None and not vm.closed and ctx.id in vm.contexts

    def request_headers(self, headers: Pairs, end_of_stream: bool = True,
                        lowered: bool = False) -> Decision | None:
        """Run the filter on the request headers (names are matched case-insensitively).

        `lowered`: every name is lowercase already, and `headers` becomes the stream's own
        list (not copied; the filter's changes go into it)."""
        host = self.instance.host
        self.started_ns = self.phase_ns = host.clock.now_ns()
        vm = self.vm
        if vm is None or vm.closed:
            self.instance.maybe_recover()
            return self._fail(f"filter instance {self.instance.id} is down: "
                              f"{self.instance.down_reason}", headers)
        host._busy += 1
        self.waiting = True
        try:
            ctx = self.ctx = vm.new_context(self)
            ctx.request_headers = (headers if lowered
                                   else [(k.lower(), v) for k, v in headers])
            journal = self.instance.journal
            if journal is not None and journal.wants(vm.generation):
                self.entry = Entry(vm.generation, self.started_ns, ctx.request_headers,
                                   end_of_stream)
            action = vm.on_request_headers(ctx, end_of_stream)
            if self.instance.capped(vm):
                return self.last if not self.waiting else self._fail(vm.broken or "", headers)
        except raw.GuestTrap as e:
            self.instance.crashed(vm, e)
            return self.last if not self.waiting else self._fail(str(e), headers)
        finally:
            host._busy -= 1
            if host._deliveries:
                host._drain_deliveries()
        if self.waiting:
            self.settle(action)
        return None if self.waiting else self.last

    def request_body(self, body: bytes, end_of_stream: bool) -> Decision | None:
        """Run `proxy_on_request_body` on `body` (the whole body, or the chunks buffered so
        far); the filter may read and replace it (`ctx.request_body`)."""
        return self._phase(_REQUEST_BODY, body, end_of_stream)

    def request_trailers(self, trailers: Pairs) -> Decision | None:
        """Run `proxy_on_request_trailers`."""
        return self._phase(_REQUEST_TRAILERS, trailers, True)

    def response_headers(self, headers: Pairs, end_of_stream: bool = True) -> Decision | None:
        """Run `proxy_on_response_headers` (`:status` first, as the filter sees it)."""
        return self._phase(_RESPONSE_HEADERS, headers, end_of_stream)

    def response_body(self, body: bytes, end_of_stream: bool) -> Decision | None:
        """Run `proxy_on_response_body` on `body`; the filter may replace it."""
        return self._phase(_RESPONSE_BODY, body, end_of_stream)

    def response_trailers(self, trailers: Pairs) -> Decision | None:
        """Run `proxy_on_response_trailers`."""
        return self._phase(_RESPONSE_TRAILERS, trailers, True)

    def _phase(self, phase: int, data: Any, end_of_stream: bool) -> Decision | None:
        vm, ctx = self.vm, self.ctx
        if vm is None or ctx is None or vm.closed or ctx.id not in vm.contexts:
            if vm is not None and vm.closed and vm.broken is not None:
                return self._fail(f"filter failed: {vm.broken}")
            return self._continue()
        host = self.instance.host
        self.phase_ns = host.clock.now_ns()
        ctx.resumed = False
        ctx.local_response = None
        host._busy += 1
        self.waiting = True
        if self.entry is not None:
            self.entry.saw_phase(host.clock.now_ns(), phase, data if isinstance(data, bytes)
                                 else [(k.lower(), v) for k, v in data], end_of_stream)
        try:
            if phase == _REQUEST_BODY:
                ctx.request_body = data
                action = vm.on_request_body(ctx, len(data), end_of_stream)
            elif phase == _REQUEST_TRAILERS:
                ctx.request_trailers = [(k.lower(), v) for k, v in data]
                action = vm.on_request_trailers(ctx)
            elif phase == _RESPONSE_HEADERS:
                ctx.response_headers = [(k.lower(), v) for k, v in data]
                action = vm.on_response_headers(ctx, end_of_stream)
            elif phase == _RESPONSE_BODY:
                ctx.response_body = data
                action = vm.on_response_body(ctx, len(data), end_of_stream)
            else:
                ctx.response_trailers = [(k.lower(), v) for k, v in data]
                action = vm.on_response_trailers(ctx)
            if self.instance.capped(vm):
                return self.last if not self.waiting else self._fail(vm.broken or "")
        except raw.GuestTrap as e:
            self.instance.crashed(vm, e)
            return self.last if not self.waiting else self._fail(str(e))
        finally:
            host._busy -= 1
            if host._deliveries:
                host._drain_deliveries()
        if self.waiting:
            self.settle(action)
        return None if self.waiting else self.last

    def settle(self, action: int = Action.PAUSE) -> None:
        """Turn the context's state into a decision, if the filter has made one."""
        ctx = self.ctx
        vm = self.vm
        if ctx is None or vm is None or not self.waiting:
            return
        if ctx.local_response is not None:
            kind: Literal["continue", "respond", "reset"] = "respond"
        elif ctx.closed:
            kind = "reset"
        elif action == _CONTINUE or ctx.resumed or (self.after_calls and not ctx.calls):
            kind = "continue"
        else:
            return
        self._decide(Decision(
            kind, ctx.request_headers, ctx.local_response, ctx.outbound, vm.generation, None,
            ctx.modified, self.failed_calls,
        ))

    def _continue(self) -> Decision:
        """The phase goes on untouched (the stream context is gone: nothing to run)."""
        decision = Decision("continue", [], None, 0, self.generation)
        self.waiting = True
        self._decide(decision)
        return decision

    def _fail(self, error: str, headers: Pairs | None = None) -> Decision:
        """Decide by the fail policy because the filter failed."""
        fail_open = self.instance.host.fail_open
        outbound = self.ctx.outbound if self.ctx is not None else 0
        request_headers = headers if headers is not None else (
            self.ctx.request_headers if self.ctx is not None else []
        )
        if fail_open:
            decision = Decision("continue", request_headers, None, outbound, self.generation, error,
                                failed_calls=self.failed_calls)
        else:
            response = LocalResponse(
                503, b"filter unavailable\n", [(b"content-type", b"text/plain")], "filter_error"
            )
            decision = Decision("respond", request_headers, response, outbound, self.generation,
                                error, failed_calls=self.failed_calls)
        self.waiting = True
        self._decide(decision)
        return decision

    def hold_for_calls(self) -> bool:
        """Hold a continued phase while the stream's outbound calls are pending: it continues
        once they are answered, unless the filter decides otherwise meanwhile. False if no
        call is pending (nothing to hold)."""
        ctx = self.ctx
        if ctx is None or not ctx.calls or self.vm is None or self.vm.closed:
            return False
        self.waiting = True
        self.after_calls = True
        self.phase_ns = self.instance.host.clock.now_ns()
        return True

    def _decide(self, decision: Decision) -> None:
        if self.waiting:
            self.waiting = False
            self.after_calls = False
            self.last = decision
            if self.decision is None:
                self.decision = decision
            if self.on_decision is not None:
                self.on_decision(decision)

    def fail_pending(self, error: str) -> None:
        """The filter failed: decide a paused phase by the fail policy."""
        if self.waiting:
            self._fail(error)

    def abandon(self, error: str) -> None:
        """Its client left: decide a paused phase by the fail policy (`error`), end the
        stream, and cancel its outbound calls in flight, as Envoy resets such a stream and
        cancels a deleted context's calls (each still recorded: it went out)."""
        ctx, vm = self.ctx, self.vm
        calls = list(ctx.calls) if ctx is not None and ctx.calls else None
        self.fail_pending(error)
        self.close()
        if calls and vm is not None:
            self.instance.host.cancel_calls(vm, calls)

    def close(self) -> None:
        """End the stream: `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`."""
        vm, ctx = self.vm, self.ctx
        self.ctx = None
        entry, self.entry = self.entry, None
        if self.decision is None:
            self.waiting = True
            self._fail("stream closed before the filter decided")
        self.waiting = False
        if vm is None or ctx is None or vm.closed or ctx.id not in vm.contexts:
            return
        try:
            vm.finish_context(ctx)
        except raw.GuestTrap as e:
            self.instance.crashed(vm, e)
            return
        self.instance.host.context_released(vm)
        decision = self.decision
        if entry is not None and decision is not None and decision.error is None:
            response = decision.response
            entry.outcome = Outcome(decision.action,
                                    response.status if response is not None else None)
            self.instance.journal_commit(entry)


_CONTINUE = int(Action.CONTINUE)
_OK = int(Status.OK)
_REQUEST_BODY, _REQUEST_TRAILERS, _RESPONSE_HEADERS, _RESPONSE_BODY, _RESPONSE_TRAILERS = (
    REQUEST_BODY, REQUEST_TRAILERS, RESPONSE_HEADERS, RESPONSE_BODY, RESPONSE_TRAILERS)


# --------------------------------------------------------------------------------------------


class FilterInstance:
    """A managed filter instance: the current generation and the ones still draining."""

    def __init__(self, host: Host, instance_id: str, tenant: str) -> None:
        self.host = host
        self.id = instance_id
        self.tenant = tenant
        self.generation = -1
        self.vm: Vm | None = None
        self.draining: list[Vm] = []
        self.crashes: deque[int] = deque(maxlen=32)
        self.memory_cap_hits = 0
        self.down_reason = ""
        self.retry_at_ns = 0
        self.restarts = 0
        self.vm = self._new_vm()
        config = host.journal_config
        self.journal = (Journal(config, self.generation)
                        if config is not None and host.journaling else None)
        """The requests a warm restart replays (None: journaling is off)."""

    def _new_vm(self) -> Vm:
        vm = Vm(self.host.module, self.host, self.id, self.generation + 1)
        self.generation = vm.generation
        return vm

    def stream(self) -> Stream:
        """Open a stream on the current generation (or a failing one while down)."""
        if self.vm is None:
            self.maybe_recover()
        return Stream(self, self.vm)

    def observe(self) -> Observation:
        """Allocated memory, requests, outbound calls and the filter's metrics."""
        vm = self.vm
        if vm is None:
            return Observation(self.id, self.tenant, self.generation, 0.0, 0, 0, 0, 0, {},
                               len(self.draining), "down", self.memory_cap_hits)
        pages = vm.allocated_pages()
        return Observation(
            self.id, self.tenant, vm.generation, vm.started_ns / 1e9, pages,
            pages * WASM_PAGE_SIZE, vm.requests, vm.outbound, vm.metric_values(),
            len(self.draining), "running", self.memory_cap_hits, vm.refetch.interval_s(),
        )

    def capped(self, vm: Vm) -> bool:
        """True if `vm` has no room left for one more page under the memory cap.

        From then on every `memory.grow` fails and the filter cannot allocate: that is a
        failure like a trap (logged once, counted, its streams fail by the fail policy, and
        the instance restarts with back-off). Checked after each callback that ran normally.
        """
        cap = self.host.limits.memory_bytes
        if cap <= 0 or vm.closed or (vm.raw.memory_pages() + 1) * WASM_PAGE_SIZE <= cap:
            return False
        self.memory_cap_hits += 1
        self.crashed(vm, raw.GuestTrap(
            f"linear memory reached the cap of {cap // 2**20} MiB (wasm_memory_limit): "
            "memory.grow fails from here on", capped=True))
        return True

    def restart(self, reason: str, requested_by: str, mode: RestartMode = "cold",
                prepared: WarmStart | None = None) -> RestartRecord:
        """Replace the current generation with a fresh instance of the compiled module.

        `mode="warm"` replays the journal into the new instance first, so it starts with the
        old one's live cache (see `journal.py` and `replay.py`); when that cannot be done
        safely the restart runs cold and the record's `fallback` says why. `prepared` is a
        replay begun with `prepare_warm` (it is finished here, at once).
        Raises `RestartError` if the new instance cannot start; the old one keeps serving.
        """
        if mode not in RESTART_MODES:
            raise ValueError(f"restart mode must be 'cold' or 'warm', got {mode!r}")
        t0 = time.perf_counter()
        old = self.vm
        before = old.allocated_pages() * WASM_PAGE_SIZE if old is not None else 0
        generation_before = self.generation
        fallback: str | None = None
        replayed = 0
        new: Vm | None = None
        try:
            if mode == "warm":
                new, replayed, fallback = self._warm_vm(prepared)
            elif prepared is not None:
                prepared.abort()
            if new is None:
                new = self._new_vm()
        except FilterStartError as e:
            raise RestartError(f"restart of {self.id} failed, generation "
                               f"{generation_before} keeps serving: {e}") from e
        self.generation = new.generation
        ran: RestartMode = "warm" if mode == "warm" and fallback is None else "cold"
        if self.journal is not None:
            if ran == "warm":
                self.journal.carry_to(new.generation)
            else:
                self.journal.reset(new.generation)
        self.vm = new
        self.down_reason = ""
        if old is not None:
            self._retire(old)
        self.restarts += 1
        record = RestartRecord(
            self.id, self.tenant, self.host.clock.now_ns() / 1e9, reason, requested_by,
            generation_before, new.generation, before,
            new.allocated_pages() * WASM_PAGE_SIZE, time.perf_counter() - t0, ran, fallback,
            replayed,
        )
        if fallback is not None:
            logger.warning("warm restart of %s ran cold: %s", self.id, fallback)
        logger.info(
            "restarted %s (%s%s): generation %d -> %d (%s, by %s), allocated %d -> %d bytes",
            self.id, ran, f", {replayed} requests replayed" if ran == "warm" else "",
            generation_before, new.generation, escape(reason), escape(requested_by), before,
            record.allocated_bytes_after,
        )
        self.host.events.on_restart(record)
        self.host.schedule_changed()
        return record

    def prepare_warm(self) -> WarmStart:
        """Begin rebuilding the next generation from the journal; the current one keeps
        serving. Step it (`WarmStart.step`) between requests, then pass it to `restart`.
        May raise FilterStartError."""
        return WarmStart(self)

    def _warm_vm(self, prepared: WarmStart | None) -> tuple[Vm | None, int, str | None]:
        """A new VM with the journal replayed: (vm, requests replayed, None), or
        (None, 0, why not) when the restart must run cold."""
        if prepared is None or not prepared.current():
            if prepared is not None:
                prepared.abort()
            prepared = WarmStart(self)
        return prepared.finish()

    def journal_commit(self, entry: Entry) -> None:
        """A journaled stream closed: keep it, and if it belongs to a generation this one
        warm-started from, replay it here too (its effect reached only the old one)."""
        journal = self.journal
        if journal is None:
            return
        late = entry.generation != journal.generation
        if not journal.commit(entry, self.host.clock.now_ns()) or not late:
            return
        vm = self.vm
        if vm is None or vm.closed:
            return
        try:
            replay_into(vm, entry)
        except ReplayError as e:
            logger.warning("%s: a request of generation %d that finished after the warm "
                           "restart could not be replayed into generation %d: %s",
                           self.id, entry.generation, vm.generation, e)
        except raw.GuestTrap as e:
            self.crashed(vm, e)

    def _retire(self, vm: Vm) -> None:
        """Drop `vm` now if idle; otherwise let its streams finish first."""
        if vm.idle:
            vm.close()
        else:
            self.draining.append(vm)

    def release(self, vm: Vm) -> None:
        """Called when a stream of `vm` ended: drop a draining generation once idle."""
        if vm is not self.vm and vm in self.draining and vm.idle:
            self.draining.remove(vm)
            vm.close()

    def crashed(self, vm: Vm, error: raw.GuestTrap) -> None:
        """A generation trapped: fail its streams by policy, drop it, restart with back-off."""
        if vm.closed:
            return
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        kind = ("interrupted after its deadline" if error.interrupted
                else "reached its memory cap" if error.capped else "trapped")
        logger.error("filter %s generation %d %s: %s", self.id, vm.generation, kind, message)
        self.host.events.on_crash(self.id, vm.generation, message)
        vm.broken = message
        streams = [ctx.stream for ctx in vm.contexts.values()]
        vm.close()
        for stream in streams:
            stream.fail_pending(f"filter {kind}: {message}")
        if vm in self.draining:
            self.draining.remove(vm)
            return
        if vm is not self.vm:
            return
        self.vm = None
        self.host._down.add(self.id)
        self.host._due_now()
        now = self.host.clock.now_ns()
        self.host.module_crashed(now, f"{self.id} {kind}")
        self.crashes.append(now)
        window = int(self.host.limits.crash_window_s * 1e9)
        recent = sum(1 for t in self.crashes if now - t <= window)
        self.down_reason = f"generation {vm.generation} {kind}: {message}"
        if recent <= 1:
            self.retry_at_ns = now
        else:
            delay = min(self.host.limits.backoff_initial_s * 2 ** (recent - 2),
                        self.host.limits.backoff_max_s)
            self.retry_at_ns = now + int(delay * 1e9)
            logger.warning("filter %s crashed %d times within %.0f s; next start in %.1f s",
                           self.id, recent, self.host.limits.crash_window_s, delay)
        self.maybe_recover()

    def maybe_recover(self) -> None:
        """Start a new generation after a crash once its and the module's back-off passed."""
        if self.vm is not None:
            return
        now = self.host.clock.now_ns()
        if now < self.retry_at_ns or now < self.host.module_retry_at_ns:
            return
        before = self.generation
        try:
            self.vm = self._new_vm()
        except FilterStartError as e:
            self.crashes.append(self.host.clock.now_ns())
            self.retry_at_ns = self.host.clock.now_ns() + int(self.host.limits.backoff_max_s * 1e9)
            self.down_reason = f"restart failed: {e}"
            logger.error("filter %s could not restart: %s", self.id, e)
            return
        self.restarts += 1
        self.down_reason = ""
        if self.journal is not None:
            self.journal.reset(self.vm.generation)
        self.host.events.on_restart(RestartRecord(
            self.id, self.tenant, self.host.clock.now_ns() / 1e9, "crash", "host", before,
            self.vm.generation, 0, self.vm.allocated_pages() * WASM_PAGE_SIZE, 0.0,
        ))
        self.host.schedule_changed()

    def vms(self) -> list[Vm]:
        """Every live generation: the current one first."""
        return ([self.vm] if self.vm is not None else []) + self.draining


class WarmStart:
    """The next generation of an instance being rebuilt from its journal, step by step.

    Made by `FilterInstance.prepare_warm`. `step` replays a bounded number of events and picks
    up what the journal recorded meanwhile; `finish` (called by `restart`) replays the rest
    and hands over the VM. When the replay cannot be done safely, `fallback` says why.
    """

    def __init__(self, instance: FilterInstance) -> None:
        self.instance = instance
        self.fallback: str | None = None
        self.replay: Replay | None = None
        self.generation = instance.generation
        journal = instance.journal
        self.epoch = journal.epoch if journal is not None else -1
        self.seen = 0
        host = instance.host
        now = host.clock.now_ns()
        if journal is None:
            self.fallback = ("journaling is off for this host (no journal to replay)"
                             if host.journal_config is None else
                             "journaling has not started on this host (no journal to replay)")
        elif instance.vm is None:
            self.fallback = "no running generation to take the cache from"
        elif journal.overflowed is not None:
            self.fallback = journal.overflowed
        else:
            self.fallback = journal.incomplete(now)
        if self.fallback is not None or journal is None:
            return
        generation = instance.generation + 1

        def new_vm(services: ReplayServices) -> Vm:
            return Vm(host.module, services, instance.id, generation)

        entries = journal.replayable(now)
        self.seen = journal.seq
        try:
            self.replay = Replay(host, new_vm, entries, now)
        except ReplayError as e:
            self.fallback = str(e)

    def current(self) -> bool:
        """The instance has not restarted since, nor has its journal been reset."""
        j = self.instance.journal
        return (self.instance.generation == self.generation and j is not None
                and j.epoch == self.epoch)

    def _catch_up(self) -> None:
        j = self.instance.journal
        if self.replay is None or j is None:
            return
        if j.overflowed is not None:
            self.fallback = j.overflowed
        elif j.seq > self.seen:
            self.replay.add(j.since(self.seen))
            self.seen = j.seq

    def step(self, max_events: int) -> bool:
        """Replay up to `max_events` events; True when caught up with the journal (or
        failed: `fallback` says why)."""
        if self.replay is None or self.fallback is not None:
            return True
        if not self.current():
            self.fallback = "the instance restarted while its warm restart was being prepared"
            self.abort()
            return True
        try:
            self._catch_up()
            if self.fallback is not None:
                self.abort()
                return True
            return self.replay.step(max_events)
        except ReplayError as e:
            self.fallback = str(e)
            self.replay = None
            return True

    @property
    def backlog(self) -> int:
        """Events still to replay, counting what the journal recorded meanwhile."""
        j = self.instance.journal
        waiting = j.seq - self.seen if j is not None else 0
        return (self.replay.pending if self.replay is not None else 0) + waiting

    def finish(self) -> tuple[Vm | None, int, str | None]:
        """(vm, requests replayed, None), or (None, 0, why the restart must run cold)."""
        if self.replay is None or self.fallback is not None:
            self.abort()
            return None, 0, self.fallback
        try:
            self._catch_up()
            if self.fallback is not None:
                self.abort()
                return None, 0, self.fallback
            result = self.replay.finish(self.instance.host.clock.now_ns())
        except ReplayError as e:
            return None, 0, str(e)
        return result.vm, result.requests, None

    def abort(self) -> None:
        """Drop the VM being rebuilt."""
        if self.replay is not None:
            self.replay.abort()
            self.replay = None


# --------------------------------------------------------------------------------------------


class Host:
    """Runs one Proxy-Wasm module as many filter instances on one clock."""

    def __init__(
        self,
        module: FilterModule,
        dispatcher: Dispatcher,
        *,
        plugin_configuration: bytes = b"",
        vm_configuration: bytes = b"",
        clock: Clock | None = None,
        limits: Limits | None = None,
        fail_open: bool = False,
        events: HostEvents | None = None,
        plugin_name: str = "wasm_auth",
        root_id: str = "",
        vm_id: str = "",
        seed: int | None = None,
        journal: JournalConfig | None = None,
        journaling: bool = True,
    ) -> None:
        self.module = module
        self.dispatcher = dispatcher
        self.plugin_configuration = plugin_configuration
        self.vm_configuration = vm_configuration
        self.clock: Clock = clock or WallClock()
        self.limits = limits or Limits()
        self.fail_open = fail_open
        self.events = events or HostEvents()
        self.plugin_name = plugin_name
        self.journal_config = journal
        """Journal requests for warm restarts (None: every restart runs cold)."""
        self.journaling = journal is not None and journaling
        """Instances journal now; else not until `start_journaling` (journaling costs time
        per request, so it waits until a warm restart is wanted)."""
        self.root_id = root_id
        """The root id (Envoy's `root_id`): which root context of the module serves; SDKs read
        it as the property `plugin_root_id`."""
        self.vm_id = vm_id
        self.instances: dict[str, FilterInstance] = {}
        self.shared_data: dict[bytes, tuple[bytes, int]] = {}
        self.shared_queues = SharedQueues()
        self._random = random.Random(seed) if seed is not None else None
        self._timers: list[tuple[int, int, Vm, int]] = []  # (due, seq, vm, call id or 0=tick)
        self._seq = itertools.count()
        self._busy = 0
        self._deliveries: deque[Callable[[], None]] = deque()
        self._down: set[str] = set()
        self.module_crashes: deque[int] = deque(maxlen=64)
        """When instances of the module crashed (host clock, ns)."""
        self.module_recent_crashes = 0
        self.module_retry_at_ns = 0
        """Until then no new instance starts and no crashed one restarts (module back-off)."""
        self._next_stall_check = 0
        self.on_due: Callable[[int], None] | None = None
        """Told when something new falls due (host clock, ns): a timer, a crashed instance's
        retry, a delivery. A live driver sleeps until `next_event_ns` and wakes earlier when
        this names an earlier time; a simulation steps `next_event_ns` and leaves it None."""

    # ---- instances ----

    def instance(self, instance_id: str, tenant: str | None = None) -> FilterInstance:
        """The instance `instance_id`, started on first use (may raise FilterStartError)."""
        inst = self.instances.get(instance_id)
        if inst is None:
            if self.clock.now_ns() < self.module_retry_at_ns:
                raise FilterStartError(
                    f"the filter is backing off after {self.module_recent_crashes} crashes of "
                    f"its instances within {self.limits.crash_window_s:.0f} s; no new instance "
                    f"starts for {(self.module_retry_at_ns - self.clock.now_ns()) / 1e9:.1f} s")
            inst = FilterInstance(self, instance_id, tenant or instance_id)
            self.instances[instance_id] = inst
            self.schedule_changed()
        return inst

    def start_journaling(self) -> bool:
        """Journal every instance's requests from now on, for warm restarts.

        An instance whose current generation has made no outbound call and has no stream open
        loses nothing (the journal keeps only requests that called out, and those that depend
        on them); for another, the journal may lack older requests until a window has passed
        or the instance restarts, and a warm restart runs cold meanwhile
        (`Journal.incomplete`). False when the host has no journal configuration.
        """
        config = self.journal_config
        if config is None:
            return False
        if self.journaling:
            return True
        self.journaling = True
        now = self.clock.now_ns()
        late = 0
        for inst in self.instances.values():
            if inst.journal is None:
                vm = inst.vm
                partial = vm is not None and (vm.outbound > 0 or bool(vm.contexts))
                late += partial
                inst.journal = Journal(config, inst.generation, now if partial else None)
        logger.info("journaling requests for warm restarts from now on%s",
                    f" ({late} instances have served requests the journal did not see: their "
                    f"warm restarts run cold for {config.window_s:g} s or until they restart)"
                    if late else "")
        return True

    def module_crashed(self, now: int, reason: str) -> None:
        """One of the module's instances crashed: back the whole module off if they repeat.

        Back-off per instance alone lets a filter that loops on some requests cost a deadline
        per request when each request makes a new instance (a new Host each time); counted
        across instances, repeated crashes stop new instances and restarts for a while, so the
        event loop serves the other tenants' healthy instances.
        """
        self.module_crashes.append(now)
        window = int(self.limits.crash_window_s * 1e9)
        recent = self.module_recent_crashes = sum(
            1 for t in self.module_crashes if now - t <= window)
        threshold = self.limits.module_crash_threshold
        if recent < threshold:
            return
        delay = min(self.limits.backoff_initial_s * 2 ** (recent - threshold),
                    self.limits.backoff_max_s)
        self.module_retry_at_ns = max(self.module_retry_at_ns, now + int(delay * 1e9))
        logger.warning("the filter crashed %d times within %.0f s across its instances "
                       "(last: %s); no new instance starts for %.1f s", recent,
                       self.limits.crash_window_s, reason, delay)

    def restart(self, instance_id: str, reason: str, requested_by: str,
                mode: RestartMode = "cold", prepared: WarmStart | None = None
                ) -> RestartRecord:
        """Restart an instance by id, `cold` or `warm` (KeyError if unknown)."""
        return self.instances[instance_id].restart(reason, requested_by, mode, prepared)

    def evict(self, instance_id: str) -> None:
        """Drop an instance and its memory (its streams should be over; KeyError if unknown).

        Its next request starts a new instance at generation 0, as for a new key.
        """
        inst = self.instances.pop(instance_id)
        self._down.discard(instance_id)
        for vm in inst.vms():
            vm.close()
        inst.vm = None
        inst.draining.clear()

    async def restart_in_steps(self, instance_id: str, reason: str, requested_by: str,
                               mode: RestartMode = "warm", step_events: int = 500,
                               max_rounds: int = 10_000) -> RestartRecord:
        """Restart as `restart` does, but replay a warm restart's journal `step_events` events
        at a time, yielding to the event loop between steps, while the current generation
        keeps serving: a request waits for one step at most, never for the whole replay.

        What the journal records meanwhile is replayed too. Once caught up (or after
        `max_rounds` steps, should traffic outpace the replay) the rest is replayed and the
        generations swap without yielding, so no request is lost or served by neither.
        KeyError if the instance is unknown or goes away meanwhile.
        """
        if mode != "warm":
            return self.restart(instance_id, reason, requested_by, mode)
        inst = self.instances[instance_id]
        try:
            prepared = inst.prepare_warm()
        except FilterStartError as e:
            raise RestartError(f"restart of {instance_id} failed, generation "
                               f"{inst.generation} keeps serving: {e}") from e
        rounds = 0
        while prepared.fallback is None and rounds < max_rounds and not (
                prepared.step(step_events) and prepared.backlog <= step_events):
            rounds += 1
            await asyncio.sleep(0)
        if self.instances.get(instance_id) is not inst:
            prepared.abort()
            raise KeyError(instance_id)
        return inst.restart(reason, requested_by, mode, prepared)

    def close(self) -> None:
        """Drop every instance."""
        for inst in self.instances.values():
            for vm in inst.vms():
                vm.close()
        self.instances.clear()

    def random_bytes(self, n: int) -> bytes:
        """Randomness for the guest: seeded in simulations, os.urandom otherwise."""
        return self._random.randbytes(n) if self._random is not None else os.urandom(n)

    # ---- outbound calls ----

    def start_call(
        self, vm: Vm, call: PendingCall, headers: Pairs, body: bytes, trailers: Pairs
    ) -> int:
        """Hand a call made by `vm` to the dispatcher; schedule its deadline.

        Returns a `Status`: BAD_ARGUMENT for an unknown cluster, INTERNAL_FAILURE if the
        dispatcher cannot start it, OK once started.
        """
        if not self.dispatcher.has_cluster(call.cluster):
            guest_logger.warning("[%s] proxy_http_call to unknown cluster %r", vm.instance_id,
                                 call.cluster)
            return Status.BAD_ARGUMENT
        http_call = HttpCall(call.cluster, headers, body, trailers,
                             (call.deadline_ns - call.started_ns) // 1_000_000)

        def deliver(response: HttpCallResponse | None) -> None:
            if self._busy:
                self._deliveries.append(lambda: self._complete_call(vm, call.id, response))
                self._due_now()
            else:
                self._complete_call(vm, call.id, response)

        try:
            call.cancel = self.dispatcher.start(http_call, deliver)
        except Exception as e:
            logger.error("outbound call to cluster %s could not start: %s", call.cluster, e)
            return Status.INTERNAL_FAILURE
        self._push_timer(call.deadline_ns, vm, call.id)
        vm.refetch.started(call.id, call_key(call.cluster, headers, body, trailers),
                           call.started_ns / 1e9)
        ctx = vm.contexts.get(call.context_id)
        if ctx is not None and ctx.stream.entry is not None:
            ctx.stream.entry.add_call(call.id, call.cluster, headers, body, trailers)
        return _OK

    def cancel_calls(self, vm: Vm, call_ids: list[int]) -> None:
        """Cancel those of `vm`'s calls `call_ids` whose stream context is gone (orphaned) and
        that the dispatcher can stop: each is recorded now, `cancelled`, with no status (it went
        out, so the manager counts it). A call whose context lives on (its `proxy_on_done`
        deferred the delete) runs on, as does one the dispatcher cannot stop (recorded when it
        ends)."""
        for call_id in call_ids:
            call = vm.calls.get(call_id)
            if call is not None and call.orphaned and call.cancel is not None:
                call.cancel()
                self._complete_call(vm, call_id, None, cancelled=True)

    def _drain_deliveries(self) -> None:
        while self._deliveries and not self._busy:
            self._deliveries.popleft()()

    def _complete_call(
        self, vm: Vm, call_id: int, response: HttpCallResponse | None, timed_out: bool = False,
        cancelled: bool = False,
    ) -> None:
        inst = self.instances.get(vm.instance_id)
        now = self.clock.now_ns()
        call = vm.calls.pop(call_id, None)
        if call is None:
            logger.debug("late or unknown response for call %d of %s gen %d ignored",
                         call_id, vm.instance_id, vm.generation)
            return
        outcome: CallOutcome = (
            "cancelled" if cancelled else "timeout" if timed_out
            else "error" if response is None else "ok"
        )
        now_s = now / 1e9
        self.events.on_auth_call(AuthCallRecord(
            vm.instance_id, inst.tenant if inst else vm.instance_id, vm.generation, now_s,
            call.cluster, call.path, response.status if response is not None else None, outcome,
            (now - call.started_ns) / 1e9,
        ))
        ok = response is not None and 200 <= response.status < 300
        vm.refetch.answered(call_id, now_s, ok)
        if call.orphaned:  # its stream is gone: recorded above, never delivered
            self.context_released(vm)  # the generation may be idle now
            return
        ctx = vm.contexts.get(call.context_id)
        if ctx is not None:
            ctx.calls.discard(call_id)
            if ctx.stream.entry is not None:
                ctx.stream.entry.answer(call_id, now, response)
            if not ok:
                ctx.stream.failed_calls += 1
        if vm.closed:
            return
        if response is None:
            status, headers, body, trailers = 0, [], b"", []
        else:
            status = response.status
            headers = [(b":status", str(status).encode()), *response.headers]
            body, trailers = response.body, response.trailers
        self._busy += 1
        try:
            vm.on_http_call_response(call, status, headers, body, trailers)
            if inst is not None and inst.capped(vm):
                return
        except raw.GuestTrap as e:
            if inst is not None:
                inst.crashed(vm, e)
            return
        finally:
            self._busy -= 1
        self._settle(vm)
        if self._deliveries:
            self._drain_deliveries()

    def _settle(self, vm: Vm) -> None:
        """After a callback, turn the decisions the filter made into stream decisions."""
        if vm.contexts:
            for ctx in list(vm.contexts.values()):
                stream = ctx.stream
                if stream.waiting:
                    stream.settle()
        self.context_released(vm)

    def queue_ready(self, queue_id: int) -> None:
        """Tell every live VM that registered the queue, once no guest code runs."""
        queue = self.shared_queues.get(queue_id)
        if queue is None:
            return
        for vm in queue.subscribers:
            if not vm.closed:
                self._deliveries.append(functools.partial(self._queue_ready, vm, queue_id))
                self._due_now()

    def _queue_ready(self, vm: Vm, queue_id: int) -> None:
        if vm.closed:
            return
        self._busy += 1
        try:
            vm.on_queue_ready(queue_id)
        except raw.GuestTrap as e:
            inst = self.instances.get(vm.instance_id)
            if inst is not None:
                inst.crashed(vm, e)
            return
        finally:
            self._busy -= 1
        self._settle(vm)

    def context_released(self, vm: Vm) -> None:
        """A stream or call of `vm` ended: drop a draining generation once idle."""
        inst = self.instances.get(vm.instance_id)
        if inst is not None and vm is not inst.vm:
            inst.release(vm)

    # ---- timers ----

    def schedule_changed(self) -> None:
        """A tick period changed or an instance started: (re)arm tick timers."""
        for inst in self.instances.values():
            vm = inst.vm
            if vm is not None and vm.tick_period_ns and not vm.tick_armed:
                vm.tick_armed = True
                self._push_timer(vm.next_tick_ns, vm, 0)

    def _push_timer(self, due_ns: int, vm: Vm, call_id: int) -> None:
        """Schedule a tick of `vm` (call id 0) or the deadline of its call `call_id`."""
        heapq.heappush(self._timers, (due_ns, next(self._seq), vm, call_id))
        if self.on_due is not None:
            self.on_due(due_ns)

    def _due_now(self) -> None:
        """Something waits for the next `poll` (a delivery, a crashed instance's retry)."""
        if self.on_due is not None:
            self.on_due(self.clock.now_ns())

    def next_event_ns(self) -> int | None:
        """When the next timer, delivery or crash retry is due (None: nothing waits); what a
        driver sleeps until before the next `poll`."""
        if self._deliveries and not self._busy:
            return self.clock.now_ns()
        best = self._timers[0][0] if self._timers else None
        due = self.dispatcher.next_due_ns()
        if due is not None and (best is None or due < best):
            best = due
        if not self._down:
            return best
        for instance_id in self._down:
            inst = self.instances.get(instance_id)
            if inst is not None:
                retry = max(inst.retry_at_ns, self.module_retry_at_ns)
                if best is None or retry < best:
                    best = retry
        return best

    def poll(self) -> None:
        """Run everything due by now: deliveries, call deadlines, ticks, crash recovery."""
        now = self.clock.now_ns()
        self.dispatcher.poll(now)
        if self._deliveries:
            self._drain_deliveries()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, vm, call_id = heapq.heappop(timers)
            if vm.closed:
                continue
            if call_id:
                if call_id in vm.calls:
                    self._complete_call(vm, call_id, None, timed_out=True)
                continue
            self._tick(vm, now)
        if self._down:
            for instance_id in list(self._down):
                inst = self.instances.get(instance_id)
                if inst is None or inst.vm is not None:
                    self._down.discard(instance_id)
                else:
                    inst.maybe_recover()
        if now >= self._next_stall_check:
            self._next_stall_check = now + 1_000_000_000
            self._stall_check(now)

    def _tick(self, vm: Vm, now: int) -> None:
        inst = self.instances.get(vm.instance_id)
        if inst is None or vm is not inst.vm:
            vm.tick_armed = False
            return  # draining generations only finish their streams
        self._busy += 1
        try:
            vm.on_tick()
            if inst.capped(vm):
                return
        except raw.GuestTrap as e:
            inst.crashed(vm, e)
            return
        finally:
            self._busy -= 1
        if vm.contexts:  # else nothing to settle, and `vm` is current: nothing to release
            self._settle(vm)
        if self._deliveries:
            self._drain_deliveries()
        if vm.tick_period_ns and not vm.closed:
            vm.next_tick_ns = now + vm.tick_period_ns
            self._push_timer(vm.next_tick_ns, vm, 0)
        else:
            vm.tick_armed = False

    def _stall_check(self, now: int) -> None:
        """Fail streams the filter paused with nothing left to wake them."""
        limit = int(self.limits.stream_timeout_s * 1e9)
        for inst in self.instances.values():
            vm = inst.vm
            if (vm is None or not vm.contexts) and not inst.draining:
                continue  # nothing open (the usual case between requests)
            for vm in inst.vms():
                for ctx in list(vm.contexts.values()):
                    s = ctx.stream
                    if s.waiting and not ctx.calls and now - s.phase_ns > limit:
                        s.fail_pending("the filter paused the stream and never resumed it")

    def observe(self) -> list[Observation]:
        """Observations of every instance."""
        return [inst.observe() for inst in self.instances.values()]
