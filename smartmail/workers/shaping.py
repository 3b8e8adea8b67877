"""Traffic shaping on the send path: a recipient's site, how much of a window may go now, what replies change."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from smartmail import runtime
from smartmail.workers.limiter import SiteThrottle, get_throttle
from smartmail.workers.outcomes import Reply
from smartmail.workers.policy import Policy, Site, get_policy

log = structlog.get_logger("smartmail.shaping")


@dataclass(frozen=True)
class Hold:
    """A message that may not go now: wait `seconds`, then try again (not counted as an attempt)."""

    seconds: float
    reason: str


class MxResolver:
    """MX host names of a domain via dnspython, cached per process (failures too, briefly)."""

    def __init__(
        self,
        timeout: float = 2.0,
        cache_seconds: float = 3600.0,
        lookup: Callable[[str, float], list[str]] | None = None,
    ) -> None:
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._lookup = lookup or _dns_mx
        self._cache: dict[str, tuple[float, list[str]]] = {}

    def __call__(self, domain: str) -> list[str]:
        cached = self._cache.get(domain)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        try:
            hosts, ttl = self._lookup(domain, self.timeout), self.cache_seconds
        except Exception as exc:  # noqa: BLE001 - no MX answer: the domain stays a site of its own
            log.info("mx.lookup_failed", domain=domain, error=str(exc))
            hosts, ttl = [], min(self.cache_seconds, 300.0)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[domain] = (time.monotonic() + ttl, hosts)
        return hosts


def _dns_mx(domain: str, timeout: float) -> list[str]:
    import dns.resolver

    answer = dns.resolver.resolve(domain, "MX", lifetime=timeout)
    return [str(r.exchange).rstrip(".").lower() for r in sorted(answer, key=lambda r: r.preference)]


class Shaper:
    """The per-process front of traffic shaping; policy and Redis state are shared by all workers."""

    def __init__(
        self, throttle: SiteThrottle, policy: Callable[[], Policy] = get_policy, resolver: MxResolver | None = None
    ) -> None:
        self.throttle = throttle
        self.policy = policy
        self.resolver = resolver

    def site_for(self, domain: str) -> Site:
        """The site a recipient domain belongs to: listed in the policy, else by MX suffix when MX
        look-ups are on, else a site of its own with the default limits."""
        policy = self.policy()
        domain = domain.lower().rstrip(".")
        site = policy.site_for_domain(domain)
        if site is None and policy.mx.enabled and policy.mx_suffixes:
            if self.resolver is None:
                self.resolver = MxResolver(policy.mx.timeout, policy.mx.cache_seconds)
            self.resolver.timeout, self.resolver.cache_seconds = policy.mx.timeout, policy.mx.cache_seconds
            site = policy.site_for_mx(self.resolver(domain))
        return site or policy.unknown_site(domain)

    def admit(self, site: Site, count: int) -> tuple[int, list[Hold]]:
        """How many of `count` messages for the site may go now, and a hold for each of the rest,
        spread over the site's coming token times."""
        grant = self.throttle.acquire(site, count)
        if grant.suspended:
            reason = f"site {site.name} suspended"
        else:
            rate = f"{1 / grant.spacing:g}/s" if grant.spacing else "unlimited"
            reason = f"throttled: site {site.name} at {rate}"
        holds = [Hold(grant.first_wait + i * grant.spacing, reason) for i in range(count - grant.granted)]
        return grant.granted, holds

    @staticmethod
    def connection_hold(site: Site) -> Hold:
        # Back while the holder still keeps its connection (SmtpTransport.keep_wanted_for), so it
        # may take them on that connection; jitter keeps several workers' from coming back at once.
        return Hold(random.uniform(0.05, 0.3), f"throttled: site {site.name} at {site.max_connections} connections")

    def react(self, site: Site, reply: Reply, reacted: set[str]) -> str | None:
        """Apply the first response rule the reply matches, for every worker at once; returns the
        action when it concerns this message (`bounce`), else None. `reacted` holds the sites
        already acted on in this window: one Redis call per site and window is enough."""
        rule = site.rule_for(reply)
        if rule is None:
            return None
        if rule.action == "bounce":
            return "bounce"
        if site.name in reacted:
            return None
        reacted.add(site.name)
        armed = self.throttle.apply_rule(site, rule, str(reply))
        if armed.changed and rule.action == "slow":
            log.warning(
                "site.slowed",
                site=site.name,
                rate=armed.rate,
                recover_after=rule.recover_after,
                recover_step=rule.recover_step,
                reply=str(reply)[:300],
            )
        elif armed.changed:
            log.warning("site.suspended", site=site.name, seconds=rule.duration, reply=str(reply)[:300])
        return None


@runtime.per_process()
def get_shaper() -> Shaper:
    return Shaper(get_throttle())
