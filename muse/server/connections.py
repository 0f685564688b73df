"""The connection layer under the app: what a client can hold, and what reaches the app at all.

- Every connection has a deadline while the server waits on its client: `body_timeout` for a request's headers
  (then a 408 and the connection closed), and `body_timeout` again for its body (the app answers 408 if it was
  reading it; a body still owed after a reply, e.g. a `GET /health` that declares one, closes the connection).
  uvicorn arms no timer until a first reply, so without this a client that sends one byte and goes silent holds its
  connection, and a file descriptor, forever.
- At most `max_connections` are open: a new one beyond the cap closes the connection that has waited longest on its
  client, so held connections cannot starve `/health`; accept() failing for want of file descriptors logs one line at
  most every `QUIET_SECONDS`, never a traceback per attempt.
- `Guard` refuses, before the app: a Host header not on the allow-list (DNS rebinding), and a request framed by both
  Content-Length and Transfer-Encoding (RFC 9112, section 6.1: ambiguous framing, the classic request smuggling).

Each closed connection is counted in `ConnectionStats`, which /metrics reports (`muse_connections_closed`)."""

from __future__ import annotations

import json
import logging
import resource
import socket
import time
from collections import Counter
from typing import Any

log = logging.getLogger("muse.server")

QUIET_SECONDS = 10.0  # the shortest interval between two log lines about the same connection-layer trouble
FD_RESERVE = 64  # file descriptors kept for the model, logs and the listening socket when the cap is derived
REPLY_GRACE = 1.0  # seconds past body_timeout for the app's own 408 to go out before the protocol closes


class ConnectionStats:
    """The open connections (oldest first) and how many the server closed on its clients, by reason."""

    def __init__(self, max_connections: int | None) -> None:
        if max_connections is None:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            max_connections = max(8, soft - FD_RESERVE) if soft != resource.RLIM_INFINITY else 65536
        self.max_connections = max_connections
        self.protocols: dict[Any, None] = {}  # insertion-ordered: the oldest first
        self.closed: Counter[str] = Counter()
        self._last_warning: dict[str, float] = {}

    @property
    def open(self) -> int:
        return len(self.protocols)

    def warn(self, kind: str, message: str, *args: Any) -> None:
        """Log `message` at most once every QUIET_SECONDS per `kind`."""
        now = time.monotonic()
        if now - self._last_warning.get(kind, -QUIET_SECONDS) >= QUIET_SECONDS:
            self._last_warning[kind] = now
            log.warning(message + " (said at most every %d s)", *args, int(QUIET_SECONDS))


def protocol(body_timeout: float, stats: ConnectionStats):
    """uvicorn's h11 protocol with the deadlines and the connection cap above."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _timer = None
        _waiting_for = "headers"  # what the server waits on: "headers", "body" or nothing (None)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            stats.protocols[self] = None
            if stats.open > stats.max_connections:
                self._evict()
            self._wait("headers")

        def _evict(self) -> None:
            """Close the connection that has waited longest on its client (this one if every other is working)."""
            victim = next((p for p in stats.protocols if p is not self and p._waiting_for is not None), self)
            stats.warn("cap", "%d connections open, over --max-connections %d: closing the one that has waited "
                       "longest on its client", stats.open, stats.max_connections)
            stats.closed["evicted"] += 1
            victim._close()

        def _wait(self, what: str | None) -> None:
            """Start (or stop, with None) the deadline for the client to send `what`."""
            if self._timer is not None:
                self._timer.cancel()
            self._waiting_for, self._timer = what, None
            if what is not None and not self.transport.is_closing():
                grace = REPLY_GRACE if what == "body" else 0.0
                self._timer = self.loop.call_later(body_timeout + grace, self._too_slow)

        def _too_slow(self) -> None:
            if self.transport.is_closing():
                return
            if self._waiting_for == "headers" and self.conn.their_state is h11.IDLE:
                if self.conn.trailing_data[0]:  # a request begun and never finished: say why it is closed
                    message = json.dumps({"error": f"the request headers did not arrive within body_timeout="
                                                   f"{body_timeout} s"}).encode()
                    self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                         b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                         % (len(message), message))
                stats.closed["header_timeout"] += 1
            else:
                stats.closed["body_timeout"] += 1
            self._close()

        def _close(self) -> None:
            self._wait(None)
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow_client()

        def _follow_client(self) -> None:
            """Keep the deadline on what the client owes now: headers (IDLE), a body (SEND_BODY), or nothing."""
            state = self.conn.their_state
            if state is h11.IDLE or state is h11.SEND_BODY:
                what = "headers" if state is h11.IDLE else "body"
                if self._waiting_for != what:  # a new deadline for each part, not for each byte
                    self._wait(what)
            elif self._waiting_for is not None:
                self._wait(None)  # the request is complete: the app has the time, not the client

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # IDLE: the next request (the keep-alive timer closes an idle connection sooner); still SEND_BODY: the
            # reply went out before the body came (413, 404, a GET with a body), and the body's deadline runs on.
            if self.transport.is_closing():
                self._wait(None)
            else:
                self._follow_client()

        def connection_lost(self, exc) -> None:
            self._wait(None)
            stats.protocols.pop(self, None)
            super().connection_lost(exc)

    return Protocol


def quiet_accept_errors(loop, stats: ConnectionStats) -> None:
    """Make asyncio's "socket.accept() out of system resource" (EMFILE, ENFILE, ...) one rate-limited line: asyncio
    reports it with a traceback for every attempt in its accept loop (up to `backlog` a tick), which filled a log at
    5 MB/s under 300 held connections."""
    previous = loop.get_exception_handler()

    def handler(loop, context: dict) -> None:
        if context.get("message", "").startswith("socket.accept() out of system resource"):
            stats.warn("accept", "cannot accept a connection: %s (%d open); lower --max-connections or raise the "
                       "open-file limit (ulimit -n)", context.get("exception"), stats.open)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def host_name(header: str) -> str:
    """A Host header's name, without the port, lowercase; an IPv6 literal without its brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware refusing, before the app sees them, a Host header not in `hosts` (None: any; anchor:
    Starlette's TrustedHostMiddleware, which mishandles IPv6 literals) and a request with both Content-Length and
    Transfer-Encoding; `refused(reason)` counts each. Both replies close the connection."""

    def __init__(self, app, hosts: frozenset[str] | None, refused) -> None:
        self.app, self.hosts, self.refused = app, hosts, refused

    async def __call__(self, scope, receive, send) -> None:
        problem = self.problem(scope) if scope["type"] == "http" else None
        if problem is None:
            return await self.app(scope, receive, send)
        reason, message = problem
        self.refused(reason)
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def problem(self, scope) -> tuple[str, str] | None:
        """(reason, message) of a request refused here, or None."""
        headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value.decode("latin-1"))
        if b"content-length" in headers and b"transfer-encoding" in headers:
            return "ambiguous_framing", ("a request may not carry both Content-Length and Transfer-Encoding (RFC "
                                         "9112, section 6.1)")
        host = headers.get(b"host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return "bad_host", (f"the Host {host!r} is not served here; behind a proxy, name it with muse serve "
                                "--allowed-hosts")
        return None


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), for uvicorn to listen on: checked before the model loads, so that a port in
    use or a host that is no address here fails in a second, with one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError, OverflowError) as e:
        raise OSError(f"cannot listen on {host}:{port}: {host!r} is not a valid host ({e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock
