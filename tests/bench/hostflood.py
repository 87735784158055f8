"""RSS of a real mitmdump with the addon under a flood of distinct Host values.

    python -m tests.bench.hostflood                   # 3,000 hosts; bounds 100, 1000, none
    python -m tests.bench.hostflood --hosts 500 --bounds 50

For each `wasm_max_instances` in `--bounds` (0: no bound, i.e. more than the flood), it starts
the local stack (auth server, shop, mitmdump with the addon), warms it up on one host, sends
`--hosts` unauthenticated requests with distinct Host values, and reports the proxy's RSS
growth, the instances left, and the answers; then checks that it still serves.
Results print as a table and go to `results/bench/hostflood.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from scenarios.procs import local_stack

RESULTS = Path(__file__).resolve().parents[2] / "results" / "bench" / "hostflood.json"
TOKEN = "bench-admin-token"


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def flood(hosts: int, max_instances: int) -> dict[str, Any]:
    """One run: RSS before and after `hosts` distinct Host values."""
    with tempfile.TemporaryDirectory(prefix="hostflood-") as tmp, ExitStack() as stack:
        options = {"wasm_admin_token": TOKEN, "wasm_log_metrics": "false",
                   "wasm_max_instances": str(max_instances or hosts * 2)}
        s = local_stack(stack, Path(tmp), options=options)
        pid = s.proxy_process.pid
        with httpx.Client(base_url=s.proxy, timeout=30) as client:
            for _ in range(200):
                client.get("/", headers={"Host": "warm.example"})
            time.sleep(1)
            before = rss_kib(pid)
            t0 = time.perf_counter()
            statuses: dict[int, int] = {}
            for i in range(hosts):
                r = client.get("/", headers={"Host": f"h{i}.flood.example"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            seconds = time.perf_counter() - t0
            time.sleep(1)
            after = rss_kib(pid)
            r = client.get("/", headers={"Host": "warm.example"})  # still serving
            assert s.admin is not None
            instances = httpx.get(f"{s.admin}/instances",
                                  headers={"Authorization": f"Bearer {TOKEN}"}).json()
        return {"max_instances": max_instances or None, "hosts": hosts,
                "rss_before_mib": round(before / 1024, 1), "rss_after_mib": round(after / 1024, 1),
                "rss_growth_mib": round((after - before) / 1024, 1), "instances": len(instances),
                "statuses": statuses, "seconds": round(seconds, 1),
                "still_serving": r.status_code}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=3000)
    parser.add_argument("--bounds", default="100,1000,0",
                        help="wasm_max_instances values, comma-separated (0: unbounded)")
    args = parser.parse_args(argv)
    runs = [flood(args.hosts, int(b)) for b in args.bounds.split(",")]
    print(f"A flood of {args.hosts:,} distinct Host values through mitmdump with the addon\n")
    print("| wasm_max_instances | instances after | RSS before → after (MiB) | growth (MiB) "
          "| answers |\n|---|---|---|---|---|")
    for r in runs:
        answers = ", ".join(f"{n} × {code}" for code, n in sorted(r["statuses"].items()))
        print(f"| {r['max_instances'] or 'unbounded'} | {r['instances']} | "
              f"{r['rss_before_mib']} → {r['rss_after_mib']} | {r['rss_growth_mib']} | "
              f"{answers} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
