"""Benchmarks (`just bench`): each module prints a Markdown table and writes a JSON file."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_note(before: float, after: float) -> str:
    """The sentence every benchmark ends with: the machine's load while it ran."""
    return (f"{os.cpu_count()} cores, 1-min load average {before:.1f} → {after:.1f}: other work "
            "on the machine lowers every figure.")


def auth_server(stack: ExitStack, work: Path) -> tuple[str, str]:
    """Start the in-repo auth server on a free port of 127.0.0.1 (stopped when `stack` closes;
    its log in `work`) and log in a bench user: its URL and the user's token."""
    import httpx

    from scenarios.procs import free_port, process

    port = free_port()
    stack.enter_context(process(
        [sys.executable, "-m", "scenarios", "auth-server", "--port", str(port), "--no-store"],
        port, work / "auth.log", {"PYTHONPATH": str(ROOT)}))
    url = f"http://127.0.0.1:{port}"
    token = httpx.post(f"{url}/login", json={"user": "bench"}, timeout=10).json()["token"]
    return url, str(token)
