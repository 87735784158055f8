"""Log lines a client cannot forge or flood: escaping, one-line tracebacks, rate limits."""

from __future__ import annotations

import asyncio
import logging

import pytest
import wasmtime
from mitmproxy.test import taddons, tflow

from addons.logsafe import OneLine, RateLimit, Redact, escape, shown_url
from addons.wasm_auth import WasmAuth
from tests.hooks import run_hook

from .servers import free_port


@pytest.mark.parametrize(("text", "expected"), [
    ("shop.example", "shop.example"),
    ("/\n[00:00:00.000] INJECTED", "/\\n[00:00:00.000] INJECTED"),
    ("a\r\nb\x00c\x1b[31m", "a\\r\\nb\\x00c\\x1b[31m"),
    ("back\\slash", "back\\\\slash"),
    ("\u2028next\x85", "\\u2028next\\x85"),
    (b"/caf\xe9", "/caf\\xe9"),
    ("/caf\udce9", "/caf\\xe9"),  # mitmproxy's surrogateescape
    (None, ""),
])
def test_escape(text, expected) -> None:
    assert escape(text) == expected


def test_escape_cuts_long_text() -> None:
    out = escape("x" * 9000, limit=50)
    assert out.startswith("x" * 50) and out.endswith("(9000 chars)") and len(out) < 80


def _record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("t", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_one_line_replaces_the_traceback_with_the_reason() -> None:
    record = _record("Error handling request from %s", "127.0.0.1",
                     exc=ValueError("400, message:\n  Bad status line\n  b'GET /\\n'"))
    assert OneLine().filter(record)
    assert record.exc_info is None
    assert record.getMessage() == ("Error handling request from 127.0.0.1: ValueError: 400, "
                                   "message: Bad status line b'GET /\\\\n'")


def test_rate_limit_lets_a_burst_through_then_counts() -> None:
    now = [0.0]
    limit = RateLimit(burst=3, period_s=10, clock=lambda: now[0])
    passed = [limit.filter(_record("refused %s", i)) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limit.filter(_record("another kind"))  # kinds are counted apart
    now[0] = 10.5
    record = _record("refused %s", 99)
    assert limit.filter(record)
    assert record.getMessage() == "refused 99 (7 similar lines suppressed)"
    assert limit.filter(_record("refused %s", 100))


# ---- through the addon: how many lines a failure writes --------------------------------------


def _options(tmp_path, **kw: object) -> dict[str, object]:
    return {"wasm_log_metrics": False, "wasm_admin_listen": "",
            "wasm_spool": str(tmp_path / "spool"), "wasm_store": str(tmp_path / "store"), **kw}


def _flow(token: str | None = "t-good") -> tflow.HTTPFlow:
    f = tflow.tflow()
    f.request.headers["Host"] = "shop.example"
    if token is not None:
        f.request.headers["Authorization"] = f"Bearer {token}"
    return f


async def test_a_failed_auth_call_writes_one_line(tmp_path, caplog) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **_options(
            tmp_path, wasm_cluster=[f"auth=http://127.0.0.1:{free_port()}"]))  # nobody there
        await run_hook(addon.request(_flow()))  # start the instance; its first lines are start-up
        caplog.clear()
        with caplog.at_level(logging.INFO):
            f = _flow("other-token")
            await run_hook(addon.request(f))
            await asyncio.sleep(0.1)
        assert f.response is not None and f.response.status_code == 503
        assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
        await addon.done()


TRAPPING = """(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "client said:\\n[00:00:00.000] FORGED")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $log (i32.const 2) (i32.const 100) (i32.const 34)))
    unreachable))"""


async def test_a_crash_is_logged_once_and_guest_text_stays_on_its_line(tmp_path, caplog) -> None:
    wasm = tmp_path / "trap.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(TRAPPING))
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **_options(tmp_path, wasm_filter=str(wasm)))
        with caplog.at_level(logging.INFO):
            f = _flow()
            await run_hook(addon.request(f))
        assert f.response is not None and f.response.status_code == 503
        crashes = [r for r in caplog.records if "trapped" in r.getMessage()]
        assert len(crashes) == 1, [r.getMessage() for r in caplog.records]
        assert all("\n" not in r.getMessage() for r in caplog.records)
        assert any("client said:\\n[00:00:00.000] FORGED" in r.getMessage()
                   for r in caplog.records)
        await addon.done()


def test_rate_limit_by_text_holds_back_only_repeats_of_one_line() -> None:
    limit = RateLimit(burst=2, period_s=10, clock=lambda: 0.0, by_text=True)
    distinct = [limit.filter(_record("[%s] %s", "shop", f"line {i}")) for i in range(8)]
    assert distinct == [True] * 8  # one format, eight lines: all of them
    same = [limit.filter(_record("[%s] %s", "shop", "again")) for _ in range(5)]
    assert same == [True, True, False, False, False]


@pytest.mark.parametrize("line", [
    "Error handling request: Invalid header value char: b'Authorization: Bearer s3cr3t-tok_en'",
    "LineTooLong: b\"authorization:\\x20bearer\\x20s3cr3t-tok_en\"",
    "got basic s3cr3t-tok_en from a client",
    "the token s3cr3t-tok_en, quoted alone",
])
def test_redact_hides_the_token_and_any_credentials(line) -> None:
    record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "%s", (line,), None)
    assert Redact("s3cr3t-tok_en").filter(record)
    assert "s3cr3t" not in record.getMessage() and "[redacted]" in record.getMessage()


def test_shown_url_hides_a_password() -> None:
    assert shown_url("http://admin:Sup3rSecret@auth.internal:8081/v") == (
        "http://admin:***@auth.internal:8081/v")
    assert shown_url("http://auth.internal:8081") == "http://auth.internal:8081"
    assert "Sup3r" not in shown_url("http://admin:Sup3r@[::1")  # not even a URL
