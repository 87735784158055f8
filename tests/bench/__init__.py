"""Benchmarks (`just bench`): each module prints a Markdown table and writes a JSON file."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def load_note(before: float, after: float) -> str:
    """The sentence every benchmark ends with: the machine's load while it ran."""
    return (f"{os.cpu_count()} cores, 1-min load average {before:.1f} → {after:.1f}: other work "
            "on the machine lowers every figure.")


def addon_script(chain: Sequence[Any]) -> Any:
    """The script module that carries the wasm_auth addon's hooks (`WasmAuth.publish`) in
    mitmproxy's addon chain (`master.addons.chain`), or None where the addon is not loaded.
    The addon itself is its `request` hook's `__self__`."""
    from mitmproxy.addonmanager import traverse

    for a in traverse(chain):
        if type(getattr(getattr(a, "request", None), "__self__", None)).__name__ == "WasmAuth":
            return a
    return None


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


def mitmdump_variants(stack: ExitStack, work: Path, nginx: bool = False
                      ) -> tuple[str, list[str], dict[str, list[str]]]:
    """Start the auth server and the shop on 127.0.0.1 (stopped when `stack` closes; logs in
    `work`) for the proxy benchmarks. Returns the bench user's token, mitmdump's common
    arguments (a reverse proxy to the shop) and each variant's own: `plain`, `empty addon`
    (`tests/bench/empty_addon.py`, the control), `plain, heap frozen` (`frozen_plain.py`: the
    control for the addon's `gc.freeze`), `addon, logging off`, `addon, logging on`
    (a spool and the embedded store in `work`). `nginx`: the shop behind nginx, so that the
    upstream is not the bottleneck."""
    from scenarios.procs import free_port, process

    auth_url, token = auth_server(stack, work)
    shop_port = free_port()
    shop = [sys.executable, "-m", "scenarios", "shop", "--port", str(shop_port)]
    if nginx:
        shop.append("--nginx")
    stack.enter_context(process(shop, shop_port, work / "shop.log", {"PYTHONPATH": str(ROOT)}))
    common = ["--mode", f"reverse:http://127.0.0.1:{shop_port}", "--listen-host", "127.0.0.1",
              "-q", "--set", "keep_host_header=true"]
    addon = ["-s", str(ROOT / "addons" / "wasm_auth.py"), "--set", f"wasm_cluster=auth={auth_url}",
             "--set", "wasm_admin_listen="]
    variants = {
        "plain": [],
        "empty addon": ["-s", str(ROOT / "tests" / "bench" / "empty_addon.py")],
        "plain, heap frozen": ["-s", str(ROOT / "tests" / "bench" / "frozen_plain.py")],
        "addon, logging off": [*addon, "--set", "wasm_log_metrics=false"],
        "addon, logging on": [*addon, "--set", f"wasm_store={work / 'store'}",
                              "--set", f"wasm_spool={work / 'spool'}"],
    }
    return token, common, variants
