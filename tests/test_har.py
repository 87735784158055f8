"""HAR: writing traces that mitmproxy can replay, reading recordings, round trips, bad input."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from mitmproxy import io as mitm_io

from scenarios.__main__ import main
from scenarios.basic import BasicParams, basic_trace
from scenarios.eclog import (
    EClogConvertParams,
    EClogGenParams,
    eclog_to_trace,
    generate_eclog,
    read_eclog,
    write_eclog,
)
from scenarios.har import (
    DEFAULT_BASE,
    HarError,
    HarReadParams,
    drop_pseudo_headers,
    har_to_trace,
    load_har,
    read_har,
    to_har,
    write_har,
)
from scenarios.trace import Event, Trace, TraceMeta

BASE = datetime(2019, 12, 1, 20, 0, tzinfo=UTC)


def eclog_trace(speedup: float = 1.0) -> Trace:
    df = generate_eclog(
        EClogGenParams(
            days=1, requests_per_hour=40, logout_prob=0.5, spike_day=0, spike_new_users=30
        )
    )
    buf = io.StringIO()
    write_eclog(df, buf)
    buf.seek(0)
    return eclog_to_trace(read_eclog(buf), EClogConvertParams(logouts=True, speedup=speedup))


def assert_same_events(a: Trace, b: Trace, tolerance: float = 1e-6) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.kind, x.user, x.token, x.method, x.host, x.path) == (
            y.kind,
            y.user,
            y.token,
            y.method,
            y.host,
            y.path,
        )
        assert abs(x.time - y.time) <= tolerance


# -- writing ---------------------------------------------------------------------------------


def test_to_har_entries() -> None:
    t = basic_trace(BasicParams(count=3, host="127.0.0.1:8080"))
    har = to_har(t, base=BASE)
    log = har["log"]
    assert log["version"] == "1.2"
    assert log["_trace"]["name"] == "basic" and log["_trace"]["start"] == BASE.isoformat()
    entries = log["entries"]
    assert len(entries) == 6  # 3 requests, 3 logouts; logins make no proxy traffic
    first = entries[0]
    assert first["startedDateTime"] == BASE.isoformat()
    assert first["request"]["method"] == "GET"
    assert first["request"]["url"] == "http://127.0.0.1:8080/"
    headers = {h["name"]: h["value"] for h in first["request"]["headers"]}
    assert headers == {"Host": "127.0.0.1:8080", "Authorization": "Bearer u0001-1"}
    assert (first["_kind"], first["_user"], first["_token"]) == ("request", "u0001", "u0001-1")
    last = entries[-1]
    assert last["_kind"] == "logout" and last["request"]["method"] == "POST"
    assert last["request"]["url"].endswith("/logout")
    assert last["startedDateTime"] == (BASE + timedelta(seconds=5)).isoformat()
    assert to_har(t)["log"]["entries"][0]["startedDateTime"] == DEFAULT_BASE.isoformat()


def test_to_har_with_real_tokens_keeps_the_label() -> None:
    t = basic_trace(BasicParams(count=1))
    entry = to_har(t, tokens={"u0001-1": "s3cr3t"}, scheme="https")["log"]["entries"][0]
    assert {"name": "Authorization", "value": "Bearer s3cr3t"} in entry["request"]["headers"]
    assert entry["request"]["url"] == "https://shop.example/"
    assert entry["_token"] == "u0001-1"
    assert har_to_trace(to_har(t, tokens={"u0001-1": "s3cr3t"})).events == t.events


def test_mitmproxy_loads_and_can_replay_what_we_write(tmp_path) -> None:
    t = basic_trace(BasicParams(count=4, host="127.0.0.1:8080"))
    path = tmp_path / "basic.har"
    assert write_har(t, path, base=BASE) == 8
    from mitmproxy.addons.clientplayback import ClientPlayback  # after scenarios.har: see there

    flows = mitm_io.read_flows_from_paths([str(path)])
    assert len(flows) == 8
    playback = ClientPlayback()
    for f, e in zip(flows, [e for e in t if e.kind != "login"], strict=True):
        assert playback.check(f) is None  # what `mitmdump -C` accepts
        assert f.request.method == e.method
        assert f.request.url == f"http://127.0.0.1:8080{e.path}"
        assert f.request.headers["authorization"] == f"Bearer {e.token}"
        assert f.request.timestamp_start == pytest.approx(BASE.timestamp() + e.time)


# -- round trips -----------------------------------------------------------------------------


def test_basic_round_trip(tmp_path) -> None:
    t = basic_trace(BasicParams(count=20))
    path = tmp_path / "b.har"
    write_har(t, path)
    back = read_har(path)
    assert back.events == t.events
    assert back.meta.name == "basic" and back.meta.start == DEFAULT_BASE


@pytest.mark.parametrize("speedup", [1.0, 60.0])
def test_csv_trace_har_trace_round_trip(tmp_path, speedup: float) -> None:
    t = eclog_trace(speedup)
    assert t.counts()["logout"] > 0
    path = tmp_path / "e.har"
    write_har(t, path)
    back = read_har(path)
    assert_same_events(t, back)
    assert back.meta == t.meta
    jsonl = tmp_path / "e.jsonl"
    back.write_jsonl(jsonl)
    assert Trace.read_jsonl(jsonl) == back


# -- reading recordings ----------------------------------------------------------------------


def entry(
    when: str, url: str, token: str | None = None, method: str = "GET", **extra: object
) -> dict[str, object]:
    headers = [{"name": "Accept", "value": "*/*"}]
    if token is not None:
        headers.append({"name": "authorization", "value": f"Bearer {token}"})
    return {
        "startedDateTime": when,
        "time": 12.5,
        "request": {
            "method": method,
            "url": url,
            "httpVersion": "HTTP/2",
            "headers": headers,
            "cookies": [],
            "queryString": [],
            "headersSize": -1,
            "bodySize": 0,
        },
        "response": {
            "status": 200,
            "statusText": "OK",
            "httpVersion": "HTTP/2",
            "headers": [{"name": "content-type", "value": "text/html"}],
            "cookies": [],
            "content": {"size": 2, "mimeType": "text/html", "text": "ok"},
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": 2,
        },
        "cache": {},
        "timings": {"send": 0, "wait": 12.5, "receive": 0},
        **extra,
    }


def recording(*entries: dict[str, object]) -> dict[str, object]:
    return {
        "log": {
            "version": "1.2",
            "creator": {"name": "Firefox", "version": "120"},
            "entries": list(entries),
        }
    }


def test_reading_a_browser_recording() -> None:
    har = recording(
        entry("2024-05-01T10:00:01.500Z", "https://app.example/api/items?page=2", "tok-A"),
        entry("2024-05-01T10:00:00.000Z", "https://app.example/", "tok-A"),
        entry("2024-05-01T10:00:02+00:00", "https://app.example/static/x.css"),  # no token
        entry("2024-05-01T12:00:03+02:00", "https://cdn.example:8443/i", "tok-B"),
        entry("2024-05-01T10:00:04Z", "https://app.example/api/auth/logout", "tok-A", "POST"),
        entry("2024-05-01T10:00:05Z", "https://app.example/", "tok-A"),
    )
    t = har_to_trace(har, "rec.har", HarReadParams(hash_tokens=False))
    got = [(e.time, e.kind, e.user, e.token, e.method, e.host, e.path) for e in t]
    assert got == [
        (0.0, "login", "tok-A", "tok-A", "", "app.example", ""),
        (0.0, "request", "tok-A", "tok-A", "GET", "app.example", "/"),
        (1.5, "request", "tok-A", "tok-A", "GET", "app.example", "/api/items?page=2"),
        (3.0, "login", "tok-B", "tok-B", "", "cdn.example:8443", ""),
        (3.0, "request", "tok-B", "tok-B", "GET", "cdn.example:8443", "/i"),
        (4.0, "logout", "tok-A", "tok-A", "POST", "app.example", "/api/auth/logout"),
        (5.0, "login", "tok-A", "tok-A", "", "app.example", ""),  # seen again after logout
        (5.0, "request", "tok-A", "tok-A", "GET", "app.example", "/"),
    ]
    assert t.meta.name == "rec" and t.meta.description == "HAR recording by Firefox"
    assert t.meta.start == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert t.meta.hosts == ("app.example", "cdn.example:8443")


def test_reading_with_hashed_tokens_and_strict_tokens() -> None:
    har = recording(
        entry("2024-05-01T10:00:00Z", "http://a.example/", "secret"),
        entry("2024-05-01T10:00:01", "http://a.example/x"),  # naive: UTC
    )
    t = har_to_trace(har, "h.har")  # hashed unless asked: recordings carry real tokens
    assert {e.token for e in t} == {"h2bb80d537b1da3e3"}
    assert "secret" not in json.dumps([e.token + e.user for e in t])
    with pytest.raises(HarError, match=r"h\.har: log\.entries\[1\]\.request\.headers: no "):
        har_to_trace(har, "h.har", HarReadParams(missing_token="error"))


def test_reading_tolerates_missing_response_and_bom(tmp_path) -> None:
    e = entry("2024-05-01T10:00:00Z", "http://a.example/", "t")
    del e["response"], e["time"]
    path = tmp_path / "bom.har"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(recording(e)).encode())
    t = read_har(path)
    assert [x.kind for x in t] == ["login", "request"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"log": {"entries": [\n  {"startedDateTime": }\n]}}', r"^x\.har:2:23: broken JSON: "),
        ("[]", r"^x\.har: expected a JSON object with 'log', got list"),
        ('{"lag": {}}', r"^x\.har: log: missing field \(not a HAR file\?\)"),
        ('{"log": {"entries": {}}}', r"^x\.har: log\.entries: not a list \(got an object \{\}\)"),
        ('{"log": {}}', r"^x\.har: log\.entries: missing field$"),
        ('{"log": []}', r"^x\.har: log: not an object \(got a list \[\]\)"),
        ('{"log": {"entries": [7]}}', r"^x\.har: log\.entries\[0\]: expected an object"),
        ("[" * 100_000 + "]" * 100_000, r"^x\.har: JSON nested too deeply to be a HAR$"),
    ],
)
def test_broken_har_files(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "x.har"
    path.write_text(text)
    with pytest.raises(HarError, match=message.replace("x\\.har", ".*x\\.har", 1)):
        read_har(path)
    with pytest.raises(HarError, match=message):
        har_to_trace(load_har(text, "x.har"), "x.har")


def _drop(path: tuple[str, ...]):
    def change(e: dict) -> None:
        for key in path[:-1]:
            e = e[key]
        del e[path[-1]]

    return change


def _set(path: tuple[str, ...], value: object):
    def change(e: dict) -> None:
        for key in path[:-1]:
            e = e[key]
        e[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop(("request",)), r"x\.har: log\.entries\[1\]\.request: missing field"),
        (_drop(("request", "url")), r"x\.har: log\.entries\[1\]\.request\.url: missing field"),
        (_drop(("request", "method")), r"log\.entries\[1\]\.request\.method: missing field"),
        (_drop(("request", "headers")), r"log\.entries\[1\]\.request\.headers: missing field"),
        (_drop(("startedDateTime",)), r"log\.entries\[1\]\.startedDateTime: missing field"),
        (
            _set(("request", "headers"), "oops"),
            r"log\.entries\[1\]\.request\.headers: not a list \(got a string \"oops\"\)$",
        ),
        (_set(("request", "url"), 7), r"log\.entries\[1\]\.request\.url: not a string \(got a "),
        (_set(("request",), None), r"log\.entries\[1\]\.request: not an object \(got null"),
        (_set(("request", "method"), ""), r"log\.entries\[1\]\.request\.method: empty$"),
        (
            _set(("startedDateTime",), "yesterday"),
            r"x\.har: log\.entries\[1\]\.startedDateTime: cannot parse 'yesterday' as ISO-8601",
        ),
        (
            _set(("request", "url"), "/relative"),
            r"log\.entries\[1\]\.request\.url: '/relative' is not an http\(s\) URL",
        ),
        (
            _set(("request", "headers"), [{"name": "A"}]),
            r"log\.entries\[1\]\.request\.headers\[0\]: expected \{name, value\} strings",
        ),
        (
            _set(("response", "content"), {"text": 5, "encoding": "base64"}),
            r"x\.har: log\.entries\[1\]: mitmproxy cannot read it: ",
        ),
    ],
)
def test_partial_har_entries(change, message: str) -> None:
    good = entry("2024-05-01T10:00:00Z", "http://a.example/", "t")
    bad = entry("2024-05-01T10:00:01Z", "http://a.example/", "t")
    change(bad)
    with pytest.raises(HarError, match=message):
        har_to_trace(recording(good, bad), "x.har")


def test_har_meta_header_errors() -> None:
    har = recording(entry("2024-05-01T10:00:00Z", "http://a.example/", "t"))
    har["log"]["_trace"] = {"start": "soon"}  # type: ignore[index]
    with pytest.raises(HarError, match=r"^x\.har: log\._trace: field 'start': cannot parse"):
        har_to_trace(har, "x.har")


@pytest.mark.parametrize(("first", "last", "span"), [
    ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "9,999 years"),
    ("2024-05-01T10:00:00Z", "2025-05-02T10:00:01Z", "366 days"),  # a second more than 366 days
])
def test_a_har_that_spans_more_than_a_year_is_refused(tmp_path, capsys, first, last,
                                                       span) -> None:
    # Broken dates would make a trace that keeps an experiment running for ages.
    har = recording(entry(last, "http://a.example/b", "t"), entry(first, "http://a.example/", "t"))
    when = datetime.fromisoformat(last.replace("Z", "+00:00")).isoformat()
    with pytest.raises(HarError, match=(
            rf"^x\.har: log\.entries\[0\]\.startedDateTime: {re.escape(when)} is {span} after the first "
            r"entry \(.*\); a HAR may span at most 366 days$")):
        har_to_trace(har, "x.har")
    path = tmp_path / "x.har"
    path.write_text(json.dumps(har))
    assert main(["har-read", str(path), "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and f"{path}: log.entries[0]" in err
    for e in har["log"]["entries"]:  # type: ignore[index]
        e["startedDateTime"] = "2024-05-01T10:00:00Z"
    har["log"]["_trace"] = {"start": "1024-05-01T10:00:00Z"}  # type: ignore[index]
    with pytest.raises(HarError, match=r"after log\._trace\.start \(1024-05-01T10:00:00\+00:00\)"):
        har_to_trace(har, "x.har")


def test_a_har_of_a_year_reads() -> None:
    har = recording(entry("2024-01-01T00:00:00Z", "http://a.example/", "t"),
                    entry("2024-12-31T23:59:59Z", "http://a.example/b", "t"))
    assert har_to_trace(har, "x.har").duration == 366 * 86_400 - 1


def test_chrome_pseudo_headers_are_dropped() -> None:
    """Chrome records HTTP/2 requests with `:authority`, `:method`, `:path` and `:scheme`
    entries, which are not header fields: mitmproxy refuses to send them."""
    e = entry("2024-05-01T10:00:00Z", "https://app.example/a?b=1", "tok-C")
    e["request"]["headers"] = [  # type: ignore[index]
        {"name": ":authority", "value": "app.example"}, {"name": ":method", "value": "GET"},
        {"name": ":path", "value": "/a?b=1"}, {"name": ":scheme", "value": "https"},
        *e["request"]["headers"]]  # type: ignore[index]
    t = har_to_trace(recording(e), "chrome.har", HarReadParams(hash_tokens=False))
    assert [(x.kind, x.host, x.path, x.token) for x in t] == [
        ("login", "app.example", "", "tok-C"), ("request", "app.example", "/a?b=1", "tok-C")]
    assert drop_pseudo_headers([{"name": ":authority", "value": "x"}, ["Host", "x"],
                                [":path", "/"]]) == [["Host", "x"]]


def test_ipv6_hosts_keep_their_brackets_both_ways(tmp_path) -> None:
    har = recording(
        entry("2024-05-01T10:00:00Z", "http://[::1]:8000/a", "tok-6"),
        entry("2024-05-01T10:00:01Z", "https://[2001:db8::1]/b", "tok-6"),
    )
    t = har_to_trace(har, "v6.har", HarReadParams(hash_tokens=False))
    assert [(x.kind, x.host, x.path) for x in t] == [
        ("login", "[::1]:8000", ""), ("request", "[::1]:8000", "/a"),
        ("request", "[2001:db8::1]", "/b")]
    for scheme in ("http", "https"):
        path = tmp_path / f"{scheme}.har"
        write_har(t, path, scheme=scheme)
        urls = [e["request"]["url"] for e in json.loads(path.read_text())["log"]["entries"]]
        assert urls == [f"{scheme}://[::1]:8000/a", f"{scheme}://[2001:db8::1]/b"]
        assert_same_events(read_har(path, HarReadParams(hash_tokens=False)), t)


def test_non_ascii_urls_are_encoded_as_browsers_send_them() -> None:
    har = recording(
        entry("2024-05-01T10:00:00Z", "https://shop.example/café", "tok"),
        entry("2024-05-01T10:00:01Z", "https://shop.example/s?q=日本&x=%20", "tok"),
        entry("2024-05-01T10:00:02Z", "https://bücher.example:8443/x", "tok"),
    )
    t = har_to_trace(har, "u.har", HarReadParams(hash_tokens=False))
    assert [(x.host, x.path) for x in t if x.kind == "request"] == [
        ("shop.example", "/caf%C3%A9"), ("shop.example", "/s?q=%E6%97%A5%E6%9C%AC&x=%20"),
        ("xn--bcher-kva.example:8443", "/x")]


def test_post_data_with_params_and_no_text() -> None:
    e = entry("2024-05-01T10:00:00Z", "https://shop.example/login", "tok", "POST")
    e["request"]["postData"] = {  # type: ignore[index]
        "mimeType": "application/x-www-form-urlencoded",
        "params": [{"name": "user", "value": "a b"}, {"name": "pw", "value": "x&y"}]}
    t = har_to_trace(recording(e), "p.har", HarReadParams(hash_tokens=False))
    assert [(x.kind, x.method, x.path) for x in t] == [
        ("login", "", ""), ("request", "POST", "/login")]


def test_websocket_and_data_url_entries_are_skipped(caplog) -> None:
    har = recording(
        entry("2024-05-01T10:00:00Z", "wss://shop.example/ws", "tok"),
        entry("2024-05-01T10:00:01Z", "data:image/png;base64,AAAA"),
        entry("2024-05-01T10:00:02Z", "https://shop.example/", "tok"),
        entry("2024-05-01T10:00:03Z", "ws://shop.example/ws", "tok"),
    )
    t = har_to_trace(har, "w.har", HarReadParams(hash_tokens=False))
    assert [(x.time, x.kind, x.path) for x in t] == [(0.0, "login", ""), (0.0, "request", "/")]
    assert "w.har: skipped 3 WebSocket and data: URL entries" in caplog.text


def test_cli_har_read_hashes_tokens_unless_asked(tmp_path) -> None:
    path, out = tmp_path / "rec.har", tmp_path / "rec.jsonl"
    path.write_text(json.dumps(recording(entry("2024-05-01T10:00:00Z", "http://a.example/",
                                               "s3cret-token"))))
    assert main(["har-read", str(path), "--out", str(out)]) == 0
    assert "s3cret-token" not in out.read_text() and '"token": "h' in out.read_text()
    assert main(["har-read", str(path), "--out", str(out), "--clear-tokens"]) == 0
    assert '"token": "s3cret-token"' in out.read_text()


def test_empty_har() -> None:
    t = har_to_trace(recording(), "e.har")
    assert len(t) == 0 and t.meta.start is None


# -- CLI -------------------------------------------------------------------------------------


def test_cli_har_write_and_read(tmp_path, capsys) -> None:
    trace = Trace.from_events(
        [
            Event.login(0.25, "a", "a-1", "h"),  # HAR has no logins: they come back at first use
            Event.request(0.25, "a", "a-1", "h"),
            Event.logout(1, "a", "a-1", "h"),
        ],
        TraceMeta(name="tiny"),
    )
    src, har, back = tmp_path / "t.jsonl", tmp_path / "t.har", tmp_path / "back.jsonl"
    trace.write_jsonl(src)
    assert main(["har-write", str(src), "--out", str(har), "--base", "2020-02-02T00:00:00Z"]) == 0
    assert json.loads(har.read_text())["log"]["entries"][0]["startedDateTime"].startswith(
        "2020-02-02T00:00:00.250000"
    )
    assert main(["har-read", str(har), "--out", str(back)]) == 0
    assert Trace.read_jsonl(back).events == trace.events
    capsys.readouterr()
    assert main(["har-write", str(src), "--out", str(har), "--base", "noon"]) == 2
    assert "--base: cannot parse 'noon' as ISO-8601" in capsys.readouterr().err
    har.write_text('{"log": {"entries": [}')
    assert main(["har-read", str(har), "--out", str(back)]) == 2
    err = capsys.readouterr().err
    assert f"{har}:1:22: broken JSON" in err and err.count("\n") == 1
