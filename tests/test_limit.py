"""Tests of scenarios.limit: the cache replay, the search, and the model against simulation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scenarios.eclog import (
    EClogConvertParams,
    EClogGenParams,
    Sale,
    eclog_to_trace,
    generate_eclog,
    read_eclog,
    write_eclog,
)
from scenarios.experiment import ExperimentConfig, run_policy, with_sample_interval
from scenarios.limit import (
    InstanceModel,
    LimitParams,
    best_schedule,
    cache_entries,
    evaluate,
    frontier,
    frontier_table,
    instance_models,
    limit_at,
    simulate_schedule,
)


def test_cache_entries_replay_the_filter_rules() -> None:
    events = pd.DataFrame(
        [(0.0, "login", "a", "h"), (1.0, "request", "a", "h"), (5.0, "request", "a", "h"),
         (8.0, "request", "a", "h"),  # hits of the entry made at 1
         (12.0, "request", "a", "h"),  # expired at 11: a new entry
         (14.0, "logout", "a", "h"),  # evicts it, no hit
         (2.0, "request", "b", "h")],  # one request: an entry without a hit
        columns=["time", "kind", "token", "host"],
    ).sort_values("time", kind="stable")
    got = cache_entries(events, ttl=10.0, instance_of={"h": "i"})
    rows = sorted(map(tuple, got[["created", "last_hit", "ended"]].to_numpy().tolist()))
    assert rows == [(1.0, 8.0, 11.0), (2.0, 2.0, 12.0), (12.0, 12.0, 14.0)]
    assert set(got["instance"]) == {"i"}


def model(live: list[float], in_use: list[float], cell_s: float = 100.0) -> InstanceModel:
    n = len(live)
    zeros = np.zeros((n, 2))
    return InstanceModel("i", 0.0, cell_s, np.array(live, dtype=float), np.array(live, dtype=float),
                         np.array(in_use, dtype=float), zeros, zeros, 0.0, 1.0)


def test_best_schedule_restarts_after_the_peak_when_it_pays() -> None:
    page = 65536.0
    live = [0, 10 * page, 0.5 * page] + [0.5 * page] * 17  # a peak, then a long quiet
    m = model(live, [0, 50, 40] + [3] * 17)
    cells, surplus, calls = best_schedule(m, price_byte_s=5e6)
    assert cells and cells[0] == 3 and calls == pytest.approx(sum(m.in_use[c] for c in cells))
    none_surplus, _ = evaluate(m, [])
    assert surplus < none_surplus / 5
    # too dear: never restart
    assert best_schedule(m, price_byte_s=1e12)[0] == []
    # the search is exact: no single or double restart does better at this price
    best = surplus + 5e6 * calls
    for a in range(1, 20):
        for b in [None, *range(a + 1, 20)]:
            s, c = evaluate(m, [a] if b is None else [a, b])
            assert s + 5e6 * c >= best - 1e-6


def test_frontier_runs_from_no_restart_to_many() -> None:
    page = 65536.0
    rng = np.random.default_rng(1)
    m = model(list(rng.uniform(0, 8 * page, 60)), list(rng.integers(0, 30, 60)))
    table = frontier_table(frontier([m], LimitParams(grid_s=100.0)), duration_s=6000.0,
                           none_auth=1000)
    assert table["restarts"].iloc[0] == 0 and table["restarts"].iloc[-1] > 3
    assert table["auth_vs_none"].is_monotonic_increasing
    free = table["auth_vs_none"] == 1.0
    assert limit_at(table, 1.0) == pytest.approx(table.loc[free, "mean_surplus_mib"].min())
    assert limit_at(table, 10.0) == pytest.approx(table["mean_surplus_mib"].min())


@pytest.fixture(scope="module")
def sale_day(tmp_path_factory: pytest.TempPathFactory):
    """Six hours around a small sale of generated EClog traffic, and its `none` run."""
    gen = EClogGenParams(days=1, requests_per_hour=900, seed=11,
                         sales=(Sale(day=0, hour=14, new_users=1500, shape="flash"),))
    csv = tmp_path_factory.mktemp("sale") / "eclog.csv"
    write_eclog(generate_eclog(gen), csv)
    start = pd.Timestamp("2019-12-01T12:00Z")
    trace = eclog_to_trace(read_eclog(csv), EClogConvertParams(logouts=True, start=start,
                                                  end=start + pd.Timedelta(hours=6)))
    config = with_sample_interval(ExperimentConfig(), 5.0)
    return trace, config, run_policy(trace, "none", config)


def test_model_agrees_with_the_simulation(sale_day) -> None:
    """The frontier's schedules, replayed in the real simulation: the model's extra calls and
    mean surplus are close to what the simulation measures."""
    trace, config, none = sale_day
    params = LimitParams(grid_s=300.0)
    models = instance_models(none.series, trace, params)
    schedules = frontier(models, params)
    duration = float(none.series["time"].max() - none.series["time"].min())
    mib = 2**20
    none_model = sum(evaluate(m, [])[0] for m in models) / duration / mib
    none_sim = float(none.series.groupby("time")["surplus_true"].sum().mean()) / mib
    assert none_model == pytest.approx(none_sim, rel=0.1, abs=0.005)
    checked = 0
    for s in schedules[1:]:
        if not 1 <= sum(map(len, s.restarts.values())) <= 4:
            continue
        sim = simulate_schedule(trace, s.restarts, config)
        extra = sim["auth_requests"] - int(none.series["outbound"].sum())
        assert extra == pytest.approx(s.extra_calls, rel=0.25, abs=15)
        model_mib = s.surplus_byte_s / duration / mib
        assert model_mib == pytest.approx(sim["mean_surplus_mib"], rel=0.35, abs=0.01)
        checked += 1
        if checked == 3:
            break
    assert checked >= 2
