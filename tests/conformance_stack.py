"""The conformance suite's stack: a real mitmdump with the addon running one SDK's filter, an
upstream and an outbound-call server that record what they saw, all on 127.0.0.1.

The filters come from `filters/conformance/build.sh` (cached builds). A toolchain the build
needs and cannot find is one line in the test's failure, never a skip.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiohttp import web

from scenarios.procs import free_port, mitmdump_path, process

from .servers import Stop, serving_in_a_thread

if TYPE_CHECKING:
    from .conformance_h2 import H2Upstream

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "filters" / "conformance" / "build.sh"
SDKS = ("rust", "go", "as")
UPSTREAM_BODY = b"upstream-body"
CALL_BODY = b"pong"
STALL_SECONDS = 30
BIG_BODY = bytes(range(256)) * 1024  # 256 KiB, above the proxy's stream_large_bodies (64k)

_built: dict[str, Path] = {}


def build(sdk: str) -> Path:
    """The SDK's conformance filter, built (or taken from the cache) by build.sh."""
    if sdk in _built:
        return _built[sdk]
    proc = subprocess.run(["bash", str(BUILD), sdk], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("conformance build:")),
                      lines[-1] if lines else f"exit code {proc.returncode}")
        pytest.fail(f"cannot build the {sdk} conformance filter: {reason}", pytrace=False)
    path = ROOT / "filters" / "conformance" / "out" / f"{sdk}.wasm"
    _built[sdk] = path
    return path


@dataclass(frozen=True)
class Seen:
    """One request as a recording server received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Recorder:
    """An aiohttp server in a thread that answers every request the same way and records it."""

    body: bytes
    headers: dict[str, str]
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        with self._lock:
            self.seen.append(Seen(request.method, request.path_qs,
                                  [(k.decode("latin-1"), v.decode("latin-1"))
                                   for k, v in request.raw_headers], body))
        if request.path.startswith("/stall"):  # an upstream that does not answer in time
            await asyncio.sleep(STALL_SECONDS)
        if request.path.startswith("/big"):  # a body that mitmproxy streams
            return web.Response(body=BIG_BODY, headers=self.headers)
        return web.Response(body=self.body, headers=self.headers)

    def matching(self, predicate: Callable[[Seen], bool]) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if predicate(s)]

    def with_header(self, name: str, value: str) -> list[Seen]:
        return self.matching(lambda s: s.header(name) == value)

    @contextmanager
    def running(self) -> Iterator[Recorder]:
        self.port = free_port()

        async def start() -> Stop:
            runner = web.ServerRunner(web.Server(self._handle))
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            return runner.cleanup

        with serving_in_a_thread(start, "recording server"):
            yield self


@dataclass
class Proxy:
    """A running mitmdump with the addon and one conformance filter."""

    sdk: str
    url: str
    port: int
    log: Path
    upstream: Recorder | H2Upstream
    calls: Recorder
    h2: bool = False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def guest_lines(self) -> list[str]:
        """The filter's own log lines (`conf[<sdk>] …`), without the host's prefix."""
        marker = f"conf[{self.sdk}] "
        return [line[line.index(marker) + len(marker):] for line in self.log_text().splitlines()
                if marker in line]

    def wait_for_log(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """The first of the filter's log lines matching `pattern`, waiting for it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.guest_lines():
                if m := regex.search(line):
                    return m
            if time.monotonic() > deadline:
                tail = "\n".join(self.log_text().splitlines()[-40:])
                raise AssertionError(f"no log line of the {self.sdk} filter matches "
                                     f"{pattern!r} within {timeout} s; the log ends:\n{tail}")
            time.sleep(0.1)


class StartError(RuntimeError):
    """mitmdump did not keep running with the filter."""


def start_failure(log: str) -> str:
    """The reason mitmdump gave up, from its log: the addon's error and the filter's own
    last words (a panic, an abort), each on one line."""
    lines = log.splitlines()
    errors = [line.strip() for line in lines if "OptionsError" in line or "Error:" in line]
    reason = errors[-1] if errors else (lines[-1] if lines else "no output")
    guest = []  # the filter's lines (and their continuation lines, as a Rust panic has)
    for i, line in enumerate(lines):
        if "gen 0] " in line:
            text = line.split("gen 0] ", 1)[1]
            if i + 1 < len(lines) and not lines[i + 1].startswith(("[", " ", "Traceback")):
                text += " " + lines[i + 1].strip()
            guest.append(text)
    guest = guest[-2:]
    return reason + ("; the filter logged: " + " | ".join(guest) if guest else "")


@contextmanager
def proxy(sdk: str, run_dir: Path, options: dict[str, str] | None = None,
          h2: bool = False) -> Iterator[Proxy]:
    """mitmdump -s addons/wasm_auth.py with the SDK's filter, in front of a recording upstream
    (HTTP/1.1, or HTTP/2 over TLS with trailers when `h2`); the filter's cluster `conf` is a
    recording call server."""
    wasm = build(sdk)
    run_dir.mkdir(parents=True, exist_ok=True)
    upstream: Recorder | H2Upstream
    if h2:
        from .conformance_h2 import H2Upstream
        upstream = H2Upstream()
        options = {"ssl_insecure": "true", **(options or {})}
    else:
        upstream = Recorder(UPSTREAM_BODY, {"x-upstream": "yes", "content-type": "text/plain"})
    calls = Recorder(CALL_BODY, {"x-call": "yes"})
    with ExitStack() as stack:
        stack.enter_context(upstream.running())
        stack.enter_context(calls.running())
        port = free_port()
        settings = {
            "wasm_filter": str(wasm),
            "wasm_filter_config": '{"conformance": true}',
            "wasm_cluster": f"conf=http://127.0.0.1:{calls.port}",
            "wasm_instance_key": "single",
            "wasm_store": str(run_dir / "store"),
            "wasm_spool": str(run_dir / "spool"),
            "wasm_admin_listen": "",
            "wasm_log_metrics": "false",
            # Not a test of deadlines: the machine is shared and loaded.
            "wasm_deadline_ms": "2000",
            "keep_host_header": "true",
            "flow_detail": "0",
            "stream_large_bodies": "64k",
            **(options or {}),
        }
        sets = [arg for name, value in settings.items() for arg in ("--set", f"{name}={value}")]
        log = run_dir / "mitmdump.log"
        mitmdump = stack.enter_context(process(
            [mitmdump_path(), "-s", str(ROOT / "addons" / "wasm_auth.py"),
             "--mode", f"reverse:{'https' if h2 else 'http'}://127.0.0.1:{upstream.port}",
             "--listen-host", "127.0.0.1", "-p", str(port), *sets],
            port, log, {"PYTHONPATH": str(ROOT)}, timeout=90))
        # mitmdump listens before it gives up on errors logged during start-up.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and mitmdump.poll() is None:
            time.sleep(0.1)
        if mitmdump.poll() is not None:
            raise StartError(f"mitmdump with the {sdk} filter exited at start: "
                             f"{start_failure(log.read_text(errors='replace'))}")
        yield Proxy(sdk, f"http://127.0.0.1:{port}", port, log, upstream, calls, h2)
