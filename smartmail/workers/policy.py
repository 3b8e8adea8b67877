"""The traffic-shaping policy: a TOML file mapping recipient domains to sites with rates, limits, retries, rules."""

from __future__ import annotations

import os
import re
import threading
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from smartmail import runtime
from smartmail.config import get_settings
from smartmail.errors import PolicyError
from smartmail.workers.outcomes import Reply, RetrySchedule

log = structlog.get_logger("smartmail.policy")

DEFAULT_POLICY_FILE = Path(__file__).with_name("policy.toml")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
# A slowed site regains a tenth of its configured rate per two quiet minutes: a halved rate is
# back in ten minutes without a further matching reply.
DEFAULT_RECOVER_AFTER = 120.0
DEFAULT_RECOVER_STEP = 0.1


def parse_rate(value: Any) -> float | None:
    """`"100/s"`, `"3000/min"`, `"50/h"` → messages per second; `"unlimited"` → None."""
    if isinstance(value, str) and value.strip().lower() == "unlimited":
        return None
    match = _RATE.match(value) if isinstance(value, str) else None
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f'expected a rate like "100/s", "3000/min" or "unlimited", got {value!r}')
    return float(match.group(1)) / _PER[match.group(2)]


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like `"500ms"`, `"30s"`, `"30m"`, `"2h"`, `"3d"`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f'expected a duration like 30, "30s", "5m", "2h" or "3d", got {value!r}')
    return float(match.group(1)) * _SECONDS[match.group(2)]


# --- The file's shape (pydantic validates it and names the offending key) ---------------------


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrySpec(_Spec):
    first_interval: float | None = None
    backoff_factor: float | None = Field(None, ge=1)
    max_interval: float | None = None
    jitter: float | None = Field(None, ge=0, le=1)
    max_age: float | None = None

    _durations = field_validator("first_interval", "max_interval", "max_age", mode="before")(
        lambda value: parse_duration(value) if value is not None else None
    )


class RuleSpec(_Spec):
    match: str
    action: Literal["slow", "suspend", "bounce"]
    rate: float | None = None  # slow: to this rate
    factor: float | None = Field(None, gt=0, lt=1)  # slow: to this fraction of the configured rate
    duration: float = 1800.0  # slow, suspend: how long after the last matching reply it lifts at the latest
    recover_after: float | None = None  # slow: a quiet period, after which the rate climbs one step
    recover_step: float | None = Field(None, ge=0, le=1)  # slow: the step, a fraction of the configured rate

    _rate = field_validator("rate", mode="before")(lambda value: parse_rate(value) if value is not None else None)
    _duration = field_validator("duration", mode="before")(parse_duration)

    @field_validator("recover_after", mode="before")
    @classmethod
    def _quiet_period(cls, value: Any) -> float | None:
        if value is None:
            return None
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError(f"expected a duration longer than 0, got {value!r}")
        return seconds

    @field_validator("recover_after", "recover_step")
    @classmethod
    def _slow_only(cls, value: float | None, info: ValidationInfo) -> float | None:
        action = info.data.get("action", "slow")
        if value is not None and action != "slow":
            raise ValueError(f"only a slow rule recovers step by step, not a {action} rule")
        return value

    @field_validator("match")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _slow_needs_a_target(self) -> RuleSpec:
        if self.action == "slow" and (self.rate is None) == (self.factor is None):
            raise ValueError("a slow rule needs exactly one of rate or factor")
        return self


class SiteSpec(_Spec):
    domains: list[str] = []
    mx: list[str] = []  # MX host suffixes that roll unknown domains up into this site
    rate: float | None | Literal["inherit"] = "inherit"
    burst: int | None = Field(None, ge=1)
    max_connections: int | None = Field(None, ge=1)
    max_messages_per_connection: int | None = Field(None, ge=1)
    retry: RetrySpec = RetrySpec()
    rules: list[RuleSpec] = []

    _rate = field_validator("rate", mode="before")(parse_rate)

    @field_validator("domains", "mx")
    @classmethod
    def _lower(cls, values: list[str]) -> list[str]:
        return [v.strip().lower().rstrip(".") for v in values]


class MxSpec(_Spec):
    enabled: bool = False
    timeout: float = Field(2.0, gt=0)
    cache_seconds: float = Field(3600.0, ge=0)


class PolicySpec(_Spec):
    mx: MxSpec = MxSpec()
    default: SiteSpec = SiteSpec()
    sites: dict[str, SiteSpec] = {}


# --- What the rest of SmartMail uses ----------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    action: str
    rate: float | None
    factor: float | None
    duration: float
    recover_after: float = DEFAULT_RECOVER_AFTER
    recover_step: float = DEFAULT_RECOVER_STEP

    def matches(self, reply: Reply) -> bool:
        return bool(self.pattern.search(str(reply)))


@dataclass(frozen=True)
class Site:
    """One destination's limits; `rate` is messages per second, None for unlimited."""

    name: str
    rate: float | None
    burst: int
    max_connections: int
    max_messages_per_connection: int
    retry: RetrySchedule
    rules: tuple[Rule, ...] = ()

    def rule_for(self, reply: Reply) -> Rule | None:
        return next((rule for rule in self.rules if rule.matches(reply)), None)

    def slowed_rate(self, rule: Rule) -> float | None:
        """The rate a `slow` rule sets, or None when it cannot apply (a factor of an unlimited rate)."""
        if rule.rate is not None:
            return rule.rate if self.rate is None else min(rule.rate, self.rate)
        return self.rate * rule.factor if self.rate is not None and rule.factor is not None else None


@dataclass(frozen=True)
class Policy:
    default: Site
    sites: dict[str, Site]
    domains: dict[str, str]
    mx_suffixes: tuple[tuple[str, str], ...] = ()  # (suffix, site name), longest first
    mx: MxSpec = field(default_factory=MxSpec)

    def site_for_domain(self, domain: str) -> Site | None:
        name = self.domains.get(domain)
        return self.sites[name] if name else None

    def site_for_mx(self, mx_hosts: list[str]) -> Site | None:
        for host in mx_hosts:
            for suffix, name in self.mx_suffixes:
                if host == suffix or host.endswith("." + suffix):
                    return self.sites[name]
        return None

    def unknown_site(self, domain: str) -> Site:
        """A domain no site claims is a site of its own with the default limits (as Postfix's
        per-destination limits and KumoMTA's default site behave)."""
        return replace(self.default, name=domain)


def _rules(specs: list[RuleSpec]) -> tuple[Rule, ...]:
    return tuple(
        Rule(
            re.compile(s.match),
            s.action,
            s.rate,
            s.factor,
            s.duration,
            s.recover_after if s.recover_after is not None else DEFAULT_RECOVER_AFTER,
            s.recover_step if s.recover_step is not None else DEFAULT_RECOVER_STEP,
        )
        for s in specs
    )


def build_policy(spec: PolicySpec, defaults: RetrySchedule) -> Policy:
    """Resolve inheritance: a site's unset keys come from [default], then from built-in defaults."""
    base = spec.default

    def pick(site_value, default_value, builtin):
        return site_value if site_value is not None else default_value if default_value is not None else builtin

    def make(name: str, site: SiteSpec) -> Site:
        rate = site.rate if site.rate != "inherit" else (base.rate if base.rate != "inherit" else None)
        retry = RetrySchedule(
            *(
                pick(getattr(site.retry, key), getattr(base.retry, key), getattr(defaults, key))
                for key in ("first_interval", "backoff_factor", "max_interval", "jitter", "max_age")
            )
        )
        return Site(
            name=name,
            rate=rate,
            burst=pick(site.burst, base.burst, max(1, int(rate or 1))),
            max_connections=pick(site.max_connections, base.max_connections, 20),
            max_messages_per_connection=pick(site.max_messages_per_connection, base.max_messages_per_connection, 100),
            retry=retry,
            # A site's own rules come first; the default's apply to every site after them.
            rules=_rules(site.rules) + (_rules(base.rules) if site is not base else ()),
        )

    sites = {name: make(name, site) for name, site in spec.sites.items()}
    domains: dict[str, str] = {}
    for name, site in spec.sites.items():
        for domain in site.domains:
            if domain in domains:
                raise PolicyError(f"sites.{name}.domains: {domain!r} already belongs to site {domains[domain]!r}")
            domains[domain] = name
    suffixes = sorted(((s, name) for name, site in spec.sites.items() for s in site.mx), key=lambda p: -len(p[0]))
    return Policy(make("default", base), sites, domains, tuple(suffixes), spec.mx)


def _file_path(data: Any, loc: tuple) -> list:
    """The part of a pydantic error location that names the file's own keys (pydantic adds
    labels of its own, such as union branches, that are not keys)."""
    path = []
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        elif (
            isinstance(data, dict)
            and isinstance(part, str)
            and "[" not in part
            and not part.startswith(("function-", "literal"))
        ):
            data = None  # a required key that is missing: the error is about it
        else:
            continue
        path.append(part)
    return path


def load_policy(path: Path, defaults: RetrySchedule) -> Policy:
    """Read and validate a policy file; raise PolicyError naming the file and the bad key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    try:
        spec = PolicySpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in _file_path(data, error["loc"])).lstrip(
                "."
            )
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{key or '(top level)'}: {message}")
        raise PolicyError(f"{path}: " + "; ".join(dict.fromkeys(problems))) from None
    try:
        return build_policy(spec, defaults)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None


class PolicyStore:
    """The current policy of this process, re-read when the file changes (checked at most every
    `check_interval` seconds), so an edit takes effect without restarting workers. A broken edit
    is logged and the last good policy stays in force."""

    def __init__(self, path: Path, defaults: RetrySchedule, check_interval: float = 1.0) -> None:
        self.path = path
        self.defaults = defaults
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._policy = load_policy(path, defaults)
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def get(self) -> Policy:
        if time.monotonic() - self._checked >= self.check_interval:
            with self._lock:
                self._checked = time.monotonic()
                stamp = self._stat()
                if stamp is not None and stamp != self._stamp:
                    self._stamp = stamp
                    try:
                        self._policy = load_policy(self.path, self.defaults)
                        log.info("policy.reloaded", path=str(self.path))
                    except PolicyError as exc:
                        log.error("policy.reload_failed", error=str(exc))
        return self._policy


@runtime.per_process()
def _policy_store() -> PolicyStore:
    s = get_settings()
    return PolicyStore(s.policy_file or DEFAULT_POLICY_FILE, RetrySchedule.from_settings(s), s.policy_check_interval)


def get_policy() -> Policy:
    """The process-wide policy, from SMARTMAIL_POLICY_FILE (default: the shipped policy.toml)."""
    return _policy_store().get()
