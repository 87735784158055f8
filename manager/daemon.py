"""The restart-manager daemon: read new samples, decide, restart through the admin endpoint.

One *pass* (:meth:`Daemon.run_pass`)::

    lease, proxies            one hand-over to the store thread: take the lease, or renew it
                              if the renewal behind the last pass is missing or stale (or wait
                              as a standby while another manager holds it), then read which
                              proxies sent a heartbeat recently (the `proxies` collection)
    GET /instances            of every proxy: which instances it serves, at which generation
    samples since the cursor  time > (newest sample seen − overlap): the first pass from
                              `samples`, later ones from the `sample_batches` not read before
                              (`samples` again for a proxy whose batch numbers have a hole)
    decide(state, new, now)   manager.policies, exactly as the simulator calls it
    POST …/restart            for each restart decision whose generation is still current
    hand over                 the pass ends here; behind it, on the store thread, before any
                              later store work: build and insert the decision records (every
                              decision, with what was done about it: one `decision_batches`
                              document for the pass, column by column, and one `decisions`
                              document per restart decision), and, with a lease, delete the
                              sample batches read (the active manager's inbox stays small)
                              and renew the lease (the next pass then starts with its read)

An instance is (proxy, instance) everywhere: in the policy state (keyed by
``instance_key(proxy, instance)``), the cursors, the restarts done and the decision records.

:meth:`Daemon.run` repeats passes every ``interval_s`` and backs off (doubling up to
``backoff_max_s``) while the store or the admin endpoint fails; nothing is lost meanwhile.
A token the admin endpoint refuses (401) is no network failure, and asking again with it
cannot help: the daemon keeps running (a proxy restarted with a new token writes its token
file again, an operator fixes it), re-reads the token files every second and asks again at
once when one holds another token, otherwise only every ``backoff_max_s`` (in case the
proxy's token changes to this one). The first such failure is an error line, the repeats
warnings; the token itself is never logged.

Guarantees:

- *Only new samples.* A per-instance cursor (newest sample time seen) drops rows already passed
  to ``decide()``; the store query only reaches back ``overlap_s`` before the newest sample seen,
  to catch samples delivered a little out of order. After the first pass the samples come from
  their sample batches (one document per proxy and delivery: a server without usable indexes
  scans a minute of those, not every sample), each batch read once; each shipper numbers its
  batches, and a proxy with a number missing (a batch pruned before this pass, or a failed
  write) is read from `samples` instead, so none is missed.
- *One restart per decision.* A restart decision for (instance, generation) is carried out at
  most once: only if ``GET /instances`` still shows that generation (someone else, or our own
  restart whose answer was lost, already moved it on) and the pair was not restarted before. A
  request whose answer was lost is *in doubt* until the next listing shows whether the
  generation moved.
- *State survives failures.* The policy state only advances after a successful read; decision
  records that cannot be written wait in memory (bounded: ``pending_limit`` decisions, the
  oldest passes dropped first, logged) and go with the next pass's write. One write at a time:
  records of a pass that ends while the last write is still under way wait for the next.
- *Retention.* With ``retention_s``, the manager's records older than that before the newest
  sample seen are deleted every tenth of it (at least every minute), on a thread and client of
  their own, so that a long scan never holds up a pass.
- *Clocks.* The rules run on the samples' clock (the proxy's host clock, maybe scaled by
  ``wasm_clock_speed``); ``now`` passed to ``decide()`` is the newest sample time seen, and
  ``decided_at`` in the records is wall time (A14).
- *Many proxies, one active manager.* Admin endpoints are given (``--admin``, repeatable) or
  read from the `proxies` collection. An endpoint that fails does not stop the others. Rows
  of a proxy without a recent heartbeat are ignored. With a lease (``lease_s``) only the
  manager holding the `leases` document acts; another waits as a standby and takes over
  within one lease period (plus one poll) of the first one's death; a restart is only sent
  while the lease has more than ``timeout_s`` left.
- *Lives.* A proxy restart starts every instance again at generation 0. The rows of an
  instance's earlier lives are ignored, and an instance whose generation goes back with a later
  start is forgotten and learned afresh. (Assumes the proxy's clock does not go back across its
  restarts; with ``wasm_clock_speed`` ≠ 1 it does, so use a fresh database per demo run.)

Store I/O runs on one dedicated thread (the embedded store's client must stay on one thread);
HTTP and the loop run on asyncio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd

from addons.telemetry import records
from addons.telemetry.store import (
    DATABASE,
    DECISION_BATCHES,
    DECISIONS,
    SAMPLES,
    Database,
    acquire_lease,
    close_store,
    database_problem,
    delete_sample_batches,
    ensure_indexes,
    insert_new,
    is_embedded,
    is_mongo_uri,
    live_proxies,
    open_store,
    prune_manager_records,
    read_frame,
    read_sample_batches,
    redact,
    release_lease,
)
from manager.admin_client import AdminClient, AdminError, Instance
from manager.estimate import OBSERVABLE_COLUMNS, OPTIONAL_COLUMNS
from manager.policies import (
    DECISION_FIELDS,
    MIB,
    Decision,
    History,
    OracleParams,
    PolicyParams,
    PolicyState,
    Slots,
    decide,
    decision_values,
    initial_state,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What was done about a decision (the ``outcome`` field of a decision record).
Outcome = Literal[
    "keep",              # the policy said keep
    "restarted",         # restarted through the admin endpoint
    "dry-run",           # a restart decision under --dry-run: nothing done
    "stale",             # the decision's generation is no longer the instance's current one
    "already-applied",   # this (instance, generation) was restarted before
    "unknown-instance",  # the proxy does not serve this instance (GET /instances)
    "no-heartbeat",      # the instance's proxy sent no recent heartbeat: not restarted
    "in-doubt",          # the restart request's answer was lost; the next listing tells
    "failed",            # the restart request failed (see ``detail``)
]

_FEW: Final = 5  # instance names listed in one aggregated log line
SEP: Final = "\x1f"  # between proxy and instance in a key: no host name or proxy id has it


SHARED_ID_WINDOW_S = 60.0
"""How long a proxy id stays shared by two proxies after both were last seen registering."""

Registration = tuple[str, str, float]
"""A proxy process as its `proxies` document shows it: (hostname, pid, started_at)."""


def instance_key(proxy: str, instance: str) -> str:
    """The daemon's key of instance ``instance`` of proxy ``proxy``."""
    return f"{proxy}{SEP}{instance}"


def split_key(key: str) -> tuple[str, str]:
    """(proxy, instance) of a key."""
    proxy, sep, instance = key.partition(SEP)
    return (proxy, instance) if sep else ("", key)


def show(key: str) -> str:
    """A key for humans: ``instance@proxy``."""
    proxy, instance = split_key(key)
    return f"{instance}@{proxy}" if proxy else instance


def keyed(frame: pd.DataFrame) -> pd.DataFrame:
    """Sample rows with ``instance`` replaced by the key (proxy, instance) and no ``proxy``
    column; a row without a string proxy belongs to proxy ""."""
    if frame.empty or "instance" not in frame.columns:
        return frame.drop(columns="proxy", errors="ignore")
    instances = frame["instance"].tolist()
    proxies = frame["proxy"].tolist() if "proxy" in frame.columns else [""] * len(instances)
    # Lists, not pandas string operations: 10× faster on a pass's thousand rows.
    keys = [(p if isinstance(p, str) else "") + SEP + i if isinstance(i, str) else i
            for p, i in zip(proxies, instances, strict=True)]
    return frame.drop(columns="proxy", errors="ignore").assign(
        instance=pd.Series(keys, index=frame.index, dtype=object))


@dataclass(frozen=True)
class Endpoint:
    """A proxy's admin endpoint and its bearer token (re-read from ``token_file`` after a 401)."""

    url: str
    token: str
    token_file: Path | None = None


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    """Everything the daemon needs; the CLI builds it (``python -m manager run --help``)."""

    #: ``mongodb://…`` or the embedded store's directory (addons.telemetry.store).
    store: str
    params: PolicyParams
    #: The CLI spelling of the policy, recorded with every decision.
    policy_spec: str = ""
    database: str = DATABASE
    #: Base URL of the admin endpoint; None only with ``dry_run`` (decide from the store alone).
    admin_url: str | None = "http://127.0.0.1:9901"
    token: str = ""
    #: Where the token came from: re-read after a 401 (the proxy may have written a new one).
    token_file: Path | None = None
    interval_s: float = 5.0
    dry_run: bool = False
    #: How far before the newest sample seen each read reaches back (samples' clock).
    overlap_s: float = 10.0
    #: First pass: read only this much before the newest sample in the store (None: all).
    backfill_s: float | None = None
    #: Drop the state of an instance this long (wall clock) after it left GET /instances.
    forget_after_s: float = 600.0
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    #: Timeout of each admin request and of the database's server selection.
    timeout_s: float = 5.0
    #: Decision records kept in memory while the store cannot take them (oldest dropped).
    pending_limit: int = 100_000
    #: Several admin endpoints (``--admin`` repeated); when empty, ``admin_url`` is the one.
    endpoints: tuple[Endpoint, ...] = ()
    #: Read the admin endpoints from the `proxies` collection (proxies with a recent heartbeat).
    proxies_from_store: bool = False
    #: With ``proxies_from_store``: a directory holding one token file per proxy, named by the
    #: proxy id; a proxy without one uses ``token``/``token_file``.
    token_dir: Path | None = None
    #: With admin endpoints, rows of a proxy whose heartbeat is older than this (wall seconds)
    #: are ignored; None: no heartbeat needed. (Deciding from the store alone needs none.)
    heartbeat_s: float | None = 30.0
    #: Hold the lease ``lease_name`` for this long (renewed every pass): at most one active
    #: manager. None: no lease.
    lease_s: float | None = None
    lease_name: str = "manager"
    #: Keep this many seconds (samples' clock) of the manager's records, `decision_batches`
    #: and `decisions`, pruning older ones every tenth of it (at least every minute); 0: all.
    #: With a lease, only the active manager prunes.
    retention_s: float = 0.0

    def __post_init__(self) -> None:
        if (self.admin_url is None and not self.endpoints and not self.proxies_from_store
                and not self.dry_run):
            raise ValueError("without an admin endpoint the manager can only --dry-run")
        for name in ("heartbeat_s", "lease_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("interval_s", "forget_after_s", "backoff_min_s", "backoff_max_s",
                     "timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not (math.isfinite(self.retention_s) and self.retention_s >= 0):
            raise ValueError(f"retention_s must be 0 or more seconds, got {self.retention_s!r}")
        if not (math.isfinite(self.overlap_s) and self.overlap_s >= 0):
            raise ValueError(f"overlap_s must be ≥ 0, got {self.overlap_s!r}")
        if self.backfill_s is not None and not self.backfill_s > 0:
            raise ValueError(f"backfill_s must be positive, got {self.backfill_s!r}")
        problem = database_problem(self.database, embedded=not is_mongo_uri(self.store))
        if problem:
            raise ValueError(f"database {self.database!r}: {problem}")

    def all_endpoints(self) -> tuple[Endpoint, ...]:
        """The admin endpoints given (none with ``proxies_from_store``: they come from the
        store)."""
        if self.endpoints or self.proxies_from_store:
            return self.endpoints
        if self.admin_url is None:
            return ()
        return (Endpoint(self.admin_url, self.token, self.token_file),)

    @property
    def admin_mode(self) -> bool:
        """Whether restarts go through admin endpoints (else: decide from the store alone)."""
        return bool(self.all_endpoints()) or self.proxies_from_store

    @property
    def requested_by(self) -> str:
        """What the restarts say asked for them: ``manager:<policy>``."""
        return f"manager:{self.params.name}"

    def sample_columns(self) -> list[str]:
        """The sample fields the policy may read (ground truth only for the oracle)."""
        extra = ["live_bytes"] if isinstance(self.params, OracleParams) else []
        return [*OBSERVABLE_COLUMNS, *OPTIONAL_COLUMNS, *extra]

    def read_columns(self) -> list[str]:
        """The sample fields read from the store: the policy's and `proxy`."""
        return ["proxy", *self.sample_columns()]


# ----------------------------------------------------------------------------------------------
# Pure helpers (each tested on its own)
# ----------------------------------------------------------------------------------------------


def clean_samples(frame: pd.DataFrame, columns: list[str]) -> tuple[pd.DataFrame, int]:
    """Keep the rows ``decide()`` can use; return them (typed) and how many were dropped.

    A usable row has a string ``instance``, finite numbers in every other column of
    ``columns`` except ``live_bytes`` (missing ground truth is NaN, which the oracle handles)
    and the optional ones (NaN: not seen), and an integral generation.
    """
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        if frame.empty:
            return frame.reindex(columns=columns), 0
        return frame.iloc[0:0].reindex(columns=columns), len(frame)
    nan_ok = ["live_bytes", *OPTIONAL_COLUMNS]
    numeric = [c for c in columns if c != "instance" and c not in nan_ok]
    # Columns that are numbers already stay as they are (a store read's usually are).
    values = {c: frame[c] for c in [*numeric, *(c for c in nan_ok if c in columns)]}
    changed = {c: pd.to_numeric(v, errors="coerce") for c, v in values.items()
               if v.dtype.kind not in "iuf"}
    values.update(changed)
    matrix = np.column_stack([values[c].to_numpy(dtype=np.float64) for c in numeric])
    ok = np.isfinite(matrix).all(axis=1)
    ok &= np.asarray([isinstance(x, str) for x in frame["instance"]], dtype=np.bool_)
    with np.errstate(invalid="ignore"):
        ok &= np.mod(values["generation"].to_numpy(dtype=np.float64), 1.0) == 0
    out = frame if list(frame.columns) == columns else frame.loc[:, columns]
    if changed:
        out = out.assign(**changed)
    if ok.all():
        return out, 0
    return out.loc[ok].reset_index(drop=True), int((~ok).sum())


def latest_life(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Per instance, only the rows of its latest *life* (since the proxy last started it).

    A new life begins where, in order of ``started_at``, an instance's generation does not
    increase although its start is later (the proxy restarted and counts from 0 again). Returns
    the rows kept, sorted by (instance, started_at, time), and how many were dropped; when no
    instance has two rows (a steady pass: one new sample each), ``frame`` as it is.
    """
    if len(frame) < 2 or not frame["instance"].duplicated().any():
        return frame, 0
    f = frame.sort_values(["instance", "started_at", "time"], kind="stable", ignore_index=True)
    inst = f["instance"].to_numpy()
    start = f["started_at"].to_numpy(dtype=np.float64)
    gen = f["generation"].to_numpy(dtype=np.float64)
    same = inst[1:] == inst[:-1]
    renewed = np.concatenate(([False], same & (start[1:] > start[:-1]) & (gen[1:] <= gen[:-1])))
    if not renewed.any():
        return f, 0
    life = np.cumsum(renewed)
    # Each instance's last life: the life number at its last row, spread over its rows.
    first = np.concatenate(([True], ~same))
    seg = np.cumsum(first) - 1
    last_row = np.append(np.flatnonzero(first)[1:], len(f)) - 1
    keep = life == life[last_row][seg]
    return f.loc[keep].reset_index(drop=True), int((~keep).sum())


def renewed_instances(state: PolicyState, frame: pd.DataFrame) -> list[str]:
    """Instances of ``state`` that ``frame`` shows in a new life: a generation not above the
    one the policy knows, started later (the proxy restarted). ``decide()`` would ignore their
    rows as an old generation; they must be forgotten first."""
    slots = state.slots
    if frame.empty or not slots.names:
        return []
    get = slots.slot_of.get
    slot = np.fromiter((get(k, -1) for k in frame["instance"].tolist()), dtype=np.int64,
                       count=len(frame))
    known = slot >= 0
    if not known.any():
        return []
    s = slot[known]
    gen = frame["generation"].to_numpy(dtype=np.float64)[known]
    start = frame["started_at"].to_numpy(dtype=np.float64)[known]
    with np.errstate(invalid="ignore"):
        renewed = (gen <= slots.generation[s]) & (start > slots.started_at[s] + 1e-6)
    return sorted({slots.names[i] for i in s[renewed].tolist()})


Chains = dict[tuple[str, str], tuple[int, float]]


def inbox_news(chains: Mapping[tuple[str, str], tuple[int, float]],
               batches: list[dict[str, Any]]) -> tuple[Chains, list[dict[str, Any]], set[str]]:
    """Which of ``batches`` (`sample_batches` documents) were not read before, given where
    each (proxy, shipper run) stood (``chains``: last seq read and its newest sample time).

    Returns the new chains, the new batches (by proxy, run and seq), and the proxies with a
    hole: a batch number skipped (a batch of a run not seen before must be its first), whose
    samples must be read from `samples`. Documents without a string proxy and run and an
    integer seq are ignored.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for b in batches:
        proxy, run, seq = b.get("proxy"), b.get("run"), b.get("seq")
        if isinstance(proxy, str) and isinstance(run, str) and type(seq) is int:
            groups.setdefault((proxy, run), []).append(b)
    out: Chains = dict(chains)
    new: list[dict[str, Any]] = []
    holes: set[str] = set()
    for key, docs in sorted(groups.items()):
        last = out.get(key, (0, -math.inf))[0]
        fresh = sorted((b for b in docs if b["seq"] > last), key=lambda b: b["seq"])
        if not fresh:
            continue
        seqs = [last, *(b["seq"] for b in fresh)]
        if any(b != a + 1 for a, b in itertools.pairwise(seqs)):
            holes.add(key[0])
        newest = fresh[-1].get("time")
        out[key] = (fresh[-1]["seq"], float(newest) if isinstance(newest, int | float)
                    else -math.inf)
        new.extend(fresh)
    return out, new, holes


def batch_times(batches: list[dict[str, Any]]) -> dict[str, float]:
    """The `_id` of each sample batch with its newest sample time (-inf if it has none)."""
    return {str(b["_id"]): float(t) if isinstance(t := b.get("time"), int | float) else -math.inf
            for b in batches if "_id" in b}


def chained(chains: Mapping[tuple[str, str], tuple[int, float]],
            batches: list[dict[str, Any]]) -> list[str]:
    """The `_id`s of ``batches`` that ``chains`` has passed: their (proxy, run) is known and
    their seq is at most the last one read."""
    out = []
    for b in batches:
        proxy, run, seq = b.get("proxy"), b.get("run"), b.get("seq")
        if not (isinstance(proxy, str) and isinstance(run, str) and type(seq) is int):
            continue
        last = chains.get((proxy, run))
        if last is not None and seq <= last[0] and "_id" in b:
            out.append(str(b["_id"]))
    return out


def prune_chains(chains: Chains, after: float, keep_s: float = 3600.0) -> Chains:
    """``chains`` without the runs whose last batch is ``keep_s`` older than ``after`` (their
    shipper has long stopped; a late batch of one would show as a hole, read from `samples`)."""
    if len(chains) < 64:
        return chains
    return {k: v for k, v in chains.items() if v[1] > after - keep_s}


def batches_frame(batches: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """The samples of `sample_batches` documents as rows of one frame: ``columns`` and `_id`
    (a field a batch lacks is None in its rows). The columns are joined as lists and made a
    frame once: a frame per batch costs more than the batch's samples."""
    merged: dict[str, list[Any]] = {c: [] for c in ("_id", *columns)}
    for batch in batches:
        values = records.unpack_columns(batch)
        n = len(values["_id"]) if isinstance(values.get("_id"), list) else int(
            batch.get("count") or 0)
        for name, out in merged.items():
            column = values.get(name)
            out.extend(column if isinstance(column, list) and len(column) == n else [None] * n)
    return pd.DataFrame(merged)


def combine_rows(parts: list[pd.DataFrame], after: float, columns: list[str]) -> pd.DataFrame:
    """The rows of ``parts`` with time > ``after``, each sample once (by `_id`), with
    ``columns``."""
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=columns)
    frame = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
    if after > -math.inf:
        frame = frame.loc[pd.to_numeric(frame["time"], errors="coerce").to_numpy() > after]
    if "_id" in frame.columns:
        ids = frame["_id"]
        frame = frame.loc[ids.isna() | ~ids.duplicated()]
    return frame.reindex(columns=columns).reset_index(drop=True)


def _read_only(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    a.flags.writeable = False
    return a


def forget_instances(state: PolicyState, names: Collection[str]) -> PolicyState:
    """``state`` without the instances ``names`` (unknown names are ignored).

    What the policy learned about them (per-instance scalars and sample history) is dropped;
    the other instances are unchanged, so later passes decide as if the forgotten ones had never
    been seen. (manager.policies has no such operation; this rebuilds its state values.)
    """
    slots = state.slots
    drop = [slots.slot_of[n] for n in names if n in slots.slot_of]
    if not drop:
        return state
    keep = np.ones(len(slots.names), dtype=np.bool_)
    keep[drop] = False
    renumber = np.cumsum(keep) - 1  # old slot -> new slot (where kept); monotonic
    kept = tuple(n for n, k in zip(slots.names, keep.tolist(), strict=True) if k)
    arrays = {name: _read_only(getattr(slots, name)[keep]) for name in Slots.arrays()}
    new_slots = Slots(
        names=kept, slot_of=MappingProxyType({n: i for i, n in enumerate(kept)}), **arrays
    )
    h = state.history
    rows = keep[h.slot] if len(h.slot) else np.zeros(0, dtype=np.bool_)
    history = History(
        _read_only(renumber[h.slot[rows]].astype(np.int64)),
        _read_only(h.time[rows]),
        MappingProxyType({k: _read_only(v[rows]) for k, v in h.values.items()}),
    )
    return PolicyState(state.policy, new_slots, history)


def backoff_delay(failures: int, low: float, high: float) -> float:
    """Seconds to wait after ``failures`` consecutive failures: low, 2·low, 4·low … ≤ high."""
    return float(min(high, low * 2.0 ** max(0, min(failures - 1, 60))))


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def _names(names: Collection[str]) -> str:
    ordered = sorted(show(n) for n in names)
    more = len(ordered) - _FEW
    return ", ".join(ordered[:_FEW]) + (f" and {more} more" if more > 0 else "")


def _describe(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    # pymongo's server selection errors end with timeouts and a topology description whose id
    # changes every time: without them, the same outage is the same line (logged once).
    first = lines[0].split(", Timeout:")[0].split(" (configured timeouts")[0]
    return f"{type(e).__name__}: {first[:200]}"


# ----------------------------------------------------------------------------------------------
# One pass's report
# ----------------------------------------------------------------------------------------------


@dataclass
class DecisionOutcome:
    """A decision and what the daemon did about it."""

    decision: Decision
    outcome: Outcome
    detail: str | None = None
    admin_result: dict[str, Any] | None = None


@dataclass
class PassReport:
    """What one pass read, decided and did. ``ok`` is False when it could not do its job."""

    ok: bool = True
    #: "store" or "admin": what failed (the first failure of the pass)
    component: str | None = None
    failure: str | None = None
    #: the pass failed because the admin endpoint refused its token (401): not a network
    #: failure, trying again with the same token will not help
    unauthorized: bool = False
    samples: int = 0  #: new rows passed to decide()
    dropped: int = 0  #: unusable rows, or rows of an earlier life of the proxy
    listed: int | None = None  #: instances in GET /instances (None: not asked)
    now: float | None = None  #: the samples' clock: newest sample time seen
    decisions: list[DecisionOutcome] = field(default_factory=list)
    written: int = 0  #: decisions written (including earlier pending ones)
    pending: int = 0  #: decisions still waiting for the store
    foreign_restarts: int = 0  #: generations moved on by someone else
    seconds: float = 0.0
    #: another manager holds the lease: this one only waits
    standby: bool = False
    #: rows ignored because their proxy sent no recent heartbeat
    no_heartbeat: int = 0
    #: admin endpoints that could not be reached this pass (the others were used)
    unreachable: list[str] = field(default_factory=list)
    #: admin endpoints that refused the token (401) this pass: not a network failure
    refused: list[str] = field(default_factory=list)
    #: seconds the store thread took behind the pass (deleting the sample batches read,
    #: writing the decision records); None until that ends, or with nothing to do
    behind_s: float | None = None

    def fail(self, component: str, message: str, *, unauthorized: bool = False) -> None:
        """Mark the pass failed (the first failure is the one reported)."""
        if self.ok:
            self.ok, self.component, self.failure = False, component, message
            self.unauthorized = unauthorized

    def counts(self) -> Counter[str]:
        """Decisions by outcome."""
        return Counter(o.outcome for o in self.decisions)

    def summary(self, limit: int = 20) -> str:
        """A few lines for humans: counts, then every restart decision, then a few keeps."""
        counts = self.counts()
        if self.standby:
            return f"pass: standby (another manager holds the lease); {self.seconds * 1000:.0f} ms"
        served = "" if self.listed is None else (
            f", {self.listed} instance(s) served by the proxies")
        head = (
            f"pass: {self.samples} new sample(s)"
            + (f" ({self.dropped} ignored)" if self.dropped else "")
            + (f" ({self.no_heartbeat} of proxies without a heartbeat)"
               if self.no_heartbeat else "")
            + served
            + f"; {len(self.decisions)} decision(s)"
            + (": " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) if counts else "")
            + f"; {self.seconds * 1000:.0f} ms"
        )
        lines = [head]
        if not self.ok:
            lines.append(f"FAILED ({self.component}): {self.failure}")
        restarts = [o for o in self.decisions if o.decision.action == "restart"]
        keeps = [o for o in self.decisions if o.decision.action == "keep"]
        shown = restarts[:limit] + keeps[: max(0, min(_FEW, limit - len(restarts)))]
        for o in shown:
            d = o.decision
            extra = f" [{o.detail}]" if o.detail else ""
            lines.append(f"  {o.outcome:<16} {show(d.instance)} gen {d.generation}: "
                         f"{d.reason}{extra}")
        if len(shown) < len(self.decisions):
            lines.append(f"  … and {len(self.decisions) - len(shown)} more in the store "
                         "(decision_batches)")
        if self.unreachable:
            lines.append(f"unreachable: {', '.join(self.unreachable)}")
        if self.refused:
            lines.append(f"refused the token (401): {', '.join(self.refused)}")
        if self.pending:
            lines.append(f"{self.pending} decision record(s) wait for the store")
        return "\n".join(lines)


class PassRecords:
    """One pass's decision records, as they go to the store: every decision in
    `decision_batches` documents, the restart decisions also as `decisions` documents.

    Made with ``build`` (:meth:`PassRecords.later`), the documents are built when first
    asked for: on the store thread, behind the pass (their ids are fixed already)."""

    __slots__ = ("_batches", "_build", "_restarts", "count")

    def __init__(self, batches: list[dict[str, Any]], restarts: list[dict[str, Any]],
                 count: int) -> None:
        self._batches, self._restarts = batches, restarts
        self._build: Callable[[], tuple[list[dict[str, Any]], list[dict[str, Any]]]] | None = (
            None)
        self.count = count  #: decisions

    @classmethod
    def later(cls, count: int, build: Callable[[], tuple[list[dict[str, Any]],
                                                         list[dict[str, Any]]]]
              ) -> PassRecords:
        """Records of ``count`` decisions that ``build`` makes (batches, restarts) when asked."""
        records = cls([], [], count)
        records._build = build
        return records

    def _built(self) -> None:
        if self._build is not None:
            self._batches, self._restarts = self._build()
            self._build = None

    @property
    def batches(self) -> list[dict[str, Any]]:
        """The `decision_batches` documents."""
        self._built()
        return self._batches

    @property
    def restarts(self) -> list[dict[str, Any]]:
        """The `decisions` documents of the restart decisions."""
        self._built()
        return self._restarts

    def __repr__(self) -> str:
        state = "to build" if self._build is not None else f"{len(self._batches)} batch(es)"
        return f"PassRecords({self.count} decision(s), {state})"


class StoreError(Exception):
    """The store could not be read or written; the message says which and what to check."""


# ----------------------------------------------------------------------------------------------
# The daemon
# ----------------------------------------------------------------------------------------------


class Daemon:
    """Keeps the policy state and the cursors between passes; see the module docstring."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.params = config.params
        self.state: PolicyState = initial_state(config.params)
        #: admin clients by URL (from the configuration, or the proxies in the store)
        self.admins: dict[str, AdminClient] = {}
        self._endpoints: dict[str, Endpoint] = {}
        for endpoint in config.all_endpoints():
            self._add_admin(endpoint)
        #: the admin client of each listed instance's proxy
        self._client_of: dict[str, AdminClient] = {}
        #: the proxy ids each admin URL answered for
        self._url_proxies: dict[str, set[str]] = {}
        #: admin URLs whose GET /instances failed, with how ("down", or "refused" its
        #: token): a line is logged when one starts failing, and again when it fails the
        #: other way (refused after it was down: a proxy restarted with a new token)
        self._failing_urls: dict[str, str] = {}
        #: the last error reading each token file (logged when it changes)
        self._token_file_problems: dict[Path, str] = {}
        #: proxies whose admin endpoint answered GET /instances in this pass
        self._answered: set[str] = set()
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._lease_until = -math.inf  # wall time until which this manager holds the lease
        self._standby_logged: str | None = None
        #: per proxy id, the registrations seen in `proxies` lately ((hostname, pid,
        #: started_at) → when first and last seen, wall clock); see :meth:`_note_registrations`
        self._registrations: dict[str, dict[Registration, tuple[float, float]]] = {}
        #: proxy ids that two running proxies register as, and when that was last seen
        self._shared_ids: dict[str, float] = {}
        #: the pairs of registrations reported as sharing an id (each said once)
        self._shared_said: set[tuple[str, Registration, Registration]] = set()
        #: the proxy id of each admin URL taken from the store
        self._url_proxy: dict[str, str] = {}
        #: newest sample time passed to decide(), per instance
        self.cursor: dict[str, float] = {}
        #: newest sample time seen (the samples' clock); -inf before the first sample
        self.frontier = -math.inf
        #: per proxy, the newest sample time passed to decide() (its own clock), and when
        #: (wall clock) its rows were last seen: each proxy is read and judged on its clock
        self.proxy_frontier: dict[str, tuple[float, float]] = {}
        #: generation of each instance in the latest GET /instances
        self.generations: dict[str, int] = {}
        #: generation our own restart produced, until a listing confirms it
        self._expected: dict[str, int] = {}
        #: restarted (True) or in doubt (False) per (instance, generation)
        self.applied: dict[tuple[str, int], bool] = {}
        #: wall time at which an instance was first missing from GET /instances
        self.missing_since: dict[str, float] = {}
        self._pending: list[PassRecords] = []
        # Decision records and batches carry their own _id (like the addon's spool), so that
        # writing them again after a failure stores each once.
        self._manager_id = f"manager-{secrets.token_hex(6)}"
        self._id_prefix = f"{self._manager_id}-"
        self._seq = 0
        self._passes = 0  # passes that decided something: the decision batches' seq
        self._listed_once = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="manager-store")
        self._db: Database | None = None
        self._columns = config.sample_columns()
        self._read_columns = config.read_columns()
        #: where each (proxy, shipper run)'s sample batches stand: (last seq read, its time);
        #: None before the first read
        self._chains: dict[tuple[str, str], tuple[int, float]] | None = None
        #: the sample batches read, by `_id`, with their newest sample time (not asked again)
        self._batches_read: dict[str, float] = {}
        #: the sample batches the last read accounted for, and those of passes that decided
        #: on them, to delete behind the pass (with a lease: the active manager's inbox)
        self._read_batches: list[str] = []
        self._consumed: list[str] = []
        #: the write behind the last pass (None before the first), the records it writes,
        #: the failure it last logged, the seconds each write took
        self._writing: asyncio.Task[None] | None = None
        self._in_flight: list[PassRecords] = []
        self._write_failure: str | None = None
        self.behind_s: list[float] = []
        #: retention: its own thread and client, so that a long scan never holds up a pass
        self._pruner = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="manager-prune")
        self._prune_db: Database | None = None
        self._pruning: concurrent.futures.Future[int] | None = None
        self._next_prune = -math.inf  # wall clock
        self.pruned = 0  #: documents deleted by the retention

    # ---- lifecycle ----

    @property
    def admin(self) -> AdminClient | None:
        """The admin client when there is exactly one (the common single-proxy case)."""
        return next(iter(self.admins.values())) if len(self.admins) == 1 else None

    def _add_admin(self, endpoint: Endpoint) -> AdminClient:
        hint = f"--token-file {endpoint.token_file}" if endpoint.token_file else "--token"
        client = AdminClient(endpoint.url, endpoint.token, timeout_s=self.config.timeout_s,
                             token_hint=hint)
        self.admins[endpoint.url] = client
        self._endpoints[endpoint.url] = endpoint
        return client

    async def aclose(self) -> None:
        """Close the admin clients and the store, giving the lease up (pending decision
        records are lost: flush first with :meth:`flush`)."""
        await self.written()
        for client in self.admins.values():
            await client.aclose()
        if self._lease_until > -math.inf:
            with contextlib.suppress(Exception):
                await self._in_store(self._release_sync)
        await self._in_store(self._close_sync)
        self._executor.shutdown(wait=True)
        await asyncio.get_running_loop().run_in_executor(self._pruner, self._close_prune_sync)
        self._pruner.shutdown(wait=True)

    async def __aenter__(self) -> Daemon:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Passes every ``interval_s`` until ``stop`` is set; back off while failing."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        failures, last_failure = 0, None
        while not stop.is_set():
            started = loop.time()
            report = await self.run_pass()
            if report.refused and self.reload_token():
                delay = 0.0  # a new token: ask with it at once
            elif report.ok:
                if failures:
                    logger.info("working again after %d failed attempt(s)", failures)
                failures, last_failure = 0, None
                delay = max(0.0, self.config.interval_s - (loop.time() - started))
            else:
                failures += 1
                if report.unauthorized:
                    delay, then = self._refused_wait(report)
                else:
                    delay = backoff_delay(failures, self.config.backoff_min_s,
                                          self.config.backoff_max_s)
                    then = f"retrying in {delay:g} s"
                again = report.failure == last_failure
                logger.log(
                    logging.WARNING if again else logging.ERROR, "%s; %s%s",
                    report.failure, then, f" (attempt {failures})" if failures > 1 else "",
                )
                last_failure = report.failure
                if report.unauthorized:
                    await self._await_new_token(stop, delay)
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        await self.flush()

    def _refused_files(self, report: PassReport) -> list[Path]:
        """The token files of the endpoints that refused their token in `report`."""
        files = [self._endpoints[u].token_file for u in report.refused if u in self._endpoints]
        return list(dict.fromkeys(f for f in files if f is not None))

    def _refused_wait(self, report: PassReport) -> tuple[float, str]:
        """After a pass that failed on a refused token: how long to wait, and what for."""
        delay = self.config.backoff_max_s
        files = self._refused_files(report)
        if files:
            return delay, (f"asking again when {', '.join(map(str, files))} holds another token "
                           f"(read every {self._token_poll_s:g} s), or in {delay:g} s")
        return delay, (f"asking again every {delay:g} s with the same token (restart the "
                       "manager with the proxy's token, or give --token-file)")

    @property
    def _token_poll_s(self) -> float:
        return min(1.0, self.config.interval_s)

    async def _await_new_token(self, stop: asyncio.Event, delay: float) -> bool:
        """Wait up to `delay` s, re-reading the token files: True as soon as one holds another
        token, False when the time is up or `stop` is set."""
        loop = asyncio.get_running_loop()
        until = loop.time() + delay
        while not stop.is_set():
            left = until - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(self._token_poll_s, left))
            if not stop.is_set() and self.reload_token():
                return True
        return False

    def reload_token(self) -> bool:
        """Re-read the token files (after a 401); True if one now holds another token."""
        changed = False
        for url, endpoint in list(self._endpoints.items()):
            path = endpoint.token_file
            if path is None or url not in self.admins:
                continue
            try:
                token = path.read_text().strip()
            except OSError as e:
                problem = str(e.strerror or e)
                if self._token_file_problems.get(path) != problem:  # once, not every read
                    logger.error("cannot re-read the admin token file %s: %s", path, problem)
                self._token_file_problems[path] = problem
                continue
            self._token_file_problems.pop(path, None)
            if not token or token == endpoint.token:
                continue
            self._endpoints[url] = dataclasses.replace(endpoint, token=token)
            self.admins[url].set_token(token)
            logger.info("the admin token file %s holds a new token; using it", path)
            changed = True
        return changed

    # ---- one pass ----

    async def run_pass(self) -> PassReport:
        """One pass: listing, new samples, decide, restarts, decision records."""
        t0 = time.perf_counter()
        report = PassReport()
        try:
            await self._pass(report)
        except Exception as e:  # a bug, or a failure nobody foresaw: log it, never crash
            logger.exception("the pass failed unexpectedly")
            report.fail("manager", f"the pass failed unexpectedly ({_describe(e)})")
        finally:
            # Last: the store thread, busy behind the pass from here on, holds the GIL at
            # times.
            self._write_behind(report)
            report.pending = self.pending_count()
            report.seconds = time.perf_counter() - t0
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s", report.summary(limit=0).splitlines()[0])
        return report

    async def _pass(self, report: PassReport) -> None:
        wall = time.time()
        alive: set[str] | None = None
        try:
            active, registered = await self._in_store(self._begin_sync, wall)
        except StoreError as e:
            report.fail("store", str(e))
            return
        if not active:
            report.standby = True
            return
        if registered is not None:
            self._note_registrations(registered, wall)
            if self._heartbeat:
                alive = {str(d["_id"]) for d in registered}
            if self.config.proxies_from_store:
                await self._sync_admins(registered)
        listing: dict[str, Instance] | None = None
        if self.config.admin_mode:
            listing = await self._list(report)
            if listing is None:
                return
            report.listed = len(listing)
            self._note_listing(listing, wall, report)

        since = self.read_from(wall)
        try:
            raw = await self._in_store(self._read_sync, since)
        except StoreError as e:
            report.fail("store", str(e))
            return
        raw = keyed(raw)
        if alive is not None and not raw.empty:
            proxy = raw["instance"].map(lambda k: split_key(k)[0] if isinstance(k, str) else "")
            live = proxy.isin(alive).to_numpy()
            if not live.all():
                report.no_heartbeat = int((~live).sum())
                raw = raw.loc[live]
        for d in self.decide_new(raw, report):
            report.decisions.append(DecisionOutcome(d, "keep") if d.action == "keep"
                                    else await self._act(d, listing, report))
        if report.decisions:
            self._pending.append(self.pass_records(report.decisions, wall, report.now,
                                                   later=True))
        if self.config.lease_s is not None:  # only the active manager empties the inbox
            self._consumed.extend(self._read_batches)
        self._prune_behind(wall)
        self._forget_vanished(wall)
        self._prune_cursors(since)

    def decide_new(self, raw: pd.DataFrame, report: PassReport) -> tuple[Decision, ...]:
        """The pass without I/O: the new rows of ``raw`` (a store read) go through ``decide()``
        and advance the cursors; returns its decisions. Fills ``report``'s counts."""
        frame = self._new_rows(raw, report)
        report.samples = len(frame)
        decisions: tuple[Decision, ...] = ()
        if not frame.empty:
            frontier = max(self.frontier, float(frame["time"].max()))
            wall = time.time()
            proxies = frame["instance"].map(lambda k: split_key(k)[0]).to_numpy()
            newest = pd.Series(frame["time"].to_numpy(dtype=np.float64)).groupby(
                proxies, sort=True).max()
            nows = {str(proxy): max(self.proxy_frontier.get(str(proxy), (-math.inf, 0.0))[0],
                                    float(t)) for proxy, t in newest.items()}
            groups: list[tuple[str, pd.DataFrame]] = [("", frame)]
            now_of = {"": frontier}
            if max(nows.values()) - min(nows.values()) > self.config.overlap_s:
                # Clocks apart: each proxy on its own, its now its own newest sample, so one
                # whose clock runs ahead neither ages the others' instances nor hides their
                # samples (a decide() call per proxy: only then; one clock, one call).
                groups = [(name, frame.loc[proxies == name].reset_index(drop=True))
                          for name in nows]
                now_of = nows
            made: list[Decision] = []
            for proxy, rows in groups:
                try:
                    got, self.state = decide(self.state, rows, now_of[proxy], self.params)
                except ValueError as e:  # clean_samples should make this impossible
                    logger.error("the policy rejected %d sample(s) (%s); skipping them",
                                 len(rows), e)
                    got = ()
                made.extend(got)
            for proxy, now in nows.items():
                self.proxy_frontier[proxy] = (now, wall)
            decisions = tuple(made)
            # Only now: if decide() failed otherwise, the rows are read again next pass.
            self.frontier = frontier
            # Each instance's newest time (the rows are all newer than its cursor).
            cursor, inf = self.cursor, -math.inf
            for name, t in zip(frame["instance"].tolist(), frame["time"].tolist(), strict=True):
                if t > cursor.get(name, inf):
                    cursor[name] = t
        report.now = self.frontier if math.isfinite(self.frontier) else None
        return decisions

    def read_from(self, wall: float) -> float:
        """Where the next read starts (samples' clock): `--overlap` before the newest sample
        of the proxy whose clock is furthest behind, among those with rows in the last
        `--forget-after` (wall clock); the per-instance cursors drop what was seen."""
        keep = self.config.forget_after_s
        self.proxy_frontier = {p: v for p, v in self.proxy_frontier.items()
                               if wall - v[1] <= keep}
        if not self.proxy_frontier:
            return self.frontier - self.config.overlap_s
        return min(t for t, _ in self.proxy_frontier.values()) - self.config.overlap_s

    # ---- reading ----

    def _new_rows(self, raw: pd.DataFrame, report: PassReport) -> pd.DataFrame:
        """Rows not passed to decide() before, of each instance's latest life, usable."""
        frame, bad = clean_samples(raw, self._columns)
        if bad:
            logger.warning("ignoring %d sample document(s) without usable %s", bad,
                           ", ".join(self._columns))
        if frame.empty:
            report.dropped = bad
            return frame
        if self.cursor:
            get, nan = self.cursor.get, math.nan
            seen = np.fromiter((get(k, nan) for k in frame["instance"].tolist()),
                               dtype=np.float64, count=len(frame))
            with np.errstate(invalid="ignore"):
                old = frame["time"].to_numpy(dtype=np.float64) <= seen
            if old.any():
                frame = frame.loc[~old]
        frame, earlier = latest_life(frame)
        if earlier:
            logger.info("ignoring %d sample(s) of earlier lives of the proxy's instances",
                        earlier)
        renewed = renewed_instances(self.state, frame)
        if renewed:
            logger.info("%s began a new life (the generation went back and started later: the "
                        "proxy was restarted); learning afresh", _names(renewed))
            self._forget(renewed, keep_cursor=True)
        report.dropped = bad + earlier
        return frame

    def _read_sync(self, after: float) -> pd.DataFrame:
        """(store thread) Samples with time > ``after`` (all on the first pass, or the backfill),
        with the policy's columns (a field a document lacks is NaN).

        The first read takes them from `samples`, the record, and notes where each shipper's
        sample batches stand; later reads take the batches delivered since (one document per
        proxy and delivery: what a server without usable indexes serves fast), and read
        `samples` only for a proxy whose batches have a hole (pruned before this pass, or a
        failed write).

        Notes in ``_read_batches`` the `_id`s of the batches this read accounts for (their
        samples were read, from them or from `samples`): the active manager deletes them
        behind the pass."""
        self._read_batches = []
        try:
            db = self._db_sync()
            if self._chains is None:
                heads = read_sample_batches(db, -math.inf, columns=False)
                chains, _, _ = inbox_news({}, heads)
                frame = self._read_samples(db, after, None)
                self._chains, self._batches_read = chains, batch_times(heads)
                self._read_batches = chained(chains, heads)
                return frame
            read = {i: t for i, t in self._batches_read.items() if t > after}
            batches = read_sample_batches(db, after, exclude=sorted(read))
            chains, new, holes = inbox_news(self._chains, batches)
            if holes:
                logger.info("sample batches missing for %s (pruned before this pass, or not "
                            "written): reading their samples instead", ", ".join(sorted(holes)))
            parts = [batches_frame([b for b in new if b["proxy"] not in holes],
                                   self._read_columns)]
            if holes:
                parts.append(self._read_samples(db, after, holes))
            self._chains = prune_chains(chains, after)
            self._batches_read = read | batch_times(batches)
            self._read_batches = chained(chains, batches)
        except Exception as e:
            self._drop_db()
            raise StoreError(self._store_message("read samples from", e)) from e
        return combine_rows(parts, after, self._read_columns)

    def _read_samples(self, db: Database, after: float,
                      proxies: Collection[str] | None) -> pd.DataFrame:
        """Samples with time > ``after`` from `samples` (of ``proxies`` only, if given)."""
        if after == -math.inf and self.config.backfill_s is not None:
            newest = list(db[SAMPLES].find({}, {"time": 1, "_id": 0}).sort("time", -1).limit(1))
            if newest:
                after = float(newest[0]["time"]) - self.config.backfill_s
        query: dict[str, Any] = {} if after == -math.inf else {"time": {"$gt": after}}
        if proxies is not None:
            query["proxy"] = {"$in": sorted(proxies)}
        return read_frame(db, SAMPLES, query, self._read_columns).reindex(
            columns=self._read_columns)

    def _db_sync(self) -> Database:
        if self._db is None:
            db = open_store(self.config.store, self.config.database,
                            timeout=self.config.timeout_s)
            try:
                ensure_indexes(db)  # also `time` alone: each pass asks for time > cursor
            except Exception:
                close_store(db)
                raise
            self._db = db
        return self._db

    def _drop_db(self) -> None:
        """(store thread) Forget a client that failed; the next operation opens a new one."""
        if self._db is not None and is_embedded(self._db):
            try:
                close_store(self._db)
            except Exception as e:
                logger.debug("closing the embedded store failed: %s", e)
            self._db = None

    def _close_sync(self) -> None:
        if self._db is not None:
            close_store(self._db)
            self._db = None

    def _store_message(self, doing: str, e: BaseException) -> str:
        store = self.config.store
        if is_mongo_uri(store):
            return (f"cannot {doing} the database {redact(store)} ({_describe(e)}): is the "
                    "MongoDB server running and reachable?")
        return (f"cannot {doing} the embedded store {store} ({_describe(e)}): is the directory "
                "there, readable and writable?")

    async def _in_store(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    # ---- proxies, endpoints and the lease ----

    @property
    def _heartbeat(self) -> bool:
        """Whether rows of proxies without a recent heartbeat are ignored."""
        return self.config.heartbeat_s is not None and self.config.admin_mode

    def _lease_fresh(self, wall: float) -> bool:
        """Whether the lease this manager holds, as renewed behind its last pass, still has
        more than half its period and more than an admin timeout to run at ``wall``: then
        the pass need not renew it first (nobody can take a lease before it expires)."""
        lease_s = self.config.lease_s
        return lease_s is not None and (
            self._lease_until - wall > max(lease_s / 2, self.config.timeout_s))

    def _begin_sync(self, wall: float) -> tuple[bool, list[dict[str, Any]] | None]:
        """(store thread) A pass's first store work, in one hand-over: take or renew the
        lease (with one, unless it was renewed behind the last pass and is fresh), then, if
        this manager is active, read the proxies with a recent heartbeat (if they are
        needed: None otherwise). (active, proxies)."""
        if (self.config.lease_s is not None and not self._lease_fresh(wall)
                and not self._lease_sync(wall)):
            return False, None
        if self._heartbeat or self.config.proxies_from_store:
            return True, self._proxies_sync(wall)
        return True, None

    # ---- retention ----

    def _prune_behind(self, wall: float) -> None:
        """Every tenth of ``retention_s`` (at least a minute; wall clock), prune the manager's
        records older than ``retention_s`` before the newest sample seen, on the retention's
        own thread (a server that answers no query from an index scans the collections)."""
        retention = self.config.retention_s
        if (retention <= 0 or wall < self._next_prune or not math.isfinite(self.frontier)
                or (self._pruning is not None and not self._pruning.done())):
            return
        self._next_prune = wall + max(60.0, retention / 10)
        self._pruning = self._pruner.submit(self._prune_sync, self.frontier - retention)

    def _prune_sync(self, cutoff: float) -> int:
        """(retention thread) Delete the manager's records before ``cutoff``."""
        try:
            if self._prune_db is None:
                self._prune_db = open_store(self.config.store, self.config.database,
                                            timeout=self.config.timeout_s)
            deleted = prune_manager_records(self._prune_db, cutoff)
        except Exception as e:
            if self._prune_db is not None:
                with contextlib.suppress(Exception):
                    close_store(self._prune_db)
                self._prune_db = None
            logger.warning("retention: %s; trying again in %g s",
                           self._store_message("prune decisions in", e),
                           max(60.0, self.config.retention_s / 10))
            return 0
        self.pruned += deleted
        if deleted:
            logger.info("retention: deleted %d decision document(s) from before %.3f (samples' "
                        "clock)", deleted, cutoff)
        return deleted

    def _close_prune_sync(self) -> None:
        if self._prune_db is not None:
            close_store(self._prune_db)
            self._prune_db = None

    def _lease_sync(self, wall: float) -> bool:
        """(store thread) Take or renew the lease; True if this manager is the active one."""
        assert self.config.lease_s is not None
        try:
            held = acquire_lease(self._db_sync(), self.config.lease_name, self._holder, wall,
                                 self.config.lease_s)
        except Exception as e:
            self._drop_db()
            raise StoreError(self._store_message("take the lease in", e)) from e
        was_active = self._lease_until > -math.inf and self._standby_logged is None
        if held:
            self._lease_until = wall + self.config.lease_s
            if not was_active:
                logger.info("active: this manager (%s) holds the lease %r", self._holder,
                            self.config.lease_name)
            self._standby_logged = None
            return True
        self._lease_until = -math.inf
        holder = self._lease_holder_sync()
        if self._standby_logged != holder:
            logger.info("standby: %s holds the lease %r; taking over when it expires", holder,
                        self.config.lease_name)
            self._standby_logged = holder
        return False

    def _lease_holder_sync(self) -> str:
        from addons.telemetry.store import LEASES

        doc = self._db_sync()[LEASES].find_one({"_id": self.config.lease_name})
        return str(doc.get("holder")) if doc else "another manager"

    def _release_sync(self) -> None:
        release_lease(self._db_sync(), self.config.lease_name, self._holder)

    def _proxies_sync(self, wall: float) -> list[dict[str, Any]]:
        """(store thread) The proxies with a recent heartbeat."""
        max_age = self.config.heartbeat_s if self.config.heartbeat_s is not None else math.inf
        try:
            return live_proxies(self._db_sync(), wall, max_age)
        except Exception as e:
            self._drop_db()
            raise StoreError(self._store_message("read the proxies from", e)) from e

    def _token_for(self, proxy: str) -> tuple[str, Path | None]:
        """The token of ``proxy``'s admin endpoint: its file in ``token_dir``, else the shared
        one. ``""`` if there is none."""
        directory = self.config.token_dir
        if directory is not None:
            path = directory / proxy
            try:
                token = path.read_text().strip()
            except OSError:
                pass
            else:
                if token:
                    return token, path
        return self.config.token, self.config.token_file

    async def _sync_admins(self, registered: list[dict[str, Any]]) -> None:
        """Admin clients for the registered proxies with an admin URL; close the others."""
        wanted: dict[str, str] = {}
        for doc in registered:
            url = doc.get("admin_url")
            if isinstance(url, str) and url.startswith(("http://", "https://")):
                wanted[url] = str(doc["_id"])
        now_at = {proxy: url for url, proxy in wanted.items()}
        for url in [u for u in self.admins if u not in wanted]:
            client = self.admins.pop(url)
            self._endpoints.pop(url, None)
            self._failing_urls.pop(url, None)
            proxy = self._url_proxy.pop(url, None)
            if proxy is not None and proxy in now_at:
                # Not silence: the proxy id registers another endpoint now (restarted on
                # another port, or a second proxy with the same id: said once, above).
                logger.log(logging.DEBUG if proxy in self._shared_ids else logging.INFO,
                           "proxy %s: admin endpoint %s, no longer %s", proxy, now_at[proxy],
                           url)
            else:
                logger.warning("the proxy at %s sent no heartbeat for %g s; not asking it any "
                               "more", url, self.config.heartbeat_s or 0)
            await client.aclose()
        for url, proxy in wanted.items():
            if url in self.admins:
                continue
            token, path = self._token_for(proxy)
            if not token:
                logger.warning("no admin token for proxy %s (%s): give --token-file, or a file "
                               "named %s in --token-dir", proxy, url, proxy)
                continue
            self._add_admin(Endpoint(url, token, path))
            self._url_proxy[url] = proxy
            logger.log(logging.DEBUG if proxy in self._shared_ids else logging.INFO,
                       "proxy %s: admin endpoint %s (from the store)", proxy, url)

    def _note_registrations(self, registered: list[dict[str, Any]], wall: float) -> None:
        """Notice two running proxies with one proxy id (`wasm_proxy_id`).

        Each proxy replaces its `proxies` document every few seconds, so two with one id take
        turns in it. A proxy that restarts registers a later ``started_at`` and the earlier
        process is never seen again; a process that registers again *after* a later-started
        one with the same id appeared still runs beside it. Their samples and instances
        cannot be told apart in the store, so the manager restarts none of that id's
        instances (one error line per pair) until neither has been seen beside the other for
        a minute (or ``--heartbeat``, if longer): a document that two processes overwrite
        shows each of them only now and then."""
        window = max(SHARED_ID_WINDOW_S, self.config.heartbeat_s or 0.0)
        for doc in registered:
            proxy, started = str(doc["_id"]), doc.get("started_at")
            if not isinstance(started, int | float) or isinstance(started, bool):
                continue
            ident: Registration = (str(doc.get("hostname")), str(doc.get("pid")),
                                   float(started))
            seen = self._registrations.setdefault(proxy, {})
            first = seen.get(ident, (wall, wall))[0]
            seen[ident] = (first, wall)
            for other, (other_first, _) in list(seen.items()):
                if wall - seen[other][1] > window:
                    del seen[other]  # gone (restarted, or stopped)
                elif other[2] > ident[2] and other_first < wall:
                    # this one started earlier, and registers after the later one appeared
                    self._shared_ids[proxy] = wall
                    if (proxy, ident, other) not in self._shared_said:
                        self._shared_said.add((proxy, ident, other))
                        logger.error(
                            "two proxies register as proxy id %s: pid %s on %s and pid %s on "
                            "%s (their samples are mixed in the store); not restarting its "
                            "instances until one stops: give each proxy its own "
                            "wasm_proxy_id", proxy, ident[1], ident[0], other[1], other[0])
        for proxy, since in list(self._shared_ids.items()):
            if wall - since > window:
                del self._shared_ids[proxy]
                logger.info("proxy id %s: one proxy registers as it again", proxy)

    async def _list(self, report: PassReport) -> dict[str, Instance] | None:
        """GET /instances of every endpoint, merged by key; None (the pass failed) when every
        endpoint failed. An endpoint that fails is logged when it starts and stops failing."""
        urls = list(self.admins)
        answers = await asyncio.gather(*(self.admins[u].instances() for u in urls),
                                       return_exceptions=True)
        listing: dict[str, Instance] = {}
        self._client_of = {}
        self._answered = set()
        failures: list[AdminError] = []
        for url, answer in zip(urls, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, AdminError):
                    raise answer
                failures.append(answer)
                refused = answer.kind == "unauthorized"
                (report.refused if refused else report.unreachable).append(url)
                how = "refused" if refused else "down"  # not every flap between two errors
                if self._failing_urls.get(url) != how and len(urls) > 1:
                    shared = self._url_proxy.get(url) in self._shared_ids  # said, and it churns
                    logger.log(logging.DEBUG if shared else
                               logging.ERROR if refused else logging.WARNING,
                               "%s; carrying on with the other proxies", answer.message)
                self._failing_urls[url] = how
                continue
            if url in self._failing_urls and len(urls) > 1:
                logger.info("admin endpoint %s answers again", url)
            self._failing_urls.pop(url, None)
            client = self.admins[url]
            proxies = self._url_proxies.setdefault(url, set())
            for inst in answer.values():
                proxies.add(inst.proxy)
                key = instance_key(inst.proxy, inst.id)
                listing[key] = inst
                self._client_of[key] = client
            self._answered |= proxies
        if urls and len(failures) == len(urls):
            first = failures[0]
            report.fail("admin", first.message if len(urls) == 1 else
                        f"every admin endpoint failed ({len(urls)}): {first.message}",
                        # only a token can help when every one refused its token
                        unauthorized=all(e.kind == "unauthorized" for e in failures))
            return None
        if not urls and not self.config.proxies_from_store:
            report.fail("admin", "no admin endpoint")
            return None
        return listing

    def _down_proxies(self) -> set[str]:
        """Proxies whose admin endpoint failed this pass: their instances are not known gone."""
        return {p for u in self._failing_urls for p in self._url_proxies.get(u, ())}

    # ---- the admin listing ----

    def _note_listing(self, listing: Mapping[str, Instance], wall: float,
                      report: PassReport) -> None:
        """Resolve restarts in doubt; log new, vanished and returning instances and restarts
        made by others."""
        for (name, generation), done in list(self.applied.items()):
            current = listing.get(name)
            if done or current is None:
                continue
            if current.generation > generation:
                self.applied[name, generation] = True
                logger.info("the restart of %s generation %d took effect (its answer was lost)",
                            show(name), generation)
                self._expected[name] = current.generation
            else:
                del self.applied[name, generation]
                logger.warning("the restart of %s generation %d did not take effect; the "
                               "policy may ask again", show(name), generation)
        new: list[str] = []
        for key, inst in listing.items():
            before = self.generations.get(key)
            expected = self._expected.pop(key, None)
            if before is None:
                new.append(key)
            elif inst.generation > before and inst.generation != expected:
                report.foreign_restarts += 1
                logger.info("%s was restarted by someone else: generation %d → %d; the policy "
                            "takes the new generation from its samples", show(key), before,
                            inst.generation)
            elif inst.generation < before:
                logger.info("%s went back from generation %d to %d: the proxy was restarted",
                            show(key), before, inst.generation)
            self.generations[key] = inst.generation
        if new and not self._listed_once:
            logger.info("the proxies at %s serve %d instance(s): %s", ", ".join(self.admins),
                        len(new), _names(new))
        elif new:
            logger.info("new instance(s): %s", _names(new))
        self._listed_once = True

        known = set(self.generations) | set(self.state.slots.names)
        # Gone: no longer listed by its proxy, which answered (a proxy that failed or is no
        # longer asked says nothing about its instances).
        gone = [n for n in known if n not in listing and n not in self.missing_since
                and split_key(n)[0] in self._answered]
        back = [n for n in self.missing_since if n in listing]
        gone_proxy = [n for n in self.missing_since if n not in listing
                      and split_key(n)[0] not in self._answered]
        for name in gone_proxy:  # its proxy is not asked now: not "missing", just unknown
            del self.missing_since[name]
        for name in back:
            del self.missing_since[name]
        if back:
            logger.info("back in GET /instances: %s", _names(back))
        if gone:
            self.missing_since.update(dict.fromkeys(gone, wall))
            logger.warning(
                "not served by the proxy (missing from GET /instances): %s; not restarting "
                "them, their state is dropped after %g s", _names(gone),
                self.config.forget_after_s,
            )
        # Pairs of generations that are over can never match a decision again.
        for name, generation in list(self.applied):
            current = listing.get(name)
            if current is not None and generation < current.generation:
                del self.applied[name, generation]

    def _forget_vanished(self, wall: float) -> None:
        expired = [n for n, since in self.missing_since.items()
                   if wall - since >= self.config.forget_after_s]
        if expired:
            self._forget(expired, keep_cursor=True)
            logger.info("dropped the state of %d instance(s) gone from the proxy: %s",
                        len(expired), _names(expired))

    def _forget(self, names: Collection[str], *, keep_cursor: bool) -> None:
        self.state = forget_instances(self.state, names)
        drop = set(names)
        for name in drop:
            self.generations.pop(name, None)
            self.missing_since.pop(name, None)
            self._expected.pop(name, None)
            if not keep_cursor:
                self.cursor.pop(name, None)
        self.applied = {k: v for k, v in self.applied.items() if k[0] not in drop}

    def _prune_cursors(self, since: float) -> None:
        """Drop cursors that no read can reach any more, of instances the policy forgot."""
        if len(self.cursor) <= 2 * max(16, len(self.state.slots.names)):
            return
        slots = self.state.slots.slot_of
        self.cursor = {n: t for n, t in self.cursor.items() if n in slots or t > since}

    # ---- acting ----

    async def _act(self, d: Decision, listing: dict[str, Instance] | None,
                   report: PassReport) -> DecisionOutcome:
        """Carry out one decision (a restart at most once, and only of the current
        generation)."""
        if d.action == "keep":
            return DecisionOutcome(d, "keep")
        name, key = d.instance, (d.instance, d.generation)
        shown = show(name)
        if self.config.dry_run:
            logger.info("dry run: would restart %s generation %d (%s): %s", shown, d.generation,
                        d.policy, d.reason)
            return DecisionOutcome(d, "dry-run")
        assert listing is not None
        if split_key(name)[0] in self._shared_ids:
            return DecisionOutcome(d, "failed", f"two proxies register as proxy id "
                                                f"{split_key(name)[0]}")
        inst = listing.get(name)
        client = self._client_of.get(name)
        if inst is None or client is None:
            if split_key(name)[0] in self._down_proxies():
                return DecisionOutcome(d, "failed", "its proxy's admin endpoint did not answer")
            if name not in self.missing_since:
                self.missing_since[name] = time.time()
                logger.warning("not restarting %s: the proxy does not serve it (missing from "
                               "GET /instances)", shown)
            return DecisionOutcome(d, "unknown-instance",
                                   "not in GET /instances: the proxy does not serve it")
        if self.config.lease_s is not None and (
                time.time() > self._lease_until - self.config.timeout_s):
            return DecisionOutcome(d, "failed", "the lease expires before a restart could end")
        if inst.generation != d.generation:
            logger.debug("not restarting %s: decided for generation %d, the proxy runs %d",
                         shown, d.generation, inst.generation)
            return DecisionOutcome(
                d, "stale", f"the proxy runs generation {inst.generation}, not {d.generation}")
        if key in self.applied:
            return DecisionOutcome(d, "already-applied",
                                   f"generation {d.generation} was restarted before")
        try:
            # The decision's mode: a `mode=warm` policy says warm or cold per restart; a cold
            # policy says nothing and leaves the proxy's wasm_restart_mode to decide.
            result = await client.restart(inst.id, d.reason, self.config.requested_by, d.mode)
        except AdminError as e:
            if e.in_doubt:
                self.applied[key] = False
                logger.warning("restart of %s generation %d in doubt: %s; the next listing "
                               "shows whether it happened", shown, d.generation, e.message)
                return DecisionOutcome(d, "in-doubt", e.message)
            if e.kind == "not-found":
                return DecisionOutcome(d, "unknown-instance", e.message)
            if e.kind in ("unreachable", "unauthorized"):
                report.fail("admin", e.message, unauthorized=e.kind == "unauthorized")
                if e.kind == "unauthorized" and client.base_url not in report.refused:
                    report.refused.append(client.base_url)
            else:
                logger.error("restart of %s generation %d failed: %s", shown, d.generation,
                             e.message)
            return DecisionOutcome(d, "failed", e.message)
        self.applied[key] = True
        self._expected[name] = result.generation
        listing[name] = dataclasses.replace(inst, generation=result.generation)
        logger.info(
            "restarted %s generation %d → %d (%s: %s); allocated %s → %s", shown, d.generation,
            result.generation, d.policy, d.reason, _mib(result.allocated_bytes_before),
            _mib(result.allocated_bytes_after),
        )
        return DecisionOutcome(d, "restarted", admin_result=result.raw)

    # ---- writing ----

    def pass_records(self, outcomes: list[DecisionOutcome], wall: float,
                     now: float | None, *, later: bool = False) -> PassRecords:
        """The records of one pass's decisions: its `decision_batches` documents (every
        decision) and the `decisions` documents of its restart decisions. Their ids are
        taken now; with ``later``, the documents are built when first asked for (behind the
        pass: the decisions and their outcomes are not changed after the pass)."""
        first = self._seq + 1
        self._seq += len(outcomes)
        self._passes += 1
        build = functools.partial(self._build_records, list(outcomes), wall, now, first,
                                  self._passes)
        if later:
            return PassRecords.later(len(outcomes), build)
        batches, restarts = build()
        return PassRecords(batches, restarts, len(outcomes))

    def _build_records(self, outcomes: list[DecisionOutcome], wall: float, now: float | None,
                       first: int, seq: int
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(any thread) The documents of :meth:`pass_records`: decision ``first`` … and
        pass ``seq`` of this manager."""
        decisions = [o.decision for o in outcomes]
        keys = [split_key(d.instance) for d in decisions]
        # One C call per decision, then a transpose: 4× faster than getattr per field.
        values = zip(*map(decision_values, decisions), strict=True) if decisions else (
            [] for _ in DECISION_FIELDS)
        fields = {name: list(column)
                  for name, column in zip(DECISION_FIELDS, values, strict=True)}
        fields["instance"] = [instance for _, instance in keys]
        columns = records.decision_columns(
            [proxy for proxy, _ in keys], fields, fields["page_bytes"],
            record_ids=[f"{self._id_prefix}{i}" for i in range(first, first + len(outcomes))],
            decided_at=wall, policy_spec=self.config.policy_spec or self.params.name,
            requested_by=self.config.requested_by, dry_run=self.config.dry_run,
            outcomes=[o.outcome for o in outcomes], details=[o.detail for o in outcomes],
            admin_results=[o.admin_result for o in outcomes])
        restarts = [i for i, action in enumerate(fields["action"]) if action == "restart"]
        return (records.decision_batches(self._manager_id, seq, columns, now, wall),
                records.rows(columns, restarts))

    def pending_count(self) -> int:
        """Decisions whose records are not stored yet (waiting, or being written)."""
        return sum(p.count for p in self._pending) + sum(p.count for p in self._in_flight)

    def _take_pending(self) -> list[PassRecords]:
        """The pending records, to write; beyond ``pending_limit`` decisions the oldest passes
        are dropped first (logged)."""
        total = sum(p.count for p in self._pending)
        dropped = 0
        while total > self.config.pending_limit and len(self._pending) > 1:
            total -= self._pending[0].count
            dropped += self._pending.pop(0).count
        if dropped:
            logger.warning("the store has been away too long: dropping the %d oldest decision "
                           "record(s) (keeping %d)", dropped, total)
        batch, self._pending = self._pending, []
        return batch

    def _write_behind(self, report: PassReport | None = None) -> None:
        """Hand the pending decision records, and the sample batches the pass consumed, to the
        store thread, behind the pass: the next pass's store work queues after it. One write
        at a time: while one is under way, what is new waits for the next pass (or
        :meth:`flush`). The write updates ``report`` (written, pending, behind_s) when it
        ends; a failed write puts its records back, to go with the next one."""
        if self._writing is not None and not self._writing.done():
            return
        batch = self._take_pending()
        consumed, self._consumed = self._consumed, []
        renew = self.config.lease_s is not None and self._lease_until > -math.inf
        if not batch and not consumed and not renew:
            return
        loop = asyncio.get_running_loop()
        # Submitted now, so that it runs before any later store work of this daemon.
        job = loop.run_in_executor(self._executor, self._behind_sync, batch, consumed, renew)
        self._in_flight = batch
        self._writing = loop.create_task(self._wrote(job, batch, report))

    async def _wrote(self, job: asyncio.Future[float], batch: list[PassRecords],
                     report: PassReport | None) -> None:
        """The end of a write behind a pass: its records are stored, or back in the queue."""
        total = sum(p.count for p in batch)
        try:
            seconds = await job
        except Exception as e:
            self._pending[:0] = batch  # the oldest first, as they were
            self._in_flight = []
            message = str(e) if isinstance(e, StoreError) else (
                f"writing the decisions failed unexpectedly ({_describe(e)})")
            if not isinstance(e, StoreError):
                logger.error("%s", message, exc_info=e)
            again = message == self._write_failure
            self._write_failure = message
            logger.log(logging.WARNING if again else logging.ERROR,
                       "%s; %d decision record(s) wait for the next write", message,
                       self.pending_count())
            if report is not None:
                report.fail("store", message)
                report.pending = self.pending_count()
            return
        self._in_flight = []
        if self._write_failure is not None:
            logger.info("decision records written again")
            self._write_failure = None
        self.behind_s.append(seconds)
        if report is not None:
            report.written += total
            report.pending = self.pending_count()
            report.behind_s = seconds

    async def written(self) -> None:
        """Wait for the write behind the last pass, if one is under way."""
        if self._writing is not None:
            await self._writing

    async def flush(self, report: PassReport | None = None) -> None:
        """Write the pending decision records now (after the write under way, if any); on
        failure keep them (bounded) for later."""
        await self.written()
        self._write_behind(report)
        await self.written()

    def _behind_sync(self, pending: list[PassRecords], consumed: list[str],
                     renew: bool = False) -> float:
        """(store thread) Behind a pass: delete the sample batches it consumed (a failure
        only leaves them to the shippers' pruning), renew the lease it holds (so that the
        next pass, finding it fresh, need not: a failure only leaves that pass to renew it),
        write the decision records; the seconds it took."""
        t0 = time.perf_counter()
        if consumed:
            try:
                delete_sample_batches(self._db_sync(), consumed)
            except Exception as e:
                self._drop_db()
                logger.debug("deleting %d read sample batch(es) failed (%s); the shippers "
                             "prune them", len(consumed), _describe(e))
        if renew:
            try:
                self._lease_sync(time.time())
            except StoreError as e:
                logger.debug("renewing the lease behind the pass failed (%s); the next pass "
                             "renews it", e)
        if pending:
            self._write_sync(pending)
        return time.perf_counter() - t0

    def _write_sync(self, pending: list[PassRecords]) -> None:
        """(store thread) Insert the records not stored yet (idempotent: they have ``_id``):
        the restart decisions, then the batches of every decision."""
        for collection, docs in (
                (DECISIONS, [d for p in pending for d in p.restarts]),
                (DECISION_BATCHES, [b for p in pending for b in p.batches])):
            try:
                delivery = insert_new(self._db_sync(), collection, docs)
            except Exception as e:
                self._drop_db()
                raise StoreError(self._store_message("write decisions to", e)) from e
            if delivery.rejected:
                logger.error("the store refused %d document(s) of %s for good (error %s); "
                             "dropping them", len(delivery.rejected), collection,
                             delivery.rejected[0][1])
