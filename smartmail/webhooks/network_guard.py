"""The SSRF guard: which webhook URLs may be saved, and which addresses a webhook may connect to."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import unicodedata
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import httpcore
import httpx

from smartmail.config.settings import parse_nameserver
from smartmail.errors import InvalidInput

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

MAX_URL_LENGTH = 2000

# The instance metadata services of AWS (IPv4 and its Nitro IPv6 endpoint), GCP and Azure: reachable
# from a cloud host, they hand out credentials, so they get a reason of their own.
CLOUD_METADATA = (IPv4Address("169.254.169.254"), IPv6Address("fd00:ec2::254"))
SHARED_ADDRESS_SPACE = IPv4Network("100.64.0.0/10")  # RFC 6598: carrier-grade NAT
PRIVATE_NETWORKS = (
    IPv4Network("10.0.0.0/8"),  # RFC 1918
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
    IPv6Network("fc00::/7"),  # RFC 4193 unique local addresses
)
NAT64_PREFIX = IPv6Network("64:ff9b::/96")  # RFC 6052: the well-known prefix, the IPv4 address in the last 32 bits
IPV4_COMPATIBLE = IPv6Network("::/96")  # RFC 4291 2.5.5.1 (deprecated): the IPv4 address in the last 32 bits
# Not globally reachable per the IANA special-purpose registries (RFC 6890), yet `is_global` in
# Python 3.11 before 3.11.10 (gh-113171) says they are: 192.0.0.192 is Oracle Cloud's metadata address.
NOT_GLOBAL_NETWORKS = (
    IPv4Network("192.0.0.0/24"),  # RFC 6890 IETF protocol assignments
    IPv6Network("fec0::/10"),  # RFC 3879: deprecated site-local
    IPv6Network("100::/64"),  # RFC 6666: discard-only
    IPv6Network("64:ff9b:1::/48"),  # RFC 8215: local-use NAT64
    IPv6Network("::ffff:0:0:0/96"),  # RFC 6145: IPv4-translated
)

# RFC 3986 3.2.2 leaves a host that ends in a number to the resolver; WHATWG URL ("ends in a number")
# and inet_aton read it as IPv4 in decimal, octal or hex (2130706433, 0x7f.1, 017700000001).
NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)", re.IGNORECASE)


class BlockedAddress(Exception):
    """A destination the guard refuses: `host` as asked for, the `address` it means, and the `reason`."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        if host == address:
            message = f"{address} is refused ({reason})"
        else:
            message = f"{host} resolves to {address} ({reason})"
        super().__init__(message)
        self.host = host
        self.address = address
        self.reason = reason


def embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4, IPv4-compatible), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64_PREFIX or address in IPV4_COMPATIBLE:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def forbidden_reason(address: IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """None if a webhook may connect to `address`, else why not: "loopback", "private", "cloud metadata"..."""
    embedded = embedded_ipv4(address) if isinstance(address, IPv6Address) else None
    if any(address in network or (embedded is not None and embedded in network) for network in allowed):
        return None
    if isinstance(address, IPv6Address):
        # ::1 and :: are inside ::/96 too: they are IPv6's own, not an embedded 0.0.0.1 or 0.0.0.0.
        if address.is_unspecified:
            return "unspecified"
        if address.is_loopback:
            return "loopback"
        if embedded is not None:
            # ::ffff:127.0.0.1 reaches 127.0.0.1 on a dual-stack socket, 64:ff9b::a00:1 reaches 10.0.0.1 through NAT64.
            return forbidden_reason(embedded)
    if address in CLOUD_METADATA:
        return "cloud metadata"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address in SHARED_ADDRESS_SPACE:
        return "shared address space (CGNAT)"
    if any(address in network for network in PRIVATE_NETWORKS):
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global or any(address in network for network in NOT_GLOBAL_NETWORKS):
        return "not globally routable"
    return None


def parse_networks(values: Sequence[str], *, field: str) -> list[IPNetwork]:
    """CIDRs (`10.0.0.0/8`, `fd00::/8`) or single addresses as networks; blank entries are skipped."""
    networks: list[IPNetwork] = []
    for value in values:
        text = value.strip()
        if not text:
            continue
        try:
            # strict=False: `10.1.2.3/8` means 10.0.0.0/8, as an operator writing it intends.
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise InvalidInput(
                f"{value!r} is not an IP network (a CIDR such as 10.0.0.0/8, or a single address)", field=field
            ) from None
    return networks


def check_url(url: str, *, allow_http: bool = False, allowed: Sequence[IPNetwork] = (), field: str = "url") -> str:
    """The save-time check of a webhook URL; returns it with scheme and host lower-cased, or raises InvalidInput.

    Host names are not resolved here: what a name points to may change, so GuardedBackend checks
    the addresses again on every connection.
    """

    def refuse(problem: str) -> InvalidInput:
        return InvalidInput(problem, field=field)

    if len(url) > MAX_URL_LENGTH:
        raise refuse(f"is longer than {MAX_URL_LENGTH} characters")
    if any(char.isspace() or unicodedata.category(char).startswith("C") for char in url):
        raise refuse("must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as error:
        raise refuse(f"is not a valid URL ({error})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise refuse(f"must be an https URL, not {scheme or 'no scheme'}")
    if scheme == "http" and not allow_http:
        raise refuse("must be https (SMARTMAIL_WEBHOOK_ALLOW_HTTP allows http for development)")
    if "@" in parts.netloc:
        raise refuse("must not carry a user name or password (user:pass@)")
    if "#" in url:
        raise refuse("must not have a fragment (#...)")
    if "\\" in parts.netloc:
        raise refuse("must not have a backslash in its host")
    host = (parts.hostname or "").lower()
    if not host:
        raise refuse("has no host")
    port = _port_text(parts.netloc)
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
        raise refuse(f"has a bad port {port!r} (1 to 65535)")

    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    normalized = urlunsplit((scheme, netloc, parts.path, parts.query, ""))
    try:
        parsed = httpx.URL(normalized)
    except httpx.InvalidURL as error:
        raise refuse(f"is not a valid URL ({error})") from None
    # The host as httpx will send and resolve it (IDNA-encoded), checked too: it is what gets connected to.
    for form in dict.fromkeys((host, parsed.raw_host.decode("ascii").lower())):
        problem = _host_problem(form, allowed)
        if problem:
            raise refuse(problem)
    return normalized


def _port_text(netloc: str) -> str | None:
    """The port as written after the host (`""` for a bare colon), None without one."""
    after_host = netloc.rpartition("]")[2] if netloc.startswith("[") else netloc
    if ":" not in after_host:
        return None
    return after_host.rpartition(":")[2]


def _host_problem(host: str, allowed: Sequence[IPNetwork]) -> str | None:
    name = host.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return f"host {host} is refused (RFC 6761 reserves localhost names for loopback)"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        reason = forbidden_reason(address, allowed)
        return f"host {host} is refused ({reason})" if reason else None
    if not NUMERIC_LABEL.fullmatch(name.rpartition(".")[2]):
        return None
    try:
        meant = IPv4Address(socket.inet_aton(name))
    except OSError:
        return f"host {host} is not a valid IPv4 address"
    # Parsers disagree on these spellings (some resolve them, some refuse them): refused outright.
    reason = forbidden_reason(meant, allowed)
    return f"host {host} is not a canonical IP address (it means {meant}{f', {reason}' if reason else ''})"


class Resolver:
    """Host name to addresses, at connect time: the system resolver (so /etc/hosts applies), or the given
    nameservers (`1.2.3.4`, `127.0.0.1:5353`, `[::1]:5353`) queried for A and AAAA with dnspython."""

    def __init__(self, nameservers: Sequence[str] = (), *, field: str = "nameservers") -> None:
        self._dns: dns.asyncresolver.Resolver | None = None
        if nameservers:
            self._dns = dns.asyncresolver.Resolver(configure=False)
            self._dns.nameservers = [_nameserver(value, field=field) for value in nameservers]
            self._dns.cache = None  # a name is resolved afresh for every connection: a cached answer could be stale

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The addresses of `host` in the resolver's order, without duplicates; httpcore.ConnectError if none."""
        try:
            return [ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))]
        except ValueError:
            pass
        if self._dns is None:
            addresses = await self._system_addresses(host, port)
        else:
            addresses = await self._dns_addresses(host)
        if not addresses:
            raise httpcore.ConnectError(f"{host}: no address")
        return list(dict.fromkeys(addresses))

    async def _system_addresses(self, host: str, port: int) -> list[IPAddress]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            raise httpcore.ConnectError(f"{host}: {error}") from error
        return [
            ipaddress.ip_address(sockaddr[0])
            for family, _, _, _, sockaddr in infos
            if family in (socket.AF_INET, socket.AF_INET6) and isinstance(sockaddr[0], str)
        ]

    async def _dns_addresses(self, host: str) -> list[IPAddress]:
        assert self._dns is not None
        answers = await asyncio.gather(self._query(host, "A"), self._query(host, "AAAA"))
        return [address for answer in answers for address in answer]

    async def _query(self, host: str, rdtype: str) -> list[IPAddress]:
        assert self._dns is not None
        try:
            answer = await self._dns.resolve(host, rdtype, raise_on_no_answer=False, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []  # a name with only A or only AAAA records is fine; none at all is caught by resolve()
        except dns.exception.DNSException as error:
            raise httpcore.ConnectError(f"{host}: {rdtype} lookup failed ({error})") from error
        return [ipaddress.ip_address(record.to_text()) for record in answer]


def _nameserver(value: str, *, field: str) -> dns.nameserver.Do53Nameserver:
    try:
        address, port = parse_nameserver(value)
    except ValueError as exc:
        raise InvalidInput(str(exc), field=field) from None
    return dns.nameserver.Do53Nameserver(address, port)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that resolves each host itself, refuses it if any of its addresses is
    forbidden, and connects to the checked address, never to the name again.

    Resolving anew on every connection (no cache) and refusing a name if ANY answer is forbidden is the
    defence against DNS rebinding: a name cannot pass the check with one address and connect to another.

    TLS still verifies the name: httpcore's AsyncHTTPConnection._connect (httpcore/_async/connection.py)
    calls `connect_tcp(host=origin host)` and then `stream.start_tls(ssl_context,
    server_hostname=sni_hostname or origin host)`, so SNI and the certificate check use the URL's host
    even though the socket was opened to an IP address (the `sni_hostname` request extension, unused
    here, would override it).
    """

    def __init__(
        self,
        resolver: Resolver,
        allowed: Sequence[IPNetwork] = (),
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._resolver = resolver
        self._allowed = tuple(allowed)
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            # One deadline for resolving and every connection attempt: httpx's connect timeout.
            async with asyncio.timeout(timeout):
                addresses = await self._resolver.resolve(host, port)
                for address in addresses:
                    reason = forbidden_reason(address, self._allowed)
                    if reason is not None:
                        raise BlockedAddress(host, str(address), reason)
                return await self._connect_first(host, addresses, port, local_address, socket_options)
        except TimeoutError as error:
            raise httpcore.ConnectTimeout(f"{host}:{port}: not connected within {timeout}s") from error

    async def _connect_first(
        self,
        host: str,
        addresses: Sequence[IPAddress],
        port: int,
        local_address: str | None,
        socket_options: Iterable[Any] | None,
    ) -> httpcore.AsyncNetworkStream:
        last_error: Exception = httpcore.ConnectError(f"{host}: no address")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=None,  # the deadline around all attempts applies
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, OSError) as error:
                last_error = error
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress(path, path, "unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def guarded_transport(
    *,
    resolver: Resolver,
    allowed: Sequence[IPNetwork] = (),
    http2: bool = True,
    max_connections: int = 10,
    verify: ssl.SSLContext | bool = True,
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections all go through GuardedBackend (keep-alive on, no retries).

    Use it with `httpx.AsyncClient(transport=..., trust_env=False)`: with trust_env an HTTP(S)_PROXY
    from the environment would be mounted for the URLs instead, and the proxy, not the guard, would
    connect to the destination. A refused destination raises BlockedAddress out of `client.post(...)`
    unwrapped (httpx maps only httpcore's exceptions); other failures are httpx.TransportError.
    """
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    ssl_context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify, trust_env=False)
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, http2=http2, limits=limits, trust_env=False, retries=0)
    # httpx's transport takes no network backend, so its pool is swapped for one built with the same
    # arguments plus the guard. Should an httpx upgrade rename `_pool` or change its type, fail here
    # rather than send through an unguarded pool.
    unguarded = getattr(transport, "_pool", None)
    if type(unguarded) is not httpcore.AsyncConnectionPool:
        raise RuntimeError(
            f"httpx {httpx.__version__}: AsyncHTTPTransport._pool is {type(unguarded).__name__}, not "
            "httpcore.AsyncConnectionPool: cannot install the webhook SSRF guard"
        )
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=True,
        http2=http2,
        retries=0,
        network_backend=GuardedBackend(resolver, allowed),
    )
    return transport
