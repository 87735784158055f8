"""Tests of manager.estimate: k, TTL, N(t), required/surplus and the baseline.

Synthetic samples come from a small model of the reference filter (dlmalloc-like): entries arrive
at some rate (each is one outbound call and one cache entry), live entries are the arrivals of the
last TTL seconds, freed blocks are reused, so pages = start + ceil(max(peak live so far − slack, 0)
/ k). ``slack`` entries fit in the heap the instance starts with.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manager.estimate import (
    GROUND_TRUTH_COLUMNS,
    OBSERVABLE_COLUMNS,
    EstimatorParams,
    GrowthFit,
    assess,
    baseline_from_entries,
    baselines,
    estimate,
    estimated_entries,
    fit_generations,
    fit_growth,
    generation_lookups,
    measurement_entries,
    observables,
    outbound_at,
)

# ----------------------------------------------------------------------------------------------
# Synthetic samples
# ----------------------------------------------------------------------------------------------


def arrival_times(
    rate: float, duration: float, jitter: str, rng: np.random.Generator
) -> np.ndarray:
    """Arrival times in [0, duration): regular, regular ± half a gap ("uniform"), or Poisson."""
    if jitter == "poisson":
        gaps = rng.exponential(1 / rate, int(rate * duration * 1.3) + 20)
        times = np.cumsum(gaps)
        return times[times < duration]
    times = np.arange(0.0, duration, 1 / rate)
    if jitter == "uniform":
        times = np.sort(times + rng.uniform(-0.5 / rate, 0.5 / rate, len(times)))
    elif jitter != "none":
        raise ValueError(jitter)
    return times[(times >= 0) & (times < duration)]


def sample_times(duration: float, dt: float, uneven: bool, rng: np.random.Generator) -> np.ndarray:
    """Every dt, or at gaps uniform in [dt/2, 3dt/2]."""
    if not uneven:
        return np.arange(0.0, duration + dt / 2, dt)
    gaps = rng.uniform(0.5 * dt, 1.5 * dt, int(duration / dt * 2) + 10)
    times = np.concatenate(([0.0], np.cumsum(gaps)))
    return times[times <= duration]


def model_samples(
    arrivals: np.ndarray,
    times: np.ndarray,
    *,
    ttl: float,
    k: float,
    start: int = 4,
    slack: int = 0,
    instance: str = "i",
    generation: int = 0,
    t0: float = 0.0,
) -> pd.DataFrame:
    """Samples of one generation starting at t0 = 0 of the model (times relative to t0)."""
    arrivals = np.sort(arrivals)
    index = np.arange(len(arrivals))
    live_after = index + 1 - np.searchsorted(arrivals, arrivals - ttl, side="right")
    peak = np.maximum.accumulate(live_after) if len(arrivals) else np.zeros(0, dtype=int)
    done = np.searchsorted(arrivals, times, side="right")  # arrivals so far = O(t)
    peak_now = np.where(done > 0, peak[np.maximum(done - 1, 0)] if len(peak) else 0, 0)
    pages = start + np.ceil(np.maximum(peak_now - slack, 0) / k).astype(np.int64)
    live = done - np.searchsorted(arrivals, times - ttl, side="right")
    return pd.DataFrame(
        {
            "instance": instance,
            "generation": generation,
            "time": t0 + times,
            "started_at": t0,
            "allocated_pages": pages,
            "allocated_bytes": pages * 65536,
            "requests": done * 3,
            "outbound": done,
            "live_entries": live,
            "live_bytes": live * 65536 / k,
        }
    )


def synthetic_samples(
    *,
    ttl: float,
    k: float,
    rate: float,
    duration: float = 900.0,
    dt: float = 1.0,
    start: int = 4,
    slack: int = 0,
    jitter: str = "none",
    uneven: bool = False,
    seed: int = 0,
    instance: str = "i",
    generation: int = 0,
    t0: float = 0.0,
) -> pd.DataFrame:
    """One generation of the model with a constant arrival rate."""
    rng = np.random.default_rng(seed)
    return model_samples(
        arrival_times(rate, duration, jitter, rng),
        sample_times(duration, dt, uneven, rng),
        ttl=ttl, k=k, start=start, slack=slack, instance=instance, generation=generation, t0=t0,
    )


def fit_frame(frame: pd.DataFrame, params: EstimatorParams | None = None) -> GrowthFit:
    return fit_growth(
        frame["time"].to_numpy(float),
        frame["outbound"].to_numpy(float),
        frame["allocated_pages"].to_numpy(float),
        float(frame["started_at"].iloc[0]),
        params or EstimatorParams(),
    )


# ----------------------------------------------------------------------------------------------
# k and TTL
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [120.0, 300.0, 600.0])
@pytest.mark.parametrize("k", [63.0, 32.0, 16.0])
@pytest.mark.parametrize("jitter", ["none", "uniform", "poisson"])
@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven"])
def test_fit_recovers_ttl_and_k(ttl: float, k: float, jitter: str, uneven: bool) -> None:
    # 2.5 pages of growth per second: the page steps resolve the TTL to a sample.
    frame = synthetic_samples(
        ttl=ttl, k=k, rate=2.5 * k, slack=10, jitter=jitter, uneven=uneven, seed=int(ttl + k)
    )
    fit = fit_frame(frame)
    interval = float(np.diff(frame["time"]).max())
    assert fit.ttl_seen and fit.k_seen
    assert abs(fit.ttl - ttl) <= interval
    assert fit.k == pytest.approx(k, rel=0.05)
    assert fit.start_pages == 4


@pytest.mark.parametrize("ttl", [120.0, 300.0, 600.0])
def test_fit_at_a_low_rate_resolves_ttl_to_one_page_step(ttl: float) -> None:
    # 5 entries/s fill a 63-entry page every 12.6 s: the TTL is only known to a page step.
    k, rate = 63.0, 5.0
    fit = fit_frame(synthetic_samples(ttl=ttl, k=k, rate=rate, jitter="poisson", seed=7))
    assert fit.ttl_seen
    assert abs(fit.ttl - ttl) <= k / rate + 1.0
    assert fit.k == pytest.approx(k, rel=0.05)


def test_fit_with_epoch_times_is_the_same() -> None:
    frame = synthetic_samples(ttl=300, k=63, rate=150, jitter="poisson", seed=3)
    shifted = frame.assign(time=frame["time"] + 1.7e9, started_at=1.7e9)
    a, b = fit_frame(frame), fit_frame(shifted)
    assert b.ttl == pytest.approx(a.ttl, abs=1e-6)
    assert b.k == pytest.approx(a.k, rel=1e-9)


def test_ttl_above_the_cap_is_the_cap_and_not_seen() -> None:
    frame = synthetic_samples(ttl=900, k=63, rate=150, duration=900, jitter="poisson", seed=1)
    fit = fit_frame(frame)
    assert (fit.ttl, fit.ttl_seen) == (600.0, False)
    assert fit.k == pytest.approx(63, rel=0.05)
    lower_cap = fit_frame(
        synthetic_samples(ttl=450, k=63, rate=150, jitter="poisson", seed=2),
        EstimatorParams(ttl_cap_s=300),
    )
    assert (lower_cap.ttl, lower_cap.ttl_seen) == (300.0, False)


def test_full_grid_search_agrees_with_coarse_to_fine() -> None:
    frame = synthetic_samples(ttl=333, k=40, rate=100, jitter="poisson", uneven=True, seed=5)
    coarse = fit_frame(frame)
    full = fit_frame(frame, EstimatorParams(ttl_coarse_step_s=None))
    assert coarse.ttl == full.ttl
    assert coarse.k == pytest.approx(full.k)


def test_no_growth_gives_defaults() -> None:
    t = np.arange(0.0, 900.0)
    fit = fit_growth(t, t * 3, np.full_like(t, 5.0), 0.0, EstimatorParams())
    assert (fit.k, fit.k_seen, fit.ttl, fit.ttl_seen, fit.start_pages) == (63.0, False, 600, False, 5)
    empty = fit_growth(np.empty(0), np.empty(0), np.empty(0), 0.0, EstimatorParams())
    assert (empty.k_seen, empty.ttl_seen) == (False, False)


def test_too_little_growth_gives_defaults() -> None:
    # 1 entry/s for 120 s is two pages: k cannot be told from rounding.
    fit = fit_frame(synthetic_samples(ttl=120, k=63, rate=1.0))
    assert (fit.k, fit.k_seen, fit.ttl, fit.ttl_seen) == (63.0, False, 600.0, False)
    custom = fit_frame(
        synthetic_samples(ttl=120, k=63, rate=1.0), EstimatorParams(k_default=60.0)
    )
    assert custom.k == 60.0


@pytest.mark.parametrize(("min_deficit", "seen"), [(2.0, True), (6.0, False)])
def test_expiry_counts_only_past_the_deficit_threshold(min_deficit: float, seen: bool) -> None:
    # One page per second; the data end 3 s after the first expiry: about 2.5 pages of deficit.
    frame = synthetic_samples(ttl=300, k=50, rate=50, duration=303, dt=0.5)
    fit = fit_frame(frame, EstimatorParams(ttl_min_deficit_pages=min_deficit))
    assert fit.ttl_seen is seen
    assert fit.ttl == (pytest.approx(300, abs=0.5) if seen else 600.0)


# ----------------------------------------------------------------------------------------------
# N(t), required, surplus
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "ttl", "expected"),
    [
        (10.0, 5.0, 50.0),  # O(10) − O(5) = 100 − 50
        (10.0, 20.0, 100.0),  # t − ttl before the start: every call since the start counts
        (7.5, 5.0, 50.0),  # linear between samples: 75 − 25
        (12.0, 5.0, 30.0),  # after the last sample O stays 100: 100 − 70
        (-1.0, 5.0, 0.0),  # before the start
    ],
)
def test_estimated_entries(at: float, ttl: float, expected: float) -> None:
    time = np.array([0.0, 5.0, 10.0])
    outbound = np.array([0.0, 50.0, 100.0])
    assert estimated_entries(np.array([at]), time, outbound, ttl)[0] == pytest.approx(expected)


def test_estimated_entries_resets_with_the_generation() -> None:
    # The generation started at 100 with O = 0; its first sample is at 110 with O = 40.
    lookups = generation_lookups(
        np.array([110.0, 120.0]), np.array([40.0, 80.0]), np.array([6.0, 7.0]), 100.0
    )
    outbound_of, pages_of = lookups
    assert outbound_of(np.array([90.0, 100.0, 105.0, 110.0]))[2] == pytest.approx(20.0)
    assert outbound_of(np.array([90.0]))[0] == 0.0
    assert pages_of(np.array([50.0]))[0] == 6.0  # clamped to the first pages


def test_counter_going_backwards_never_gives_negative_entries() -> None:
    n = estimated_entries(np.array([10.0]), np.array([0.0, 5.0, 10.0]), np.array([0, 50, 20.0]), 5)
    assert n[0] == 0.0


def test_assess_required_surplus_and_trend() -> None:
    # k = 10, ttl = 20, window 10, start pages 4. O: +100 per 10 s until t = 20, flat afterwards.
    time = np.array([0.0, 10.0, 20.0, 30.0, 40.0])
    outbound = np.array([0.0, 100.0, 200.0, 200.0, 200.0])
    pages = np.array([4.0, 14.0, 24.0, 24.0, 24.0])
    lookups = generation_lookups(time, outbound, pages, 0.0)
    a = assess(time, pages, *lookups, start_pages=4.0, k=10.0, ttl=20.0, window_s=10.0)
    np.testing.assert_allclose(a.entries, [0, 100, 200, 100, 0])
    np.testing.assert_allclose(a.required, [4, 14, 24, 14, 4])
    np.testing.assert_allclose(a.surplus, [0, 0, 0, 10, 20])
    np.testing.assert_allclose(a.required_change, [0, 10, 10, -10, -10])
    np.testing.assert_allclose(a.surplus_change, [0, 0, 0, 10, 10])
    # σ of the change: √(calls + expiries in the window) / k
    np.testing.assert_allclose(a.required_change_sd, np.sqrt([0, 100, 100, 100, 100]) / 10)


def test_required_is_capped_at_allocated() -> None:
    time = np.array([0.0, 10.0])
    lookups = generation_lookups(time, np.array([0.0, 1000.0]), np.array([4.0, 10.0]), 0.0)
    a = assess(
        time, np.array([4.0, 10.0]), *lookups, start_pages=4.0, k=10.0, ttl=60.0, window_s=5.0
    )
    assert a.required[1] == 10.0  # 4 + 1000/10 would be 104
    assert a.surplus[1] == 0.0


# ----------------------------------------------------------------------------------------------
# Baseline
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "k", "width", "median", "modal", "baseline_pages"),
    [
        # classes of 10: [0,10) [10,20) [20,30); modal class [20,30) → 25; median 20
        ([5, 15, 20, 21, 22, 29, 40], 10.0, 1.0, 21.0, 25.0, 4 + 23.0 / 10),
        # a tie between [0,10) and [20,30) goes to the lower class
        ([1, 2, 21, 22], 10.0, 1.0, 11.5, 5.0, 4 + 8.25 / 10),
        # classes two pages wide: [0,20) [20,40); modal [0,20) → 10
        ([1, 2, 3, 25], 10.0, 2.0, 2.5, 10.0, 4 + 6.25 / 10),
        # nothing measured: the baseline is the start pages
        ([], 10.0, 1.0, 0.0, 0.0, 4.0),
    ],
)
def test_baseline_from_entries(
    entries: list[float], k: float, width: float, median: float, modal: float,
    baseline_pages: float,
) -> None:
    b = baseline_from_entries(
        np.array(entries, dtype=float), 4.0, k, EstimatorParams(class_width_pages=width)
    )
    assert b.median_entries == pytest.approx(median)
    assert b.modal_entries == pytest.approx(modal)
    assert b.pages == pytest.approx(baseline_pages)
    assert b.entries == pytest.approx((median + modal) / 2)


def test_baseline_skip_fill_leaves_out_the_first_ttl() -> None:
    frame = synthetic_samples(ttl=300, k=63, rate=100)
    t, o = frame["time"].to_numpy(float), frame["outbound"].to_numpy(float)
    fit = fit_frame(frame)
    whole = measurement_entries(t, o, 0.0, fit, EstimatorParams())
    skipped = measurement_entries(t, o, 0.0, fit, EstimatorParams(baseline_skip_fill=True))
    assert len(whole) == len(t)
    assert len(skipped) == int((t >= fit.ttl).sum())
    assert skipped.min() == pytest.approx(100 * 300, rel=0.01)  # the plateau only


def test_baseline_of_synthetic_traffic_matches_ground_truth() -> None:
    frame = synthetic_samples(ttl=300, k=63, rate=120, jitter="poisson", seed=11)
    params = EstimatorParams()
    row = baselines(frame, now=math.inf, params=params).iloc[0]
    truth = baseline_from_entries(frame["live_entries"].to_numpy(float), 4.0, 63.0, params)
    assert row["baseline_pages"] == pytest.approx(truth.pages, abs=1.0)
    assert bool(row["measure_complete"])
    # constant traffic: the cache fills for one TTL and then stays at rate × TTL
    assert row["modal_entries"] == pytest.approx(120 * 300, abs=3 * 63)


# ----------------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------------


def two_generations() -> pd.DataFrame:
    first = synthetic_samples(ttl=120, k=32, rate=80, duration=1000, seed=1)
    second = synthetic_samples(
        ttl=120, k=32, rate=40, duration=400, seed=2, generation=1, t0=1000.5
    )
    other = synthetic_samples(ttl=300, k=63, rate=150, duration=950, seed=3, instance="j")
    return pd.concat([second, other, first], ignore_index=True)  # deliberately unsorted


def test_estimate_frame_columns_order_and_no_mutation() -> None:
    frame = two_generations()
    before = frame.copy()
    out = estimate(frame, now=math.inf, params=EstimatorParams())
    pd.testing.assert_frame_equal(frame, before)
    assert list(out.columns[: len(OBSERVABLE_COLUMNS)]) == list(OBSERVABLE_COLUMNS)
    assert not set(GROUND_TRUTH_COLUMNS) & set(out.columns)
    assert len(out) == len(frame)
    keys = out[["instance", "generation", "time"]]
    pd.testing.assert_frame_equal(keys, keys.sort_values(["instance", "generation", "time"]))
    assert (out["required_pages"] <= out["allocated_pages"] + 1e-9).all()
    assert (out["surplus_bytes"] == out["surplus_pages"] * 65536).all()


def test_estimate_each_generation_on_its_own() -> None:
    out = estimate(two_generations(), now=math.inf, params=EstimatorParams())
    gen1 = out[(out["instance"] == "i") & (out["generation"] == 1)]
    # N never counts calls of the previous generation: at the start it is O of the new one.
    assert gen1["estimated_entries"].iloc[0] == gen1["outbound"].iloc[0]
    assert gen1["start_pages"].iloc[0] == gen1["allocated_pages"].iloc[0]
    fits = fit_generations(two_generations(), now=math.inf, params=EstimatorParams())
    assert len(fits) == 3
    j = fits[fits["instance"] == "j"].iloc[0]
    assert j["ttl"] == pytest.approx(300, abs=1) and j["k"] == pytest.approx(63, rel=0.05)
    assert not fits[fits["generation"] == 1]["measure_complete"].iloc[0]


def test_now_cuts_the_samples() -> None:
    frame = two_generations()
    out = estimate(frame, now=500.0, params=EstimatorParams())
    assert out["time"].max() <= 500.0
    assert set(out["instance"]) == {"i", "j"}
    assert estimate(frame, now=-1.0, params=EstimatorParams()).empty
    assert baselines(frame, now=-1.0, params=EstimatorParams()).empty


def test_ground_truth_is_never_read() -> None:
    frame = two_generations()
    rng = np.random.default_rng(0)
    garbage = frame.assign(
        live_entries=rng.integers(-(10**9), 10**9, len(frame)),
        live_bytes=pd.Series(
            [None if x < 0.5 else "not a number" for x in rng.random(len(frame))], dtype=object
        ).to_numpy(),
    )
    params = EstimatorParams()
    for function in (estimate, baselines, fit_generations):
        pd.testing.assert_frame_equal(
            function(frame, math.inf, params), function(garbage, math.inf, params)
        )
    without = frame.drop(columns=list(GROUND_TRUTH_COLUMNS))
    pd.testing.assert_frame_equal(
        estimate(frame, math.inf, params), estimate(without, math.inf, params)
    )
    assert list(observables(garbage).columns) == list(OBSERVABLE_COLUMNS)


def test_observables_names_missing_columns() -> None:
    with pytest.raises(ValueError, match=r"lack column\(s\) generation, started_at, "):
        observables(pd.DataFrame({"instance": ["a"], "time": [0.0]}))


@pytest.mark.parametrize(
    "bad",
    [
        {"measure_s": 0},
        {"ttl_cap_s": -1},
        {"ttl_resolution_s": 0},
        {"ttl_coarse_step_s": math.nan},
        {"k_default": math.inf},
        {"class_width_pages": 0},
        {"trend_window_s": 0},
        {"min_growth_pages": -1},
        {"ttl_min_deficit_pages": math.nan},
    ],
)
def test_params_are_checked(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        EstimatorParams(**bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------

gaps = st.lists(st.floats(0.05, 30.0), min_size=2, max_size=60)


@given(
    gaps=gaps,
    outbound=st.lists(st.integers(-50, 500), min_size=60, max_size=60),
    ttl=st.floats(0.1, 900.0),
    at_shift=st.floats(-100.0, 1000.0),
)
def test_entries_are_never_negative(
    gaps: list[float], outbound: list[int], ttl: float, at_shift: float
) -> None:
    time = np.cumsum(gaps)
    o = np.array(outbound[: len(time)], dtype=float)  # even a counter that goes backwards
    at = np.concatenate((time, time + at_shift))
    assert (estimated_entries(at, time, o, ttl) >= 0).all()
    assert (outbound_at(at, time, np.cumsum(np.abs(o))) >= 0).all()


@settings(deadline=None, max_examples=40)
@given(
    steps=st.lists(
        st.tuples(st.floats(0.2, 20.0), st.integers(0, 400), st.integers(0, 3)),
        min_size=3,
        max_size=120,
    ),
    measure=st.floats(10.0, 900.0),
)
def test_required_never_exceeds_allocated_after_learning(
    steps: list[tuple[float, int, int]], measure: float
) -> None:
    time = np.cumsum([s[0] for s in steps])
    frame = pd.DataFrame(
        {
            "instance": "i",
            "generation": 0,
            "time": time,
            "started_at": 0.0,
            "allocated_pages": 4 + np.cumsum([s[2] for s in steps]),
            "allocated_bytes": 0,
            "requests": 0,
            "outbound": np.cumsum([s[1] for s in steps]),
        }
    )
    out = estimate(frame, math.inf, EstimatorParams(measure_s=measure))
    learned = out[out["time"] >= out["time"].iloc[0] + measure]
    assert (learned["required_pages"] <= learned["allocated_pages"]).all()
    assert (out["surplus_pages"] >= 0).all()
    assert (out["estimated_entries"] >= 0).all()
