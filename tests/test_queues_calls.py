"""Shared queues between filter instances, and outbound calls over real HTTP."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestServer

from addons.proxywasm import (
    HttpCall,
    HttpCallResponse,
    HttpxDispatcher,
    InProcessDispatcher,
    Status,
)

from .wat import module, trampolines

OUT_PTR, OUT_SIZE = 4096, 4100

QUEUES = trampolines("proxy_register_shared_queue", "proxy_resolve_shared_queue",
                     "proxy_enqueue_shared_queue", "proxy_dequeue_shared_queue") + """
  (global $ready (mut i32) (i32.const 0))
  (global $queue (mut i32) (i32.const 0))
  (func (export "proxy_on_queue_ready") (param i32) (param $q i32)
    (global.set $ready (i32.add (global.get $ready) (i32.const 1)))
    (global.set $queue (local.get $q)))
  (func (export "ready") (result i32) (global.get $ready))
  (func (export "queue") (result i32) (global.get $queue))
"""


def test_shared_queue_register_resolve_enqueue_dequeue(harness) -> None:
    h = harness(module(QUEUES), vm_id="vm1")
    other = h.host.instance("other")  # another instance of the same host
    name, n = h.put(1024, b"jobs")
    assert h.call("proxy_register_shared_queue", name, n, 2000) == Status.OK
    queue_id = h.u32(2000)
    assert h.call("proxy_register_shared_queue", name, n, 2004) == Status.OK
    assert h.u32(2004) == queue_id  # the same name is the same queue
    vm_id, vn = h.put(1100, b"vm1")
    assert h.call("proxy_resolve_shared_queue", vm_id, vn, name, n, 2008) == Status.OK
    assert h.u32(2008) == queue_id
    nope, nn = h.put(1200, b"nope")
    assert h.call("proxy_resolve_shared_queue", vm_id, vn, nope, nn, 2008) == Status.NOT_FOUND
    assert h.call("proxy_dequeue_shared_queue", queue_id, OUT_PTR, OUT_SIZE) == Status.EMPTY
    assert h.call("proxy_dequeue_shared_queue", 99, OUT_PTR, OUT_SIZE) == Status.NOT_FOUND
    assert h.call("proxy_enqueue_shared_queue", 99, name, n) == Status.NOT_FOUND
    # The other instance enqueues; the registering one is told later, not re-entrantly.
    ovm = other.vm
    enqueue = ovm.raw.func("call_proxy_enqueue_shared_queue")
    value = b"job-1"
    assert ovm.write(3000, value)
    assert ovm.call(enqueue, queue_id, 3000, len(value)) == Status.OK
    assert h.call("ready") == 0
    h.host.poll()
    assert (h.call("ready"), h.call("queue")) == (1, queue_id)
    assert h.call("proxy_dequeue_shared_queue", queue_id, OUT_PTR, OUT_SIZE) == Status.OK
    assert h.returned(OUT_PTR, OUT_SIZE) == b"job-1"
    assert h.call("proxy_dequeue_shared_queue", queue_id, OUT_PTR, OUT_SIZE) == Status.EMPTY
    assert h.call("proxy_register_shared_queue", 0xFFFFFF00, 4, 2000) == \
        Status.INVALID_MEMORY_ACCESS


async def test_outbound_call_takes_method_path_scheme_and_one_host() -> None:
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        body = await request.read()
        return web.Response(status=202, body=body + b"!", headers={"x-up": "1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    # The cluster's URL says https; the call's :scheme says http, and wins.
    dispatcher = HttpxDispatcher({"up": f"https://127.0.0.1:{server.port}"})
    done: asyncio.Future = asyncio.get_running_loop().create_future()
    call = HttpCall("up", [(b":method", b"PUT"), (b":path", b"/p?q=1"), (b":scheme", b"http"),
                           (b":authority", b"api.example"), (b"host", b"duplicate.example"),
                           (b"x-a", b"1")], b"body", [], 5000)
    try:
        dispatcher.start(call, done.set_result)
        response = await asyncio.wait_for(done, 10)
    finally:
        await dispatcher.aclose()
        await server.close()
    assert response is not None and response.status == 202 and response.body == b"body!"
    [req] = seen
    assert req.method == "PUT" and req.path_qs == "/p?q=1"
    assert req.headers.getall("Host") == ["api.example"]
    assert req.headers["x-a"] == "1"


async def test_a_cancelled_call_closes_its_connection_and_is_never_delivered() -> None:
    """`start` returns what cancels the call (the host cancels the calls of a stream whose
    client left): the request is abandoned, so the server sees its connection close, and
    `deliver` is never called."""
    received, closed = asyncio.Event(), asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        received.set()
        while await reader.read(4096):  # never answers; EOF when the caller goes
            pass
        closed.set()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dispatcher = HttpxDispatcher({"auth": f"http://127.0.0.1:{port}"})
    delivered: list[object] = []
    call = HttpCall("auth", [(b":method", b"GET"), (b":path", b"/verify")], b"", [], 20_000)
    try:
        cancel = dispatcher.start(call, delivered.append)
        assert cancel is not None
        await asyncio.wait_for(received.wait(), 10)
        cancel()
        await asyncio.wait_for(closed.wait(), 5)
        await asyncio.sleep(0.1)
        assert delivered == []
    finally:
        await dispatcher.aclose()
        server.close()
        await server.wait_closed()


def test_a_cancelled_in_process_answer_is_dropped() -> None:
    clock = [0]
    dispatcher = InProcessDispatcher(lambda call: HttpCallResponse(200), lambda: clock[0],
                                     latency_s=0.001)
    delivered: list[object] = []
    call = HttpCall("auth", [(b":path", b"/verify")])
    cancel = dispatcher.start(call, delivered.append)
    dispatcher.start(call, delivered.append)
    assert cancel is not None
    cancel()
    clock[0] = 10**9
    dispatcher.poll(clock[0])
    assert delivered == [HttpCallResponse(200)]  # the other call's answer only
