"""Known gaps of the host, as the conformance suite shows them (filters/conformance/GAPS.md).

Each gap names the tests it breaks; those tests are marked `xfail(strict=True)` with the gap's
id and title as the reason, so the suite stays green while a gap is open and fails (XPASS) the
moment the host closes it: then delete the gap here and in GAPS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest

MODULE = "tests/test_conformance.py::"


@dataclass(frozen=True)
class Gap:
    id: str
    title: str
    breaks: Callable[[str, str, dict[str, Any]], bool]
    """(test function name, SDK, the test's other parameters) -> whether the gap breaks it."""


GAPS: list[Gap] = [
]


def _sdk(params: dict[str, Any]) -> str:
    return str(params.get("conf") or params.get("conf_h2") or params.get("sdk") or "")


def mark_known_gaps(items: Iterable[pytest.Item]) -> None:
    """Mark the conformance tests that a known gap breaks as strict xfails naming the gap."""
    for item in items:
        if not item.nodeid.startswith(MODULE):
            continue
        callspec = getattr(item, "callspec", None)
        params = dict(callspec.params) if callspec else {}
        name = getattr(item, "originalname", item.name)
        reasons = [f"{g.id}: {g.title}" for g in GAPS if g.breaks(name, _sdk(params), params)]
        if reasons:
            item.add_marker(pytest.mark.xfail(strict=True, reason="; ".join(reasons)))
