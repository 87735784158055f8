"""The live counterpart of the policy experiments: request aggregation (pure), and a tiny live
run through mitmdump, the auth server, the shop and the manager daemon, compared with its
simulation."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from scenarios.experiment import SERIES_COLUMNS, run_policy, summarize
from scenarios.live import aggregate_requests, compare, experiment_config, live_samples, run_live
from scenarios.trace import Event, ScenarioError, Trace, TraceMeta


def test_aggregate_requests_counts_each_request_towards_the_next_sample_of_its_instance() -> None:
    sample_times = pd.DataFrame({"instance": ["a", "a", "a", "b", "b"],
                                 "time": [10.0, 15.0, 20.0, 15.0, 20.0]})
    requests = pd.DataFrame([
        (9.0, "a", "miss", "/", 1),       # before a's first sample: counts at 10
        (10.0, "a", "hit", "/", 0),       # exactly at a sample time: counts there
        (11.0, "a", "hit", "/x?q=1", 0),
        (12.0, "a", "deny", "/", 0),
        (13.0, "a", "hit", "/logout", 0),  # a logout: not counted, as in the simulation
        (14.0, "a", "continue", "/", 0),   # no token: not counted
        (16.0, "a", "error", "/", 0),
        (17.0, "a", "reset", "/", 0),
        (25.0, "a", "hit", "/", 0),        # after a's last sample: counts at the last one
        (1.0, "b", "miss", "/", 1),
        (16.0, "b", "respond", "/", 0),
        (3.0, "c", "hit", "/", 0),         # an instance without samples: dropped
    ], columns=["time", "instance", "decision", "path", "outbound"])
    got = aggregate_requests(requests, sample_times)
    expected = pd.DataFrame({
        "instance": ["a", "a", "a", "b", "b"],
        "time": [10.0, 15.0, 20.0, 15.0, 20.0],
        "hits": [1, 1, 1, 0, 0],
        "misses": [1, 0, 0, 1, 0],
        "denied": [0, 1, 0, 0, 0],
        "errors": [0, 0, 2, 0, 1],
        "requests": [2, 4, 3, 1, 1],  # every request, logouts and tokenless ones too
        "outbound": [1, 0, 0, 1, 0],
    })
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected, check_dtype=False)


def test_live_samples_resample_onto_the_grid_and_carry_the_counts() -> None:
    samples = pd.DataFrame([
        # periodic (late) at 100, 105.1, 110.2; one on a memory change at 103
        (100.0, "a", "t", 0, 99.0, 1, 65536, 1, 1, 1, 1024),
        (103.0, "a", "t", 0, 99.0, 2, 131072, 3, 2, 2, 2048),
        (105.1, "a", "t", 0, 99.0, 2, 131072, 4, 2, None, None),
        (110.2, "a", "t", 0, 99.0, 2, 131072, 5, 2, 2, 2048),
    ], columns=["time", "instance", "tenant", "generation", "started_at", "allocated_pages",
                "allocated_bytes", "requests", "outbound", "live_entries", "live_bytes"])
    requests = pd.DataFrame({"time": [100.0, 102.0, 104.0, 108.0], "instance": ["a"] * 4,
                             "decision": ["miss", "miss", "hit", "hit"], "path": ["/"] * 4,
                             "outbound": [1, 1, 0, 0]})
    frame = live_samples(samples, requests, 5.0)
    assert frame["time"].tolist() == [100.0, 105.0, 110.0]
    assert frame["allocated_pages"].tolist() == [1, 2, 2]
    assert frame["allocated_bytes"].tolist() == [65536, 131072, 131072]
    assert frame["requests"].tolist() == [1, 3, 4]  # counted from the requests
    assert frame["outbound"].tolist() == [1, 2, 2]
    assert frame["live_bytes"].tolist() == [1024, 2048, 0]
    assert frame[["hits", "misses"]].to_numpy().tolist() == [[0, 1], [1, 1], [1, 0]]


def tiny_trace() -> Trace:
    """Four minutes: 40 users log in over two minutes, each makes three requests 20 s apart;
    every fourth logs out."""
    events: list[Event] = []
    for i in range(40):
        t0 = 3.0 * i
        user, token = f"u{i}", f"tok{i}"
        events.append(Event(t0, "login", user, token, None, None, None))
        for j in range(3):
            events.append(Event(t0 + 1 + 20 * j, "request", user, token, "GET",
                                "shop.example", f"/p/{j}"))
        if i % 4 == 0:
            events.append(Event(t0 + 62, "logout", user, token, "GET", "shop.example",
                                "/logout"))
    events.sort(key=lambda e: (e.time, e.kind != "login"))
    return Trace.from_events(events, TraceMeta(name="tiny"))


@pytest.mark.e2e
@pytest.mark.slow
def test_tiny_live_run_matches_what_was_sent_and_compares_with_the_simulation(
        tmp_path: Path) -> None:
    trace = tiny_trace()
    speed = 30.0
    run = run_live(trace, "ratio:measure=1m", speed=speed, state=tmp_path / "state")
    series = run.series
    assert list(series.columns) == SERIES_COLUMNS
    assert set(series["instance"]) == {"shop.example"}

    assert run.replay is not None
    answered = run.replay.sent - run.replay.errors
    logouts = sum(e.kind == "logout" for e in trace)
    decided = int(series[["hits", "misses", "denied"]].sum().sum())
    # Every proxied request is in the series, logouts aside (neither side counts them).
    assert abs(decided + logouts - answered) <= 2
    assert decided >= 0.95 * sum(e.kind == "request" for e in trace)
    # Every outbound call the samples counted reached the auth server's /verify.
    outbound = int(series["outbound"].sum())
    assert run.verify_requests > 0
    assert abs(outbound - run.verify_requests) <= max(2, 0.02 * run.verify_requests)

    config = experiment_config(speed, warmup_s=0.0, min_window_requests=1, hit_window_s=60.0)
    sim = run_policy(trace, run.policy, config)
    table = compare(sim, run, config)
    metrics = set(summarize(sim.series, config, sim.policy)) - {"policy"}
    assert metrics <= set(table["metric"])
    assert table[["sim", "live", "diff"]].map(math.isfinite).all().all(), table


def test_agreement_holds_within_the_bounds_only() -> None:
    from scenarios.live import agreement

    table = pd.DataFrame([
        {"metric": "hit_rate", "sim": 0.86, "live": 0.85, "diff": -0.01},
        {"metric": "auth_requests", "sim": 400.0, "live": 460.0, "diff": 60.0},
        {"metric": "restarts", "sim": 1.0, "live": 1.0, "diff": 0.0},
        {"metric": "instances", "sim": 1.0, "live": 9.0, "diff": 8.0},  # no bound: not judged
    ])
    got = agreement(table).set_index("metric")
    assert list(got.index) == ["hit_rate", "auth_requests", "restarts"]
    assert got.loc["hit_rate", "within"] and got.loc["restarts", "within"]
    assert not got.loc["auth_requests", "within"]  # +15% > 10%
    assert got.loc["auth_requests", "difference"] == pytest.approx(0.15)


def test_a_machine_that_did_not_keep_up_is_named() -> None:
    from scenarios.live import keep_up_problems, measured_auth_latency
    from scenarios.replay import ReplaySummary

    def summary(lag: float, status: dict[str, int], errors: int = 0) -> ReplaySummary:
        return ReplaySummary(events=200, sent=100, status=status, errors=errors, latency_ms={},
                             duration_s=1.0, rate=100.0, max_lag_s=lag, logins=10,
                             auth_status={}, speed=60.0, target_rate=100.0)

    assert keep_up_problems(summary(0.05, {"200": 100}), 60.0, 0.3) == []
    lagged = keep_up_problems(summary(0.5, {"200": 100}), 60.0, 0.3)
    assert len(lagged) == 1 and "30 s of trace time" in lagged[0]
    failed = keep_up_problems(summary(0.05, {"200": 97, "503": 3}), 60.0, 0.3)
    assert len(failed) == 1 and "3 of 100 requests failed" in failed[0]
    slow = keep_up_problems(summary(0.05, {"200": 100}), 60.0, 12.0)
    assert len(slow) == 1 and "200 ms of wall time" in slow[0]
    calls = pd.DataFrame({"latency_ms": [100.0, 300.0, 9000.0],
                          "outcome": ["ok", "ok", "timeout"]})
    assert measured_auth_latency(calls) == pytest.approx(0.2)
    assert measured_auth_latency(calls.iloc[:0]) is None


def test_the_simulation_is_charged_the_measured_latency() -> None:
    assert experiment_config(60.0).sim.auth_latency == 0.005
    assert experiment_config(60.0, auth_latency=1.5).sim.auth_latency == 1.5
    assert '"timeout_ms": 300000' in experiment_config(60.0).sim.plugin_configuration


@pytest.mark.e2e
def test_a_manager_that_cannot_start_stops_the_run_in_one_line(tmp_path) -> None:
    """`live` with a manager argument the manager refuses: the run stops with the manager's
    own line, instead of replaying with no policy and reporting it."""
    trace = tiny_trace()
    with pytest.raises(ScenarioError, match=r"the manager did not start \(exit 2\): .*--bogus"):
        run_live(trace, "ratio:measure=1m", speed=60.0, state=tmp_path / "state",
                 policy_args=["--bogus"])
