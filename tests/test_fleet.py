"""The scale-out recipe on real parts: three mitmdump processes with the addon behind HAProxy
(round robin on loopback), sharing FerretDB, and one manager that finds them in the store.

Traffic goes through the balancer; the manager restarts the right instance on the right proxy;
then one proxy is killed and the manager carries on with the other two. A second test runs two
managers against one store: only the lease holder acts, and the standby takes over.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pymongo
import pytest

from scenarios.fleet import haproxy_config, haproxy_path, start_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.mongo]

ROOT = Path(__file__).resolve().parent.parent


def wait_until(what: str, check: Callable[[], Any], timeout: float = 90.0,
               log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def stop_processes_using(path: Path) -> None:
    """SIGTERM every process of ours whose command line names `path` (a SIGKILLed proxy's
    shipper outlives it), and wait for them."""
    me = os.getuid()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != me:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if str(path).encode() in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def running(pid: int) -> bool:
        try:
            return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            return False

    deadline = time.monotonic() + 20
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if running(p)]
        time.sleep(0.2)


def test_haproxy_config_balances_round_robin_over_every_proxy() -> None:
    text = haproxy_config(8000, {"proxy-1": 8001, "proxy-2": 8002})
    assert "bind 127.0.0.1:8000" in text and "balance roundrobin" in text
    assert "server proxy-1 127.0.0.1:8001 check" in text
    assert "server proxy-2 127.0.0.1:8002 check" in text and "option redispatch" in text


def login_and_get(fleet_auth: str, balancer: str, host: str, users: list[str]) -> list[int]:
    """Log each user in at the auth server, then one request with its token through the
    balancer (a connection each, so round robin spreads them; 8 at a time); the statuses."""

    def one(user: str) -> int:
        with httpx.Client(timeout=30) as client:
            token = client.post(f"{fleet_auth}/login", json={"user": user}).json()["token"]
        with httpx.Client(timeout=30) as client:
            return client.get(f"{balancer}/product/1", headers={
                "Host": host, "Authorization": f"Bearer {token}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, users))


def latest_bytes(db: pymongo.database.Database[Any]) -> dict[tuple[str, str], int]:
    """Allocated bytes of each (proxy, instance) at its newest sample."""
    out: dict[tuple[str, str], tuple[float, int]] = {}
    for d in db.samples.find({}, {"proxy": 1, "instance": 1, "time": 1, "allocated_bytes": 1}):
        key = (d["proxy"], d["instance"])
        if key not in out or d["time"] > out[key][0]:
            out[key] = (d["time"], d["allocated_bytes"])
    return {k: v for k, (_, v) in out.items()}


@pytest.mark.slow
def test_three_proxies_behind_haproxy_one_manager(
        tmp_path: Path, mongo_database: tuple[str, pymongo.database.Database[Any]]) -> None:
    if haproxy_path() is None:
        pytest.fail("haproxy is not installed: run .ci/setup (Debian package haproxy)")
    uri, db = mongo_database
    with contextlib.ExitStack() as exits:
        # A generous auth timeout: the test is about the fleet, not a loaded machine's latency.
        fleet = start_fleet(exits, tmp_path, 3, uri, {
            "wasm_sample_interval": "0.5", "wasm_filter_config": '{"timeout_ms": 20000}'})
        ids = {p.proxy_id for p in fleet.proxies}
        wait_until("three proxies registered", lambda: {
            d["_id"] for d in db.proxies.find({})} == ids)

        # Traffic through the balancer: a busy site and a quiet one, on every proxy.
        statuses = login_and_get(fleet.auth, fleet.balancer, "big.example",
                                 [f"big{i}" for i in range(240)])
        # The quiet site on every proxy: round robin sends 3 requests to 3 proxies unless a
        # health check has just taken one out of rotation (a busy machine), so send rounds of 3
        # until every proxy has an instance of it.
        for round_ in range(10):
            statuses += login_and_get(fleet.auth, fleet.balancer, "small.example",
                                      [f"small{round_}-{i}" for i in range(3)])
            time.sleep(1.0)  # a sample interval and the shipper's delivery
            if all(any(d["proxy"] == p for d in db.samples.find(
                    {"instance": "small.example"}, {"proxy": 1})) for p in ids):
                break
        assert set(statuses) == {200}
        wanted = {(p, h) for p in ids for h in ("big.example", "small.example")}
        try:
            served = wait_until("samples of both sites on every proxy", lambda: (
                b := latest_bytes(db), b if wanted <= set(b) else None)[1])
        except AssertionError as e:
            raise AssertionError(f"{e}; missing {sorted(wanted - set(latest_bytes(db)))}; "
                                 f"haproxy: {(tmp_path / 'haproxy.log').read_text()[-2000:]}"
                                 if (tmp_path / "haproxy.log").exists() else
                                 f"{e}; missing {sorted(wanted - set(latest_bytes(db)))}"
                                 ) from None
        big = min(v for (_, h), v in served.items() if h == "big.example")
        small = max(v for (_, h), v in served.items() if h == "small.example")
        assert big > small, served  # 80 cache entries per proxy against 1
        threshold_kib = (big + small) // 2 // 1024

        manager_log = tmp_path / "manager.log"
        with manager_log.open("wb") as out:
            manager = subprocess.Popen(
                [sys.executable, "-m", "manager", "run", "--store", uri,
                 "--proxies-from-store", "--token-dir", str(fleet.token_dir),
                 "--policy", f"threshold:{threshold_kib}KiB", "--interval", "1s",
                 "--heartbeat", "15s", "--lease", "5s", "--timeout", "3s"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        exits.callback(lambda: (manager.poll() is None and manager.terminate(),
                                manager.wait(20)))

        # The right instance on the right proxy: big.example, once on each proxy.
        restarts = wait_until("big.example restarted on all three proxies", lambda: (
            r := list(db.restarts.find({"requested_by": "manager:threshold"})),
            r if {d["proxy"] for d in r} == ids else None)[1], log=manager_log)
        assert {d["instance"] for d in restarts} == {"big.example"}
        for p in fleet.proxies:
            token = p.token_file.read_text().strip()
            listing = httpx.get(f"{p.admin}/instances", timeout=10,
                                headers={"Authorization": f"Bearer {token}"}).json()
            generations = {i["id"]: i["generation"] for i in listing}
            assert generations["small.example"] == 0, (p.proxy_id, generations)
            assert generations["big.example"] >= 1, (p.proxy_id, generations)
            assert {i["proxy"] for i in listing} == {p.proxy_id}
        applied = list(db.decisions.find({"outcome": "restarted"}))
        assert {(d["proxy"], d["instance"]) for d in applied} == {
            (p, "big.example") for p in ids}

        # One proxy dies: the balancer and the manager carry on with the other two.
        dead = fleet.proxies[2]
        dead.process.send_signal(signal.SIGKILL)
        dead.process.wait(10)
        exits.callback(stop_processes_using, tmp_path / dead.proxy_id)  # its orphan shipper
        restarted_before = {(d["proxy"], d["generation_before"]) for d in
                            db.restarts.find({"requested_by": "manager:threshold"})}
        statuses = login_and_get(fleet.auth, fleet.balancer, "big.example",
                                 [f"again{i}" for i in range(240)])
        assert set(statuses) == {200}
        alive = ids - {dead.proxy_id}
        wait_until("big.example restarted again on the two proxies left", lambda: {
            d["proxy"] for d in db.restarts.find({"requested_by": "manager:threshold"})
            if (d["proxy"], d["generation_before"]) not in restarted_before} == alive,
            log=manager_log)
        assert manager.poll() is None, manager_log.read_text()[-3000:]
        text = manager_log.read_text()
        assert "carrying on with the other proxies" in text, text[-3000:]
        assert "Traceback" not in text
        # No (proxy, instance, generation) was restarted twice.
        done = [(d["proxy"], d["instance"], d["generation_before"])
                for d in db.restarts.find({"requested_by": "manager:threshold"})]
        assert len(done) == len(set(done))


def test_one_active_manager_and_a_standby_that_takes_over(
        tmp_path: Path, mongo_database: tuple[str, pymongo.database.Database[Any]]) -> None:
    """Two manager processes with --lease on one store: one holds the lease and decides, the
    other waits; when the first dies (SIGKILL: it cannot give the lease up), the standby
    takes over within one lease period."""
    uri, db = mongo_database
    db.samples.insert_many([
        {"proxy": "p", "instance": "a.example", "tenant": "a.example", "generation": 0,
         "started_at": 0.0, "time": float(t), "allocated_pages": 20,
         "allocated_bytes": 20 * 65536, "requests": t, "outbound": t, "state": "running"}
        for t in range(0, 120, 10)])
    args = [sys.executable, "-m", "manager", "run", "--store", uri, "--no-admin", "--dry-run",
            "--policy", "fixed:1m", "--interval", "0.5s", "--lease", "3s"]
    logs = [tmp_path / "m1.log", tmp_path / "m2.log"]
    procs = []
    for log in logs:
        with log.open("wb") as out:
            procs.append(subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))
        if not procs[1:]:
            wait_until("the first manager active", lambda: "active:" in logs[0].read_text())
    try:
        wait_until("the second manager waiting", lambda: "standby:" in logs[1].read_text())
        first = db.leases.find_one({"_id": "manager"})
        assert first is not None and f":{procs[0].pid}:" in first["holder"]
        assert "active:" not in logs[1].read_text()
        assert db.decision_batches.count_documents({}) > 0  # the active one decides
        before = db.leases.find_one({"_id": "manager"})
        assert before is not None
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        wait_until("the standby taking over", lambda: "active:" in logs[1].read_text(),
                   timeout=30)
        taken = db.leases.find_one({"_id": "manager"})
        assert taken is not None and f":{procs[1].pid}:" in taken["holder"]
        # Taken only once the dead one's lease expired, and within one lease period of that
        # (the managers' own wall clocks, as written in the lease document; the dead one may
        # have renewed once more after `before` was read).
        assert before["expires"] <= taken["acquired_at"] <= before["expires"] + 3.0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(20)

