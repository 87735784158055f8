"""Shared queues (cpp-host's shared_queue.cc): named queues that filters of one host share.

A queue is registered by a VM under its VM id and a name (`proxy_register_shared_queue`), and
found by others with both (`proxy_resolve_shared_queue`). Anyone holding its id may enqueue and
dequeue; the VMs that registered it are told with `proxy_on_queue_ready` (on their root
context, never from inside the enqueueing call) when something arrives. Registering a name
again returns the same queue and adds the VM to those told. A queue outlives the VMs that
registered it (like shared data, it survives restarts); a dropped VM is simply no longer told.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class SharedQueue:
    """One queue: its items and the VMs told when one arrives."""

    __slots__ = ("items", "name", "subscribers", "vm_id")

    def __init__(self, vm_id: str, name: str) -> None:
        self.vm_id = vm_id
        self.name = name
        self.items: deque[bytes] = deque()
        self.subscribers: list[Any] = []


class SharedQueues:
    """Every shared queue of a host, by id (ids start at 1 and are never reused)."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], int] = {}
        self._queues: dict[int, SharedQueue] = {}

    def register(self, vm_id: str, name: str, subscriber: Any) -> int:
        """The id of queue (vm_id, name), created if new; `subscriber` is told of new items."""
        queue_id = self._ids.get((vm_id, name))
        if queue_id is None:
            queue_id = len(self._ids) + 1
            self._ids[(vm_id, name)] = queue_id
            self._queues[queue_id] = SharedQueue(vm_id, name)
        queue = self._queues[queue_id]
        queue.subscribers = [s for s in queue.subscribers if not getattr(s, "closed", False)]
        if subscriber not in queue.subscribers:
            queue.subscribers.append(subscriber)
        return queue_id

    def resolve(self, vm_id: str, name: str) -> int | None:
        """The id of queue (vm_id, name), or None if nobody registered it."""
        return self._ids.get((vm_id, name))

    def get(self, queue_id: int) -> SharedQueue | None:
        """The queue `queue_id`, or None."""
        return self._queues.get(queue_id)
