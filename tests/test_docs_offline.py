"""/docs and /redoc with no network: every asset comes from the service itself, under a CSP
that allows 'self' only, and Swagger UI signs in and runs a request in Chromium while every
request to another host is blocked."""

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest
from playwright.sync_api import Page, Request, Route, expect, sync_playwright

from tests.conftest import ALICE
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS, require_chromium

LOOPBACK_HOSTS = {"127.0.0.1", "localhost"}
DOCS_PAGES = ("/docs", "/redoc")


class _Assets(HTMLParser):
    """The URLs a page loads: scripts, stylesheets, icons, images."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        url = values.get("src") if tag in ("script", "img") else values.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)


def _assets(html: str) -> list[str]:
    parser = _Assets()
    parser.feed(html)
    return parser.urls


@pytest.mark.parametrize("path", DOCS_PAGES)
def test_docs_pages_load_every_asset_from_the_service(live_server, path):
    with live_server() as server, server.client() as client:
        page = client.get(path)
        assert page.status_code == 200
        urls = _assets(page.text)
        assert urls, "the page loads nothing"
        for url in urls:
            absolute = urljoin(f"{server.base_url}{path}", url)
            assert urlsplit(absolute).netloc == urlsplit(server.base_url).netloc, url
            asset = client.get(absolute)
            assert asset.status_code == 200, url
            assert len(asset.content) > 0, url
    csp = page.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    # Every source is the service itself, or a hash of the page's own inline code.
    for name, sources in directives.items():
        for source in sources.split():
            assert source in ("'self'", "'none'", "'unsafe-inline'", "data:", "blob:") or re.fullmatch(
                r"'sha256-[A-Za-z0-9+/=]+'", source
            ), f"{name} allows {source}"
    assert "'unsafe-inline'" not in directives["script-src"] and "'unsafe-eval'" not in csp
    # ReDoc's styled-components adds style elements from its script; Swagger UI needs none.
    assert ("'unsafe-inline'" in directives["style-src"]) == (path == "/redoc")
    assert directives["frame-ancestors"] == "'none'"
    assert page.headers["x-content-type-options"] == "nosniff"


class _OfflineBrowser:
    """A Chromium page on which every request to a host other than loopback is blocked and
    recorded, and every console error and page error is recorded."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.blocked: list[str] = []
        self.errors: list[str] = []
        page.set_default_timeout(WAIT_MS)
        page.route("**/*", self._route)
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def open(self, url: str) -> None:
        """Go to a docs page and wait until it shows the API's title."""
        self.page.goto(url)
        expect(self.page.get_by_role("heading", name=re.compile(r"^MyFlix backend"))).to_be_visible()

    def assert_offline_and_clean(self) -> None:
        assert self.blocked == [], "requests to other hosts"
        assert self.errors == [], "console or page errors"

    def _route(self, route: Route, request: Request) -> None:
        if urlsplit(request.url).hostname in LOOPBACK_HOSTS:
            route.continue_()
        else:
            self.blocked.append(request.url)
            route.abort("internetdisconnected")


@pytest.fixture
def offline_page():
    require_chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield _OfflineBrowser(browser.new_page(viewport={"width": 1280, "height": 1000}))
        finally:
            browser.close()


@pytest.mark.slow
def test_swagger_ui_offline_authorizes_and_tries_out_create_job(live_server, offline_page):
    page = offline_page.page
    with live_server() as server:
        offline_page.open(f"{server.base_url}/docs")

        # Authorize: the password flow asks for a username and a password, nothing else.
        page.locator(".auth-wrapper").get_by_role("button", name="Authorize").click()
        dialog = page.locator(".modal-ux")  # Swagger UI gives it no dialog role
        expect(dialog.get_by_label("username:")).to_be_visible()
        expect(dialog.get_by_label("password:")).to_be_visible()
        assert dialog.locator("input:visible, select:visible").count() == 2
        for hidden in ("client_id:", "client_secret:", "Client credentials location:"):
            expect(dialog.get_by_text(hidden, exact=True)).to_be_hidden()
        dialog.get_by_label("username:").fill(ALICE[0])
        dialog.get_by_label("password:").fill(ALICE[1])
        dialog.get_by_role("button", name="Apply given OAuth2 credentials").click()
        expect(dialog.get_by_text("Logout", exact=True)).to_be_visible()
        dialog.get_by_role("button", name="Close").click()
        expect(dialog).to_be_hidden()

        # Try it out on POST /api/generate/ with its example body, as the signed-in user.
        operation = page.locator("#operations-generation-createJob")
        operation.get_by_role("button", name=re.compile(r"^POST")).click()
        operation.get_by_role("button", name="Try it out").click()
        operation.get_by_role("button", name="Execute").click()
        response = operation.locator(".live-responses-table .response")
        expect(response.locator(".response-col_status")).to_have_text("202")
        body = response.locator(".response-col_description pre").first
        expect(body).to_contain_text('"job_id": "job_')
        job_id = re.search(r'"job_id": "(job_[^"]+)"', body.inner_text())[1]

        with server.client() as client:
            token = client.post("/api/auth/login", json={"email": ALICE[0], "password": ALICE[1]}).json()
            jobs = client.get("/api/generate/", headers={"Authorization": f"Bearer {token['access_token']}"})
        assert [job["job_id"] for job in jobs.json()["jobs"]] == [job_id]

    offline_page.assert_offline_and_clean()


@pytest.mark.slow
def test_redoc_offline_renders(live_server, offline_page):
    page = offline_page.page
    with live_server() as server:
        offline_page.open(f"{server.base_url}/redoc")
        # The operations and the stream's event schemas are there.
        expect(page.get_by_role("heading", name=re.compile(r"operation\/createJob Create Job$"))).to_be_attached()
        expect(page.get_by_role("heading", name=re.compile(r"operation\/streamJob Stream Job$"))).to_be_attached()
        expect(page.get_by_text("ProgressEvent").first).to_be_attached()
        # ReDoc's search box works (it runs in a worker).
        page.get_by_placeholder("Search...").fill("stream")
        expect(page.locator("[data-role='search:results']").first).to_be_visible()

    offline_page.assert_offline_and_clean()
