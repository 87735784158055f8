"""Deadline trips under contention: false ones (a healthy call trapped) and true ones.

    python -m tests.bench.deadline                       # 1 M requests, 3 busy processes
    python -m tests.bench.deadline --requests 20000 --loops 5

While `--busy` processes spin on the machine's cores and a thread in this process holds the
GIL as often as it can (which starves the epoch ticker, as a busy proxy does), it sends
`--requests` cache hits through the real filter (four guest calls each) and counts the ones
interrupted: a *false trip*. Then it runs `--loops` calls of a filter that loops forever and
counts the ones interrupted (every one must be), with the guest CPU time each ran before the
interrupt (it must stay within the 100 ms deadline). Results print as a table and go to
`results/bench/deadline.json`; the exit status is 1 if any target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import wasmtime

from addons.proxywasm import (
    FilterModule,
    Host,
    HttpCallResponse,
    InProcessDispatcher,
    Limits,
    VirtualClock,
)
from scenarios.simulate import DEFAULT_FILTER

RESULTS = Path(__file__).resolve().parents[2] / "results" / "bench" / "deadline.json"
HEADERS = [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"shop"),
           (b"authorization", b"Bearer cached-token")]
LOOP_WAT = """(module (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (loop $l (br $l)) (i32.const 0)))"""


@contextmanager
def contention(busy: int, gil_hog: bool) -> Iterator[None]:
    """`busy` processes spinning, and a thread of this process taking the GIL, meanwhile."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                              stdin=subprocess.DEVNULL) for _ in range(busy)]
    stop = threading.Event()

    def hog() -> None:
        x = 0
        while not stop.is_set():
            for i in range(10_000):  # pure Python: holds the GIL until the switch interval
                x += i

    thread = threading.Thread(target=hog, name="gil-hog", daemon=True)
    if gil_hog:
        thread.start()
    try:
        time.sleep(0.2)  # let them get going
        yield
    finally:
        stop.set()
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        if gil_hog:
            thread.join()


def healthy_requests(n: int, deadline_ms: float = 100.0) -> dict[str, Any]:
    """`n` cache hits through the real filter; how many were interrupted (false trips)."""
    clock = VirtualClock()
    module = FilterModule.from_file(DEFAULT_FILTER)
    host = Host(module, InProcessDispatcher(lambda call: HttpCallResponse(200), clock.now_ns),
                clock=clock, limits=Limits(deadline_ms=deadline_ms))
    inst = host.instance("shop")
    first = inst.stream()
    first.request_headers(HEADERS)
    host.poll()
    first.close()
    false_trips = 0
    errors: list[str] = []
    t0 = time.perf_counter()
    for _ in range(n):
        stream = inst.stream()
        decision = stream.request_headers(HEADERS)
        stream.close()
        if decision is None or decision.error is not None:
            false_trips += 1
            if len(errors) < 5:
                errors.append(decision.error if decision is not None else "no decision")
    elapsed = time.perf_counter() - t0
    host.close()
    return {"requests": n, "guest_calls": 4 * n, "false_trips": false_trips,
            "errors": errors, "seconds": round(elapsed, 2)}


def looping_calls(n: int, deadline_ms: float = 100.0) -> dict[str, Any]:
    """`n` calls of a filter that loops forever: how many were interrupted, after what."""
    module = FilterModule(bytes(wasmtime.wat2wasm(LOOP_WAT)), name="loop.wat")
    trapped = 0
    guest_ms: list[float] = []
    wall_ms: list[float] = []
    for _ in range(n):
        clock = VirtualClock()
        host = Host(module, InProcessDispatcher(lambda call: HttpCallResponse(200), clock.now_ns),
                    clock=clock, limits=Limits(deadline_ms=deadline_ms))
        inst = host.instance("loop")
        stream = inst.stream()
        c0, w0 = time.thread_time(), time.perf_counter()
        decision = stream.request_headers(HEADERS)
        guest_ms.append((time.thread_time() - c0) * 1e3)
        wall_ms.append((time.perf_counter() - w0) * 1e3)
        if decision is not None and decision.error and "interrupted" in decision.error:
            trapped += 1
        host.close()
    return {"calls": n, "trapped": trapped,
            "guest_ms_min": round(min(guest_ms), 1), "guest_ms_max": round(max(guest_ms), 1),
            "wall_ms_max": round(max(wall_ms), 1)}


def run(requests: int, loops: int, busy: int, gil_hog: bool = True) -> dict[str, Any]:
    """Both measurements under the same contention."""
    with contention(busy, gil_hog):
        healthy = healthy_requests(requests)
        looping = looping_calls(loops)
    return {"healthy": healthy, "looping": looping, "busy_processes": busy, "gil_hog": gil_hog,
            "cores": os.cpu_count(), "load_before": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--loops", type=int, default=20)
    parser.add_argument("--busy", type=int, default=3, help="busy processes (default 3)")
    parser.add_argument("--no-gil-hog", action="store_true",
                        help="no GIL-holding thread in this process")
    args = parser.parse_args(argv)
    result = run(args.requests, args.loops, args.busy, not args.no_gil_hog)
    h, lp = result["healthy"], result["looping"]
    rows = [
        ("false trips (healthy requests interrupted)",
         f"{h['false_trips']} in {h['requests']:,} ({h['guest_calls']:,} guest calls)", "0",
         h["false_trips"] == 0),
        ("true trips (looping calls interrupted)", f"{lp['trapped']} of {lp['calls']}", "all",
         lp["trapped"] == lp["calls"]),
        ("guest CPU time before the interrupt", f"{lp['guest_ms_min']}–{lp['guest_ms_max']} ms "
         f"(wall up to {lp['wall_ms_max']} ms)", "≤ 100 ms", lp["guest_ms_max"] <= 100.0),
    ]
    print(f"Deadline under contention: {args.busy} busy processes on {os.cpu_count()} cores"
          f"{', a GIL-holding thread' if not args.no_gil_hog else ''}; {platform.python_version()}")
    print("\n| measure | result | target | met |\n|---|---|---|---|")
    for name, value, target, met in rows:
        print(f"| {name} | {value} | {target} | {'yes' if met else 'NO'} |")
    if h["errors"]:
        print("first false trips:", *h["errors"], sep="\n  ")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(met for *_, met in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
