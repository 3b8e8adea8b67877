"""Unit tests for smartmail.content.email_html: CSS inlined into template sources, Jinja kept, preheaders."""

from __future__ import annotations

import re
from pathlib import Path

import jinja2
import pytest
from structlog.testing import capture_logs

from smartmail.content import email_html
from smartmail.content.email_html import PREHEADER_STYLE, add_preheader, check_preheader, prepare_html
from smartmail.content.rendering import html_to_text
from smartmail.errors import InvalidInput

SHIPPED = Path(__file__).resolve().parents[2] / "templates"
JINJA = re.compile(r"{{.*?}}|{%.*?%}|{#.*?#}", re.DOTALL)
HIDDEN = f'<div style="{PREHEADER_STYLE}">'


def render(source: str, **context) -> str:
    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(source).render(context)


def jinja_tags(source: str) -> list[str]:
    return JINJA.findall(source)


NEWSLETTER = """<!doctype html>
<html>
<head>
<title>{{ subject }}</title>
<style>
  p { color: #333; }
  .button { background: #06c; color: white; }
  td.price { text-align: right; }
  @media (max-width: 600px) { p { font-size: 18px; } }
</style>
</head>
<body class="{{ theme }}">
  <p>Hello {{ name }} &amp; friends,</p>
  <p class="note" style="margin: {{ gap }}px">Unquoted link: <a href={{ url }}>here</a></p>
  <a class="button" href="{{ url }}?utm=1&amp;x={{ x }}" title='{{ title | default("Go") }}'>Go</a>
  <table>
    <tr>{% for item in items %}<td class="price">{{ item }}</td>{% endfor %}</tr>
    {% for item in items %}<tr><td>{{ loop.index }}</td></tr>{% endfor %}
  </table>
  {# a note for the author #}
  <!--[if mso]><p>{{ outlook_only }}</p><![endif]-->
</body>
</html>
"""
CONTEXT = {
    "subject": "S",
    "theme": "light",
    "name": "Ann <3",
    "gap": 4,
    "url": "https://example.com/a?b=1&c=2",
    "x": "y",
    "items": ["1.00", "2.00"],
    "outlook_only": "o",
}


def test_css_is_inlined_and_jinja_tags_come_through_in_order():
    prepared = prepare_html(NEWSLETTER, None)
    # In order, but for attributes: the inliner may write a tag's attributes in another order.
    assert sorted(jinja_tags(prepared)) == sorted(jinja_tags(NEWSLETTER))
    assert "{{ url }}{{ x }}" in "".join(jinja_tags(prepared))
    outside_tags = re.sub(r"<[^>]*>", "", prepared), re.sub(r"<[^>]*>", "", NEWSLETTER)
    assert jinja_tags(outside_tags[0]) == jinja_tags(outside_tags[1])
    assert '<p style="color: #333;">Hello {{ name }} &amp; friends,</p>' in prepared
    assert 'style="color: #333;margin: {{ gap }}px"' in prepared  # the author's own style kept, after
    assert 'href="{{ url }}"' in prepared  # an unquoted attribute is quoted now
    assert '<tr>{% for item in items %}<td class="price" style="text-align: right;">{{ item }}</td>' in prepared
    assert "{% endfor %}</tr>" in prepared
    assert "background: #06c;color: white;" in prepared
    # @media cannot be inlined: it stays in a style tag for the clients that read one.
    assert re.search(r"<style>\s*@media \(max-width: 600px\) \{ p \{ font-size: 18px; \} \}\s*</style>", prepared)
    assert "td.price" not in prepared
    # Rendered: the same text, now styled inline.
    before, after = render(NEWSLETTER, **CONTEXT), render(prepared, **CONTEXT)
    assert html_to_text(after) == html_to_text(before)
    assert "Ann &lt;3" in after and 'href="https://example.com/a?b=1&amp;c=2"' in after


def test_error_lines_match_the_source_the_author_wrote():
    prepared = prepare_html(NEWSLETTER, "Hi there")
    # Each Jinja tag in the body is on its line in the source, so Jinja's error lines are the
    # author's (the style block's lines are kept as blank lines in the head).
    for tag in ("{{ name }}", "{% for item in items %}", "{{ outlook_only }}"):
        line = NEWSLETTER[: NEWSLETTER.index(tag)].count("\n")
        assert prepared[: prepared.index(tag, prepared.index("<body"))].count("\n") == line, tag


@pytest.mark.parametrize(
    "source, reason",
    [
        # Foster parenting: an element directly in a table row is moved before the table, away from
        # the loop around it.
        (
            '<style>p{color:red}</style><table><tr>{% for c in cs %}<span class="{{ c }}">x</span>{% endfor %}'
            "</tr></table>",
            "moved",
        ),
        ("<style>p{color:red}</style><table><tr>stray {{ a }}<td>b</td></tr></table>", "moved"),
        ("<style>p { color: {{ brand }} }</style><p>x</p>", "inside <style>"),
        ("<style>p{color:red}</style><p {{ attributes }}>x</p>", "between the attributes"),
        ("<style>p{color:red}</style><{{ tag }}>x</{{ tag }}>", "tag's name"),
    ],
)
def test_what_the_inliner_would_move_or_break_keeps_the_source(source, reason):
    with capture_logs() as logs:
        prepared = prepare_html(source, "Pre")
    assert prepared == f"{HIDDEN}Pre</div>{source}"
    assert [entry["event"] for entry in logs] == ["email_html.not_inlined"]
    assert reason in logs[0]["reason"]


def test_a_block_split_over_attributes_the_inliner_reorders_keeps_the_source(monkeypatch):
    # The inliner may write a tag's attributes in another order; a block opened in one attribute
    # and closed in another would then close before it opens.
    source = '<style>p{color:red}</style><p title="{% if a %}x" class="y{% endif %}">z</p>'

    class Reordering:
        def inline(self, html: str) -> str:
            match = re.search(r'title="([^"]*)" class="([^"]*)"', html)
            assert match is not None
            title, klass = match.groups()
            return (
                f'<html><head></head><body><p class="{klass}" title="{title}" style="color: red;">z</p></body></html>'
            )

    monkeypatch.setattr(email_html, "_INLINER", Reordering())
    with capture_logs() as logs:
        assert prepare_html(source, None) == source
    assert [entry["reason"] for entry in logs] == ["the inlined template does not parse as the source does"]


def test_a_source_holding_the_masking_characters_is_not_inlined():
    source = "<style>p{color:red}</style><p>\ue000{{ a }}</p>"
    with capture_logs() as logs:
        assert prepare_html(source, "P") == f"{HIDDEN}P</div>{source}"
    assert "masked" in logs[0]["reason"]


def test_a_source_with_a_jinja_syntax_error_is_left_for_the_caller_to_report():
    source = "<style>p{color:red}</style><p>{% if x %}</p>"
    with capture_logs() as logs:
        assert prepare_html(source, None) == source
    assert logs == []


def test_jinja_in_title_script_and_comments_survives():
    source = (
        "<html><head><title>{{ subject }}</title><style>p{color:red}</style></head><body>"
        "<script>var a = '{{ a }}';</script><!-- {{ b }} --><p>{{ c }}</p><textarea>{{ d }}</textarea></body></html>"
    )
    prepared = prepare_html(source, None)
    assert jinja_tags(prepared) == jinja_tags(source)
    assert '<p style="color: red;">{{ c }}</p>' in prepared


def test_remote_stylesheets_are_not_fetched_and_link_tags_stay():
    source = '<html><head><link rel="stylesheet" href="http://127.0.0.1:9/x.css"><style>p{color:red}</style></head><body><p>x</p></body></html>'
    prepared = prepare_html(source, None)
    assert '<link rel="stylesheet" href="http://127.0.0.1:9/x.css">' in prepared
    assert '<p style="color: red;">x</p>' in prepared


def test_without_a_style_block_only_the_preheader_is_added():
    source = "<p>{{ a }}</p>"
    assert prepare_html(source, None) == source
    assert prepare_html(source, "") == source


# --- preheaders ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, expected",
    [
        (
            '<!doctype html><html><body class="{{ c if n > 1 }}" style="margin:0"><p>x</p></body></html>',
            '<!doctype html><html><body class="{{ c if n > 1 }}" style="margin:0">PRE<p>x</p></body></html>',
        ),
        ("<html><head><title>t</title></head><p>x</p></html>", "<html><head><title>t</title></head>PRE<p>x</p></html>"),
        ("<!DOCTYPE html>\n<html lang=en><p>x</p>", "<!DOCTYPE html>\n<html lang=en>PRE<p>x</p>"),
        ("<p>x</p>", "PRE<p>x</p>"),
    ],
)
def test_the_preheader_goes_first_in_the_body(source, expected):
    hidden = f"{HIDDEN}Hi {{{{ name }}}} &amp; &lt;b&gt;you&lt;/b&gt;</div>"
    assert add_preheader(source, "Hi {{ name }} & <b>you</b>") == expected.replace("PRE", hidden)
    assert prepare_html(source, "Hi {{ name }} & <b>you</b>") == expected.replace("PRE", hidden)


def test_the_preheader_is_hidden_rendered_and_not_in_the_text_part():
    prepared = prepare_html(NEWSLETTER, "Your {{ name }} digest")
    body = re.search(r"<body[^>]*>", prepared)
    assert body and prepared[body.end() :].startswith(f"{HIDDEN}Your {{{{ name }}}} digest</div>")
    rendered = render(prepared, **CONTEXT)
    assert f"{HIDDEN}Your Ann &lt;3 digest</div>" in rendered
    assert "digest" not in html_to_text(rendered)  # display:none: not in the derived text part
    # The author's CSS is inlined before the preheader goes in: `div` rules do not reach it.
    styled = prepare_html("<style>div{display:block}</style><body><div>x</div></body>", "P")
    assert f"{HIDDEN}P</div>" in styled and '<div style="display: block;">x</div>' in styled


def test_check_preheader():
    assert check_preheader(None) is None and check_preheader("") is None
    assert check_preheader("Hi {{ name }}") == "Hi {{ name }}"
    for bad in ("{% if %}", "x" * 1001, "a\x00b", 3):
        with pytest.raises(InvalidInput) as caught:
            check_preheader(bad, field="preheader")
        assert caught.value.field == "preheader"


# --- the shipped templates ----------------------------------------------------------------------

SHIPPED_HTML = sorted(SHIPPED.glob("*/body.html"))
STYLE = "<head><style>p { line-height: 1.5; } a { color: #06c; } b { font-weight: 700; }</style></head>\n"
SHIPPED_CONTEXT = {
    "first_name": "Ann",
    "email": "ann@example.org",
    "reset_url": "https://example.com/reset?t=1&u=2",
    "plan": "Pro",
    "unsubscribe_url": "https://example.com/unsubscribe/t",
    "event": {"item_count": 2, "total": "59.00", "cart_url": "https://shop.example/cart/81"},  # workflow emails'
}


@pytest.mark.parametrize("path", SHIPPED_HTML, ids=lambda p: p.parent.name)
def test_shipped_templates(path):
    assert SHIPPED_HTML, "templates/ has HTML templates"
    source = path.read_text(encoding="utf-8")
    # As shipped (inline styles only): nothing to inline, so nothing changes but the preheader.
    assert prepare_html(source, None) == source
    with_preheader = prepare_html(source, "Hello {{ email }}")
    assert with_preheader.replace(f"{HIDDEN}Hello {{{{ email }}}}</div>", "") == source
    # With a style block: the same text when rendered, the rules now on the elements.
    styled = source.replace("<body", STYLE + "<body", 1)
    prepared = prepare_html(styled, "Hello {{ email }}")
    assert jinja_tags(prepared) == jinja_tags(styled[: styled.index("<body")]) + ["{{ email }}"] + jinja_tags(
        styled[styled.index("<body") :]
    )
    assert "<style>" not in prepared
    before, after = render(source, **SHIPPED_CONTEXT), render(prepared, **SHIPPED_CONTEXT)
    assert html_to_text(after) == html_to_text(before)
    assert '<p style="line-height: 1.5;">' in after and "ann@example.org" in after
    assert all('style="' in tag for tag in re.findall(r"<(?:p|a)\b[^>]*>", after))
