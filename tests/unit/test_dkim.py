"""Unit tests for smartmail.content.dkim and `smartmail dkim`: signatures checked by dkimpy, the reference verifier."""

from __future__ import annotations

import stat
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from typer.testing import CliRunner

from smartmail import runtime
from smartmail.cli import dkim as dkim_cli
from smartmail.cli.main import app
from smartmail.content import dkim
from smartmail.content.mime import build_mime


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key():
    return ed25519.Ed25519PrivateKey.generate()


def write_key(directory: Path, domain: str, selector: str, key) -> Path:
    path = directory / domain / f"{selector}.pem"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


@pytest.fixture
def keys_dir(tmp_path, settings_env, rsa_key, ed_key):
    """SMARTMAIL_DKIM_KEYS with an RSA-2048 key (s1) and an Ed25519 key (e1) for example.com."""
    directory = tmp_path / "dkim"
    write_key(directory, "example.com", "s1", rsa_key)
    write_key(directory, "example.com", "e1", ed_key)
    settings_env.setenv("SMARTMAIL_DKIM_KEYS", str(directory))
    runtime.reset()
    return directory


def dns_for(directory: Path):
    """A dnsfunc for dkimpy serving the TXT record of every key under `directory`."""
    records = {}
    for domain, keys in dkim.load_keys(directory).keys.items():
        for key in keys:
            records[f"{key.selector}._domainkey.{domain}.".encode()] = key.dns_value().encode()

    def dnsfunc(name, timeout=5):
        return records.get(name)

    return dnsfunc


def verify_all(data: bytes, directory: Path) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature, top first."""
    verifier = dkimpy.DKIM(data)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    verdicts = []
    for i in range(count):
        try:
            verdicts.append(verifier.verify(idx=i, dnsfunc=dns_for(directory)))
        except dkimpy.DKIMException:  # a body hash mismatch is raised rather than returned
            verdicts.append(False)
    return verdicts


def multipart(**changes) -> bytes:
    fields = dict(
        sender="News Desk <news@example.com>",
        recipient="Bob <bob@example.org>",
        subject="Weekly news",
        text="Hello Bob,\n\nthe news.\n",
        html="<p>Hello Bob,</p>\n<p>the news.</p>",
        message_id="<m1@example.com>",
        headers={
            "List-Unsubscribe": "<https://mail.example.com/u/abc>, <mailto:unsubscribe@example.com?subject=abc>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
    )
    fields.update(changes)
    return build_mime(**fields)


def header_block(data: bytes) -> str:
    return data.partition(b"\r\n\r\n")[0].decode()


# Signing and verifying.


def test_rsa_and_ed25519_signatures_verify_rsa_first(keys_dir):
    signed = dkim.sign(multipart(), "News Desk <news@example.com>")
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=s1;")
    second = signed.index(b"\r\nDKIM-Signature:")
    assert b"a=ed25519-sha256" in signed[second : second + 80]
    assert verify_all(signed, keys_dir) == [True, True]
    assert dkimpy.verify(signed, dnsfunc=dns_for(keys_dir))


@pytest.mark.parametrize("text", ["Plain text only.\n", "Grüße aus Köln, " * 40, "no final line break"])
def test_text_only_messages_verify(keys_dir, text):
    signed = dkim.sign(multipart(html=None, text=text), "news@example.com")
    assert verify_all(signed, keys_dir) == [True, True]


def test_long_folded_headers_verify(keys_dir):
    message = multipart(
        subject="A subject long enough to be folded over several lines " * 4,
        sender='"Newsroom, Example Corporation International Division" <news@example.com>',
        reply_to="Replies to the editorial team of the weekly newsletter <editors@example.com>",
        headers={"List-Unsubscribe": "<https://mail.example.com/unsubscribe/" + "a" * 120 + ">"},
    )
    assert b"\r\n Subject" not in message and message.count(b"\r\n ") > 3  # folded indeed
    signed = dkim.sign(message, "news@example.com")
    assert verify_all(signed, keys_dir) == [True, True]
    lines = header_block(signed).split("\r\n")
    signature_lines = lines[: [line.startswith("From:") for line in lines].index(True)]
    assert len(signature_lines) > 8 and max(len(line) for line in signature_lines) <= 78


def test_signed_headers_are_the_present_ones_with_from_to_subject_oversigned(keys_dir):
    signed = dkim.sign(multipart(html=None, headers={}), "news@example.com")
    h = "".join(header_block(signed).split("DKIM-Signature:")[1].split()).split("h=")[1].split(";")[0]
    assert h.split(":") == [
        "From", "From", "To", "To", "Subject", "Subject", "Date", "Message-ID",
        "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    ]  # fmt: skip


def test_timestamp(keys_dir):
    signed = dkim.sign(multipart(), "news@example.com", now=1_800_000_000.7)
    assert b" t=1800000000;" in signed


# Tampering.


@pytest.mark.parametrize(
    "field",
    [b"From: Mallory <mallory@example.com>", b"Subject: Urgent: reset your password", b"To: someone@example.net"],
)
def test_a_header_injected_after_signing_fails(keys_dir, field):
    signed = dkim.sign(multipart(), "news@example.com")
    # Below the signatures, above the original fields: where a reader would meet it first.
    first_field = signed.index(b"\r\nFrom:") + 2
    tampered = signed[:first_field] + field + b"\r\n" + signed[first_field:]
    assert verify_all(tampered, keys_dir) == [False, False]


def test_a_changed_header_fails(keys_dir):
    signed = dkim.sign(multipart(), "news@example.com")
    assert verify_all(signed.replace(b"Subject: Weekly news", b"Subject: Weekly newz"), keys_dir) == [False, False]


def test_an_altered_body_fails(keys_dir):
    signed = dkim.sign(multipart(), "news@example.com")
    assert verify_all(signed.replace(b"the news.", b"the fake."), keys_dir) == [False, False]


def test_an_unsigned_header_added_after_signing_still_verifies(keys_dir):
    # What relays do (Received:, Return-Path:): not in h=, so it does not matter.
    signed = dkim.sign(multipart(), "news@example.com")
    assert verify_all(b"Received: from relay by mx; Fri, 4 Dec 2026\r\n" + signed, keys_dir) == [True, True]


# Which messages are signed.


def test_no_key_for_the_domain_leaves_the_bytes_unchanged(keys_dir):
    message = multipart(sender="news@other.example")
    assert dkim.sign(message, "News <news@other.example>") is message


def test_no_keys_directory_leaves_the_bytes_unchanged(keys_dir, monkeypatch):
    monkeypatch.delenv("SMARTMAIL_DKIM_KEYS")
    runtime.reset()
    message = multipart()
    assert dkim.sign(message, "news@example.com") is message


def test_domain_is_matched_without_case_and_keys_are_cached(keys_dir, rsa_key):
    first = dkim.keys_for("EXAMPLE.com")
    assert [key.algorithm for key in first] == [dkim.RSA, dkim.ED25519]
    (keys_dir / "example.com" / "e1.pem").unlink()
    assert dkim.keys_for("example.com") is first  # loaded once per process
    runtime.reset()  # as when settings change
    assert [key.algorithm for key in dkim.keys_for("example.com")] == [dkim.RSA]


def test_a_domain_with_only_an_ed25519_key(tmp_path, keys_dir, ed_key):
    write_key(keys_dir, "ed.example", "e2", ed_key)
    runtime.reset()
    signed = dkim.sign(multipart(sender="a@ed.example"), "a@ed.example")
    assert signed.count(b"DKIM-Signature:") == 1 and b"a=ed25519-sha256; c=relaxed/relaxed; d=ed.example" in signed
    assert verify_all(signed, keys_dir) == [True]


# Key files.


def bad_file(directory: Path, name: str, content: bytes) -> Path:
    path = directory / "example.com" / name
    path.write_bytes(content)
    runtime.reset()
    return path


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        (
            "s9.pem",
            b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n",
            "not a PEM",
        ),
        ("bad_sel.pem", b"", "not a valid selector"),
    ],
)
def test_a_bad_key_file_is_named_and_its_content_is_not_shown(keys_dir, name, content, reason):
    path = bad_file(keys_dir, name, content)
    with pytest.raises(dkim.KeyFileError) as caught:
        dkim.sign(multipart(), "news@example.com")
    assert str(path) in str(caught.value) and reason in str(caught.value)
    assert "c2VjcmV0" not in str(caught.value) and "SMARTMAIL_DKIM_KEYS" in str(caught.value)


def test_a_bad_key_file_holds_back_only_its_own_domain(keys_dir, rsa_key):
    write_key(keys_dir, "other.example", "o1", rsa_key)
    path = bad_file(keys_dir, "s9.pem", b"not a key")
    with pytest.raises(dkim.KeyFileError, match="not a PEM private key"):
        dkim.sign(multipart(), "news@example.com")
    signed = dkim.sign(multipart(sender="news@other.example"), "news@other.example")
    assert b"d=other.example;" in signed and verify_all(signed, keys_dir) == [True]
    unsigned = multipart(sender="news@unsigned.example")
    assert dkim.sign(unsigned, "news@unsigned.example") is unsigned
    # Not kept as failed: the next message after the fix is signed, with no restart.
    path.unlink()
    assert verify_all(dkim.sign(multipart(), "news@example.com"), keys_dir) == [True, True]


@pytest.mark.parametrize("name", ["bad;name.example", "ex ample.example", "example.org;s=x", "under_score.example"])
def test_a_folder_name_that_is_no_domain_is_refused_and_named(keys_dir, rsa_key, name):
    write_key(keys_dir, name, "s1", rsa_key)
    keyring = dkim.load_keys(keys_dir)
    assert list(keyring.keys) == ["example.com"]
    [error] = keyring.errors.values()
    assert str(keys_dir / name) in str(error) and "not a domain name" in str(error)
    runtime.reset()
    assert verify_all(dkim.sign(multipart(), "news@example.com"), keys_dir) == [True, True]


def test_a_folder_name_with_a_trailing_space_holds_back_that_domain(keys_dir, rsa_key):
    write_key(keys_dir, "news.example ", "s1", rsa_key)
    runtime.reset()
    with pytest.raises(dkim.KeyFileError, match="not a domain name") as caught:
        dkim.sign(multipart(sender="a@news.example"), "a@news.example")
    assert str(keys_dir / "news.example ") in str(caught.value)
    assert dkim.sign(multipart(), "news@example.com").startswith(b"DKIM-Signature:")


def test_two_folders_for_one_domain_are_refused(keys_dir, rsa_key):
    write_key(keys_dir, "Example.com", "s2", rsa_key)
    runtime.reset()
    with pytest.raises(dkim.KeyFileError, match="two folders for one domain"):
        dkim.keys_for("example.com")


def test_other_key_types_and_small_rsa_keys_are_refused(keys_dir):
    (keys_dir / "example.com" / "e1.pem").unlink()
    (keys_dir / "example.com" / "s1.pem").unlink()
    write_key(keys_dir, "example.com", "ec", ec.generate_private_key(ec.SECP256R1()))
    runtime.reset()
    with pytest.raises(dkim.KeyFileError, match="neither an RSA nor an Ed25519 key"):
        dkim.keys_for("example.com")
    (keys_dir / "example.com" / "ec.pem").unlink()
    write_key(keys_dir, "example.com", "small", small_rsa_key())
    runtime.reset()
    with pytest.raises(dkim.KeyFileError, match="bits; at least 1024"):
        dkim.keys_for("example.com")


def small_rsa_key() -> rsa.RSAPrivateKey:
    """A 512-bit key, which cryptography refuses to generate but loads (as an old key file would be)."""
    import random

    def prime() -> int:
        while True:
            n = random.getrandbits(256) | (1 << 255) | 1
            if all(pow(a, n - 1, n) == 1 for a in (2, 3, 5, 7, 11, 13, 17, 19, 23)) and all(
                n % q for q in range(3, 1000, 2)
            ):
                return n

    e = 65537
    while True:
        p, q = prime(), prime()
        if p != q and (p - 1) % e and (q - 1) % e:
            break
    d = pow(e, -1, (p - 1) * (q - 1))
    public = rsa.RSAPublicNumbers(e, p * q)
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public)
    return numbers.private_key(unsafe_skip_rsa_key_validation=True)


def test_two_keys_of_one_algorithm_for_a_domain_are_refused(keys_dir):
    write_key(keys_dir, "example.com", "s2", rsa.generate_private_key(public_exponent=65537, key_size=1024))
    runtime.reset()
    with pytest.raises(dkim.KeyFileError, match="two rsa-sha256 keys for example.com"):
        dkim.keys_for("example.com")


# Canonicalization (RFC 6376 sections 3.4.2 and 3.4.4, with the examples of section 3.4.5).


def test_relaxed_header_examples():
    head = b"A: X\r\nB : Y\t\r\n\tZ  \r\nSubject:  two   spaces\t\tand tabs   \r\n"
    head += b"Content-Type: multipart/alternative;\r\n boundary=x\r\nSubject: again\r\n"
    assert dkim.relaxed_fields(head) == {
        b"a": [b"a:X\r\n"],  # section 3.4.5
        b"b": [b"b:Y Z\r\n"],
        b"subject": [b"subject:two spaces and tabs\r\n", b"subject:again\r\n"],
        b"content-type": [b"content-type:multipart/alternative; boundary=x\r\n"],
    }


def test_wsp_runs_and_tabs_in_headers_verify(keys_dir):
    message = multipart(html=None).replace(b"Subject: Weekly news", b"Subject:\tWeekly   news \t")
    message = message.replace(b"To: Bob <bob@example.org>", b"To: Bob\r\n\t <bob@example.org>")
    signed = dkim.sign(message, "news@example.com")
    assert verify_all(signed, keys_dir) == [True, True]


def test_repeated_signed_headers_are_signed_bottom_up(keys_dir):
    message = multipart(html=None).replace(b"Date:", b"Reply-To: a@example.com\r\nReply-To: b@example.com\r\nDate:")
    signed = dkim.sign(message, "news@example.com")
    assert verify_all(signed, keys_dir) == [True, True]
    assert verify_all(signed.replace(b"Reply-To: b@", b"Reply-To: c@"), keys_dir) == [False, False]


@pytest.mark.parametrize(
    ("body", "canonical"),
    [
        (b" C \r\nD \t E\r\n\r\n\r\n", b" C\r\nD E\r\n"),  # section 3.4.5
        (b"line  \r\n\t\r\n  \r\n", b"line\r\n"),  # lines of whitespace at the end are empty lines
        (b"no final break ", b"no final break\r\n"),
        (b"", b""),
        (b"\r\n\r\n", b""),
        (b"a\r\n\r\nb\r\n\r\n", b"a\r\n\r\nb\r\n"),  # empty lines inside stay
        (b"=3D=20soft=\r\nbreak\r\n", b"=3D=20soft=\r\nbreak\r\n"),  # quoted-printable: nothing to do
    ],
)
def test_relaxed_body(body, canonical):
    assert dkim.relaxed_body(body) == canonical


def test_whitespace_changes_in_transit_that_relaxed_allows_still_verify(keys_dir):
    signed = dkim.sign(multipart(html=None, text="Hello  Bob,\n\nthe news.\n"), "news@example.com")
    relaxed = signed.replace(b"Subject: Weekly news", b"Subject:   Weekly \t news  ").replace(
        b"Hello  Bob", b"Hello Bob"
    )
    assert verify_all(relaxed + b"\r\n\r\n", keys_dir) == [True, True]


def test_dkimpy_agrees_on_canonical_forms():
    from dkim.canonicalization import Relaxed

    body = b"a  b \t\r\n\t c\r\n \r\n\r\n"
    assert dkim.relaxed_body(body) == Relaxed.canonicalize_body(body)
    name, value = b"X-Long ", b"  one\r\n two\t three  \r\n"
    assert dkim.relaxed_fields(name + b":" + value) == {
        b"x-long": [b"%s:%s" % Relaxed.canonicalize_headers([(name, value)])[0]]
    }


# The command line.


class Result:
    def __init__(self, args: tuple[str, ...]) -> None:
        result = CliRunner().invoke(app, list(args))
        self.exit_code = result.exit_code
        self.raw = result.output
        self.output = " ".join(result.output.split())  # rich wraps at 80 columns when not on a terminal


def run(*args: str) -> Result:
    return Result(args)


def test_generate_writes_a_0600_key_and_prints_its_record(keys_dir):
    result = run("dkim", "generate", "News.Example", "--selector", "2026a")
    assert result.exit_code == 0, result.output
    path = keys_dir / "news.example" / "2026a.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "2026a._domainkey.news.example. IN TXT" in result.output
    strings = [part for part in result.raw.split('"')[1::2]]
    assert all(len(part) <= 255 for part in strings) and len(strings) == 2
    runtime.reset()
    (key,) = dkim.keys_for("news.example")
    assert "".join(strings) == key.dns_value() and key.private_key.key_size == 2048


def test_generate_ed25519_and_refusals(keys_dir):
    result = run("dkim", "generate", "news.example", "--selector", "ed", "--algorithm", "ed25519")
    assert result.exit_code == 0 and '"v=DKIM1; k=ed25519; p=' in result.output
    again = run("dkim", "generate", "news.example", "--selector", "ed", "--algorithm", "ed25519")
    assert again.exit_code != 0 and "exists; --force" in again.output
    forced = run("dkim", "generate", "news.example", "--selector", "ed", "--algorithm", "ed25519", "--force")
    assert forced.exit_code == 0
    second = run("dkim", "generate", "news.example", "--selector", "ed2", "--algorithm", "ed25519")
    assert second.exit_code != 0 and "one key per algorithm" in second.output
    assert run("dkim", "generate", "news.example", "--selector", "bad_one").exit_code != 0
    assert run("dkim", "generate", "not a domain", "--selector", "s").exit_code != 0
    assert run("dkim", "generate", "news.example", "--selector", "s", "--bits", "512").exit_code != 0


def test_generate_without_the_setting_says_so(keys_dir, monkeypatch):
    monkeypatch.delenv("SMARTMAIL_DKIM_KEYS")
    runtime.reset()
    result = run("dkim", "generate", "example.com", "--selector", "s")
    assert result.exit_code != 0 and "SMARTMAIL_DKIM_KEYS is not set" in result.output


@pytest.fixture
def published(monkeypatch):
    """A fake DNS: name → TXT record strings, or a DnsProblem to raise."""
    records: dict[str, object] = {}

    def lookup(name: str, nameserver: str | None = None) -> list[str]:
        answer = records.get(name, dkim_cli.DnsProblem("missing: no such name in DNS (NXDOMAIN)", missing=True))
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    monkeypatch.setattr(dkim_cli, "lookup_txt", lookup)
    return records


def test_check_matching_records(keys_dir, published):
    for key in dkim.load_keys(keys_dir).keys["example.com"]:
        # As DNS serves it: 255-octet strings joined, folded whitespace kept, other TXT records beside it.
        published[f"{key.selector}._domainkey.example.com"] = ["google-site-verification=x", key.dns_value()]
    result = run("dkim", "check", "example.com")
    assert result.exit_code == 0, result.output
    assert "ok: s1._domainkey.example.com" in result.output and "ok: e1._domainkey.example.com" in result.output


def test_check_missing_mismatched_and_unreachable(keys_dir, published, rsa_key):
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    published["s1._domainkey.example.com"] = [dkim.dns_value(other)]
    result = run("dkim", "check", "example.com")
    assert result.exit_code == 1
    assert "s1._domainkey.example.com: mismatch" in result.output
    assert "e1._domainkey.example.com: missing" in result.output
    published["s1._domainkey.example.com"] = [dkim.dns_value(rsa_key).replace("k=rsa", "k=ed25519")]
    assert run("dkim", "check", "example.com", "--selector", "s1").exit_code == 1
    published["s1._domainkey.example.com"] = ["v=DKIM1; k=rsa; p="]
    assert "revoked" in run("dkim", "check", "example.com", "--selector", "s1").output
    published["s1._domainkey.example.com"] = dkim_cli.DnsProblem("DNS unreachable looking up x", missing=False)
    unreachable = run("dkim", "check", "example.com", "--selector", "s1")
    assert unreachable.exit_code not in (0, 1) and "DNS unreachable" in unreachable.output
    assert run("dkim", "check", "example.com", "--selector", "zz").exit_code != 0
    assert run("dkim", "check", "nokeys.example").exit_code != 0


def test_txt_strings():
    value = "v=DKIM1; k=rsa; p=" + "A" * 600
    parts = dkim_cli.txt_strings(value)
    assert [len(part) for part in parts] == [255, 255, 108] and "".join(parts) == value
