"""Where templates live: versioned rows in the database, and directories under SMARTMAIL_TEMPLATES_DIR."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from smartmail import runtime
from smartmail.errors import TemplateNotFound
from smartmail.store.models import Template

# A file template is a directory: subject.txt, body.html and (optional) body.txt.
FILE_PARTS = {"subject": "subject.txt", "html": "body.html", "text": "body.txt"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


@dataclass(frozen=True)
class TemplateRef:
    """Which template a message uses: file templates have no version."""

    name: str
    version: int | None  # None: a file template
    has_text: bool
    path: Path | None = None


def parse_reference(reference: str) -> tuple[str, int | None]:
    """`welcome` (latest) or `welcome@3` (that version)."""
    name, _, version = reference.partition("@")
    if not _NAME.fullmatch(name) or (version and not version.isdigit()):
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
    query = select(Template.version, Template.text.is_not(None)).where(Template.name == name)
    query = query.where(Template.version == version) if version is not None else query.order_by(Template.version.desc())
    found = session.execute(query.limit(1)).first()
    if found is not None:
        return TemplateRef(name, found[0], bool(found[1]))
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
    query = select(Template.subject, Template.html, Template.text).where(
        Template.name == name, Template.version == version
    )
    if session is not None:
        row = session.execute(query).one_or_none()
    else:
        with session_factory() as own:
            row = own.execute(query).one_or_none()
    if row is None:
        return None
    return {"subject": row.subject, "html": row.html, "text": row.text}[part]


def save_template(session: Session, name: str, *, subject: str, html: str, text: str | None = None) -> Template:
    """Store a new version; earlier versions stay, so sent messages keep pointing at what they used."""
    parse_reference(name)
    if "@" in name:
        raise ValueError("a template name must not contain @")
    forget_resolved(True)
    latest = session.scalar(select(func.max(Template.version)).where(Template.name == name)) or 0
    row = Template(name=name, version=latest + 1, subject=subject, html=html, text=text)
    session.add(row)
    session.flush()
    return row
