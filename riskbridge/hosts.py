"""Whether a host is this machine: the one loopback test behind every "only on loopback" rule (credentials over
plain http, the storage SCP without TLS, default secrets accepted for the sandbox)."""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = frozenset({"localhost"})


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ``::1``, IPv4-mapped 127.x, with or without an
    IPv6 zone or URL brackets); False for every other name or address, and for none."""
    if not host:
        return False
    name = host.strip().strip("[]").rstrip(".").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
