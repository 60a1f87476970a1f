"""Connection-level guards that uvicorn lacks: a deadline for the request head, and a connection cap.

uvicorn (h11) waits for ever for a request head that arrives one byte a second, and holds a connection
that never sends anything; its ``limit_concurrency`` answers a plain-text 503 nobody counts. This
protocol (uvicorn's ``H11Protocol`` with two additions, given to ``uvicorn.Config(http=...)``) adds:

- **head timeout**: from the moment a connection opens, or the first byte of the next request on a
  kept-alive one, the whole request head must be in within ``header_timeout_s``, else the connection is
  closed (``bna_client_aborts_total{reason="header_timeout"}``). Idle kept-alive connections stay
  uvicorn's business (``keep_alive_timeout_s``); slow *bodies* are the request's (``body_timeout_s``).
- **connection cap**: beyond ``max_connections`` open connections a new one is answered with a JSON 503
  and ``Retry-After`` as soon as its request arrives, and closed
  (``bna_requests_refused_total{reason="connection_limit"}``); ``bna_open_connections`` is the gauge.
- **lingering close**: a connection closed while the client is still sending its body (an answer given
  before the body was read: 401, 413, 408, 503) is half-closed (FIN after the answer), and what the
  client still sends is read and thrown away (at most ``LINGER_BYTES``, then no longer read) until the
  client closes or ``LINGER_SECONDS`` have passed, when the socket is closed. Closing at once would
  reset the connection (unread data makes the kernel send RST) and the client could lose the answer;
  reading the whole body would let a client hold the server.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from bna_gateway.service.metrics import GatewayMetrics

log = logging.getLogger(__name__)

LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024


@dataclass
class ConnectionGuard:
    """Shared by every connection of one server: the limits and the count of open connections."""

    metrics: GatewayMetrics
    header_timeout_s: float
    max_connections: int
    retry_after_s: int = 1
    open: int = field(default=0, init=False)

    def admit(self) -> bool:
        if self.open >= self.max_connections:
            self.metrics.observe_refused("connection_limit")
            return False
        self.open += 1
        self.metrics.open_connections.set(self.open)
        return True

    def release(self) -> None:
        self.open -= 1
        self.metrics.open_connections.set(self.open)

    def refusal(self) -> bytes:
        body = json.dumps({"detail": f"the gateway has {self.max_connections} open connections, its limit"}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"retry-after: {self.retry_after_s}\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        return head.encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a connection cap (see the module)."""

    guard: ConnectionGuard  # set on the subclass that :func:`guarded_protocol` makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._admitted = False
        self._lingering: _LingeringTransport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._lingering = _LingeringTransport(transport, self)
        super().connection_made(self._lingering)  # type: ignore[arg-type]
        self._admitted = self.guard.admit()
        if not self._admitted:
            self.connections.discard(self)  # not served: graceful shutdown need not wait for it
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            self._refuse()
            return
        if self._lingering is not None and self._lingering.lingering:
            self._lingering.discard(len(data))
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # between requests, or a head still incomplete
            if self._head_timer is None and self.conn.trailing_data[0]:
                self._arm_head_timer()
        else:
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        if self._admitted:
            self._admitted = False
            self.guard.release()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.guard.header_timeout_s, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self._admitted and self.conn.their_state is not h11.IDLE):
            return
        if self._admitted:
            self.guard.metrics.observe_client_abort("header_timeout")
            peer = "%s:%d" % self.client if self.client else "a client"
            log.info("closed the connection of %s: no complete request head within %g s", peer, self.guard.header_timeout_s)
        self.transport.close()

    def _refuse(self) -> None:
        """Answer a connection over the cap once its request has arrived (its bytes are read, so closing
        sends FIN, not RST, and the client reads the 503), then close it."""
        if not self.transport.is_closing():
            self.transport.write(self.guard.refusal())
            self.transport.close()


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: ``close()`` lingers while the client is still
    sending a body nobody will read (see the module); everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self.lingering = False
        self._discarded = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        t = self._transport
        if self.lingering or t.is_closing():
            return
        if self._protocol.conn.their_state is h11.SEND_BODY and t.can_write_eof():
            self.lingering = True
            t.write_eof()  # the answer, then FIN: the client reads it and sees the end
            t.resume_reading()
            self._protocol.loop.call_later(LINGER_SECONDS, t.close)
            return
        t.close()

    def discard(self, n: int) -> None:
        """Throw away what a lingering client still sends; past ``LINGER_BYTES`` stop reading instead.

        Stopping reading, not closing, is what keeps the answer safe: a close with unread bytes sends RST,
        and a client that has not read the answer yet (one writing as fast as loopback takes it reads
        nothing until a write blocks) loses it. Unread, the kernel buffers fill, the client's writes
        block, it reads the answer and the FIN; the deadline set in :meth:`close` ends the connection."""
        self._discarded += n
        if self._discarded > LINGER_BYTES:
            self._transport.pause_reading()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, bound to one server's guard."""
    return type("GatewayH11Protocol", (GuardedH11Protocol,), {"guard": guard})
