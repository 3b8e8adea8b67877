"""GroupSpool: mails from concurrent sessions share commits, and a failed commit fails each of its mails."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from smartmail.feedback import inbound


def test_concurrent_mails_share_commits_and_each_gets_its_own_id(monkeypatch):
    groups: list[int] = []
    gate = threading.Event()

    def commit(mails):
        gate.wait(5)  # the first commit is slow: the others queue up behind it
        groups.append(len(mails))
        return [f"id-{mail[2].decode()}" for mail in mails]

    monkeypatch.setattr(inbound, "spool_many", commit)
    spool = inbound.GroupSpool()
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(spool, "", ["bounce@b.example"], str(i).encode(), "127.0.0.1") for i in range(20)]
        gate.set()
        ids = [f.result(10) for f in futures]
    assert ids == [f"id-{i}" for i in range(20)]
    assert sum(groups) == 20 and len(groups) < 20


def test_a_failed_commit_fails_every_mail_of_its_group_and_the_next_group_goes_on(monkeypatch):
    calls = []

    def commit(mails):
        calls.append(len(mails))
        if len(calls) == 1:
            raise OSError("database gone")
        return ["ok"] * len(mails)

    monkeypatch.setattr(inbound, "spool_many", commit)
    spool = inbound.GroupSpool()
    with pytest.raises(OSError, match="database gone"):
        spool("", ["bounce@b.example"], b"x", None)
    assert spool("", ["bounce@b.example"], b"y", None) == "ok"


def test_one_bad_mail_does_not_fail_the_others_of_its_group(monkeypatch):
    gate = threading.Event()

    def commit(mails):
        gate.wait(5)
        if any(mail[2] == b"bad" for mail in mails):
            raise ValueError("NUL in text")
        return [f"id-{mail[2].decode()}" for mail in mails]

    monkeypatch.setattr(inbound, "spool_many", commit)
    spool = inbound.GroupSpool()
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(spool, "", ["b@b.example"], body, None) for body in (b"1", b"2", b"bad", b"3", b"4")]
        gate.set()
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result(10))
            except ValueError:
                outcomes.append("refused")
    assert outcomes == ["id-1", "id-2", "refused", "id-3", "id-4"]
