"""What runs before routing: HTTPS and trusted proxies, the body size limit and gzip bodies,
gzip answers, HEAD, and the answer to a request too malformed for HTTP parsing."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import uuid
import zlib
from collections.abc import Iterable

import orjson
from starlette.middleware.gzip import GZipResponder
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from crmsync import balance
from crmsync.config import IPNetwork
from crmsync.errors import (
    ApiError,
    BadRequest,
    HttpsRequired,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedEncoding,
    send_problem,
)

# Headers a proxy adds; a loopback request carrying one came through a proxy, not from
# a local tool, so it does not get the plain-HTTP exemption.
_FORWARDING = frozenset(
    {b"x-forwarded-proto", b"x-forwarded-for", b"x-forwarded-host", b"forwarded", b"x-real-ip"}
)
# Paths answered over plain HTTP from anywhere: they carry no credentials and reveal only
# that the process runs, and load balancers and container runtimes probe over plain HTTP.
HTTPS_EXEMPT = frozenset({"/healthz"})
HSTS = (b"strict-transport-security", b"max-age=31536000")
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
# What no longer describes a body once it is inflated.
_INFLATED_AWAY = frozenset({b"content-encoding", b"content-length"})


class Peers:
    """Which addresses are loopback and which are trusted proxies. The networks are parsed
    once; each address is classified once and remembered."""

    _CACHE_LIMIT = 4096

    def __init__(self, trusted_proxies: Iterable[IPNetwork]) -> None:
        self.trusted_proxies = tuple(trusted_proxies)
        # address -> (is loopback, is a trusted proxy)
        self._known: dict[str, tuple[bool, bool]] = {}

    def classify(self, host: str) -> tuple[bool, bool]:
        known = self._known.get(host)
        if known is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                known = (False, False)
            else:
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped
                known = (
                    address.is_loopback,
                    any(address in network for network in self.trusted_proxies),
                )
            if len(self._known) >= self._CACHE_LIMIT:
                self._known.clear()
            self._known[host] = known
        return known


class HttpsGuard:
    """Pure ASGI. Believes X-Forwarded-Proto and X-Forwarded-For only from trusted proxies
    (then the scope's scheme and client become the original ones), refuses plain HTTP
    with 403 https_required unless it is a direct loopback request without forwarding
    headers or for a path in HTTPS_EXEMPT (/healthz), and adds Strict-Transport-Security
    to HTTPS answers."""

    def __init__(self, app: ASGIApp, peers: Peers, require_https: bool) -> None:
        self.app = app
        self.peers = peers
        self.require_https = require_https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        host = client[0] if client else None
        # No client address: a Unix socket, reachable only from this machine.
        loopback, trusted = self.peers.classify(host) if host is not None else (True, False)
        forwarded = False
        proto = forwarded_for = None
        for name, value in scope["headers"]:
            if name in _FORWARDING:
                forwarded = True
                if name == b"x-forwarded-proto":
                    proto = value
                elif name == b"x-forwarded-for":
                    forwarded_for = value
        scheme = scope["scheme"]
        if forwarded and trusted:
            if proto is not None:
                # The last entry is the one our trusted proxy added.
                scheme = proto.rsplit(b",", 1)[-1].strip().decode("latin-1").lower()
                scope["scheme"] = scheme
            if forwarded_for is not None:
                original = self._original_client(forwarded_for)
                if original is not None:
                    scope["client"] = (original, 0)

        if scheme == "https":

            async def send_with_hsts(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), HSTS]
                await send(message)

            await self.app(scope, receive, send_with_hsts)
            return
        if not self.require_https or (loopback and not forwarded) or scope["path"] in HTTPS_EXEMPT:
            await self.app(scope, receive, send)
            return
        await send_problem(send, HttpsRequired("Use HTTPS: this server refuses plain HTTP"))

    def _original_client(self, header: bytes) -> str | None:
        """The rightmost address that is not a trusted proxy: the first one we cannot
        vouch for, since anyone can put anything at the left of the list."""
        hops = [hop.strip().decode("latin-1") for hop in header.split(b",") if hop.strip()]
        for hop in reversed(hops):
            if not self.peers.classify(hop)[1]:
                return hop
        return hops[0] if hops else None


# The uploads, whose bodies may be as large as the setting allows (5,000 calls are a few
# MiB). Every other body is a sign-in, one contact or one user: a few hundred bytes, never
# near SMALL_BODY_BYTES. Those routes have their JSON parsed into Python objects before
# the token is checked, so a large one would cost any stranger's request hundreds of MB.
UPLOADS = frozenset({("POST", "/contacts/batch"), ("POST", "/calls"), ("POST", "/sync")})
SMALL_BODY_BYTES = 64 * 1024


class BodyLimit:
    """413 for a body over the limit (max_bytes for UPLOADS, SMALL_BODY_BYTES for every
    other route), told by Content-Length or counted while it streams, before any of it is
    stored or parsed. A gzip body (`Content-Encoding: gzip`, a phone saving its data plan)
    is inflated as it streams, the limit bounding what it inflates to as well; another
    encoding of a body is a 415. An answer given before the body was read to its end (these,
    or any the app gives first) waits until the rest has been read: _answered_after_body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        if (scope["method"], scope["path"]) not in UPLOADS:
            limit = min(limit, SMALL_BODY_BYTES)
        encoding = b"identity"
        declared = 0
        has_body = waits_for_continue = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                has_body = declared > 0
            elif name == b"transfer-encoding":
                has_body = True
            elif name == b"content-encoding" and scope["method"] in _WITH_BODY:
                encoding = value.strip().lower()
            elif name == b"expect":
                waits_for_continue = value.strip().lower() == b"100-continue"
        receive = _patient(receive)
        budget = DRAIN_FACTOR * self.max_bytes
        if has_body and declared <= budget:
            receive, send = _answered_after_body(
                receive, send, budget=budget, waits_for_continue=waits_for_continue
            )
        if declared > limit:
            await send_problem(send, _too_large(limit), close=True)
        elif encoding == b"identity":
            await self.app(scope, _limited(receive, limit), send)
        elif encoding in (b"gzip", b"x-gzip"):
            scope["headers"] = [h for h in scope["headers"] if h[0] not in _INFLATED_AWAY]
            await self.app(scope, _inflating(receive, limit), send)
        else:
            detail = f"Content-Encoding {encoding.decode('latin-1')!r} is not supported; use gzip"
            await send_problem(send, UnsupportedEncoding(detail), close=True)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body over {limit} bytes")


# An answer given while the body is still coming (a 413, a 415, a 400 for bad gzip, a 404
# or 401 the app gives unread) waits until the rest of the body has been read, and thrown
# away, up to DRAIN_FACTOR times the upload limit in all. Closed while the body is still
# coming, the connection is reset under the client writing it (the kernel resets a socket
# closed with unread bytes), which may then never read the answer: nginx, forwarding a
# 16.2 MB upload, answered its own 502 (a 503 `unavailable` by deploy/nginx.conf), and a
# phone retries that for ever. A body declared larger than that is answered at once, and so
# is a client waiting for "100 Continue" (it has sent nothing, and nothing asks it to).
DRAIN_FACTOR = 2


def _answered_after_body(
    receive: Receive, send: Send, *, budget: int, waits_for_continue: bool
) -> tuple[Receive, Send]:
    """receive, noting how much of the body it read and whether it ended, and send, which
    reads the rest before an answer starts (see DRAIN_FACTOR)."""
    read = 0
    ended = asked = False

    async def noting_receive() -> Message:
        nonlocal read, ended, asked
        asked = True
        try:
            message = await receive()
        except RequestTimeout:
            ended = True  # the client stopped sending: its 408 is not to wait for more
            raise
        read += len(message.get("body", b""))
        ended = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    async def draining_send(message: Message) -> None:
        nonlocal ended
        if message["type"] == "http.response.start" and not ended:
            ended = True
            if asked or not waits_for_continue:
                await _drain(receive, budget - read)
        await send(message)

    return noting_receive, draining_send


async def _drain(receive: Receive, budget: int) -> None:
    """Read what is left of a body, up to `budget` bytes (a pause of BODY_IDLE_TIMEOUT ends
    it too: receive is _patient's)."""
    try:
        while budget >= 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return
    except RequestTimeout:
        return


# How long a body may pause: a client that stops sending in the middle of its body gets a
# 408 and the connection closes (uvicorn would wait for ever). A phone on a poor network
# still sends something every few seconds.
BODY_IDLE_TIMEOUT = 30.0


def _patient(receive: Receive) -> Receive:
    """receive, bounded by BODY_IDLE_TIMEOUT while the body is still coming."""
    ended = False

    async def patient_receive() -> Message:
        nonlocal ended
        if ended:  # after the body: waiting for a disconnect is not the client's delay
            return await receive()
        try:
            async with asyncio.timeout(BODY_IDLE_TIMEOUT):
                message = await receive()
        except TimeoutError:
            error = RequestTimeout(f"No byte of the request body for {BODY_IDLE_TIMEOUT:g} s")
            error.headers["Connection"] = "close"
            raise error from None
        ended = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return patient_receive


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def limited_receive() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit)
        return message

    return limited_receive


def _inflating(receive: Receive, limit: int) -> Receive:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip's header and trailer
    seen = 0
    compressed = False  # any byte arrived: an empty body stays empty

    async def inflating_receive() -> Message:
        nonlocal seen, compressed
        message = await receive()
        if message["type"] != "http.request":
            return message
        chunk = message.get("body", b"")
        compressed = compressed or bool(chunk)
        try:
            # One byte over the room left is enough to know the body is too large.
            body = inflater.decompress(chunk, limit - seen + 1)
        except zlib.error:
            raise BadRequest("Malformed gzip body") from None
        seen += len(body)
        if seen > limit:
            raise _too_large(limit)
        ended = not message.get("more_body", False)
        if ended and compressed and (not inflater.eof or inflater.unused_data):
            raise BadRequest("Malformed gzip body")  # cut short, or bytes after its end
        return {**message, "body": body}

    return inflating_receive


class GzipWhenAsked:
    """Gzipped answers (Starlette's GZipResponder) for requests that accept gzip, as
    `accepts_gzip` reads Accept-Encoding. GZipMiddleware would parse every request's and
    answer's headers even when it does not compress (tens of microseconds of a request that
    costs a few hundred; wrk and most tools do not ask), and its own check is case-sensitive
    and reads the first Accept-Encoding only."""

    def __init__(self, app: ASGIApp, *, minimum_size: int, compresslevel: int) -> None:
        self.app = app
        self.minimum_size = minimum_size
        self.compresslevel = compresslevel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"accept-encoding" and accepts_gzip(value):
                    gzip = GZipResponder(self.app, self.minimum_size, self.compresslevel)
                    await gzip(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def accepts_gzip(accept_encoding: bytes) -> bool:
    """Whether an Accept-Encoding names gzip with a weight above 0 (`gzip;q=0` refuses it,
    RFC 9110 12.5.3)."""
    value = accept_encoding.lower()
    if b"gzip" not in value:
        return False
    for coding in value.split(b","):
        name, _, params = coding.partition(b";")
        if name.strip() in (b"gzip", b"x-gzip"):
            weight = params.strip().removeprefix(b"q=")
            try:
                return not params.strip() or float(weight) > 0
            except ValueError:
                return False  # a weight that is not a number: not a request for gzip
    return False


class HeadAsGet:
    """HEAD wherever GET is answered (RFC 9110): the GET's status and headers, no body.
    FastAPI routes name GET alone, so the application is shown a GET."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        as_get = {**scope, "method": "GET"}  # the server's own scope stays HEAD
        try:
            await self.app(as_get, receive, headers_only)
        finally:
            if "route" in as_get:  # for the access log and the metrics' route label
                scope["route"] = as_get["route"]


# The longest request line and headers taken (nginx's default allows 4 x 8 KiB lines).
MAX_HEAD_BYTES = 64 * 1024
# How long a request head (request line and headers) may take to arrive whole, from the
# connection opening or from its first byte: a client that opens connections and sends
# nothing, or trickles its headers, would otherwise hold them open for ever (Node's
# headersTimeout is 60 s). Between requests, uvicorn's keep-alive timeout (5 s) applies.
HEAD_TIMEOUT = 30.0


class ProblemHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, whose 400 for what it cannot parse (an unknown method, a
    control byte in a header, a bad Content-Length) is a problem, not plain text.

    It also refuses a request head over MAX_HEAD_BYTES (httptools sets no bound and
    buffers all of it: 200 MiB of headers grew the process by 200 MiB), and one that takes
    longer than HEAD_TIMEOUT (408; a connection that sent nothing is just closed). And it
    counts its connections for crmsync.balance, which has it close one after its answer
    while this worker holds more than its share."""

    _in_head = True  # between requests or inside one's head: bytes are counted
    _head_bytes = 0
    _requests = 0  # requests parsed to their end on this connection
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        balance.opened()
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        balance.closed()
        self._stop_head_timer()
        super().connection_lost(exc)

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._start_head_timer()  # the last request not yet answered: wait for that
            return
        if self._head_bytes == 0:
            self.transport.close()  # nothing sent: an idle connection, closed unanswered
            return
        self._refuse(RequestTimeout(f"Request head not complete within {HEAD_TIMEOUT:g} s"))

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._start_head_timer()
        while self._in_head and len(data) > MAX_HEAD_BYTES - self._head_bytes:
            # What fits may end the head (then the rest is its body or the next request).
            room = MAX_HEAD_BYTES - self._head_bytes
            requests = self._requests
            super().data_received(data[:room])
            data = data[room:]
            if self.transport.is_closing():
                return
            if self._in_head and self._requests == requests:  # the same head, still going
                self.send_400_response(f"Request head over {MAX_HEAD_BYTES} bytes")
                return
        if self._in_head:
            self._head_bytes += len(data)
        if data:
            super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        super().on_headers_complete()
        cycle = self.cycle  # None or the last one when super() parsed no new request
        if cycle is not None and not cycle.response_complete and balance.close_after_answer():
            cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0
        self._requests += 1

    def send_400_response(self, msg: str) -> None:
        self._refuse(BadRequest(msg))

    def _refuse(self, error: ApiError) -> None:
        # Refused before any application code runs, so before RequestContext gives the
        # request its id: it gets one here, and the log line names it.
        request_id = uuid.uuid4().hex
        logging.getLogger("crmsync.errors").warning(
            "request %s refused: %s", request_id, error.detail
        )
        body = orjson.dumps(error.body())
        head = (
            f"HTTP/1.1 {error.status} {error.title}\r\n".encode()
            + b"content-type: application/problem+json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n"
            b"cache-control: no-store\r\nx-content-type-options: nosniff\r\n"
            b"x-request-id: "
            + request_id.encode()
            + b"\r\n"
            # TLS served by crmsync itself: an HTTPS answer, HSTS as HttpsGuard adds it.
            + (b"%s: %s\r\n" % HSTS if self.scheme == "https" else b"")
            + b"\r\n"
        )
        self.transport.write(head + body)
        self.transport.close()
