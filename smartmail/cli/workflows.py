"""`smartmail workflows …`: save (versioned), show, list, pause, resume, move, enrol, status and simulate."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from smartmail.cli.output import err, fail, iso_time, out
from smartmail.errors import InvalidInput, NotFound

workflows_app = typer.Typer(
    help="Automations: workflows defined in JSON or YAML, their enrolments, status and simulated paths.",
    no_args_is_help=True,
)

T = TypeVar("T")


def _run(action: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call the service; bad input exits 2 naming the field, an unknown workflow or contact 1."""
    try:
        return action(*args, **kwargs)
    except InvalidInput as exc:
        fail(str(exc))
    except NotFound as exc:
        fail(str(exc.args[0]) if exc.args else "not found", code=1)


def _print_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M}" if value else ""


def _read_document(file: str) -> str:
    if file == "-":
        return sys.stdin.read()
    try:
        return Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"FILE: cannot read {file!r}: {exc}")


@workflows_app.command("save")
def save(
    name: str,
    file: Annotated[str, typer.Argument(help="The definition, JSON or YAML; - reads standard input.")],
) -> None:
    """Create the workflow, or give it a new version when the definition changed (running
    enrolments stay on theirs: see `move`). A bad definition exits 2 naming the step and field."""
    from smartmail.automations import workflows

    saved, changed = _run(workflows.save_workflow, name, _read_document(file))
    if not changed:
        out.print(f"workflow {escape(name)} unchanged (version {saved['version']})", highlight=False)
    elif saved["version"] == 1:
        out.print(f"workflow {escape(name)} created (version 1)", highlight=False)
    else:
        out.print(f"workflow {escape(name)}: new version {saved['version']}", highlight=False)


@workflows_app.command("show")
def show(
    name: str,
    version: Annotated[int | None, typer.Option(min=1, help="This version's definition; default: the current.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="The workflow and its definition as JSON.")] = False,
) -> None:
    """The workflow's state and versions, then its definition as YAML (which `save` takes back)."""
    import yaml

    from smartmail.automations import workflows

    found = _run(workflows.get_workflow, name, version)
    if json_:
        _print_json(found)
        return
    err.print(
        f"workflow {escape(found['name'])}: {found['state']}, version {found['version']} "
        f"of {found['current_version']}, updated {_when(found['updated_at'])} UTC",
        highlight=False,
    )
    out.print(
        escape(yaml.safe_dump(found["definition"], sort_keys=False, allow_unicode=True).rstrip("\n")), highlight=False
    )


def _trigger(definition: dict[str, Any]) -> str:
    trigger = definition.get("trigger") or {}
    for kind in ("event", "list", "segment"):
        if kind in trigger:
            return f"{kind} {trigger[kind]}"
    if "date" in trigger:
        return f"date {trigger['date'].get('attribute')}"
    if "engagement" in trigger:
        return f"engagement {trigger['engagement'].get('event')}"
    return ""


@workflows_app.command("list")
def list_(json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Workflows by name: state, current version, trigger, steps, goal."""
    from smartmail.automations import workflows

    rows: list[dict[str, Any]] = []
    while batch := workflows.list_workflows(limit=1000, after=rows[-1]["name"] if rows else None):
        rows += batch
    if json_:
        _print_json(rows)
        return
    table = Table("name", "state", "version", "trigger", "steps", "goal", "updated (UTC)")
    for row in rows:
        definition = row["definition"]
        table.add_row(
            escape(row["name"]),
            row["state"],
            str(row["version"]),
            escape(_trigger(definition)),
            str(len(definition.get("steps") or [])),
            escape(str((definition.get("goal") or {}).get("event") or "")),
            _when(row["updated_at"]),
        )
    out.print(table)


@workflows_app.command("pause")
def pause(name: str) -> None:
    """Enrol nobody and hold every running enrolment where it is."""
    from smartmail.automations import workflows

    held = _run(workflows.pause_workflow, name)
    out.print(f"workflow {escape(name)} paused; {held} enrolment(s) held", highlight=False)


@workflows_app.command("resume")
def resume(name: str) -> None:
    """Enrol again and let held enrolments go on (a wait that ended meanwhile runs at once)."""
    from smartmail.automations import workflows

    resumed = _run(workflows.resume_workflow, name)
    out.print(f"workflow {escape(name)} resumed; {resumed} enrolment(s) going on", highlight=False)


@workflows_app.command("move")
def move(
    name: str,
    from_version: Annotated[
        int | None, typer.Option(min=1, help="Only enrolments of this version; default: every older one.")
    ] = None,
) -> None:
    """Move running enrolments of older versions to the current one, each at the step of the same
    id (those whose step the current version lacks stay where they are)."""
    from smartmail.automations import workflows

    moved = _run(workflows.move_enrolments, name, from_version=from_version)
    current = _run(workflows.get_workflow, name)["version"]
    out.print(f"{moved} enrolment(s) of workflow {escape(name)} moved to version {current}", highlight=False)


def _properties(values: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; a VALUE that is valid JSON keeps its type (12, true, ["a"]), else it is a string."""
    properties: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            fail(f"--property: {item!r} is not KEY=VALUE")
        try:
            properties[key] = json.loads(raw)
        except json.JSONDecodeError:
            properties[key] = raw
    return properties


@workflows_app.command("enrol")
def enrol(
    name: str,
    contact: Annotated[str, typer.Option("--contact", help="A stored contact's address.")],
    property_: Annotated[
        list[str], typer.Option("--property", help="KEY=VALUE kept with the enrolment (repeatable; JSON keeps types).")
    ] = [],
) -> None:
    """Enrol a contact by hand, under the workflow's entry rule; exits 1 when it was not enrolled
    (enrolled before under the rule, or unsubscribed or suppressed)."""
    from smartmail.automations import reports

    if _run(reports.enrol_contact, name, contact, _properties(property_)):
        out.print(f"{escape(contact)} enrolled in workflow {escape(name)}", highlight=False)
        return
    err.print(
        f"{escape(contact)} not enrolled in workflow {escape(name)}: the entry rule let it in before, "
        "or it is unsubscribed or suppressed",
        highlight=False,
    )
    raise typer.Exit(1)


def _status_table(report: dict[str, Any], steps: list[str]) -> Table:
    """One row per step (the current version's order, then steps only older versions have)."""
    seen = {state for by_state in report["running"].values() for state in by_state}
    states = ["active", "held", *sorted(seen - {"active", "held"})]
    table = Table("step", *states, "runs", "emails")
    known = steps + sorted((set(report["running"]) | set(report["steps"])) - set(steps))
    for step in known:
        by_state = report["running"].get(step, {})
        counts = report["steps"].get(step, {"runs": 0, "emails": 0})
        table.add_row(
            escape(step), *(str(by_state.get(state, 0)) for state in states), str(counts["runs"]), str(counts["emails"])
        )
    return table


@workflows_app.command("status")
def status(name: str, json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Running enrolments per step and state, runs and emails per step, ended ones by reason, and
    conversions."""
    from smartmail.automations import reports, workflows

    report = _run(reports.status, name)
    if json_:
        _print_json(report)
        return
    definition = _run(workflows.get_workflow, name)["definition"]
    steps = [step["id"] for step in definition.get("steps", []) if isinstance(step, dict) and "id" in step]
    out.print(
        f"workflow {escape(report['name'])}: {report['state']}, version {report['version']}, "
        f"{report['enrolled']} enrolment(s)",
        highlight=False,
    )
    out.print(_status_table(report, steps))
    ended = ", ".join(f"{reason} {count}" for reason, count in sorted(report["ended"].items())) or "none"
    out.print(f"ended: {escape(ended)}", highlight=False)
    rate = report["conversion_rate"]
    out.print(
        f"conversions: {report['conversions']}" + (f" ({rate:.1%} of enrolments)" if rate is not None else ""),
        highlight=False,
    )


def _start(value: str | None) -> datetime | None:
    return None if value is None else iso_time(value, "--start")


@workflows_app.command("simulate")
def simulate(
    name: str,
    contact: Annotated[str, typer.Option("--contact", help="A stored contact's address.")],
    assume: Annotated[
        list[str],
        typer.Option(
            "--assume",
            help="opened or clicked (the previous email), or an event type that happens (repeatable); "
            "an awaited event not assumed times out.",
        ),
    ] = [],
    start: Annotated[str | None, typer.Option(help="ISO time the path starts (naive = UTC); default: now.")] = None,
    json_: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the path CONTACT would take through the current version, with the time (UTC) of each
    step. Nothing is sent or stored."""
    from smartmail.automations import reports

    stops = _run(reports.simulate, name, contact, assume=frozenset(assume), start=_start(start))
    if json_:
        _print_json([{"at": stop.at, "step": stop.step, "type": stop.type, "does": stop.does} for stop in stops])
        return
    table = Table("at (UTC)", "step", "type", "does")
    for stop in stops:
        table.add_row(_when(stop.at), escape(stop.step), stop.type, escape(stop.does))
    out.print(table)
