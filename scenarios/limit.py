"""The offline-optimal frontier (``limit``): the best trade-off any cold restart schedule can reach.

With hindsight (the whole trace and the ``none`` run's ground truth) we ask: over every schedule
of cold restarts on a time grid, what is the least mean surplus for a given number of extra auth
calls? The answer is a Pareto frontier, drawn as "limit" beside the fixed and threshold curves.
It is for evaluation only; no policy can see the future.

A cost model makes the search cheap (a simulation per schedule would not be):

- **Surplus.** From the ``none`` run: live bytes L(t) (the filter's gauge). A generation started
  at t₀ allocates base + whole pages of ρ · max_{t₀≤s≤t} L(s) + a (the allocator reuses freed
  blocks, so memory follows the peak of the live cache since the start; ρ and a are fitted on
  the ``none`` run where it took pages: allocator overhead, and the slack of the first pages).
  Its surplus is that minus L(t), as in the experiments' summary. The live
  cache of a new generation is taken to be the ``none`` run's (it is smaller during the first
  TTL, as dropped entries come back only when asked for; that error is checked below).
- **Extra calls.** From the trace and the filter's TTL: replaying the cache's rules (a miss
  caches the token for TTL, a logout evicts it), every cache entry with a later hit is *in use*
  from its creation to its last hit. A restart at t costs one call for each entry in use at t.
  (Its second-order effect, that the re-fetched entry expires later and may save a later call,
  is left out, so the cost is slightly overstated.)
- **Search.** For a price λ (page-seconds per call), dynamic programming over restart times on
  the grid minimises surplus-time + λ · calls, exactly, in O(n²) per instance; sweeping λ gives
  the frontier's lower convex hull. Instances are independent and share λ.

:func:`simulate_schedule` replays one of the frontier's schedules in the real simulation, so
model and simulation can be compared (tests/test_limit.py bounds the error).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from manager.estimate import EstimatorParams
from scenarios.experiment import ExperimentConfig, filter_module, policy_series, summarize
from scenarios.simulate import Controller, Simulation
from scenarios.trace import Trace

FloatArray = npt.NDArray[np.float64]
MIB = 2**20
PAGE = 65536


@dataclass(frozen=True)
class LimitParams:
    """How the frontier is searched."""

    ttl_s: float = 600.0
    """The filter's TTL (its ``ttl_seconds``)."""
    grid_s: float = 300.0
    """Candidate restart times: every ``grid_s`` from the trace start."""
    prices: tuple[float, ...] = tuple(float(x) for x in np.geomspace(1.0, 1e7, 29))
    """λ values swept, page-seconds per extra call (one frontier point each, duplicates merged)."""


@dataclass(frozen=True)
class InstanceModel:
    """One instance's cost model on the grid (cells 0 … n−1, ``grid_s`` wide)."""

    instance: str
    start: float  #: time of cell 0 (the series' clock)
    cell_s: float
    live_max: FloatArray  #: max live bytes in each cell
    live_mean: FloatArray  #: mean live bytes in each cell
    in_use: FloatArray  #: extra calls of a restart at the start of each cell
    #: live bytes a restart at the start of cell i drops for good (entries with no later hit),
    #: still counted in the ``none`` run in cell i + o: ``dropped[i, o]`` (cell start, mean)
    dropped_max: FloatArray
    dropped_mean: FloatArray
    offset: float  #: a in allocated − base ≈ pages(ρ · peak live + a), fitted
    rho: float  #: ρ: allocated growth per live byte


@dataclass(frozen=True)
class Schedule:
    """A restart schedule and what the model predicts for it (all instances)."""

    price: float
    restarts: dict[str, tuple[float, ...]]  #: instance → restart times (series' clock)
    surplus_byte_s: float
    extra_calls: float


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


def cache_entries(events: pd.DataFrame, ttl: float, instance_of: dict[str, str]) -> pd.DataFrame:
    """Every cache entry the filter would make without restarts: columns instance, created,
    last_hit (= created without hits), ended (expiry or logout) and hits (the hit times, a
    tuple), in seconds of trace.

    Replays the filter's rules on ``events`` (time, kind, token, host; sorted by time): a request
    whose token has no unexpired entry creates one for ``ttl``; a logout evicts it.
    ``instance_of`` maps a host to its filter instance.
    """
    # (instance, token) → [created, expires, hit times]
    entry: dict[tuple[str, str], tuple[float, float, list[float]]] = {}
    rows: list[tuple[str, float, float, float, tuple[float, ...]]] = []

    def close(inst: str, e: tuple[float, float, list[float]], end: float) -> None:
        hits = e[2]
        rows.append((inst, e[0], hits[-1] if hits else e[0], end, tuple(hits)))

    for t, kind, token, host in zip(events["time"].tolist(), events["kind"].tolist(),
                                    events["token"].tolist(), events["host"].tolist(),
                                    strict=True):
        if kind == "login":
            continue
        inst = instance_of.get(host, host)
        key = (inst, token)
        e = entry.get(key)
        if kind == "logout":
            if e is not None:
                close(inst, e, min(t, e[1]))
                del entry[key]
            continue
        if e is not None and t < e[1]:
            e[2].append(t)
            continue
        if e is not None:
            close(inst, e, e[1])
        entry[key] = (t, t + ttl, [])
    for (inst, _), e in entry.items():
        close(inst, e, e[1])
    return pd.DataFrame(rows, columns=["instance", "created", "last_hit", "ended", "hits"])


def instance_models(none_series: pd.DataFrame, trace: Trace, params: LimitParams,
                    instance_key: str = "host") -> list[InstanceModel]:
    """The cost model of every instance, from the ``none`` run's series and the trace.

    Reads ``none_series`` columns time, instance, allocated_bytes, live_bytes.
    """
    s = none_series.sort_values(["instance", "time"], kind="stable")
    t0 = float(s["time"].min())
    events = trace.to_frame()
    hosts = {h: (h or "default") if instance_key == "host" else "single"
             for h in events["host"].unique().tolist()}
    entries = cache_entries(events, params.ttl_s, hosts)
    duration = float(s["time"].max()) - t0
    n = max(1, math.ceil((duration + 1e-9) / params.grid_s))
    edges = t0 + params.grid_s * np.arange(n + 1, dtype=np.float64)
    models = []
    for instance, g in s.groupby("instance", sort=True):
        time = g["time"].to_numpy(dtype=np.float64)
        alloc = g["allocated_bytes"].to_numpy(dtype=np.float64)
        base = float(alloc.min())
        live = g["live_bytes"].to_numpy(dtype=np.float64)
        cell = np.minimum(((time - t0) // params.grid_s).astype(np.int64), n - 1)
        live_max = np.zeros(n)
        np.maximum.at(live_max, cell, live)
        sums = np.bincount(cell, weights=live, minlength=n)
        counts = np.bincount(cell, minlength=n)
        live_mean = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
        rho, offset = _fit_growth(np.maximum.accumulate(live), alloc - base)
        mine = entries[entries["instance"] == str(instance)]
        created = mine["created"].to_numpy() + t0
        last = mine["last_hit"].to_numpy() + t0
        ended = mine["ended"].to_numpy() + t0
        at = edges[:-1]
        hit = last > created
        busy = (np.searchsorted(np.sort(created[hit]), at, side="right")
                - np.searchsorted(np.sort(last[hit]), at, side="right")).astype(np.float64)
        # Bytes per entry: the none run's live bytes over the replay's live entries.
        count = (np.searchsorted(np.sort(created), time, side="right")
                 - np.searchsorted(np.sort(ended), time, side="right"))
        ok = (count > 0) & (live > 0)
        entry_bytes = float(np.median(live[ok] / count[ok])) if ok.any() else 0.0
        dropped_max, dropped_mean = _dropped(at, params, created, ended, mine["hits"].tolist(),
                                             entry_bytes)
        models.append(InstanceModel(str(instance), t0, params.grid_s, live_max, live_mean,
                                    busy, dropped_max, dropped_mean, offset, rho))
    return models


def _dropped(at: FloatArray, params: LimitParams, created: FloatArray, ended: FloatArray,
             hits: list[tuple[float, ...]], entry_bytes: float) -> tuple[FloatArray, FloatArray]:
    """Bytes of the entries a restart at ``at[i]`` drops that are still missing from the new
    generation at the start (and the middle) of cell i + o, o = 0 … ⌈ttl/grid⌉, though the
    ``none`` run still holds them: live at the restart, they come back only at their token's
    next request (a hit in ``none``), if before they would have expired."""
    width = math.ceil(params.ttl_s / params.grid_s) + 1
    t0 = float(at[0]) if len(at) else 0.0
    order = np.argsort(created, kind="stable")
    created, ended = created[order], ended[order]
    hits = [hits[j] for j in order.tolist()]
    # All hits flat, keyed by (entry, time): one searchsorted finds each entry's next hit.
    span = float(max(ended.max(initial=0.0), at.max(initial=0.0)) - t0) + 2.0 * params.ttl_s + 1.0
    owner = np.repeat(np.arange(len(hits)), [len(h) for h in hits])
    flat = np.array([x for h in hits for x in h], dtype=np.float64)
    keys = owner * span + (flat - t0)
    ends = np.cumsum([len(h) for h in hits])
    by_end = np.sort(ended)
    starts = at[:, None] + params.grid_s * np.arange(width)[None, :]
    dmax = np.zeros((len(at), width))
    dmean = np.zeros((len(at), width))
    for i, t in enumerate(at.tolist()):
        # Entries live at t: created ≤ t < ended (created within a ttl before t).
        lo = int(np.searchsorted(created, t - params.ttl_s, side="right"))
        hi = int(np.searchsorted(created, t, side="right"))
        if hi <= lo or not (by_end > t).any():
            continue
        idx = np.arange(lo, hi)
        idx = idx[ended[idx] > t]
        if not len(idx):
            continue
        pos = np.searchsorted(keys, idx * span + (t - t0), side="right")
        has_next = pos < ends[idx]
        next_hit = np.where(has_next, flat[np.minimum(pos, len(flat) - 1)] if len(flat) else 0.0,
                            np.inf)
        back = np.sort(np.minimum(next_hit, ended[idx]))
        dmax[i] = len(back) - np.searchsorted(back, starts[i], side="right")
        dmean[i] = len(back) - np.searchsorted(back, starts[i] + params.grid_s / 2, side="right")
    return dmax * entry_bytes, dmean * entry_bytes


def _fit_growth(peak: FloatArray, growth: FloatArray) -> tuple[float, float]:
    """ρ and a in growth ≈ whole pages of (ρ · peak + a).

    −a is the slack: the largest live peak that fit without a new page; ρ puts the final peak in
    the middle of the last page taken (allocator overhead per live byte).
    """
    fits = growth <= 0
    slack = float(peak[fits].max()) if fits.any() else 0.0
    top = float(peak[-1]) if len(peak) else 0.0
    if growth[-1] <= 0 or top <= slack:
        return 1.0, -slack
    return (float(growth[-1]) - PAGE / 2 + slack) / top, -slack


def allocated_growth(m: InstanceModel, peak: FloatArray) -> FloatArray:
    """Bytes allocated above the base for a peak of live bytes (whole pages)."""
    return np.ceil(np.maximum(m.rho * peak + m.offset, 0.0) / PAGE) * PAGE


def generation_surplus(m: InstanceModel, i: int) -> FloatArray:
    """Surplus byte-seconds of a generation started at cell i and ending at cell j (j = i+1 … n),
    as a vector indexed by j − i − 1."""
    live_max, live_mean = m.live_max[i:].copy(), m.live_mean[i:].copy()
    if i > 0:  # what the restart dropped for good is not in this generation
        w = min(len(live_max), m.dropped_max.shape[1])
        live_max[:w] = np.maximum(live_max[:w] - m.dropped_max[i, :w], 0.0)
        live_mean[:w] = np.maximum(live_mean[:w] - m.dropped_mean[i, :w], 0.0)
    peak = np.maximum.accumulate(live_max)
    per_cell = np.maximum(allocated_growth(m, peak) - live_mean, 0.0) * m.cell_s
    return np.cumsum(per_cell)


def best_schedule(m: InstanceModel, price_byte_s: float) -> tuple[list[int], float, float]:
    """Restart cells minimising surplus + price · extra calls; also its surplus and calls."""
    n = len(m.live_max)
    best = np.full(n + 1, np.inf)
    came = np.zeros(n + 1, dtype=np.int64)
    value = np.zeros(n)  # objective just after a restart at cell i (i = 0: the start)
    for i in range(n):
        if i > 0:
            if not np.isfinite(best[i]):
                continue
            value[i] = best[i] + price_byte_s * m.in_use[i]
        row = value[i] + generation_surplus(m, i)
        better = row < best[i + 1:]
        best[i + 1:] = np.where(better, row, best[i + 1:])
        came[i + 1:] = np.where(better, i, came[i + 1:])
    cells: list[int] = []
    j = n
    while j > 0:
        i = int(came[j])
        if i > 0:
            cells.append(i)
        j = i
    cells.reverse()
    surplus, calls = evaluate(m, cells)
    return cells, surplus, calls


def evaluate(m: InstanceModel, cells: Sequence[int]) -> tuple[float, float]:
    """Model surplus byte-seconds and extra calls of restarts at ``cells``."""
    bounds = [0, *cells, len(m.live_max)]
    surplus = sum(float(generation_surplus(m, a)[b - a - 1])
                  for a, b in itertools.pairwise(bounds) if b > a)
    return surplus, float(sum(m.in_use[c] for c in cells))


def frontier(models: Sequence[InstanceModel], params: LimitParams) -> list[Schedule]:
    """The frontier's points (one per distinct schedule), from no restart (price ∞) to many.

    Prices are page-seconds per call (converted to byte-seconds with 64 KiB pages).
    """
    out: dict[tuple[tuple[str, tuple[float, ...]], ...], Schedule] = {}
    never: dict[str, tuple[float, ...]] = {m.instance: () for m in models}
    out[tuple(sorted(never.items()))] = Schedule(math.inf, never, none_surplus_byte_s(models), 0.0)
    for price in sorted(params.prices, reverse=True):
        restarts: dict[str, tuple[float, ...]] = {}
        surplus = calls = 0.0
        for m in models:
            cells, s, c = best_schedule(m, price * 65536)
            restarts[m.instance] = tuple(m.start + m.cell_s * c for c in cells)
            surplus += s
            calls += c
        key = tuple(sorted(restarts.items()))
        out.setdefault(key, Schedule(price, restarts, surplus, calls))
    return sorted(out.values(), key=lambda s: s.extra_calls)


def frontier_table(schedules: Sequence[Schedule], duration_s: float,
                   none_auth: int) -> pd.DataFrame:
    """The frontier as rows like a summary's: policy ``limit``, mean_surplus_mib, auth_vs_none,
    auth_requests, restarts, price (page·s per call)."""
    rows = [{
        "policy": "limit",
        "price": s.price,
        "mean_surplus_mib": s.surplus_byte_s / duration_s / MIB,
        "auth_requests": none_auth + s.extra_calls,
        "auth_vs_none": (none_auth + s.extra_calls) / none_auth if none_auth else np.nan,
        "restarts": sum(len(v) for v in s.restarts.values()),
    } for s in schedules]
    return pd.DataFrame(rows, columns=["policy", "price", "mean_surplus_mib", "auth_requests",
                                       "auth_vs_none", "restarts"])


def none_surplus_byte_s(models: Sequence[InstanceModel]) -> float:
    """The model's surplus byte-seconds with no restart (its error against ``none`` is the
    model's error at the frontier's start)."""
    return sum(evaluate(m, [])[0] for m in models)


def pareto(x: FloatArray, y: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The points not dominated (lower x and lower y are better), sorted by x."""
    order = np.lexsort((y, x))
    x, y = x[order], y[order]
    keep = y < np.minimum.accumulate(np.append(np.inf, y[:-1]))
    return x[keep], y[keep]


def curve_at(x: FloatArray, y: FloatArray, at: float) -> float:
    """The Pareto curve of (x, y) points, linear between its points, at ``x = at``: the least y
    reachable at that cost (NaN below the cheapest point; its last y beyond the dearest)."""
    px, py = pareto(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    if len(px) == 0 or at < px[0] - 1e-12:
        return math.nan
    return float(np.interp(at, px, py))


def limit_at(table: pd.DataFrame, auth_vs_none: float) -> float:
    """The frontier's least mean surplus at an auth cost (relative to ``none``)."""
    return curve_at(table["auth_vs_none"].to_numpy(), table["mean_surplus_mib"].to_numpy(),
                    auth_vs_none)


# ----------------------------------------------------------------------------------------------
# Checking the model against the simulation
# ----------------------------------------------------------------------------------------------


def schedule_controller(restarts: dict[str, tuple[float, ...]]) -> Controller:
    """A simulation controller that restarts each instance at its scheduled times (at the first
    controller pass at or after each)."""
    pending = {inst: sorted(times) for inst, times in restarts.items()}

    def controller(new: Mapping[str, Any], now: float) -> list[str]:
        due = []
        for inst, times in pending.items():
            if times and times[0] <= now + 1e-6:
                while times and times[0] <= now + 1e-6:
                    times.pop(0)
                due.append(inst)
        return due

    return controller


def simulate_schedule(trace: Trace, restarts: dict[str, tuple[float, ...]],
                      config: ExperimentConfig) -> dict[str, object]:
    """Run ``trace`` with restarts at the scheduled times; its summary (SPEC §7 metrics)."""
    module = filter_module(config.sim.filter_path)
    result = Simulation(config.sim, module).run(trace, schedule_controller(restarts))
    series = policy_series(result.samples, EstimatorParams())
    return summarize(series, config, "schedule")
