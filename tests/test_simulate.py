"""Virtual-time simulation through the real filter, and the paper's basic experiment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pandas as pd

from scenarios.__main__ import main as scenarios_main
from scenarios.basic import BasicParams, basic_trace
from scenarios.fig4 import FIG4_COLUMNS, run_fig4
from scenarios.simulate import SAMPLE_COLUMNS, SimConfig, SimResult, sample_frame, simulate
from scenarios.trace import Event, Trace


def test_basic_experiment_memory_does_not_come_down() -> None:
    series = run_fig4(count=300)
    assert list(series.columns) == FIG4_COLUMNS
    rising = series[series["t"] <= 300]
    falling = series[series["t"] > 300]
    # Allocated memory grows with the token count ...
    assert rising["allocated_bytes"].is_monotonic_increasing
    assert rising["allocated_bytes"].iloc[-1] >= 300 * 1024
    assert rising["tokens"].iloc[-1] == 300
    # ... and does not come down after the logouts, while the live bytes do.
    peak = series["allocated_bytes"].max()
    assert (falling["allocated_bytes"] == peak).all()
    assert falling["tokens"].iloc[-1] == 0 and falling["live_bytes"].iloc[-1] == 0
    assert falling["live_bytes"].is_monotonic_decreasing


def test_samples_and_decisions_of_a_small_trace() -> None:
    events = [
        Event.login(0, "a", "ta", "shop"),
        Event.request(0, "a", "ta", "shop"),
        Event.request(5, "a", "ta", "shop"),
        Event.login(7, "b", "tb", "blog"),
        Event.request(7, "b", "tb", "blog"),
        Event.logout(9, "a", "ta", "shop"),
    ]
    result = simulate(Trace.from_events(events), SimConfig(sample_interval=1.0))
    assert list(result.samples.columns) == SAMPLE_COLUMNS
    assert result.samples["hits"].sum() == 1 and result.samples["misses"].sum() == 2
    assert set(result.samples["instance"]) == {"shop", "blog"}  # one instance per host
    assert list(result.requests["decision"]) == ["miss", "hit", "miss", "logout"]
    assert result.verify_requests == 2
    last = result.samples.groupby("instance").last()
    assert last.loc["shop", "requests"] == 3 and last.loc["shop", "outbound"] == 1
    assert last.loc["shop", "live_entries"] == 0 and last.loc["blog", "live_entries"] == 1
    times = result.samples[result.samples["instance"] == "shop"]["time"].diff().dropna()
    assert (times.round(6) == 1.0).all()


def test_controller_restarts_through_the_host() -> None:
    trace = basic_trace(BasicParams(count=100))
    seen: list[float] = []

    def controller(samples: pd.DataFrame, now: float) -> list[str]:
        seen.append(now)
        return ["shop.example"] if len(seen) == 15 else []

    config = SimConfig(plugin_configuration='{"ttl_seconds": 1000}', decision_interval=10)
    result = simulate(trace, config, controller)
    # The controller runs every decision_interval with every sample since its previous run.
    assert seen[1] - seen[0] == 10
    assert len(result.restarts) == 1 and result.restarts.iloc[0]["requested_by"] == "simulation"
    gens = result.samples.set_index("time")["generation"]
    assert gens.iloc[0] == 0 and gens.iloc[-1] == 1
    after = result.samples[result.samples["generation"] == 1]
    assert after["allocated_pages"].max() < result.samples["allocated_pages"].max()


def test_fig4_command_writes_csv_and_png(tmp_path, capsys) -> None:
    assert scenarios_main(["fig4", "--count", "32", "--out", str(tmp_path), "--csv"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("t,tokens,live_bytes,allocated_pages,allocated_bytes\n")
    assert "allocated at the end" in out
    series = pd.read_csv(tmp_path / "fig4.csv")
    assert series["tokens"].max() == 32
    assert (tmp_path / "fig4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_warm_restarts_keep_the_hit_rate_and_auth_calls_of_none(tmp_path) -> None:
    from scenarios.standard import week_trace

    trace = week_trace(True, tmp_path)
    config = SimConfig(plugin_configuration='{"ttl_seconds": 600}', sample_interval=5.0,
                       decision_interval=30.0)
    restarts: list[float] = []

    def every_20_minutes(samples: pd.DataFrame, now: float) -> list[str]:
        if not restarts or now - restarts[-1] >= 1200:
            restarts.append(now)
            return sorted(set(samples["instance"]))
        return []

    none = simulate(trace, config)
    cold = simulate(trace, config, every_20_minutes)
    restarts.clear()
    warm = simulate(trace, replace(config, restart_mode="warm"), every_20_minutes)
    assert len(warm.restarts) == len(cold.restarts) >= 10
    assert (warm.restarts["mode"] == "warm").all() and warm.restarts["fallback"].isna().all()
    assert (cold.restarts["mode"] == "cold").all()
    assert warm.verify_requests == none.verify_requests < cold.verify_requests
    decided = ["hit", "miss"]
    assert (warm.requests["decision"].value_counts()[decided]
            == none.requests["decision"].value_counts()[decided]).all()
    # memory: warm restarts still free the surplus (each new generation is no bigger)
    before = warm.restarts["allocated_bytes_before"]
    assert (warm.restarts["allocated_bytes_after"] <= before).all()
    assert (warm.restarts["allocated_bytes_after"] < before).any()


def test_the_experiments_fast_path_records_the_same_run() -> None:
    """Without a row per request (what experiments run), a run with a restarting controller
    gives the same samples, the same controller input and the same counts as with them."""
    trace = basic_trace(BasicParams(count=60))

    def run(request_log: bool) -> tuple[SimResult, list[pd.DataFrame]]:
        seen: list[pd.DataFrame] = []

        def controller(samples: Mapping[str, Any], now: float) -> list[str]:
            seen.append(pd.DataFrame(samples))
            return ["shop.example"] if len(seen) in (3, 7) else []

        config = SimConfig(sample_interval=1.0, decision_interval=10.0, request_log=request_log)
        return simulate(trace, config, controller), seen

    (full, full_seen), (fast, fast_seen) = run(True), run(False)
    pd.testing.assert_frame_equal(full.samples, fast.samples)
    assert len(full_seen) == len(fast_seen) > 7
    for a, b in zip(full_seen, fast_seen, strict=True):
        pd.testing.assert_frame_equal(a, b)
    assert fast.requests.empty and fast.request_count == full.request_count == len(full.requests)
    assert fast.verify_requests == full.verify_requests and len(fast.restarts) == 2


def test_sample_frame_types_columns_as_pandas_does() -> None:
    """Numeric columns through numpy, the rest (strings, None) inferred by pandas: the same
    frame as pandas makes from the rows."""
    base = ["p", 1.5, "i", "t", 0, 1.0, 1, 65536, 3, 1, 2, 2048, "running", 0, 61.5, 1, 2, 0, 0]
    rows = [tuple(base), (*base[:10], None, None, *base[12:14], None, *base[15:]),
            (*base[:4], 1, *base[5:12], "down", *base[13:])]
    for some in (rows, rows[:1], rows[1:2]):
        expected = pd.DataFrame(some, columns=SAMPLE_COLUMNS)
        pd.testing.assert_frame_equal(sample_frame(some), expected)
        # only some columns (what a manager pass reads), in the order asked
        wanted = ["live_bytes", "instance", "time", "state", "refetch_interval_s"]
        pd.testing.assert_frame_equal(sample_frame(some, wanted), expected[wanted])


def test_a_controller_chooses_each_restarts_mode() -> None:
    # A warm policy decides per restart: (id, mode) runs in that mode, a bare id in the config's.
    trace = basic_trace(BasicParams(count=60))
    calls = 0

    def controller(samples: Mapping[str, Any], now: float) -> list[Any]:
        nonlocal calls
        calls += 1
        return {3: [("shop.example", "cold")], 6: [("shop.example", "warm")],
                9: ["shop.example"]}.get(calls, [])

    config = SimConfig(plugin_configuration='{"ttl_seconds": 1000}', decision_interval=10,
                       restart_mode="warm")
    result = simulate(trace, config, controller)
    assert result.restarts["mode"].tolist() == ["cold", "warm", "warm"]
    assert result.restarts["generation"].tolist() == [1, 2, 3]
