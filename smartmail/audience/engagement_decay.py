"""The engagement score's model: points per human open and click, halving with time, kept as a log-space key."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from smartmail.config import get_settings
from smartmail.store.models import EventType

_EPOCH = datetime(1970, 1, 1)
_SECONDS_PER_DAY = 86400.0


def days_since_epoch(moment: datetime) -> float:
    """A naive UTC time (as stored) in days since 1970-01-01."""
    return (moment - _EPOCH).total_seconds() / _SECONDS_PER_DAY


# The score at time T is S(T) = Σ points_i · 2^(-(T - t_i)/h) over the contact's human opens and
# clicks, t_i their times and h the half-life: with τ = h / ln 2, S(T) = exp(K - T/τ) where
# K = ln Σ points_i · exp(t_i/τ). K, the stored `engagement_key`, never changes with time, only
# with new events, and is the same whatever order they are added in (a sum). So "S(now) ≥ X" is
# "K ≥ ln X + now/τ": one indexable comparison with a threshold computed in Python, on SQLite
# (no exp() or ln() there) as on PostgreSQL. K grows by 1/τ a day (about 1,000 in 2026 for
# 14 days): doubles hold it to 1e-13, where a sum kept at a fixed epoch (2^(t/h)) would overflow.
@dataclass(frozen=True)
class Decay:
    """The score's model: points per human open and click, and the half-life in days."""

    open_points: float
    click_points: float
    half_life_days: float

    @classmethod
    def from_settings(cls) -> Decay:
        settings = get_settings()
        return cls(
            settings.engagement_open_points, settings.engagement_click_points, settings.engagement_half_life_days
        )

    @property
    def tau_days(self) -> float:
        """The e-folding time: the score falls by a factor e in this many days."""
        return self.half_life_days / math.log(2)

    def points(self, event_type: str) -> float:
        return {EventType.OPENED.value: self.open_points, EventType.CLICKED.value: self.click_points}.get(
            event_type, 0.0
        )

    def key(self, score: float, at: datetime) -> float:
        """The key of `score` as of `at` (score > 0): also the threshold a segment compares keys with."""
        return math.log(score) + days_since_epoch(at) / self.tau_days

    def score(self, key: float, at: datetime) -> float:
        """The score as of `at` of a contact with `key`."""
        return math.exp(key - days_since_epoch(at) / self.tau_days)

    def decayed(self, score: float | None, scored_at: datetime | None, now: datetime) -> float:
        """A stored score (as of `scored_at`) as of `now`; 0 for a contact with no human open or click."""
        if not score or scored_at is None:
            return 0.0
        return score * 0.5 ** ((days_since_epoch(now) - days_since_epoch(scored_at)) / self.half_life_days)


def add_keys(first: float | None, second: float) -> float:
    """The key of the sum of two scores given by their keys (log-sum-exp, without overflow)."""
    if first is None:
        return second
    high, low = (first, second) if first >= second else (second, first)
    return high + math.log1p(math.exp(low - high))
