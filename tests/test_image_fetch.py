"""Downloading a provider's output: redirects, limits, kept-alive connections and proxies,
against a small HTTP/1.1 server on loopback."""

import base64
import datetime
import select
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.services import image_fetch
from app.services.image_fetch import ImageFetcher, ImageFetchError

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


class _Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a CDN does

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append((self.path, self.client_address[1]))
        self.server.headers.append(self.headers)
        if self.path in ("/image.png", "/a%20b/%C3%A9t%C3%A9.png?x=%C3%A9"):
            self._reply(200, PNG)
        elif self.path == "/image-then-hang-up.png":
            self._reply(200, PNG)
            self.close_connection = True  # without saying so: the client finds out on its next GET
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


class _ForwardProxy(_Origin):
    """A plain HTTP proxy: takes absolute URLs and fetches them itself, and tunnels CONNECTs."""

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append((self.path, self.client_address[1]))
        self.server.headers.append(self.headers)
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(self.path) as upstream:
            self._reply(upstream.status, upstream.read())

    def do_CONNECT(self) -> None:  # noqa: N802
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
def _serving(
    handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None
) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    server.requests, server.headers = [], []
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


def test_a_download_cut_short_fails_and_the_next_one_gets_a_fresh_connection(origin):
    base, server = origin
    fetcher = ImageFetcher()
    with pytest.raises(ImageFetchError, match="^Could not download the image: "):
        fetcher.fetch(f"{base}/cut-short")
    assert fetcher.fetch(f"{base}/image.png") == (PNG, "image/png")
    assert len({port for _, port in server.requests}) == 2


def test_a_redirect_whose_body_is_left_unread_is_followed_on_a_new_connection(origin):
    base, server = origin
    assert ImageFetcher().fetch(f"{base}/moved-with-a-long-body") == (PNG, "image/png")
    assert len({port for _, port in server.requests}) == 2


def test_a_redirect_to_a_name_with_spaces_and_accents_is_followed_encoded(origin):
    base, server = origin
    assert ImageFetcher().fetch(f"{base}/moved-to-a-name-with-spaces") == (PNG, "image/png")
    assert server.requests[-1][0] == "/a%20b/%C3%A9t%C3%A9.png?x=%C3%A9"


def test_a_connection_idle_too_long_is_replaced(origin, monkeypatch):
    base, server = origin
    monkeypatch.setattr(image_fetch, "IDLE_SECONDS", 0.0)
    fetcher = ImageFetcher()
    fetcher.fetch(f"{base}/image.png")
    fetcher.fetch(f"{base}/image.png")
    assert len({port for _, port in server.requests}) == 2


def test_the_proxy_may_lack_a_scheme_and_carry_credentials(origin, monkeypatch):
    base, _ = origin
    with _serving(_ForwardProxy) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"user:p%40ss@127.0.0.1:{proxy.server_address[1]}")
        assert ImageFetcher().fetch(f"{base}/image.png") == (PNG, "image/png")
        assert proxy.headers[0]["Proxy-Authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()


@pytest.fixture
def tls_origin(origin, monkeypatch, tmp_path):
    """The origin's handler over TLS, with a certificate from a throwaway CA the fetcher trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "myflix test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    cert_path.write_bytes(pem)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    client_context = ssl.create_default_context(cadata=pem.decode())
    monkeypatch.setattr(image_fetch, "shared_ssl_context", lambda: client_context)
    with _serving(_Origin, tls=server_context) as server:
        yield f"https://localhost:{server.server_address[1]}", server


def test_https_downloads_check_the_certificate_and_reuse_the_connection(tls_origin, monkeypatch):
    base, server = tls_origin
    fetcher = ImageFetcher()
    assert fetcher.fetch(f"{base}/image.png") == (PNG, "image/png")
    assert fetcher.fetch(f"{base}/image.png") == (PNG, "image/png")
    assert len({port for _, port in server.requests}) == 1
    monkeypatch.setattr(image_fetch, "shared_ssl_context", ssl.create_default_context)  # the CA unknown
    with pytest.raises(ImageFetchError, match="CERTIFICATE_VERIFY_FAILED"):
        ImageFetcher().fetch(f"{base}/image.png")


def test_https_downloads_tunnel_through_the_proxy_with_its_credentials(tls_origin, monkeypatch):
    base, server = tls_origin
    with _serving(_ForwardProxy) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://user:secret@127.0.0.1:{proxy.server_address[1]}")
        assert ImageFetcher().fetch(f"{base}/image.png") == (PNG, "image/png")
        assert proxy.requests[0][0] == f"CONNECT {base.removeprefix('https://')}"
        assert proxy.headers[0]["Proxy-Authorization"] == "Basic " + base64.b64encode(b"user:secret").decode()
    assert [path for path, _ in server.requests] == ["/image.png"]
