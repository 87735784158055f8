"""Real processes for tests: FerretDB, and any server started as a subprocess on 127.0.0.1.

Tests use the real MongoDB protocol: `MONGODB_URI` when it is set (CI starts FerretDB and
exports it), otherwise a FerretDB that this module starts from the binary `.ci/setup` builds.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
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


PYTHON = sys.executable

__all__ = ["FERRETDB_BIN", "PYTHON", "ferretdb", "free_port", "process", "wait_for_port"]
