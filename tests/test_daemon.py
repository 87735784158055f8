"""The manager daemon against a real store and the real admin endpoint.

Store side: the embedded store (a tmp dir) and FerretDB (`mongo_uri`), parametrized. Admin side:
`addons.admin.AdminServer` serving the real `WasmAuth` addon on the test's event loop; instances
exist because a flow went through the addon. Samples are synthetic and written straight into the
store, as the addon's shipper would. Network faults (a lost answer, a database going away) are
made by a real TCP relay in front of the real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mitmproxy.test import taddons, tflow

from addons.admin import AdminServer
from addons.telemetry import records
from addons.telemetry.store import (
    DATABASE,
    BatchWriter,
    close_store,
    database_problem,
    insert_samples,
    open_store,
    read_decisions,
)
from addons.wasm_auth import WasmAuth
from manager.__main__ import build_config, build_parser, database_used, main, policy_params
from manager.admin_client import AdminClient, AdminError, parse_instances, parse_restart
from manager.daemon import (
    Daemon,
    DaemonConfig,
    DecisionOutcome,
    Endpoint,
    PassRecords,
    PassReport,
    backoff_delay,
    batches_frame,
    clean_samples,
    combine_rows,
    forget_instances,
    inbox_news,
    instance_key,
    latest_life,
    renewed_instances,
    split_key,
)
from manager.estimate import EstimatorParams
from manager.policies import (
    AdaptiveParams,
    Decision,
    FixedParams,
    RatioParams,
    ThresholdParams,
    decide,
    initial_state,
    parse_policy,
    state_frame,
)
from tests.conftest import ROOT
from tests.hooks import run_hook
from tests.servers import free_port
from tests.test_policies import ModelFilter, sale_traffic

TOKEN = "daemon-test-token"
PROXY = "test-proxy"


def K(instance: str) -> str:
    """The daemon's key of `instance` on the test's proxy."""
    return instance_key(PROXY, instance)
PAGE = 65536


# ----------------------------------------------------------------------------------------------
# Real parts: the store, the proxy's admin endpoint, a TCP relay
# ----------------------------------------------------------------------------------------------


@dataclass
class Store:
    """A store the daemon reads, and the test's own client to write samples and read back."""

    uri: str
    database: str
    kind: str

    def __post_init__(self) -> None:
        self.db = open_store(self.uri, self.database)
        self.writer = BatchWriter()  # writes as a shipper does: samples, then their batch
        self.written = 0

    def write(self, docs: list[dict[str, Any]]) -> None:
        if docs:
            ids = range(self.written, self.written + len(docs))
            self.written += len(docs)
            insert_samples(self.db, [{"_id": f"t-{i}", "proxy": PROXY, **d}
                                     for i, d in zip(ids, docs, strict=True)],
                           self.writer, time.time())

    def decisions(self) -> list[dict[str, Any]]:
        """Every decision (from `decision_batches`), without `_id`."""
        docs = [{k: v for k, v in d.items() if k != "_id"} for d in read_decisions(self.db)]
        return sorted(docs, key=lambda d: (d["decided_at"], d["instance"], d["time"]))

    def restart_documents(self) -> list[dict[str, Any]]:
        """The `decisions` collection: one document per restart decision."""
        return list(self.db.decisions.find({}, {"_id": 0}))


@pytest.fixture(params=["embedded", "ferretdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "embedded":
        s = Store(str(tmp_path / "store"), DATABASE, "embedded")
        yield s
        close_store(s.db)
        return
    uri = request.getfixturevalue("mongo_uri")
    s = Store(uri, f"test_daemon_{uuid.uuid4().hex[:10]}", "ferretdb")
    yield s
    s.db.client.drop_database(s.database)
    close_store(s.db)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Store]:
    """For admin-side tests: the store is not what they are about."""
    s = Store(str(tmp_path / "store"), DATABASE, "embedded")
    yield s
    close_store(s.db)


HOSTS = ("a.example", "b.example", "shop")


@pytest.fixture
async def addon(tmp_path: Path) -> AsyncIterator[WasmAuth]:
    """The real wasm_auth addon with one filter instance per host in HOSTS (generation 0)."""
    wasm = WasmAuth()
    with taddons.context(wasm) as tctx:
        tctx.configure(wasm, wasm_log_metrics=False, wasm_admin_listen="", wasm_proxy_id=PROXY,
                       wasm_store=str(tmp_path / "proxy-store"),
                       wasm_spool=str(tmp_path / "spool"))
        for host in HOSTS:
            flow = tflow.tflow()
            flow.request.headers["Host"] = host
            await run_hook(wasm.request(flow))  # no token: a 401, but the instance now exists
        yield wasm
        await wasm.done()


@dataclass
class Proxy:
    addon: WasmAuth
    server: AdminServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def generation(self, instance: str) -> int:
        return {i["id"]: i["generation"] for i in self.addon.list_instances()}[instance]


@pytest.fixture
async def proxy(addon: WasmAuth) -> AsyncIterator[Proxy]:
    server = AdminServer(addon, TOKEN, "127.0.0.1", 0)
    await server.start()
    yield Proxy(addon, server)
    await server.stop()


class Relay:
    """A TCP relay on 127.0.0.1 in front of a real server, to make real network faults.

    ``mode`` (one-shot, for the next POST request seen): "drop-response" forwards the request
    and loses the answer; "drop-request" closes the connection without forwarding it.
    :meth:`stop` closes the listener and every connection (an outage); :meth:`start` again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.mode = "pass"
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        self._writers |= {writer, up_w}
        lose_answer = asyncio.Event()

        async def upstream() -> None:
            while data := await reader.read(65536):
                if data.startswith(b"POST ") and self.mode == "drop-request":
                    self.mode = "pass"
                    break
                if data.startswith(b"POST ") and self.mode == "drop-response":
                    self.mode = "pass"
                    lose_answer.set()
                up_w.write(data)
                await up_w.drain()
            writer.close()
            up_w.close()

        async def downstream() -> None:
            while data := await up_r.read(65536):
                if lose_answer.is_set():
                    break
                writer.write(data)
                await writer.drain()
            writer.close()
            up_w.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)
        self._writers -= {writer, up_w}
        self._tasks.discard(task)


@contextlib.asynccontextmanager
async def relay_to(port: int) -> AsyncIterator[Relay]:
    relay = Relay(port)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


# ----------------------------------------------------------------------------------------------
# Samples and daemons
# ----------------------------------------------------------------------------------------------


def sample(instance: str, generation: int, t: float, started_at: float = 0.0, pages: int = 10,
           outbound: int | None = None) -> dict[str, Any]:
    """One sample document as the addon writes it."""
    out = int(t - started_at) if outbound is None else outbound
    return {
        "time": float(t), "proxy": PROXY, "instance": instance, "tenant": instance,
        "generation": generation,
        "started_at": float(started_at), "allocated_pages": pages,
        "allocated_bytes": pages * PAGE, "requests": 3 * out, "outbound": out,
        "live_entries": 1, "live_bytes": 1024.0, "state": "running",
    }


def series(instance: str, generation: int, times: range | list[float], started_at: float = 0.0,
           pages: int = 10) -> list[dict[str, Any]]:
    return [sample(instance, generation, t, started_at, pages) for t in times]


def daemon_for(store: Store, admin: Proxy | str | None, policy: str, **kw: Any) -> Daemon:
    url = admin.url if isinstance(admin, Proxy) else admin
    config = DaemonConfig(
        store=store.uri, database=store.database, params=parse_policy(policy),
        policy_spec=policy, admin_url=url, token=kw.pop("token", TOKEN),
        backoff_min_s=kw.pop("backoff_min_s", 0.01),
        backoff_max_s=kw.pop("backoff_max_s", 0.05), timeout_s=kw.pop("timeout_s", 2.0),
        heartbeat_s=kw.pop("heartbeat_s", None), **kw,
    )
    return Daemon(config)


def outcomes(report: Any) -> dict[tuple[str, int], str]:
    return {(split_key(o.decision.instance)[1], o.decision.generation): o.outcome
            for o in report.decisions}


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------------------------------------
# Restarts through the endpoint, records, dry run
# ----------------------------------------------------------------------------------------------


async def test_fixed_restarts_through_the_admin_endpoint(store: Store, proxy: Proxy) -> None:
    # a.example is 33 min up (restart), b.example 10 min (keep).
    store.write(series("a.example", 0, range(0, 2000, 10)) + series("b.example", 0, range(0, 610, 10)))
    async with daemon_for(store, proxy, "fixed:30m") as daemon:
        before = time.time()
        report = await daemon.run_pass()
        assert report.ok, report.failure
        assert outcomes(report) == {("a.example", 0): "restarted", ("b.example", 0): "keep"}
        assert report.samples == 200 + 61 and report.listed == len(HOSTS)
        assert proxy.generation("a.example") == 1 and proxy.generation("b.example") == 0

        # The records are written behind the pass, which ends first.
        assert report.written == 0 and report.pending == 2
        await daemon.written()
        assert report.pending == 0 and report.behind_s is not None
        records = store.decisions()
        assert len(records) == 2 and report.written == 2
        # Every decision is in the pass's batch; the restart decision also in `decisions`.
        assert store.db.decision_batches.count_documents({}) == 1
        [stored] = store.restart_documents()
        a, b = sorted(records, key=lambda r: r["instance"])
        assert stored == a
        assert a["action"] == "restart" and a["outcome"] == "restarted" and a["applied"] is True
        assert a["reason"] == "uptime 30.0 min ≥ 30 min" and a["time"] == 1800.0
        assert a["policy"] == "fixed" and a["policy_spec"] == "fixed:30m"
        assert a["requested_by"] == "manager:fixed" and a["dry_run"] is False
        assert a["admin_result"]["generation"] == 1 and a["admin_result"]["id"] == "a.example"
        assert before <= a["decided_at"] <= time.time()  # wall clock
        assert a["now"] == 1990.0  # decide()'s now: the newest sample seen
        assert b["action"] == "keep" and b["outcome"] == "keep" and b["applied"] is False
        assert b["reason"].startswith("keep: uptime 10.0 min < 30 min")

        # Nothing new: nothing decided, nothing restarted.
        report = await daemon.run_pass()
        assert report.ok and report.samples == 0 and report.decisions == []
        assert proxy.generation("a.example") == 1

        # Late samples of generation 0 (written before the restart took effect), past
        # retry_after: the policy asks again, but generation 0 is over: no second restart.
        store.write(series("a.example", 0, range(2000, 2100, 10)))
        report = await daemon.run_pass()
        assert outcomes(report) == {("a.example", 0): "stale"}
        assert proxy.generation("a.example") == 1
        await daemon.written()
        assert len(store.decisions()) == 3


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "applied"])
async def test_threshold_and_dry_run(store: Store, proxy: Proxy, dry_run: bool) -> None:
    store.write(series("a.example", 0, range(0, 100, 5), pages=40)  # 2.5 MiB
                + series("b.example", 0, range(0, 100, 5), pages=8))  # 0.5 MiB
    async with daemon_for(store, proxy, "threshold:2MiB", dry_run=dry_run) as daemon:
        report = await daemon.run_pass()
    assert report.ok
    expected = "dry-run" if dry_run else "restarted"
    assert outcomes(report) == {("a.example", 0): expected, ("b.example", 0): "keep"}
    assert proxy.generation("a.example") == (0 if dry_run else 1)
    assert proxy.generation("b.example") == 0
    [a] = [r for r in store.decisions() if r["instance"] == "a.example"]
    assert a["action"] == "restart" and a["dry_run"] is dry_run and a["applied"] is not dry_run
    assert a["reason"] == "allocated 2.5 MiB ≥ threshold 2 MiB"


async def test_dry_run_without_an_admin_endpoint(embedded: Store) -> None:
    embedded.write(series("gone.example", 0, range(0, 2000, 100)))
    async with daemon_for(embedded, None, "fixed:30m", dry_run=True) as daemon:
        report = await daemon.run_pass()
    assert report.ok and report.listed is None
    assert outcomes(report) == {("gone.example", 0): "dry-run"}
    with pytest.raises(ValueError, match="only --dry-run"):
        DaemonConfig(store=embedded.uri, params=FixedParams(), admin_url=None)
    with pytest.raises(ValueError, match="retention_s must be 0 or more seconds"):
        DaemonConfig(store=embedded.uri, params=FixedParams(), admin_url=None, dry_run=True,
                     retention_s=-1.0)


async def test_a_proxy_whose_clock_runs_ahead_does_not_hide_the_others(
        embedded: Store) -> None:
    """Each proxy's samples carry its own clock. One proxy an hour ahead of the others must
    neither age their instances by an hour (a `fixed` rule would restart them at once) nor
    move the read window past their new samples (nothing of theirs would be decided again)."""
    ahead = [{**sample("b.example", 0, 3600.0 + t, started_at=3600.0), "proxy": "ahead",
              "_id": f"ahead-{t}"} for t in range(0, 610, 10)]
    insert_samples(embedded.db, ahead, BatchWriter(), time.time())
    embedded.write(series("a.example", 0, range(0, 610, 10)))  # up 10 min: keep
    async with daemon_for(embedded, None, "fixed:30m", dry_run=True) as daemon:
        report = await daemon.run_pass()
        assert report.ok
        assert outcomes(report) == {("a.example", 0): "keep", ("b.example", 0): "keep"}
        embedded.write(series("a.example", 0, range(610, 1910, 10)))  # up 31 min: restart
        report = await daemon.run_pass()
        assert report.ok
        assert outcomes(report) == {("a.example", 0): "dry-run"}


# ----------------------------------------------------------------------------------------------
# The ratio rule in a closed loop: restarts through the endpoint start new generations
# ----------------------------------------------------------------------------------------------


async def test_ratio_closed_loop_through_the_endpoint(store: Store, proxy: Proxy) -> None:
    """The model filter of test_policies behind the real endpoint: the test writes samples
    (every 3 s) and runs a pass every 60 s; a restart through the endpoint starts the model's
    next generation. Expected as in test_closed_loop_ratio_restarts_after_the_peak."""
    step = 60
    model = ModelFilter(sale_traffic(), ttl=120, k=32)
    restarted_at: list[float] = []
    async with daemon_for(store, proxy, "ratio:measure=3m,ttl_cap=2m") as daemon:
        for end in range(step, 1500 + step, step):
            store.write([model.sample(float(t)) for t in range(end - step, end, 3)])
            report = await daemon.run_pass()
            assert report.ok, report.failure
            if any(o.outcome == "restarted" for o in report.decisions):
                [o] = [o for o in report.decisions if o.outcome == "restarted"]
                restarted_at.append(o.decision.time)
                assert proxy.generation("shop") == model.generation + 1
                model.restart(float(end))
    assert restarted_at[0] == 180.0  # the first decision after the measurement period
    assert not [t for t in restarted_at if 181 <= t < 900]  # not while the sale builds up
    assert any(900 <= t <= 990 for t in restarted_at)  # soon after it ends
    assert proxy.generation("shop") == len(restarted_at)
    records = pd.DataFrame(store.decisions())
    restarts = records[records["outcome"] == "restarted"]
    assert len(restarts) == len(restarted_at)
    later = restarts.iloc[1:]
    assert later["reason"].str.contains("required fell").all()
    assert later[["required_bytes", "surplus_bytes", "baseline_bytes", "k", "ttl_s"]].notna().all().all()


# ----------------------------------------------------------------------------------------------
# Never twice for one decision
# ----------------------------------------------------------------------------------------------


async def test_a_warm_policy_asks_for_warm_restarts(embedded: Store, proxy: Proxy) -> None:
    embedded.write(series("a.example", 0, range(0, 2000, 10)))
    async with daemon_for(embedded, proxy, "fixed:30m,mode=warm") as daemon:
        report = await daemon.run_pass()
        assert outcomes(report)[("a.example", 0)] == "restarted"
        await daemon.written()
        [record] = [r for r in embedded.decisions() if r["action"] == "restart"]
        assert (record["admin_result"]["mode"], record["admin_result"]["fallback"]) == (
            "warm", None)
        assert proxy.generation("a.example") == 1


async def test_a_lost_answer_is_not_restarted_twice(embedded: Store, proxy: Proxy,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    embedded.write(series("a.example", 0, range(0, 1900, 50)))
    async with relay_to(proxy.server.port) as relay, \
            daemon_for(embedded, f"http://127.0.0.1:{relay.port}", "fixed:30m") as daemon:
        relay.mode = "drop-response"  # the restart happens, its answer is lost
        report = await daemon.run_pass()
        assert outcomes(report) == {("a.example", 0): "in-doubt"}
        assert proxy.generation("a.example") == 1
        assert daemon.applied == {(K("a.example"), 0): False}

        # The policy asks again for generation 0 (past retry_after): the listing shows
        # generation 1, so the doubt resolves and nothing is restarted a second time.
        embedded.write(series("a.example", 0, range(1900, 2000, 50)))
        with caplog.at_level(logging.INFO, logger="manager"):
            report = await daemon.run_pass()
        assert "the restart of a.example@test-proxy generation 0 took effect" in caplog.text
        assert outcomes(report) == {("a.example", 0): "stale"}
        assert proxy.generation("a.example") == 1


async def test_a_request_that_never_arrived_is_asked_again(embedded: Store, proxy: Proxy,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    embedded.write(series("a.example", 0, range(0, 1900, 50)))
    async with relay_to(proxy.server.port) as relay, \
            daemon_for(embedded, f"http://127.0.0.1:{relay.port}", "fixed:30m") as daemon:
        relay.mode = "drop-request"
        report = await daemon.run_pass()
        assert outcomes(report) == {("a.example", 0): "in-doubt"}
        assert proxy.generation("a.example") == 0

        embedded.write(series("a.example", 0, range(1900, 2000, 50)))
        with caplog.at_level(logging.WARNING, logger="manager"):
            report = await daemon.run_pass()
        assert "the restart of a.example@test-proxy generation 0 did not take effect" in caplog.text
        assert outcomes(report) == {("a.example", 0): "restarted"}
        assert proxy.generation("a.example") == 1


async def test_one_decision_is_applied_at_most_once(embedded: Store, proxy: Proxy) -> None:
    """The (instance, generation) guard on its own: the same decision carried out twice against
    a listing that still shows its generation restarts once."""
    embedded.write(series("a.example", 0, range(0, 1900, 50)))
    async with daemon_for(embedded, proxy, "fixed:30m") as daemon:
        assert daemon.admin is not None
        listing = await daemon._list(PassReport())
        assert listing is not None
        rows = pd.DataFrame(series("a.example", 0, [1850.0])).assign(instance=K("a.example"))
        [d], _ = decide(initial_state(FixedParams(uptime_s=1800)), rows, 0.0,
                        FixedParams(uptime_s=1800))
        first = await daemon._act(d, dict(listing), PassReport())
        second = await daemon._act(d, dict(listing), PassReport())
    assert (first.outcome, second.outcome) == ("restarted", "already-applied")
    assert proxy.generation("a.example") == 1


# ----------------------------------------------------------------------------------------------
# Restarts by others, new, vanished and renewed instances
# ----------------------------------------------------------------------------------------------


async def test_a_restart_by_someone_else_is_noticed(store: Store, proxy: Proxy,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    store.write(series("a.example", 0, range(0, 610, 10)))
    async with daemon_for(store, proxy, "fixed:30m") as daemon:
        report = await daemon.run_pass()
        assert outcomes(report) == {("a.example", 0): "keep"}
        proxy.addon.restart_instance("a.example", "command", "wasm.restart")  # someone else
        store.write(series("a.example", 1, range(700, 800, 10), started_at=690.0))
        with caplog.at_level(logging.INFO, logger="manager"):
            report = await daemon.run_pass()
    assert report.foreign_restarts == 1
    assert "a.example@test-proxy was restarted by someone else: generation 0 → 1" in caplog.text
    [o] = report.decisions
    assert (o.decision.generation, o.outcome) == (1, "keep")
    assert o.decision.uptime_s == pytest.approx(100.0)  # counted from the new start
    assert state_frame(daemon.state).loc[K("a.example"), "generation"] == 1
    assert proxy.generation("a.example") == 1


async def test_unknown_and_vanished_instances(embedded: Store, proxy: Proxy,
                                              caplog: pytest.LogCaptureFixture) -> None:
    embedded.write(series("ghost.example", 0, range(0, 1900, 100)))
    async with daemon_for(embedded, proxy, "fixed:30m", forget_after_s=0.2) as daemon:
        with caplog.at_level(logging.INFO, logger="manager"):
            report = await daemon.run_pass()
            assert outcomes(report) == {("ghost.example", 0): "unknown-instance"}
            embedded.write(series("ghost.example", 0, range(1900, 2100, 100)))
            report = await daemon.run_pass()  # logged once, not again
            assert K("ghost.example") in state_frame(daemon.state).index
            await asyncio.sleep(0.25)
            report = await daemon.run_pass()
        assert caplog.text.count("ghost.example") == 2  # "not restarting", then "dropped"
        assert "not restarting ghost.example@test-proxy: the proxy does not serve it" in caplog.text
        assert "dropped the state of 1 instance(s) gone from the proxy: ghost.example" in caplog.text
        assert K("ghost.example") not in state_frame(daemon.state).index
        # Its old samples within the overlap are not decided again.
        embedded.write([sample("b.example", 0, 2105.0, started_at=2100.0)])
        report = await daemon.run_pass()
        assert [o.decision.instance for o in report.decisions] == [K("b.example")]
    assert all(g == 0 for g in (proxy.generation(h) for h in HOSTS))


async def test_a_new_life_of_the_proxy_starts_afresh(embedded: Store,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # First life: generations 0..2; the proxy restarts at t=1000: generation 0 again.
    first = (series("a.example", 0, range(0, 100, 10)) + series("a.example", 1, range(100, 200, 10), 100.0)
             + series("a.example", 2, range(200, 300, 10), 200.0))
    embedded.write(first)
    async with daemon_for(embedded, None, "fixed:10m", dry_run=True) as daemon:
        await daemon.run_pass()
        assert state_frame(daemon.state).loc[K("a.example"), "generation"] == 2
        embedded.write(series("a.example", 0, range(1000, 1700, 10), 1000.0))
        with caplog.at_level(logging.INFO, logger="manager"):
            report = await daemon.run_pass()
    assert "a.example@test-proxy began a new life" in caplog.text
    assert outcomes(report) == {("a.example", 0): "dry-run"}
    assert state_frame(daemon.state).loc[K("a.example"), "started_at"] == 1000.0
    # A fresh daemon reading both lives at once only takes the latest.
    async with daemon_for(embedded, None, "fixed:10m", dry_run=True) as fresh:
        report = await fresh.run_pass()
    assert report.dropped == 30 and outcomes(report) == {("a.example", 0): "dry-run"}


async def test_decision_records_are_stored_once_when_written_again(store: Store) -> None:
    """A pass's records written again (its first write failed half-way) store each once."""
    store.write(series("a.example", 0, range(0, 2000, 100)) + series("b.example", 0, range(0, 500, 100)))
    async with daemon_for(store, None, "fixed:30m", dry_run=True) as daemon:
        await daemon.run_pass()
        await daemon.written()
        [batch] = list(store.db.decision_batches.find({}))
        [restart] = list(store.db.decisions.find({}))  # a.example's; b.example is kept
        assert restart["instance"] == "a.example" and restart["outcome"] == "dry-run"
        assert str(restart["_id"]).startswith("manager-") and batch["count"] == 2
        daemon._pending.append(PassRecords([batch], [restart], 2))
        await daemon.flush()
        assert daemon._pending == []
    assert store.db.decisions.count_documents({}) == 1
    assert store.db.decision_batches.count_documents({}) == 1
    assert [d["instance"] for d in store.decisions()] == ["a.example", "b.example"]


async def test_pending_decisions_are_bounded_dropping_the_oldest_passes(embedded: Store) -> None:
    """While the store cannot take them, decision records wait up to `pending_limit`
    decisions; beyond, the oldest passes go first, and what is left is written later."""
    config = DaemonConfig(store=embedded.uri, params=FixedParams(), admin_url=None,
                          dry_run=True, pending_limit=3)
    daemon = Daemon(config)
    try:
        d = Decision(instance=K("a.example"), generation=0, time=1.0, decided_at=1.0,
                     policy="fixed", action="keep", reason="keep", uptime_s=1.0,
                     allocated_pages=1, allocated_bytes=PAGE, requests=0, outbound=0)
        passes = [daemon.pass_records([DecisionOutcome(d, "keep")] * 2, 1.0, 1.0)
                  for _ in range(3)]
        daemon._pending.extend(passes)
        await daemon.flush()
        assert daemon._pending == []
        kept = {b["_id"] for b in embedded.db.decision_batches.find({})}
        assert kept == {b["_id"] for p in passes[2:] for b in p.batches}
    finally:
        await daemon.aclose()


# ----------------------------------------------------------------------------------------------
# Reading only new samples
# ----------------------------------------------------------------------------------------------


async def test_each_pass_reads_only_new_samples(store: Store) -> None:
    store.write(series("a.example", 0, range(0, 100, 10)) + series("b.example", 0, range(0, 100, 10)))
    async with daemon_for(store, None, "none", dry_run=True, overlap_s=30.0) as daemon:
        assert (await daemon.run_pass()).samples == 20
        assert (await daemon.run_pass()).samples == 0
        # b's sample delivered late (older than a's newest, within the overlap) is still new;
        # a's repeated sample is not; one older than the overlap is out of reach.
        store.write([sample("b.example", 0, 95.0), sample("a.example", 0, 90.0),
                     sample("b.example", 0, 40.0)])
        report = await daemon.run_pass()
        assert report.samples == 1 and report.decisions[0].decision.time == 95.0
        store.write(series("a.example", 0, range(100, 130, 10)))
        report = await daemon.run_pass()
        assert report.samples == 3 and report.now == 120.0
    if store.kind == "ferretdb":  # the query on time has its index
        keys = [list(v["key"]) for v in store.db.samples.index_information().values()]
        assert [("time", 1)] in keys and [("proxy", 1), ("instance", 1), ("time", 1)] in keys


async def test_later_passes_read_the_sample_batches(store: Store,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """After the first pass (from `samples`), new samples come from their batches: samples
    missing from `samples` but in a batch are read; a batch missing from its sequence (pruned
    before the pass) makes the daemon read that proxy's samples instead, losing nothing."""
    store.write(series("a.example", 0, range(0, 100, 10)))
    async with daemon_for(store, None, "none", dry_run=True) as daemon:
        assert (await daemon.run_pass()).samples == 10
        store.write(series("a.example", 0, [100.0, 110.0]))
        store.db.samples.delete_many({"time": {"$gte": 100.0}})  # the batch alone has them
        report = await daemon.run_pass()
        assert report.samples == 2 and report.now == 110.0
        store.write(series("a.example", 0, [120.0]))
        store.write(series("a.example", 0, [130.0, 140.0]))
        # The first of these two batches is pruned before the pass: a hole in the sequence.
        store.db.sample_batches.delete_one({"seq": store.writer.seq[PROXY] - 1})
        with caplog.at_level(logging.INFO, logger="manager"):
            report = await daemon.run_pass()
        assert report.samples == 3 and report.now == 140.0
        assert f"sample batches missing for {PROXY}" in caplog.text
        assert (await daemon.run_pass()).samples == 0


@pytest.mark.parametrize("lease", [True, False], ids=["lease", "no-lease"])
async def test_the_active_manager_empties_its_inbox(store: Store, lease: bool) -> None:
    """With a lease, the batches a pass read are deleted behind it, so that the next pass's
    read finds only new ones (a server answering from no index scans the inbox); without a
    lease another manager may still read them, and only the shippers prune them."""
    other = BatchWriter()  # a second proxy's shipper
    store.write(series("a.example", 0, range(0, 30, 10)))
    async with daemon_for(store, None, "none", dry_run=True,
                          lease_s=15.0 if lease else None) as daemon:
        assert (await daemon.run_pass()).samples == 3  # from `samples`; its batch is read too
        await daemon.written()
        assert store.db.sample_batches.count_documents({}) == (0 if lease else 1)
        store.write(series("a.example", 0, [30.0]))
        store.write(series("a.example", 0, [40.0]))
        store.writer, mine = other, store.writer
        store.write([dict(sample("b.example", 0, 45.0), proxy="other-proxy")])
        store.writer = mine
        report = await daemon.run_pass()
        assert report.samples == 3 and report.ok
        await daemon.written()
        left = sorted((b["proxy"], b["seq"]) for b in store.db.sample_batches.find({}))
        assert left == ([] if lease else [("other-proxy", 1), (PROXY, 1), (PROXY, 2),
                                          (PROXY, 3)])
        store.write(series("a.example", 0, [50.0]))
        assert (await daemon.run_pass()).samples == 1  # no hole: nothing missed
        await daemon.written()
        assert store.db.sample_batches.count_documents({}) == (0 if lease else 5)
        assert store.db.samples.count_documents({}) == 7  # the record itself stays


async def test_the_decision_records_are_written_behind_the_pass(
        mongo_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    """A pass ends before its records are stored; the next pass's store work waits for that
    write. A write that fails (the database went away after the pass) keeps its records,
    reports the failure on the pass's report and goes with the next write."""
    real = Store(mongo_uri, f"test_daemon_{uuid.uuid4().hex[:10]}", "ferretdb")
    host_port = mongo_uri.split("//")[1].split("/")[0].rsplit(":", 1)
    try:
        real.write(series("a.example", 0, range(0, 2000, 100)))
        async with relay_to(int(host_port[1])) as relay:
            relayed = Store(f"mongodb://127.0.0.1:{relay.port}/", real.database, "ferretdb")
            close_store(relayed.db)
            async with daemon_for(relayed, None, "fixed:30m", dry_run=True,
                                  timeout_s=1.0) as daemon:
                first = await daemon.run_pass()
                assert first.ok and first.written == 0 and first.pending == 1
                second = await daemon.run_pass()  # queued behind the first pass's write
                assert second.ok and first.written == 1 and first.behind_s is not None
                await daemon.written()
                real.write(series("a.example", 0, [2000.0]))
                third = await daemon.run_pass()
                assert third.ok and third.decisions and third.pending == 1
                await relay.stop()  # gone before the write behind the pass
                with caplog.at_level(logging.WARNING, logger="manager"):
                    await daemon.written()
                assert not third.ok and third.component == "store"
                assert third.failure is not None and "cannot write decisions" in third.failure
                assert third.pending == 1 and daemon.pending_count() == 1
                assert "1 decision record(s) wait for the next write" in caplog.text
                await relay.start()
                real.write(series("a.example", 0, [2100.0]))
                fourth = await daemon.run_pass()
                await daemon.written()
                assert fourth.ok and fourth.written == 2 and daemon.pending_count() == 0
        assert [d["time"] for d in real.decisions()] == [1800.0, 2000.0, 2100.0]
    finally:
        real.db.client.drop_database(real.database)
        close_store(real.db)


async def test_the_lease_is_renewed_behind_the_pass(embedded: Store) -> None:
    """The active manager renews its lease behind each pass; a pass renews it first only
    when that renewal is missing or the lease has less than half its period (or an admin
    timeout) left."""
    embedded.write(series("a.example", 0, range(0, 100, 10)))
    async with daemon_for(embedded, None, "none", dry_run=True, lease_s=15.0) as daemon:
        events: list[str] = []
        lease, read = daemon._lease_sync, daemon._read_sync

        def leasing(wall: float) -> bool:
            events.append("lease")
            return lease(wall)

        def reading(after: float) -> pd.DataFrame:
            events.append("read")
            return read(after)

        daemon._lease_sync, daemon._read_sync = leasing, reading  # type: ignore[method-assign]
        for expected in (["lease", "read", "lease"], ["read", "lease"]):
            events.clear()
            assert (await daemon.run_pass()).ok
            await daemon.written()
            assert events == expected
            held = embedded.db.leases.find_one({"_id": "manager"})
            assert held is not None and held["expires"] == pytest.approx(
                daemon._lease_until) and daemon._lease_until > time.time() + 14
        daemon._lease_until = time.time() + 7.0  # less than half the period left
        events.clear()
        assert (await daemon.run_pass()).ok
        await daemon.written()
        assert events == ["lease", "read", "lease"]


async def test_retention_prunes_the_managers_records(store: Store) -> None:
    """`retention_s` keeps that much of `decision_batches` and `decisions` before the newest
    sample seen (samples' clock), on either store, on the retention's own thread."""
    store.write(series("a.example", 0, range(0, 2000, 100))  # restarted at 1800
                + series("b.example", 0, [1500.0], started_at=1500.0))  # kept
    deleted = []
    async with daemon_for(store, None, "fixed:30m", dry_run=True, retention_s=600.0) as daemon:
        for end in (2000, 2500, 3000):
            store.write(series("b.example", 0, [float(end)], started_at=1500.0))
            report = await daemon.run_pass()
            assert report.ok and report.now == end
            await daemon.written()
            assert daemon._pruning is not None
            deleted.append(daemon._pruning.result(timeout=30))
            daemon._next_prune = -math.inf  # every pass here (a tenth of it: a minute)
        # Cutoffs 1400, 1900 (the restart decision of 1800), 2400 (the batch of 2000's pass).
        assert deleted == [0, 1, 1] and daemon.pruned == 2
    assert sorted(b["time"] for b in store.db.decision_batches.find({})) == [2500.0, 3000.0]
    assert store.restart_documents() == []
    assert [(d["instance"], d["time"]) for d in store.decisions()] == [
        ("b.example", 2500.0), ("b.example", 3000.0)]


async def test_retention_waits_its_period_and_spares_a_standby(embedded: Store) -> None:
    """Between prunes a tenth of the retention passes (at least a minute); a standby (another
    manager holds the lease) prunes nothing."""
    embedded.write(series("a.example", 0, range(0, 2000, 100)))
    async with daemon_for(embedded, None, "fixed:30m", dry_run=True, retention_s=60.0,
                          lease_s=15.0) as active, \
            daemon_for(embedded, None, "fixed:30m", dry_run=True, retention_s=60.0,
                       lease_s=15.0) as standby:
        assert (await active.run_pass()).ok
        first = active._pruning
        embedded.write(series("a.example", 0, [2000.0]))
        assert (await active.run_pass()).ok
        assert active._pruning is first and first is not None  # not again within the minute
        assert (await standby.run_pass()).standby and standby._pruning is None


async def test_a_shipper_started_after_the_first_pass_is_read_from_its_first_batch(
        embedded: Store, caplog: pytest.LogCaptureFixture) -> None:
    embedded.write(series("a.example", 0, range(0, 30, 10)))
    async with daemon_for(embedded, None, "none", dry_run=True) as daemon:
        assert (await daemon.run_pass()).samples == 3
        embedded.writer = BatchWriter()  # a new shipper process: its own run, seq from 1
        embedded.write(series("a.example", 0, [30.0]))
        with caplog.at_level(logging.INFO, logger="manager"):
            assert (await daemon.run_pass()).samples == 1
        assert "sample batches missing" not in caplog.text
        second = BatchWriter()  # another, whose first batch was pruned before the pass
        embedded.writer = second
        embedded.write(series("a.example", 0, [40.0]))
        embedded.write(series("a.example", 0, [50.0]))
        embedded.db.sample_batches.delete_one({"run": second.run, "seq": 1})
        with caplog.at_level(logging.INFO, logger="manager"):
            assert (await daemon.run_pass()).samples == 2
        assert "sample batches missing" in caplog.text


def _batch(proxy: str, run: str, seq: int, time: float) -> dict[str, Any]:
    return {"proxy": proxy, "run": run, "seq": seq, "time": time}


def test_inbox_news() -> None:
    chains, new, holes = inbox_news({}, [_batch("p", "r", 1, 5.0), _batch("p", "r", 2, 6.0)])
    assert chains == {("p", "r"): (2, 6.0)} and [b["seq"] for b in new] == [1, 2] and not holes
    # Read again with one more: only it is new; a bad document is ignored.
    chains, new, holes = inbox_news(chains, [_batch("p", "r", 2, 6.0), _batch("p", "r", 3, 7.0),
                                             {"proxy": "p", "run": "r", "seq": "4"}])
    assert [b["seq"] for b in new] == [3] and not holes and chains[("p", "r")] == (3, 7.0)
    # A skipped number, or a new run that does not start at 1, is a hole of its proxy only.
    chains, new, holes = inbox_news(chains, [_batch("p", "r", 5, 9.0), _batch("q", "s", 2, 9.0),
                                             _batch("o", "t", 1, 9.0)])
    assert holes == {"p", "q"} and len(new) == 3
    assert chains[("p", "r")] == (5, 9.0) and chains[("o", "t")] == (1, 9.0)


def test_combine_rows_keeps_each_new_sample_once() -> None:
    a = pd.DataFrame({"_id": ["x", "y"], "time": [1.0, 2.0], "instance": ["i", "i"]})
    b = pd.DataFrame({"_id": ["y", "z"], "time": [2.0, 3.0], "instance": ["i", "i"]})
    out = combine_rows([a, b], 1.0, ["instance", "time"])
    assert out.to_dict("list") == {"instance": ["i", "i"], "time": [2.0, 3.0]}
    assert list(combine_rows([], 0.0, ["instance", "time"]).columns) == ["instance", "time"]
    # A sample delivered twice (in two batches of one read) is kept once.
    c = pd.DataFrame({"_id": ["x", "y", "x"], "time": [1.5, 2.0, 1.5], "instance": ["i"] * 3})
    assert combine_rows([c], 1.0, ["time"]).to_dict("list") == {"time": [1.5, 2.0]}


def test_batches_frame_joins_the_batches_columns() -> None:
    """The samples of several batches in one frame; a field a batch lacks is None there."""
    one = records.sample_batch("p", "r", 1, [{"_id": "a", "time": 1.0, "instance": "i"},
                                             {"_id": "b", "time": 2.0, "instance": "j"}], 0.0)
    two = records.sample_batch("q", "r", 1, [{"_id": "c", "time": 3.0}], 0.0)
    frame = batches_frame([one, two], ["instance", "time"])
    assert frame["_id"].tolist() == ["a", "b", "c"] and frame["time"].tolist() == [1.0, 2.0, 3.0]
    assert frame["instance"].tolist()[:2] == ["i", "j"] and pd.isna(frame["instance"].iloc[2])
    assert list(batches_frame([], ["time"]).columns) == ["_id", "time"]


async def test_backfill_limits_the_first_read(embedded: Store) -> None:
    embedded.write(series("a.example", 0, range(0, 1000, 10)))
    async with daemon_for(embedded, None, "none", dry_run=True, backfill_s=100.0) as daemon:
        assert (await daemon.run_pass()).samples == 10  # (890, 990]


async def test_unusable_documents_are_skipped(embedded: Store, caplog: pytest.LogCaptureFixture) -> None:
    bad = sample("a.example", 0, 20.0)
    bad["outbound"] = None
    embedded.write([sample("a.example", 0, 10.0), bad, {"time": 30.0, "instance": "a.example"}])
    async with daemon_for(embedded, None, "none", dry_run=True) as daemon:
        with caplog.at_level(logging.WARNING, logger="manager"):
            report = await daemon.run_pass()
    assert report.ok and report.samples == 1 and report.dropped == 2
    assert "ignoring 2 sample document(s)" in caplog.text


# ----------------------------------------------------------------------------------------------
# Failures: a wrong token, an unreachable endpoint, a database outage
# ----------------------------------------------------------------------------------------------


async def test_a_wrong_token_gives_one_clear_line_and_no_crash(
        embedded: Store, proxy: Proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    embedded.write(series("a.example", 0, range(0, 1900, 50)))
    token_file = tmp_path / "admin-token"
    token_file.write_text("wrong-token\n")
    # The longest backoff is long: a new token in the file must be picked up well before it.
    config = DaemonConfig(store=embedded.uri, params=FixedParams(), admin_url=proxy.url,
                          token="wrong-token", token_file=token_file, backoff_min_s=0.01,
                          heartbeat_s=None, backoff_max_s=0.2, interval_s=0.01)
    stop = asyncio.Event()
    async with Daemon(config) as daemon:
        with caplog.at_level(logging.INFO, logger="manager"):
            task = asyncio.create_task(daemon.run(stop))
            await wait_for(lambda: "(attempt 3)" in caplog.text)
            assert not task.done()  # no crash
            assert daemon.cursor == {} and proxy.generation("a.example") == 0  # nothing consumed
            daemon.config = dataclasses.replace(daemon.config, backoff_max_s=30.0)
            await asyncio.sleep(0.3)  # now waiting up to 30 s, reading the file meanwhile
            token_file.write_text(TOKEN + "\n")  # the operator fixes the token file
            await wait_for(lambda: proxy.generation("a.example") == 1, timeout=5)
            stop.set()
            await task
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name.startswith("manager")]
    assert len(errors) == 1  # one clear line, repeats are warnings
    assert errors[0].getMessage().startswith(
        f"admin endpoint {proxy.url} refused the token (401): check --token-file {token_file}")
    assert errors[0].getMessage().endswith(
        f"; asking again when {token_file} holds another token (read every 0.01 s), or in 0.2 s")
    assert "wrong-token" not in caplog.text
    assert f"the admin token file {token_file} holds a new token" in caplog.text
    assert "working again after" in caplog.text


async def test_a_refused_token_is_not_retried_as_a_network_failure(
        embedded: Store, proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    """A 401 will not pass by itself: the daemon keeps running (the proxy's token may change
    to this one) but asks again only every --backoff-max, not 1 s, 2 s, 4 s … as for an
    endpoint that is down; one error line, then warnings, never the token."""
    wrong = "wrong-token-7f3a"
    stop = asyncio.Event()
    async with daemon_for(embedded, proxy, "none", token=wrong, interval_s=0.01,
                          backoff_max_s=0.4) as daemon:
        with caplog.at_level(logging.INFO, logger="manager"):
            task = asyncio.create_task(daemon.run(stop))
            await asyncio.sleep(1.0)
            assert not task.done()
            stop.set()
            await task
    refused = [r for r in caplog.records if "refused the token (401)" in r.getMessage()]
    assert 1 <= len(refused) <= 4  # at 0, 0.4 and 0.8 s (a network failure: some 8 times)
    assert [r.levelno for r in refused] == [logging.ERROR] + [logging.WARNING] * (len(refused) - 1)
    assert refused[0].getMessage() == (
        f"admin endpoint {proxy.url} refused the token (401): check --token (the proxy's token is "
        "wasm_admin_token, or the file wasm_admin_token_file); asking again every 0.4 s with the "
        "same token (restart the manager with the proxy's token, or give --token-file)")
    assert wrong not in caplog.text and "unreachable" not in caplog.text


async def test_one_proxy_refusing_its_token_is_reported_and_its_file_read_again(
        embedded: Store, proxy: Proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two proxies, one of which refuses the token in its file: the pass goes on with the
    other, reports the refusal as such (not "unreachable"), and the file is read again, so
    that the proxy's new token is used without waiting for every proxy to fail."""
    second = AdminServer(proxy.addon, "second-token", "127.0.0.1", 0)
    await second.start()
    token_file = tmp_path / "proxy2.token"
    token_file.write_text("stale-token\n")
    url2 = f"http://127.0.0.1:{second.port}"
    config = DaemonConfig(
        store=embedded.uri, params=parse_policy("none"), heartbeat_s=None, interval_s=0.01,
        endpoints=(Endpoint(proxy.url, TOKEN), Endpoint(url2, "stale-token", token_file)))
    stop = asyncio.Event()
    try:
        async with Daemon(config) as daemon:
            report = await daemon.run_pass()
            assert report.ok and report.refused == [url2] and report.unreachable == []
            assert report.summary().splitlines()[-1] == f"refused the token (401): {url2}"
            with caplog.at_level(logging.INFO, logger="manager"):
                task = asyncio.create_task(daemon.run(stop))
                await asyncio.sleep(0.2)
                token_file.write_text("second-token\n")  # the proxy wrote its new token
                await wait_for(lambda: "holds a new token" in caplog.text, timeout=5)
                stop.set()
                await task
            report = await daemon.run_pass()
            assert report.ok and report.refused == [] and report.unreachable == []
    finally:
        await second.stop()
    assert "stale-token" not in caplog.text and "second-token" not in caplog.text


async def test_a_proxy_back_with_a_new_token_is_reported_as_refused(
        embedded: Store, proxy: Proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One proxy of two restarts with a new admin token: while it is down its endpoint is
    unreachable (one line), then it refuses the token the manager holds. That refusal is a
    line of its own, an error naming the token file (not silence because the endpoint was
    already failing); once the file holds the new token, the endpoint answers again."""
    port = free_port()
    url2 = f"http://127.0.0.1:{port}"
    token_file = tmp_path / "proxy2.token"
    token_file.write_text("old-token-9b1e\n")
    config = DaemonConfig(
        store=embedded.uri, params=parse_policy("none"), heartbeat_s=None, interval_s=0.01,
        endpoints=(Endpoint(proxy.url, TOKEN), Endpoint(url2, "old-token-9b1e", token_file)))
    async with Daemon(config) as daemon:
        with caplog.at_level(logging.INFO, logger="manager"):
            report = await daemon.run_pass()  # the proxy is down (restarting)
            assert report.ok and report.unreachable == [url2]
            second = AdminServer(proxy.addon, "new-token-77c2", "127.0.0.1", port)
            await second.start()  # back, with a token the manager does not hold yet
            try:
                for _ in range(3):
                    report = await daemon.run_pass()
                    assert report.ok and report.refused == [url2]
                refused = [r for r in caplog.records
                           if "refused the token (401)" in r.getMessage()]
                assert len(refused) == 1, caplog.text  # said once, not every pass
                assert refused[0].levelno == logging.ERROR
                assert str(token_file) in refused[0].getMessage()
                token_file.write_text("new-token-77c2\n")  # the proxy's new token
                assert daemon.reload_token()
                report = await daemon.run_pass()
                assert report.ok and report.refused == [] and report.unreachable == []
                assert f"admin endpoint {url2} answers again" in caplog.text
            finally:
                await second.stop()
    assert "old-token-9b1e" not in caplog.text and "new-token-77c2" not in caplog.text


async def test_cli_once_says_the_token_was_refused(
        embedded: Store, proxy: Proxy, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """`--once` with a token the endpoint refuses: exit 2 (a configuration error, not a
    failure that trying later fixes), and the endpoint is not called unreachable."""
    wrong = "wrong-token-c41d"
    argv = ["run", "--store", embedded.uri, "--heartbeat", "0", "--admin", proxy.url,
            "--token", wrong, "--policy", "none", "--once"]
    with caplog.at_level(logging.INFO, logger="manager"):
        assert await asyncio.to_thread(main, argv) == 2
    out, err = capsys.readouterr()
    assert f"FAILED (admin): admin endpoint {proxy.url} refused the token (401)" in out
    assert f"refused the token (401): {proxy.url}" in out.splitlines()
    assert "unreachable" not in out + err + caplog.text
    assert wrong not in out + err + caplog.text and "Traceback" not in out + err


async def test_an_unreachable_endpoint_is_retried(embedded: Store, addon: WasmAuth,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    embedded.write(series("a.example", 0, range(0, 1900, 50)))
    port = free_port()
    stop = asyncio.Event()
    async with daemon_for(embedded, f"http://127.0.0.1:{port}", "fixed:30m",
                          interval_s=0.01) as daemon:
        with caplog.at_level(logging.INFO, logger="manager"):
            task = asyncio.create_task(daemon.run(stop))
            await wait_for(lambda: "(attempt 2)" in caplog.text)
            server = AdminServer(addon, TOKEN, "127.0.0.1", port)  # the proxy comes up
            await server.start()
            try:
                await wait_for(lambda: addon.list_instances()[0]["generation"] == 1)
            finally:
                stop.set()
                await task
                await server.stop()
    assert f"cannot reach the admin endpoint http://127.0.0.1:{port}" in caplog.text
    assert "working again after" in caplog.text


async def test_the_once_pass_fails_cleanly_when_the_endpoint_is_down(embedded: Store) -> None:
    embedded.write(series("a.example", 0, range(0, 100, 10)))
    async with daemon_for(embedded, f"http://127.0.0.1:{free_port()}", "none") as daemon:
        report = await daemon.run_pass()
    assert not report.ok and report.component == "admin"
    assert daemon.cursor == {} and report.samples == 0  # the samples wait for the next pass
    assert "FAILED (admin): cannot reach the admin endpoint" in report.summary()


async def test_a_database_outage_is_retried_and_nothing_is_lost(
        mongo_uri: str, proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    host_port = mongo_uri.split("//")[1].split("/")[0].rsplit(":", 1)
    real = Store(mongo_uri, f"test_daemon_{uuid.uuid4().hex[:10]}", "ferretdb")
    try:
        real.write(series("a.example", 0, range(0, 1900, 50)))
        async with relay_to(int(host_port[1])) as relay:
            relayed = Store(f"mongodb://127.0.0.1:{relay.port}/", real.database, "ferretdb")
            close_store(relayed.db)
            await relay.stop()  # the database goes away
            async with daemon_for(relayed, proxy, "fixed:30m", timeout_s=1.0) as daemon:
                report = await daemon.run_pass()
                assert not report.ok and report.component == "store"
                assert report.failure is not None and report.failure.startswith(
                    f"cannot read samples from the database mongodb://127.0.0.1:{relay.port}/")
                assert "is the MongoDB server running and reachable?" in report.failure
                assert daemon.cursor == {} and proxy.generation("a.example") == 0

                await relay.start()  # it is back
                report = await daemon.run_pass()
                assert report.ok, report.failure
                assert outcomes(report) == {("a.example", 0): "restarted"}
                await daemon.written()
                assert len(real.decisions()) == 1

                # Away again: the new samples wait in the store, the state is kept.
                real.write(series("a.example", 1, range(1900, 1950, 10), started_at=1890.0))
                await relay.stop()
                assert not (await daemon.run_pass()).ok
                await relay.start()
                report = await daemon.run_pass()
                assert report.ok and outcomes(report) == {("a.example", 1): "keep"}
                await daemon.written()
                assert report.written == 1

                # Records that cannot be written wait (in memory), and go with the next write.
                await relay.stop()
                daemon._pending.append(PassRecords(
                    [], [{"_id": "test-1", "instance": "x", "note": "waits"}], 1))
                await daemon.flush()
                assert len(daemon._pending) == 1
                await relay.start()
                await daemon.flush()
                assert daemon._pending == []
        assert real.db.decisions.count_documents({"note": "waits"}) == 1
        assert real.db.decisions.count_documents({"instance": "a.example"}) == 1  # restart
        assert [d["instance"] for d in real.decisions()] == ["a.example"] * 2
    finally:
        real.db.client.drop_database(real.database)
        close_store(real.db)


def test_an_unreachable_store_is_one_line_and_said_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """A MongoDB server that is not there, from the start: one line per failure, no traceback,
    and the same outage is the same line (an error, then warnings), without pymongo's
    topology description, whose id changes every time."""
    uri = f"mongodb://127.0.0.1:{free_port()}/"
    argv = ["run", "--store", uri, "--timeout", "1s", "--no-admin", "--dry-run"]
    with caplog.at_level(logging.INFO, logger="manager"):
        assert main([*argv, "--once"]) == 1
    out, err = capsys.readouterr()
    assert f"FAILED (store): cannot read samples from the database {uri} (" in out
    assert "Traceback" not in out + err + caplog.text
    assert "Topology Description" not in out + caplog.text
    config = build_config(build_parser().parse_args(argv))
    config = dataclasses.replace(config, backoff_min_s=0.01, backoff_max_s=0.01)

    async def run_a_while() -> None:
        stop = asyncio.Event()
        async with Daemon(config) as daemon:
            task = asyncio.create_task(daemon.run(stop))
            await wait_for(lambda: "(attempt 2)" in caplog.text, timeout=30)
            stop.set()
            await task

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="manager"):
        asyncio.run(run_a_while())
    failed = [r for r in caplog.records if "cannot read samples" in r.getMessage()]
    assert [r.levelno for r in failed[:2]] == [logging.ERROR, logging.WARNING]
    assert all("\n" not in r.getMessage() and r.exc_info is None for r in failed)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


async def test_cli_once_restarts_and_prints_a_summary(embedded: Store, proxy: Proxy, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    embedded.write(series("a.example", 0, range(0, 2000, 10)) + series("b.example", 0, range(0, 600, 10)))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    argv = ["run", "--store", embedded.uri, "--heartbeat", "0", "--admin", proxy.url,
            "--token-file", str(token_file),
            "--policy", "fixed:30m", "--once"]
    assert await asyncio.to_thread(main, argv) == 0
    out = capsys.readouterr().out
    assert "2 decision(s): 1 keep, 1 restarted" in out
    assert "restarted        a.example@test-proxy gen 0: uptime 30.0 min ≥ 30 min" in out
    assert proxy.generation("a.example") == 1
    # Unreachable endpoint: exit status 1.
    argv[argv.index("--admin") + 1] = f"http://127.0.0.1:{free_port()}"
    assert await asyncio.to_thread(main, argv) == 1
    assert "FAILED (admin): cannot reach the admin endpoint" in capsys.readouterr().out


def test_cli_dry_run_without_admin(embedded: Store, capsys: pytest.CaptureFixture[str]) -> None:
    embedded.write(series("a.example", 0, range(0, 2000, 10)))
    assert main(["run", "--store", embedded.uri, "--no-admin", "--dry-run", "--policy",
                 "threshold:512KiB", "--once"]) == 0
    assert "1 dry-run" in capsys.readouterr().out
    assert [r["outcome"] for r in embedded.decisions()] == ["dry-run"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--no-admin"], "--no-admin needs --dry-run"),
    (["--policy", "fixed:30m", "--measure", "5m"], "estimator's options do not apply"),
    (["--policy", "adaptive", "--trend-z", "2"], "ratio policy's options do not apply"),
    (["--policy", "bogus"], "unknown policy 'bogus'"),
    (["--token-file", "/nonexistent/token"], "no admin token file /nonexistent/token: start the proxy first"),
    (["--token", " "], "--token is empty"),
    (["--admin", "ftp://x", "--token", "t"], "expected an http:// or https:// URL"),
    (["--interval", "0", "--token", "t"], "interval_s must be a positive number"),
    (["--admin", "127.0.0.1:9901,127.0.0.1:9902", "--token", "t"], "one URL per --admin"),
    (["--admin", "127.0.0.1:99999", "--token", "t"], "port 99999 is not between 1 and 65535"),
    (["--admin", "http://[::1", "--token", "t"], "not a URL"),
    (["--admin", "http://h:1/instances", "--token", "t"], "without a path"),
    (["--admin", "h:1", "--admin", "h:1", "--token", "t"], "the same endpoint is given twice"),
    (["--store", "mongodb://h:99999/", "--token", "t"], "--store mongodb://h:99999/"),
    (["--token-dir", "/nonexistent", "--token", "t"], "--token-dir goes with"),
    (["--lease", "5s", "--interval", "5s", "--token", "t"], "give at least three --interval"),
    (["--database", "café", "--store", "some-dir", "--token", "t"],
     "--database 'café': the embedded store takes letters, digits, _ and -"),
    (["--store", "mongodb://h:1/" + "x" * 64, "--token", "t"],
     "database 'xxxx" + "x" * 60 + "': a database name has at most 63 bytes, this one 64"),
])
def test_cli_configuration_errors(argv: list[str], message: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A bad command line is one line on stderr and exit status 2, never a traceback."""
    assert main(["run", *argv, "--once"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["run", "--interval", "soon"], ["run", "--bogus"], ["frobnicate"], [],
    ["run", "--database", "bad/name"],
])
def test_cli_usage_errors_are_one_line(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "manager", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("name", "why"), [
    ("bad/name", "cannot contain '/'"), ("bad\\name", "cannot contain '\\\\'"),
    ("a.b", "cannot contain '.'"), ('a"b', "cannot contain '\"'"), ("a$b", "cannot contain '$'"),
    ("a b", "cannot contain ' '"), ("a\x00b", "control characters"), ("a\nb", "control"),
    ("", "cannot be empty"), ("x" * 64, "at most 63 bytes, this one 64"),
    ("é" * 32, "at most 63 bytes, this one 64"),
])
def test_cli_a_bad_database_name_is_a_usage_error(
        name: str, why: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Checked when the command line is read (exit 2, one line), not found out as a failure to
    read the store."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["run", "--database", name])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m manager run: argument --database: ") and why in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("name", "embedded", "ok"), [
    ("wasm_reclaim", True, True), ("x" * 63, True, True), ("Shop-1", True, True),
    ("café", False, True), ("café", True, False), ("-x", True, False), ("-x", False, True),
    ("a.b", False, False),
])
def test_database_problem(name: str, embedded: bool, ok: bool) -> None:
    assert (database_problem(name, embedded=embedded) is None) == ok


@pytest.mark.parametrize("argv", [["--interval", "soon"], ["--measure", "x"], ["--token", "a", "--token-file", "b"],
                                  ["--retention=-1h"]])
def test_cli_bad_values_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["run", *argv])
    assert e.value.code == 2


def test_the_start_line_names_the_database_a_uri_names() -> None:
    """`--store mongodb://host/NAME` opens NAME (whatever --database says): the manager's
    first line must say NAME, not the default it does not use."""
    argv = ["run", "--store", "mongodb://127.0.0.1:27017/fleet", "--no-admin", "--dry-run"]
    config = build_config(build_parser().parse_args(argv))
    assert database_used(config) == "fleet"
    argv[2] = "mongodb://127.0.0.1:27017/"
    assert database_used(build_config(build_parser().parse_args(argv))) == "wasm_reclaim"


def test_cli_ratio_options_override_the_spec() -> None:
    args = build_parser().parse_args([
        "run", "--policy", "ratio:measure=20m,trend_z=2", "--measure", "3m", "--ttl-cap", "2m",
        "--trend-window", "30s", "--trend-min", "2", "--skip-fill", "--require-turn",
        "--no-first-restart", "--retry-after", "2m", "--k-default", "40",
    ])
    params = policy_params(args)
    assert isinstance(params, RatioParams)
    assert params.estimator == EstimatorParams(
        measure_s=180, ttl_cap_s=120, trend_window_s=30, baseline_skip_fill=True, k_default=40)
    assert (params.trend_noise_z, params.trend_min_pages, params.require_turn,
            params.first_decision_restarts, params.retry_after_s) == (2.0, 2.0, True, False, 120.0)
    assert policy_params(build_parser().parse_args(["run"])) == AdaptiveParams()
    assert policy_params(build_parser().parse_args(
        ["run", "--policy", "threshold:64MiB", "--retry-after", "5m"])) == ThresholdParams(
            allocated_bytes=64 * 2**20, retry_after_s=300)


def test_cli_adaptive_is_the_default_and_takes_the_estimator_options() -> None:
    assert policy_params(build_parser().parse_args(["run"])) == AdaptiveParams()
    assert policy_params(build_parser().parse_args(
        ["run", "--policy", "adaptive:call_cost=60", "--ttl-cap", "5m"])) == AdaptiveParams(
            call_cost_page_s=60, estimator=EstimatorParams(ttl_cap_s=300))


def test_cli_store_and_token_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".wasm-reclaim").mkdir()
    (tmp_path / ".wasm-reclaim" / "admin-token").write_text("tok\n")
    monkeypatch.delenv("MONGODB_URI", raising=False)
    config = build_config(build_parser().parse_args(["run"]))
    assert config.store == ".wasm-reclaim/store" and config.token == "tok"
    assert config.admin_url == "http://127.0.0.1:9901" and config.params == AdaptiveParams()
    assert config.token_file == Path(".wasm-reclaim/admin-token")
    assert config.retention_s == 0.0  # keep every decision, as wasm_retention keeps samples
    assert build_config(build_parser().parse_args(
        ["run", "--retention", "1.5d"])).retention_s == 1.5 * 86400
    monkeypatch.setenv("MONGODB_URI", "mongodb://db.example:27017/")
    config = build_config(build_parser().parse_args(["run", "--admin", "127.0.0.1:9999",
                                                     "--token", "t"]))
    assert config.store == "mongodb://db.example:27017/" and config.token == "t"
    assert config.admin_url == "http://127.0.0.1:9999" and config.token_file is None
    config = build_config(build_parser().parse_args(["run", "--store", "/x", "--token", "t"]))
    assert config.store == "/x"


def test_the_daemon_process_runs_until_sigterm(embedded: Store) -> None:
    embedded.write(series("a.example", 0, range(0, 2000, 10)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "manager", "run", "--store", embedded.uri, "--no-admin",
         "--dry-run", "--policy", "fixed:30m", "--interval", "0.1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30

        def decided() -> bool:
            # The daemon process writes the embedded store meanwhile: a reader may meet its
            # SQLite lock and must simply try again (as the daemon itself does).
            try:
                return embedded.db.decisions.count_documents({}) > 0
            except sqlite3.OperationalError:
                return False

        while not decided():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "dry run: would restart a.example@test-proxy generation 0 (fixed): uptime 30.0 min ≥ 30 min" in err
    assert err.rstrip().endswith("manager: stopped")


def test_help_documents_every_parameter_with_its_default() -> None:
    out = subprocess.run([sys.executable, "-m", "manager", "run", "--help"], cwd=ROOT,
                         env={**os.environ, "COLUMNS": "400"}, capture_output=True, text=True,
                         check=True).stdout
    for expected in [
        "--store", "$MONGODB_URI", ".wasm-reclaim/store", "--admin", "default http://127.0.0.1:9901",
        "--token-file", "--token", "--policy", "default adaptive", "--interval", "default 5s",
        "--once", "--dry-run", "--measure", "default 15m: paper", "--ttl-cap", "default 10m",
        "--trend-window", "default 60s", "--trend-z", "default 3", "--retry-after",
        "--class-width", "--k-default", "default 63", "fixed:30m", "threshold:64MiB", "oracle", "ratio",
    ]:
        assert expected in out, expected
    for action in build_parser()._subparsers._group_actions[0].choices["run"]._actions:  # type: ignore[union-attr]
        assert action.help, action.dest


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------


def test_to_record_is_the_decision_as_a_dict_with_bytes() -> None:
    frame = pd.DataFrame(_model_rows())
    for params in (parse_policy("ratio:measure=2m,ttl_cap=1m"), parse_policy("oracle"),
                   parse_policy("adaptive:ttl_cap=1m"),
                   parse_policy("fixed:1m"), parse_policy("threshold:1MiB")):
        decisions, _ = decide(initial_state(params), frame, 1.0, params)
        assert decisions
        for d in decisions:
            expected = dataclasses.asdict(d)
            for name in ("required", "surplus", "baseline", "true_required", "true_surplus"):
                pages = expected[f"{name}_pages"]
                expected[f"{name}_bytes"] = None if pages is None else pages * d.page_bytes
            assert d.to_record() == expected
            assert list(d.to_record()) == list(expected)


def _model_rows() -> list[dict[str, Any]]:
    model = ModelFilter(sale_traffic(), ttl=60, k=32)
    rows = []
    for t in range(0, 400, 2):
        rows.append(model.sample(float(t)))
        if t == 300:
            model.restart(float(t))
    return rows


def test_clean_samples() -> None:
    columns = ["instance", "generation", "time", "started_at", "allocated_pages",
               "allocated_bytes", "requests", "outbound"]
    good = pd.DataFrame(series("a", 0, [1.0, 2.0]))
    out, dropped = clean_samples(good, columns)
    assert dropped == 0 and list(out.columns) == columns and len(out) == 2
    rows = series("a", 0, [1.0, 2.0, 3.0, 4.0, 5.0])
    rows[1]["outbound"] = None
    rows[2]["time"] = "late"
    rows[3]["generation"] = 1.5
    rows[4]["instance"] = 7
    out, dropped = clean_samples(pd.DataFrame(rows), columns)
    assert dropped == 4 and out["time"].tolist() == [1.0]
    out, dropped = clean_samples(pd.DataFrame([{"instance": "a", "time": 1.0}]), columns)
    assert dropped == 1 and out.empty and list(out.columns) == columns
    out, dropped = clean_samples(pd.DataFrame(), columns)
    assert dropped == 0 and out.empty
    # The oracle's ground truth may be missing (NaN), the row stays.
    rows = series("a", 0, [1.0])
    rows[0]["live_bytes"] = None
    out, dropped = clean_samples(pd.DataFrame(rows), [*columns, "live_bytes"])
    assert dropped == 0 and np.isnan(out["live_bytes"].iloc[0])
    # So may the host's refetch interval (none seen yet, or an older proxy).
    rows = series("a", 0, [1.0, 2.0])
    rows[0]["refetch_interval_s"] = None
    rows[1]["refetch_interval_s"] = 61.5
    out, dropped = clean_samples(pd.DataFrame(rows), [*columns, "refetch_interval_s"])
    assert dropped == 0 and out["refetch_interval_s"].tolist()[1] == 61.5
    assert np.isnan(out["refetch_interval_s"].iloc[0])


@pytest.mark.parametrize(("rows", "kept"), [
    # (instance, generation, started_at, time)
    ([("a", 0, 0, 1), ("a", 1, 5, 6)], [1, 6]),  # a restart: same life
    ([("a", 2, 5, 6), ("a", 0, 9, 10), ("a", 0, 9, 11)], [10, 11]),  # the proxy restarted
    ([("a", 0, 0, 1), ("a", 0, 9, 10)], [10]),  # same generation number, later start
    ([("a", 3, 0, 1), ("b", 0, 9, 10), ("a", 0, 20, 21)], [10, 21]),  # per instance
    ([("a", 1, 5, 6)], [6]),
])
def test_latest_life(rows: list[tuple[str, int, float, float]], kept: list[float]) -> None:
    frame = pd.DataFrame(rows, columns=["instance", "generation", "started_at", "time"])
    out, dropped = latest_life(frame)
    assert sorted(out["time"].tolist()) == kept and dropped == len(rows) - len(kept)


def test_renewed_instances() -> None:
    params = FixedParams()
    _, state = decide(initial_state(params), pd.DataFrame(
        series("a", 2, [10.0], 5.0) + series("b", 0, [10.0], 0.0)), 0.0, params)
    def new(rows: list[dict[str, Any]]) -> list[str]:
        return renewed_instances(state, pd.DataFrame(rows))
    assert new(series("a", 0, [20.0], 15.0)) == ["a"]  # generation back, later start
    assert new(series("a", 2, [20.0], 15.0)) == ["a"]  # same generation, later start
    assert new(series("a", 3, [20.0], 15.0)) == []  # a restart
    assert new(series("a", 1, [4.0], 1.0)) == []  # an old generation's late sample
    assert new(series("c", 0, [20.0], 15.0)) == []  # not known yet


def test_forget_instances_is_as_if_never_seen() -> None:
    params = RatioParams(estimator=EstimatorParams(measure_s=60, ttl_cap_s=30, trend_window_s=10,
                                                   k_default=10, min_growth_pages=1000),
                         trend_noise_z=0.0)
    def rows(instance: str, t0: int, t1: int) -> list[dict[str, Any]]:
        return [sample(instance, 0, t, 0.0, pages=4 + t // 10, outbound=t * 3) for t in range(t0, t1)]
    with_b, without_b = initial_state(params), initial_state(params)
    _, with_b = decide(with_b, pd.DataFrame(rows("a", 0, 50) + rows("b", 0, 50) + rows("c", 0, 50)), 0.0, params)
    _, without_b = decide(without_b, pd.DataFrame(rows("a", 0, 50) + rows("c", 0, 50)), 0.0, params)
    forgotten = forget_instances(with_b, ["b", "nobody"])
    assert forgotten.slots.names == ("a", "c")
    later = pd.DataFrame(rows("a", 50, 120) + rows("c", 50, 120))
    got, _ = decide(forgotten, later, 1.0, params)
    expected, _ = decide(without_b, later, 1.0, params)
    assert [d.to_record() for d in got] == [d.to_record() for d in expected]
    assert forget_instances(with_b, []) is with_b
    assert forget_instances(with_b, ["a", "b", "c"]).slots.names == ()


@pytest.mark.parametrize(("failures", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (500, 60.0)])
def test_backoff_doubles_up_to_the_cap(failures: int, delay: float) -> None:
    assert backoff_delay(failures, 1.0, 60.0) == delay


def test_admin_payloads_are_checked() -> None:
    good = {"id": "a", "tenant": "a", "generation": 0, "started_at": 1.5, "allocated_pages": 2,
            "allocated_bytes": 131072, "requests": 1, "outbound": 0, "state": "running"}
    assert parse_instances([good])["a"].generation == 0
    for bad in [{}, [{"id": 5}], [{**good, "generation": "x"}], [{**good, "started_at": None}]]:
        with pytest.raises(ValueError):
            parse_instances(bad)
    result = parse_restart({"id": "a", "generation": 2, "generation_before": 1,
                            "allocated_bytes_before": 9, "allocated_bytes_after": 1})
    assert (result.generation, result.generation_before) == (2, 1)
    with pytest.raises(ValueError):
        parse_restart({"id": "a"})


async def test_admin_client_against_the_endpoint(proxy: Proxy) -> None:
    client = AdminClient(proxy.url, TOKEN, token_hint="--token")
    try:
        await client.healthz()
        assert set(await client.instances()) == set(HOSTS)
        with pytest.raises(AdminError) as e:
            await client.restart("nope", "test", "pytest")
        assert e.value.kind == "not-found" and not e.value.in_doubt
        name = HOSTS[0]
        warm = await client.restart(name, "test", "pytest", "warm")
        assert (warm.raw["mode"], warm.raw["fallback"]) == ("warm", None)
        cold = await client.restart(name, "test", "pytest")
        assert cold.raw["mode"] == "cold" and cold.generation == warm.generation + 1
        client.set_token("wrong")
        with pytest.raises(AdminError) as e:
            await client.instances()
        assert e.value.kind == "unauthorized"
        assert str(e.value).startswith(f"admin endpoint {proxy.url} refused the token (401): check --token")
    finally:
        await client.aclose()


def test_no_thread_leaks_from_a_closed_daemon(embedded: Store) -> None:
    before = threading.active_count()

    async def once() -> None:
        async with daemon_for(embedded, None, "none", dry_run=True) as daemon:
            await daemon.run_pass()

    asyncio.run(once())
    assert threading.active_count() == before
