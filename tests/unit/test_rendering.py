"""Unit tests for smartmail.content.rendering and smartmail.content.template_store, on a temporary SQLite database."""

from __future__ import annotations

import os
from pathlib import Path

import jinja2
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

import smartmail.store.engine as db
from smartmail import runtime
from smartmail.addresses import AddressError
from smartmail.content import rendering, template_store
from smartmail.content.rendering import Rendered, TemplateError, html_to_text, render, text_source_from_html
from smartmail.content.template_store import TemplateNotFound, TemplateRef
from smartmail.store import migrate
from smartmail.store.models import Template


def _clear_caches() -> None:
    runtime.reset()


@pytest.fixture
def db_url(tmp_path, monkeypatch):
    """A migrated SQLite database that the process-wide settings, engine and environment point at."""
    for name in list(os.environ):
        if name.upper().startswith("SMARTMAIL_"):
            monkeypatch.delenv(name)
    url = "sqlite:///" + str(tmp_path / "smartmail.db")
    monkeypatch.setenv("SMARTMAIL_DATABASE_URL", url)
    monkeypatch.setenv("SMARTMAIL_DEFAULT_SENDER", "SmartMail <noreply@example.com>")
    monkeypatch.setenv("SMARTMAIL_SECRET_KEY", "unit-test-secret-key-0123456789")
    _clear_caches()
    migrate.upgrade(url)
    yield url
    _clear_caches()


@pytest.fixture
def engine(db_url):
    engine = db.make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def save(engine):
    """Store a template version with a committed session from smartmail.store.engine.make_engine."""

    def save(name: str, *, subject: str, html: str, text: str | None = None) -> int:
        with Session(engine) as session:
            row = template_store.save_template(session, name, subject=subject, html=html, text=text)
            session.commit()
            return row.version

    return save


@pytest.fixture
def session(db_url):
    """The session handed to render().

    A plain SQLAlchemy engine, not smartmail.store.engine.make_engine: make_engine's BEGIN IMMEDIATE makes
    the caller's session hold SQLite's write lock while the template loader reads the source through
    a second connection, which then times out (see test_rendering_a_db_template_inside_a_make_engine_session).
    """
    engine = create_engine(db_url)
    with Session(engine) as session:
        yield session
    engine.dispose()


@pytest.fixture
def templates_dir(tmp_path) -> Path:
    path = tmp_path / "templates"
    path.mkdir()
    return path


def write_file_template(templates_dir: Path, name: str, *, subject: str, html: str, text: str | None = None) -> Path:
    directory = templates_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "subject.txt").write_text(subject, encoding="utf-8")
    (directory / "body.html").write_text(html, encoding="utf-8")
    if text is not None:
        (directory / "body.txt").write_text(text, encoding="utf-8")
    return directory


EVIL = "<script>alert('x')</script> & \"Co\""
ESCAPED = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &#34;Co&#34;"


# --- file templates -----------------------------------------------------------------------------


def test_file_template_renders_all_three_parts(session, templates_dir):
    write_file_template(
        templates_dir,
        "welcome",
        subject="Welcome, {{ name }}!\n",
        html="<p>Hello {{ name }}</p>\n",
        text="Hello {{ name }}\n",
    )
    result = render(session, context={"name": "Bob"}, template="welcome", templates_dir=templates_dir)
    assert result == Rendered("Welcome, Bob!", "<p>Hello Bob</p>", "Hello Bob", "welcome", None)


def test_file_template_without_text_part_gets_text_from_html(session, templates_dir):
    write_file_template(
        templates_dir,
        "news",
        subject="News",
        html="<h1>Big news</h1><p>Hello {{ name }}, read <a href='https://example.com'>this</a>.</p>",
    )
    result = render(session, context={"name": "Bob"}, template="news", templates_dir=templates_dir)
    assert "<" not in result.text
    assert "Big news" in result.text and "Hello Bob, read this." in result.text
    assert result.text.endswith("\n")


def test_file_template_html_is_autoescaped_but_subject_and_text_are_not(session, templates_dir):
    write_file_template(templates_dir, "esc", subject="Hi {{ name }}", html="<p>{{ name }}</p>", text="Hi {{ name }}")
    result = render(session, context={"name": EVIL}, template="esc", templates_dir=templates_dir)
    assert result.html == f"<p>{ESCAPED}</p>"
    assert result.subject == f"Hi {EVIL}"
    assert result.text == f"Hi {EVIL}"


def test_file_template_edits_are_picked_up_within_the_recheck_interval(session, templates_dir, monkeypatch):
    directory = write_file_template(templates_dir, "edit", subject="S", html="<p>old</p>")
    assert render(session, context={}, template="edit", templates_dir=templates_dir).html == "<p>old</p>"
    body = directory / "body.html"
    body.write_text("<p>new</p>", encoding="utf-8")
    stat = body.stat()
    os.utime(body, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    # Within the interval the compiled template is used without looking at the file ...
    assert render(session, context={}, template="edit", templates_dir=templates_dir).html == "<p>old</p>"
    # ... after it, the edit shows.
    monkeypatch.setattr(rendering, "FILE_RECHECK_SECONDS", 0.0)
    assert render(session, context={}, template="edit", templates_dir=templates_dir).html == "<p>new</p>"


def test_directory_without_body_html_is_not_a_template(session, templates_dir):
    (templates_dir / "half").mkdir()
    (templates_dir / "half" / "subject.txt").write_text("S")
    with pytest.raises(TemplateNotFound):
        render(session, context={}, template="half", templates_dir=templates_dir)


def test_file_template_has_no_versions(session, templates_dir):
    write_file_template(templates_dir, "welcome", subject="S", html="H")
    with pytest.raises(TemplateNotFound, match="version 1"):
        render(session, context={}, template="welcome@1", templates_dir=templates_dir)


# --- database templates and template_store ------------------------------------------------------


def test_db_template_renders(session, save, templates_dir):
    save("welcome", subject="Hi {{ name }}", html="<p>Hello {{ name }}</p>", text="Hello {{ name }}")
    result = render(session, context={"name": "Ann"}, template="welcome", templates_dir=templates_dir)
    assert result == Rendered("Hi Ann", "<p>Hello Ann</p>", "Hello Ann", "welcome", 1)


def test_save_template_increments_versions_per_name(engine):
    with Session(engine) as s:
        versions = [template_store.save_template(s, "a", subject="s", html=f"v{i}").version for i in range(3)]
        other = template_store.save_template(s, "b", subject="s", html="h").version
        s.commit()
    assert versions == [1, 2, 3]
    assert other == 1
    with Session(engine) as s:
        rows = s.execute(select(Template.name, Template.version, Template.html).order_by(Template.id)).all()
    assert [tuple(r) for r in rows] == [("a", 1, "v0"), ("a", 2, "v1"), ("a", 3, "v2"), ("b", 1, "h")]


@pytest.mark.parametrize("name", ["bad name", "", "../etc", ".hidden", "a/b", "x@1", "a" * 201])
def test_save_template_rejects_bad_names(engine, name):
    with Session(engine) as s, pytest.raises(ValueError):
        template_store.save_template(s, name, subject="s", html="h")


def test_latest_version_is_used_and_name_at_version_picks_one(session, save, templates_dir):
    save("promo", subject="v1 {{ n }}", html="<p>one</p>")
    save("promo", subject="v2 {{ n }}", html="<p>two</p>")
    latest = render(session, context={"n": 1}, template="promo", templates_dir=templates_dir)
    first = render(session, context={"n": 1}, template="promo@1", templates_dir=templates_dir)
    assert (latest.subject, latest.html, latest.template_version) == ("v2 1", "<p>two</p>", 2)
    assert (first.subject, first.html, first.template_version) == ("v1 1", "<p>one</p>", 1)
    save("promo", subject="v3", html="<p>three</p>")
    assert render(session, context={}, template="promo", templates_dir=templates_dir).template_version == 3


def test_db_template_wins_over_a_file_template(session, save, templates_dir):
    write_file_template(templates_dir, "welcome", subject="from file", html="<p>file</p>")
    assert render(session, context={}, template="welcome", templates_dir=templates_dir).subject == "from file"
    save("welcome", subject="from db", html="<p>db</p>")
    result = render(session, context={}, template="welcome", templates_dir=templates_dir)
    assert (result.subject, result.html, result.template_version) == ("from db", "<p>db</p>", 1)


def test_db_template_html_is_autoescaped_but_subject_and_text_are_not(session, save, templates_dir):
    save("esc", subject="Hi {{ name }}", html="<p>{{ name }}</p>", text="Hi {{ name }}")
    result = render(session, context={"name": EVIL}, template="esc", templates_dir=templates_dir)
    assert result.html == f"<p>{ESCAPED}</p>"
    assert result.subject == f"Hi {EVIL}"
    assert result.text == f"Hi {EVIL}"


def test_db_template_without_text_gets_text_from_the_escaped_html(session, save, templates_dir):
    save("auto", subject="S", html="<h1>Hello {{ name }}</h1><ul><li>one</li><li>two</li></ul>")
    result = render(session, context={"name": "<Bob> & Co"}, template="auto", templates_dir=templates_dir)
    assert result.html == "<h1>Hello &lt;Bob&gt; &amp; Co</h1><ul><li>one</li><li>two</li></ul>"
    # The generated text shows the value as the reader saw it in the HTML, tags gone.
    assert "Hello <Bob> & Co" in result.text
    assert "one" in result.text and "two" in result.text and "<li>" not in result.text


def test_empty_text_part_falls_back_to_html(session, save, templates_dir):
    save("blank", subject="S", html="<p>from html</p>", text="")
    assert render(session, context={}, template="blank", templates_dir=templates_dir).text == "from html\n"


def test_unknown_template_is_not_found(session, save, templates_dir):
    save("exists", subject="s", html="h")
    with pytest.raises(TemplateNotFound, match="'nope'"):
        render(session, context={}, template="nope", templates_dir=templates_dir)
    with pytest.raises(TemplateNotFound, match="version 9"):
        render(session, context={}, template="exists@9", templates_dir=templates_dir)


def test_template_not_found_is_a_lookup_error():
    assert issubclass(TemplateNotFound, LookupError)


@pytest.mark.parametrize("reference", ["bad name", "../../etc/passwd", "x@latest", "@1", "x@1@2", "x@-1"])
def test_malformed_reference_is_a_value_error(session, templates_dir, reference):
    with pytest.raises(ValueError, match="not a template name"):
        render(session, context={}, template=reference, templates_dir=templates_dir)


@pytest.mark.parametrize(
    ("reference", "expected"),
    [("welcome", ("welcome", None)), ("welcome@3", ("welcome", 3)), ("a.b-c_d@10", ("a.b-c_d", 10))],
)
def test_parse_reference(reference, expected):
    assert template_store.parse_reference(reference) == expected


def test_parse_reference_rejects_a_trailing_newline():
    with pytest.raises(ValueError):
        template_store.parse_reference("welcome\n")


def test_resolve_reports_text_presence(session, save, templates_dir):
    save("t1", subject="s", html="h", text="t")
    save("t2", subject="s", html="h")
    assert template_store.resolve(session, "t1", templates_dir) == TemplateRef("t1", 1, True)
    assert template_store.resolve(session, "t2", templates_dir) == TemplateRef("t2", 1, False)
    write_file_template(templates_dir, "f", subject="s", html="h", text="t")
    ref = template_store.resolve(session, "f", templates_dir)
    assert (ref.version, ref.has_text, ref.path) == (None, True, templates_dir / "f")


def test_load_part(db_url, save):
    save("p", subject="S", html="H", text=None)
    factory = db.session_factory()
    assert template_store.load_part(factory, "p", 1, "subject") == "S"
    assert template_store.load_part(factory, "p", 1, "html") == "H"
    assert template_store.load_part(factory, "p", 1, "text") is None
    assert template_store.load_part(factory, "p", 2, "html") is None
    assert template_store.load_html(factory, "p", 1) == ("H", None)
    assert template_store.load_html(factory, "p", 2) is None


def test_compiled_db_template_is_cached(session, save, templates_dir, monkeypatch):
    save("cached", subject="Hi {{ n }}", html="<p>{{ n }}</p>", text="{{ n }}")
    calls = []
    real = template_store.load_part

    def counting(*args, **kwargs):
        calls.append(args[1:])
        return real(*args, **kwargs)

    real_html = template_store.load_html

    def counting_html(*args, **kwargs):  # the HTML part, with its preheader
        calls.append((*args[1:], "html"))
        return real_html(*args, **kwargs)

    monkeypatch.setattr(template_store, "load_part", counting)
    monkeypatch.setattr(template_store, "load_html", counting_html)
    first = render(session, context={"n": 1}, template="cached", templates_dir=templates_dir)
    assert sorted(calls) == [("cached", 1, "html"), ("cached", 1, "subject"), ("cached", 1, "text")]
    calls.clear()
    second = render(session, context={"n": 2}, template="cached", templates_dir=templates_dir)
    third = render(session, context={"n": 3}, template="cached@1", templates_dir=templates_dir)
    assert calls == []
    assert (first.subject, second.subject, third.subject) == ("Hi 1", "Hi 2", "Hi 3")
    # A new version is a new template: its parts are loaded once (the HTML once more, to derive
    # the text part it lacks), however many messages it renders.
    save("cached", subject="v2 {{ n }}", html="<p>v2</p>")
    for n in (4, 5):
        assert render(session, context={"n": n}, template="cached", templates_dir=templates_dir).subject == f"v2 {n}"
    assert sorted(calls) == [("cached", 2, "html"), ("cached", 2, "html"), ("cached", 2, "subject")]


def test_rendering_a_db_template_inside_a_make_engine_session(db_url, save, templates_dir, monkeypatch):
    real_configure = db._configure_sqlite

    def quick_busy_timeout(dbapi_connection, record):  # fail in 0.2 s rather than 30 s
        real_configure(dbapi_connection, record)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=200")
        cursor.close()

    monkeypatch.setattr(db, "_configure_sqlite", quick_busy_timeout)
    _clear_caches()
    save("welcome", subject="Hi {{ name }}", html="<p>Hello</p>")
    engine = db.make_engine(db_url)
    try:
        with Session(engine) as session:
            result = render(session, context={"name": "Ann"}, template="welcome", templates_dir=templates_dir)
        assert result.subject == "Hi Ann"
    finally:
        engine.dispose()


# --- inline templates ---------------------------------------------------------------------------


def test_inline_subject_and_html(session):
    result = render(session, context={"name": EVIL}, subject="Hi {{ name }}", html="<b>{{ name }}</b>")
    assert result.subject == f"Hi {EVIL}"
    assert result.html == f"<b>{ESCAPED}</b>"
    assert EVIL in result.text  # generated from the HTML
    assert (result.template_name, result.template_version) == (None, None)


def test_inline_text_only_is_not_escaped_and_has_no_html(session):
    result = render(session, context={"name": EVIL}, subject="S", text="Hi {{ name }}")
    assert result.html is None
    assert result.text == f"Hi {EVIL}"


def test_inline_text_and_html_are_both_kept(session):
    result = render(session, context={}, subject="S", html="<p>H</p>", text="T")
    assert (result.html, result.text) == ("<p>H</p>", "T")


@pytest.mark.parametrize("kwargs", [{}, {"subject": "S"}, {"html": "<p>h</p>"}, {"text": "t"}])
def test_inline_needs_a_subject_and_a_body(session, kwargs):
    with pytest.raises(TemplateError, match="give a template"):
        render(session, context={}, **kwargs)


def test_safe_filter_opts_out_of_escaping(session):
    result = render(session, context={"snippet": "<em>hi</em>"}, subject="S", html="{{ snippet | safe }}")
    assert result.html == "<em>hi</em>"


def test_subject_whitespace_is_collapsed_to_one_line(session):
    result = render(session, context={"name": "Bob"}, subject="  Hello\t  {{ name }}  \n", text="t")
    assert result.subject == "Hello Bob"


@pytest.mark.parametrize("value", ["Bob\r\nBcc: eve@example.com", "Bob\nX-Evil: 1", "Bob\rX", "Bob\0"])
def test_line_break_from_context_in_the_subject_is_refused(session, value):
    with pytest.raises(AddressError) as info:
        render(session, context={"name": value}, subject="Hello {{ name }}", text="t")
    assert info.value.field == "subject"


def test_line_break_from_context_in_a_db_subject_is_refused(session, save, templates_dir):
    save("inj", subject="Hello {{ name }}", html="<p>x</p>")
    with pytest.raises(AddressError) as info:
        render(session, context={"name": "a\r\nBcc: eve@example.com"}, template="inj", templates_dir=templates_dir)
    assert info.value.field == "subject"


def test_line_breaks_in_the_body_are_fine(session):
    result = render(session, context={"name": "a\nb"}, subject="S", text="{{ name }}")
    assert result.text == "a\nb"


# --- errors name the template and the line ------------------------------------------------------


def test_missing_variable_names_template_and_line_inline(session):
    with pytest.raises(TemplateError) as info:
        render(session, context={}, subject="S", html="<p>\nHello {{ missing }}\n</p>")
    err = info.value
    assert (err.template, err.line) == ("<inline html>", 2)
    assert "'missing' is undefined" in str(err)
    assert str(err).startswith("template <inline html>, line 2: ")
    assert err.field == "template"


def test_missing_variable_names_template_and_line_db(session, save, templates_dir):
    save("strict", subject="S {{ ok }}", html="<p>\n\n{{ user.first_name }}</p>")
    with pytest.raises(TemplateError) as info:
        render(session, context={"ok": 1, "user": {}}, template="strict", templates_dir=templates_dir)
    assert (info.value.template, info.value.line) == ("strict@1/html", 3)
    assert "first_name" in str(info.value)


def test_missing_variable_in_a_file_subject(session, templates_dir):
    write_file_template(templates_dir, "fs", subject="Hi {{ name }}", html="<p>x</p>")
    with pytest.raises(TemplateError) as info:
        render(session, context={}, template="fs", templates_dir=templates_dir)
    assert info.value.template.endswith("fs/subject.txt")
    assert info.value.line == 1
    assert "'name' is undefined" in str(info.value)


def test_missing_variable_is_an_error_even_when_only_tested_for_truth(session):
    with pytest.raises(TemplateError, match="'vip' is undefined"):
        render(session, context={}, subject="S", text="{% if vip %}VIP{% endif %}")


def test_default_filter_and_is_defined_tolerate_absence(session):
    result = render(
        session,
        context={},
        subject='Hi {{ name | default("there") }}',
        text="{% if vip is defined %}VIP{% else %}regular{% endif %}",
    )
    assert (result.subject, result.text) == ("Hi there", "regular")
    result = render(
        session,
        context={"name": "Ann", "vip": True},
        subject='Hi {{ name | default("there") }}',
        text="{% if vip is defined %}VIP{% else %}regular{% endif %}",
    )
    assert (result.subject, result.text) == ("Hi Ann", "VIP")


def test_syntax_error_inline_names_template_and_line(session):
    with pytest.raises(TemplateError) as info:
        render(session, context={}, subject="S", html="<p>\nok\n{% if %}</p>")
    assert (info.value.template, info.value.line) == ("<inline html>", 3)


def test_syntax_error_in_db_template_names_template_and_line(session, save, templates_dir):
    save("broken", subject="fine", html="<p>\n{{ unclosed </p>")
    with pytest.raises(TemplateError) as info:
        render(session, context={}, template="broken", templates_dir=templates_dir)
    assert info.value.template == "broken@1/html"
    assert info.value.line == 2
    assert str(info.value).startswith("template broken@1/html, line 2: ")


def test_syntax_error_in_file_template_names_the_file_and_line(session, templates_dir):
    write_file_template(templates_dir, "bad", subject="S", html="<p>x</p>", text="a\nb\n{% endfor %}")
    with pytest.raises(TemplateError) as info:
        render(session, context={}, template="bad", templates_dir=templates_dir)
    assert info.value.template.endswith("bad/body.txt")
    assert info.value.line == 3


def test_runtime_error_in_template_becomes_template_error(session):
    with pytest.raises(TemplateError, match="ZeroDivisionError") as info:
        render(session, context={"n": 0}, subject="S", text="x\n{{ 1 / n }}")
    assert info.value.line == 2


def test_check_template_source(db_url):
    rendering.check_template_source("Hi {{ name }}", "<p>{{ name }}</p>", "{{ name }}")
    rendering.check_template_source("S", "<p>h</p>")
    with pytest.raises(TemplateError) as info:
        rendering.check_template_source("S", "<p>ok</p>", "line\n{% if x %}")
    assert info.value.template == "<inline text>"
    with pytest.raises(TemplateError, match="<inline subject>"):
        rendering.check_template_source("{{ }}", "<p>ok</p>")


# --- the sandbox --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "context"),
    [
        ("{{ ''.__class__.__mro__ }}", {}),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", {}),
        ("{{ x.__globals__ }}", {"x": lambda: None}),
        ("{{ x.__code__ }}", {"x": lambda: None}),
        ("{{ cycler.__init__.__globals__ }}", {}),
        ("{{ '{0.__class__}'.format(1) }}", {}),
        ("{{ items.append(4) }}", {"items": [1, 2, 3]}),  # immutable sandbox: no mutating the context
        ("{{ d.update(a=1) }}", {"d": {}}),
        ("{{ d.pop('k') }}", {"d": {"k": 1}}),
    ],
)
def test_sandbox_refuses_python_internals(session, source, context):
    with pytest.raises(TemplateError) as info:
        render(session, context=context, subject="S", html=source)
    assert "not allowed by the sandbox" in str(info.value)
    assert info.value.template == "<inline html>"


def test_sandbox_refuses_huge_ranges(session):
    with pytest.raises(TemplateError, match="Range too big"):
        render(session, context={}, subject="S", text="{% for i in range(10**7) %}{% endfor %}")


def test_sandbox_bounds_nested_loops_over_ranges_per_render(session):
    nested = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError, match="at most 1,000,000 numbers in one render"):
        render(session, context={}, subject="S", text=nested)
    loops = "{% for a in range(100000) %}{% endfor %}" * 10
    for _ in range(2):  # each render has its own budget
        assert render(session, context={}, subject="S", text=loops + "ok").text == "ok"


def test_sandbox_leaves_the_context_unchanged(session):
    items = [1, 2, 3]
    with pytest.raises(TemplateError):
        render(session, context={"items": items}, subject="S", text="{{ items.append(4) }}")
    assert items == [1, 2, 3]


def test_templates_cannot_include_arbitrary_files(session, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    try:
        result = render(session, context={}, subject="S", html='{% include "file/' + str(secret) + '" %}')
    except (TemplateError, jinja2.TemplateNotFound):
        return
    assert "TOP-SECRET" not in result.html


def test_a_text_part_derived_from_the_html_source_matches_converting_each_message(session, templates_dir):
    html = (
        "<h1>Hello {{ name }},</h1>\n<p>Your code is <b>{{ code }}</b>.</p>\n"
        "{% if plan is defined %}<p>Plan: {{ plan }}</p>{% endif %}"
    )
    write_file_template(templates_dir, "derived", subject="Code", html=html)
    for context in ({"name": "Ann", "code": "X1"}, {"name": "Bob & <Co>", "code": "42", "plan": "pro"}):
        result = render(session, context=context, template="derived", templates_dir=templates_dir)
        assert result.text == html_to_text(result.html)
        inline = render(None, context=context, subject="Code", html=html)
        assert inline.text == result.text


def test_html_whose_jinja_tags_hold_markup_is_converted_per_message(session, templates_dir):
    html = "<p>{{ note | default('<b>none</b>') }}</p>"
    assert text_source_from_html(html) is None
    assert render(None, context={}, subject="s", html=html).text == "<b>none</b>\n"


# --- email-client-ready HTML: CSS inlined and the preheader added as a version compiles --------

STYLED = "<html><head><style>p { color: #333; }</style></head><body><p>Hi {{ name }}</p></body></html>"
HIDDEN = '<div style="display:none;max-height:0;overflow:hidden;mso-hide:all">'


def test_a_db_template_is_sent_with_css_inlined_and_its_preheader_but_stored_as_written(engine, session, templates_dir):
    with Session(engine) as writing:
        template_store.save_template(writing, "styled", subject="S", html=STYLED, preheader="For {{ name }} & co")
        writing.commit()
    result = render(session, context={"name": "Ann"}, template="styled", templates_dir=templates_dir)
    assert result.html is not None
    assert f'<body>{HIDDEN}For Ann &amp; co</div><p style="color: #333;">Hi Ann</p>' in result.html
    assert "<style>" not in result.html
    assert result.text == "Hi Ann\n"  # the hidden preview text is not in the text part
    assert template_store.get_template("styled") | {"created_at": None} == {
        "name": "styled",
        "version": 1,
        "subject": "S",
        "html": STYLED,
        "text": None,
        "preheader": "For {{ name }} & co",
        "created_at": None,
    }


def test_an_inline_html_part_gets_its_css_inlined(session):
    result = render(session, context={"name": "Bo"}, subject="S", html=STYLED)
    assert result.html == '<html><head></head><body><p style="color: #333;">Hi Bo</p></body></html>'


def test_a_file_template_takes_its_preheader_from_preheader_txt(session, templates_dir, monkeypatch):
    directory = write_file_template(templates_dir, "pre", subject="S", html=STYLED)
    (directory / template_store.FILE_PREHEADER).write_text("Hello {{ name }}\n", encoding="utf-8")
    result = render(session, context={"name": "Ann"}, template="pre", templates_dir=templates_dir)
    assert f"<body>{HIDDEN}Hello Ann</div><p" in (result.html or "")
    # An edit of preheader.txt alone shows after the recheck interval, as one of body.html does.
    (directory / template_store.FILE_PREHEADER).unlink()
    monkeypatch.setattr(rendering, "FILE_RECHECK_SECONDS", 0.0)
    assert HIDDEN not in (
        render(session, context={"name": "A"}, template="pre", templates_dir=templates_dir).html or ""
    )
