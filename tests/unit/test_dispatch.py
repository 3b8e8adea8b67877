"""The outbox's Lua scripts (fakeredis with Lua): batching, drain leases, no lost wake-ups, lease expiry."""

from __future__ import annotations

import time

import fakeredis
import kombu.exceptions
import pytest
import redis

from smartmail.workers import dispatch
from smartmail.workers.dispatch import Outbox


@pytest.fixture
def outbox(settings_env):  # the drain task reads settings (the Celery app's configuration)
    return Outbox(fakeredis.FakeRedis(), prefix="t:", max_drains=3, batch_size=4)


def test_one_id_starts_one_drain_and_later_ids_join_it(outbox):
    assert outbox.push(["a"]) == ["1"]
    assert outbox.push(["b"]) == []  # the active drain will pick it up
    assert outbox.pop("1") == ["a", "b"]
    assert outbox.pop("1") == []  # nothing left: the lease ends
    assert outbox.active_drains() == 0
    assert outbox.push(["c"]) == ["2"]  # so the next id starts a new drain


def test_backlog_starts_drains_up_to_the_cap(outbox):
    leases = outbox.push([str(i) for i in range(10)])  # 10 ids, batch 4: 3 batches, cap 3
    assert len(leases) == 3 and outbox.active_drains() == 3
    assert outbox.push([str(i) for i in range(10, 30)]) == []  # capped
    popped = [outbox.pop(lease) for lease in leases]
    assert [len(batch) for batch in popped] == [4, 4, 4]
    assert popped[0] == ["0", "1", "2", "3"]  # first in, first out


def test_a_large_push_keeps_every_id(outbox):
    ids = [f"id{i}" for i in range(10_000)]  # more than one RPUSH chunk inside the script
    lease = outbox.push(ids)[0]
    seen = []
    while batch := outbox.pop(lease):
        seen.extend(batch)
    assert seen == ids


def test_a_drain_whose_lease_expired_is_replaced(outbox, monkeypatch):
    monkeypatch.setattr(dispatch, "LEASE_MS", -1)  # every lease is already expired when written
    assert outbox.push(["a"]) == ["1"]
    assert outbox.active_drains() == 0  # an expired lease is not an active drain
    assert outbox.push(["b"]) == ["2"]  # the first drain is presumed dead: another one starts


def test_empty_push_does_nothing_on_an_empty_outbox(outbox):
    assert outbox.push([]) == []
    assert outbox.backlog() == 0


def test_empty_push_restarts_a_drain_for_a_stranded_backlog(outbox, monkeypatch):
    monkeypatch.setattr(dispatch, "LEASE_MS", -1)
    outbox.push(["a", "b"])  # its drain dies: the lease expires, the ids stay
    assert outbox.push([]) == ["2"]


def test_an_id_due_before_the_timer_wakes_gets_a_timer_of_its_own(outbox):
    now = time.time()
    first = outbox.push_later([("late", now + 20)])
    assert len(first) == 1
    assert outbox.pop(first[0]) == pytest.approx(20, abs=1)  # that drain now times the late id
    second = outbox.push_later([("soon", now + 0.2)])
    assert len(second) == 1  # the timer would sleep 20 s past it: a new drain times it
    assert outbox.pop(second[0]) < 1
    assert outbox.push_later([("later", now + 25)]) == []  # a later id leaves the timer alone


def test_a_due_time_is_rounded_up_to_the_millisecond(outbox):
    # Rounded down, the id could be handed to a drain just before its row is due, and not be claimed.
    second = int(time.time()) + 100
    outbox.push_later([("x", second + 0.0001)])
    assert outbox.client.zscore(outbox.keys[3], "x") == second * 1000 + 1


def _run_drain(outbox, monkeypatch, arriving: list[list[str]], publish_fails: bool = False):
    """Run a drain task's body against `outbox`; each batch delivered lets the next ids of
    `arriving` reach the outbox, as if sent meanwhile. The batches delivered, and the follow-ups."""
    from smartmail.tasks import send as tasks

    delivered, follow_ups = [], []

    def publish(task_name, lease):
        if publish_fails:
            raise kombu.exceptions.OperationalError("broker down")
        assert task_name == "smartmail.drain"
        follow_ups.append(lease)

    monkeypatch.setattr(tasks, "get_outbox", lambda stream: outbox)
    monkeypatch.setattr(tasks, "publish", publish)

    def deliver(ids, *, stream, more):
        for batch in more:
            delivered.append(batch)
            if arriving:
                outbox.push(arriving.pop(0))

    monkeypatch.setattr(tasks.delivery, "deliver", deliver)
    lease = outbox.push(arriving.pop(0))[0]
    tasks._drain(tasks.drain, lease, "transactional")
    return delivered, follow_ups


def test_a_drain_that_empties_the_outbox_delivers_what_arrives_meanwhile_in_the_same_task(outbox, monkeypatch):
    delivered, follow_ups = _run_drain(outbox, monkeypatch, [["a"], ["b", "c"], ["d"]])
    assert delivered == [["a"], ["b", "c"], ["d"]] and follow_ups == []
    assert outbox.active_drains() == 0  # its last pop found nothing and ended the lease


def test_a_drain_delivers_full_batches_in_the_same_task_while_its_time_lasts(outbox, monkeypatch):
    delivered, follow_ups = _run_drain(outbox, monkeypatch, [["a"], [str(i) for i in range(9)]])
    assert delivered == [["a"], ["0", "1", "2", "3"], ["4", "5", "6", "7"], ["8"]]  # batch size 4
    assert follow_ups == [] and outbox.backlog() == 0


def test_a_drain_whose_time_is_up_hands_the_rest_to_a_follow_up(outbox, monkeypatch):
    from smartmail.tasks import send as tasks

    monkeypatch.setattr(tasks, "LOOP_SECONDS", -1.0)
    delivered, follow_ups = _run_drain(outbox, monkeypatch, [[str(i) for i in range(9)]])
    assert delivered == [["0", "1", "2", "3"]]
    assert follow_ups == ["1"] and outbox.backlog() == 5  # the follow-up, under the same lease, takes them


def test_a_broker_failure_mid_drain_ends_the_drain_and_keeps_what_was_popped(outbox, monkeypatch):
    """A failed pop must not escape into deliver(): windows it has claimed would be left `sending`."""
    real_pop = outbox.pop
    pops = []

    def pop(lease, token=None):
        pops.append(lease)
        if len(pops) == 2:
            raise redis.ConnectionError("Redis went away")
        return real_pop(lease, token)

    monkeypatch.setattr(outbox, "pop", pop)
    delivered, follow_ups = _run_drain(outbox, monkeypatch, [["a"], ["b"]])
    assert delivered == [["a"]] and follow_ups == [] and outbox.backlog() == 1  # "b" waits for a new drain


def test_a_drain_that_cannot_publish_its_follow_up_still_delivers_its_last_batch(outbox, monkeypatch):
    from smartmail.tasks import send as tasks

    monkeypatch.setattr(tasks, "LOOP_SECONDS", -1.0)
    delivered, follow_ups = _run_drain(outbox, monkeypatch, [[str(i) for i in range(9)]], publish_fails=True)
    assert delivered == [["0", "1", "2", "3"]] and follow_ups == [] and outbox.backlog() == 5
