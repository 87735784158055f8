"""Configuration as Envoy passes it (bytes, root id, VM id, VM configuration) and properties,
serialised as Envoy serialises them, with filter state kept per stream."""

from __future__ import annotations

import struct

import httpx
import pytest
import wasmtime
from mitmproxy.test import taddons, tflow

from addons import lifecycle
from addons.proxywasm import LocalResponse, Status, serialize_map
from addons.proxywasm.properties import split
from addons.wasm_auth import WasmAuth
from tests.hooks import run_hook

from .wat import module, trampolines

OUT_PTR, OUT_SIZE = 4096, 4100

# Keeps the VM and plugin configurations it was given (pointer, size) in globals.
CONFIG_KEEPER = trampolines("proxy_get_buffer_bytes", "proxy_get_property",
                            "proxy_set_property") + """
  (global $vm_ptr (mut i32) (i32.const 0)) (global $vm_size (mut i32) (i32.const 0))
  (global $cfg_ptr (mut i32) (i32.const 0)) (global $cfg_size (mut i32) (i32.const 0))
  (func (export "proxy_on_vm_start") (param i32) (param $n i32) (result i32)
    (drop (call $proxy_get_buffer_bytes (i32.const 6) (i32.const 0) (local.get $n) (i32.const 3000) (i32.const 3004)))
    (global.set $vm_ptr (i32.load (i32.const 3000))) (global.set $vm_size (i32.load (i32.const 3004)))
    (i32.const 1))
  (func (export "proxy_on_configure") (param i32) (param $n i32) (result i32)
    (drop (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (local.get $n) (i32.const 3000) (i32.const 3004)))
    (global.set $cfg_ptr (i32.load (i32.const 3000))) (global.set $cfg_size (i32.load (i32.const 3004)))
    (i32.const 1))
  (func (export "vm_ptr") (result i32) (global.get $vm_ptr))
  (func (export "vm_size") (result i32) (global.get $vm_size))
  (func (export "cfg_ptr") (result i32) (global.get $cfg_ptr))
  (func (export "cfg_size") (result i32) (global.get $cfg_size))
"""


def test_configurations_reach_the_filter_as_bytes(harness) -> None:
    cfg = b"not json \x00\xff at all"
    h = harness(module(CONFIG_KEEPER), plugin_configuration=cfg, vm_configuration=b"vm=1")
    assert h.vm.read(h.call("cfg_ptr"), h.call("cfg_size")) == cfg
    assert h.vm.read(h.call("vm_ptr"), h.call("vm_size")) == b"vm=1"


def get_property(h, path: bytes) -> bytes | int:
    ptr, n = h.put(2000, path)
    status = h.call("proxy_get_property", ptr, n, OUT_PTR, OUT_SIZE)
    return h.returned(OUT_PTR, OUT_SIZE) if status == Status.OK else status


def test_plugin_properties_come_from_the_plugin(harness) -> None:
    h = harness(module(CONFIG_KEEPER), plugin_name="auth", root_id="my_root", vm_id="vm7")
    assert get_property(h, b"plugin_name") == b"auth"
    assert get_property(h, b"plugin_root_id\0") == b"my_root"
    assert get_property(h, b"plugin_vm_id") == b"vm7"
    assert get_property(h, b"node") == b""
    assert get_property(h, b"no\0such") == Status.NOT_FOUND
    assert h.call("proxy_get_property", 0xFFFFFF00, 4, OUT_PTR, OUT_SIZE) == \
        Status.INVALID_MEMORY_ACCESS


def test_root_id_defaults_to_empty_as_envoy(harness) -> None:
    h = harness(module(CONFIG_KEEPER))
    assert get_property(h, b"plugin_root_id") == b""


def test_set_property_keeps_filter_state_per_stream(harness) -> None:
    h = harness(module(CONFIG_KEEPER))
    a = h.stream_context([(b":path", b"/a")])
    k, kn = h.put(2100, b"filter_state\0mine")
    v, vn = h.put(2200, b"A")
    assert h.call("proxy_set_property", k, kn, v, vn) == Status.OK
    assert get_property(h, b"filter_state\0mine") == b"A"
    assert get_property(h, b"request\0path") == b"/a"  # without an embedder: the headers
    h.stream_context([(b":path", b"/b")])
    assert get_property(h, b"filter_state\0mine") == Status.NOT_FOUND  # another stream
    h.vm.effective = a.id
    assert get_property(h, b"filter_state\0mine") == b"A"
    h.root()
    assert h.call("proxy_set_property", k, kn, v, 0) == Status.OK  # the root context's own
    assert get_property(h, b"filter_state\0mine") == b""
    assert h.call("proxy_set_property", 0xFFFFFF00, 4, v, vn) == Status.INVALID_MEMORY_ACCESS


@pytest.mark.parametrize(("path", "segments"), [
    (b"request\0path", (b"request", b"path")),
    (b"request\0path\0", (b"request", b"path")),
    (b"request.path", (b"request", b"path")),
    (b"request.headers.x-a", (b"request", b"headers", b"x-a")),
    (b"plugin_name", (b"plugin_name",)),
])
def test_split(path, segments) -> None:
    assert split(path) == segments


# ---- through the addon: the flow's attributes ----------------------------------------------

PROPERTY_LOGGER = trampolines("proxy_get_property", "proxy_set_property",
                              "proxy_add_header_map_value") + """
  (global $n (mut i32) (i32.const 0))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 0))
"""


def i64(value: int) -> bytes:
    return struct.pack("<q", value)


async def test_flow_attributes_serialised_as_envoy(tmp_path) -> None:
    wasm = tmp_path / "props.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(module(PROPERTY_LOGGER)))
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_filter=str(wasm), wasm_log_metrics=False,
                       wasm_admin_listen="", wasm_root_id="r", wasm_vm_id="v",
                       wasm_spool=str(tmp_path / "spool"))
        f = tflow.tflow()
        f.client_conn.timestamp_tls_setup = None  # a plain-HTTP client
        f.request.path = "/a/b?q=1"
        f.request.headers["user-agent"] = "ua/1"
        f.request.headers["referer"] = "http://ref/"
        f.request.headers["x-request-id"] = "rid-1"
        f.request.headers["host"] = "shop.example:8080"
        f.request.headers.add("x-d", "1")
        f.request.headers.add("x-d", "2")
        await run_hook(addon.request(f))
        [inst] = addon.host.instances.values()
        vm = inst.vm
        [ctx] = vm.contexts.values()
        get = ctx.stream.attributes
        assert get((b"request", b"path")) == b"/a/b?q=1"
        assert get((b"request", b"url_path")) == b"/a/b"
        assert get((b"request", b"method")) == b"GET"
        assert get((b"request", b"scheme")) == b"http"
        assert get((b"request", b"host")) == b"shop.example:8080"
        assert get((b"request", b"useragent")) == b"ua/1"
        assert get((b"request", b"referer")) == b"http://ref/"
        assert get((b"request", b"id")) == b"rid-1"
        assert get((b"request", b"protocol")) == b"HTTP/1.1"
        assert get((b"request", b"size")) == i64(7)  # b"content"
        assert get((b"request", b"time")) == i64(int(f.request.timestamp_start * 1e9))
        # The request header map, as the filter sees it and as Envoy's attribute is: the
        # pseudo-headers, then the fields; the Host only as :authority.
        assert get((b"request", b"headers")) == serialize_map(
            [(b":method", b"GET"), (b":path", b"/a/b?q=1"),
             (b":authority", b"shop.example:8080"), (b":scheme", b"http"),
             *[(k.lower(), v) for k, v in f.request.headers.fields if k.lower() != b"host"]])
        assert get((b"request", b"headers", b"user-agent")) == b"ua/1"
        assert get((b"request", b"headers", b"x-d")) == b"1,2"  # every value, as Envoy joins them
        assert get((b"request", b"headers", b"x-none")) is None
        assert get((b"request", b"headers", b"host")) is None  # as in Envoy: it is :authority
        assert get((b"request", b"headers", b":authority")) == b"shop.example:8080"
        assert get((b"request", b"headers", b":path")) == b"/a/b?q=1"
        assert get((b"source", b"address")) == b"127.0.0.1:22"
        assert get((b"source", b"port")) == i64(22)
        assert get((b"destination", b"port")) == i64(f.client_conn.sockname[1])
        assert get((b"upstream", b"address")) == b"192.168.0.1:22"  # the peer mitmproxy reached
        assert get((b"upstream", b"port")) == i64(22)
        assert get((b"connection", b"mtls")) == b"\x00"
        assert len(get((b"connection", b"id"))) == 8
        assert get((b"cluster_name",)) == b"outbound|22||address"
        assert get((b"response", b"code")) is None  # not yet
        f.response = tflow.tresp()
        assert get((b"response", b"code")) == i64(200)
        assert get((b"response", b"size")) == i64(len(f.response.raw_content))
        assert get((b"response", b"code_details")) == b"via_upstream"
        assert get((b"response", b"headers")) == serialize_map(  # :status first, as the map
            [(b":status", b"200"), *[(k.lower(), v) for k, v in f.response.headers.fields]])
        assert get((b"response", b"headers", b":status")) == b"200"
        f.request.http_version = "HTTP/2.0"
        assert get((b"request", b"protocol")) == b"HTTP/2"  # as Envoy names it
        f.client_conn.timestamp_tls_setup = 1.0  # the client spoke TLS
        assert get((b"request", b"scheme")) == b"https"  # the client's, not the upstream's
        lifecycle.respond_locally(f, LocalResponse(403, b"no", [], "denied_by_policy"))
        assert get((b"response", b"code_details")) == b"denied_by_policy"
        assert get((b"response", b"code")) == i64(403)
        assert vm.plugin_properties[(b"plugin_root_id",)] == b"r"
        assert vm.plugin_properties[(b"plugin_vm_id",)] == b"v"
        r = addon.response(f)
        if r is not None:
            await r
        await addon.done()


# ---- through a real mitmdump: the property and the header map agree --------------------------

# Answers every request locally, with the property its `x-prop` header names as the body (404
# when NotFound), or, without `x-prop`, with its request header map
# (`proxy_get_header_map_pairs`).
PROPERTY_ECHO = trampolines("proxy_get_header_map_value", "proxy_get_header_map_pairs",
                            "proxy_get_property", "proxy_send_local_response") + """
  (data (i32.const 1000) "x-prop")
  (func $answer (param $status i32) (param $ptr i32) (param $size i32)
    (drop (call $proxy_send_local_response (local.get $status) (i32.const 0) (i32.const 0)
      (local.get $ptr) (local.get $size) (i32.const 0) (i32.const 0) (i32.const -1))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (call $proxy_get_header_map_value (i32.const 0) (i32.const 1000) (i32.const 6) (i32.const 2000) (i32.const 2004))
      (then
        (drop (call $proxy_get_header_map_pairs (i32.const 0) (i32.const 2008) (i32.const 2012)))
        (call $answer (i32.const 200) (i32.load (i32.const 2008)) (i32.load (i32.const 2012))))
      (else
        (if (call $proxy_get_property (i32.load (i32.const 2000)) (i32.load (i32.const 2004)) (i32.const 2008) (i32.const 2012))
          (then (call $answer (i32.const 404) (i32.const 0) (i32.const 0)))
          (else (call $answer (i32.const 200) (i32.load (i32.const 2008)) (i32.load (i32.const 2012)))))))
    (i32.const 1))
"""


@pytest.mark.e2e
def test_request_headers_property_is_the_filters_map_through_a_real_mitmdump(tmp_path) -> None:
    """Envoy's attribute `request.headers` is its request header map, which holds the Host
    only as `:authority`: a filter reads the same map through the property as through
    `proxy_get_header_map_pairs`, and `request.headers.host` is not there."""
    from addons.proxywasm import deserialize_map

    from .test_lifecycle_proxy import echo_server, mitmdump, write_filter

    wasm = write_filter(tmp_path, PROPERTY_ECHO, "props.wasm")
    with echo_server() as upstream, mitmdump(tmp_path, upstream, wasm,
                                             "--set", "keep_host_header=true") as proxy:
        def ask(prop: str | None) -> httpx.Response:
            headers = {"host": "shop.example", "x-a": "1"}
            if prop is not None:
                headers["x-prop"] = prop
            return httpx.get(f"{proxy}/p?q=1", headers=headers, timeout=10)

        shown = ask(None)
        assert shown.status_code == 200
        seen = deserialize_map(shown.content)
        got = ask("request.headers")
        assert got.status_code == 200
        prop = [(k, v) for k, v in deserialize_map(got.content) if k != b"x-prop"]
        assert prop == seen
        assert prop[:4] == [(b":method", b"GET"), (b":path", b"/p?q=1"),
                            (b":authority", b"shop.example"), (b":scheme", b"http")]
        assert (b"x-a", b"1") in prop and all(k != b"host" for k, _ in prop)
        assert ask("request.headers.host").status_code == 404  # as in Envoy
        assert ask("request.headers.:authority").content == b"shop.example"
        assert ask("request.host").content == b"shop.example"  # unchanged
