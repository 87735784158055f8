"""Instance bounds: which client-chosen keys get a filter instance, and how many there may be.

With `wasm_instance_key=host` the client picks the instance by its Host header, so without
bounds a client could make as many instances (and samples, and memory) as it sends Host values.
Here (SPEC §10, "Instance bounds"):

- a key is checked before it reaches ids, logs or the store (`parse_instance_key`): a host
  name or address, lower case, at most 253 characters, nothing else;
- `wasm_instance_allow` patterns (`shop.example`, `*.shop.example`) say which keys may have
  an instance; empty allows every valid key;
- at most `wasm_max_instances` instances: a new key evicts the least recently used *idle*
  instance (no stream in flight, no call pending);
- a request beyond the bounds (a key not allowed, or every instance busy) gets the answer
  `wasm_instance_overflow` chooses: `reject` (421 for a key not allowed, 503 with Retry-After
  when full) or `shared` (one shared instance, `*`, serves all of them).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

from addons.logsafe import escape
from addons.proxywasm import FilterInstance, Host

logger = logging.getLogger(__name__)

SHARED_KEY = "*"
"""The instance that serves keys beyond the bounds with `wasm_instance_overflow=shared`."""
OVERFLOW_MODES = ("reject", "shared")
MAX_KEY = 253
_KEY = re.compile(r"[a-z0-9_][a-z0-9_.-]*|\[[0-9a-f:.]+\]")
_PATTERN = re.compile(r"[a-z0-9_.*?\[\]:-]+")


class InvalidKey(ValueError):
    """The request's Host cannot be an instance key; the message says why (escaped)."""


def parse_instance_key(authority: bytes, mode: str) -> str:
    """The instance for a request: its host without the port, or `single` for all.

    Raises `InvalidKey` for a Host that is not a host name or address (control characters,
    spaces, non-ASCII, over 253 characters, a port that is not a number or over 65535).
    """
    if mode == "single":
        return "single"
    if not authority:
        return "default"
    try:
        host = authority.decode("ascii").lower()
    except UnicodeDecodeError:
        raise InvalidKey(f"Host {escape(authority, 80)!s} is not ASCII") from None
    if host.startswith("["):  # [IPv6]:port
        name, _, rest = host.partition("]")
        name += "]"
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            raise InvalidKey(f"Host {escape(host, 80)} is not HOST[:PORT]")
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    else:
        name, port = host, None
    if port is not None and not (port.isdigit() and len(port) <= 5):
        raise InvalidKey(f"Host {escape(host, 80)} has a port that is not a number")
    if port is not None and int(port) > 65535:
        raise InvalidKey(f"Host {escape(host, 80)} has a port over 65535")
    name = name[:-1] if name.endswith(".") else name
    if len(name) > MAX_KEY:
        raise InvalidKey(f"Host of {len(name)} characters (at most {MAX_KEY})")
    if not _KEY.fullmatch(name):
        raise InvalidKey(f"Host {escape(host, 80)} is not a host name or address")
    return name


def parse_allow(patterns: Sequence[str]) -> tuple[str, ...]:
    """`wasm_instance_allow`: glob patterns of instance keys (`*.shop.example`)."""
    out = []
    for pattern in patterns:
        p = pattern.strip().lower()
        if not p or not _PATTERN.fullmatch(p):
            raise ValueError(f"wasm_instance_allow: {pattern!r} is not a host name pattern "
                             "(letters, digits, . - _ and the wildcards * ?)")
        out.append(p)
    return tuple(out)


def is_allowed(key: str, allow: tuple[str, ...]) -> bool:
    """Whether `key` may have its own instance (every key when `allow` is empty)."""
    return not allow or any(fnmatch.fnmatchcase(key, p) for p in allow)


class Refusal(NamedTuple):
    """The answer to a request beyond the bounds."""

    status: int
    reason: str
    """One line for the flow comment and the log."""
    retry_after: int | None = None


class InstanceBounds:
    """Picks (or refuses) the instance for a key, evicting idle ones at the bound."""

    def __init__(self, host: Host, allow: tuple[str, ...], max_instances: int,
                 overflow: str) -> None:
        if overflow not in OVERFLOW_MODES:
            raise ValueError(f"wasm_instance_overflow: expected one of "
                             f"{', '.join(OVERFLOW_MODES)}, got {overflow!r}")
        if max_instances < 1:
            raise ValueError("wasm_max_instances: must be at least 1")
        self.host = host
        self.allow = allow
        self.max_instances = max_instances
        self.overflow = overflow
        self.used: OrderedDict[str, None] = OrderedDict((k, None) for k in host.instances)
        self.evicted = 0
        self.refused = 0
        self.on_evict: list[Callable[[str], None]] = []
        """Called with the key of each evicted instance."""

    def get(self, key: str) -> FilterInstance | Refusal:
        """The instance for `key`, started if needed (may raise FilterStartError)."""
        inst = self.host.instances.get(key)
        if inst is not None:
            self.used.move_to_end(key)
            return inst
        if not is_allowed(key, self.allow):
            return self._beyond(Refusal(421, f"no filter instance for host {key}: not in "
                                             "wasm_instance_allow"))
        if len(self.host.instances) >= self.max_instances and not self._evict_one():
            return self._beyond(Refusal(
                503, f"every one of the {self.max_instances} filter instances is busy "
                     "(wasm_max_instances)", retry_after=1))
        return self._start(key)

    def _start(self, key: str) -> FilterInstance:
        inst = self.host.instance(key)
        self.used[key] = None
        self.used.move_to_end(key)
        return inst

    def _beyond(self, refusal: Refusal) -> FilterInstance | Refusal:
        if self.overflow == "shared":
            inst = self.host.instances.get(SHARED_KEY)
            if inst is not None:
                self.used.move_to_end(SHARED_KEY)
                return inst
            if len(self.host.instances) < self.max_instances or self._evict_one():
                return self._start(SHARED_KEY)
        self.refused += 1
        return refusal

    def _evict_one(self) -> bool:
        """Drop the least recently used idle instance; False if every one is busy."""
        for key in self.used:
            inst = self.host.instances.get(key)
            if inst is None:
                continue
            if all(vm.idle for vm in inst.vms()):
                self.forget(key)
                self.host.evict(key)
                self.evicted += 1
                logger.debug("evicted idle filter instance %s (wasm_max_instances %d)", key,
                             self.max_instances)
                for callback in self.on_evict:
                    callback(key)
                return True
        return False

    def forget(self, key: str) -> None:
        """`key` has no instance any more."""
        self.used.pop(key, None)
