"""Benchmarks of the metrics path: spool in the proxy, shipper into the store (`just bench`).

Measures, with realistic `requests` documents (12 fields), on this machine:
- what logging costs the proxy process: `MetricsLog.write` on the event loop and `flush` (in
  the proxy's flush thread, still under its GIL), µs per document, flushing every 1,000
  documents (one flush a second at 1,000 requests/s);
- the shipper's throughput from a spool of ready segments into FerretDB (SPEC §9: ≥ 20,000
  documents/s into a MongoDB-protocol server), and, for reference, what FerretDB takes
  through bare `insert_many` of ready-made documents (the server's own ceiling);
- the same for `samples` documents (18 fields), which the shipper also writes again as one
  `sample_batches` document per proxy and delivery (the manager's inbox): what that costs;
- the shipper's throughput into the embedded store (`addons/telemetry/embedded.py`: SQLite,
  one `INSERT OR IGNORE` transaction per batch, with the indexes `ensure_indexes` makes), empty
  and holding many documents already (the indexes grow), and bare `insert_new` of ready
  documents into it (the store's own rate, without the spool).

FerretDB is `MONGODB_URI` if set, else one started for the run (tests/servers.py).
Results print as a Markdown table and are written to `results/bench/store.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from addons.telemetry import store as st
from addons.telemetry.shipper import Shipper
from addons.telemetry.spool import MetricsLog, ready_segments
from tests.bench import load_note
from tests.servers import ferretdb

RESULTS = Path(__file__).resolve().parents[2] / "results" / "bench" / "store.json"
TARGET_DOCS_PER_S = 20_000
SEGMENT_DOCS = 1_000


def request_doc(i: int) -> dict[str, Any]:
    """A `requests` document as the addon writes one (12 fields with the `_id`)."""
    return {"time": 1_700_000_000.0 + i / 1000, "instance": f"shop{i % 8}", "tenant": "shop",
            "generation": 3, "method": "GET", "path": f"/catalog/item/{i % 5000}",
            "decision": "allow", "hit": i % 10 != 0, "status": 200,
            "latency_ms": 0.41 + (i % 13) / 100, "pages": 529}


def sample_doc(i: int) -> dict[str, Any]:
    """A `samples` document as the addon writes one (18 fields with `proxy`, 19 with `_id`):
    1,000 instances on 3 proxies, one sample each per second."""
    instance = f"site-{i % 1000:04d}.example"
    return {"proxy": f"bench-{i % 3}:8080", "time": 1_700_000_000.0 + i // 1000,
            "instance": instance, "tenant": instance, "generation": i % 4,
            "started_at": 1_699_999_000.0 + i % 1000, "allocated_pages": 4 + i % 300,
            "allocated_bytes": (4 + i % 300) * 65536, "requests": 3 * i, "outbound": i,
            "live_entries": i % 900, "live_bytes": (i % 900) * 1024, "state": "running",
            "memory_cap_hits": 0, "hits": i % 7, "misses": i % 2, "denied": 0, "errors": 0}


DOCS: dict[str, Callable[[int], dict[str, Any]]] = {"requests": request_doc,
                                                    "samples": sample_doc}


def repeat(fn: Callable[[], dict[str, float]], runs: int, key: str) -> dict[str, Any]:
    """Run `fn` `runs` times; every run's figures, and the median/min/max of `key`."""
    values = [fn() for _ in range(runs)]
    figures = [v[key] for v in values]
    return {"median": statistics.median(figures), "min": min(figures), "max": max(figures),
            "runs": values}


def bench_proxy_cost(n: int, spool_dir: Path) -> dict[str, float]:
    """µs per document in the proxy: write() alone, flush() alone, and thread CPU in total."""
    log = MetricsLog(spool_dir)
    docs = [request_doc(i) for i in range(n)]
    write_s = flush_s = 0.0
    cpu0 = time.thread_time()
    for start in range(0, n, SEGMENT_DOCS):
        t0 = time.perf_counter()
        for doc in docs[start:start + SEGMENT_DOCS]:
            log.write("requests", doc)
        t1 = time.perf_counter()
        log.flush()
        write_s += t1 - t0
        flush_s += time.perf_counter() - t1
    cpu = time.thread_time() - cpu0
    for path in ready_segments(spool_dir):
        path.unlink()
    return {"write_us": write_s / n * 1e6, "flush_us": flush_s / n * 1e6,
            "total_us": (write_s + flush_s) / n * 1e6, "cpu_us": cpu / n * 1e6}


def fill_spool(spool_dir: Path, n: int, kind: str = "requests") -> None:
    log = MetricsLog(spool_dir)
    make = DOCS[kind]
    for i in range(n):
        log.write(kind, make(i))
        if (i + 1) % SEGMENT_DOCS == 0:
            log.flush()
    log.flush()


def bench_shipper(store: str, n: int, work: Path, server: Callable[[], float] | None = None,
                  stored: int = 0, kind: str = "requests") -> dict[str, float]:
    """Documents per second from a spool of `n` documents of collection `kind` in ready
    segments into `store` (holding `stored` documents already); with `server` (its CPU clock),
    the server's CPU µs per document too. For `samples`, the sample batches written along are
    counted in `batches` (not in the documents)."""
    database = f"bench_{uuid.uuid4().hex[:8]}"
    spool_dir = work / f"spool-{database}"
    target = store if st.is_mongo_uri(store) else str(work / f"store-{database}")
    fill_spool(spool_dir, n, kind)
    shipper = Shipper(spool_dir, target, database=database, timeout=5.0)
    try:
        st.ensure_indexes(shipper.db)  # as a running shipper has done long before
        for start in range(0, stored, 20_000):
            st.insert_new(shipper.db, "requests", [
                request_doc(i) | {"_id": f"old-{i}"} for i in range(start, start + 20_000)])
        cpu0, c0, t0 = (server() if server else 0.0), time.process_time(), time.perf_counter()
        status = shipper.run(exit_when_idle=True)
        seconds = time.perf_counter() - t0
        own_cpu = time.process_time() - c0
        server_cpu = (server() - cpu0) if server else float("nan")
        count = shipper.db[kind].count_documents({}) - stored
        if status != 0 or count != n:
            raise RuntimeError(f"the shipper stored {count} of {n} documents (exit {status})")
        batches = shipper.db[st.SAMPLE_BATCHES].count_documents({})
        if st.is_mongo_uri(store):
            shipper.db.client.drop_database(database)
    finally:
        shipper.close()
    return {"documents": n, "seconds": seconds, "docs_per_s": n / seconds,
            "shipper_cpu_us": own_cpu / n * 1e6, "server_cpu_us": server_cpu / n * 1e6,
            "batches": batches}


@contextmanager
def without_batches() -> Iterator[None]:
    """Shippers that store samples alone, without their sample batches (what the batches cost,
    by difference)."""
    real = st.insert_samples

    def samples_only(db: st.Database, docs: list[dict[str, Any]], writer: st.BatchWriter,
                     shipped_at: float) -> st.Delivery:
        return st.insert_new(db, st.SAMPLES, docs)

    st.insert_samples = samples_only  # type: ignore[assignment]
    try:
        yield
    finally:
        st.insert_samples = real  # type: ignore[assignment]


def samples_without_batches(store: str, n: int, work: Path,
                            server: Callable[[], float] | None = None) -> dict[str, float]:
    with without_batches():
        return bench_shipper(store, n, work, server, kind="samples")


def bench_bare_insert(uri: str, n: int,
                      server: Callable[[], float] | None = None) -> dict[str, float]:
    """Documents per second through bare insert_many of ready dicts (no spool, no JSON)."""
    database = f"bench_{uuid.uuid4().hex[:8]}"
    db = st.open_store(uri, database)
    try:
        st.ensure_indexes(db)
        docs = [request_doc(i) | {"_id": f"bare-{i}"} for i in range(n)]
        cpu0, t0 = (server() if server else 0.0), time.perf_counter()
        for start in range(0, n, 20_000):
            db.requests.insert_many(docs[start:start + 20_000], ordered=False)
        seconds = time.perf_counter() - t0
        server_cpu = (server() - cpu0) if server else float("nan")
        db.client.drop_database(database)
    finally:
        st.close_store(db)
    return {"documents": n, "seconds": seconds, "docs_per_s": n / seconds,
            "server_cpu_us": server_cpu / n * 1e6}


def bench_bare_embedded(work: Path, n: int) -> dict[str, float]:
    """Documents per second through `insert_new` of ready dicts into the embedded store, with
    its indexes (no spool: the store's own rate)."""
    db = st.open_store(str(work / f"bare-{uuid.uuid4().hex[:8]}"))
    try:
        st.ensure_indexes(db)
        docs = [request_doc(i) | {"_id": f"bare-{i}"} for i in range(n)]
        t0 = time.perf_counter()
        for start in range(0, n, 5_000):
            st.insert_new(db, st.REQUESTS, docs[start:start + 5_000])
        seconds = time.perf_counter() - t0
    finally:
        st.close_store(db)
    return {"documents": n, "seconds": seconds, "docs_per_s": n / seconds}


def _cpu_clock(stat: Path) -> Callable[[], float]:
    """CPU seconds (user + system) used so far by the process whose /proc stat file is `stat`."""
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    return cpu


def server_cpu(uri: str) -> Callable[[], float] | None:
    """The CPU clock of the local FerretDB listening at `uri`'s port (found by its command
    line), or None when it is not a local process we can see."""
    port = uri.rsplit(":", 1)[-1].split("/")[0]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ferretdb" in cmdline[0] and any(arg.endswith(f":{port}".encode())
                                             for arg in cmdline[1:]):
            return _cpu_clock(entry / "stat")
    return None


def cpu_us(figures: dict[str, Any], key: str) -> str:
    """The median of `key` over the runs, as "12.3 µs" (or "?" when not measured)."""
    value = statistics.median(run[key] for run in figures["runs"])
    return "?" if value != value else f"{value:.1f} µs" if value >= 10 else f"{value:.2f} µs"


def one_core(figures: dict[str, Any]) -> str:
    """The shipper's CPU per document (SQLite's work included: it runs in the shipper) and the
    rate that makes on one free core: what the wall-clock rate reaches on an idle machine."""
    cpu = statistics.median(run["shipper_cpu_us"] for run in figures["runs"])
    return f"shipper CPU {cpu:.1f} µs per document: {1e6 / cpu:,.0f}/s on one free core"


def batches(figures: dict[str, Any]) -> str:
    """The sample batches the shipper wrote in its first run."""
    return f"{figures['runs'][0]['batches']:,}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer documents (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    proxy_n = 20_000 if args.quick else 200_000
    server_n = 10_000 if args.quick else 100_000
    embedded_n = 10_000 if args.quick else 100_000
    stored_n = 20_000 if args.quick else 200_000
    runs = 2 if args.quick else 3
    print("benchmarking the metrics spool and shipper …", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp, ferretdb() as uri:
        work = Path(tmp)
        server = server_cpu(uri)
        results: dict[str, Any] = {
            "machine": {"python": platform.python_version(), "cores": os.cpu_count(),
                        "cpu": platform.processor() or platform.machine(),
                        "load_before": os.getloadavg()[0]},
            "document_fields": len(request_doc(0)) + 1,
            "proxy_us_per_doc": repeat(lambda: bench_proxy_cost(proxy_n, work / "proxy"), runs,
                                       "total_us"),
            "shipper_ferretdb": repeat(lambda: bench_shipper(uri, server_n, work, server), runs,
                                       "docs_per_s"),
            "shipper_ferretdb_samples": repeat(
                lambda: bench_shipper(uri, server_n, work, server, kind="samples"), runs,
                "docs_per_s"),
            "shipper_ferretdb_samples_alone": repeat(
                lambda: samples_without_batches(uri, server_n, work, server), runs,
                "docs_per_s"),
            "bare_insert_ferretdb": repeat(lambda: bench_bare_insert(uri, server_n, server), runs,
                                           "docs_per_s"),
            "shipper_embedded": repeat(lambda: bench_shipper("embedded", embedded_n, work), runs,
                                       "docs_per_s"),
            "shipper_embedded_samples": repeat(
                lambda: bench_shipper("embedded", embedded_n, work, kind="samples"), runs,
                "docs_per_s"),
            "shipper_embedded_samples_alone": repeat(
                lambda: samples_without_batches("embedded", embedded_n, work), runs,
                "docs_per_s"),
            "shipper_embedded_full": repeat(
                lambda: bench_shipper("embedded", embedded_n, work, stored=stored_n), runs,
                "docs_per_s"),
            "bare_insert_embedded": repeat(lambda: bench_bare_embedded(work, embedded_n), runs,
                                           "docs_per_s"),
            "embedded_stored_before": stored_n,
        }
    results["machine"]["load_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    proxy = results["proxy_us_per_doc"]
    ship_fdb = results["shipper_ferretdb"]["median"]
    ship_emb = results["shipper_embedded"]["median"]
    ship_full = results["shipper_embedded_full"]["median"]
    rows = [
        ("proxy: MetricsLog.write + flush", f"{proxy['median']:.2f} µs/document (write "
         f"{cpu_us(proxy, 'write_us')} on the event loop, flush {cpu_us(proxy, 'flush_us')} "
         "in a thread)", "", None),
        (f"shipper → FerretDB ({server_n:,} documents)", f"{ship_fdb:,.0f} documents/s "
         f"(shipper CPU {cpu_us(results['shipper_ferretdb'], 'shipper_cpu_us')}, FerretDB CPU "
         f"{cpu_us(results['shipper_ferretdb'], 'server_cpu_us')} per document)",
         f"≥ {TARGET_DOCS_PER_S:,}/s", ship_fdb >= TARGET_DOCS_PER_S),
        (f"shipper → FerretDB, `samples` documents with their batches ({server_n:,})",
         f"{results['shipper_ferretdb_samples']['median']:,.0f} documents/s (shipper CPU "
         f"{cpu_us(results['shipper_ferretdb_samples'], 'shipper_cpu_us')}, FerretDB CPU "
         f"{cpu_us(results['shipper_ferretdb_samples'], 'server_cpu_us')} per document; "
         f"{batches(results['shipper_ferretdb_samples'])} batches)",
         f"≥ {TARGET_DOCS_PER_S:,}/s", results["shipper_ferretdb_samples"]["median"]
         >= TARGET_DOCS_PER_S),
        ("… the same samples without their batches",
         f"{results['shipper_ferretdb_samples_alone']['median']:,.0f} documents/s (shipper CPU "
         f"{cpu_us(results['shipper_ferretdb_samples_alone'], 'shipper_cpu_us')}, FerretDB CPU "
         f"{cpu_us(results['shipper_ferretdb_samples_alone'], 'server_cpu_us')} per document)",
         "", None),
        ("bare insert_many → FerretDB (the server's ceiling)",
         f"{results['bare_insert_ferretdb']['median']:,.0f} documents/s (FerretDB CPU "
         f"{cpu_us(results['bare_insert_ferretdb'], 'server_cpu_us')} per document)", "", None),
        (f"shipper → embedded store ({embedded_n:,} documents)",
         f"{ship_emb:,.0f} documents/s ({one_core(results['shipper_embedded'])})",
         f"≥ {TARGET_DOCS_PER_S:,}/s", ship_emb >= TARGET_DOCS_PER_S),
        (f"shipper → embedded store, `samples` documents with their batches ({embedded_n:,})",
         f"{results['shipper_embedded_samples']['median']:,.0f} documents/s "
         f"({one_core(results['shipper_embedded_samples'])}; "
         f"{batches(results['shipper_embedded_samples'])} batches)",
         f"≥ {TARGET_DOCS_PER_S:,}/s", results["shipper_embedded_samples"]["median"]
         >= TARGET_DOCS_PER_S),
        ("… the same samples without their batches",
         f"{results['shipper_embedded_samples_alone']['median']:,.0f} documents/s "
         f"({one_core(results['shipper_embedded_samples_alone'])})", "", None),
        (f"shipper → embedded store holding {stored_n:,} documents already",
         f"{ship_full:,.0f} documents/s ({one_core(results['shipper_embedded_full'])})",
         f"≥ {TARGET_DOCS_PER_S:,}/s", ship_full >= TARGET_DOCS_PER_S),
        ("bare insert_new → embedded store (the store's own rate)",
         f"{results['bare_insert_embedded']['median']:,.0f} documents/s", "", None),
    ]
    print("| measure | result | target | met |\n|---|---|---|---|")
    for name, value, target, met in rows:
        print(f"| {name} | {value} | {target} | {'' if met is None else 'yes' if met else 'no'} |")
    machine = results["machine"]
    print("\n" + load_note(machine["load_before"], machine["load_after"]))
    print(f"\n(written to {args.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
