"""The rows of the campaign: one fault each, against a stack of real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from addons.telemetry import store as st

from .filters import write_fault_filter
from .harness import (
    ADMIN_TOKEN,
    GOOD_HOST,
    Answer,
    FerretDB,
    Live,
    Load,
    Progress,
    Request,
    busy_processes,
    database_uri,
    drive,
    drop,
    fresh_name,
    log_counts,
    lost,
    raw_request,
    read_answer,
    read_docs,
    rss_mib,
    shipper_of,
    stack,
    wait_gone,
)

BAD_HOST = "bad.example"


@dataclass(frozen=True)
class Plan:
    """How hard each row pushes: the full campaign, or the short form for CI."""

    quick: bool
    rate: float            # requests/s of the load rows
    outage_s: float        # how long FerretDB stays down
    restarts: int          # instance restarts under load
    fuzz_sets: int         # fuzzed header sets
    fuzz_budget_s: float   # … but no longer than this
    admin_requests: int    # malformed admin requests
    flood_hosts: int       # distinct Host values in the flood
    trip_requests: int     # healthy calls under contention, counting deadline trips
    phase_s: float         # load before and after a fault

    @classmethod
    def full(cls, rate: float) -> Plan:
        return cls(False, rate, 60.0, 50, 100_000, 1200.0, 10_000, 3_000, 3_000, 10.0)

    @classmethod
    def short(cls, rate: float) -> Plan:
        return cls(True, rate, 5.0, 8, 2_000, 300.0, 1_000, 300, 500, 3.0)


@dataclass
class Row:
    fault: str
    failed: str
    lost: str
    serving: str
    notes: str
    ok: bool

    def cells(self) -> list[str]:
        verdict = "ok" if self.ok else "FAILS"
        return [self.fault, self.failed, self.lost, self.serving, f"{verdict}: {self.notes}"]


@dataclass
class Context:
    plan: Plan
    server: str        # mongodb:// URI of the FerretDB for rows that do not kill it
    run_dir: Path
    progress: Progress
    fault_wasm: Path

    def dir(self, name: str) -> Path:
        path = self.run_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def store(self, row: str) -> str:
        return database_uri(self.server, fresh_name(row))


def _token_request(token: str, prefix: str, host: str = GOOD_HOST) -> Callable[[int], Request]:
    headers = {"Host": host, "Authorization": f"Bearer {token}"}
    return lambda i: (f"/{prefix}/{i}", headers)


def _paths(store: str) -> set[str]:
    return {str(d.get("path")) for d in read_docs(store, st.REQUESTS, {"path": 1})}


def _filter_errors(store: str) -> int:
    """Requests the filter failed or answered 5xx itself (decision `error`: a trap, a deadline
    trip, or the fail-closed answer to an auth call that failed or timed out)."""
    return len(read_docs(store, st.REQUESTS, {"decision": 1}, {"decision": "error"}))


def _trips(log: str) -> int:
    """Deadline trips the host logged ("… interrupted after its deadline …")."""
    return sum(1 for ln in log.splitlines() if "interrupted" in ln and "deadline" in ln)


def _outcomes(store: str) -> dict[str, int]:
    """Auth calls by outcome (`ok`, `timeout`, `error`)."""
    return dict(Counter(str(d.get("outcome"))
                        for d in read_docs(store, st.AUTH_CALLS, {"outcome": 1})))


def _pct(part: int, whole: int) -> str:
    return f"{part:,}/{whole:,}"


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _warm(live: Live, token: str) -> None:
    """One request to make the instance and cache the token, so load starts from a hit."""
    r = httpx.get(live.proxy + "/warm", timeout=30,
                  headers={"Host": GOOD_HOST, "Authorization": f"Bearer {token}"})
    r.raise_for_status()


@contextlib.contextmanager
def _row_stack(ctx: Context, name: str, **options: str) -> Iterator[tuple[Live, str, str]]:
    """The stack of row `name` on a fresh database, with a user logged in whose token the
    filter has cached: (live, token, store)."""
    store = ctx.store(name)
    with stack(ctx.dir(name) / "stack", store, **options) as live:
        token = live.login(name)
        _warm(live, token)
        yield live, token, store


def _load_row(fault: str, load: Load, stored: set[str], notes: str, ok: bool = True) -> Row:
    """The row of a load of good requests under a fault: requests failed of sent, documents
    missing from `stored` (the stored paths) of requests answered; the proxy kept serving if
    none failed. The row is ok if `ok` and nothing failed or was lost."""
    missing = lost(load, stored)
    return Row(fault, _pct(len(load.failed), load.sent), _pct(len(missing), len(load.answered)),
               "yes" if not load.failed else "no", notes,
               ok and not load.failed and not missing)


# ---- metrics delivery ------------------------------------------------------------------------


def poison(ctx: Context, embedded: bool) -> Row:
    """`GET /caf\\xe9` (a byte that is not UTF-8), then normal requests: all must be stored."""
    name = "poison-embedded" if embedded else "poison-ferretdb"
    where = ctx.dir(name)
    store = str(where / "metrics-store") if embedded else ctx.store("poison")
    n = 20 if ctx.plan.quick else 100
    with stack(where / "stack", store) as live:
        token = live.login("poison")
        _warm(live, token)
        raw = b"GET /poison/caf\xe9?q=\xff HTTP/1.1\r\nHost: shop.example\r\n\r\n"
        first = asyncio.run(raw_request(live.port, raw))
        load = asyncio.run(drive(live.proxy, _token_request(token, "poison/after"),
                                 rate=ctx.plan.rate, count=n, progress=ctx.progress))
        live.stop_clean()
        log = live.log_text()
    paths = _paths(store)
    stored = sorted(p for p in paths if p.startswith("/poison/caf"))
    rejected = list((live.spool / "rejected").glob("*")) if (live.spool / "rejected").is_dir() \
        else []
    fate = (f"stored as {stored[0]!r}" if stored else
            f"quarantined in {len(rejected)} dead-letter file(s)" if rejected else "lost")
    undelivered = "not all delivered" in log
    drop(store)
    return _load_row(
        f"poison document (non-UTF-8 path), {'embedded store' if embedded else 'FerretDB'}",
        load, paths, f"raw request answered {first}; the poison document {fate}; others: "
        f"{load.summary()}"
        + ("; the stop ended with 'metrics not all delivered'" if undelivered else ""),
        not undelivered)


def outage(ctx: Context) -> Row:
    """FerretDB killed under load for `outage_s`, then started again on the same data."""
    where = ctx.dir("outage")
    plan = ctx.plan
    with FerretDB(where / "ferretdb") as fdb:
        store = database_uri(fdb.uri, "outage")
        with stack(where / "stack", store) as live:
            token = live.login("outage")
            _warm(live, token)

            async def run() -> Load:
                stop = asyncio.Event()
                task = asyncio.create_task(drive(
                    live.proxy, _token_request(token, "outage"), rate=plan.rate,
                    stop_event=stop, progress=ctx.progress))
                await asyncio.sleep(plan.phase_s)
                ctx.progress.say("killing FerretDB", force=True)
                await asyncio.to_thread(fdb.kill)
                await asyncio.sleep(plan.outage_s)
                ctx.progress.say("starting FerretDB again", force=True)
                await asyncio.to_thread(fdb.start)
                await asyncio.sleep(plan.phase_s)
                stop.set()
                return await task

            load = asyncio.run(run())
            ctx.progress.say("clean stop", force=True)
            live.stop_clean()
        paths = _paths(store)
        errors = _filter_errors(store)
    return _load_row(f"database outage under load ({plan.outage_s:.0f} s at {plan.rate:.0f} "
                     f"req/s)", load, paths,
                     f"{len(paths):,} request documents stored after a clean stop; {errors} "
                     f"requests answered 5xx by the filter; {load.summary()}")


def sigkill(ctx: Context) -> Row:
    """SIGKILL of mitmdump under load; the next run on the same spool delivers what was left."""
    where = ctx.dir("sigkill")
    plan = ctx.plan
    store = ctx.store("sigkill")
    spool = where / "spool"
    orphan = "no shipper found"
    orphan_ok = False
    with stack(where / "first", store, wasm_spool=str(spool)) as live:
        token = live.login("sigkill")
        _warm(live, token)
        shipper = shipper_of(live.pid)

        async def run() -> tuple[Load, float]:
            stop = asyncio.Event()
            task = asyncio.create_task(drive(
                live.proxy, _token_request(token, "sigkill"), rate=plan.rate,
                stop_event=stop, expect=(200,), progress=ctx.progress, timeout=5))
            await asyncio.sleep(plan.phase_s)
            killed_at = time.monotonic()
            live.process.send_signal(signal.SIGKILL)
            await asyncio.sleep(0.5)
            stop.set()
            return await task, killed_at

        load, killed_at = asyncio.run(run())
        live.process.wait()
        if shipper is not None:
            gone = wait_gone(shipper, 20)
            if gone is None:
                orphan = "the orphaned shipper still ran 20 s later (killed by the campaign)"
                with contextlib.suppress(ProcessLookupError):
                    os.kill(shipper, signal.SIGKILL)
            else:
                orphan = f"the shipper exited {gone:.1f} s after its proxy"
                orphan_ok = gone < 10
    in_flight = [p for p in load.failed if p not in load.answered]
    tmp_docs = sum(f.read_bytes().count(b"\n") for f in spool.glob("*.tmp"))
    with stack(where / "second", store, wasm_spool=str(spool)) as again:
        time.sleep(2)
        again.stop_clean()
    paths = _paths(store)
    missing = lost(load, paths)
    window = max((killed_at - load.answered[p] for p in missing), default=0.0)
    errors = _filter_errors(store)
    drop(store)
    wrong = [p for p in load.failed if p in load.answered]  # answered, but not 200
    ok = orphan_ok and not wrong and window <= 0.75
    notes = (f"{len(in_flight)} requests in flight or sent after the kill got no answer; "
             f"the lost documents were answered at most {window:.2f} s before the kill"
             + (f" ({tmp_docs} in an unfinished segment, adopted a minute later)"
                if tmp_docs else "") + f"; {orphan}; {errors} requests failed by the filter")
    return Row("SIGKILL of the proxy under load", _pct(len(wrong), len(load.answered)),
               _pct(len(missing), len(load.answered)), "restarted", notes, ok)


def restarts(ctx: Context) -> Row:
    """Instance restarts through the admin endpoint while load runs."""
    plan = ctx.plan
    with _row_stack(ctx, "restarts") as (live, token, store):

        async def run() -> tuple[Load, Counter[int]]:
            stop = asyncio.Event()
            task = asyncio.create_task(drive(
                live.proxy, _token_request(token, "restarts"), rate=plan.rate, stop_event=stop,
                progress=ctx.progress))
            answers: Counter[int] = Counter()
            async with httpx.AsyncClient(timeout=30, headers={
                    "Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
                for _ in range(plan.restarts):
                    await asyncio.sleep(0.5)
                    r = await admin.post(f"{live.admin}/instances/{GOOD_HOST}/restart",
                                         json={"reason": "faults", "requested_by": "faults"})
                    answers[r.status_code] += 1
            await asyncio.sleep(1)
            stop.set()
            return await task, answers

        load, answers = asyncio.run(run())
        live.stop_clean()
    paths = _paths(store)
    restarted = len(read_docs(store, st.RESTARTS, {"instance": 1}))
    errors = _filter_errors(store)
    outcomes = _outcomes(store)
    drop(store)
    return _load_row(f"{plan.restarts} instance restarts under load", load, paths,
                     f"admin answers {dict(answers)}; {restarted} restart documents; {errors} "
                     f"requests answered 5xx by the filter; {load.summary()}; auth calls "
                     f"{outcomes} (a cold restart empties the cache: the requests in flight all "
                     "miss)", answers[200] == plan.restarts)


# ---- misbehaving filters ---------------------------------------------------------------------


def _bad_filter_run(ctx: Context, name: str, mode: str, *, hosts: Callable[[int], str],
                    bad_rate: float, bad_count: int | None = None
                    ) -> tuple[Load, Load, str, Live, dict[str, object]]:
    """Good requests on GOOD_HOST and `x-fault: mode` requests on `hosts(i)`, at once."""
    where = ctx.dir(name)
    store = ctx.store(name)
    plan = ctx.plan
    extra: dict[str, object] = {}
    with stack(where / "stack", store, wasm_filter=str(ctx.fault_wasm)) as live:
        good_headers = {"Host": GOOD_HOST}
        httpx.get(live.proxy + "/warm", headers=good_headers, timeout=30).raise_for_status()
        extra["rss_before"] = rss_mib(live.pid)

        async def run() -> tuple[Load, Load]:
            stop = asyncio.Event()
            good = asyncio.create_task(drive(
                live.proxy, lambda i: (f"/{name}/good/{i}", good_headers), rate=plan.rate,
                stop_event=stop, progress=ctx.progress))
            bad = asyncio.create_task(drive(
                live.proxy, lambda i: (f"/{name}/bad/{i}", {"Host": hosts(i), "x-fault": mode}),
                rate=bad_rate, count=bad_count, stop_event=stop, expect=(503, 200),
                timeout=30))
            await asyncio.sleep(plan.phase_s * 2)
            stop.set()
            return await good, await bad

        good, bad = asyncio.run(run())
        extra["rss_after"] = rss_mib(live.pid)
        with contextlib.suppress(httpx.HTTPError):
            extra["instances"] = live.admin_get("/instances").json()
        live.stop_clean()
    extra["paths"] = _paths(store)
    drop(store)
    return good, bad, store, live, extra


def _filter_row(title: str, good: Load, bad: Load, live: Live, extra: dict[str, object],
                notes: str, ok: bool) -> Row:
    paths = extra["paths"]
    assert isinstance(paths, set)
    missing = lost(good, paths) + lost(bad, paths)
    unanswered = [p for p in bad.failed if p not in bad.answered]
    failed = len(good.failed) + len(unanswered)
    counts = log_counts(live.log_text())
    served = len(good.answered) - len([p for p in good.failed if p in good.answered])
    return Row(title, _pct(failed, good.sent + bad.sent),
               _pct(len(missing), len(good.answered) + len(bad.answered)),
               "yes" if not good.failed else f"no: {_pct(served, good.sent)} good requests",
               f"faulty requests: {bad.summary()}; {counts['tracebacks']} tracebacks; " + notes,
               ok and not missing and not good.failed)


def trapping(ctx: Context) -> Row:
    good, bad, _, live, extra = _bad_filter_run(ctx, "trap", "trap", hosts=lambda i: BAD_HOST,
                                                bad_rate=max(1.0, ctx.plan.rate / 10))
    return _filter_row("trapping filter (one tenant)", good, bad, live, extra,
                       "the trapping tenant is answered 503 by the fail-closed policy", True)


def looping(ctx: Context) -> Row:
    good, bad, _, live, extra = _bad_filter_run(ctx, "loop", "loop", hosts=lambda i: BAD_HOST,
                                                bad_rate=max(1.0, ctx.plan.rate / 10))
    lat = list(bad.latency_s.values())
    glat = list(good.latency_s.values())
    return _filter_row(
        "looping filter (one tenant)", good, bad, live, extra,
        f"looping requests answered in {_p(lat, 0.5) * 1000:.0f} ms median, "
        f"{max(lat, default=0) * 1000:.0f} ms max; good requests p99 "
        f"{_p(glat, 0.99) * 1000:.0f} ms", True)


def looping_hosts(ctx: Context) -> Row:
    good, bad, _, live, extra = _bad_filter_run(
        ctx, "loophosts", "loop", hosts=lambda i: f"loop-{i}.example",
        bad_rate=max(1.0, ctx.plan.rate / 2))
    glat = list(good.latency_s.values())
    return _filter_row(
        "looping filter over many Host values", good, bad, live, extra,
        f"good requests p99 {_p(glat, 0.99) * 1000:.0f} ms, max "
        f"{max(glat, default=0) * 1000:.0f} ms", True)


def growing(ctx: Context) -> Row:
    good, bad, _, live, extra = _bad_filter_run(ctx, "grow", "grow", hosts=lambda i: BAD_HOST,
                                                bad_rate=1.0, bad_count=5)
    log = live.log_text()
    cap_lines = [ln for ln in log.splitlines() if BAD_HOST in ln and "memory" in ln.lower()]
    instances = extra.get("instances") or []
    pages = next((i.get("allocated_pages") for i in instances  # type: ignore[union-attr]
                  if isinstance(i, dict) and i.get("id") == BAD_HOST), None)
    visible = bool(cap_lines)
    return _filter_row(
        "filter growing to the memory cap", good, bad, live, extra,
        f"{BAD_HOST} at {pages} pages; {len(cap_lines)} log lines about its memory; "
        f"mitmdump RSS {extra['rss_before']:.0f} → {extra['rss_after']:.0f} MiB",
        visible)


# ---- the auth server -------------------------------------------------------------------------


def auth_down(ctx: Context) -> Row:
    from scenarios.procs import free_port

    where = ctx.dir("authdown")
    store = ctx.store("authdown")
    dead = f"http://127.0.0.1:{free_port()}"
    with stack(where / "stack", store, wasm_cluster=f"auth={dead}") as live:
        load = asyncio.run(drive(
            live.proxy, lambda i: (f"/authdown/{i}", {"Host": GOOD_HOST,
                                                      "Authorization": f"Bearer tok{i % 50}"}),
            rate=ctx.plan.rate, duration=ctx.plan.phase_s * 2, expect=(503,),
            progress=ctx.progress))
        live.stop_clean()
    paths = _paths(store)
    outcomes = _outcomes(store)
    drop(store)
    lat = list(load.latency_s.values())
    return _load_row("auth server down", load, paths,
                     f"answered 503 (fail-closed) in {_p(lat, 0.5) * 1000:.0f} ms median; "
                     f"auth calls {outcomes}")


def auth_slow(ctx: Context) -> Row:
    where = ctx.dir("authslow")
    store = ctx.store("authslow")
    with stack(where / "stack", store) as live:
        token = live.login("slow")
        httpx.put(f"{live.auth}/faults", json={"latency_ms": 1500}, timeout=10).raise_for_status()
        load = asyncio.run(drive(
            live.proxy, _token_request(token, "authslow"), rate=max(1.0, ctx.plan.rate / 2),
            duration=ctx.plan.phase_s * 2, expect=(503,), progress=ctx.progress))
        live.stop_clean()
    paths = _paths(store)
    outcomes = _outcomes(store)
    drop(store)
    lat = list(load.latency_s.values())
    return _load_row("auth server slow (1.5 s, timeout 1 s)", load, paths,
                     f"answered 503 in {_p(lat, 0.5) * 1000:.0f} ms median; auth call outcomes "
                     f"{outcomes} (all must be timeout)", set(outcomes) == {"timeout"})


# ---- hostile input ---------------------------------------------------------------------------

_SAFE = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NAMES = [b"authorization", b"cookie", b"user-agent", b"accept", b"x-forwarded-for",
          b"x-request-id", b"accept-encoding", b"referer", b"x-fault", b"te", b"via"]
_FRAMING = {b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect",
            b"host", b"keep-alive", b"proxy-connection"}


def _token(rng: random.Random, longest: int) -> bytes:
    """A random HTTP token (the characters a header name or a method may have)."""
    return bytes(rng.choices(_SAFE, k=rng.randint(1, longest)))


def _in_line(data: bytes) -> bytes:
    """`data` without what would end a request line or a header line."""
    return data.replace(b"\r", b"").replace(b"\n", b"").replace(b" ", b"")


def fuzz_request(i: int) -> bytes:
    """Fuzzed request `i` (the same bytes every time): `GET /fuzz/<i>` with the header block
    `fuzz_headers` draws from seed `i`, and in some a query or path segment of raw bytes
    (mostly not UTF-8), an unknown method, or a method of raw bytes."""
    rng = random.Random(i)
    headers = fuzz_headers(rng)
    path = b"/fuzz/%d" % i
    pick = rng.random()
    if pick < 0.10:
        path += b"?q=" + _in_line(rng.randbytes(rng.randint(1, 64)))
    elif pick < 0.15:
        path += b"/" + _in_line(rng.randbytes(rng.randint(1, 64)))
    method = b"GET"
    pick = rng.random()
    if pick < 0.02:
        method = _token(rng, 12)
    elif pick < 0.03:
        method = _in_line(rng.randbytes(rng.randint(1, 12))) or b"\xff"
    return (method + b" " + path + b" HTTP/1.1\r\nHost: " + GOOD_HOST.encode() + b"\r\n"
            + headers + b"\r\n")


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def closes(request: bytes) -> bool:
    """Whether mitmproxy will refuse `request` as unparsable and close the connection: a
    method or a header name that is not a token (it refuses those to prevent request
    smuggling). A guess that only saves work: a request that closes anyway goes again."""
    head, _, block = request.partition(b"\r\n")
    if not _TOKEN.fullmatch(head.partition(b" ")[0]):
        return True
    return any(not _TOKEN.fullmatch(line.partition(b":")[0])
               for line in block.split(b"\r\n") if line)


FUZZED_PATH = re.compile(r"^/fuzz/(\d+)(?:[/?]|$)")
"""A fuzzed request's stored path (escaped, perhaps redacted): its number."""


@dataclass
class FuzzRun:
    """What the fuzzed requests got through mitmdump."""

    answers: dict[int, Answer] = field(default_factory=dict)
    unanswered: dict[int, str] = field(default_factory=dict)
    """Given up after `FUZZ_TRIES` connections failed on it: why the last one did."""
    errors: Counter[str] = field(default_factory=Counter)
    resent: int = 0
    """Requests sent again: pipelined behind one after which mitmdump closed."""
    alone: int = 0
    """Requests sent alone on a connection, as mitmproxy would refuse them and close it."""
    probes: Counter[int | str] = field(default_factory=Counter)
    """Answers to a request with a valid token, every few seconds meanwhile."""


FUZZ_TRIES = 3


async def fuzz_through(live: Live, token: str, sets: int, *, connections: int, depth: int,
                       deadline: float, progress: Progress) -> FuzzRun:
    """Send fuzzed requests 0 … sets-1 through mitmdump: those it will take (`closes`) on
    `connections` keep-alive connections, up to `depth` pipelined on each; those it will refuse
    alone on a new connection each, a few at a time. After an answer that closes a connection
    the requests pipelined behind it go again on a new one; a request on which `FUZZ_TRIES`
    connections failed is given up. Meanwhile a request with a valid token every 2 s checks
    that the proxy keeps serving."""
    run = FuzzRun()
    Item = tuple[int, bytes]
    kept: asyncio.Queue[Item | None] = asyncio.Queue(maxsize=256)
    alone: asyncio.Queue[Item | None] = asyncio.Queue(maxsize=256)
    workers = {id(kept): connections, id(alone): max(1, connections // 2)}
    tries: Counter[int] = Counter()
    done = asyncio.Event()

    async def produce() -> None:
        for i in range(sets):
            data = fuzz_request(i)
            refused = closes(data)
            run.alone += refused
            await (alone if refused else kept).put((i, data))
        for queue in (kept, alone):
            for _ in range(workers[id(queue)]):
                await queue.put(None)

    async def connection(queue: asyncio.Queue[Item | None], depth: int) -> None:
        pending: deque[Item] = deque()  # sent, not answered: to send again
        ended = False
        while (pending or not ended) and time.monotonic() < deadline:
            flight: deque[Item] = deque()
            writer = None
            try:
                async with asyncio.timeout(30):
                    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
                while time.monotonic() < deadline:
                    while len(flight) < depth:
                        if pending:
                            item = pending.popleft()
                        elif ended or (flight and queue.empty()):
                            break  # (rather read what is in flight than wait)
                        else:
                            got = await queue.get()
                            if got is None:
                                ended = True
                                break
                            item = got
                        flight.append(item)
                        writer.write(item[1])
                    if not flight:
                        break
                    async with asyncio.timeout(30):
                        await writer.drain()
                        answer = await read_answer(reader)
                    run.answers[flight.popleft()[0]] = answer
                    progress.say(f"{len(run.answers):,} of {sets:,} requests answered, "
                                 f"{run.resent:,} sent again")
                    if not answer.keep:
                        break
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError,
                    IndexError) as e:
                why = type(e).__name__
                run.errors[why] += 1
                if flight:  # the one waited for: counted against it
                    i = flight[0][0]
                    tries[i] += 1
                    if tries[i] >= FUZZ_TRIES:
                        run.unanswered[i] = why
                        flight.popleft()
            finally:
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
                run.resent += len(flight)
                pending.extendleft(reversed(flight))

    async def probe() -> None:
        headers = {"Host": GOOD_HOST, "Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(timeout=30) as client:
            n = 0
            while not done.is_set():
                n += 1
                try:
                    r = await client.get(f"{live.proxy}/fuzz-probe/{n}", headers=headers)
                    run.probes[r.status_code] += 1
                except httpx.HTTPError as e:
                    run.probes[type(e).__name__] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 2)

    checker = asyncio.create_task(probe())
    producer = asyncio.create_task(produce())
    await asyncio.gather(*(connection(kept, depth) for _ in range(workers[id(kept)])),
                         *(connection(alone, 1) for _ in range(workers[id(alone)])))
    producer.cancel()  # (at the time budget it may wait on a full queue)
    with contextlib.suppress(asyncio.CancelledError):
        await producer
    done.set()
    await checker
    return run


def fuzz_headers(rng: random.Random) -> bytes:
    """A random header block (no framing headers: each request keeps its connection)."""
    lines = []
    for _ in range(rng.choice((0, 1, 2, 3, 5, 8, 13, 30))):
        kind = rng.random()
        if kind < 0.4:
            name = rng.choice(_NAMES)
        elif kind < 0.97:
            name = _token(rng, 40)
        else:  # mitmproxy refuses the request (not a token): it never reaches the addon
            name = rng.randbytes(rng.randint(1, 20))
        name = name.replace(b"\r", b"").replace(b"\n", b"").replace(b":", b"") or b"x"
        if name.strip().lower() in _FRAMING:
            name = b"x-" + name
        size = rng.choice((0, 1, 8, 64, 200, 1000, 8000)) if rng.random() < 0.95 else 30_000
        if name == b"authorization" and rng.random() < 0.7:
            value = b"Bearer " + rng.randbytes(rng.randint(0, 64))
        else:
            value = rng.randbytes(size)
        value = value.replace(b"\r", b"").replace(b"\n", b"")
        lines.append(name + b": " + value)
    return b"".join(line + b"\r\n" for line in lines)


def fuzz_host(sets: int) -> tuple[Counter[str], int, float]:
    """`sets` fuzzed header sets straight into the host running the reference filter (the
    same code the proxy runs, without mitmproxy's parser in front): (outcomes, filter errors,
    seconds)."""
    from addons.proxywasm import (
        FilterModule,
        Host,
        HttpCallResponse,
        InProcessDispatcher,
        VirtualClock,
    )

    from ..conftest import FILTER_WASM

    clock = VirtualClock()
    answers = random.Random(0)

    def auth(call: object) -> HttpCallResponse:
        return HttpCallResponse(answers.choice((200, 401, 401, 503)))

    host = Host(FilterModule.from_file(FILTER_WASM),
                InProcessDispatcher(auth, clock.now_ns, clusters=("auth",)), clock=clock)
    outcomes: Counter[str] = Counter()
    errors = 0
    t0 = time.monotonic()
    try:
        for i in range(sets):
            pairs = [(b":method", b"GET"), (b":path", f"/fuzz/{i}".encode()),
                     (b":authority", GOOD_HOST.encode()), (b":scheme", b"http")]
            for line in fuzz_headers(random.Random(i)).split(b"\r\n"):
                name, sep, value = line.partition(b": ")
                if sep:
                    pairs.append((name, value))
            stream = host.instance(GOOD_HOST).stream()
            decision = stream.request_headers(pairs)
            if decision is None:
                clock.advance(0.001)
                host.poll()
                decision = stream.decision
            if decision is None:
                outcomes["pending"] += 1
            else:
                outcomes[decision.action] += 1
                errors += decision.error is not None
            stream.close()
    finally:
        host.close()
    return outcomes, errors, time.monotonic() - t0


def fuzzed_headers(ctx: Context) -> Row:
    """`fuzz_sets` fuzzed requests through mitmdump (pipelined on keep-alive connections),
    then as many header sets straight into the host. Every request mitmdump did not refuse as
    unparsable must have its document; no traceback, no deadline trip; the proxy serves
    throughout."""
    plan = ctx.plan
    with _row_stack(ctx, "fuzz") as (live, token, store):
        t0 = time.monotonic()
        run = asyncio.run(fuzz_through(live, token, plan.fuzz_sets, connections=8, depth=4,
                                       deadline=t0 + plan.fuzz_budget_s,
                                       progress=ctx.progress))
        took = time.monotonic() - t0
        probe = httpx.get(live.proxy + "/after-fuzz", timeout=30,
                          headers={"Host": GOOD_HOST, "Authorization": f"Bearer {token}"})
        ctx.progress.say("clean stop: the metrics to the store", force=True)
        live.stop_clean(timeout=900)
        log = live.log_text()
    counts = log_counts(log)
    trips = _trips(log)
    stored: Counter[int] = Counter()
    errors = 0
    for d in read_docs(store, st.REQUESTS, {"path": 1, "decision": 1}):
        m = FUZZED_PATH.match(str(d.get("path")))
        if m:
            stored[int(m.group(1))] += 1
            errors += d.get("decision") == "error"
    drop(store)
    unparsable = {i for i, a in run.answers.items() if a.server.startswith(b"mitmproxy")}
    expected = [i for i in run.answers if i not in unparsable]
    missing = [i for i in expected if not stored[i]]
    statuses = Counter(a.status for a in run.answers.values())
    top = ", ".join(f"{n:,} × {s}" for s, n in statuses.most_common(6))
    serving = probe.status_code == 200 and set(run.probes) == {200}
    ctx.progress.say(f"{plan.fuzz_sets:,} header sets into the host directly", force=True)
    direct, direct_errors, direct_s = fuzz_host(plan.fuzz_sets)
    answered = len(run.answers)
    ok = (answered == plan.fuzz_sets and not missing and serving and trips == 0
          and direct_errors == 0 and counts["tracebacks"] == 0)
    budget = " (time budget reached)" if answered + len(run.unanswered) < plan.fuzz_sets else ""
    return Row(f"fuzzed requests ({answered:,} of {plan.fuzz_sets:,} through mitmdump in "
               f"{took:.0f} s{budget}, {answered / max(took, 1e-9):.0f}/s; {plan.fuzz_sets:,} "
               f"header sets into the host)", _pct(len(run.unanswered), plan.fuzz_sets),
               _pct(len(missing), len(expected)),
               "yes" if serving else f"no (probes {dict(run.probes)}, after {probe.status_code})",
               f"through mitmdump: {top} ({len(unparsable):,} refused by mitmproxy's parser, "
               f"{run.alone:,} sent alone, {run.resent:,} sent again), {errors} answered 5xx "
               f"by the filter, "
               f"{trips} deadline trips, {counts['tracebacks']} tracebacks in the log, "
               f"{sum(run.probes.values())} probes with a valid token all answered 200"
               f"{'' if serving else ' (NOT)'}; into the host directly: {dict(direct)}, "
               f"{direct_errors} filter errors, {direct_s:.0f} s", ok)


def _admin_garbage(i: int, rng: random.Random) -> bytes:
    """One malformed (or hostile) admin request."""
    token = f"Authorization: Bearer {ADMIN_TOKEN}\r\n".encode()
    kind = i % 10
    if kind == 0:
        return rng.randbytes(rng.randint(1, 2000))
    if kind == 1:
        method = bytes(rng.choice(_SAFE) for _ in range(rng.randint(1, 12)))
        return method + b" /instances HTTP/1.1\r\nHost: a\r\n" + token + b"\r\n"
    if kind == 2:
        path = "/%0a[00:00:00.000] INJECTED line " + str(i)
        return f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    if kind == 3:
        path = b"/instances/" + rng.randbytes(rng.randint(1, 300)).replace(b" ", b"")
        path = path.replace(b"\r", b"").replace(b"\n", b"")
        return b"POST " + path + b"/restart HTTP/1.1\r\nHost: a\r\n" + token + \
            b"Content-Length: 0\r\n\r\n"
    if kind == 4:
        body = rng.randbytes(rng.randint(0, 500))
        return (b"POST /instances/shop.example/restart HTTP/1.1\r\nHost: a\r\n" + token
                + f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n\r\n"
                .encode() + body)
    if kind == 5:
        auth = rng.randbytes(rng.randint(0, 100)).replace(b"\r", b"").replace(b"\n", b"")
        return b"GET /instances HTTP/1.1\r\nHost: a\r\nAuthorization: " + auth + b"\r\n\r\n"
    if kind == 6:
        return b"GET /" + b"a" * rng.choice((8000, 20_000, 70_000)) + b" HTTP/1.1\r\n\r\n"
    if kind == 7:
        return (b"POST /instances/shop.example/restart HTTP/1.1\r\nHost: a\r\n" + token
                + b"Transfer-Encoding: chunked\r\n\r\n" + rng.randbytes(rng.randint(1, 200)))
    if kind == 8:
        headers = b"".join(b"X-%d: %d\r\n" % (j, j) for j in range(rng.choice((10, 200, 2000))))
        return b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"
    body = b'{"reason": "' + b"x" * rng.choice((10, 20_000, 100_000)) + b'"}'
    return (b"POST /instances/shop.example/restart HTTP/1.1\r\nHost: a\r\n" + token
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def malformed_admin(ctx: Context) -> Row:
    plan = ctx.plan
    with _row_stack(ctx, "admin") as (live, token, store):
        answers: Counter[int | str] = Counter()
        probes_failed = 0

        async def worker(w: int, workers: int) -> None:
            nonlocal probes_failed
            for i in range(w, plan.admin_requests, workers):
                rng = random.Random(i)
                answers[await raw_request(live.admin_port, _admin_garbage(i, rng), 5)] += 1
                if i % 100 == 0:
                    probe = await raw_request(
                        live.admin_port, b"GET /instances HTTP/1.1\r\nHost: a\r\nAuthorization: "
                        b"Bearer " + ADMIN_TOKEN.encode() + b"\r\nConnection: close\r\n\r\n", 15)
                    if probe != 200:
                        probes_failed += 1
                ctx.progress.say(f"{sum(answers.values()):,} admin requests sent")

        async def run() -> None:
            await asyncio.gather(*(worker(w, 8) for w in range(8)))

        asyncio.run(run())
        proxy_ok = httpx.get(live.proxy + "/after-admin", timeout=30, headers={
            "Host": GOOD_HOST, "Authorization": f"Bearer {token}"}).status_code == 200
        live.stop_clean()
        counts = log_counts(live.log_text())
    drop(store)
    top = ", ".join(f"{n:,} × {s}" for s, n in answers.most_common(6))
    ok = not probes_failed and proxy_ok and counts["tracebacks"] == 0 and counts["forged"] == 0
    return Row(f"malformed admin requests ({sum(answers.values()):,})",
               f"{probes_failed} of {plan.admin_requests // 100} valid probes", "n/a",
               "yes" if proxy_ok else "no",
               f"{top}; {counts['tracebacks']} tracebacks and {counts['forged']} forged lines "
               f"in the log ({counts['lines']:,} lines)", ok)


def host_flood(ctx: Context) -> Row:
    """Unauthenticated requests, each with a new Host value (some hostile): instances, memory
    and samples must stay bounded. The bound is `wasm_max_instances` = a third of the hosts,
    so the second half of the flood only evicts: RSS must not grow during it."""
    plan = ctx.plan
    cap = max(10, plan.flood_hosts // 3)
    with _row_stack(ctx, "flood", wasm_max_instances=str(cap)) as (live, token, store):
        time.sleep(1)
        rss = [rss_mib(live.pid)]

        def host(i: int) -> str:
            if i % 100 == 1:
                return f"nul\x00{i}.example"
            if i % 100 == 2:
                return f"ctl\x01\x7f{i}.example"
            if i % 100 == 3:
                return "x" * 8192 + str(i)
            return f"h{i}.flood.example"

        answers: Counter[int | str] = Counter()

        async def flood(hosts: range) -> None:
            sem = asyncio.Semaphore(32)

            async def one(i: int) -> None:
                async with sem:
                    data = f"GET /flood/{i} HTTP/1.1\r\nHost: {host(i)}\r\n\r\n".encode()
                    answers[await raw_request(live.port, data, 30)] += 1
                    ctx.progress.say(f"{sum(answers.values()):,} hosts sent")

            await asyncio.gather(*(one(i) for i in hosts))

        half = plan.flood_hosts // 2
        t0 = time.time()
        asyncio.run(flood(range(half)))
        rss.append(rss_mib(live.pid))
        asyncio.run(flood(range(half, plan.flood_hosts)))
        flood_end = time.time()
        time.sleep(6)
        rss.append(rss_mib(live.pid))
        try:
            instances = len(live.admin_get("/instances", timeout=60).json())
        except (httpx.HTTPError, ValueError):
            instances = -1
        probe = httpx.get(live.proxy + "/after-flood", timeout=30,
                          headers={"Host": GOOD_HOST, "Authorization": f"Bearer {token}"})
        live.stop_clean()
    samples = read_docs(store, st.SAMPLES, {"time": 1})
    idle = [d for d in samples if isinstance(d.get("time"), float)
            and flood_end + 1 <= d["time"] <= flood_end + 6]
    drop(store)
    top = ", ".join(f"{n:,} × {s}" for s, n in answers.most_common(4))
    second_half = rss[2] - rss[1]
    ok = probe.status_code == 200 and 0 <= instances <= cap and second_half < 10
    return Row(f"Host flood ({plan.flood_hosts:,} distinct Host values, at most {cap:,} "
               "instances)", "n/a", "n/a", "yes" if probe.status_code == 200 else "no",
               f"{top}; {instances:,} instances after; RSS {rss[0]:.0f} → {rss[1]:.0f} MiB "
               f"(first half) → {rss[2]:.0f} MiB (second half, must not grow); "
               f"{len(idle) / 5:.0f} samples/s idle after the flood; took "
               f"{flood_end - t0:.0f} s", ok)


def false_trips(ctx: Context) -> Row:
    """A healthy filter under CPU contention: no call may trip its deadline."""
    plan = ctx.plan
    with _row_stack(ctx, "trips") as (live, token, store):
        with busy_processes(3):
            load = asyncio.run(drive(live.proxy, _token_request(token, "trips"),
                                     rate=plan.rate, count=plan.trip_requests,
                                     progress=ctx.progress, timeout=30))
        live.stop_clean()
        log = live.log_text()
    docs = read_docs(store, st.REQUESTS, {"path": 1, "decision": 1})
    paths = {str(d.get("path")) for d in docs}
    errors = sum(1 for d in docs if d.get("decision") == "error")
    drop(store)
    trips = _trips(log)
    lat = list(load.latency_s.values())
    return _load_row(f"healthy filter, 3 busy processes on {os.cpu_count()} cores "
                     f"({plan.trip_requests:,} requests)", load, paths,
                     f"{trips} deadline trips (all false: the filter is healthy), {errors} "
                     f"requests answered 5xx by the filter; "
                     f"p50 {_p(lat, 0.5) * 1000:.0f} ms, p99 {_p(lat, 0.99) * 1000:.0f} ms",
                     trips == 0 and errors == 0)


ROWS: dict[str, Callable[[Context], Row]] = {
    "poison": lambda c: poison(c, embedded=False),
    "poison-embedded": lambda c: poison(c, embedded=True),
    "outage": outage,
    "sigkill": sigkill,
    "restarts": restarts,
    "trap": trapping,
    "loop": looping,
    "loop-hosts": looping_hosts,
    "grow": growing,
    "auth-down": auth_down,
    "auth-slow": auth_slow,
    "fuzz": fuzzed_headers,
    "admin": malformed_admin,
    "host-flood": host_flood,
    "false-trips": false_trips,
}


def prepare(run_dir: Path) -> Path:
    return write_fault_filter(run_dir / "fault.wasm")


