"""DKIM signing (RFC 6376, relaxed/relaxed) with per-domain RSA and Ed25519 (RFC 8463) keys from SMARTMAIL_DKIM_KEYS."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from smartmail import runtime
from smartmail.addresses import bare_address
from smartmail.config import get_settings
from smartmail.errors import SettingsError

log = structlog.get_logger("smartmail.dkim")

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"
# RFC 8301 section 3.2: signers MUST use RSA keys of at least 1024 bits, SHOULD use 2048.
MIN_RSA_BITS = 1024

# The headers a reader sees or acts on, and the MIME headers that say how to read the body
# (RFC 6376 section 5.4.1 recommends From, Subject, Date, To, Reply-To, Message-ID, MIME headers);
# the RFC 8058 section 4 one-click unsubscribe headers MUST be signed for the one-click to count.
SIGNED = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
)
# Listed once more in h= than they occur (RFC 6376 section 8.15): a verifier takes instances bottom
# up, so a second From, To or Subject added in transit, which a mail client may show in place of
# the signed one, meets the extra entry (signed as absent) and breaks the signature.
OVERSIGNED = frozenset({"from", "to", "subject"})
_SIGNED_KEYS = tuple((name, name.lower().encode("ascii"), name.lower() in OVERSIGNED) for name in SIGNED)
_FOLD_AT = 78
# A selector is one or more DNS labels (RFC 6376 section 3.1).
_SELECTOR = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
# A host name of two or more labels (RFC 1035 section 2.3.1, RFC 1123 section 2.1), in A-label form: what d= may hold.
DOMAIN = re.compile(r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}")
_WSP_RUN = re.compile(rb"[ \t]+")
_TRAILING_WSP = re.compile(rb"[ \t]+(?=\r\n|\Z)")


class KeyFileError(SettingsError):
    """A file under SMARTMAIL_DKIM_KEYS that cannot be used; the message names the file, never its content."""


@dataclass(frozen=True)
class DomainKey:
    """One private key: signs for `domain` under `selector` with `algorithm` (RSA or ED25519)."""

    domain: str
    selector: str
    algorithm: str
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    path: Path

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return self.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        # RFC 8463 section 3: Ed25519 signs the SHA-256 hash of the data, not the data itself.
        return self.private_key.sign(hashlib.sha256(data).digest())

    def dns_value(self) -> str:
        """The TXT record value to publish at `<selector>._domainkey.<domain>` (RFC 6376 section 3.6.1)."""
        return dns_value(self.private_key)


def dns_value(private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """`v=DKIM1; k=rsa; p=<SubjectPublicKeyInfo>`, or `k=ed25519; p=<the 32 raw bytes>` (RFC 8463 section 4.2)."""
    public = private_key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


def domain_key(domain: str) -> str:
    """The directory name and d= form of a domain: lower case, A-labels (RFC 6376 section 3.5 d=)."""
    domain = domain.strip().rstrip(".").lower()
    return domain if domain.isascii() else domain.encode("idna").decode("ascii")


def valid_domain(domain: str) -> bool:
    """Whether `domain` (already lower case, A-labels) is a host name of two or more labels."""
    return DOMAIN.fullmatch(domain) is not None


def valid_selector(selector: str) -> bool:
    """Whether `selector` is one or more DNS labels of letters, digits and hyphens."""
    return _SELECTOR.fullmatch(selector) is not None


def load_key(path: Path, domain: str) -> DomainKey:
    """Read one `<selector>.pem`; KeyFileError naming the file when it is not a usable key."""
    selector = path.name[: -len(".pem")].lower()
    if not _SELECTOR.fullmatch(selector):
        raise KeyFileError(f"SMARTMAIL_DKIM_KEYS: {path}: {selector!r} is not a valid selector (DNS labels)")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyFileError(f"SMARTMAIL_DKIM_KEYS: {path}: cannot read ({exc.strerror})") from None
    except TypeError:
        raise KeyFileError(f"SMARTMAIL_DKIM_KEYS: {path}: the key is encrypted; store it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        # The library's message is not repeated: it could quote part of the file.
        raise KeyFileError(f"SMARTMAIL_DKIM_KEYS: {path}: not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"SMARTMAIL_DKIM_KEYS: {path}: RSA key of {key.key_size} bits; at least 1024 (RFC 8301)")
        return DomainKey(domain, selector, RSA, key, path)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return DomainKey(domain, selector, ED25519, key, path)
    raise KeyFileError(f"SMARTMAIL_DKIM_KEYS: {path}: neither an RSA nor an Ed25519 key")


def _folder_key(name: str) -> str:
    """The domain a folder is meant for, even when its name is refused: a sender of that domain then
    waits for the folder to be fixed rather than going out unsigned."""
    try:
        return domain_key(name)
    except UnicodeError:
        return name.strip().lower()


def _folders(directory: Path) -> dict[str, list[Path]]:
    """The domain folders under `directory` (hidden ones skipped), by the domain each is meant for."""
    if not directory.is_dir():
        raise KeyFileError(f"SMARTMAIL_DKIM_KEYS: {directory} is not a directory")
    by_domain: dict[str, list[Path]] = {}
    try:
        for folder in sorted(directory.iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                by_domain.setdefault(_folder_key(folder.name), []).append(folder)
    except OSError as exc:
        raise KeyFileError(f"SMARTMAIL_DKIM_KEYS: {directory}: cannot read ({exc.strerror})") from None
    return by_domain


def folder_domain(folder: Path) -> str:
    """The d= domain a key folder's name gives; KeyFileError naming the folder when the name is not a
    host name as it stands (no spaces, `;`, trailing dot or other characters that d= cannot hold)."""
    name = folder.name.lower()
    try:
        domain = name if name.isascii() else name.encode("idna").decode("ascii")
    except UnicodeError:
        domain = ""
    if not valid_domain(domain):
        raise KeyFileError(
            f"SMARTMAIL_DKIM_KEYS: {folder}: the folder name is not a domain name (it becomes d=; "
            "letters, digits, hyphens and dots only)"
        )
    return domain


def load_domain(folders: list[Path]) -> tuple[DomainKey, ...]:
    """The keys of one domain's folder: the RSA key, then the Ed25519 key; KeyFileError naming the
    folder or file that cannot be used (then none of the domain's keys are)."""
    if len(folders) > 1:
        raise KeyFileError(f"SMARTMAIL_DKIM_KEYS: {folders[0]} and {folders[1]}: two folders for one domain; keep one")
    domain = folder_domain(folders[0])
    found: dict[str, DomainKey] = {}
    for path in sorted(folders[0].glob("*.pem")):
        key = load_key(path, domain)
        if key.algorithm in found:
            # Which of two keys DNS publishes cannot be known here; signing with the wrong one fails everywhere.
            raise KeyFileError(
                f"SMARTMAIL_DKIM_KEYS: {found[key.algorithm].path} and {path}: two {key.algorithm} keys for "
                f"{domain}; keep one (rename the other away from *.pem)"
            )
        found[key.algorithm] = key
    # RSA first: verifiers that do not know Ed25519 (RFC 8463 is newer) meet the signature they can check.
    return tuple(found[algorithm] for algorithm in (RSA, ED25519) if algorithm in found)


@dataclass
class Keyring:
    """The keys under one SMARTMAIL_DKIM_KEYS directory by domain, and by domain why its folder could
    not be used: each domain stands alone, so one bad file holds back only its own domain's mail."""

    directory: Path
    keys: dict[str, tuple[DomainKey, ...]] = field(default_factory=dict)
    errors: dict[str, KeyFileError] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def for_domain(self, domain: str) -> tuple[DomainKey, ...]:
        """`domain`'s keys (none when it has no folder); KeyFileError when its folder could not be used
        and still cannot: a failed domain is read again on each use, so a fixed file is taken at once."""
        if domain not in self.errors:
            return self.keys.get(domain, ())
        with self.lock:
            try:
                folders = _folders(self.directory).get(domain)
                keys = load_domain(folders) if folders else ()
            except KeyFileError as exc:
                self.errors = {**self.errors, domain: exc}
                raise
            # Replaced, not changed in place: other threads read these without the lock.
            self.keys = {**self.keys, domain: keys}
            self.errors = {name: error for name, error in self.errors.items() if name != domain}
        log.info("dkim.keys_loaded", directory=str(self.directory), keys=_names(keys))
        return keys


def load_keys(directory: Path) -> Keyring:
    """Every `<domain>/<selector>.pem` under `directory`, per domain; a domain whose folder cannot be
    used gets its error instead (logged here, raised when its mail is signed)."""
    keyring = Keyring(directory)
    for domain, folders in _folders(directory).items():
        try:
            keys = load_domain(folders)
        except KeyFileError as exc:
            keyring.errors[domain] = exc
            log.error("dkim.keys_refused", domain=domain, error=str(exc))
            continue
        if keys:
            keyring.keys[domain] = keys
    log.info("dkim.keys_loaded", directory=str(directory), keys=_names(k for ks in keyring.keys.values() for k in ks))
    return keyring


def _names(keys: Iterable[DomainKey]) -> list[str]:
    return [f"{key.selector}._domainkey.{key.domain} ({key.algorithm})" for key in keys]


@runtime.per_process()
def _keyring(directory: Path | None) -> Keyring | None:
    # Keyed by the directory: new settings (runtime.reset()) or another directory load afresh. An
    # unreadable directory raises and is not kept, so the next message tries again.
    return load_keys(directory) if directory is not None else None


def keys_for(domain: str) -> tuple[DomainKey, ...]:
    """The signing keys configured for `domain` (none when SMARTMAIL_DKIM_KEYS is unset or has none);
    KeyFileError when that domain's folder or one of its files cannot be used."""
    keyring = _keyring(get_settings().dkim_keys)
    return keyring.for_domain(domain_key(domain)) if keyring is not None else ()


def sign(message: bytes, sender: str, *, now: float | None = None) -> bytes:
    """`message` (RFC 5322 bytes, CRLF line ends) with DKIM-Signature headers prepended for the
    domain of `sender` (`addr@domain` or `Name <addr@domain>`), or unchanged when it has no key.
    KeyFileError when that domain's keys cannot be used (other domains are not affected)."""
    keyring = _keyring(get_settings().dkim_keys)
    if keyring is None or not (keyring.keys or keyring.errors):
        return message
    try:
        domain = domain_key(bare_address(sender).rpartition("@")[2])
    except UnicodeError:
        return message  # no folder can be named after it
    keys = keyring.for_domain(domain)
    if not keys:
        return message
    return signatures(message, keys, now=now) + message


def signatures(message: bytes, keys: tuple[DomainKey, ...], *, now: float | None = None) -> bytes:
    """The DKIM-Signature fields (CRLF-terminated, in the order of `keys`) for `message`."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        head, body = message if message.endswith(b"\r\n") else message + b"\r\n", b""
    else:
        head, body = message[: end + 2], message[end + 4 :]
    body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode("ascii")
    names, signed = _signed_headers(head)
    timestamp = int(time.time() if now is None else now)
    fields = []
    for key in keys:
        field = _unsigned_field(key, names, body_hash, timestamp)
        # The field itself is hashed last, with an empty b= and no final CRLF (RFC 6376 section 3.7),
        # in relaxed form: built with single spaces and folded before a space or after a colon, it
        # only needs its line breaks removed.
        canonical = "dkim-signature:" + field[15:].replace("\r\n", "").strip()
        value = key.sign(signed + canonical.encode("ascii"))
        fields.append(field + _fold_b64(base64.b64encode(value).decode("ascii")) + "\r\n")
    return "".join(fields).encode("ascii")


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 section 3.4.4: no WSP at line ends, WSP runs as one SP, no empty lines at the end,
    and a non-empty body ends in CRLF."""
    # base64 has no whitespace and quoted-printable none at a line end (RFC 2045 section 6.7 rule 3):
    # these scans usually find nothing, and the regexes run only for text with tabs or runs of spaces.
    if b"\t" in body or b"  " in body or b" \r\n" in body or body.endswith(b" "):
        body = _WSP_RUN.sub(b" ", _TRAILING_WSP.sub(b"", body))
    body = body.rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def relaxed_fields(head: bytes) -> dict[bytes, list[bytes]]:
    """The header block's fields in relaxed form (RFC 6376 section 3.4.2), CRLF-terminated, by lower-cased name.

    The whole block at once rather than field by field: unfolded (a CRLF before WSP removed, RFC 5322
    section 2.2.3), WSP runs made one SP; then each line is one field, its name lower-cased and the
    spaces around its colon and at its end dropped.
    """
    unfolded = head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t")
    if b"\t" in unfolded or b"  " in unfolded:
        unfolded = _WSP_RUN.sub(b" ", unfolded)
    fields: dict[bytes, list[bytes]] = {}
    for line in unfolded.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if colon:
            name = name.rstrip(b" ").lower()
            fields.setdefault(name, []).append(name + b":" + value.strip(b" ") + b"\r\n")
    return fields


def _signed_headers(head: bytes) -> tuple[list[str], bytes]:
    """The h= names and the relaxed form of the fields they select, in h= order."""
    fields = relaxed_fields(head)
    names: list[str] = []
    signed: list[bytes] = []
    for name, key, oversign in _SIGNED_KEYS:
        instances = fields.get(key)
        if instances:
            # RFC 6376 section 5.4.2: repeated names select instances from the bottom up.
            for instance in reversed(instances):
                names.append(name)
                signed.append(instance)
        elif name != "From":
            continue
        if oversign:
            names.append(name)  # matches no instance, so adds nothing to the hash
    return names, b"".join(signed)


def _unsigned_field(key: DomainKey, names: list[str], body_hash: str, timestamp: int) -> str:
    """`DKIM-Signature: …; b=` for this message: the folded layout is the same for every message
    signed with `key` over the same header names (t= has 10 digits until 2286, bh= always 44), so
    it is made once and only the two values are put in."""
    return _field_layout(key, tuple(names)).format(t=timestamp, bh=body_hash)


@functools.lru_cache(maxsize=256)
def _field_layout(key: DomainKey, names: tuple[str, ...]) -> str:
    """The field folded at 78 characters before a tag, or inside h= after a colon (RFC 6376 section
    3.5 allows FWS there), with b= on a line of its own for the signature; {t} and {bh} to fill in."""
    tokens = [
        " v=1;",
        f" a={key.algorithm};",
        " c=relaxed/relaxed;",
        f" d={key.domain};",
        f" s={key.selector};",
        " t=0123456789;",
    ]
    tokens += [(" h=" if i == 0 else "") + name + (";" if i == len(names) - 1 else ":") for i, name in enumerate(names)]
    tokens.append(" bh=" + "=" * 44 + ";")
    lines = ["DKIM-Signature:"]
    for token in tokens:
        if len(lines[-1]) + len(token) > _FOLD_AT:
            lines.append(token if token[0] == " " else " " + token)
        else:
            lines[-1] += token
    lines.append(" b=")
    field = "\r\n".join(lines).replace("{", "{{").replace("}", "}}")
    return field.replace("t=0123456789;", "t={t};").replace("bh=" + "=" * 44 + ";", "bh={bh};")


# Holds keys: dropped with them.
runtime.on_reset(lambda _close: _field_layout.cache_clear())


def _fold_b64(value: str) -> str:
    """The signature after ` b=`: 75 characters, then lines of 77 after a space (FWS is allowed in it)."""
    chunks = [value[:75]] + [value[i : i + 77] for i in range(75, len(value), 77)]
    return "\r\n ".join(chunks)
