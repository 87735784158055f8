"""The addon's cost per cache-hit flow inside mitmproxy, without the network (`just bench`).

`python -m tests.bench.proxy` measures what a client sees, but on a 2-core machine that the
load generator, the upstream and other work share, its rounds vary by ±10 %: more than the
addon's whole cost. This benchmark takes the network out. Each variant runs in its own process:
a real mitmproxy `DumpMaster` (mitmdump's addons, `-q`, no proxy server), `plain`, with
`-s tests/bench/empty_addon.py` (the control: the same hooks doing nothing), or with
`-s addons/wasm_auth.py` (`wasm_log_metrics=false`, or logging to a spool); flows go through
mitmproxy's own hook dispatch (`AddonManager.handle_lifecycle`: `requestheaders`, `request`,
`responseheaders`, `response`, each followed by `update`), as the proxy server hands them over.
Every flow is a cache hit (the token was verified once against the real auth server). The CPU
time per flow of each variant is reported, and the addon's extra cost (its median minus
plain's). Variants alternate over rounds so that drift hits all alike. `--against CHECKOUT`
adds the addon of another checkout (another commit) as a variant of its own: a change's effect,
measured in alternation with the code before it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tests.bench import ROOT, addon_script, auth_server, load_note

RESULTS = ROOT / "results" / "bench" / "dispatch.json"
TOKEN_ENV = "WASM_RECLAIM_BENCH_TOKEN"
"""How the bench user's token reaches a variant's process: its environment, never its argv."""
VARIANTS = {"plain": "plain", "empty": "empty addon", "off": "addon, logging off",
            "on": "addon, logging on", "nostream": "addon, no filter call"}
DEFAULT_VARIANTS = ("plain", "empty", "off", "on")
"""`nostream`, a diagnostic, only when asked for (`--variants plain,off,nostream`)."""


def stub_streams() -> None:
    """Have every stream decide a cache hit at once without the host or the filter: its
    request headers return a forwarded hit's decision and its close does nothing. The addon's
    own part of the hook (reading the request, the instance, the decision's record and flow
    comment) is left, so that against `off` this shows what the host layer and the filter cost
    a hit inside mitmproxy. A diagnostic, never a configuration."""
    from addons.proxywasm.host import Decision, Stream

    hit = Decision("continue", [], None, 0, 0)

    def request_headers(self: Stream, headers: object, end_of_stream: bool = True,
                        lowered: bool = False) -> Decision:
        return hit

    def close(self: Stream) -> None:
        return None

    Stream.request_headers = request_headers  # type: ignore[method-assign,assignment]
    Stream.close = close  # type: ignore[method-assign]


def flow(token: str, body: bytes) -> Any:
    """A reverse-proxied GET with its upstream's 200 answer ready to attach."""
    from mitmproxy import http
    from mitmproxy.test import tflow

    request = http.Request.make("GET", "http://shop.example/", b"", {
        "host": "shop.example", "authorization": f"Bearer {token}",
        "user-agent": "bench", "accept": "*/*"})
    f = tflow.tflow(req=request)
    response = http.Response.make(200, body, {"content-type": "text/html",
                                              "server": "nginx"})
    return f, response


async def child(variant: str, auth_url: str, token: str, flows: int, repeats: int,
                tmp: Path) -> dict[str, Any]:
    """Run in the variant's process: CPU µs per flow, `repeats` times."""
    from mitmproxy import options
    from mitmproxy.proxy.layers.http import (
        HttpRequestHeadersHook,
        HttpRequestHook,
        HttpResponseHeadersHook,
        HttpResponseHook,
    )
    from mitmproxy.tools.dump import DumpMaster

    opts = options.Options()
    master = DumpMaster(opts, loop=asyncio.get_running_loop())
    opts.update(server=False, mode=["reverse:http://127.0.0.1:8000"], keep_host_header=True,
                flow_detail=0, termlog_verbosity="error")
    async def load_script(path: Path, loaded: Callable[[], bool]) -> None:
        """Load a script (from mitmproxy's watcher task) and wait until `loaded()`."""
        opts.update(scripts=[str(path)])
        for _ in range(200):
            await asyncio.sleep(0.01)
            if loaded():
                return
        raise RuntimeError(f"{path.name} did not load")

    if variant == "empty":  # the control: a script with the same hooks, doing nothing
        await load_script(ROOT / "tests" / "bench" / "empty_addon.py",
                          lambda: master.addons.get("emptyaddon") is not None)
    elif variant != "plain":
        settings = {"wasm_cluster": [f"auth={auth_url}"], "wasm_admin_listen": ""}
        if variant in ("off", "nostream"):
            settings["wasm_log_metrics"] = False
        else:
            settings |= {"wasm_store": str(tmp / "store"), "wasm_spool": str(tmp / "spool")}
        await load_script(ROOT / "addons" / "wasm_auth.py", lambda: "wasm_cluster" in opts)
        opts.update(**settings)
    from mitmproxy import hooks

    await master.addons.trigger_event(hooks.RunningHook())
    body = b"x" * 1024
    lifecycle = master.addons.handle_lifecycle

    last: list[Any] = []
    events = ("requestheaders", "request", "responseheaders", "response")
    # CPU per event, its hooks and `update` included, on this thread's clock: the process's
    # advances only at the kernel's tick (4 ms here) while a CPU-time timer is armed, as the
    # addon's epoch ticker's is, which is longer than an event.
    event_ns = [0] * len(events)
    clock = time.thread_time_ns

    async def one() -> int:
        f, response = flow(token, body)
        last[:] = [f]
        t0 = clock()
        await lifecycle(HttpRequestHeadersHook(f))
        t1 = clock()
        await lifecycle(HttpRequestHook(f))
        t2 = clock()
        status = f.response.status_code if f.response is not None else 0
        if f.response is None:
            f.response = response
        t3 = clock()
        await lifecycle(HttpResponseHeadersHook(f))
        t4 = clock()
        await lifecycle(HttpResponseHook(f))
        t5 = clock()
        event_ns[0] += t1 - t0
        event_ns[1] += t2 - t1
        event_ns[2] += t4 - t3
        event_ns[3] += t5 - t4
        return status

    first = await one()  # verifies the token (a miss) for the addon
    for _ in range(200):
        assert await one() == 0, "every flow must be forwarded (a cache hit)"
    if variant == "nostream":  # after the first generation has started and verified the token
        stub_streams()

    def filter_requests() -> int | None:
        """How many requests the addon's filter instances have run (None: no addon)."""
        script = addon_script(master.addons.chain)
        if script is None:
            return None
        host = script.request.__self__.host
        return sum(o.requests for o in host.observe())

    ran_before = filter_requests()
    results = []
    per_event: list[dict[str, float]] = []
    for _ in range(repeats):
        event_ns[:] = [0] * len(events)
        c0 = time.process_time()
        for _ in range(flows):
            await one()
        results.append((time.process_time() - c0) / flows * 1e6)
        per_event.append({e: ns / flows / 1e3 for e, ns in zip(events, event_ns, strict=True)})
        await asyncio.sleep(0.05)  # let the addon's own loops run between repeats, as live
    ran = filter_requests()
    await master.addons.trigger_event(hooks.DoneHook())
    return {"cpu_us": results, "event_us": per_event, "first_status": first,
            "comment": last[0].comment,
            "filter_ran": None if ran is None or ran_before is None else ran - ran_before}


def run_variant(variant: str, auth_url: str, token: str, flows: int, repeats: int,
                root: Path = ROOT) -> tuple[list[float], list[dict[str, float]]]:
    """The variant's CPU µs per flow and per event of a flow, one of each per repeat, with the
    code of the checkout at `root`."""
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        out = subprocess.run(
            [sys.executable, "-m", "tests.bench.dispatch", "--child", variant, f"--auth={auth_url}",
             "--flows", str(flows), "--repeats", str(repeats), "--tmp", tmp],
            capture_output=True, text=True, check=False, cwd=root,
            env={**os.environ, "PYTHONPATH": str(root), TOKEN_ENV: token})
    if out.returncode != 0:
        raise RuntimeError(f"{variant}: {out.stderr.strip()[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ran = "" if got["filter_ran"] is None else f", the filter ran {got['filter_ran']} times"
    print(f"{variant}: first status {got['first_status']}, last flow: {got['comment']!r}{ran}",
          file=sys.stderr)
    return list(got["cpu_us"]), list(got["event_us"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=2000, help="per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="plain (no addon), empty (a script addon whose hooks do nothing), "
                             "off (addon, logging off), on (logging on); and, only when "
                             "named, nostream (the addon with its streams decided at once "
                             "without the host or the filter: a diagnostic)")
    parser.add_argument("--against", type=Path, default=None, metavar="CHECKOUT",
                        help="another checkout of this project, its extension built (`git "
                             "worktree add DIR COMMIT && (cd DIR && bash .ci/setup)`): its "
                             "`off` variant runs beside these, as `off@CHECKOUT`, to measure "
                             "a change")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--auth", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        got = asyncio.run(child(args.child, args.auth, os.environ[TOKEN_ENV], args.flows, args.repeats,
                                args.tmp))
        print(json.dumps(got))
        return 0
    variants = [v.strip() for v in args.variants.split(",")]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown {v!r} (known: {', '.join(VARIANTS)})")
    labels = {v: VARIANTS[v] for v in variants}
    roots = dict.fromkeys(variants, ROOT)
    if args.against is not None:
        if not (args.against / "addons" / "wasm_auth.py").is_file():
            parser.error(f"--against: {args.against} is not a checkout of this project")
        other = f"off@{args.against.name}"
        variants.append(other)
        labels[other] = f"{VARIANTS['off']} ({args.against.name})"
        roots[other] = args.against.resolve()
    load_before = os.getloadavg()[0]
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    event_us: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp, ExitStack() as stack:
        auth_url, token = auth_server(stack, Path(tmp))
        for r in range(args.rounds):  # each round starts with the next variant
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                values, events = run_variant(v.split("@")[0], auth_url, token, args.flows,
                                             args.repeats, roots[v])
                cpu[v] += values
                event_us[v] += events
                print(f"round {r + 1}: {labels[v]:<20} {statistics.median(values):7.1f} µs CPU/flow "
                      f"(min {min(values):.1f})", file=sys.stderr)
    median = {v: statistics.median(x) for v, x in cpu.items()}
    low = {v: min(x) for v, x in cpu.items()}
    names = list(event_us[variants[0]][0])
    per_event = {v: {e: statistics.median(r[e] for r in rows) for e in names}
                 for v, rows in event_us.items()}
    results: dict[str, Any] = {"flows": args.flows, "repeats": args.repeats,
                               "rounds": args.rounds, "cpu_us": cpu, "median": median,
                               "min": low, "event_us_median": per_event,
                               "load_before": load_before,
                               "load_after": os.getloadavg()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| variant (in-process, cache hits) | CPU per flow, median (min) | added to plain |\n"
          "|---|---|---|")
    for v in variants:
        added = (f"{median[v] - median['plain']:+.1f} µs ({low[v] - low['plain']:+.1f})"
                 if "plain" in median and v != "plain" else "")
        print(f"| {labels[v]} | {median[v]:.1f} µs ({low[v]:.1f}) | {added} |")
    # Where the difference lands: mitmproxy's dispatch of each event to every addon (and the
    # `update` event after it), with the variant's hooks for that event.
    print("\n| event (CPU of the thread per flow, median) | " + " | ".join(labels[v] for v in variants)
          + " |\n|---|" + "---|" * len(variants))
    for e in names:
        cells = [f"{per_event[v][e]:.1f} µs" + (
            f" ({per_event[v][e] - per_event['plain'][e]:+.1f})"
            if "plain" in per_event and v != "plain" else "") for v in variants]
        print(f"| {e} | " + " | ".join(cells) + " |")
    print("\n" + load_note(load_before, results["load_after"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
