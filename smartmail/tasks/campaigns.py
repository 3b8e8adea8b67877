"""Campaign tasks: fan a launched campaign out to its audience (bulk queue)."""

from sqlalchemy.exc import OperationalError

from smartmail.campaigns import lifecycle as campaigns
from smartmail.workers.app import app


# Late ack (the app default) and a checkpoint per page: a fan-out lost with its worker resumes
# after the last committed page, restarted by beat once its lease ends (campaigns.run_due).
@app.task(
    name="smartmail.campaign.fan_out",
    autoretry_for=(OperationalError,),
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=10,
)
def fan_out_task(campaign_id: int, owner: str | None = None) -> None:
    campaigns.fan_out(campaign_id, owner)


@app.task(name="smartmail.maintenance.campaigns")
def run_due_campaigns() -> None:
    campaigns.run_due()
