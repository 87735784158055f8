"""The admin HTTP endpoint of the wasm_auth addon (like Envoy's admin port).

Every request needs `Authorization: Bearer <token>`, compared in constant time; a missing or
wrong token gets 401. It binds 127.0.0.1 by default. Responses are JSON.

    GET  /healthz                    {"status": "ok"}
    GET  /instances                  [{id, tenant, generation, allocated_pages, allocated_bytes,
                                       requests, outbound, started_at, ...}]
    POST /instances/{id}/restart     {id, generation, allocated_bytes_before,
                                      allocated_bytes_after}; body (optional JSON):
                                      {"reason": "...", "requested_by": "..."}

An unknown instance is 404, a malformed body 400, a wrong method 405; nothing a client sends
can crash the proxy. A restart here is the same operation as the `wasm.restart` command.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

logger = logging.getLogger(__name__)

MAX_BODY = 16 * 1024


class AdminBackend(Protocol):
    """What the endpoint needs from the addon."""

    def list_instances(self) -> list[dict[str, Any]]:
        """Every instance, as the `/instances` JSON objects."""
        ...

    def restart_instance(self, instance_id: str, reason: str, requested_by: str
                         ) -> dict[str, Any]:
        """Restart; KeyError for an unknown id, RuntimeError if the restart failed."""
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


def load_or_create_token(path: Path) -> str:
    """The token in `path`, or a new random one written there with mode 0600."""
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def make_app(backend: AdminBackend, token: str) -> web.Application:
    """The aiohttp application serving the admin API for `backend`."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def authorize(request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, expected):
            logger.warning("admin: %s %s from %s refused: %s", request.method, request.path,
                           request.remote, "no token" if not given else "wrong token")
            return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
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
        body: dict[str, Any] = {}
        if request.can_read_body:
            raw = await request.content.read(MAX_BODY + 1)
            if len(raw) > MAX_BODY:
                return _error(413, f"body larger than {MAX_BODY} bytes")
            if raw.strip():
                try:
                    parsed = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as e:
                    return _error(400, f"body is not JSON: {e}")
                if not isinstance(parsed, dict):
                    return _error(400, "body must be a JSON object")
                body = parsed
        reason = body.get("reason", "admin")
        requested_by = body.get("requested_by") or f"admin@{request.remote}"
        if not isinstance(reason, str) or not isinstance(requested_by, str):
            return _error(400, "reason and requested_by must be strings")
        try:
            result = backend.restart_instance(instance_id, reason[:200], requested_by[:200])
        except KeyError:
            return _error(404, f"no instance {instance_id!r}")
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
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve; OSError (e.g. the port is taken) propagates with its reason."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
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
