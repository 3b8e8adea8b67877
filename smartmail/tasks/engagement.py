"""Engagement task: beat's tick reading new human opens and clicks into the contacts' scores (on `default`)."""

from smartmail.audience import engagement_score
from smartmail.config import get_settings
from smartmail.workers.app import app


@app.task(name=engagement_score.SCORE_TASK)
def score() -> None:
    # Up to one beat interval of pages; what is left waits for the next tick.
    engagement_score.update_scores(max_seconds=get_settings().engagement_interval)
