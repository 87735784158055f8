"""A script loaded after the addon by `tests.bench.proxy --split`: once the proxy runs, it
unbinds the addon's request hooks (`requestheaders`, `request`: None, which mitmproxy skips),
so that the addon is loaded, configured and running (its filter instance, ticker and loops)
but does no work per request. Against plain mitmdump this is what mitmproxy's dispatch to the
addon's script and its background work cost; against the whole addon, what its hooks cost.
The requests then reach the upstream unfiltered: a benchmark control, never a configuration.

This script is a second script in the chain, so it costs mitmproxy something per event too.
To keep that small, its own module then carries None for every hook, as the addon's does
(`WasmAuth.publish`): a name missing from a module would cost a formatted AttributeError at
every event, which would be charged to the control, not to the addon."""

from __future__ import annotations

from mitmproxy import ctx, hooks

from tests.bench import addon_script


class Unhook:
    def running(self) -> None:
        script = addon_script(ctx.master.addons.chain)
        script.requestheaders = None
        script.request = None
        module = globals()  # this script's module
        for name in hooks.all_hooks:  # every hook is registered once the proxy runs
            module.setdefault(name, None)
        module["addons"] = ()


addons = [Unhook()]
