"""The documents' schemas: one builder each (addons.telemetry.records), the same shape from a
live mitmdump and from the simulation of the same trace, field by field."""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pymongo
import pytest

from addons.proxywasm import Decision
from addons.proxywasm.context import LocalResponse
from addons.telemetry import records
from scenarios.basic import BasicParams, basic_trace
from scenarios.procs import local_stack
from scenarios.replay import ReplayConfig, replay
from scenarios.servers import token_hash as auth_server_hash
from scenarios.simulate import SimConfig, Simulation

ADMIN_TOKEN = "records-admin-token"


def kind(value: Any) -> str:
    """The JSON kind of a value: number, string, bool or null (NaN is a missing number)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def schema(docs: Iterable[dict[str, Any]]) -> dict[str, set[str]]:
    """Field → the kinds of its values (without `_id`, which the spool adds)."""
    out: dict[str, set[str]] = {}
    for doc in docs:
        for name, value in doc.items():
            if name != "_id":
                out.setdefault(name, set()).add(kind(value))
    return out


def frame_docs(frame: pd.DataFrame, drop: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return frame.drop(columns=list(drop)).to_dict("records")  # type: ignore[return-value]


def compatible(live: dict[str, set[str]], simulated: dict[str, set[str]]) -> list[str]:
    """Differences: fields only on one side, and fields whose non-null kinds differ."""
    problems = [f"only live: {f}" for f in sorted(live.keys() - simulated.keys())]
    problems += [f"only simulated: {f}" for f in sorted(simulated.keys() - live.keys())]
    for f in sorted(live.keys() & simulated.keys()):
        a, b = live[f] - {"null"}, simulated[f] - {"null"}
        if a and b and a != b:
            problems.append(f"{f}: live {sorted(a)} vs simulated {sorted(b)}")
    return problems


def test_token_hash_joins_the_auth_servers_tokens() -> None:
    """One token hash: the requests' `token_hash` is the auth server's `tokens.hash`."""
    assert records.token_hash(b"Bearer abc") == auth_server_hash("abc")
    assert records.token_hash(b"Bearer abc") == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize(("authorization", "token"), [
    (b"Bearer abc", b"abc"), (b"  bearer   abc  ", b"abc"), (b"Basic abc", None),
    (b"Bearer", None), (b"Bearer   ", None), (b"", None), (None, None),
    (b"Bearer \xff\xfe", b"\xff\xfe"),  # not UTF-8: still one token, hashed as bytes
])
def test_bearer_token_and_its_hash_agree(authorization: bytes | None, token: bytes | None) -> None:
    assert records.bearer_token(authorization) == token
    expected = None if token is None else hashlib.sha256(token).hexdigest()
    assert records.token_hash(authorization) == expected


@pytest.mark.parametrize(("decision", "has_token", "logout", "word"), [
    (Decision("continue", [], None, 0), True, False, "hit"),
    (Decision("continue", [], None, 1), True, False, "miss"),
    (Decision("continue", [], None, 0), True, True, "logout"),
    (Decision("continue", [], None, 0), False, False, "continue"),
    (Decision("respond", [], LocalResponse(401), 0), True, False, "deny"),
    (Decision("respond", [], LocalResponse(503), 1), True, False, "error"),
    (Decision("respond", [], LocalResponse(302), 0), True, False, "respond"),
    (Decision("reset", [], None, 0), True, False, "reset"),
])
def test_verdict_words(decision: Decision, has_token: bool, logout: bool, word: str) -> None:
    assert records.verdict(decision, has_token, logout=logout) == word


def test_builders_fill_every_field_in_order() -> None:
    from addons.proxywasm import AuthCallRecord, Observation, RestartRecord

    o = Observation("shop", "shop", 2, 10.0, 17, 17 * 65536, 5, 3, {records.LIVE_BYTES: 100})
    doc = records.sample("p1", 11.0, o, (1, 2, 3, 4))
    assert tuple(doc) == records.SAMPLE_FIELDS
    assert doc["live_entries"] is None and doc["live_bytes"] == 100 and doc["errors"] == 4
    call = records.auth_call("p1", AuthCallRecord("shop", "shop", 2, 11.0, "auth", "/verify",
                                                  200, "ok", 0.0123))
    assert tuple(call) == records.AUTH_CALL_FIELDS and call["latency_ms"] == 12.3
    restart = records.restart("p1", RestartRecord("shop", "shop", 12.0, "r", "m", 2, 3, 9, 1,
                                                  0.5))
    assert tuple(restart) == records.RESTART_FIELDS and restart["duration_ms"] == 500.0
    req = records.request("p1", 1.0, "shop", "shop", Decision("continue", [], None, 1), "miss",
                          "GET", "/", 1.23456, None)
    assert tuple(req) == records.REQUEST_FIELDS and req["latency_ms"] == 1.235
    assert all(d["proxy"] == "p1" for d in (doc, call, restart, req))


@pytest.mark.e2e
@pytest.mark.mongo
def test_live_and_simulated_documents_have_the_same_schema(tmp_path: Path,
                                                          mongo_uri: str) -> None:
    """A short trace through a real mitmdump (documents read back from FerretDB) and through
    the simulation: samples, requests, auth calls and restarts have the same fields, each of
    the same kind."""
    trace = basic_trace(BasicParams(count=8, interval=0.05, host="shop.example"))
    name = f"records_{uuid.uuid4().hex[:10]}"
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_uri, serverSelectionTimeoutMS=5000)
    db = client[name]
    try:
        with contextlib.ExitStack() as exits:
            stack = local_stack(exits, tmp_path, store=mongo_uri.rstrip("/") + "/" + name,
                                options={"wasm_admin_token": ADMIN_TOKEN,
                                         "wasm_sample_interval": "0.2",
                                         "wasm_proxy_id": "proxy-a"})
            summary = replay(trace, ReplayConfig(proxy=stack.proxy, auth=stack.auth, speed=1.0))
            assert summary.errors == 0
            assert stack.admin is not None
            answer = httpx.post(f"{stack.admin}/instances/shop.example/restart",
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                                json={"reason": "test", "requested_by": "test"}, timeout=10)
            assert answer.status_code == 200 and answer.json()["proxy"] == "proxy-a"
            listing = httpx.get(f"{stack.admin}/instances",
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
            assert {i["proxy"] for i in listing.json()} == {"proxy-a"}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (
                    db.restarts.count_documents({}) and db.proxies.count_documents({})
                    and db.requests.count_documents({}) >= 16):
                time.sleep(0.2)
        live = {c: list(db[c].find({})) for c in ("samples", "requests", "auth_calls",
                                                  "restarts")}
        proxies = list(db.proxies.find({}))
    finally:
        client.drop_database(name)
        client.close()
    for c, docs in live.items():
        assert docs, f"no live {c}"
        assert {d["proxy"] for d in docs} == {"proxy-a"}, c
    assert [p["_id"] for p in proxies] == ["proxy-a"]
    assert proxies[0]["admin_url"].startswith("http://127.0.0.1:")
    assert ADMIN_TOKEN not in repr(proxies)

    sim = Simulation(SimConfig(sample_interval=0.2))
    for event in trace:
        sim.advance_to(sim.start_ns + int(event.time * 1e9))
        sim.handle(event)
    sim.advance_to(sim.clock.now_ns() + sim.interval_ns)
    sim.host.restart("shop.example", "test", "test")
    result = sim.result()
    simulated = {
        "samples": frame_docs(result.samples),
        "requests": frame_docs(result.requests, drop=("kind",)),
        "auth_calls": frame_docs(result.auth_calls),
        "restarts": frame_docs(result.restarts),
    }
    for c in live:
        assert simulated[c], f"no simulated {c}"
        assert compatible(schema(live[c]), schema(simulated[c])) == [], c
        assert set(schema(live[c])) == set(getattr(records, {
            "samples": "SAMPLE_FIELDS", "requests": "REQUEST_FIELDS",
            "auth_calls": "AUTH_CALL_FIELDS", "restarts": "RESTART_FIELDS"}[c])), c
    # The same instance names: the live addon strips the port, and so does the simulation.
    assert {d["instance"] for d in live["samples"]} == set(result.samples["instance"])
