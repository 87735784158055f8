"""The campaign's pieces: stacks under test, load, raw HTTP, the store's view, processes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from addons.telemetry import store as st
from scenarios.procs import free_port, local_stack, stop, wait_for_port

from ..servers import FERRETDB_BIN

ADMIN_TOKEN = "faults-admin-token"
GOOD_HOST = "shop.example"
LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\.\d{3}\]")  # how mitmdump starts each line it logs


# ---- progress --------------------------------------------------------------------------------


class Progress:
    """One line on stderr every few seconds: which row, and what it is doing."""

    def __init__(self, total: int, every_s: float = 5.0) -> None:
        self.total = total
        self.index = 0
        self.row = ""
        self.every_s = every_s
        self._last = 0.0
        self._row_start = time.monotonic()

    def start(self, row: str) -> None:
        self.index += 1
        self.row = row
        self._row_start = time.monotonic()
        self.say("starting", force=True)

    def say(self, what: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            print(f"[faults {self.index}/{self.total} {now - self._row_start:5.0f} s] "
                  f"{self.row}: {what}", file=sys.stderr, flush=True)


# ---- processes -------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cmdline(pid: int) -> list[str]:
    """The argv of `pid` as /proc shows it to any local user."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def shipper_of(proxy_pid: int, timeout: float = 30.0) -> int | None:
    """The metrics shipper the proxy started (a child running the `ship` command), waiting
    up to `timeout` seconds for it to appear."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in children(proxy_pid):
            if "ship" in cmdline(pid):
                return pid
        if time.monotonic() > deadline or not alive(proxy_pid):
            return None
        time.sleep(0.1)


def rss_mib(pid: int) -> float:
    """Resident memory of `pid`, MiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def wait_gone(pid: int, timeout: float) -> float | None:
    """Seconds until `pid` exited, or None if it still runs after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not alive(pid):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


@contextlib.contextmanager
def busy_processes(n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`n` processes that spin on a CPU each, for contention."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


class FerretDB:
    """A FerretDB of our own on a free port, to stop and start again on the same data."""

    def __init__(self, data: Path) -> None:
        if not FERRETDB_BIN.exists():
            raise RuntimeError(f"FerretDB is not built at {FERRETDB_BIN}: run `just setup`")
        self.data = data
        self.data.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"mongodb://127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    def start(self) -> None:
        self._starts += 1
        log = (self.data / f"ferretdb-{self._starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [str(FERRETDB_BIN), "--listen-addr", f"127.0.0.1:{self.port}",
             "--sqlite-url", f"file:{self.data}/"], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        log.close()
        wait_for_port(self.port, 30, self.proc)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> FerretDB:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# ---- stacks ----------------------------------------------------------------------------------


@dataclass
class Live:
    """A running stack: auth server, shop, mitmdump with the addon."""

    proxy: str
    auth: str
    admin: str
    store: str
    spool: Path
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return int(self.proxy.rpartition(":")[2])

    @property
    def admin_port(self) -> int:
        return int(self.admin.rpartition(":")[2])

    def login(self, user: str) -> str:
        r = httpx.post(f"{self.auth}/login", json={"user": user}, timeout=30)
        r.raise_for_status()
        return str(r.json()["token"])

    def admin_get(self, path: str, timeout: float = 10) -> httpx.Response:
        return httpx.get(f"{self.admin}{path}", timeout=timeout,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    def admin_post(self, path: str, timeout: float = 10, **kw: Any) -> httpx.Response:
        return httpx.post(f"{self.admin}{path}", timeout=timeout,
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, **kw)

    def stop_clean(self, timeout: float = 180.0) -> int:
        """SIGTERM and wait for the addon to hand everything to the store."""
        return stop(self.process, timeout)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def stack(run_dir: Path, store: str, **options: str) -> Iterator[Live]:
    """A stack writing metrics to `store`, admin endpoint on, every log line kept."""
    with contextlib.ExitStack() as exits:
        local = local_stack(exits, run_dir, store=store, quiet=False, options={
            "wasm_admin_token": ADMIN_TOKEN, "termlog_verbosity": "warn", **options})
        assert local.admin is not None
        yield Live(local.proxy, local.auth, local.admin, local.store, local.spool,
                   run_dir / "mitmdump.log", local.proxy_process)


def database_uri(server: str, name: str) -> str:
    """`server` (a mongodb:// URI) with database `name`."""
    base, _, _ = server.partition("?")
    scheme, _, rest = base.partition("://")
    return f"{scheme}://{rest.split('/')[0]}/{name}"


def fresh_name(row: str) -> str:
    return f"faults_{row}_{uuid.uuid4().hex[:8]}"


def read_docs(store: str, collection: str, projection: dict[str, int] | None = None,
              query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every document of `collection` in `store` (a URI with its database, or a directory)."""
    db = st.open_store(store, timeout=10)
    try:
        return list(db[collection].find(query or {}, {"_id": 0, **(projection or {})}))
    finally:
        st.close_store(db)


def drop(store: str) -> None:
    """Drop a campaign database (a server's), or leave a directory for the run folder."""
    if st.is_mongo_uri(store):
        db = st.open_store(store, timeout=10)
        with contextlib.suppress(Exception):
            db.client.drop_database(db.name)
        st.close_store(db)


def log_counts(text: str) -> dict[str, int]:
    """Tracebacks and lines that do not start like mitmdump's own (forged or continuation)."""
    lines = text.splitlines()
    return {"lines": len(lines), "tracebacks": text.count("Traceback (most recent call last)"),
            "forged": sum(1 for ln in lines if "INJECTED" in ln and LOG_LINE.match(ln)
                          and ln.split("]", 1)[1].lstrip().startswith("INJECTED"))}


# ---- load ------------------------------------------------------------------------------------


@dataclass
class Load:
    """What a load run saw, per request path."""

    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    answered: dict[str, float] = field(default_factory=dict)  # path → monotonic answer time
    status_of: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # paths not answered as expected
    latency_s: dict[str, float] = field(default_factory=dict)
    sent: int = 0

    @property
    def done(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    def summary(self) -> str:
        parts = [f"{n} × {s}" for s, n in sorted(self.statuses.items())]
        parts += [f"{n} × {e}" for e, n in sorted(self.errors.items())]
        return ", ".join(parts) or "nothing"


Request = tuple[str, dict[str, str]]  # path, headers


async def drive(base: str, make: Callable[[int], Request], *, rate: float,
                duration: float | None = None, count: int | None = None,
                expect: tuple[int, ...] = (200,), stop_event: asyncio.Event | None = None,
                progress: Progress | None = None, timeout: float = 30.0,
                into: Load | None = None, concurrency: int = 32) -> Load:
    """Send `make(i)` at `rate` per second, for `duration` seconds or `count` requests (or until
    `stop_event`), without waiting for answers before sending the next, but with at most
    `concurrency` in flight (a slower proxy gets a lower rate, not a queue of timeouts);
    returns what came back.
    """
    load = into or Load()
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    tasks: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one(path: str, headers: dict[str, str]) -> None:
            t0 = time.monotonic()
            try:
                r = await client.get(base + path, headers=headers)
                await r.aread()
            except (httpx.HTTPError, OSError) as e:
                load.errors[type(e).__name__] += 1
                load.failed.append(path)
                return
            finally:
                slots.release()
            now = time.monotonic()
            load.statuses[r.status_code] += 1
            load.answered[path] = now
            load.status_of[path] = r.status_code
            load.latency_s[path] = now - t0
            if r.status_code not in expect:
                load.failed.append(path)

        start = time.monotonic()
        i = 0
        while True:
            if count is not None and i >= count:
                break
            if duration is not None and time.monotonic() - start >= duration:
                break
            if stop_event is not None and stop_event.is_set():
                break
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            path, headers = make(i)
            task = asyncio.create_task(one(path, headers))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            load.sent += 1
            i += 1
            if progress is not None:
                progress.say(f"{load.sent:,} sent, {load.done:,} answered, "
                             f"{len(load.failed):,} failed")
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    return load


def lost(load: Load, stored_paths: set[str], statuses: tuple[int, ...] | None = None
         ) -> list[str]:
    """Answered requests (with one of `statuses`, default any) whose document is missing."""
    return [p for p, s in load.status_of.items()
            if (statuses is None or s in statuses) and p not in stored_paths]


# ---- raw HTTP --------------------------------------------------------------------------------


class Answer(NamedTuple):
    """One HTTP/1.1 response as the campaign reads it."""

    status: int
    keep: bool
    """The connection stays open."""
    server: bytes
    """The Server header: mitmproxy's own error answers (a request it could not parse) say
    `mitmproxy …`; the addon's and the upstream's do not."""


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """Read one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    server = headers.get(b"server", b"")
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif b"content-length" in headers:
        await reader.readexactly(int(headers[b"content-length"]))
    else:
        await reader.read()
        return Answer(status, False, server)
    return Answer(status, headers.get(b"connection", b"").lower() != b"close", server)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response; (status, whether the connection stays open)."""
    answer = await read_answer(reader)
    return answer.status, answer.keep


async def raw_request(port: int, data: bytes, timeout: float = 10.0) -> int | str:
    """Send `data` on a new connection to 127.0.0.1:`port`; the status, or why there was none."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(data)
                await writer.drain()
                status, _ = await read_response(reader)
                return status
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return "timeout"
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        return type(e).__name__


