"""The auth server and the shop: pure helpers in-process, the servers as real subprocesses.

The auth server runs against the embedded store and against FerretDB (the
`mongo_uri` fixture), each test in its own database.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from scenarios import servers
from scenarios.servers import (
    AuthService,
    Faults,
    StoreWriter,
    Write,
    coalesce,
    nginx_config,
    parse_bearer,
    run_nginx_shop,
    token_hash,
    valid_token,
)
from scenarios.trace import ScenarioError

from .servers import PYTHON, free_port, process

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT)}  # the checkout under test, whatever is installed

# -- pure helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER  abc ", "abc"),
        ("Bearer a-b_c.d~e+f/g==", "a-b_c.d~e+f/g=="),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer a b", None),
        ("Bearer a=b", None),
        ("Bearer ab\u00e9", None),
        ("Token abc", None),
        ("Bearer " + "x" * 5000, None),
    ],
)
def test_parse_bearer(header: str | None, token: str | None) -> None:
    assert parse_bearer(header) == token


@pytest.mark.parametrize(
    ("token", "ok"),
    [("abc", True), ("a-b_c.d~e+f/g==", True), ("", False), ("a b", False), (7, False),
     (None, False), ("x" * 4097, False), ("x" * 4096, True)],
)
def test_valid_token(token: object, ok: bool) -> None:
    assert valid_token(token) is ok


def test_token_hash_is_sha256_hex() -> None:
    assert token_hash("abc") == hashlib.sha256(b"abc").hexdigest()
    assert len(token_hash("x")) == 64




def test_faults_validated() -> None:
    with pytest.raises(ScenarioError, match="fail_rate"):
        Faults(fail_rate=1.5)
    with pytest.raises(ScenarioError, match="latency_ms"):
        Faults(latency_ms=-1)


def _kinds(groups: list[tuple[str, list[Write]]]) -> list[tuple[str, str, int]]:
    return [(kind, ws[0].collection, len(ws)) for kind, ws in groups]


def test_coalesce_groups_by_collection_and_shape() -> None:
    revoke = (("revoked", True),)
    writes = [
        Write("users", doc={"name": "a"}),
        Write("tokens", doc={"hash": "1"}),
        Write("users", doc={"name": "b"}),
        Write("tokens", doc={"hash": "2"}),
        Write("tokens", key="1", fields=revoke, stamp="revoked_at"),
        Write("tokens", key="2", fields=revoke, stamp="revoked_at"),
        Write("tokens", key="2", fields=(("revoked", False),)),
        Write("tokens", doc={"hash": "3"}),
    ]
    assert _kinds(coalesce(writes)) == [
        ("insert", "users", 2),
        ("insert", "tokens", 2),
        ("update", "tokens", 2),
        ("update", "tokens", 1),
        ("insert", "tokens", 1),
    ]
    assert coalesce([]) == []


class FakeCollection:
    def __init__(self, log: list[Any], fail: list[int]) -> None:
        self.log, self.fail = log, fail

    def insert_many(self, docs: list[dict[str, Any]], ordered: bool = True) -> None:
        assert not ordered
        if self.fail and self.fail[0] > 0:
            self.fail[0] -= 1
            raise ConnectionError("store away")
        self.log.append(("insert", [d.get("hash") or d.get("name") for d in docs]))

    def update_many(self, query: dict[str, Any], update: dict[str, Any]) -> None:
        self.log.append(("update", query, sorted(update["$set"])))


class FakeDb:
    def __init__(self, fail: int = 0) -> None:
        self.log: list[Any] = []
        self.fail = [fail]

    def __getitem__(self, name: str) -> FakeCollection:
        return FakeCollection(self.log, self.fail)


def test_store_writer_batches_in_order_and_retries() -> None:
    db = FakeDb(fail=1)
    writer = StoreWriter(db, linger=0.05)
    writer.RETRY_S = 0.01  # type: ignore[misc]
    writer.submit(Write("tokens", doc={"hash": "h1"}))
    writer.submit(Write("tokens", doc={"hash": "h2"}))
    writer.submit(Write("tokens", key="h1", fields=(("revoked", True),), stamp="revoked_at"))
    writer.submit(Write("tokens", key="h2", fields=(("revoked", True),), stamp="revoked_at"))
    assert writer.close(timeout=5) == 0
    assert db.log == [
        ("insert", ["h1", "h2"]),
        ("update", {"hash": {"$in": ["h1", "h2"]}}, ["revoked", "revoked_at"]),
    ]
    assert writer.pending == 0


@pytest.mark.mongo
def test_store_writer_skips_duplicates_on_a_real_server(mongo_uri: str) -> None:
    """A user another process inserted first is not retried forever; the rest go in."""
    import pymongo

    client: Any = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    db = client[f"auth_test_{uuid.uuid4().hex[:12]}"]
    try:
        db.users.create_index("name", unique=True)
        db.users.insert_one({"name": "b"})
        writer = StoreWriter(db, linger=0.05)
        for name in ("a", "b", "c"):
            writer.submit(Write("users", doc={"name": name}))
        assert writer.close(timeout=10) == 0
        assert sorted(d["name"] for d in db.users.find({})) == ["a", "b", "c"]
    finally:
        client.drop_database(db.name)
        client.close()


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_auth_service_in_memory() -> None:
    clock = Clock()
    svc = AuthService(None, token_lifetime=100, clock=clock)
    status, body = svc.login("alice")
    assert status == 200 and body["user"] == "alice"
    token = body["token"]
    assert len(token) >= 43 and valid_token(token)
    assert svc.verify(token) == "alice"
    assert svc.verify("nope") is None
    assert svc.logout(token) is True
    assert svc.verify(token) is None
    assert svc.logout(token) is False
    # registered tokens: idempotent, owned, re-registrable after logout
    assert svc.login("bob", "fixed-1") == (200, {"token": "fixed-1", "user": "bob"})
    assert svc.login("bob", "fixed-1")[0] == 200
    assert svc.login("carol", "fixed-1")[0] == 409
    assert svc.logout("fixed-1")
    assert svc.login("bob", "fixed-1")[0] == 200
    assert svc.verify("fixed-1") == "bob"
    # lifetime
    clock.t += 101
    assert svc.verify("fixed-1") is None
    assert svc.logout("fixed-1") is False
    assert svc.login("bob", "fixed-1")[0] == 200  # renewed
    assert svc.verify("fixed-1") == "bob"
    assert svc.stats()["expired_verifications"] == 1
    with pytest.raises(ScenarioError, match="lifetime"):
        AuthService(None, token_lifetime=0)


def test_nginx_config_is_self_contained(tmp_path: Path) -> None:
    conf = nginx_config("127.0.0.1", 8123, tmp_path)
    assert "listen 127.0.0.1:8123" in conf
    assert "daemon off;" in conf and "access_log off;" in conf
    for line in conf.splitlines():  # every file nginx writes lives under the prefix
        if "_path " in line or line.startswith("pid "):
            assert str(tmp_path) in line
    assert conf.count("{") == conf.count("}")


def test_nginx_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(servers, "find_nginx", lambda: None)
    with pytest.raises(ScenarioError, match="nginx is not installed"):
        run_nginx_shop(free_port())
    with pytest.raises(ScenarioError, match="does not exist"):
        run_nginx_shop(free_port(), nginx=str(tmp_path / "nginx"))


# -- the auth server as a subprocess ---------------------------------------------------------


@dataclass
class Auth:
    url: str
    store: str
    database: str
    log: Path
    proc: subprocess.Popen[bytes]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, trust_env=False)

    def settle(self) -> dict[str, Any]:
        """Wait until every write reached the store; the stats."""
        deadline = time.monotonic() + 20
        while True:
            stats: dict[str, Any] = httpx.get(f"{self.url}/stats", trust_env=False).json()
            if stats["pending_writes"] == 0 or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)


def auth_args(port: int, store: str, database: str, *extra: str) -> list[str]:
    return [PYTHON, "-m", "scenarios", "auth-server", "--port", str(port), "--store", store,
            "--database", database, *extra]


@pytest.fixture(scope="module")
def shared_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Auth]:
    """One auth server (embedded store) for the tests that only need it to answer."""
    tmp = tmp_path_factory.mktemp("shared-auth")
    port = free_port()
    log = tmp / "auth.log"
    with process(auth_args(port, str(tmp / "store"), "t"), port, log, env=ENV) as proc:
        yield Auth(f"http://127.0.0.1:{port}", str(tmp / "store"), "t", log, proc)


@pytest.fixture(params=["embedded", "ferretdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(store, database): a fresh embedded store directory, or FerretDB with a fresh database."""
    database = f"auth_test_{uuid.uuid4().hex[:12]}"
    if request.param == "embedded":
        return str(tmp_path / "auth-store"), database
    uri: str = request.getfixturevalue("mongo_uri")
    return uri, database


@pytest.fixture
def start_auth(tmp_path: Path) -> Iterator[Callable[..., Auth]]:
    started: list[Any] = []

    def start(store: str, database: str, *extra: str) -> Auth:
        port = free_port()
        log = tmp_path / f"auth-{port}.log"
        cm = process(auth_args(port, store, database, *extra), port, log, env=ENV)
        proc = cm.__enter__()
        started.append(cm)
        return Auth(f"http://127.0.0.1:{port}", store, database, log, proc)

    yield start
    for cm in reversed(started):
        cm.__exit__(None, None, None)


def read_db(store: str, database: str) -> dict[str, list[dict[str, Any]]]:
    """Every document of the auth collections, read directly from the store."""
    if store.startswith("mongodb://"):
        import pymongo

        client: Any = pymongo.MongoClient(store, serverSelectionTimeoutMS=5000)
    else:
        from addons.telemetry.embedded import EmbeddedClient

        client = EmbeddedClient(Path(store))
    try:
        db = client[database]
        return {c: list(db[c].find({})) for c in ("users", "tokens")}
    finally:
        client.close()


def login(c: httpx.Client, user: str, token: str | None = None) -> str:
    body = {"user": user} if token is None else {"user": user, "token": token}
    r = c.post("/login", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["user"] == user
    return str(r.json()["token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.e2e
def test_login_verify_logout(store: tuple[str, str], start_auth: Callable[..., Auth]) -> None:
    auth = start_auth(*store)
    with auth.client() as c:
        token = login(c, "alice")
        r = c.get("/verify", headers=bearer(token))
        assert (r.status_code, r.json()) == (200, {"user": "alice"})
        assert c.post("/logout", headers=bearer(token)).status_code == 200
        r = c.get("/verify", headers=bearer(token))
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert c.post("/logout", headers=bearer(token)).status_code == 401
        # a second login is a second token; the user is not duplicated
        t2, t3 = login(c, "alice"), login(c, "alice")
        assert t2 != t3 and t2 != token
        assert c.get("/verify", headers=bearer(t2)).status_code == 200
    stats = auth.settle()
    assert stats["users"] == 1
    assert stats["valid_tokens"] == 2
    assert stats["revoked_tokens"] == 1


@pytest.mark.e2e
@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Basic dXNlcjpwYXNz", "Bearer a b", "Bearer unknown-token",
     "Bearer " + "x" * 5000],
)
def test_verify_rejects(header: str | None, shared_auth: Auth) -> None:
    with shared_auth.client() as c:
        login(c, "alice")
        headers = {} if header is None else {"Authorization": header}
        assert c.get("/verify", headers=headers).status_code == 401
        assert c.post("/logout", headers=headers).status_code == 401


@pytest.mark.e2e
def test_tokens_are_stored_only_hashed_and_survive_a_restart(
    store: tuple[str, str], start_auth: Callable[..., Auth]
) -> None:
    auth = start_auth(*store)
    with auth.client() as c:
        tokens = {u: login(c, u) for u in ("alice", "bob", "carol")}
        registered = login(c, "dave", "registered-token-for-dave")
        assert c.post("/logout", headers=bearer(tokens["bob"])).status_code == 200
    auth.settle()
    docs = read_db(*store)
    text = json.dumps(docs, default=str)
    for token in [*tokens.values(), registered]:
        assert token not in text
    assert token not in auth.log.read_text()
    by_hash = {d["hash"]: d for d in docs["tokens"]}
    assert set(by_hash) == {token_hash(t) for t in [*tokens.values(), registered]}
    assert by_hash[token_hash(tokens["bob"])]["revoked"] is True
    assert "revoked_at" in by_hash[token_hash(tokens["bob"])]
    assert by_hash[token_hash(tokens["alice"])]["revoked"] is False
    assert {d["name"] for d in docs["users"]} == {"alice", "bob", "carol", "dave"}
    assert all("created" in d for d in docs["users"])
    assert all({"user", "issued", "revoked"} <= set(d) for d in docs["tokens"])

    auth.proc.send_signal(signal.SIGTERM)
    assert auth.proc.wait(20) == 0
    again = start_auth(*store)  # loads the store; the revoked token is deleted at start-up
    with again.client() as c:
        assert c.get("/verify", headers=bearer(tokens["alice"])).json() == {"user": "alice"}
        assert c.get("/verify", headers=bearer(registered)).status_code == 200
        assert c.get("/verify", headers=bearer(tokens["bob"])).status_code == 401
    stats = again.settle()
    assert stats["users"] == 4
    assert stats["purged_at_start"] == 1
    assert len(read_db(*store)["tokens"]) == 3


@pytest.mark.e2e
def test_registered_tokens_and_bad_logins(shared_auth: Auth) -> None:
    with shared_auth.client() as c:
        assert login(c, "bob", "fixed-token-1") == "fixed-token-1"
        assert c.get("/verify", headers=bearer("fixed-token-1")).json() == {"user": "bob"}
        assert c.post("/login", json={"user": "eve", "token": "fixed-token-1"}).status_code == 409
        for body in (b"not json", b"[1]", b'{"user": ""}', b'{"user": 7}', b"{}",
                     b'{"user": "x", "token": "has space"}', b'{"user": "x", "token": 5}'):
            r = c.post("/login", content=body)
            assert r.status_code == 400, body
            assert "error" in r.json()
        assert c.get("/login").status_code == 405
        assert c.get("/nope").status_code == 404


@pytest.mark.e2e
def test_stats_count_requests_per_endpoint(start_auth: Callable[..., Auth],
                                           tmp_path: Path) -> None:
    auth = start_auth(str(tmp_path / "s"), "t")
    with auth.client() as c:
        tokens = [login(c, f"u{i}") for i in range(3)]
        for t in tokens:
            c.get("/verify", headers=bearer(t))
            c.get("/verify", headers=bearer(t))
        c.get("/verify")
        c.post("/logout", headers=bearer(tokens[0]))
        c.get("/healthz")
        c.get("/nope")
        stats = c.get("/stats").json()
    assert stats["requests"] == {"login": 3, "verify": 7, "logout": 1, "healthz": 1,
                                 "other": 1, "stats": 1}
    assert stats["statuses"]["verify"] == {"200": 6, "401": 1}
    assert stats["statuses"]["login"] == {"200": 3}
    assert stats["statuses"]["other"] == {"404": 1}
    assert stats["users"] == 3 and stats["valid_tokens"] == 2


@pytest.mark.e2e
def test_fault_injection(start_auth: Callable[..., Auth], tmp_path: Path) -> None:
    auth = start_auth(str(tmp_path / "s"), "t", "--fail-rate", "1")
    with auth.client() as c:
        token = login(c, "alice")  # only /verify is affected
        assert c.get("/verify", headers=bearer(token)).status_code == 503
        r = c.put("/faults", json={"fail_rate": 0, "latency_ms": 300})
        assert r.json() == {"latency_ms": 300.0, "fail_rate": 0.0}
        t0 = time.monotonic()
        assert c.get("/verify", headers=bearer(token)).status_code == 200
        assert time.monotonic() - t0 >= 0.3
        assert c.put("/faults", json={"fail_rate": 2}).status_code == 400
        assert c.put("/faults", content=b"[]").status_code == 400
        assert c.get("/faults").json() == {"latency_ms": 300.0, "fail_rate": 0.0}
        assert c.get("/stats").json()["injected_failures"] == 1


@pytest.mark.e2e
def test_auth_server_lifecycle(start_auth: Callable[..., Auth], tmp_path: Path) -> None:
    """One start-up line with the URL; SIGTERM and SIGINT exit 0; a taken port is exit 2."""
    auth = start_auth(str(tmp_path / "s"), "t")
    port = int(auth.url.rsplit(":", 1)[1])
    taken = subprocess.run(auth_args(port, str(tmp_path / "s2"), "t"), capture_output=True,
                           text=True, timeout=60, env={**os.environ, **ENV})
    assert taken.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in taken.stderr
    assert "Traceback" not in taken.stderr
    auth.proc.send_signal(signal.SIGINT)
    assert auth.proc.wait(20) == 0
    lines = auth.log.read_text().splitlines()
    assert len([x for x in lines if "listening on" in x]) == 1
    assert f"listening on {auth.url} " in lines[0]


@pytest.mark.e2e
def test_unreachable_store_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    dead = f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=300"
    r = subprocess.run(auth_args(port, dead, "t"), capture_output=True, text=True, timeout=60,
                       env={**os.environ, **ENV})
    assert r.returncode == 2
    assert "error: store mongodb://127.0.0.1" in r.stderr
    assert "Traceback" not in r.stderr


# -- the shop --------------------------------------------------------------------------------


@pytest.mark.e2e
def test_python_shop(tmp_path: Path) -> None:
    port = free_port()
    args = [PYTHON, "-m", "scenarios", "shop", "--port", str(port)]
    log = tmp_path / "shop.log"
    with process(args, port, log, env=ENV) as proc, httpx.Client(
        base_url=f"http://127.0.0.1:{port}", trust_env=False
    ) as c:
        r = c.get("/products/42?color=red", headers={"Host": "shop.example"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "/products/42" in r.text
        assert "<script>" not in c.get("/<script>").text
        assert c.post("/cart", content=b"x=1").json() == {"ok": True}
        assert c.post("/logout").status_code == 200
        assert c.get("/logout").json() == {"ok": True}
        assert c.delete("/anything").status_code == 200
        assert c.get("/_shop/stats").json() == {
            "requests": 6, "methods": {"GET": 3, "POST": 2, "DELETE": 1}}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    text = log.read_text()
    assert f"shop listening on http://127.0.0.1:{port} (python)" in text
    assert "/products/42" not in text  # no per-request logging


@pytest.mark.e2e
def test_nginx_shop_or_clear_error(tmp_path: Path) -> None:
    """With nginx installed it serves like the Python shop; without, exit 2 and a message."""
    port = free_port()
    args = [PYTHON, "-m", "scenarios", "shop", "--nginx", "--port", str(port)]
    if servers.find_nginx() is None:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60,
                              env={**os.environ, **ENV})
        assert done.returncode == 2 and "nginx is not installed" in done.stderr
        return
    with process(args, port, tmp_path / "nginx.log", env=ENV) as proc, httpx.Client(
        base_url=f"http://127.0.0.1:{port}", trust_env=False
    ) as c:
        r = c.get("/products/42")
        assert r.status_code == 200 and "<h1>" in r.text
        assert c.post("/cart").json() == {"ok": True}
        assert c.get("/logout").json() == {"ok": True}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    with pytest.raises(ConnectionRefusedError):  # nginx is gone with it
        socket.create_connection(("127.0.0.1", port), 1).close()
