"""``python -m scenarios``: make, convert and inspect traffic traces.

Sub-commands are entries of :data:`COMMANDS` (name, help, arguments, run); add one there (for
example ``replay`` or ``experiment``) and it appears in ``--help``. A run function returns the
exit code. Input errors (:class:`ScenarioError`, unreadable files) print one line on stderr and
exit with 2, as do usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from scenarios.cli import count, non_negative, positive
from scenarios.cli import port as port_number
from scenarios.eclog import (
    EClogColumns,
    EClogConvertParams,
    EClogGenParams,
    Sale,
    eclog_to_trace,
    generate_eclog,
    parse_time,
    read_eclog,
    write_eclog,
)
from scenarios.procs import StartFailed
from scenarios.store_cli import database_name
from scenarios.trace import ScenarioError, Trace, default_ttl, summary

if TYPE_CHECKING:
    from scenarios.simulate import SimConfig

PROG = "python -m scenarios"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, but not the empty ones."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.required:
            return action.help
        return super()._get_help_string(action)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- basic -----------------------------------------------------------------------------------


def _basic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="trace file to write (.jsonl)")
    p.add_argument("--count", type=count, default=1024, help="users")
    p.add_argument("--interval", type=positive, default=1.0,
                   help="seconds between logins/logouts")
    p.add_argument("--host", default="shop.example", help="upstream host")
    p.add_argument("--path", default="/", help="path of the request after each login")
    p.add_argument("--logout-order", choices=("fifo", "lifo"), default="fifo")


def _basic(a: argparse.Namespace) -> int:
    from scenarios.basic import BasicParams, basic_trace

    trace = basic_trace(
        BasicParams(a.count, a.interval, a.host, a.path, logout_order=a.logout_order)
    )
    trace.write_jsonl(a.out)
    _done(a.out, f"{len(trace)} events, {trace.duration:g} s")
    return 0


# -- EClog -----------------------------------------------------------------------------------


def _columns_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--columns",
        help="CSV header names: field=Header,... or a JSON file (fields: ip user time method "
        "uri version status bytes referrer user_agent; defaults: the published EClog layout, "
        "IpId,UserId,TimeStamp,HttpMethod,Uri,HttpVersion,ResponseCode,Bytes,Referrer,UserAgent)",
    )


def _columns(a: argparse.Namespace) -> EClogColumns:
    return EClogColumns.parse(a.columns) if a.columns else EClogColumns()


def _generate_args(p: argparse.ArgumentParser) -> None:
    d = EClogGenParams()
    p.add_argument("--out", required=True, type=Path, help="CSV file to write")
    p.add_argument("--days", type=int, default=d.days)
    p.add_argument("--start", default=d.start.isoformat(), help="first day (YYYY-MM-DD)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--requests-per-hour",
        type=float,
        default=d.requests_per_hour,
        help="mean over a day, without the spike",
    )
    p.add_argument(
        "--peak-to-trough",
        type=float,
        default=d.peak_to_trough,
        help="hourly rate at the peak hour / rate at the night trough",
    )
    p.add_argument("--peak-hour", type=float, default=d.peak_hour)
    p.add_argument(
        "--session-mean",
        type=float,
        default=d.session_requests_mean,
        help="mean requests per session",
    )
    p.add_argument("--session-length", choices=("geometric", "lognormal"), default=d.session_length)
    p.add_argument(
        "--think-mean",
        type=float,
        default=d.think_time_mean,
        help="mean seconds between a session's requests",
    )
    p.add_argument(
        "--revisit",
        type=float,
        default=d.revisit_prob,
        help="probability that a session is a returning visitor's",
    )
    p.add_argument(
        "--anonymous",
        type=float,
        default=d.anonymous_share,
        help="share of visitors without a UserId",
    )
    p.add_argument("--logout-prob", type=float, default=d.logout_prob)
    p.add_argument("--spike-day", type=int, help="day of the sale spike (0: the first day)")
    p.add_argument("--spike-hour", type=float, default=d.spike_hour)
    p.add_argument(
        "--spike-users",
        type=int,
        default=d.spike_new_users,
        help="new visitors brought by the spike",
    )
    p.add_argument(
        "--spike-rise",
        type=float,
        default=d.spike_rise,
        help="seconds until the spike's login rate peaks",
    )
    p.add_argument(
        "--spike-duration",
        type=float,
        default=d.spike_duration,
        help="seconds until the spike's login rate has fallen to 1%%",
    )
    p.add_argument(
        "--sale", action="append", default=[], metavar="SPEC",
        help="a sale (repeatable; they merge): DAY[@HOUR][:SHAPE[:USERS[:DURATION[:RISE]]]], "
             "SHAPE flash (default), ramp or long-tail, e.g. 4@20:flash:3000, 1@9:ramp:2000:8h",
    )
    p.add_argument("--time-format", choices=("iso", "epoch"), default=d.time_format)
    _columns_arg(p)


def _generate(a: argparse.Namespace) -> int:
    try:
        start = date.fromisoformat(a.start)
    except ValueError:
        raise ScenarioError(f"--start: {a.start!r} is not a date (YYYY-MM-DD)") from None
    params = EClogGenParams(
        days=a.days,
        start=start,
        requests_per_hour=a.requests_per_hour,
        peak_to_trough=a.peak_to_trough,
        peak_hour=a.peak_hour,
        session_requests_mean=a.session_mean,
        session_length=a.session_length,
        think_time_mean=a.think_mean,
        revisit_prob=a.revisit,
        anonymous_share=a.anonymous,
        logout_prob=a.logout_prob,
        spike_day=a.spike_day,
        spike_hour=a.spike_hour,
        spike_new_users=a.spike_users,
        spike_rise=a.spike_rise,
        spike_duration=a.spike_duration,
        sales=tuple(Sale.parse(spec) for spec in a.sale),
        time_format=a.time_format,
        seed=a.seed,
    )
    df = generate_eclog(params, _columns(a))
    write_eclog(df, a.out, progress=_tty())
    _done(a.out, f"{len(df)} requests, {df['_session'].nunique()} sessions")
    return 0


def _window_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ttl",
        type=positive,
        default=600.0,
        help="idle seconds (log time) after which a new login starts",
    )
    p.add_argument("--start", help="keep requests at or after this time (ISO-8601 or epoch)")
    p.add_argument("--end", help="keep requests before this time (ISO-8601 or epoch)")
    p.add_argument("--host", default="shop.example", help="upstream host for relative URIs")


def _convert_params(a: argparse.Namespace, name: str) -> EClogConvertParams:
    return EClogConvertParams(
        ttl=a.ttl,
        start=parse_time(a.start) if a.start else None,
        end=parse_time(a.end) if a.end else None,
        speedup=getattr(a, "speedup", 1.0),
        host=a.host,
        logouts=getattr(a, "logouts", False),
        name=name,
    )


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("csv", type=Path, help="EClog-format CSV")
    p.add_argument("--out", required=True, type=Path, help="trace file to write (.jsonl)")
    _columns_arg(p)
    _window_args(p)
    p.add_argument(
        "--speedup",
        type=positive,
        default=1.0,
        help="divide time offsets by this factor (60: an hour becomes a minute)",
    )
    p.add_argument(
        "--logouts",
        action="store_true",
        help="turn requests to logout-looking paths into logout events",
    )
    p.add_argument("--name", help="trace name (default: the CSV file's stem)")


def _convert(a: argparse.Namespace) -> int:
    df = read_eclog(a.csv, _columns(a), progress=_tty())
    trace = eclog_to_trace(df, _convert_params(a, a.name or a.csv.stem))
    trace.write_jsonl(a.out)
    c = trace.counts()
    _done(a.out, f"{c['login']} logins, {c['request']} requests, {c['logout']} logouts")
    return 0


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("csv", type=Path, help="EClog-format CSV")
    p.add_argument("--out", required=True, type=Path, help="PNG file to write")
    _columns_arg(p)
    _window_args(p)
    p.add_argument("--bin", type=positive, default=60.0, help="seconds per rate bin")


def _plot(a: argparse.Namespace) -> int:
    from scenarios.plots import check_plot_path, plot_eclog  # matplotlib: only when plotting

    check_plot_path(a.out)
    params = _convert_params(a, a.csv.stem)
    plot_eclog(a.csv, a.out, columns=_columns(a), params=params, bin_seconds=a.bin)
    _done(a.out, "plot")
    return 0


# -- HAR -------------------------------------------------------------------------------------


def _har_write_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", type=Path, help="trace file (.jsonl)")
    p.add_argument("--out", required=True, type=Path, help="HAR file to write")
    p.add_argument(
        "--base",
        help="wall-clock time of t=0 (ISO-8601; default: the trace's start "
        "or 2019-12-01T00:00:00Z)",
    )
    p.add_argument("--scheme", choices=("http", "https"), default="http")


def _har_write(a: argparse.Namespace) -> int:
    from scenarios.har import write_har  # mitmproxy: only for HAR

    base = None
    if a.base:
        try:
            base = datetime.fromisoformat(a.base.replace("Z", "+00:00"))
        except ValueError:
            raise ScenarioError(f"--base: cannot parse {a.base!r} as ISO-8601") from None
    trace = Trace.read_jsonl(a.trace)
    n = write_har(trace, a.out, base=base, scheme=a.scheme, progress=_tty())
    _done(a.out, f"{n} entries")
    return 0


def _har_read_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("har", type=Path, help="HAR file")
    p.add_argument("--out", required=True, type=Path, help="trace file to write (.jsonl)")
    p.add_argument(
        "--missing-token",
        choices=("skip", "error"),
        default="skip",
        help="entries without 'Authorization: Bearer'",
    )
    p.add_argument(
        "--clear-tokens",
        action="store_true",
        help="keep the recorded bearer tokens in the trace (by default they are replaced by a "
        "hash: browser recordings carry real credentials)",
    )


def _har_read(a: argparse.Namespace) -> int:
    from scenarios.har import HarReadParams, read_har  # mitmproxy: only for HAR

    params = HarReadParams(a.missing_token, hash_tokens=not a.clear_tokens)
    trace = read_har(a.har, params, progress=_tty())
    trace.write_jsonl(a.out)
    c = trace.counts()
    _done(a.out, f"{c['login']} logins, {c['request']} requests, {c['logout']} logouts")
    return 0


def _har_replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("har", type=Path, help="HAR file (a browser recording, or har-write's)")
    timing = p.add_mutually_exclusive_group()
    timing.add_argument("--speed", type=positive, default=1.0,
                        help="recorded seconds per second (also the addon's wasm_clock_speed)")
    timing.add_argument("--fast", action="store_true",
                        help="as fast as possible (order per token still holds)")
    p.add_argument("--filter-config", default="", metavar="JSON",
                   help="the filter's configuration: JSON text or @path, as wasm_filter_config")
    p.add_argument("--state", type=Path, default=Path(".wasm-reclaim/har-replay"),
                   help="logs, spool and embedded stores (a new subdirectory per run)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _har_replay(a: argparse.Namespace) -> int:
    from scenarios.har_replay import HarReplayConfig, dumps, har_replay

    config = filter_config(a.filter_config)  # before any server starts, as the file below
    if not a.har.is_file():
        raise ScenarioError(f"{a.har}: no such file")
    # har_replay reads the HAR before any server starts: bad input fails there, once
    result = har_replay(a.har, HarReplayConfig(speed=a.speed, fast=a.fast, state=a.state,
                                               filter_config=config,
                                               progress=_tty()))
    print(dumps(result) if a.json else result.format())
    if not result.ok:
        print(f"{PROG} har-replay: some requests failed: see {result.state}", file=sys.stderr)
        return 1
    return 0


# -- store: read what the addon and the manager stored -------------------------------------


def _store_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                           parser_class=_Parser)

    def where(q: argparse.ArgumentParser) -> None:
        q.add_argument("--store", default=None,
                       help="mongodb://… URI or embedded-store directory (default: "
                       "$MONGODB_URI, else .wasm-reclaim/store, as the addon's wasm_store)")
        q.add_argument("--database", type=database_name, default="wasm_reclaim",
                       help="database name")
        q.add_argument("--timeout", type=positive, default=5.0,
                       help="seconds to wait for a MongoDB server")

    listing = sub.add_parser("list", help="collections and their document counts",
                             formatter_class=_Help)
    where(listing)
    export = sub.add_parser("export", help="a collection as CSV (or JSON Lines)",
                            formatter_class=_Help)
    export.add_argument("collection", help="requests, auth_calls, samples, restarts, "
                        "decisions (restart decisions), decision_batches (every decision, "
                        "one row each), users, tokens…")
    where(export)
    export.add_argument("--out", type=Path, help="file to write (default: standard output)")
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    export.add_argument("--fields", help="comma-separated fields, in this order (default: all)")
    export.add_argument("--query", default="{}",
                        help='a MongoDB query as JSON, e.g. \'{"decision": "miss"}\'')


def _store(a: argparse.Namespace) -> int:
    from pymongo.errors import ConfigurationError

    from addons.telemetry.store import redact

    store = a.store or os.environ.get("MONGODB_URI") or ".wasm-reclaim/store"
    try:
        return _store_action(a, store)
    except ConfigurationError as e:  # e.g. a mongodb+srv:// host without SRV records
        raise ScenarioError(f"{redact(store)}: {str(e).splitlines()[0]}") from None


def _store_action(a: argparse.Namespace, store: str) -> int:
    from scenarios.store_cli import export_collection, list_collections

    if a.action == "list":
        for name, n in list_collections(store, a.database, a.timeout):
            print(f"{name:<16} {n:>10}")
        return 0
    fields = [f.strip() for f in a.fields.split(",") if f.strip()] if a.fields else None
    try:
        query = json.loads(a.query)
    except json.JSONDecodeError as e:
        raise ScenarioError(f"--query: not JSON: {e.msg}") from None
    if not isinstance(query, dict):
        raise ScenarioError("--query: expected a JSON object")
    if a.out is None:
        n = export_collection(store, a.collection, sys.stdout, fmt=a.format, fields=fields,
                              query=query, database=a.database, timeout=a.timeout)
    else:
        with open(a.out, "w", encoding="utf-8", newline="") as out:
            n = export_collection(store, a.collection, out, fmt=a.format, fields=fields,
                                  query=query, database=a.database, timeout=a.timeout)
    if a.out is not None:
        _done(a.out, f"{n} documents")
    return 0


# -- info ------------------------------------------------------------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", type=Path, help="trace file (.jsonl)")
    p.add_argument(
        "--ttl",
        type=positive,
        help="trace seconds that a session without logout lingers for 'tokens within TTL' "
        "(default: the trace's TTL / speed-up when recorded, else 600)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")


def _info(a: argparse.Namespace) -> int:
    trace = Trace.read_jsonl(a.trace)
    s = summary(trace, ttl=a.ttl if a.ttl is not None else default_ttl(trace))
    if a.json:
        print(json.dumps(s, indent=2))
        return 0
    rows = [
        ("trace", s["name"]),
        (
            "events",
            f"{s['events']} (login {s['login']}, request {s['request']}, logout {s['logout']})",
        ),
        ("users", s["users"]),
        ("sessions", f"{s['sessions']} ({s['mean_requests_per_session']:.2f} requests each)"),
        ("hosts", ", ".join(s["hosts"])),
        ("start", s["start"] or "-"),
        ("duration", f"{s['duration_s']:g} s ({s['duration_s'] / 3600:.2f} h)"),
        ("peak live tokens", f"{s['peak_live_tokens']} at {s['peak_live_tokens_at_s']:g} s"),
        (f"peak tokens within {s['ttl_s']:g} s", s["peak_tokens_within_ttl"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


# -- fig4: the basic experiment through the real filter, in virtual time -------------------


def _fig4_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("results/fig4"),
                   help="directory for fig4.csv and fig4.png")
    p.add_argument("--count", type=count, default=1024, help="logins, then as many logouts")
    p.add_argument("--interval", type=positive, default=1.0, help="seconds between events")
    p.add_argument("--entry-size", type=count, default=1024, help="bytes per cache entry")
    p.add_argument("--csv", action="store_true", help="also print the series as CSV")


def _fig4(a: argparse.Namespace) -> int:
    from scenarios.fig4 import plot_fig4, run_fig4, summarize_fig4

    series = run_fig4(a.count, a.interval, a.entry_size, progress=_tty())
    a.out.mkdir(parents=True, exist_ok=True)
    series.to_csv(a.out / "fig4.csv", index=False)
    plot_fig4(series, a.out / "fig4.png", logins=a.count)
    if a.csv:
        print(series.to_csv(index=False), end="")
    print(summarize_fig4(series))
    print(f"series: {a.out / 'fig4.csv'}\nplot:   {a.out / 'fig4.png'}")
    return 0


# -- servers and live replay ----------------------------------------------------------------


def _listen_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--port", type=port_number, default=port,
                   help="TCP port (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")


def _auth_server_args(p: argparse.ArgumentParser) -> None:
    _listen_args(p, 8090)
    p.add_argument(
        "--store",
        default=".wasm-reclaim/auth-store",
        help="mongodb://… URI, or a directory for the embedded store (SQLite)",
    )
    p.add_argument("--no-store", action="store_true", help="keep users and tokens in memory only")
    p.add_argument("--database", type=database_name, default="wasm_reclaim",
                   help="database name in the store")
    p.add_argument("--latency-ms", type=non_negative, default=0.0,
                   help="delay added to every /verify")
    p.add_argument(
        "--fail-rate", type=float, default=0.0, help="share of /verify answered 503 (0..1)"
    )
    p.add_argument("--seed", type=int, help="seed of the failure injection")
    p.add_argument(
        "--token-lifetime",
        type=non_negative,
        default=86400.0,
        help="seconds a token stays valid (0: forever)",
    )


def _auth_server(a: argparse.Namespace) -> int:
    from scenarios.servers import Faults, run_auth_server, setup_logging

    setup_logging()
    return run_auth_server(
        a.port,
        None if a.no_store else a.store,
        host=a.host,
        database=a.database,
        faults=Faults(a.latency_ms, a.fail_rate),
        seed=a.seed,
        token_lifetime=a.token_lifetime or None,
    )


def _shop_args(p: argparse.ArgumentParser) -> None:
    _listen_args(p, 8082)
    p.add_argument(
        "--nginx", action="store_true", help="run nginx (if installed) instead of the Python shop"
    )


def _shop(a: argparse.Namespace) -> int:
    from scenarios.servers import run_nginx_shop, run_shop, setup_logging

    setup_logging()
    return run_nginx_shop(a.port, host=a.host) if a.nginx else run_shop(a.port, host=a.host)


def _replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", type=Path, help="trace file (.jsonl)")
    p.add_argument("--proxy", default="http://127.0.0.1:8080", help="proxy (reverse mode) URL")
    p.add_argument("--auth", default="http://127.0.0.1:8090", help="auth server URL")
    timing = p.add_mutually_exclusive_group()
    timing.add_argument(
        "--speed",
        type=positive,
        default=1.0,
        help="trace seconds per second (60: an hour in a minute)",
    )
    timing.add_argument(
        "--fast", action="store_true", help="as fast as possible (order per session still holds)"
    )
    p.add_argument("--concurrency", type=count, default=64, help="exchanges in flight at most")
    p.add_argument("--timeout", type=positive, default=10.0, help="seconds per exchange")
    p.add_argument(
        "--no-auth-logout",
        action="store_true",
        help="do not POST /logout at the auth server after a logout event",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _replay(a: argparse.Namespace) -> int:
    from scenarios.replay import ReplayConfig, dumps_summary, replay

    trace = Trace.read_jsonl(a.trace)
    config = ReplayConfig(
        proxy=a.proxy,
        auth=a.auth,
        speed=a.speed,
        fast=a.fast,
        concurrency=a.concurrency,
        timeout=a.timeout,
        auth_logout=not a.no_auth_logout,
        progress=_tty() and not a.no_progress,
    )
    result = replay(trace, config)
    print(dumps_summary(result) if a.json else result.format())
    # A denial is an answer (a trace may test them); no answer at all is the replay failing.
    answered = sum(n for status, n in result.status.items() if status.isdigit())
    if result.status and not answered:
        print(f"{PROG} replay: no request was answered (status: "
              f"{', '.join(f'{k}: {v}' for k, v in sorted(result.status.items()))}; auth "
              f"server: {', '.join(f'{k}: {v}' for k, v in sorted(result.auth_status.items()))})",
              file=sys.stderr)
        return 1
    return 0


# -- experiment: policies compared in virtual time -----------------------------------------


def split_policies(text: str) -> list[str]:
    """`none,fixed:30m,ratio:measure=15m,ttl_cap=10m` → one spec per policy.

    A comma separates policies, except before `key=value` (an option of the previous policy).
    """
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if specs and "=" in part and ":" not in part:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def checked_policies(text: str) -> list[str]:
    """`split_policies`, each spec checked before anything runs."""
    from manager.policies import parse_policy

    specs = split_policies(text)
    if not specs:
        raise ScenarioError("--policies: no policy given")
    for spec in specs:
        try:
            parse_policy(spec)
        except ValueError as e:
            raise ScenarioError(f"--policies: {e}") from None
    return specs


def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", type=Path, required=True, help="trace (JSON Lines)")
    p.add_argument("--policies",
                   default="none,fixed:30m,fixed:2h,threshold:1MiB,ratio,adaptive,oracle",
                   help="comma-separated policy specs (python -m manager run --help)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--jobs", type=count, default=None, help="processes (default: cores)")
    p.add_argument("--sample-interval", type=positive, default=5.0,
                   help="seconds between samples")
    p.add_argument("--decision-interval", type=positive, default=60.0,
                   help="seconds between manager passes")
    p.add_argument("--auth-latency", type=non_negative, default=0.005, help="auth answer delay, s")
    p.add_argument("--title", default="", help="plot and table title (default: trace name)")
    p.add_argument("--filter-config", default="", metavar="JSON",
                   help="the filter's plugin configuration: JSON text or @path, e.g. "
                        "'{\"ttl_seconds\": 300}' (default: the filter's defaults, TTL 600 s)")


def filter_config(text: str) -> str:
    """The filter's configuration from JSON text or ``@path``, checked to be a JSON object."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as e:
            raise ScenarioError(f"--filter-config: cannot read {text[1:]}: "
                                f"{e.strerror or e}") from None
    if not text.strip():
        return ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScenarioError(f"--filter-config: not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ScenarioError("--filter-config: expected a JSON object, e.g. {\"ttl_seconds\": 300}")
    return json.dumps(value)


def checked_filter_config(sim: SimConfig) -> None:
    """Start the filter once with `sim`'s plugin configuration, so that one it rejects is one
    line (with the filter's reason) before any run starts."""
    if not sim.plugin_configuration:
        return
    import logging

    from addons.proxywasm.vm import FilterStartError
    from scenarios.experiment import filter_module
    from scenarios.simulate import Simulation

    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage().split("] ", 1)[-1])  # without `[instance gen n]`

    guest = logging.getLogger("wasm_reclaim.guest")
    keep, propagate = Keep(logging.WARNING), guest.propagate
    guest.addHandler(keep)
    guest.propagate = False
    try:
        Simulation(sim, filter_module(sim.filter_path)).host.instance("probe")
    except FilterStartError as e:
        raise ScenarioError(f"--filter-config: {said[-1] if said else e}") from None
    finally:
        guest.removeHandler(keep)
        guest.propagate = propagate


def _experiment(a: argparse.Namespace) -> int:
    from scenarios.experiment import ExperimentConfig, load_trace, run_policies
    from scenarios.report import markdown_table, write_report
    from scenarios.simulate import SimConfig

    config = ExperimentConfig(sim=SimConfig(sample_interval=a.sample_interval,
                                            decision_interval=a.decision_interval,
                                            auth_latency=a.auth_latency,
                                            plugin_configuration=filter_config(a.filter_config)))
    specs = checked_policies(a.policies)
    checked_filter_config(config.sim)
    counts = load_trace(a.trace).counts()
    if not counts["request"] + counts["logout"]:  # nothing goes through the proxy
        raise ScenarioError(f"{a.trace}: the trace has no requests to replay")
    runs = run_policies(a.trace, specs, config, a.jobs, progress=_tty())
    summary = write_report(runs, config, a.out, a.title or a.trace.stem)
    print(markdown_table(summary), end="")
    print(f"written to {a.out}/")
    return 0


def _standard_args(p: argparse.ArgumentParser) -> None:
    from scenarios.standard import SCENARIOS

    p.add_argument("--out", type=Path, default=Path("results"), help="output directory")
    p.add_argument("--quick", action="store_true", help="small traces, seconds (CI)")
    p.add_argument("--jobs", type=count, default=None, help="processes (default: cores)")
    p.add_argument("--only", action="append", default=[], choices=list(SCENARIOS),
                   help="run only this scenario (repeatable; week runs only when named)")
    p.add_argument("--holdout", action="store_true",
                   help="run the held-out validation traces instead (no parameter was tuned "
                        "on them); writes robustness-holdout.md")


def _standard(a: argparse.Namespace) -> int:
    from scenarios.report import markdown_table
    from scenarios.standard import SCENARIOS, run_standard

    summaries = run_standard(a.out, a.quick, a.jobs, progress=_tty(), only=a.only,
                             holdout=a.holdout)
    for name, table in summaries.items():
        print(f"\n## {SCENARIOS[name].heading(a.quick)}\n")
        print(markdown_table(table), end="")
    robustness = a.out / ("robustness-holdout.md" if a.holdout else "robustness.md")
    if robustness.exists():
        print(f"\n## Robustness\n\n{robustness.read_text()}", end="")
    print(f"\nwritten to {a.out}/")
    return 0


# -- demo: the basic experiment through a real proxy ----------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("results/demo"), help="series and plot")
    p.add_argument("--state", type=Path, default=Path(".wasm-reclaim/demo"),
                   help="logs, spool and embedded stores (a new subdirectory per run)")
    p.add_argument("--count", type=count, default=1024, help="logins, then as many logouts")
    p.add_argument("--speed", type=positive, default=60.0,
                   help="wasm_clock_speed and replay speed")


def _demo(a: argparse.Namespace) -> int:
    from scenarios.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=a.out, state=a.state, count=a.count, speed=a.speed))
    return 0


# -- live: a policy through the real proxy, compared with its simulation --------------------


def _live_args(p: argparse.ArgumentParser) -> None:
    from scenarios.live import live_arguments

    live_arguments(p)


def _live(a: argparse.Namespace) -> int:
    from scenarios.live import live_command

    return live_command(a)


# -- wiring ----------------------------------------------------------------------------------

COMMANDS: list[Command] = [
    Command(
        "basic", "the basic experiment (paper Fig. 4): logins, then logouts", _basic_args, _basic
    ),
    Command(
        "eclog-generate",
        "generate EClog-format CSV (daily cycle, sessions, sale spike)",
        _generate_args,
        _generate,
    ),
    Command("eclog-convert", "EClog CSV → trace", _convert_args, _convert),
    Command(
        "eclog-plot",
        "plot an EClog CSV: requests per minute and active tokens (PNG)",
        _plot_args,
        _plot,
    ),
    Command("har-write", "trace → HAR 1.2", _har_write_args, _har_write),
    Command("har-read", "HAR recording → trace", _har_read_args, _har_read),
    Command("har-replay", "replay a HAR through the addon against local servers; report the "
            "decisions", _har_replay_args, _har_replay),
    Command("info", "summary of a trace: events, users, duration, peak tokens", _info_args, _info),
    Command("demo", "the basic experiment through a real mitmdump with the addon (~1 min)",
            _demo_args, _demo),
    Command("experiment", "compare restart policies on a trace in virtual time",
            _experiment_args, _experiment),
    Command("standard", "the standard experiment set: every README figure and table",
            _standard_args, _standard),
    Command(
        "fig4",
        "run the basic experiment through the real filter in virtual time: CSV and plot",
        _fig4_args,
        _fig4,
    ),
    Command(
        "auth-server",
        "the auth server: /login, /verify, /logout, /stats (users and tokens in the store)",
        _auth_server_args,
        _auth_server,
    ),
    Command("shop", "the upstream shop: any GET → a product page (Python, or --nginx)",
            _shop_args, _shop),
    Command(
        "replay",
        "replay a trace live through the proxy, with real tokens from the auth server",
        _replay_args,
        _replay,
    ),
    Command("live", "a policy through the real proxy and daemon, compared with its simulation",
            _live_args, _live),
    Command("store", "read the store: list its collections, export one as CSV", _store_args,
            _store),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Make, convert and inspect wasm-reclaim traces.")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for c in COMMANDS:
        sub_parser = sub.add_parser(
            c.name,
            help=c.help,
            description=c.help,
            formatter_class=_Help,
        )
        c.arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = {c.name: c.run for c in COMMANDS}[args.command]
    try:
        return run(args)
    except (ScenarioError, StartFailed) as e:  # StartFailed: a server it needs did not start
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
    except BrokenPipeError:
        return _reader_went_away()
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG} {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    return 2


def _reader_went_away() -> int:
    """stdout's reader closed the pipe (`… | head`): stop quietly, as Unix tools do.

    stdout is pointed at /dev/null so that the interpreter's last flush does not fail again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


def _tty() -> bool:
    return sys.stderr.isatty()


def _done(path: Path, what: str) -> None:
    print(f"wrote {path} ({what})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
