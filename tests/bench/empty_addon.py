"""A script addon with wasm_auth's five flow hooks, each doing nothing: what mitmproxy itself
costs per request for any `-s` addon (the proxy benchmark's `empty addon` variant)."""

from __future__ import annotations

from typing import Any


class EmptyAddon:
    def requestheaders(self, flow: Any) -> None:
        return None

    def request(self, flow: Any) -> None:
        return None

    def responseheaders(self, flow: Any) -> None:
        return None

    def response(self, flow: Any) -> None:
        return None

    def error(self, flow: Any) -> None:
        return None


addons = [EmptyAddon()]
