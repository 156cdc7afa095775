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

import pytest
from playwright.sync_api import ConsoleMessage, Locator, Page, expect, sync_playwright

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
