"""Import task: runs (or resumes) one contact import job on the `imports` queue."""

from sqlalchemy.exc import OperationalError

from smartmail.audience import imports
from smartmail.workers.app import app


# A redelivered task resumes from the job's checkpoint (acks_late, reject on worker lost), and a
# database outage is retried the same way.
@app.task(
    name="smartmail.imports.run",
    autoretry_for=(OperationalError,),
    retry_backoff=5,
    retry_backoff_max=120,
    max_retries=5,
)
def run(job_id: str) -> None:
    imports.run_job(job_id)
