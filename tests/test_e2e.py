"""End to end: a real mitmdump with the addon, the real auth server and shop, FerretDB, and a
real HTTP client, all on 127.0.0.1.

Checks hit, miss and deny decisions; the documents in the database; the admin endpoint
(restart, 401 without a token); memory samples growing and resetting on a restart; and a
database that stops during traffic and comes back, with no document lost.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pymongo
import pytest

from scenarios.procs import local_stack, mitmdump_path

from .servers import FERRETDB_BIN, PYTHON, free_port, process

pytestmark = [pytest.mark.e2e, pytest.mark.mongo]

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "e2e-admin-token"


@dataclass
class Stack:
    proxy: str
    auth: str
    admin: str
    db: pymongo.database.Database  # type: ignore[type-arg]
    spool: Path
    log: Path

    def login(self, user: str) -> str:
        r = httpx.post(f"{self.auth}/login", json={"user": user}, timeout=10)
        r.raise_for_status()
        return str(r.json()["token"])

    def get(self, path: str, token: str | None, host: str = "shop.example") -> httpx.Response:
        headers = {"Host": host}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.get(f"{self.proxy}{path}", headers=headers, timeout=10)

    def admin_request(self, method: str, path: str, token: str | None = ADMIN_TOKEN,
                      **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, f"{self.admin}{path}", headers=headers, timeout=10,
                             **kw)  # type: ignore[arg-type]

    def wait_for(self, collection: str, query: dict[str, object], count: int,
                 timeout: float = 30) -> int:
        """Wait until `collection` holds at least `count` documents matching `query`."""
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            n = self.db[collection].count_documents(query)
            if n >= count:
                return n
            time.sleep(0.2)
        raise AssertionError(f"{collection} {query}: {n} documents after {timeout} s, wanted "
                             f"{count}; mitmdump log:\n{self.log.read_text()[-3000:]}")


@contextlib.contextmanager
def stack(tmp: Path, store: str, db: pymongo.database.Database,  # type: ignore[type-arg]
          **options: str) -> Iterator[Stack]:
    """Auth server, shop and mitmdump with the addon (scenarios.procs.local_stack), writing
    metrics to `store`, with an admin endpoint; `options` override the addon's options."""
    with contextlib.ExitStack() as exits:
        local = local_stack(exits, tmp, store=store, options={
            "wasm_admin_token": ADMIN_TOKEN, "wasm_sample_interval": "0.5", **options})
        assert local.admin is not None
        yield Stack(local.proxy, local.auth, local.admin, db, local.spool, tmp / "mitmdump.log")


@pytest.fixture
def live(tmp_path: Path, mongo_uri: str) -> Iterator[Stack]:
    name = f"e2e_{uuid.uuid4().hex[:10]}"
    uri = mongo_uri.rstrip("/") + "/" + name
    client: pymongo.MongoClient = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)  # type: ignore[type-arg]
    try:
        with stack(tmp_path, uri, client[name]) as s:
            yield s
    finally:
        client.drop_database(name)
        client.close()


def test_decisions_documents_and_admin(live: Stack) -> None:
    token = live.login("alice")
    miss = live.get("/product/1", token)
    hit = live.get("/product/2", token)
    forged = live.get("/product/3", "not-a-real-token")
    missing = live.get("/product/4", None)
    assert miss.status_code == 200 and hit.status_code == 200
    assert forged.status_code == 401 and missing.status_code == 401

    # Every request, every auth call, samples: in the database, tokens only hashed.
    live.wait_for("requests", {}, 4)
    decisions = {d["path"]: d["decision"] for d in live.db.requests.find({}, {"_id": 0})}
    assert decisions == {"/product/1": "miss", "/product/2": "hit", "/product/3": "deny",
                         "/product/4": "deny"}
    # The status the client got: the upstream's for forwarded requests, the filter's own else.
    statuses = {d["path"]: d["status"] for d in live.db.requests.find({}, {"_id": 0})}
    assert statuses == {"/product/1": 200, "/product/2": 200, "/product/3": 401,
                        "/product/4": 401}
    live.wait_for("auth_calls", {"status": {"$in": [200, 401]}}, 2)
    live.wait_for("samples", {"instance": "shop.example"}, 2)
    for collection in ("requests", "auth_calls", "samples"):
        for doc in live.db[collection].find({}, {"_id": 0}):
            assert token not in str(doc), f"a clear token in {collection}"
    assert {d["token_hash"] for d in live.db.requests.find({"path": "/product/1"})} != {None}

    # The admin endpoint: 401 without or with a wrong token, then a restart.
    assert live.admin_request("GET", "/instances", token=None).status_code == 401
    assert live.admin_request("GET", "/instances", token="wrong").status_code == 401
    assert live.admin_request("POST", "/instances/shop.example/restart",
                              token=None).status_code == 401
    instances = live.admin_request("GET", "/instances").json()
    assert [i["id"] for i in instances] == ["shop.example"]
    assert live.admin_request("POST", "/instances/nope/restart").status_code == 404
    r = live.admin_request("POST", "/instances/shop.example/restart",
                           json={"reason": "e2e", "requested_by": "pytest"})
    assert r.status_code == 200 and r.json()["generation"] == 1
    live.wait_for("restarts", {"instance": "shop.example", "requested_by": "pytest"}, 1)
    # The cache went with the old generation: the same token is a miss again.
    assert live.get("/product/5", token).status_code == 200
    live.wait_for("requests", {"path": "/product/5", "decision": "miss", "generation": 1}, 1)


def test_samples_grow_and_reset_on_restart(live: Stack) -> None:
    tokens = [live.login(f"user{i}") for i in range(200)]
    with httpx.Client(timeout=10) as client:
        for t in tokens:
            r = client.get(f"{live.proxy}/", headers={"Host": "shop.example",
                                                      "Authorization": f"Bearer {t}"})
            assert r.status_code == 200
    live.wait_for("samples", {"instance": "shop.example", "live_entries": 200}, 1)
    grown = live.db.samples.find_one({"instance": "shop.example", "live_entries": 200},
                                     sort=[("time", -1)])
    assert grown is not None and grown["allocated_pages"] >= 200 * 1024 // 65536 + 1
    assert grown["outbound"] == 200 and grown["requests"] == 200
    r = live.admin_request("POST", "/instances/shop.example/restart")
    assert r.json()["allocated_bytes_after"] < r.json()["allocated_bytes_before"]
    # The restart's own sample; an idle instance is sampled again only when something changes.
    live.wait_for("samples", {"instance": "shop.example", "generation": 1}, 1)
    after = live.db.samples.find_one({"instance": "shop.example", "generation": 1},
                                     sort=[("time", -1)])
    assert after is not None
    assert after["allocated_pages"] < grown["allocated_pages"]
    assert after["requests"] == 0 and after["outbound"] == 0 and after["live_entries"] == 0


def test_database_outage_loses_nothing(tmp_path: Path) -> None:
    """FerretDB stops during traffic and comes back: every request document arrives once."""
    port = free_port()
    data = tmp_path / "ferretdb-data"
    data.mkdir()
    args = [str(FERRETDB_BIN), "--listen-addr", f"127.0.0.1:{port}", "--sqlite-url",
            f"file:{data}/"]
    if not FERRETDB_BIN.exists():
        pytest.fail(f"FerretDB is not built at {FERRETDB_BIN}: run `just setup`")
    uri = f"mongodb://127.0.0.1:{port}/outage"
    client: pymongo.MongoClient = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)  # type: ignore[type-arg]
    db = client["outage"]
    ferret = process(args, port, tmp_path / "ferretdb-1.log")
    ferret.__enter__()
    try:
        with stack(tmp_path / "stack", uri, db) as live:
            token = live.login("bob")
            for i in range(20):
                assert live.get(f"/before/{i}", token).status_code == 200
            live.wait_for("requests", {}, 20)
            ferret.__exit__(None, None, None)  # the database goes away …
            ferret = None  # type: ignore[assignment]
            for i in range(50):  # … and the proxy keeps serving at once
                assert live.get(f"/during/{i}", token).status_code == 200
            time.sleep(1.5)
            assert list(live.spool.glob("*.jsonl")), "documents should wait in the spool"
            ferret = process(args, port, tmp_path / "ferretdb-2.log")
            ferret.__enter__()
            for i in range(10):
                assert live.get(f"/after/{i}", token).status_code == 200
            live.wait_for("requests", {}, 80, timeout=60)
        # After a clean stop, everything has been delivered exactly once.
        paths = [d["path"] for d in db.requests.find({}, {"path": 1})]
        assert len(paths) == 80 and len(set(paths)) == 80
    finally:
        if ferret is not None:
            ferret.__exit__(None, None, None)
        client.close()


def test_bad_filter_is_a_clear_startup_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"not wasm at all")
    port = free_port()
    log = tmp_path / "mitmdump.log"
    with log.open("wb") as out:
        proc = subprocess.run(
            [mitmdump_path(), "-q", "-s",
             str(ROOT / "addons" / "wasm_auth.py"), "-p", str(port),
             "--set", f"wasm_filter={bad}", "--set", "wasm_admin_listen="],
            stdout=out, stderr=subprocess.STDOUT, timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    text = log.read_text()
    assert proc.returncode != 0
    assert "wasm_filter" in text and "not a valid WebAssembly module" in text


def run_manager(live: Stack, store: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """One pass of the real manager daemon against the live proxy."""
    return subprocess.run(
        [PYTHON, "-m", "manager", "run", "--store", store, "--admin", live.admin,
         "--token", ADMIN_TOKEN, "--policy", "ratio", "--measure", "2m", "--once", *extra],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_manager_restarts_a_live_instance_when_the_rule_fires(tmp_path: Path,
                                                               mongo_uri: str) -> None:
    """The ratio rule (2-minute measurement at 60× clock speed) restarts through the admin
    endpoint; --dry-run records the same decision and restarts nothing."""
    name = f"e2e_{uuid.uuid4().hex[:10]}"
    uri = mongo_uri.rstrip("/") + "/" + name
    client: pymongo.MongoClient = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)  # type: ignore[type-arg]
    db = client[name]
    try:
        # Host-clock times scale: the filter's 1 s auth timeout would be 17 ms of wall time.
        with stack(tmp_path, uri, db, wasm_clock_speed="60", wasm_sample_interval="2",
                   wasm_filter_config='{"timeout_ms": 60000}') as live:
            tokens = [live.login(f"u{i}") for i in range(60)]
            deadline = time.monotonic() + 30
            # Traffic until the store holds samples past the 2-minute measurement period.
            while time.monotonic() < deadline:
                for t in tokens[:20]:
                    assert live.get("/", t).status_code == 200
                sample = db.samples.find_one({"instance": "shop.example"}, sort=[("time", -1)])
                if sample and sample["time"] - sample["started_at"] > 150:
                    break
            else:
                pytest.fail("no samples past the measurement period")
            for t in tokens[20:]:
                assert live.get("/", t).status_code == 200
            live.wait_for("samples", {"instance": "shop.example", "outbound": 60}, 1)

            dry = run_manager(live, uri, "--dry-run")
            assert dry.returncode == 0, dry.stderr
            recorded = list(db.decisions.find({"instance": "shop.example", "action": "restart"}))
            assert recorded and all(d["dry_run"] for d in recorded)
            assert recorded[0]["reason"]
            assert live.admin_request("GET", "/instances").json()[0]["generation"] == 0

            applied = run_manager(live, uri)
            assert applied.returncode == 0, applied.stderr
            instances = live.admin_request("GET", "/instances").json()
            assert instances[0]["generation"] == 1
            live.wait_for("restarts", {"instance": "shop.example",
                                       "requested_by": {"$regex": "^manager:"}}, 1)
            assert db.decisions.count_documents({"action": "restart", "applied": True}) == 1
    finally:
        client.drop_database(name)
        client.close()


def test_live_replay_of_a_trace_through_the_proxy(live: Stack) -> None:
    """`python -m scenarios replay`'s engine sends a trace through mitmdump: logins at the auth
    server, requests and logouts through the proxy; the store sees every decision."""
    from scenarios.basic import BasicParams, basic_trace
    from scenarios.replay import ReplayConfig, replay

    trace = basic_trace(BasicParams(count=25, interval=0.02, host="shop.example"))
    summary = replay(trace, ReplayConfig(proxy=live.proxy, auth=live.auth, speed=1.0))
    assert summary.sent == 50 and summary.status == {"200": 50} and summary.errors == 0
    live.wait_for("requests", {}, 50)
    decisions = [d["decision"] for d in live.db.requests.find({}, {"decision": 1})]
    # Each login's first request is a miss; each logout finds its token cached, evicts it
    # (the filter) and revokes it (the auth server).
    assert decisions.count("miss") == 25 and decisions.count("logout") == 25
    live.wait_for("auth_calls", {"status": 200}, 25)
    live.wait_for("samples", {"instance": "shop.example", "live_entries": 0, "outbound": 25}, 1)


def test_har_client_replay_through_the_addon(tmp_path: Path, mongo_uri: str) -> None:
    """A HAR written from a trace, replayed by mitmproxy's own client replay
    (`mitmdump -C file.har -s addons/wasm_auth.py`), goes through the filter."""
    from scenarios.basic import BasicParams, basic_trace
    from scenarios.har import write_har

    name = f"e2e_{uuid.uuid4().hex[:10]}"
    uri = mongo_uri.rstrip("/") + "/" + name
    client: pymongo.MongoClient = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)  # type: ignore[type-arg]
    db = client[name]
    auth_port, shop_port = free_port(), free_port()
    env = {"PYTHONPATH": str(ROOT)}
    try:
        with process([PYTHON, "-m", "scenarios", "auth-server", "--port", str(auth_port),
                      "--no-store"], auth_port, tmp_path / "auth.log", env), \
             process([PYTHON, "-m", "scenarios", "shop", "--port", str(shop_port)], shop_port,
                     tmp_path / "shop.log", env):
            trace = basic_trace(BasicParams(count=10, host=f"127.0.0.1:{shop_port}"))
            tokens = {}
            for e in trace:
                if e.kind == "login":
                    r = httpx.post(f"http://127.0.0.1:{auth_port}/login", json={"user": e.user})
                    tokens[e.token] = r.json()["token"]
            har = tmp_path / "basic.har"
            assert write_har(trace, har, tokens=tokens) == 20
            with (tmp_path / "mitmdump.log").open("wb") as out:
                proc = subprocess.run(
                    [mitmdump_path(), "-n", "-q", "-C", str(har),
                     "-s", str(ROOT / "addons" / "wasm_auth.py"),
                     "--set", f"wasm_cluster=auth=http://127.0.0.1:{auth_port}",
                     "--set", f"wasm_store={uri}", "--set", f"wasm_spool={tmp_path / 'spool'}",
                     "--set", "wasm_admin_listen="],
                    stdout=out, stderr=subprocess.STDOUT, timeout=120, env={**os.environ, **env})
            assert proc.returncode == 0, (tmp_path / "mitmdump.log").read_text()[-2000:]
        decisions = [d["decision"] for d in db.requests.find({}, {"decision": 1})]
        assert sorted(set(decisions)) == ["logout", "miss"] and len(decisions) == 20
        assert decisions.count("miss") == 10
    finally:
        client.drop_database(name)
        client.close()
