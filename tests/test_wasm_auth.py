"""The wasm_auth addon under mitmproxy's test context, with a real HTTP auth server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import wasmtime
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from addons import wasm_auth
from addons.proxywasm import Decision, LocalResponse, _wasmtime, headers
from addons.proxywasm.journal import JournalConfig
from addons.wasm_auth import (
    RequestView,
    WasmAuth,
    describe,
    instance_key,
    is_logout,
    logout_path,
    parse_clusters,
    parse_filter_config,
    parse_journal,
    parse_positive,
    parse_restart_mode,
    parse_store,
    token_hash,
    verdict,
    view,
)
from tests.conftest import ROOT
from tests.hooks import run_hook

from .servers import free_port
from .wat import module, trampolines

# ---- pure parsing functions -----------------------------------------------------------------


@pytest.mark.parametrize(("specs", "expected"), [
    ([], {}),
    (["auth=http://127.0.0.1:8081"], {"auth": "http://127.0.0.1:8081"}),
    (["a=http://x/ ", " b = https://y:1/p/"], {"a": "http://x", "b": "https://y:1/p"}),
])
def test_parse_clusters(specs, expected) -> None:
    assert parse_clusters(specs) == expected


@pytest.mark.parametrize(("specs", "message"), [
    (["auth"], "expected NAME=URL"),
    (["=http://x"], "expected NAME=URL"),
    (["auth=127.0.0.1:8081"], "must start with http"),
    (["a=http://x", "a=http://y"], "given twice"),
    (["auth=http://[::1"], "is not a URL: Invalid IPv6 URL"),
    (["auth=http://auth:99999"], "is not a URL: Port out of range"),
    (["auth=http://:8081"], "names no host"),
    (["auth=ftp://u:pw@x"], r"got 'ftp://u:\*\*\*@x'"),  # the password is never shown
])
def test_parse_clusters_errors(specs, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_clusters(specs)


def test_parse_filter_config(tmp_path) -> None:
    assert parse_filter_config("") == b""
    assert parse_filter_config(' {"ttl_seconds": 60} ') == b'{"ttl_seconds": 60}'
    f = tmp_path / "cfg.json"
    f.write_text('{"fail_open": true}')
    assert parse_filter_config(f"@{f}") == b'{"fail_open": true}'
    # The host passes the configuration through as bytes: JSON is the filter's format.
    assert parse_filter_config("{nope") == b"{nope"
    f.write_bytes(b"key=value\n\xff\x00")
    assert parse_filter_config(f"@{f}") == b"key=value\n\xff\x00"
    with pytest.raises(ValueError, match="cannot read"):
        parse_filter_config(f"@{tmp_path / 'missing.json'}")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "fast", ""])
def test_parse_positive_rejects(value) -> None:
    with pytest.raises(ValueError, match="wasm_clock_speed"):
        parse_positive("wasm_clock_speed", value)


def test_parse_positive_accepts() -> None:
    assert parse_positive("x", "60") == 60.0 and parse_positive("x", "0.5") == 0.5


def test_parse_store(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("MONGODB_URI", raising=False)
    assert parse_store("mongodb://h:1/") == "mongodb://h:1/"
    assert parse_store("").endswith(os.path.join(".wasm-reclaim", "store"))
    assert parse_store(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv("MONGODB_URI", "mongodb://env:2/")
    assert parse_store("") == "mongodb://env:2/"


@pytest.mark.parametrize(("authority", "key"), [
    (b"Shop.Example", "shop.example"), (b"shop.example:8080", "shop.example"),
    (b"127.0.0.1:80", "127.0.0.1"), (b"[::1]:8080", "[::1]"), (b"", "default"),
])
def test_instance_key(authority, key) -> None:
    assert instance_key(authority, "host") == key
    assert instance_key(authority, "single") == "single"


def test_view() -> None:
    f = tflow.tflow()
    f.client_conn.timestamp_tls_setup = None  # a plain-HTTP client
    f.request.headers["Host"] = "Shop.Example"
    f.request.headers["Authorization"] = "Bearer abc"
    req = RequestView(*view(f))
    assert (req.authority, req.hosts, req.authorization) == (b"Shop.Example", 1, b"Bearer abc")
    assert view(tflow.tflow())[1] == b"address"  # no Host: the request's host
    pairs = dict(req.pairs)
    assert pairs[b":method"] == b"GET" and pairs[b":path"] == b"/path"
    assert pairs[b":authority"] == b"Shop.Example"
    assert pairs[b"authorization"] == b"Bearer abc"  # the value as sent, the name lowercased
    assert b"host" not in pairs and b"Host" not in pairs  # as in Envoy: only :authority
    assert pairs[b":scheme"] == b"http"
    f.client_conn.timestamp_tls_setup = 1.0  # TLS: the client's scheme, not the forwarded one
    assert dict(view(f)[0])[b":scheme"] == b"https"
    f.request.headers.add("host", "other.example")
    assert view(f)[2] == 2  # two Host fields: refused by the hook


_names = st.sampled_from([b"host", b"Host", b"HOST", b"authorization", b"Authorization",
                          b"x-\xc3\xa9T\xff", b"Accept", b""]) | st.binary(max_size=20)


@given(st.lists(st.tuples(_names, st.binary(max_size=30)), max_size=12))
def test_view_fields_in_c_is_the_python_loop(raw: list[tuple[bytes, bytes]]) -> None:
    # The C pass (fastcall.c) and the Python loop agree on any fields: names lowercased in
    # ASCII only, the last Host and Authorization, every Host counted.
    if _wasmtime.view_fields is None:
        pytest.fail("the host's extension is not built: bash .ci/setup builds it from "
                    "addons/proxywasm/fastcall.c with gcc")
    fields = tuple(raw)
    assert _wasmtime.view_fields(fields) == headers.view_fields_py(fields)
    assert headers.view_fields(fields) == headers.view_fields_py(fields)
    assert headers.view_fields([*fields]) == headers.view_fields_py(fields)  # the fallback
    assert _wasmtime.view_fields([*fields]) is None  # not mitmproxy's tuple: Python decides
    assert _wasmtime.view_fields(((b"host", "text"),)) is None


@pytest.mark.parametrize(("version", "headers", "midway", "crash"), [
    ("HTTP/1.1", {"transfer-encoding": "chunked"}, True, True),  # size unknown
    ("HTTP/1.1", {"content-length": "10"}, False, False),
    ("HTTP/1.1", {"content-length": "2000"}, False, True),  # over the 1 KiB limit
    ("HTTP/1.1", {"content-length": "1e3"}, False, True),  # malformed: never answered
    ("HTTP/1.1", {}, False, False),  # no body at all
    ("HTTP/2.0", {}, True, False),  # no Content-Length: answered, mitmproxy fails it if long
    ("HTTP/2.0", {"content-length": "10"}, False, False),
])
def test_which_requests_stream_midway_and_which_answers_would_crash(
        version, headers, midway, crash) -> None:
    f = tflow.tflow()
    f.request.http_version = version
    f.request.headers.clear()
    f.request.headers.update(headers)
    assert wasm_auth.streams_midway(f.request) is midway
    assert wasm_auth.answer_would_crash(f.request, 1024) is crash


@pytest.mark.parametrize(("header", "hashed"), [
    ("Bearer secret-token", True), ("bearer  x", True), ("Basic abc", False), ("", False),
    ("Bearer ", False),
])
def test_token_hash_never_contains_the_token(header, hashed) -> None:
    h = token_hash(header.encode() or None)
    assert (h is not None) == hashed
    if h is not None:
        assert len(h) == 64 and "secret" not in h and "token" not in h


@pytest.mark.parametrize(("decision", "has_token", "word"), [
    (Decision("continue", [], None, 0), True, "hit"),
    (Decision("continue", [], None, 1), True, "miss"),
    (Decision("continue", [], None, 0), False, "continue"),
    (Decision("respond", [], LocalResponse(401), 0), False, "deny"),
    (Decision("respond", [], LocalResponse(503), 1), True, "error"),
    (Decision("respond", [], LocalResponse(302), 0), True, "respond"),
    (Decision("reset", [], None, 0), True, "reset"),
    (Decision("continue", [], None, 0, 0, "trap"), True, "fail_open"),
])
def test_verdict(decision, has_token, word) -> None:
    assert verdict(decision, has_token) == word


def test_verdict_of_a_logout() -> None:
    assert verdict(Decision("continue", [], None, 0), True, logout=True) == "logout"
    assert verdict(Decision("respond", [], LocalResponse(401), 0), False, logout=True) == "deny"


def test_describe_mentions_what_mitmweb_should_show() -> None:
    d = Decision("respond", [], LocalResponse(401, details="token_rejected"), 1, 3)
    text = describe("deny", "shop", 3, 17, 1.25, d)
    for part in ("deny", "instance shop", "gen 3", "17 pages", "1.2 ms", "token_rejected"):
        assert part in text


def test_describe_counts_pages_in_english() -> None:
    d = Decision("continue", [], None, 0)
    assert " · 1 page · " in describe("hit", "shop", 0, 1, 0.4, d)
    assert " · 2 pages · " in describe("hit", "shop", 0, 2, 0.4, d)
    assert describe("logout", "shop", 0, 1, 0.4, d, "token evicted").startswith(
        "wasm: logout · token evicted · instance shop")


@pytest.mark.parametrize(("config", "path", "logout"), [
    (b"", b"/logout", True),
    (b"", b"/logout?next=/", True),
    (b"", b"/logouts", False),
    (b'{"logout_path": "/bye"}', b"/bye", True),
    (b'{"logout_path": "/bye"}', b"/logout", False),
    (b'{"logout_path": ""}', b"/logout", False),
])
def test_logout_path(config, path, logout) -> None:
    assert is_logout(path, logout_path(config)) is logout


# ---- configure() ------------------------------------------------------------------------------


def base_options(tmp_path) -> dict[str, object]:
    return {"wasm_log_metrics": False, "wasm_admin_listen": "",
            "wasm_spool": str(tmp_path / "spool"), "wasm_store": str(tmp_path / "store")}


@pytest.mark.parametrize(("option", "value", "message"), [
    ("wasm_cluster", ["auth"], "expected NAME=URL"),
    ("wasm_instance_key", "tenant", "expected 'host' or 'single'"),
    ("wasm_filter_config", "{", "rejected its plugin configuration"),
    ("wasm_vm_config", "@/nonexistent/vm.cfg", "wasm_vm_config: cannot read"),
    ("wasm_filter_config", '{"entry_size": -5}', "rejected its plugin configuration"),
    ("wasm_clock_speed", "0", "must be a positive number"),
    ("wasm_sample_interval", "soon", "is not a number"),
    ("wasm_admin_listen", "9901", "expected HOST:PORT"),
    ("wasm_admin_listen", "127.0.0.1:99999", "out of range"),
    ("wasm_memory_limit", 0, "at least 1 MiB"),
    ("wasm_filter", "/nonexistent/filter.wasm", "cannot read filter"),
    ("wasm_restart_mode", "hot", "expected 'cold' or 'warm'"),
    ("wasm_journal_window", "soon", "wasm_journal_window: 'soon' is not a number"),
    ("wasm_journal_limit", 0, "must be at least 1 MiB, got 0 \\(wasm_warm_restart=off turns "
                              "journaling off\\)"),
    ("wasm_warm_restart", "sometimes", "wasm_warm_restart: expected 'auto', 'on' or 'off'"),
    ("wasm_store", "mongodb://", "wasm_store: mongodb://: Must provide at least one hostname"),
    ("wasm_store", "mongodb://me:s3cret@db:99999/x",
     "wasm_store: mongodb://db:99999/x: Port must be an integer"),
])
async def test_bad_options_are_options_errors(tmp_path, option, value, message) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **base_options(tmp_path))
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(addon, **{option: value})


def test_the_start_up_heap_is_frozen_once_and_what_comes_later_is_still_collected() -> None:
    """In a process of its own: no freeze under a test harness's master, nor once the proxy
    runs (a script added later); one when the addon loads into mitmdump's master at start-up,
    none again (a reload); and a cycle made after it (a filter's instance, a flow) is still
    found by the collector."""
    code = """if True:
        import asyncio, gc, weakref
        from mitmproxy import hooks, options
        from mitmproxy.test import taddons
        from mitmproxy.tools.dump import DumpMaster
        from addons.wasm_auth import WasmAuth, freeze_start_heap
        class Node: pass
        def master():
            return DumpMaster(options.Options(server=False), with_termlog=False)
        async def main():
            with taddons.context(WasmAuth()):
                print(gc.get_freeze_count() == 0)
            running = master()
            running.addons.trigger(hooks.RunningHook())
            freeze_start_heap(running)
            print(gc.get_freeze_count() == 0)
            master().addons.add(WasmAuth())  # its load
            frozen = gc.get_freeze_count()
            freeze_start_heap(master())
            later = Node(); later.self = later; alive = weakref.ref(later); del later
            gc.collect()
            print(frozen > 0, gc.get_freeze_count() == frozen, alive() is None)
        asyncio.run(main())
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.split() == ["True", "True", "True", "True", "True"]


async def test_garbage_wasm_is_an_options_error(tmp_path) -> None:
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"\x00asm\x01\x00\x00\x00garbage")
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **base_options(tmp_path))
        with pytest.raises(exceptions.OptionsError, match="not a valid WebAssembly module"):
            tctx.configure(addon, wasm_filter=str(bad))


@pytest.mark.parametrize(("option", "value", "message"), [
    ("wasm_cluster", ["auth"], "wasm_cluster: expected NAME=URL, got 'auth'"),
    ("wasm_sample_interval", "soon", "wasm_sample_interval: 'soon' is not a number"),
    ("wasm_filter_config", "{", "wasm_filter: proxy_on_configure returned false"),
])
async def test_bad_option_at_load_is_one_line(tmp_path, caplog, option, value, message) -> None:
    """Loading the script, mitmproxy would log a raised OptionsError with its (chained)
    traceback: the addon logs one line instead, and stays inert."""
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **{**base_options(tmp_path), option: value})
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and errors[0].exc_info is None
        assert errors[0].getMessage().startswith(f"wasm_auth: {message}")
        assert "\n" not in errors[0].getMessage()
        assert addon.settings is None and addon.host is None
        await addon.running()  # nothing starts
        f = make_flow("x")
        await run_hook(addon.request(f))
        assert not f.comment
        tctx.configure(addon, **{option: {"wasm_cluster": [], "wasm_sample_interval": "1"}
                                 .get(option, "")})
        assert addon.host is not None  # a good value later configures it


async def test_bad_option_later_is_rejected_without_a_chain(tmp_path) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **base_options(tmp_path))
        with pytest.raises(exceptions.OptionsError) as info:
            tctx.configure(addon, wasm_filter_config="{")
        assert info.value.__cause__ is None and info.value.__suppress_context__


# ---- the request hook against a real auth server ------------------------------------------------


@pytest.fixture
async def auth_server() -> AsyncIterator[TestServer]:
    async def verify(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        return web.Response(status=200 if header.endswith("good") else 401)

    app = web.Application()
    app.router.add_get("/verify", verify)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


def make_flow(token: str | None, host: str = "shop.example", path: str = "/") -> tflow.HTTPFlow:
    f = tflow.tflow()
    f.request.path = path
    f.request.headers["Host"] = host
    if token is not None:
        f.request.headers["Authorization"] = f"Bearer {token}"
    return f


async def test_hit_miss_deny_through_the_hook(tmp_path, auth_server) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_cluster=[f"auth=http://127.0.0.1:{auth_server.port}"],
                       **base_options(tmp_path))
        miss, hit, deny, missing = (make_flow("a-good"), make_flow("a-good"), make_flow("bad"),
                                    make_flow(None))
        for f in (miss, hit, deny, missing):
            await run_hook(addon.request(f))
        assert miss.response is None and "wasm: miss" in miss.comment
        assert hit.response is None and "wasm: hit" in hit.comment
        assert deny.response is not None and deny.response.status_code == 401
        assert "wasm: deny" in deny.comment and deny.marked == wasm_auth.DENIED_MARK
        assert missing.response is not None and missing.response.status_code == 401
        assert "instance shop.example" in hit.comment and "gen 0" in hit.comment
        status = tctx.command(addon.status)
        assert "shop.example" in status
        await addon.done()


async def test_logout_shows_the_evicted_token(tmp_path, auth_server) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_cluster=[f"auth=http://127.0.0.1:{auth_server.port}"],
                       **base_options(tmp_path))
        first, out, again = (make_flow("a-good"), make_flow("a-good", path="/logout"),
                             make_flow("a-good", path="/logout"))
        for f in (first, out, again):
            await run_hook(addon.request(f))
        assert out.comment.startswith("wasm: logout · token evicted · instance shop.example")
        assert out.response is None  # the logout goes upstream
        assert again.comment.startswith("wasm: logout · token was not cached")
        rows = tctx.command(addon.instances)
        assert rows[0][:3] == ["instance", "tenant", "generation"]
        table = dict(zip(rows[0], rows[1], strict=True))
        assert table["instance"] == "shop.example" and table["requests"] == "3"
        assert table["live_entries"] == "0" and int(table["allocated_pages"]) >= 1
        await addon.done()


async def test_comment_column_in_mitmweb_unless_the_user_chose_columns(tmp_path) -> None:
    from mitmproxy.tools.web.webaddons import WebAddon

    for chosen, expected in ((None, True), (["path", "status"], False)):
        addon = WasmAuth()
        with taddons.context(addon, WebAddon()) as tctx:
            if chosen is not None:
                tctx.options.update(web_columns=chosen)
            tctx.configure(addon, **base_options(tmp_path))
            await addon.running()
            assert ("comment" in tctx.options.web_columns) is expected
            if chosen is not None:
                assert tctx.options.web_columns == chosen
            await addon.done()


async def test_one_instance_per_upstream_host(tmp_path, auth_server) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_cluster=[f"auth=http://127.0.0.1:{auth_server.port}"],
                       **base_options(tmp_path))
        for host in ("a.example", "b.example", "a.example"):
            await run_hook(addon.request(make_flow("x-good", host)))
        rows = {r["id"]: r for r in addon.list_instances()}
        assert set(rows) == {"a.example", "b.example"}
        assert rows["a.example"]["requests"] == 2 and rows["a.example"]["outbound"] == 1
        await addon.done()


async def test_auth_server_down_is_fail_closed_then_fail_open(tmp_path) -> None:
    addon = WasmAuth()
    dead = f"auth=http://127.0.0.1:{free_port()}"
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_cluster=[dead], **base_options(tmp_path))
        f = make_flow("x-good")
        await run_hook(addon.request(f))
        assert f.response is not None and f.response.status_code == 503
        assert "wasm: error" in f.comment and "auth_unavailable" in f.comment
        tctx.configure(addon, wasm_filter_config=json.dumps({"fail_open": True}))
        g = make_flow("x-good")
        await run_hook(addon.request(g))
        assert g.response is None  # let through, and nothing cached
        await addon.done()


async def test_restart_command(tmp_path, auth_server) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_cluster=[f"auth=http://127.0.0.1:{auth_server.port}"],
                       **base_options(tmp_path))
        await run_hook(addon.request(make_flow("x-good")))
        assert "generation 0 -> 1" in tctx.command(addon.restart, "shop.example")
        with pytest.raises(exceptions.CommandError, match="no filter instance 'nope'"):
            tctx.command(addon.restart, "nope")
        f = make_flow("x-good")
        await run_hook(addon.request(f))
        assert "wasm: miss" in f.comment and "gen 1" in f.comment  # the cache was dropped
        await addon.done()


async def test_warm_restart_command_keeps_the_cache(tmp_path, auth_server) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_cluster=[f"auth=http://127.0.0.1:{auth_server.port}"],
                       wasm_filter_config='{"ttl_seconds": 120}', wasm_warm_restart="on",
                       **base_options(tmp_path))
        for token in ("x-good", "y-good", "x-good"):
            await run_hook(addon.request(make_flow(token)))
        out = tctx.command(addon.restart, "shop.example", "warm")
        assert "(warm, 3 requests replayed): generation 0 -> 1" in out
        f = make_flow("y-good")
        await run_hook(addon.request(f))
        assert "wasm: hit" in f.comment and "gen 1" in f.comment  # the cache survived
        tctx.configure(addon, wasm_restart_mode="warm")
        assert "(warm, 4 requests replayed): generation 1 -> 2" in tctx.command(
            addon.restart, "shop.example")
        assert "(cold): generation 2 -> 3" in tctx.command(addon.restart, "shop.example", "cold")
        with pytest.raises(exceptions.CommandError, match="mode: expected 'cold' or 'warm'"):
            tctx.command(addon.restart, "shop.example", "tepid")
        await addon.done()


async def test_journaling_waits_for_the_first_warm_restart(tmp_path, auth_server) -> None:
    # wasm_warm_restart=auto with cold restarts: no journal, so requests pay nothing for it,
    # until a warm restart is asked for. That one runs cold (the journal would lack the misses
    # before it) and says why; the next one runs warm.
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_cluster=[f"auth=http://127.0.0.1:{auth_server.port}"],
                       wasm_filter_config='{"ttl_seconds": 120}', **base_options(tmp_path))
        for token in ("x-good", "y-good", "x-good"):
            await run_hook(addon.request(make_flow(token)))
        assert addon.host is not None
        [inst] = addon.host.instances.values()
        assert inst.journal is None and not addon.host.journaling
        assert "generation 0 -> 1" in tctx.command(addon.restart, "shop.example")  # cold
        assert inst.journal is None
        await run_hook(addon.request(make_flow("x-good")))  # a miss: generation 1 has called out
        out = tctx.command(addon.restart, "shop.example", "warm")
        assert re.search(r"\(cold: journaling started [\d.]+ s ago, when this generation had "
                         r"already called out", out) and "generation 1 -> 2" in out
        assert inst.journal is not None and inst.journal.incomplete(0) is None
        for token in ("x-good", "y-good"):
            await run_hook(addon.request(make_flow(token)))
        assert len(inst.journal.entries) == 2
        assert "(warm, 2 requests replayed): generation 2 -> 3" in tctx.command(
            addon.restart, "shop.example", "warm")
        await addon.done()


async def test_without_warm_restarts_nothing_is_journaled(tmp_path, auth_server) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_cluster=[f"auth=http://127.0.0.1:{auth_server.port}"],
                       wasm_warm_restart="off", **base_options(tmp_path))
        for token in ("x-good", "y-good", "x-good"):
            await run_hook(addon.request(make_flow(token)))
        out = tctx.command(addon.restart, "shop.example", "warm")
        assert "(cold: journaling is off for this host" in out
        tctx.configure(addon, wasm_restart_mode="warm")
        await run_hook(addon.request(make_flow("x-good")))
        assert addon.host is not None and not addon.host.journaling
        assert all(i.journal is None for i in addon.host.instances.values())
        # With the restart mode warm (auto), every generation is journaled from its start.
        tctx.configure(addon, wasm_warm_restart="auto")
        await run_hook(addon.request(make_flow("x-good")))
        [inst] = addon.host.instances.values()
        assert inst.journal is not None and len(inst.journal.entries) == 1
        assert "(warm, 1 requests replayed)" in tctx.command(addon.restart, "shop.example")
        await addon.done()


@pytest.mark.parametrize(("window", "limit", "config", "expected"), [
    ("0", 64, b'{"ttl_seconds": 300}', JournalConfig(301.0, 64 * 2**20)),
    ("120", 8, b'{"ttl_seconds": 300}', JournalConfig(121.0, 8 * 2**20)),
    ("", 64, b"", JournalConfig(601.0, 64 * 2**20)),
])
def test_parse_journal(window, limit, config, expected) -> None:
    assert parse_journal(window, limit, config) == expected


@pytest.mark.parametrize(("value", "expected"), [("cold", "cold"), (" WARM ", "warm")])
def test_parse_restart_mode(value, expected) -> None:
    assert parse_restart_mode(value) == expected


async def test_flow_already_answered_is_left_alone(tmp_path) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **base_options(tmp_path))
        f = tflow.tflow(resp=True)
        await run_hook(addon.request(f))
        assert not f.comment and addon.list_instances() == []


HEADER_FILTER = """(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "x-filtered")
  (data (i32.const 120) "yes")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 0) (i32.const 100) (i32.const 10) (i32.const 120) (i32.const 3)))
    (i32.const 0)))"""


async def test_headers_the_filter_adds_are_forwarded(tmp_path) -> None:
    import wasmtime

    wasm = tmp_path / "headers.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(HEADER_FILTER))
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_filter=str(wasm), **base_options(tmp_path))
        f = make_flow("whatever")
        await run_hook(addon.request(f))
        assert f.response is None
        assert f.request.headers["x-filtered"] == "yes"
        assert f.request.headers["Authorization"] == "Bearer whatever"
        await addon.done()


# ---- the script's module as mitmproxy dispatches to it ---------------------------------------


def test_the_script_module_carries_the_addon_s_hooks_and_none_for_the_rest() -> None:
    """mitmproxy looks each event's hook up on the script's module first: every hook name is
    there, bound to the addon's method or to None (never a missing name: a formatted
    AttributeError per event), and no `addons` list adds a lookup per event."""
    from mitmproxy import hooks
    from mitmproxy.addons.script import load_script

    script = load_script(wasm_auth.__file__)
    assert script is not None
    names = set(wasm_auth.hook_names())
    assert {"load", "request", "update", "client_connected"} <= names
    assert set(hooks.all_hooks) - {"add_log"} <= names
    assert names <= set(vars(script))
    assert "add_log" not in vars(script)  # mitmproxy warns about a script that has one
    assert script.addons == ()
    addon = script.request.__self__
    assert type(addon).__name__ == "WasmAuth"
    bound = {n for n in names if vars(script)[n] is not None}
    assert bound == {"load", "configure", "running", "done", "requestheaders", "request",
                     "responseheaders", "response", "error", "client_disconnected"}
    assert all(getattr(vars(script)[n], "__self__", None) is addon for n in bound)
    assert vars(script)["update"] is None
    assert script.restart.command_name == "wasm.restart"  # commands too
    # The package's module (imported, not run as a script) is left as it is.
    assert not hasattr(wasm_auth, "update") and wasm_auth.addons[0]._published is None


async def test_mitmproxy_dispatches_the_events_to_the_script_s_addon() -> None:
    """Through mitmproxy's own AddonManager: the None stubs are skipped, WasmAuth's hooks run."""
    from mitmproxy.addons.script import ScriptLoader
    from mitmproxy.proxy.layers.http import HttpRequestHook

    loader = ScriptLoader()
    with taddons.context(loader) as tctx:
        tctx.configure(loader, scripts=[wasm_auth.__file__])
        [script] = loader.addons
        script.reloadtask.cancel()  # mitmproxy loads it from this watcher task: load it now
        script.loadscript()
        addon = script.ns.request.__self__
        tctx.configure(addon, wasm_cluster=["auth=http://127.0.0.1:9"], wasm_log_metrics=False,
                       wasm_admin_listen="")
        # This configuration never needs `response` or `error`: unbound on the module too.
        assert script.ns.response is None and script.ns.error is None
        assert addon.__dict__["response"] is None
        f = tflow.tflow()
        f.request.headers["host"] = "shop.example"
        await tctx.master.addons.handle_lifecycle(HttpRequestHook(f))
        assert f.response is not None and f.response.status_code == 401  # no token
        assert f.comment.startswith("wasm: deny")


# A filter that ticks every 10 ms and counts its ticks in the counter `ticks`.
TICK_FILTER = trampolines(
    "proxy_set_tick_period_milliseconds", "proxy_define_metric", "proxy_increment_metric",
) + """
  (data (i32.const 300) "ticks")
  (global $ticks (mut i32) (i32.const 0))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $proxy_define_metric (i32.const 0) (i32.const 300) (i32.const 5) (i32.const 400)))
    (global.set $ticks (i32.load (i32.const 400)))
    (drop (call $proxy_set_tick_period_milliseconds (i32.const 10)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (drop (call $proxy_increment_metric (global.get $ticks) (i64.const 1))))
"""


async def test_poll_loop_sleeps_when_idle_and_wakes_for_ticks(tmp_path) -> None:
    """The hosts are polled when something falls due: an idle proxy polls about once a
    second (it used to every 50 ms), and a 10 ms tick is kept (it used to be cut to 50 ms)."""
    wasm = tmp_path / "tick.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(module(TICK_FILTER)))
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_filter=str(wasm), **base_options(tmp_path))
        await addon.running()
        assert addon.host is not None
        polls = 0
        poll = addon.host.poll

        def counting() -> None:
            nonlocal polls
            polls += 1
            poll()

        addon.host.poll = counting  # type: ignore[method-assign]
        await asyncio.sleep(0.6)
        idle_polls = polls
        inst = addon.host.instance("shop")  # its 10 ms tick wakes the sleeping loop
        assert addon._poll_at_ns <= addon.clock.now_ns() + 10_000_000
        await asyncio.sleep(1.0)
        assert inst.vm is not None
        ticks = inst.vm.metric_values()["ticks"]
        await addon.done()
    assert idle_polls <= 3
    # one tick per poll at most: polling every 50 ms allowed 20 a second; 100 are due
    assert ticks >= 40


async def test_hooks_a_configuration_never_needs_are_unbound(tmp_path) -> None:
    """mitmproxy skips a hook bound to None: the reference filter (no response callbacks)
    with metrics off needs only the request hooks; logging its records needs `response` and
    `error` too; a filter with response callbacks needs them all."""
    addon = WasmAuth()
    lifecycle_filter = tmp_path / "lifecycle.wasm"
    lifecycle_filter.write_bytes(wasmtime.wat2wasm(module(
        '(func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) '
        "(i32.const 0))")))
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **base_options(tmp_path))
        assert (addon.responseheaders, addon.response, addon.error) == (None, None, None)
        assert callable(addon.request) and callable(addon.requestheaders)
        tctx.configure(addon, wasm_log_metrics=True)
        assert addon.responseheaders is None
        assert callable(addon.response) and callable(addon.error)
        tctx.configure(addon, wasm_log_metrics=False, wasm_filter=str(lifecycle_filter))
        assert callable(addon.responseheaders) and callable(addon.response)
        assert callable(addon.error)


@pytest.mark.parametrize(("part", "value"), [
    ("path", b"/a HTTP/1.1\r\nX-Smuggled: 1\r\n\r\nGET /b"), ("path", b"/a\x00"),
    ("path", b"/a b"), ("method", b"GET\r\n"), ("authority", b"shop.example\r\nx: 1"),
])
async def test_an_http2_request_line_that_http1_cannot_carry_is_refused(tmp_path, part,
                                                                        value) -> None:
    """mitmproxy copies an HTTP/2 request's :path into an HTTP/1 upstream's request line:
    CR LF there would smuggle a header or a second request."""
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_log_metrics=False, wasm_admin_listen="")
        f = tflow.tflow()
        f.request.http_version = "HTTP/2.0"
        f.request.headers.clear()
        f.request.authority = "shop.example"
        setattr(f.request.data, part, value)
        await run_hook(addon.request(f))
        assert f.response is not None and f.response.status_code == 400
        ok = tflow.tflow()
        ok.request.http_version = "HTTP/2.0"
        ok.request.path = "/caf%C3%A9?q=1"
        await run_hook(addon.request(ok))
        assert ok.response is None or ok.response.status_code != 400
        await addon.done()
