"""Live replay against real servers: the shop stands in for the proxy, the auth server issues
real tokens. Timing is checked only from below (never early), which is behaviour, not speed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from yarl import URL

from scenarios.basic import BasicParams, basic_trace
from scenarios.replay import (
    Record,
    ReplayConfig,
    ReplaySummary,
    percentiles,
    replay,
    request_url,
    session_order_violations,
    target_rate,
)
from scenarios.trace import Event, ScenarioError, Trace

from .servers import PYTHON, free_port, process

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT)}

# -- pure helpers ----------------------------------------------------------------------------


def test_percentiles_nearest_rank() -> None:
    assert percentiles([]) == {}
    assert percentiles([5.0]) == {"p50": 5.0, "p90": 5.0, "p99": 5.0, "max": 5.0}
    values = [float(i) for i in range(1, 101)]  # 1..100
    assert percentiles(values[::-1]) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}


@pytest.mark.parametrize(
    ("base", "path", "url"),
    [
        ("http://127.0.0.1:8080", "/", "http://127.0.0.1:8080/"),
        ("http://127.0.0.1:8080/", "/a/b?x=1&y=2", "http://127.0.0.1:8080/a/b?x=1&y=2"),
        ("http://127.0.0.1:8080", "a", "http://127.0.0.1:8080/a"),
        ("http://h:1", "/p%20q?s=%2F", "http://h:1/p%20q?s=%2F"),
        ("http://h:1", "/p q", "http://h:1/p%20q"),
        ("http://h:1", "/ä?q=ü", "http://h:1/%C3%A4?q=%C3%BC"),
    ],
)
def test_request_url(base: str, path: str, url: str) -> None:
    assert str(request_url(URL(base), path)) == url


def test_target_rate() -> None:
    trace = basic_trace(BasicParams(count=10, interval=1.0))  # 20 proxy requests over 19 s
    assert target_rate(trace, 1.0) == pytest.approx(20 / 19)
    assert target_rate(trace, 10.0) == pytest.approx(200 / 19)
    single = Trace((Event.login(0, "u", "t"), Event.request(0, "u", "t", "h")))
    assert target_rate(single, 1.0) is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"speed": 0}, "speed"),
        ({"speed": float("nan")}, "speed"),
        ({"concurrency": 0}, "concurrency"),
        ({"timeout": 0}, "timeout"),
        ({"proxy": "127.0.0.1:8080"}, "--proxy"),
        ({"auth": "ftp://x"}, "--auth"),
        ({"proxy": "http://127.0.0.1:99999"}, "--proxy: .* Port out of range"),
        ({"auth": "http://[::1"}, "--auth: .* Invalid IPv6 URL"),
        ({"proxy": "http://127.0.0.1:port"}, "--proxy"),
    ],
)
def test_config_validated(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ScenarioError, match=match):
        ReplayConfig(**kw)


def rec(index: int, kind: str, start: float, end: float, token: str = "t") -> Record:
    return Record(index, kind, "u", token, 0.0, start, end, "200")


def test_session_order_violations_detects_breaks() -> None:
    good = [rec(0, "login", 0, 1), rec(1, "request", 1, 2), rec(2, "request", 1.5, 3),
            rec(3, "logout", 3, 4), rec(3, "auth-logout", 4, 5), rec(4, "login", 4.5, 5),
            rec(5, "request", 5, 6)]
    assert session_order_violations(good) == []
    early = [rec(0, "login", 0, 1), rec(1, "request", 0.5, 2)]
    assert session_order_violations(early) == ["t: event #1 started before its login ended"]
    logout_early = [rec(0, "login", 0, 1), rec(1, "request", 1, 3), rec(2, "logout", 2, 4)]
    assert session_order_violations(logout_early) == [
        "t: logout #2 started before a request ended"]


# -- against real servers --------------------------------------------------------------------


@dataclass
class Servers:
    auth: str
    shop: str

    def auth_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.auth}/stats", trust_env=False).json()
        return stats

    def shop_requests(self) -> int:
        r = httpx.get(f"{self.shop}/_shop/stats", trust_env=False)
        return int(r.json()["requests"])


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("replay")
    ap, sp = free_port(), free_port()
    auth_args = [PYTHON, "-m", "scenarios", "auth-server", "--port", str(ap),
                 "--store", str(tmp / "store")]
    shop_args = [PYTHON, "-m", "scenarios", "shop", "--port", str(sp)]
    with process(auth_args, ap, tmp / "auth.log", env=ENV), \
            process(shop_args, sp, tmp / "shop.log", env=ENV):
        yield Servers(f"http://127.0.0.1:{ap}", f"http://127.0.0.1:{sp}")


def config(servers: Servers, **kw: Any) -> ReplayConfig:
    return ReplayConfig(proxy=servers.shop, auth=servers.auth, keep_records=True, **kw)


def delta(before: dict[str, Any], after: dict[str, Any], name: str) -> int:
    return int(after["requests"].get(name, 0)) - int(before["requests"].get(name, 0))


@pytest.mark.e2e
def test_fast_replay_of_the_basic_trace(servers: Servers) -> None:
    trace = basic_trace(BasicParams(count=30, interval=1.0))
    before, shop_before = servers.auth_stats(), servers.shop_requests()
    s = replay(trace, config(servers, fast=True, concurrency=8))
    after = servers.auth_stats()
    assert s.events == 90 and s.logins == 30
    assert s.sent == 60 and s.status == {"200": 60} and s.errors == 0
    assert s.auth_status == {"login 200": 30, "logout 200": 30}
    assert s.max_lag_s is None and s.speed is None
    assert set(s.latency_ms) == {"p50", "p90", "p99", "max"}
    assert s.latency_ms["p50"] <= s.latency_ms["p99"] <= s.latency_ms["max"]
    assert s.rate > 0 and s.duration_s > 0
    assert delta(before, after, "login") == 30 and delta(before, after, "logout") == 30
    assert servers.shop_requests() - shop_before == 60
    assert session_order_violations(s.records) == []
    kinds = [r.kind for r in s.records]
    assert kinds.count("request") == 30 and kinds.count("logout") == 30
    assert kinds.count("auth-logout") == 30
    assert "records" not in s.to_json()
    json.dumps(s.to_json())


@pytest.mark.e2e
def test_session_order_holds_with_overlapping_sessions(servers: Servers) -> None:
    """Many requests per session, sessions re-using a label after logout, tight concurrency."""
    events: list[Event] = []
    for u in range(6):
        user = f"user{u}"
        for n in range(3):
            label, t = f"{user}-s", n * 1.0
            events.append(Event.login(t, user, label, "shop.example"))
            events += [Event.request(t, user, label, "shop.example", f"/p/{u}/{n}/{k}")
                       for k in range(5)]
            events.append(Event.logout(t + 0.5, user, label, "shop.example"))
    trace = Trace.from_events(events)
    s = replay(trace, config(servers, fast=True, concurrency=4))
    assert s.status == {"200": 6 * 3 * 6}
    assert s.auth_status == {"login 200": 18, "logout 200": 18}
    assert session_order_violations(s.records) == []
    # each session got its own real token: the auth server revoked all 18
    logins = [r for r in s.records if r.kind == "login"]
    assert len(logins) == 18


@pytest.mark.e2e
def test_timing_is_scaled_by_speed(servers: Servers) -> None:
    """Events at 0..2 s replayed at speed 10 take at least 0.2 s; nothing starts early."""
    events: list[Event] = [Event.login(0.0, "u", "u-1", "shop.example")]
    events += [Event.request(t / 10, "u", "u-1", "shop.example", f"/{t}") for t in range(21)]
    trace = Trace.from_events(events)
    s = replay(trace, config(servers, speed=10))
    assert s.duration_s >= 0.2
    assert s.status == {"200": 21}
    assert s.max_lag_s is not None and s.max_lag_s >= 0
    assert s.speed == 10 and s.target_rate == pytest.approx(21 / 0.2)
    for r in s.records:
        assert r.due == pytest.approx(trace.events[r.index].time / 10)
        assert r.start >= r.due - 0.001
    assert max(r.start for r in s.records) >= 0.2 - 0.001


class Sink:
    """A TCP server that accepts connections and closes them at once (or holds them)."""

    def __init__(self, hold: bool = False) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.hold = hold
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.hold:
                self.conns.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.e2e
@pytest.mark.parametrize(("hold", "error"), [(False, "error:ServerDisconnectedError"),
                                             (True, "error:")])
def test_errors_are_counted_not_fatal(servers: Servers, hold: bool, error: str) -> None:
    sink = Sink(hold=hold)
    try:
        trace = basic_trace(BasicParams(count=3, interval=1.0))
        cfg = ReplayConfig(proxy=f"http://127.0.0.1:{sink.port}", auth=servers.auth,
                           fast=True, timeout=0.3)
        s = replay(trace, cfg)
    finally:
        sink.close()
    assert s.sent == 6 and s.errors == 6
    # Every exchange failed and was counted; a closed connection shows as a disconnect or a
    # reset depending on timing, so only the family is fixed.
    assert sum(s.status.values()) == 6
    assert all(status.startswith("error:") for status in s.status)
    if error != "error:":
        assert any(status in (error, "error:ClientOSError", "error:ClientConnectionResetError")
                   for status in s.status), s.status
    assert s.latency_ms == {}
    assert s.auth_status == {"login 200": 3, "logout 200": 3}


@pytest.mark.e2e
def test_failed_login_skips_the_session(servers: Servers) -> None:
    """The shop answers POST /login without a token: the session's requests are skipped."""
    trace = basic_trace(BasicParams(count=2, interval=1.0))
    s = replay(trace, ReplayConfig(proxy=servers.shop, auth=servers.shop, fast=True))
    assert s.sent == 0 and s.status == {"skipped": 4}
    assert s.auth_status == {"login error:KeyError": 2}


@pytest.mark.e2e
def test_unreachable_proxy_is_a_clear_error(servers: Servers) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    trace = basic_trace(BasicParams(count=1))
    with pytest.raises(ScenarioError, match=r"proxy http://127\.0\.0\.1:\d+ is unreachable "
                                            r"\(Connection refused\); is mitmdump running"):
        replay(trace, ReplayConfig(proxy=dead, auth=servers.auth, fast=True))
    with pytest.raises(ScenarioError, match=r"auth server .* is unreachable"):
        replay(trace, ReplayConfig(proxy=servers.shop, auth=dead, fast=True))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "scenarios", "replay", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **ENV})


@pytest.mark.e2e
def test_cli(servers: Servers, tmp_path: Path) -> None:
    path = tmp_path / "basic.jsonl"
    basic_trace(BasicParams(count=5, interval=0.01)).write_jsonl(path)
    r = run_cli(str(path), "--proxy", servers.shop, "--auth", servers.auth, "--fast", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["sent"] == 10 and out["status"] == {"200": 10} and out["max_lag_s"] is None
    assert set(out) == {f for f in ReplaySummary.__dataclass_fields__ if f != "records"}

    r = run_cli(str(path), "--proxy", servers.shop, "--auth", servers.auth, "--speed", "100")
    assert r.returncode == 0, r.stderr
    assert "sent         10 through the proxy" in r.stdout
    assert "max lag" in r.stdout and "rate" in r.stdout

    # The shop as the auth server: every login fails, so no request is sent: exit 1.
    r = run_cli(str(path), "--proxy", servers.shop, "--auth", servers.shop, "--fast")
    assert r.returncode == 1, r.stderr
    assert "sent         0 through the proxy" in r.stdout
    assert r.stderr.strip().splitlines() == [
        "python -m scenarios replay: no request was answered (status: skipped: 10; auth server: "
        "login error:KeyError: 5)"]

    dead = f"http://127.0.0.1:{free_port()}"
    r = run_cli(str(path), "--proxy", dead, "--auth", servers.auth)
    assert r.returncode == 2
    assert f"error: proxy {dead} is unreachable" in r.stderr
    assert "Traceback" not in r.stderr

    r = run_cli(str(path), "--fast", "--speed", "2")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
