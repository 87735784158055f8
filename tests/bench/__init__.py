"""Benchmarks (`just bench`): each module prints a Markdown table and writes a JSON file."""

from __future__ import annotations

import os


def load_note(before: float, after: float) -> str:
    """The sentence every benchmark ends with: the machine's load while it ran."""
    return (f"{os.cpu_count()} cores, 1-min load average {before:.1f} → {after:.1f}: other work "
            "on the machine lowers every figure.")
