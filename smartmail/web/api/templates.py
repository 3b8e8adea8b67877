"""/v1/templates: stored template versions — create, list the latest, read one, preview-render, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response, Security
from pydantic import BaseModel, ConfigDict, Field

from smartmail.access.keys import Principal
from smartmail.content import rendering, template_store
from smartmail.web.api.auth import authorize
from smartmail.web.api.fields import UtcDateTime
from smartmail.web.api.pagination import Cursor, Limit, Page, decode_cursor, page

router = APIRouter(prefix="/templates", tags=["templates"])

# Names are checked by template_store.check_name (422 naming `name`); in a path, anything else is
# simply not found.
TemplateName = Annotated[str, Path(max_length=200, description="The template's name.")]
Read = Annotated[Principal, Security(authorize, scopes=["templates:read"])]
Write = Annotated[Principal, Security(authorize, scopes=["templates:write"])]


class TemplateIn(BaseModel):
    """A new version of a template: Jinja2, rendered in the sandbox; without `text`, a plain-text
    part is derived from the HTML."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=200, description="Letters, digits, `_`, `.` and `-`, starting with a letter or digit.")
    subject: str = Field(min_length=1, max_length=998)
    html: str = Field(min_length=1, max_length=1_000_000)
    text: str | None = Field(None, max_length=1_000_000)
    preheader: str | None = Field(
        None, max_length=1000, description="Hidden preview text shown after the subject in inboxes (Jinja allowed)."
    )


class TemplateOut(BaseModel):
    name: str
    version: int
    subject: str
    html: str
    text: str | None
    preheader: str | None
    created_at: UtcDateTime


class PreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    context: dict[str, Any] = Field(default_factory=dict, description="The variables, as a send would pass them.")
    version: int | None = Field(None, ge=1, le=2**31 - 1, description="Default: the latest version.")


class PreviewOut(BaseModel):
    subject: str
    html: str | None
    text: str


@router.post("", status_code=201, response_model=TemplateOut)
def create_template(body: TemplateIn, response: Response, principal: Write) -> dict[str, Any]:
    """Store a new version (1 for a new name); each part is compiled first, so a syntax error is a
    422 naming the part and nothing is stored. CSS in `<style>` is inlined as the version is
    compiled for sending (the stored HTML stays as written). Sends through this process use it at once; other
    processes within SMARTMAIL_TEMPLATE_CACHE_SECONDS."""
    template_store.check_name(body.name)
    rendering.check_template_source(body.subject, body.html, body.text)
    created = template_store.create_version(
        body.name, subject=body.subject, html=body.html, text=body.text, preheader=body.preheader
    )
    response.headers["Location"] = f"/v1/templates/{created['name']}/versions/{created['version']}"
    return created


@router.get("", response_model=Page[TemplateOut])
def list_templates(principal: Read, limit: Limit = 100, cursor: Cursor = None) -> Page[dict[str, Any]]:
    """The latest version of each template, by name."""
    position = decode_cursor(cursor, (str,))
    rows = template_store.list_templates(limit=limit + 1, after=position[0] if position else None)
    return page(rows, limit, lambda row: [row["name"]])


@router.get("/{name}", response_model=TemplateOut)
def get_template(name: TemplateName, principal: Read) -> dict[str, Any]:
    """The latest version."""
    return template_store.get_template(name)


@router.get("/{name}/versions/{version}", response_model=TemplateOut)
def get_version(
    name: TemplateName, version: Annotated[int, Path(ge=1, le=2**31 - 1)], principal: Read
) -> dict[str, Any]:
    """One version, as it was stored (versions never change)."""
    return template_store.get_template(name, version)


@router.post("/{name}/preview", response_model=PreviewOut)
def preview_template(name: TemplateName, body: PreviewIn, principal: Read) -> dict[str, Any]:
    """Render a version with `context` as a send would (sandboxed, HTML escaped); nothing is sent
    or stored. A variable the context lacks is a 422 pointing at `/context`; any other error in
    the template (including what the sandbox refuses) a 422 pointing at `/template`."""
    rendered = rendering.preview(name, body.context, body.version)
    return {"subject": rendered.subject, "html": rendered.html, "text": rendered.text}


@router.delete("/{name}", status_code=204)
def delete_template(name: TemplateName, principal: Write) -> Response:
    """Delete every version; 409 while a draft or scheduled campaign uses the template. Messages
    already sent and launched campaigns keep their own copies. Other processes may still send
    with it for up to SMARTMAIL_TEMPLATE_CACHE_SECONDS."""
    template_store.delete_template(name)
    return Response(status_code=204)
