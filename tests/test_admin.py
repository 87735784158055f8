"""The admin endpoint: bearer token, JSON API, 401/404/4xx, token file, listen parsing."""

from __future__ import annotations

import asyncio
import logging
import stat

import pytest
from aiohttp.test_utils import TestClient, TestServer
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from addons.admin import (
    AdminServer,
    bearer_token,
    check_listen,
    load_or_create_token,
    make_app,
    parse_listen,
)
from addons.wasm_auth import WasmAuth
from tests.hooks import run_hook

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(("value", "expected"), [
    ("", None), ("  ", None), ("127.0.0.1:9901", ("127.0.0.1", 9901)),
    ("[::1]:80", ("::1", 80)), ("localhost:0", ("localhost", 0)),
])
def test_parse_listen(value, expected) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["9901", ":9901", "host:port", "127.0.0.1:70000"])
def test_parse_listen_errors(value) -> None:
    with pytest.raises(ValueError):
        parse_listen(value)


def test_token_file_is_created_0600_and_reused(tmp_path) -> None:
    path = tmp_path / "state" / "admin-token"
    token = load_or_create_token(path)
    assert len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == token


@pytest.fixture
async def client(tmp_path):
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_log_metrics=False, wasm_admin_listen="",
                       wasm_store=str(tmp_path / "store"), wasm_spool=str(tmp_path / "spool"))
        f = tflow.tflow()
        f.request.headers["Host"] = "shop.example"
        await run_hook(addon.request(f))  # no token: a 401, but the instance now exists
        async with TestClient(TestServer(make_app(addon, TOKEN))) as c:
            yield c
        await addon.done()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": TOKEN}, {"Authorization": "Basic x"}])
@pytest.mark.parametrize(("method", "path"), [("GET", "/instances"), ("GET", "/healthz"),
                                              ("POST", "/instances/shop.example/restart")])
async def test_missing_or_wrong_token_is_401(client, headers, method, path) -> None:
    r = await client.request(method, path, headers=headers)
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert (await r.json())["error"] == "missing or wrong bearer token"


async def test_instances_and_restart(client) -> None:
    r = await client.get("/instances", headers=AUTH)
    assert r.status == 200
    [inst] = await r.json()
    assert {"id", "tenant", "generation", "allocated_pages", "allocated_bytes", "requests",
            "outbound", "started_at"} <= set(inst)
    assert inst["id"] == "shop.example" and inst["generation"] == 0 and inst["requests"] == 1
    r = await client.post("/instances/shop.example/restart", headers=AUTH,
                          json={"reason": "test", "requested_by": "pytest"})
    assert r.status == 200
    body = await r.json()
    assert body["id"] == "shop.example" and body["generation"] == 1
    assert body["allocated_bytes_before"] >= body["allocated_bytes_after"] > 0
    assert (body["mode"], body["fallback"]) == ("cold", None)
    r = await client.post("/instances/shop.example/restart", headers=AUTH, json={"mode": "warm"})
    body = await r.json()
    assert (body["generation"], body["mode"], body["fallback"]) == (2, "warm", None)
    r = await client.get("/healthz", headers=AUTH)
    assert (await r.json()) == {"status": "ok"}


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("POST", "/instances/nope/restart", {}, 404),
    ("POST", "/instances/shop.example/restart", {"data": b"{not json"}, 400),
    ("POST", "/instances/shop.example/restart", {"data": b"[1, 2]"}, 400),
    ("POST", "/instances/shop.example/restart", {"json": {"reason": 5}}, 400),
    ("POST", "/instances/shop.example/restart", {"json": {"reasn": "typo"}}, 400),
    ("POST", "/instances/shop.example/restart", {"json": {"mode": "hot"}}, 400),
    ("POST", "/instances/shop.example/restart", {"json": {"mode": 1}}, 400),
    ("POST", "/instances/shop.example/restart", {"data": b"x" * 20000}, 413),
    ("GET", "/instances/shop.example/restart", {}, 405),
    ("DELETE", "/instances", {}, 405),
    ("GET", "/nothing-here", {}, 404),
])
async def test_malformed_requests_get_a_4xx(client, method, path, kwargs, status) -> None:
    r = await client.request(method, path, headers=AUTH, **kwargs)
    assert r.status == status
    assert "error" in await r.json()
    assert (await client.get("/healthz", headers=AUTH)).status == 200  # still serving


async def test_server_binds_loopback_and_reports_its_port(tmp_path) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_log_metrics=False, wasm_admin_listen="")
        server = AdminServer(addon, TOKEN, "127.0.0.1", 0)
        await server.start()
        try:
            assert server.port > 0
            async with TestClient(TestServer(make_app(addon, TOKEN))) as c:
                assert (await c.get("/instances", headers=AUTH)).status == 200
        finally:
            await server.stop()
        await addon.done()


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER  abc ", "abc"), ("Basic abc", None),
    ("Bearer", None), ("", None), ("abc", None),
])
def test_bearer_token_scheme_is_case_insensitive(header, token) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
async def test_any_case_of_the_bearer_scheme_is_accepted(client, scheme) -> None:
    r = await client.get("/instances", headers={"Authorization": f"{scheme} {TOKEN}"})
    assert r.status == 200


async def test_restart_body_accepts_its_known_keys_including_mode(client) -> None:
    r = await client.post("/instances/shop.example/restart", headers=AUTH,
                          json={"reason": "t", "requested_by": "pytest", "mode": "cold"})
    assert r.status == 200 and (await r.json())["generation"] == 1
    r = await client.post("/instances/shop.example/restart", headers=AUTH,
                          json={"reason": "t", "extra": 1})
    assert r.status == 400 and "unknown key(s) extra" in (await r.json())["error"]


@pytest.mark.parametrize(("host", "allowed", "refused", "warns"), [
    ("127.0.0.1", False, False, False), ("::1", False, False, False),
    ("localhost", False, False, False), ("127.0.0.2", False, False, False),
    ("0.0.0.0", False, True, False), ("192.0.2.7", False, True, False),
    ("admin.example", False, True, False),
    ("0.0.0.0", True, False, True), ("::", True, False, True),
])
def test_check_listen_refuses_non_loopback_unless_allowed(host, allowed, refused, warns) -> None:
    if refused:
        with pytest.raises(ValueError, match="wasm_admin_allow_remote"):
            check_listen((host, 9901), allowed)
    else:
        assert (check_listen((host, 9901), allowed) is not None) == warns


async def test_non_loopback_admin_listen_is_an_options_error_unless_allowed(
        tmp_path, caplog) -> None:
    addon = WasmAuth()
    opts = {"wasm_log_metrics": False, "wasm_spool": str(tmp_path / "spool"),
            "wasm_store": str(tmp_path / "store")}
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_admin_listen="", **opts)
        with pytest.raises(exceptions.OptionsError, match="not a loopback address"):
            tctx.configure(addon, wasm_admin_listen="0.0.0.0:9901")
        with caplog.at_level(logging.WARNING, logger="addons.wasm_auth"):
            tctx.configure(addon, wasm_admin_listen="0.0.0.0:9901",
                           wasm_admin_allow_remote=True, **opts)
        assert "beyond this machine" in caplog.text
        await addon.done()


# ---- what a hostile or broken client sends, on a real socket ---------------------------------


class _Backend:
    def __init__(self) -> None:
        self.restarts: list[str] = []

    def list_instances(self) -> list[dict[str, object]]:
        return []

    def restart_instance(self, instance_id: str, reason: str, requested_by: str
                         ) -> dict[str, object]:
        self.restarts.append(instance_id)
        return {"id": instance_id}


@pytest.fixture
async def backend() -> _Backend:
    return _Backend()


@pytest.fixture
async def server(backend):
    s = AdminServer(backend, TOKEN, "127.0.0.1", 0)
    await s.start()
    yield s
    await s.stop()


async def exchange(port: int, raw: bytes, *, hang_up: bool = False) -> bytes:
    """Send raw bytes; the answer (or b"" after hanging up). 10 s means no answer at all."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        if hang_up:
            await asyncio.sleep(0.2)
            return b""
        return await asyncio.wait_for(reader.read(4096), 10)
    finally:
        writer.close()
        await asyncio.sleep(0.1)  # let the server see the close and log what it logs


def _lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("addons.admin", "aiohttp"))]


async def test_declared_content_length_over_the_limit_is_413_at_once(server) -> None:
    raw = (b"POST /instances/x/restart HTTP/1.1\r\nHost: a\r\n"
           b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
           b"Content-Length: 100000000\r\n\r\n{")
    answer = await exchange(server.port, raw)  # before the fix: no answer (it read the body)
    assert answer.startswith(b"HTTP/1.1 413")


async def test_client_leaving_mid_body_leaves_one_line(server, backend, caplog) -> None:
    raw = (b"POST /instances/x/restart HTTP/1.1\r\nHost: a\r\n"
           b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
           b"Content-Length: 100\r\n\r\n{\"reason\"")
    with caplog.at_level(logging.DEBUG):
        await exchange(server.port, raw, hang_up=True)
        await asyncio.sleep(0.3)
    lines = _lines(caplog)
    assert len(lines) == 1 and "went away mid-body" in lines[0].getMessage()
    assert lines[0].exc_info is None
    assert backend.restarts == []  # nothing restarted from half a body


@pytest.mark.parametrize("raw", [
    b"GET /%0a[00:00:00.000] INJECTED HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /\r\n[00:00:00.000] INJECTED: x HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
    b"GET /instances HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
])
async def test_malformed_requests_log_one_escaped_line_without_traceback(
        server, caplog, raw) -> None:
    with caplog.at_level(logging.DEBUG):
        answer = await exchange(server.port, raw)
    assert answer.startswith(b"HTTP/1.")
    lines = _lines(caplog)
    assert len(lines) <= 1
    for record in lines:
        assert record.exc_info is None and record.exc_text is None
        message = record.getMessage()
        assert "\n" not in message and "\r" not in message  # nothing forged after a newline


async def test_a_request_without_a_token_is_logged_as_such(server, caplog) -> None:
    # The line's own words are not taken for credentials (it read "no bearer [redacted]").
    with caplog.at_level(logging.DEBUG):
        answer = await exchange(server.port, b"GET /instances HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401")
    refused = [r.getMessage() for r in _lines(caplog) if "refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].endswith("refused: no token"), refused


async def test_failed_auth_lines_are_rate_limited(server, caplog) -> None:
    with caplog.at_level(logging.DEBUG):
        for _ in range(30):
            answer = await exchange(server.port, b"GET /instances HTTP/1.1\r\nHost: a\r\n"
                                                 b"Authorization: Bearer nope\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 401")
    refused = [r for r in _lines(caplog) if "refused" in r.getMessage()]
    assert 1 <= len(refused) <= 5
