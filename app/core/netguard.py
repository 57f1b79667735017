"""Checks on the locations a job may name: SSRF rules for webhook URLs, allowed roots for local paths.

Used at submission by the API (a 422 before anything runs) and again by the worker right before it
connects, because DNS can change between the two (rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Cloud metadata endpoints that are not covered by the private/link-local checks.
_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}


def _forbidden_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local (cloud metadata) address"
    if address.is_private or address.is_reserved or address.is_multicast:
        return "a private or reserved address"
    if address.is_unspecified:
        return "an unspecified address"
    return None


def check_webhook_url(url: str, allow: list[str], resolve: bool = True) -> list[str]:
    """Raise ValueError unless `url` may receive webhooks; return the addresses it resolves to.

    Hosts in `allow` may use plain http and any address (in-cluster registries, tests). Anyone
    else: https, and every address the name resolves to must be public.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("webhook.url must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise ValueError("webhook.url must not carry credentials; use webhook.secret")
    if host in {h.lower() for h in allow}:
        return []
    if parts.scheme != "https":
        raise ValueError(
            f"webhook.url must use https (or name a host in FAPM_WEBHOOK_ALLOW): {host}"
        )
    if host in _METADATA_HOSTS:
        raise ValueError(f"webhook.url host {host} is a cloud metadata endpoint")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    elif not resolve:
        return []
    else:
        try:
            infos = socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise ValueError(f"webhook.url host {host} does not resolve: {exc.strerror}") from exc
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        reason = _forbidden_address(address)
        if reason:
            raise ValueError(f"webhook.url host {host} resolves to {reason} ({address})")
    return [str(a) for a in addresses]


def check_local_uri(raw: str, roots: list[Path]) -> Path | None:
    """For a `file://` URI or bare path: its real path if it lies under one of `roots`, else
    ValueError. Other schemes return None (checked elsewhere).

    `..` and symlinks are resolved first, so neither can lead out of a root. With no roots
    configured, no local path is allowed.
    """
    if "://" in raw:
        parts = urlsplit(raw)
        if parts.scheme.lower() != "file":
            return None
        if parts.netloc not in ("", "localhost"):
            raise ValueError("file:// URIs must name a local path (file:///abs/path)")
        path = Path(unquote(parts.path))
    else:
        path = Path(raw)
    if not path.is_absolute():
        raise ValueError(f"{raw}: local paths must be absolute")
    real = path.resolve()
    for root in roots:
        if real == root or real.is_relative_to(root):
            return real
    if not roots:
        raise ValueError(f"{raw}: local paths are disabled on this server (FAPM_LOCAL_ROOTS)")
    raise ValueError(f"{raw}: not under an allowed local root (FAPM_LOCAL_ROOTS)")
