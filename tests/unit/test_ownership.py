"""A worker's owner lease and write-ahead marks (fakeredis with Lua): marking, fencing, recovery's view."""

from __future__ import annotations

import fakeredis
import pytest

from smartmail.workers import ownership
from smartmail.workers.ownership import Owner


@pytest.fixture
def client():
    return fakeredis.FakeRedis()


def test_marks_are_kept_until_their_outcomes_are_recorded(client):
    owner = Owner(client, "t:", lease_seconds=30)
    assert owner.mark(["a", "b"]) and owner.mark(["c"])
    assert client.smembers(owner.keys[1]) == {b"-", b"a", b"b", b"c"}
    owner.recorded(["a", "b"])
    assert owner.mark(["d"])  # the recorded ids go with the next mark call
    assert client.smembers(owner.keys[1]) == {b"-", b"c", b"d"}


def test_a_lapsed_lease_refuses_every_mark_and_the_process_takes_a_new_owner(client, monkeypatch):
    made: list[Owner] = []

    def make() -> Owner:
        made.append(Owner(client, "t:", lease_seconds=30))
        return made[-1]

    monkeypatch.setattr(ownership, "_owner", ownership.runtime.PerProcess(make, None))
    owner = ownership.current()
    client.delete(owner.keys[0])  # the lease lapsed while the process was frozen
    assert not owner.mark(["a"]) and owner.lost.is_set()
    assert client.smembers(owner.keys[1]) == {b"-"}  # nothing marked: recovery re-queues "a"
    assert not client.exists(owner.keys[0])  # and nothing brought the lease back
    replacement = ownership.current()
    assert replacement is not owner and replacement.id != owner.id and replacement.mark(["a"])


def test_recovery_sees_dead_owners_with_their_marks_and_lost_marks_apart(client):
    alive = Owner(client, "t:", lease_seconds=30)
    dead = Owner(client, "t:", lease_seconds=30)
    forgotten = Owner(client, "t:", lease_seconds=30)
    assert dead.mark(["x", "y"]) and forgotten.mark(["z"])
    client.delete(dead.keys[0], forgotten.keys[0], forgotten.keys[1])  # Redis lost the last one's marks too
    found = ownership.inspect(client, "t:", [alive.id, dead.id, forgotten.id])
    assert found == {dead.id: {"x", "y"}, forgotten.id: None}
    ownership.forget(client, "t:", found)
    assert not client.exists(dead.keys[1])


def test_a_clean_close_drops_the_lease_at_once_and_a_fork_keeps_it(client):
    owner = Owner(client, "t:", lease_seconds=30)
    owner.close(close=False)  # a forked child: the parent's lease is not ours to drop
    assert client.exists(owner.keys[0])
    owner.close()
    assert not client.exists(owner.keys[0])


def test_without_redis_nothing_is_marked(monkeypatch):
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    client.connection_pool.connection_kwargs["server"].connected = False
    owner = Owner(client, "t:", lease_seconds=30)
    assert owner.lost.is_set() and not owner.mark(["a"])
