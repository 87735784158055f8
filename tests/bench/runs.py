"""Where one policy run of the standard set spends its time (`python -m tests.bench.runs`).

The standard set (`python -m scenarios standard`) is a dozen two-day runs per trace: the real
filter under the real host on a virtual clock, and the manager's `decide()` every 60 s. This
runs a trace of the set (default: the flash crowd) once per policy, each alone, as the set runs
them (`scenarios.experiment.run_shared`), and reports per run: its CPU time, the part spent in
the manager's passes (`decide()`, per pass), and the simulation's requests per CPU-second.

    python -m tests.bench.runs                          # flash; none, fixed:2h, ratio, adaptive
    python -m tests.bench.runs --trace tenants --policies adaptive,adaptive:mode=warm

Results print as a Markdown table and are written to `results/bench/runs.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import scenarios.experiment as experiment
from scenarios.standard import SCENARIOS, make_trace
from tests.bench import ROOT, load_note

RESULTS = ROOT / "results" / "bench" / "runs.json"


def run_one(trace: Any, spec: str, config: experiment.ExperimentConfig) -> dict[str, Any]:
    """CPU of one policy's run over `trace`, and of its manager passes."""
    spent = [0.0, 0]
    decide = experiment.decide

    def timed(*args: Any, **kwargs: Any) -> Any:
        c0 = time.process_time()
        try:
            return decide(*args, **kwargs)
        finally:
            spent[0] += time.process_time() - c0
            spent[1] += 1

    experiment.decide = timed  # the name run_shared calls
    try:
        c0 = time.process_time()
        (run,) = experiment.run_shared(trace, [spec], config)
        cpu = time.process_time() - c0
    finally:
        experiment.decide = decide
    passes = int(spent[1])
    return {"policy": spec, "cpu_s": cpu, "passes": passes, "decide_s": spent[0],
            "decide_ms_per_pass": spent[0] / passes * 1e3 if passes else None,
            "requests": run.requests, "requests_per_cpu_s": run.requests / cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default="flash", choices=sorted(SCENARIOS))
    parser.add_argument("--policies", default="none,fixed:2h,ratio,adaptive")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    scenario = SCENARIOS[args.trace]
    config = experiment.with_sample_interval(experiment.ExperimentConfig(),
                                             scenario.sample_interval)
    config = replace(config, sim=replace(config.sim,
                                         plugin_configuration=scenario.filter_config))
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as tmp:
        print(f"generating the {args.trace} trace…", file=sys.stderr)
        trace = make_trace(args.trace, False, Path(tmp))
    rows = []
    for spec in args.policies.split(","):
        print(f"running {spec}…", file=sys.stderr)
        rows.append(run_one(trace, spec, config))
    results = {"trace": args.trace, "events": len(trace), "rows": rows,
               "load_before": load_before, "load_after": os.getloadavg()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"| policy ({args.trace}, {len(trace):,} events) | CPU per run | manager passes "
          "| per pass | requests per CPU-second |\n|---|---|---|---|---|")
    for r in rows:
        per_pass = (f"{r['decide_ms_per_pass']:.2f} ms" if r["decide_ms_per_pass"] is not None
                    else "–")
        print(f"| `{r['policy']}` | {r['cpu_s']:.1f} s | {r['passes']:,} ({r['decide_s']:.1f} s) "
              f"| {per_pass} | {r['requests_per_cpu_s']:,.0f} |")
    print(load_note(load_before, results["load_after"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
