"""What Python's cyclic collector costs a live mitmdump per cache-hit request (not part of
`just bench`; the evidence for `wasm_auth.freeze_start_heap`).

mitmproxy leaves every finished flow to the cyclic collector (a flow and its connections refer
to each other), so a busy proxy collects young objects every few requests and runs a full
collection every few thousand. A full collection walks every object the process holds outside
the frozen generation: mitmproxy's and the addon's imported code too, unless it was frozen.
Each variant runs with `-s tests/bench/collector_probe.py`, which times the collections from
`running` to `done` (`gc.callbacks`), under the same wrk load, one after the other: `plain`,
`plain, heap frozen` (`tests/bench/frozen_plain.py`) and `addon, logging off` (which freezes
its start-up heap as it loads). Reported per variant and generation: collections per 1,000
requests, milliseconds per collection, and µs of collector time per request; and the objects
a full collection walks at the end. Times are wall time on a shared machine (noisy); the
counts of collections and of objects are not.

    python -m tests.bench.collector --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from scenarios.procs import free_port, mitmdump_path, process, stop
from tests.bench import ROOT, load_note, mitmdump_variants
from tests.bench.proxy import python_load, wrk

RESULTS = ROOT / "results" / "bench" / "collector.json"
VARIANTS = ("plain", "plain, heap frozen", "addon, logging off")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="of load per variant")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load = wrk if shutil.which("wrk") else python_load
    load_before = os.getloadavg()[0]
    probe = str(ROOT / "tests" / "bench" / "collector_probe.py")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-collector-") as tmp_s, ExitStack() as stack:
        tmp = Path(tmp_s)
        token, common, variants = mitmdump_variants(stack, tmp, nginx=bool(shutil.which("nginx")))
        headers = {"Host": "shop.example", "Authorization": f"Bearer {token}"}
        for i, name in enumerate(VARIANTS):
            port, out = free_port(), tmp / f"collector-{i}.json"
            env = {"PYTHONPATH": str(ROOT), "WASM_RECLAIM_COLLECTOR_OUT": str(out)}
            # The probe first: it only measures, and loads before the addon freezes.
            with process([mitmdump_path(), *common, "-p", str(port), "-s", probe,
                          *variants[name]], port, tmp / f"mitmdump-{i}.log", env,
                         timeout=60) as proc:
                url = f"http://127.0.0.1:{port}/"
                assert httpx.get(url, headers=headers, timeout=10).status_code == 200
                rate = load(url, headers, args.seconds, args.connections)
                stop(proc)  # `done`: the probe writes what it saw
            got = json.loads(out.read_text())
            requests = rate * args.seconds
            results[name] = {
                "requests": round(requests), **got,
                "per_1000_requests": [c / requests * 1000 for c in got["collections"]],
                "ms_per_collection": [s / c * 1000 if c else None
                                      for s, c in zip(got["seconds"], got["collections"],
                                                      strict=True)],
                "us_per_request": [s / requests * 1e6 for s in got["seconds"]],
            }
            print(f"{name}: {requests:,.0f} requests", flush=True)
    results["load_before"], results["load_after"] = load_before, os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("| variant | collections per 1,000 requests (gen 0 / 1 / 2) | ms per full collection "
          "| collector µs per request (gen 0 / 1 / 2: total) | objects a full collection "
          "walks | frozen |\n|---|---|---|---|---|---|")
    for name in VARIANTS:
        r = results[name]
        per, us, full = r["per_1000_requests"], r["us_per_request"], r["ms_per_collection"][2]
        print(f"| {name} | {per[0]:.0f} / {per[1]:.1f} / {per[2]:.2f} | "
              f"{'–' if full is None else f'{full:.1f}'} | "
              f"{us[0]:.1f} / {us[1]:.1f} / {us[2]:.1f}: {sum(us):.1f} | "
              f"{r['walked_by_a_full_collection']:,} | {r['frozen']:,} |")
    print(load_note(load_before, results["load_after"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
