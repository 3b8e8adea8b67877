"""Email-client-ready HTML: a template source's `<style>` CSS inlined into style attributes, and its preheader."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import css_inline
import jinja2
import structlog

from smartmail.errors import InvalidInput

log = structlog.get_logger("smartmail.content")

_JINJA_TAG = re.compile(r"{{.*?}}|{%.*?%}|{#.*?#}", re.DOTALL)
# Jinja tags stand in for themselves as these while the HTML parser reads the template: characters
# from the private use area, which no template has, no HTML rule changes and no CSS selector matches.
_OPEN, _CLOSE = "\ue000", "\ue001"
_TOKEN = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
_PREHEADER_MARK = f"{_OPEN}p{_CLOSE}"
_HAS_STYLE = re.compile(r"<style\b", re.IGNORECASE)
_BODY = re.compile(r"<body\b(?:[^>\"']|\"[^\"]*\"|'[^']*')*>", re.IGNORECASE)
_HEAD_END = re.compile(r"</head\s*>", re.IGNORECASE)
_LEADING = re.compile(r"\A\s*(?:<!doctype\b[^>]*>\s*)?(?:<html\b(?:[^>\"']|\"[^\"]*\"|'[^']*')*>)?", re.IGNORECASE)

# A client that supports <style> (most but Gmail's older apps and Outlook's Word engine) still
# gets @media rules: they cannot be inlined. Remote stylesheets are never fetched: templates are
# user-authored, and fetching a URL a template names would let it reach the server's network.
_INLINER = css_inline.CSSInliner(keep_at_rules=True, keep_link_tags=True, load_remote_stylesheets=False)

PREHEADER_STYLE = "display:none;max-height:0;overflow:hidden;mso-hide:all"
PREHEADER_MAX = 1000


def prepare_html(source: str, preheader: str | None) -> str:
    """The HTML template `source` with its `<style>` CSS inlined (@media rules stay in a style tag)
    and `preheader` (plain text, may hold Jinja) as hidden preview text first in the body. Jinja
    tags come through unchanged; when the inliner would move or lose one, or the HTML parser
    would move text (foster parenting out of a table), the source is kept as written (logged)."""
    if _OPEN in source or _CLOSE in source:
        if _HAS_STYLE.search(source):
            log.warning("email_html.not_inlined", reason="the source holds the characters Jinja tags are masked with")
        return add_preheader(source, preheader)
    tokens: list[str] = []
    marked = _JINJA_TAG.sub(lambda m: _token(tokens, m.group()), source)
    as_written = _restore(_with_preheader(marked, preheader), tokens, preheader)
    if not _HAS_STYLE.search(marked):  # nothing to inline: no need to parse
        return as_written
    inlined, why = _inline_css(marked, len(tokens))
    if inlined is not None:
        result = _restore(_with_preheader(inlined, preheader), tokens, preheader)
        if _parses(result):
            return result
        if not _parses(source):  # the author's error: the caller reports it, on the source
            return as_written
        why = "the inlined template does not parse as the source does"
    log.warning("email_html.not_inlined", reason=why)
    return as_written


def _parses(template: str) -> bool:
    # The sandbox's syntax is Jinja's default one, so a plain environment parses as it does.
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    return True


def add_preheader(source: str, preheader: str | None) -> str:
    """`source` with `preheader` as hidden preview text right after `<body…>` (nothing else changed)."""
    if not preheader:
        return source
    tokens: list[str] = []
    marked = _JINJA_TAG.sub(lambda m: _token(tokens, m.group()), source) if _OPEN not in source else source
    return _restore(_with_preheader(marked, preheader), tokens, preheader)


def check_preheader(preheader: object, *, field: str = "preheader") -> str | None:
    """A preheader as stored: None (empty means none), or text of up to PREHEADER_MAX characters
    whose Jinja parses. InvalidInput names `field`."""
    if preheader is None or preheader == "":
        return None
    if not isinstance(preheader, str):
        raise InvalidInput("must be a string", field=field)
    if len(preheader) > PREHEADER_MAX or "\x00" in preheader:
        raise InvalidInput(f"must be at most {PREHEADER_MAX} characters, without NUL", field=field)
    try:
        jinja2.Environment().parse(preheader)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidInput(f"is not a valid template: {exc.message}", field=field) from None
    return preheader


def _token(tokens: list[str], tag: str) -> str:
    tokens.append(tag)
    return f"{_OPEN}{len(tokens) - 1}{_CLOSE}"


def _inline_css(marked: str, count: int) -> tuple[str | None, str]:
    """The inlined document, or None and why not."""
    before = _Reading(marked)
    if before.problem:
        return None, before.problem
    # In text a Jinja tag goes in as a comment: the parser moves text out of a table (foster
    # parenting: `<tr>{% for %}<td>`) but leaves comments where they are.
    commented = _TOKEN.sub(
        lambda m: f"<!--{m.group()}-->" if before.kinds.get(int(m.group(1))) == "text" else m.group(), marked
    )
    try:
        inlined = _INLINER.inline(commented)
    except (css_inline.InlineError, ValueError) as exc:
        return None, f"css-inline: {exc}"
    inlined = re.sub(f"<!--({_TOKEN.pattern})-->", r"\1", inlined)
    found = [int(i) for i in _TOKEN.findall(inlined)]
    if sorted(found) != list(range(count)):
        return None, "a Jinja tag was lost or repeated"
    if _Reading(inlined).outline != before.outline:
        return None, "the HTML parser moved text, tags or Jinja tags (e.g. out of a table)"
    return _pad_head(marked, inlined), ""


def _pad_head(marked: str, inlined: str) -> str:
    """Newlines the removed style blocks held, put back in the head: Jinja's error line numbers
    then match the source the author wrote (whitespace in the head shows nowhere)."""
    source_body, body = _BODY.search(marked), _BODY.search(inlined)
    head_end = _HEAD_END.search(inlined)
    if not (source_body and body and head_end):
        return inlined
    missing = marked.count("\n", 0, source_body.start()) - inlined.count("\n", 0, body.start())
    if missing <= 0:
        return inlined
    return inlined[: head_end.start()] + "\n" * missing + inlined[head_end.start() :]


def _with_preheader(marked: str, preheader: str | None) -> str:
    """The preheader's mark right after `<body…>`; without a body tag, after the head (or doctype
    and `<html>`): before a doctype it would put browsers in quirks mode."""
    if not preheader:
        return marked
    if body := _BODY.search(marked):
        at = body.end()
    elif head_end := _HEAD_END.search(marked):
        at = head_end.end()
    else:
        at = _LEADING.match(marked).end()  # type: ignore[union-attr]  # matches the empty string at worst
    return marked[:at] + _PREHEADER_MARK + marked[at:]


def _preheader_html(preheader: str) -> str:
    # Plain text: HTML in it is escaped; its Jinja tags are kept (their output is autoescaped).
    parts, at = [], 0
    for match in _JINJA_TAG.finditer(preheader):
        parts += [html.escape(preheader[at : match.start()], quote=False), match.group()]
        at = match.end()
    parts.append(html.escape(preheader[at:], quote=False))
    return f'<div style="{PREHEADER_STYLE}">{"".join(parts)}</div>'


def _restore(marked: str, tokens: list[str], preheader: str | None) -> str:
    restored = _TOKEN.sub(lambda m: tokens[int(m.group(1))], marked) if tokens else marked
    return restored.replace(_PREHEADER_MARK, _preheader_html(preheader)) if preheader else restored


# Elements the HTML parser adds where the source implies them, and style (moved or removed).
_IMPLIED = frozenset({"html", "head", "body", "tbody", "tr", "colgroup", "style"})


class _Reading(HTMLParser):
    """Where each Jinja token of a marked template stands (text, attribute, comment, raw text),
    what cannot be protected (`problem`), and an outline for comparing before and after inlining:
    the text, comments and tags in order, with each tag's Jinja tokens (attribute order may change)."""

    def __init__(self, marked: str) -> None:
        super().__init__(convert_charrefs=True)
        self.kinds: dict[int, str] = {}
        self.outline: list[tuple[str, ...]] = []
        self.problem = ""
        self._raw: str | None = None  # title or textarea: text the parser does not read as HTML
        self._text: list[str] = []
        if re.search(f"</?{_OPEN}", marked):
            self.problem = "a Jinja tag in a tag's name"
        self.feed(marked)
        self.close()
        self._flush()

    def _flush(self) -> None:
        text = " ".join("".join(self._text).split())
        if text:
            self.outline.append(("text", text))
        self._text = []

    def _note(self, text: str, kind: str) -> list[str]:
        found = _TOKEN.findall(text)
        for i in found:
            self.kinds[int(i)] = kind
        return found

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._flush()
        if any(_OPEN in name for name, _ in attrs):
            self.problem = self.problem or f"a Jinja tag between the attributes of <{tag}>"
        found = [i for _, value in attrs for i in self._note(value or "", "attribute")]
        if tag not in _IMPLIED:
            self.outline.append(("tag", tag, *sorted(found)))
        if tag in ("title", "textarea"):
            self._raw = tag

    def handle_endtag(self, tag: str) -> None:
        self._flush()
        if tag == self._raw:
            self._raw = None

    def handle_data(self, data: str) -> None:
        if self.cdata_elem == "style":  # set by HTMLParser while in <style> or <script>
            if _OPEN in data:
                self.problem = self.problem or "a Jinja tag inside <style>"
            return
        raw = self._raw or self.cdata_elem
        if raw:
            self._note(data, "raw")
        else:
            for i in _TOKEN.findall(data):
                self.kinds[int(i)] = "text"
        self._text.append(data)

    def handle_comment(self, data: str) -> None:
        self._flush()
        self._note(data, "comment")
        self.outline.append(("comment", data.strip()))

    def handle_decl(self, decl: str) -> None:
        if _OPEN in decl:
            self.problem = self.problem or "a Jinja tag in a declaration"

    def handle_pi(self, data: str) -> None:
        if _OPEN in data:
            self.problem = self.problem or "a Jinja tag in a processing instruction"
