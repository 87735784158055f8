"""Instructions per cache hit and per cache miss under callgrind (not part of `just bench`).

Wall time on a shared 2-core machine varies by ±30 %; instruction counts do not. Each figure is
the difference of two runs under `valgrind --tool=callgrind` of `tests.bench.host`'s
`bench_hit` / `bench_miss`, with `--many` and `--few` requests (hash seed 0), divided by the difference:
start-up, compiling the filter and the first requests cancel out.

    python -m tests.bench.callgrind            # hit and miss, 3,000 − 1,000 requests
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def child(what: str, n: int) -> None:
    """Run in the process under valgrind: `n` requests of kind `what`."""
    from addons.proxywasm import FilterModule
    from scenarios.simulate import DEFAULT_FILTER
    from tests.bench.host import bench_hit, bench_miss

    module = FilterModule.from_file(DEFAULT_FILTER)
    (bench_hit if what == "hit" else bench_miss)(module, n)


def instructions(what: str, n: int) -> int:
    """Instructions callgrind counts for a whole run of `n` requests."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, "-m", "tests.bench.callgrind", "--child", what, str(n)],
            check=True, cwd=ROOT, capture_output=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"})
        text = out.read_text()
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if found is None:
        raise SystemExit(f"callgrind wrote no instruction total to {out}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--many", type=int, default=3000)
    parser.add_argument("--few", type=int, default=1000)
    parser.add_argument("--what", choices=("hit", "miss", "both"), default="both")
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
    for what in (("hit", "miss") if args.what == "both" else (args.what,)):
        many, few = instructions(what, args.many), instructions(what, args.few)
        per = (many - few) / (args.many - args.few)
        print(f"{what}: {per:,.0f} instructions per request "
              f"({args.many:,} − {args.few:,} requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
