"""`python -m tests.faults [--quick] [--only ROW ...]`: run the campaign, print its table."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ..servers import ferretdb
from .harness import Progress
from .rows import ROWS, Context, Plan, Row, prepare

DELIVERY = ("poison", "poison-embedded", "outage", "sigkill")
HEADER = ["fault", "requests failed", "documents lost", "proxy kept serving", "notes"]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="the short form (CI): smaller counts and shorter faults")
    parser.add_argument("--only", action="append", choices=sorted(ROWS), metavar="ROW",
                        help=f"run only these rows (repeatable): {', '.join(ROWS)}")
    parser.add_argument("--rate", type=float, default=None,
                        help="requests/s of the load rows (default 100, quick 25)")
    parser.add_argument("--fail-on", choices=("any", "delivery"), default="any",
                        help="exit 1 when any row fails its criterion (default), or only a "
                             f"delivery row ({', '.join(DELIVERY)}: documents lost)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--keep", type=Path,
                        help="keep logs, spools and stores in this directory (default: a "
                             "temporary one, removed)")
    args = parser.parse_args(argv)
    rate = args.rate or (25.0 if args.quick else 100.0)
    if not rate > 0:
        parser.error("--rate must be positive")
    plan = Plan.short(rate) if args.quick else Plan.full(rate)
    names = args.only or list(ROWS)
    progress = Progress(len(names))
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp, ferretdb() as server:
        run_dir = args.keep or Path(tmp)
        run_dir.mkdir(parents=True, exist_ok=True)
        ctx = Context(plan, server, run_dir, progress, prepare(run_dir))
        for name in names:
            progress.start(name)
            try:
                row = ROWS[name](ctx)
            except Exception as e:  # a row that cannot run is a failed row, not a crash
                traceback.print_exc(file=sys.stderr)
                row = Row(name, "?", "?", "?", f"the row could not run: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}", False)
            rows.append(row)
            progress.say("| " + " | ".join(row.cells()) + " |", force=True)
    text = table(rows)
    print(text)
    print(f"\n{len(rows)} rows in {time.monotonic() - started:.0f} s on {os.cpu_count()} cores; "
          f"{sum(not r.ok for r in rows)} fail their criterion.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    gating = [r for n, r in zip(names, rows, strict=True)
              if args.fail_on == "any" or n in DELIVERY]
    return 0 if all(r.ok for r in gating) else 1


if __name__ == "__main__":
    sys.exit(main())
