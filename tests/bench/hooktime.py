"""The addon's own CPU per cache hit in a live mitmdump (not part of `just bench`'s targets).

`tests.bench.proxy` compares whole proxies; this says how much of the addon's share is its own
hook. One mitmdump with the addon (logging off) in reverse mode to the shop, and
`tests/bench/hook_timer.py` loaded after it, which times the synchronous part of the `request`
hook in thread CPU time (a cache hit runs entirely there). wrk (or the Python fallback) sends
cache hits for `--seconds`. The in-process figure for the same work is
`tests.bench.dispatch`'s; live, the proxy's own work between two requests evicts the
filter's code and data from the caches, and each hit pays for that.

    python -m tests.bench.hooktime --seconds 15
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from scenarios.procs import free_port, mitmdump_path, process
from tests.bench import ROOT, load_note, mitmdump_variants
from tests.bench.proxy import python_load, wrk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    before = os.getloadavg()[0]
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-hooktime-") as tmp:
        work = Path(tmp)
        token, common, variants = mitmdump_variants(stack, work, nginx=bool(shutil.which("nginx")))
        port = free_port()
        times = work / "hook-times.json"
        command = [str(mitmdump_path()), "--listen-port", str(port), *common,
                   *variants["addon, logging off"], "-s", str(ROOT / "tests" / "bench" / "hook_timer.py")]
        proxy = stack.enter_context(process(
            command, port, work / "mitmdump.log",
            {"PYTHONPATH": str(ROOT), "WASM_RECLAIM_HOOK_TIMES": str(times)}))
        load = wrk if shutil.which("wrk") else python_load
        url, headers = f"http://127.0.0.1:{port}/", {"Authorization": f"Bearer {token}"}
        rate = load(url, headers, args.seconds, args.connections)
        proxy.terminate()  # mitmdump runs `done` on SIGTERM: the timer writes its file
        proxy.wait(30)
        for _ in range(50):
            if times.exists():
                break
            time.sleep(0.1)
        got = json.loads(times.read_text())
    if not got["hooks"]:
        print(f"hooktime: no request hook was timed ({got['suspended']} suspended): the timer "
              "did not see the addon's synchronous hook", file=sys.stderr)
        return 1
    per_hit = got["cpu_ns"] / got["hooks"] / 1e3
    print(f"the addon's request hook, cache hits: {per_hit:.1f} µs CPU each, over "
          f"{got['hooks']:,} hooks ({got['suspended']} suspended, not timed: misses); "
          f"{load.__name__} at {rate:,.0f} requests/s")
    print(load_note(before, os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
