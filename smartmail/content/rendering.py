"""Rendering: a sandboxed Jinja2 environment that turns a template plus context into subject, HTML and text."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from inscriptis import get_text
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError, safe_range

from smartmail import runtime
from smartmail.addresses import reject_line_breaks
from smartmail.content import template_store
from smartmail.content.email_html import prepare_html
from smartmail.errors import NotFound, TemplateError
from smartmail.store.engine import session_factory


@dataclass(frozen=True)
class Rendered:
    subject: str
    html: str | None
    text: str
    template_name: str | None = None
    template_version: int | None = None


# The caller's connection, for the loader to read a database template with (on SQLite a second
# connection would wait for the write lock). Templates cannot name other templates: MailSandbox
# refuses include, import and extends when it parses them.
_session: contextvars.ContextVar = contextvars.ContextVar("smartmail_template_session", default=None)


class _StoreLoader(jinja2.BaseLoader):
    """Loads `db/ROW/NAME@VERSION/PART` from the database and `file/PATH` from disk (ROW: TemplateRef.row).

    Jinja's environment caches compiled templates by name, so each template version is compiled
    once per process; database rows never change, and a name deleted and created again has new
    ROWs, so the cache is always up to date.
    """

    def __init__(self, session_factory) -> None:
        self.session_factory = session_factory

    def get_source(self, environment, template):
        kind, _, rest = template.partition("/")
        if kind == "db":
            ref, _, part = rest.partition("/")[2].rpartition("/")
            name, _, version = ref.partition("@")
            if part == "html":  # CSS inlined and the preheader added once, as this version compiles
                found = template_store.load_html(self.session_factory, name, int(version), session=_session.get())
                source = None if found is None else prepare_html(*found)
            else:
                source = template_store.load_part(
                    self.session_factory, name, int(version), part, session=_session.get()
                )
            if source is None:
                raise jinja2.TemplateNotFound(template)
            return source, template, lambda: True
        if kind == "file":
            path = Path(rest)
            try:
                source = path.read_text(encoding="utf-8")
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                raise jinja2.TemplateNotFound(template) from None
            if path.name == template_store.FILE_PARTS["html"]:
                extra = path.with_name(template_store.FILE_PREHEADER)
                preheader = extra.read_text(encoding="utf-8").strip() if extra.is_file() else None
                source = prepare_html(source, preheader)
                unchanged, extra_unchanged = _Unchanged(path, mtime), _Unchanged(extra, _mtime(extra))
                return source, template, lambda: unchanged() and extra_unchanged()
            return source, template, _Unchanged(path, mtime)
        raise jinja2.TemplateNotFound(template)


# Edits to file templates show within this many seconds.
FILE_RECHECK_SECONDS = 1.0


class _Unchanged:
    """Jinja's auto_reload check of a file template: asked at every render, so the file is looked
    at no more than every FILE_RECHECK_SECONDS (stat calls per part at every send() add up)."""

    def __init__(self, path: Path, mtime: float | None) -> None:  # None: the file is absent
        self.path, self.mtime, self.checked = path, mtime, time.monotonic()

    def __call__(self) -> bool:
        if time.monotonic() - self.checked < FILE_RECHECK_SECONDS:
            return True
        self.checked = time.monotonic()
        return _mtime(self.path) == self.mtime


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


@functools.lru_cache(maxsize=4096)  # asked at every render
def _autoescape(name: str | None) -> bool:
    # HTML parts are escaped; subject and text parts are plain text and must not be.
    return name is not None and (name.endswith("/html") or name.endswith(".html") or name == "<inline html>")


_MAX_SEQUENCE = 100_000  # longest string or list a template may build with * (cf. the sandbox's MAX_RANGE)
# Numbers all of one render's range() calls may produce: the sandbox caps each call at 100,000, not
# nested loops (range(100000) inside range(100000) would hold a web or worker thread for minutes).
_RANGE_PER_RENDER = 1_000_000
_range_left: contextvars.ContextVar[int] = contextvars.ContextVar("range_left", default=_RANGE_PER_RENDER)


def _budgeted_range(*args: int) -> range:
    numbers = safe_range(*args)
    left = _range_left.get() - len(numbers)
    if left < 0:
        raise SecurityError(f"range() may produce at most {_RANGE_PER_RENDER:,} numbers in one render")
    _range_left.set(left)
    return numbers


class MailSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus two limits for user-authored email: a template stands alone (no include,
    import or extends: template names are SmartMail's, and a cached template could otherwise be
    pulled in by name), and `*`, `**` and range() cannot build huge values or loops in the producer."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.globals["range"] = _budgeted_range

    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        for node in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
            raise jinja2.TemplateSyntaxError(
                "include, import and extends are not allowed in email templates", node.lineno, name, filename
            )
        return tree

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 100:
            raise SecurityError("exponent too large")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > _MAX_SEQUENCE:
                    raise SecurityError(f"result longer than {_MAX_SEQUENCE}")
        return super().call_binop(context, operator, left, right)


def make_environment(session_factory) -> ImmutableSandboxedEnvironment:
    # Templates are user-authored, so the sandbox keeps them away from Python internals and the
    # immutable variant stops them mutating the context (https://jinja.palletsprojects.com/en/stable/sandbox/).
    # StrictUndefined: a missing variable is an error at send time rather than a blank in a sent email;
    # templates that tolerate absence say so with `{{ name | default("there") }}` or `is defined`.
    return MailSandbox(
        loader=_StoreLoader(session_factory),
        autoescape=_autoescape,
        undefined=jinja2.StrictUndefined,
        cache_size=2000,
        auto_reload=True,
        keep_trailing_newline=False,
    )


@runtime.per_process()
def _environment() -> ImmutableSandboxedEnvironment:
    return make_environment(session_factory())


@functools.lru_cache(maxsize=512)
def _inline(source: str, part: str) -> jinja2.Template:
    env = _environment()
    if part == "html":  # CSS inlined once per source (a campaign's, frozen at launch, or a send's)
        source = prepare_html(source, None)
    try:
        code = env.compile(source, name=f"<inline {part}>", filename=f"<inline {part}>")
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(exc.message or str(exc), template=f"<inline {part}>", line=exc.lineno) from None
    return env.template_class.from_code(env, code, env.globals, None)


# Compiled against the environment, which reset() drops.
runtime.on_reset(lambda _close: _inline.cache_clear())


@contextlib.contextmanager
def _loading_with(session):
    """The loader reads database templates with the caller's session meanwhile."""
    current = _session.set(session)
    try:
        yield _environment()
    finally:
        _session.reset(current)


def _get(name: str, session=None) -> jinja2.Template:
    with _loading_with(session) as env:
        try:
            return env.get_template(name)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(exc.message or str(exc), template=_display(name), line=exc.lineno) from None


def _source(name: str, session=None) -> str:
    with _loading_with(session) as env:
        return env.loader.get_source(env, name)[0]


def _display(jinja_name: str) -> str:
    kind, _, rest = jinja_name.partition("/")
    return rest.partition("/")[2] if kind == "db" else rest if kind == "file" else jinja_name


def _run(template: jinja2.Template, context: dict[str, Any]) -> str:
    _range_left.set(_RANGE_PER_RENDER)
    try:
        return template.render(context)
    except (
        jinja2.TemplateError,
        SecurityError,
        TypeError,
        ValueError,
        ArithmeticError,
        LookupError,
        AttributeError,
        RecursionError,
        MemoryError,
    ) as exc:
        line = None
        for frame in traceback.extract_tb(exc.__traceback__):
            if frame.filename == template.filename:
                line = frame.lineno
        if isinstance(exc, SecurityError):
            message = f"not allowed by the sandbox: {exc}"
        else:
            message = str(exc) if isinstance(exc, jinja2.TemplateError) else f"{type(exc).__name__}: {exc}"
        raise TemplateError(message, template=_display(template.filename or template.name or "?"), line=line) from None


def html_to_text(html: str) -> str:
    """Plain-text alternative for clients that do not show HTML (inscriptis keeps layout readable)."""
    return get_text(html).strip() + "\n"


_JINJA_TAG = re.compile(r"{{.*?}}|{%.*?%}|{#.*?#}", re.DOTALL)
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n){2,}")


def text_source_from_html(html: str) -> str | None:
    """A text template derived from an HTML template's source, so that messages do not each
    convert their rendered HTML (inscriptis costs more than the rest of a render). Jinja tags sit in text nodes
    and come through; None when a tag holds `<`, `>` or `&` (the HTML parser could change what it
    says) or the derived template does not compile: convert each message instead."""
    if any(c in tag for tag in _JINJA_TAG.findall(html) for c in "<>&"):
        return None
    derived = html_to_text(html)
    try:
        _inline(derived, "text")
    except TemplateError:
        return None
    return derived


# The HTML part's compiled template -> the text template derived from its source (None: convert
# each message). Weak keys: an edited file template compiles anew and its old entry goes.
_derived_text: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _text_template(html: jinja2.Template, source: Callable[[], str]) -> jinja2.Template | None:
    if html not in _derived_text:
        derived = text_source_from_html(source())
        _derived_text[html] = None if derived is None else _inline(derived, "text")
    return _derived_text[html]


def _part_names(ref: template_store.TemplateRef) -> dict[str, str]:
    """The Jinja names of a template's parts (the row is not part of a TemplateRef's equality)."""
    return _names(ref.name, ref.version, ref.row, ref.path)


@functools.lru_cache(maxsize=1024)  # producers render the same few templates
def _names(name: str, version: int | None, row: str, path: Path | None) -> dict[str, str]:
    if version is not None:
        return {part: f"db/{row}/{name}@{version}/{part}" for part in ("subject", "html", "text")}
    assert path is not None  # a reference without a version is a file template
    return {part: f"file/{path / filename}" for part, filename in template_store.FILE_PARTS.items()}


def render(
    session,
    *,
    context: dict[str, Any],
    template: str | None = None,
    subject: str | None = None,
    html: str | None = None,
    text: str | None = None,
    templates_dir: Path = Path("templates"),
    cache_seconds: float = 0.0,
) -> Rendered:
    """Render a stored template by reference (resolution memoized for `cache_seconds`), or inline
    subject/html/text strings (also Jinja)."""
    if template is not None:
        ref = template_store.resolve(session, template, templates_dir, max_age=cache_seconds)
        names = _part_names(ref)
        parts = {"subject": _get(names["subject"], session), "html": _get(names["html"], session)}
        if ref.has_text:
            parts["text"] = _get(names["text"], session)
        elif text_part := _text_template(parts["html"], lambda: _source(names["html"], session)):
            parts["derived text"] = text_part
        name: str | None = ref.name
        version = ref.version
    else:
        if subject is None or (html is None and text is None):
            raise TemplateError("give a template, or a subject and html and/or text", template="<inline>")
        parts = {"subject": _inline(subject, "subject")}
        if html is not None:
            parts["html"] = _inline(html, "html")
        if text is not None:
            parts["text"] = _inline(text, "text")
        elif html is not None and (text_part := _text_template(parts["html"], lambda: html)):
            parts["derived text"] = text_part
        name, version = None, None

    rendered = {part: _run(tpl, context) for part, tpl in parts.items()}
    rendered_subject = " ".join(rendered["subject"].split())  # a subject is one line
    reject_line_breaks(rendered["subject"].strip(), field="subject")
    rendered_html = rendered.get("html")
    if "derived text" in rendered:  # laid out as html_to_text would have; blocks left blank lines
        rendered_text = _BLANK_LINES.sub("\n\n", rendered["derived text"].strip()) + "\n"
    else:
        rendered_text = rendered.get("text") or html_to_text(rendered_html or "")
    return Rendered(rendered_subject, rendered_html, rendered_text, name, version)


def check_template_source(subject: str, html: str, text: str | None = None) -> None:
    """Compile each part so a syntax error is reported when a template is saved, not when mail is
    sent; the error's field names the part."""
    for part, source in (("subject", subject), ("html", html), ("text", text)):
        if source is not None:
            try:
                _inline(source, part)
            except TemplateError as exc:
                exc.field = part
                raise


def preview(name: str, context: dict[str, Any], version: int | None = None) -> Rendered:
    """A stored version (the latest by default) rendered with `context` exactly as a send would:
    the same sandbox, autoescaped HTML, derived text. Database templates only, always read afresh
    (never the resolved-name cache). NotFound if there is no such version; TemplateError (field
    `context` for an undefined variable) if it does not render."""
    with template_store.reading() as session:
        row = template_store.get_version(session, name, version)
        try:
            return render(session, context=context, template=f"{row.name}@{row.version}")
        except jinja2.TemplateNotFound:  # deleted between the two reads
            raise NotFound(f"no template {name!r}") from None
        except TemplateError as exc:
            # _run raises `from None`, which still keeps the original as __context__.
            if isinstance(exc.__context__, jinja2.UndefinedError):
                exc.field = "context"  # the template is fine; the context lacks what it uses
            raise
