"""Unit tests for smartmail.feedback.classify: the inbound corpus (tests/fixtures/inbound), written for this project."""

from __future__ import annotations

import random
from email.message import EmailMessage
from pathlib import Path

import pytest

from smartmail import runtime
from smartmail.config.settings import get_settings
from smartmail.content.return_path import bounce_address
from smartmail.content.unsubscribe_links import read_token
from smartmail.feedback.classify import Classification, classify
from smartmail.feedback.findings import Kind

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "inbound"
PLAIN = "bounce@bounces.example.com"  # an address at the bounce domain that names no message
FBL = "fbl@bounces.example.com"
HARD, SOFT = Kind.HARD_BOUNCE, Kind.SOFT_BOUNCE
TOKEN = "42.7.E78WGON7tyF1KXhwJGzo2MFqlQR2Z7fZrNg4MnVfVYA"


@pytest.fixture(autouse=True)
def env(settings_env):
    """The fixtures' settings: sender domain example.com, bounce domain bounces.example.com."""
    settings_env.setenv("SMARTMAIL_BOUNCE_DOMAIN", "bounces.example.com")
    runtime.reset()
    return settings_env


def verp(message_id: str) -> str:
    address = bounce_address(message_id)
    assert address is not None
    return address


def raw(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


# fixture, envelope recipient (a message id: its VERP address), verdict,
# findings as (kind, recipient, status, message id)
CASES = [
    ("postfix_user_unknown.eml", "01JEB9G6MA1TT468MYWTDCMNNV", "bounce",
     [(HARD, "jane.doe@example.org", "5.1.1", "01JEB9G6MA1TT468MYWTDCMNNV")]),
    ("postfix_delayed.eml", "01JEB5ZS5DF2C65CGJKGA71HEE", "delayed",
     [(SOFT, "sam@slow.example.net", "4.4.1", "01JEB5ZS5DF2C65CGJKGA71HEE")]),
    ("exim_failed.eml", PLAIN, "bounce",  # flufl.bounce; the message id from the copied headers
     [(HARD, "bob@example.net", "5.1.1", "01JEBF30KH8NW9HVAAS78VPE73")]),
    ("qmail_policy_block.eml", "01JEB51J1GPGKS4Q03BAE4WT20", "bounce",  # flufl says permanent, 5.7.1 says policy
     [(SOFT, "erin@example.biz", "5.7.1", "01JEB51J1GPGKS4Q03BAE4WT20")]),
    ("exchange_online_ndr.eml", "01JEBCVBB57J0MSX3A7XN0465N", "bounce",
     [(HARD, "kim@contoso.com", "5.1.10", "01JEBCVBB57J0MSX3A7XN0465N")]),
    ("gmail_nosuchuser.eml", "01JEBG5K21CE0A18K8TH6R6DFC", "bounce",
     [(HARD, "no.such.person@gmail.com", "5.1.1", "01JEBG5K21CE0A18K8TH6R6DFC")]),
    ("yahoo_no_account.eml", "01JEBE6K8R85WZ0BCKS6JDQK96", "bounce",  # 5.0.0: the words decide
     [(HARD, "pat.lee1987@yahoo.com", "5.0.0", "01JEBE6K8R85WZ0BCKS6JDQK96")]),
    ("sendmail_mailbox_full.eml", "01JEB0H3RQJSX64YD04N0BHJ60", "bounce",
     [(SOFT, "lee@example.edu", "5.2.2", "01JEB0H3RQJSX64YD04N0BHJ60")]),
    ("postfix_policy_block.eml", "01JEB2DDS5QJW38RSSG0X5ZMEC", "bounce",
     [(SOFT, "chris@corp.example.net", "5.7.1", "01JEB2DDS5QJW38RSSG0X5ZMEC")]),
    ("verp_without_returned_headers.eml", "01JEBJWNRD3P85Q17YF9J08QP9", "bounce",
     [(HARD, "info@gone.example", "5.1.2", "01JEBJWNRD3P85Q17YF9J08QP9")]),
    ("dsn_returned_message_id.eml", PLAIN, "bounce",  # Status 5.0.0, the diagnostic's 5.1.1 is finer
     [(HARD, "tom@example.co.uk", "5.1.1", "01JEB1EVWFSRJJ5ZHP8XFZ8PM9")]),
    ("arf_yahoo_abuse.eml", FBL, "complaint",  # the message id from the returned Return-Path (VERP)
     [(Kind.COMPLAINT, "carol.white@yahoo.com", None, "01JEB7H2CQSDKYB88H14ANHFM5")]),
    ("arf_not_spam.eml", FBL, "unrecognised", []),
    ("arf_microsoft_jmrp.eml", FBL, "complaint",  # To redacted; X-HmXmrOriginalRecipient; Message-ID
     [(Kind.COMPLAINT, "dave.ng@outlook.com", None, "01JEB9BCCJ7CWSX4K7DDKDJVY6")]),
    ("out_of_office.eml", "01JEBQFBQJ90NR9J84B27HT5CW", "auto_reply", []),
    ("abwesenheitsnotiz.eml", "01JEBQFBQJ90NR9J84B27HT5CW", "auto_reply", []),
    ("challenge_response.eml", "01JEBWT2BB6ZKAFHE76WVNFA3W", "auto_reply", []),
    ("human_reply.eml", PLAIN, "unrecognised", []),
    ("human_reply.eml", "01JEB9G6MA1TT468MYWTDCMNNV", "unrecognised", []),  # a reply to the return path
    ("mailto_unsubscribe.eml", "unsubscribe@example.com", "unsubscribe", [(Kind.UNSUBSCRIBE, None, None, None)]),
    ("malformed.eml", PLAIN, "unrecognised", []),
]  # fmt: skip


@pytest.mark.parametrize(("name", "recipient", "verdict", "expected"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_corpus(name, recipient, verdict, expected):
    if "@" not in recipient:
        recipient = verp(recipient)
    result = classify(raw(name), [recipient])
    assert isinstance(result, Classification)
    assert result.verdict == verdict, result.detail
    found = [(f.kind, f.recipient, f.status, f.message_id) for f in result.findings]
    assert found == expected, result.detail
    assert result.detail


def test_every_fixture_is_in_the_table():
    assert {path.name for path in CORPUS.glob("*.eml")} == {case[0] for case in CASES}


def test_the_fixtures_verp_addresses_are_signed_with_the_test_secret():
    """Guards the corpus: if the VERP scheme changes, the fixtures' addresses must be regenerated."""
    text = raw("postfix_user_unknown.eml").decode()
    assert verp("01JEB9G6MA1TT468MYWTDCMNNV") in text


def test_findings_carry_the_diagnostic_and_the_source():
    (finding,) = classify(raw("gmail_nosuchuser.eml"), [verp("01JEBG5K21CE0A18K8TH6R6DFC")]).findings
    assert finding.source == "dsn"
    assert finding.diagnostic is not None
    assert finding.diagnostic.startswith("550-5.1.1 The email account that you tried to reach does not exist.")
    assert "\n" not in finding.diagnostic, "unfolded"
    (finding,) = classify(raw("exim_failed.eml"), [PLAIN]).findings
    assert finding.source == "heuristic"
    assert "Recipient address rejected: User unknown" in (finding.diagnostic or "")
    assert "Our winter offers" not in (finding.diagnostic or ""), "the copy of the message is not the diagnostic"


def test_arf_fields():
    (finding,) = classify(raw("arf_yahoo_abuse.eml"), [FBL]).findings
    assert (finding.source, finding.feedback_type) == ("arf", "abuse")
    assert finding.reference == "<1733324531.81234.yahoo-cfl@arf.mail.yahoo.com>"
    result = classify(raw("arf_not_spam.eml"), [FBL])
    assert "not-spam" in (result.detail or "")


def test_unsubscribe_token_is_handed_over_as_is():
    result = classify(raw("mailto_unsubscribe.eml"), ["<Unsubscribe@Example.com>"])
    (finding,) = result.findings
    assert (finding.source, finding.unsubscribe_token) == ("mailto", TOKEN)
    assert read_token(finding.unsubscribe_token) == (42, 7), "the fixture's token is a real one"


def test_unsubscribe_token_in_the_first_body_line():
    message = _mail(subject="Unsubscribe", body=f"\n  unsubscribe {TOKEN}\nsent from my phone\n")
    result = classify(message, ["unsubscribe@example.com"])
    assert (result.verdict, result.findings[0].unsubscribe_token) == ("unsubscribe", TOKEN)


def test_unsubscribe_without_a_token():
    result = classify(_mail(subject="please unsubscribe me", body="thanks"), ["unsubscribe@example.com"])
    assert (result.verdict, result.findings) == ("unrecognised", ())


def test_unsubscribe_mailto_setting(env):
    env.setenv("SMARTMAIL_UNSUBSCRIBE_MAILTO", "Opt out <leave@lists.example.com>")
    get_settings.forget()
    assert classify(raw("mailto_unsubscribe.eml"), ["unsubscribe@example.com"]).verdict == "unrecognised"
    assert classify(raw("mailto_unsubscribe.eml"), ["leave@lists.example.com"]).verdict == "unsubscribe"


def test_verp_wins_over_the_returned_message_id():
    # The signed return path is the reliable one: a relay may rewrite Message-ID.
    other = "01JEBZZZZZZZZZZZZZZZZZZZZZ"
    (finding,) = classify(raw("dsn_returned_message_id.eml"), [verp(other)]).findings
    assert finding.message_id == other


def test_forged_verp_is_not_trusted():
    forged = verp("01JEB9G6MA1TT468MYWTDCMNNV").replace("oiceekkw", "aaaaaaaa")
    (finding,) = classify(raw("postfix_user_unknown.eml"), [forged]).findings
    assert finding.message_id == "01JEB9G6MA1TT468MYWTDCMNNV", "from the returned headers, not the forged token"
    (finding,) = classify(raw("verp_without_returned_headers.eml"), [forged]).findings
    assert finding.message_id is None


def test_without_a_bounce_domain_the_returned_headers_name_the_message(env):
    env.delenv("SMARTMAIL_BOUNCE_DOMAIN")
    get_settings.forget()
    (finding,) = classify(raw("postfix_user_unknown.eml"), ["news@example.com"]).findings
    assert finding.message_id == "01JEB9G6MA1TT468MYWTDCMNNV"


# --- Built DSNs: several recipients, other actions, RFC 6533 ------------------------------------------


def _dsn(blocks: list[str], *, content_type: str = "message/delivery-status", returned: str | None = None) -> bytes:
    report = "Reporting-MTA: dns; mx.example.org\n\n" + "\n\n".join(blocks) + "\n"
    parts = [
        "Content-Type: text/plain\n\nYour message could not be delivered.\n",
        f"Content-Type: {content_type}\n\n{report}",
    ]
    if returned:
        parts.append(f"Content-Type: text/rfc822-headers\n\n{returned}\n")
    body = "".join(f"--b\n{part}\n" for part in parts) + "--b--\n"
    head = (
        "From: MAILER-DAEMON@mx.example.org\nTo: bounce@bounces.example.com\nSubject: Undelivered Mail\n"
        "Auto-Submitted: auto-replied\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\n\n'
    )
    return (head + body).encode()


def _block(recipient: str, action: str, status: str | None = None, diagnostic: str | None = None) -> str:
    lines = [f"Final-Recipient: rfc822; {recipient}", f"Action: {action}"]
    lines += [f"Status: {status}"] if status else []
    lines += [f"Diagnostic-Code: smtp; {diagnostic}"] if diagnostic else []
    return "\n".join(lines)


def test_several_recipients_and_the_delayed_ones_left_out_of_a_bounce():
    message = _dsn(
        [
            _block("a@example.org", "failed", "5.1.1"),
            _block("b@example.org", "delayed", "4.4.1"),
            _block("c@example.org", "failed", "4.4.7", "421 4.4.7 retry timeout exceeded"),
            _block("d@example.org", "delivered", "2.0.0"),
        ],
        returned="Message-ID: <01JEB9G6MA1TT468MYWTDCMNNV@example.com>",
    )
    result = classify(message, [PLAIN])
    assert result.verdict == "bounce"
    assert [(f.recipient, f.kind, f.status) for f in result.findings] == [
        ("a@example.org", HARD, "5.1.1"),
        ("c@example.org", SOFT, "4.4.7"),  # failed after retries on a transient error: soft
    ]
    assert {f.message_id for f in result.findings} == {"01JEB9G6MA1TT468MYWTDCMNNV"}


def test_only_delivered_or_relayed_is_not_a_bounce():
    result = classify(_dsn([_block("a@example.org", "delivered", "2.0.0"), _block("b@x.org", "relayed")]), [PLAIN])
    assert (result.verdict, result.findings) == ("unrecognised", ())
    assert "delivered" in (result.detail or "")


def test_the_recipient_is_the_address_we_sent_to():
    # RFC 3464 section 2.3.1: Original-Recipient is the sender's address; Final-Recipient may be a forward.
    block = "Original-Recipient: rfc822;<Someone@Example.org>\nFinal-Recipient: rfc822; fwd@elsewhere.example\n"
    (finding,) = classify(_dsn([block + "Action: failed\nStatus: 5.1.1"]), [PLAIN]).findings
    assert finding.recipient == "someone@example.org"
    (finding,) = classify(
        _dsn(["Final-Recipient: rfc822;A@Example.org\nAction: failed\nStatus: 5.1.1"]), [PLAIN]
    ).findings
    assert finding.recipient == "a@example.org"


def test_status_from_the_diagnostic_when_the_field_is_missing():
    (finding,) = classify(
        _dsn([_block("a@example.org", "failed", None, "550 5.2.1 Mailbox disabled")]), [PLAIN]
    ).findings
    assert (finding.kind, finding.status) == (HARD, "5.2.1")
    (finding,) = classify(_dsn([_block("a@example.org", "failed")]), [PLAIN]).findings
    assert (finding.kind, finding.status) == (SOFT, None), "no status, no words: not the address's fault"


def test_global_delivery_status():
    # RFC 6533: the stdlib parses message/global-delivery-status as one message with the blocks in its body.
    blocks = [_block("ünïcode@example.org", "failed", "5.1.1"), _block("b@example.org", "failed", "5.2.2")]
    result = classify(_dsn(blocks, content_type="message/global-delivery-status"), [PLAIN])
    assert [(f.recipient, f.kind) for f in result.findings] == [("ünïcode@example.org", HARD), ("b@example.org", SOFT)]


def test_diagnostic_is_capped():
    (finding,) = classify(_dsn([_block("a@example.org", "failed", "5.1.1", "550 " + "x" * 5000)]), [PLAIN]).findings
    assert len(finding.diagnostic or "") == 1000


# --- Auto-replies and what is not one ------------------------------------------------------------


def _mail(*, subject: str, body: str = "Hello", **headers: str) -> bytes:
    message = EmailMessage()
    message["From"] = headers.pop("sender", "Someone <someone@example.net>")
    message["To"] = "news@example.com"
    message["Subject"] = subject
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content(body)
    return message.as_bytes()


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({"subject": "Hi", "Auto_Submitted": "auto-replied"}, "Auto-Submitted"),
        ({"subject": "Hi", "X_Autoreply": "yes"}, "X-Autoreply"),
        ({"subject": "Hi", "X_Autorespond": "Thanks"}, "X-Autorespond"),
        ({"subject": "Hi", "Precedence": "auto_reply"}, "Precedence"),
        ({"subject": "Out of Office: Our winter offers"}, "Subject"),
        ({"subject": "Auto: Our winter offers"}, "Subject"),
        ({"subject": "Réponse automatique : Our winter offers"}, "Subject"),
        ({"subject": "On vacation until Monday"}, "Subject"),
        ({"subject": "Your mail", "sender": "Boxbe <notify@boxbe.com>"}, "challenge-response"),
        ({"subject": "Re: offers", "body": "Please verify that you are human: click here."}, "challenge-response"),
    ],
)
def test_auto_replies(headers, detail):
    result = classify(_mail(**headers), [verp("01JEB9G6MA1TT468MYWTDCMNNV")])
    assert (result.verdict, result.findings) == ("auto_reply", ())
    assert detail in (result.detail or "")


def test_auto_submitted_no_is_a_person():
    assert classify(_mail(subject="Hello", Auto_Submitted="no"), [PLAIN]).verdict == "unrecognised"


def test_a_dsn_that_says_auto_replied_is_still_a_bounce():
    assert classify(raw("postfix_user_unknown.eml"), [PLAIN]).verdict == "bounce"


def test_a_bounce_is_not_taken_for_a_challenge_because_of_our_subject():
    # A double opt-in message bounced by a relay that copies the subject: the bounce wins.
    body = "Delivery has failed to these recipients:\n\nann@example.org\n\n550 5.1.1 User unknown\n"
    message = _mail(subject="Undeliverable: Please confirm your email", body=body, sender="postmaster@example.org")
    result = classify(message, [verp("01JEB9G6MA1TT468MYWTDCMNNV")])
    assert result.verdict == "bounce", result.detail
    assert result.findings[0].status == "5.1.1"


def test_a_bounce_without_a_failed_address_but_with_verp_uses_the_smtp_reply():
    body = "Your message could not be delivered.\n\nRemote server said: 550 5.1.1 Mailbox does not exist\n"
    message = _mail(subject="Undeliverable: Our winter offers", body=body, sender="postmaster@example.org")
    result = classify(message, [verp("01JEB9G6MA1TT468MYWTDCMNNV")])
    assert result.verdict == "bounce", result.detail
    assert [(f.kind, f.recipient, f.status, f.message_id) for f in result.findings] == [
        (HARD, None, "5.1.1", "01JEB9G6MA1TT468MYWTDCMNNV")
    ]
    assert classify(message, [PLAIN]).verdict == "unrecognised", "neither an address nor a message: nothing to act on"


# --- Robustness ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n\r\n",
        b"\x00\xff" * 100,
        b"Content-Type: multipart/report; boundary=\r\n\r\n--\r\n",
        b"Content-Type: message/delivery-status\r\n\r\nAction: failed\r\nStatus: 5.1.1\r\n",
        b"From: MAILER-DAEMON@x\r\nSubject: =?x-unknown?q?=FF?=\r\n\r\n\xff\xfe 550 5.1.1",
    ],
)
def test_odd_input_never_raises(data):
    result = classify(data, [PLAIN, "not an address", ""])
    assert result.verdict in {"unrecognised", "bounce"}
    assert result.detail


def test_truncated_fixtures_never_raise():
    rng = random.Random(20)
    for path in sorted(CORPUS.glob("*.eml")):
        data = path.read_bytes()
        for cut in sorted(rng.sample(range(len(data)), 15)):
            assert classify(data[:cut], [PLAIN]).detail


def test_deeply_nested_parts():
    depth = 2000
    head = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n' for i in range(depth))
    result = classify(("From: a@b.example\nSubject: nest\n" + head + "text").encode(), [PLAIN])
    assert result.verdict == "unrecognised"


def test_a_huge_attachment_in_a_dsn():
    attachment = (
        "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n" + ("QUJD" * 19 + "\n") * 100_000
    )
    message = _dsn([_block("a@example.org", "failed", "5.1.1")]).replace(
        b"--b--\n", f"--b\n{attachment}--b--\n".encode()
    )
    assert len(message) > 7_000_000
    (finding,) = classify(message, [PLAIN]).findings
    assert finding.kind is HARD
