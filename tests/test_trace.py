"""The trace model, its files and frames, the basic experiment, and the CLI's shared paths."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scenarios.__main__ import main
from scenarios.basic import BasicParams, basic_trace
from scenarios.trace import (
    MAX_TRACE_SECONDS,
    Event,
    ScenarioError,
    Trace,
    TraceError,
    TraceMeta,
    default_ttl,
    live_tokens,
    looks_like_logout,
    sessions,
    summary,
)

H = "shop.example"


def small_trace() -> Trace:
    return Trace.from_events(
        [
            Event.login(0.0, "alice", "alice-1", H),
            Event.request(0.0, "alice", "alice-1", H, "/"),
            Event.login(1.5, "bob", "bob-1", H),
            Event.request(1.5, "bob", "bob-1", H, "/cart", "POST"),
            Event.request(2.0, "alice", "alice-1", H, "/p?q=1"),
            Event.logout(3.0, "alice", "alice-1", H),
            Event.login(4.0, "alice", "alice-2", H),
            Event.request(4.0, "alice", "alice-2", H, "/"),
        ],
        TraceMeta(
            name="small",
            description="two users",
            tenants=(H,),
            hosts=(H,),
            start=datetime(2019, 12, 1, 8, tzinfo=UTC),
            extra={"ttl": 600.0, "speedup": 60.0},
        ),
    )


# -- the model -------------------------------------------------------------------------------


def test_event_helpers_fill_the_request_fields() -> None:
    assert Event.login(1, "u", "u-1") == Event(1, "login", "u", "u-1", "", "", "")
    assert Event.logout(2, "u", "u-1", H) == Event(2, "logout", "u", "u-1", "POST", H, "/logout")
    with pytest.raises(AttributeError):
        Event.login(1, "u", "u-1").time = 3  # type: ignore[misc]


def test_trace_views() -> None:
    t = small_trace()
    assert len(t) == 8
    assert t.duration == 4.0
    assert t.counts() == {"login": 3, "request": 4, "logout": 1}
    assert t.users() == {"alice", "bob"}
    assert t.hosts() == (H,)
    assert [(s.token, s.requests, s.logged_out) for s in sessions(t)] == [
        ("alice-1", 3, True),
        ("bob-1", 1, False),
        ("alice-2", 1, False),
    ]


def test_from_events_sorts_stably_by_time() -> None:
    events = [
        Event.request(1.0, "a", "a-1", H),
        Event.login(0.0, "a", "a-1", H),
        Event.login(1.0, "b", "b-1", H),
        Event.request(1.0, "b", "b-1", H),
    ]
    t = Trace.from_events(events)
    assert [e.kind for e in t] == ["login", "request", "login", "request"]


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([Event(0, "signin", "a", "a-1")], "event #0: field 'kind': unknown kind"),  # type: ignore[arg-type]
        (
            [Event.login(2, "a", "a-1"), Event.request(1, "a", "a-1", H)],
            r"event #1: field 'time': time goes backwards \(1 after 2 at event #0\)",
        ),
        ([Event.request(0, "a", "a-1", H)], "event #0: field 'token': request with token 'a-1' "),
        (
            [
                Event.login(0, "a", "a-1"),
                Event.logout(1, "a", "a-1", H),
                Event.logout(2, "a", "a-1", H),
            ],
            "event #2: field 'token': logout with token 'a-1' before its login",
        ),
        (
            [Event.login(0, "a", "a-1"), Event.login(1, "a", "a-1")],
            "event #1: field 'token': login of 'a-1', which is already logged in",
        ),
        (
            [Event.login(0, "a", "a-1"), Event(1, "request", "a", "a-1", "GET", "", "/")],
            r"event #1: missing field 'host' \(required for a request\)",
        ),
        ([Event.login(0, "", "a-1")], "event #0: missing field 'user'"),
        ([Event.login(math.nan, "a", "a-1")], "event #0: field 'time': nan is not a finite time"),
        ([Event.login(-1, "a", "a-1")], "event #0: field 'time': -1 is not a finite time >= 0"),
    ],
)
def test_trace_rejects_broken_events(events: list[Event], message: str) -> None:
    with pytest.raises(TraceError, match=message):
        Trace(tuple(events))


def test_a_token_label_may_be_reused_after_logout() -> None:
    Trace(
        (
            Event.login(0, "a", "a-1"),
            Event.logout(1, "a", "a-1", H),
            Event.login(2, "a", "a-1"),
            Event.request(2, "a", "a-1", H),
        )
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/logout", True),
        ("/api/auth/sign-out?next=/", True),
        ("/LogOut/", True),
        ("/wyloguj", True),
        ("/logout-help", False),
        ("/", False),
        ("/catalog?logout=1", False),
    ],
)
def test_looks_like_logout(path: str, expected: bool) -> None:
    assert looks_like_logout(path) is expected


# -- JSON Lines ------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path) -> None:
    t = small_trace()
    path = tmp_path / "t.jsonl"
    t.write_jsonl(path)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["format"] == "wasm-reclaim-trace" and header["version"] == 1
    assert header["start"] == "2019-12-01T08:00:00+00:00"
    assert len(lines) == 1 + len(t)
    assert Trace.read_jsonl(path) == t


def test_jsonl_without_header_gets_default_metadata(tmp_path) -> None:
    path = tmp_path / "plain.jsonl"
    ev = small_trace().events
    lines = [json.dumps({f: getattr(e, f) for f in Event.__slots__}) for e in ev]
    path.write_text("\n".join(lines) + "\n\n")  # a blank line is skipped
    t = Trace.read_jsonl(path)
    assert t.events == ev
    assert t.meta.name == "plain"


def test_jsonl_accepts_numeric_strings_and_omitted_login_fields() -> None:
    lines = [
        '{"time": "0", "kind": "login", "user": "a", "token": "a-1"}',
        '{"time": 1e0, "kind": "request", "user": "a", "token": "a-1", "method": "GET",'
        ' "host": "h", "path": "/", "note": "ignored"}',
    ]
    t = Trace.parse_jsonl(lines)
    assert t.events == (Event.login(0.0, "a", "a-1"), Event.request(1.0, "a", "a-1", "h"))


LOGIN = '{"time": 0, "kind": "login", "user": "a", "token": "a-1"}'
REQ = (
    '{"time": %s, "kind": "request", "user": "a", "token": "%s", "method": "GET", '
    '"host": "h", "path": "/"}'
)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([LOGIN, '{"time": 1, "kind": '], r"^t\.jsonl:2:\d+: broken JSON: "),
        ([LOGIN, "[1, 2]"], r"^t\.jsonl:2: expected a JSON object, got list"),
        (
            [LOGIN, '{"time": 1, "kind": "signin", "user": "a", "token": "a-1"}'],
            r"^t\.jsonl:2: field 'kind': unknown kind 'signin'",
        ),
        (
            [LOGIN, REQ % (5, "a-1"), REQ % (4, "a-1")],
            r"^t\.jsonl:3: field 'time': time goes backwards \(4\.0 after 5\.0 at t\.jsonl:2\)",
        ),
        (
            [LOGIN, REQ % (1, "b-1")],
            r"^t\.jsonl:2: field 'token': request with token 'b-1' before its login",
        ),
        (['{"time": 0, "kind": "login", "token": "a-1"}'], r"^t\.jsonl:1: missing field 'user'"),
        (
            [LOGIN, REQ.replace('"host": "h", ', "") % (1, "a-1")],
            r"^t\.jsonl:2: missing field 'host' \(required for a request\)",
        ),
        ([LOGIN, REQ % ('"soon"', "a-1")], r"^t\.jsonl:2: field 'time': cannot parse 'soon' as a"),
        ([LOGIN, REQ % ("true", "a-1")], r"^t\.jsonl:2: field 'time': cannot parse True as a"),
        ([LOGIN, REQ % ('"inf"', "a-1")], r"^t\.jsonl:2: field 'time': 'inf' is not a finite"),
        (
            [LOGIN, REQ % (10**400, "a-1")],
            r"^t\.jsonl:2: field 'time': 100000000000… \(401 digits\) is not a finite number$",
        ),
        ([LOGIN, REQ % ("1" + "0" * 5000, "a-1")], r"^t\.jsonl:2: unreadable JSON: Exceeds the limit"),
        ([LOGIN, "[" * 100_000 + "]" * 100_000], r"^t\.jsonl:2: JSON nested too deeply$"),
        (
            ['{"time": 0, "kind": "login", "user": 7, "token": "a-1"}'],
            r"^t\.jsonl:1: field 'user': expected a string, got 7",
        ),
        ([LOGIN, '{"format": "wasm-reclaim-trace"}'], r"^t\.jsonl:2: header line must be the"),
        (['{"format": "wasm-reclaim-trace", "version": 9}'], r"^t\.jsonl:1: unsupported version 9"),
        (['{"format": "other"}'], r"^t\.jsonl:1: format 'other' is not 'wasm-reclaim-trace'"),
        (
            ['{"format": "wasm-reclaim-trace", "start": "noon"}'],
            r"^t\.jsonl:1: field 'start': cannot parse 'noon' as ISO-8601",
        ),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path, lines: list[str], message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=message):
        Trace.parse_jsonl(path.read_text().splitlines(keepends=True), "t.jsonl")
    with pytest.raises(TraceError) as e:
        Trace.read_jsonl(path)
    assert str(e.value).startswith(f"{path}:")


# -- pandas ----------------------------------------------------------------------------------


def test_frame_round_trip() -> None:
    t = small_trace()
    df = t.to_frame()
    assert list(df.columns) == ["time", "kind", "user", "token", "method", "host", "path"]
    assert df["time"].dtype == np.float64
    assert df.attrs["trace_meta"] == t.meta
    assert Trace.from_frame(df) == t
    assert Trace.from_frame(df.copy(), TraceMeta(name="x")).meta.name == "x"


def test_frame_with_missing_login_fields_and_object_columns() -> None:
    df = pd.DataFrame(
        {
            "time": ["0", 1],
            "kind": ["login", "request"],
            "user": ["a", "a"],
            "token": ["a-1", "a-1"],
            "method": [None, "GET"],
            "host": [np.nan, "h"],
            "path": [None, "/"],
        },
        dtype=object,
    )
    assert Trace.from_frame(df).events == (
        Event.login(0, "a", "a-1"),
        Event.request(1, "a", "a-1", "h"),
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda df: df.drop(columns=["token"]), r"DataFrame: missing column\(s\) 'token'"),
        (
            lambda df: df.assign(time=df["time"].astype(object).where(df.index != 2, "x")),
            "row 2: field 'time': cannot parse 'x' as a number",
        ),
        (
            lambda df: df.assign(time=df["time"].where(df.index != 1, np.nan)),
            "row 1: missing field 'time'",
        ),
        (
            lambda df: df.assign(kind=df["kind"].where(df.index != 3, "hello")),
            "row 3: field 'kind': unknown kind 'hello'",
        ),
        (
            lambda df: df.assign(user=df["user"].astype(object).where(df.index != 4, 5)),
            "row 4: field 'user': expected a string, got 5",
        ),
        (
            lambda df: df.assign(time=df["time"][::-1].to_numpy()),
            r"row 2: field 'time': time goes backwards \(3\.0 after 4\.0 at row 1\)",
        ),
        (
            lambda df: df.iloc[1:],
            "row 0: field 'token': request with token 'alice-1' before its login",
        ),
    ],
)
def test_frame_errors_name_the_row(change, message: str) -> None:
    df = change(small_trace().to_frame())
    with pytest.raises(TraceError, match=message):
        Trace.from_frame(df.reset_index(drop=True))


@st.composite
def traces(draw: st.DrawFn) -> Trace:
    """Random valid traces: users with sessions of requests, some ending in a logout."""
    events: list[Event] = []
    t = 0.0
    live: dict[str, str] = {}
    counter: dict[str, int] = {}
    for _ in range(draw(st.integers(0, 40))):
        t += draw(st.sampled_from([0.0, 0.001, 0.5, 1.0, 123.456789]))
        user = draw(st.sampled_from(["a", "b", "c", "ü ser"]))
        if user not in live:
            counter[user] = counter.get(user, 0) + 1
            live[user] = f"{user}-{counter[user]}"
            events.append(Event.login(t, user, live[user], H))
        if draw(st.booleans()) and draw(st.booleans()):
            events.append(Event.logout(t, user, live.pop(user), H))
        else:
            path = draw(st.sampled_from(["/", "/p/1?x=y", "/ä"]))
            events.append(Event.request(t, user, live[user], H, path))
    return Trace(tuple(events), TraceMeta(name="h"))


@settings(max_examples=40, deadline=None)
@given(traces())
def test_round_trips_keep_any_valid_trace(t: Trace) -> None:
    assert Trace.parse_jsonl(_jsonl_lines(t), "mem") == Trace(t.events, TraceMeta(name="h"))
    assert Trace.from_frame(t.to_frame()) == t


def _jsonl_lines(t: Trace) -> list[str]:
    import io

    buf = io.StringIO()
    buf.write(json.dumps(t.meta.to_json()) + "\n")
    for e in t:
        buf.write(json.dumps({f: getattr(e, f) for f in Event.__slots__}) + "\n")
    return buf.getvalue().splitlines()


# -- statistics ------------------------------------------------------------------------------


def test_live_tokens_and_linger() -> None:
    t = small_trace()
    live = live_tokens(t)
    # alice-1 0..3 (logout), bob-1 1.5..1.5 (never counts), alice-2 4..4.
    assert live.to_dict() == {0.0: 1, 1.5: 1, 3.0: 0, 4.0: 0}
    lingering = live_tokens(t, linger=10)
    assert lingering.max() == 2 and lingering.iloc[-1] == 0
    assert lingering.to_dict()[11.5] == 1  # bob-1 expires 10 s after its last use


def test_summary_and_default_ttl() -> None:
    t = small_trace()
    assert default_ttl(t) == 10.0
    s = summary(t, ttl=default_ttl(t))
    assert s["events"] == 8 and s["login"] == 3 and s["users"] == 2 and s["sessions"] == 3
    assert s["peak_live_tokens"] == 1 and s["peak_tokens_within_ttl"] == 2
    assert default_ttl(Trace(())) == 600.0


# -- the basic experiment --------------------------------------------------------------------


def test_basic_experiment_shape() -> None:
    t = basic_trace()
    assert t.counts() == {"login": 1024, "request": 1024, "logout": 1024}
    assert len(t.users()) == 1024
    logins = [e.time for e in t if e.kind == "login"]
    logouts = [e.time for e in t if e.kind == "logout"]
    assert logins == [float(i) for i in range(1024)]
    assert logouts == [float(i) for i in range(1024, 2048)]
    # each login is followed at the same instant by a GET with that token
    for login, req in zip(t.events[0:2048:2], t.events[1:2048:2], strict=True):
        assert (req.kind, req.time, req.token, req.method, req.path) == (
            "request",
            login.time,
            login.token,
            "GET",
            "/",
        )
    assert all(e.path == "/logout" for e in t if e.kind == "logout")
    live = live_tokens(t)
    values = live.to_numpy()
    peak = int(np.argmax(values))
    assert values[peak] == 1024 and live.index[peak] == 1023.0
    assert (np.diff(values[: peak + 1]) == 1).all()
    assert (np.diff(values[peak:]) == -1).all()
    assert values[-1] == 0 and live.index[-1] == 2047.0


def test_basic_parameters() -> None:
    t = basic_trace(
        BasicParams(count=3, interval=0.5, host="h:8080", path="/x", logout_order="lifo")
    )
    assert [(e.time, e.kind, e.token) for e in t if e.kind == "logout"] == [
        (1.5, "logout", "u0003-1"),
        (2.0, "logout", "u0002-1"),
        (2.5, "logout", "u0001-1"),
    ]
    assert {e.host for e in t} == {"h:8080"} and t.meta.hosts == ("h:8080",)
    with pytest.raises(ScenarioError, match="count must be >= 1"):
        BasicParams(count=0)
    with pytest.raises(ScenarioError, match="interval must be > 0"):
        BasicParams(interval=0)


# -- CLI -------------------------------------------------------------------------------------


def test_cli_basic_and_info(tmp_path, capsys) -> None:
    out = tmp_path / "b.jsonl"
    assert main(["basic", "--out", str(out), "--count", "16"]) == 0
    t = Trace.read_jsonl(out)
    assert t.counts() == {"login": 16, "request": 16, "logout": 16}
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "events" in text and "login 16, request 16, logout 16" in text
    assert "peak live tokens          16 at 15 s" in text
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_live_tokens"] == 16


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "missing.jsonl"], "info: error: missing.jsonl: No such file or directory"),
        (["basic", "--out", "x.jsonl", "--count", "0"],
         "basic: error: argument --count: must be at least 1, got '0'"),
        (["basic"], "error: the following arguments are required: --out"),
        (["nope"], "error: argument COMMAND: invalid choice"),
        (["basic", "--out", "x", "--count", "many"],
         "error: argument --count: 'many' is not a whole number"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        raise SystemExit(main(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_bad_trace_file_reports_the_line(tmp_path, capsys) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(LOGIN + "\n" + REQ % (1, "zz-1") + "\n")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: field 'token': request with token 'zz-1' before its login" in err


def test_a_jsonl_trace_with_a_bom_and_crlf_reads(tmp_path) -> None:
    """Some editors write a byte-order mark and CRLF line ends: the trace reads the same."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(("\ufeff" + "\r\n".join([LOGIN, REQ % ("1.5", "a-1")]) + "\r\n").encode())
    assert len(Trace.read_jsonl(path).events) == 2


def test_a_trace_that_runs_past_a_year_is_refused(tmp_path, capsys) -> None:
    # A time of 1e12 s (31,688 years) would keep an experiment sampling for ages.
    last_ok = [Event.login(0, "a", "a-1"), Event.request(MAX_TRACE_SECONDS, "a", "a-1", H)]
    assert Trace(tuple(last_ok)).duration == 366 * 86_400
    with pytest.raises(TraceError, match=r"^event #1: field 'time': 31622401\.0 s is 366 days "
                                         r"after t = 0, beyond the limit of 366 days$"):
        Trace((Event.login(0, "a", "a-1"), Event.request(MAX_TRACE_SECONDS + 1, "a", "a-1", H)))
    path = tmp_path / "long.jsonl"
    path.write_text(LOGIN + "\n" + REQ % ("1e12", "a-1") + "\n")
    with pytest.raises(TraceError, match=rf"^{path}:2: field 'time': 1000000000000\.0 s is "
                                         r"31,688 years after t = 0, beyond the limit of 366 days$"):
        Trace.read_jsonl(path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:2: field 'time'" in err and "366 days" in err
