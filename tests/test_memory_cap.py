"""memory.grow failing at the cap is visible: a log line, a counter in wasm.status and the
samples, and the request fails by the fail policy (the instance restarts)."""

from __future__ import annotations

import logging

import pytest
import wasmtime
from mitmproxy.test import taddons, tflow

from addons.proxywasm import (
    FilterModule,
    Host,
    HttpCallResponse,
    InProcessDispatcher,
    Limits,
    VirtualClock,
)
from addons.wasm_auth import WasmAuth
from tests.hooks import run_hook

from .wat import module

# Grows one page at a time until memory.grow fails, then carries on as if nothing happened.
GREEDY = """
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (loop $g (br_if $g (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    (i32.const 0))
"""


def make_host(fail_open: bool = False) -> Host:
    clock = VirtualClock()
    disp = InProcessDispatcher(lambda call: HttpCallResponse(200), clock.now_ns)
    return Host(FilterModule(wasmtime.wat2wasm(module(GREEDY))), disp, clock=clock,
                limits=Limits(memory_bytes=2 * 2**20, deadline_ms=10_000), fail_open=fail_open)


@pytest.mark.parametrize("fail_open", [False, True])
def test_reaching_the_cap_fails_the_request_by_policy_and_is_counted(fail_open, caplog) -> None:
    host = make_host(fail_open)
    inst = host.instance("shop")
    with caplog.at_level(logging.WARNING):
        d = inst.stream().request_headers([(b":path", b"/")])
    assert d is not None and d.error is not None and "memory" in d.error
    if fail_open:
        assert d.action == "continue"
    else:
        assert d.action == "respond" and d.response is not None and d.response.status == 503
    lines = [r for r in caplog.records if "memory cap" in r.getMessage()]
    assert len(lines) == 1
    o = inst.observe()
    assert o.memory_cap_hits == 1 and o.generation == 1  # restarted, memory freed
    assert o.allocated_bytes < 2 * 2**20


async def test_the_counter_reaches_wasm_status_and_the_samples(tmp_path) -> None:
    wasm = tmp_path / "greedy.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(module(GREEDY)))
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_filter=str(wasm), wasm_memory_limit=2,
                       wasm_log_metrics=False, wasm_admin_listen="",
                       wasm_spool=str(tmp_path / "spool"), wasm_store=str(tmp_path / "store"))
        f = tflow.tflow()
        f.request.headers["Host"] = "shop.example"
        await run_hook(addon.request(f))
        assert f.response is not None and f.response.status_code == 503
        [row] = addon.list_instances()
        assert row["memory_cap_hits"] == 1
        assert "at cap" in addon.status()

        docs: list[dict[str, object]] = []

        class Sink:
            def write(self, collection: str, doc: dict[str, object]) -> None:
                docs.append(doc)

        addon._sample_all_to(Sink(), every=True)
        assert docs and docs[0]["memory_cap_hits"] == 1
        await addon.done()
