"""A client that leaves while the filter waits, through a real mitmdump on 127.0.0.1.

As Envoy resets a stream whose downstream is gone: the paused phase is decided by the fail
policy at once and the stream ends (`proxy_on_log`, `proxy_on_done`, `proxy_on_delete`), for a
streamed response's headers as for a buffered exchange; and the outbound call such a stream
had in flight is cancelled (the auth server sees its connection close), as Envoy cancels a
deleted context's calls, while it still counts: an `auth_calls` record, outcome `cancelled`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from addons.telemetry.store import AUTH_CALLS, REQUESTS, close_store, open_store
from scenarios.procs import free_port, mitmdump_path, process

from .test_lifecycle_proxy import RESPONSE_HEADERS_PAUSER, echo_server, http_server, write_filter

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
FILTER_WASM = ROOT / "filters" / "auth_cache.wasm"


@contextlib.contextmanager
def mitmdump(tmp_path: Path, upstream: int, wasm: Path, *extra: str) -> Iterator[int]:
    """mitmdump with the addon in reverse mode before `upstream`, metrics into an embedded
    store in `tmp_path` (read it once this has stopped mitmdump); its port."""
    port = free_port()
    args = [mitmdump_path(), "-s", str(ROOT / "addons" / "wasm_auth.py"),
            "--mode", f"reverse:http://127.0.0.1:{upstream}", "--listen-host", "127.0.0.1",
            "-p", str(port), "--set", f"wasm_filter={wasm}", "--set", "wasm_admin_listen=",
            "--set", f"wasm_store={tmp_path / 'store'}",
            "--set", f"wasm_spool={tmp_path / 'spool'}", *extra]
    with process(args, port, tmp_path / "mitmdump.log", {"PYTHONPATH": str(ROOT)}, timeout=60):
        yield port


def send_and_leave(port: int, request: bytes, ready: threading.Event) -> bytes:
    """Send `request` on a new connection, wait until `ready` (the filter is waiting), then
    close the connection; what the client had received by then."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(request)
        assert ready.wait(10), "the exchange never reached the point where the filter waits"
        time.sleep(0.5)  # the filter has paused (its hook awaits)
        client.settimeout(0.2)
        try:
            got = client.recv(65536)
        except TimeoutError:
            got = b""
    return got


def wait_for_log(log: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = log.read_text()
        if text in content:
            break
        time.sleep(0.05)
    return content


def test_a_client_that_leaves_ends_a_paused_streamed_response(tmp_path) -> None:
    """The upstream sends large response headers (streamed: `stream_large_bodies`) and holds
    its body; the filter pauses the headers. The client leaves: the stream ends at once, not
    after `stream_timeout_s` (30 s)."""
    headers_sent, release = threading.Event(), threading.Event()

    class HeadersThenHold(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", "100000")
            self.end_headers()
            self.wfile.flush()
            headers_sent.set()
            release.wait(20)

        def log_message(self, *_args: object) -> None:
            pass

    wasm = write_filter(tmp_path, RESPONSE_HEADERS_PAUSER, "pauser.wasm")
    log = tmp_path / "mitmdump.log"
    try:
        with http_server(HeadersThenHold) as upstream, mitmdump(
                tmp_path, upstream, wasm, "--set", "stream_large_bodies=1k") as port:
            got = send_and_leave(port, b"GET /large HTTP/1.1\r\nHost: shop.example\r\n\r\n",
                                 headers_sent)
            assert got == b""  # the paused headers never left
            left = time.monotonic()
            content = wait_for_log(log, "on_delete", 5)
            assert "on_delete" in content, content[-3000:]
            assert time.monotonic() - left < 5
            release.set()
    finally:
        release.set()
    order = [w for line in log.read_text().splitlines()
             for w in ("on_log", "on_done", "on_delete") if line.rstrip().endswith(w)]
    assert order == ["on_log", "on_done", "on_delete"]
    assert "Traceback" not in log.read_text()


class HoldingAuthServer:
    """An auth server on 127.0.0.1 that reads each request and never answers: it notes when
    the caller closes the connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = threading.Event()
        self.closed = threading.Event()
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            self.requests.append(data)
            self.received.set()
            conn.settimeout(60)
            with contextlib.suppress(OSError):
                while conn.recv(4096):
                    pass
            self.closed.set()  # the caller closed the connection (or reset it)

    def close(self) -> None:
        self.sock.close()


def test_a_client_that_leaves_cancels_its_streams_outbound_call(tmp_path) -> None:
    """The reference filter asks the auth cluster (timeout 20 s) and pauses the request; the
    client leaves. The call is cancelled at once (the auth server sees its connection
    close), and it is still recorded: one `auth_calls` document, outcome `cancelled`, no
    status, no clear token."""
    auth = HoldingAuthServer()
    token = "tok-cancelled-7f3a"
    try:
        with echo_server() as upstream, mitmdump(
                tmp_path, upstream, FILTER_WASM,
                "--set", f"wasm_cluster=auth=http://127.0.0.1:{auth.port}",
                "--set", 'wasm_filter_config={"timeout_ms": 20000}') as port:
            got = send_and_leave(port, (f"GET /product/1 HTTP/1.1\r\nHost: shop.example\r\n"
                                        f"Authorization: Bearer {token}\r\n\r\n").encode(),
                                 auth.received)
            assert got == b""  # the filter was still waiting for its call
            assert auth.closed.wait(5), "the outbound call was not cancelled"
            assert len(auth.requests) == 1 and auth.requests[0].startswith(b"GET /verify")
    finally:
        auth.close()
    log = (tmp_path / "mitmdump.log").read_text()
    assert "Traceback" not in log and token not in log, log[-3000:]
    db = open_store(str(tmp_path / "store"))
    try:
        calls = list(db[AUTH_CALLS].find({}, {"_id": 0}))
        requests = list(db[REQUESTS].find({}, {"_id": 0}))
    finally:
        close_store(db)
    assert [(c["outcome"], c["status"], c["path"]) for c in calls] == [
        ("cancelled", None, "/verify")]
    assert calls[0]["latency_ms"] < 5000  # recorded when cancelled, not at its timeout
    assert len(requests) == 1  # the request's own record is kept too
    assert token not in str(calls + requests)
