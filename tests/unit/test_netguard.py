"""app.core.netguard: webhook URL SSRF rules and local-root containment (no network needed:
literal addresses and `localhost` resolve locally)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from app.core.netguard import check_local_uri, check_webhook_url

# -- webhook URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", "http"),
        ("https:///nohost", "host"),
        ("not a url", "http"),
        ("https://user:pw@example.com/", "credentials"),
        ("http://example.com/", "https"),
        ("https://metadata.google.internal/", "metadata"),
        ("https://169.254.169.254/latest/", "link-local"),
        ("https://[fe80::1]/", "link-local"),
        ("https://127.0.0.1/", "loopback"),
        ("https://[::1]/", "loopback"),
        ("https://[::ffff:127.0.0.1]/", "loopback"),
        ("https://10.0.0.1/", "private"),
        ("https://172.16.5.4/", "private"),
        ("https://192.168.1.1/", "private"),
        ("https://[fd00::1]/", "private"),
        ("https://0.0.0.0/", "private|unspecified"),
        ("https://224.0.0.1/", "private"),
        ("https://localhost/", "loopback"),  # checked after DNS resolution
    ],
)
def test_refused_webhook_urls(url, message):
    with pytest.raises(ValueError, match=message):
        check_webhook_url(url, allow=[])


def test_public_https_address_is_allowed():
    assert check_webhook_url("https://93.184.215.14/hook", allow=[]) == ["93.184.215.14"]


def test_allow_list_permits_http_and_private_hosts_without_dns(monkeypatch):
    def no_dns(*args, **kwargs):
        raise AssertionError("allow-listed hosts must not be resolved")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert check_webhook_url("http://127.0.0.1:8080/h", allow=["127.0.0.1"]) == []
    assert check_webhook_url("http://Hooks.Internal./h", allow=["hooks.internal"]) == []
    # Only the named host: another private address is still refused.
    with pytest.raises(ValueError):
        check_webhook_url("https://10.0.0.1/", allow=["127.0.0.1"])


def test_a_name_resolving_to_a_private_address_is_refused(monkeypatch):
    """DNS rebinding / internal names: the addresses the name resolves to are what count."""

    def resolve(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(ValueError, match="private"):
        check_webhook_url("https://innocent.example.com/", allow=[])


def test_unresolvable_host_is_refused(monkeypatch):
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(ValueError, match="does not resolve"):
        check_webhook_url("https://nowhere.invalid/", allow=[])


@pytest.mark.parametrize(
    ("address", "message"),
    [
        # Carrier-grade NAT (RFC 6598), with a cloud's metadata service at 100.100.100.200.
        ("100.100.100.200", "carrier-grade NAT"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.254", "carrier-grade NAT"),
        # Not globally routable for other reasons.
        ("198.18.0.1", "private"),  # benchmarking
        ("192.0.2.1", "private"),  # documentation
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("[ff0e::1]", "reserved"),  # global-scope multicast
        ("[2001:db8::1]", "reserved"),
        # 6to4 (2002:AABB:CCDD::) of loopback, link-local metadata, private, CGNAT.
        ("[2002:7f00:1::]", "loopback .* .127.0.0.1. embedded"),
        ("[2002:a9fe:a9fe::]", "link-local .* .169.254.169.254. embedded"),
        ("[2002:a00:1::1]", "private .* .10.0.0.1. embedded"),
        ("[2002:6464:64c8::]", "carrier-grade NAT .* .100.100.100.200. embedded"),
        # NAT64: the well-known prefix carries IPv4 in its last 32 bits; local-use is a site's.
        ("[64:ff9b::7f00:1]", "loopback .* .127.0.0.1. embedded"),
        ("[64:ff9b::a9fe:a9fe]", "link-local"),
        ("[64:ff9b::169.254.169.254]", "link-local"),
        ("[64:ff9b:1::808:808]", "local-use NAT64"),
        # Teredo: server 65.54.227.120, client 127.0.2.45 (stored inverted: 80ff:fdd2).
        ("[2001:0:4136:e378:8000:63bf:80ff:fdd2]", "loopback .* .127.0.2.45. embedded"),
        ("[2001:0:4136:e378:8000:63bf:f7f7:f7f7]", "private"),  # Teredo is never global
        # IPv4-compatible (::a.b.c.d, deprecated) and SIIT-translated (::ffff:0:a.b.c.d).
        ("[::7f00:1]", "loopback .* .127.0.0.1. embedded"),
        ("[::169.254.169.254]", "link-local"),
        ("[::8.8.8.8]", "reserved"),  # deprecated form: not routable even to a public IPv4
        ("[::ffff:0:a9fe:a9fe]", "link-local"),
        # IPv4-mapped, in both spellings.
        ("[::ffff:a9fe:a9fe]", "link-local"),
        ("[::ffff:100.100.100.200]", "carrier-grade NAT"),
    ],
)
def test_non_global_and_embedded_addresses_are_refused(address, message):
    with pytest.raises(ValueError, match=message):
        check_webhook_url(f"https://{address}/hook", allow=[])


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "100.128.0.1",  # just past 100.64.0.0/10
        "100.63.255.255",  # just before it
        "[2001:4860:4860::8888]",
        "[2002:808:808::1]",  # 6to4 of a public address
        "[64:ff9b::808:808]",  # NAT64 of a public address
        "[::ffff:8.8.8.8]",
    ],
)
def test_globally_routable_addresses_are_allowed(address):
    resolved = check_webhook_url(f"https://{address}/hook", allow=[])
    assert resolved == [str(ipaddress.ip_address(address.strip("[]")))]


def test_a_name_resolving_to_an_embedded_private_address_is_refused(monkeypatch):
    """AAAA records count too: a 6to4 address of the metadata service is refused."""

    def resolve(host, port, *args, **kwargs):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2002:a9fe:a9fe::", port, 0, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(ValueError, match="link-local"):
        check_webhook_url("https://innocent.example.com/", allow=[])


def test_allow_listed_host_may_use_a_carrier_grade_nat_address():
    assert check_webhook_url("https://100.100.100.200/h", allow=["100.100.100.200"]) == []


# -- local paths -------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path) -> Path:
    root = (tmp_path / "root").resolve()
    (root / "models" / "a").mkdir(parents=True)
    return root


def test_paths_under_a_root_are_allowed(root):
    assert check_local_uri(str(root / "models" / "a"), [root]) == root / "models" / "a"
    assert check_local_uri(f"file://{root}/models/a", [root]) == root / "models" / "a"
    assert check_local_uri(f"file://localhost{root}/models/a", [root]) == root / "models" / "a"
    # Not yet existing outputs are fine too.
    assert check_local_uri(f"{root}/out/new", [root]) == root / "out" / "new"
    assert check_local_uri(str(root), [root]) == root
    # Percent-encoding is decoded before the check.
    assert check_local_uri(f"file://{root}/models/%61", [root]) == root / "models" / "a"


def test_other_schemes_are_not_local(root):
    assert check_local_uri("s3://bucket/x", [root]) is None
    assert check_local_uri("hf://org/name@main", [root]) is None


@pytest.mark.parametrize(
    "raw",
    [
        "/etc/passwd",
        "{root}/../outside",
        "{root}/models/../../outside",
        "file://{root}/../outside",
        "file://{root}/%2e%2e/outside",
        "{root}-sibling/x",  # a prefix of the root's name is not inside it
    ],
)
def test_escapes_are_refused(root, raw):
    with pytest.raises(ValueError, match="FAPM_LOCAL_ROOTS"):
        check_local_uri(raw.format(root=root), [root])


def test_symlink_out_of_the_root_is_refused(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="not under"):
        check_local_uri(f"{root}/escape/model", [root])
    # A symlink that stays inside the root is fine.
    (root / "alias").symlink_to(root / "models", target_is_directory=True)
    assert check_local_uri(f"{root}/alias/a", [root]) == root / "models" / "a"


@pytest.mark.parametrize("raw", ["relative/path", "./x", "file://remotehost/x"])
def test_relative_and_remote_host_paths_are_refused(root, raw):
    with pytest.raises(ValueError):
        check_local_uri(raw, [root])


def test_no_roots_means_no_local_paths(root):
    with pytest.raises(ValueError, match="disabled"):
        check_local_uri(str(root / "models"), [])
