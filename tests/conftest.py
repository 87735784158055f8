"""Shared fixtures: hosts around inline WAT modules or the reference filter, in virtual time."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from addons.proxywasm import (
    FilterModule,
    Host,
    HttpCall,
    HttpCallResponse,
    InProcessDispatcher,
    Limits,
    Stream,
    VirtualClock,
)
from addons.proxywasm.context import ROOT_CONTEXT_ID, StreamContext
from addons.proxywasm.vm import Vm
from addons.telemetry import store as st

from .servers import ferretdb

ROOT = Path(__file__).resolve().parent.parent
FILTER_WASM = ROOT / "filters" / "auth_cache.wasm"


@pytest.fixture(autouse=True)
def _log_filters_stay_with_their_test() -> Iterator[None]:
    """The log filters an addon installs when it runs (`addons.logsafe.install`: a rate limit
    per kind of line) are process-wide: without this, a test's lines could be held back
    because an earlier test logged the same kind."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    saved = [(lg, list(lg.filters)) for lg in loggers]
    yield
    for lg, filters in saved:
        lg.filters[:] = filters


class Harness:
    """A host with one instance of a WAT module, and helpers to poke its memory and exports."""

    def __init__(self, wat: str, handler: Callable[[HttpCall], HttpCallResponse | None] | None,
                 **host_kw: object) -> None:
        self.clock = VirtualClock()
        self.calls: list[HttpCall] = []

        def record(call: HttpCall) -> HttpCallResponse | None:
            self.calls.append(call)
            return handler(call) if handler else HttpCallResponse(200)

        self.dispatcher = InProcessDispatcher(record, self.clock.now_ns, clusters=("auth",))
        self.module = FilterModule(wasmtime.wat2wasm(wat), name="test.wat")
        host_kw.setdefault("limits", Limits(deadline_ms=10_000))  # see tests/test_filter.py
        self.host = Host(self.module, self.dispatcher, clock=self.clock, **host_kw)  # type: ignore[arg-type]
        self.instance = self.host.instance("t")

    @property
    def vm(self) -> Vm:
        assert self.instance.vm is not None
        return self.instance.vm

    def call(self, name: str, *args: int) -> int:
        func = self.vm.raw.func(f"call_{name}") or self.vm.raw.func(name)
        assert func is not None, f"no export {name}"
        return self.vm.call(func, *args)

    def put(self, ptr: int, data: bytes) -> tuple[int, int]:
        assert self.vm.write(ptr, data)
        return ptr, len(data)

    def u32(self, ptr: int) -> int:
        data = self.vm.read(ptr, 4)
        assert data is not None
        return int.from_bytes(data, "little")

    def u64(self, ptr: int) -> int:
        data = self.vm.read(ptr, 8)
        assert data is not None
        return int.from_bytes(data, "little")

    def returned(self, ptr_ptr: int, size_ptr: int) -> bytes:
        """Bytes a host function returned through (pointer, size) out-parameters."""
        data = self.vm.read(self.u32(ptr_ptr), self.u32(size_ptr))
        assert data is not None
        return data

    def stream_context(self, headers: list[tuple[bytes, bytes]] | None = None) -> StreamContext:
        """Open a stream context and make it the effective one."""
        stream = Stream(self.instance, self.vm)
        ctx = stream.ctx = self.vm.new_context(stream)
        ctx.request_headers = list(headers or [])
        self.vm.effective = ctx.id
        return ctx

    def root(self) -> None:
        self.vm.effective = ROOT_CONTEXT_ID


@pytest.fixture
def harness() -> Callable[..., Harness]:
    made: list[Harness] = []

    def make(wat: str, handler: Callable[[HttpCall], HttpCallResponse | None] | None = None,
             **host_kw: object) -> Harness:
        h = Harness(wat, handler, **host_kw)
        made.append(h)
        return h

    yield make  # type: ignore[misc]
    for h in made:
        h.host.close()


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    """A real MongoDB-protocol server (FerretDB): MONGODB_URI, or one started for the session."""
    with ferretdb() as uri:
        yield uri


@pytest.fixture
def mongo_database(mongo_uri: str, request: pytest.FixtureRequest
                   ) -> Iterator[tuple[str, Any]]:
    """A fresh database on the session's FerretDB, dropped afterwards: its URI (the database
    named in it) and the pymongo database."""
    import pymongo

    name = f"{request.module.__name__.rsplit('_', 1)[-1]}_{uuid.uuid4().hex[:10]}"
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_uri, serverSelectionTimeoutMS=5000)
    try:
        yield mongo_uri.rstrip("/") + "/" + name, client[name]
    finally:
        client.drop_database(name)
        client.close()


@pytest.fixture(params=["embedded", "ferretdb"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(store, database) for the telemetry tests: the embedded store, or a fresh database on
    FerretDB (dropped afterwards)."""
    if request.param == "embedded":
        yield str(tmp_path / "store"), st.DATABASE
        return
    uri = request.getfixturevalue("mongo_uri")
    database = f"t_{uuid.uuid4().hex[:12]}"
    yield uri, database
    db = st.open_store(uri, database)
    db.client.drop_database(database)
    st.close_store(db)


@pytest.fixture(scope="session")
def filter_module() -> FilterModule:
    """The committed reference filter, compiled once per test session."""
    return FilterModule.from_file(FILTER_WASM)


__all__ = ["FILTER_WASM", "ROOT", "Harness", "Limits"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The conformance suite's known host gaps become strict xfails (tests/conformance_gaps.py)."""
    from .conformance_gaps import mark_known_gaps

    mark_known_gaps(items)
