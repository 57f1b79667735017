"""Checks on the locations a job may name: SSRF rules for webhook URLs, allowed roots for local paths.

Used at submission by the API (a 422 before anything runs) and again by the worker right before it
connects, because DNS can change between the two (rebinding).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Cloud metadata endpoints that are not covered by the address checks.
_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# IPv6 forms that carry an IPv4 destination (a packet to them reaches that IPv4 host through a
# relay or translator), so the IPv4 address inside must be public too.
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: IPv4 in the last 32 bits
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a site's own translator
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d (RFC 4291 2.5.5.1)
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT ::ffff:0:a.b.c.d (RFC 2765)
# Where the IPv4 address inside alone decides (newer Pythons count 2002::/16 as private; the
# rule should not change with the patch release). Teredo, IPv4-compatible and SIIT addresses
# must also pass as IPv6 addresses, which they never do (2001::/23 and ::/8 are not global).
_IPV4_DECIDES = (_IPV4_MAPPED, _SIXTOFOUR, _NAT64_WELL_KNOWN)
# Carrier-grade NAT (RFC 6598), where some clouds put their metadata service (100.100.100.200).
# Named on its own: Python before 3.11.10 / 3.12.4 does not count it in is_private.
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 transition address leads to (none for a plain IPv6 one)."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.teredo is not None:
        return list(address.teredo)  # the Teredo server and the (de-obfuscated) client
    if address in _SIXTOFOUR:
        return [ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)]
    if address in _NAT64_WELL_KNOWN or address in _IPV4_TRANSLATED:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # :: and ::1 are not IPv4-compatible
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def _forbidden_address(address: IPAddress) -> str | None:
    """Why a webhook may not connect to `address`, or None when it is globally routable.

    Only `is_global` addresses pass; the checks before it name the usual reasons in the error.
    An IPv6 address that embeds an IPv4 one (mapped, 6to4, Teredo, NAT64, IPv4-compatible) is
    judged by the IPv4 address it leads to as well.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL_USE:
            return "a local-use NAT64 address (it leads into a private network)"
        embedded = _embedded_ipv4(address)
        for inner in embedded:
            reason = _forbidden_address(inner)
            if reason:
                return f"{reason} ({inner}) embedded in an IPv6 transition address"
        if embedded and any(address in network for network in _IPV4_DECIDES):
            return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local (cloud metadata) address"
    if address.is_unspecified:
        return "an unspecified address"
    if address in _SHARED_ADDRESS_SPACE:
        return "a carrier-grade NAT (100.64.0.0/10, cloud metadata) address"
    if address.is_private or address.is_reserved or address.is_multicast:
        return "a private or reserved address"
    if not address.is_global:
        return "an address that is not globally routable"
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


def check_local_uri(
    raw: str, roots: list[Path] | tuple[Path, ...], setting: str = "FAPM_LOCAL_ROOTS"
) -> Path | None:
    """For a `file://` URI or bare path: its real path if it lies under one of `roots`, else
    ValueError. Other schemes return None (checked elsewhere).

    `..` and symlinks are resolved first, so neither can lead out of a root. With no roots
    configured, no local path is allowed. `setting` names where the roots come from, for the
    message (FAPM_LOCAL_ROOTS, or a tenant's entry in FAPM_TENANT_LOCATIONS_FILE).
    """
    path = local_path_of(raw)
    if path is None:
        return None
    real = path.resolve()
    for root in roots:
        if real == root or real.is_relative_to(root):
            return real
    if not roots:
        raise ValueError(f"{raw}: local paths are disabled on this server ({setting})")
    raise ValueError(f"{raw}: not under an allowed local root ({setting})")


# The longest file name (one path component) Linux file systems take, in bytes.
NAME_MAX = 255


def local_path_of(raw: str) -> Path | None:
    """The absolute path a `file://` URI or bare path names (not resolved), None for another
    scheme; ValueError for a relative path or a file:// URI with a host."""
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
    return path


def check_name_length(path: Path) -> None:
    """ValueError unless the last component of `path` is a name a file system can hold."""
    size = len(os.fsencode(path.name))
    if size > NAME_MAX:
        raise ValueError(
            f"{path.name[:40]}...: the output's name is {size} bytes; a file name holds at most "
            f"{NAME_MAX}"
        )


def check_local_output(
    raw: str,
    write_roots: list[Path] | tuple[Path, ...],
    all_roots: list[Path] | tuple[Path, ...],
    setting: str = "FAPM_LOCAL_ROOTS",
) -> Path | None:
    """For a local output: its real path if it lies strictly inside one of `write_roots` and is
    neither one of `all_roots` (every configured root, of every tenant) nor an ancestor of one,
    else ValueError. Other schemes return None.

    Publishing replaces the output directory whole (with overwrite) and stages beside it, so an
    output equal to or above a root would take the root's contents with it and stage outside
    every root.
    """
    real = check_local_uri(raw, write_roots, setting)
    if real is None:
        return None
    check_name_length(local_path_of(raw) or real)
    check_name_length(real)
    for root in all_roots:
        if root == real:
            raise ValueError(f"{raw}: is a local root itself; name a directory inside it")
        if root.is_relative_to(real):
            raise ValueError(f"{raw}: holds the local root {root}; name a directory inside it")
    return real
