"""How measured figures are written: counts, bytes (MiB) and multiply-accumulates."""

from __future__ import annotations


def format_count(n: int | None) -> str:
    """``1,234,567``; ``-`` for an unmeasured figure."""
    return "-" if n is None else f"{n:,}"


def format_bytes(n: int | None) -> str:
    """Bytes in MiB with two decimals; ``-`` for an unmeasured figure."""
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def format_macs(n: float | None) -> str:
    """MACs with a G / M / K prefix; ``-`` for an unmeasured figure."""
    if n is None:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.3f} G"
    if n >= 1e6:
        return f"{n / 1e6:.3f} M"
    if n >= 1e3:
        return f"{n / 1e3:.2f} K"
    return f"{n:.0f}"
