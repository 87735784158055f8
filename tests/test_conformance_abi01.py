"""Conformance for Proxy-Wasm ABI 0.1.0: a filter built with the Rust `proxy-wasm` crate 0.1.4
(`filters/conformance/rust-abi01/`) runs through a real mitmdump as Envoy runs it.

ABI 0.1.0 differs from 0.2.x where the host must know (proxy-wasm-cpp-host, Envoy): the header
callbacks take no `end_of_stream`, a header that `proxy_get_header_map_value` does not find is
`Ok` and empty, and the filter reads its configuration with `proxy_get_configuration`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conformance_stack import CALL_BODY, UPSTREAM_BODY, Proxy, proxy

pytestmark = [pytest.mark.e2e, pytest.mark.conformance]

CONFIG = "not json, ABI 0.1.0"


@pytest.fixture(scope="module")
def conf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    run_dir: Path = tmp_path_factory.mktemp("conformance-rust01")
    with proxy("rust01", run_dir, {"wasm_filter_config": CONFIG}) as p:
        yield p


def get(conf: Proxy, path: str, **headers: str) -> httpx.Response:
    return httpx.get(conf.url + path, headers={k.replace("_", "-"): v for k, v in headers.items()},
                     timeout=5)


def test_it_starts_and_reads_its_configuration(conf: Proxy) -> None:
    conf.wait_for_log(r"^vm_start size=0$")
    conf.wait_for_log(rf"^configure size={len(CONFIG)} config={CONFIG}$")


def test_request_and_response_headers(conf: Proxy) -> None:
    tag = uuid.uuid4().hex
    r = get(conf, "/headers", x_conf_id=tag)
    assert r.status_code == 200 and r.content == UPSTREAM_BODY
    assert r.headers["x-conf-abi"] == "0.1.0"  # proxy_on_response_headers ran
    [seen] = conf.upstream.with_header("x-conf-id", tag)
    assert seen.header("x-conf-cfg") == CONFIG  # proxy_get_configuration
    # a missing header is Ok and empty (an empty value comes back as no value, as in Envoy)
    assert seen.header("x-conf-absent-was") == "none"
    assert int(seen.header("x-conf-headers") or 0) >= 4  # the count, without end_of_stream


def test_a_present_header_is_read(conf: Proxy) -> None:
    tag = uuid.uuid4().hex
    get(conf, "/headers", x_conf_id=tag, x_conf_absent="here")
    [seen] = conf.upstream.with_header("x-conf-id", tag)
    assert seen.header("x-conf-absent-was") == "some:here"


def test_local_response(conf: Proxy) -> None:
    r = get(conf, "/local")
    assert r.status_code == 418 and r.content == b"teapot"
    assert r.headers["x-conf-abi"] == "0.1.0"


def test_outbound_call_then_resume(conf: Proxy) -> None:
    tag = uuid.uuid4().hex
    r = get(conf, "/call", x_conf_id=tag)
    assert r.status_code == 200 and r.content == UPSTREAM_BODY
    [seen] = conf.upstream.with_header("x-conf-id", tag)
    assert seen.header("x-conf-call") == CALL_BODY.decode()
    assert any(s.path == "/ping" for s in conf.calls.seen)


def test_the_stream_ends_with_on_log(conf: Proxy) -> None:
    get(conf, "/headers")
    conf.wait_for_log(r"^log context=\d+$")
