"""Unit tests for smartmail.content.tracking_links: signed click and open tokens, links rewritten, the pixel."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartmail.config.settings import get_settings
from smartmail.content import tracking_links
from smartmail.content.tracking_links import Click, read_click, read_open, track, with_utm
from smartmail.errors import InvalidToken
from tests.unit.test_unsubscribe_tokens import env  # noqa: F401 - autouse: the required settings only

MESSAGE = "01JD4S3Y7Q8W9E0R1T2Y3U4I5O"[:20] + "ABCDEF"  # 26 Crockford base32 characters
_CLICK = re.compile(r"https://mail\.example\.com/t/c/([A-Za-z0-9._-]*[A-Za-z0-9_-])")  # a token ends with its signature


def tokens(part: str) -> list[Click]:
    return [read_click(token) for token in _CLICK.findall(part)]


def test_links_are_numbered_per_distinct_url_and_shared_by_both_parts():
    html = (
        "<p><a href=\"https://a.example/x?q=1&amp;r=2\">A</a> <A HREF='https://b.example/'>B</A>"
        ' <a class="c" href="https://a.example/x?q=1&amp;r=2">A again</a></p>'
    )
    text = "A: https://a.example/x?q=1&r=2, C: https://c.example/page.\n"
    out_html, out_text = track(html, text, message_id=MESSAGE)
    assert [(c.link, c.url) for c in tokens(out_html)] == [
        (1, "https://a.example/x?q=1&r=2"),
        (2, "https://b.example/"),
        (1, "https://a.example/x?q=1&r=2"),
    ]
    assert [(c.link, c.url) for c in tokens(out_text)] == [
        (1, "https://a.example/x?q=1&r=2"),
        (3, "https://c.example/page"),
    ]
    assert out_text.endswith(".\n") and ", C: https://mail.example.com/t/c/" in out_text  # punctuation stays outside
    assert 'class="c"' in out_html and ">A again</a>" in out_html


def test_what_is_left_alone():
    html = (
        '<a href="mailto:x@example.com">m</a><a href="javascript:alert(1)">j</a><a href="data:text/html,x">d</a>'
        '<a href="/relative">r</a><a href="https://u.example/unsub">u</a><a name="top">t</a>'
        '<a data-track="off" href="https://keep.example/">k</a><a href=\'https://k2.example/\' DATA-TRACK=off>k2</a>'
    )
    out_html, out_text = track(html, "https://u.example/unsub\n", message_id=MESSAGE, skip=("https://u.example/unsub",))
    assert tokens(out_html) == []
    assert '<a href="https://keep.example/">k</a>' in out_html and "<a href='https://k2.example/'>k2</a>" in out_html
    assert "data-track" not in out_html.lower()
    assert out_text == "https://u.example/unsub\n"


def test_the_open_pixel_goes_before_the_body_ends_and_nothing_is_added_when_tracking_is_off():
    html = "<html><body><p>Hi</p></body></html>"
    tracked, _ = track(html, "Hi\n", message_id=MESSAGE)
    pixel = re.search(r'<img src="https://mail\.example\.com/t/o/([^"]+)" width="1" height="1" alt=""', tracked)
    assert pixel and read_open(pixel.group(1)) == MESSAGE
    assert tracked.index("<img") < tracked.index("</body>")
    assert track(html, "https://a.example/\n", message_id=MESSAGE, opens=False, clicks=False) == (
        html,
        "https://a.example/\n",
    )
    untracked, _ = track('<a data-track="off" href="https://a.example/">a</a>', "", message_id=MESSAGE, clicks=False)
    assert untracked.startswith('<a href="https://a.example/">')  # the attribute never reaches a recipient


def test_the_honeypot_is_a_hidden_link_naming_no_url():
    tracked, _ = track("<body></body>", "", message_id=MESSAGE, honeypot=True, opens=False)
    (honeypot,) = tokens(tracked)
    assert honeypot == Click(MESSAGE, tracking_links.HONEYPOT, None)
    assert 'style="display:none"' in tracked


def test_utm_parameters_are_added_but_never_override_the_link_s_own():
    utm = {"utm_source": "newsletter", "utm_medium": "email", "not_utm": "x"}
    assert with_utm("https://a.example/p", utm) == "https://a.example/p?utm_source=newsletter&utm_medium=email"
    assert with_utm("https://a.example/p?utm_source=own#top", utm) == (
        "https://a.example/p?utm_source=own&utm_medium=email#top"
    )
    tracked, _ = track('<a href="https://a.example/p">p</a>', "", message_id=MESSAGE, utm=utm, opens=False)
    assert tokens(tracked)[0].url == "https://a.example/p?utm_source=newsletter&utm_medium=email"


def test_tokens_are_refused_when_altered_truncated_or_of_another_purpose(monkeypatch):
    tracked, _ = track('<a href="https://a.example/">a</a>', "", message_id=MESSAGE)
    token = _CLICK.findall(tracked)[0]
    open_token = re.search(r"/t/o/([^\"]+)", tracked).group(1)  # type: ignore[union-attr]
    payload, signature = token.rsplit(".", 1)
    other_url = base64.urlsafe_b64encode(b"https://evil.example/").rstrip(b"=").decode()
    for bad in (
        token[:-1],
        token + "A",
        f"{payload}.{'A' * 22}",
        f"{MESSAGE}.2.{payload.split('.')[2]}.{signature}",  # another link number
        f"{MESSAGE}.1.{other_url}.{signature}",  # another URL
        open_token,
        "",
        None,
        "x" * 10_000,
    ):
        with pytest.raises(InvalidToken):
            read_click(bad)
    with pytest.raises(InvalidToken):
        read_open(f"{MESSAGE}.{signature}")  # a click signature is not an open signature
    get_settings.forget()
    monkeypatch.setenv("SMARTMAIL_SECRET_KEY", "another-secret-key-0123456789")
    with pytest.raises(InvalidToken):
        read_click(token)  # rotating the secret invalidates links already sent


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_any_http_url_round_trips_through_its_token(path):
    url = "https://a.example/" + path.replace("\r", "").replace("\n", "").replace("\t", "")
    assert read_click(tracking_links.click_url(MESSAGE, 7, url).rsplit("/", 1)[1]) == Click(MESSAGE, 7, url)
