"""Instructions per cache hit and per cache miss under callgrind (not part of `just bench`).

Wall time on a shared 2-core machine varies by ±30 %; instruction counts do not. Each figure is
the difference of two runs under `valgrind --tool=callgrind` of `tests.bench.host`'s
`bench_hit` / `bench_miss`, with `--many` and `--few` requests (hash seed 0), divided by the difference:
start-up, compiling the filter and the first requests cancel out. The epoch ticker is stopped
in those runs: it ticks by wall time, which valgrind stretches fifty-fold and the machine's load
varies, and each tick that finds the guest running adds the epoch callback and metered host
calls (up to a sixth more instructions on a loaded machine).

    python -m tests.bench.callgrind            # hit and miss, 3,000 − 1,000 requests
    python -m tests.bench.callgrind --what flow  # a cache-hit flow inside mitmproxy: plain,
                                                 # with an empty script addon (the control),
                                                 # and with the addon (`tests.bench.dispatch`'s
                                                 # child, logging off), 160 − 40 flows
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from tests.bench import ROOT, auth_server
from tests.bench.dispatch import TOKEN_ENV


def child(what: str, n: int) -> None:
    """Run in the process under valgrind: `n` requests of kind `what`."""
    from addons.proxywasm import FilterModule, _wasmtime
    from scenarios.simulate import DEFAULT_FILTER
    from tests.bench.host import bench_hit, bench_miss

    module = FilterModule.from_file(DEFAULT_FILTER)  # starts the engine and its ticker
    _wasmtime._stop_ticker()  # counts independent of wall time (a Python ticker cannot stop)
    (bench_hit if what == "hit" else bench_miss)(module, n)


def instructions(what: str, n: int) -> int:
    """Instructions callgrind counts for a whole run of `n` requests."""
    return counted([sys.executable, "-m", "tests.bench.callgrind", "--child", what, str(n)])


def counted(command: list[str], env: dict[str, str] | None = None) -> int:
    """Instructions callgrind counts for a whole run of `command` (`env`: added to ours)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        command = [c.replace("{tmp}", tmp) for c in command]
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
            check=True, cwd=ROOT, capture_output=True,
            # One BLAS thread: numpy's (imported with pandas) spin while they wait for work,
            # and how long they spin depends on the machine's load, not on the code measured.
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0",
                 "OPENBLAS_NUM_THREADS": "1", **(env or {})})
        text = out.read_text()
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if found is None:
        raise SystemExit(f"callgrind wrote no instruction total to {out}")
    return int(found.group(1))


def flows(many: int, few: int) -> None:
    """Per cache-hit flow inside mitmproxy (`tests.bench.dispatch`'s child: a real DumpMaster,
    its hook dispatch): plain, and with the addon (logging off), against a real auth server."""
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp, ExitStack() as stack:
        auth, token = auth_server(stack, Path(tmp))
        per: dict[str, float] = {}
        for variant in ("plain", "empty", "off"):
            run = [[sys.executable, "-m", "tests.bench.dispatch", "--child", variant,
                    f"--auth={auth}", "--flows", str(n), "--repeats", "1", "--tmp", "{tmp}"]
                   for n in (many, few)]
            env = {TOKEN_ENV: token}
            per[variant] = (counted(run[0], env) - counted(run[1], env)) / (many - few)
            print(f"flow, {variant}: {per[variant]:,.0f} instructions per flow "
                  f"({many:,} − {few:,} flows)")
    print(f"flow, the addon's part: {per['off'] - per['plain']:,.0f} instructions; an empty "
          f"script addon's: {per['empty'] - per['plain']:,.0f}; the addon over it: "
          f"{per['off'] - per['empty']:,.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--many", type=int, default=3000)
    parser.add_argument("--few", type=int, default=1000)
    parser.add_argument("--what", choices=("hit", "miss", "both", "flow"), default="both")
    parser.add_argument("--flows-many", type=int, default=160)
    parser.add_argument("--flows-few", type=int, default=40)
    parser.add_argument("--child", nargs=2, metavar=("WHAT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("callgrind: valgrind is not installed (apt-get install valgrind)")
    from addons.proxywasm import _wasmtime

    path = "the C extension" if _wasmtime.FASTCALLS else "ctypes"
    print(f"calls through {path}; load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    if args.what == "flow":
        flows(args.flows_many, args.flows_few)
        return 0
    for what in (("hit", "miss") if args.what == "both" else (args.what,)):
        many, few = instructions(what, args.many), instructions(what, args.few)
        per = (many - few) / (args.many - args.few)
        print(f"{what}: {per:,.0f} instructions per request "
              f"({args.many:,} − {args.few:,} requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
