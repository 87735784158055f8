"""wasm_auth: run Proxy-Wasm filters on live traffic in mitmproxy.

    mitmdump -s addons/wasm_auth.py --mode reverse:http://127.0.0.1:8000 \\
        --set keep_host_header=true --set wasm_cluster=auth=http://127.0.0.1:8090

Every request goes through a Proxy-Wasm filter (by default the bundled auth-cache filter)
running under wasmtime, one filter instance per upstream host (`wasm_instance_key=host`). The
filter's decision is applied: continue, a local response (401, 503…), or a pause until its
outbound auth call returns. What the paper's manager needs is recorded: every request, every
auth call, every restart, and per instance every `wasm_sample_interval` a sample of allocated
memory, requests and outbound calls. Documents go to a local spool and a separate shipper
process delivers them to MongoDB or the embedded store, so the proxy never waits for the
database and nothing is lost while it is away. An admin endpoint (loopback, bearer token)
lists instances and restarts them; the `wasm.status` and `wasm.restart` commands do the same
from mitmproxy's console or mitmweb.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Iterable, MutableMapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar, Literal, NamedTuple, cast

from mitmproxy import command, connection, ctx, exceptions, http, types
from mitmproxy.net.http.http1 import expected_http_body_size
from mitmproxy.utils import human

# Import `addons` from the checkout this file is in, not from wherever pip put one: mitmproxy
# runs `-s addons/wasm_auth.py` as the module `__mitmproxy_script__.wasm_auth`, so `import
# addons` would find whichever checkout is installed, and a user with two checkouts would run
# the other one's host without knowing it.
if __name__ != "addons.wasm_auth":  # a script (mitmproxy's -s), not the package's module
    _ROOT = Path(__file__).resolve().parent.parent
    _LOADED = getattr(sys.modules.get("addons"), "__file__", None)
    if "addons" in sys.modules and (_LOADED is None
                                    or Path(_LOADED).resolve().parent.parent != _ROOT):
        for _name in [m for m in sys.modules if m == "addons" or m.startswith("addons.")]:
            del sys.modules[_name]
    if str(_ROOT) not in sys.path[:1]:
        sys.path.insert(0, str(_ROOT))

from addons import lifecycle
from addons.admin import (
    AdminServer,
    TokenFileError,
    check_listen,
    load_or_create_token,
    parse_listen,
)
from addons.instance_bounds import (
    OVERFLOW_MODES,
    InstanceBounds,
    InvalidKey,
    Refusal,
    parse_allow,
    parse_instance_key,
)
from addons.logsafe import RateLimit, escape, install, shown_url
from addons.proxywasm import (
    WASM_PAGE_SIZE,
    AuthCallRecord,
    Decision,
    FilterLoadError,
    FilterModule,
    FilterStartError,
    Host,
    HostEvents,
    HttpxDispatcher,
    InProcessDispatcher,
    Limits,
    LocalResponse,
    RestartError,
    RestartRecord,
    ScaledClock,
    Stream,
    WallClock,
)
from addons.proxywasm.clock import Clock
from addons.proxywasm.headers import Pairs, view_fields
from addons.proxywasm.host import RestartMode
from addons.proxywasm.journal import JournalConfig, window_from_config
from addons.telemetry import records
from addons.telemetry.spool import redact_names

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILTER = ROOT / "filters" / "auth_cache.wasm"
STATE_DIR = Path(".wasm-reclaim")
LIVE_ENTRIES, LIVE_BYTES = records.LIVE_ENTRIES, records.LIVE_BYTES
HEARTBEAT_S = 5.0  # wall seconds between two `proxies` documents
POLL_MAX_S = 1.0
"""The poll loop's longest sleep (wall seconds) when no host has anything due sooner: how late
a stream that a filter paused with nothing left to wake it may be failed."""
REPLAY_STEP = 200
"""Events a warm restart replays between two turns of the event loop (admin endpoint)."""
IDLE_SAMPLE_EVERY = 60
"""An instance whose observation did not change is sampled once per this many intervals."""
KEY_CACHE = 4096
"""At most this many Host values keep their parsed instance key (`WasmAuth._keys`)."""
DENIED_MARK = ":no_entry:"
FAILED_MARK = ":warning:"


# --------------------------------------------------------------------------------------------
# Parsing options (pure; each has its own parametrized test)
# --------------------------------------------------------------------------------------------


def parse_clusters(specs: Sequence[str]) -> dict[str, str]:
    """`["auth=http://127.0.0.1:8081"]` → {"auth": "http://127.0.0.1:8081"}."""
    clusters: dict[str, str] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        name, url = name.strip(), url.strip()
        if not sep or not name or not url:
            raise ValueError(f"wasm_cluster: expected NAME=URL, got {spec!r}")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"wasm_cluster {name}: URL must start with http:// or https://, "
                             f"got {shown_url(url)!r}")
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises on a port that is not one
        except ValueError as e:
            raise ValueError(f"wasm_cluster {name}: {shown_url(url)!r} is not a URL: {e}") from None
        if not parts.hostname:
            raise ValueError(f"wasm_cluster {name}: {shown_url(url)!r} names no host")
        if name in clusters:
            raise ValueError(f"wasm_cluster: {name!r} is given twice")
        clusters[name] = url.rstrip("/")
    return clusters


def check_spool(spool: Path) -> None:
    """The metrics spool must be a directory this process can write (made if missing);
    `OptionsError` naming it otherwise, so that the proxy never runs losing its metrics."""
    from addons.telemetry.spool import private_dir

    try:
        private_dir(spool)
        writable = os.access(spool, os.W_OK | os.X_OK)
    except OSError as e:
        raise exceptions.OptionsError(f"wasm_spool: cannot use {spool}: "
                                      f"{e.strerror or e}") from None
    if not writable:
        raise exceptions.OptionsError(f"wasm_spool: cannot use {spool}: not writable")


def parse_config_bytes(value: str, where: str) -> bytes:
    """A configuration passed to the filter as bytes: the text itself, or `@path` to a file.

    The host does not interpret it (JSON is the reference filter's format, not the host's),
    as Envoy passes `configuration` through.
    """
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            return path.read_bytes()
        except OSError as e:
            raise ValueError(f"{where}: cannot read {path}: {e.strerror or e}") from e
    return value.strip().encode()


def parse_filter_config(value: str) -> bytes:
    """The plugin configuration (`wasm_filter_config`): text, or `@path` to a file."""
    return parse_config_bytes(value.strip(), "wasm_filter_config")


def parse_positive(name: str, value: str) -> float:
    """A positive number given as text (mitmproxy options have no float type)."""
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a number") from None
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError(f"{name}: must be a positive number, got {value!r}")
    return number


def parse_restart_mode(value: str, where: str = "wasm_restart_mode") -> RestartMode:
    """`cold` or `warm` (any case, spaces ignored)."""
    mode = value.strip().lower()
    if mode == "cold":
        return "cold"
    if mode == "warm":
        return "warm"
    raise ValueError(f"{where}: expected 'cold' or 'warm', got {value!r}")


WarmRestart = Literal["auto", "on", "off"]
WARM_RESTART: tuple[WarmRestart, ...] = ("auto", "on", "off")


def parse_warm_restart(value: str) -> WarmRestart:
    """`auto`, `on` or `off` (any case, spaces ignored)."""
    mode = value.strip().lower()
    for known in WARM_RESTART:
        if mode == known:
            return known
    raise ValueError(f"wasm_warm_restart: expected 'auto', 'on' or 'off', got {value!r}")


def parse_journal(window: str, limit_mib: int, plugin_configuration: bytes) -> JournalConfig:
    """The journal for warm restarts: at most `limit_mib` MiB per instance; its window is
    `window` seconds, or (0) the filter configuration's `ttl_seconds` (else 600 s)."""
    if limit_mib < 1:
        raise ValueError(f"wasm_journal_limit: must be at least 1 MiB, got {limit_mib} "
                         "(wasm_warm_restart=off turns journaling off)")
    seconds = 0.0 if window.strip() in ("", "0") else parse_positive("wasm_journal_window",
                                                                     window)
    return JournalConfig(window_from_config(plugin_configuration, seconds), limit_mib * 2**20)


def parse_store(value: str) -> str:
    """`mongodb://…` as is; empty → $MONGODB_URI, else the embedded store's directory."""
    value = value.strip() or os.environ.get("MONGODB_URI", "")
    if value.startswith("mongodb://"):  # checked now (a +srv host would be resolved: later)
        from pymongo.errors import ConfigurationError, InvalidURI
        from pymongo.uri_parser import parse_uri

        from addons.telemetry.store import redact

        try:
            parse_uri(value)
        except (ConfigurationError, InvalidURI, ValueError) as e:
            raise ValueError(f"wasm_store: {redact(value)}: {str(e).splitlines()[0]}") from None
    if value.startswith(("mongodb://", "mongodb+srv://")):
        return value
    return str(Path(value or STATE_DIR / "store").expanduser())


def stream_limit(stream_large_bodies: str | None) -> int:
    """mitmproxy's `stream_large_bodies` in bytes (bodies larger than that are streamed), or 0
    when it streams none."""
    try:
        return human.parse_size(stream_large_bodies) or 0
    except ValueError:
        return 0


def streams_midway(request: http.Request) -> bool:
    """Whether mitmproxy, with `stream_large_bodies` set, may start to stream this request's
    body only once it has read part of it: its size is not known from its headers (chunked
    HTTP/1, or HTTP/2 and 3 without Content-Length). It then sends the headers upstream without
    a `requestheaders` hook, so the addon streams such a request from its headers on: the
    filter decides first, and its body goes to the filter chunk by chunk."""
    headers = request.headers
    if "content-length" in headers:
        return False
    return "transfer-encoding" in headers if request.http_version.startswith("HTTP/1") else True


def response_streams_midway(flow: http.HTTPFlow) -> bool:
    """Whether mitmproxy, with `stream_large_bodies` set, may start to stream this response's
    body only once it has read part of it, sending its headers to the client with no hook: its
    size is not known from its headers (chunked, or read until the connection closes)."""
    assert flow.response is not None
    try:
        size = expected_http_body_size(flow.request, flow.response)
    except ValueError:  # mitmproxy streams no body with a malformed length
        return False
    return size is None or size < 0


def answer_would_crash(request: http.Request, limit: int) -> bool:
    """Whether answering this streamed request locally would crash mitmproxy's connection: it
    reads a body it does not stream before it answers, and on reading more than
    `stream_large_bodies` it starts to stream it, which it cannot do with a response set
    (NotImplementedError). True for a body longer than `limit`, and for chunked HTTP/1 (its
    size is not known): such a request is reset instead. A streamed HTTP/2 or 3 request without
    Content-Length is answered; should its body exceed the limit, mitmproxy fails the
    connection (the request never reaches the upstream)."""
    length = request.headers.get("content-length")
    if length is not None:
        return not length.isdigit() or int(length) > limit
    return request.http_version.startswith("HTTP/1") and streams_midway(request)


def parse_proxy_id(value: str, listen_port: int | None) -> str:
    """`wasm_proxy_id`: the name given, else host name and listen port."""
    value = value.strip()
    if not value:
        return records.default_proxy_id(listen_port)
    if len(value) > 200 or not value.isprintable():
        raise ValueError(f"wasm_proxy_id: at most 200 printable characters, got {value!r:.60}")
    return value


class RequestView(NamedTuple):
    """What the hook needs from a request, read from its raw header fields in one pass."""

    pairs: Pairs
    """The request as the filter sees it: the pseudo-headers, then every header field as sent,
    with a lowercase name."""
    authority: bytes
    """The Host header (or HTTP/2 :authority), else the request's host."""
    hosts: int
    """How many Host header fields the request has (more than one is refused)."""
    authorization: bytes | None


def view(flow: http.HTTPFlow) -> tuple[Pairs, bytes, int, bytes | None]:
    """A `RequestView` of the flow's request (as a plain tuple: this runs on every request),
    from one pass over its raw header fields (`headers.view_fields`, in C where the host's
    extension is built: mitmproxy's header lookups are comparatively dear). As in Envoy, the
    filter sees the Host as `:authority` only, and the client's scheme as `:scheme`."""
    data = flow.request.data
    fields, authority, hosts, authorization = view_fields(data.headers.fields)
    if not authority:
        authority = lifecycle.authority_without_host(data)
    return ([(b":method", data.method), (b":path", data.path), (b":authority", authority),
             # `lifecycle.downstream_scheme`, inline (every request): the client's scheme
             (b":scheme", b"http" if flow.client_conn.timestamp_tls_setup is None else b"https"),
             *fields],
            authority, hosts, authorization)


_NOT_IN_REQUEST_LINE = re.compile(rb"[\x00-\x20\x7f]")


def unsafe_request_line(data: Any, authority: bytes) -> bool:
    """Whether the method, path or authority holds what an HTTP/1 request line cannot carry
    (a control character, whitespace). mitmproxy's HTTP/1 parser never lets one through; an
    HTTP/2 or 3 request's pseudo-headers are not checked."""
    return any(_NOT_IN_REQUEST_LINE.search(part) is not None
               for part in (data.method, data.path, authority))


def instance_key(authority: bytes, mode: str) -> str:
    """The filter instance for a request: its host without the port, or one for all.

    In reverse mode mitmproxy rewrites the Host header to the upstream before any hook runs,
    so every flow to one upstream shares an instance; with `keep_host_header` the client's
    Host survives and each virtual host gets its own instance. `InvalidKey` (a ValueError)
    for a Host that is not a host name or address.
    """
    return parse_instance_key(authority, mode)


token_hash = records.token_hash
verdict = records.verdict


def logout_path(plugin_configuration: bytes) -> str:
    """The path whose requests evict their token (the auth filter's `logout_path` key, default
    `/logout`; empty: none)."""
    try:
        config = json.loads(plugin_configuration) if plugin_configuration.strip() else {}
    except ValueError:
        config = {}
    value = config.get("logout_path", "/logout") if isinstance(config, dict) else "/logout"
    return value if isinstance(value, str) else "/logout"


def is_logout(path: bytes, logout: str | bytes) -> bool:
    """Whether `path` (before any query) is the logout path."""
    if isinstance(logout, str):
        logout = logout.encode()
    return bool(logout) and path.partition(b"?")[0] == logout


def describe(word: str, instance: str, generation: int, pages: int, latency_ms: float,
             decision: Decision, note: str = "") -> str:
    """The flow comment mitmweb shows: `wasm: hit · instance shop · gen 0 · 17 pages · 0.4 ms`
    (`note`, such as `token evicted`, after the word)."""
    text = (f"wasm: {word}{' · ' + note if note else ''} · instance {instance} · "
            f"gen {generation} · {pages} page{'' if pages == 1 else 's'} · {latency_ms:.1f} ms")
    if decision.response is not None and decision.response.details:
        text += " · " + decision.response.details
    if decision.error:
        text += " · " + decision.error
    return text


class _Begun(NamedTuple):
    """A request whose filter phases have begun: what `_decided` needs once they decide."""

    streamed: bool
    key: str
    inst: Any
    stream: Stream
    authorization: bytes | None
    logout: bool
    cached_before: int | None
    t0: float


class Settings(NamedTuple):
    """The options, parsed once in configure().

    A NamedTuple, not a dataclass: mitmproxy runs this file as a script without registering
    it in sys.modules, which dataclasses need.
    """

    filter_path: Path
    plugin_configuration: bytes
    vm_configuration: bytes
    root_id: str
    vm_id: str
    clusters: dict[str, str]
    instance_key: str
    instance_allow: tuple[str, ...]
    max_instances: int
    instance_overflow: str
    store: str
    spool_dir: Path
    sample_interval: float
    admin_listen: tuple[str, int] | None
    admin_token: str
    admin_token_file: Path
    memory_limit_mib: int
    fail_open: bool
    clock_speed: float
    deadline_ms: int
    log_metrics: bool
    retention_s: int
    proxy_id: str
    services: tuple[Path, ...]
    redact_params: frozenset[str]
    restart_mode: RestartMode
    warm_restart: WarmRestart
    journal: JournalConfig | None
    """None: journaling is off (`wasm_warm_restart=off`)."""

    @property
    def journal_from_start(self) -> bool:
        """Journal every generation from its start: warm restarts are wanted (`on`, or the
        restart mode is warm). Else (`auto`) journaling starts at the first warm restart asked
        for."""
        return self.journal is not None and (
            self.warm_restart == "on" or self.restart_mode == "warm")


# --------------------------------------------------------------------------------------------
# Metrics: host events and samples become documents
# --------------------------------------------------------------------------------------------


class _Recorder(HostEvents):
    """Turns the host's events into documents for the store."""

    def __init__(self, addon: WasmAuth) -> None:
        self.addon = addon

    def on_auth_call(self, record: AuthCallRecord) -> None:
        self.addon.write("auth_calls", records.auth_call(self.addon.proxy_id, record))

    def on_restart(self, record: RestartRecord) -> None:
        self.addon.write("restarts", records.restart(self.addon.proxy_id, record))

    def on_crash(self, instance: str, generation: int, error: str) -> None:
        """The host has logged the crash (once); nothing more to say."""


class ShipperLog:
    """Relays the shipper process's log lines into this process's log, from a reader thread."""

    LINE = re.compile(r"\[wasm shipper\] (DEBUG|INFO|WARNING|ERROR|CRITICAL): (.*)")
    LEVELS: ClassVar[dict[str, int]] = {
        "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
        "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def pump(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip()
                if line and not self.loop.is_closed():
                    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                        self.loop.call_soon_threadsafe(self.emit, line)

    @classmethod
    def emit(cls, line: str) -> None:
        m = cls.LINE.search(line)
        level = cls.LEVELS[m[1]] if m else logging.WARNING
        logger.log(level, "wasm shipper: %s", m[2] if m else line)


# --------------------------------------------------------------------------------------------
# The addon
# --------------------------------------------------------------------------------------------


def freeze_start_heap(master: Any) -> None:
    """Take what the process has built by now out of the cyclic collector's walks (`gc.freeze`),
    when the script loads as the proxy starts.

    That is the imported code: mitmproxy's, this package's, wasmtime's, aiohttp's, some 100,000
    objects that live as long as the process. Every full collection walked them all (55–90 ms
    each, every few thousand requests, as mitmproxy leaves each finished flow to the
    collector): some 20–40 µs of CPU a request, which this package's imports made a third
    larger. Frozen, a full collection walks only what was built since (3–4 ms).

    Once per process, before any filter instance exists, so that an instance, its store and
    its linear memory are freed as before when a restart drops them (a store is closed
    explicitly in any case). Not when the script is added to a proxy already running (mitmweb's
    options, a reload): its flows would be frozen with the rest, and never collected once
    cleared. Only under a master of mitmproxy's own tools (mitmdump, mitmweb, mitmproxy), whose
    process is the proxy's: not in a program that embeds mitmproxy, nor in its test harness.
    Garbage first, so that none is frozen."""
    if not type(master).__module__.startswith("mitmproxy.tools."):
        return
    server = master.addons.get("proxyserver")
    if getattr(server, "is_running", False) or gc.get_freeze_count() or not gc.isenabled():
        return
    # What the first outbound call imports (httpx, and the asyncio backend of anyio, which
    # httpx's transport loads when it first sends): some 7,000 objects, frozen with the rest.
    for module in ("httpx", "anyio._backends._asyncio"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    gc.collect()
    gc.freeze()


class WasmAuth:
    """Runs a Proxy-Wasm filter from the request hook and records what the manager needs."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.module: FilterModule | None = None
        self.host: Host | None = None
        self.clock: Clock = WallClock()
        self.metrics: Any = None  # addons.telemetry.spool.MetricsLog once running
        self.shipper: subprocess.Popen[bytes] | None = None
        self.admin: AdminServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_pages: dict[str, int] = {}
        self._counts: dict[str, list[int]] = {}  # decisions per instance since its last sample
        self._started_at = time.time()
        self._last_sample: dict[str, tuple[tuple[Any, ...], int]] = {}
        """Per instance: what its last sample showed, and how many intervals ago."""
        self.bounds: InstanceBounds | None = None
        self._logout_path = b"/logout"
        self._keys: dict[bytes, str] = {}
        """Instance keys by Host value, as `instance_key` parsed them (a few hosts, many
        requests); emptied when the options change, and when it holds KEY_CACHE of them."""
        self._closing: set[asyncio.Task[None]] = set()
        self._running = False
        self._open: dict[str, lifecycle.Exchange] = {}
        self._waiting: dict[str, tuple[http.HTTPFlow, Stream]] = {}
        """Flows whose filter phases a hook awaits (paused, or more phases to run), by flow id:
        if their client leaves, `client_disconnected` ends their streams."""
        self._service_modules: dict[Path, FilterModule] = {}
        self.services: list[Host] = []
        """The service plugins' hosts (wasm_service), each with one root-only instance."""
        self._poll_wake = asyncio.Event()
        self._poll_at_ns = -1
        """When the poll loop wakes next (host clock, ns); -1 while it polls."""
        self._exports: frozenset[str] = frozenset()
        self._lifecycle = False
        self._properties = False
        self._stream_limit = 1 << 20
        self._streams_large = False
        self._shipper_started = 0.0
        self._shipper_backoff = 0.5
        self._shipper_retry_at = 0.0
        self._published: MutableMapping[str, Any] | None = None
        """The script module that dispatches to this addon directly (`publish`)."""

    def publish(self, namespace: MutableMapping[str, Any], hook_names: Iterable[str]) -> None:
        """Have `namespace`, the script's module, carry this addon's hooks and commands itself.

        mitmproxy looks every event's hook up on the script's module, then walks the module's
        `addons` list, for every event of every flow (`AddonManager._iter_hooks`: about 8 a
        request with `update`). A hook found on the module costs one lookup less than one found
        on an addon in that list, and a name missing from a module costs a formatted
        AttributeError (2 µs on this machine). So each of `hook_names` is bound on the module
        to this addon's method, or to None where it has none (mitmproxy skips a hook bound to
        None), and `addons` is empty; `_bind_hooks` keeps the module in step.
        """
        self._published = namespace
        for name in hook_names:
            namespace[name] = getattr(self, name, None)
        for name in dir(type(self)):
            method = getattr(self, name)
            if isinstance(getattr(method, "command_name", None), str):
                namespace[name] = method
        namespace["addons"] = ()

    # ---- options ----

    def load(self, loader: Any) -> None:
        """Add the options, then apply the `--set` values given for them. mitmproxy applies
        them itself once `load` returns, and a bad one (`wasm_fail_open=yes`, a number given
        twice) raises there, in its script loader, which drops the error without a word: the
        proxy would then run without the filter. Applied here, each bad value is said in one
        line (mitmdump and mitmweb then stop: "Error logged during startup") and dropped, and
        the addon still loads with the other values, failing closed."""
        freeze_start_heap(loader.master)  # first: before any value is applied
        self._add_options(loader)
        options = loader.master.options
        errors = []
        for name, pending in list(getattr(options, "deferred", {}).items()):
            values = getattr(pending, "val", None)
            if not name.startswith("wasm_") or name not in options or values is None:
                continue
            try:
                options.set(*(f"{name}={value}" for value in values))
            except exceptions.OptionsError as e:
                errors.append(str(e) if name in str(e) else f"{name}: {e}")
            options.deferred.pop(name, None)
        if errors:
            logger.error("wasm_auth: %s", "; ".join(errors))

    def _add_options(self, loader: Any) -> None:
        loader.add_option("wasm_filter", str, str(DEFAULT_FILTER),
                          "Path to the Proxy-Wasm filter (.wasm, ABI 0.2.1, 0.2.0 or 0.1.0).")
        loader.add_option("wasm_filter_config", str, "",
                          "Plugin configuration for the filter, passed as bytes: the text, or "
                          "@path to a file (the bundled filter takes JSON). Empty: the filter's "
                          "defaults.")
        loader.add_option("wasm_root_id", str, "",
                          "Root id of the plugin (Envoy's root_id): which root context of the "
                          "module serves; the filter reads it as plugin_root_id.")
        loader.add_option("wasm_vm_id", str, "",
                          "VM id (Envoy's vm_id); the filter reads it as plugin_vm_id.")
        loader.add_option("wasm_service", Sequence[str], [],
                          "A plugin that runs as a singleton service, with only a root context "
                          "(ticks, outbound calls, shared data and queues shared with the "
                          "filter): PATH to its .wasm, repeatable. It starts with the proxy.")
        loader.add_option("wasm_vm_config", str, "",
                          "VM configuration given to proxy_on_vm_start, as bytes: the text, or "
                          "@path to a file.")
        loader.add_option("wasm_cluster", Sequence[str], [],
                          "Where proxy_http_call may go: NAME=URL, repeatable "
                          "(e.g. auth=http://127.0.0.1:8090).")
        loader.add_option("wasm_instance_key", str, "host",
                          "One filter instance per upstream host ('host', the paper's one "
                          "filter per site), or one for all traffic ('single').")
        loader.add_option("wasm_instance_allow", Sequence[str], [],
                          "Instance keys (hosts) that may have their own filter instance: glob "
                          "patterns such as shop.example or *.shop.example, repeatable. Empty: "
                          "every valid host.")
        loader.add_option("wasm_max_instances", int, 1000,
                          "At most this many filter instances; a new one evicts the least "
                          "recently used idle instance.")
        loader.add_option("wasm_instance_overflow", str, "reject",
                          "A request beyond the instance bounds (host not allowed, or every "
                          "instance busy): 'reject' (421, or 503 with Retry-After) or 'shared' "
                          "(served by one shared instance, '*').")
        loader.add_option("wasm_store", str, "",
                          "Where metrics go: a mongodb:// URI, or a directory for the embedded "
                          "store. Empty: $MONGODB_URI, else .wasm-reclaim/store.")
        loader.add_option("wasm_spool", str, str(STATE_DIR / "spool"),
                          "Directory where metric documents wait until the store has them.")
        loader.add_option("wasm_sample_interval", str, "1",
                          "Seconds (host clock) between memory samples of each instance.")
        loader.add_option("wasm_admin_listen", str, "127.0.0.1:9901",
                          "HOST:PORT of the admin endpoint (bearer token required); empty "
                          "disables it.")
        loader.add_option("wasm_admin_allow_remote", bool, False,
                          "Allow wasm_admin_listen on an address other than loopback (a "
                          "warning is logged); refused otherwise.")
        loader.add_option("wasm_admin_token", str, "",
                          "Bearer token of the admin endpoint. Empty: read or generate one in "
                          "the 0600 file wasm_admin_token_file.")
        loader.add_option("wasm_admin_token_file", str, str(STATE_DIR / "admin-token"),
                          "File holding the generated admin token (mode 0600).")
        loader.add_option("wasm_memory_limit", int, 256,
                          "Linear-memory cap per filter instance, in MiB.")
        loader.add_option("wasm_fail_open", bool, False,
                          "When the filter itself fails (trap, deadline), let requests through "
                          "instead of answering 503.")
        loader.add_option("wasm_clock_speed", str, "1",
                          "Host-clock speed-up for demos: 60 makes a 10-minute TTL pass in 10 s; "
                          "the filter, the samples and the manager see the same clock.")
        loader.add_option("wasm_deadline_ms", int, 100,
                          "A filter callback running longer than this is interrupted (ms).")
        loader.add_option("wasm_log_metrics", bool, True,
                          "Record requests, auth calls, samples and restarts in the store.")
        loader.add_option("wasm_restart_mode", str, "cold",
                          "How restarts run unless asked otherwise: 'cold' (a fresh instance, "
                          "empty cache) or 'warm' (the new instance gets the old one's live "
                          "cache by replaying the journal; no auth call; cold if unsafe).")
        loader.add_option("wasm_warm_restart", str, "auto",
                          "Journal requests so that restarts can run warm: 'auto' (from the "
                          "start when wasm_restart_mode=warm, else from the first warm restart "
                          "asked for), 'on' (always) or 'off' (never: warm restarts run cold). "
                          "Journaling costs time per request.")
        loader.add_option("wasm_journal_window", str, "0",
                          "Seconds of requests the warm-restart journal keeps (host clock); 0: "
                          "the filter configuration's ttl_seconds, else 600.")
        loader.add_option("wasm_journal_limit", int, 64,
                          "Memory cap of the warm-restart journal per instance, in MiB; past "
                          "it a warm restart runs cold.")
        loader.add_option("wasm_proxy_id", str, "",
                          "This proxy's name in the store: every document carries it, and an "
                          "instance is (proxy, instance). Empty: host name and listen port.")
        loader.add_option("wasm_redact_params", str, "",
                          "More query parameters whose values never reach the spool or the "
                          "store, comma-separated (access_token, token, key, api_key and other "
                          "usual ones always are).")
        loader.add_option("wasm_retention", int, 0,
                          "Embedded store only: keep samples, requests and auth calls this many "
                          "seconds (host clock); 0 keeps everything.")

    def configure(self, updated: set[str]) -> None:
        if "stream_large_bodies" in updated:  # mitmproxy's own: it may change while running
            self._read_streaming(ctx.options)
        if not any(name.startswith("wasm_") for name in updated):
            return
        loading = self.host is None  # nothing configured yet: mitmproxy is loading the script
        try:
            self._configure()
        except exceptions.OptionsError as e:
            if loading:
                self.settings = None
                # Loading the script: mitmproxy would log the exception with its traceback.
                # One line instead; mitmdump and mitmweb then stop with "Error logged during
                # startup", and the addon stays inert.
                logger.error("wasm_auth: %s", e)
                return
            raise exceptions.OptionsError(str(e)) from None  # a `set` later: rejected, kept

    def _read_streaming(self, o: Any) -> None:
        """How mitmproxy streams bodies (`stream_large_bodies`): how much of a streamed body a
        pausing filter may hold, and whether requests may be streamed midway at all."""
        size = stream_limit(getattr(o, "stream_large_bodies", None))
        self._streams_large = size > 0
        self._stream_limit = size or 1 << 20  # what a pausing filter may hold back

    def _configure(self) -> None:
        o = ctx.options
        try:
            listen = parse_listen(o.wasm_admin_listen)
            remote_warning = check_listen(listen, o.wasm_admin_allow_remote)
            plugin_configuration = parse_filter_config(o.wasm_filter_config)
            warm = parse_warm_restart(o.wasm_warm_restart)
            settings = Settings(
                filter_path=Path(o.wasm_filter).expanduser(),
                plugin_configuration=plugin_configuration,
                vm_configuration=parse_config_bytes(o.wasm_vm_config.strip(), "wasm_vm_config"),
                root_id=o.wasm_root_id,
                vm_id=o.wasm_vm_id,
                clusters=parse_clusters(o.wasm_cluster),
                instance_key=o.wasm_instance_key,
                instance_allow=parse_allow(o.wasm_instance_allow),
                max_instances=o.wasm_max_instances,
                instance_overflow=o.wasm_instance_overflow,
                store=parse_store(o.wasm_store),
                spool_dir=Path(o.wasm_spool).expanduser(),
                sample_interval=parse_positive("wasm_sample_interval", o.wasm_sample_interval),
                admin_listen=listen,
                admin_token=o.wasm_admin_token,
                admin_token_file=Path(o.wasm_admin_token_file).expanduser(),
                memory_limit_mib=o.wasm_memory_limit,
                fail_open=o.wasm_fail_open,
                clock_speed=parse_positive("wasm_clock_speed", o.wasm_clock_speed),
                deadline_ms=o.wasm_deadline_ms,
                log_metrics=o.wasm_log_metrics,
                retention_s=o.wasm_retention,
                proxy_id=parse_proxy_id(o.wasm_proxy_id, o.listen_port),
                services=tuple(Path(p).expanduser() for p in o.wasm_service),
                redact_params=redact_names(o.wasm_redact_params),
                restart_mode=parse_restart_mode(o.wasm_restart_mode),
                warm_restart=warm,
                journal=None if warm == "off" else parse_journal(
                    o.wasm_journal_window, o.wasm_journal_limit, plugin_configuration),
            )
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from e
        if remote_warning and (self.settings is None
                               or self.settings.admin_listen != settings.admin_listen):
            logger.warning(remote_warning)
        if settings.instance_key not in ("host", "single"):
            raise exceptions.OptionsError(
                f"wasm_instance_key: expected 'host' or 'single', got {settings.instance_key!r}")
        if settings.max_instances < 1:
            raise exceptions.OptionsError("wasm_max_instances: must be at least 1")
        if settings.instance_overflow not in OVERFLOW_MODES:
            raise exceptions.OptionsError(
                f"wasm_instance_overflow: expected one of {', '.join(OVERFLOW_MODES)}, got "
                f"{settings.instance_overflow!r}")
        if settings.memory_limit_mib < 1:
            raise exceptions.OptionsError("wasm_memory_limit: must be at least 1 MiB")
        if settings.deadline_ms < 1:
            raise exceptions.OptionsError("wasm_deadline_ms: must be at least 1 ms")
        if settings.retention_s < 0:
            raise exceptions.OptionsError("wasm_retention: must be 0 or more seconds")
        if settings.log_metrics:
            check_spool(settings.spool_dir)
        previous = self.settings
        if self.module is None or previous is None or previous.filter_path != (
                settings.filter_path):
            try:
                self.module = FilterModule.from_file(settings.filter_path)
            except FilterLoadError as e:
                raise exceptions.OptionsError(f"wasm_filter: {e}") from e
        self._load_services(settings)
        self.settings = settings
        self._exports = self.module.exports
        self._lifecycle = lifecycle.needs_lifecycle(self._exports)
        self._properties = "proxy_get_property" in self.module.imports
        self._read_streaming(o)
        self._logout_path = logout_path(settings.plugin_configuration).encode()
        self._keys = {}
        self._bind_hooks()
        self._build_host(previous)
        assert self.host is not None
        self.bounds = InstanceBounds(self.host, settings.instance_allow, settings.max_instances,
                                     settings.instance_overflow)
        self.bounds.on_evict.append(self._forget)
        if self._running and previous is not None:
            task = asyncio.get_running_loop().create_task(self._restart_services())
            self._closing.add(task)  # keep a reference until it is done
            task.add_done_callback(self._closing.discard)

    def _bind_hooks(self) -> None:
        """Unbind the flow hooks this configuration never needs: mitmproxy skips a hook bound
        to None, and each one it calls costs it more than a whole cache hit in the filter.

        `responseheaders` serves only filters with response callbacks; `response` and `error`
        end what `request` left open: such a filter's stream, or a request's record (metrics
        logged). `request` and `requestheaders` always run: any addon may stream a request,
        and the filter must see its headers before they leave. Called again whenever the
        metrics log starts or stops.
        """
        s = self.settings
        ends = (self._lifecycle or (s is not None and s.log_metrics)
                or self.metrics is not None or bool(self._open))
        for name, wanted in (("responseheaders", self._lifecycle), ("response", ends),
                             ("error", ends)):
            if wanted:
                self.__dict__.pop(name, None)  # the method
            else:
                self.__dict__[name] = None
            if self._published is not None:
                self._published[name] = getattr(self, name)

    def _build_host(self, previous: Settings | None) -> None:
        """(Re)create the host when anything it depends on changed."""
        s = self.settings
        assert s is not None and self.module is not None
        host_fields = ("filter_path", "plugin_configuration", "vm_configuration", "root_id",
                       "vm_id", "clusters", "memory_limit_mib", "fail_open", "clock_speed",
                       "deadline_ms", "journal")
        if self.host is not None and previous is not None and all(
                getattr(previous, f) == getattr(s, f) for f in host_fields):
            if s.journal_from_start:  # e.g. wasm_restart_mode set to warm
                self.host.start_journaling()
            return
        self.clock = WallClock() if s.clock_speed == 1 else ScaledClock(s.clock_speed)
        host = Host(
            self.module,
            HttpxDispatcher(s.clusters, clock_speed=s.clock_speed),
            plugin_configuration=s.plugin_configuration,
            vm_configuration=s.vm_configuration,
            root_id=s.root_id,
            vm_id=s.vm_id,
            clock=self.clock,
            limits=Limits(memory_bytes=s.memory_limit_mib * 2**20, deadline_ms=s.deadline_ms),
            fail_open=s.fail_open,
            events=_Recorder(self),
            journal=s.journal,
            journaling=s.journal_from_start,
        )
        host.on_due = self._due
        # Fail at configuration time, not on the first request, if the filter cannot start.
        try:
            probe = host.instance("__probe__")
        except FilterStartError as e:
            raise exceptions.OptionsError(f"wasm_filter: {e}") from e
        for vm in probe.vms():
            vm.close()
        host.instances.clear()
        old, self.host = self.host, host
        self._last_pages.clear()
        self._last_sample.clear()
        if old is not None:
            old.close()
            with contextlib.suppress(RuntimeError):  # no loop yet: nothing was connected
                loop = asyncio.get_running_loop()
                task = loop.create_task(old.dispatcher.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        logger.info("wasm: filter %s (ABI %s), instances per %s, clusters %s%s",
                    s.filter_path, self.module.abi_version, s.instance_key,
                    ", ".join(f"{k}={shown_url(v)}" for k, v in s.clusters.items()) or "none",
                    f", clock ×{s.clock_speed:g}" if s.clock_speed != 1 else "")

    def _load_services(self, s: Settings) -> None:
        """Compile the service plugins and check that each starts (a one-line error if not)."""
        modules: dict[Path, FilterModule] = {}
        for path in s.services:
            module = self._service_modules.get(path)
            try:
                module = module or FilterModule.from_file(path)
                probe = Host(module, InProcessDispatcher(lambda call: None, self.clock.now_ns),
                             plugin_configuration=b"",
                             vm_configuration=s.vm_configuration, root_id=s.root_id,
                             vm_id=s.vm_id, plugin_name=f"service:{path.stem}")
                try:
                    probe.instance("__probe__")
                finally:
                    probe.close()
            except (FilterLoadError, FilterStartError) as e:
                raise exceptions.OptionsError(f"wasm_service: {e}") from e
            modules[path] = module
        self._service_modules = modules

    def _start_plugin_services(self) -> None:
        """Start each service plugin's singleton instance; its ticks start now."""
        s = self.settings
        assert s is not None and self.host is not None
        for path, module in self._service_modules.items():
            host = Host(
                module, HttpxDispatcher(s.clusters, clock_speed=s.clock_speed),
                vm_configuration=s.vm_configuration, root_id=s.root_id, vm_id=s.vm_id,
                plugin_name=f"service:{path.stem}", clock=self.clock,
                limits=Limits(memory_bytes=s.memory_limit_mib * 2**20,
                              deadline_ms=s.deadline_ms),
                events=_Recorder(self),
            )
            host.on_due = self._due
            host.shared_data = self.host.shared_data  # one VM id: one shared data, one set of
            host.shared_queues = self.host.shared_queues  # queues, as Envoy keys them
            try:
                host.instance(f"service:{path.stem}")
            except FilterStartError as e:
                logger.error("wasm_service %s cannot start: %s", path, e)
                host.close()
                continue
            self.services.append(host)
            logger.info("wasm: service %s started", path)

    async def _stop_plugin_services(self) -> None:
        services, self.services = self.services, []
        for host in services:
            await host.dispatcher.aclose()
            host.close()

    # ---- lifecycle ----

    async def running(self) -> None:
        if self.settings is None:  # the options were refused at load: nothing to run
            return
        self._running = True
        # What clients make us log (refusals, failed auth calls) is rate-limited.
        install([logger.name, "addons.proxywasm.calls", "addons.proxywasm.host"], RateLimit())
        # A filter's lines share one format: only repeats of the same line are held back.
        install(["wasm_reclaim.guest"], RateLimit(by_text=True))
        self._show_comment_column()
        await self._start_services()

    @staticmethod
    def _show_comment_column() -> None:
        """In mitmweb, add the comment column (the filter's decision) unless the user chose
        the columns with `web_columns`."""
        o = ctx.options
        if "web_columns" in o and not o.has_changed("web_columns") and (
                "comment" not in o.web_columns):
            o.update(web_columns=[*o.web_columns, "comment"])

    async def done(self) -> None:
        self._running = False
        self._end_open_exchanges()
        await self._stop_services()
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self.host is not None:
            await self.host.dispatcher.aclose()
            self.host.close()

    async def _start_services(self) -> None:
        s = self.settings
        assert s is not None
        if s.log_metrics:
            from addons.telemetry.spool import MetricsLog

            self.metrics = MetricsLog(s.spool_dir, redact=s.redact_params)
            self.shipper = self._start_shipper(s)
            self._bind_hooks()
        self._start_plugin_services()
        self._tasks = [asyncio.create_task(self._poll_loop(), name="wasm-poll"),
                       asyncio.create_task(self._sample_loop(), name="wasm-samples")]
        if s.log_metrics:
            self._tasks.append(asyncio.create_task(self._flush_loop(), name="wasm-flush"))
        token = ""
        if s.admin_listen is not None:
            try:
                token = s.admin_token or load_or_create_token(s.admin_token_file)
            except TokenFileError as e:
                logger.error("wasm admin endpoint: %s: the endpoint is off", e)
        if s.admin_listen is not None and token:
            host, port = s.admin_listen
            self.admin = AdminServer(self, token, host, port)
            try:
                await self.admin.start()
            except OSError as e:
                self.admin = None
                logger.error("wasm admin endpoint: cannot listen on %s:%d: %s", host, port,
                             e.strerror or e)
            else:
                where = "token from wasm_admin_token" if s.admin_token else (
                    f"token in {s.admin_token_file}")
                logger.info("wasm admin endpoint on http://%s:%d (%s)", host, self.admin.port,
                            where)
        if s.log_metrics:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="wasm-heartbeat"))

    async def _stop_services(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        await self._stop_plugin_services()
        if self.host is not None:
            await self.host.dispatcher.aclose()
        metrics, self.metrics = self.metrics, None
        self._bind_hooks()
        if metrics is not None:
            self._sample_all_to(metrics, every=True)  # the store sees the final state
            await asyncio.to_thread(metrics.flush)
        if self.shipper is not None:
            await asyncio.to_thread(self._stop_shipper, self.shipper)
            self.shipper = None
        if metrics is not None and metrics.segments_pending() and self.settings is not None:
            # The shipper may have been stopped before it was ready (a short run): deliver now,
            # while nothing is served. What cannot be delivered stays spooled for next time.
            await asyncio.to_thread(self._final_drain, self.settings)

    async def _restart_services(self) -> None:
        await self._stop_services()
        await self._start_services()

    @staticmethod
    def _shipper_args(s: Settings) -> list[str]:
        """The shipper's command line: never the store, whose URI may hold a password (see
        `_shipper_env`); it exits when this process dies."""
        args = [sys.executable, "-m", "addons.telemetry.shipper", "ship",
                "--spool", str(s.spool_dir), "--nice", "10", "--parent", str(os.getpid())]
        if s.retention_s:
            args += ["--retention", str(s.retention_s)]
        return args

    @staticmethod
    def _shipper_env(s: Settings) -> dict[str, str]:
        from addons.telemetry.shipper import STORE_ENV

        return {**os.environ, STORE_ENV: s.store, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def _start_shipper(self, s: Settings) -> subprocess.Popen[bytes]:
        """The process that delivers spooled documents to the store.

        Its log lines come through mitmproxy's log (the console's event list, mitmdump's
        output), never straight onto the terminal, where they would print over the console.
        """
        self._shipper_started = time.monotonic()
        proc = subprocess.Popen(self._shipper_args(s), env=self._shipper_env(s),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        relay = ShipperLog(asyncio.get_running_loop())
        assert proc.stderr is not None
        threading.Thread(target=relay.pump, args=(proc.stderr,), name="wasm-shipper-log",
                         daemon=True).start()
        return proc

    def _final_drain(self, s: Settings) -> None:
        args = [*self._shipper_args(s), "--exit-when-idle"]
        try:
            done = subprocess.run(args, env=self._shipper_env(s), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30,
                                  check=False)
            for line in done.stderr.decode("utf-8", "replace").splitlines():
                ShipperLog.emit(line)
        except subprocess.TimeoutExpired:
            logger.warning("wasm: metrics not all delivered in 30 s; they stay in %s and are "
                           "delivered next time", s.spool_dir)

    @staticmethod
    def _stop_shipper(proc: subprocess.Popen[bytes]) -> None:
        """Ask the shipper to deliver what is spooled and exit; what it can't stays spooled."""
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            logger.warning("wasm: the metrics shipper did not stop in 15 s; documents stay in "
                           "the spool and are delivered next time")
            proc.kill()
            proc.wait()

    async def _poll_loop(self) -> None:
        """Ticks, outbound-call deadlines, deliveries and crash recovery, on the host clock.

        The hosts are polled when their next event falls due (`Host.next_event_ns`), and at
        least every POLL_MAX_S; a host that schedules something sooner wakes the loop
        (`Host.on_due`). An idle proxy wakes once a second, or at its filters' ticks.
        """
        while True:
            hosts = [self.host, *self.services] if self.host is not None else []
            self._poll_at_ns = -1  # what falls due while polling, the next line sees
            for host in hosts:
                try:
                    host.poll()
                except Exception:
                    logger.exception("wasm: host poll failed")
            speed = self.settings.clock_speed if self.settings else 1.0
            now = self.clock.now_ns()
            wake = now + int(POLL_MAX_S * speed * 1e9)
            for host in hosts:
                due = host.next_event_ns()
                if due is not None and due < wake:
                    wake = due
            self._poll_at_ns = wake
            self._poll_wake.clear()
            # at least 1 ms: a retry that is due but cannot start yet must not spin the loop
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poll_wake.wait(),
                                       max(0.001, (wake - now) / 1e9 / speed))

    def _due(self, due_ns: int) -> None:
        """`Host.on_due`: wake the poll loop if it sleeps past `due_ns` (host clock)."""
        if 0 <= due_ns < self._poll_at_ns:
            self._poll_at_ns = due_ns
            self._poll_wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.metrics is not None:
                try:
                    await asyncio.to_thread(self.metrics.flush)
                except Exception as e:
                    logger.error("wasm: cannot write the metrics spool: %s", e)
            self._supervise_shipper()

    def _supervise_shipper(self) -> None:
        """Start the shipper again if it exited (killed, or stopped on an error it said in
        one line): what is spooled waits for it, and is delivered once it runs. While it
        keeps exiting, each restart waits twice as long as the last, up to a minute; one that
        ran a minute starts the back-off over."""
        proc, s = self.shipper, self.settings
        if proc is None or s is None or proc.poll() is None:
            return
        now = time.monotonic()
        if now < self._shipper_retry_at:
            return
        ran = now - self._shipper_started
        self._shipper_backoff = 1.0 if ran >= 60 else min(60.0, self._shipper_backoff * 2)
        self._shipper_retry_at = now + self._shipper_backoff
        logger.warning("wasm shipper exited (status %s): started again; spooled metrics wait "
                       "for it", proc.returncode)
        self.shipper = self._start_shipper(s)

    async def _sample_loop(self) -> None:
        """A sample of every instance every wasm_sample_interval of host-clock time."""
        while True:
            s = self.settings
            assert s is not None
            await asyncio.sleep(s.sample_interval / s.clock_speed)
            try:
                self._sample_all()
            except Exception:
                logger.exception("wasm: sampling failed")

    def _sample_all(self) -> None:
        if self.metrics is not None:
            self._sample_all_to(self.metrics)

    def _sample_all_to(self, metrics: Any, *, every: bool = False) -> None:
        """Sample the instances whose observation changed (or all, if `every`).

        An unchanged instance is sampled once per IDLE_SAMPLE_EVERY intervals, so the manager
        still sees time pass for it.
        """
        if self.host is None:
            return
        for inst in list(self.host.instances.values()):
            self._sample(inst.id, metrics, only_if_changed=not every)

    def _forget(self, instance_id: str) -> None:
        """An instance was evicted: drop what sampling remembered of it."""
        self._last_pages.pop(instance_id, None)
        self._last_sample.pop(instance_id, None)

    def _sample(self, instance_id: str, metrics: Any = None, *,
                only_if_changed: bool = False) -> None:
        metrics = metrics or self.metrics
        if self.host is None or metrics is None:
            return
        inst = self.host.instances.get(instance_id)
        if inst is None:
            return
        o = inst.observe()
        seen = (o.generation, o.allocated_pages, o.requests, o.outbound, o.state, o.draining,
                o.metrics.get(LIVE_ENTRIES), o.metrics.get(LIVE_BYTES), o.memory_cap_hits,
                o.refetch_interval_s)
        last = self._last_sample.get(instance_id)
        if only_if_changed and last is not None and last[0] == seen and (
                last[1] + 1 < IDLE_SAMPLE_EVERY):
            self._last_sample[instance_id] = (seen, last[1] + 1)
            return
        self._last_sample[instance_id] = (seen, 0)
        self._last_pages[instance_id] = o.allocated_pages
        counts = self._counts.pop(instance_id, records.NO_COUNTS)
        metrics.write("samples", records.sample(self.proxy_id, self.clock.now_ns() / 1e9, o,
                                                counts))

    @property
    def proxy_id(self) -> str:
        """This proxy's name in the store (`wasm_proxy_id`)."""
        return self.settings.proxy_id if self.settings is not None else ""

    def heartbeat(self) -> None:
        """Register this proxy in `proxies`: its admin URL and the time (never a token)."""
        if self.metrics is None:
            return
        admin_url = None
        if self.admin is not None and self.settings and self.settings.admin_listen is not None:
            host = self.settings.admin_listen[0]
            host = f"[{host}]" if ":" in host else host
            admin_url = f"http://{host}:{self.admin.port}"
        self.metrics.write("proxies", records.proxy(
            self.proxy_id, admin_url, time.time(), self._started_at, os.getpid(),
            len(self.host.instances) if self.host is not None else 0))

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                self.heartbeat()
            except Exception:
                logger.exception("wasm: heartbeat failed")
            await asyncio.sleep(HEARTBEAT_S)

    def write(self, collection: str, doc: dict[str, Any]) -> None:
        """Record a document (no-op when metrics are off or not running)."""
        if self.metrics is not None:
            self.metrics.write(collection, doc)

    # ---- the hooks (the stream lifecycle: addons/lifecycle.py) ----

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """A request mitmproxy streams: its headers leave now, so the filter sees them now.

        So is a request whose body mitmproxy may start to stream midway (`streams_midway`):
        without a hook, its headers would leave unfiltered. It is streamed from its headers on.
        """
        if self.host is None or flow.response is not None or flow.error is not None:
            return None
        request = flow.request
        if not request.stream:
            if not (self._streams_large and streams_midway(request)):
                return None
            request.stream = True
        return self._streamed_request(flow)

    async def _streamed_request(self, flow: http.HTTPFlow) -> None:
        waiting = self._request(flow, streamed=True)
        if waiting is not None:
            await waiting
        if flow.response is not None:  # answered (locally, refused, failed): nothing to stream
            if self._streams_large and answer_would_crash(flow.request, self._stream_limit):
                flow.kill()  # mitmproxy cannot answer a request whose body it would stream
            else:
                flow.request.stream = False

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """A buffered request: headers, body, trailers; a streamed one: its trailers.

        Synchronous when the filter decides at once (a cache hit): mitmproxy awaits only what
        a hook returns, and a coroutine per request costs more than the filter's lookup."""
        if flow.response is not None or flow.error is not None or self.host is None:
            return None
        if flow.request.stream:  # streamed: its headers ran in requestheaders
            ex = self._open.get(flow.id)
            if ex is not None and ex.stream is not None and ex.request_streamed:
                return lifecycle.streamed_request_trailers(flow, ex, self._exports)
            return None
        return self._request(flow, streamed=False)

    def responseheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """A response mitmproxy streams: its headers leave now, so the filter sees them now.

        So is a response whose body mitmproxy may start to stream midway
        (`response_streams_midway`): its headers would leave before the filter saw them. It is
        streamed from its headers on."""
        response = flow.response
        if not self._lifecycle or response is None:
            return None
        ex = self._open.get(flow.id)
        if ex is None or ex.stream is None:
            return None
        if not response.stream:
            if not (self._streams_large and response_streams_midway(flow)):
                return None
            response.stream = True
        return self._streamed_response(flow, ex)

    async def _streamed_response(self, flow: http.HTTPFlow, ex: lifecycle.Exchange) -> None:
        """A streamed response's headers, waited for in `_waiting` (as a buffered exchange's
        phases are): a client that leaves while the filter paused them ends the stream."""
        assert ex.stream is not None
        self._waiting[flow.id] = (flow, ex.stream)
        try:
            await lifecycle.streamed_response_headers(flow, ex, self._exports, self._stream_limit)
        finally:
            self._waiting.pop(flow.id, None)

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """The response (the upstream's or a local one): its phases, then the stream ends."""
        ex = self._open.pop(flow.id, None) if self._open else None
        if ex is None:
            return None
        if ex.stream is None:
            self._finish(flow, ex)
            return None
        return self._response(flow, ex)

    def error(self, flow: http.HTTPFlow) -> None:
        """The exchange failed (reset, upstream unreachable): the stream ends."""
        ex = self._open.pop(flow.id, None) if self._open else None
        if ex is not None:
            self._finish(flow, ex, failed=True)

    async def _response(self, flow: http.HTTPFlow, ex: lifecycle.Exchange) -> None:
        if ex.stream is not None:
            self._waiting[flow.id] = (flow, ex.stream)
        try:
            await lifecycle.response_phases(flow, ex, self._exports)
        finally:
            self._waiting.pop(flow.id, None)
            self._finish(flow, ex)

    def client_disconnected(self, client: connection.Client) -> None:
        """The client left while the filter's phases of some of its flows were awaited (an
        outbound call, a pause; request or response, buffered or streamed): end those streams
        now, as Envoy resets a stream whose client is gone. A paused phase is decided by the
        fail policy ("client disconnected"), then `proxy_on_log`, `proxy_on_done` and
        `proxy_on_delete` run; an outbound call still in flight is cancelled, as Envoy cancels
        a deleted context's calls, and recorded (`auth_calls`, outcome `cancelled`)."""
        if not self._waiting:
            return
        for stream in [st for f, st in self._waiting.values() if f.client_conn.id == client.id]:
            stream.abandon("client disconnected")

    def _end_open_exchanges(self) -> None:
        """The proxy stops with exchanges in flight: end their streams, keep their records."""
        exchanges, self._open = list(self._open.values()), {}
        for ex in exchanges:
            if ex.stream is not None:
                stream, ex.stream = ex.stream, None
                stream.close()
            if ex.record is not None:
                self.write("requests", ex.record)

    def _finish(self, flow: http.HTTPFlow, ex: lifecycle.Exchange, failed: bool = False) -> None:
        """Close the stream (log, done, delete) and write the request's record: the status
        the client was sent, or none where the exchange `failed` (a response mitmproxy
        refused, a reset: the client got mitmproxy's error, or nothing)."""
        if ex.stream is not None:
            stream, ex.stream = ex.stream, None
            stream.close()
        record = ex.record
        if record is not None:
            response = flow.response
            record["status"] = response.status_code if response is not None and not failed else None
            self.write("requests", record)

    def _request(self, flow: http.HTTPFlow, streamed: bool) -> Awaitable[None] | None:
        """Run the filter's request phases: None once done, or what to await while the filter
        waits (an outbound call, a pause, more phases to run)."""
        assert self.host is not None
        data = flow.request.data
        pairs, authority, hosts, authorization = view(flow)
        if hosts > 1:  # RFC 9112 §3.2: the upstream might see another one than we key by
            self._refuse(flow, Refusal(400, f"{hosts} Host header fields"))
            return None
        if data.http_version != b"HTTP/1.1" and unsafe_request_line(data, authority):
            # HTTP/2 and 3 carry these as fields, which mitmproxy copies into an HTTP/1
            # upstream's request line: CR LF there would smuggle a header or a request.
            self._refuse(flow, Refusal(400, "the request line holds a control character or "
                                            "whitespace"))
            return None
        key = self._keys.get(authority)
        if key is None:
            s = self.settings
            assert s is not None
            try:
                key = instance_key(authority, s.instance_key)
            except InvalidKey as e:
                self._refuse(flow, Refusal(400, str(e)))
                return None
            if len(self._keys) >= KEY_CACHE:
                self._keys.clear()
            self._keys[authority] = key
        t0 = time.perf_counter()
        assert self.bounds is not None
        try:
            got = self.bounds.get(key)
        except FilterStartError as e:
            logger.error("wasm: instance %s cannot start: %s", key, e)
            self._fail(flow, key, str(e))
            return None
        if isinstance(got, Refusal):
            self._refuse(flow, got)
            return None
        inst = got
        key = inst.id  # the shared instance serves keys beyond the bounds
        logout = is_logout(data.path, self._logout_path)
        cached_before = self._live_entries(inst) if logout else None
        stream = inst.stream()
        if self._properties:
            stream.attributes = lifecycle.flow_attributes(flow)
        end_of_stream = not streamed and not data.content and not data.trailers
        rest = (lifecycle.request_steps(flow, stream, self._exports)
                if self._lifecycle and not streamed else None)
        if not rest:
            decision = stream.request_headers(pairs, end_of_stream, lowered=True)
            if decision is not None:  # decided at once (a cache hit): no coroutine, no _Begun
                self._decided(flow, decision, streamed, key, inst, stream, authorization,
                              logout, cached_before, t0)
                return None
        begun = _Begun(streamed, key, inst, stream, authorization, logout, cached_before, t0)
        return self._request_later(flow, begun, [
            lambda: stream.request_headers(pairs, end_of_stream, lowered=True), *rest]
            if rest else None)

    async def _request_later(self, flow: http.HTTPFlow, begun: _Begun,
                             phases: list[lifecycle.Step] | None) -> None:
        """The request's phases when they are more than its headers, or when the filter
        paused them: run them, wait for the decision, then go on as `_decided`."""
        self._waiting[flow.id] = (flow, begun.stream)
        try:
            decision = await lifecycle.run_phases(begun.stream, phases) if phases else None
            if decision is None:
                decision = await lifecycle.wait(begun.stream, decision)
        finally:
            self._waiting.pop(flow.id, None)
        self._decided(flow, decision, *begun)

    def _decided(self, flow: http.HTTPFlow, decision: Decision, streamed: bool, key: str,
                 inst: Any, stream: Stream, authorization: bytes | None, logout: bool,
                 cached_before: int | None, t0: float) -> None:
        """The filter decided the request: apply it, describe the flow, keep its record.
        The arguments after `decision` are a `_Begun`'s fields (a cache hit builds none)."""
        # As in Envoy, a local response goes through the response callbacks too.
        keep = self._lifecycle and decision.action != "reset"
        if not keep:
            stream.close()
        latency_ms = (time.perf_counter() - t0) * 1000
        self._apply(flow, decision, stream if keep else None, streamed)
        # The token is hashed only for a record; the verdict needs only to know there is one.
        hashed = token_hash(authorization) if self.metrics is not None else None
        word = verdict(decision, records.bearer_token(authorization) is not None,
                       logout=logout)
        pages = inst.vm.allocated_pages() if inst.vm is not None else 0
        note = ""
        if word == "logout" and cached_before is not None:
            after = self._live_entries(inst)
            note = ("token evicted" if after is not None and after < cached_before
                    else "token was not cached")
        flow.comment = describe(word, key, decision.generation, pages, latency_ms, decision,
                                note)
        if word in ("deny", "reset"):
            flow.marked = DENIED_MARK
        elif word == "error":
            flow.marked = FAILED_MARK
        record = None
        if self.metrics is not None:
            slot = records.COUNTED.get(word)
            if slot is not None:
                counts = self._counts.get(key)
                if counts is None:
                    counts = self._counts[key] = [0, 0, 0, 0]
                counts[slot] += 1
            record = records.request(self.proxy_id, self.clock.now_ns() / 1e9, key, inst.tenant,
                                     decision, word, flow.request.method, flow.request.path,
                                     latency_ms, hashed)
            if self._last_pages.get(key) != pages:
                self._sample(key)  # allocated memory changed: sample now, not only on the period
        if keep or record is not None:
            ex = lifecycle.Exchange(stream if keep else None, record)
            self._open[flow.id] = ex
            if keep and streamed and decision.action == "continue":
                lifecycle.streamed_request_headers_continued(
                    flow, ex, self._exports, self._stream_limit)

    @staticmethod
    def _live_entries(inst: Any) -> int | None:
        """The filter's cached-entry gauge, when it reports one."""
        return inst.vm.metric_values().get(LIVE_ENTRIES) if inst.vm is not None else None

    def _apply(self, flow: http.HTTPFlow, decision: Decision, stream: Stream | None,
               streamed: bool) -> None:
        """Forward, answer locally, or reset, as the filter decided."""
        if decision.action == "respond" and decision.response is not None:
            lifecycle.respond_locally(flow, decision.response)
        elif decision.action == "reset":
            flow.kill()
        elif stream is not None and not streamed:
            lifecycle.apply_request(flow, stream, decision)  # headers, body, trailers
        elif stream is None and decision.modified:
            lifecycle.apply_request_headers(flow, decision.request_headers)
            lifecycle.keep_framing(flow.request, streamed)

    def _refuse(self, flow: http.HTTPFlow, refusal: Refusal) -> None:
        """Answer a request no filter instance may take (bad Host, beyond the bounds)."""
        headers = {"content-type": "text/plain"}
        if refusal.retry_after is not None:
            headers["retry-after"] = str(refusal.retry_after)
        flow.response = http.Response.make(refusal.status, refusal.reason.encode() + b"\n",
                                           headers)
        flow.comment = f"wasm: refused · {refusal.reason}"
        flow.marked = DENIED_MARK
        logger.info("wasm: refused %s %s: %s", escape(flow.request.method, 20),
                    escape(flow.request.path, 100), refusal.reason)
        if self.metrics is not None:
            self.write("requests", records.refused(
                self.proxy_id, self.clock.now_ns() / 1e9, flow.request.method,
                flow.request.path, refusal.status))

    def _fail(self, flow: http.HTTPFlow, key: str, error: str) -> None:
        """The instance cannot start (or the filter is backing off): decide by the fail policy,
        and record the request like any other."""
        s = self.settings
        assert s is not None and self.host is not None
        inst = self.host.instances.get(key)
        generation = inst.generation if inst is not None else -1  # -1: none ever started
        if s.fail_open:
            decision = Decision("continue", [], None, 0, generation, error)
        else:
            decision = Decision("respond", [], LocalResponse(503), 0, generation, error)
            flow.response = http.Response.make(503, b"filter unavailable\n",
                                               {"content-type": "text/plain"})
        word = verdict(decision, False)
        flow.comment = f"wasm: {word} · instance {key} · {error}"
        flow.marked = FAILED_MARK
        if self.metrics is not None:
            self.write("requests", records.request(
                self.proxy_id, self.clock.now_ns() / 1e9, key, key, decision, word,
                flow.request.method, flow.request.path, 0.0,
                token_hash(RequestView(*view(flow)).authorization)))

    # ---- commands and the admin backend ----

    def list_instances(self) -> list[dict[str, Any]]:
        """Every instance with allocated memory, requests, outbound calls and generation."""
        if self.host is None:
            return []
        return [{
            "proxy": self.proxy_id, "id": o.id, "tenant": o.tenant, "generation": o.generation,
            "allocated_pages": o.allocated_pages, "allocated_bytes": o.allocated_bytes,
            "requests": o.requests, "outbound": o.outbound, "started_at": o.started_at,
            "state": o.state, "draining": o.draining,
            "live_entries": o.metrics.get(LIVE_ENTRIES), "live_bytes": o.metrics.get(LIVE_BYTES),
            "memory_cap_hits": o.memory_cap_hits, "refetch_interval_s": o.refetch_interval_s,
        } for o in self.host.observe()]

    def _restart_mode(self, mode: str | None) -> RestartMode:
        if mode is None or not mode.strip():
            return self.settings.restart_mode if self.settings is not None else "cold"
        return parse_restart_mode(mode, "mode")

    def restart_instance(self, instance_id: str, reason: str, requested_by: str,
                         mode: str | None = None) -> dict[str, Any]:
        """Restart one instance now, `cold` or `warm` (default `wasm_restart_mode`); a warm
        replay runs to its end before this returns. KeyError if unknown, ValueError for a bad
        mode, RuntimeError if the restart failed."""
        ran = self._restart_mode(mode)
        if self.host is None or instance_id not in self.host.instances:
            raise KeyError(instance_id)
        if ran == "warm":
            self.host.start_journaling()
        try:
            record = self.host.restart(instance_id, reason, requested_by, ran)
        except RestartError as e:
            raise RuntimeError(str(e)) from e
        return self._restarted(record)

    async def restart_instance_async(self, instance_id: str, reason: str, requested_by: str,
                                     mode: str | None = None) -> dict[str, Any]:
        """As `restart_instance`, but a warm replay runs in steps of `REPLAY_STEP` events
        while the current generation keeps serving, so no request waits for the whole replay
        (the admin endpoint's way)."""
        ran = self._restart_mode(mode)
        if self.host is None or instance_id not in self.host.instances:
            raise KeyError(instance_id)
        if ran == "warm":
            self.host.start_journaling()
        try:
            record = await self.host.restart_in_steps(instance_id, reason, requested_by, ran,
                                                      REPLAY_STEP)
        except RestartError as e:
            raise RuntimeError(str(e)) from e
        return self._restarted(record)

    def _restarted(self, record: RestartRecord) -> dict[str, Any]:
        self._sample(record.instance)
        return {"proxy": self.proxy_id, "id": record.instance, "generation": record.generation,
                "generation_before": record.generation_before,
                "allocated_bytes_before": record.allocated_bytes_before,
                "allocated_bytes_after": record.allocated_bytes_after,
                "mode": record.mode, "fallback": record.fallback, "replayed": record.replayed}

    @command.command("wasm.status")
    def status(self) -> str:
        """Filter instances: allocated memory, requests, outbound calls, generation."""
        rows = self.list_instances()
        if not rows:
            return "no filter instances yet"
        lines = [f"{'instance':<28} {'gen':>4} {'pages':>6} {'KiB':>8} {'requests':>9} "
                 f"{'outbound':>9} {'live':>7} {'at cap':>6}"]
        for r in rows:
            live = r["live_entries"] if r["live_entries"] is not None else "-"
            lines.append(f"{r['id']:<28} {r['generation']:>4} {r['allocated_pages']:>6} "
                         f"{r['allocated_pages'] * WASM_PAGE_SIZE // 1024:>8} "
                         f"{r['requests']:>9} {r['outbound']:>9} {live:>7} "
                         f"{r['memory_cap_hits']:>6}")
        if self.bounds is not None and (self.bounds.evicted or self.bounds.refused):
            lines.append(f"idle instances evicted: {self.bounds.evicted}, requests beyond the "
                         f"instance bounds refused: {self.bounds.refused}")
        return "\n".join(lines)

    INSTANCE_COLUMNS = ("instance", "tenant", "generation", "allocated_pages",
                        "allocated_bytes", "requests", "outbound", "live_entries", "state")

    @command.command("wasm.instances")
    def instances(self) -> types.Data:
        """Filter instances as a table: a header row, then one row per instance (the admin
        API's GET /instances fields; mitmweb's command bar shows it as JSON)."""
        rows = [list(self.INSTANCE_COLUMNS)]
        for r in self.list_instances():
            r = {**r, "instance": r["id"]}
            rows.append(["" if r[c] is None else str(r[c]) for c in self.INSTANCE_COLUMNS])
        return cast(types.Data, rows)

    @command.command("wasm.restart")
    def restart(self, instance: str, mode: str = "") -> str:
        """Restart a filter instance, mode 'cold' or 'warm' (default wasm_restart_mode)."""
        try:
            r = self.restart_instance(instance, "command", "wasm.restart", mode or None)
        except ValueError as e:
            raise exceptions.CommandError(str(e)) from e
        except KeyError:
            known = ", ".join(sorted(self.host.instances)) if self.host else ""
            raise exceptions.CommandError(
                f"no filter instance {instance!r}" + (f" (known: {known})" if known else "")
            ) from None
        except RuntimeError as e:
            raise exceptions.CommandError(str(e)) from e
        how = f"{r['mode']}, {r['replayed']} requests replayed" if r["mode"] == "warm" else (
            f"cold: {r['fallback']}" if r["fallback"] else "cold")
        return (f"restarted {r['id']} ({how}): generation {r['generation_before']} -> "
                f"{r['generation']}, allocated {r['allocated_bytes_before'] // 1024} -> "
                f"{r['allocated_bytes_after'] // 1024} KiB")

addons = [WasmAuth()]


def hook_names() -> list[str]:
    """Every hook mitmproxy dispatches by name, `load` among them (see `WasmAuth.publish`).
    `add_log` is left out: mitmproxy warns about a script that has it."""
    import mitmproxy.proxy.layers  # defines the proxy's hooks
    import mitmproxy.proxy.server_hooks  # noqa: F401  (the connection hooks)
    from mitmproxy import hooks

    return ["load", *(name for name in hooks.all_hooks if name not in ("add_log", "load"))]


if __name__ != "addons.wasm_auth":  # the script's module: mitmproxy finds the hooks on it
    addons[0].publish(globals(), hook_names())
