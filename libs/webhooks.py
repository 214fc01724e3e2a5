"""Result targets: what the API accepts, and a webhook POST that cannot be aimed inside.

Shared by the gateway (`target_violations`, at submission) and the notifier (`post`, at
delivery). The rules are the ones documented on weir.v1.ResultTarget and WebhookTarget.

A webhook URL is chosen by a tenant, so a POST to it is a request the tenant makes from
inside our network (SSRF). Unless the operator allows private addresses
(`WEIR_WEBHOOK_ALLOW_PRIVATE`, local development and tests), a host that is or resolves to
a non-public address is refused, both at submission and again at every delivery; `post`
connects to the very address it checked, so a DNS answer that changes in between (DNS
rebinding) cannot redirect it, and it never follows redirects.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from weir.v1 import common_pb2

from libs.errors import excerpt

MAX_TARGETS = 8
MAX_URL_CHARS = 2048
MAX_HEADERS = 16
MAX_HEADER_NAME_CHARS = 64
MAX_HEADER_VALUE_CHARS = 2048
MAX_RESPONSE_BYTES = 64 * 1024
# At submission a lookup gets this long; a slow resolver must not hold up CreateTask.
LOOKUP_SECONDS = 2.0

KAFKA_REFUSED = "Kafka result targets are not delivered yet; use a webhook or WatchTask"

# Set by Weir itself, or controlling the connection and framing that http.client manages:
# a tenant's value could smuggle a second request or confuse the receiver's proxy.
FORBIDDEN_HEADERS = frozenset({
    "connection", "content-length", "content-type", "expect", "host", "keep-alive",
    "proxy-authorization", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
})
RESERVED_PREFIX = "weir-"

TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 field-name
VALUE = re.compile(r"^[\x20-\x7e\t]*$")  # printable ASCII and tab: no CR, LF, NUL, DEL
URL_CHARS = re.compile(r"^[\x21-\x7e]+$")  # ASCII without spaces or control characters
DNS_NAME = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*\.?$")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Lookup errors that mean the name does not exist (others may pass: a resolver hiccup).
NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}

# getaddrinfo cannot be given a timeout, so lookups run here and callers wait a bounded time;
# a lookup that hangs holds a thread of this pool, never the caller.
_lookups = ThreadPoolExecutor(max_workers=32, thread_name_prefix="webhook-dns")
_tls = ssl.create_default_context()


@dataclass(frozen=True)
class WebhookUrl:
    """A checked webhook URL, split into what a connection needs."""

    scheme: str
    host: str  # a DNS name, or an IP literal without brackets
    port: int
    target: str  # the request target: path and query


class DeliveryError(Exception):
    """A webhook POST that did not succeed; ``permanent`` when retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def parse_url(url: str) -> WebhookUrl:
    """Checks a webhook URL and splits it.

    Raises:
        ValueError: with what is wrong, the URL cut to an excerpt.
    """
    if not url:
        raise ValueError("required")
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"at most {MAX_URL_CHARS:,} characters (got {len(url):,})")
    if not URL_CHARS.match(url):
        raise ValueError("only ASCII without spaces or control characters (percent-encode the "
                         f"rest; internationalized hosts in their xn-- form): {excerpt(url)}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc}): {excerpt(url)}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must be an absolute http or https URL: {excerpt(url)}")
    if "@" in parts.netloc:
        raise ValueError("must not carry credentials (user:password@); send them in a header")
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"must name a host: {excerpt(url)}")
    if ip_literal(host) is None and (len(host) > 253 or not DNS_NAME.match(host)):
        raise ValueError(f"host is neither a DNS name nor an IP address: {excerpt(host)}")
    if port == 0:
        raise ValueError("port must be between 1 and 65535")
    default_port = 443 if parts.scheme == "https" else 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebhookUrl(parts.scheme, host, port or default_port, target)


def header_violation(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """The first problem of a webhook's extra headers, as (where, what is wrong).

    ``where`` is ``[<name excerpt>]`` for a header's problem, "" for the map's.
    """
    if len(headers) > MAX_HEADERS:
        return "", f"at most {MAX_HEADERS} headers (got {len(headers)})"
    seen: set[str] = set()
    for name, value in sorted(headers.items()):
        problem = _header_problem(name, value, seen)
        if problem:
            return f"[{excerpt(name)}]", problem
        seen.add(name.lower())
    return None


def _header_problem(name: str, value: str, seen: set[str]) -> str:
    lower = name.lower()
    if not TOKEN.match(name) or len(name) > MAX_HEADER_NAME_CHARS:
        return (f"names are 1 to {MAX_HEADER_NAME_CHARS} characters of an HTTP token "
                f"(letters, digits, !#$%&'*+-.^_`|~)")
    if lower.startswith(RESERVED_PREFIX):
        return "Weir-* headers are reserved"
    if lower in FORBIDDEN_HEADERS:
        return "set by Weir or by the connection; not allowed as an extra header"
    if lower in seen:
        return "appears twice (header names are case-insensitive)"
    if len(value) > MAX_HEADER_VALUE_CHARS:
        return f"values are at most {MAX_HEADER_VALUE_CHARS:,} characters (got {len(value):,})"
    if not VALUE.match(value):
        return "values are printable ASCII: no CR, LF or other control characters"
    return ""


def target_violations(targets: Sequence[common_pb2.ResultTarget], *, at: str,
                      allow_private: bool, resolve_until: float | None = None) -> dict[str, str]:
    """Problems of a list of result targets, keyed by field path under ``at``.

    Hosts are resolved (concurrently) to refuse non-public addresses unless
    ``allow_private``, and names that do not exist, so a typo fails at submission. A lookup
    that is slow or fails for a temporary reason is not held against the target: the
    notifier checks every address again before each delivery.

    Args:
        targets: a task's or a function's ``result_targets``.
        at: the path of the list, e.g. ``task.result_targets``.
        allow_private: the operator's ``webhook_allow_private``.
        resolve_until: `time.monotonic` time after which hosts are no longer looked up (one
            budget for a whole batch); default `LOOKUP_SECONDS` from now.
    """
    if len(targets) > MAX_TARGETS:
        return {at: f"at most {MAX_TARGETS} result targets (got {len(targets)})"}
    problems: dict[str, str] = {}
    blame: dict[str, list[str]] = {}  # host -> the url fields naming it
    for i, target in enumerate(targets):
        here = f"{at}[{i}]"
        kind = target.WhichOneof("target")
        if kind is None:
            problems[here] = "set webhook or kafka"
            continue
        if kind == "kafka":
            problems[f"{here}.kafka"] = KAFKA_REFUSED
            continue
        try:
            url = parse_url(target.webhook.url)
        except ValueError as exc:
            problems[f"{here}.webhook.url"] = str(exc)
        else:
            blame.setdefault(url.host, []).append(f"{here}.webhook.url")
        bad_header = header_violation(target.webhook.headers)
        if bad_header:
            where, problem = bad_header
            problems[f"{here}.webhook.headers{where}"] = problem
    until = time.monotonic() + LOOKUP_SECONDS if resolve_until is None else resolve_until
    for host, problem in _host_problems(list(blame), allow_private, until).items():
        problems.update(dict.fromkeys(blame[host], problem))
    return problems


def _host_problems(hosts: list[str], allow_private: bool, until: float) -> dict[str, str]:
    """Why each host may not receive webhooks, for the hosts that may not."""
    lookups = {h: _lookups.submit(addresses, h) for h in hosts if ip_literal(h) is None}
    problems: dict[str, str] = {}
    for host in hosts:
        literal = ip_literal(host)
        try:
            wait = max(0.0, until - time.monotonic())
            found = [literal] if literal else lookups[host].result(wait)
        except socket.gaierror as exc:
            if exc.errno in NO_SUCH_NAME:
                problems[host] = f"host {excerpt(host)} does not resolve"
            continue
        except (TimeoutError, OSError):
            continue  # unknown for now: checked again at every delivery
        refusal = "" if allow_private else address_refusal(host, found)
        if refusal:
            problems[host] = refusal
    for lookup in lookups.values():
        lookup.cancel()  # a lookup still queued after the budget is not worth starting
    return problems


def ip_literal(host: str) -> IpAddress | None:
    """The address when ``host`` is an IP literal (IPv6 without brackets), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def addresses(host: str) -> list[IpAddress]:
    """Every address ``host`` resolves to (an IP literal is its own), without waiting limits.

    Raises:
        socket.gaierror: the name does not resolve.
    """
    literal = ip_literal(host)
    if literal:
        return [literal]
    found: list[IpAddress] = []
    for *_, sockaddr in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM):
        address = ipaddress.ip_address(sockaddr[0])
        if address not in found:
            found.append(address)
    return found


def resolve(host: str, timeout: float) -> list[IpAddress]:
    """`addresses` of ``host``, waiting at most ``timeout`` seconds.

    Raises:
        socket.gaierror: the name does not resolve.
        TimeoutError: no answer in time.
    """
    lookup = _lookups.submit(addresses, host)
    try:
        return lookup.result(timeout)
    finally:
        lookup.cancel()


def is_public(address: IpAddress) -> bool:
    """Whether ``address`` is a global unicast address, also any IPv4 address inside it."""
    inside: list[IpAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        # Addresses that carry an IPv4 address a gateway may translate to (::ffff:127.0.0.1).
        inside += [a for a in (address.ipv4_mapped, address.sixtofour) if a]
        if address in NAT64:
            inside.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    for a in inside:
        if (not a.is_global or a.is_private or a.is_loopback or a.is_link_local
                or a.is_multicast or a.is_reserved or a.is_unspecified):
            return False
        if isinstance(a, ipaddress.IPv6Address) and a.is_site_local:
            return False
    return True


def address_refusal(host: str, found: Sequence[IpAddress]) -> str:
    """Why ``host``, with these addresses, may not receive webhooks; "" when all are public."""
    for address in found:
        if not is_public(address):
            subject = str(address) if ip_literal(host) else f"{excerpt(host)} resolves to {address}"
            return (f"{subject}: not a public address (loopback, private, link-local, multicast "
                    f"or reserved); webhooks go to public addresses only")
    return ""


def post(url: str, body: bytes, *, headers: Mapping[str, str], timeout: float,
         allow_private: bool) -> int:
    """POSTs ``body`` to ``url`` without ever reaching a non-public address (unless allowed).

    The host is resolved, every address checked, and the connection made to a checked
    address (the hostname still serves for Host, TLS SNI and certificate checks). Redirects
    are not followed; at most `MAX_RESPONSE_BYTES` of the answer are read. ``timeout``
    bounds the whole exchange, the lookup included.

    Returns:
        The 2xx status.

    Raises:
        DeliveryError: anything else; permanent for a bad URL, a refused address, a 3xx and
            a 4xx other than 408, 425 and 429.
    """
    deadline = time.monotonic() + timeout
    try:
        parsed = parse_url(url)
    except ValueError as exc:
        raise DeliveryError(f"invalid URL: {exc}", permanent=True) from None
    try:
        found = resolve(parsed.host, timeout)
    except TimeoutError:
        raise DeliveryError(f"looking up {parsed.host} timed out", permanent=False) from None
    except OSError as exc:
        raise DeliveryError(f"cannot resolve {parsed.host}: {exc}", permanent=False) from None
    refusal = "" if allow_private else address_refusal(parsed.host, found)
    if refusal:
        raise DeliveryError(f"refused: {refusal}", permanent=True)
    error = "timed out"
    for address in found:
        if time.monotonic() >= deadline:
            break
        connection = _connection(parsed, str(address), deadline)
        try:
            connection.connect()
        except OSError as exc:  # refused, unreachable, TLS: the next address may do better
            error = "timed out" if connection.watchdog.fired.is_set() else (
                str(exc) or type(exc).__name__)
            connection.close()
            continue
        return _exchange(connection, parsed, body, headers)
    raise DeliveryError(f"cannot connect to {parsed.host}: {error}", permanent=False)


def retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth another attempt: 5xx, timeout, too early, too many."""
    return status >= 500 or status in (408, 425, 429)


class _Watchdog:
    """Shuts a socket down at a deadline. A socket timeout bounds each read, not a receiver
    (or a TLS handshake) trickling one byte at a time; shutdown wakes the blocked read."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.fired = threading.Event()
        self._timer: threading.Timer | None = None

    def watch(self, sock: socket.socket) -> None:
        def cut() -> None:
            self.fired.set()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

        self._timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), cut)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        if self._timer:
            self._timer.cancel()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to a checked address, not to whatever the hostname resolves to now."""

    def __init__(self, host: str, port: int, *, address: str, deadline: float) -> None:
        super().__init__(host, port, timeout=max(0.001, deadline - time.monotonic()))
        self.address = address
        self.watchdog = _Watchdog(deadline)

    def connect(self) -> None:
        self.sock = self._connect_tcp()

    def _connect_tcp(self) -> socket.socket:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.watchdog.watch(sock)
        return sock

    def close(self) -> None:
        self.watchdog.cancel()
        super().close()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """As `_PinnedHTTPConnection`, with TLS verified against the hostname (SNI included)."""

    default_port = http.client.HTTPS_PORT

    def connect(self) -> None:
        raw = self._connect_tcp()
        try:
            self.sock = _tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def _connection(url: WebhookUrl, address: str, deadline: float) -> _PinnedHTTPConnection:
    kind = _PinnedHTTPSConnection if url.scheme == "https" else _PinnedHTTPConnection
    return kind(url.host, url.port, address=address, deadline=deadline)


def _exchange(connection: _PinnedHTTPConnection, url: WebhookUrl, body: bytes,
              headers: Mapping[str, str]) -> int:
    """Sends the request on a connected ``connection`` and judges the answer; closes it."""
    try:
        try:
            connection.request("POST", url.target, body=body, headers=dict(headers))
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            reason = "timed out" if connection.watchdog.fired.is_set() else (
                str(exc) or type(exc).__name__)
            raise DeliveryError(f"POST to {url.host} failed: {reason}", permanent=False) from None
        except ValueError as exc:  # http.client refused a header or the request line
            raise DeliveryError(f"invalid request: {excerpt(str(exc))}", permanent=True) from None
        if connection.watchdog.fired.is_set():  # the head was cut short: it may end anywhere
            raise DeliveryError(f"POST to {url.host} failed: timed out", permanent=False)
        with contextlib.suppress(OSError, http.client.HTTPException):
            response.read(MAX_RESPONSE_BYTES)  # the status is the answer; the body a courtesy
    finally:
        connection.close()
    status = response.status
    if 200 <= status < 300:
        return status
    if 300 <= status < 400:
        raise DeliveryError(f"HTTP {status}: redirects are not followed", permanent=True)
    raise DeliveryError(f"HTTP {status}", permanent=not retryable_status(status))
