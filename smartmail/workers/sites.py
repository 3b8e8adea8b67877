"""Per-site status for operators: configured and current rate, connections, deferrals, slow-downs, suspensions."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import func, select

from smartmail.store.engine import get_engine
from smartmail.store.models import Message, MessageState, in_state
from smartmail.store.sql import messages as messages_sql
from smartmail.workers.limiter import SiteState, get_throttle
from smartmail.workers.policy import Site, get_policy
from smartmail.workers.shaping import get_shaper


@dataclass(frozen=True)
class SiteStatus:
    site: Site
    domains: list[str]
    state: SiteState
    deferred: int

    @property
    def current_rate(self) -> float | None:
        """The rate in force now: none while suspended, the slowed one during a slow-down."""
        if self.state.suspended_for:
            return 0.0
        return self.state.slowed_rate if self.state.slowed_rate is not None else self.site.rate


def _deferred_by_domain() -> Counter:
    """Deferred messages per recipient domain, counted in SQL (the bare domain, lower-cased)."""
    engine = get_engine()
    recipient = func.rtrim(Message.recipient, ">")
    domain = messages_sql.for_bind(engine).domain_of(recipient)
    query = select(func.lower(domain), func.count()).where(in_state(MessageState.DEFERRED)).group_by(func.lower(domain))
    with engine.connect() as connection:
        return Counter(dict(connection.execute(query).all()))


def site_statuses() -> list[SiteStatus]:
    """The default limits and every site the policy names, then every other site (a domain of
    its own) with state in Redis or deferred mail."""
    policy = get_policy()
    shaper = get_shaper()
    throttle = get_throttle()
    deferred_sites: Counter = Counter()
    domains: dict[str, set[str]] = {name: set() for name in policy.sites}
    sites: dict[str, Site] = {"default": policy.default, **policy.sites}
    for domain, count in _deferred_by_domain().items():
        site = shaper.site_for(domain)
        sites.setdefault(site.name, site)
        domains.setdefault(site.name, set()).add(domain)
        deferred_sites[site.name] += count
    for domain, name in policy.domains.items():
        domains[name].add(domain)
    for name in throttle.known_sites() - set(sites):
        sites[name] = policy.sites.get(name) or policy.unknown_site(name)
    return [
        SiteStatus(site, sorted(domains.get(name, ())), throttle.state(name, site.rate), deferred_sites[name])
        for name, site in sorted(sites.items())
    ]
