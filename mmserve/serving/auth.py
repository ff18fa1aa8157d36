"""Who may call POST /admin/reload: the bearer token when one is configured, else callers on this machine."""

from __future__ import annotations

import hmac
import ipaddress


def is_loopback(host: str | None) -> bool:
    """True for a caller on this machine (127.0.0.0/8, ::1)."""
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_authorized(authorization: str | None, token: str | None, client_host: str | None) -> bool:
    """With an admin token: the header is exactly `Bearer <token>` (constant-time). Without one: loopback callers
    only, so a server whose port is published does not let anyone on the network swap its registry."""
    if token is None:
        return is_loopback(client_host)
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())
