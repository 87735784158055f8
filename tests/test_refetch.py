"""The host's refetch intervals: how long after a 2xx answer a generation repeats a call."""

from __future__ import annotations

import json

import pytest

from addons.proxywasm import refetch
from addons.proxywasm.refetch import RefetchIntervals, call_key
from scenarios.simulate import SimConfig, simulate
from scenarios.trace import Event, Trace


def test_no_interval_until_enough_repeats() -> None:
    r = RefetchIntervals()
    for i in range(refetch.MIN_INTERVALS):
        assert r.interval_s() is None
        r.started(2 * i, key=i, now_s=0.0)
        r.answered(2 * i, now_s=1.0, ok=True)
        r.started(2 * i + 1, key=i, now_s=61.0 + i)  # 60 s after its answer, and more
    assert r.interval_s() == pytest.approx(60.0 + refetch.MIN_INTERVALS * refetch.QUANTILE - 1)


def test_only_a_2xx_answer_starts_an_interval() -> None:
    r = RefetchIntervals()
    for i in range(3 * refetch.MIN_INTERVALS):
        ok = i % 3 == 0
        r.started(2 * i, key=i, now_s=0.0)
        r.answered(2 * i, now_s=1.0, ok=ok)
        r.started(2 * i + 1, key=i, now_s=11.0 if ok else 2.0)
    assert r.interval_s() == 10.0  # the failed calls repeated after 1 s count for nothing


def test_a_call_in_flight_twice_and_an_unknown_answer() -> None:
    r = RefetchIntervals()
    r.answered(99, now_s=1.0, ok=True)  # never started (a late answer): ignored
    for i in range(refetch.MIN_INTERVALS):
        r.started(3 * i, key=i, now_s=0.0)
        r.started(3 * i + 1, key=i, now_s=0.5)  # the same call again before the answer
        r.answered(3 * i, now_s=1.0, ok=True)
        r.answered(3 * i + 1, now_s=1.5, ok=True)
        r.started(3 * i + 2, key=i, now_s=31.5)
    assert r.interval_s() == 30.0  # from the latest answer


def test_keys_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refetch, "MAX_KEYS", 4)
    r = RefetchIntervals()
    for key in range(8):
        r.started(key, key=key, now_s=0.0)
        r.answered(key, now_s=0.0, ok=True)
    assert len(r._answered) == 4 and 0 not in r._answered and 7 in r._answered


def test_calls_never_answered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call whose stream closed before its answer never reaches `answered`: the calls in
    flight stay bounded, the oldest forgotten first."""
    monkeypatch.setattr(refetch, "MAX_KEYS", 4)
    r = RefetchIntervals()
    for call_id in range(8):
        r.started(call_id, key=call_id, now_s=0.0)
    assert len(r._pending) == 4 and 0 not in r._pending and 7 in r._pending
    r.answered(7, now_s=1.0, ok=True)
    assert 7 in r._answered


def test_the_key_is_everything_the_call_sends() -> None:
    headers = [(b":path", b"/verify"), (b"authorization", b"Bearer a")]
    key = call_key("auth", headers, b"", [])
    assert key == call_key("auth", list(headers), b"", [])
    assert key != call_key("auth", [(b":path", b"/verify"), (b"authorization", b"Bearer b")],
                           b"", [])
    assert key != call_key("other", headers, b"", [])
    assert key != call_key("auth", headers, b"x", [])


def test_the_host_sees_the_filter_ttl() -> None:
    # Thirty users, each with a request every 7 s for 20 minutes, through the real filter
    # with a 90-s TTL: their tokens are verified again about every 90 s, and the samples
    # say so; with the filter's default TTL (600 s), about every 600 s.
    events: list[Event] = []
    for u in range(30):
        events.append(Event(float(u), "login", f"u{u}", f"t{u}"))
        events += [Event(u + 1.0 + 7.0 * i, "request", f"u{u}", f"t{u}", "GET", "shop", "/")
                   for i in range(170)]
    trace = Trace.from_events(sorted(events, key=lambda e: e.time))
    result = simulate(trace, SimConfig(plugin_configuration=json.dumps({"ttl_seconds": 90}),
                                       sample_interval=10.0, request_log=False))
    seen = result.samples["refetch_interval_s"]
    assert seen.iloc[:5].isna().all()  # nothing repeated in the first 90 s
    last = float(seen.iloc[-1])
    assert 90.0 <= last <= 97.0
    default = simulate(trace, SimConfig(sample_interval=10.0, request_log=False))
    seen = default.samples["refetch_interval_s"]
    assert seen.loc[default.samples["time"] < default.samples["time"].iloc[0] + 600].isna().all()
    assert 600.0 <= float(seen.iloc[-1]) <= 607.0
