"""What a filter's maps make of the message mitmproxy forwards or answers with (lifecycle's pure
helpers), as Envoy does it: the Host is `:authority`, the scheme the client's, a new `:status`
its own reason phrase, a local response without content where its status allows none."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from addons import lifecycle
from addons.proxywasm import LocalResponse
from addons.wasm_auth import view


def plain_flow(**headers: str) -> http.HTTPFlow:
    f = tflow.tflow()
    f.client_conn.timestamp_tls_setup = None  # a plain-HTTP client
    f.request.headers.clear()
    for name, value in headers.items():
        f.request.headers.add(name.replace("_", "-"), value)
    return f


def shown(f: http.HTTPFlow) -> list[tuple[bytes, bytes]]:
    """The request's map as the filter is given it."""
    return view(f)[0]


def test_a_new_authority_is_the_host_header_on_http1() -> None:
    f = plain_flow(host="shop.example", accept="*/*")
    pairs = shown(f)
    assert (b":authority", b"shop.example") in pairs
    assert all(k != b"host" for k, _ in pairs)  # as in Envoy: only :authority
    lifecycle.apply_request_headers(f, [(k, b"backend.internal" if k == b":authority" else v)
                                        for k, v in pairs])
    assert f.request.headers.get_all("host") == ["backend.internal"]
    assert f.request.headers["accept"] == "*/*"


def test_an_untouched_map_keeps_the_host_header() -> None:
    f = plain_flow(host="shop.example", x_a="1")
    lifecycle.apply_request_headers(f, [*shown(f), (b"x-b", b"2")])
    assert f.request.headers.fields == ((b"host", b"shop.example"), (b"x-a", b"1"), (b"x-b", b"2"))


def test_a_host_field_a_filter_adds_is_heard() -> None:
    f = plain_flow(host="shop.example")
    lifecycle.apply_request_headers(f, [*shown(f), (b"host", b"other.example")])
    assert f.request.headers.get_all("host") == ["other.example"]


def test_a_removed_authority_is_ignored() -> None:
    f = plain_flow(host="shop.example")
    lifecycle.apply_request_headers(f, [(k, v) for k, v in shown(f) if k != b":authority"])
    assert f.request.headers.get_all("host") == ["shop.example"]


def test_a_new_authority_on_http2_is_the_authority() -> None:
    f = plain_flow()
    f.request.http_version = "HTTP/2.0"
    f.request.authority = "shop.example"
    lifecycle.apply_request_headers(f, [(k, b"backend.internal" if k == b":authority" else v)
                                        for k, v in shown(f)])
    assert f.request.authority == "backend.internal"
    assert "host" not in f.request.headers


@pytest.mark.parametrize("tls", [False, True])
def test_the_scheme_shown_is_the_clients_and_changes_only_when_the_filter_changes_it(
        tls: bool) -> None:
    f = plain_flow(host="shop.example")
    f.request.scheme = "http"  # what mitmproxy forwards with (a reverse proxy's upstream)
    if tls:
        f.client_conn.timestamp_tls_setup = 1.0
    pairs = shown(f)
    assert (b":scheme", b"https" if tls else b"http") in pairs
    lifecycle.apply_request_headers(f, pairs)
    assert f.request.scheme == "http"  # unchanged by the filter: forwarded as before
    lifecycle.apply_request_headers(f, [(k, b"https" if k == b":scheme" else v)
                                        for k, v in pairs])
    assert f.request.scheme == ("http" if tls else "https")


def test_a_new_status_gets_its_own_reason_phrase() -> None:
    response = http.Response.make(200, b"ok", {"content-type": "text/plain"})
    lifecycle.apply_response_headers(response, [(b":status", b"404"), (b"x-a", b"1")])
    assert (response.status_code, response.reason) == (404, "Not Found")
    lifecycle.apply_response_headers(response, [(b":status", b"299")])
    assert (response.status_code, response.reason) == (299, "")  # no standard phrase


@pytest.mark.parametrize("status", [204, 304])
def test_a_local_response_without_content_has_no_body(status: int) -> None:
    f = plain_flow(host="shop.example")
    lifecycle.respond_locally(f, LocalResponse(status, b"dropped", [(b"x-a", b"1")], "d"))
    assert f.response is not None
    assert f.response.raw_content == b""
    assert "content-length" not in f.response.headers
    assert f.response.headers["x-a"] == "1"


def test_a_local_response_keeps_its_body_and_length() -> None:
    f = plain_flow(host="shop.example")
    lifecycle.respond_locally(f, LocalResponse(403, b"denied", [(b":status", b"1")], "d"))
    assert f.response is not None
    assert (f.response.status_code, f.response.raw_content) == (403, b"denied")
    assert f.response.headers["content-length"] == "6"
    assert ":status" not in f.response.headers  # pseudo-headers are not fields


def test_an_empty_response_keeps_its_framing() -> None:
    response = http.Response.make(200, b"", {})
    del response.headers["content-length"]  # a filter removed it
    lifecycle.keep_framing(response, streamed=False)
    assert response.headers["content-length"] == "0"
    no_content = http.Response.make(204, b"", {})
    del no_content.headers["content-length"]
    lifecycle.keep_framing(no_content, streamed=False)
    assert "content-length" not in no_content.headers
    request = http.Request.make("GET", "http://shop.example/", b"", {})
    del request.headers["content-length"]
    lifecycle.keep_framing(request, streamed=False)
    assert "content-length" not in request.headers  # a request without a body needs none
