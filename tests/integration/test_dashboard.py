"""The dashboard on a real `smartmail web`: sign-in with an API key, pages from real roll-ups, CSRF refusals,
and the campaign page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import zlib
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import insert, select, update

from smartmail.access import keys
from smartmail.analytics import rollups
from smartmail.audience import event_stream
from smartmail.audience.event_stream import Position
from smartmail.store.engine import get_engine, utcnow
from smartmail.store.models import Campaign, Event
from smartmail.workers.limiter import get_throttle
from tests.conftest import wait_for
from tests.integration.conftest import sent_message

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
NAME = "spring sale"
BLUE = (0x43, 0x63, 0xD8)  # report_html's colour of the `sent` line


# --- Data: a campaign whose events are rolled up ------------------------------------------------


def _settle() -> None:
    """Wait until every stored event is readable (the PostgreSQL stream stops below the oldest open transaction)."""
    with get_engine().connect() as connection:
        last = connection.execute(select(Event.xact, Event.id).order_by(Event.xact.desc(), Event.id.desc())).first()
    if last is not None:
        wait_for(lambda: event_stream.end() == Position(*last), timeout=30, message="the stream to reach its end")


@pytest.fixture
def campaign(env) -> int:
    """A sent campaign of 8 messages over the last 4 hours (opens and clicks too), rolled up here."""
    with get_engine().begin() as connection:
        campaign_id = connection.execute(
            insert(Campaign).values(name=NAME, state="sent", template_name="news", sender="n@example.com")
        ).inserted_primary_key[0]
    now = utcnow()
    events = []
    for i in range(8):
        recipient = f"r{i}@{'gmail.com' if i % 2 else 'example.org'}"
        message_id = sent_message(recipient, campaign_id=campaign_id)
        at = now - timedelta(hours=3 - i // 2, minutes=i)  # two messages in each of four hours
        base = {"message_id": message_id, "campaign_id": campaign_id, "contact_id": None, "machine": False}
        events.append({**base, "type": "sent", "properties": {}, "occurred_at": at})
        if i < 5:
            events.append({**base, "type": "opened", "properties": {"unique": True}, "occurred_at": at})
        if i < 2:
            click = {"url": "https://example.com/a", "link": 0, "unique": True}
            events.append({**base, "type": "clicked", "properties": click, "occurred_at": at})
    with get_engine().begin() as connection:
        for event in events:  # one at a time: the stream's order is the list's
            connection.execute(insert(Event), [event])
    _settle()
    assert rollups.roll_up().events == len(events)
    return campaign_id


# --- httpx: sign-in, sessions, CSRF ----------------------------------------------------------------


def _client(api) -> httpx.Client:
    client = httpx.Client(base_url=api.url, timeout=30, follow_redirects=False)
    api.clients.append(client)
    return client


def _hidden_csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


def _sign_in(client: httpx.Client, token: str) -> httpx.Response:
    form = client.get("/dashboard/login")
    assert form.status_code == 200
    return client.post("/dashboard/login", data={"csrf": _hidden_csrf(form.text), "key": token})


def test_sign_in_sets_a_signed_session_and_every_page_checks_the_key(api, campaign):
    client = _client(api)
    assert client.get("/dashboard/").headers["location"] == "/dashboard/login"
    token = api.key("analytics:read")
    form = client.get("/dashboard/login")
    csrf_cookie = form.headers["set-cookie"]
    assert "HttpOnly" in csrf_cookie and "SameSite=lax" in csrf_cookie and "Path=/dashboard" in csrf_cookie
    signed = client.post("/dashboard/login", data={"csrf": _hidden_csrf(form.text), "key": token})
    assert signed.status_code == 303 and signed.headers["location"] == "/dashboard/"
    session_cookie = next(c for c in signed.headers.get_list("set-cookie") if c.startswith("smartmail_dashboard="))
    assert "HttpOnly" in session_cookie and "SameSite=lax" in session_cookie and "Path=/dashboard" in session_cookie
    assert "Secure" not in session_cookie  # the public URL is http here
    key_id = keys.key_id_of(token)
    assert key_id in session_cookie and token.rsplit("_", 1)[1] not in session_cookie  # the id, never the secret

    page = client.get("/dashboard/")
    assert page.status_code == 200 and NAME in page.text
    assert "script" not in page.headers["content-security-policy"].replace("default-src 'none'", "")
    detail = client.get(f"/dashboard/campaigns/{NAME}")
    assert detail.status_code == 200
    assert detail.text.count('class="point"') > 0 and 'http-equiv="refresh"' not in detail.text
    assert "example.org" in detail.text and "gmail.com" in detail.text  # the per-domain table
    assert client.get("/dashboard/campaigns/nothing-here").status_code == 404
    assert client.get("/dashboard/sites").status_code == 200

    keys.revoke_key(key_id)
    gone = client.get("/dashboard/")
    assert gone.status_code == 303 and gone.headers["location"] == "/dashboard/login"


def test_a_wrong_key_or_one_without_the_scope_is_refused(api, env):
    client = _client(api)
    wrong = _sign_in(client, "sm_0123456789abcdef_" + "x" * 43)
    assert wrong.status_code == 401 and "not valid" in wrong.text
    narrow = _sign_in(client, api.key("campaigns:read"))
    assert narrow.status_code == 403 and "analytics:read" in narrow.text
    assert "smartmail_dashboard=" not in " ".join(narrow.headers.get_list("set-cookie")).replace(
        "smartmail_dashboard_csrf=", ""
    )


def test_posts_without_their_csrf_token_are_refused(api, env):
    client = _client(api)
    assert _sign_in(client, api.key("analytics:read")).status_code == 303
    # Logout: the session cookie is there, its token is not (or is wrong).
    assert client.post("/dashboard/logout", data={}).status_code == 403
    assert client.post("/dashboard/logout", data={"csrf": "forged"}).status_code == 403
    # Login: a token in the form but no double-submit cookie.
    fresh = _client(api)
    token = _hidden_csrf(fresh.get("/dashboard/login").text)
    fresh.cookies.clear()
    refused = fresh.post("/dashboard/login", data={"csrf": token, "key": api.key("analytics:read")})
    assert refused.status_code == 403 and refused.headers["content-type"].startswith("text/html")
    # A cross-site Origin, even with both tokens right.
    other = _client(api)
    token = _hidden_csrf(other.get("/dashboard/login").text)
    crossed = other.post(
        "/dashboard/login", data={"csrf": token, "key": "x"}, headers={"Origin": "https://evil.example"}
    )
    assert crossed.status_code == 403
    # The session's own token signs it out.
    page = client.get("/dashboard/")
    out = client.post("/dashboard/logout", data={"csrf": _hidden_csrf(page.text)})
    assert out.status_code == 303 and out.headers["location"] == "/dashboard/login"
    assert client.get("/dashboard/").status_code == 303


def test_a_sending_campaign_shows_progress_and_reloads(api, campaign):
    with get_engine().begin() as connection:
        connection.execute(update(Campaign).where(Campaign.id == campaign).values(state="sending"))
    sent_message("late@example.org", state="queued", campaign_id=campaign)
    client = _client(api)
    _sign_in(client, api.key("analytics:read"))
    page = client.get(f"/dashboard/campaigns/{NAME}").text
    assert '<meta http-equiv="refresh" content="5">' in page
    progress = page.split('id="progress"', 1)[1].split("</table>", 1)[0]
    assert "<th>queued</th>" in progress and "<th>sent</th>" in progress and "<td>9</td>" in progress


def test_sites_page_shows_rolled_up_sites_and_a_suspended_one(api, campaign):
    throttle = get_throttle()
    throttle.client.set(f"{throttle.prefix}google:suspend", "421 4.7.0 try again later", px=600_000)
    client = _client(api)
    _sign_in(client, api.key("analytics:read"))
    page = client.get("/dashboard/sites").text
    sites = page.split('id="sites"', 1)[1].split("</table>", 1)[0]
    assert "<td>google</td>" in sites  # gmail.com's site in the shipped policy
    held = page.split('id="held"', 1)[1].split("</table>", 1)[0]
    assert "google" in held and "suspended" in held and "421 4.7.0" in held


# --- Headless Chromium ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through its chromedriver (selenium-manager downloads nothing: both paths are given)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"no {', '.join(missing)}: apt-get install chromium chromium-driver; pip install selenium"
        if os.environ.get("SMARTMAIL_TEST_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    """Width, height and pixels of an 8-bit RGB or RGBA PNG (as Chromium screenshots are), by the standard library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks, header = 8, [], b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    size = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(b"".join(chunks)), width * size
    rows: list[bytearray] = []
    previous = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):  # undo the row filter (PNG specification, section 9)
            left = line[i - size] if i >= size else 0
            up, corner = previous[i], previous[i - size] if i >= size else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        rows.append(line)
        previous = line
    pixels = [tuple(row[x * size : x * size + 3]) for row in rows for x in range(width)]
    return width, height, pixels


def test_the_campaign_page_in_chromium_draws_its_chart(api, campaign, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait

    def click(selector: str) -> None:
        """Click and wait for the next page (the old one's elements gone), so no check reads the old page."""
        html = browser.find_element(By.TAG_NAME, "html")
        browser.find_element(By.CSS_SELECTOR, selector).click()
        WebDriverWait(browser, 15).until(staleness_of(html))

    browser.delete_all_cookies()
    browser.get(f"{api.url}/dashboard/")
    assert browser.current_url.endswith("/dashboard/login")

    def sign_in(token: str) -> None:
        browser.find_element(By.ID, "key").send_keys(token)
        click("form[action='/dashboard/login'] button")

    sign_in("sm_0123456789abcdef_" + "x" * 43)
    assert "not valid" in browser.find_element(By.ID, "login-error").text
    sign_in(api.key("campaigns:read"))
    assert "analytics:read" in browser.find_element(By.ID, "login-error").text
    sign_in(api.key("analytics:read"))
    assert browser.current_url.endswith("/dashboard/")
    html = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(By.LINK_TEXT, NAME).click()
    WebDriverWait(browser, 15).until(staleness_of(html))
    assert browser.title.startswith(f"Campaign {NAME}")

    # The policy lets the stylesheet and the legend's swatches (style attributes allowed by hash) apply.
    assert (
        browser.find_element(By.TAG_NAME, "header").value_of_css_property("background-color") == "rgba(35, 57, 93, 1)"
    )
    swatch = browser.find_element(By.CSS_SELECTOR, "#trend .legend i")
    assert swatch.value_of_css_property("background-color") == "rgba(67, 99, 216, 1)"
    chart = browser.find_element(By.CSS_SELECTOR, "#trend svg")
    points = chart.find_elements(By.CSS_SELECTOR, "circle.point")
    sent = [int(p.get_attribute("data-value")) for p in points if p.get_attribute("data-metric") == "sent"]
    assert len(sent) >= 4 and sum(sent) == 8  # one point per hour; the campaign's 8 messages
    assert len(browser.find_elements(By.CSS_SELECTOR, "#funnel rect.bar")) == 5
    rows = browser.find_elements(By.CSS_SELECTOR, "#domains tr")
    assert len(rows) == 3  # a header and two domains

    png = chart.screenshot_as_png
    (tmp_path / "trend.png").write_bytes(png)
    width, height, pixels = png_pixels(png)
    assert width >= 300 and height >= 100
    colours = set(pixels)
    assert len(colours) > 10  # not a blank (one-colour) image
    near = lambda pixel, colour: all(abs(a - b) <= 12 for a, b in zip(pixel, colour))
    assert sum(1 for pixel in pixels if near(pixel, BLUE)) > 50  # the `sent` line is drawn

    click("form[action='/dashboard/logout'] button")
    assert browser.current_url.endswith("/dashboard/login")
