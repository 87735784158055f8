"""Service plugins (wasm_service): a root-context-only singleton whose ticks start with the
proxy, sharing data with the HTTP filter."""

from __future__ import annotations

import asyncio

import pytest
import wasmtime
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addons.wasm_auth import WasmAuth

from .wat import module, trampolines

SERVICE = trampolines("proxy_set_tick_period_milliseconds", "proxy_set_shared_data") + """
  (data (i32.const 1000) "service.ticks")
  (global $ticks (mut i32) (i32.const 0))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $proxy_set_tick_period_milliseconds (i32.const 10)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (global.set $ticks (i32.add (global.get $ticks) (i32.const 1)))
    (i32.store (i32.const 1100) (global.get $ticks))
    (drop (call $proxy_set_shared_data (i32.const 1000) (i32.const 13) (i32.const 1100) (i32.const 4) (i32.const 0))))
"""


def options(tmp_path) -> dict[str, object]:
    return {"wasm_log_metrics": False, "wasm_admin_listen": "",
            "wasm_spool": str(tmp_path / "spool"), "wasm_store": str(tmp_path / "store")}


async def test_service_ticks_start_with_the_proxy_and_share_data(tmp_path) -> None:
    wasm = tmp_path / "svc.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(module(SERVICE)))
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_service=[str(wasm)], **options(tmp_path))
        assert addon.services == []  # nothing runs before the proxy does
        await addon.running()
        try:
            [service] = addon.services
            assert list(service.instances) == ["service:svc"]
            for _ in range(200):
                await asyncio.sleep(0.02)
                if b"service.ticks" in addon.host.shared_data:
                    break
            value, _cas = addon.host.shared_data[b"service.ticks"]  # the filter's shared data
            assert int.from_bytes(value, "little") >= 1
        finally:
            await addon.done()
        assert addon.services == []


async def test_a_broken_service_is_a_one_line_options_error(tmp_path) -> None:
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"\0asm garbage")
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **options(tmp_path))
        with pytest.raises(exceptions.OptionsError,
                           match=r"^wasm_service: .*bad\.wasm: not a valid"):
            tctx.configure(addon, wasm_service=[str(bad)])
