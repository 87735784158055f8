"""A script loaded after the addon by `tests.bench.hooktime`: it times the synchronous part of
the addon's `request` hook (thread CPU time), which is all of a cache hit, and writes the sum
and count to the file named by WASM_RECLAIM_HOOK_TIMES at `done`. A hook that suspends (a miss
waiting for the auth server) is counted apart, without its time."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Coroutine, Generator
from typing import Any

from mitmproxy import ctx
from mitmproxy.addonmanager import traverse


class _Rest:
    """The rest of a coroutine that has yielded `first`: awaiting this goes on as awaiting the
    coroutine would have (what it yields goes to the event loop, what comes back to it)."""

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, Any, None]:
        value = self.first
        while True:
            try:
                sent = yield value
            except BaseException as e:  # thrown in by the event loop: passed on
                try:
                    value = self.coro.throw(e)
                except StopIteration:
                    return
            else:
                try:
                    value = self.coro.send(sent)
                except StopIteration:
                    return


class HookTimer:
    def __init__(self) -> None:
        self.cpu_ns = 0
        self.hooks = 0
        self.suspended = 0

    def running(self) -> None:
        # The script's module carries the addon's hooks (`WasmAuth.publish`).
        [script] = [a for a in traverse(ctx.master.addons.chain)
                    if type(getattr(getattr(a, "request", None), "__self__", None)).__name__
                    == "WasmAuth"]
        hook = script.request

        async def timed(flow: Any) -> None:
            coro: Coroutine[Any, Any, None] = hook(flow)
            t0 = time.thread_time_ns()
            try:
                waiting = coro.send(None)
            except StopIteration:
                self.cpu_ns += time.thread_time_ns() - t0
                self.hooks += 1
                return
            self.suspended += 1
            await _Rest(coro, waiting)

        script.request = timed

    def done(self) -> None:
        with open(os.environ["WASM_RECLAIM_HOOK_TIMES"], "w") as f:
            json.dump({"cpu_ns": self.cpu_ns, "hooks": self.hooks,
                       "suspended": self.suspended}, f)


addons = [HookTimer()]
