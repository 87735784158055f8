"""Replay a trace through the real filter under the real host, in virtual time.

The same `FilterModule`, `Host` and Proxy-Wasm code that serve live traffic in mitmproxy run
here, but on a `VirtualClock` that jumps from event to event, with an in-process auth server
answering the filter's outbound calls after a configurable latency. A day of traffic takes
seconds. Every `sample_interval` the simulation records what the live addon records: one
sample per instance (allocated pages and bytes, cumulative requests and outbound calls in the
generation, generation, and the filter's ground-truth gauges).

A `controller` (for example a restart policy) is called after every sampling round with the
new samples and may return instance ids to restart, exactly as the manager daemon would
through the admin endpoint. Restarts run in `SimConfig.restart_mode`: `warm` journals every
instance's requests and replays them into the new generation (`addons.proxywasm.replay`), the
same host code as the live proxy's warm restart.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from addons.instance_bounds import parse_instance_key
from addons.proxywasm import (
    WASM_PAGE_SIZE,
    AuthCallRecord,
    Decision,
    FilterModule,
    Host,
    HostEvents,
    HttpCall,
    HttpCallResponse,
    InProcessDispatcher,
    Limits,
    RestartRecord,
    Stream,
    VirtualClock,
)
from addons.proxywasm.host import RESTART_MODES, RestartMode
from addons.proxywasm.journal import JournalConfig, window_from_config
from addons.telemetry import records
from scenarios.trace import Event, Trace

logger = logging.getLogger(__name__)

DEFAULT_FILTER = Path(__file__).resolve().parent.parent / "filters" / "auth_cache.wasm"
LIVE_ENTRIES = records.LIVE_ENTRIES
LIVE_BYTES = records.LIVE_BYTES

SAMPLE_COLUMNS = list(records.SAMPLE_FIELDS)
"""The `samples` documents' fields, as the live addon writes them (addons.telemetry.records)."""
REQUEST_COLUMNS = [*records.REQUEST_FIELDS, "kind"]
"""The `requests` documents' fields, plus the trace event's kind (request or logout)."""
PROXY_ID = "simulation"
"""The simulated proxy's name: the `proxy` field of every document."""

Restart = str | tuple[str, RestartMode | None]
"""An instance id to restart in `SimConfig.restart_mode`, or (id, mode), mode `cold`, `warm` or
None (the config's)."""
Controller = Callable[[Mapping[str, Any], float], Iterable[Restart]]
"""Called with the newest samples (:func:`sample_columns`) and the time; returns the restarts to
make."""


@dataclass(frozen=True)
class SimConfig:
    """How to run a simulation."""

    filter_path: Path = DEFAULT_FILTER
    plugin_configuration: str = ""
    """The filter's JSON configuration (empty: its defaults, TTL 600 s, 1 KiB entries)."""
    sample_interval: float = 1.0
    auth_latency: float = 0.005
    instance_key: str = "host"
    """`host`: one instance per upstream host (the paper's one filter per site); `single`."""
    memory_limit_mib: int = 256
    seed: int = 0
    decision_interval: float = 30.0
    """Seconds of host clock between controller passes (the manager daemon's --interval)."""
    deadline_ms: float = 10_000.0
    """Epoch deadline of a guest call, in wall-clock time. Generous on purpose: it still stops a
    runaway filter, but a loaded machine's scheduling stall must not look like a crash (and a
    crash restart, dropping the cache) in a virtual-time experiment."""
    restart_mode: RestartMode = "cold"
    """How the controller's restarts run: `cold`, or `warm` (the journal replayed)."""
    journal_window_s: float = 0.0
    """Warm only: seconds of requests journaled; 0: the filter configuration's TTL."""
    journal_limit_mib: int = 256
    """Warm only: the journal's memory cap per instance (past it a warm restart runs cold)."""
    request_log: bool = True
    """Keep one row per request (`SimResult.requests`); experiments only need the counts
    (`SimResult.request_count`, the samples' hits and misses), and skip it."""
    controller_columns: tuple[str, ...] | None = None
    """The sample columns the controller's frame holds (None: all of :data:`SAMPLE_COLUMNS`).
    The experiments give the manager only what it reads: a frame of fewer columns costs less
    to build, once a pass."""

    def __post_init__(self) -> None:
        if self.restart_mode not in RESTART_MODES:
            raise ValueError(f"restart_mode must be 'cold' or 'warm', got {self.restart_mode!r}")

    def journal(self) -> JournalConfig | None:
        """The host's journal: only when restarts run warm (it costs time per request)."""
        if self.restart_mode != "warm":
            return None
        return JournalConfig(
            window_from_config(self.plugin_configuration.encode(), self.journal_window_s),
            self.journal_limit_mib * 2**20)


class AuthServer:
    """The auth server in process: a token is valid from its login until its logout."""

    def __init__(self) -> None:
        self.valid: set[bytes] = set()
        self.verified = 0

    def login(self, token: str) -> None:
        """Issue `token`."""
        self.valid.add(b"Bearer " + token.encode())

    def logout(self, token: str) -> None:
        """Revoke `token`."""
        self.valid.discard(b"Bearer " + token.encode())

    def __call__(self, call: HttpCall) -> HttpCallResponse:
        """Answer `GET /verify`: 200 for a valid token, 401 otherwise."""
        self.verified += 1
        ok = call.header(b"authorization") in self.valid
        return HttpCallResponse(200 if ok else 401, [(b"content-length", b"0")])


@dataclass
class SimResult:
    """What a simulation recorded."""

    samples: pd.DataFrame
    requests: pd.DataFrame
    restarts: pd.DataFrame
    verify_requests: int
    """Requests the auth server answered on /verify (the summaries' `auth_requests` is another
    count: the filters' outbound calls, from the samples)."""
    start: float
    """Virtual time of the trace's start, seconds since the epoch."""
    meta: dict[str, Any] = field(default_factory=dict)
    auth_calls: pd.DataFrame = field(default_factory=pd.DataFrame)
    """The `auth_calls` documents, one row each."""
    request_count: int = 0
    """Requests the filter decided (rows of `requests` when `SimConfig.request_log`)."""


_ZERO = records.NO_COUNTS
_METHODS = {m: m.encode() for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "PATCH")}
_SLOT = records.COUNTED


def sample_columns(rows: Sequence[tuple[Any, ...]],
                   columns: Sequence[str] | None = None) -> dict[str, Any]:
    """Sample rows (:data:`SAMPLE_COLUMNS` order) as columns by name (only `columns`, in their
    order, when given): numeric ones as numpy arrays, the others as tuples. What a controller
    gets once a pass; a frame of them is :func:`sample_frame`."""

    def column(values: tuple[Any, ...]) -> Any:
        array = np.array(values)
        return array if array.dtype.kind in "if" else values  # pandas infers the others

    transposed = list(zip(*rows, strict=True))
    if transposed and len(transposed) != len(SAMPLE_COLUMNS):
        raise ValueError(f"sample rows of {len(transposed)} fields, not {len(SAMPLE_COLUMNS)}")
    names = SAMPLE_COLUMNS if columns is None else columns
    return {name: column(transposed[_SAMPLE_INDEX[name]]) for name in names}


def sample_frame(rows: Sequence[tuple[Any, ...]],
                 columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Sample rows as a frame, the same pandas would make from the rows (with only `columns`,
    in their order, when given). Built column by column, the numeric columns through numpy:
    pandas inferring every column from rows costs three times as much."""
    return pd.DataFrame(sample_columns(rows, columns), copy=False)


_SAMPLE_INDEX = {name: i for i, name in enumerate(SAMPLE_COLUMNS)}


class _Recorder(HostEvents):
    def __init__(self, proxy: str) -> None:
        self.proxy = proxy
        self.restarts: list[dict[str, Any]] = []
        self.auth_calls: list[dict[str, Any]] = []

    def on_restart(self, record: RestartRecord) -> None:
        self.restarts.append(records.restart(self.proxy, record))

    def on_auth_call(self, record: AuthCallRecord) -> None:
        self.auth_calls.append(records.auth_call(self.proxy, record))


class Simulation:
    """One run of a trace through a fresh host on a virtual clock."""

    def __init__(self, config: SimConfig, module: FilterModule | None = None) -> None:
        self.config = config
        self.clock = VirtualClock()
        self.start_ns = self.clock.now_ns()
        self.auth = AuthServer()
        self.recorder = _Recorder(PROXY_ID)
        self.dispatcher = InProcessDispatcher(
            self.auth, self.clock.now_ns, latency_s=config.auth_latency
        )
        self.host = Host(
            module or FilterModule.from_file(config.filter_path),
            self.dispatcher,
            plugin_configuration=config.plugin_configuration.encode(),
            clock=self.clock,
            limits=Limits(memory_bytes=config.memory_limit_mib * 2**20,
                          deadline_ms=config.deadline_ms),
            events=self.recorder,
            seed=config.seed,
            journal=config.journal(),
        )
        self.interval_ns = int(config.sample_interval * 1e9)
        self.next_sample_ns = self.start_ns
        self.decision_ns = int(config.decision_interval * 1e9)
        self.next_decision_ns = self.start_ns + self.decision_ns
        self.unseen = 0  # index of the first sample the controller has not seen
        self.samples: list[tuple[Any, ...]] = []
        self.requests: list[tuple[Any, ...]] = []
        self.request_count = 0
        self.counts: dict[str, list[int]] = {}  # instance -> hits, misses, denied, errors
        self._hosts: dict[str, tuple[str, bytes]] = {}  # event host -> instance id, :authority
        self._tokens: dict[str, tuple[bytes, str | None]] = {}  # authorization header, hash
        self.proxy = PROXY_ID

    # ---- time ----

    def advance_to(self, t_ns: int, controller: Controller | None = None) -> None:
        """Run timers and sampling rounds up to `t_ns`, in order, then stop the clock there."""
        clock, host = self.clock, self.host
        next_event_ns, poll, now_ns, set_ns = (host.next_event_ns, host.poll, clock.now_ns,
                                               clock.set_ns)
        while True:  # a tick, a delivery or a sample at a time (once a second or more)
            due = next_event_ns()
            step = self.next_sample_ns
            if due is not None and due < step:
                step = due
            if step > t_ns:
                break
            now = now_ns()
            set_ns(step if step > now else now)
            poll()
            if now_ns() >= self.next_sample_ns:
                self._sample(controller)
                self.next_sample_ns += self.interval_ns
        now = now_ns()
        set_ns(t_ns if t_ns > now else now)

    def _sample(self, controller: Controller | None) -> None:
        now_ns = self.clock.now_ns()
        now = now_ns / 1e9
        sample_row, proxy = records.sample_row, self.proxy
        for inst in self.host.instances.values():
            o = inst.observe()
            self.samples.append(sample_row(proxy, now, o, self.counts.pop(o.id, _ZERO)))
        if controller is not None and now_ns >= self.next_decision_ns:
            self.next_decision_ns += self.decision_ns
            if len(self.samples) > self.unseen:
                new = sample_columns(self.samples[self.unseen:], self.config.controller_columns)
                self.unseen = len(self.samples)
                for restart in controller(new, now):
                    instance_id, mode = (restart, None) if isinstance(restart, str) else restart
                    self.host.restart(instance_id, "policy", "simulation",
                                      mode or self.config.restart_mode)

    # ---- events ----

    def instance_id(self, event: Event) -> str:
        """Which filter instance serves `event`: the live addon's rule (the host without its
        port, or one for all)."""
        return parse_instance_key((event.host or "default").encode(), self.config.instance_key)

    def handle(self, event: Event) -> None:
        """Apply one trace event at the current virtual time."""
        kind = event.kind
        if kind == "login":
            self.auth.login(event.token)
            return
        known = self._hosts.get(event.host)
        if known is None:  # once per host, not per request
            known = self._hosts[event.host] = (self.instance_id(event),
                                               (event.host or "default").encode())
        instance_id, authority = known
        stream = self.host.instance(instance_id).stream()
        token = self._tokens.get(event.token)
        if token is None:  # a token's header and hash, made once per token, not per request
            authorization = b"Bearer " + event.token.encode()  # (the hash only for the rows)
            token = self._tokens[event.token] = (
                authorization,
                records.token_hash(authorization) if self.config.request_log else None)
        method, path = event.method or "GET", event.path or "/"
        headers = [
            (b":method", _METHODS.get(method) or method.encode()),
            (b":path", path.encode()),
            (b":authority", authority),
            (b"authorization", token[0]),
        ]
        t = self.clock.now_ns() / 1e9
        decision = stream.request_headers(headers, lowered=True)
        if decision is None:  # paused on an auth call: recorded when the filter decides
            stream.on_decision = functools.partial(self._record, stream, t, kind, method, path,
                                                   token[1])
        else:
            self._record(stream, t, kind, method, path, token[1], decision)
        if kind == "logout":
            self.auth.logout(event.token)

    def _record(self, stream: Stream, t: float, kind: str, method: str, path: str,
                hashed: str | None, decision: Decision) -> None:
        """Count the request's decision (and keep its row, see `SimConfig.request_log`), then
        end the stream."""
        verdict = records.verdict(decision, True, logout=kind == "logout")
        inst = stream.instance
        self.request_count += 1
        if self.config.request_log:
            self.requests.append((*records.request_row(
                self.proxy, t, inst.id, inst.tenant, decision, verdict, method, path, 0.0,
                hashed, forwarded_status=200), kind))
        slot = _SLOT.get(verdict)
        if slot is not None:
            c = self.counts.get(inst.id)
            if c is None:
                c = self.counts[inst.id] = [0, 0, 0, 0]
            c[slot] += 1
        stream.close()

    def run(self, trace: Trace, controller: Controller | None = None,
            progress: bool = False) -> SimResult:
        """Replay every event of `trace`, then let pending work finish (one TTL at most)."""
        events: Iterable[Event] = trace
        if progress:
            from tqdm import tqdm

            events = tqdm(trace, total=len(trace), unit="ev", desc=trace.meta.name or "trace",
                          mininterval=0.5)
        start = self.start_ns
        for event in events:
            self.advance_to(start + int(event.time * 1e9), controller)
            self.handle(event)
        # One more sampling round after the last event shows where memory settles.
        self.advance_to(self.clock.now_ns() + self.interval_ns, controller)
        return self.result()

    def result(self) -> SimResult:
        """The recorded frames."""
        restarts = pd.DataFrame(self.recorder.restarts, columns=list(records.RESTART_FIELDS))
        return SimResult(
            samples=pd.DataFrame(self.samples, columns=SAMPLE_COLUMNS),
            requests=pd.DataFrame(self.requests, columns=REQUEST_COLUMNS),
            restarts=restarts,
            auth_calls=pd.DataFrame(self.recorder.auth_calls,
                                    columns=list(records.AUTH_CALL_FIELDS)),
            verify_requests=self.auth.verified,
            start=self.start_ns / 1e9,
            request_count=self.request_count,
        )


def simulate(trace: Trace, config: SimConfig | None = None, controller: Controller | None = None,
             progress: bool = False) -> SimResult:
    """Run `trace` in virtual time and return what was recorded."""
    return Simulation(config or SimConfig()).run(trace, controller, progress)


__all__ = ["WASM_PAGE_SIZE", "AuthServer", "SimConfig", "SimResult", "Simulation", "simulate"]
