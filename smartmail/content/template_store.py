"""Where templates live: versioned rows in the database, and directories under SMARTMAIL_TEMPLATES_DIR."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from smartmail import runtime
from smartmail.content.email_html import check_preheader
from smartmail.errors import Conflict, InvalidInput, NotFound, TemplateNotFound
from smartmail.store.engine import reader, session_scope
from smartmail.store.models import Campaign, CampaignState, Template

# A file template is a directory: subject.txt, body.html and (optional) body.txt, and an optional
# preheader.txt (the HTML part's hidden preview text, Jinja allowed).
FILE_PARTS = {"subject": "subject.txt", "html": "body.html", "text": "body.txt"}
FILE_PREHEADER = "preheader.txt"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


@dataclass(frozen=True)
class TemplateRef:
    """Which template a message uses: file templates have no version."""

    name: str
    version: int | None  # None: a file template
    has_text: bool
    path: Path | None = None
    # Which row this is (its id and creation time): compiled parts are cached under it, so a name
    # deleted and created again, whose versions restart at 1, never renders the old row's parts.
    row: str = field(default="", compare=False)


def parse_reference(reference: str) -> tuple[str, int | None]:
    """`welcome` (latest) or `welcome@3` (that version)."""
    name, _, version = reference.partition("@")
    if not _NAME.fullmatch(name) or (version and not (version.isascii() and version.isdigit())):
        raise ValueError(f"{reference!r} is not a template name (letters, digits, _ . -, optional @VERSION)")
    return name, int(version) if version else None


# reference -> (expiry, TemplateRef): producers send the same few templates over and over, and
# the look-up would otherwise be a query per send(). Other processes see a new version after
# at most SMARTMAIL_TEMPLATE_CACHE_SECONDS; this process at once (save_template clears it).
_resolved: dict[tuple[str, Path], tuple[float, TemplateRef]] = {}


@runtime.on_reset
def forget_resolved(_close: bool = True) -> None:
    _resolved.clear()


def resolve(session: Session, reference: str, templates_dir: Path, max_age: float = 0.0) -> TemplateRef:
    """Which template `reference` means, memoized for `max_age` seconds."""
    key = (reference, templates_dir)
    hit = _resolved.get(key)
    if hit and hit[0] > time.monotonic():
        return hit[1]
    ref = _resolve(session, reference, templates_dir)
    if max_age > 0:
        _resolved[key] = (time.monotonic() + max_age, ref)
    return ref


def _resolve(session: Session, reference: str, templates_dir: Path) -> TemplateRef:
    """The database wins over files, so a template edited in the app replaces the shipped default."""
    name, version = parse_reference(reference)
    query = select(Template.version, Template.text.is_not(None), Template.id, Template.created_at).where(
        Template.name == name
    )
    query = query.where(Template.version == version) if version is not None else query.order_by(Template.version.desc())
    found = session.execute(query.limit(1)).first()
    if found is not None:
        return TemplateRef(name, found[0], bool(found[1]), row=f"{found[2]}.{found[3].isoformat()}")
    directory = templates_dir / name
    if version is None and (directory / FILE_PARTS["subject"]).is_file() and (directory / FILE_PARTS["html"]).is_file():
        return TemplateRef(name, None, (directory / FILE_PARTS["text"]).is_file(), directory)
    where = f"version {version} in the database" if version else f"the database or {directory}/"
    raise TemplateNotFound(f"template {reference!r} not found in {where}")


def load_part(session_factory, name: str, version: int, part: str, *, session: Session | None = None) -> str | None:
    """Source of one part of a database template version (immutable once written).

    Pass the caller's `session` when there is one: on SQLite a second connection would wait for
    the write lock the caller's transaction holds (BEGIN IMMEDIATE).
    """
    query = select(Template.subject, Template.html, Template.text, Template.preheader).where(
        Template.name == name, Template.version == version
    )
    if session is not None:
        row = session.execute(query).one_or_none()
    else:
        with session_factory() as own:
            row = own.execute(query).one_or_none()
    if row is None:
        return None
    return {"subject": row.subject, "html": row.html, "text": row.text, "preheader": row.preheader}[part]


def load_html(
    session_factory, name: str, version: int, *, session: Session | None = None
) -> tuple[str, str | None] | None:
    """A database template version's HTML source and its preheader, in one query (see load_part)."""
    query = select(Template.html, Template.preheader).where(Template.name == name, Template.version == version)
    if session is not None:
        row = session.execute(query).one_or_none()
    else:
        with session_factory() as own:
            row = own.execute(query).one_or_none()
    return None if row is None else (row.html, row.preheader)


def check_name(name: Any, *, field: str = "name") -> str:
    """A template name: it is also a directory name and a URL path segment, so only letters,
    digits, `_`, `.` and `-` (no `/`, `@`, spaces or `%`), starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(
            f"{name!r} is not a template name: 1-200 letters, digits, _ . or -, starting with a letter or digit",
            field=field,
        )
    return name


def save_template(
    session: Session, name: str, *, subject: str, html: str, text: str | None = None, preheader: str | None = None
) -> Template:
    """Store a new version; earlier versions stay, so sent messages keep pointing at what they used.
    `preheader`: the HTML part's hidden preview text (plain text, Jinja allowed; empty means none).
    This process resolves the name afresh at once; other processes within SMARTMAIL_TEMPLATE_CACHE_SECONDS."""
    check_name(name)
    preheader = check_preheader(preheader)
    forget_resolved(True)
    latest = session.scalar(select(func.max(Template.version)).where(Template.name == name)) or 0
    row = Template(name=name, version=latest + 1, subject=subject, html=html, text=text, preheader=preheader)
    session.add(row)
    session.flush()
    return row


# --- For the API: versions as plain data --------------------------------------------------------------


@contextlib.contextmanager
def reading() -> Iterator[Session]:
    """A session for reads only: on SQLite it does not take the write lock (see engine.reader)."""
    with reader() as connection, Session(bind=connection) as session:
        yield session


def as_dict(row: Template) -> dict[str, Any]:
    return {
        "name": row.name,
        "version": row.version,
        "subject": row.subject,
        "html": row.html,
        "text": row.text,
        "preheader": row.preheader,
        "created_at": row.created_at,
    }


def _known_form(name: str) -> None:
    # A name no template can have is not looked up: PostgreSQL refuses NUL in a text parameter.
    if not _NAME.fullmatch(name):
        raise NotFound(f"no template {name!r}")


def get_version(session: Session, name: str, version: int | None = None) -> Template:
    """A stored version (the latest when `version` is None); NotFound names what was missing."""
    _known_form(name)
    query = select(Template).where(Template.name == name)
    query = query.where(Template.version == version) if version is not None else query.order_by(Template.version.desc())
    row = session.scalars(query.limit(1)).first()
    if row is None:
        what = f"template {name!r} has no version {version}" if version is not None else f"no template {name!r}"
        raise NotFound(what)
    return row


def get_template(name: str, version: int | None = None) -> dict[str, Any]:
    with reading() as session:
        return as_dict(get_version(session, name, version))


def list_templates(*, limit: int, after: str | None = None) -> list[dict[str, Any]]:
    """The latest version of each template, by name, from the name after `after` (keyset paging)."""
    newer = aliased(Template)
    latest = select(func.max(newer.version)).where(newer.name == Template.name).scalar_subquery()
    query = select(Template).where(Template.version == latest)
    if after is not None:
        query = query.where(Template.name > after)
    with reading() as session:
        return [as_dict(row) for row in session.scalars(query.order_by(Template.name).limit(limit))]


def create_version(
    name: str, *, subject: str, html: str, text: str | None = None, preheader: str | None = None
) -> dict[str, Any]:
    """Store the next version of `name` (compile it first: rendering.check_template_source).
    Two writers racing for the same next number: the loser takes the one after."""
    preheader = check_preheader(preheader)
    for part, source in (("subject", subject), ("html", html), ("text", text)):
        if source is not None and "\x00" in source:  # no database text type holds NUL
            raise InvalidInput("must not contain NUL characters", field=part)
    for attempt in range(3):
        try:
            with session_scope() as session:
                return as_dict(save_template(session, name, subject=subject, html=html, text=text, preheader=preheader))
        except IntegrityError:
            if attempt == 2:
                raise Conflict(f"template {name!r} is being changed by others; try again") from None
    raise AssertionError("unreachable")


def delete_template(name: str) -> int:
    """Delete every version of a template; how many there were (NotFound: none).

    Refused (Conflict) while a draft or scheduled campaign names it: such a campaign reads the
    template at launch. Launched campaigns hold their own copy and sent messages their rendered
    content, so neither needs the rows. This process forgets the name at once; other processes
    may still resolve it for up to SMARTMAIL_TEMPLATE_CACHE_SECONDS."""
    _known_form(name)
    with session_scope() as session:
        waiting = session.scalars(
            select(Campaign.name)
            .where(
                or_(Campaign.template_name == name, Campaign.template_name.startswith(f"{name}@", autoescape=True)),
                Campaign.state.in_([CampaignState.DRAFT.value, CampaignState.SCHEDULED.value]),
            )
            .order_by(Campaign.name)
            .limit(5)
        ).all()
        if waiting:
            raise Conflict(f"template {name!r} is used by campaigns not launched yet: {', '.join(waiting)}")
        deleted = session.scalar(select(func.count()).where(Template.name == name)) or 0
        if not deleted:
            raise NotFound(f"no template {name!r}")
        session.execute(delete(Template).where(Template.name == name))
    forget_resolved(True)
    return deleted
