"""Downloading a provider's output: redirects, limits, kept-alive connections and proxies,
against a small HTTP/1.1 server on loopback."""

import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.services import image_fetch
from app.services.image_fetch import ImageFetcher, ImageFetchError

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


class _Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a CDN does

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append((self.path, self.client_address[1]))
        if self.path == "/image.png":
            self._reply(200, PNG)
        elif self.path == "/image-then-hang-up.png":
            self._reply(200, PNG)
            self.close_connection = True  # without saying so: the client finds out on its next GET
        elif self.path.startswith("/moved"):
            self._reply(302, b"", {"Location": "/image.png"})
        elif self.path == "/claims-a-gigabyte":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            self.wfile.write(PNG)  # and no more: a client that read on would wait
        elif self.path == "/loop":
            self._reply(302, b"", {"Location": "/loop"})
        elif self.path == "/chunked-and-long":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(4):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(PNG), PNG))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._reply(404, b"not here")

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _ForwardProxy(_Origin):
    """A plain HTTP proxy: takes absolute URLs and fetches them itself."""

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append((self.path, self.client_address[1]))
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(self.path) as upstream:
            self._reply(upstream.status, upstream.read())


@contextmanager
def _serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def origin(monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with _serving(_Origin) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}", server


def test_downloads_reuse_one_connection_and_follow_redirects(origin):
    base, server = origin
    fetcher = ImageFetcher()
    assert fetcher.fetch(f"{base}/image.png") == (PNG, "image/png")
    assert fetcher.fetch(f"{base}/moved?from=cdn") == (PNG, "image/png")
    assert [path for path, _ in server.requests] == ["/image.png", "/moved?from=cdn", "/image.png"]
    assert len({port for _, port in server.requests}) == 1  # one kept-alive connection
    fetcher.close()


def test_a_connection_the_server_closed_while_idle_is_replaced_once(origin):
    base, server = origin
    fetcher = ImageFetcher()
    fetcher.fetch(f"{base}/image-then-hang-up.png")
    assert fetcher.fetch(f"{base}/image.png") == (PNG, "image/png")
    assert len({port for _, port in server.requests}) == 2
    fetcher.close()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/missing.png", "Could not download the image: HTTP 404."),
        ("/loop", "Could not download the image: too many redirects."),
        ("/claims-a-gigabyte", "The provider's output is larger than 25 MB."),  # refused unread
        ("/chunked-and-long", "The provider's output is larger than 25 MB."),  # the limit is lowered below
    ],
)
def test_what_is_not_an_image_to_keep_fails_with_a_reason(origin, monkeypatch, path, message):
    base, _ = origin
    if path == "/chunked-and-long":
        monkeypatch.setattr(image_fetch, "MAX_IMAGE_BYTES", len(PNG) * 2)
    with pytest.raises(ImageFetchError) as failure:
        ImageFetcher(timeout_seconds=2).fetch(f"{base}{path}")
    assert str(failure.value) == message


def test_an_unreachable_host_fails_with_a_reason(origin):
    base, server = origin
    server.shutdown()
    server.server_close()
    with pytest.raises(ImageFetchError, match="^Could not download the image: "):
        ImageFetcher().fetch(f"{base}/image.png")


def test_downloads_go_through_the_http_proxy_of_the_environment(origin, monkeypatch):
    base, server = origin
    with _serving(_ForwardProxy) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        assert ImageFetcher().fetch(f"{base}/image.png") == (PNG, "image/png")
        assert [path for path, _ in proxy.requests] == [f"{base}/image.png"]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert ImageFetcher().fetch(f"{base}/image.png") == (PNG, "image/png")
        assert len(proxy.requests) == 1
    assert len(server.requests) == 2
