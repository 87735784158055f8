"""Tests of manager.policies: the one decide() interface, each policy, and parse_policy."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from manager.estimate import EstimatorParams, estimate
from manager.policies import (
    MIB,
    AdaptiveParams,
    Decision,
    FixedParams,
    History,
    NoneParams,
    OracleParams,
    PolicyParams,
    PolicyState,
    RatioParams,
    Slots,
    ThresholdParams,
    adaptive_rule,
    decide,
    decisions_frame,
    initial_state,
    parse_duration,
    parse_policy,
    parse_size,
    ratio_rule,
    refetch_scale,
    refetched,
    state_frame,
)
from tests.test_estimate import arrival_times, synthetic_samples

COLUMNS = [
    "instance", "generation", "time", "started_at", "allocated_pages", "allocated_bytes",
    "requests", "outbound",
]


def frame(rows: Sequence[tuple[Any, ...]], **extra: Sequence[Any]) -> pd.DataFrame:
    """Samples from (instance, generation, time, started_at, pages, outbound) tuples."""
    df = pd.DataFrame(
        [(i, g, t, s, p, p * 65536, o * 2, o) for i, g, t, s, p, o in rows], columns=COLUMNS
    )
    return df.assign(**extra)


def run(
    params: PolicyParams, passes: Sequence[pd.DataFrame], state: PolicyState | None = None
) -> tuple[list[tuple[Decision, ...]], PolicyState]:
    state = state or initial_state(params)
    out = []
    for i, samples in enumerate(passes):
        decisions, state = decide(state, samples, now=1000.0 + i, params=params)
        out.append(decisions)
    return out, state


def restarts(decisions: Sequence[Decision]) -> list[tuple[str, int, float]]:
    return [(d.instance, d.generation, d.time) for d in decisions if d.action == "restart"]


# ----------------------------------------------------------------------------------------------
# The ratio rule as a table
# ----------------------------------------------------------------------------------------------

RULE = RatioParams(trend_min_pages=1.0, trend_noise_z=0.0)


@pytest.mark.parametrize(
    ("allocated", "baseline", "d_required", "d_surplus", "sd", "params", "was", "expected"),
    [
        # all three conditions hold
        (100, 80, -5.0, 5.0, 0.0, RULE, False, (True, True, True, True)),
        # allocated below the baseline
        (70, 80, -5.0, 5.0, 0.0, RULE, False, (False, True, True, False)),
        # allocated exactly at the baseline counts (P ≥ baseline)
        (80, 80, -5.0, 5.0, 0.0, RULE, False, (True, True, True, True)),
        # required rising, or falling by less than the one-page dead band
        (100, 80, 3.0, -3.0, 0.0, RULE, False, (True, False, False, False)),
        (100, 80, -1.0, 1.0, 0.0, RULE, False, (True, False, True, False)),
        # surplus not rising (allocated went down with required)
        (100, 80, -5.0, 0.0, 0.0, RULE, False, (True, True, False, False)),
        # the noise band: σ = 2 pages, z = 3 → must fall by more than 6
        (100, 80, -5.0, 5.0, 2.0, dataclasses.replace(RULE, trend_noise_z=3.0), False,
         (True, False, True, False)),
        (100, 80, -7.0, 7.0, 2.0, dataclasses.replace(RULE, trend_noise_z=3.0), False,
         (True, True, True, True)),
        # require_turn: falling already at the previous sample is no turn
        (100, 80, -5.0, 5.0, 0.0, dataclasses.replace(RULE, require_turn=True), True,
         (True, False, True, False)),
        (100, 80, -5.0, 5.0, 0.0, dataclasses.replace(RULE, require_turn=True), False,
         (True, True, True, True)),
        # missing numbers fail their condition
        (100, 80, math.nan, 5.0, 0.0, RULE, False, (True, False, False, False)),
    ],
)
def test_ratio_rule_table(
    allocated: float, baseline: float, d_required: float, d_surplus: float, sd: float,
    params: RatioParams, was: bool, expected: tuple[bool, bool, bool, bool],
) -> None:
    checks = ratio_rule(
        np.array([allocated], dtype=float), baseline, np.array([d_required]),
        np.array([d_surplus]), params, required_change_sd=np.array([sd]),
        was_falling=np.array([was]),
    )
    got = (checks.above[0], checks.falling[0], checks.rising[0], checks.restart[0])
    assert tuple(bool(x) for x in got) == expected


# ----------------------------------------------------------------------------------------------
# The ratio policy on tiny inline frames
# ----------------------------------------------------------------------------------------------

# k = 10 entries/page and TTL = 20 s (the defaults: growth is never "seen" here), L = 10 s.
TINY = RatioParams(
    estimator=EstimatorParams(
        measure_s=10, ttl_cap_s=20, trend_window_s=10, k_default=10, min_growth_pages=1000
    ),
    trend_min_pages=1.0,
    trend_noise_z=0.0,
)
# Measurement periods (gen 0: t = 0, 5, 10, pages 4) by their outbound counts:
LOW = (0, 0, 0)  # N = 0 → baseline (0 + 5)/2 = 2.5 entries → 4.25 pages
HIGH = (0, 500, 1000)  # median 500, modal class [0, 10) → 5 → 252.5 entries → 29.25 pages
# Generation 1 from t = 20: N(40) = 200 → required 24 pages, rising.
PREFIX = [(20, 0, 4), (30, 100, 14), (40, 200, 24)]


def tiny_run(
    measurement: tuple[int, int, int], rows: list[tuple[float, int, int]],
    params: RatioParams = TINY, split: bool = False,
) -> list[tuple[Decision, ...]]:
    first = frame([("a", 0, t, 0.0, 4, o) for t, o in zip((0, 5, 10), measurement, strict=True)])
    gen1 = [("a", 1, t, 20.0, p, o) for t, o, p in PREFIX]
    last = [("a", 1, t, 20.0, p, o) for t, o, p in rows]
    passes = [first, frame(gen1)]
    passes += [frame([r]) for r in last] if split else [frame(last)]
    decisions, _ = run(params, passes)
    assert restarts(decisions[0]) == [("a", 0, 10.0)]  # the first decision restarts
    assert [d.action for d in decisions[1]] == ["keep"]
    return decisions


@pytest.mark.parametrize(
    ("measurement", "rows", "params", "action", "reason"),
    [
        # t = 50: N = O(50) − O(30) = 100 → required 14 (−10), surplus 16 (+16), 30 ≥ 29.25
        (HIGH, [(50, 200, 30)], TINY, "restart", "required fell 10.0 pages"),
        (HIGH, [(50, 200, 24)], TINY, "keep", "allocated 24 pages (1.5 MiB) < baseline 29.2"),
        # required still rising: N = 400 − 100 = 300 → 34 pages
        (HIGH, [(50, 400, 44)], TINY, "keep", "required did not fall (change +10.0"),
        # required falls by exactly one page: not enough
        (HIGH, [(50, 290, 30)], TINY, "keep", "required did not fall (change -1.0"),
        # allocated went down to 10 with required (capped at allocated): surplus stays 0
        (LOW, [(50, 200, 10)], TINY, "keep", "surplus did not rise more than required"),
        # the noise band: 100 expiries in the window, σ = 1 page; z = 12 → needs < −12
        (HIGH, [(50, 200, 30)], dataclasses.replace(TINY, trend_noise_z=12.0), "keep",
         "needs < -12.0"),
        # falling at t = 50 (below the baseline) and again at t = 60 (above it): a turn only at 50
        (HIGH, [(50, 200, 24), (60, 200, 30)], TINY, "restart", "allocated 30 pages"),
        (HIGH, [(50, 200, 24), (60, 200, 30)], dataclasses.replace(TINY, require_turn=True),
         "keep", "required did not turn to fall"),
    ],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "pass-per-row"])
def test_ratio_decision_table(
    measurement: tuple[int, int, int], rows: list[tuple[float, int, int]], params: RatioParams,
    action: str, reason: str, split: bool,
) -> None:
    decisions = tiny_run(measurement, rows, params, split)
    last = decisions[-1][-1]
    assert (last.action, last.time) == (action, rows[-1][0])
    assert reason in last.reason
    assert last.required_pages is not None and last.required_pages <= last.allocated_pages
    assert last.ttl_s == 20 and last.k == 10


def test_ratio_measures_before_deciding() -> None:
    samples = frame([("a", 0, t, 0.0, 4, 10 * t) for t in np.arange(0, 10, 1.0)])
    (decisions,), state = run(TINY, [samples])
    (d,) = decisions
    assert d.action == "keep" and "measuring, 9 s of 10 s observed" in d.reason
    assert d.required_pages is None and d.baseline_pages is None
    assert not state_frame(state).loc["a", "learned"]


def test_ratio_first_decision_can_be_turned_off() -> None:
    samples = frame([("a", 0, t, 0.0, 4, 0) for t in (0, 5, 10)])
    (decisions,), _ = run(dataclasses.replace(TINY, first_decision_restarts=False), [samples])
    assert decisions[0].action == "keep"
    assert "measuring" not in decisions[0].reason


def test_ratio_keeps_what_it_learned_across_generations() -> None:
    params = TINY
    decisions, state = run(
        params,
        [
            frame([("a", 0, t, 0.0, 4, o) for t, o in zip((0, 5, 10), HIGH, strict=True)]),
            # restarted by someone else: a new generation with a bigger start
            frame([("a", 1, 20.0, 19.0, 6, 0), ("a", 1, 30.0, 19.0, 16, 100)]),
        ],
    )
    row = state_frame(state).loc["a"]
    assert bool(row["learned"]) and row["baseline_entries"] == pytest.approx(252.5)
    assert row["generation"] == 1 and row["start_pages"] == 6  # per generation
    last = decisions[1][-1]
    assert last.baseline_pages == pytest.approx(6 + 25.25)
    # N restarted with the generation: all 100 calls since the start, nothing from generation 0
    assert last.estimated_entries == pytest.approx(100)


def test_ratio_measurement_restarts_with_a_generation_until_learned() -> None:
    decisions, _ = run(
        TINY,
        [
            frame([("a", 0, 0.0, 0.0, 4, 0), ("a", 0, 5.0, 0.0, 4, 0)]),
            frame([("a", 1, 8.0, 7.0, 4, 0), ("a", 1, 16.0, 7.0, 4, 0)]),
            frame([("a", 1, 18.0, 7.0, 4, 0)]),
        ],
    )
    assert "measuring" in decisions[1][0].reason  # 8 s of the new generation, not 16 s
    assert restarts(decisions[2]) == [("a", 1, 18.0)]


def test_ratio_matches_the_batch_estimate() -> None:
    samples = synthetic_samples(ttl=120, k=32, rate=80, duration=1500, jitter="poisson", seed=4)
    params = dataclasses.replace(TINY, estimator=EstimatorParams(), first_decision_restarts=False)
    state = initial_state(params)
    by_time = {}
    for start in range(0, len(samples), 37):  # uneven passes
        decisions, state = decide(state, samples.iloc[start : start + 37], 0.0, params)
        by_time.update({d.time: d for d in decisions})
    batch = estimate(samples, math.inf, params.estimator).set_index("time")
    compared = 0
    for time, d in by_time.items():
        if d.required_pages is None:
            continue
        row = batch.loc[time]
        assert d.required_pages == pytest.approx(row["required_pages"], abs=1e-9)
        assert d.surplus_pages == pytest.approx(row["surplus_pages"], abs=1e-9)
        assert d.estimated_entries == pytest.approx(row["estimated_entries"], abs=1e-9)
        compared += 1
    assert compared > 10


def test_ratio_never_reads_ground_truth() -> None:
    samples = synthetic_samples(ttl=120, k=32, rate=80, duration=1200, jitter="poisson", seed=9)
    garbage = samples.assign(
        live_entries=-1,
        live_bytes=pd.Series([None, "x"] * len(samples), dtype=object).iloc[: len(samples)].to_numpy(),
    )
    params = RatioParams(estimator=EstimatorParams(measure_s=300))
    chunks = [slice(i, i + 50) for i in range(0, len(samples), 50)]
    a, _ = run(params, [samples.iloc[c] for c in chunks])
    b, _ = run(params, [garbage.iloc[c] for c in chunks])
    c, _ = run(params, [samples.drop(columns=["live_entries", "live_bytes"]).iloc[c] for c in chunks])
    assert a == b == c


# ----------------------------------------------------------------------------------------------
# A closed loop: restarts start new generations of a model filter
# ----------------------------------------------------------------------------------------------


class ModelFilter:
    """One instance of the model filter; arrivals are misses; a restart drops everything."""

    def __init__(self, arrivals: np.ndarray, ttl: float, k: float, start: int = 4) -> None:
        self.arrivals, self.ttl, self.k, self.start = np.sort(arrivals), ttl, k, start
        self.generation, self.started_at, self.peak, self.last = 0, 0.0, 0, 0.0

    def restart(self, t: float) -> None:
        self.generation, self.started_at, self.peak = self.generation + 1, t, 0

    def sample(self, t: float) -> dict[str, Any]:
        a = self.arrivals
        lo, hi = np.searchsorted(a, [self.last, t], side="right")
        if hi > lo:
            oldest = np.maximum(a[lo:hi] - self.ttl, self.started_at)
            live = np.arange(lo, hi) + 1 - np.searchsorted(a, oldest, side="right")
            self.peak = max(self.peak, int(live.max()))
        self.last = t
        since_start = int(hi - np.searchsorted(a, self.started_at, side="right"))
        live_now = int(hi - np.searchsorted(a, max(t - self.ttl, self.started_at), side="right"))
        pages = self.start + math.ceil(self.peak / self.k)
        return {
            "instance": "shop", "generation": self.generation, "time": t,
            "started_at": self.started_at, "allocated_pages": pages,
            "allocated_bytes": pages * 65536, "requests": since_start * 3,
            "outbound": since_start, "live_entries": live_now,
            "live_bytes": live_now * 65536 / self.k,  # an entry's share of a page
        }


def closed_loop(params: PolicyParams, arrivals: np.ndarray, end: float) -> tuple[list[Decision], pd.DataFrame]:
    model = ModelFilter(arrivals, ttl=120, k=32)
    state = initial_state(params)
    made: list[Decision] = []
    samples: list[dict[str, Any]] = []
    for t in np.arange(0.0, end, 1.0):
        sample = model.sample(float(t))
        samples.append(sample)
        decisions, state = decide(state, pd.DataFrame([sample]), float(t), params)
        made += decisions
        if any(d.action == "restart" for d in decisions):
            model.restart(float(t))
    return made, pd.DataFrame(samples)


def sale_traffic(seed: int = 0) -> np.ndarray:
    """100 logins/s, a sale at 300/s from 400 s to 900 s, then 20/s."""
    rng = np.random.default_rng(seed)
    parts = [(0, 400, 100), (400, 900, 300), (900, 1500, 20)]
    return np.concatenate(
        [start + arrival_times(rate, end - start, "poisson", rng) for start, end, rate in parts]
    )


def test_closed_loop_ratio_restarts_after_the_peak() -> None:
    params = parse_policy("ratio:measure=3m,ttl_cap=2m")
    made, samples = closed_loop(params, sale_traffic(), 1500)
    times = [d.time for d in made if d.action == "restart"]
    assert times[0] == 180  # the first decision after the measurement period
    # no restart while the sale builds up; one soon after it ends, when the cache drains
    assert not [t for t in times if 181 <= t < 900]
    assert any(900 <= t <= 960 for t in times)
    _, none_samples = closed_loop(NoneParams(), sale_traffic(), 1500)
    tail = slice(1100, None)
    assert samples["allocated_pages"].iloc[tail].mean() < 0.5 * none_samples[
        "allocated_pages"
    ].iloc[tail].mean()
    assert all(d.required_pages is None or d.required_pages <= d.allocated_pages for d in made)


def test_closed_loop_oracle_restarts_when_the_cache_is_small() -> None:
    made, _ = closed_loop(OracleParams(), sale_traffic(), 1500)
    (restart,) = [d for d in made if d.action == "restart"]
    assert restart.time > 900
    assert restart.live_bytes is not None and restart.true_surplus_pages is not None
    assert restart.surplus_pages is None  # the truth never goes in the estimate's fields
    assert restart.true_surplus_pages * 65536 >= restart.live_bytes


# ----------------------------------------------------------------------------------------------
# fixed, threshold, none, oracle
# ----------------------------------------------------------------------------------------------


def test_fixed_restarts_at_the_uptime() -> None:
    samples = frame([("a", 0, t, 100.0, 4, 0) for t in (100, 1000, 1900, 1950)])
    (decisions,), _ = run(FixedParams(uptime_s=1800), [samples])
    (d,) = decisions
    assert (d.action, d.time, d.uptime_s) == ("restart", 1900, 1800)
    assert d.reason == "uptime 30.0 min ≥ 30 min"
    (keep,), _ = run(FixedParams(uptime_s=1800), [samples.iloc[:2]])
    assert keep[0].action == "keep" and keep[0].reason == "keep: uptime 15.0 min < 30 min"


def test_threshold_restarts_over_the_allocation() -> None:
    samples = frame([("a", 0, 1.0, 0.0, 100, 0), ("b", 0, 1.0, 0.0, 1024, 0)])
    (decisions,), _ = run(ThresholdParams(allocated_bytes=64 * MIB), [samples])
    assert [(d.instance, d.action) for d in decisions] == [("a", "keep"), ("b", "restart")]
    assert decisions[1].reason == "allocated 64.0 MiB ≥ threshold 64 MiB"


def test_none_never_restarts() -> None:
    samples = frame([("a", 0, t, 0.0, 10_000, 0) for t in range(5)])
    (decisions,), _ = run(NoneParams(), [samples])
    assert [(d.action, d.time, d.policy) for d in decisions] == [("keep", 4, "none")]


@pytest.mark.parametrize(
    ("live_mib", "previous_mib", "action"),
    [
        (1.0, 1.0, "restart"),  # 16 MiB allocated, start 1 MiB: 14 MiB reclaimable ≥ 1 MiB live
        (1.0, 0.5, "keep"),  # live rising
        (8.0, 8.0, "keep"),  # reclaimable 7 MiB < 8 MiB live
        (14.9, 15.0, "keep"),  # reclaimable 0.1 MiB < 1 MiB minimum
        (math.nan, 1.0, "keep"),  # no ground truth
    ],
)
def test_oracle(live_mib: float, previous_mib: float, action: str) -> None:
    samples = frame(
        [("a", 0, 0.0, 0.0, 16, 0), ("a", 0, 100.0, 0.0, 256, 0), ("a", 0, 160.0, 0.0, 256, 0)],
        live_bytes=[0.0, previous_mib * MIB, live_mib * MIB],
    )
    (decisions,), _ = run(OracleParams(), [samples])
    assert decisions[-1].action == action
    assert decisions[-1].time == 160


def test_oracle_needs_ground_truth() -> None:
    with pytest.raises(ValueError, match="live_bytes"):
        run(OracleParams(), [frame([("a", 0, 0.0, 0.0, 16, 0)])])


# ----------------------------------------------------------------------------------------------
# The pass: generations, stale rows, retries, state
# ----------------------------------------------------------------------------------------------


def test_one_restart_per_generation_and_a_retry_later() -> None:
    params = ThresholdParams(allocated_bytes=MIB, retry_after_s=60)
    rows = [("a", 0, float(t), 0.0, 32, 0) for t in range(0, 200, 10)]
    passes = [frame(rows[:5]), frame(rows[5:6]), frame(rows[6:])]
    decisions, _ = run(params, passes)
    assert restarts(decisions[0]) == [("a", 0, 0.0)]  # t = 0 … 40: one restart
    assert decisions[1][0].action == "keep" and "was asked at 0.0" in decisions[1][0].reason
    assert restarts(decisions[2]) == [("a", 0, 60.0)]  # 60 s later, still generation 0


def test_stale_and_repeated_samples_are_ignored() -> None:
    params = ThresholdParams(allocated_bytes=MIB)
    decisions, state = run(
        params,
        [
            frame([("a", 1, 10.0, 5.0, 4, 0)]),
            frame([("a", 0, 11.0, 0.0, 64, 0), ("a", 1, 10.0, 5.0, 64, 0)]),
        ],
    )
    assert decisions[1] == ()
    assert state_frame(state).loc["a", "last_time"] == 10.0


def test_several_generations_in_one_pass_are_decided_in_order() -> None:
    params = ThresholdParams(allocated_bytes=MIB)
    samples = frame(
        [
            ("a", 1, 20.0, 15.0, 64, 0), ("a", 0, 10.0, 0.0, 64, 0), ("b", 0, 10.0, 0.0, 4, 0),
            ("a", 0, 12.0, 0.0, 64, 0), ("a", 2, 30.0, 25.0, 4, 0),
        ]
    )
    (decisions,), state = run(params, [samples])
    assert [(d.instance, d.generation, d.action, d.time) for d in decisions] == [
        ("a", 0, "restart", 10.0), ("b", 0, "keep", 10.0), ("a", 1, "restart", 20.0),
        ("a", 2, "keep", 30.0),
    ]
    assert state_frame(state).loc["a", "generation"] == 2


def test_state_is_an_immutable_value() -> None:
    params = RatioParams(estimator=EstimatorParams(measure_s=60))
    samples = synthetic_samples(ttl=30, k=16, rate=40, duration=200, seed=1)
    (_, state) = run(params, [samples.iloc[:100]])
    before = samples.copy()
    first, after = decide(state, samples.iloc[100:], 5.0, params)
    second, _ = decide(state, samples.iloc[100:], 5.0, params)
    assert first == second  # the old state still gives the same answer
    pd.testing.assert_frame_equal(samples, before)
    with pytest.raises(ValueError, match="read-only"):
        state.slots.k[0] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.policy = "none"  # type: ignore[misc]


def test_state_of_another_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="policy 'fixed', not 'ratio'"):
        decide(initial_state(FixedParams()), frame([]), 0.0, RatioParams())


def test_missing_columns_are_named() -> None:
    with pytest.raises(ValueError, match="outbound"):
        decide(initial_state(NoneParams()), frame([]).drop(columns=["outbound"]), 0.0, NoneParams())


def test_history_rows_stay_sorted_by_instance_then_time() -> None:
    """Rows appended after every other row, and into the middle (an earlier instance)."""
    h = History.empty("pages")
    h = h.append(np.array([0, 1]), np.array([1.0, 1.0]), {"pages": np.array([1.0, 2.0])})
    h = h.append(np.array([0]), np.array([2.0]), {"pages": np.array([3.0])})
    h = h.append(np.array([1, 2]), np.array([2.0, 2.0]), {"pages": np.array([4.0, 5.0])})
    assert h.slot.tolist() == [0, 0, 1, 1, 2]
    assert h.time.tolist() == [1.0, 2.0, 1.0, 2.0, 2.0]
    assert h.values["pages"].tolist() == [1.0, 3.0, 2.0, 4.0, 5.0]
    assert h.slot.dtype == np.int64 and not h.time.flags.writeable
    assert h.append(np.array([], dtype=np.int64), np.array([]), {"pages": np.array([])}) is h


def test_slots_updated_leaves_the_old_value_alone() -> None:
    before = Slots.empty().grown(["a", "b"])
    after = before.updated(np.array([1]), k=5.0, generation=3)
    assert np.isnan(before.k).all() and before.generation.tolist() == [-1, -1]
    assert after.k[1] == 5.0 and np.isnan(after.k[0]) and after.generation.tolist() == [-1, 3]
    assert after.names == ("a", "b") and dict(after.slot_of) == {"a": 0, "b": 1}
    assert after.ttl is before.ttl  # what did not change is shared
    with pytest.raises(ValueError):
        after.k[0] = 1.0  # read-only: the state is shared between values


def test_empty_pass() -> None:
    decisions, state = decide(initial_state(RatioParams()), frame([]), 0.0, RatioParams())
    assert decisions == () and state_frame(state).empty


def test_decisions_frame() -> None:
    samples = frame([("a", 0, 1.0, 0.0, 1024, 0)])
    (decisions,), _ = run(ThresholdParams(), [samples])
    df = decisions_frame(decisions)
    assert df.loc[0, "action"] == "restart" and df.loc[0, "decided_at"] == 1000.0
    assert {"required_bytes", "surplus_bytes", "baseline_bytes", "reason"} <= set(df.columns)
    assert decisions[0].to_record()["instance"] == "a"


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------

POLICIES: list[PolicyParams] = [
    NoneParams(),
    FixedParams(uptime_s=30),
    ThresholdParams(allocated_bytes=20 * 65536),
    RatioParams(estimator=EstimatorParams(measure_s=40, ttl_cap_s=20, trend_window_s=5)),
    RatioParams(
        estimator=EstimatorParams(measure_s=40, ttl_cap_s=20, trend_window_s=5),
        trend_noise_z=0.0, trend_min_pages=0.0, require_turn=True,
    ),
    OracleParams(min_reclaim_bytes=65536, window_s=5),
    AdaptiveParams(call_cost_page_s=1.0, horizon_s=100.0, min_free_pages=1.0, budget_share=0.5,
                   estimator=EstimatorParams(measure_s=40, ttl_cap_s=20, trend_window_s=5)),
]


@st.composite
def sample_frames(draw: st.DrawFn) -> pd.DataFrame:
    """Random samples of 1–3 instances, with restarts (new generations) now and then."""
    rows = []
    for instance in ("a", "b", "c")[: draw(st.integers(1, 3))]:
        t, generation, started, out, pages = draw(st.floats(0, 5)), 0, 0.0, 0, 4
        for gap, d_out, d_pages, restart in draw(
            st.lists(
                st.tuples(st.floats(0.5, 8), st.integers(0, 40), st.integers(0, 2), st.booleans()),
                min_size=1, max_size=60,
            )
        ):
            t += gap
            if restart and draw(st.integers(0, 9)) == 0:
                generation, started, out, pages = generation + 1, t - gap / 2, 0, 4
            out, pages = out + d_out, pages + d_pages
            live = min(out, draw(st.integers(0, 500)))
            rows.append((instance, generation, t, started, pages, out, live * 1024.0))
    df = pd.DataFrame(rows, columns=[*COLUMNS[:5], "outbound", "live_bytes"])
    return df.assign(allocated_bytes=df["allocated_pages"] * 65536, requests=df["outbound"])


def split(samples: pd.DataFrame, cuts: list[int]) -> list[pd.DataFrame]:
    ordered = samples.sort_values("time", kind="mergesort")
    bounds = sorted({0, len(ordered), *(c % (len(ordered) + 1) for c in cuts)})
    return [ordered.iloc[a:b] for a, b in itertools.pairwise(bounds)]


# Derandomized: CI runs the same 60 examples every time. Random runs find what these do not
# (the pass-split counterexample below came from one): to search, run the property with
# `derandomize=False` and a few thousand examples.
PROPERTY = settings(
    deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)


@PROPERTY
@given(samples=sample_frames(), cuts=st.lists(st.integers(0, 200), max_size=8),
       which=st.integers(0, len(POLICIES) - 1))
def test_never_two_restarts_of_a_generation_in_a_pass(
    samples: pd.DataFrame, cuts: list[int], which: int
) -> None:
    params = POLICIES[which]
    decisions, _ = run(params, split(samples, cuts))
    for made in decisions:
        keys = Counter((d.instance, d.generation) for d in made)
        assert max(keys.values(), default=0) == 1  # one decision per generation and pass
        for d in (d for d in made if d.policy == "ratio"):  # the oracle reports ground truth
            assert d.required_pages is None or d.required_pages <= d.allocated_pages + 1e-9
            assert d.surplus_pages is None or d.surplus_pages >= -1e-9


@PROPERTY
@given(samples=sample_frames(), cuts=st.lists(st.integers(0, 200), max_size=8),
       which=st.sampled_from([3, 4]))
def test_no_ratio_decision_before_the_measurement_period_ends(
    samples: pd.DataFrame, cuts: list[int], which: int
) -> None:
    params = POLICIES[which]
    assert isinstance(params, RatioParams)
    first_seen = samples.groupby("instance")["time"].min()
    decisions, _ = run(params, split(samples, cuts))
    for d in (d for made in decisions for d in made):
        if d.time < first_seen[d.instance] + params.estimator.measure_s:
            assert d.action == "keep" and "measuring" in d.reason


# Found by the property below (a random run): adaptive refits k and the TTL at the first pass
# that reaches the end of the fitting window (t = 40 here), and applied the refit to the whole
# pass, so the sample at 30 s was judged with k 63 one row at a time (restart at 30 s) and with
# the refitted k 29 when 30 s and 50 s came in one pass (no restart until 35 s).
REFIT_MID_PASS = frame([("a", 0, float(t), 0.0, p, o) for t, p, o in (
    (10, 7, 47), (25, 15, 254), (30, 15, 275), (35, 17, 335), (50, 17, 378))]).assign(
    requests=lambda d: d["outbound"])  # every request a miss: no extra calls, no budget


@PROPERTY
@given(samples=sample_frames(), cuts=st.lists(st.integers(0, 200), max_size=8),
       which=st.integers(0, len(POLICIES) - 1))
@example(samples=REFIT_MID_PASS, cuts=[], which=6)
def test_restarts_do_not_depend_on_how_samples_are_split_into_passes(
    samples: pd.DataFrame, cuts: list[int], which: int
) -> None:
    params = dataclasses.replace(POLICIES[which], retry_after_s=1e9)  # one restart a generation
    one_by_one, _ = run(params, [samples.iloc[[i]] for i in range(len(samples))])
    chunked, _ = run(params, split(samples, cuts))
    everything, _ = run(params, [samples])
    flat = [sorted(restarts([d for made in r for d in made])) for r in (one_by_one, chunked)]
    assert flat[0] == flat[1] == sorted(restarts(everything[0]))


# ----------------------------------------------------------------------------------------------
# parse_policy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", NoneParams()),
        ("fixed:30m", FixedParams(uptime_s=1800)),
        ("fixed:2h", FixedParams(uptime_s=7200)),
        ("fixed:90", FixedParams(uptime_s=90)),
        ("fixed:uptime=1.5h,retry_after=2m", FixedParams(uptime_s=5400, retry_after_s=120)),
        ("threshold:64MiB", ThresholdParams(allocated_bytes=64 * MIB)),
        ("threshold:100MB", ThresholdParams(allocated_bytes=100_000_000)),
        ("threshold: 512 KiB", ThresholdParams(allocated_bytes=512 * 1024)),
        ("ratio", RatioParams()),
        ("Ratio:measure=15m,ttl_cap=10m", RatioParams()),
        (
            "ratio:measure=20m,ttl_cap=5m,trend_window=2m,trend_z=0,require_turn=yes",
            RatioParams(
                estimator=EstimatorParams(measure_s=1200, ttl_cap_s=300, trend_window_s=120),
                trend_noise_z=0.0, require_turn=True,
            ),
        ),
        ("ratio:first_restart=false,class_width=2,k_default=60", RatioParams(
            estimator=EstimatorParams(class_width_pages=2, k_default=60),
            first_decision_restarts=False,
        )),
        ("oracle", OracleParams()),
        ("adaptive", AdaptiveParams()),
        ("adaptive:mode=warm", AdaptiveParams(restart_mode="warm")),
        ("fixed:30m,mode=warm", FixedParams(uptime_s=1800, restart_mode="warm")),
        ("adaptive:call_cost=3600,horizon=2h,budget=0.02,min_free=1,backoff=3,min_uptime=2,"
         "ttl_cap=5m,mode=cold", AdaptiveParams(
            call_cost_page_s=3600, horizon_s=7200, budget_share=0.02, min_free_pages=1,
            backoff=3, min_uptime_ttls=2, estimator=EstimatorParams(ttl_cap_s=300),
        )),
        ("oracle:surplus_ratio=2,min_reclaim=4MiB,window=30s", OracleParams(
            surplus_ratio=2, min_reclaim_bytes=4 * MIB, window_s=30,
        )),
    ],
)
def test_parse_policy(spec: str, expected: PolicyParams) -> None:
    assert parse_policy(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "unknown policy ''; expected one of none, fixed, threshold, ratio, oracle"),
        ("lru", "unknown policy 'lru'"),
        ("fixed", "fixed needs a value, e.g. fixed:30m"),
        ("fixed:", "fixed needs a value"),
        ("fixed:30 minutes", "'30 minutes' is not a duration"),
        ("fixed:-5m", "is not a duration"),
        ("fixed:0s", "uptime_s must be a positive number"),
        ("threshold", "threshold needs a value, e.g. threshold:64MiB"),
        ("threshold:64M", "'64M' is not a size"),
        ("threshold:lots", "is not a size"),
        ("none:5m", "expected key=value, got '5m'"),
        ("none:retry_after=1m,uptime=3m", "none takes retry_after, mode; not 'uptime'"),
            ("fixed:1h,mode=lukewarm", "restart_mode must be one of cold, warm"),
            ("adaptive:budget=0", "budget_share must be a positive number"),
        ("ratio:measure", "expected key=value"),
        ("ratio:ttl=10m", "ratio takes measure, ttl_cap"),
        ("ratio:measure=0m", "measure_s must be a positive number"),
        ("ratio:measure=5m,measure=6m", "measure given twice"),
        ("ratio:require_turn=maybe", "'maybe' is not a boolean"),
        ("oracle:surplus_ratio=-1", "surplus_ratio must be a positive number"),
    ],
)
def test_parse_policy_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        parse_policy(spec)
    assert repr(spec) in str(e.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("15min", 900), ("2h", 7200), ("1.5d", 129600),
     ("500ms", 0.5), (" 10 m ", 600)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("4096B", 4096), ("1KiB", 1024), ("1.5MiB", 1572864), ("1GiB", 2**30),
     ("1kb", 1000), ("2GB", 2 * 10**9)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


# ----------------------------------------------------------------------------------------------
# adaptive: the cost model on host-visible data
# ----------------------------------------------------------------------------------------------

ADAPTIVE = AdaptiveParams(call_cost_page_s=100.0, horizon_s=1000.0, min_free_pages=2.0,
                          budget_share=0.01, budget_pricing=False)


def test_refetched_is_the_expected_share_of_live_entries_asked_for_again() -> None:
    n = np.array([64.0, 64.0, 64.0, 64.0, 0.0, 64.0])
    h = np.array([0.0, 1.0, 32.0, 1e6, 10.0, math.nan])
    c = refetched(n, h)
    assert c[0] == 0.0 and c[4] == 0.0 and math.isnan(c[5])  # no hits, no entries; unknown
    assert c[1] == pytest.approx(0.5, rel=0.01)  # few hits: about half of them (B2)
    # 32 hits on 64 entries: x = 0.5, 64 · (0.5 + e^−0.5 − 1)/0.5
    assert c[2] == pytest.approx(64 * (0.5 + math.expm1(-0.5)) / 0.5)
    assert c[3] == pytest.approx(64.0, rel=1e-4)  # every entry is hit: all of them
    assert (c[:5] <= np.minimum(n, h)[:5]).all()


# 64 live entries, 32 hits in the last ttl: C = 64 · (0.5 + e^−0.5 − 1)/0.5 ≈ 13.6 extra calls.
@pytest.mark.parametrize(
    ("uptime", "pages", "entries", "before", "hits", "new", "spent", "restart"),
    [
        # traffic stopped: a fresh instance grows to 2 + 13.6/32 ≈ 2.4 pages, frees 7.6 pages
        # × 1000 s ≥ 13.6 calls × 100
        (1000, 10, 64, 64, 32, 0, 0, True),
        # steady traffic: the fresh instance regrows the 64 new entries too (4.4 pages)
        (1000, 10, 64, 64, 32, 64, 0, True),
        (1000, 5, 64, 64, 32, 64, 0, False),
        # the cache it drops costs more than it frees: 5000 hits make C ≈ 63.2 calls × 100 = 6,320
        # > (10 − 2 − 63.2/32 ≈ 6.03 pages) × 1000
        (1000, 10, 64, 64, 5000, 0, 0, False),
        (1000, 12, 64, 64, 5000, 0, 0, True),
        # no hits: nothing is asked for again, any surplus is free to take
        (1000, 5, 64, 64, 0, 0, 0, True),
        # live entries rising: the cache is refilling, wait
        (1000, 10, 64, 60, 32, 0, 0, False),
        # younger than one ttl (600 s)
        (500, 10, 64, 64, 32, 0, 0, False),
        # frees less than min_free_pages
        (1000, 3, 64, 64, 32, 0, 0, False),
        # budget: 1% of 10,000 calls = 100; 90 spent leaves 10 < 13.6
        (1000, 10, 64, 64, 32, 0, 90, False),
        (1000, 10, 64, 64, 32, 0, 80, True),
        # missing numbers fail
        (1000, 10, math.nan, 64, 32, 0, 0, False),
    ],
)
def test_adaptive_rule_table(
    uptime: float, pages: float, entries: float, before: float, hits: float, new: float,
    spent: float, restart: bool,
) -> None:
    def a(x: float) -> np.ndarray:
        return np.array([x], dtype=np.float64)

    got = adaptive_rule(
        uptime=a(uptime), pages=a(pages), entries=a(entries), entries_before=a(before),
        hits=a(hits), new_entries=a(new), start_pages=2.0, k=32.0, ttl=600.0, horizon=1000.0,
        spent=spent, outbound_total=10_000.0, params=ADAPTIVE,
    )
    assert bool(got.restart[0]) is restart


@pytest.mark.parametrize(("spent", "restart"), [(0.0, True), (35.0, False)])
def test_budget_pricing_makes_calls_cheap_while_the_budget_is_unused(
    spent: float, restart: bool,
) -> None:
    # 5000 hits on 64 live entries: C ≈ 63.2 calls. At the full price of 100 page·s a call
    # (6,318) the restart is not worth the 6.03 pages × 1000 s = 6,026 it frees. Priced by the
    # share of the budget (1% of 10,000 calls = 100) spent once it is made, it is while the
    # budget is unused (63.2%: 3,992), and not once 35 calls are spent (98.2%: 6,203), though
    # the 65 calls left would still pay for it.
    def a(x: float) -> np.ndarray:
        return np.array([x], dtype=np.float64)

    common = dict(uptime=a(1000.0), pages=a(10.0), entries=a(64.0), entries_before=a(64.0),
                  hits=a(5000.0), new_entries=a(0.0), start_pages=2.0, k=32.0, ttl=600.0,
                  horizon=1000.0, spent=spent, outbound_total=10_000.0)
    full = adaptive_rule(**common, params=ADAPTIVE)  # type: ignore[arg-type]
    priced = adaptive_rule(**common, params=dataclasses.replace(  # type: ignore[arg-type]
        ADAPTIVE, budget_pricing=True))
    assert not bool(full.restart[0])
    c = float(priced.extra_calls[0])
    assert float(priced.cost[0]) == pytest.approx(c * 100.0 * (spent + c) / 100.0)
    assert bool(priced.restart[0]) is restart


def test_closed_loop_adaptive_restarts_once_after_the_sale() -> None:
    params = parse_policy("adaptive:ttl_cap=2m,measure=5m,call_cost=20,horizon=10m,budget=0.05")
    made, samples = closed_loop(params, sale_traffic(), 1500)
    times = [d.time for d in made if d.action == "restart"]
    # no unconditional first restart, nothing while the sale builds up, one as the cache drains
    assert times and 900 <= times[0] <= 1100
    # Its sessions are short, so the first restart caused far fewer calls than the estimate;
    # any later one is priced with what was measured (B2).
    later = [d for d in made if d.action == "restart"][1:]
    assert all("as measured" in d.reason for d in later)
    _, none_samples = closed_loop(NoneParams(), sale_traffic(), 1500)
    tail = slice(1200, None)
    assert samples["allocated_pages"].iloc[tail].mean() < 0.5 * none_samples[
        "allocated_pages"
    ].iloc[tail].mean()
    # k and the TTL relearned from the first generation's growth (true: 32 entries/page, 120 s)
    restart = next(d for d in made if d.action == "restart")
    assert restart.k is not None and restart.ttl_s is not None
    assert abs(restart.k - 32) < 4 and abs(restart.ttl_s - 120) <= 15


def test_adaptive_without_budget_does_not_restart() -> None:
    params = parse_policy("adaptive:ttl_cap=2m,measure=5m,call_cost=20,horizon=10m,budget=1e-6")
    made, _ = closed_loop(params, sale_traffic(), 1500)
    assert not [d for d in made if d.action == "restart"]


def test_warm_adaptive_restarts_where_cold_adaptive_would_not() -> None:
    # A cache too valuable to drop cold (many hits on live entries) is no cost to a warm restart.
    def a(x: float) -> np.ndarray:
        return np.array([x], dtype=np.float64)

    common = dict(uptime=a(700.0), pages=a(40.0), entries=a(600.0), entries_before=a(600.0),
                  hits=a(5000.0), new_entries=a(600.0), start_pages=2.0, k=32.0, ttl=600.0,
                  horizon=1000.0, spent=0.0, outbound_total=1000.0)
    cold = adaptive_rule(**common, params=ADAPTIVE)  # type: ignore[arg-type]
    warm = adaptive_rule(**common, params=dataclasses.replace(  # type: ignore[arg-type]
        ADAPTIVE, restart_mode="warm"))
    assert not bool(cold.restart[0]) and float(cold.extra_calls[0]) == pytest.approx(528.0, abs=0.1)
    assert bool(warm.restart[0]) and float(warm.extra_calls[0]) == 0.0
    rising = adaptive_rule(**{**common, "entries_before": a(500.0)}, params=dataclasses.replace(  # type: ignore[arg-type]
        ADAPTIVE, restart_mode="warm"))
    assert not bool(rising.restart[0])  # still not while the cache refills


def _adaptive_state(params: AdaptiveParams, samples: pd.DataFrame) -> pd.DataFrame:
    _, state = run(params, [samples])
    return state_frame(state)


@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "pass-per-row"])
def test_adaptive_backs_off_when_memory_regrows_within_a_ttl(split: bool) -> None:
    params = AdaptiveParams(call_cost_page_s=1.0, horizon_s=1000.0,
                            estimator=EstimatorParams(ttl_cap_s=100, measure_s=1e6))
    # Generation 0: grows from 4 to 30 pages, then idles for long enough: a restart.
    gen0 = [("a", 0, float(t), 0.0, 4 if t == 10 else 30, 10) for t in range(10, 400, 10)]
    decisions, state = run(params, [frame(gen0)])
    (restart,) = restarts(decisions[0])
    assert restart[1] == 0
    # Generation 1 is back at 30 pages 50 s after the restart (< one ttl of 100 s). Its later
    # samples (older than a ttl) do not undo the back-off, however the samples come in.
    gen1 = [("a", 1, 400.0 + t, 400.0, 30 if t >= 50 else 4, 300 + t) for t in range(10, 200, 10)]
    passes = [frame([row]) for row in gen1] if split else [frame(gen1)]
    _, state = run(params, passes, state)
    assert state_frame(state).loc["a", "horizon"] == pytest.approx(500.0)
    # A restart of generation 1 by someone else is not checked: the horizon stays.
    gen2 = [("a", 2, 1000.0 + t, 1000.0, 4, 5) for t in range(10, 300, 10)]
    _, state2 = run(params, [frame(gen2)], state)
    assert state_frame(state2).loc["a", "horizon"] == pytest.approx(500.0)
    # Ours that held (nothing regrew within a ttl) doubles the horizon back, up to horizon_s.
    ours = state.slots.updated(np.array([0]), asked_at=990.0, pre_pages=30.0)
    _, state3 = run(params, [frame(gen2)], dataclasses.replace(state, slots=ours))
    assert state_frame(state3).loc["a", "horizon"] == pytest.approx(1000.0)


@pytest.mark.parametrize(
    ("seen", "estimated", "scale"),
    [(0.0, 0.0, 1.0), (30.0, 100.0, 0.3), (0.0, 100.0, 0.1), (250.0, 100.0, 1.0)],
)
def test_refetch_scale_is_the_share_of_the_estimate_seen_within_its_bounds(
    seen: float, estimated: float, scale: float,
) -> None:
    assert float(refetch_scale(np.array([seen]), np.array([estimated]))[0]) == pytest.approx(scale)


CALIBRATED = AdaptiveParams(call_cost_page_s=1.0, horizon_s=1000.0, budget_share=1.0,
                            estimator=EstimatorParams(ttl_cap_s=100, measure_s=1e6,
                                                      trend_window_s=50))
# Generation 0: 1 call/s (and as many hits) from t = 0, 30 pages from its second sample.
GEN0 = [("a", 0, float(t), 0.0, 4 if t == 10 else 30, t) for t in range(10, 400, 10)]


def _gen1(start: float, refetched: int) -> list[tuple[Any, ...]]:
    """The next generation: the same 1 call/s, plus ``refetched`` calls in its first 50 s; it
    stays at 4 pages (nothing to restart for)."""
    return [("a", 1, start + u, start, 4, u + (refetched if u >= 50 else 0))
            for u in range(10, 300, 10)]


@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "pass-per-row"])
def test_adaptive_counts_the_calls_its_restart_caused(split: bool) -> None:
    decisions, state = run(CALIBRATED, [frame(GEN0)])
    (restart,) = [d for d in decisions[0] if d.action == "restart"]
    slots = state_frame(state).loc["a"]
    # charged C at the restart: 100 live entries and 100 hits in the last ttl
    c = float(refetched(np.array([100.0]), np.array([100.0]))[0])
    assert slots["check_c"] == pytest.approx(c) and slots["spent"] == pytest.approx(c)
    # 20 calls more than the traffic's own in its first ttl, 100 in the second: 20 seen
    start = restart.time + 5.0
    gen1 = _gen1(start, 20)
    passes = [frame([row]) for row in gen1] if split else [frame(gen1)]
    _, state = run(CALIBRATED, passes, state)
    slots = state_frame(state).loc["a"]
    assert slots["refetch_seen"] == pytest.approx(20.0)
    assert slots["refetch_estimated"] == pytest.approx(c)
    assert slots["spent"] == pytest.approx(20.0)  # the calls seen replace the estimate
    assert math.isnan(slots["check_c"])  # counted once
    assert float(refetch_scale(np.array([20.0]), np.array([c]))[0]) == pytest.approx(20.0 / c)


def test_adaptive_counts_nothing_after_a_restart_not_its_own() -> None:
    _, state = run(dataclasses.replace(CALIBRATED, budget_share=1e-9), [frame(GEN0)])
    _, state = run(CALIBRATED, [frame(_gen1(400.0, 20))], state)
    slots = state_frame(state).loc["a"]
    assert slots["refetch_seen"] == 0.0 and slots["refetch_estimated"] == 0.0


def test_adaptive_prices_calls_by_what_its_restarts_caused() -> None:
    # The same state, once with no restart counted and once with restarts that caused a fifth
    # of their estimate: the second charges a fifth of the calls for the same restart.
    def a(x: float) -> np.ndarray:
        return np.array([x], dtype=np.float64)

    common = dict(uptime=a(1000.0), pages=a(10.0), entries=a(64.0), entries_before=a(64.0),
                  hits=a(5000.0), new_entries=a(0.0), start_pages=2.0, k=32.0, ttl=600.0,
                  horizon=1000.0, spent=0.0, outbound_total=10_000.0, params=ADAPTIVE)
    plain = adaptive_rule(**common)  # type: ignore[arg-type]
    scaled = adaptive_rule(**common, refetch_scale=refetch_scale(a(20.0), a(100.0)))  # type: ignore[arg-type]
    assert float(scaled.extra_calls[0]) == pytest.approx(0.2 * float(plain.extra_calls[0]))
    assert not bool(plain.restart[0]) and bool(scaled.restart[0])


def test_adaptive_start_pages_are_the_least_first_sample() -> None:
    params = AdaptiveParams()
    samples = frame([("a", 0, 10.0, 0.0, 3, 0), ("a", 1, 20.0, 15.0, 5, 100),
                     ("a", 2, 30.0, 25.0, 4, 50)])
    assert _adaptive_state(params, samples).loc["a", "start_pages"] == 3


def test_adaptive_never_reads_ground_truth() -> None:
    samples = synthetic_samples(ttl=120, k=32, rate=80, duration=1200, jitter="poisson", seed=9)
    garbage = samples.assign(live_entries=-1, live_bytes=-1.0)
    params = AdaptiveParams(estimator=EstimatorParams(measure_s=300))
    chunks = [slice(i, i + 50) for i in range(0, len(samples), 50)]
    a, _ = run(params, [samples.iloc[c] for c in chunks])
    b, _ = run(params, [garbage.iloc[c] for c in chunks])
    assert a == b


@pytest.mark.parametrize("spec", ["adaptive", "ratio:measure=5m,ttl_cap=2m", "fixed:10m"])
def test_decide_reads_a_mapping_of_columns_as_it_reads_a_frame(spec: str) -> None:
    samples = synthetic_samples(ttl=120, k=32, rate=80, duration=1200, jitter="poisson", seed=3)
    params = parse_policy(spec)
    chunks = [samples.iloc[i:i + 40] for i in range(0, len(samples), 40)]
    as_frames, _ = run(params, chunks)
    as_columns, _ = run(params, [
        {name: c[name].to_numpy() if name != "instance" else tuple(c[name]) for name in c.columns}
        for c in chunks
    ])  # type: ignore[list-item]
    assert as_frames == as_columns
    assert all(len(d) == 1 for d in as_frames)  # a decision a pass, the same ones


def _declining_after_a_stop(hits_per_step: int) -> pd.DataFrame:
    """One generation: 10 new entries every 10 s until t = 300 s, then none; 4 pages at first,
    6 from 20 s on. `hits_per_step` requests without an outbound call every 10 s after 300 s."""
    rows = []
    for t in range(10, 400, 10):
        outbound = 10 * min(t, 300) // 10
        requests = outbound + hits_per_step * max(t - 300, 0) // 10
        pages = 4 if t == 10 else 6
        rows.append(("a", 0, float(t), 0.0, pages, pages * 65536, requests, outbound))
    return pd.DataFrame(rows, columns=COLUMNS)


@pytest.mark.parametrize(("hits_per_step", "mode"), [(0, "cold"), (50, "warm")])
def test_warm_adaptive_runs_a_restart_cold_when_nobody_uses_the_cache(
        hits_per_step: int, mode: str) -> None:
    # As the traffic stops, a cold restart frees more than a warm one (the live entries too).
    # With no hit it costs no call, within the small cold budget: it runs cold. With many hits
    # the cache is worth keeping: the restart runs warm (B8).
    params = AdaptiveParams(restart_mode="warm", call_cost_page_s=1.0, horizon_s=1000.0,
                            cold_budget_share=0.01,
                            estimator=EstimatorParams(ttl_cap_s=100, measure_s=1e6))
    (decisions,), _ = run(params, [_declining_after_a_stop(hits_per_step)])
    (restart,) = [d for d in decisions if d.action == "restart"]
    assert restart.mode == mode and 300 < restart.time < 400
    assert ("cold: frees more than warm" in restart.reason) is (mode == "cold")
    # A cold policy says nothing about the mode: the proxy's wasm_restart_mode decides.
    cold_decisions, _ = run(dataclasses.replace(params, restart_mode="cold"),
                            [_declining_after_a_stop(hits_per_step)])
    assert all(d.mode is None for d in cold_decisions[0])


def test_warm_adaptive_without_a_cold_budget_always_runs_warm() -> None:
    params = AdaptiveParams(restart_mode="warm", call_cost_page_s=1.0, horizon_s=1000.0,
                            cold_budget_share=0.0,
                            estimator=EstimatorParams(ttl_cap_s=100, measure_s=1e6))
    (decisions,), _ = run(params, [_declining_after_a_stop(0)])
    assert {d.mode for d in decisions if d.action == "restart"} == {"warm"}
    assert parse_policy("adaptive:mode=warm,cold_budget=0").cold_budget_share == 0.0
    with pytest.raises(ValueError, match="cold_budget_share must be ≥ 0"):
        parse_policy("adaptive:mode=warm,cold_budget=-1")


def test_adaptive_takes_the_ttl_the_host_sees() -> None:
    # The host's refetch interval (B9) replaces the default TTL from the first row that has
    # one, at most the cap, and is carried to later rows, passes and generations without one.
    params = AdaptiveParams(estimator=EstimatorParams(ttl_cap_s=600, measure_s=1e6))
    interval = [math.nan, math.nan, 120.0, math.nan, math.nan, 900.0, math.nan]
    rows = [("a", 0, 100.0 * (i + 1), 0.0, 4, 10 * i) for i in range(len(interval))]
    other = [("b", 0, 100.0 * (i + 1), 0.0, 4, 10 * i) for i in range(len(interval))]
    passes = [frame([a, b], refetch_interval_s=[x, math.nan])
              for a, b, x in zip(rows, other, interval, strict=True)]
    decisions, state = run(params, passes)
    assert [{d.instance: d.ttl_s for d in ds} for ds in decisions] == [
        {"a": ttl, "b": 600.0} for ttl in (600.0, 600.0, 120.0, 120.0, 120.0, 600.0, 600.0)]
    # One pass of all the rows ends in the same state.
    _, one = run(params, [pd.concat(passes, ignore_index=True)])
    assert state_frame(one).loc["a", "ttl_refetched"] == 600.0
    assert np.isnan(state_frame(one).loc["b", "ttl_refetched"])
    # The next generation has repeated nothing yet: it keeps what the host saw last, also
    # from a proxy that does not send the column.
    _, state = run(params, passes[:3])
    for later in (frame([("a", 1, 900.0, 850.0, 4, 5)], refetch_interval_s=[None]),
                  frame([("a", 1, 900.0, 850.0, 4, 5)])):
        (d,) = run(params, [later], state)[0][0]
        assert d.ttl_s == 120.0


def test_ratio_ignores_the_refetch_interval() -> None:
    # The paper's rule stays the paper's: the same decisions with or without the column.
    rows = [("a", 0, float(t), 0.0, 4 if t < 300 else 20, t) for t in range(10, 2000, 10)]
    plain, _ = run(RatioParams(), [frame(rows)])
    seen, _ = run(RatioParams(), [frame(rows, refetch_interval_s=[30.0] * len(rows))])
    assert [d.to_record() for d in plain[0]] == [d.to_record() for d in seen[0]]
