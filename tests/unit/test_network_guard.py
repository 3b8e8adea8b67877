"""Unit tests for smartmail.webhooks.network_guard: refused addresses and URLs, DNS rebinding, the guarded transport."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address, ip_network

import anyio
import httpcore
import httpx
import pytest
import trustme

from smartmail.errors import InvalidInput
from smartmail.webhooks import network_guard
from smartmail.webhooks.network_guard import (
    BlockedAddress,
    GuardedBackend,
    Resolver,
    check_url,
    forbidden_reason,
    guarded_transport,
    parse_networks,
)
from tests.dns_server import DnsServer

PUBLIC = "93.184.215.14"
LOOPBACK = [ip_network("127.0.0.0/8")]

# --- forbidden_reason ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("100.64.0.1", "shared address space (CGNAT)"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "reserved"),
        ("240.0.0.1", "reserved"),
        ("192.0.0.192", "not globally routable"),
        ("198.18.0.1", "not globally routable"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fc00::1", "private"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("fec0::1", "not globally routable"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("64:ff9b::7f00:1", "loopback"),
        ("2002:7f00:1::1", "loopback"),
        ("::127.0.0.1", "loopback"),
        ("fd00:ec2::254", "cloud metadata"),
    ],
)
def test_forbidden_addresses_have_a_reason(address, reason):
    assert forbidden_reason(ip_address(address)) == reason


@pytest.mark.parametrize("address", [PUBLIC, "2606:4700::1111", "8.8.8.8", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address):
    assert forbidden_reason(ip_address(address)) is None


def test_allowed_networks_let_their_addresses_through_also_when_embedded_in_ipv6():
    assert forbidden_reason(ip_address("127.0.0.1"), LOOPBACK) is None
    assert forbidden_reason(ip_address("::ffff:127.0.0.1"), LOOPBACK) is None
    assert forbidden_reason(ip_address("10.0.0.1"), LOOPBACK) == "private"
    assert forbidden_reason(ip_address("::1"), LOOPBACK) == "loopback"


def test_parse_networks_takes_cidrs_and_single_addresses():
    networks = parse_networks(["10.0.0.0/8", " 192.168.1.7 ", "fd00::/8", "10.1.2.3/16", ""], field="allowed")
    assert [str(network) for network in networks] == ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8", "10.1.0.0/16"]


def test_parse_networks_names_the_field_and_the_bad_value():
    with pytest.raises(InvalidInput) as caught:
        parse_networks(["10.0.0.0/8", "10.0.0.0/33"], field="SMARTMAIL_WEBHOOK_ALLOWED_NETWORKS")
    assert caught.value.field == "SMARTMAIL_WEBHOOK_ALLOWED_NETWORKS"
    assert "'10.0.0.0/33'" in str(caught.value)


def test_blocked_address_names_host_address_and_reason():
    error = BlockedAddress("hooks.example.com", "10.0.0.5", "private")
    assert str(error) == "hooks.example.com resolves to 10.0.0.5 (private)"
    assert (error.host, error.address, error.reason) == ("hooks.example.com", "10.0.0.5", "private")
    assert str(BlockedAddress("10.0.0.5", "10.0.0.5", "private")) == "10.0.0.5 is refused (private)"


# --- check_url ----------------------------------------------------------------------------------


def test_check_url_normalizes_scheme_and_host():
    assert check_url("HTTPS://Hooks.Example.COM:8443/In/Box?Key=V") == "https://hooks.example.com:8443/In/Box?Key=V"
    assert check_url("https://[2606:4700::1111]/x") == "https://[2606:4700::1111]/x"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://hooks.example.com/", "must be an https URL"),
        ("hooks.example.com/path", "must be an https URL"),
        ("http://hooks.example.com/", "must be https (SMARTMAIL_WEBHOOK_ALLOW_HTTP allows http for development)"),
        ("https:///path", "has no host"),
        ("https://user:secret@hooks.example.com/", "user name or password"),
        ("https://hooks.example.com/#top", "fragment"),
        ("https://hooks.example.com:99999/", "bad port '99999'"),
        ("https://hooks.example.com:0/", "bad port '0'"),
        ("https://hooks.example.com:https/", "bad port 'https'"),
        ("https://hooks.example.com/" + "a" * 2000, "longer than 2000 characters"),
        ("https://hooks.example.com/a b", "whitespace or control characters"),
        ("https://hooks.example.com/\x00", "whitespace or control characters"),
        ("https://hooks.example.com\r\n/", "whitespace or control characters"),
        ("https://127.0.0.1/", "127.0.0.1 is refused (loopback)"),
        ("https://10.0.0.5:8443/", "10.0.0.5 is refused (private)"),
        ("https://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("https://[::1]/", "::1 is refused (loopback)"),
        ("https://[::ffff:127.0.0.1]/", "loopback"),
        ("https://[fd00:ec2::254]/", "cloud metadata"),
        ("https://2130706433/", "2130706433 is not a canonical IP address (it means 127.0.0.1, loopback)"),
        ("https://0x7f.1/", "0x7f.1 is not a canonical IP address (it means 127.0.0.1, loopback)"),
        ("https://017700000001/", "017700000001 is not a canonical IP address (it means 127.0.0.1, loopback)"),
        ("https://0x5db8d70e/", "not a canonical IP address (it means 93.184.215.14)"),
        ("https://1.2.3.4.5/", "not a valid IPv4 address"),
        ("https://localhost/", "localhost is refused"),
        ("https://LOCALHOST:8000/", "localhost is refused"),
        ("https://hooks.localhost/", "hooks.localhost is refused"),
        ("https://localhost./", "localhost. is refused"),
    ],
)
def test_check_url_refusals_name_the_problem(url, problem):
    with pytest.raises(InvalidInput) as caught:
        check_url(url)
    assert caught.value.field == "url"
    assert problem in str(caught.value)


def test_check_url_field_is_the_callers():
    with pytest.raises(InvalidInput) as caught:
        check_url("https://127.0.0.1/", field="endpoints[2].url")
    assert caught.value.field == "endpoints[2].url"


def test_check_url_allows_http_and_allowed_networks_when_told():
    assert check_url("HTTP://Hooks.Example.com/x", allow_http=True) == "http://hooks.example.com/x"
    assert check_url("http://127.0.0.1:8000/", allow_http=True, allowed=LOOPBACK) == "http://127.0.0.1:8000/"


def test_check_url_does_not_resolve_names():
    # A name is judged at connect time (it may change); the save-time check has no DNS to wait on.
    assert check_url("https://hooks.invalid/") == "https://hooks.invalid/"


# --- GuardedBackend with canned answers ---------------------------------------------------------


class CannedResolver(Resolver):
    """Answers each resolve() with the next list of addresses (the last one repeats)."""

    def __init__(self, *answers: list[str], delay: float = 0.0) -> None:
        super().__init__()
        self.answers = [[ip_address(text) for text in answer] for answer in answers]
        self.delay = delay
        self.calls: list[str] = []

    async def resolve(self, host, port):
        self.calls.append(host)
        await asyncio.sleep(self.delay)
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


class FakeStream(httpcore.AsyncNetworkStream):
    def __init__(self, host: str) -> None:
        self.host = host


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Records the hosts it is asked to connect to; `refuse` lists those that fail to connect."""

    def __init__(self, refuse: tuple[str, ...] = (), hang: bool = False) -> None:
        self.connected: list[str] = []
        self.refuse = refuse
        self.hang = hang

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.connected.append(host)
        if self.hang:  # as AnyIOBackend waits: in an anyio task group, cancelled by the guard's deadline
            async with anyio.create_task_group():
                await anyio.sleep_forever()
        if host in self.refuse:
            raise httpcore.ConnectError(f"{host}: connection refused")
        return FakeStream(host)

    async def sleep(self, seconds):
        await asyncio.sleep(seconds)


def test_backend_resolves_on_every_connect_and_refuses_a_name_that_rebinds_to_a_private_address():
    resolver = CannedResolver([PUBLIC], ["10.0.0.5"])
    inner = RecordingBackend()
    backend = GuardedBackend(resolver, inner=inner)

    async def connect_twice():
        first = await backend.connect_tcp("hooks.example.com", 443)
        with pytest.raises(BlockedAddress) as caught:
            await backend.connect_tcp("hooks.example.com", 443)
        return first, caught.value

    first, blocked = asyncio.run(connect_twice())
    assert isinstance(first, FakeStream) and first.host == PUBLIC  # the checked address, not the name
    assert str(blocked) == "hooks.example.com resolves to 10.0.0.5 (private)"
    assert resolver.calls == ["hooks.example.com", "hooks.example.com"]
    assert inner.connected == [PUBLIC]


def test_backend_refuses_a_name_with_any_forbidden_answer():
    inner = RecordingBackend()
    backend = GuardedBackend(CannedResolver([PUBLIC, "2606:4700::1111", "::ffff:169.254.169.254"]), inner=inner)
    with pytest.raises(BlockedAddress) as caught:
        asyncio.run(backend.connect_tcp("hooks.example.com", 443))
    assert ip_address(caught.value.address) == ip_address("::ffff:169.254.169.254")
    assert caught.value.reason == "cloud metadata"
    assert inner.connected == []


def test_backend_tries_the_addresses_in_order_and_raises_the_last_error():
    inner = RecordingBackend(refuse=("2606:4700::1111",))
    backend = GuardedBackend(CannedResolver(["2606:4700::1111", PUBLIC]), inner=inner)
    stream = asyncio.run(backend.connect_tcp("hooks.example.com", 443))
    assert stream.host == PUBLIC
    assert inner.connected == ["2606:4700::1111", PUBLIC]

    inner = RecordingBackend(refuse=("2606:4700::1111", PUBLIC))
    backend = GuardedBackend(CannedResolver(["2606:4700::1111", PUBLIC]), inner=inner)
    with pytest.raises(httpcore.ConnectError, match=PUBLIC):
        asyncio.run(backend.connect_tcp("hooks.example.com", 443))


def test_backend_allowed_networks_pass():
    inner = RecordingBackend()
    backend = GuardedBackend(CannedResolver(["10.0.0.5"]), allowed=[ip_network("10.0.0.0/24")], inner=inner)
    asyncio.run(backend.connect_tcp("hooks.internal", 443))
    assert inner.connected == ["10.0.0.5"]


@pytest.mark.parametrize(
    ("resolver", "inner"),
    [(CannedResolver([PUBLIC], delay=5), RecordingBackend()), (CannedResolver([PUBLIC]), RecordingBackend(hang=True))],
    ids=["slow-resolve", "slow-connect"],
)
def test_backend_timeout_covers_resolving_and_connecting(resolver, inner):
    backend = GuardedBackend(resolver, inner=inner)
    with pytest.raises(httpcore.ConnectTimeout):
        asyncio.run(backend.connect_tcp("hooks.example.com", 443, timeout=0.05))


def test_backend_refuses_unix_sockets():
    with pytest.raises(BlockedAddress, match="unix socket"):
        asyncio.run(GuardedBackend(Resolver(), inner=RecordingBackend()).connect_unix_socket("/run/docker.sock"))


# --- Resolver -----------------------------------------------------------------------------------


def test_resolver_returns_an_ip_literal_as_it_is():
    assert asyncio.run(Resolver().resolve("10.0.0.5", 443)) == [ip_address("10.0.0.5")]
    assert asyncio.run(Resolver(["192.0.2.1"]).resolve("::1", 443)) == [ip_address("::1")]


def test_resolver_without_nameservers_uses_the_system_resolver():
    assert ip_address("127.0.0.1") in asyncio.run(Resolver().resolve("localhost", 80))


def test_resolver_queries_the_given_nameservers_for_a_and_aaaa():
    with DnsServer({"hook.test": ["2606:4700::1111", PUBLIC, PUBLIC], "v4.test": [PUBLIC]}) as server:
        resolver = Resolver([server.address])
        assert asyncio.run(resolver.resolve("hook.test", 443)) == [ip_address(PUBLIC), ip_address("2606:4700::1111")]
        assert asyncio.run(resolver.resolve("HOOK.test.", 443)) == [ip_address(PUBLIC), ip_address("2606:4700::1111")]
        assert asyncio.run(resolver.resolve("v4.test", 443)) == [ip_address(PUBLIC)]
        with pytest.raises(httpcore.ConnectError, match="unknown.test: no address"):
            asyncio.run(resolver.resolve("unknown.test", 443))
        assert ("hook.test", "A") in server.queries and ("hook.test", "AAAA") in server.queries


def test_a_name_rebound_by_its_nameserver_is_refused_on_the_next_connect():
    with DnsServer({"hook.test": [PUBLIC]}) as server:
        inner = RecordingBackend()
        backend = GuardedBackend(Resolver([server.address]), inner=inner)
        asyncio.run(backend.connect_tcp("hook.test", 443))
        server.answers["hook.test"] = ["127.0.0.1"]
        with pytest.raises(BlockedAddress) as caught:
            asyncio.run(backend.connect_tcp("hook.test", 443))
    assert str(caught.value) == "hook.test resolves to 127.0.0.1 (loopback)"
    assert inner.connected == [PUBLIC]


@pytest.mark.parametrize("nameserver", ["dns.example.com", "1.2.3.4:0", "1.2.3.4:x", "[::1]:99999", "::1:53:x"])
def test_resolver_refuses_a_malformed_nameserver(nameserver):
    with pytest.raises(InvalidInput) as caught:
        Resolver([nameserver], field="SMARTMAIL_WEBHOOK_NAMESERVERS")
    assert caught.value.field == "SMARTMAIL_WEBHOOK_NAMESERVERS"
    assert repr(nameserver) in str(caught.value)


def test_resolver_takes_nameservers_with_and_without_ports():
    Resolver(["1.2.3.4", "127.0.0.1:5353", "[::1]:5353", "::1", "[::1]"])


# --- The transport, end to end on loopback ------------------------------------------------------


class RecordingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def setup(self):
        super().setup()
        self.server.connections += 1  # type: ignore[attr-defined]

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append((self.headers["Host"], body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format, *args):
        pass


def serve(tls: ssl.SSLContext | None = None) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingHandler)
    server.connections = 0  # type: ignore[attr-defined]
    server.requests = []  # type: ignore[attr-defined]
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_server():
    yield from serve()


def post(transport: httpx.AsyncHTTPTransport, url: str, *bodies: bytes) -> list[httpx.Response]:
    async def send():
        async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=5) as client:
            return [await client.post(url, content=body) for body in bodies]

    return asyncio.run(send())


def test_transport_refuses_loopback_and_nothing_reaches_the_server(http_server):
    port = http_server.server_address[1]
    with pytest.raises(BlockedAddress) as caught:  # not wrapped: httpx maps only httpcore's exceptions
        post(guarded_transport(resolver=Resolver(), allowed=[]), f"http://127.0.0.1:{port}/", b"{}")
    assert str(caught.value) == "127.0.0.1 is refused (loopback)"
    assert http_server.connections == 0 and http_server.requests == []


def test_transport_refuses_a_name_that_resolves_to_loopback(http_server):
    port = http_server.server_address[1]
    with pytest.raises(BlockedAddress) as caught:
        post(guarded_transport(resolver=Resolver()), f"http://localhost:{port}/", b"{}")
    assert caught.value.host == "localhost" and caught.value.reason == "loopback"
    assert http_server.connections == 0


def test_transport_refuses_a_numeric_host_the_system_resolver_reads_as_loopback(http_server):
    # check_url refuses this spelling at save time; at connect time getaddrinfo reads it as 127.0.0.1.
    port = http_server.server_address[1]
    with pytest.raises(BlockedAddress) as caught:
        post(guarded_transport(resolver=Resolver()), f"http://2130706433:{port}/", b"{}")
    assert str(caught.value) == "2130706433 resolves to 127.0.0.1 (loopback)"
    assert http_server.connections == 0


def test_transport_delivers_to_an_allowed_network_over_one_kept_alive_connection(http_server):
    port = http_server.server_address[1]
    transport = guarded_transport(resolver=Resolver(), allowed=LOOPBACK)
    responses = post(transport, f"http://127.0.0.1:{port}/hook", b'{"n": 1}', b'{"n": 2}')
    assert [response.status_code for response in responses] == [200, 200]
    assert http_server.requests == [(f"127.0.0.1:{port}", b'{"n": 1}'), (f"127.0.0.1:{port}", b'{"n": 2}')]
    assert http_server.connections == 1


def test_transport_connects_to_the_resolved_address_and_keeps_the_name_in_the_host_header(http_server):
    port = http_server.server_address[1]
    with DnsServer({"hook.test": ["127.0.0.1"]}) as dns_server:
        transport = guarded_transport(resolver=Resolver([dns_server.address]), allowed=LOOPBACK)
        (response,) = post(transport, f"http://hook.test:{port}/", b"{}")
    assert response.status_code == 200
    assert http_server.requests == [(f"hook.test:{port}", b"{}")]


def test_a_refused_connection_is_an_httpx_connect_error():
    with socket.socket() as bound:  # bound, never listening: refused, and no other process can take the port
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with pytest.raises(httpx.ConnectError):
            post(guarded_transport(resolver=Resolver(), allowed=LOOPBACK), f"http://127.0.0.1:{port}/", b"{}")


@pytest.fixture(scope="module")
def certificate_authority():
    return trustme.CA()


def tls_server(authority: trustme.CA, name: str) -> Iterator[ThreadingHTTPServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(name).configure_cert(context)
    yield from serve(context)


def trusting(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return context


def test_tls_verifies_the_url_host_though_the_socket_goes_to_the_address(certificate_authority):
    for server in tls_server(certificate_authority, "hook.test"):
        port = server.server_address[1]
        transport = guarded_transport(
            resolver=CannedResolver(["127.0.0.1"]), allowed=LOOPBACK, verify=trusting(certificate_authority)
        )
        (response,) = post(transport, f"https://hook.test:{port}/", b"{}")
        assert response.status_code == 200
        assert server.requests == [(f"hook.test:{port}", b"{}")]


def test_tls_refuses_a_certificate_for_another_name(certificate_authority):
    for server in tls_server(certificate_authority, "other.test"):
        port = server.server_address[1]
        transport = guarded_transport(
            resolver=CannedResolver(["127.0.0.1"]), allowed=LOOPBACK, verify=trusting(certificate_authority)
        )
        with pytest.raises(httpx.ConnectError, match="hostname mismatch|doesn't match|not valid for"):
            post(transport, f"https://hook.test:{port}/", b"{}")
        assert server.requests == []


def test_guarded_transport_fails_loudly_if_httpx_moves_its_pool(monkeypatch):
    class RenamedPoolTransport(httpx.AsyncHTTPTransport):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._connection_pool = self.__dict__.pop("_pool")

    monkeypatch.setattr(network_guard.httpx, "AsyncHTTPTransport", RenamedPoolTransport)
    with pytest.raises(RuntimeError, match="cannot install the webhook SSRF guard"):
        guarded_transport(resolver=Resolver())


def test_guarded_transport_pool_uses_the_guard():
    transport = guarded_transport(resolver=Resolver(), max_connections=3, http2=False)
    pool = transport._pool
    assert isinstance(pool, httpcore.AsyncConnectionPool)
    assert isinstance(pool._network_backend, GuardedBackend)
    assert pool._max_connections == 3
