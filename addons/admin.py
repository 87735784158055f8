"""The admin HTTP endpoint of the wasm_auth addon (like Envoy's admin port).

Every request needs `Authorization: Bearer <token>`, compared in constant time; a missing or
wrong token gets 401. It binds 127.0.0.1 by default. Responses are JSON.

    GET  /healthz                    {"status": "ok"}
    GET  /instances                  [{id, tenant, generation, allocated_pages, allocated_bytes,
                                       requests, outbound, started_at, ...}]
    POST /instances/{id}/restart     {id, generation, allocated_bytes_before,
                                      allocated_bytes_after, mode, fallback, replayed};
                                      body (optional JSON): {"reason": "...",
                                      "requested_by": "...", "mode": "cold"|"warm"}
                                      (mode: default wasm_restart_mode; the answer's `mode`
                                      is what ran, `fallback` why a warm one ran cold)

An unknown instance is 404, a malformed body (not a JSON object, an unknown key, a wrong
type) 400, a wrong method 405, a body over 16 KiB 413 (at once when Content-Length declares
it); nothing a client sends can crash the proxy or write more than one log line, escaped
(`addons.logsafe`), and repeated lines are rate-limited. A restart here is the same
operation as the `wasm.restart` command.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from addons.logsafe import OneLine, RateLimit, Redact, escape, install

logger = logging.getLogger(__name__)
http_logger = logging.getLogger(__name__ + ".http")
"""aiohttp's own server log (malformed requests): one line each, rate-limited."""

MAX_BODY = 16 * 1024
RESTART_KEYS = frozenset({"reason", "requested_by", "mode"})
"""The keys a restart body may have; `mode` is `cold` or `warm` (SPEC §10)."""
RESTART_MODES = ("cold", "warm")


class AdminBackend(Protocol):
    """What the endpoint needs from the addon."""

    def list_instances(self) -> list[dict[str, Any]]:
        """Every instance, as the `/instances` JSON objects."""
        ...

    async def restart_instance_async(self, instance_id: str, reason: str, requested_by: str,
                                     mode: str | None = None) -> dict[str, Any]:
        """Restart (`mode`: cold, warm, None for the default); KeyError for an unknown id,
        ValueError for a bad mode, RuntimeError if the restart failed."""
        ...


def parse_listen(value: str) -> tuple[str, int] | None:
    """`127.0.0.1:9901` → ("127.0.0.1", 9901); empty → None (disabled). ValueError if bad."""
    value = value.strip()
    if not value:
        return None
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:9901), got {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} in {value!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} in {value!r} is out of range")
    return host.strip("[]"), port


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def check_listen(listen: tuple[str, int] | None, allow_remote: bool) -> str | None:
    """Refuse a non-loopback admin address unless allowed; the warning to log if allowed.

    ValueError names the option that allows it.
    """
    if listen is None or is_loopback(listen[0]):
        return None
    if not allow_remote:
        raise ValueError(
            f"wasm_admin_listen: {listen[0]} is not a loopback address; the admin endpoint can "
            "restart filters, so it listens on 127.0.0.1 unless wasm_admin_allow_remote is set")
    return (f"wasm admin endpoint listens on {listen[0]}:{listen[1]}, beyond this machine "
            "(wasm_admin_allow_remote): anyone who can reach it and has the token can restart "
            "filters")


def bearer_token(header: str) -> str | None:
    """The credentials of an `Authorization: Bearer …` header (scheme case-insensitive)."""
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials


def parse_restart_body(body: Any) -> dict[str, str]:
    """Check a restart body: an object with only known keys, each a string. ValueError if not."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    unknown = sorted(set(body) - RESTART_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(escape(str(k), 40) for k in unknown)}; "
                         f"known: {', '.join(sorted(RESTART_KEYS))}")
    for key, value in body.items():
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string")
    if "mode" in body and body["mode"] not in RESTART_MODES:
        raise ValueError(f"mode must be one of {', '.join(RESTART_MODES)}")
    return dict(body)


class TokenFileError(ValueError):
    """The admin token file cannot be read or made (one line: the path and why)."""


def load_or_create_token(path: Path) -> str:
    """The token in `path`, or a new random one written there with mode 0600. A file others
    may read is made 0600, with a warning (its token may have been read: rotate it)."""
    try:
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            token = ""
        if token:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
                logger.warning("wasm admin: %s was readable by others: now 0600 (replace the "
                               "token if others may have read it)", path)
            return token
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.chmod(path, 0o600)
    except UnicodeDecodeError:
        raise TokenFileError(f"token file {path}: not UTF-8 text") from None
    except OSError as e:
        raise TokenFileError(f"token file {path}: {e.strerror or e}") from None
    return token


def _payload_errors() -> type[Exception]:
    """What reading a request body raises when the client disconnects mid-body."""
    from aiohttp.http_exceptions import HttpProcessingError

    return HttpProcessingError


def _error(status: int, message: str, *, close: bool = False) -> web.Response:
    response = web.json_response({"error": message}, status=status)
    if close:
        response.force_close()
    return response


def make_app(backend: AdminBackend, token: str) -> web.Application:
    """The aiohttp application serving the admin API for `backend`."""
    expected = token.encode()

    @web.middleware
    async def authorize(request: web.Request, handler: Any) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        given = bearer_token(header)
        if given is None or not hmac.compare_digest(given.encode("utf-8", "replace"), expected):
            logger.warning("admin: %s %s from %s refused: %s", escape(request.method, 20),
                           escape(request.raw_path, 100), escape(request.remote, 60),
                           "no token" if given is None else "wrong token")
            refusal = web.json_response({"error": "missing or wrong bearer token"},
                                        status=401, headers={"WWW-Authenticate": "Bearer"})
            if request.can_read_body:
                refusal.force_close()  # don't wait for a body nobody will read
            return refusal
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as e:
            return _error(e.status, e.reason)
        return response

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def instances(_request: web.Request) -> web.Response:
        return web.json_response(backend.list_instances())

    async def restart(request: web.Request) -> web.Response:
        instance_id = request.match_info["id"]
        body: dict[str, str] = {}
        if request.can_read_body:
            if request.content_length is not None and request.content_length > MAX_BODY:
                # Answer now and close: the rest of the body is never read.
                return _error(413, f"body larger than {MAX_BODY} bytes", close=True)
            try:
                raw = await request.content.read(MAX_BODY + 1)
                error = None
            except (ConnectionError, OSError, web.HTTPException, _payload_errors()) as e:
                raw, error = b"", type(e).__name__
            if error is None and request.content_length is not None and (
                    len(raw) < request.content_length):
                error = f"{len(raw)} of {request.content_length} bytes"
            if error is not None:
                logger.warning("admin: %s %s from %s: the client went away mid-body (%s)",
                               escape(request.method, 20), escape(request.raw_path, 100),
                               escape(request.remote, 60), error)
                return _error(400, "incomplete body", close=True)
            if len(raw) > MAX_BODY:
                return _error(413, f"body larger than {MAX_BODY} bytes", close=True)
            if raw.strip():
                try:
                    body = parse_restart_body(json.loads(raw))
                except (ValueError, UnicodeDecodeError, RecursionError) as e:
                    message = str(e) if not isinstance(e, json.JSONDecodeError) else (
                        f"body is not JSON: {e.msg} at line {e.lineno} column {e.colno}")
                    return _error(400, message)
        reason = body.get("reason", "admin")
        requested_by = body.get("requested_by") or f"admin@{request.remote}"
        mode = body.get("mode")
        try:
            result = await backend.restart_instance_async(instance_id, reason[:200],
                                                          requested_by[:200], mode)
        except KeyError:
            return _error(404, f"no instance {escape(instance_id, 100)!r}")
        except RuntimeError as e:
            return _error(503, str(e))
        return web.json_response(result)

    app = web.Application(middlewares=[authorize], client_max_size=MAX_BODY)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/instances", instances)
    app.router.add_post("/instances/{id}/restart", restart)
    return app


class AdminServer:
    """The admin endpoint running on the current asyncio loop."""

    def __init__(self, backend: AdminBackend, token: str, host: str, port: int) -> None:
        self.app = make_app(backend, token)
        self.token = token  # hidden in the admin's log lines (`Redact`)
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve; OSError (e.g. the port is taken) propagates with its reason."""
        install([logger.name], Redact(self.token), RateLimit())
        install([http_logger.name], OneLine(), Redact(self.token), RateLimit())
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               logger=http_logger)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.port == 0 and runner.addresses:  # an ephemeral port: report the real one
            self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
