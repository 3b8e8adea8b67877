"""`smartmail contacts`, `smartmail lists` and `smartmail segments`: the audience commands."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from smartmail.audience.contacts import InvalidInput, NotFound
from smartmail.cli.output import err, fail, out

contacts_app = typer.Typer(help="Contacts: add, show, change, erase, import and export.", no_args_is_help=True)
lists_app = typer.Typer(help="Lists and their members.", no_args_is_help=True)
segments_app = typer.Typer(help="Segments: saved JSON rules, counts and previews.", no_args_is_help=True)


def _print_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


def _parse_attrs(values: list[str], option: str = "--attr") -> dict[str, Any]:
    """NAME=VALUE pairs; a VALUE that is valid JSON keeps its type (31, true, ["a"]), else it is a string."""
    attributes: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            fail(f"{option}: {item!r} is not NAME=VALUE")
        try:
            attributes[name] = json.loads(raw)
        except json.JSONDecodeError:
            attributes[name] = raw
    return attributes


def _json_option(value: str | None, option: str) -> Any:
    if value is None:
        return None
    try:
        if value.startswith("@"):
            return json.loads(Path(value[1:]).read_text(encoding="utf-8"))
        return json.loads(value)
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{option}: cannot read {value[1:]!r}: {exc}")
    except json.JSONDecodeError as exc:
        fail(f"{option}: not valid JSON: {exc}")


# --- contacts --------------------------------------------------------------------------------------


def _contact_fields(attr: list[str], status: str | None, timezone: str | None, locale: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if attr:
        fields["attributes"] = _parse_attrs(attr)
    for name, value in (("status", status), ("timezone", timezone), ("locale", locale)):
        if value is not None:
            fields[name] = value
    return fields


@contacts_app.command("add")
def contacts_add(
    email: str,
    attr: Annotated[
        list[str], typer.Option("--attr", help="Attribute NAME=VALUE (repeatable; JSON values keep their type).")
    ] = [],
    status: Annotated[
        str | None, typer.Option(help="subscribed, unsubscribed, bounced, complained or blocked.")
    ] = None,
    timezone: Annotated[str | None, typer.Option(help="IANA time zone, e.g. Europe/Paris.")] = None,
    locale: Annotated[str | None, typer.Option(help="e.g. en or pt-BR.")] = None,
    list_: Annotated[list[str], typer.Option("--list", help="Join this list (repeatable).")] = [],
    upsert: Annotated[bool, typer.Option(help="Update the contact if the address is known.")] = False,
) -> None:
    """Add a contact (or with --upsert, add or update one)."""
    from smartmail.audience import contacts

    fields = _contact_fields(attr, status, timezone, locale)
    try:
        for name in list_:  # every list checked before anything is written
            contacts.get_list_id(name)
        if upsert:
            contact, created = contacts.upsert_contact(email, source="cli", **fields)
        else:
            contact, created = contacts.create_contact(email, source="cli", **fields), True
        for name in list_:
            contacts.add_members(name, [contact["email"]], source="cli")
    except InvalidInput as exc:
        fail(str(exc))
    out.print(f"{'created' if created else 'updated'} contact {contact['id']} {contact['email']}", highlight=False)


@contacts_app.command("get")
def contacts_get(email: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show a contact, its attributes and lists."""
    from smartmail.audience import contacts

    try:
        contact = contacts.get_contact(email)
    except InvalidInput as exc:
        fail(str(exc))
    if contact is None:
        fail(f"email: no contact with address {email}", code=1)
    if as_json:
        _print_json(contact)
        return
    table = Table(show_header=False)
    for key, value in contact.items():
        shown = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
        table.add_row(key, "" if shown is None else str(shown))
    out.print(table)


@contacts_app.command("update")
def contacts_update(
    email: str,
    attr: Annotated[list[str], typer.Option("--attr", help="Set attribute NAME=VALUE (repeatable).")] = [],
    unset: Annotated[list[str], typer.Option("--unset", help="Remove this attribute (repeatable).")] = [],
    status: Annotated[str | None, typer.Option()] = None,
    timezone: Annotated[str | None, typer.Option()] = None,
    locale: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Change a contact's status, time zone, locale or attributes."""
    from smartmail.audience import contacts

    fields = _contact_fields(attr, status, timezone, locale)
    if unset:
        fields.setdefault("attributes", {}).update({name: None for name in unset})
    if not fields:
        fail("nothing to change: give --attr, --unset, --status, --timezone or --locale")
    try:
        contact = contacts.update_contact(email, **fields)
    except InvalidInput as exc:
        fail(str(exc))
    except NotFound as exc:
        fail(str(exc), code=1)
    out.print(f"updated contact {contact['id']} {contact['email']}", highlight=False)


@contacts_app.command("delete")
def contacts_delete(email: str, yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False) -> None:
    """Erase a contact's personal data; the address stays suppressed so it is never mailed again."""
    from smartmail.audience import contacts

    try:
        address = contacts.normalize_email(email)
    except InvalidInput as exc:
        fail(str(exc))
    if not yes and not typer.confirm(f"Erase {address} and everything recorded about it?"):
        raise typer.Exit(1)
    found = contacts.delete_contact(address)
    out.print(f"erased {address}" if found else f"no contact {address}; the address is suppressed", highlight=False)


@contacts_app.command("track")
def contacts_track(
    email: str,
    event: str,
    properties: Annotated[str | None, typer.Option(help="Event properties as a JSON object.")] = None,
) -> None:
    """Record a custom event, e.g. order_placed, for a contact."""
    import smartmail

    props = _json_option(properties, "--properties")
    try:
        event_id = smartmail.track(email, event, props)
    except InvalidInput as exc:
        fail(str(exc))
    out.print(f"event {event_id} recorded", highlight=False)


def _progress_loop(job_id: str, inline: bool) -> dict[str, Any]:
    from smartmail.audience import imports

    status = imports.job_status(job_id)
    columns = (
        TextColumn("[bold]importing"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[rows]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("import", total=status["total_bytes"] or 1, rows="")

        def show(s: dict[str, Any]) -> None:
            progress.update(
                task, completed=s["bytes_read"], rows=f"{s['created']} new, {s['updated']} updated, {s['failed']} bad"
            )

        if inline:
            status = imports.run_job(job_id, on_progress=show)
        else:
            waited = time.monotonic()
            hinted = False
            while status["state"] not in ("done", "failed"):
                time.sleep(0.3)
                status = imports.job_status(job_id)
                show(status)
                if status["state"] == "pending" and not hinted and time.monotonic() - waited > 10:
                    err.print("still waiting for a worker on the imports queue (smartmail worker -Q imports)")
                    hinted = True
    return status


def _enqueue(job_id: str) -> None:
    from kombu.exceptions import KombuError
    from redis.exceptions import RedisError

    from smartmail.audience import imports

    try:
        imports.enqueue(job_id)
    except (RedisError, KombuError, OSError) as exc:
        fail(
            f"import job {job_id} is stored but could not be queued ({exc}); "
            f"run `smartmail contacts import-resume {job_id} --inline`, or start Redis and a worker",
            code=1,
        )


@contacts_app.command("import")
def contacts_import(
    file: Annotated[Path, typer.Argument(help="CSV (header row) or JSON Lines file.")],
    list_: Annotated[str | None, typer.Option("--list", help="Join every imported contact to this list.")] = None,
    mode: Annotated[
        str, typer.Option(help="upsert, create (new addresses only) or update (known ones only).")
    ] = "upsert",
    format_: Annotated[str | None, typer.Option("--format", help="csv or jsonl (default: from the file name).")] = None,
    map_: Annotated[
        list[str],
        typer.Option(
            "--map", help="COLUMN=TARGET: email, status, timezone, locale, ignore or an attribute name (repeatable)."
        ),
    ] = [],
    type_: Annotated[
        list[str],
        typer.Option(
            "--type", help="ATTRIBUTE=TYPE: string, number, integer, boolean, date, datetime or json (repeatable)."
        ),
    ] = [],
    delimiter: Annotated[str | None, typer.Option(help="CSV delimiter (default: detected).")] = None,
    encoding: Annotated[str | None, typer.Option(help="CSV encoding (default: detected).")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per transaction.")] = 5000,
    errors: Annotated[
        Path | None, typer.Option(help="Where to write the error report (default FILE.errors.csv).")
    ] = None,
    inline: Annotated[bool, typer.Option(help="Run here instead of on a worker of the imports queue.")] = False,
    wait: Annotated[bool, typer.Option(help="Show progress until the import ends.")] = True,
) -> None:
    """Import contacts from a CSV or JSON Lines file, showing progress and a summary."""
    from smartmail.audience import imports

    try:
        options = {
            "list": list_,
            "mode": mode,
            "format": format_,
            "mapping": imports.parse_pairs(map_, "--map"),
            "types": imports.parse_pairs(type_, "--type"),
            "delimiter": delimiter,
            "encoding": encoding,
            "batch_size": batch_size,
        }
        job_id = imports.create_job(file, **options)
    except InvalidInput as exc:
        fail(str(exc))
    if not inline:
        _enqueue(job_id)
    if not wait and not inline:
        out.print(f"import job {job_id} queued", highlight=False)
        return
    if inline:
        # Printed first, so that a run killed midway (Ctrl-C, a lost terminal) can be resumed.
        out.print(
            f"import job {job_id} started; if interrupted, resume it with "
            f"`smartmail contacts import-resume {job_id} --inline`",
            highlight=False,
            soft_wrap=True,
        )
    else:
        out.print(f"import job {job_id} queued", highlight=False)
    status = _progress_loop(job_id, inline)
    _summary(status)
    if status["failed"]:
        report = errors or file.with_name(file.name + ".errors.csv")
        with report.open("w", encoding="utf-8", newline="") as handle:
            imports.write_error_report(job_id, handle)
        out.print(f"{status['failed']} bad row(s): see {report}", highlight=False)
    if status["state"] == "failed":
        fail(f"import {job_id} failed: {status['error']}", code=1)


def _summary(status: dict[str, Any]) -> None:
    table = Table(title=f"import {status['job_id']}: {status['state']}")
    for name in ("created", "updated", "skipped", "failed"):
        table.add_column(name, justify="right")
    table.add_row(*(str(status[n]) for n in ("created", "updated", "skipped", "failed")))
    out.print(table)


@contacts_app.command("import-status")
def contacts_import_status(job_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show an import job's progress and counts."""
    from smartmail.audience import imports

    try:
        status = imports.job_status(job_id)
    except InvalidInput as exc:
        fail(str(exc), code=1)
    if as_json:
        _print_json(status)
    else:
        _summary(status)
        out.print(
            f"{status['bytes_read']} of {status['total_bytes']} bytes, row {status['rows_done']}", highlight=False
        )


def _progress(status: dict[str, Any]) -> str:
    if status["state"] == "done":
        return "100%"
    total = status["total_bytes"] or 0
    return f"{100 * status['bytes_read'] // total}%" if total else "-"


@contacts_app.command("imports")
def contacts_imports(
    limit: Annotated[int, typer.Option(min=1, help="How many jobs, newest first.")] = 20,
    state: Annotated[
        str | None, typer.Option(help="Only jobs in this state: pending, running, done or failed.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List import jobs with their state and progress, newest first."""
    from smartmail.audience import imports

    try:
        jobs = imports.list_jobs(limit, state)
    except InvalidInput as exc:
        fail(str(exc))
    if as_json:
        _print_json([{**job, "progress": _progress(job)} for job in jobs])
        return
    table = Table()
    for name, justify in (("job", "left"), ("state", "left"), ("file", "left"), ("progress", "right"),
                          ("rows", "right"), ("created", "right"), ("updated", "right"), ("skipped", "right"),
                          ("failed", "right"), ("started", "left")):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=name in ("job", "state"))  # type: ignore[arg-type]
    for job in jobs:
        started = job["started_at"] or job["created_at"]
        table.add_row(
            job["job_id"],
            job["state"],
            Path(job["path"]).name,
            _progress(job),
            str(job["rows_done"]),
            *(str(job[n]) for n in ("created", "updated", "skipped", "failed")),
            started.strftime("%Y-%m-%d %H:%M:%S") if started else "",
        )
    out.print(table)
    if any(job["state"] in ("running", "failed") for job in jobs):
        # A `running` job whose process was killed stays `running`: only a resume moves it on.
        err.print("a failed or interrupted job continues from its checkpoint: smartmail contacts import-resume JOB")


@contacts_app.command("import-errors")
def contacts_import_errors(job_id: str, out_file: Annotated[Path | None, typer.Option("--out")] = None) -> None:
    """Write an import job's error report (CSV: row, field, reason, value) to --out or standard output."""
    from smartmail.audience import imports

    try:
        imports.job_status(job_id)
    except InvalidInput as exc:
        fail(str(exc), code=1)
    if out_file is None:
        imports.write_error_report(job_id, sys.stdout)
        return
    with out_file.open("w", encoding="utf-8", newline="") as handle:
        count = imports.write_error_report(job_id, handle)
    out.print(f"{count} bad row(s) written to {out_file}", highlight=False)


@contacts_app.command("import-resume")
def contacts_import_resume(job_id: str, inline: Annotated[bool, typer.Option()] = False) -> None:
    """Run an interrupted import job again from its last checkpoint."""
    from smartmail.audience import imports

    try:
        imports.job_status(job_id)
    except InvalidInput as exc:
        fail(str(exc), code=1)
    if not inline:
        _enqueue(job_id)
    _summary(_progress_loop(job_id, inline))


@contacts_app.command("export")
def contacts_export(
    out_file: Annotated[Path | None, typer.Option("--out", help="CSV file (default: standard output).")] = None,
    list_: Annotated[str | None, typer.Option("--list", help="Only members of this list.")] = None,
    segment: Annotated[str | None, typer.Option(help="Only this saved segment's contacts.")] = None,
) -> None:
    """Export contacts as CSV; cells that a spreadsheet would run as formulas are neutralized."""
    from sqlalchemy import select

    from smartmail.audience import contacts, exports, segments
    from smartmail.store.models import ListMembership

    ids = None
    try:
        if list_ is not None and segment is not None:
            fail("give --list or --segment, not both")
        if list_ is not None:
            list_id = contacts.get_list_id(list_)
            ids = select(ListMembership.contact_id).where(
                ListMembership.list_id == list_id, ListMembership.status == "subscribed"
            )
        if segment is not None:
            ids = segments.audience_query(segment)
    except InvalidInput as exc:
        fail(str(exc))
    if out_file is None:
        exports.export_contacts(sys.stdout, contact_ids=ids)
        return
    with out_file.open("w", encoding="utf-8", newline="") as handle:
        count = exports.export_contacts(handle, contact_ids=ids)
    out.print(f"{count} contact(s) written to {out_file}", highlight=False)


# --- lists -----------------------------------------------------------------------------------------


@lists_app.command("create")
def lists_create(name: str, description: Annotated[str | None, typer.Option()] = None) -> None:
    """Create a list."""
    from smartmail.audience import contacts

    try:
        row = contacts.create_list(name, description)
    except InvalidInput as exc:
        fail(str(exc))
    out.print(f"created list {row['id']} {row['name']}", highlight=False)


@lists_app.command("show")
def lists_show(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show every list with its number of subscribed members."""
    from smartmail.audience import contacts

    rows = contacts.get_lists()
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "name", "members", "description")
    for row in rows:
        table.add_row(str(row["id"]), row["name"], str(row["members"]), row["description"] or "")
    out.print(table)


@lists_app.command("delete")
def lists_delete(name: str, yes: Annotated[bool, typer.Option("--yes")] = False) -> None:
    """Delete a list (its contacts stay)."""
    from smartmail.audience import contacts

    if not yes and not typer.confirm(f"Delete list {name!r}?"):
        raise typer.Exit(1)
    try:
        found = contacts.delete_list(name)
    except InvalidInput as exc:
        fail(str(exc))
    if not found:
        fail(f"name: no list named {name!r}", code=1)
    out.print(f"deleted list {name}", highlight=False)


@lists_app.command("add")
def lists_add(
    name: str, emails: Annotated[list[str], typer.Argument(help="Addresses (new ones become contacts).")]
) -> None:
    """Subscribe addresses to a list."""
    from smartmail.audience import contacts

    try:
        joined = contacts.add_members(name, emails, source="cli")
    except InvalidInput as exc:
        fail(str(exc))
    out.print(f"{joined} joined {name}", highlight=False)


@lists_app.command("remove")
def lists_remove(name: str, emails: list[str]) -> None:
    """Take addresses off a list."""
    from smartmail.audience import contacts

    try:
        removed = contacts.remove_members(name, emails)
    except InvalidInput as exc:
        fail(str(exc))
    out.print(f"{removed} removed from {name}", highlight=False)


# --- segments --------------------------------------------------------------------------------------


def _rules_or_name(name: str | None, rules: str | None) -> Any:
    if (name is None) == (rules is None):
        fail("give a saved segment NAME or --rules, one of the two")
    return name if name is not None else _json_option(rules, "--rules")


@segments_app.command("save")
def segments_save(name: str, rules: Annotated[str, typer.Option(help="Rules as JSON, or @FILE.")]) -> None:
    """Create or replace a saved segment."""
    from smartmail.audience import segments

    try:
        row = segments.save_segment(name, _json_option(rules, "--rules"))
    except InvalidInput as exc:
        fail(str(exc))
    out.print(f"saved segment {row['name']}", highlight=False)


@segments_app.command("count")
def segments_count(
    name: Annotated[str | None, typer.Argument()] = None,
    rules: Annotated[str | None, typer.Option(help="Rules as JSON, or @FILE.")] = None,
) -> None:
    """Count a saved segment's (or some rules') contacts."""
    from smartmail.audience import segments

    target = _rules_or_name(name, rules)
    try:
        started = time.perf_counter()
        total = segments.count(target)
    except InvalidInput as exc:
        fail(str(exc))
    out.print(f"{total} contact(s) ({time.perf_counter() - started:.3f} s)", highlight=False)


@segments_app.command("preview")
def segments_preview(
    name: Annotated[str | None, typer.Argument()] = None,
    rules: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 10,
) -> None:
    """Show the first contacts a segment selects."""
    from smartmail.audience import segments

    target = _rules_or_name(name, rules)
    try:
        rows = segments.preview(target, limit)
    except InvalidInput as exc:
        fail(str(exc))
    table = Table("id", "email", "status", "attributes")
    for row in rows:
        table.add_row(str(row["id"]), row["email"], row["status"], json.dumps(row["attributes"], ensure_ascii=False))
    out.print(table)


@segments_app.command("show")
def segments_show(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the saved segments."""
    from smartmail.audience import segments

    rows = segments.get_segments()
    if as_json:
        _print_json(rows)
        return
    table = Table("name", "rules")
    for row in rows:
        table.add_row(row["name"], json.dumps(row["rules"]))
    out.print(table)


@segments_app.command("delete")
def segments_delete(name: str) -> None:
    """Delete a saved segment."""
    from smartmail.audience import segments

    if not segments.delete_segment(name):
        fail(f"name: no segment named {name!r}", code=1)
    out.print(f"deleted segment {name}", highlight=False)
