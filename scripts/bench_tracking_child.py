#!/usr/bin/env python3
"""Helper of scripts/bench_tracking.py: a campaign's set-up and launch with whichever SmartMail
PYTHONPATH names (this checkout, or a worktree of the commit before issue 19), so the fan-out and
the database schema are that code's. Imports nothing from scripts/ that would pull in this checkout.

    bench_tracking_child.py migrate URL
    bench_tracking_child.py audience URL N          # N contacts on the list `bench`
    bench_tracking_child.py campaign URL NAME TEMPLATE {tracked|untracked|before}
        clears messages, events and campaigns, creates NAME, prints "ready", launches on a line
        "go" from stdin, prints "launched"
"""

from __future__ import annotations

import sys


def main() -> int:
    command, url = sys.argv[1], sys.argv[2]
    from sqlalchemy import create_engine, insert, inspect, select, text

    if command == "migrate":
        from smartmail.store import migrate

        migrate.upgrade(url)
        return 0
    engine = create_engine(url)
    if command == "audience":
        from smartmail.store.engine import utcnow
        from smartmail.store.models import Contact, ContactList, ListMembership

        n, now = int(sys.argv[3]), utcnow()
        with engine.begin() as connection:
            connection.execute(insert(ContactList).values(name="bench", created_at=now))
            list_id = connection.scalar(select(ContactList.id).where(ContactList.name == "bench"))
            for start in range(0, n, 10_000):
                rows = []
                for i in range(start, min(n, start + 10_000)):
                    address = f"user{i}@example.com"
                    attributes = {"first_name": f"User{i}", "email": address, "plan": ("free", "pro", "team")[i % 3]}
                    rows.append(
                        {
                            "email": address,
                            "status": "subscribed",
                            "created_at": now,
                            "updated_at": now,
                            "attributes": attributes,
                        }
                    )
                connection.execute(insert(Contact), rows)
            ids = list(connection.scalars(select(Contact.id)))
            for start in range(0, len(ids), 10_000):
                connection.execute(
                    insert(ListMembership),
                    [
                        {"list_id": list_id, "contact_id": i, "status": "subscribed", "joined_at": now}
                        for i in ids[start : start + 10_000]
                    ],
                )
        return 0
    assert command == "campaign"
    name, template, variant = sys.argv[3:6]
    tables = set(inspect(engine).get_table_names())
    with engine.begin() as connection:
        clear = [t for t in ("events", "engagement_firsts", "messages", "campaigns") if t in tables]
        connection.execute(text(f"TRUNCATE {', '.join(clear)}"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for table in clear:
            connection.execute(text(f"VACUUM ANALYZE {table}"))
    from smartmail.campaigns import lifecycle as campaigns

    campaigns.create_campaign(name, template=template, lists=["bench"])
    if variant == "untracked":  # create_campaign takes no tracking argument yet: the column, before launch
        with engine.begin() as connection:
            connection.execute(text("UPDATE campaigns SET tracking = false WHERE name = :name"), {"name": name})
    with engine.connect() as connection:
        tracking = (
            connection.scalar(text("SELECT tracking FROM campaigns WHERE name = :name"), {"name": name})
            if "tracking" in {c["name"] for c in inspect(engine).get_columns("campaigns")}
            else None
        )
    print(f"ready tracking={tracking}", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    campaigns.launch_campaign(name)
    print("launched", flush=True)
    sys.stdin.readline()  # stay until told (the parent reads campaign_status through SQL itself)
    return 0


if __name__ == "__main__":
    sys.exit(main())
