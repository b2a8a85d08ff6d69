"""How sieve prints counts and byte sizes: one format for every command and the report."""

from __future__ import annotations


def count(n: float) -> str:
    """Parameters and other counts: 134_515_008 -> '134.5M', 1.2e9 -> '1.2B'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def file_size(n: float | None) -> str:
    """Bytes in binary units: 538_123_456 -> '513.2 MiB' (None -> '')."""
    if n is None:
        return ""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
