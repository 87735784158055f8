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


def test_a_call_once_the_proxy_is_stopping_is_one_line_and_fails_by_policy(
        filter_module: FilterModule, caplog) -> None:
    """mitmdump stopping under traffic: `done` closes the dispatcher while flows still run. A
    call whose task was scheduled before the pool closed (`aclose` waits for the calls it
    cancelled, and new ones may start meanwhile), and a call started after, are each one line,
    and their requests fail by the filter's policy: no task dies with "the client has been
    closed"."""
    async def stopping() -> tuple[list[AuthCallRecord], list[object]]:
        loop = asyncio.get_running_loop()
        died: list[object] = []
        loop.set_exception_handler(lambda _loop, context: died.append(context))
        calls = Calls()
        async with auth_server(0.0) as url:
            dispatcher = HttpxDispatcher({"auth": url})
            host = Host(filter_module, dispatcher, clock=WallClock(), events=calls)
            try:
                before = host.instance("shop.example").stream()
                assert before.request_headers(TOKEN_HEADERS) is None  # its task not yet run
                await dispatcher._client.aclose()  # the pool closes before that task runs
                # a second token: the filter makes a call of its own for it, refused at once
                after = host.instance("shop.example").stream()
                after.request_headers([(b"authorization", b"Bearer another-token")])
                for _ in range(50):
                    await asyncio.sleep(0.02)
                    host.poll()
                    if before.decision is not None and after.decision is not None:
                        break
                for stream in (before, after):
                    assert stream.decision is not None and stream.decision.response is not None
                    assert stream.decision.response.status == 503  # fail-closed
                    stream.close()
            finally:
                await dispatcher.aclose()
                host.close()
            import gc
            gc.collect()  # a task that died unretrieved is reported when it is collected
            await asyncio.sleep(0)
        return calls.records, died

    records, died = asyncio.run(stopping())
    assert died == []
    assert [r.outcome for r in records] == ["error"]  # the call that was started
    lines = [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert any("not sent: the proxy is stopping" in line for line in lines), lines
    assert any("could not start: the proxy is stopping" in line for line in lines), lines
    assert all("\n" not in line for line in lines)
