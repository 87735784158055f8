"""The admin endpoint: bearer token, JSON API, 401/404/4xx, token file, listen parsing."""

from __future__ import annotations

import stat

import pytest
from aiohttp.test_utils import TestClient, TestServer
from mitmproxy.test import taddons, tflow

from addons.admin import AdminServer, load_or_create_token, make_app, parse_listen
from addons.wasm_auth import WasmAuth

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
        await addon.request(f)  # no token: a 401, but the instance now exists
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
    r = await client.get("/healthz", headers=AUTH)
    assert (await r.json()) == {"status": "ok"}


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("POST", "/instances/nope/restart", {}, 404),
    ("POST", "/instances/shop.example/restart", {"data": b"{not json"}, 400),
    ("POST", "/instances/shop.example/restart", {"data": b"[1, 2]"}, 400),
    ("POST", "/instances/shop.example/restart", {"json": {"reason": 5}}, 400),
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
