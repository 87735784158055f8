"""``python -m manager run``: the restart manager daemon (SPEC §8).

    python -m manager run --store .wasm-reclaim/store --admin http://127.0.0.1:9901 \\
        --token-file .wasm-reclaim/admin-token --policy adaptive

Many proxies: ``--admin`` repeated, or ``--proxies-from-store`` (the proxies that registered
in the store with a recent heartbeat), with ``--lease`` so that at most one manager acts.

Every option's default is shown by ``--help``: the paper's value where the paper gives one
(paper §3), otherwise our choice and the tag of its reason in manager/AMBIGUITIES.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

import httpx

from addons.telemetry.store import DATABASE, database_problem, is_mongo_uri, redact
from manager.daemon import Daemon, DaemonConfig, Endpoint
from manager.estimate import EstimatorParams
from manager.policies import (
    AdaptiveParams,
    PolicyParams,
    RatioParams,
    parse_duration,
    parse_policy,
)

logger = logging.getLogger("manager")

STATE_DIR: Final = Path(".wasm-reclaim")  # where the wasm_auth addon keeps its files
DEFAULT_STORE: Final = str(STATE_DIR / "store")
DEFAULT_TOKEN_FILE: Final = STATE_DIR / "admin-token"
DEFAULT_ADMIN: Final = "http://127.0.0.1:9901"  # the addon's wasm_admin_listen default

_EST = EstimatorParams()
_RATIO = RatioParams()
_DAEMON = DaemonConfig(store="", params=_RATIO)


class ConfigError(Exception):
    """A bad command line or an unreadable token file (exit status 2)."""


def _dur(seconds: float) -> str:
    """900 → 15m, 60 → 60s, 3600 → 1h: how the defaults appear in --help."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0 and (unit != "m" or seconds > 60):
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _database(text: str) -> str:
    """A ``--database`` value, checked by MongoDB's naming rules (the embedded store's own
    are checked with ``--store``, by :func:`build_config`)."""
    problem = database_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return value


# (flag, field of EstimatorParams, parser, help)
_ESTIMATOR_OPTIONS: Final[list[tuple[str, str, Callable[[str], Any], str]]] = [
    ("--measure", "measure_s", _duration,
     f"measurement period M: only collect for this long after an instance's first sample "
     f"(default {_dur(_EST.measure_s)}: paper §3, 1.5 × the 10-min maximum TTL; A11)"),
    ("--ttl-cap", "ttl_cap_s", _duration,
     f"cap and default of the TTL estimate (default {_dur(_EST.ttl_cap_s)}: paper §3, IBM's "
     "auth cache default)"),
    ("--ttl-resolution", "ttl_resolution_s", _duration,
     "step of the candidate TTLs (default: the median sample interval; A3)"),
    ("--ttl-min-deficit", "ttl_min_deficit_pages", _number,
     f"pages must grow this many pages less than outbound calls imply before expiry counts as "
     f"seen (default {_EST.ttl_min_deficit_pages:g}; A2)"),
    ("--min-growth", "min_growth_pages", _number,
     f"pages of growth needed to estimate k and the TTL (default {_EST.min_growth_pages:g}; "
     "A4)"),
    ("--k-default", "k_default", _number,
     f"entries per page when growth was not seen (default {_EST.k_default:g}: 1 KiB entries "
     "plus dlmalloc's header per 64 KiB page; A4)"),
    ("--class-width", "class_width_pages", _number,
     f"width of the baseline's classes in pages (default {_EST.class_width_pages:g}: paper "
     "§3, one page wide; A7)"),
    ("--trend-window", "trend_window_s", _duration,
     f"trend window L: 'required falls' and 'surplus rises' compare t with t − L (default "
     f"{_dur(_EST.trend_window_s)}; A9)"),
]
# (flag, field of RatioParams, parser, help)
_RATIO_OPTIONS: Final[list[tuple[str, str, Callable[[str], Any], str]]] = [
    ("--trend-min", "trend_min_pages", _number,
     f"required must fall by more than this many pages (default {_RATIO.trend_min_pages:g}: "
     "one page, the unit of allocation; A9)"),
    ("--trend-z", "trend_noise_z", _number,
     f"… and by more than z standard deviations of Poisson noise (default "
     f"{_RATIO.trend_noise_z:g}; 0: the page only; A9)"),
]


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line as one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line (``python -m manager --help``)."""
    parser = _Parser(
        prog="python -m manager",
        description="Restart manager for Proxy-Wasm filter instances (paper §3): reads the "
                    "samples the wasm_auth addon stores, decides with a policy, and restarts "
                    "instances through the proxy's admin endpoint.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run", help="run the daemon",
        description="Every --interval: read the new samples, decide per instance, restart\n"
                    "through the admin endpoint, and write every decision to the decisions\n"
                    "collection. Failures of the store or the admin endpoint are logged and\n"
                    "retried with backoff. A token the endpoint refuses (401) is one error\n"
                    "line; the daemon keeps running, re-reads the token file every second\n"
                    "and asks again as soon as it holds another token (else every\n"
                    "--backoff-max).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="policies (--policy):\n"
               "  adaptive              the best host-visible rule (default): restart when the\n"
               "                        surplus it frees outweighs the cache it drops; its\n"
               "                        defaults: adaptive:call_cost=900,horizon=3h,budget=0.015\n"
               "  ratio                 the paper's rule; options above or in the\n"
               "                        spec: ratio:measure=15m,ttl_cap=10m,trend_z=3\n"
               "  fixed:30m             restart when uptime ≥ 30 min\n"
               "  threshold:64MiB       restart when allocated memory ≥ 64 MiB\n"
               "  none                  never restart (decisions are still recorded)\n"
               "  oracle                ground truth (live bytes); for evaluation only\n"
               "durations: 90, 90s, 15m, 2h; sizes: 64MiB, 512KiB.\n"
               "exit status: 0; with --once, 1 if the pass could not read the store or reach\n"
               "the admin endpoint; 2 for a bad command line or token file, or a token the\n"
               "admin endpoint refuses (401).",
    )
    where = run.add_argument_group("where")
    where.add_argument(
        "--store", default=None,
        help="a mongodb:// URI, or the embedded store's directory (default: $MONGODB_URI if "
             f"set, else {DEFAULT_STORE}, the addon's default)")
    where.add_argument("--database", type=_database, default=DATABASE,
                       help="database in the store (default %(default)s; a mongodb:// URI "
                            "that names one wins)")
    admin = where.add_mutually_exclusive_group()
    admin.add_argument(
        "--admin", action="append", default=None, metavar="URL",
        help=f"a proxy's admin endpoint; repeat it for several proxies (default {DEFAULT_ADMIN}: "
             "the addon's wasm_admin_listen)")
    admin.add_argument(
        "--proxies-from-store", action="store_true",
        help="the admin endpoints of the proxies registered in the store's proxies collection "
             "with a recent heartbeat (see --heartbeat), each with its token from --token-dir "
             "or the shared --token-file/--token")
    admin.add_argument(
        "--no-admin", action="store_true",
        help="decide from the store alone, without asking the proxy (only with --dry-run)")
    token = where.add_mutually_exclusive_group()
    token.add_argument(
        "--token-file", type=Path, default=None, metavar="FILE",
        help=f"file holding the admin bearer token (default {DEFAULT_TOKEN_FILE}, the addon's "
             "wasm_admin_token_file)")
    token.add_argument("--token", default=None,
                       help="the admin bearer token itself (visible in the process list: "
                            "prefer --token-file)")
    where.add_argument(
        "--token-dir", type=Path, default=None, metavar="DIR",
        help="with --proxies-from-store: a directory with one token file per proxy, named by "
             "its proxy id (wasm_proxy_id); proxies without one use --token-file")
    where.add_argument(
        "--heartbeat", type=_duration, default=_DAEMON.heartbeat_s, metavar="DURATION",
        help=f"ignore instances whose proxy sent no heartbeat for this long (wall clock; "
             f"default {_dur(_DAEMON.heartbeat_s or 0)}; 0: do not ask for heartbeats)")
    where.add_argument(
        "--lease", type=_duration, default=None, metavar="DURATION",
        help="hold the store's manager lease for this long, renewed every pass: a second "
             "manager with --lease waits as a standby and takes over within one lease period "
             "when the first stops (default: no lease; 15s is a good value)")

    policy = run.add_argument_group("policy")
    policy.add_argument(
        "--policy", default="adaptive", metavar="SPEC",
        help="adaptive | ratio | fixed:DURATION | threshold:SIZE | none | oracle, with optional "
             ",key=value settings (default %(default)s: the best host-visible rule; ratio is "
             "the paper's)")
    policy.add_argument(
        "--retry-after", type=_duration, default=None, metavar="DURATION",
        help=f"after asking to restart a generation, ignore its samples this long (samples' "
             f"clock) before asking again (default {_dur(_RATIO.retry_after_s)}; A14)")

    ratio = run.add_argument_group(
        "ratio policy", "Settings of the paper's rule; they override the same keys in --policy. "
                        "The estimator's (--measure … --trend-window) also apply to adaptive. "
                        "Tags (A1…) refer to manager/AMBIGUITIES.md.")
    for flag, _field, parse, text in _ESTIMATOR_OPTIONS + _RATIO_OPTIONS:
        metavar = "DURATION" if parse is _duration else "N"
        ratio.add_argument(flag, type=parse, default=None, metavar=metavar, help=text)
    ratio.add_argument("--skip-fill", action="store_const", const=True, default=None,
                       help="leave the first TTL of the measurement period out of the baseline "
                            "(default: off, the paper takes the whole period; A8)")
    ratio.add_argument("--require-turn", action="store_const", const=True, default=None,
                       help="'required turned to decreasing' only at the turn, not while it "
                            "keeps falling (default: off; A9)")
    ratio.add_argument("--no-first-restart", dest="first_restart", action="store_const",
                       const=False, default=None,
                       help="evaluate the rule at the first decision after the measurement "
                            "period (default: the first decision restarts, paper §3; A13)")

    daemon = run.add_argument_group("daemon")
    daemon.add_argument(
        "--interval", type=_duration, default=_DAEMON.interval_s, metavar="DURATION",
        help=f"time between passes (default {_dur(_DAEMON.interval_s)}; the paper gives none, "
             "the addon samples every 1 s)")
    daemon.add_argument("--once", action="store_true",
                        help="run one pass, print a summary of its decisions and exit")
    daemon.add_argument("--dry-run", action="store_true",
                        help="decide and record the decisions, but restart nothing")
    daemon.add_argument(
        "--overlap", type=_duration, default=_DAEMON.overlap_s, metavar="DURATION",
        help=f"each read reaches back this far before the newest sample seen, for samples "
             f"delivered late (samples' clock; default {_dur(_DAEMON.overlap_s)}; raise it "
             "with wasm_clock_speed)")
    daemon.add_argument(
        "--backfill", type=_duration, default=None, metavar="DURATION",
        help="on the first pass read only this much history before the newest sample "
             "(default: all the store holds)")
    daemon.add_argument(
        "--forget-after", type=_duration, default=_DAEMON.forget_after_s, metavar="DURATION",
        help=f"drop the state of an instance this long after it left GET /instances (default "
             f"{_dur(_DAEMON.forget_after_s)})")
    daemon.add_argument(
        "--timeout", type=_duration, default=_DAEMON.timeout_s, metavar="DURATION",
        help=f"timeout of each admin request and of connecting to the database (default "
             f"{_dur(_DAEMON.timeout_s)})")
    daemon.add_argument(
        "--backoff-max", type=_duration, default=_DAEMON.backoff_max_s, metavar="DURATION",
        help=f"while failing, retry after 1 s, 2 s, 4 s … up to this (default "
             f"{_dur(_DAEMON.backoff_max_s)})")
    daemon.add_argument(
        "--retention", type=_duration, default=_DAEMON.retention_s, metavar="DURATION",
        help="keep this much of the manager's records (decision_batches and decisions; "
             "samples' clock, like the addon's wasm_retention), pruning older ones every "
             "tenth of it (at least every minute); with --lease only the active manager "
             "prunes (default 0: keep all)")
    daemon.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v: every pass; -vv: also HTTP requests)")
    daemon.add_argument("-q", "--quiet", action="count", default=0,
                        help="only warnings and errors")
    return parser


def read_token(path: Path) -> str:
    """The token in ``path``; ConfigError saying what to do if there is none."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(
            f"no admin token file {path}: start the proxy first (it writes its token there, "
            "see wasm_admin_token_file), or pass --token-file or --token") from None
    except OSError as e:
        raise ConfigError(f"cannot read the admin token file {path}: {e.strerror or e}") from e
    if not token:
        raise ConfigError(f"the admin token file {path} is empty")
    return token


def admin_endpoint(text: str) -> str:
    """An ``--admin`` value as a base URL (``host:port`` gets ``http://``); ConfigError, one
    line, for anything else (a comma list, a bad port, a path)."""
    value = text.strip()
    if not value:
        raise ConfigError("--admin is empty")
    if "," in value or any(c.isspace() for c in value):
        raise ConfigError(f"--admin {text!r}: one URL per --admin (repeat --admin for several "
                          "proxies)")
    if "://" not in value:
        value = f"http://{value}"
    scheme = value.partition("://")[0].lower()
    if scheme not in ("http", "https"):
        raise ConfigError(f"--admin {text!r}: expected an http:// or https:// URL")
    try:
        url = httpx.URL(value)
        port = url.port
    except (httpx.InvalidURL, ValueError) as e:
        raise ConfigError(f"--admin {text!r}: not a URL ({e})") from None
    if not url.host:
        raise ConfigError(f"--admin {text!r}: no host")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--admin {text!r}: port {port} is not between 1 and 65535")
    if url.query or url.fragment or url.path not in ("", "/"):
        raise ConfigError(f"--admin {text!r}: give the endpoint's base URL, without a path")
    return value.rstrip("/")


def policy_params(args: argparse.Namespace) -> PolicyParams:
    """``--policy`` with the ratio options and ``--retry-after`` applied. ValueError if bad."""
    params = parse_policy(args.policy)
    estimator = {name: getattr(args, flag[2:].replace("-", "_"))
                 for flag, name, _, _ in _ESTIMATOR_OPTIONS}
    ratio = {name: getattr(args, flag[2:].replace("-", "_"))
             for flag, name, _, _ in _RATIO_OPTIONS}
    estimator["baseline_skip_fill"] = args.skip_fill
    ratio["require_turn"] = args.require_turn
    ratio["first_decision_restarts"] = args.first_restart
    estimator = {k: v for k, v in estimator.items() if v is not None}
    ratio = {k: v for k, v in ratio.items() if v is not None}
    if ratio and not isinstance(params, RatioParams):
        raise ValueError(f"the ratio policy's options do not apply to --policy {args.policy}")
    if estimator and not isinstance(params, RatioParams | AdaptiveParams):
        raise ValueError(f"the estimator's options do not apply to --policy {args.policy}")
    if estimator or ratio:
        assert isinstance(params, RatioParams | AdaptiveParams)
        params = dataclasses.replace(
            params, estimator=dataclasses.replace(params.estimator, **estimator), **ratio)
    if args.retry_after is not None:
        params = dataclasses.replace(params, retry_after_s=args.retry_after)
    return params


def build_config(args: argparse.Namespace) -> DaemonConfig:
    """The daemon's configuration from parsed arguments; ConfigError if unusable."""
    try:
        params = policy_params(args)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    store = args.store or os.environ.get("MONGODB_URI") or DEFAULT_STORE
    if is_mongo_uri(store):
        from pymongo.errors import ConfigurationError, InvalidURI
        from pymongo.uri_parser import parse_uri

        try:
            named = parse_uri(store, warn=True)["database"]  # mongodb+srv:// is resolved here
        except (ConfigurationError, InvalidURI, ValueError) as e:
            raise ConfigError(f"--store {redact(store)}: {str(e).splitlines()[0]}") from None
        if named and (problem := database_problem(named)):
            raise ConfigError(f"--store {redact(store)}: database {named!r}: {problem}")
    elif problem := database_problem(args.database, embedded=True):
        raise ConfigError(f"--database {args.database!r}: {problem} (--store {store})")
    admin_url: str | None = None
    endpoints: tuple[Endpoint, ...] = ()
    token, token_file = "", None
    if args.token_dir is not None and not args.proxies_from_store:
        raise ConfigError("--token-dir goes with --proxies-from-store")
    if args.token_dir is not None and not args.token_dir.is_dir():
        raise ConfigError(f"--token-dir {args.token_dir}: not a directory")
    if args.no_admin:
        if not args.dry_run:
            raise ConfigError("--no-admin needs --dry-run: restarts go through the admin "
                              "endpoint")
    else:
        urls = [] if args.proxies_from_store else [
            admin_endpoint(a) for a in (args.admin or [DEFAULT_ADMIN])]
        if len(set(urls)) != len(urls):
            raise ConfigError("--admin: the same endpoint is given twice")
        if args.token is not None:
            token = args.token.strip()
            if not token:
                raise ConfigError("--token is empty")
        elif args.proxies_from_store and args.token_dir is not None:
            token_file = args.token_file
            token = read_token(token_file) if token_file is not None else ""
        else:
            token_file = args.token_file or DEFAULT_TOKEN_FILE
            token = read_token(token_file)
        if len(urls) == 1:
            admin_url = urls[0]
        else:
            endpoints = tuple(Endpoint(u, token, token_file) for u in urls)
    if args.lease is not None and args.lease < 3 * args.interval:
        raise ConfigError(f"--lease {args.lease:g}s: give at least three --interval "
                          f"({3 * args.interval:g}s), so that passes renew it in time")
    try:
        return DaemonConfig(
            store=store, database=args.database, params=params, policy_spec=args.policy,
            admin_url=admin_url, token=token, token_file=token_file, endpoints=endpoints,
            proxies_from_store=args.proxies_from_store, token_dir=args.token_dir,
            heartbeat_s=args.heartbeat or None, lease_s=args.lease,
            interval_s=args.interval, dry_run=args.dry_run, overlap_s=args.overlap,
            backfill_s=args.backfill, forget_after_s=args.forget_after,
            timeout_s=args.timeout, backoff_max_s=args.backoff_max,
            retention_s=args.retention,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


def configure_logging(verbosity: int) -> None:
    """-q: warnings; default: info; -v: debug (every pass); -vv: also httpx's requests."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else (
        logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("manager").setLevel(level)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbosity > 1 else logging.WARNING)


def database_used(config: DaemonConfig) -> str:
    """The database the daemon opens: the one a mongodb:// URI names wins over --database
    (`open_store`), as build_config has checked."""
    if is_mongo_uri(config.store):
        from pymongo.uri_parser import parse_uri

        with contextlib.suppress(Exception):  # checked in build_config; never fail a log line
            named = parse_uri(config.store, warn=True)["database"]
            if named:
                return str(named)
    return config.database


async def serve(config: DaemonConfig, *, once: bool) -> int:
    """Run the daemon (until SIGINT/SIGTERM) or one pass; the exit status."""
    endpoints = [e.url for e in config.all_endpoints()]
    target = ("admin endpoints from the store's proxies" if config.proxies_from_store
              else ", ".join(endpoints) or "no admin endpoint")
    logger.info("policy %s, store %s (database %s), %s%s",
                config.policy_spec or config.params.name, redact(config.store),
                database_used(config), target, ", dry run" if config.dry_run else "")
    if not is_mongo_uri(config.store) and not Path(config.store).expanduser().exists():
        logger.warning("the embedded store %s does not exist yet (the proxy creates it when it "
                       "first writes metrics; is this the proxy's wasm_store?)", config.store)
    async with Daemon(config) as daemon:
        if once:
            report = await daemon.run_pass()
            await daemon.flush(report)  # the records written behind the pass
            print(report.summary())
            if not report.ok:
                logger.error("%s", report.failure)
            # A refused token is a configuration error (2): trying again later will not help.
            return 0 if report.ok else 2 if report.unauthorized else 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Not on the main thread (or not on Unix): Ctrl-C still ends asyncio.run.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        await daemon.run(stop)
        logger.info("stopped")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m manager``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    try:
        config = build_config(args)
    except ConfigError as e:
        print(f"manager: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(config, once=args.once))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
