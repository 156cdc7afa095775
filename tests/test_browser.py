"""The demo page at `/` in a real browser: Playwright for Python driving Debian's Chromium.

Everything on the page is found the way a user (or a screen reader) finds it: by label and
role, never by CSS class. Synchronisation is Playwright's auto-waiting `expect`, no sleeps.
"""

import math
import os
import re
import shutil
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import ConsoleMessage, Locator, Page, Request, Route, expect, sync_playwright

from tests.conftest import ALICE, login

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOT_COPY = Path("/tmp/myflix-demo.png")
WAIT_MS = 10_000
pytestmark = pytest.mark.slow

# One worker and 300 ms per image: the first job (4 images) takes ~1.2 s, the second
# (8 images) ~2.4 s, so it is still running when Cancel is clicked after its first image.
SERVER_SETTINGS = dict(LOCAL_LATENCY_MS=300, LOCAL_LATENCY_JITTER_MS=0, GENERATION_MAX_WORKERS=1)


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = "Chromium is not installed: apt-get install chromium"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def js_rounded(value: float) -> int:
    """Math.round, as the page rounds (Python's round() rounds halves to even)."""
    return math.floor(value + 0.5)


def js_seconds(ms: float) -> str:
    """(ms / 1000).toFixed(1), as the page formats seconds (ties go up, unlike format())."""
    return str(Decimal(ms / 1000).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def sign_in(page: Page, email: str, password: str) -> None:
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_label("Prompt")).to_be_visible()


def generate(page: Page, prompt: str, count: int) -> None:
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Number of images").fill(str(count))
    page.get_by_role("button", name="Generate", exact=True).click()


def tile_statuses(tiles: Locator) -> list[str]:
    return [text.lower() for text in tiles.all_inner_texts()]


def test_demo_page_generates_cancels_and_lists_history(live_server, tmp_path):
    require_chromium()
    first_prompt = "A lighthouse at dusk, watercolor"
    second_prompt = "A city of glass under the sea"

    with live_server(**SERVER_SETTINGS) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(WAIT_MS)
        js_errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and js_errors.append(message.text))
        page.on("pageerror", lambda error: js_errors.append(str(error)))
        api = server.client()
        token = login(api, ALICE)
        api.headers["Authorization"] = f"Bearer {token}"

        page.goto(server.base_url + "/")
        expect(page.get_by_text("alice@myflix.dev / alice-wonderland")).to_be_visible()  # the hint
        sign_in(page, *ALICE)
        expect(page.get_by_role("button", name="Sign out")).to_be_visible()

        # First job: four images fill the grid; TTFI and batch time are the job's own.
        generate(page, first_prompt, 4)
        current = page.get_by_role("region", name="Current job")
        tiles = current.get_by_role("list", name="Images of the current job").get_by_role("listitem")
        expect(tiles).to_have_count(4)
        status = page.get_by_role("status")
        expect(status).to_have_text(re.compile(r"^Job succeeded: 4 of 4 images in \d+\.\d s$"), timeout=WAIT_MS)
        for i in range(1, 5):
            image = current.get_by_role("img", name=f"Image {i} of 4: {first_prompt}", exact=True)
            expect(image).to_have_js_property("complete", True)
            assert image.evaluate("img => img.naturalWidth") > 0, f"image {i} did not load"
        assert tile_statuses(tiles) == [f"image {i} of 4\nsucceeded" for i in range(1, 5)]

        first = api.get("/api/generate/", params={"limit": 1}).json()["jobs"][0]
        assert first["prompt"] == first_prompt and first["status"] == "succeeded"
        expect(current).to_contain_text(first["job_id"])
        snapshot = api.get(f"/api/generate/{first['job_id']}").json()
        ttfi = current.get_by_text(re.compile(r"^TTFI \d+ ms$"))
        expect(ttfi).to_have_text(f"TTFI {js_rounded(snapshot['ttfi_ms'])} ms")
        expect(current.get_by_text(re.compile(r"^Batch "))).to_have_text(f"Batch {js_seconds(snapshot['total_ms'])} s")

        # Second job: cancel it while it runs; its unfinished tiles end as canceled.
        generate(page, second_prompt, 8)
        expect(tiles).to_have_count(8)
        expect(current).to_contain_text(second_prompt)
        # Cancel once its first image is in: ~2 s of the job are still to go. (wait_for reacts
        # at once; expect() polls with backoff, which could eat much of that time.)
        first_image = current.get_by_role("img", name=f"Image 1 of 8: {second_prompt}", exact=True)
        first_image.wait_for()
        page.get_by_role("button", name="Cancel", exact=True).click()
        expect(status).to_have_text(re.compile(r"^Job canceled: \d of 8 images"), timeout=WAIT_MS)
        expect(current.get_by_text(re.compile(r"^TTFI \d+ ms$"))).to_be_visible()

        second = api.get("/api/generate/", params={"limit": 1}).json()["jobs"][0]
        assert second["prompt"] == second_prompt
        snapshot = api.get(f"/api/generate/{second['job_id']}").json()
        assert snapshot["status"] == "canceled"
        expected = [image["status"] for image in snapshot["images"]]
        assert expected[0] == "succeeded" and expected[-1] == "canceled"
        assert set(expected) <= {"succeeded", "canceled"}
        assert tile_statuses(tiles) == [f"image {i + 1} of 8\n{s}" for i, s in enumerate(expected)]
        expect(first_image).to_have_js_property("complete", True)
        assert first_image.evaluate("img => img.naturalWidth") > 0

        # History: both jobs, newest first, with their status, metrics and thumbnails.
        history = page.get_by_role("list", name="Past jobs").get_by_role("listitem")
        expect(history).to_have_count(2)
        expect(history.nth(0)).to_contain_text(second_prompt)
        expect(history.nth(0)).to_contain_text("canceled")
        expect(history.nth(1)).to_contain_text(first_prompt)
        expect(history.nth(1)).to_contain_text("succeeded")
        expect(history.nth(1)).to_contain_text(f"TTFI {js_rounded(first['ttfi_ms'])} ms")
        thumbnails = history.nth(1).get_by_role("img")
        expect(thumbnails).to_have_count(4)
        for i in range(4):
            expect(thumbnails.nth(i)).to_have_js_property("complete", True)
            assert thumbnails.nth(i).evaluate("img => img.naturalWidth") > 0

        screenshot = tmp_path / "demo.png"
        page.screenshot(path=str(screenshot), full_page=True)
        shutil.copyfile(screenshot, SCREENSHOT_COPY)
        assert js_errors == []
        browser.close()


def test_demo_page_deletes_a_running_job_and_shows_why_a_delete_failed(live_server):
    require_chromium()
    kept_prompt = "A paper boat on a pond"
    running_prompt = "A forest that is about to vanish"

    with live_server(**SERVER_SETTINGS) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(WAIT_MS)
        deleted: list[str] = []
        js_errors: list[str] = []

        def on_console(message: ConsoleMessage) -> None:
            # A request for a deleted job (its DELETE answered 404, or its stream reconnecting
            # while it was deleted) is logged by Chromium as a failed resource: that is expected.
            url = message.location.get("url", "")
            if message.type != "error" or ("status of 404" in message.text and any(job in url for job in deleted)):
                return
            js_errors.append(f"{message.text} ({url})")

        page.on("console", on_console)
        page.on("pageerror", lambda error: js_errors.append(str(error)))
        api = server.client()
        api.headers["Authorization"] = f"Bearer {login(api, ALICE)}"

        page.goto(server.base_url + "/")
        sign_in(page, *ALICE)
        history = page.get_by_role("list", name="Past jobs").get_by_role("listitem")
        current = page.get_by_role("region", name="Current job")
        generate(page, kept_prompt, 1)
        expect(page.get_by_role("status")).to_have_text(re.compile(r"^Job succeeded: 1 of 1 images"))
        kept = api.get("/api/generate/", params={"limit": 1}).json()["jobs"][0]

        # Delete the current job while it runs: it is canceled and removed, page and service.
        generate(page, running_prompt, 8)
        expect(history).to_have_count(2)
        current.get_by_role("img", name=f"Image 1 of 8: {running_prompt}", exact=True).wait_for()
        running = api.get("/api/generate/", params={"limit": 1}).json()["jobs"][0]
        assert running["prompt"] == running_prompt and running["status"] == "running"
        deleted.append(running["job_id"])
        history.nth(0).get_by_role("button", name=f"Delete job: {running_prompt}", exact=True).click()
        expect(history).to_have_count(1)
        expect(history.nth(0)).to_contain_text(kept_prompt)
        expect(current).to_be_hidden()
        expect(page.get_by_role("button", name="Generate", exact=True)).to_be_enabled()
        keep_button = history.nth(0).get_by_role("button", name=f"Delete job: {kept_prompt}", exact=True)
        expect(keep_button).to_be_focused()
        assert api.get(f"/api/generate/{running['job_id']}").status_code == 404
        assert [job["job_id"] for job in api.get("/api/generate/").json()["jobs"]] == [kept["job_id"]]
        expect(page.get_by_role("alert")).to_have_count(0)  # no error shown (an empty alert is hidden)

        # Deleted behind the page's back: the click shows the service's detail, and the job,
        # which is not there any more, leaves the page.
        deleted.append(kept["job_id"])
        assert api.delete(f"/api/generate/{kept['job_id']}").status_code == 204
        keep_button.click()
        expect(page.get_by_role("alert")).to_have_text("Job not found")
        expect(history).to_have_count(0)
        expect(page.get_by_text("No jobs yet.")).to_be_visible()
        page.reload()
        expect(page.get_by_text("No jobs yet.")).to_be_visible()
        expect(history).to_have_count(0)
        assert js_errors == []
        browser.close()


# Accounts and sessions --------------------------------------------------------------------

NEW_USER = ("frank@example.org", "frank-password-1", "Frank Example")
# The daily quota of images per user (app/core/config.py).
QUOTA_SETTING = "DAILY_IMAGE_QUOTA"


RENEWED = r"status of 401 \(Unauthorized\)"  # Chromium's line for a 401, which the page renews the session for


def open_page(p, js_errors: list[str], expected: tuple[str, ...] = (RENEWED,)) -> tuple:
    """A new page whose console errors and uncaught exceptions land in `js_errors`, but for
    the lines (`text (url)`) that match one of the `expected` patterns: Chromium's own about a
    request that failed as the test meant it to."""
    browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(WAIT_MS)

    def on_console(message: ConsoleMessage) -> None:
        line = f"{message.text} ({message.location.get('url', '')})"
        if message.type == "error" and not any(re.search(pattern, line) for pattern in expected):
            js_errors.append(line)

    page.on("console", on_console)
    page.on("pageerror", lambda error: js_errors.append(str(error)))
    return browser, page


def stored(page: Page, key: str) -> str | None:
    return page.evaluate("key => sessionStorage.getItem(key)", key)


def usage_line(usage: dict) -> re.Pattern:
    """The page's words for GET /api/usage's answer (the reset time is the browser's local one)."""
    if usage["quota"] is None:
        return re.compile(rf"^Unlimited images today \({usage['images_today']} made so far\)$")
    left = usage["remaining"]
    return re.compile(
        rf"^{left} image{'' if left == 1 else 's'} left today "
        rf"\({usage['images_today']} of {usage['quota']} used; resets at \d\d:\d\d.*\)$"
    )


def test_demo_page_signs_up_counts_the_days_images_renews_its_token_and_signs_out(live_server):
    require_chromium()
    email, password, full_name = NEW_USER
    with live_server(SIGNUP_ENABLED=True, **{QUOTA_SETTING: 3}, **SERVER_SETTINGS) as server, sync_playwright() as p:
        js_errors: list[str] = []
        refusals = (RENEWED, r"status of 422 .*/api/auth/register\)$", r"status of 429 .*/api/generate/\)$")
        browser, page = open_page(p, js_errors, refusals)
        api = server.client()
        page.goto(server.base_url + "/")

        # Sign-up is offered; the same form then asks for the full name too.
        page.get_by_role("button", name="Create an account").click()
        expect(page.get_by_role("heading", name="Create an account")).to_be_visible()
        expect(page.get_by_text("alice@myflix.dev / alice-wonderland")).to_be_hidden()
        page.get_by_label("Email").fill(email)
        page.get_by_label("Full name").fill(full_name)
        page.get_by_label("Password").fill("short")
        page.get_by_role("button", name="Create account", exact=True).click()
        expect(page.get_by_role("alert")).to_contain_text("Password")  # the service's 422, in words
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Create account", exact=True).click()
        expect(page.get_by_label("Prompt")).to_be_visible()
        expect(page.get_by_text(email, exact=True)).to_be_visible()
        expect(page.get_by_role("alert")).to_have_count(0)
        signed_in = api.post("/api/auth/login", json={"email": email, "password": password})
        assert signed_in.status_code == 200, signed_in.text
        api.headers["Authorization"] = f"Bearer {signed_in.json()['access_token']}"
        assert api.get("/api/auth/me").json()["full_name"] == full_name

        # The day's count: after sign-in, after a job, and the service's words when one is over it.
        usage = page.get_by_text(re.compile(r"left today|Unlimited images today"))
        expect(usage).to_have_text(usage_line(api.get("/api/usage").json()))
        expect(usage).to_have_text(re.compile(r"^3 images left today \(0 of 3 used"))
        generate(page, "A kite over the dunes", 2)
        expect(page.get_by_role("status")).to_have_text(re.compile(r"^Job succeeded: 2 of 2 images"))
        expect(usage).to_have_text(re.compile(r"^1 image left today \(2 of 3 used"))
        expect(usage).to_have_text(usage_line(api.get("/api/usage").json()))
        generate(page, "Two more kites", 2)
        refusal = api.post("/api/generate/", json={"prompt": "Two more kites", "num_images": 2})
        assert refusal.status_code == 429 and refusal.headers["retry-after"]
        expect(page.get_by_role("alert")).to_have_text(refusal.json()["detail"])
        expect(page.get_by_role("button", name="Generate", exact=True)).to_be_enabled()
        history = page.get_by_role("list", name="Past jobs").get_by_role("listitem")
        expect(history).to_have_count(1)

        # A refused access token (here: garbage) is renewed with the refresh token, once.
        first_refresh = stored(page, "myflix.refresh")
        page.evaluate("sessionStorage.setItem('myflix.token', 'garbage')")
        with page.expect_response("**/api/auth/refresh") as renewal:
            page.reload()
        assert renewal.value.status == 200
        expect(page.get_by_label("Prompt")).to_be_visible()
        expect(history).to_have_count(1)
        assert stored(page, "myflix.token") not in (None, "garbage")
        second_refresh = stored(page, "myflix.refresh")
        assert second_refresh not in (None, first_refresh), "the refresh token rotates"

        # Sign out ends the session at the service: its refresh token is refused at once.
        with page.expect_response("**/api/auth/logout") as logout:
            page.get_by_role("button", name="Sign out").click()
        assert logout.value.status == 204
        expect(page.get_by_role("button", name="Sign in", exact=True)).to_be_visible()
        expect(page.get_by_label("Prompt")).to_be_hidden()
        expect(page.get_by_role("alert")).to_have_count(0)
        assert stored(page, "myflix.token") is None and stored(page, "myflix.refresh") is None
        assert api.post("/api/auth/refresh", json={"refresh_token": second_refresh}).status_code == 401
        page.reload()
        expect(page.get_by_role("button", name="Sign in", exact=True)).to_be_visible()
        assert js_errors == []
        browser.close()


def test_demo_page_forgets_the_session_when_sign_out_fails_and_when_renewal_is_refused(live_server):
    require_chromium()
    with live_server(**SERVER_SETTINGS) as server, sync_playwright() as p:
        js_errors: list[str] = []
        browser, page = open_page(p, js_errors, (RENEWED, r"net::ERR_FAILED \(.*/api/auth/logout\)$"))
        api = server.client()
        with page.expect_response("**/api/auth/settings") as settings:
            page.goto(server.base_url + "/")
        assert settings.value.json() == {"signup_enabled": False}
        expect(page.get_by_role("button", name="Create an account")).to_be_hidden()
        sign_in(page, *ALICE)
        alices = {"Authorization": f"Bearer {stored(page, 'myflix.token')}"}
        usage = page.get_by_text(re.compile(r"left today|Unlimited images today"))
        expect(usage).to_have_text(usage_line(api.get("/api/usage", headers=alices).json()))

        # The service cannot be reached to end the session: it is forgotten here all the same.
        refresh_token = stored(page, "myflix.refresh")
        page.route("**/api/auth/logout", lambda route: route.abort())
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("button", name="Sign in", exact=True)).to_be_visible()
        assert stored(page, "myflix.token") is None and stored(page, "myflix.refresh") is None
        page.unroute("**/api/auth/logout")
        assert api.post("/api/auth/refresh", json={"refresh_token": refresh_token}).status_code == 200

        # Ended elsewhere: the renewal is refused, and the page asks to sign in again.
        sign_in(page, *ALICE)
        ended = api.post("/api/auth/logout", headers={"Authorization": f"Bearer {stored(page, 'myflix.token')}"})
        assert ended.status_code == 204
        page.evaluate("sessionStorage.setItem('myflix.token', 'garbage')")
        with page.expect_response("**/api/auth/refresh") as renewal:
            page.reload()
        assert renewal.value.status == 401
        expect(page.get_by_role("alert")).to_have_text("Your session expired, sign in again")
        expect(page.get_by_role("button", name="Sign in", exact=True)).to_be_visible()
        expect(page.get_by_label("Prompt")).to_be_hidden()
        assert stored(page, "myflix.token") is None and stored(page, "myflix.refresh") is None
        assert js_errors == []
        browser.close()


def test_demo_page_renews_the_token_of_a_refused_stream_and_resumes_it(live_server):
    require_chromium()
    prompt = "A train through the snow"
    slow = dict(LOCAL_LATENCY_MS=600, LOCAL_LATENCY_JITTER_MS=0, GENERATION_MAX_WORKERS=1)
    with live_server(**slow) as server, sync_playwright() as p:
        js_errors: list[str] = []
        browser, page = open_page(p, js_errors)
        page.goto(server.base_url + "/")
        sign_in(page, *ALICE)
        first_token = stored(page, "myflix.token")

        # The job's first stream, and the snapshot asked for then, are refused as an expired
        # token is: the page renews the session and opens the stream again, with the new token.
        refused: list[str] = []
        streams: list[str] = []

        def refuse_once(route: Route, request: Request) -> None:
            kind = "stream" if urlsplit(request.url).path.endswith("/stream") else "snapshot"
            if kind == "stream":
                streams.append(request.url)
            if kind not in refused and request.method == "GET":
                refused.append(kind)
                route.fulfill(status=401, json={"detail": "Could not validate credentials"})
            else:
                route.continue_()

        page.route(re.compile(r"/api/generate/job_\w+(/stream\?.*)?$"), refuse_once)
        with page.expect_response("**/api/auth/refresh") as renewal:
            generate(page, prompt, 3)
        assert renewal.value.status == 200
        expect(page.get_by_role("status")).to_have_text(re.compile(r"^Job succeeded: 3 of 3 images"))
        assert refused == ["stream", "snapshot"]
        new_token = stored(page, "myflix.token")
        assert new_token not in (None, first_token)
        assert len(streams) == 2
        assert f"access_token={first_token}" in streams[0] and f"access_token={new_token}" in streams[1]
        # Each image once, all in: the fresh stream replayed the job, and nothing was applied twice.
        current = page.get_by_role("region", name="Current job")
        tiles = current.get_by_role("list", name="Images of the current job").get_by_role("listitem")
        assert tile_statuses(tiles) == [f"image {i} of 3\nsucceeded" for i in range(1, 4)]
        for i in range(1, 4):
            image = current.get_by_role("img", name=f"Image {i} of 3: {prompt}", exact=True)
            expect(image).to_have_js_property("complete", True)
        assert js_errors == []
        browser.close()
