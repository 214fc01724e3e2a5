"""Result targets: what the API accepts, and a webhook POST that cannot be aimed inside."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from weir.v1 import common_pb2

from libs import webhooks
from libs.webhooks import DeliveryError, post, target_violations

URL = "task.result_targets[0].webhook.url"


def webhook(url: str, **headers: str) -> common_pb2.ResultTarget:
    return common_pb2.ResultTarget(webhook=common_pb2.WebhookTarget(url=url, headers=headers))


def problems(*targets: common_pb2.ResultTarget, allow_private: bool = False) -> dict[str, str]:
    return target_violations(targets, at="task.result_targets", allow_private=allow_private)


@pytest.fixture
def public_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every host name resolves to a public address (no real DNS in unit tests)."""
    def getaddrinfo(host: str, *_args: object, **_kwargs: object) -> list:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0))]

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize("url, says", [
    ("http://[", "not a valid URL"),
    ("", "required"),
    ("http://example.com/" + "a" * 1_000_000, "at most 2,048 characters"),
    ("http://user:secret@example.com/hook", "must not carry credentials"),
    ("ftp://example.com/hook", "http or https"),
    ("file:///etc/passwd", "http or https"),
    ("javascript:alert(1)", "http or https"),
    ("//example.com/hook", "http or https"),
    ("http:///hook", "must name a host"),
    ("http://exa mple.com/", "without spaces or control characters"),
    ("http://example.com/\r\nX-Injected: 1", "without spaces or control characters"),
    ("http://example.com:99999/", "not a valid URL"),
    ("http://example.com:0/", "port must be between 1 and 65535"),
    ("http://example.com:http/", "not a valid URL"),
    ("http://exa$mple.com/", "neither a DNS name nor an IP address"),
])
def test_a_malformed_webhook_url_is_refused_with_a_reason(url, says, public_dns):
    found = problems(webhook(url))
    assert says in found[URL]
    assert len(found[URL]) < 300, "the message echoes at most an excerpt of the URL"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/internal-admin",
    "http://127.1.2.3/",
    "http://[::1]/",
    "http://10.0.0.7/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:10.0.0.1]/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://[fe80::1]/",
    "http://[fd00::1]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[2002:7f00:1::]/",
])
def test_an_ip_literal_that_is_not_public_is_refused(url):
    assert "not a public address" in problems(webhook(url))[URL]


def test_a_private_literal_is_accepted_when_the_operator_allows_it():
    assert problems(webhook("http://127.0.0.1:8080/hook"), allow_private=True) == {}


def test_a_public_literal_is_accepted():
    assert problems(webhook("https://93.184.216.34/hook"), webhook("http://[2606:4700::1]/")) == {}


def test_a_host_name_resolving_to_loopback_is_refused_unless_allowed():
    assert "'localhost' resolves to 127.0.0.1" in problems(webhook("http://localhost:9/"))[URL]
    assert problems(webhook("http://localhost:9/"), allow_private=True) == {}


def test_a_host_name_resolving_to_a_public_address_is_accepted(public_dns):
    assert problems(webhook("https://hooks.example.com/weir?k=1", Authorization="Bearer x")) == {}


def test_a_host_name_that_does_not_exist_is_refused_at_submission(monkeypatch):
    def getaddrinfo(*_args: object, **_kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", getaddrinfo)
    assert "does not resolve" in problems(webhook("https://hooks.exmaple.com/"))[URL]


def test_a_lookup_that_fails_for_a_temporary_reason_is_not_held_against_the_target(monkeypatch):
    def getaddrinfo(*_args: object, **_kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", getaddrinfo)
    assert problems(webhook("https://hooks.example.com/")) == {}


def test_seventeen_headers_are_too_many(public_dns):
    headers = {f"X-H{i}": "v" for i in range(17)}
    assert problems(webhook("https://example.com/", **headers)) == {
        "task.result_targets[0].webhook.headers": "at most 16 headers (got 17)"}


@pytest.mark.parametrize("name", ["Weir-Signature", "weir-signature", "WEIR-SIGNATURE",
                                  "Weir-Task-Id", "weir-anything"])
def test_weir_headers_are_reserved_in_any_case(name, public_dns):
    found = problems(webhook("https://example.com/", **{name: "sha256=forged"}))
    assert found == {f"task.result_targets[0].webhook.headers['{name}']":
                     "Weir-* headers are reserved"}


@pytest.mark.parametrize("name", ["Host", "content-length", "Transfer-Encoding", "Connection",
                                  "Content-Type", "Upgrade", "Expect"])
def test_headers_that_control_the_connection_are_refused(name, public_dns):
    assert "not allowed" in problems(webhook("https://example.com/", **{name: "x"}))[
        f"task.result_targets[0].webhook.headers['{name}']"]


@pytest.mark.parametrize("name, value, says", [
    ("X-Key", "a\r\nX-Injected: 1", "no CR, LF"),
    ("X-Key", "a\nb", "no CR, LF"),
    ("X-Key", "a\x00b", "no CR, LF"),
    ("X-Key", "é", "printable ASCII"),
    ("X-Key", "v" * 2049, "at most 2,048 characters"),
    ("X Key", "v", "HTTP token"),
    ("X-Key:", "v", "HTTP token"),
    ("", "v", "HTTP token"),
    ("X-" + "k" * 63, "v", "HTTP token"),
])
def test_a_bad_header_name_or_value_is_refused(name, value, says, public_dns):
    (path, problem), = problems(webhook("https://example.com/", **{name: value})).items()
    assert path.startswith("task.result_targets[0].webhook.headers[") and says in problem


def test_the_same_header_twice_in_different_case_is_refused(public_dns):
    found = problems(webhook("https://example.com/", **{"X-Key": "a", "x-key": "b"}))
    assert "appears twice" in next(iter(found.values()))


def test_a_target_must_be_a_webhook_or_kafka():
    assert problems(common_pb2.ResultTarget()) == {
        "task.result_targets[0]": "set webhook or kafka"}


def test_kafka_targets_are_refused_whatever_the_topic():
    for topic in ("weir.tasks.high", "my-results"):
        target = common_pb2.ResultTarget(kafka=common_pb2.KafkaTarget(topic=topic))
        assert problems(target) == {"task.result_targets[0].kafka": webhooks.KAFKA_REFUSED}


def test_at_most_eight_targets(public_dns):
    assert problems(*[webhook(f"https://example.com/{i}") for i in range(8)]) == {}
    assert problems(*[webhook(f"https://example.com/{i}") for i in range(9)]) == {
        "task.result_targets": "at most 8 result targets (got 9)"}


def test_each_bad_target_is_named_by_its_index(public_dns):
    found = problems(webhook("https://example.com/"), webhook("http://127.0.0.1/"),
                     common_pb2.ResultTarget())
    assert set(found) == {"task.result_targets[1].webhook.url", "task.result_targets[2]"}


# The sender, against a real HTTP server on 127.0.0.1.

class Server:
    """An HTTP server in a thread that records every request and answers ``status``."""

    def __init__(self, status: int = 200, location: str = "") -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.connections = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                server.connections += 1
                super().setup()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append((self.path, dict(self.headers), body))
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}"
        # A short poll interval: shutdown() waits for the serving loop to notice it.
        self.thread = threading.Thread(target=self.http.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    yield running
    running.close()


def test_a_loopback_url_is_refused_before_any_connection(server):
    with pytest.raises(DeliveryError) as refused:
        post(f"{server.url}/internal-admin", b"{}", headers={}, timeout=5, allow_private=False)
    assert refused.value.permanent and "not a public address" in str(refused.value)
    with pytest.raises(DeliveryError):
        post(f"http://localhost:{server.http.server_port}/x", b"{}", headers={}, timeout=5,
             allow_private=False)
    assert server.connections == 0


def test_an_address_that_changes_after_the_check_is_not_connected_to(server, monkeypatch):
    # A host that resolves to a public address is connected to at that address, never to
    # the loopback the same name may resolve to a moment later (DNS rebinding).
    answers = iter(["192.0.2.1", "127.0.0.1"])  # TEST-NET-1: nothing answers there

    def getaddrinfo(*_args: object, **_kwargs: object) -> list:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), 0))]

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(webhooks, "is_public", lambda address: str(address) == "192.0.2.1")
    with pytest.raises(DeliveryError) as failed:
        post(f"http://rebind.example:{server.http.server_port}/x", b"{}", headers={},
             timeout=0.5, allow_private=False)
    assert not failed.value.permanent
    assert server.connections == 0


def test_a_redirect_is_a_failure_and_is_not_followed(server):
    redirecting = Server(status=302, location=f"{server.url}/internal-admin")
    try:
        with pytest.raises(DeliveryError) as failed:
            post(f"{redirecting.url}/hook", b"{}", headers={}, timeout=5, allow_private=True)
    finally:
        redirecting.close()
    assert failed.value.permanent and "HTTP 302" in str(failed.value)
    assert len(redirecting.requests) == 1 and server.connections == 0


def test_an_allowed_private_post_arrives_with_its_body_and_headers(server):
    status = post(f"{server.url}/hook?k=1", b'{"task_id": "t1"}', timeout=5, allow_private=True,
                  headers={"Content-Type": "application/json", "X-Route": "eu"})
    assert status == 200
    (path, headers, body), = server.requests
    assert path == "/hook?k=1" and body == b'{"task_id": "t1"}'
    assert headers["X-Route"] == "eu" and headers["Content-Type"] == "application/json"
    assert headers["Host"] == f"127.0.0.1:{server.http.server_port}"


@pytest.mark.parametrize("status, permanent", [
    (500, False), (503, False), (429, False), (408, False), (404, True), (400, True),
    (301, True)])
def test_which_answers_are_worth_a_retry(status, permanent):
    answering = Server(status=status)
    try:
        with pytest.raises(DeliveryError) as failed:
            post(f"{answering.url}/hook", b"{}", headers={}, timeout=5, allow_private=True)
    finally:
        answering.close()
    assert failed.value.permanent is permanent and f"HTTP {status}" in str(failed.value)


def test_a_closed_port_is_a_retryable_failure():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(DeliveryError) as failed:
        post(f"http://127.0.0.1:{port}/hook", b"{}", headers={}, timeout=5, allow_private=True)
    assert not failed.value.permanent


def test_a_receiver_that_never_answers_is_cut_off_at_the_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(DeliveryError) as failed:
            post(f"http://127.0.0.1:{port}/hook", b"{}", headers={}, timeout=0.3,
                 allow_private=True)
    assert not failed.value.permanent and "timed out" in str(failed.value)


def test_a_receiver_trickling_its_answer_is_cut_off_at_the_timeout():
    # Each byte comes well within the socket timeout; only the overall deadline stops it.
    stop = threading.Event()

    def trickle(listener: socket.socket) -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            with contextlib.suppress(OSError):
                while not stop.wait(0.05):
                    connection.sendall(b"z")

    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=trickle, args=(listener,), daemon=True).start()
        started = time.monotonic()
        try:
            with pytest.raises(DeliveryError) as failed:
                post(f"http://127.0.0.1:{listener.getsockname()[1]}/hook", b"{}", headers={},
                     timeout=0.5, allow_private=True)
        finally:
            stop.set()
    assert "timed out" in str(failed.value) and time.monotonic() - started < 3


def test_a_malformed_url_fails_for_good_at_delivery_too():
    with pytest.raises(DeliveryError) as failed:
        post("http://[", b"{}", headers={}, timeout=5, allow_private=True)
    assert failed.value.permanent and "invalid URL" in str(failed.value)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for ``localhost`` signed by its own key: (certificate, key) files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=1))
                   .not_valid_after(now + timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                  critical=True)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path) -> Iterator[tuple[Server, Path]]:
    """`Server` over TLS with a certificate for ``localhost``; yields it and the certificate."""
    cert_path, key_path = self_signed(tmp_path)
    running = Server()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    running.http.socket = context.wrap_socket(running.http.socket, server_side=True)
    yield running, cert_path
    running.close()


def test_https_is_verified_against_the_host_name_while_connecting_to_the_checked_address(
        tls_server, monkeypatch):
    server, cert_path = tls_server
    url = f"https://localhost:{server.http.server_port}/hook"
    # Not trusted by the system: the certificate check fails, and nothing is posted.
    with pytest.raises(DeliveryError) as failed:
        post(url, b"{}", headers={}, timeout=5, allow_private=True)
    assert "CERTIFICATE_VERIFY_FAILED" in str(failed.value) and not server.requests
    # Trusted: the name `localhost` is verified and sent as Host, on an address checked first.
    monkeypatch.setattr(webhooks, "_tls", ssl.create_default_context(cafile=str(cert_path)))
    assert post(url, b"{}", headers={}, timeout=5, allow_private=True) == 200
    (_, headers, _), = server.requests
    assert headers["Host"] == f"localhost:{server.http.server_port}"
