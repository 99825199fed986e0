"""HTTP/1.1 connections in the loop, in clear or over TLS (the LocalSend side).

``HttpConn`` is a ``loop.Conn`` that moves bytes between its socket, a
``tls.TlsPipe`` when it speaks HTTPS, and the sans-IO ``http.Connection``.
The TLS handshake goes a step per readable socket, so it never blocks the
loop. The events the parser finds are handed to ``on_event`` one at a time,
from a queue: an answer that lets the parser go on to the next pipelined
request does not recurse. ``linger`` sends the last answer, half-closes and
reads what the peer still sends until it closes (or LINGER_S passed), so a
reset cannot destroy that answer.

``HttpClient`` is one request of ours to a LocalSend device: a non-blocking
connect from BIND_ADDRESS, TLS with the device's fingerprint pinned, the
request, a bounded response, one callback with a ``Reply``.

Knows HTTP framing and TLS, nothing of LocalSend's endpoints.
"""

from __future__ import annotations

import collections
import errno
import math
import os
import socket
import ssl
from dataclasses import dataclass, field
from typing import Callable, Deque, Optional

from . import http
from .loop import Conn, Loop
from .tls import TlsClosed, TlsPipe

RECV_BYTES = 1024 * 1024  # one read of an upload's body; the buffers below are reused for every read
LINGER_S = 2.0  # after a last answer, how long the peer has to read it before we close
TLS_RECORD_BYTES = 16 * 1024 + 256  # the most one record decrypts to, with room to spare
MAX_LINGER_READS = 64  # reads dropped per turn while lingering: a peer still pushing a body costs a bounded amount


@dataclass
class Buffers:
    """The two receive buffers every HTTP connection shares (one thread: whatever
    reads into them is done with them before the loop moves on)."""

    plain: memoryview = field(default_factory=lambda: memoryview(bytearray(RECV_BYTES)))
    cipher: memoryview = field(default_factory=lambda: memoryview(bytearray(RECV_BYTES)))


class HttpConn(Conn):
    """One HTTP/1.1 connection, in clear (``tls`` None) or over TLS.

    Hooks: ``on_event`` (each parser event), ``on_http_error`` (the peer broke
    HTTP), ``on_secure`` (TLS is up, or at once in clear), ``on_tls_error``,
    ``on_peer_closed`` (the peer closed between messages), ``on_received``
    (plaintext bytes came in).
    """

    kind = "http"

    def __init__(self, loop: Loop, sock: socket.socket, role: str, buffers: Buffers,
                 tls: Optional[TlsPipe]) -> None:
        super().__init__(loop, sock)
        self.http = http.Connection(role)
        self.buffers = buffers
        self.tls = tls
        self.queue_: Deque[http.Event] = collections.deque()
        self.dispatching = False
        self.lingering = False
        self.write_shut = False

    # -- reading

    def on_readable(self) -> None:
        if self.lingering:
            self.drain()
        elif self.tls is None:
            self.read_clear()
        else:
            self.read_tls(self.tls)

    def read_clear(self) -> None:
        view = self.buffers.plain
        try:
            n = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.on_io_error(exc)
            return
        if n:
            self.feed(view[:n])
        else:
            self.feed_eof()

    def read_tls(self, tls: TlsPipe) -> None:
        view = self.buffers.cipher
        try:
            n = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.on_io_error(exc)
            return
        if n:
            tls.receive(view[:n])
        else:
            tls.receive_eof()
        try:
            if not tls.established:
                done = tls.handshake()
                self.send_cipher()
                if not done:
                    if not n:
                        self.close()  # gone mid-handshake
                    return
                self.on_secure()
            ended = self.read_plain(tls)
        except ssl.SSLError as exc:
            self.send_cipher()  # the alert saying why
            self.on_tls_error(exc)
            return
        if not self.closed:
            self.send_cipher()
            if (ended or not n) and not self.lingering:
                self.feed_eof()

    def read_plain(self, tls: TlsPipe) -> bool:
        """Decrypt what arrived, feeding the parser a buffer at a time rather
        than a TLS record (16 KiB) at a time; True if the peer ended TLS."""
        plain = self.buffers.plain
        filled, ended = 0, False
        while not self.closed and not self.lingering:
            try:
                got = tls.read_into(plain[filled:])
            except TlsClosed:
                got, ended = 0, True
            filled += got
            if got and len(plain) - filled >= TLS_RECORD_BYTES:
                continue
            if filled:
                self.feed(plain[:filled])
                filled = 0
            if not got:
                break
        return ended and not self.closed

    def feed(self, data: memoryview) -> None:
        self.on_received(len(data))
        try:
            events = self.http.feed(data)
        except http.HttpError as exc:
            self.on_http_error(exc)
            return
        self.dispatch(events)

    def feed_eof(self) -> None:
        if self.closed:
            return
        try:
            events = self.http.feed_eof()
        except http.HttpError as exc:
            self.on_http_error(exc)
            return
        except http.LocalProtocolError:  # EOF fed already: the peer is gone
            events = []
        self.dispatch(events)
        if not self.closed and not self.lingering:
            self.on_peer_closed()

    def dispatch(self, events: list) -> None:
        """Hand events to ``on_event`` in order; events that a handler makes
        the parser produce (``accept_body``, the next cycle) join the queue."""
        self.queue_.extend(events)
        if self.dispatching:
            return
        self.dispatching = True
        try:
            while self.queue_ and not self.closed and not self.lingering:
                self.on_event(self.queue_.popleft())
        finally:
            self.dispatching = False
            self.queue_.clear()

    def drain(self) -> None:
        """Lingering: what the peer still sends is read and dropped until it closes."""
        for _ in range(MAX_LINGER_READS):
            try:
                data = self.sock.recv_into(self.buffers.cipher)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = 0
            if not data:
                self.close()
                return

    # -- writing

    def send_plain(self, data: bytes) -> None:
        """Send ``data`` to the peer, through TLS when there is TLS."""
        if self.tls is None:
            self.send(data)
        else:
            self.tls.write(data)
            self.send_cipher()

    def send_cipher(self) -> None:
        if self.tls is not None and not self.closed:
            out = self.tls.take_output()
            if out:
                self.send(out)

    def linger(self) -> None:
        """Our last answer is queued: send it, end TLS, half-close, and read
        until the peer closes too, at most LINGER_S."""
        if self.closed or self.lingering:
            return
        self.lingering = True
        self.queue_.clear()
        if self.tls is not None and self.tls.established:
            self.tls.close_notify()
            self.send_cipher()
        self.set_deadline(self.loop.clock() + LINGER_S)
        self.flush()

    def flush(self) -> None:
        super().flush()
        if self.lingering and not self.closed and not self.out and not self.write_shut:
            self.write_shut = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.close()

    # -- hooks

    def on_event(self, event: http.Event) -> None:
        raise NotImplementedError

    def on_http_error(self, exc: http.HttpError) -> None:
        self.close()

    def on_secure(self) -> None:
        pass

    def on_tls_error(self, exc: ssl.SSLError) -> None:
        self.close()

    def on_peer_closed(self) -> None:
        self.close()

    def on_received(self, count: int) -> None:
        pass

    def on_deadline(self) -> None:
        self.close()


# --- Our requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """How one request of ours went: ``status`` 0 and ``code``/``message`` when
    no response came; ``fingerprint``: of the certificate the server showed."""

    status: int
    body: bytes = b""
    code: str = ""
    message: str = ""
    fingerprint: str = ""


@dataclass(frozen=True)
class Call:
    """One request to send: where, how, what, and what is taken back."""

    address: str
    port: int
    request: bytes  # the whole request, head and body
    method: str = "POST"
    tls: Optional[ssl.SSLContext] = None
    pinned: str = ""  # the fingerprint the server's certificate must have ('' in clear)
    max_body: int = 64 * 1024
    timeout: float = 4.0


class HttpClient(HttpConn):
    """One request of ours and its response; ``on_reply`` is called once."""

    kind = "http-client"

    def __init__(self, loop: Loop, buffers: Buffers, call: Call, on_reply: Callable[[Reply], None]) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        pipe = TlsPipe(call.tls, server_side=False) if call.tls is not None else None
        super().__init__(loop, sock, "client", buffers, pipe)
        self.call = call
        self.on_reply = on_reply
        self.connected = False
        self.status = 0
        self.body = bytearray()
        self.fingerprint = ""
        self.replied = False

    def label(self) -> str:
        return f"{self.call.address}:{self.call.port}"

    def connect(self, bind_address: str) -> None:
        """Start a non-blocking connect from ``bind_address``; ``on_writable`` ends it."""
        self.set_deadline(self.loop.clock() + self.call.timeout)
        try:
            self.sock.setblocking(False)
            if bind_address != "0.0.0.0":
                self.sock.bind((bind_address, 0))
            self.want_write(True)
            err = self.sock.connect_ex((self.call.address, self.call.port))
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self.finish(Reply(0, code="unreachable", message=os.strerror(err)))

    def on_writable(self) -> None:
        if self.connected:
            self.flush()
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.finish(Reply(0, code="unreachable", message=os.strerror(err)))
            return
        self.connected = True
        self.want_write(False)
        if self.tls is None:
            self.on_secure()
        else:
            try:
                self.tls.handshake()  # the ClientHello
            except ssl.SSLError as exc:
                self.on_tls_error(exc)
                return
            self.send_cipher()

    def on_secure(self) -> None:
        if self.tls is not None:
            self.fingerprint = self.tls.peer_fingerprint()
            if self.call.pinned and self.fingerprint != self.call.pinned.upper():
                self.finish(Reply(0, code="fingerprint-mismatch", fingerprint=self.fingerprint,
                                  message=f"the certificate's fingerprint is {self.fingerprint}, "
                                          f"not the announced {self.call.pinned}"))
                return
        self.send_plain(self.call.request)
        self.dispatch(self.http.expect_response(self.call.method))

    def on_event(self, event: http.Event) -> None:
        if isinstance(event, http.Response):
            self.status = event.status
            self.dispatch(self.http.accept_body(self.call.max_body))
        elif isinstance(event, http.Data):
            self.body += event.data
        elif isinstance(event, http.EndOfMessage):
            self.finish(Reply(self.status, bytes(self.body), fingerprint=self.fingerprint))

    def on_http_error(self, exc: http.HttpError) -> None:
        self.finish(Reply(0, code=exc.code, message=exc.message))

    def on_tls_error(self, exc: ssl.SSLError) -> None:
        self.finish(Reply(0, code="tls-failed", message=str(exc.reason or exc)))

    def on_peer_closed(self) -> None:
        self.finish(Reply(0, code="peer-gone", message="closed before answering"))

    def on_io_error(self, exc: OSError) -> None:
        code = "peer-gone" if self.connected else "unreachable"
        self.finish(Reply(0, code=code, message=exc.strerror or str(exc)))

    def on_deadline(self) -> None:
        self.finish(Reply(0, code="timeout", message=f"no answer within {self.call.timeout:g} s"))

    def on_internal_error(self) -> None:
        self.finish(Reply(0, code="internal-error", message="internal error; see the daemon log"))

    def finish(self, reply: Reply) -> None:
        self.close()
        if not self.replied:
            self.replied = True
            self.on_reply(reply)

    def on_closed(self) -> None:
        self.deadline = math.inf
