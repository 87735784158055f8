"""A looping filter spread over many Host values, and a good tenant beside it, through mitmdump.

    python -m tests.bench.loopflood                  # 20 s
    python -m tests.bench.loopflood --seconds 5

The filter loops forever on requests to `/loop` and lets every other request through. For
`--seconds`, one client sends `/loop` requests, each with a new Host (a new filter instance
each time), while another sends ordinary requests to one good host. With back-off per
instance only, every looping request cost a deadline of the event loop; with back-off per
module the deadline is paid a few times and the good host is served. Prints both clients'
counts and the good host's latency; results go to `results/bench/loopflood.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import wasmtime

from scenarios.procs import local_stack

RESULTS = Path(__file__).resolve().parents[2] / "results" / "bench" / "loopflood.json"

# Loops when :path starts with "/loop", continues otherwise.
LOOP_ON_PATH = """(module
  (import "env" "proxy_get_header_map_value"
    (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 100) ":path")
  (global $heap (mut i32) (i32.const 65536))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (global.get $heap) (local.get $n)) (i32.const 7))
                               (i32.const -8)))
    (if (i32.gt_u (global.get $heap) (i32.const 131072)) (then (global.set $heap (i32.const 65536))
                                                              (local.set $p (i32.const 65536))))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get (i32.const 0) (i32.const 100) (i32.const 5) (i32.const 200)
                            (i32.const 204)))
      (then (if (i32.and (i32.ge_u (i32.load (i32.const 204)) (i32.const 5))
                         (i32.eq (i32.load (i32.add (i32.load (i32.const 200)) (i32.const 1)))
                                 (i32.const 0x706f6f6c)))   ;; "loop" after the "/"
              (then (loop $l (br $l))))))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1)))"""


def run(seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="loopflood-") as tmp, ExitStack() as stack:
        wasm = Path(tmp) / "loop.wasm"
        wasm.write_bytes(wasmtime.wat2wasm(LOOP_ON_PATH))
        s = local_stack(stack, Path(tmp) / "run", options={
            "wasm_filter": str(wasm), "wasm_log_metrics": "false"})
        stop = time.monotonic() + seconds
        looping: dict[int, int] = {}
        good: list[float] = []
        good_failed = 0

        def attacker() -> None:
            i = 0
            with httpx.Client(base_url=s.proxy, timeout=30) as c:
                while time.monotonic() < stop:
                    r = c.get("/loop", headers={"Host": f"a{i}.attack.example"})
                    looping[r.status_code] = looping.get(r.status_code, 0) + 1
                    i += 1

        thread = threading.Thread(target=attacker)
        thread.start()
        with httpx.Client(base_url=s.proxy, timeout=30) as c:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = c.get("/", headers={"Host": "good.example"})
                if r.status_code == 200:
                    good.append((time.perf_counter() - t0) * 1e3)
                else:
                    good_failed += 1
        thread.join()
    good.sort()
    return {"seconds": seconds, "looping_requests": looping, "good_served": len(good),
            "good_failed": good_failed,
            "good_ms_median": round(statistics.median(good), 1) if good else None,
            "good_ms_p99": round(good[int(len(good) * 0.99)], 1) if good else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    result = run(args.seconds)
    loops = ", ".join(f"{n} × {code}" for code, n in sorted(result["looping_requests"].items()))
    print(f"{args.seconds:.0f} s: looping requests with a new Host each: {loops}; good host: "
          f"{result['good_served']} served, {result['good_failed']} failed, median "
          f"{result['good_ms_median']} ms, p99 {result['good_ms_p99']} ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
