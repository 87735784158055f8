"""A script loaded after the addon by `tests.bench.proxy --split`: once the proxy runs, it
unbinds the addon's request hooks (`requestheaders`, `request`: None, which mitmproxy skips),
so that the addon is loaded, configured and running (its filter instance, ticker and loops)
but does no work per request. Against plain mitmdump this is what mitmproxy's dispatch to the
addon's script and its background work cost; against the whole addon, what its hooks cost.
The requests then reach the upstream unfiltered: a benchmark control, never a configuration."""

from __future__ import annotations

from mitmproxy import ctx
from mitmproxy.addonmanager import traverse


class Unhook:
    def running(self) -> None:
        # The script's module carries the addon's hooks (`WasmAuth.publish`).
        [script] = [a for a in traverse(ctx.master.addons.chain)
                    if type(getattr(getattr(a, "request", None), "__self__", None)).__name__
                    == "WasmAuth"]
        script.requestheaders = None
        script.request = None


addons = [Unhook()]
