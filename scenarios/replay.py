"""Live replay: send a trace through a running proxy, with real tokens from the auth server.

For each event, in trace order (``python -m scenarios replay``, :func:`replay`):

- ``login``: ``POST /login {"user": …}`` at the auth server (directly, not through the proxy);
  the real token it returns stands for the event's token label until the session's logout.
- ``request``: ``method path`` to the proxy with ``Host: <event.host>`` (the proxy runs in
  reverse mode and the addon keys filter instances by Host) and ``Authorization: Bearer <real
  token>``.
- ``logout``: the same for the logout request (the filter evicts the token), then ``POST
  /logout`` at the auth server.

Timing: an event at trace time ``t`` is due at ``start + t / speed``; with ``fast`` every event is
due at once. Either way events are dispatched in trace order, at most ``concurrency`` exchanges
are in flight (a semaphore), and each session keeps its order: its requests wait until its
login has completed, its logout until the login and all of its earlier requests have completed.
*Lag* is how late a request started compared with its due time. Requests of one session may
overlap when their due times are closer than their latency, as a browser's would.

Transport errors (refused connections, timeouts) are counted in the summary as
``error:<ExceptionName>``; a session whose login failed has its requests counted as ``skipped``.
Before the first event both servers must accept connections, else :class:`ScenarioError`.

HTTP client: aiohttp's ``ClientSession``, one keep-alive pool of ``concurrency`` connections per
server, no cookie jar (sessions must not leak cookies into each other), no proxy from the
environment. httpx was the first choice, but its connection pool costs O(connections) per
request: measured here with 64 connections it tops out at ~340 req/s on a core and fell behind
a 500 req/s schedule (0.9 s lag), where aiohttp sends ~3,000 req/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from tqdm import tqdm
from yarl import URL

from scenarios.trace import Event, ScenarioError, Trace

PERCENTILES: Final = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
SKIPPED: Final = "skipped"


@dataclass(frozen=True)
class ReplayConfig:
    """How to replay: where to send, how fast, how many exchanges in flight."""

    proxy: str = "http://127.0.0.1:8080"
    auth: str = "http://127.0.0.1:8090"
    speed: float = 1.0  # trace seconds per wall-clock second
    fast: bool = False  # ignore the timing: every event is due at once (order still holds)
    concurrency: int = 64
    timeout: float = 10.0  # seconds per exchange (connect, read, write, pool)
    auth_logout: bool = True  # also POST /logout at the auth server after a logout event
    progress: bool = False  # a tqdm bar on stderr
    keep_records: bool = False  # keep one Record per exchange in the summary (tests, analysis)

    def __post_init__(self) -> None:
        for name in ("proxy", "auth"):
            url = getattr(self, name)
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 (raises on a port out of range or not a number)
            except ValueError as e:
                raise ScenarioError(f"--{name}: {url!r} is not an http(s)://host:port URL: "
                                    f"{e}") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ScenarioError(f"--{name}: {url!r} is not an http(s)://host:port URL")
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise ScenarioError(f"--speed must be a positive number, got {self.speed}")
        if self.concurrency < 1:
            raise ScenarioError(f"--concurrency must be >= 1, got {self.concurrency}")
        if not self.timeout > 0:
            raise ScenarioError(f"--timeout must be > 0, got {self.timeout}")


@dataclass(frozen=True, slots=True)
class Record:
    """One exchange: ``kind`` is login, request, logout (proxy) or auth-logout.

    Times are seconds since the replay's start; ``due`` is the event's scheduled time (0 with
    ``fast``); ``status`` is the HTTP status, ``error:<Exception>`` or ``skipped``.
    """

    index: int
    kind: str
    user: str
    token: str
    due: float
    start: float
    end: float
    status: str


@dataclass
class ReplaySummary:
    """What a replay did. ``sent``, ``status`` and ``latency_ms`` are about proxy traffic
    (request and logout events); ``auth_status`` counts the auth server's answers as
    ``"login 200"``, ``"logout 200"``…; ``rate`` is proxy requests per wall-clock second."""

    events: int
    sent: int
    status: dict[str, int]
    errors: int
    latency_ms: dict[str, float]
    duration_s: float
    rate: float
    max_lag_s: float | None  # None with fast
    logins: int
    auth_status: dict[str, int]
    speed: float | None  # None with fast
    target_rate: float | None  # proxy requests per second the schedule asks for
    records: list[Record] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["records"]
        return out

    def format(self) -> str:
        """A short human-readable table."""
        lat = self.latency_ms
        rows = [
            ("events", f"{self.events} ({self.logins} logins)"),
            ("sent", f"{self.sent} through the proxy"),
            ("status", _counts(self.status) or "-"),
            ("auth server", _counts(self.auth_status) or "-"),
            ("latency ms", " ".join(f"{k} {v:.1f}" for k, v in lat.items()) if lat else "-"),
            ("duration", f"{self.duration_s:.2f} s"),
            ("rate", f"{self.rate:.1f} req/s"
             + (f" (schedule: {self.target_rate:.1f})" if self.target_rate else "")),
            ("max lag", "- (fast)" if self.max_lag_s is None else f"{self.max_lag_s:.3f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items()))


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 (nearest rank) and max of ``values``; empty for no values."""
    if not values:
        return {}
    s = sorted(values)
    out = {name: s[max(0, math.ceil(q * len(s)) - 1)] for name, q in PERCENTILES}
    out["max"] = s[-1]
    return out


def target_rate(trace: Trace, speed: float) -> float | None:
    """Proxy requests per second that the schedule asks for (None for a zero-length trace)."""
    n = sum(1 for e in trace.events if e.kind != "login")
    span = trace.duration / speed
    return n / span if span > 0 else None


class _Session:
    """One login's token and its exchanges in flight."""

    __slots__ = ("inflight", "login", "token")

    def __init__(self) -> None:
        self.login: asyncio.Task[None] | None = None
        self.token: str | None = None
        self.inflight: set[asyncio.Task[None]] = set()


_ERRORS: Final = (aiohttp.ClientError, TimeoutError, OSError, ValueError)


def _client(cfg: ReplayConfig) -> aiohttp.ClientSession:
    """A keep-alive pool of ``concurrency`` connections; no cookies, no proxy from the env."""
    connector = aiohttp.TCPConnector(limit=cfg.concurrency, limit_per_host=0,
                                     keepalive_timeout=30.0)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=cfg.timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=False,
        headers={"User-Agent": "wasm-reclaim-replay"},
    )


# Characters of a valid request target (RFC 3986: unreserved, reserved, and %-escapes).
_URI_CHARS: Final = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")


def request_url(base: URL, path: str) -> URL:
    """``base`` with the event's path and query.

    A path that is a valid request target is sent byte for byte (a recorded ``%2F`` stays
    ``%2F``); otherwise the characters that are invalid in a URL are %-encoded.
    """
    if not path.startswith("/"):
        path = f"/{path}"
    url = f"{str(base).rstrip('/')}{path}"
    return URL(url, encoded=True) if _URI_CHARS.fullmatch(path) else URL(url)


@dataclass(frozen=True, slots=True)
class _Job:
    """An event being replayed: its index, the event, its due time and its session."""

    index: int
    event: Event
    due: float
    session: _Session


class _Replayer:
    def __init__(self, trace: Trace, cfg: ReplayConfig) -> None:
        self.trace = trace
        self.cfg = cfg
        self.proxy_url = URL(cfg.proxy)
        self.auth_url = URL(cfg.auth)
        self.status: Counter[str] = Counter()
        self.auth_status: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.records: list[Record] = []
        self.max_lag = 0.0
        self.behind = 0.0
        self.sent = 0
        self.errors = 0
        self.logins = 0
        self.t0 = 0.0
        self.bar: tqdm[Any] | None = None
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._proxy_client: aiohttp.ClientSession | None = None
        self._auth_client: aiohttp.ClientSession | None = None

    @property
    def proxy(self) -> aiohttp.ClientSession:
        assert self._proxy_client is not None
        return self._proxy_client

    @property
    def auth(self) -> aiohttp.ClientSession:
        assert self._auth_client is not None
        return self._auth_client

    # -- exchanges -----------------------------------------------------------------------

    def _now(self) -> float:
        return time.perf_counter() - self.t0

    def _record(self, job: _Job, kind: str, start: float, status: str) -> None:
        if self.cfg.keep_records:
            ev = job.event
            self.records.append(
                Record(job.index, kind, ev.user, ev.token, job.due, start, self._now(), status))

    async def _login(self, job: _Job) -> None:
        start = self._now()
        try:
            body = {"user": job.event.user}
            async with self.auth.post(self.auth_url / "login", json=body) as r:
                status = str(r.status)
                if r.status == 200:
                    job.session.token = str((await r.json())["token"])
                else:
                    await r.read()
        except (*_ERRORS, KeyError, TypeError) as e:
            status = f"error:{type(e).__name__}"
        self.logins += 1
        self.auth_status[f"login {status}"] += 1
        self._record(job, "login", start, status)

    async def _proxy(self, job: _Job) -> None:
        ev, token = job.event, job.session.token
        if token is None:  # the login failed: nothing to send
            self.status[SKIPPED] += 1
            self._record(job, ev.kind, self._now(), SKIPPED)
            return
        headers = {"Host": ev.host, "Authorization": f"Bearer {token}"}
        url = request_url(self.proxy_url, ev.path)
        start = self._now()
        if not self.cfg.fast and start - job.due > self.max_lag:
            self.max_lag = start - job.due
        self.sent += 1
        try:
            async with self.proxy.request(ev.method, url, headers=headers) as r:
                await r.read()
                status = str(r.status)
            self.latencies.append(self._now() - start)
        except _ERRORS as e:
            status = f"error:{type(e).__name__}"
            self.errors += 1
        self.status[status] += 1
        self._record(job, ev.kind, start, status)

    async def _auth_logout(self, job: _Job) -> None:
        if job.session.token is None:
            return
        start = self._now()
        headers = {"Authorization": f"Bearer {job.session.token}"}
        try:
            async with self.auth.post(self.auth_url / "logout", headers=headers) as r:
                await r.read()
                status = str(r.status)
        except _ERRORS as e:
            status = f"error:{type(e).__name__}"
        self.auth_status[f"logout {status}"] += 1
        self._record(job, "auth-logout", start, status)

    # -- tasks: one per event, each holding a semaphore slot -----------------------------

    async def _run_login(self, job: _Job) -> None:
        try:
            await self._login(job)
        finally:
            self._release()

    async def _run_request(self, job: _Job) -> None:
        try:
            if job.session.login is not None:
                await job.session.login
            await self._proxy(job)
        finally:
            self._release()

    async def _run_logout(self, job: _Job, before: list[asyncio.Task[None]]) -> None:
        try:
            if job.session.login is not None:
                await job.session.login
            if before:
                await asyncio.wait(before)
            await self._proxy(job)
            if self.cfg.auth_logout:
                await self._auth_logout(job)
        finally:
            self._release()

    def _release(self) -> None:
        self._sem.release()
        if self.bar is not None:
            self.bar.update(1)

    def _spawn(self, sessions: dict[str, _Session], i: int, ev: Event,
               due: float) -> asyncio.Task[None]:
        """Start the task of event ``i``; a session's tasks wait for the ones they follow."""
        if ev.kind == "login":
            s = sessions[ev.token] = _Session()
            s.login = asyncio.create_task(self._run_login(_Job(i, ev, due, s)))
            return s.login
        if ev.kind == "request":
            s = sessions[ev.token]
            task = asyncio.create_task(self._run_request(_Job(i, ev, due, s)))
            s.inflight.add(task)
            task.add_done_callback(s.inflight.discard)
            return task
        s = sessions.pop(ev.token)
        return asyncio.create_task(self._run_logout(_Job(i, ev, due, s), list(s.inflight)))

    # -- the dispatcher ------------------------------------------------------------------

    async def run(self) -> ReplaySummary:
        cfg = self.cfg
        await _preflight(cfg)
        tasks: set[asyncio.Task[None]] = set()
        sessions: dict[str, _Session] = {}
        async with _client(cfg) as self._proxy_client, _client(cfg) as self._auth_client:
            self.bar = tqdm(total=len(self.trace), unit="ev", disable=not cfg.progress,
                            file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
            ticker = asyncio.create_task(self._tick())
            self.t0 = time.perf_counter()
            try:
                for i, ev in enumerate(self.trace.events):
                    due = 0.0 if cfg.fast else ev.time / cfg.speed
                    if not cfg.fast:
                        delay = due - self._now()
                        if delay > 0.0005:
                            await asyncio.sleep(delay)
                    await self._sem.acquire()
                    self.behind = 0.0 if cfg.fast else max(0.0, self._now() - due)
                    task = self._spawn(sessions, i, ev, due)
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(list(tasks))
            finally:
                ticker.cancel()
                for t in tasks:
                    t.cancel()
                self.bar.close()
        return self._summary(self._now())

    async def _tick(self) -> None:
        """Refresh the progress bar's postfix: lag now, max lag, errors."""
        bar = self.bar
        if bar is None or bar.disable:
            return
        while True:
            await asyncio.sleep(0.5)
            if self.cfg.fast:
                bar.set_postfix_str(f"sent {self.sent} err {self.errors}", refresh=False)
            else:
                bar.set_postfix_str(
                    f"lag {self.behind:.2f}s max {self.max_lag:.2f}s err {self.errors}",
                    refresh=False)

    def _summary(self, duration: float) -> ReplaySummary:
        cfg = self.cfg
        return ReplaySummary(
            events=len(self.trace),
            sent=self.sent,
            status=dict(self.status),
            errors=self.errors,
            latency_ms={k: v * 1000 for k, v in percentiles(self.latencies).items()},
            duration_s=duration,
            rate=self.sent / duration if duration > 0 else 0.0,
            max_lag_s=None if cfg.fast else max(0.0, self.max_lag),
            logins=self.logins,
            auth_status=dict(self.auth_status),
            speed=None if cfg.fast else cfg.speed,
            target_rate=None if cfg.fast else target_rate(self.trace, cfg.speed),
            records=self.records,
        )


async def _preflight(cfg: ReplayConfig) -> None:
    """Both servers accept TCP connections, else a ScenarioError that says which."""
    for name, url, hint in (
        ("proxy", cfg.proxy, "is mitmdump running (reverse mode)?"),
        ("auth server", cfg.auth, "start it: python -m scenarios auth-server"),
    ):
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
        except (OSError, TimeoutError) as e:
            if isinstance(e, TimeoutError):
                reason = "timed out"
            else:
                reason = os.strerror(e.errno) if e.errno else str(e)
            raise ScenarioError(f"{name} {url} is unreachable ({reason}); {hint}") from None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def replay_async(trace: Trace, config: ReplayConfig) -> ReplaySummary:
    """Replay ``trace`` (see the module docstring); the summary of what happened."""
    return await _Replayer(trace, config).run()


def replay(trace: Trace, config: ReplayConfig) -> ReplaySummary:
    """:func:`replay_async` in a fresh event loop."""
    return asyncio.run(replay_async(trace, config))


def session_order_violations(records: Iterable[Record]) -> list[str]:
    """Breaks of the per-session order in ``records`` (empty when it held).

    A session is a login and the records of its token label until the next login of that
    label. Each request and logout must start after its login ended; a logout must start after
    every earlier request of its session ended.
    """
    out: list[str] = []
    by_label: dict[str, list[Record]] = {}
    for r in sorted(records, key=lambda r: (r.index, r.kind == "auth-logout")):
        by_label.setdefault(r.token, []).append(r)
    for label, rs in by_label.items():
        login: Record | None = None
        ends: list[float] = []
        for r in rs:
            if r.kind == "login":
                login, ends = r, []
            elif r.kind in ("request", "logout"):
                if r.status == SKIPPED:
                    continue
                if login is None or r.start < login.end:
                    out.append(f"{label}: event #{r.index} started before its login ended")
                if r.kind == "logout" and ends and r.start < max(ends):
                    out.append(f"{label}: logout #{r.index} started before a request ended")
                ends.append(r.end)
    return out


def dumps_summary(summary: ReplaySummary) -> str:
    return json.dumps(summary.to_json(), indent=2)
