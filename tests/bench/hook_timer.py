"""A script loaded after the addon by `tests.bench.hooktime`: it times the addon's `request`
hook (thread CPU time) where the filter decides at once, which is all of a cache hit, and writes
the sum and count to the file named by WASM_RECLAIM_HOOK_TIMES at `done`. A hook that returns
something to await (a miss waiting for the auth server) is counted apart, without its time."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable
from typing import Any

from mitmproxy import ctx

from tests.bench import addon_script


class HookTimer:
    def __init__(self) -> None:
        self.cpu_ns = 0
        self.hooks = 0
        self.suspended = 0

    def running(self) -> None:
        script = addon_script(ctx.master.addons.chain)
        hook = script.request

        def timed(flow: Any) -> Awaitable[None] | None:
            t0 = time.thread_time_ns()
            waiting = hook(flow)  # synchronous when the filter decides at once
            if waiting is None:
                self.cpu_ns += time.thread_time_ns() - t0
                self.hooks += 1
            else:
                self.suspended += 1
            return waiting

        script.request = timed

    def done(self) -> None:
        with open(os.environ["WASM_RECLAIM_HOOK_TIMES"], "w") as f:
            json.dump({"cpu_ns": self.cpu_ns, "hooks": self.hooks,
                       "suspended": self.suspended}, f)


addons = [HookTimer()]
