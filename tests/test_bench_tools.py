"""The benchmark tools themselves measure what they say (their figures are `just bench`'s).

`tests.bench.hooktime` once reported 0.0 µs over 0 hooks for a whole session, after the hook it
times changed shape; these run each diagnostic's short form through a real mitmdump and check
that it measured something, that the proxy benchmark's `--split` control really leaves the
addon loaded with its request hooks unbound, and that its pinned form leaves only the
mitmdumps on their CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx

from scenarios.procs import free_port, mitmdump_path, process
from tests.bench import ROOT, mitmdump_variants


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a benchmark module from this checkout; it must exit 0."""
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_hooktime_times_the_request_hook_of_cache_hits() -> None:
    out = bench("tests.bench.hooktime", "--seconds", "2").stdout
    hooks = int(out.split(" over ", 1)[1].split(" hooks", 1)[0].replace(",", ""))
    assert hooks > 0, out


def test_the_split_control_unbinds_the_addons_request_hooks(tmp_path: Path) -> None:
    with ExitStack() as stack:
        _, common, variants = mitmdump_variants(stack, tmp_path)
        codes = {}
        for name, extra in (("addon", variants["addon, logging off"]),
                            ("hooks off", [*variants["addon, logging off"], "-s",
                                           str(ROOT / "tests" / "bench" / "unhook.py")])):
            port = free_port()
            with process([str(mitmdump_path()), *common, "-p", str(port), *extra], port,
                         tmp_path / f"{name}.log", {"PYTHONPATH": str(ROOT)}, timeout=60):
                # no token: the filter answers 401; unbound, the request goes upstream
                codes[name] = httpx.get(f"http://127.0.0.1:{port}/",
                                        headers={"Host": "shop.example"}, timeout=10).status_code
    assert codes == {"addon": 401, "hooks off": 200}


def test_proxy_benchmark_reports_each_rounds_spread(tmp_path: Path) -> None:
    out = tmp_path / "proxy.json"
    printed = bench("tests.bench.proxy", "--concurrent", "--split", "--rounds", "2",
                    "--seconds", "1", "--out", str(out)).stdout
    got = json.loads(out.read_text())
    assert set(got["paired_ratio_spread"]) == {"empty addon", "plain, heap frozen",
                                               "addon, logging off", "addon, logging on",
                                               "addon, hooks off"}
    for name, (low, high) in got["paired_ratio_spread"].items():
        assert 0 < low <= got["paired_ratio_vs_plain"][name] <= high, name
    rates = got["rates"]
    on_over_off = sorted(on / off for on, off in zip(rates["addon, logging on"],
                                                     rates["addon, logging off"], strict=True))
    assert on_over_off[0] <= got["paired_ratio_logging_on_vs_off"] <= on_over_off[-1]
    assert f"logging on vs off {got['paired_ratio_logging_on_vs_off']:.3f}" in printed
    assert "split: the addon with its request hooks unbound" in printed
    frozen = got["paired_ratio_vs_plain_heap_frozen"]
    assert f"heap frozen as the addon freezes it: addon {frozen:.3f}" in printed
    if got["pinned"]:  # only the mitmdumps on their CPU: the shipper is the one child
        assert got["children_moved"] == {"plain": 0, "empty addon": 0, "plain, heap frozen": 0,
                                         "addon, logging off": 0, "addon, logging on": 1,
                                         "addon, hooks off": 0}


def test_dispatch_benchmark_times_each_flow_event(tmp_path: Path) -> None:
    out = tmp_path / "dispatch.json"
    done = bench("tests.bench.dispatch", "--variants", "plain,off,nostream", "--rounds", "1",
                 "--repeats", "1", "--flows", "50", "--out", str(out))
    printed = done.stdout
    got = json.loads(out.read_text())
    events = ("requestheaders", "request", "responseheaders", "response")
    # every flow of both addon variants is a forwarded cache hit (the child asserts it), and the
    # diagnostic's flows are described as hits though no filter ran for them
    assert "off: first status 0, last flow: 'wasm: hit · instance shop.example" in done.stderr
    assert "the filter ran 50 times" in done.stderr.split("nostream:")[0]
    nostream = done.stderr.split("nostream:")[1]
    assert "last flow: 'wasm: hit · instance shop.example" in nostream
    assert "the filter ran 0 times" in nostream
    for variant in ("plain", "off", "nostream"):
        per_event = got["event_us_median"][variant]
        assert tuple(per_event) == events
        assert all(us > 0 for us in per_event.values()), per_event
    assert "| request |" in printed


def test_dispatch_benchmark_measures_another_checkout_beside_this_one(tmp_path: Path) -> None:
    # `--against` runs the addon of another checkout (here: this one again) as a variant of
    # its own, so that a change is measured in alternation with the code before it
    out = tmp_path / "dispatch.json"
    done = bench("tests.bench.dispatch", "--variants", "plain", "--against", str(ROOT),
                 "--rounds", "1", "--repeats", "1", "--flows", "50", "--out", str(out))
    other = f"off@{ROOT.name}"
    assert set(json.loads(out.read_text())["event_us_median"]) == {"plain", other}
    assert "off: first status 0, last flow: 'wasm: hit" in done.stderr
    assert "the filter ran 50 times" in done.stderr
    assert f"| addon, logging off ({ROOT.name}) |" in done.stdout
    refused = subprocess.run([sys.executable, "-m", "tests.bench.dispatch", "--against",
                              str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert refused.returncode == 2
    assert "is not a checkout of this project" in refused.stderr.strip().splitlines()[-1]
