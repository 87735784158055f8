"""HttpxDispatcher against real HTTP servers on 127.0.0.1: one timeout, the filter's.

The host enforces an outbound call's timeout on its own clock (checked when the proxy polls it)
and records it as outcome `timeout`. httpx must not time the call out first, or a slow answer
is stored as `error`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from addons.proxywasm import (
    AuthCallRecord,
    FilterModule,
    Host,
    HostEvents,
    HttpxDispatcher,
    WallClock,
)

TOKEN_HEADERS = [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"shop.example"),
                 (b":scheme", b"http"), (b"authorization", b"Bearer slow-token")]


class Calls(HostEvents):
    def __init__(self) -> None:
        self.records: list[AuthCallRecord] = []

    def on_auth_call(self, record: AuthCallRecord) -> None:
        self.records.append(record)


@contextlib.asynccontextmanager
async def auth_server(delay_s: float | None) -> AsyncIterator[str]:
    """An HTTP server that answers 200 after `delay_s` seconds (never, for None)."""

    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await reader.readuntil(b"\r\n\r\n")
            if delay_s is None:
                await asyncio.sleep(3600)
            await asyncio.sleep(delay_s)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def one_call(filter_module: FilterModule, delay_s: float | None, poll_s: float
                   ) -> list[AuthCallRecord]:
    """One request through the reference filter (auth call timeout 1000 ms), the host polled
    every `poll_s` seconds as a busy proxy's loop might."""
    calls = Calls()
    async with auth_server(delay_s) as url:
        dispatcher = HttpxDispatcher({"auth": url})
        host = Host(filter_module, dispatcher, clock=WallClock(), events=calls)
        try:
            stream = host.instance("shop.example").stream()
            decision = stream.request_headers(TOKEN_HEADERS)
            assert decision is None, "the filter should wait for its auth call"
            for _ in range(100):
                await asyncio.sleep(poll_s)
                host.poll()
                if stream.decision is not None:
                    break
            assert stream.decision is not None
            assert stream.decision.response is not None
            assert stream.decision.response.status == 503  # fail-closed: auth unavailable
            stream.close()
        finally:
            await dispatcher.aclose()
            host.close()
    return calls.records


def test_a_slow_auth_answer_is_a_timeout_not_an_error(filter_module: FilterModule) -> None:
    # The answer comes after 1.5 s; the call's timeout is 1 s and the host is polled every
    # 0.3 s, so it notices the timeout at about 1.2 s. httpx's own timer must not fire before.
    records = asyncio.run(one_call(filter_module, 1.5, 0.3))
    assert [r.outcome for r in records] == ["timeout"]
    assert records[0].status is None


def test_an_auth_server_that_never_answers_is_a_timeout(filter_module: FilterModule) -> None:
    records = asyncio.run(one_call(filter_module, None, 0.3))
    assert [r.outcome for r in records] == ["timeout"]


def test_a_refused_connection_is_an_error(filter_module: FilterModule) -> None:
    async def refused() -> list[AuthCallRecord]:
        from scenarios.procs import free_port

        calls = Calls()
        dispatcher = HttpxDispatcher({"auth": f"http://127.0.0.1:{free_port()}"})
        host = Host(filter_module, dispatcher, clock=WallClock(), events=calls)
        try:
            stream = host.instance("shop.example").stream()
            assert stream.request_headers(TOKEN_HEADERS) is None
            for _ in range(100):
                await asyncio.sleep(0.05)
                host.poll()
                if stream.decision is not None:
                    break
            assert stream.decision is not None
        finally:
            await dispatcher.aclose()
            host.close()
        return calls.records

    assert [r.outcome for r in asyncio.run(refused())] == ["error"]
