"""`python -m scenarios har-replay FILE`: a HAR through the addon against local servers.

A HAR records requests to real sites with real tokens, so `mitmdump -C file.har` sends them to
hosts that are not here, with tokens no local auth server knows. This command instead:

1. reads the HAR as a trace (`scenarios.har.read_har`: Chrome's pseudo-headers dropped, every
   bearer token replaced by a hash label, so no recorded credential is kept or sent);
2. starts the auth server, the shop and `mitmdump` with the wasm_auth addon on 127.0.0.1
   (`scenarios.procs.local_stack`, reverse mode with `keep_host_header`), so every recorded
   host reaches the local shop and keeps its own filter instance;
3. replays the trace (`scenarios.replay`): each recorded token is logged in at the auth server
   first, so it is valid, then its requests go through the proxy in recorded order and timing
   (or `--fast`), and a recorded logout also revokes the token at the auth server;
4. reads back what the addon stored and reports the filter's decisions per instance.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scenarios.har import HarReadParams, read_har
from scenarios.procs import StartFailed, local_stack, stop
from scenarios.replay import ReplayConfig, ReplaySummary, replay
from scenarios.trace import ScenarioError

WORDS = ("hit", "miss", "logout", "deny", "error", "continue")
"""The decisions reported, in this order (others are counted under their own word)."""


@dataclass(frozen=True)
class HarReplayConfig:
    """How to replay a HAR: speed (recorded seconds per second) or fast, where state goes."""

    speed: float = 1.0
    fast: bool = False
    state: Path = Path(".wasm-reclaim/har-replay")
    filter_config: str = ""
    progress: bool = False


@dataclass
class HarReplayResult:
    """What the replay sent and what the filter decided, per instance."""

    source: str
    entries: int
    replay: ReplaySummary
    decisions: dict[str, dict[str, int]] = field(default_factory=dict)
    auth_calls: dict[str, int] = field(default_factory=dict)
    state: Path = Path()

    @property
    def ok(self) -> bool:
        """Every exchange got an answer, and no answer was a filter or proxy failure (5xx)."""
        failed = sum(n for status, n in self.replay.status.items() if status.startswith("5"))
        return self.replay.errors == 0 and failed == 0

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "entries": self.entries,
                "replay": self.replay.to_json(), "decisions": self.decisions,
                "auth_calls": self.auth_calls, "state": str(self.state), "ok": self.ok}

    def format(self) -> str:
        words = [*WORDS, *sorted({w for d in self.decisions.values() for w in d} - set(WORDS))]
        shown = [w for w in words if any(d.get(w) for d in self.decisions.values())]
        width = max([len("instance"), *(len(i) for i in self.decisions)])
        lines = [f"{self.source}: {self.entries} requests replayed through mitmdump with the "
                 f"wasm_auth addon", "",
                 f"{'instance':<{width}}  {'requests':>8}" + "".join(f"  {w:>8}" for w in shown)]
        for instance, counts in sorted(self.decisions.items()):
            lines.append(f"{instance:<{width}}  {sum(counts.values()):>8}"
                         + "".join(f"  {counts.get(w, 0):>8}" for w in shown))
        calls = ", ".join(f"{k}: {v}" for k, v in sorted(self.auth_calls.items()))
        lines += ["", f"auth calls by the filter: {sum(self.auth_calls.values())}"
                  + (f" ({calls})" if calls else ""), "", self.replay.format()]
        return "\n".join(lines)


AUTH_TIMEOUT_WALL_S = 5.0
"""The filter's auth timeout in wall-clock seconds: generous, so that a loaded machine's slow
answers are not counted as the filter's failures."""


def scaled_filter_config(text: str, speed: float,
                         wall_timeout_s: float = AUTH_TIMEOUT_WALL_S) -> str:
    """The filter's configuration with its auth timeout in wall time.

    Times in the filter's configuration are host-clock times, and the host clock runs `speed`
    times faster than the wall: an unset `timeout_ms` becomes `wall_timeout_s` of wall time.
    """
    config = json.loads(text) if text.strip() else {}
    if not isinstance(config, dict):
        raise ScenarioError("--filter-config: expected a JSON object")
    config.setdefault("timeout_ms", max(1, round(wall_timeout_s * 1000 * speed)))
    return json.dumps(config)


def har_replay(path: Path, config: HarReplayConfig) -> HarReplayResult:
    """Replay the HAR at `path` through a local stack; the decisions the addon recorded."""
    from addons.telemetry.store import close_store, open_store, read_frame

    trace = read_har(path, HarReadParams(hash_tokens=True))
    entries = sum(1 for e in trace if e.kind != "login")
    if not entries:
        raise ScenarioError(f"{path}: no entry with 'Authorization: Bearer' to replay")
    speed = 1.0 if config.fast else config.speed
    run_dir = config.state.expanduser().resolve() / time.strftime("%Y%m%d-%H%M%S")
    options = {"wasm_clock_speed": f"{speed:g}",
               "wasm_filter_config": scaled_filter_config(config.filter_config, speed)}
    print(f"har-replay: auth server, shop and mitmdump on 127.0.0.1 (logs and store in "
          f"{run_dir})", file=sys.stderr)
    with ExitStack() as stack:
        try:
            # quiet=False: the log keeps the filter's own lines (why it refused to start)
            local = local_stack(stack, run_dir, options=options, quiet=False)
        except StartFailed as e:  # nothing is replayed into a proxy that is not there
            raise ScenarioError(str(e)) from None
        summary = replay(trace, ReplayConfig(proxy=local.proxy, auth=local.auth, speed=speed,
                                             fast=config.fast, progress=config.progress))
        stop(local.proxy_process, timeout=60)  # the addon flushes; the shipper delivers
    db = open_store(local.store)
    try:
        requests = read_frame(db, "requests", {}, ["instance", "decision"])
        calls = read_frame(db, "auth_calls", {}, ["status", "outcome"])
    finally:
        close_store(db)
    decisions: dict[str, dict[str, int]] = {}
    for instance, word in zip(requests.get("instance", []), requests.get("decision", []),
                              strict=True):
        decisions.setdefault(str(instance), Counter())[str(word)] += 1
    auth_calls: Counter[str] = Counter()
    for status, outcome in zip(calls.get("status", []), calls.get("outcome", []), strict=True):
        auth_calls[str(int(status)) if status == status and status is not None
                   else str(outcome)] += 1
    return HarReplayResult(str(path), entries, summary,
                           {k: dict(v) for k, v in decisions.items()}, dict(auth_calls),
                           run_dir)


def dumps(result: HarReplayResult) -> str:
    return json.dumps(result.to_json(), indent=2)
