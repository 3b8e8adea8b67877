"""`smartmail dkim …`: generate a DKIM key with its DNS TXT record, and check the published record."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from rich.markup import escape

from smartmail.cli.output import err, fail, out
from smartmail.config import get_settings
from smartmail.content import dkim

dkim_app = typer.Typer(
    help="DKIM signing keys (RFC 6376): generate, print and check the DNS record.", no_args_is_help=True
)

# RFC 1035 section 3.3.14: a TXT record is a sequence of character-strings of at most 255 octets.
_TXT_STRING = 255


class Algorithm(str, Enum):
    rsa = "rsa"
    ed25519 = "ed25519"


class DnsProblem(Exception):
    """The TXT record could not be read: `missing` when DNS answered that there is none."""

    def __init__(self, message: str, *, missing: bool) -> None:
        super().__init__(message)
        self.missing = missing


def _keys_directory() -> Path:
    directory = get_settings().dkim_keys
    if directory is None:
        fail("SMARTMAIL_DKIM_KEYS is not set: point it at the directory that holds <domain>/<selector>.pem keys")
    return directory


def _domain(value: str) -> str:
    try:
        domain = dkim.domain_key(value)
    except UnicodeError:
        fail(f"DOMAIN: {value!r} is not a valid domain name")
    if not dkim.valid_domain(domain):
        fail(f"DOMAIN: {value!r} is not a valid domain name")
    return domain


def txt_strings(value: str) -> list[str]:
    """The record value cut into DNS character-strings of at most 255 octets (RFC 1035 section 3.3.14);
    verifiers join them without a separator (RFC 6376 section 3.6.2.2)."""
    return [value[i : i + _TXT_STRING] for i in range(0, len(value), _TXT_STRING)]


@dkim_app.command("generate")
def generate(
    domain: str,
    selector: Annotated[str, typer.Option(help="The selector (s=): the DNS name is SELECTOR._domainkey.DOMAIN.")],
    algorithm: Annotated[Algorithm, typer.Option(help="rsa (read by every verifier) or ed25519 (RFC 8463).")] = (
        Algorithm.rsa
    ),
    bits: Annotated[int, typer.Option(help="RSA key size (RFC 8301: at least 1024; 2048 recommended).")] = 2048,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing key file of this selector.")] = False,
) -> None:
    """Write a private key to SMARTMAIL_DKIM_KEYS/DOMAIN/SELECTOR.pem (mode 0600) and print its DNS TXT record."""
    directory = _keys_directory()
    domain = _domain(domain)
    selector = selector.strip().lower()
    if not dkim.valid_selector(selector):
        fail(f"--selector: {selector!r} is not a valid selector (one or more DNS labels: letters, digits, hyphens)")
    if algorithm is Algorithm.rsa and not dkim.MIN_RSA_BITS <= bits <= 8192:
        fail(f"--bits: {bits} is out of range; RSA keys of 1024 to 8192 bits (2048 recommended)")
    path = directory / domain / f"{selector}.pem"
    if path.exists() and not force:
        fail(f"{path} exists; --force to replace it (the published record must then change too)")
    wanted = dkim.RSA if algorithm is Algorithm.rsa else dkim.ED25519
    for other in sorted((directory / domain).glob("*.pem")) if (directory / domain).is_dir() else []:
        if other != path and _algorithm_of(other) == wanted:
            fail(
                f"{other} already signs {domain} with {wanted}; a domain has one key per algorithm: "
                "rename that file away from *.pem (or remove it) first"
            )
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=bits)
        if algorithm is Algorithm.rsa
        else ed25519.Ed25519PrivateKey.generate()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Created 0600 rather than chmod-ed after writing: the key is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)  # an overwritten file keeps its old mode otherwise
        file.write(pem)
    out.print(f"wrote {escape(str(path))} ({wanted})", highlight=False)
    out.print("Publish this DNS TXT record, then run `smartmail dkim check` and restart the workers:", soft_wrap=True)
    out.print(f"{selector}._domainkey.{domain}. IN TXT", highlight=False)
    out.print(" ".join(f'"{part}"' for part in txt_strings(dkim.dns_value(key))), highlight=False, soft_wrap=True)


def _algorithm_of(path: Path) -> str | None:
    try:
        return dkim.load_key(path, path.parent.name).algorithm
    except dkim.KeyFileError:
        return None


def lookup_txt(name: str, nameserver: str | None = None) -> list[str]:
    """The TXT records at `name`, each one's strings joined; DnsProblem when there are none or DNS fails.
    `nameserver` (`host` or `host:port`) asks that server instead of the system's resolvers."""
    import dns.exception
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=nameserver is None)
    if nameserver is not None:
        host, _, port = nameserver.rpartition(":") if nameserver.count(":") == 1 else (nameserver, "", "")
        try:
            resolver.nameservers = [host]
            resolver.port = int(port or 53)
        except ValueError:
            message = f"--nameserver: {nameserver!r} is not an IP address with an optional :PORT"
            raise DnsProblem(message, missing=False) from None
    try:
        answer = resolver.resolve(name, "TXT", lifetime=10)
    except dns.resolver.NXDOMAIN:
        raise DnsProblem("missing: no such name in DNS (NXDOMAIN)", missing=True) from None
    except dns.resolver.NoAnswer:
        raise DnsProblem("missing: no TXT record there", missing=True) from None
    except (dns.resolver.NoNameservers, dns.resolver.NoResolverConfiguration, dns.exception.Timeout) as exc:
        raise DnsProblem(f"DNS unreachable looking up {name}: {exc}", missing=False) from None
    except dns.exception.DNSException as exc:
        raise DnsProblem(f"DNS error looking up {name}: {exc}", missing=False) from None
    return [b"".join(rdata.strings).decode("ascii", "replace") for rdata in answer]


def _tags(record: str) -> dict[str, str]:
    """A tag=value list (RFC 6376 section 3.2), whitespace removed from values (FWS may fold them)."""
    tags = {}
    for part in record.split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags[name.strip()] = "".join(value.split())
    return tags


def compare(record_values: list[str], key: dkim.DomainKey) -> str | None:
    """None when one of the published records carries `key`'s public key, else what is wrong."""
    local = _tags(key.dns_value())
    dkim_records = [_tags(value) for value in record_values if "p=" in value]
    if not dkim_records:
        return "no DKIM record among the TXT records there"
    for tags in dkim_records:
        if tags.get("p") == local["p"] and tags.get("k", "rsa") == local["k"]:
            return None
    if any(tags.get("p") == "" for tags in dkim_records):
        return "the published record is revoked (empty p=)"
    return "the published public key differs from the local key (k= or p=)"


@dkim_app.command("check")
def check(
    domain: str,
    selector: Annotated[str | None, typer.Option(help="Check this selector only; default: every local key.")] = None,
    nameserver: Annotated[
        str | None,
        typer.Option(help="Ask this DNS server (HOST or HOST:PORT), e.g. the domain's authoritative one."),
    ] = None,
) -> None:
    """Look up each local key's DNS TXT record and say whether it publishes that key (exit 1 if not)."""
    directory = _keys_directory()
    domain = _domain(domain)
    folder = directory / domain
    paths = sorted(folder.glob("*.pem")) if folder.is_dir() else []
    if selector is not None:
        paths = [path for path in paths if path.name == f"{selector.strip().lower()}.pem"]
    if not paths:
        which = f" with selector {selector}" if selector else ""
        fail(f"no local key for {domain}{which} under {folder}; `smartmail dkim generate` makes one")
    try:
        keys = [dkim.load_key(path, domain) for path in paths]
    except dkim.KeyFileError as exc:
        fail(str(exc))
    problems = 0
    for key in keys:
        name = f"{key.selector}._domainkey.{domain}"
        try:
            wrong = compare(lookup_txt(name, nameserver), key)
        except DnsProblem as exc:
            if not exc.missing:
                fail(str(exc))  # no verdict possible: a non-zero exit, not a "mismatch"
            wrong = str(exc)
        else:
            wrong = wrong and "mismatch: " + wrong
        if wrong is None:
            out.print(f"ok: {name} publishes the key in {escape(str(key.path))} ({key.algorithm})", highlight=False)
        else:
            problems += 1
            err.print(f"[bold red]{name}[/]: {escape(wrong)}", highlight=False, soft_wrap=True)
            err.print(f"  expected: {escape(key.dns_value())}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
