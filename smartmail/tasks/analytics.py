"""Analytics tasks: beat's roll-up of new events and the scheduled report e-mail (on `default`)."""

from smartmail.analytics import report_mail, rollups
from smartmail.config import get_settings
from smartmail.workers.app import app
from smartmail.workers.dispatch import publish


@app.task(name=rollups.ROLL_UP_TASK)
def roll_up() -> None:
    done = rollups.roll_up(max_seconds=get_settings().analytics_interval)
    if done.more:  # time was up with events left: a new task, so other beat jobs get their turn
        publish(rollups.ROLL_UP_TASK)


@app.task(name=report_mail.SEND_REPORT_TASK)
def send_report() -> None:
    report_mail.send_report()
