"""Real processes for tests: FerretDB, and any server started as a subprocess on 127.0.0.1.

Tests use the real MongoDB protocol: `MONGODB_URI` when it is set (CI starts FerretDB and
exports it), otherwise a FerretDB that this module starts from the binary `.ci/setup` builds.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from scenarios.procs import free_port, process, wait_for_port

FERRETDB_BIN = Path(os.environ.get(
    "FERRETDB_BIN", Path.home() / ".cache" / "wasm-reclaim" / "bin" / "ferretdb-v1.24.2"))


@contextmanager
def ferretdb() -> Iterator[str]:
    """A MongoDB URI: `MONGODB_URI` if set, else a FerretDB started for the duration."""
    uri = os.environ.get("MONGODB_URI")
    if uri:
        yield uri
        return
    if not FERRETDB_BIN.exists():
        raise RuntimeError(
            f"no MongoDB-protocol server: set MONGODB_URI or run `just setup`, which builds "
            f"FerretDB into {FERRETDB_BIN}"
        )
    with tempfile.TemporaryDirectory(prefix="ferretdb-") as tmp:
        port = free_port()
        args = [str(FERRETDB_BIN), "--listen-addr", f"127.0.0.1:{port}",
                "--sqlite-url", f"file:{tmp}/"]
        with process(args, port, Path(tmp) / "ferretdb.log"):
            yield f"mongodb://127.0.0.1:{port}/"


Stop = Callable[[], Awaitable[object]]
"""Shuts a server down (on its own event loop)."""


@contextmanager
def serving_in_a_thread(start: Callable[[], Awaitable[Stop]], what: str) -> Iterator[None]:
    """Run an asyncio server in this process, on its own event loop in a daemon thread.

    `start` starts the server (listening when it returns) and returns what stops it; `what`
    names the server in the error when it does not start. On leaving, the loop stops, the
    server is stopped on it and the thread ends.
    """
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failed: list[BaseException] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            stop = loop.run_until_complete(start())
        except BaseException as e:  # reported by the caller's thread
            failed.append(e)
            started.set()
            loop.close()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(stop())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    if not started.wait(10) or failed:
        raise RuntimeError(f"{what} did not start" + (f": {failed[0]}" if failed else ""))
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


PYTHON = sys.executable

__all__ = ["FERRETDB_BIN", "PYTHON", "Stop", "ferretdb", "free_port", "process",
           "serving_in_a_thread", "wait_for_port"]
