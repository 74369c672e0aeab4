"""Strict key matching shared by the DiT and VAE ports."""

from __future__ import annotations

from typing import Iterable


def check_keys(found: Iterable[str], expected: Iterable[str], what: str,
               error: type[Exception] = ValueError) -> None:
    """Raise `error` naming every missing and unexpected key, prefixed by `what`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing}")
        if unexpected:
            parts.append(f"unexpected key(s) {unexpected}")
        raise error(f"{what}: " + "; ".join(parts))
