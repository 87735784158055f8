"""The documents of the store: one schema and one builder for each, shared by every writer.

The live addon (`addons/wasm_auth.py`), the simulation (`scenarios/simulate.py`) and the
manager (`manager/daemon.py`) build their documents here, so a live run and a simulated run of
the same trace produce documents of the same shape (`tests/test_records.py` checks it field by
field on a real mitmdump).

Collection    written by            one document per
-----------   -------------------   -----------------------------------------------------------
samples       addon, simulation     instance and sampling round (every wasm_sample_interval,
                                    and whenever allocated memory changes)
requests      addon, simulation     request the proxy received
auth_calls    addon, simulation     outbound call of a filter instance to the auth server
restarts      addon, simulation     restart of an instance
decisions     manager               restart decision of the manager, with what it did about it
decision_batches manager            pass of the manager: every decision of the pass (keeps
                                    too), the same fields as `decisions`, column by column
proxies       addon                 proxy: its admin URL and a heartbeat (never a token)
leases        manager               named lease: which manager is active, until when
sample_batches shipper              proxy and delivery of samples: the same samples again,
                                    column by column (the manager's inbox, kept a minute)

Every document carries `proxy` (the `wasm_proxy_id` option: by default host name and listen
port). An instance is identified by (proxy, instance) everywhere.

Times: `time` is the proxy's host clock (seconds since the epoch; scaled by `wasm_clock_speed`
in demos), `heartbeat`, `expires` and `decided_at` are wall time.

Words of `requests.decision` (what the filter did):
`hit` (authorized from the cache), `miss` (authorized after an auth call), `deny` (a local
401/403), `error` (the filter failed, or answered 5xx), `respond` (another local response),
`reset` (the filter asked to reset the stream: the connection is closed), `continue` (no bearer
token; the filter let the request through), `fail_open` (forwarded without an answer: the
filter failed and `wasm_fail_open` let it through, or none of its auth calls got an answer and
the filter's own fail-open did), `logout` (a logout the filter handled; the simulation's, which
knows the trace's logouts), `refused` (no filter instance may take it: a bad Host, beyond the
instance bounds; `instance` is None).
"""

from __future__ import annotations

import hashlib
import json
import socket
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson

if TYPE_CHECKING:
    from addons.proxywasm import AuthCallRecord, Decision, Observation, RestartRecord

# ---- samples -------------------------------------------------------------------------------

SAMPLE_FIELDS: Final = (
    "proxy", "time", "instance", "tenant", "generation", "started_at", "allocated_pages",
    "allocated_bytes", "requests", "outbound", "live_entries", "live_bytes", "state",
    "memory_cap_hits", "refetch_interval_s", "hits", "misses", "denied", "errors",
)
"""A sample: what the host observes of an instance (allocated memory, requests and outbound
calls of the current generation: the paper's three metrics), the filter's ground truth
(`live_entries`, `live_bytes`: None when the filter does not report them), how often the
generation hit the memory cap (`memory_cap_hits`), how long after a 2xx answer the generation
repeats an identical outbound call (`refetch_interval_s`, a low quantile: its cache's TTL as the
host sees it; None until it has repeated enough, `addons.proxywasm.refetch`) and what the filter
decided since the previous sample of the instance (`hits`, `misses`, `denied`, `errors`)."""

LIVE_ENTRIES: Final = "auth_cache.live_entries"  # the filter's metrics holding ground truth
LIVE_BYTES: Final = "auth_cache.live_bytes"

#: Slots of the per-instance decision counts carried by samples, by decision word.
COUNTED: Final = {"hit": 0, "miss": 1, "deny": 2, "error": 3}
NO_COUNTS: Final = (0, 0, 0, 0)


def sample_row(proxy: str, time: float, o: Observation,
               counts: tuple[int, int, int, int] | list[int] = NO_COUNTS) -> tuple[Any, ...]:
    """A sample as a tuple in `SAMPLE_FIELDS` order (the simulation's fast path)."""
    metrics = o.metrics
    return (proxy, time, o.id, o.tenant, o.generation, o.started_at, o.allocated_pages,
            o.allocated_bytes, o.requests, o.outbound, metrics.get(LIVE_ENTRIES),
            metrics.get(LIVE_BYTES), o.state, o.memory_cap_hits, o.refetch_interval_s, *counts)


def sample(proxy: str, time: float, o: Observation,
           counts: tuple[int, int, int, int] | list[int] = NO_COUNTS) -> dict[str, Any]:
    """A `samples` document."""
    return dict(zip(SAMPLE_FIELDS, sample_row(proxy, time, o, counts), strict=True))


# ---- requests ------------------------------------------------------------------------------

REQUEST_FIELDS: Final = (
    "proxy", "time", "instance", "tenant", "generation", "method", "path", "decision",
    "status", "outbound", "latency_ms", "token_hash",
)
"""A request: the filter's decision (a word, see the module's docstring), the status the client
got (the local response's, or the upstream's when forwarded; the simulation's upstream answers
200), the outbound calls it made, the filter's latency (ms, wall clock; 0 in the simulation,
whose clock is virtual) and the token's hash."""


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The bearer token of an Authorization value, or None (no header, another scheme, empty)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


def token_hash(authorization: bytes | None) -> str | None:
    """The SHA-256 (64 hex digits) of the bearer token of an Authorization value, or None.

    The same hash as the auth server's `tokens.hash`, so the two join; tokens are never stored
    or logged in clear.
    """
    token = bearer_token(authorization)
    return None if token is None else hashlib.sha256(token).hexdigest()


def verdict(decision: Decision, has_token: bool, *, logout: bool = False) -> str:
    """One word for what the filter did (see the module's docstring)."""
    if decision.error is not None:
        return "fail_open" if decision.action == "continue" else "error"
    if decision.action == "reset":
        return "reset"
    if decision.action == "respond":
        status = decision.response.status if decision.response else 0
        return "deny" if status in (401, 403) else "error" if status >= 500 else "respond"
    if decision.action == "continue" and decision.outbound and (
            decision.failed_calls >= decision.outbound):
        return "fail_open"  # forwarded although no auth call got an answer
    if not has_token:
        return "continue"
    if logout:
        return "logout"
    return "miss" if decision.outbound else "hit"


def request_row(proxy: str, time: float, instance: str, tenant: str, decision: Decision,
                word: str, method: str, path: str, latency_ms: float, hashed: str | None,
                forwarded_status: int | None = None) -> tuple[Any, ...]:
    """A request as a tuple in `REQUEST_FIELDS` order; `forwarded_status` is the upstream's
    answer to a forwarded request (None while it is not known)."""
    return (proxy, time, instance, tenant, decision.generation, method, path, word,
            decision.response.status if decision.response is not None else forwarded_status,
            decision.outbound, round(latency_ms, 3), hashed)


def refused(proxy: str, time: float, method: str, path: str, status: int) -> dict[str, Any]:
    """A `requests` document for a request no filter instance could take."""
    return {"proxy": proxy, "time": time, "instance": None, "tenant": None, "generation": None,
            "method": method, "path": path, "decision": "refused", "status": status,
            "outbound": 0, "latency_ms": 0.0, "token_hash": None}


def request(proxy: str, time: float, instance: str, tenant: str, decision: Decision,
            word: str, method: str, path: str, latency_ms: float,
            hashed: str | None) -> dict[str, Any]:
    """A `requests` document."""
    return dict(zip(REQUEST_FIELDS, request_row(proxy, time, instance, tenant, decision, word,
                                                method, path, latency_ms, hashed), strict=True))


# ---- auth calls and restarts ----------------------------------------------------------------

AUTH_CALL_FIELDS: Final = (
    "proxy", "instance", "tenant", "generation", "time", "cluster", "path", "status",
    "outcome", "latency_ms",
)
"""An outbound call: `status` None when it failed, timed out or was cancelled; `outcome` ok,
timeout, error or cancelled (its stream's client left); `latency_ms` on the host clock."""


def auth_call(proxy: str, record: AuthCallRecord) -> dict[str, Any]:
    """An `auth_calls` document."""
    return {"proxy": proxy, "instance": record.instance, "tenant": record.tenant,
            "generation": record.generation, "time": record.time, "cluster": record.cluster,
            "path": record.path, "status": record.status, "outcome": record.outcome,
            "latency_ms": round(record.latency_s * 1000, 3)}


RESTART_FIELDS: Final = (
    "proxy", "instance", "tenant", "time", "reason", "requested_by", "generation_before",
    "generation", "allocated_bytes_before", "allocated_bytes_after", "duration_ms", "mode",
    "fallback", "replayed",
)
"""A restart: who asked and why, generations and allocated bytes before and after,
`duration_ms` of wall time to start the new generation, `mode` (warm or cold), `fallback` (why
a warm restart ran cold) and `replayed` (journaled requests replayed, warm only)."""


def restart(proxy: str, record: RestartRecord) -> dict[str, Any]:
    """A `restarts` document."""
    return {"proxy": proxy, "instance": record.instance, "tenant": record.tenant,
            "time": record.time, "reason": record.reason, "requested_by": record.requested_by,
            "generation_before": record.generation_before, "generation": record.generation,
            "allocated_bytes_before": record.allocated_bytes_before,
            "allocated_bytes_after": record.allocated_bytes_after,
            "duration_ms": round(record.duration_s * 1000, 3), "mode": record.mode,
            "fallback": record.fallback, "replayed": record.replayed}


# ---- decisions -----------------------------------------------------------------------------

DECISION_OUTCOMES: Final = (
    "keep",              # the policy said keep
    "restarted",         # restarted through the admin endpoint
    "dry-run",           # a restart decision under --dry-run: nothing done
    "stale",             # the decision's generation is no longer the instance's current one
    "already-applied",   # this (proxy, instance, generation) was restarted before
    "unknown-instance",  # the proxy does not serve this instance (GET /instances)
    "no-heartbeat",      # the instance's proxy sent no recent heartbeat: not restarted
    "in-doubt",          # the restart request's answer was lost; the next listing tells
    "failed",            # the restart request failed (see `detail`)
)


PAGE_FIGURES: Final = ("required", "surplus", "baseline", "true_required", "true_surplus")
"""The decision figures in pages (``<name>_pages``) that a record also gives in bytes
(``<name>_bytes``)."""


def decision_columns(proxies: Sequence[str], fields: Mapping[str, Sequence[Any]],
                     page_bytes: Sequence[int], *, record_ids: Sequence[str],
                     decided_at: float, policy_spec: str, requested_by: str, dry_run: bool,
                     outcomes: Sequence[str], details: Sequence[str | None],
                     admin_results: Sequence[Mapping[str, Any] | None]) -> dict[str, list[Any]]:
    """`decisions` documents column by column (`{field: [value, ...]}`, one value per
    decision), the one builder of their schema: the policy's decisions (`fields`: the fields
    of `manager.policies.Decision` as columns, `instance` the proxy's instance name) with the
    byte counterparts of their page figures, and what the manager did about each.

    `now` is decide()'s time (the samples' clock, the Decision's `decided_at`), `decided_at`
    wall time; `applied` whether the outcome is `restarted`.
    """
    n = len(record_ids)
    columns: dict[str, list[Any]] = {"_id": list(record_ids), "proxy": list(proxies)}
    columns.update((name, list(values)) for name, values in fields.items())
    for name in PAGE_FIGURES:
        pages = columns.get(f"{name}_pages")
        if pages is not None:
            columns[f"{name}_bytes"] = [None if p is None else p * b
                                        for p, b in zip(pages, page_bytes, strict=True)]
    columns["now"] = columns.get("decided_at", [None] * n)
    columns["decided_at"] = [decided_at] * n
    columns["policy_spec"] = [policy_spec] * n
    columns["requested_by"] = [requested_by] * n
    columns["dry_run"] = [dry_run] * n
    columns["applied"] = [o == "restarted" for o in outcomes]
    columns["outcome"] = list(outcomes)
    columns["detail"] = list(details)
    columns["admin_result"] = [None if a is None else dict(a) for a in admin_results]
    return columns


def rows(columns: Mapping[str, Sequence[Any]],
         indices: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """Documents from columns (`{field: [value, ...]}`): those at `indices`, or all."""
    names = list(columns)
    if indices is None:
        return [dict(zip(names, row, strict=True))
                for row in zip(*(columns[f] for f in names), strict=True)]
    return [{f: columns[f][i] for f in names} for i in indices]


def decision(proxy: str, fields: Mapping[str, Any], page_bytes: int, *, record_id: str,
             decided_at: float, policy_spec: str, requested_by: str, dry_run: bool,
             outcome: str, detail: str | None,
             admin_result: Mapping[str, Any] | None) -> dict[str, Any]:
    """A `decisions` document: `decision_columns` for one decision."""
    [record] = rows(decision_columns(
        [proxy], {name: [value] for name, value in fields.items()}, [page_bytes],
        record_ids=[record_id], decided_at=decided_at, policy_spec=policy_spec,
        requested_by=requested_by, dry_run=dry_run, outcomes=[outcome], details=[detail],
        admin_results=[admin_result]))
    return record


# ---- proxies and leases --------------------------------------------------------------------

PROXY_FIELDS: Final = ("_id", "proxy", "admin_url", "heartbeat", "started_at", "pid",
                       "hostname", "instances")
"""A proxy's registration, replaced at every heartbeat: `_id` is the proxy id; `admin_url`
None when its admin endpoint is off; `heartbeat` and `started_at` wall time; `instances` how
many it serves. Never a token."""


def default_proxy_id(listen_port: int | None) -> str:
    """`wasm_proxy_id`'s default: the host name and the proxy's listen port."""
    return f"{socket.gethostname()}:{listen_port if listen_port is not None else 8080}"


def proxy(proxy_id: str, admin_url: str | None, heartbeat: float, started_at: float, pid: int,
          instances: int) -> dict[str, Any]:
    """A `proxies` document (upserted by `_id`)."""
    return {"_id": proxy_id, "proxy": proxy_id, "admin_url": admin_url, "heartbeat": heartbeat,
            "started_at": started_at, "pid": pid, "hostname": socket.gethostname(),
            "instances": instances}


LEASE_FIELDS: Final = ("_id", "holder", "expires", "acquired_at", "renewed_at")
"""A lease: `_id` its name (`manager` for the active manager), `holder` who holds it
(host name, pid and a random part), `expires` wall time."""


def lease(name: str, holder: str, expires: float, acquired_at: float,
          renewed_at: float) -> dict[str, Any]:
    """A `leases` document."""
    return {"_id": name, "holder": holder, "expires": expires, "acquired_at": acquired_at,
            "renewed_at": renewed_at}


# ---- sample batches (the manager's inbox) ---------------------------------------------------

SAMPLE_BATCH_FIELDS: Final = ("_id", "proxy", "run", "seq", "time", "first", "count",
                              "shipped_at", "fields", "columns")
"""A delivery of one proxy's samples, column by column: the shipper writes one per proxy each
time it stores samples, so the manager reads O(proxies) documents per pass instead of one per
sample (a server that answers no query from an index, such as FerretDB on SQLite, costs per
document and per byte it scans). The `samples` collection stays the record; this one is a copy
kept for a minute (`shipped_at`, wall clock).

`run` names the shipper process (random) and `seq` counts its batches of this proxy from 1, so
a reader notices a batch it never saw (pruned, or lost with an unacknowledged write) as a hole
in the sequence, and reads `samples` instead. `time` and `first`: the newest and oldest sample
time; `count` samples; `fields` the column names (the samples' fields, `_id` included);
`columns` the values, `{field: [value, ...]}` as zlib-compressed JSON (`unpack_columns`)."""


def pack_columns(docs: list[dict[str, Any]]) -> tuple[list[str], bytes]:
    """The fields of `docs` (in order of appearance) and their values column by column,
    `{field: [value, ...]}` as zlib-compressed JSON (a field some document lacks is None there;
    NaN and ±inf become null). `unpack_columns` reads it back."""
    fields = list(dict.fromkeys(k for d in docs for k in d))
    columns = {f: [d.get(f) for d in docs] for f in fields}
    return fields, _pack(columns)


def _pack(columns: Mapping[str, list[Any]]) -> bytes:
    try:
        text = orjson.dumps(columns, default=str)  # NaN and ±inf become null
    except TypeError:  # an integer beyond 64 bits
        text = json.dumps(columns, separators=(",", ":"), default=str).encode()
    return zlib.compress(text, 1)


def sample_batch(proxy_id: str, run: str, seq: int, docs: list[dict[str, Any]],
                 shipped_at: float) -> dict[str, Any]:
    """A `sample_batches` document holding `docs` (samples of proxy `proxy_id`, as stored,
    with their `_id`); a field some document lacks is None there."""
    fields, packed = pack_columns(docs)
    times = [t for d in docs if isinstance(t := d.get("time"), int | float)
             and not isinstance(t, bool)]
    return {"_id": f"{run}-{proxy_id}-{seq}", "proxy": proxy_id, "run": run, "seq": seq,
            "time": max(times) if times else None, "first": min(times) if times else None,
            "count": len(docs), "shipped_at": shipped_at, "fields": fields, "columns": packed}


def unpack_columns(batch: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The columns of a `sample_batches` or `decision_batches` document:
    `{field: [value, ...]}`."""
    text = zlib.decompress(bytes(batch["columns"]))
    try:
        columns: dict[str, list[Any]] = orjson.loads(text)
    except orjson.JSONDecodeError:  # written by json (an integer beyond 64 bits, NaN)
        columns = json.loads(text)
    return columns


def unpack_documents(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The documents a `sample_batches` or `decision_batches` document holds, each with every
    field of the batch (None where it had none), in the batch's order."""
    columns = unpack_columns(batch)
    return rows({f: columns[f] for f in batch.get("fields", columns) if f in columns})


# ---- decision batches ------------------------------------------------------------------------

DECISION_BATCH_FIELDS: Final = ("_id", "manager", "seq", "part", "time", "decided_at", "count",
                                "restarts", "fields", "columns")
"""A manager's pass: every decision of the pass, keeps included, as `decisions` documents
(`decision_columns`, with their `_id`) column by column, so that a pass over 1,000 instances writes
one document, not 1,000 (a server such as FerretDB on SQLite spends about 30 µs per document
and 4–5 µs per field inserting: 0.35–0.66 ms per decision document). The restart decisions
are also written to `decisions`, one document each, where they are queried.

`manager` names the manager process (random, as the `_id`s of its decisions), `seq` counts its
passes that decided something, from 1, and `part` the documents of one pass (from 0; a pass of
more than `DECISION_BATCH_MAX` decisions takes several). `time` is decide()'s `now` (the
samples' clock), `decided_at` wall time; `count` decisions, `restarts` of them restart
decisions; `fields` and `columns` as in `sample_batches` (`unpack_documents`)."""

DECISION_BATCH_MAX: Final = 5000  # decisions per document: far below 16 MiB, BSON's limit


def decision_batches(manager: str, seq: int, columns: Mapping[str, list[Any]],
                     now: float | None, decided_at: float) -> list[dict[str, Any]]:
    """The `decision_batches` documents of one pass's decisions (`decision_columns`),
    `DECISION_BATCH_MAX` at most in each."""
    n = len(columns["_id"]) if "_id" in columns else 0
    actions = columns.get("action", [None] * n)
    out = []
    for part, start in enumerate(range(0, n, DECISION_BATCH_MAX)):
        end = min(n, start + DECISION_BATCH_MAX)
        chunk = columns if (start, end) == (0, n) else {
            f: v[start:end] for f, v in columns.items()}
        out.append({"_id": f"{manager}-batch-{seq}-{part}", "manager": manager, "seq": seq,
                    "part": part, "time": now, "decided_at": decided_at, "count": end - start,
                    "restarts": sum(a == "restart" for a in actions[start:end]),
                    "fields": list(chunk), "columns": _pack(chunk)})
    return out
