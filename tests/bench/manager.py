"""Benchmarks of the restart manager (`python -m tests.bench.manager`).

A manager pass over 1,000 instances against SPEC §9 (≤ 100 ms in steady state), split so that
the reader sees where the time goes:

(a) steady state, one new sample per instance:
    - ``decide()`` alone (pure), for ratio (learned, in its decision loop), fixed and threshold;
    - the daemon's work without I/O (``Daemon.decide_new``: clean the rows, cursors, latest
      life, ``decide()``) plus building the pass's decision records (``Daemon.pass_records``:
      1,000 decisions packed into one `decision_batches` document);
    - reading the 1,000 new samples with the daemon's own read (``Daemon._read_sync``) from
      the embedded store and from FerretDB, filled as shippers fill them
      (``store.insert_samples``: one delivery = one sample per instance, and one sample batch
      per proxy, ``--proxies``): a later pass reads the new batches (the collection keeps a
      minute of them: 12 deliveries); for comparison, the same samples read from `samples`
      (the first pass's read, or a hole's), 12 per instance stored;
    - writing the pass's decision records to each store: its `decision_batches` document and
      one `decisions` document per restart decision (``RESTART_SHARE`` of them: 1 %);
      for comparison, the 1,000 decisions as one document each (the layout before batches);
    - the whole pass on each store, end to end as the daemon runs it (``Daemon.run_pass`` with
      a lease, after a shipper's delivery: see ``whole_passes``), and what the store thread
      does behind it (the decision records, the batches read deleted), which must end
      within the interval; for comparison, the sum of the medians of the batch read, the
      daemon's work and the write, and that without the write;
    - one shipper delivery into each store (1,000 samples and their batches).
(b) the initial learning over a 15-min window of 1-s samples (900 × 1,000 samples):
    - ``decide()`` over the whole window in one pass, then the pass that ends every instance's
      measurement period (1,000 k/TTL fits and baselines);
    - reading the window from each store: measured on its first ``--window-seconds`` (60 s:
      60,000 samples) and extrapolated linearly; ``--window-seconds 900`` reads all of it.

``--instances 10000`` measures the same at 10,000 instances (give ``--window-seconds 13``: filling
FerretDB takes about 0.3 ms per document here).

The series are the model filter's (entries live for a TTL, freed blocks are reused, pages
follow the peak), with per-instance rates, TTLs and entry sizes. FerretDB is $MONGODB_URI or
one started from `just setup`'s binary; without either its rows say "skipped".

Results print as a Markdown table and are written to `results/bench/manager.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd

from addons.telemetry.records import proxy as records_proxy
from addons.telemetry.records import unpack_documents
from addons.telemetry.store import (
    DATABASE,
    DECISION_BATCHES,
    DECISIONS,
    LEASES,
    PROXIES,
    SAMPLE_BATCH_RETENTION_S,
    SAMPLE_BATCHES,
    SAMPLES,
    BatchWriter,
    close_store,
    ensure_indexes,
    insert_new,
    insert_samples,
    is_embedded,
    open_store,
    prune_manager_records,
    prune_sample_batches,
    read_sample_batches,
    register,
)
from manager.daemon import (
    Daemon,
    DaemonConfig,
    DecisionOutcome,
    PassRecords,
    PassReport,
    batch_times,
    inbox_news,
    instance_key,
)
from manager.policies import PolicyParams, PolicyState, decide, initial_state, parse_policy
from tests.servers import ferretdb

RESULTS = Path(__file__).resolve().parents[2] / "results" / "bench" / "manager.json"
WINDOW = 900  # the measurement period: 15 min of 1-s samples
INTERVAL_S = 5.0  # the manager's default pass interval
TARGET_MS = 100.0
RESTART_SHARE = 0.01  # restart decisions among a steady pass's decisions, in the write


# ----------------------------------------------------------------------------------------------
# Synthetic fleet
# ----------------------------------------------------------------------------------------------


class Fleet:
    """n instances of the model filter sampled every second for `seconds` seconds."""

    def __init__(self, n: int, seconds: int, seed: int = 0, proxies: int = 3) -> None:
        rng = np.random.default_rng(seed)
        rate = rng.uniform(2.0, 20.0, n)  # misses (outbound calls) per second
        ttl = rng.choice([120, 300, 600], n)
        k = rng.choice([16.0, 32.0, 63.0], n)  # entries per page
        t = np.arange(seconds)
        outbound = np.cumsum(rng.poisson(rate[:, None], (n, seconds)), axis=1).astype(float)
        back = t[None, :] - ttl[:, None]
        expired = np.where(back >= 0, np.take_along_axis(outbound, np.clip(back, 0, None), 1), 0)
        peak = np.maximum.accumulate(outbound - expired, axis=1)
        self.pages = 4.0 + np.ceil(peak / k[:, None])
        self.outbound = outbound
        self.names = np.array([f"site-{i:04d}.example" for i in range(n)])
        self.n = n
        self.proxies = proxies
        self.proxy_of = [f"proxy-{i % proxies}" for i in range(n)]

    def frame(self, t0: int, t1: int) -> pd.DataFrame:
        """Samples at seconds [t0, t1) of every instance, as the store holds them."""
        times = np.arange(t0, t1, dtype=float)
        pages = self.pages[:, t0:t1].ravel()
        outbound = self.outbound[:, t0:t1].ravel()
        return pd.DataFrame({
            "instance": np.repeat(self.names, len(times)), "generation": 0,
            "time": np.tile(times, self.n), "started_at": 0.0, "allocated_pages": pages,
            "allocated_bytes": pages * 65536, "requests": outbound * 3, "outbound": outbound,
        })

    def docs(self, t0: int, t1: int) -> list[dict[str, Any]]:
        """The same as documents, with the fields the addon also writes."""
        frame = self.frame(t0, t1).assign(
            tenant=lambda f: f["instance"], live_entries=0, live_bytes=0.0, state="running",
            proxy=np.repeat(self.proxy_of, t1 - t0))
        records: list[dict[str, Any]] = frame.to_dict("records")
        for r in records:
            r["generation"], r["allocated_pages"] = int(r["generation"]), int(r["allocated_pages"])
            r["allocated_bytes"], r["requests"] = int(r["allocated_bytes"]), int(r["requests"])
            r["outbound"] = int(r["outbound"])
        return records


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return (time.perf_counter() - t0) * 1000, value


def stats(values: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(values), "min_ms": min(values),
            "max_ms": max(values), "runs": len(values)}


def pure_passes(fleet: Fleet, passes: int, runs: int
                ) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(b) decide() over the window and the learning pass (median of ``runs``); (a) steady
    decide() per policy. Returns the two result sections and the learned ratio state for the
    daemon measurement."""
    ratio = parse_policy("ratio")
    window = fleet.frame(0, WINDOW)
    first = fleet.frame(WINDOW, WINDOW + 1)
    window_times, learn_times = [], []
    for _ in range(runs):
        state = initial_state(ratio)
        ms, (decisions, state) = timed(lambda s=state: decide(s, window, WINDOW - 1.0, ratio))
        assert all(d.reason.startswith("keep: measuring") for d in decisions)
        window_times.append(ms)
        ms, (decisions, state) = timed(lambda s=state: decide(s, first, float(WINDOW), ratio))
        assert sum(d.action == "restart" for d in decisions) == fleet.n  # first decision (A13)
        learn_times.append(ms)
    learning = {"samples": fleet.n * WINDOW, "decide_window": stats(window_times),
                "decide_learning_pass": stats(learn_times)}
    learned = state
    steady: dict[str, Any] = {}
    frames = [fleet.frame(t, t + 1) for t in range(WINDOW + 1, WINDOW + 1 + passes)]
    for spec in ("ratio", "fixed:30m", "threshold:64MiB"):
        params: PolicyParams = parse_policy(spec)
        st = learned if spec == "ratio" else initial_state(params)
        if spec != "ratio":
            _, st = decide(st, fleet.frame(WINDOW, WINDOW + 1), float(WINDOW), params)
        times = []
        for f in frames:
            ms, (_, st) = timed(lambda f=f, st=st, params=params: decide(  # type: ignore[misc]
                st, f, float(f["time"].iloc[0]), params))
            times.append(ms)
        steady[f"decide_{spec.split(':')[0]}"] = stats(times)
    return steady, learning, learned


def daemon_cpu(fleet: Fleet, learned: Any, passes: int) -> dict[str, float]:
    """(a) Daemon.decide_new (no I/O) and the decision records, ratio learned."""
    config = DaemonConfig(store="unused", params=parse_policy("ratio"), admin_url=None,
                          dry_run=True)
    daemon = Daemon(config)
    daemon.state = learned
    daemon.frontier = float(WINDOW)
    daemon.cursor = dict.fromkeys(fleet.names.tolist(), float(WINDOW))
    times = []
    for t in range(WINDOW + 1, WINDOW + 1 + passes):
        raw = fleet.frame(t, t + 1).sample(frac=1.0, random_state=t)  # store order is arbitrary

        def one(raw: pd.DataFrame = raw) -> PassRecords:
            decisions = daemon.decide_new(raw, PassReport())
            return daemon.pass_records([DecisionOutcome(d, "keep") for d in decisions],
                                       time.time(), daemon.frontier)

        ms, records = timed(one)
        assert records.count == fleet.n
        times.append(ms)
    daemon._executor.shutdown()
    return stats(times)


@contextmanager
def stores(skip_ferretdb: bool) -> Iterator[list[tuple[str, str | None, str]]]:
    """(label, store, database) of the embedded store and FerretDB (store None: skipped)."""
    with tempfile.TemporaryDirectory(prefix="bench-manager-") as tmp:
        embedded = ("embedded", str(Path(tmp) / "store"), DATABASE)
        if skip_ferretdb:
            yield [embedded, ("FerretDB", None, "")]
            return
        try:
            server = ferretdb()
            uri = server.__enter__()
        except RuntimeError as e:
            print(f"FerretDB skipped: {e}", file=sys.stderr)
            yield [embedded, ("FerretDB", None, "")]
            return
        database = f"bench_manager_{uuid.uuid4().hex[:8]}"
        try:
            yield [embedded, ("FerretDB", uri, database)]
        finally:
            client = open_store(uri, database)
            client.client.drop_database(database)
            close_store(client)
            server.__exit__(None, None, None)


def store_io(fleet: Fleet, store: str, database: str, runs: int, window_seconds: int,
             records: Callable[[], PassRecords], prune_passes: int) -> dict[str, Any]:
    """Reads with the daemon's own code, the decision write and the retention's prune, on
    one store.

    The store is filled as shippers fill it (`store.insert_samples`): each delivery stores one
    sample per instance and one sample batch per proxy. A pass every 5 s that finds one new
    sample per instance finds, beside the new batch of each proxy, the batches of the last
    `SAMPLE_BATCH_RETENTION_S` (a minute: 12 deliveries), which a server without usable
    indexes scans. One delivery stands for one 5-s pass: the samples' clock counts deliveries,
    and the daemon's 10-s overlap reaches back two of them."""
    config = DaemonConfig(store=store, database=database, params=parse_policy("ratio"),
                          admin_url=None, dry_run=True)
    daemon = Daemon(config)
    db = open_store(store, database)
    writer = BatchWriter()
    out: dict[str, Any] = {"proxies": fleet.proxies}

    def fill(t0: int, t1: int) -> float:
        ms = 0.0
        for t in range(t0, t1):
            docs = fleet.docs(t, t + 1)
            for i, doc in enumerate(docs):
                doc["_id"] = f"{t}-{i}"
            ms += timed(lambda docs=docs: [  # type: ignore[misc]
                insert_samples(db, docs[i:i + 10_000], writer, time.time())
                for i in range(0, len(docs), 10_000)])[0]
        return ms

    def read_batches(rows: int, repeat: int = runs) -> list[float]:
        """The daemon's read of a later pass: the newest delivery is new."""
        newest = float(len(retained) - 1)
        # The newest sample seen, minus the overlap (10 s: two deliveries of 5-s passes).
        after = newest - 1.0 - config.overlap_s / INTERVAL_S
        times = []
        for _ in range(repeat):
            daemon._chains, daemon._batches_read = dict(before_last), dict(read_before)
            ms, frame = timed(lambda: daemon._read_sync(after))
            assert len(frame) == rows and frame["time"].min() == newest, (len(frame), rows)
            times.append(ms)
        return times

    def read_samples(after: float, rows: int, repeat: int = runs) -> list[float]:
        """A read of `samples` (the first pass, or a proxy whose batches have a hole)."""
        times = []
        for _ in range(repeat):
            ms, frame = timed(lambda: daemon._read_samples(db, after, None))
            assert len(frame) == rows, (len(frame), rows)
            times.append(ms)
        return times

    retention = int(SAMPLE_BATCH_RETENTION_S // INTERVAL_S)
    try:
        ensure_indexes(db)
        # (a) 12 deliveries (a minute of 5-s passes) of one sample per instance.
        out["fill_ms_per_delivery"] = fill(0, retention) / retention
        retained = list(range(retention))
        # Where the batches stood after the delivery before the last one: only it is new.
        heads = [b for b in read_sample_batches(db, -math.inf, columns=False)
                 if b["time"] < retention - 1]
        before_last, _, _ = inbox_news({}, heads)
        read_before = batch_times(heads)
        out["batches_in_collection"] = db[SAMPLE_BATCHES].count_documents({})
        out["read_new_batches"] = stats(read_batches(fleet.n))
        out["read_new_from_samples"] = stats(read_samples(retention - 1.5, fleet.n))
        batch = [records() for _ in range(runs)]  # new records (new _id) each time
        out["write_decisions"] = stats(
            [timed(lambda b=b: daemon._write_sync([b]))[0] for b in batch])  # type: ignore[misc]
        out["decision_batch_kib"] = sum(len(b["columns"]) for b in batch[0].batches) / 1024
        out["restart_documents"] = len(batch[0].restarts)
        # The layout before decision batches: one `decisions` document per decision.
        single = [[dict(d, _id=f"single-{r}-{i}") for i, d in enumerate(
            record for b in records().batches for record in unpack_documents(b))]
            for r in range(min(runs, 3))]
        out["write_decision_documents"] = stats(
            [timed(lambda s=s: insert_new(db, DECISIONS, s))[0]  # type: ignore[misc]
             for s in single])
        db[DECISIONS].drop()
        db[DECISION_BATCHES].drop()
        out["prune"] = prune(db, records(), prune_passes)
        # (b) the window: the first pass reads everything from `samples`.
        seconds = window_seconds
        out["window_fill_ms"] = fill(retention, seconds)
        ms = statistics.median(read_samples(-math.inf, fleet.n * seconds, min(runs, 3)))
        out["read_window"] = {"seconds": seconds, "samples": fleet.n * seconds, "ms": ms,
                              "extrapolated_900s_ms": ms * WINDOW / seconds,
                              "us_per_doc": ms * 1000 / (fleet.n * seconds)}
    finally:
        daemon._close_sync()
        daemon._executor.shutdown()
        db[SAMPLES].drop()
        db[SAMPLE_BATCHES].drop()
        close_store(db)
    return out


def prune(db: Any, one: PassRecords, passes: int) -> dict[str, Any]:
    """The retention's prune (``store.prune_manager_records``) over ``passes`` passes' records
    (720: an hour of 5-s passes; ``one``'s documents again, one pass every 5 s on the samples'
    clock), deleting the oldest tenth: what ``--retention`` does every tenth of it, on its own
    thread."""
    ensure_indexes(db)
    for start in range(0, passes, 50):
        batches, restarts = [], []
        for k in range(start, min(passes, start + 50)):
            batches += [dict(b, _id=f"prune-{k}-{b['part']}", time=5.0 * k) for b in one.batches]
            restarts += [dict(d, _id=f"prune-{k}-{i}", time=5.0 * k)
                         for i, d in enumerate(one.restarts)]
        insert_new(db, DECISION_BATCHES, batches)
        insert_new(db, DECISIONS, restarts)
    cutoff = 5.0 * (passes // 10)
    ms, deleted = timed(lambda: prune_manager_records(db, cutoff))
    expected = (passes // 10) * (len(one.batches) + len(one.restarts))
    assert deleted == expected, (deleted, expected)
    held = db[DECISION_BATCHES].count_documents({}) + db[DECISIONS].count_documents({})
    db[DECISION_BATCHES].drop()
    db[DECISIONS].drop()
    return {"passes": passes, "documents_before": held + deleted, "deleted": deleted,
            "ms": ms}


def keyed_state(fleet: Fleet, state: PolicyState) -> PolicyState:
    """``state`` (learned from frames without proxies) with its instances named as the daemon
    names them after a store read: (proxy, instance) keys."""
    proxy = dict(zip(fleet.names.tolist(), fleet.proxy_of, strict=True))
    names = tuple(instance_key(proxy[n], n) for n in state.slots.names)
    slots = dataclasses.replace(state.slots, names=names,
                                slot_of=MappingProxyType({n: i for i, n in enumerate(names)}))
    return dataclasses.replace(state, slots=slots)


def whole_passes(fleet: Fleet, learned: PolicyState, store: str, database: str,
                 passes: int) -> dict[str, Any]:
    """(a) Whole passes, end to end, as ``python -m manager run --dry-run --lease 15s`` makes
    them (``Daemon.run_pass``: renew the lease, read the new sample batches, clean, decide()
    (ratio, learned), build the decision records and hand them to the store thread), each
    after one shipper delivery of one new sample per instance, the shippers keeping a minute
    of deliveries and the manager, which holds the lease, deleting the batches it read; plus
    the read of the `proxies` collection (3 registered) that a manager with admin endpoints
    makes every pass. The admin endpoints' GET /instances (HTTP) is not included. A first
    pass, which takes the lease, is not timed.

    What the store thread does behind each pass (write the decision records, delete the
    batches read) is timed apart, and waited for before the next delivery: it must end
    within the interval (5 s)."""
    config = DaemonConfig(store=store, database=database, params=parse_policy("ratio"),
                          admin_url=None, dry_run=True, lease_s=15.0)
    daemon = Daemon(config)
    db = open_store(store, database)
    writer = BatchWriter()
    retention = int(SAMPLE_BATCH_RETENTION_S // INTERVAL_S)

    def deliver(t: int) -> None:
        """A shipper's delivery at `t` (its clock counts deliveries) and its pruning."""
        docs = fleet.docs(t, t + 1)
        for i, doc in enumerate(docs):
            doc["_id"] = f"{t}-{i}"
        for i in range(0, len(docs), 10_000):
            insert_samples(db, docs[i:i + 10_000], writer, float(t))
        prune_sample_batches(db, None, float(t - retention + 1))

    async def run() -> dict[str, Any]:
        await daemon._in_store(daemon._db_sync)
        pass_ms, proxies_ms, behind_ms, done_ms, decisions, inbox = [], [], [], [], [], []
        for k in range(passes + 1):
            deliver(WINDOW + 1 + k)
            inbox.append(db[SAMPLE_BATCHES].count_documents({}))
            t0 = time.perf_counter()
            await daemon._in_store(daemon._proxies_sync, time.time())
            proxies_ms.append((time.perf_counter() - t0) * 1000)
            report = await daemon.run_pass()
            ended = time.perf_counter()
            assert report.ok and report.samples == fleet.n, (report.failure, report.samples)
            assert report.pending == fleet.n  # handed to the store thread, behind the pass
            # The write behind the pass (the decision records, the batches read deleted):
            # it must end well within the interval, before the next pass.
            await daemon.written()
            waited = (time.perf_counter() - ended) * 1000
            assert report.written == fleet.n and report.pending == 0, report.failure
            assert report.behind_s is not None and report.behind_s < INTERVAL_S
            if k == 0:  # the first pass takes the lease, and FerretDB's first queries are slow
                proxies_ms.pop()
                inbox.pop()
                continue
            pass_ms.append(report.seconds * 1000)
            behind_ms.append(report.behind_s * 1000)
            done_ms.append(waited)
            decisions.append(len(report.decisions))
        await daemon.aclose()
        return {"pass": stats(pass_ms), "proxies_read": stats(proxies_ms),
                "pass_with_proxies": stats([a + b for a, b in zip(pass_ms, proxies_ms,
                                                                   strict=True)]),
                "behind": stats(behind_ms), "behind_done_after_pass": stats(done_ms),
                "interval_s": INTERVAL_S, "decisions_per_pass": decisions,
                "batches_before_pass": inbox,
                "batches_in_collection": db[SAMPLE_BATCHES].count_documents({})}

    try:
        ensure_indexes(db)
        register(db, PROXIES, [records_proxy(p, f"http://127.0.0.1:{9901 + i}", time.time(),
                                             0.0, 1, fleet.n // fleet.proxies)
                               for i, p in enumerate(sorted(set(fleet.proxy_of)))])
        for t in range(WINDOW - retention + 2, WINDOW + 1):  # a minute of deliveries before
            deliver(t)
        heads = read_sample_batches(db, -math.inf, columns=False)
        daemon._chains, _, _ = inbox_news({}, heads)
        daemon._batches_read = batch_times(heads)
        daemon._consumed = [b["_id"] for b in heads]  # as a first pass (from `samples`) would
        daemon.state = keyed_state(fleet, learned)
        daemon.frontier = float(WINDOW)
        daemon.cursor = {instance_key(p, n): float(WINDOW)
                         for p, n in zip(fleet.proxy_of, fleet.names.tolist(), strict=True)}
        return asyncio.run(run())
    finally:
        if is_embedded(db):  # its file goes with the temporary directory
            for name in (SAMPLES, SAMPLE_BATCHES, DECISIONS, DECISION_BATCHES, PROXIES, LEASES):
                db[name].drop()
        else:
            db.client.drop_database(database)
        close_store(db)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    n = results["instances"]
    rows: list[tuple[str, str, str, str]] = []

    def ms(value: float) -> str:
        return f"{value:,.1f} ms" if value < 10_000 else f"{value / 1000:,.1f} s"

    def add(name: str, value: float, target: bool = False) -> None:
        met = ("yes" if value <= TARGET_MS else "no") if target else ""
        rows.append((name, ms(value), f"≤ {TARGET_MS:g} ms" if target else "", met))

    steady = results["steady"]
    add(f"(a) decide(), ratio (learned), {n:,} instances × 1 new sample",
        steady["decide_ratio"]["median_ms"], True)
    add("(a) decide(), fixed:30m", steady["decide_fixed"]["median_ms"])
    add("(a) decide(), threshold:64MiB", steady["decide_threshold"]["median_ms"])
    add(f"(a) daemon without I/O: clean, cursors, decide() (ratio) + records of {n:,}",
        steady["daemon_cpu"]["median_ms"], True)
    for label, io in results["stores"].items():
        if io is None:
            rows.append((f"(a) {label}: read / write", "skipped", "", ""))
            continue
        add(f"(a) {label}: read {n:,} new samples from their batches ({io['proxies']} "
            f"proxies; {io['batches_in_collection']} batches kept, a minute of deliveries)",
            io["read_new_batches"]["median_ms"])
        add(f"(a) {label}: read the same {n:,} from `samples` (first pass, or a hole; "
            f"{SAMPLE_BATCH_RETENTION_S // INTERVAL_S:.0f} per instance stored)",
            io["read_new_from_samples"]["median_ms"])
        add(f"(a) {label}: write the pass's decisions: {n:,} in one batch "
            f"({io['decision_batch_kib']:.0f} KiB) + {io['restart_documents']} restart "
            "documents", io["write_decisions"]["median_ms"])
        add(f"(a) {label}: for comparison, {n:,} decisions as one document each",
            io["write_decision_documents"]["median_ms"])
        p = io["prune"]
        add(f"(a) {label}: retention, on its own thread: delete the oldest tenth of "
            f"{p['passes']:,} passes' records ({p['deleted']:,} of {p['documents_before']:,} "
            "decision_batches and decisions documents)", p["ms"])
        whole = io["whole_pass"]
        add(f"(a) {label}: the whole pass, end to end (Daemon.run_pass: lease, read the new "
            f"batches, decide(), hand the records to the store thread; "
            f"{statistics.median(whole['batches_before_pass']):.0f} batches in the inbox) + the "
            "proxies read", whole["pass_with_proxies"]["median_ms"], True)
        add(f"(a) {label}: … of which the proxies read", whole["proxies_read"]["median_ms"])
        add(f"(a) {label}: behind the pass, on the store thread: write the decision records, "
            f"delete the batches read (ended {whole['behind_done_after_pass']['max_ms']:.0f} ms "
            f"after the pass at most; the next comes {whole['interval_s']:g} s later)",
            whole["behind"]["median_ms"])
        add(f"(a) {label}: the whole pass as the sum of its parts' medians (read the batches "
            "+ daemon + write)",
            io["read_new_batches"]["median_ms"] + steady["daemon_cpu"]["median_ms"]
            + io["write_decisions"]["median_ms"], True)
        add(f"(a) {label}: the pass without the decision write (read the batches + daemon)",
            io["read_new_batches"]["median_ms"] + steady["daemon_cpu"]["median_ms"], True)
        add(f"(a) {label}: a shipper's delivery ({n:,} samples + their batches)",
            io["fill_ms_per_delivery"])
    learning = results["learning"]
    add(f"(b) decide() over the window ({learning['samples']:,} samples, one pass)",
        learning["decide_window"]["median_ms"])
    add(f"(b) decide(), the pass that ends the measurement periods ({n:,} fits)",
        learning["decide_learning_pass"]["median_ms"])
    for label, io in results["stores"].items():
        if io is None:
            continue
        w = io["read_window"]
        how = "measured" if w["seconds"] == WINDOW else f"from {w['samples']:,} measured"
        add(f"(b) {label}: read the window ({n * WINDOW:,} samples; {how}; "
            f"{w['us_per_doc']:.0f} µs/sample)", w["extrapolated_900s_ms"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000, help="fleet size")
    parser.add_argument("--proxies", type=int, default=3,
                        help="proxies the instances are spread over (one batch each per "
                             "delivery)")
    parser.add_argument("--passes", type=int, default=20, help="steady-state passes timed")
    parser.add_argument("--runs", type=int, default=5, help="repeats of each store operation")
    parser.add_argument("--learning-runs", type=int, default=3,
                        help="repeats of the initial learning (b)")
    parser.add_argument("--window-seconds", type=int, default=60,
                        help="seconds of the window filled into and read from the stores "
                             f"(the rest is extrapolated; {WINDOW}: all of it)")
    parser.add_argument("--prune-passes", type=int, default=720,
                        help="passes of decision records held when the retention's prune is "
                             "timed (default 720: an hour of 5-s passes)")
    parser.add_argument("--no-ferretdb", action="store_true", help="skip FerretDB")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)

    print(f"benchmarking the manager over {args.instances:,} instances …", file=sys.stderr)
    load_before = os.getloadavg()[0]
    fleet = Fleet(args.instances, WINDOW + 1 + args.passes, proxies=args.proxies)
    steady, learning, learned = pure_passes(fleet, args.passes, args.learning_runs)
    steady["daemon_cpu"] = daemon_cpu(fleet, learned, args.passes)

    # The records of one steady pass, to write (each call: new records, new _id), with
    # RESTART_SHARE restart decisions.
    daemon = Daemon(DaemonConfig(store="unused", params=parse_policy("fixed:30m"),
                                 admin_url=None, dry_run=True))
    decisions, _ = decide(initial_state(daemon.params), fleet.frame(0, 1), 0.0, daemon.params)
    every = max(1, round(1 / RESTART_SHARE))
    outcomes = [DecisionOutcome(dataclasses.replace(d, action="restart"), "restarted")
                if i % every == 0 else DecisionOutcome(d, "keep")
                for i, d in enumerate(decisions)]

    def records() -> PassRecords:
        return daemon.pass_records(outcomes, time.time(), 0.0)

    io: dict[str, Any] = {}
    with stores(args.no_ferretdb) as targets:
        for label, store, database in targets:
            if store is None:
                io[label] = None
                continue
            print(f"… {label}", file=sys.stderr)
            io[label] = store_io(fleet, store, database, args.runs,
                                 min(max(args.window_seconds, 13), WINDOW), records,
                                 args.prune_passes)
            io[label]["whole_pass"] = whole_passes(
                fleet, learned, store, f"{database}_pass" if database != DATABASE
                else "whole_pass", min(args.passes - 1, max(args.runs, 10)))
    daemon._executor.shutdown()

    results = {
        "instances": args.instances, "machine": platform.machine(),
        "python": platform.python_version(), "cpus": _cpus(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "steady": steady, "learning": learning, "stores": io,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| measure | result | target | met |\n|---|---|---|---|")
    for name, value, target, met in table(results):
        print(f"| {name} | {value} | {target} | {met} |")
    print(f"\nMedians (steady: {args.passes} passes; stores: {args.runs} runs; learning: "
          f"{args.learning_runs} runs) on {_cpus()} CPUs, 1-min load average "
          f"{load_before:.1f} → {os.getloadavg()[0]:.1f}.")
    print(f"\n(written to {args.out})", file=sys.stderr)
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
