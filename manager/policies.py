"""Restart policies behind one pure interface, for the manager daemon and the simulator alike.

::

    state = initial_state(params)
    decisions, state = decide(state, new_samples, now, params)   # every pass

- ``new_samples``: only the samples not passed before (columns of
  :data:`manager.estimate.OBSERVABLE_COLUMNS`; the oracle also reads ``live_bytes``), as a
  DataFrame or as a mapping of column name to values (the simulator's, which skips building a
  frame a pass). Rows already
  seen (time ≤ the last time seen for that generation) and rows of older generations are ignored,
  so overlapping fetches are harmless.
- ``state``: an immutable :class:`PolicyState`; the returned one replaces it. Nothing is kept
  anywhere else, so the daemon and the virtual-time simulator get the same decisions from the same
  samples, however they are split into passes (up to the one-decision-per-pass rule below).
- ``decisions``: one :class:`Decision` per (instance, generation) present in the pass: the first
  sample whose rule says restart, else a keep at the latest sample. A policy never restarts one
  generation twice in a pass, and after asking for a restart it keeps quiet about that generation
  for ``retry_after_s`` (samples written just before the restart took effect must not restart the
  fresh instance).
- The rules run on the samples' own clock (``time``, ``started_at``: the proxy's host clock, maybe
  virtual); ``now`` only stamps ``Decision.decided_at``, because the manager's clock need not be
  the proxy's (A14).
- A generation change (a restart, by us or anyone) resets what is learned per generation; the
  ratio policy's baseline, k and TTL from its measurement period persist (paper §3).

Policies (SPEC §5): ``none``, ``fixed`` (uptime ≥ T), ``threshold`` (allocated ≥ X bytes, like
Higress rebuilding an Envoy Wasm VM over a memory threshold), ``ratio`` (the paper's rule) and
``oracle`` (ground truth; the evaluation's bound, never a default). :func:`parse_policy` reads
the CLI spelling (``fixed:30m``, ``threshold:64MiB``, ``ratio:measure=15m,ttl_cap=10m`` …).

Hot path: no Python loop over samples or instances. The state keeps per-instance scalars in
arrays (:class:`Slots`) and the samples each instance still needs (its generation's last TTL +
trend window; all of the measurement period) in one table sorted by (instance, time)
(:class:`History`), searched for every instance at once. Python loops remain where the output is
per decision (building the records and reason strings) and for rare events: the k/TTL fit
(~1 ms) runs once per instance, when its measurement period ends.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from addons.telemetry.records import PAGE_FIGURES
from manager.estimate import (
    OBSERVABLE_COLUMNS,
    OPTIONAL_COLUMNS,
    WASM_PAGE_BYTES,
    EstimatorParams,
    FloatArray,
    Lookup,
    assess,
    baseline_from_entries,
    fit_growth,
    measurement_entries,
)

Action = Literal["restart", "keep"]
BoolArray = npt.NDArray[np.bool_]

MIB: Final = 1024 * 1024


# ----------------------------------------------------------------------------------------------
# Decisions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Decision:
    """One decision about one instance generation, with the inputs it was based on.

    Memory amounts are in Wasm pages (``page_bytes`` each) except ``*_bytes``. Inputs a policy does
    not use are None.
    """

    instance: str
    generation: int
    time: float  #: the sample the rule was evaluated at (the proxy's clock)
    decided_at: float  #: ``now`` of the pass
    policy: str
    action: Action
    reason: str  #: for humans: what held and what did not
    uptime_s: float  #: time − started_at
    allocated_pages: int
    allocated_bytes: int
    requests: int
    outbound: int
    page_bytes: int = 65536
    required_pages: float | None = None
    surplus_pages: float | None = None
    baseline_pages: float | None = None
    estimated_entries: float | None = None  #: N(t), ratio and adaptive
    ttl_s: float | None = None
    k: float | None = None
    live_bytes: float | None = None  #: ground truth, oracle only
    #: how a restart is to run, ``cold`` or ``warm`` (:data:`RESTART_MODES`); None: as the proxy's
    #: ``wasm_restart_mode`` says (a cold policy's restarts, and every keep)
    mode: Literal["cold", "warm"] | None = None
    #: the truth (oracle only): what a fresh instance would allocate, and the rest; never in
    #: ``required_pages``/``surplus_pages``, which hold estimates (SPEC §10)
    true_required_pages: float | None = None
    true_surplus_pages: float | None = None

    def to_record(self) -> dict[str, object]:
        """A flat dict for the ``decisions`` collection (adds required/surplus/baseline bytes)."""
        # The fields hold plain values: a shallow copy is what dataclasses.asdict makes, 8× faster.
        record: dict[str, object] = dict(zip(DECISION_FIELDS, decision_values(self),
                                             strict=True))
        for name in PAGE_FIGURES:
            pages: Any = record[f"{name}_pages"]
            record[f"{name}_bytes"] = None if pages is None else pages * self.page_bytes
        return record


DECISION_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Decision))
"""The fields of a `Decision`, in order."""
decision_values: Final = operator.attrgetter(*DECISION_FIELDS)
"""A decision's field values, in the order of `DECISION_FIELDS` (one C call)."""
DECISION_RECORD_FIELDS: Final = (*DECISION_FIELDS, *(f"{n}_bytes" for n in PAGE_FIGURES))
"""The keys of :meth:`Decision.to_record`, in order."""


def decisions_frame(decisions: Iterable[Decision]) -> pd.DataFrame:
    """Decisions as a DataFrame, one row each, columns of :meth:`Decision.to_record`."""
    rows = [d.to_record() for d in decisions]
    return pd.DataFrame(rows, columns=list(DECISION_RECORD_FIELDS))


# ----------------------------------------------------------------------------------------------
# Parameters: one frozen dataclass per policy
# ----------------------------------------------------------------------------------------------


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{owner}.{name} must be a positive number, got {value!r}")


RESTART_MODES: Final = ("cold", "warm")
"""How a policy's restarts are carried out. ``cold``: a fresh instance, the cache is dropped.
``warm``: the new instance receives the old one's live cache, rebuilt from the proxy's journal
(no auth call; the proxy runs it cold when that is unsafe, and its restart record says why)."""


@dataclass(frozen=True, kw_only=True)
class _Common:
    #: After asking to restart a generation, ignore its samples this long before asking again
    #: (samples written just before the restart; a restart that failed is asked again after it).
    retry_after_s: float = 60.0
    #: How the restarts this policy asks for are carried out (:data:`RESTART_MODES`).
    restart_mode: str = "cold"

    def __post_init__(self) -> None:
        _check_positive(type(self).__name__, retry_after_s=self.retry_after_s)
        if self.restart_mode not in RESTART_MODES:
            raise ValueError(
                f"{type(self).__name__}.restart_mode must be one of {', '.join(RESTART_MODES)}, "
                f"got {self.restart_mode!r}"
            )


@dataclass(frozen=True, kw_only=True)
class NoneParams(_Common):
    """Never restart (the paper's "no restart" comparison)."""

    name: ClassVar[str] = "none"


@dataclass(frozen=True, kw_only=True)
class FixedParams(_Common):
    """Restart when the generation's uptime reaches ``uptime_s`` (sweep it)."""

    name: ClassVar[str] = "fixed"
    uptime_s: float = 1800.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("FixedParams", uptime_s=self.uptime_s)


@dataclass(frozen=True, kw_only=True)
class ThresholdParams(_Common):
    """Restart when allocated memory reaches ``allocated_bytes`` (Higress-style VM rebuild)."""

    name: ClassVar[str] = "threshold"
    allocated_bytes: int = 64 * MIB

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("ThresholdParams", allocated_bytes=self.allocated_bytes)


@dataclass(frozen=True, kw_only=True)
class RatioParams(_Common):
    """The paper's rule (SPEC §5). Estimation settings live in ``estimator``."""

    name: ClassVar[str] = "ratio"
    estimator: EstimatorParams = field(default_factory=EstimatorParams)
    #: "Required falls" means R(t) − R(t − L) < −max(trend_min_pages, trend_noise_z · σ), where
    #: σ is the change that Poisson arrival noise alone would cause (√(arrivals + expiries in the
    #: window) / k). One page is the unit in which memory is allocated; z = 3 keeps a steady
    #: cache's wiggles from counting as a fall (z = 2 still fired on noise in a busy plateau).
    #: z = 0 leaves only the page (A9).
    trend_min_pages: float = 1.0
    trend_noise_z: float = 3.0
    #: Paper: 減少に転じ ("turned to decreasing"). False: R is falling now (level). True: R is
    #: falling now and was not at the previous sample (edge) (A9).
    require_turn: bool = False
    #: Paper: the first decision after the measurement period always restarts (A13).
    first_decision_restarts: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("trend_min_pages", "trend_noise_z"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"RatioParams.{name} must be ≥ 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class OracleParams(_Common):
    """Knows the true live bytes; the evaluation's bound, never a default (A15).

    With start = allocated bytes at the generation's first sample and live = live bytes, a fresh
    instance would need start + live; the rest, *reclaimable* = allocated − start − live, is the
    true surplus. Restart when reclaimable ≥ ``min_reclaim_bytes`` and reclaimable ≥
    ``surplus_ratio`` × live (the restart frees at least that many times the cache it drops) and
    live is not rising over ``window_s`` (a rising cache would regrow at once).
    """

    name: ClassVar[str] = "oracle"
    min_reclaim_bytes: int = 1 * MIB
    surplus_ratio: float = 1.0
    window_s: float = 60.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(
            "OracleParams", min_reclaim_bytes=self.min_reclaim_bytes,
            surplus_ratio=self.surplus_ratio, window_s=self.window_s,
        )


@dataclass(frozen=True, kw_only=True)
class AdaptiveParams(_Common):
    """The best rule we have from what the host sees (P, Q, O, uptime); the manager's default.

    A cost model: restart when what the restart frees, over the time it stays freed, outweighs
    the auth calls it causes. With N = O(t) − O(t − ttl) estimated live entries and H = the
    requests of the last ttl that made no outbound call (hits):

    - the restart causes about C = N · (1 − (1 − e^−x)/x), x = H/N, extra auth calls: the live
      entries expected to be asked for again before they expire (:func:`refetched`, B2), times
      the share of that estimate the instance's earlier restarts really caused, counted two
      ttls after each (:func:`refetch_scale`; the calls seen also replace the estimate in the
      budget);
    - a fresh instance grows to start + (M + C)/k pages, M = the outbound calls of the last
      trend window scaled to one ttl (the entries the current traffic makes anew), so the
      restart frees F = P − that (B3);
    - it keeps F freed for about ``horizon``, which starts at ``horizon_s``, is halved for an
      instance whose memory regrew to its pre-restart size within one ttl of our restart
      (back-off) and doubled back after one that held (B6);
    - restart when F · horizon ≥ price · C, F ≥ ``min_free_pages``, N is not rising over the
      trend window, the generation has lived ``min_uptime_ttls`` ttls, and the estimated extra
      calls of all restarts stay within the budget, ``budget_share`` of the instance's outbound
      calls (B3–B5);
    - the price of a call is ``call_cost_page_s`` times the share of the budget spent once this
      restart is made (``budget_pricing``): calls are cheap while the budget is unused, and
      cost the full price as it runs out (B5).

    With ``mode=warm`` a restart keeps the live cache (the proxy replays its journal): C = 0 and
    the fresh instance holds N, so F is the surplus S = P − (start + N/k), and the rule restarts
    whenever the other conditions hold (enough surplus, N not rising, a ttl of uptime, by which
    the new generation's N counts its own calls again).

    No measurement period and no unconditional first restart: k and the TTL start at the
    estimator's defaults and are refitted on every generation whose pages grew by at least
    ``estimator.min_growth_pages`` in its first ``estimator.measure_s`` (B7). Where the host
    reports how long after a 2xx answer the instance repeats an identical outbound call (the
    samples' ``refetch_interval_s``), that interval, at most the cap, is the TTL (B9). Every
    parameter is in ``manager/AMBIGUITIES.md`` (B1–B9), with its reason and how sensitive the
    rule is to it.
    """

    name: ClassVar[str] = "adaptive"
    estimator: EstimatorParams = field(default_factory=EstimatorParams)
    #: Page-seconds of surplus one extra auth call is worth (B3).
    call_cost_page_s: float = 900.0
    #: How long freed memory is assumed to stay freed, before any back-off (B6).
    horizon_s: float = 3 * 3600.0
    #: The smallest restart worth making: expected pages freed (B3).
    min_free_pages: float = 0.5
    #: A generation lives at least this many ttls before it may be restarted (B4).
    min_uptime_ttls: float = 1.0
    #: Extra calls of all restarts (estimated, then as counted) ≤ this share of the instance's
    #: outbound calls (B5).
    budget_share: float = 0.015
    #: Horizon divisor when memory regrew to its pre-restart size within one ttl (B6).
    backoff: float = 2.0
    #: A call costs ``call_cost_page_s`` times the share of the budget spent once the restart
    #: is made, instead of ``call_cost_page_s`` (B5).
    budget_pricing: bool = True
    #: ``mode=warm`` only: a restart runs cold instead when a cold one passes the rule with
    #: this budget share and frees more than a warm one (the cache that nobody asks for
    #: again); half of the 0.5 % by which auth calls still round to 1.00 × (B8).
    cold_budget_share: float = 0.0025

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(
            "AdaptiveParams", call_cost_page_s=self.call_cost_page_s, horizon_s=self.horizon_s,
            min_free_pages=self.min_free_pages, budget_share=self.budget_share,
        )
        if not (math.isfinite(self.cold_budget_share) and self.cold_budget_share >= 0):
            raise ValueError(
                f"AdaptiveParams.cold_budget_share must be ≥ 0, got {self.cold_budget_share!r}"
            )
        if not (math.isfinite(self.min_uptime_ttls) and self.min_uptime_ttls >= 0):
            raise ValueError(
                f"AdaptiveParams.min_uptime_ttls must be ≥ 0, got {self.min_uptime_ttls!r}"
            )
        if not (math.isfinite(self.backoff) and self.backoff >= 1):
            raise ValueError(f"AdaptiveParams.backoff must be ≥ 1, got {self.backoff!r}")


PolicyParams = (
    NoneParams | FixedParams | ThresholdParams | RatioParams | OracleParams | AdaptiveParams
)


# ----------------------------------------------------------------------------------------------
# State: immutable values, passed in and returned
# ----------------------------------------------------------------------------------------------

IntArray = npt.NDArray[np.int64]


def _ro(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Mark an array read-only: state is shared between the old and the new value."""
    a.flags.writeable = False
    return a


_SLOT_DTYPES: Final[Mapping[str, type]] = {
    "generation": np.int64, "falling": np.bool_, "learned": np.bool_, "k_seen": np.bool_,
    "ttl_seen": np.bool_,
}
_SLOT_FILL: Final[Mapping[str, float]] = {
    "generation": -1, "last_time": -math.inf, "falling": False, "learned": False,
    "k_seen": False, "ttl_seen": False, "spent": 0.0, "outbound_done": 0.0,
    "last_outbound": 0.0, "refetch_seen": 0.0, "refetch_estimated": 0.0,
}


@dataclass(frozen=True)
class Slots:
    """Per-instance scalars, one array element per instance (its *slot*), in order of first sight.

    Per generation: generation … falling. Learned in the ratio policy's measurement period and
    kept across generations: learned … modal_entries (adaptive relearns k and ttl). The
    adaptive policy's own: horizon … relearn_at.
    """

    names: tuple[str, ...]
    generation: IntArray  #: −1 before the first sample
    started_at: FloatArray
    first_seen: FloatArray  #: first sample of this generation the policy saw
    last_time: FloatArray  #: latest sample seen (−inf before the first)
    asked_at: FloatArray  #: sample time of our restart decision for this generation (NaN: none)
    #: what a fresh instance allocates: pages at the generation's first sample (A5); adaptive:
    #: the least of any generation (B1)
    start_pages: FloatArray
    measure_end: FloatArray  #: ratio: end of the measurement period (A11)
    falling: BoolArray  #: ratio: required was falling at the latest sample
    learned: BoolArray
    k: FloatArray
    k_seen: BoolArray
    ttl: FloatArray
    ttl_seen: BoolArray
    baseline_entries: FloatArray
    median_entries: FloatArray
    modal_entries: FloatArray
    #: adaptive: how long freed memory is expected to stay freed (s), halved on regrowth (B6)
    horizon: FloatArray
    #: adaptive: estimated extra auth calls of its restarts so far (B5)
    spent: FloatArray
    #: adaptive: outbound calls of the instance's finished generations (B5)
    outbound_done: FloatArray
    #: adaptive: O at the latest sample of the current generation
    last_outbound: FloatArray
    #: adaptive: pages of the previous generation when we restarted it (NaN: not ours, or
    #: checked) (B6)
    pre_pages: FloatArray
    #: adaptive: when this generation's growth is fitted for k and the TTL (NaN: done) (B7)
    relearn_at: FloatArray
    #: adaptive: the TTL the host last measured as its refetch interval (NaN: none yet) (B9)
    ttl_refetched: FloatArray
    #: adaptive: refetch calls observed after our restarts, summed (B2)
    refetch_seen: FloatArray
    #: adaptive: the refetch estimates (unscaled C) of those restarts, summed (B2)
    refetch_estimated: FloatArray
    #: adaptive: the unscaled C of our restart that made this generation, until its calls have
    #: been counted (NaN: nothing to count) (B2)
    check_c: FloatArray
    #: adaptive: at that restart: the calls it was charged (scaled C), the new-entry calls per
    #: ttl (M) and the ttl (B2)
    check_spent: FloatArray
    check_new: FloatArray
    check_ttl: FloatArray
    #: name → slot (derived from ``names``)
    slot_of: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    @staticmethod
    def arrays() -> list[str]:
        """Names of the per-slot array fields."""
        return [f.name for f in dataclasses.fields(Slots) if f.name not in ("names", "slot_of")]

    @staticmethod
    def empty() -> Slots:
        arrays: dict[str, Any] = {
            name: _ro(np.empty(0, dtype=_SLOT_DTYPES.get(name, np.float64)))
            for name in Slots.arrays()
        }
        return Slots(names=(), **arrays)

    def grown(self, names: Sequence[str]) -> Slots:
        """With slots for ``names`` appended (instances seen for the first time)."""
        if not names:
            return self
        all_names = (*self.names, *names)
        slot_of = MappingProxyType({name: i for i, name in enumerate(all_names)})
        grown: dict[str, Any] = {"names": all_names, "slot_of": slot_of}
        for name in Slots.arrays():
            old = getattr(self, name)
            extra = np.full(len(names), _SLOT_FILL.get(name, math.nan), dtype=old.dtype)
            grown[name] = _ro(np.concatenate((old, extra)))
        return Slots(**grown)

    def updated(self, at: IntArray, **values: npt.ArrayLike) -> Slots:
        """With ``values`` written at slots ``at`` (new arrays; this value is unchanged)."""
        changed = object.__new__(Slots)  # as dataclasses.replace, without re-validating
        fields = changed.__dict__
        fields.update(self.__dict__)
        for name, value in values.items():
            array = fields[name].copy()
            array[at] = value
            fields[name] = _ro(array)
        return changed


@dataclass(frozen=True)
class History:
    """Samples of the current generation of every instance: one table sorted by (slot, time).

    ``values`` holds the policy's columns (ratio: outbound, pages; oracle: live). A generation
    starting before its first sample begins with the known start (started_at, O = 0) (A6).
    """

    slot: IntArray
    time: FloatArray
    values: Mapping[str, FloatArray]

    @staticmethod
    def empty(*columns: str) -> History:
        f = _ro(np.empty(0))
        empty_slots = _ro(np.empty(0, dtype=np.int64))
        return History(empty_slots, f, MappingProxyType(dict.fromkeys(columns, f)))

    def append(self, slot: IntArray, time: FloatArray, values: Mapping[str, FloatArray]) -> History:
        """With rows added; they are sorted by (slot, time) and later than their slot's rows."""
        if len(slot) == 0:
            return self
        at = np.searchsorted(self.slot, slot, side="right")
        if at[0] == len(self.slot):  # after every row (one instance, or the last): no shifting
            def add(old: npt.NDArray[Any], new: npt.ArrayLike) -> npt.NDArray[Any]:
                return _ro(np.concatenate((old, np.asarray(new, dtype=old.dtype))))
        else:
            def add(old: npt.NDArray[Any], new: npt.ArrayLike) -> npt.NDArray[Any]:
                return _ro(np.insert(old, at, new))
        return History(add(self.slot, slot), add(self.time, time),
                       MappingProxyType({k: add(v, values[k]) for k, v in self.values.items()}))

    def without(self, slots: IntArray) -> History:
        """With every row of ``slots`` dropped (their generation ended)."""
        keep = ~np.isin(self.slot, slots)
        return self._take(keep)

    def keep_from(self, cut: FloatArray) -> History:
        """Drop rows before ``cut[slot]``, keeping each slot's last row at or before it."""
        if len(self.time) == 0:
            return self
        keep = self.time >= cut[self.slot]
        same_next = np.append(self.slot[1:] == self.slot[:-1], False)
        next_kept = np.append(keep[1:], False)
        keep |= (next_kept & same_next) | ~same_next  # the last row before the cut; a slot's last
        return self if keep.all() else self._take(keep)

    def segment(self, slot: int) -> slice:
        lo, hi = np.searchsorted(self.slot, [slot, slot + 1])
        return slice(int(lo), int(hi))

    def _take(self, keep: BoolArray) -> History:
        return History(
            _ro(self.slot[keep]),
            _ro(self.time[keep]),
            MappingProxyType({k: _ro(v[keep]) for k, v in self.values.items()}),
        )

    def lookups(self, slot: IntArray, *columns: tuple[str, float | None]) -> list[Lookup]:
        """For each (column, left): q ↦ column(q) of each row's ``slot``, vectorized over rows
        (q: one time per row, or a 2-D array of them, a row of times per query).

        Linear between a slot's rows; before its first row ``left``, or the first value if None;
        after its last row the last value. Every slot in ``slot`` must have rows. A composite
        key (slot · span + time) makes all slots searchable with one ``searchsorted``.
        """
        t0 = float(self.time.min())
        span = float(self.time.max()) - t0 + 2.0
        keys = self.slot * span + (self.time - t0)
        lo = np.searchsorted(self.slot, slot, side="left")
        hi = np.searchsorted(self.slot, slot, side="right") - 1

        def make(values: FloatArray, left: float | None) -> Lookup:
            before = values[lo] if left is None else left

            def at(q: FloatArray) -> FloatArray:
                # Keys stay inside the slot's band, so lo − 1 ≤ pos ≤ hi.
                qk = slot * span + np.minimum(np.maximum(q - t0, -0.5), span - 1.5)
                pos = np.searchsorted(keys, qk, side="right") - 1
                i0, i1 = np.maximum(pos, lo), np.minimum(pos + 1, hi)
                t_0, t_1 = self.time[i0], self.time[i1]
                width = np.where(t_1 > t_0, t_1 - t_0, 1.0)
                frac = np.minimum(np.maximum((q - t_0) / width, 0.0), 1.0)
                v = values[i0] + frac * (values[i1] - values[i0])
                return np.where(pos < lo, before, v)

            return at

        return [make(self.values[column], left) for column, left in columns]


@dataclass(frozen=True)
class PolicyState:
    """Everything a policy remembers between passes. Treat as opaque; see :func:`state_frame`."""

    policy: str
    slots: Slots = field(default_factory=Slots.empty)
    history: History = field(default_factory=History.empty)


def initial_state(params: PolicyParams) -> PolicyState:
    """The state before the first pass."""
    return PolicyState(params.name, Slots.empty(), History.empty(*_HISTORY_COLUMNS[params.name]))


_HISTORY_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "none": (), "fixed": (), "threshold": (), "ratio": ("outbound", "pages"), "oracle": ("live",),
    "adaptive": ("outbound", "pages", "requests"),
}


def state_frame(state: PolicyState) -> pd.DataFrame:
    """The per-instance part of a state as a frame (for status pages and logs), one row each."""
    s = state.slots
    frame = pd.DataFrame({name: getattr(s, name) for name in Slots.arrays()})
    return frame.assign(instance=list(s.names)).set_index("instance")


# ----------------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rows:
    """New samples, sorted by (slot, generation, time), as arrays."""

    slot: IntArray
    generation: IntArray
    started_at: FloatArray
    time: FloatArray
    pages: FloatArray
    allocated_bytes: FloatArray
    requests: FloatArray
    outbound: FloatArray
    live_bytes: FloatArray
    refetch_interval: FloatArray  #: the host's refetch interval (s; NaN: not seen) (B9)

    def take(self, mask: BoolArray) -> _Rows:
        if mask.all():
            return self
        return _Rows(*(getattr(self, f.name)[mask] for f in dataclasses.fields(self)))

    def segments(self) -> tuple[IntArray, IntArray]:
        """Start and end (exclusive) of each (slot, generation) run."""
        change = (np.diff(self.slot) != 0) | (np.diff(self.generation) != 0)
        starts = np.concatenate(([0], np.flatnonzero(change) + 1)).astype(np.int64)
        ends = np.append(starts[1:], len(self.time)).astype(np.int64)
        return starts, ends


@dataclass(frozen=True)
class _Verdict:
    """What a policy says about each row of a round, and its state after them."""

    restart: BoolArray
    #: Decision inputs per row (NaN: not used), e.g. required_pages.
    inputs: Mapping[str, FloatArray]
    #: reasons for the rows at the given indices (called only for the decided rows)
    explain: Callable[[IntArray], list[str]]
    slots: Slots
    history: History
    #: Called with the rows chosen for a restart, returns the slots after those restarts.
    on_restart: Callable[[Slots, IntArray], Slots] | None = None
    #: Per row, the mode a restart there runs in (None: ``warm`` for a warm policy, else the
    #: proxy's default).
    modes: npt.NDArray[np.str_] | None = None


_Policy = Callable[[Any, Slots, History, _Rows, IntArray, IntArray], _Verdict]


#: New samples: a frame, or its columns by name (see the module docstring).
Samples = pd.DataFrame | Mapping[str, Any]


def decide(
    state: PolicyState, new_samples: Samples, now: float, params: PolicyParams
) -> tuple[tuple[Decision, ...], PolicyState]:
    """Run one pass of the policy over the new samples (see the module docstring).

    Reads the :data:`~manager.estimate.OBSERVABLE_COLUMNS` of ``new_samples`` (and ``live_bytes``
    for the oracle). Returns the decisions and the new state; the inputs are not modified.
    """
    if state.policy != params.name:
        raise ValueError(f"state belongs to policy {state.policy!r}, not {params.name!r}")
    rows, slots = _read(new_samples, state.slots, isinstance(params, OracleParams))
    # Rows of older generations, or already seen, are ignored.
    current = slots.generation[rows.slot]
    rows = rows.take(
        (rows.generation > current)
        | ((rows.generation == current) & (rows.time > slots.last_time[rows.slot]))
    )
    state = dataclasses.replace(state, slots=slots)
    if len(rows.time) == 0:
        return (), state
    # Usually one generation per instance in a pass. If an instance has several, its k-th
    # generation goes in round k, so generations are handled in order.
    starts, ends = rows.segments()
    new_slot = np.append(True, rows.slot[starts[1:]] != rows.slot[starts[:-1]])
    if new_slot.all():  # one generation per instance (the usual pass): one round
        made, state = _round(state, rows, now, params, (starts, ends))
        return tuple(made), state
    first_of_slot = np.maximum.accumulate(np.where(new_slot, np.arange(len(starts)), 0))
    rounds = np.repeat(np.arange(len(starts)) - first_of_slot, ends - starts)
    decisions: list[Decision] = []
    for r in range(int(rounds.max()) + 1):
        made, state = _round(state, rows.take(rounds == r), now, params)
        decisions.extend(made)
    return tuple(decisions), state


def _read(frame: Samples, slots: Slots, with_live: bool) -> tuple[_Rows, Slots]:
    """The columns as sorted arrays, with instances mapped to slots (new ones added)."""
    present = frame.columns if isinstance(frame, pd.DataFrame) else frame.keys()
    missing = [c for c in OBSERVABLE_COLUMNS if c not in present]
    if with_live and "live_bytes" not in present:
        missing.append("live_bytes (the oracle needs ground truth)")
    if missing:
        raise ValueError(f"samples lack column(s) {', '.join(missing)}")

    def array(name: str, dtype: type) -> npt.NDArray[Any]:
        values = frame[name]
        if isinstance(values, pd.Series):
            return values.to_numpy(dtype=dtype)
        return np.asarray(values, dtype=dtype)

    instance = frame["instance"]
    names: list[str] = list(map(str, instance.tolist() if isinstance(instance, pd.Series)
                                else instance))
    # A hash lookup per row, as in any join; new instances get the next slots.
    new = [name for name in dict.fromkeys(names) if name not in slots.slot_of]
    slots = slots.grown(new)
    slot = np.fromiter(map(slots.slot_of.__getitem__, names), dtype=np.int64, count=len(names))
    generation = array("generation", np.int64)
    time = array("time", np.float64)
    if not np.isfinite(time).all():
        raise ValueError("samples have a time that is not a finite number")
    order = np.lexsort((time, generation, slot))

    def col(name: str) -> FloatArray:
        return array(name, np.float64)[order]

    rows = _Rows(
        slot=slot[order], generation=generation[order], started_at=col("started_at"),
        time=time[order], pages=col("allocated_pages"), allocated_bytes=col("allocated_bytes"),
        requests=col("requests"), outbound=col("outbound"),
        live_bytes=col("live_bytes") if with_live else np.full(len(order), np.nan),
        refetch_interval=(col(OPTIONAL_COLUMNS[0]) if OPTIONAL_COLUMNS[0] in present
                          else np.full(len(order), np.nan)),
    )
    return rows, slots


def _round(
    state: PolicyState, rows: _Rows, now: float, params: PolicyParams,
    segments: tuple[IntArray, IntArray] | None = None,
) -> tuple[list[Decision], PolicyState]:
    """Decide for rows holding at most one generation per instance (`segments`: theirs, when
    known)."""
    starts, ends = segments or rows.segments()
    seg_slot = rows.slot[starts]
    slots, history = state.slots, state.history
    entering = rows.generation[starts] != slots.generation[seg_slot]
    if entering.any():
        slots, history = _enter(params, slots, history, rows, starts[entering])
    verdict = _POLICIES[type(params)](params, slots, history, rows, starts, ends)
    slots = verdict.slots
    asked = slots.asked_at[rows.slot]
    with np.errstate(invalid="ignore"):
        blocked = rows.time < asked + params.retry_after_s  # NaN (never asked): False
    first = _first_per_segment(verdict.restart & ~blocked, starts, ends)
    restarting = first >= 0
    chosen = np.where(restarting, first, ends - 1)

    decisions = []
    page_bytes = _page_bytes(params)
    inputs = {
        name: [None if math.isnan(v) else v for v in values[chosen].tolist()]
        for name, values in verdict.inputs.items()
    }
    reasons = verdict.explain(chosen)
    warm_policy = params.restart_mode == "warm"
    for j, (i, restart) in enumerate(zip(chosen.tolist(), restarting.tolist(), strict=True)):
        mode: Literal["cold", "warm"] | None = None
        if restart and verdict.modes is not None:
            mode = "cold" if verdict.modes[i] == "cold" else "warm"
        elif restart and warm_policy:
            mode = "warm"
        reason = reasons[j]
        if not restart and blocked[i] and verdict.restart[i]:
            reason = (
                f"keep: a restart of generation {rows.generation[i]} was asked at "
                f"{asked[i]:.1f}; waiting for the new generation (rule: {reason})"
            )
        elif not restart and not reason.startswith("keep"):
            reason = f"keep: {reason}"
        time = float(rows.time[i])
        decisions.append(
            Decision(
                instance=slots.names[rows.slot[i]],
                generation=int(rows.generation[i]),
                time=time,
                decided_at=now,
                policy=params.name,
                action="restart" if restart else "keep",
                reason=reason,
                uptime_s=time - float(rows.started_at[i]),
                allocated_pages=int(rows.pages[i]),
                allocated_bytes=int(rows.allocated_bytes[i]),
                requests=int(rows.requests[i]),
                outbound=int(rows.outbound[i]),
                page_bytes=page_bytes,
                mode=mode,
                **{name: values[j] for name, values in inputs.items()},
            )
        )
    slots = slots.updated(seg_slot, last_time=rows.time[ends - 1])
    if restarting.any():
        slots = slots.updated(seg_slot[restarting], asked_at=rows.time[chosen[restarting]])
        if verdict.on_restart is not None:
            slots = verdict.on_restart(slots, chosen[restarting])
    return decisions, PolicyState(state.policy, slots, verdict.history)


def _first_per_segment(mask: BoolArray, starts: IntArray, ends: IntArray) -> IntArray:
    """Index of the first True of each segment, or −1."""
    n = len(mask)
    first = np.minimum.reduceat(np.where(mask, np.arange(n), n), starts)
    return np.where(first < ends, first, -1)


def _enter(
    params: PolicyParams, slots: Slots, history: History, rows: _Rows, firsts: IntArray
) -> tuple[Slots, History]:
    """Start new generations at rows ``firsts``: per-generation state starts afresh (A6, A11)."""
    at = rows.slot[firsts]
    time = rows.time[firsts]
    start_pages = rows.pages[firsts]
    measure_end = time + (params.estimator.measure_s if isinstance(params, RatioParams) else 0.0)
    if isinstance(params, AdaptiveParams):
        slots = _adaptive_enter(params, slots, rows, firsts)
        # a fresh instance's pages: the least seen (B1)
        start_pages = np.fmin(slots.start_pages[at], start_pages)
    slots = slots.updated(
        at, generation=rows.generation[firsts], started_at=rows.started_at[firsts],
        first_seen=time, last_time=-math.inf, asked_at=math.nan, start_pages=start_pages,
        measure_end=measure_end, falling=False,
    )
    history = history.without(at)
    if isinstance(params, RatioParams | AdaptiveParams):  # the known start, O = 0 (A6)
        early = rows.started_at[firsts] < time
        zeros = np.zeros(int(early.sum()))
        start = {"outbound": zeros, "pages": rows.pages[firsts][early], "requests": zeros}
        history = history.append(
            at[early], rows.started_at[firsts][early],
            {name: start[name] for name in history.values},
        )
    return slots, history


def _page_bytes(params: PolicyParams) -> int:
    if isinstance(params, RatioParams | AdaptiveParams):
        return params.estimator.page_bytes
    return WASM_PAGE_BYTES


def _mib(pages: float, page_bytes: int) -> str:
    return f"{pages * page_bytes / MIB:.1f} MiB"


# ----------------------------------------------------------------------------------------------
# none, fixed, threshold
# ----------------------------------------------------------------------------------------------


def _none(
    params: NoneParams, slots: Slots, history: History, rows: _Rows, starts: IntArray,
    ends: IntArray,
) -> _Verdict:
    restart = np.zeros(len(rows.time), dtype=np.bool_)

    def explain(chosen: IntArray) -> list[str]:
        return ["keep: policy none never restarts"] * len(chosen)

    return _Verdict(restart, {}, explain, slots, history)


def _fixed(
    params: FixedParams, slots: Slots, history: History, rows: _Rows, starts: IntArray,
    ends: IntArray,
) -> _Verdict:
    uptime = rows.time - rows.started_at
    restart = uptime >= params.uptime_s

    def explain(chosen: IntArray) -> list[str]:
        limit = f"{params.uptime_s / 60:g} min"
        return [
            f"uptime {u / 60:.1f} min {'≥' if r else '<'} {limit}"
            for u, r in zip(uptime[chosen].tolist(), restart[chosen].tolist(), strict=True)
        ]

    return _Verdict(restart, {}, explain, slots, history)


def _threshold(
    params: ThresholdParams, slots: Slots, history: History, rows: _Rows, starts: IntArray,
    ends: IntArray,
) -> _Verdict:
    restart = rows.allocated_bytes >= params.allocated_bytes

    def explain(chosen: IntArray) -> list[str]:
        limit = f"threshold {params.allocated_bytes / MIB:g} MiB"
        allocated = rows.allocated_bytes[chosen].tolist()
        return [
            f"allocated {b / MIB:.1f} MiB {'≥' if r else '<'} {limit}"
            for b, r in zip(allocated, restart[chosen].tolist(), strict=True)
        ]

    return _Verdict(restart, {}, explain, slots, history)


# ----------------------------------------------------------------------------------------------
# ratio: the paper's rule
# ----------------------------------------------------------------------------------------------


def _learn(
    params: RatioParams, slots: Slots, history: History, at: IntArray, until: FloatArray
) -> Slots:
    """Fit k and TTL and compute the baseline for slots ``at`` whose measurement period ended at
    ``until`` (the time of their first decision). One fit per instance, once (~1 ms each)."""
    est = params.estimator
    learned: dict[str, list[float]] = {
        f: [] for f in ("k", "k_seen", "ttl", "ttl_seen", "baseline_entries", "median_entries",
                        "modal_entries")
    }
    for slot, end in zip(at.tolist(), until.tolist(), strict=True):
        seg = history.segment(slot)
        t = history.time[seg]
        mine = (t >= slots.first_seen[slot]) & (t <= end)  # the samples, not the known start
        t, o = t[mine], history.values["outbound"][seg][mine]
        p = history.values["pages"][seg][mine]
        started_at = float(slots.started_at[slot])
        fit = fit_growth(t, o, p, started_at, est)
        b = baseline_from_entries(
            measurement_entries(t, o, started_at, fit, est), float(slots.start_pages[slot]),
            fit.k, est,
        )
        for name, value in (
            ("k", fit.k), ("k_seen", fit.k_seen), ("ttl", fit.ttl), ("ttl_seen", fit.ttl_seen),
            ("baseline_entries", b.entries), ("median_entries", b.median_entries),
            ("modal_entries", b.modal_entries),
        ):
            learned[name].append(value)
    return slots.updated(at, learned=True, **learned)


@dataclass(frozen=True)
class RuleChecks:
    """The three conditions of the paper's rule, per sample, and their conjunction."""

    above: BoolArray  #: allocated ≥ baseline
    falling: BoolArray  #: required falls (or turned to falling, with require_turn)
    rising: BoolArray  #: surplus rises, by more than required changes
    restart: BoolArray  #: all three


def falling_threshold(params: RatioParams, sd: FloatArray | float) -> FloatArray:
    """How many pages required must fall over the trend window to count as falling."""
    return np.maximum(params.trend_min_pages, params.trend_noise_z * np.asarray(sd))


def ratio_rule(
    allocated_pages: FloatArray,
    baseline_pages: FloatArray | float,
    required_change: FloatArray,
    surplus_change: FloatArray,
    params: RatioParams,
    *,
    required_change_sd: FloatArray | float = 0.0,
    was_falling: BoolArray | None = None,
) -> RuleChecks:
    """The decision loop's rule (paper §3, SPEC §5.4), vectorized over samples.

    Restart when P ≥ baseline, and R has turned to decreasing: ΔR over the trend window is below
    −max(``trend_min_pages``, ``trend_noise_z`` · ``required_change_sd``) (and, with
    ``require_turn``, R was not falling at the previous sample, ``was_falling``), and S is
    increasing: ΔS > 0 and ΔS > ΔR (the increase of surplus exceeds the increase of required)
    (A9). NaN inputs fail their condition.
    """
    above = np.asarray(allocated_pages >= baseline_pages, dtype=np.bool_)
    falling = required_change < -falling_threshold(params, required_change_sd)
    if params.require_turn and was_falling is not None:
        falling = falling & ~was_falling
    rising = (surplus_change > 0) & (surplus_change > required_change)
    return RuleChecks(above, falling, rising, above & falling & rising)


def _ratio(
    params: RatioParams, slots: Slots, history: History, rows: _Rows, starts: IntArray,
    ends: IntArray,
) -> _Verdict:
    est = params.estimator
    n = len(rows.time)
    slot = rows.slot
    history = history.append(slot, rows.time, {"outbound": rows.outbound, "pages": rows.pages})
    measuring = ~slots.learned[slot] & (rows.time < slots.measure_end[slot])
    firsts = _first_per_segment(~slots.learned[slot] & ~measuring, starts, ends)
    firsts = firsts[firsts >= 0]
    is_first = np.zeros(n, dtype=np.bool_)
    is_first[firsts] = True
    if len(firsts):
        slots = _learn(params, slots, history, slot[firsts], rows.time[firsts])

    k, ttl, start = slots.k[slot], slots.ttl[slot], slots.start_pages[slot]
    baseline = start + slots.baseline_entries[slot] / k
    # O is 0 before the generation's first point; P is clamped to its first value (A6).
    outbound_of, pages_of = history.lookups(slot, ("outbound", 0.0), ("pages", None))
    a = assess(
        rows.time, rows.pages, outbound_of, pages_of,
        start_pages=start, k=np.where(measuring, 1.0, k), ttl=np.where(measuring, 0.0, ttl),
        window_s=est.trend_window_s,
    )
    threshold = falling_threshold(params, a.required_change_sd)
    falling = ~measuring & (a.required_change < -threshold)
    was_falling = np.append(False, falling[:-1])  # at the previous sample of the instance
    was_falling[starts] = slots.falling[slot[starts]]
    rule = ratio_rule(
        rows.pages, baseline, a.required_change, a.surplus_change, params,
        required_change_sd=a.required_change_sd, was_falling=was_falling,
    )
    above, falling_rule, rising = rule.above, rule.falling, rule.rising
    restart = ~measuring & rule.restart
    if params.first_decision_restarts:
        restart |= is_first

    def hide(x: FloatArray) -> FloatArray:
        return np.where(measuring, np.nan, x)

    inputs = {
        "required_pages": hide(a.required), "surplus_pages": hide(a.surplus),
        "baseline_pages": hide(baseline), "estimated_entries": hide(a.entries),
        "ttl_s": hide(ttl), "k": hide(k),
    }

    pb, window = est.page_bytes, est.trend_window_s
    turn = "turn to " if params.require_turn else ""

    def one(
        measuring: bool, first: bool, restart: bool, above: bool, falling: bool, rising: bool,
        pages: float, baseline: float, dr: float, ds: float, threshold: float, ttl: float,
        k: float, observed: float, ttl_seen: bool, k_seen: bool,
    ) -> str:
        if measuring:
            return (
                f"keep: measuring, {observed:.0f} s of {est.measure_s:.0f} s observed; "
                "no decision before the measurement period ends"
            )
        base_txt = f"baseline {baseline:.1f} pages ({_mib(baseline, pb)})"
        if first and params.first_decision_restarts:
            return (
                "first decision after the measurement period restarts (paper §3); learned "
                f"ttl {ttl:.0f} s ({'seen' if ttl_seen else 'not seen: cap'}), "
                f"k {k:.1f} entries/page ({'seen' if k_seen else 'default'}), {base_txt}"
            )
        alloc = f"allocated {pages:.0f} pages ({_mib(pages, pb)})"
        parts = [
            (above, f"{alloc} ≥ {base_txt}", f"{alloc} < {base_txt}"),
            (
                falling,
                f"required fell {-dr:.1f} pages in {window:.0f} s",
                f"required did not {turn}fall (change {dr:+.1f} pages in {window:.0f} s, "
                f"needs < {-threshold:.1f})",
            ),
            (
                rising,
                f"surplus rose {ds:+.1f} pages, more than required ({dr:+.1f})",
                f"surplus did not rise more than required ({ds:+.1f} vs {dr:+.1f} pages)",
            ),
        ]
        if restart:
            return "; ".join(yes for _, yes, _ in parts)
        return "keep: " + "; ".join(no for ok, _, no in parts if not ok)

    def explain(chosen: IntArray) -> list[str]:
        s = slot[chosen]
        columns = (
            measuring, is_first, restart, above, falling_rule, rising, rows.pages, baseline,
            a.required_change, a.surplus_change, threshold, ttl, k,
            rows.time - slots.first_seen[slot],
        )
        values = [c[chosen].tolist() for c in columns]
        values += [slots.ttl_seen[s].tolist(), slots.k_seen[s].tolist()]
        return [one(*v) for v in zip(*values, strict=True)]

    # Per instance: whether required was falling at its latest sample; history back to the
    # oldest point a later lookup needs (t − ttl − L), or all of it while measuring.
    last = ends - 1
    seg_slot = slot[starts]
    slots = slots.updated(seg_slot, falling=falling[last])
    cut = np.full(len(slots.names), -math.inf)
    cut[seg_slot] = np.where(
        measuring[last], -math.inf, rows.time[last] - ttl[last] - est.trend_window_s
    )
    return _Verdict(restart, inputs, explain, slots, history.keep_from(cut))


# ----------------------------------------------------------------------------------------------
# oracle: ground truth
# ----------------------------------------------------------------------------------------------


def _oracle(
    params: OracleParams, slots: Slots, history: History, rows: _Rows, starts: IntArray,
    ends: IntArray,
) -> _Verdict:
    slot, live = rows.slot, rows.live_bytes
    history = history.append(slot, rows.time, {"live": live})
    (live_of,) = history.lookups(slot, ("live", None))
    live_before = live_of(rows.time - params.window_s)
    fresh = slots.start_pages[slot] * WASM_PAGE_BYTES + live  # what a fresh one would allocate
    reclaimable = rows.allocated_bytes - fresh
    with np.errstate(invalid="ignore"):
        restart = (
            (reclaimable >= params.min_reclaim_bytes)
            & (reclaimable >= params.surplus_ratio * live)
            & (live <= live_before)
        )
    inputs = {
        "live_bytes": live,
        "true_required_pages": fresh / WASM_PAGE_BYTES,
        "true_surplus_pages": reclaimable / WASM_PAGE_BYTES,
    }

    def one(live: float, before: float, reclaimable: float, restart: bool) -> str:
        if not math.isfinite(live):
            return "keep: no ground truth (live_bytes missing)"
        text = (
            f"true surplus {reclaimable / MIB:.1f} MiB vs live {live / MIB:.1f} MiB (needs "
            f"≥ {params.surplus_ratio:g}× live and ≥ {params.min_reclaim_bytes / MIB:g} MiB); "
            f"live {'not rising' if live <= before else 'rising'} over {params.window_s:g} s"
        )
        return text if restart else f"keep: {text}"

    def explain(chosen: IntArray) -> list[str]:
        columns = (live, live_before, reclaimable, restart)
        return [one(*v) for v in zip(*(c[chosen].tolist() for c in columns), strict=True)]

    cut = np.full(len(slots.names), -math.inf)
    cut[slot[starts]] = rows.time[ends - 1] - params.window_s
    return _Verdict(restart, inputs, explain, slots, history.keep_from(cut))


# ----------------------------------------------------------------------------------------------
# adaptive: a cost model on host-visible data
# ----------------------------------------------------------------------------------------------


def _carried(values: FloatArray, slot: IntArray, before: FloatArray) -> FloatArray:
    """Per row, the latest non-NaN value of ``values`` among the rows of its slot up to it
    (rows sorted by slot), else ``before`` (the slot's value from earlier passes)."""
    n = len(values)
    index = np.arange(n)
    first = np.maximum.accumulate(np.where(np.append(True, slot[1:] != slot[:-1]), index, 0))
    latest = np.maximum.accumulate(np.where(np.isnan(values), -1, index))
    return np.where(latest >= first, values[np.maximum(latest, 0)], before)


def _adaptive_enter(
    params: AdaptiveParams, slots: Slots, rows: _Rows, firsts: IntArray
) -> Slots:
    """Per-instance bookkeeping when generations start at rows ``firsts`` (before the generic
    reset): defaults for k and the TTL on first sight, the previous generation's calls, and
    the pages it had if we restarted it (for the regrowth check, B6)."""
    at = rows.slot[firsts]
    est = params.estimator
    new = np.isnan(slots.k[at])
    ours = ~np.isnan(slots.asked_at[at]) & (slots.generation[at] >= 0)
    return slots.updated(
        at,
        k=np.where(new, est.k_default, slots.k[at]),
        ttl=np.where(new, est.ttl_cap_s, slots.ttl[at]),
        k_seen=np.where(new, False, slots.k_seen[at]),
        ttl_seen=np.where(new, False, slots.ttl_seen[at]),
        horizon=np.where(new, params.horizon_s, slots.horizon[at]),
        outbound_done=slots.outbound_done[at] + slots.last_outbound[at],
        last_outbound=0.0,
        pre_pages=np.where(ours, slots.pre_pages[at], math.nan),
        check_c=np.where(ours, slots.check_c[at], math.nan),
        relearn_at=rows.started_at[firsts] + est.measure_s,
    )


def _adaptive_relearn(
    params: AdaptiveParams, slots: Slots, history: History, at: IntArray
) -> Slots:
    """Refit k and the TTL on the first ``measure_s`` of the generations of slots ``at`` (B7).

    A fit replaces a value only when it saw it (k: the pages grew ``min_growth_pages``; TTL:
    expiry showed as a page deficit); an unseen TTL keeps the previous one rather than falling
    back to the cap. The window is the generation's start, the same as the paper's measurement
    period: a longer window mid-growth fitted 112–289 s TTLs and caused restart storms.
    """
    est = params.estimator
    k, ttl = slots.k[at].copy(), slots.ttl[at].copy()
    k_seen, ttl_seen = slots.k_seen[at].copy(), slots.ttl_seen[at].copy()
    for j, slot in enumerate(at.tolist()):
        seg = history.segment(slot)
        t = history.time[seg]
        mine = (t >= slots.first_seen[slot]) & (t <= slots.relearn_at[slot])
        fit = fit_growth(
            t[mine], history.values["outbound"][seg][mine], history.values["pages"][seg][mine],
            float(slots.started_at[slot]), est,
        )
        if fit.k_seen:
            k[j], k_seen[j] = fit.k, True
        if fit.ttl_seen:
            ttl[j], ttl_seen[j] = fit.ttl, True
    return slots.updated(
        at, k=k, ttl=ttl, k_seen=k_seen, ttl_seen=ttl_seen, relearn_at=math.nan, learned=True
    )


@dataclass(frozen=True)
class AdaptiveInputs:
    """What the adaptive rule weighs at each sample (pages, calls, seconds)."""

    entries: FloatArray  #: N, estimated live entries
    required: FloatArray  #: R = start pages + N/k, at most P
    surplus: FloatArray  #: S = P − R
    extra_calls: FloatArray  #: C, the dropped entries expected to be asked for again (B2)
    fresh: FloatArray  #: pages a fresh instance would grow to within one ttl (B3)
    freed: FloatArray  #: F = P − fresh, what the restart frees
    rising: BoolArray  #: N grew over the trend window
    benefit: FloatArray  #: F · horizon, page-seconds
    cost: FloatArray  #: C · call_cost_page_s, page-seconds
    budget_left: FloatArray  #: calls the budget still allows
    restart: BoolArray


def refetched(entries: FloatArray, hits: FloatArray) -> FloatArray:
    """Expected live entries asked for again before they expire: C = N · (1 − (1 − e^−x)/x).

    x = H/N is the hits per live entry over one ttl. If the H hits of the last ttl fall on the
    N live entries as independent arrivals, an entry with remaining life r (uniform over the ttl)
    is asked for again with probability 1 − e^(−x·r/ttl); the mean over r is the factor above.
    It is ≤ min(N, H): ≈ H/2 when hits are few (most entries are never asked for again), → N
    when every entry is hit many times (B2). 0 when N or H is 0; NaN when either is NaN.
    """
    n = np.maximum(np.asarray(entries, dtype=np.float64), 0.0)
    h = np.maximum(np.asarray(hits, dtype=np.float64), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = h / n
        c = n * (x + np.expm1(-x)) / x
    return np.where((n > 0) & (h > 0), c, n * h)  # n · h: 0, or NaN


def refetch_scale(seen: FloatArray, estimated: FloatArray) -> FloatArray:
    """The calls our restarts really caused per call of C: Σ seen / Σ C, within
    [``REFETCH_SCALE_FLOOR``, 1]; 1 before any restart of ours was counted (B2).

    Never above 1: C already assumes every live entry that is hit is asked for again, so more
    observed calls are the traffic's own noise. Never below the floor: one quiet hour after a
    restart must not make calls free.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.clip(seen / estimated, REFETCH_SCALE_FLOOR, 1.0)
    return np.where(estimated > 0, ratio, 1.0)


#: The least :func:`refetch_scale` (B2).
REFETCH_SCALE_FLOOR: Final = 0.1


def adaptive_rule(
    *, uptime: FloatArray, pages: FloatArray, entries: FloatArray, entries_before: FloatArray,
    hits: FloatArray, new_entries: FloatArray, start_pages: FloatArray | float,
    k: FloatArray | float, ttl: FloatArray | float, horizon: FloatArray | float,
    spent: FloatArray | float, outbound_total: FloatArray | float,
    refetch_scale: FloatArray | float = 1.0, params: AdaptiveParams,
) -> AdaptiveInputs:
    """The adaptive rule (see :class:`AdaptiveParams`), vectorized over samples.

    ``entries``/``entries_before``: N now and one trend window ago; ``hits``: requests of the
    last ttl without an outbound call; ``new_entries``: the entries the current traffic makes
    in one ttl (the outbound calls of the last trend window, scaled to one ttl);
    ``outbound_total``: the instance's calls over all its generations; ``refetch_scale``: the
    calls our earlier restarts really caused per call of C (:func:`refetch_scale`). NaN inputs
    fail their condition.
    """
    required = np.minimum(start_pages + entries / k, pages)
    surplus = pages - required
    if params.restart_mode == "warm":
        # A warm restart keeps the live cache: no auth call, and the fresh instance holds N.
        extra = np.zeros_like(np.asarray(entries, dtype=np.float64))
        fresh = required
    else:
        # A cold one: the fresh instance holds what the traffic makes anew, and the dropped
        # entries that are asked for again (B2, B3).
        extra = refetched(entries, hits) * refetch_scale
        fresh = np.minimum(start_pages + (new_entries + extra) / k, pages)
    freed = pages - fresh
    rising = entries > entries_before
    benefit = freed * horizon
    budget = np.asarray(params.budget_share * outbound_total, dtype=np.float64)
    budget_left = budget - spent
    cost = extra * params.call_cost_page_s
    if params.budget_pricing:
        with np.errstate(invalid="ignore", divide="ignore"):
            used = np.clip((spent + extra) / budget, 0.0, 1.0)
        cost = np.where(extra > 0, cost * used, 0.0)
    with np.errstate(invalid="ignore"):
        restart = (
            (uptime >= params.min_uptime_ttls * np.asarray(ttl))
            & (freed >= params.min_free_pages)
            & (benefit >= cost)
            & ~rising
            & (extra <= budget_left)
        )
    return AdaptiveInputs(
        entries, required, surplus, extra, fresh, freed, rising, benefit, cost, budget_left,
        restart,
    )


@functools.lru_cache(maxsize=16)
def _cold_twin(params: AdaptiveParams) -> AdaptiveParams:
    """A warm policy's cold restarts: its parameters in cold mode on the cold budget (B8)."""
    return dataclasses.replace(params, restart_mode="cold", budget_share=params.cold_budget_share)


def _adaptive(
    params: AdaptiveParams, slots: Slots, history: History, rows: _Rows, starts: IntArray,
    ends: IntArray,
) -> _Verdict:
    est = params.estimator
    slot = rows.slot
    history = history.append(
        slot, rows.time,
        {"outbound": rows.outbound, "pages": rows.pages, "requests": rows.requests},
    )
    # Refit k and the TTL once the generation's fitting window has passed (B7). Rows before the
    # end of the window keep the values they had, so that how the samples are split into passes
    # does not matter.
    last = ends - 1
    relearn_at = slots.relearn_at[slot]
    k, ttl = slots.k[slot], slots.ttl[slot]
    due = rows.time[last] >= slots.relearn_at[slot[last]]  # NaN: done
    if due.any():
        slots = _adaptive_relearn(params, slots, history, slot[last][due])
        with np.errstate(invalid="ignore"):
            fitted = rows.time >= relearn_at
        k, ttl = np.where(fitted, slots.k[slot], k), np.where(fitted, slots.ttl[slot], ttl)

    # The TTL the host sees (B9): where the generation has repeated its outbound calls often
    # enough, the refetch interval (at most the cap) replaces the fitted or default TTL, from
    # that row on and in later generations of the instance until it says otherwise.
    refetched = _carried(np.minimum(rows.refetch_interval, est.ttl_cap_s), slot,
                         slots.ttl_refetched[slot])
    ttl = np.where(np.isnan(refetched), ttl, refetched)
    slots = slots.updated(slot[last], ttl_refetched=refetched[last])

    # Back-off (B6), checked once after each of our restarts: memory back at its pre-restart
    # size within one ttl (the horizon shrinks), or not (it grows back). The first row that
    # settles it decides, and the rows from it on use the new horizon.
    uptime = rows.time - rows.started_at
    pre = slots.pre_pages[slot]
    with np.errstate(invalid="ignore"):
        regrew = (uptime <= ttl) & (rows.pages >= pre)
        held = (uptime > ttl) & ~np.isnan(pre)
    settled = _first_per_segment(regrew | held, starts, ends)
    seg_slot = slot[starts]
    checked = settled >= 0
    at = np.where(checked, settled, starts)
    old = slots.horizon[seg_slot]
    new = np.where(regrew[at], old / params.backoff,
                   np.minimum(old * params.backoff, params.horizon_s))
    new = np.where(checked, new, old)
    segment = np.repeat(np.arange(len(starts)), ends - starts)
    since = checked[segment] & (np.arange(len(rows.time)) >= settled[segment])
    horizon = np.where(since, new[segment], old[segment])
    slots = slots.updated(
        seg_slot, horizon=new, pre_pages=np.where(checked, math.nan, slots.pre_pages[seg_slot]),
    )

    outbound_of, requests_of = history.lookups(slot, ("outbound", 0.0), ("requests", 0.0))
    window = est.trend_window_s

    # Calibration of C (B2), once per restart of ours, two of its ttls into the new generation:
    # the calls of the first ttl, less the calls the traffic makes anew (the mean of the rate
    # before the restart and of the second ttl's), are the refetches the restart caused. They
    # replace the estimate in the budget, and the rows from then on use the new scale.
    check_ttl = slots.check_ttl[slot]
    with np.errstate(invalid="ignore"):
        counted = ~np.isnan(slots.check_c[slot]) & (uptime >= 2 * check_ttl)
    settled = _first_per_segment(counted, starts, ends)
    scale = refetch_scale(slots.refetch_seen[slot], slots.refetch_estimated[slot])
    if (settled >= 0).any():
        done = settled[settled >= 0]
        at = slot[done]
        first, two = outbound_of(
            np.stack((rows.started_at + check_ttl, rows.started_at + 2 * check_ttl))
        )[:, done]
        second = two - first
        seen = np.maximum(first - (slots.check_new[at] + second) / 2, 0.0)
        slots = slots.updated(
            at, refetch_seen=slots.refetch_seen[at] + seen,
            refetch_estimated=slots.refetch_estimated[at] + slots.check_c[at],
            spent=np.maximum(slots.spent[at] + seen - slots.check_spent[at], 0.0),
            check_c=math.nan,
        )
        since = (settled[segment] >= 0) & (np.arange(len(rows.time)) >= settled[segment])
        scale = np.where(
            since, refetch_scale(slots.refetch_seen[slot], slots.refetch_estimated[slot]), scale
        )
    # one lookup for all the times each column is wanted at (the rows of a 2-D query)
    t = rows.time
    o_now, o_ttl, o_window, o_window_ttl = outbound_of(
        np.stack((t, t - ttl, t - window, t - window - ttl))
    )
    q_now, q_ttl = requests_of(np.stack((t, t - ttl)))
    entries = np.maximum(o_now - o_ttl, 0.0)
    entries_before = np.maximum(o_window - o_window_ttl, 0.0)
    hits = (q_now - q_ttl) - entries
    new_entries = np.maximum(o_now - o_window, 0.0) * ttl / window
    rule = functools.partial(
        adaptive_rule,
        uptime=uptime, pages=rows.pages, entries=entries, entries_before=entries_before,
        hits=hits, new_entries=new_entries, start_pages=slots.start_pages[slot], k=k, ttl=ttl,
        horizon=horizon,
        spent=slots.spent[slot], outbound_total=slots.outbound_done[slot] + rows.outbound,
        refetch_scale=scale,
    )
    a = rule(params=params)
    modes = None
    if params.restart_mode == "warm" and params.cold_budget_share > 0:
        # A cold restart frees the cache nobody asks for again: where one passes the rule on
        # a small budget of its own and frees more than a warm one, the restart runs cold (B8).
        # Each row takes the figures of the mode it runs in.
        cold = rule(params=_cold_twin(params))
        with np.errstate(invalid="ignore"):
            free = cold.restart & (cold.freed > a.freed)
        modes = np.where(free, "cold", "warm")
        a = AdaptiveInputs(*(
            np.where(free, getattr(cold, f.name), getattr(a, f.name))
            for f in dataclasses.fields(AdaptiveInputs)
        ))
    inputs = {
        "required_pages": a.required, "surplus_pages": a.surplus,
        "estimated_entries": a.entries, "ttl_s": ttl, "k": k,
    }

    def one(
        restart: bool, pages: float, s: float, n: float, c: float, fresh: float, freed: float,
        hz: float, benefit: float, cost: float, rising: bool, left: float, up: float,
        ttl: float, k: float, scale: float,
    ) -> str:
        frees = (
            f"frees {freed:.1f} pages (a fresh instance grows to {fresh:.1f}) × "
            f"{hz / 3600:.1f} h = {benefit:,.0f} page·s"
        )
        price = cost / c if c > 0 else params.call_cost_page_s
        learned = f" ({scale:.2f} of the estimate, as measured)" if scale < 1 else ""
        calls = f"{c:.0f} extra calls{learned} × {price:,.0f} page·s = {cost:,.0f}"
        parts = [
            (up >= params.min_uptime_ttls * ttl,
             f"uptime {up / 60:.0f} min < {params.min_uptime_ttls:g} ttl ({ttl:.0f} s)"),
            (freed >= params.min_free_pages,
             f"frees {freed:.1f} pages < {params.min_free_pages:g}"),
            (benefit >= cost, f"{frees} < {calls}"),
            (not rising, "live entries rising"),
            (c <= left, f"budget: {c:.0f} extra calls > {max(left, 0):.0f} left"),
        ]
        head = (
            f"allocated {pages:.0f} pages, required {pages - s:.1f} (N {n:.0f}, k {k:.0f}, "
            f"ttl {ttl:.0f} s)"
        )
        if restart:
            return f"{head}; {frees} ≥ {calls}"
        return f"keep: {head}; " + "; ".join(why for ok, why in parts if not ok)

    def explain(chosen: IntArray) -> list[str]:
        columns = (
            a.restart, rows.pages, a.surplus, a.entries, a.extra_calls, a.fresh, a.freed,
            horizon, a.benefit, a.cost, a.rising, a.budget_left, uptime, ttl, k, scale,
        )
        reasons = [one(*v) for v in zip(*(c[chosen].tolist() for c in columns), strict=True)]
        if modes is None:
            return reasons
        return [
            f"{r}; cold: frees more than warm, within {params.cold_budget_share:.2%} of the "
            "calls" if m == "cold" and not r.startswith("keep") else r
            for r, m in zip(reasons, modes[chosen].tolist(), strict=True)
        ]

    def on_restart(after: Slots, chosen: IntArray) -> Slots:
        at = slot[chosen]
        after = after.updated(
            at, spent=after.spent[at] + a.extra_calls[chosen], pre_pages=rows.pages[chosen]
        )
        if modes is not None:  # only cold restarts have calls to count (B2)
            chosen = chosen[modes[chosen] == "cold"]
            at = slot[chosen]
        elif params.restart_mode == "warm":
            return after
        return after.updated(
            at, check_c=a.extra_calls[chosen] / scale[chosen], check_spent=a.extra_calls[chosen],
            check_new=new_entries[chosen], check_ttl=ttl[chosen],
        )

    slots = slots.updated(seg_slot, last_outbound=rows.outbound[last])
    # History: back to t − ttl − L, or all of the generation until its fit has run.
    cut = np.full(len(slots.names), -math.inf)
    cut[seg_slot] = np.where(
        np.isnan(slots.relearn_at[seg_slot]), rows.time[last] - ttl[last] - window, -math.inf
    )
    return _Verdict(
        a.restart, inputs, explain, slots, history.keep_from(cut), on_restart, modes
    )


_POLICIES: Final[Mapping[type, _Policy]] = {
    NoneParams: _none,
    FixedParams: _fixed,
    ThresholdParams: _threshold,
    RatioParams: _ratio,
    OracleParams: _oracle,
    AdaptiveParams: _adaptive,
}


# ----------------------------------------------------------------------------------------------
# Parsing policy specs (CLI)
# ----------------------------------------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_DURATION_UNITS: Final = {
    "": 1.0, "ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0,
}
_SIZE_UNITS: Final = {
    "": 1, "b": 1, "kib": 1024, "mib": MIB, "gib": 1024 * MIB,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``2h``, ``1.5d``, ``500ms``. ValueError otherwise."""
    m = re.fullmatch(_NUMBER + r"\s*([a-z]*)", text.strip().lower())
    if not m or m.group(2) not in _DURATION_UNITS:
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 15m, 2h; a bare number is s)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(text: str) -> int:
    """Bytes from ``64MiB``, ``512KiB``, ``1GiB``, ``100MB``, ``4096``. ValueError otherwise."""
    m = re.fullmatch(_NUMBER + r"\s*([a-z]*)", text.strip().lower())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(
            f"{text!r} is not a size (examples: 64MiB, 512KiB, 1GiB, 100MB; a bare number is bytes)"
        )
    return round(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


# key in a spec -> (field, parser, on the estimator?)
_Option = tuple[str, Callable[[str], object], bool]
_COMMON_OPTIONS: Final[dict[str, _Option]] = {
    "retry_after": ("retry_after_s", parse_duration, False),
    "mode": ("restart_mode", str, False),
}
_ESTIMATOR_OPTIONS: Final[dict[str, _Option]] = {
    "measure": ("measure_s", parse_duration, True),
    "ttl_cap": ("ttl_cap_s", parse_duration, True),
    "ttl_resolution": ("ttl_resolution_s", parse_duration, True),
    "ttl_min_deficit": ("ttl_min_deficit_pages", float, True),
    "min_growth": ("min_growth_pages", float, True),
    "k_default": ("k_default", float, True),
    "class_width": ("class_width_pages", float, True),
    "skip_fill": ("baseline_skip_fill", _parse_bool, True),
    "trend_window": ("trend_window_s", parse_duration, True),
}
_OPTIONS: Final[dict[str, dict[str, _Option]]] = {
    "none": {},
    "fixed": {"uptime": ("uptime_s", parse_duration, False)},
    "threshold": {"allocated": ("allocated_bytes", parse_size, False)},
    "ratio": {
        **_ESTIMATOR_OPTIONS,
        "trend_min": ("trend_min_pages", float, False),
        "trend_z": ("trend_noise_z", float, False),
        "require_turn": ("require_turn", _parse_bool, False),
        "first_restart": ("first_decision_restarts", _parse_bool, False),
    },
    "oracle": {
        "min_reclaim": ("min_reclaim_bytes", parse_size, False),
        "surplus_ratio": ("surplus_ratio", float, False),
        "window": ("window_s", parse_duration, False),
    },
    "adaptive": {
        **_ESTIMATOR_OPTIONS,
        "call_cost": ("call_cost_page_s", float, False),
        "horizon": ("horizon_s", parse_duration, False),
        "min_free": ("min_free_pages", float, False),
        "min_uptime": ("min_uptime_ttls", float, False),
        "budget": ("budget_share", float, False),
        "backoff": ("backoff", float, False),
        "budget_price": ("budget_pricing", _parse_bool, False),
        "cold_budget": ("cold_budget_share", float, False),
    },
}
# The first value may be given without its key: fixed:30m, threshold:64MiB.
_POSITIONAL: Final = {"fixed": "uptime", "threshold": "allocated"}
_CLASSES: Final[dict[str, type[PolicyParams]]] = {
    "none": NoneParams, "fixed": FixedParams, "threshold": ThresholdParams,
    "ratio": RatioParams, "oracle": OracleParams, "adaptive": AdaptiveParams,
}


def parse_policy(spec: str) -> PolicyParams:
    """Policy parameters from a CLI spec: ``name[:value][,key=value…]``.

    Examples: ``none``, ``fixed:30m``, ``fixed:2h``, ``threshold:64MiB``, ``ratio``,
    ``ratio:measure=15m,ttl_cap=10m``, ``oracle``, ``oracle:surplus_ratio=2``, ``adaptive``,
    ``adaptive:call_cost=3600,horizon=2h``. Every policy also takes ``retry_after=<duration>``
    and ``mode=<restart mode>`` (:data:`RESTART_MODES`). Raises ValueError saying what is wrong
    and what is allowed.
    """
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in _CLASSES:
        raise ValueError(
            f"policy spec {spec!r}: unknown policy {name!r}; expected one of {', '.join(_CLASSES)}"
        )
    options = {**_OPTIONS[name], **_COMMON_OPTIONS}
    values: dict[str, object] = {}
    estimator: dict[str, object] = {}
    items = [item.strip() for item in rest.split(",")] if rest.strip() else []
    for position, item in enumerate(items):
        key, eq, raw = item.partition("=")
        if not eq:
            if position == 0 and name in _POSITIONAL:
                key, raw = _POSITIONAL[name], item
            else:
                raise ValueError(f"policy spec {spec!r}: expected key=value, got {item!r}")
        key = key.strip().lower()
        if key not in options:
            allowed = ", ".join(options) or "nothing"
            raise ValueError(f"policy spec {spec!r}: {name} takes {allowed}; not {key!r}")
        target, parse, on_estimator = options[key]
        if target in values or target in estimator:
            raise ValueError(f"policy spec {spec!r}: {key} given twice")
        try:
            value = parse(raw)
        except ValueError as e:
            raise ValueError(f"policy spec {spec!r}: {key}: {e}") from e
        (estimator if on_estimator else values)[target] = value
    if name in _POSITIONAL and options[_POSITIONAL[name]][0] not in values:
        raise ValueError(
            f"policy spec {spec!r}: {name} needs a value, e.g. "
            f"{'fixed:30m' if name == 'fixed' else 'threshold:64MiB'}"
        )
    try:
        if estimator:
            values["estimator"] = EstimatorParams(**estimator)  # type: ignore[arg-type]
        return _CLASSES[name](**values)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"policy spec {spec!r}: {e}") from e
