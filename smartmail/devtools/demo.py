"""`smartmail demo`: start what is missing, send personalized transactional emails, print what the sink got."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

PEOPLE = [
    ("Ada", "ada@example.com", "Analytical"),
    ("Grace", "grace@example.org", "Compiler"),
    ("Linus", "linus@example.net", "Kernel"),
    ("Margaret", "margaret@example.com", "Apollo"),
    ("Dennis", "dennis@example.org", "Unix"),
    ("Barbara", "barbara@example.net", "CLU"),
    ("Ken", "ken@example.com", "Plan 9"),
    ("Frances", "frances@example.org", "Fortran"),
]


def _defaults(data: Path) -> None:
    repo_templates = Path(__file__).resolve().parents[2] / "templates"
    os.environ.setdefault("SMARTMAIL_DATABASE_URL", f"sqlite:///{data / 'demo.db'}")
    os.environ.setdefault("SMARTMAIL_DEFAULT_SENDER", "SmartMail Demo <demo@example.com>")
    os.environ.setdefault("SMARTMAIL_SECRET_KEY", secrets.token_hex(24))
    if repo_templates.is_dir():
        os.environ.setdefault("SMARTMAIL_TEMPLATES_DIR", str(repo_templates))


def run(count: int, console: Console) -> int:
    from smartmail.config.settings import get_settings
    from smartmail.devtools import localredis
    from smartmail.devtools.sink import SinkHandler, start_sink
    from smartmail.store import migrate

    data = Path(".smartmail").resolve()
    data.mkdir(exist_ok=True)
    _defaults(data)
    started: list[subprocess.Popen] = []
    url, redis_process = localredis.ensure(
        os.environ.get("SMARTMAIL_REDIS_URL", "redis://127.0.0.1:6379/0"), data / "redis"
    )
    os.environ["SMARTMAIL_REDIS_URL"] = url
    if redis_process:
        started.append(redis_process)
        console.print(f"started a local Redis at {url}")
    else:
        console.print(f"using the Redis at {url}")
    handler = SinkHandler(directory=data / "sink")
    port = localredis.free_port()
    sink = start_sink(handler, port=port)
    os.environ["SMARTMAIL_SMTP_URL"] = f"smtp://127.0.0.1:{port}?tls=none"
    os.environ["SMARTMAIL_TRANSPORT"] = "smtp"
    get_settings.forget()
    settings = get_settings()
    console.print(f"SMTP sink on 127.0.0.1:{port}, database {settings.database_url}")
    migrate.upgrade(settings.database_url)
    try:
        worker = subprocess.Popen(
            [sys.executable, "-m", "smartmail.cli.main", "worker", "--pool", "solo", "-l", "WARNING"],
            env={**os.environ, "SMARTMAIL_LOG_LEVEL": "WARNING"},
            stdout=(data / "worker.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        started.append(worker)
        console.print(f"started a worker (pid {worker.pid}, log in {data / 'worker.log'})")
        import smartmail

        people = [PEOPLE[i % len(PEOPLE)] for i in range(count)]
        results = [
            smartmail.send(
                f"{name} <{address}>",
                template="welcome",
                context={"first_name": name, "email": address, "plan": plan, "product": "SmartMail"},
                tags=["demo"],
                idempotency_key=f"demo-{time.time_ns()}-{i}",
            )
            for i, (name, address, plan) in enumerate(people)
        ]
        console.print(f"queued {len(results)} email(s)")
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("waiting for the sink", total=len(results))
            deadline = time.monotonic() + 60
            while handler.count < len(results) and time.monotonic() < deadline and worker.poll() is None:
                progress.update(task, completed=handler.count)
                time.sleep(0.1)
        table = Table(title=f"the sink received {handler.count} of {len(results)}")
        for column in ("To", "Subject", "Message-ID", "text part (first line)"):
            table.add_column(column)
        for item in handler.messages:
            message = item.parsed()
            body = message.get_body(("plain",))
            first_line = body.get_content().strip().splitlines()[0] if body is not None else ""
            table.add_row(message["To"], message["Subject"], message["Message-ID"], first_line)
        console.print(table)
        states: dict[str, int] = {}
        for result in results:
            state = smartmail.status(result.id)["state"]
            states[state] = states.get(state, 0) + 1
        console.print(f"message states in the database: {states}; .eml copies in {data / 'sink'}")
        return 0 if handler.count == len(results) else 1
    finally:
        for process in reversed(started):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        sink.stop()
