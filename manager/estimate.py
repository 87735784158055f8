"""Estimate required and surplus memory of a Wasm instance from what the host can observe.

Paper §3, SPEC §5. The host sees three things per instance: allocated memory P(t) (Wasm pages of
64 KiB), processed requests Q(t) and outbound auth requests O(t). From P and O alone we estimate
(the paper's "request count" in k and in the baseline classes is the outbound count: only a miss
makes an entry; Q is carried along for records but enters no formula) (A1)

- ``k``: entries per page, ΔO/ΔP while the cache only grows;
- ``ttl``: how long a cache entry lives (pages stop following O once old entries expire and the
  allocator reuses their blocks);
- ``N(t) = O(t) − O(t − ttl)``: estimated live entries (推定有効キャッシュ数);
- *required* (必要量) ``R(t) = start + N(t)/k`` pages and *surplus* (余剰量) ``S(t) = P(t) − R(t)``,
  where *start* (the start pages) is what a fresh instance allocates (A5);
- the *baseline* (基準値): the allocation that repeated restarts settle at, from the measurement
  period (first M = 15 min).

Ground truth (``live_entries``, ``live_bytes``) is never read here: :func:`observables` is the only
way samples enter this module and it keeps only :data:`OBSERVABLE_COLUMNS`.

Two layers, one piece of arithmetic:

- array functions (:func:`fit_growth`, :func:`assess`, :func:`baseline_from_entries`, …) work on
  the numpy arrays of one generation; the restart policies (``manager.policies``) call them on
  their incremental per-instance state;
- frame functions (:func:`fit_generations`, :func:`estimate`, :func:`baselines`) apply them to a
  whole samples frame for analysis, plots and tests.

Every choice where the paper is ambiguous is a field of :class:`EstimatorParams`, explained where
it is used and listed in ``manager/AMBIGUITIES.md`` (tagged A1, A2, … in both places).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import pandas as pd

FloatArray = npt.NDArray[np.float64]

WASM_PAGE_BYTES: Final = 65536

#: The only sample columns the estimator may read (paper §3: allocated, requests, outbound, time).
OBSERVABLE_COLUMNS: Final = (
    "instance",
    "generation",
    "time",
    "started_at",
    "allocated_pages",
    "allocated_bytes",
    "requests",
    "outbound",
)

#: Host-visible too, but optional (NaN: not seen yet, or a proxy that does not send it): how
#: long after a 2xx answer the generation repeats an identical outbound call, the filter's
#: cache TTL as the host sees it (`addons.proxywasm.refetch`). The adaptive policy reads it (B9).
OPTIONAL_COLUMNS: Final = ("refetch_interval_s",)

#: Ground truth reported by the filter. Evaluation and the oracle policy only.
GROUND_TRUTH_COLUMNS: Final = ("live_entries", "live_bytes")

# A fit over more (candidate TTL × grid point) cells than this coarsens the TTL grid (A3).
_MAX_FIT_CELLS: Final = 2_000_000


@dataclass(frozen=True, kw_only=True)
class EstimatorParams:
    """Settings of the estimator. Defaults are the paper's values or our documented choices."""

    #: Bytes per page. Wasm pages are 64 KiB; the paper says 16 KB pages (A12).
    page_bytes: int = WASM_PAGE_BYTES
    #: Measurement period M: 15 min = the 10-min maximum TTL plus half a window (paper §3).
    measure_s: float = 900.0
    #: Cap and default of the TTL estimate: 10 min, IBM's auth cache default (paper §3).
    ttl_cap_s: float = 600.0
    #: Step of the candidate TTLs; ``None`` = the median sample interval (A3).
    ttl_resolution_s: float | None = None
    #: Coarse step of the TTL search; the best coarse TTL is refined at full resolution.
    #: ``None`` searches every step (slower, same answer when the fit has one minimum) (A3).
    ttl_coarse_step_s: float | None = 10.0
    #: Pages must grow at least this much less than the outbound calls imply before expiry counts
    #: as seen; below it the TTL is "not seen" and defaults to the cap (A2).
    ttl_min_deficit_pages: float = 2.0
    #: Pages of growth needed before k and the TTL can be estimated: with g pages of growth the
    #: page rounding alone makes k uncertain by about 1/g (A4).
    min_growth_pages: float = 8.0
    #: k when growth was not seen: 65536 / (1024 + 16) ≈ 63 entries of 1 KiB plus dlmalloc's
    #: header per page (the reference filter) (A4).
    k_default: float = 63.0
    #: Baseline class width in pages; classes are [i·w·k, (i+1)·w·k) outbound calls (A7).
    class_width_pages: float = 1.0
    #: Leave the first TTL of the measurement period (the cache still filling) out of the
    #: baseline statistics. The paper takes the whole period (全体の中央値) (A8).
    baseline_skip_fill: bool = False
    #: Trend window L: "required falls" / "surplus rises" compare t with t − L (A9).
    trend_window_s: float = 60.0

    def __post_init__(self) -> None:
        positive = {
            "page_bytes": self.page_bytes,
            "measure_s": self.measure_s,
            "ttl_cap_s": self.ttl_cap_s,
            "k_default": self.k_default,
            "class_width_pages": self.class_width_pages,
            "trend_window_s": self.trend_window_s,
        }
        for name, optional in {
            "ttl_resolution_s": self.ttl_resolution_s,
            "ttl_coarse_step_s": self.ttl_coarse_step_s,
        }.items():
            if optional is not None:
                positive[name] = optional
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"EstimatorParams.{name} must be a positive number, got {value!r}")
        for name, value in {
            "ttl_min_deficit_pages": self.ttl_min_deficit_pages,
            "min_growth_pages": self.min_growth_pages,
        }.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"EstimatorParams.{name} must be ≥ 0, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Entry point for samples
# ----------------------------------------------------------------------------------------------


def observables(samples: pd.DataFrame) -> pd.DataFrame:
    """Keep only :data:`OBSERVABLE_COLUMNS` of ``samples`` (a new frame; the input is untouched).

    This is how the estimator never reads ``live_entries``/``live_bytes``. Raises ValueError
    naming the missing columns.
    """
    missing = [c for c in OBSERVABLE_COLUMNS if c not in samples.columns]
    if missing:
        raise ValueError(f"samples lack column(s) {', '.join(missing)}")
    return samples.loc[:, list(OBSERVABLE_COLUMNS)].copy()


# ----------------------------------------------------------------------------------------------
# Array layer: one generation of one instance
# ----------------------------------------------------------------------------------------------


def seeded(
    time: FloatArray, outbound: FloatArray, pages: FloatArray, started_at: float
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Prepend the known point (``started_at``, O = 0, P = first pages) if it precedes the samples.

    O is reset to 0 at every generation start, so this point is a fact, not a guess. With it,
    :func:`outbound_at` interpolates between the start and the first sample when a history starts
    late (A6).
    """
    if len(time) == 0 or not started_at < time[0]:
        return time, outbound, pages
    return (
        np.concatenate(([started_at], time)),
        np.concatenate(([0.0], outbound)),
        np.concatenate(([pages[0]], pages)),
    )


def outbound_at(query: FloatArray, time: FloatArray, outbound: FloatArray) -> FloatArray:
    """O(q): cumulative outbound calls at ``query`` times, linear between samples.

    ``time``/``outbound`` are a (:func:`seeded`) history of one generation; before its first point
    O is 0 (nothing was sent before the generation started); after its last point O is the last
    value.
    """
    return np.interp(query, time, outbound, left=0.0)


def estimated_entries(
    at: FloatArray, time: FloatArray, outbound: FloatArray, ttl: float
) -> FloatArray:
    """N(t) = O(t) − O(t − ttl) at the ``at`` times, never negative.

    Within the generation only: O is 0 before the generation started, so right after a restart
    N(t) = O(t), every call since the restart (A6). Negative differences (a counter that went
    backwards) are clipped to 0.
    """
    n = outbound_at(at, time, outbound) - outbound_at(at - ttl, time, outbound)
    return np.maximum(n, 0.0)


@dataclass(frozen=True)
class GrowthFit:
    """k and TTL of one generation. ``*_seen`` is False where the default was used."""

    k: float
    k_seen: bool
    ttl: float
    ttl_seen: bool
    start_pages: float
    #: Pages that outbound calls imply but that were never allocated, at the end of the data
    #: (what makes the TTL "seen"; 0 when no expiry was seen).
    deficit_pages: float


def _median_step(time: FloatArray) -> float:
    steps = np.diff(time)
    steps = steps[steps > 0]
    return float(np.median(steps)) if len(steps) else 1.0


def fit_growth(
    time: FloatArray,
    outbound: FloatArray,
    pages: FloatArray,
    started_at: float,
    params: EstimatorParams,
) -> GrowthFit:
    """Estimate k and the TTL of one generation from its samples (sorted by time).

    Model (the paper's reasoning made exact): the cache holds the entries of the last ``ttl``
    seconds, N_τ(t) = O(t) − O(t − τ); the allocator reuses freed blocks, so pages follow the peak
    of N_τ so far: P(t) ≈ a + max_{s≤t} N_τ(s) / k. While nothing has expired this is
    P ≈ a + O/k (pages grow as outbound calls imply); once entries expire, pages grow less.

    For every candidate τ on a grid (A3) we fit P on max N_τ by least squares and keep the τ with
    the smallest residual; k = 1/slope (a regression of ΔP on ΔO over the growth phase, A4).
    The TTL is τ itself, the life of one entry, not the time from the generation start until the
    departure shows: that would add the wait for the first entry and for the deficit to become
    visible (A16).
    The TTL counts as *seen* only when, at that τ, pages grew at least
    ``ttl_min_deficit_pages`` less than the outbound calls imply (paper: ページの確保が外向け
    リクエスト数よりも少なくなった) (A2); otherwise it is the cap. Candidates go past the cap (to
    the span of the data): a best τ above the cap gives the cap, not seen.
    The data are resampled onto a uniform grid first, so uneven sampling weighs time evenly.

    ``start_pages`` is the first sample's pages (A5).
    """
    t = np.asarray(time, dtype=np.float64)
    o = np.asarray(outbound, dtype=np.float64)
    p = np.asarray(pages, dtype=np.float64)
    cap = params.ttl_cap_s
    if len(t) == 0:
        return GrowthFit(params.k_default, False, cap, False, math.nan, 0.0)
    start = float(p[0])
    unseen = GrowthFit(params.k_default, False, cap, False, start, 0.0)
    span = float(t[-1] - t[0])
    if len(t) < 3 or span <= 0 or float(p.max() - start) < params.min_growth_pages:
        return unseen
    if float(o[-1] - o[0]) <= 0:
        return unseen

    # Candidates reach past the cap (up to the span) so that a TTL above the cap shows as such.
    res = params.ttl_resolution_s or _median_step(t)
    longest = max(cap, span)
    lags = max(1, math.floor(longest / res + 1e-9))
    points = math.floor(span / res + 1e-9) + 1
    if lags * points > _MAX_FIT_CELLS:  # very fine sampling: coarsen the grid (A3)
        res *= math.sqrt(lags * points / _MAX_FIT_CELLS)
        lags = max(1, math.floor(longest / res + 1e-9))
        points = math.floor(span / res + 1e-9) + 1

    st, so, sp = seeded(t, o, p, started_at)
    # Grid extended `lags` steps into the past: row r of the sliding view is O(grid − (lags−r)·res).
    ext = t[0] + res * np.arange(-lags, points, dtype=np.float64)
    o_ext = outbound_at(ext, st, so)
    o_grid = o_ext[lags:]
    p_grid = np.interp(ext[lags:], st, sp)
    windows = np.lib.stride_tricks.sliding_window_view(o_ext, points)

    def peaks(lag: npt.NDArray[np.int64]) -> FloatArray:
        """max_{s≤t} N_τ(s) on the grid for τ = lag·res, one row per lag."""
        return np.maximum.accumulate(o_grid[None, :] - windows[lags - lag], axis=1)

    peak_inf = np.maximum.accumulate(o_grid)  # τ = ∞: nothing expires

    def regress(x: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Slope of P on each row of x and the residual sum of squares."""
        xc = x - x.mean(axis=-1, keepdims=True)
        yc = p_grid - p_grid.mean()
        sxx = (xc * xc).sum(axis=-1)
        sxy = (xc * yc).sum(axis=-1)
        syy = float((yc * yc).sum())
        safe = np.where(sxx > 0, sxx, 1.0)
        slope = np.where(sxx > 0, sxy / safe, 0.0)
        rss = np.where(sxx > 0, syy - sxy * sxy / safe, syy)
        return slope, rss

    # Coarse to fine (A3): every `step`-th lag first, then every lag around the best coarse one.
    step = max(1, round(params.ttl_coarse_step_s / res)) if params.ttl_coarse_step_s else 1
    coarse = np.unique(np.append(np.arange(step, lags + 1, step), lags))
    _, coarse_rss = regress(peaks(coarse))
    around = int(coarse[int(np.argmin(coarse_rss))])
    fine = np.arange(max(1, around - step + 1), min(lags, around + step - 1) + 1)
    peak = peaks(fine)
    slope, rss = regress(peak)
    slope_inf, rss_inf = regress(peak_inf[None, :])
    best = int(np.argmin(rss))  # ties: the shortest TTL among equal fits
    b_inf = float(slope_inf[0])
    if rss[best] < float(rss_inf[0]) and slope[best] > 0:
        b = float(slope[best])
        deficit = b * float(o_grid[-1] - peak[best, -1])
        ttl = float(fine[best]) * res
        if deficit >= params.ttl_min_deficit_pages and ttl < cap + res:  # within a grid step
            return GrowthFit(1.0 / b, True, min(ttl, cap), True, start, deficit)
        if deficit >= params.ttl_min_deficit_pages:  # expiry seen, but later than the cap
            return GrowthFit(1.0 / b, True, cap, False, start, deficit)
    if b_inf <= 0:
        return unseen
    return GrowthFit(1.0 / b_inf, True, cap, False, start, 0.0)


@dataclass(frozen=True)
class Assessment:
    """Required and surplus memory (pages) at some sample times, and their change over L."""

    entries: FloatArray  # N(t)
    required: FloatArray  # R(t)
    surplus: FloatArray  # S(t)
    required_change: FloatArray  # R(t) − R(t − L)
    surplus_change: FloatArray  # S(t) − S(t − L)
    #: Standard deviation of the required change that Poisson noise alone would cause, in pages:
    #: √(arrivals + expiries in the window) / k (A9).
    required_change_sd: FloatArray


#: O(q) or P(q) at query times q, for one generation (:func:`generation_lookups`) or for many
#: instances at once (the policies' segmented history).
Lookup = Callable[[FloatArray], FloatArray]


def generation_lookups(
    time: FloatArray, outbound: FloatArray, pages: FloatArray, started_at: float
) -> tuple[Lookup, Lookup]:
    """O(q) and P(q) of one generation's samples: linear between samples, O = 0 before the start,
    P clamped to its first and last values."""
    st, so, sp = seeded(time, outbound, pages, started_at)
    return (lambda q: outbound_at(q, st, so)), (lambda q: np.interp(q, st, sp))


def assess(
    at: FloatArray,
    pages_at: FloatArray,
    outbound_of: Lookup,
    pages_of: Lookup,
    *,
    start_pages: float | FloatArray,
    k: float | FloatArray,
    ttl: float | FloatArray,
    window_s: float,
) -> Assessment:
    """Required R = start pages + N/k, surplus S = P − R, and their change over the trend window L.

    ``at``/``pages_at``: the sample times and allocated pages to assess. ``outbound_of`` and
    ``pages_of`` give O(q) and P(q) of the same generation, for q back to ``at − ttl − L``.
    ``start_pages``, ``k``, ``ttl`` are scalars or one value per sample (many instances at once).
    R is capped at P: the guest cannot use more than it has, so an excess is estimation error
    (A10); hence 0 ≤ S and R ≤ P. The trend compares t with t − L; P(t − L) is linear between
    samples (A9).
    """
    before = at - window_s
    o_now, o_expired = outbound_of(at), outbound_of(at - ttl)
    o_before, o_expired_before = outbound_of(before), outbound_of(before - ttl)
    n = np.maximum(o_now - o_expired, 0.0)
    n_before = np.maximum(o_before - o_expired_before, 0.0)
    pages_before = pages_of(before)
    required = np.minimum(start_pages + n / k, pages_at)
    required_before = np.minimum(start_pages + n_before / k, pages_before)
    surplus = pages_at - required
    moves = np.maximum(o_now - o_before, 0.0) + np.maximum(o_expired - o_expired_before, 0.0)
    return Assessment(
        entries=n,
        required=required,
        surplus=surplus,
        required_change=required - required_before,
        surplus_change=surplus - (pages_before - required_before),
        required_change_sd=np.sqrt(moves) / k,
    )


@dataclass(frozen=True)
class Baseline:
    """The baseline (基準値) in entries and pages, and the two statistics it is the mean of."""

    entries: float
    pages: float
    median_entries: float
    modal_entries: float


def baseline_from_entries(
    entries: FloatArray, start_pages: float, k: float, params: EstimatorParams
) -> Baseline:
    """Baseline from the N(t) values of the measurement period (paper §3, SPEC §5.3).

    Mean of (a) the median of N and (b) the midpoint of the most frequent class when N is binned
    in classes ``class_width_pages`` pages wide (w = width·k outbound calls, classes
    [i·w, (i+1)·w), midpoint (i + ½)·w; ties go to the lowest class) (A7). In pages:
    start pages + value/k. With no values the baseline is the start pages.
    """
    n = np.asarray(entries, dtype=np.float64)
    n = n[np.isfinite(n)]
    if len(n) == 0:
        return Baseline(0.0, start_pages, 0.0, 0.0)
    median = float(np.median(n))
    width = params.class_width_pages * k
    classes = np.floor(np.maximum(n, 0.0) / width).astype(np.int64)
    modal_class = int(np.argmax(np.bincount(classes)))
    modal = (modal_class + 0.5) * width
    value = (median + modal) / 2.0
    return Baseline(value, start_pages + value / k, median, modal)


def measurement_entries(
    time: FloatArray, outbound: FloatArray, started_at: float, fit: GrowthFit,
    params: EstimatorParams,
) -> FloatArray:
    """N(t) at the samples of the measurement period that enter the baseline statistics.

    ``time``/``outbound`` are the (unseeded) samples of the measurement period. With
    ``baseline_skip_fill`` the samples of the first TTL after the start are left out (A8).
    """
    st, so, _ = seeded(time, outbound, np.zeros_like(time), started_at)
    n = estimated_entries(time, st, so, fit.ttl)
    if params.baseline_skip_fill and len(time):
        n = n[time - min(started_at, float(time[0])) >= fit.ttl]
    return n


# ----------------------------------------------------------------------------------------------
# Frame layer: many instances and generations
# ----------------------------------------------------------------------------------------------

_GROUP: Final = ["instance", "generation"]


@dataclass(frozen=True)
class _Generation:
    """One generation's samples (sorted by time), its measurement period and its fit."""

    instance: str
    generation: int
    started_at: float
    samples: pd.DataFrame
    measured: pd.DataFrame
    fit: GrowthFit


def _float(frame: pd.DataFrame, column: str) -> FloatArray:
    return frame[column].to_numpy(dtype=np.float64)


def _per_generation(
    samples: pd.DataFrame, now: float, params: EstimatorParams
) -> list[_Generation]:
    """Observable samples with time ≤ now, per (instance, generation), each fitted on its
    measurement period: the first M seconds observed (A11)."""
    obs = observables(samples)
    obs = obs[obs["time"] <= now].sort_values([*_GROUP, "time"], kind="mergesort")
    out = []
    for (instance, _), group in obs.groupby(_GROUP, sort=True):
        t = _float(group, "time")
        measured = group[t <= t[0] + params.measure_s]
        started_at = float(group["started_at"].iloc[0])
        fit = fit_growth(
            _float(measured, "time"), _float(measured, "outbound"),
            _float(measured, "allocated_pages"), started_at, params,
        )
        out.append(
            _Generation(
                str(instance), int(group["generation"].iloc[0]), started_at, group, measured, fit
            )
        )
    return out


def fit_generations(samples: pd.DataFrame, now: float, params: EstimatorParams) -> pd.DataFrame:
    """k, TTL and start pages per (instance, generation), from its measurement period up to ``now``.

    Reads: instance, generation, time, started_at, allocated_pages, outbound (rows with
    time ≤ now). Writes one row per (instance, generation) with: instance, generation,
    started_at, start_pages, k, k_seen, ttl, ttl_seen, deficit_pages, measured_s (seconds of
    measurement data used), measure_complete (whether the full period M was observed).
    """
    rows = []
    for g in _per_generation(samples, now, params):
        t = _float(g.samples, "time")
        m = _float(g.measured, "time")
        rows.append(
            {
                "instance": g.instance,
                "generation": g.generation,
                "started_at": g.started_at,
                "start_pages": g.fit.start_pages,
                "k": g.fit.k,
                "k_seen": g.fit.k_seen,
                "ttl": g.fit.ttl,
                "ttl_seen": g.fit.ttl_seen,
                "deficit_pages": g.fit.deficit_pages,
                "measured_s": float(m[-1] - m[0]),
                "measure_complete": float(t[-1] - t[0]) >= params.measure_s,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "instance", "generation", "started_at", "start_pages", "k", "k_seen", "ttl",
            "ttl_seen", "deficit_pages", "measured_s", "measure_complete",
        ],
    )


_ESTIMATE_COLUMNS: Final = [
    *OBSERVABLE_COLUMNS, "start_pages", "k", "ttl", "estimated_entries", "required_pages",
    "surplus_pages", "required_change", "surplus_change", "required_bytes", "surplus_bytes",
]


def estimate(samples: pd.DataFrame, now: float, params: EstimatorParams) -> pd.DataFrame:
    """Per-sample estimates of required and surplus memory as of ``now``.

    Reads: the :data:`OBSERVABLE_COLUMNS` (rows with time ≤ now; never the ground truth). Each
    generation uses k and TTL fitted on its own measurement period (:func:`fit_generations`).
    Writes the observable columns sorted by instance, generation, time, plus: start_pages, k, ttl,
    estimated_entries (N), required_pages, surplus_pages, required_change, surplus_change (over
    the trend window), required_bytes, surplus_bytes.
    """
    parts = []
    for g in _per_generation(samples, now, params):
        t = _float(g.samples, "time")
        pages = _float(g.samples, "allocated_pages")
        outbound_of, pages_of = generation_lookups(
            t, _float(g.samples, "outbound"), pages, g.started_at
        )
        a = assess(
            t, pages, outbound_of, pages_of,
            start_pages=g.fit.start_pages, k=g.fit.k, ttl=g.fit.ttl,
            window_s=params.trend_window_s,
        )
        parts.append(
            g.samples.assign(
                start_pages=g.fit.start_pages,
                k=g.fit.k,
                ttl=g.fit.ttl,
                estimated_entries=a.entries,
                required_pages=a.required,
                surplus_pages=a.surplus,
                required_change=a.required_change,
                surplus_change=a.surplus_change,
                required_bytes=a.required * params.page_bytes,
                surplus_bytes=a.surplus * params.page_bytes,
            )
        )
    if not parts:
        return pd.DataFrame(columns=_ESTIMATE_COLUMNS)
    return pd.concat(parts, ignore_index=True).loc[:, _ESTIMATE_COLUMNS]


def baselines(samples: pd.DataFrame, now: float, params: EstimatorParams) -> pd.DataFrame:
    """The baseline of every (instance, generation), from its measurement period up to ``now``.

    Reads: the :data:`OBSERVABLE_COLUMNS` (rows with time ≤ now). Writes one row per (instance,
    generation): instance, generation, k, ttl, start_pages, median_entries, modal_entries,
    baseline_entries, baseline_pages, baseline_bytes, measure_complete. The ratio policy uses the
    first measurement period it observes for an instance; later generations keep that baseline.
    """
    rows = []
    for g in _per_generation(samples, now, params):
        n = measurement_entries(
            _float(g.measured, "time"), _float(g.measured, "outbound"), g.started_at, g.fit, params
        )
        b = baseline_from_entries(n, g.fit.start_pages, g.fit.k, params)
        t = _float(g.samples, "time")
        rows.append(
            {
                "instance": g.instance,
                "generation": g.generation,
                "k": g.fit.k,
                "ttl": g.fit.ttl,
                "start_pages": g.fit.start_pages,
                "median_entries": b.median_entries,
                "modal_entries": b.modal_entries,
                "baseline_entries": b.entries,
                "baseline_pages": b.pages,
                "baseline_bytes": b.pages * params.page_bytes,
                "measure_complete": float(t[-1] - t[0]) >= params.measure_s,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "instance", "generation", "k", "ttl", "start_pages", "median_entries", "modal_entries",
            "baseline_entries", "baseline_pages", "baseline_bytes", "measure_complete",
        ],
    )
