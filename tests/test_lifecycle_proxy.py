"""The HTTP lifecycle on mitmproxy's hooks: in-process through the addon's hooks, and end to end
through a real mitmdump against a real upstream on 127.0.0.1.

The filter (inline WAT) rewrites in every phase: the request's :path and a header (and removes
Content-Length, which must not lose the body), appends to the request body, sets :status and a
header on the response, prepends to the response body, and logs on_log, on_done and on_delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import wasmtime
from mitmproxy import flow, http
from mitmproxy.test import taddons, tflow

from addons.wasm_auth import WasmAuth
from scenarios.procs import free_port, mitmdump_path, process
from tests.hooks import run_hook

from .wat import module, trampolines

ROOT = Path(__file__).resolve().parent.parent

REWRITER = trampolines(
    "proxy_replace_header_map_value", "proxy_remove_header_map_value",
    "proxy_add_header_map_value", "proxy_set_buffer_bytes", "proxy_log",
    "proxy_send_local_response",
) + """
  (data (i32.const 1000) ":path")
  (data (i32.const 1010) "/rewritten")
  (data (i32.const 1030) "content-length")
  (data (i32.const 1050) "x-eos")
  (data (i32.const 1060) "+wasm")
  (data (i32.const 1070) ":status")
  (data (i32.const 1080) "201")
  (data (i32.const 1090) "x-resp")
  (data (i32.const 1100) "wasm:")
  (data (i32.const 1110) "on_log")
  (data (i32.const 1120) "on_done")
  (data (i32.const 1130) "on_delete")
  (data (i32.const 1140) "x-teapot")
  (data (i32.const 1160) "short and stout")
  (global $eos (mut i32) (i32.const 48))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param $c i32) (param $n i32) (param $eos i32) (result i32)
    (i32.store8 (i32.const 1200) (i32.add (i32.const 48) (local.get $eos)))
    (drop (call $proxy_replace_header_map_value (i32.const 0) (i32.const 1000) (i32.const 5) (i32.const 1010) (i32.const 10)))
    (drop (call $proxy_remove_header_map_value (i32.const 0) (i32.const 1030) (i32.const 14)))
    (drop (call $proxy_add_header_map_value (i32.const 0) (i32.const 1050) (i32.const 5) (i32.const 1200) (i32.const 1)))
    (i32.const 0))
  (func (export "proxy_on_request_body") (param $c i32) (param $size i32) (param $eos i32) (result i32)
    (if (local.get $eos) (then
      (drop (call $proxy_set_buffer_bytes (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 1060) (i32.const 5)))))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param $c i32) (param $n i32) (param $eos i32) (result i32)
    (drop (call $proxy_replace_header_map_value (i32.const 2) (i32.const 1070) (i32.const 7) (i32.const 1080) (i32.const 3)))
    (drop (call $proxy_add_header_map_value (i32.const 2) (i32.const 1090) (i32.const 6) (i32.const 1080) (i32.const 3)))
    (i32.const 0))
  (func (export "proxy_on_response_body") (param $c i32) (param $size i32) (param $eos i32) (result i32)
    (if (local.get $eos) (then
      (drop (call $proxy_set_buffer_bytes (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 1100) (i32.const 5)))))
    (i32.const 0))
  (func (export "proxy_on_log") (param i32)
    (drop (call $proxy_log (i32.const 2) (i32.const 1110) (i32.const 6))))
  (func (export "proxy_on_done") (param i32) (result i32)
    (drop (call $proxy_log (i32.const 2) (i32.const 1120) (i32.const 7)))
    (i32.const 1))
  (func (export "proxy_on_delete") (param i32)
    (drop (call $proxy_log (i32.const 2) (i32.const 1130) (i32.const 9))))
"""

# The same filter, but the response phase answers locally (a teapot) instead of the upstream.
TEAPOT = REWRITER.replace(
    """    (drop (call $proxy_add_header_map_value (i32.const 2) (i32.const 1090) (i32.const 6) (i32.const 1080) (i32.const 3)))
    (i32.const 0))""",
    """    (drop (call $proxy_send_local_response (i32.const 418) (i32.const 0) (i32.const 0)
      (i32.const 1160) (i32.const 15) (i32.const 0) (i32.const 0) (i32.const 0)))
    (i32.const 1))""")


def write_filter(tmp_path: Path, wat: str, name: str = "rewriter.wasm") -> Path:
    path = tmp_path / name
    path.write_bytes(wasmtime.wat2wasm(module(wat)))
    return path


def base_options(tmp_path: Path) -> dict[str, object]:
    return {"wasm_log_metrics": False, "wasm_admin_listen": "",
            "wasm_spool": str(tmp_path / "spool"), "wasm_store": str(tmp_path / "store")}


@contextlib.asynccontextmanager
async def addon_running(tmp_path: Path, wat: str) -> AsyncIterator[WasmAuth]:
    """The addon with filter `wat` (metrics off) in mitmproxy's test context, done at the end."""
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_filter=str(write_filter(tmp_path, wat)),
                       **base_options(tmp_path))
        try:
            yield addon
        finally:
            await addon.done()


# ---- in-process, through the hooks ----------------------------------------------------------


async def test_every_phase_rewrites_through_the_hooks(tmp_path, caplog) -> None:
    async with addon_running(tmp_path, REWRITER) as addon:
        f = tflow.tflow()
        f.request.method = "POST"
        f.request.content = b"hello"
        assert f.request.headers["content-length"] == "5"
        with caplog.at_level("INFO", logger="wasm_reclaim.guest"):
            await run_hook(addon.request(f))
            assert f.request.path == "/rewritten"
            assert f.request.headers["x-eos"] == "0"  # a body follows the headers
            assert f.request.raw_content == b"hello+wasm"
            assert f.request.headers["content-length"] == "10"  # removed, then made right
            assert addon._open  # the stream stays open until the response
            f.response = tflow.tresp(content=b"answer")
            await run_hook(addon.response(f))
        assert f.response.status_code == 201 and f.response.headers["x-resp"] == "201"
        assert f.response.raw_content == b"wasm:answer"
        assert f.response.headers["content-length"] == "11"
        logged = [r.getMessage().split()[-1] for r in caplog.records
                  if r.name == "wasm_reclaim.guest"]
        assert logged == ["on_log", "on_done", "on_delete"]
        assert not addon._open


async def test_headers_only_request_has_end_of_stream(tmp_path) -> None:
    async with addon_running(tmp_path, REWRITER) as addon:
        f = tflow.tflow()
        f.request.content = b""
        await run_hook(addon.request(f))
        assert f.request.headers["x-eos"] == "1"
        assert "content-length" not in f.request.headers  # no body: none needed


async def test_local_response_in_the_response_phase_replaces_the_upstreams(tmp_path) -> None:
    async with addon_running(tmp_path, TEAPOT) as addon:
        f = tflow.tflow()
        await run_hook(addon.request(f))
        f.response = tflow.tresp(content=b"the upstream's")
        await run_hook(addon.response(f))
        assert f.response.status_code == 418 and f.response.content == b"short and stout"
        assert not addon._open


async def test_an_error_ends_the_stream(tmp_path, caplog) -> None:
    async with addon_running(tmp_path, REWRITER) as addon:
        f = tflow.tflow()
        await run_hook(addon.request(f))
        with caplog.at_level("INFO", logger="wasm_reclaim.guest"):
            addon.error(f)
        assert "on_delete" in caplog.text and not addon._open
        inst = next(iter(addon.host.instances.values()))
        assert inst.vm.contexts == {}


async def test_streamed_bodies_go_chunk_by_chunk(tmp_path) -> None:
    async with addon_running(tmp_path, REWRITER) as addon:
        f = tflow.tflow()
        f.request.method = "POST"
        f.request.stream = True  # what stream_large_bodies does in requestheaders
        await run_hook(addon.requestheaders(f))
        assert f.request.path == "/rewritten" and f.request.headers["x-eos"] == "0"
        assert callable(f.request.stream)
        assert "content-length" not in f.request.headers
        assert f.request.headers["transfer-encoding"] == "chunked"
        chunks = [f.request.stream(b"ab"), f.request.stream(b"cd"), f.request.stream(b"")]
        assert chunks == [[b"ab"], [b"cd"], [b"+wasm"]]
        await run_hook(addon.request(f))  # the end of a streamed request: nothing more to run
        f.response = tflow.tresp(content=None)
        f.response.stream = True
        await run_hook(addon.responseheaders(f))
        assert f.response.status_code == 201
        out = [f.response.stream(b"xy"), f.response.stream(b"")]
        # Each callback sees only its chunk: the prepend at the end lands in the last one.
        assert out == [[b"xy"], [b"wasm:"]]
        await run_hook(addon.response(f))
        assert not addon._open


async def test_stream_large_bodies_set_while_running_streams_chunked_requests_early(
        tmp_path) -> None:
    """`stream_large_bodies` is mitmproxy's option and may change while the proxy runs: from
    then on a chunked request is streamed from its headers (the filter decides first)."""
    def chunked() -> http.HTTPFlow:
        f = tflow.tflow()
        f.request.method = "POST"
        f.request.headers.pop("content-length", None)
        f.request.headers["transfer-encoding"] = "chunked"
        return f

    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        if "stream_large_bodies" not in tctx.options:  # the proxy server's, not loaded here
            tctx.options.add_option("stream_large_bodies", str | None, None, "")
        tctx.configure(addon, wasm_filter=str(write_filter(tmp_path, REWRITER)),
                       **base_options(tmp_path))
        f = chunked()
        assert addon.requestheaders(f) is None and not f.request.stream  # buffered
        tctx.configure(addon, stream_large_bodies="1k")
        f = chunked()
        await run_hook(addon.requestheaders(f))
        assert callable(f.request.stream) and f.request.path == "/rewritten"
        addon.error(f)
        tctx.configure(addon, stream_large_bodies=None)
        assert addon.requestheaders(chunked()) is None
        await addon.done()


PAUSER = REWRITER.replace(
    """    (if (local.get $eos) (then
      (drop (call $proxy_set_buffer_bytes (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 1060) (i32.const 5)))))
    (i32.const 0))""",
    """    (if (result i32) (local.get $eos) (then
      (drop (call $proxy_set_buffer_bytes (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 1060) (i32.const 5)))
      (i32.const 0)) (else (i32.const 1))))""")


async def test_a_paused_streamed_chunk_is_held_and_given_again(tmp_path) -> None:
    async with addon_running(tmp_path, PAUSER) as addon:
        f = tflow.tflow()
        f.request.stream = True
        await run_hook(addon.requestheaders(f))
        # A held chunk sends nothing: not even an empty chunk, which would end an HTTP/1
        # chunked body (conformance gap G4).
        assert [f.request.stream(b"ab"), f.request.stream(b"cd"),
                f.request.stream(b"")] == [[], [], [b"abcd+wasm"]]
        addon.error(f)


async def test_trailers_after_a_held_chunk_come_next_without_another_body_call(
        tmp_path, monkeypatch) -> None:
    """As in Envoy, the end of a streamed body that trailers follow brings no new data: the
    filter is not asked about the same bytes again (its trailers callback is next), and what
    it held leaves."""
    from addons.proxywasm.host import Stream

    calls: list[tuple[bytes, bool]] = []
    real = Stream.request_body

    def counted(self: Stream, body: bytes, end_of_stream: bool):  # type: ignore[no-untyped-def]
        calls.append((bytes(body), end_of_stream))
        return real(self, body, end_of_stream)

    monkeypatch.setattr(Stream, "request_body", counted)
    async with addon_running(tmp_path, PAUSER) as addon:
        f = tflow.tflow()
        f.request.stream = True
        await run_hook(addon.requestheaders(f))
        assert f.request.stream(b"ab") == []  # paused: held
        f.request.trailers = http.Headers([(b"x-t", b"1")])
        assert f.request.stream(b"") == [b"ab"]
        assert calls == [(b"ab", False)]
        addon.error(f)


TRAILERS = REWRITER + """
  (data (i32.const 1300) "x-t")
  (data (i32.const 1310) "changed")
  (func (export "proxy_on_request_trailers") (param i32 i32) (result i32)
    (drop (call $proxy_replace_header_map_value (i32.const 1) (i32.const 1300) (i32.const 3) (i32.const 1310) (i32.const 7)))
    (i32.const 0))
  (func (export "proxy_on_response_trailers") (param i32 i32) (result i32)
    (drop (call $proxy_replace_header_map_value (i32.const 3) (i32.const 1300) (i32.const 3) (i32.const 1310) (i32.const 7)))
    (i32.const 0))
"""


async def test_http2_trailers_reach_the_filter_and_come_back(tmp_path) -> None:
    async with addon_running(tmp_path, TRAILERS) as addon:
        f = tflow.tflow()
        f.request.http_version = "HTTP/2.0"
        f.request.trailers = http.Headers([(b"x-t", b"1")])
        await run_hook(addon.request(f))
        assert f.request.trailers["x-t"] == "changed"
        assert f.request.raw_content == b"content"  # end_of_stream false: trailers followed
        f.response = tflow.tresp(content=b"r")
        f.response.http_version = "HTTP/2.0"
        f.response.trailers = http.Headers([(b"x-t", b"2")])
        await run_hook(addon.response(f))
        assert f.response.trailers["x-t"] == "changed"


# ---- end to end: a real mitmdump ------------------------------------------------------------


class Echo(BaseHTTPRequestHandler):
    """Answers every request with what it received, as JSON."""

    def _answer(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if not size:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        out = json.dumps({"method": self.command, "path": self.path,
                          "headers": {k.lower(): v for k, v in self.headers.items()},
                          "body": body.decode("latin-1")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *_args: object) -> None:
        pass


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler],
                seen: list[str] | None = None) -> Iterator[int]:
    """A threaded HTTP server on 127.0.0.1 with `handler`; its port. `seen` (when given)
    collects the paths it is asked for (handlers that record them)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.seen = [] if seen is None else seen  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def echo_server(seen: list[str] | None = None) -> contextlib.AbstractContextManager[int]:
    """The echo server (`Echo`); `seen` collects the paths it is asked for."""
    return http_server(Echo, seen)


@contextlib.contextmanager
def mitmdump(tmp_path: Path, upstream: int, wasm: Path, *extra: str) -> Iterator[str]:
    port = free_port()
    args = [mitmdump_path(), "-s", str(ROOT / "addons" / "wasm_auth.py"),
            "--mode", f"reverse:http://127.0.0.1:{upstream}", "--listen-host", "127.0.0.1",
            "-p", str(port), "--set", f"wasm_filter={wasm}", "--set", "wasm_log_metrics=false",
            "--set", "wasm_admin_listen=", *extra]
    with process(args, port, tmp_path / "mitmdump.log", {"PYTHONPATH": str(ROOT)}, timeout=60):
        yield f"http://127.0.0.1:{port}"


@pytest.mark.e2e
def test_lifecycle_through_a_real_mitmdump(tmp_path) -> None:
    wasm = write_filter(tmp_path, REWRITER)
    with echo_server() as upstream, mitmdump(tmp_path, upstream, wasm) as proxy:
        r = httpx.post(f"{proxy}/original", content=b"hello", timeout=10)
        assert r.status_code == 201 and r.headers["x-resp"] == "201"
        assert r.content.startswith(b"wasm:")
        assert int(r.headers["content-length"]) == len(r.content)
        seen = json.loads(r.content[len(b"wasm:"):])
        assert seen["path"] == "/rewritten" and seen["method"] == "POST"
        assert seen["body"] == "hello+wasm" and seen["headers"]["content-length"] == "10"
        assert seen["headers"]["x-eos"] == "0"
        # A large body that mitmproxy streams goes through the filter chunk by chunk.
    with echo_server() as upstream, mitmdump(tmp_path, upstream, wasm,
                                             "--set", "stream_large_bodies=1k") as proxy:
        big = b"x" * 50_000
        r = httpx.post(f"{proxy}/big", content=big, timeout=10)
        assert r.status_code == 201
        # The echo is streamed too: the filter's prepend at the end of the body lands last.
        assert r.content.endswith(b"wasm:") and "content-length" not in r.headers
        seen = json.loads(r.content[: -len(b"wasm:")])
        assert seen["body"] == (big + b"+wasm").decode()
        assert seen["headers"]["transfer-encoding"] == "chunked"
    deadline = time.monotonic() + 5
    log = ""
    while time.monotonic() < deadline:
        log = (tmp_path / "mitmdump.log").read_text()
        if "on_delete" in log:
            break
        time.sleep(0.1)
    order = [w for line in log.splitlines() for w in ("on_log", "on_done", "on_delete")
             if line.rstrip().endswith(w)]
    assert order[:3] == ["on_log", "on_done", "on_delete"], log[-2000:]


@pytest.mark.e2e
def test_local_response_in_the_response_phase_through_a_real_mitmdump(tmp_path) -> None:
    wasm = write_filter(tmp_path, TEAPOT, "teapot.wasm")
    with echo_server() as upstream, mitmdump(tmp_path, upstream, wasm) as proxy:
        r = httpx.get(f"{proxy}/", timeout=10)
        assert r.status_code == 418 and r.content == b"short and stout"



# ---- requests.status: the answer the client got ---------------------------------------------


async def test_request_records_store_the_upstreams_or_local_status(tmp_path) -> None:
    from addons.telemetry.spool import MetricsLog, read_segment, ready_segments

    async with addon_running(tmp_path, TEAPOT) as addon:
        addon.metrics = MetricsLog(tmp_path / "spool")  # as running() does with metrics on
        upstream = tflow.tflow()
        await run_hook(addon.request(upstream))
        killed = tflow.tflow()
        await run_hook(addon.request(killed))
        addon.error(killed)  # the exchange failed before any answer
        refused = tflow.tflow()
        await run_hook(addon.request(refused))
        refused.response = tflow.tresp(status_code=200)  # headers mitmproxy then refused:
        refused.error = flow.Error("HTTP/1 protocol error")  # the client got a 502
        addon.error(refused)
        upstream.response = tflow.tresp(status_code=204)
        await run_hook(addon.response(upstream))  # the filter answers 418 instead
        addon.metrics.flush()
        docs = [doc for path in ready_segments(tmp_path / "spool")
                for collection, doc in read_segment(path) if collection == "requests"]
        assert sorted(d["status"] is None for d in docs) == [False, True, True]
        assert [d["status"] for d in docs if d["status"] is not None] == [418]
        addon.metrics = None


HEADERS_ONLY = trampolines("proxy_send_local_response", "proxy_add_header_map_value") + """
  (data (i32.const 1000) "x-seen")
  (data (i32.const 1010) "1")
  (global $calls (mut i32) (i32.const 0))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (drop (call $proxy_add_header_map_value (i32.const 0) (i32.const 1000) (i32.const 6) (i32.const 1010) (i32.const 1)))
    (i32.const 0))
  (func (export "calls") (result i32) (global.get $calls))
"""


async def test_a_streamed_request_is_decided_before_its_headers_leave(tmp_path) -> None:
    # A filter with only request-header callbacks (like the reference filter) must decide a
    # streamed request in requestheaders, before mitmproxy sends its headers upstream.
    async with addon_running(tmp_path, HEADERS_ONLY) as addon:
        f = tflow.tflow()
        f.request.stream = True
        await run_hook(addon.requestheaders(f))
        assert f.request.headers["x-seen"] == "1" and f.request.stream is True
        await run_hook(addon.request(f))  # the end of the streamed body: the filter does not run again
        [inst] = addon.host.instances.values()
        assert inst.vm.call(inst.vm.raw.func("calls")) == 1
        assert inst.vm.contexts == {}  # no lifecycle callbacks: the stream already ended


async def test_stopping_ends_open_streams_and_keeps_their_records(tmp_path) -> None:
    from addons.telemetry.spool import MetricsLog, read_segment, ready_segments

    async with addon_running(tmp_path, REWRITER) as addon:
        addon.metrics = MetricsLog(tmp_path / "spool")
        f = tflow.tflow()
        await run_hook(addon.request(f))  # in flight: no response yet
        [inst] = addon.host.instances.values()
        assert inst.vm.contexts
        addon._end_open_exchanges()
        assert inst.vm.contexts == {} and not addon._open
        addon.metrics.flush()
        docs = [doc for path in ready_segments(tmp_path / "spool")
                for collection, doc in read_segment(path) if collection == "requests"]
        assert len(docs) == 1 and docs[0]["status"] is None
        addon.metrics = None


DENY_THEN_DECORATE = trampolines("proxy_send_local_response", "proxy_add_header_map_value") + """
  (data (i32.const 1000) "x-resp")
  (data (i32.const 1010) "seen")
  (data (i32.const 1020) "denied")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $proxy_send_local_response (i32.const 403) (i32.const 0) (i32.const 0)
      (i32.const 1020) (i32.const 6) (i32.const 0) (i32.const 0) (i32.const 0)))
    (i32.const 1))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $proxy_add_header_map_value (i32.const 2) (i32.const 1000) (i32.const 6) (i32.const 1010) (i32.const 4)))
    (i32.const 0))
"""


async def test_a_local_response_goes_through_the_response_callbacks(tmp_path) -> None:
    # As in Envoy: a filter's local reply runs through its response callbacks.
    async with addon_running(tmp_path, DENY_THEN_DECORATE) as addon:
        f = tflow.tflow()
        await run_hook(addon.request(f))
        assert f.response is not None and f.response.status_code == 403
        await run_hook(addon.response(f))  # mitmproxy runs it for a local response too
        assert f.response.status_code == 403 and f.response.content == b"denied"
        assert f.response.headers["x-resp"] == "seen"
        assert not addon._open


PAUSE_UNTIL_END = REWRITER.replace(
    """    (drop (call $proxy_add_header_map_value (i32.const 2) (i32.const 1090) (i32.const 6) (i32.const 1080) (i32.const 3)))
    (i32.const 0))""",
    """    (drop (call $proxy_add_header_map_value (i32.const 2) (i32.const 1090) (i32.const 6) (i32.const 1080) (i32.const 3)))
    (i32.const 1))""") + """
  (func (export "proxy_on_request_trailers") (param i32 i32) (result i32) (i32.const 0))
"""
PAUSE_UNTIL_END = PAUSE_UNTIL_END.replace(
    """    (if (local.get $eos) (then
      (drop (call $proxy_set_buffer_bytes (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 1060) (i32.const 5)))))
    (i32.const 0))""",
    """    (if (result i32) (local.get $eos) (then
      (drop (call $proxy_set_buffer_bytes (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 1060) (i32.const 5)))
      (i32.const 0)) (else (i32.const 1))))""")


async def test_a_paused_phase_does_not_hold_back_the_next_one(tmp_path) -> None:
    # As in Envoy: paused response headers still get the body (whose Continue lifts the
    # pause), and a request body paused with trailers to come still gets the trailers.
    async with addon_running(tmp_path, PAUSE_UNTIL_END) as addon:
        f = tflow.tflow()
        f.request.http_version = "HTTP/2.0"
        f.request.trailers = http.Headers([(b"x-t", b"1")])
        await asyncio.wait_for(run_hook(addon.request(f)), 5)  # body paused (eos false), trailers go on
        assert f.response is None and f.request.path == "/rewritten"
        f.response = tflow.tresp(content=b"answer")
        await asyncio.wait_for(run_hook(addon.response(f)), 5)  # headers paused, body continues
        assert f.response.status_code == 201 and f.response.raw_content == b"wasm:answer"
        assert not addon._open


@pytest.mark.e2e
def test_a_body_mitmproxy_streams_midway_never_skips_the_filter(tmp_path) -> None:
    """With `stream_large_bodies`, mitmproxy starts to stream a chunked body once it has read
    more than the limit, and sends its headers upstream without a hook: the addon streams such
    a request from its headers on, so the filter decides first. A request it refuses never
    reaches the upstream, and no answer hangs (one mitmproxy cannot give is a reset)."""
    import http.client

    wasm = ROOT / "filters" / "auth_cache.wasm"
    seen: list[str] = []
    with echo_server(seen) as upstream, mitmdump(
            tmp_path, upstream, wasm, "--set", "stream_large_bodies=1k",
            "--set", "wasm_cluster=auth=http://127.0.0.1:9") as proxy:
        port = int(proxy.rsplit(":", 1)[1])

        def post(body: object, chunked: bool) -> int | str:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("POST", "/upload", body=body, encode_chunked=chunked)
                return conn.getresponse().status
            except (ConnectionError, http.client.HTTPException) as e:
                return type(e).__name__
            finally:
                conn.close()

        big = [b"a" * 1000] * 10  # 10 kB in chunks: past the limit only midway
        assert post(iter(big), chunked=True) == "RemoteDisconnected"
        assert post(iter([b"small"]), chunked=True) == "RemoteDisconnected"
        assert post(b"a" * 10_000, chunked=False) == "RemoteDisconnected"  # streamed at once
        assert post(b"a" * 10, chunked=False) == 401  # buffered: answered
        assert seen == []  # no refused request reached the upstream
        r = httpx.get(f"{proxy}/page", timeout=10)
        assert r.status_code == 401 and seen == []
    log = (tmp_path / "mitmdump.log").read_text()
    assert "Traceback" not in log and "crashed" not in log, log[-2000:]


class LargeAnswers(BaseHTTPRequestHandler):
    """Answers 10 kB: with Content-Length on /length, chunked otherwise."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        if self.path == "/length":
            self.send_header("content-length", "10000")
            self.end_headers()
            self.wfile.write(b"u" * 10_000)
            return
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for _ in range(10):
            self.wfile.write(b"3e8\r\n" + b"u" * 1000 + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *_args: object) -> None:
        pass


@pytest.mark.e2e
def test_a_local_response_replaces_a_large_upstream_answer_whole(tmp_path) -> None:
    """With `stream_large_bodies`, mitmproxy streams a large response: at its headers when its
    Content-Length says so, midway when it is chunked (then with no hook: the addon streams such
    a response from its headers on). A filter answering locally on the response headers gets
    its own answer to the client, and none of the upstream's body."""
    wasm = write_filter(tmp_path, TEAPOT, "teapot.wasm")
    with http_server(LargeAnswers) as upstream, mitmdump(
            tmp_path, upstream, wasm, "--set", "stream_large_bodies=1k") as proxy:
        for path in ("/length", "/chunked"):
            r = httpx.get(f"{proxy}{path}", timeout=10)
            assert (r.status_code, r.content) == (418, b"short and stout"), path


# A filter that pauses its request headers (as while it waits for an auth call), and logs the
# end of its stream.
HEADERS_PAUSER = REWRITER.replace(
    """    (drop (call $proxy_add_header_map_value (i32.const 0) (i32.const 1050) (i32.const 5) (i32.const 1200) (i32.const 1)))
    (i32.const 0))""",
    """    (i32.const 1))""", 1)


async def test_a_client_that_leaves_ends_its_paused_streams(tmp_path, caplog) -> None:
    """As Envoy resets a stream whose client is gone: the paused phase is decided at once,
    and the stream ends (log, done, delete), not when the filter would have gone on."""
    async with addon_running(tmp_path, HEADERS_PAUSER) as addon:
        left, stays = tflow.tflow(), tflow.tflow()
        for f in (left, stays):
            f.request.content = b""  # the headers are the last phase: their pause is awaited
        waiting = [asyncio.ensure_future(addon.request(f)) for f in (left, stays)]
        await asyncio.sleep(0)
        assert set(addon._waiting) == {left.id, stays.id}
        inst = next(iter(addon.host.instances.values()))
        assert len(inst.vm.contexts) == 2
        with caplog.at_level("INFO", logger="wasm_reclaim.guest"):
            addon.client_disconnected(left.client_conn)
        await asyncio.wait_for(waiting[0], 5)
        assert "on_delete" in caplog.text
        assert len(inst.vm.contexts) == 1 and set(addon._waiting) == {stays.id}
        assert left.response is not None and left.response.status_code == 503  # fail closed
        assert "client disconnected" in left.comment
        assert not waiting[1].done()  # another client's paused stream waits on
        waiting[1].cancel()


# A filter that pauses its response headers (and never resumes them), logging the end of its
# stream.
RESPONSE_HEADERS_PAUSER = REWRITER.replace(
    """    (drop (call $proxy_add_header_map_value (i32.const 2) (i32.const 1090) (i32.const 6) (i32.const 1080) (i32.const 3)))
    (i32.const 0))""",
    """    (drop (call $proxy_add_header_map_value (i32.const 2) (i32.const 1090) (i32.const 6) (i32.const 1080) (i32.const 3)))
    (i32.const 1))""")


async def test_a_client_that_leaves_ends_its_paused_streamed_response(tmp_path, caplog) -> None:
    """A streamed response's headers (the `responseheaders` hook) paused by the filter end
    like a buffered exchange's phases when the client leaves: decided by the fail policy at
    once, then log, done, delete; not after `stream_timeout_s`."""
    async with addon_running(tmp_path, RESPONSE_HEADERS_PAUSER) as addon:
        f = tflow.tflow()
        await run_hook(addon.request(f))
        f.response = tflow.tresp(content=None)
        f.response.stream = True  # what stream_large_bodies does in responseheaders
        waiting = asyncio.ensure_future(addon.responseheaders(f))
        await asyncio.sleep(0)
        assert set(addon._waiting) == {f.id}
        inst = next(iter(addon.host.instances.values()))
        assert len(inst.vm.contexts) == 1
        with caplog.at_level("INFO", logger="wasm_reclaim.guest"):
            addon.client_disconnected(f.client_conn)
        await asyncio.wait_for(waiting, 5)
        logged = [r.getMessage().split()[-1] for r in caplog.records
                  if r.name == "wasm_reclaim.guest"]
        assert logged == ["on_log", "on_done", "on_delete"]
        assert inst.vm.contexts == {} and not addon._waiting
        assert f.response.status_code == 503  # fail closed: nothing of the upstream's leaves
        addon.error(f)  # what mitmproxy then runs: the exchange's record, nothing more
        assert not addon._open
