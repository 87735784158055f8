"""End to end: a warm restart through a real mitmdump (scenarios.procs.local_stack), with the
real auth server and shop and FerretDB.

A warm restart asked for on the admin endpoint makes no call to the auth server (its own
`/stats` count), keeps hits, and a token logged out before the restart stays evicted; the
`restarts` document says which mode ran.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pymongo
import pytest

from .test_e2e import Stack, stack

pytestmark = [pytest.mark.e2e, pytest.mark.mongo]


@pytest.fixture
def warm(tmp_path: Path, mongo_uri: str) -> Iterator[Stack]:
    name = f"e2e_warm_{uuid.uuid4().hex[:10]}"
    uri = mongo_uri.rstrip("/") + "/" + name
    client: pymongo.MongoClient = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)  # type: ignore[type-arg]
    try:
        # Restarts run cold unless asked otherwise; the journal runs from the start (`on`), so
        # the first warm restart asked for is warm.
        with stack(tmp_path, uri, client[name], wasm_filter_config='{"ttl_seconds": 300}',
                   wasm_restart_mode="cold", wasm_warm_restart="on") as s:
            yield s
    finally:
        client.drop_database(name)
        client.close()


def verify_calls(live: Stack) -> int:
    stats = httpx.get(f"{live.auth}/stats", timeout=10).json()
    return int(stats["requests"].get("verify", 0))


def test_warm_restart_keeps_hits_without_auth_calls_and_respects_logouts(warm: Stack) -> None:
    users = [warm.login(f"user{i}") for i in range(30)]
    gone = users[0]
    with httpx.Client(timeout=10) as client:
        def get(path: str, token: str) -> httpx.Response:
            return client.get(f"{warm.proxy}{path}", headers={
                "Host": "shop.example", "Authorization": f"Bearer {token}"})

        for t in users:
            assert get("/product/1", t).status_code == 200   # misses: the auth server is asked
        for t in users[::2]:
            assert get("/product/2", t).status_code == 200   # hits
        assert get("/logout", gone).status_code == 200        # the filter evicts the token
        assert httpx.post(f"{warm.auth}/logout", headers={"Authorization": f"Bearer {gone}"},
                          timeout=10).status_code == 200      # and the auth server revokes it
        warm.wait_for("samples", {"instance": "shop.example", "live_entries": 29}, 1)
        before = verify_calls(warm)
        assert before == 30

        r = warm.admin_request("POST", "/instances/shop.example/restart",
                               json={"mode": "warm", "reason": "e2e"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["mode"], body["fallback"], body["generation"]) == ("warm", None, 1)
        assert body["replayed"] == 30 + 15 + 1
        assert verify_calls(warm) == before  # the replay asked the auth server nothing

        for t in users[1:]:
            assert get("/product/3", t).status_code == 200
        assert verify_calls(warm) == before  # every live token is still a hit
        denied = get("/product/3", gone)
        assert denied.status_code == 401       # logged out before the restart: asked again,
        assert verify_calls(warm) == before + 1  # and the revoked token is refused

    warm.wait_for("requests", {"generation": 1}, 30)
    decisions = [d["decision"] for d in warm.db.requests.find({"generation": 1}, {"_id": 0})]
    assert decisions.count("hit") == 29 and decisions.count("deny") == 1
    warm.wait_for("restarts", {"instance": "shop.example"}, 1)
    record = warm.db.restarts.find_one({"instance": "shop.example"}, {"_id": 0})
    assert record is not None
    assert (record["mode"], record["fallback"], record["replayed"]) == ("warm", None, 46)
    after = warm.db.samples.find_one({"instance": "shop.example", "generation": 1},
                                     sort=[("time", -1)])
    assert after is not None and after["live_entries"] == 29


def test_warm_restart_of_an_unsafe_journal_runs_cold_and_says_why(tmp_path: Path,
                                                                   mongo_uri: str) -> None:
    name = f"e2e_warm_{uuid.uuid4().hex[:10]}"
    uri = mongo_uri.rstrip("/") + "/" + name
    client: pymongo.MongoClient = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)  # type: ignore[type-arg]
    try:
        # journaling off: a warm restart cannot be done and says so
        with stack(tmp_path, uri, client[name], wasm_warm_restart="off",
                   wasm_restart_mode="warm") as s:
            token = s.login("alice")
            assert s.get("/product/1", token).status_code == 200
            r = s.admin_request("POST", "/instances/shop.example/restart")
            assert r.status_code == 200
            body = r.json()
            assert body["mode"] == "cold" and "journaling is off" in body["fallback"]
            s.wait_for("restarts", {"instance": "shop.example"}, 1)
            record = s.db.restarts.find_one({"instance": "shop.example"}, {"_id": 0})
            assert record is not None and record["mode"] == "cold"
            assert "journaling is off" in record["fallback"]
    finally:
        client.drop_database(name)
        client.close()
