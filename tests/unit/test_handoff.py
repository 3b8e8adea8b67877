"""The background hand-off of committed ids to the outbox: batching, flush, failures, fork."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from smartmail.producer import handoff
from smartmail.workers import dispatch


@pytest.fixture
def pushes(monkeypatch):
    """Calls the hand-off makes to dispatch.enqueue(), as (ids, stream); `gate` holds each push until set."""
    calls: list[tuple[list[str], str]] = []
    gate = threading.Event()
    gate.set()

    def fake_dispatch(ids, stream=dispatch.TRANSACTIONAL):
        gate.wait(10)
        calls.append((list(ids), stream))

    monkeypatch.setattr(dispatch, "enqueue", fake_dispatch)
    return SimpleNamespace(calls=calls, gate=gate)


def test_flush_waits_for_every_id_and_ids_that_pile_up_go_in_one_push(pushes):
    box = handoff.Handoff()
    pushes.gate.clear()  # the first push is under way and slow
    box.put(["a"])
    assert not box.flush(timeout=0.2)  # still pushing
    box.put(["b", "c"])
    box.put(["d"], dispatch.BULK)
    box.put(["e"])
    pushes.gate.set()

    assert box.flush(timeout=5)
    assert pushes.calls == [(["a"], "transactional"), (["b", "c", "e"], "transactional"), (["d"], "bulk")]


def test_a_failed_push_does_not_stop_the_thread(monkeypatch):
    pushed: list[list[str]] = []

    def flaky(ids, stream=dispatch.TRANSACTIONAL):
        if ids == ["lost"]:
            raise RedisConnectionError("Redis is down")
        pushed.append(list(ids))

    monkeypatch.setattr(dispatch, "enqueue", flaky)
    box = handoff.Handoff()
    box.put(["lost"])
    assert box.flush(timeout=5)
    box.put(["next"])
    assert box.flush(timeout=5)
    assert pushed == [["next"]]  # the lost ids are left to the reconciler


def test_nothing_to_hand_off_starts_no_thread():
    box = handoff.Handoff()
    box.put([])
    assert box._thread is None and box.flush(timeout=0.1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_with_nothing_pending_and_no_thread(pushes):
    pushes.gate.clear()
    handoff.hand_off(["parent's"])  # pending in the parent, its push held
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a fresh hand-off of its own
        box = handoff._handoff()
        fresh = box._thread is None and not box._pending and box.flush(timeout=0.1)
        os.write(write, b"1" if fresh else b"0")
        os._exit(0)
    os.close(write)
    verdict = os.read(read, 1)
    os.waitpid(pid, 0)
    pushes.gate.set()
    assert handoff.flush(timeout=5)
    assert verdict == b"1"
    assert pushes.calls == [(["parent's"], "transactional")]
