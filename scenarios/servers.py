"""Real servers for live runs and tests: the auth server and the upstream "shop".

**Auth server** (``python -m scenarios auth-server``): users and bearer tokens for the filter.

- ``POST /login`` ``{"user": "alice"}`` → 200 ``{"token": "…", "user": "alice"}``; the user is
  created when new (no passwords: a test server). An optional ``"token"`` member registers that
  token instead of a random one (deterministic tests); 409 if it belongs to another user.
- ``GET /verify`` with ``Authorization: Bearer <token>`` → 200 ``{"user": …}`` for a known,
  unrevoked token, else 401 (also for a missing or malformed header). The filter calls this.
- ``POST /logout`` with the bearer token → 200 and the token is revoked; unknown → 401.
- ``GET /healthz`` → 200; ``GET /stats`` → request counts per endpoint and status;
  ``GET|PUT /faults`` → the injected latency and failure rate of ``/verify``.

Tokens are ``secrets.token_urlsafe(32)``; only their SHA-256 hex digest (``hash``) is stored or
logged. Collections (SPEC §8): ``users {name, created}`` and ``tokens {hash, user, issued,
revoked, revoked_at?}``. A token is valid for ``token_lifetime`` (default a day) after issue.

Design choice, so that ``/verify`` never waits for a store (a server far away, or busy):
**memory is authoritative, the store is written behind.** At start-up the server deletes
revoked and expired tokens from the store and loads the rest, and the users; requests are
answered from memory. Writes go in order through one writer thread that collects them for
0.2 s and applies them in batches (n revocations are one ``update_many``), retries while the
store is away and flushes on SIGTERM/SIGINT; ``/stats`` shows ``pending_writes``.
Consequences: run one auth server per store (tokens written into the store by another process
after start-up are not seen), and a SIGKILL loses the last 0.2 s of writes.

**Shop** (``python -m scenarios shop``): the upstream behind the proxy. Any ``GET`` → 200 with a
small HTML product page, ``/logout`` and any other method → 200 JSON. ``GET /_shop/stats`` →
request counts (Python server only). ``--nginx`` runs nginx (where installed) with an equivalent
configuration instead.

Both bind ``127.0.0.1`` by default, log one line at start-up, run until SIGTERM or SIGINT and
then exit 0. A port in use is a :class:`ScenarioError` naming it.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import html
import json
import logging
import os
import queue
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from addons.telemetry.store import open_store, redact
from scenarios.trace import ScenarioError

logger = logging.getLogger(__name__)

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_STORE: Final = ".wasm-reclaim/auth-store"
DEFAULT_DATABASE: Final = "wasm_reclaim"
DEFAULT_TOKEN_LIFETIME: Final = 86400.0  # seconds
MAX_USER_LEN: Final = 256
MAX_TOKEN_LEN: Final = 4096

# RFC 6750 §2.1: ``Authorization: Bearer <b64token>`` (scheme case-insensitive).
_BEARER: Final = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*) *")
_TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


# -- pure helpers ----------------------------------------------------------------------------


def token_hash(token: str) -> str:
    """The SHA-256 hex digest under which a token is stored and logged."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None if missing/malformed."""
    if not header or len(header) > MAX_TOKEN_LEN + 16:
        return None
    m = _BEARER.fullmatch(header)
    return m.group(1) if m else None


def valid_token(token: object) -> bool:
    """Whether a client-chosen token is a bearer token (RFC 6750 b64token, at most 4 KiB)."""
    return isinstance(token, str) and len(token) <= MAX_TOKEN_LEN and bool(_TOKEN.fullmatch(token))


# -- the store writer ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    """One store write: insert ``doc`` into ``collection``, or set ``fields`` (and ``stamp``)
    on the documents whose ``hash`` is ``key``. Consecutive writes of one shape are applied
    together."""

    collection: str
    doc: dict[str, Any] | None = None
    key: str | None = None
    fields: tuple[tuple[str, Any], ...] = ()
    stamp: str | None = None  # a field set to the time the store applies the write


def coalesce(writes: list[Write]) -> list[tuple[str, list[Write]]]:
    """Group writes into store operations: (``"insert"`` or ``"update"``, writes).

    Collections are independent, so the writes are first split by collection (in order of
    first appearance); within one collection the order is kept and consecutive inserts become
    one ``insert_many``, consecutive updates that set the same fields one ``update_many`` with
    ``$in`` (n queries become one).
    """
    by_collection: dict[str, list[Write]] = {}
    for w in writes:
        by_collection.setdefault(w.collection, []).append(w)
    out: list[tuple[str, list[Write]]] = []
    for group in by_collection.values():
        runs: list[tuple[str, list[Write]]] = []
        for w in group:
            kind = "insert" if w.doc is not None else "update"
            if runs:
                last_kind, last = runs[-1]
                head = last[0]
                if last_kind == kind and (
                        kind == "insert" or (head.fields, head.stamp) == (w.fields, w.stamp)):
                    last.append(w)
                    continue
            runs.append((kind, [w]))
        out.extend(runs)
    return out


class StoreWriter:
    """Applies :class:`Write` s to ``db`` in order on one thread, in batches.

    The thread waits ``linger`` s after the first write of a batch to collect more (at most
    ``max_batch``), then applies them; a failed batch is retried every ``RETRY_S`` s (the store
    is away) until :meth:`close` gives up.
    """

    RETRY_S: Final = 1.0

    def __init__(self, db: Any, linger: float = 0.2, max_batch: int = 1000) -> None:
        self.db = db
        self.linger = linger
        self.max_batch = max_batch
        self._queue: queue.Queue[Write | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auth-store-writer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Writes queued or in progress."""
        return self._pending

    def submit(self, write: Write) -> None:
        with self._lock:
            self._pending += 1
        self._queue.put(write)

    def close(self, timeout: float = 10.0) -> int:
        """Flush for at most ``timeout`` s, then stop. Returns the number of writes given up."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._closing.set()
        self._thread.join(self.RETRY_S + 1)
        return self._pending

    def _batch(self) -> tuple[list[Write], bool]:
        """The next writes (blocking for the first); True when the queue has been closed."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.linger
        while len(batch) < self.max_batch:
            try:
                w = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if w is None:
                return batch, True
            batch.append(w)
        return batch, False

    def _run(self) -> None:
        closed = False
        while not closed:
            batch, closed = self._batch()
            for kind, group in coalesce(batch):
                while not self._apply(kind, group):
                    if self._closing.wait(self.RETRY_S):
                        return
                with self._lock:
                    self._pending -= len(group)

    def _apply(self, kind: str, group: list[Write]) -> bool:
        coll = self.db[group[0].collection]
        try:
            if kind == "insert":
                # unordered: with the unique indexes, documents already there (another
                # process's, or a retried batch's) are rejected one by one, the rest go in
                coll.insert_many([dict(w.doc or {}) for w in group], ordered=False)
            else:
                keys = [w.key for w in group]
                query = {"hash": keys[0]} if len(keys) == 1 else {"hash": {"$in": keys}}
                fields = dict(group[0].fields)
                if group[0].stamp:
                    fields[group[0].stamp] = datetime.now(UTC)
                coll.update_many(query, {"$set": fields})
            return True
        except Exception as e:  # the store is away or refused: keep the order, retry
            if _duplicate_only(e):  # an insert that landed before a failure was retried
                return True
            logger.warning("store write failed, retrying in %g s: %s", self.RETRY_S, e)
            return False


def _duplicate_only(e: Exception) -> bool:
    details = getattr(e, "details", None)
    errors = details.get("writeErrors") if isinstance(details, dict) else None
    if not errors:
        return False
    return all(err.get("code") == 11000 for err in errors)


# -- the auth server -------------------------------------------------------------------------


@dataclass
class Faults:
    """Injected into ``/verify``: a delay before answering and a share of 503 answers."""

    latency_ms: float = 0.0
    fail_rate: float = 0.0

    def __post_init__(self) -> None:
        if not (self.latency_ms >= 0 and self.latency_ms < 3_600_000):
            raise ScenarioError(f"latency_ms must be in [0, 3600000), got {self.latency_ms}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ScenarioError(f"fail_rate must be in [0, 1], got {self.fail_rate}")


def _json(status: int, body: dict[str, Any], **headers: str) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json",
        headers=headers or None,
    )


def _unauthorized(error: str) -> web.Response:
    return _json(401, {"error": error}, **{"WWW-Authenticate": 'Bearer realm="wasm-reclaim"'})


class AuthService:
    """The auth server's state (users, token hashes, counters) and its aiohttp application.

    ``db`` is a pymongo-like Database, or None for a memory-only server. Tokens older than
    ``token_lifetime`` seconds (None: forever) are invalid. Call :meth:`load` before serving
    and :meth:`close` after.
    """

    def __init__(self, db: Any, faults: Faults | None = None, seed: int | None = None,
                 token_lifetime: float | None = DEFAULT_TOKEN_LIFETIME,
                 clock: Callable[[], float] = time.time) -> None:
        if token_lifetime is not None and not token_lifetime > 0:
            raise ScenarioError(f"token lifetime must be > 0 s, got {token_lifetime}")
        self.db = db
        self.faults = faults or Faults()
        self.token_lifetime = token_lifetime
        self._clock = clock
        self._rng = random.Random(seed)
        self.users: set[str] = set()
        self.valid: dict[str, tuple[str, float]] = {}  # token hash → (user, issued epoch s)
        self.revoked: dict[str, str] = {}  # token hash → user
        self.requests: Counter[str] = Counter()
        self.statuses: dict[str, Counter[int]] = {}
        self.injected = 0
        self.expired = 0
        self.purged = 0
        self.started = clock()
        self._writer = StoreWriter(db) if db is not None else None

    # -- store ---------------------------------------------------------------------------

    def load(self) -> None:
        """Create the indexes, delete revoked and expired tokens, read the rest (blocking).

        Revoked tokens can never be valid again, so they are dropped at start-up rather than
        kept forever.
        """
        if self.db is None:
            return
        self.db.users.create_index("name", unique=True)
        self.db.tokens.create_index("hash", unique=True)
        drop: dict[str, Any] = {"revoked": True}
        if self.token_lifetime is not None:
            # naive UTC, as pymongo and the embedded store give stored times back
            cutoff = datetime.fromtimestamp(self._clock() - self.token_lifetime, UTC)
            cutoff = cutoff.replace(tzinfo=None)
            drop = {"$or": [drop, {"issued": {"$lt": cutoff}}]}
        if "tokens" in self.db.list_collection_names():
            self.purged = int(self.db.tokens.delete_many(drop).deleted_count)
        for doc in self.db.users.find({}, {"name": 1}):
            self.users.add(str(doc["name"]))
        for doc in self.db.tokens.find({}, {"hash": 1, "user": 1, "issued": 1, "revoked": 1}):
            issued = doc.get("issued")
            if isinstance(issued, datetime):
                ts = (issued if issued.tzinfo else issued.replace(tzinfo=UTC)).timestamp()
            else:
                ts = self._clock()
            if doc.get("revoked"):
                self.revoked[str(doc["hash"])] = str(doc["user"])
            else:
                self.valid[str(doc["hash"])] = (str(doc["user"]), ts)

    def _write(self, write: Write) -> None:
        if self._writer is not None:
            self._writer.submit(write)

    @property
    def pending_writes(self) -> int:
        return self._writer.pending if self._writer else 0

    def close(self, timeout: float = 10.0) -> None:
        """Flush the store writes (at most ``timeout`` s) and close the client."""
        if self._writer is not None:
            lost = self._writer.close(timeout)
            if lost:
                logger.error("auth server: %d store writes not delivered", lost)
        client = getattr(self.db, "client", None)
        if client is not None:
            client.close()

    # -- operations (memory first, store behind) -----------------------------------------

    def login(self, user: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
        """Issue (or register) a token for ``user``; (status, body)."""
        now = self._clock()
        stamp = datetime.fromtimestamp(now, UTC)
        if token is None:
            token = secrets.token_urlsafe(32)
        h = token_hash(token)
        known = self.valid.get(h)
        owner = known[0] if known else self.revoked.get(h)
        if owner is not None and owner != user:
            return 409, {"error": "token belongs to another user"}
        if user not in self.users:
            self.users.add(user)
            self._write(Write("users", doc={"name": user, "created": stamp}))
        if known is not None and self._alive(known):
            return 200, {"token": token, "user": user}
        if known is not None or self.revoked.pop(h, None) is not None:
            # a registered token that expired or was revoked, logged in again
            self._write(Write("tokens", key=h,
                              fields=(("revoked", False), ("issued", stamp))))
        else:
            doc = {"hash": h, "user": user, "issued": stamp, "revoked": False}
            self._write(Write("tokens", doc=doc))
        self.valid[h] = (user, now)
        return 200, {"token": token, "user": user}

    def _alive(self, entry: tuple[str, float]) -> bool:
        return self.token_lifetime is None or self._clock() - entry[1] <= self.token_lifetime

    def verify(self, token: str) -> str | None:
        """The user of a valid token, else None."""
        entry = self.valid.get(token_hash(token))
        if entry is None:
            return None
        if not self._alive(entry):
            self.expired += 1
            return None
        return entry[0]

    def logout(self, token: str) -> bool:
        """Revoke a valid token; False if it is unknown, expired or already revoked."""
        h = token_hash(token)
        entry = self.valid.get(h)
        if entry is None or not self._alive(entry):
            return False
        del self.valid[h]
        self.revoked[h] = entry[0]
        self._write(Write("tokens", key=h, fields=(("revoked", True),), stamp="revoked_at"))
        return True

    def stats(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "statuses": {k: {str(s): n for s, n in v.items()} for k, v in self.statuses.items()},
            "injected_failures": self.injected,
            "users": len(self.users),
            "valid_tokens": len(self.valid),
            "revoked_tokens": len(self.revoked),
            "expired_verifications": self.expired,
            "purged_at_start": self.purged,
            "pending_writes": self.pending_writes,
            "uptime_s": round(time.time() - self.started, 3),
        }

    # -- HTTP ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count], client_max_size=64 * 1024)
        app.router.add_post("/login", self._login, name="login")
        app.router.add_get("/verify", self._verify, name="verify", allow_head=False)
        app.router.add_post("/logout", self._logout, name="logout")
        app.router.add_get("/healthz", self._healthz, name="healthz")
        app.router.add_get("/stats", self._stats, name="stats")
        app.router.add_get("/faults", self._get_faults, name="faults")
        app.router.add_put("/faults", self._put_faults, name="faults-put")
        return app

    @web.middleware
    async def _count(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route.name or "other"
        name = route.removesuffix("-put")
        self.requests[name] += 1
        try:
            response = await handler(request)
        except web.HTTPException as e:
            self.statuses.setdefault(name, Counter())[e.status] += 1
            raise
        self.statuses.setdefault(name, Counter())[response.status] += 1
        return response

    async def _login(self, request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=json.loads)
        except (ValueError, UnicodeDecodeError):
            return _json(400, {"error": "body must be JSON: {\"user\": NAME}"})
        if not isinstance(body, dict):
            return _json(400, {"error": "body must be a JSON object: {\"user\": NAME}"})
        user = body.get("user")
        if not isinstance(user, str) or not user or len(user) > MAX_USER_LEN:
            return _json(400, {"error": f"'user' must be a string of 1..{MAX_USER_LEN} chars"})
        token = body.get("token")
        if token is not None and not valid_token(token):
            return _json(400, {"error": "'token' must be a bearer token (RFC 6750 b64token)"})
        status, out = self.login(user, token)
        return _json(status, out)

    async def _verify(self, request: web.Request) -> web.Response:
        f = self.faults
        if f.latency_ms:
            await asyncio.sleep(f.latency_ms / 1000)
        if f.fail_rate and self._rng.random() < f.fail_rate:
            self.injected += 1
            return _json(503, {"error": "injected failure"})
        token = parse_bearer(request.headers.get("Authorization"))
        if token is None:
            return _unauthorized("missing or malformed 'Authorization: Bearer' header")
        user = self.verify(token)
        if user is None:
            return _unauthorized("unknown or revoked token")
        return _json(200, {"user": user})

    async def _logout(self, request: web.Request) -> web.Response:
        token = parse_bearer(request.headers.get("Authorization"))
        if token is None:
            return _unauthorized("missing or malformed 'Authorization: Bearer' header")
        if not self.logout(token):
            return _unauthorized("unknown or revoked token")
        return _json(200, {"revoked": True})

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json(200, {"ok": True})

    async def _stats(self, request: web.Request) -> web.Response:
        return _json(200, self.stats())

    async def _get_faults(self, request: web.Request) -> web.Response:
        return _json(200, {"latency_ms": self.faults.latency_ms,
                           "fail_rate": self.faults.fail_rate})

    async def _put_faults(self, request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=json.loads)
            if not isinstance(body, dict):
                raise ValueError("not an object")
            self.faults = Faults(
                float(body.get("latency_ms", self.faults.latency_ms)),
                float(body.get("fail_rate", self.faults.fail_rate)),
            )
        except (ValueError, TypeError, UnicodeDecodeError, ScenarioError) as e:
            return _json(400, {"error": f"expected {{latency_ms, fail_rate}}: {e}"})
        return await self._get_faults(request)


# -- the shop (Python) -----------------------------------------------------------------------

_PAGE: Final = (
    "<!doctype html><html><head><title>Shop: {title}</title></head><body>"
    "<h1>{title}</h1><p>Price: {price}.00 EUR</p><form method=post action=/cart>"
    "<button>Add to cart</button></form></body></html>"
)


class Shop:
    """A trivial e-commerce upstream: GET → product page, anything else → JSON ``{"ok": true}``."""

    STATS_PATH: Final = "/_shop/stats"

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()

    async def handle(self, request: web.BaseRequest) -> web.Response:
        method, path = request.method, request.path
        if path == self.STATS_PATH:  # not counted
            return _json(200, {"requests": sum(self.requests.values()),
                               "methods": dict(self.requests)})
        self.requests[method] += 1
        if method in ("GET", "HEAD") and path != "/logout":
            title = html.escape(path)
            page = _PAGE.format(title=title, price=len(path) * 7 % 100 + 1)
            return web.Response(text=page, content_type="text/html")
        if request.can_read_body:
            await request.read()
        return web.Response(body=b'{"ok": true}', content_type="application/json")


# -- serving ---------------------------------------------------------------------------------


def _listen_error(host: str, port: int, e: OSError) -> ScenarioError:
    if e.errno == errno.EADDRINUSE:
        return ScenarioError(f"cannot listen on {host}:{port}: the port is already in use")
    reason = os.strerror(e.errno) if e.errno else str(e)
    return ScenarioError(f"cannot listen on {host}:{port}: {reason}")


async def _serve(
    make_runner: Callable[[], web.BaseRunner], host: str, port: int,
    banner: Callable[[str], str],
) -> None:
    """Listen on ``host:port``, log ``banner(url)``, wait for SIGTERM/SIGINT, clean up."""
    runner = make_runner()
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise _listen_error(host, port, e) from None
    bound = runner.addresses[0]
    url = f"http://{bound[0]}:{bound[1]}"
    logger.info(banner(url))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def run_auth_server(
    port: int,
    store: str | None = DEFAULT_STORE,
    *,
    host: str = DEFAULT_HOST,
    database: str = DEFAULT_DATABASE,
    faults: Faults | None = None,
    seed: int | None = None,
    token_lifetime: float | None = DEFAULT_TOKEN_LIFETIME,
) -> int:
    """Serve the auth server until SIGTERM/SIGINT (``store`` None: memory only). Exit code."""
    try:
        db = open_store(store, database) if store else None
        service = AuthService(db, faults, seed, token_lifetime)
        t0 = time.perf_counter()
        service.load()
    except ScenarioError:
        raise
    except Exception as e:  # pymongo's ServerSelectionTimeoutError, sqlite errors, …
        raise ScenarioError(f"store {redact(store or '')}: {e}") from None
    where = f"store {redact(store)} db {database}" if store else "no store (memory only)"
    loaded = time.perf_counter() - t0

    def banner(url: str) -> str:
        f = service.faults
        inject = (f", /verify latency {f.latency_ms:g} ms, fail rate {f.fail_rate:g}"
                  if f.latency_ms or f.fail_rate else "")
        return (f"auth server listening on {url} ({where}: {len(service.users)} users, "
                f"{len(service.valid)} valid tokens, {service.purged} revoked or expired "
                f"deleted, loaded in {loaded:.2f} s{inject})")

    def runner() -> web.BaseRunner:
        return web.AppRunner(service.app(), access_log=None, handle_signals=False)

    try:
        asyncio.run(_serve(runner, host, port, banner))
    finally:
        service.close()
    return 0


def run_shop(port: int, *, host: str = DEFAULT_HOST) -> int:
    """Serve the Python shop until SIGTERM/SIGINT. Exit code."""
    shop = Shop()
    def runner() -> web.BaseRunner:
        server = web.Server(shop.handle, access_log=None)
        return web.ServerRunner(server, handle_signals=False)

    asyncio.run(_serve(runner, host, port, lambda url: f"shop listening on {url} (python)"))
    return 0


# -- the shop (nginx) ------------------------------------------------------------------------


def nginx_config(host: str, port: int, prefix: Path) -> str:
    """A minimal foreground nginx configuration for the shop, with every path under ``prefix``."""
    p = prefix
    temps = "\n".join(
        f"    {name}_temp_path {p / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
daemon off;
master_process on;
worker_processes 1;
pid {p / "nginx.pid"};
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000;
{temps}
    server {{
        listen {host}:{port} reuseport;
        default_type text/html;
        location = /logout {{
            rewrite ^ /_shop/ok last;
        }}
        location = /_shop/ok {{
            internal;
            default_type application/json;
            return 200 '{{"ok": true}}';
        }}
        location / {{
            if ($request_method !~ "^(GET|HEAD)$") {{
                rewrite ^ /_shop/ok last;
            }}
            return 200 '{_PAGE.format(title="product", price=42)}';
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    """nginx on PATH, or Debian's ``/usr/sbin/nginx`` (not on a normal user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None


def run_nginx_shop(port: int, *, host: str = DEFAULT_HOST, nginx: str | None = None) -> int:
    """Run nginx (``nginx``: its binary, default :func:`find_nginx`) in the foreground as the
    shop until SIGTERM/SIGINT. Exit code."""
    binary = nginx or find_nginx()
    if binary is None:
        raise ScenarioError("--nginx: nginx is not installed (the Python shop needs nothing)")
    if not Path(binary).is_file():
        raise ScenarioError(f"--nginx: {binary} does not exist")
    _check_port(host, port)
    with tempfile.TemporaryDirectory(prefix="wasm-reclaim-nginx-") as tmp:
        prefix = Path(tmp)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_config(host, port, prefix))
        args = [binary, "-e", "stderr", "-p", str(prefix), "-c", str(conf)]
        proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        stop = threading.Event()

        def forward(signum: int, frame: object) -> None:
            stop.set()
            if proc.poll() is None:
                proc.terminate()  # nginx: SIGTERM is a fast shutdown

        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                logger.info("shop listening on http://%s:%d (nginx %s)", host, port, binary)
            assert proc.stderr is not None
            for line in proc.stderr:  # nginx's warnings and errors, until it exits
                print(line, end="", file=sys.stderr)
            code = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if stop.is_set():
        return 0
    raise ScenarioError(f"nginx exited with {code}")


def _check_port(host: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nginx: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError as e:
            raise _listen_error(host, port, e) from None


def setup_logging() -> None:
    """One-line log records on stderr (the servers' start-up line, store warnings)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
