"""A tiny UDP DNS server for tests: A and AAAA answers from a dict the test may change while it runs."""

from __future__ import annotations

import ipaddress
import socket
import threading

import dns.exception
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    """Answers A and AAAA queries from `answers` (name -> addresses, both families in one list), with TTL 0
    so nothing caches them; an unknown name or type gets an empty NOERROR answer, never NXDOMAIN.

        with DnsServer({"hook.test": ["93.184.215.14"]}) as server:
            Resolver([server.address])             # "127.0.0.1:<port>", as SMARTMAIL_WEBHOOK_NAMESERVERS
            server.answers["hook.test"] = ["127.0.0.1"]   # the next query sees it
    """

    def __init__(self, answers: dict[str, list[str]] | None = None, host: str = "127.0.0.1") -> None:
        self.answers: dict[str, list[str]] = dict(answers or {})
        self.queries: list[tuple[str, str]] = []  # (name, type) in the order received
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((host, 0))
        self._socket.settimeout(0.1)  # how often serve() looks at the stop flag
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    @property
    def address(self) -> str:
        host = self._socket.getsockname()[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> DnsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._socket.close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                wire, client = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            try:
                query = dns.message.from_wire(wire)
            except dns.exception.DNSException:
                continue
            self._socket.sendto(self._respond(query).to_wire(), client)

    def _respond(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.NOERROR)
        for question in query.question:
            name = question.name.to_text(omit_final_dot=True).lower()
            self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
            version = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
            addresses = [
                text for text in list(self.answers.get(name, ())) if ipaddress.ip_address(text).version == version
            ]
            if addresses:
                rrset = dns.rrset.from_text_list(question.name, 0, dns.rdataclass.IN, question.rdtype, addresses)
                response.answer.append(rrset)
        return response
