"""Processing the inbound spool on a real database (SQLite and PostgreSQL): attempts counted before
the work, a mail out of attempts set aside, batches bounded by bytes, a failing mail isolated."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, update

from smartmail.feedback import classify, inbound
from smartmail.store.engine import session_scope
from smartmail.store.models import InboundMessage

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "inbound"


def states() -> dict[str, tuple[str, int]]:
    with session_scope() as session:
        return {row.id: (row.state, row.attempts) for row in session.scalars(select(InboundMessage))}


def test_a_mail_out_of_attempts_is_set_aside_and_the_rest_processed(env):
    human = (FIXTURES / "human_reply.eml").read_bytes()
    stuck, fine = (inbound.spool("a@example.org", ["bounce@b.example"], human) for _ in range(2))
    with session_scope() as session:  # as runs that died with their worker leave it
        session.execute(update(InboundMessage).where(InboundMessage.id == stuck).values(attempts=inbound.MAX_ATTEMPTS))
    result = inbound.process_pending()
    assert (result.mails, result.failed) == (1, 1)
    assert states() == {stuck: ("failed", inbound.MAX_ATTEMPTS), fine: ("processed", 1)}


def test_batches_are_bounded_by_bytes_and_all_mail_is_processed(env, monkeypatch):
    monkeypatch.setattr(inbound, "BATCH_BYTES", 3000)
    raw = (FIXTURES / "out_of_office.eml").read_bytes()
    ids = [inbound.spool("a@example.org", ["bounce@b.example"], raw) for _ in range(7)]
    batches = []
    real = inbound._process
    monkeypatch.setattr(
        inbound, "_process", lambda session, rows, result: (batches.append(len(rows)), real(session, rows, result))
    )
    assert inbound.process_pending().mails == 7
    assert all(size * len(raw) <= 3000 or size == 1 for size in batches) and sum(batches) == 7
    assert {state for state, _ in states().values()} == {"processed"} and len(ids) == 7


def test_a_mail_whose_processing_raises_keeps_its_error_and_holds_up_no_other(env, monkeypatch):
    good = (FIXTURES / "out_of_office.eml").read_bytes()
    poison = b"Subject: poison\r\n\r\nx\r\n"
    real = classify.classify

    def classify_or_raise(raw, recipients):
        if raw == poison:
            raise RuntimeError("a bug in a detector")
        return real(raw, recipients)

    monkeypatch.setattr(inbound, "classify", classify_or_raise)
    bad = inbound.spool("", ["bounce@b.example"], poison)
    others = [inbound.spool("", ["bounce@b.example"], good) for _ in range(3)]
    for _ in range(inbound.MAX_ATTEMPTS):
        inbound.process_pending()
        assert all(states()[i][0] == "processed" for i in others)
    assert states()[bad] == ("failed", inbound.MAX_ATTEMPTS)
    assert "a bug in a detector" in inbound.get_inbound(bad)["outcome"]["error"]
