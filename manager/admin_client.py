"""Client of the proxy's admin endpoint (``addons/admin.py``), for the manager daemon.

::

    client = AdminClient("http://127.0.0.1:9901", token, token_hint="--token-file F")
    instances = await client.instances()          # id -> Instance
    result = await client.restart("shop.example", "uptime 31 min ≥ 30 min", "manager:fixed")

Every failure is an :class:`AdminError` whose ``message`` says what happened and what to do, and
whose ``in_doubt`` says whether the request may still have been carried out (the response was
lost or came too late). Nothing here retries: the daemon decides when to try again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import httpx

ErrorKind = Literal[
    "unreachable", "timeout", "lost", "unauthorized", "not-found", "failed", "bad-response"
]


class AdminError(Exception):
    """A failed admin request. ``str(e)`` is a one-line message for the log."""

    def __init__(self, kind: ErrorKind, message: str, *, in_doubt: bool = False,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        #: The request may have been carried out although no valid response arrived.
        self.in_doubt = in_doubt
        self.status = status


@dataclass(frozen=True)
class Instance:
    """One entry of ``GET /instances``: instance ``id`` of proxy ``proxy``."""

    id: str
    tenant: str
    generation: int
    started_at: float
    allocated_pages: int
    allocated_bytes: int
    requests: int
    outbound: int
    proxy: str = ""


@dataclass(frozen=True)
class RestartResult:
    """The answer of ``POST /instances/{id}/restart``; ``raw`` is the JSON object as received."""

    id: str
    generation: int
    generation_before: int | None
    allocated_bytes_before: int
    allocated_bytes_after: int
    raw: dict[str, Any]


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key!r} is not a number: {value!r}")
    return int(value)


def _float(obj: dict[str, Any], key: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key!r} is not a finite number: {value!r}")
    return float(value)


def parse_instances(payload: object) -> dict[str, Instance]:
    """``GET /instances`` JSON → {id: Instance}. ValueError if it is not the documented shape."""
    if not isinstance(payload, list):
        raise ValueError("expected a JSON array of instances")
    out: dict[str, Instance] = {}
    for item in payload:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ValueError(f"instance without a string id: {item!r:.100}")
        out[item["id"]] = Instance(
            id=item["id"], tenant=str(item.get("tenant", "")),
            generation=_int(item, "generation"), started_at=_float(item, "started_at"),
            allocated_pages=_int(item, "allocated_pages"),
            allocated_bytes=_int(item, "allocated_bytes"),
            requests=_int(item, "requests"), outbound=_int(item, "outbound"),
            proxy=str(item.get("proxy") or ""),
        )
    return out


def parse_restart(payload: object) -> RestartResult:
    """``POST /instances/{id}/restart`` JSON → RestartResult. ValueError if malformed."""
    if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
        raise ValueError("expected a JSON object with a string id")
    before = payload.get("generation_before")
    return RestartResult(
        id=payload["id"], generation=_int(payload, "generation"),
        generation_before=None if before is None else _int(payload, "generation_before"),
        allocated_bytes_before=_int(payload, "allocated_bytes_before"),
        allocated_bytes_after=_int(payload, "allocated_bytes_after"), raw=dict(payload),
    )


WARM_TIMEOUT_S = 120.0
"""How long a warm restart may take to answer (it replays the instance's journal first)."""


class AdminClient:
    """Async client of one admin endpoint, with a bearer token and a timeout per request."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 5.0,
                 token_hint: str = "--token-file") -> None:
        self.base_url = base_url.rstrip("/")
        #: Where the token came from, for the 401 message ("--token-file PATH" or "--token").
        self.token_hint = token_hint
        self.timeout_s = timeout_s
        # trust_env=False: an HTTP(S)_PROXY of the environment must not see the admin token.
        self._client = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout_s, trust_env=False,
            headers={"Authorization": f"Bearer {token}"},
        )

    def set_token(self, token: str) -> None:
        """Use another bearer token from now on (e.g. the token file was rewritten)."""
        self._client.headers["Authorization"] = f"Bearer {token}"

    async def aclose(self) -> None:
        """Close the connections."""
        await self._client.aclose()

    async def healthz(self) -> None:
        """``GET /healthz``; AdminError unless it answers 200."""
        await self._request("GET", "/healthz")

    async def instances(self) -> dict[str, Instance]:
        """``GET /instances`` as {id: Instance}. Raises AdminError."""
        payload = await self._request("GET", "/instances")
        try:
            return parse_instances(payload)
        except ValueError as e:
            raise self._bad("GET", "/instances", str(e)) from e

    async def restart(self, instance_id: str, reason: str, requested_by: str,
                      mode: str | None = None) -> RestartResult:
        """``POST /instances/{id}/restart``, ``mode`` ``cold`` or ``warm`` (None: the proxy's
        ``wasm_restart_mode``). A warm restart replays the journal first, so it may wait up to
        ``WARM_TIMEOUT_S`` for the answer. Raises AdminError (``not-found`` for a 404)."""
        path = f"/instances/{quote(instance_id, safe='')}/restart"
        body = {"reason": reason, "requested_by": requested_by}
        if mode is not None:
            body["mode"] = mode
        timeout = max(self.timeout_s, WARM_TIMEOUT_S) if mode == "warm" else None
        payload = await self._request("POST", path, json=body, timeout=timeout)
        try:
            return parse_restart(payload)
        except ValueError as e:
            raise self._bad("POST", path, str(e), in_doubt=True) from e

    # ---- internals ----

    def _bad(self, method: str, path: str, why: str, *, in_doubt: bool = False) -> AdminError:
        return AdminError(
            "bad-response",
            f"admin endpoint {self.base_url} answered {method} {path} with something unexpected "
            f"({why}): is that URL the wasm_auth admin endpoint?",
            in_doubt=in_doubt,
        )

    async def _request(self, method: str, path: str, json: object = None,
                       timeout: float | None = None) -> object:
        url = self.base_url
        mutating = method != "GET"
        try:
            if timeout is None:
                response = await self._client.request(method, path, json=json)
            else:
                response = await self._client.request(method, path, json=json, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
            # Nothing was sent: safe to retry.
            raise AdminError(
                "unreachable",
                f"cannot reach the admin endpoint {url} ({_describe(e)}): is the proxy running "
                "with wasm_admin_listen at that address?",
            ) from e
        except httpx.TimeoutException as e:
            raise AdminError(
                "timeout",
                f"admin endpoint {url} did not answer {method} {path} within "
                f"{timeout or self.timeout_s:g} s",
                in_doubt=mutating,
            ) from e
        except httpx.TransportError as e:
            raise AdminError(
                "lost",
                f"admin endpoint {url}: the connection broke during {method} {path} "
                f"({_describe(e)})",
                in_doubt=mutating,
            ) from e
        status = response.status_code
        if status == 401:
            raise AdminError(
                "unauthorized",
                f"admin endpoint {url} refused the token (401): check {self.token_hint} (the "
                "proxy's token is wasm_admin_token, or the file wasm_admin_token_file)",
                status=401,
            )
        if status == 404 and mutating:
            raise AdminError("not-found", f"admin endpoint {url}: {_error_text(response)}",
                             status=404)
        if not 200 <= status < 300:
            raise AdminError(
                "failed",
                f"admin endpoint {url} answered {method} {path} with {status}: "
                f"{_error_text(response)}",
                status=status,
            )
        try:
            return response.json()
        except ValueError as e:
            raise self._bad(method, path, "not JSON", in_doubt=mutating) from e


def _describe(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])[:200]
    return str(body)[:200]
