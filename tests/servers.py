"""Real processes for tests: FerretDB, and any server started as a subprocess on 127.0.0.1.

Tests use the real MongoDB protocol: `MONGODB_URI` when it is set (CI starts FerretDB and
exports it), otherwise a FerretDB that this module starts from the binary `.ci/setup` builds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

FERRETDB_BIN = Path(os.environ.get(
    "FERRETDB_BIN", Path.home() / ".cache" / "wasm-reclaim" / "bin" / "ferretdb-v1.24.2"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None,
                  log: Path | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before listening on "
                               f"{port}:\n{text}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


@contextmanager
def process(args: Sequence[str], port: int, log: Path, env: dict[str, str] | None = None,
            timeout: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    """Start `args`, wait for `port`, yield the process, then stop it (SIGTERM, then SIGKILL)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    try:
        wait_for_port(port, timeout, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
