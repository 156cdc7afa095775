"""Downloading a provider's output with httpx: redirects, limits, timeouts, TLS and proxies,
against a small HTTP/1.1 server on loopback; and data: URLs."""

import base64
import datetime
import select
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.providers import downloads
from app.providers.downloads import ImageFetcher, ImageFetchError, require_image

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
# The test servers' hosts, on any port (tests/test_provider_edges.py is about which hosts).
LOOPBACK = (("127.0.0.1", None), ("localhost", None))


class Origin(BaseHTTPRequestHandler):
    """A file server with a path for each way a download can go (tests/test_provider_edges.py
    adds its own)."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a CDN does

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.client_address[1]))
        self.server.headers.append(self.headers)
        if self.path in ("/image.png", "/a%20b/%C3%A9t%C3%A9.png?x=%C3%A9"):
            self._reply(200, PNG)
        elif self.path == "/image-then-hang-up.png":
            self._reply(200, PNG)
            # Without saying so, as a server whose idle timeout ran out does.
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            self.server.hung_up.set()
        elif self.path == "/not-an-image":
            self._reply(200, b"<html>an error page</html>")
        elif self.path == "/headers-then-silence":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.flush()
            time.sleep(2)
        elif self.path.startswith("/moved?"):
            self._reply(302, b"", {"Location": "/image.png"})
        elif self.path == "/moved-to-a-name-with-spaces":
            self._reply(302, b"", {"Location": "/a b/%C3%A9t%C3%A9.png?x=é".encode().decode("latin-1")})
        elif self.path == "/moved-with-a-long-body":
            self._reply(301, b"moved " * 20_000, {"Location": "/image.png"})
        elif self.path == "/cut-short":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(PNG)
            self.close_connection = True
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


class _ForwardProxy(Origin):
    """A plain HTTP proxy: takes absolute URLs and fetches them itself, and tunnels CONNECTs."""

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.client_address[1]))
        self.server.headers.append(self.headers)
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(self.path) as upstream:
            self._reply(upstream.status, upstream.read())

    def do_CONNECT(self) -> None:
        self.server.requests.append((f"CONNECT {self.path}", self.client_address[1]))
        self.server.headers.append(self.headers)
        host, port = self.path.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as upstream:
            self.send_response(200)
            self.end_headers()
            self.wfile.flush()
            sockets = [self.connection, upstream]
            while True:
                readable, _, _ = select.select(sockets, [], [], 5)
                if not readable:
                    break
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        self.close_connection = True
                        return
                    (upstream if source is self.connection else self.connection).sendall(data)


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    server.requests, server.headers = [], []
    server.hung_up = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def origin(monkeypatch):
    for scheme in ("HTTP", "HTTPS", "ALL", "NO"):
        monkeypatch.delenv(f"{scheme}_PROXY", raising=False)
        monkeypatch.delenv(f"{scheme.lower()}_proxy", raising=False)
    with serving(Origin) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}", server


def test_downloads_follow_redirects_on_the_threads_kept_alive_connection(origin):
    base, server = origin
    fetcher = ImageFetcher(LOOPBACK)
    assert fetcher.fetch(f"{base}/image.png") == (PNG, "image/png")
    assert fetcher.fetch(f"{base}/moved?from=cdn") == (PNG, "image/png")
    assert [path for path, _ in server.requests] == ["/image.png", "/moved?from=cdn", "/image.png"]
    assert len({port for _, port in server.requests}) == 1  # the thread's client is kept
    fetcher.close()


def test_a_connection_the_server_closed_while_idle_is_replaced(origin):
    base, server = origin
    fetcher = ImageFetcher(LOOPBACK)
    fetcher.fetch(f"{base}/image-then-hang-up.png")
    assert server.hung_up.wait(5)
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
        ("/not-an-image", "The provider's output is not a PNG, JPEG or WebP image."),
    ],
)
def test_what_is_not_an_image_to_keep_fails_with_a_reason(origin, monkeypatch, path, message):
    base, _ = origin
    if path == "/chunked-and-long":
        monkeypatch.setattr(downloads, "MAX_IMAGE_BYTES", len(PNG) * 2)
    with pytest.raises(ImageFetchError) as failure:
        ImageFetcher(LOOPBACK, timeout=2.0).fetch(f"{base}{path}")
    assert str(failure.value) == message


def test_a_download_cut_short_fails_and_the_next_one_succeeds(origin):
    base, _ = origin
    fetcher = ImageFetcher(LOOPBACK)
    with pytest.raises(ImageFetchError, match=r"^Could not download the image: .*\(received 72 bytes, expected 1000\)"):
        fetcher.fetch(f"{base}/cut-short")
    assert fetcher.fetch(f"{base}/image.png") == (PNG, "image/png")


def test_a_server_that_stops_sending_times_out(origin):
    base, _ = origin
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match=r"^Could not download the image: it timed out\.$"):
        ImageFetcher(LOOPBACK, timeout=0.3).fetch(f"{base}/headers-then-silence")
    assert time.monotonic() - started < 1.5


def test_an_unreachable_host_fails_with_a_reason(origin):
    base, server = origin
    server.shutdown()
    server.server_close()
    with pytest.raises(ImageFetchError, match=r"^Could not download the image: .*Connection refused"):
        ImageFetcher(LOOPBACK).fetch(f"{base}/image.png")


def test_a_url_that_is_not_http_fails_with_a_reason():
    with pytest.raises(ImageFetchError, match=r"^Could not download the image: its URL is not an http"):
        ImageFetcher(LOOPBACK).fetch("ftp://files.example/image.png")


def test_a_redirect_with_a_long_body_is_followed(origin):
    base, _ = origin
    assert ImageFetcher(LOOPBACK).fetch(f"{base}/moved-with-a-long-body") == (PNG, "image/png")


def test_a_redirect_to_a_name_with_spaces_and_accents_is_followed_encoded(origin):
    base, server = origin
    assert ImageFetcher(LOOPBACK).fetch(f"{base}/moved-to-a-name-with-spaces") == (PNG, "image/png")
    assert server.requests[-1][0] == "/a%20b/%C3%A9t%C3%A9.png?x=%C3%A9"


def test_data_urls_are_decoded_and_checked():
    encoded = base64.b64encode(PNG).decode()
    assert ImageFetcher(LOOPBACK).fetch(f"data:image/png;base64,{encoded}") == (PNG, "image/png")
    with pytest.raises(ImageFetchError, match="malformed data URL"):
        ImageFetcher(LOOPBACK).fetch(f"data:image/png;base64,{encoded[:-3]}")
    with pytest.raises(ImageFetchError, match="not a PNG, JPEG or WebP"):
        ImageFetcher(LOOPBACK).fetch("data:text/plain,hello")


def test_require_image_knows_png_jpeg_and_webp():
    assert require_image(PNG) == "image/png"
    assert require_image(b"\xff\xd8\xff\xe0" + b"\x00" * 16) == "image/jpeg"
    assert require_image(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    with pytest.raises(ImageFetchError):
        require_image(b"GIF89a")


def test_downloads_go_through_the_http_proxy_of_the_environment(origin, monkeypatch):
    base, server = origin
    with serving(_ForwardProxy) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        assert ImageFetcher(LOOPBACK).fetch(f"{base}/image.png") == (PNG, "image/png")
        assert [path for path, _ in proxy.requests] == [f"{base}/image.png"]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert ImageFetcher(LOOPBACK).fetch(f"{base}/image.png") == (PNG, "image/png")
        assert len(proxy.requests) == 1
    assert len(server.requests) == 2


def test_the_proxy_may_lack_a_scheme_and_carry_credentials(origin, monkeypatch):
    base, _ = origin
    with serving(_ForwardProxy) as proxy:
        monkeypatch.setenv("ALL_PROXY", f"user:p%40ss@127.0.0.1:{proxy.server_address[1]}")
        assert ImageFetcher(LOOPBACK).fetch(f"{base}/image.png") == (PNG, "image/png")
        assert proxy.headers[0]["Proxy-Authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()


@pytest.fixture
def tls_origin(origin, monkeypatch, tmp_path):
    """The origin's handler over TLS, with a certificate from a throwaway CA the fetcher trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "myflix test CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(pem)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    client_context = ssl.create_default_context(cadata=pem.decode())
    monkeypatch.setattr(downloads, "shared_ssl_context", lambda: client_context)
    with serving(Origin, tls=server_context) as server:
        yield f"https://localhost:{server.server_address[1]}", server


def test_https_downloads_check_the_certificate_and_reuse_the_connection(tls_origin, monkeypatch):
    base, server = tls_origin
    fetcher = ImageFetcher(LOOPBACK)
    assert fetcher.fetch(f"{base}/image.png") == (PNG, "image/png")
    assert fetcher.fetch(f"{base}/image.png") == (PNG, "image/png")
    assert len({port for _, port in server.requests}) == 1
    fetcher.close()
    monkeypatch.setattr(downloads, "shared_ssl_context", ssl.create_default_context)  # the CA unknown
    with pytest.raises(ImageFetchError, match="CERTIFICATE_VERIFY_FAILED"):
        ImageFetcher(LOOPBACK).fetch(f"{base}/image.png")


def test_https_downloads_tunnel_through_the_proxy_with_its_credentials(tls_origin, monkeypatch):
    base, server = tls_origin
    with serving(_ForwardProxy) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://user:secret@127.0.0.1:{proxy.server_address[1]}")
        assert ImageFetcher(LOOPBACK).fetch(f"{base}/image.png") == (PNG, "image/png")
        assert proxy.requests[0][0] == f"CONNECT {base.removeprefix('https://')}"
        assert proxy.headers[0]["Proxy-Authorization"] == "Basic " + base64.b64encode(b"user:secret").decode()
    assert [path for path, _ in server.requests] == ["/image.png"]
