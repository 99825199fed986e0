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
``HttpLink`` carries our requests to one server one at a time on a kept-alive
connection, each body from memory or streamed from a file (``sendfile`` in
clear, a slice at a time through TLS), each response to its own callback.

Knows HTTP framing and TLS, nothing of LocalSend's endpoints.
"""

from __future__ import annotations

import collections
import dataclasses
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
    ``on_peer_closed`` (the peer closed its side: between messages, or
    after one that is not answered yet), ``on_received``
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

    def still_reading(self) -> bool:
        """After EOF: may an answer still reach the peer? Not over a TLS it ended without close_notify."""
        return (self.tls is None or not self.tls.broken) and super().still_reading()

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
        # A peer that half-closed before has nothing more to send: no reset to fear, nothing to read.
        self.close_when_flushed = not self.reading
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
    retryable: bool = False  # see HttpLink


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


# --- A link of ours: requests one at a time, bodies streamed from files ------------------------

MIN_PROGRESS_BYTES = 4096  # as a tnet peer's: a body moving less than this per idle timeout has stalled
SEND_BUDGET_BYTES = 4 * 1024 * 1024  # of a body, per wake-up: one fast server does not starve the others
TLS_SLICE_BYTES = 256 * 1024  # of a file read and encrypted at a time; the socket takes it in one go or two
_NO_SENDFILE = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)


@dataclass(frozen=True)
class Server:
    """Where a link goes: ``tls`` None in clear, else ``pinned`` is the
    fingerprint the server's certificate must have ('' checks none)."""

    address: str
    port: int
    tls: Optional[ssl.SSLContext] = None
    pinned: str = ""


@dataclass(frozen=True)
class Outgoing:
    """One request of ours: the head (framing fields included), then ``body``,
    or ``size`` bytes read from the descriptor ``fd`` at explicit offsets (its
    owner opens and closes it). ``timeout``: for the response once the request
    is out; ``on_sent``: bytes of the file body sent so far, as they go."""

    head: bytes
    on_reply: Callable[[Reply], None]
    body: bytes = b""
    fd: int = -1
    size: int = 0
    method: str = "POST"
    max_body: int = 64 * 1024
    timeout: float = 4.0
    on_sent: Optional[Callable[[int], None]] = None


def read_at(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from ``offset`` of ``fd``, leaving its position alone where the system can."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.readv(fd, [view])


class HttpLink(HttpConn):
    """A connection of ours to one server carrying requests one at a time
    (keep-alive). The first ``request`` connects from BIND_ADDRESS (within
    ``connect_timeout``, TLS included, the server's fingerprint pinned);
    each request's body goes from memory, or from a file with ``sendfile``
    in clear and a slice at a time through TLS, moving MIN_PROGRESS_BYTES
    per ``idle_timeout`` or failing. Its response, bounded, goes to its
    ``on_reply``, once. A link whose server closed it, or that cannot carry
    another request, is ``closed``: the owner opens a new one. A failure
    on a link that carried requests before, with no byte of an answer, is
    ``Reply.retryable``: the server may have closed it while it was idle."""

    kind = "http-link"

    def __init__(self, loop: Loop, buffers: Buffers, server: Server, bind_address: str, connect_timeout: float,
                 idle_timeout: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        pipe = TlsPipe(server.tls, server_side=False) if server.tls is not None else None
        super().__init__(loop, sock, "client", buffers, pipe)
        self.server, self.bind_address = server, bind_address
        self.connect_timeout, self.idle_timeout = connect_timeout, idle_timeout
        self.started = self.connected = self.secure = False
        self.fingerprint = ""
        self.current: Optional[Outgoing] = None
        self.sent = 0  # of the current file body
        self.moved = 0  # since the deadline was last pushed back
        self.status = 0
        self.body = bytearray()
        self.answered = 0  # requests this link carried to their end
        self.heard = False  # a byte of the current answer came
        self.use_sendfile = pipe is None and hasattr(os, "sendfile")
        self.max_out = 1 << 62  # a request body is queued whole (within the caller's limit), a file a slice at a time

    def label(self) -> str:
        return f"{self.server.address}:{self.server.port}"

    def request(self, out: Outgoing) -> None:
        """Send ``out`` (connecting first if need be); its ``on_reply`` is called once."""
        if self.current is not None:
            raise ValueError("one request at a time on a link")
        self.current, self.sent, self.status, self.heard = out, 0, 0, False
        self.body = bytearray()
        if not self.started:
            self.connect()
        elif self.secure:
            self.start_request()

    def connect(self) -> None:
        self.started = True
        self.set_deadline(self.loop.clock() + self.connect_timeout)
        try:
            self.sock.setblocking(False)
            if self.bind_address != "0.0.0.0":
                self.sock.bind((self.bind_address, 0))  # the server sees our address, as for every request
            self.want_write(True)
            err = self.sock.connect_ex((self.server.address, self.server.port))
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self.end(Reply(0, code="unreachable", message=f"cannot reach {self.label()}: {os.strerror(err)}"))

    def on_writable(self) -> None:
        if self.connected:
            self.flush()
            self.pump()
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.end(Reply(0, code="unreachable", message=f"cannot reach {self.label()}: {os.strerror(err)}"))
            return
        self.connected = True
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.want_write(False)
        if self.tls is None:
            self.on_secure()
            return
        try:
            self.tls.handshake()  # the ClientHello
        except ssl.SSLError as exc:
            self.on_tls_error(exc)
            return
        self.send_cipher()

    def on_secure(self) -> None:
        if self.tls is not None:
            self.fingerprint = self.tls.peer_fingerprint()
            if self.server.pinned and self.fingerprint != self.server.pinned.upper():
                self.end(Reply(0, code="fingerprint-mismatch", fingerprint=self.fingerprint,
                               message=f"{self.label()} showed a certificate with fingerprint {self.fingerprint}, "
                                       f"not the announced {self.server.pinned}"))
                return
        self.secure = True
        if self.current is not None:
            self.start_request()

    def start_request(self) -> None:
        out = self.current
        assert out is not None
        self.send_plain(out.head + out.body)
        if self.closed:
            return
        self.pushed_back()
        self.dispatch(self.http.expect_response(out.method))
        if not self.closed and self.current is out:
            self.pump()

    def pushed_back(self) -> None:
        """The deadline of what is due now: the body's progress, or the answer."""
        out = self.current
        if out is None:
            self.set_deadline(math.inf)
        elif self.sent < out.size:
            self.set_deadline(self.loop.clock() + self.idle_timeout)
        else:
            self.set_deadline(self.loop.clock() + out.timeout)

    def wants_more_output(self) -> bool:
        return not self.connected or (self.secure and self.current is not None and self.sent < self.current.size)

    def pump(self) -> None:
        """Put the file body on its way, a bounded amount per wake-up."""
        out = self.current
        budget = SEND_BUDGET_BYTES
        while out is not None and self.current is out and self.sent < out.size and budget > 0 and not self.closed:
            if self.out:
                self.flush()
                if self.out or self.closed:
                    return
            try:
                count = self.send_piece(out)
            except (BlockingIOError, InterruptedError):
                self.want_write(True)
                return
            except OSError as exc:
                if exc.errno in _NO_SENDFILE and self.use_sendfile:
                    self.use_sendfile = False  # a file system without it: read and send instead
                    continue
                self.on_io_error(exc)
                return
            if count == 0:
                self.end(Reply(0, code="file-changed", message="shrank while being sent"))
                return
            budget -= count
            self.moved_body(out, count)

    def send_piece(self, out: Outgoing) -> int:
        """One piece of the body: sendfile in clear, else read, (encrypt,) queue and flush."""
        left = out.size - self.sent
        if self.use_sendfile:
            return os.sendfile(self.sock.fileno(), out.fd, self.sent, min(left, SEND_BUDGET_BYTES))
        view = self.buffers.plain
        n = read_at(out.fd, view[:min(left, TLS_SLICE_BYTES, len(view))], self.sent)
        if n:
            self.send_plain(bytes(view[:n]) if self.tls is None else view[:n])
        return n

    def moved_body(self, out: Outgoing, count: int) -> None:
        self.sent += count
        self.moved += count
        if self.moved >= MIN_PROGRESS_BYTES or self.sent == out.size:
            self.moved = 0
            self.pushed_back()
        if out.on_sent is not None:
            out.on_sent(self.sent)
        if self.sent == out.size and not self.closed:
            self.want_write(bool(self.out))

    # -- the answer

    def on_received(self, count: int) -> None:
        if self.current is not None and count:
            self.heard = True

    def on_event(self, event: http.Event) -> None:
        out = self.current
        if out is None:
            return
        if isinstance(event, http.Response):
            self.status = event.status
            self.dispatch(self.http.accept_body(out.max_body))
        elif isinstance(event, http.Data):
            self.body += event.data
        elif isinstance(event, http.EndOfMessage):
            self.answer(out)

    def answer(self, out: Outgoing) -> None:
        reply = Reply(self.status, bytes(self.body), fingerprint=self.fingerprint)
        self.current = None
        self.answered += 1
        if not self.http.keep_alive or self.sent < out.size:
            self.close()  # the server ends it, or our body was cut short by its answer
        else:
            self.set_deadline(math.inf)  # idle: the owner sends the next request, or closes us
        out.on_reply(reply)

    def end(self, reply: Reply) -> None:
        """The link fails: the request in flight, if any, gets ``reply``."""
        out, self.current = self.current, None
        self.close()
        if out is not None:
            if self.answered and not self.heard and reply.code in ("peer-gone", "no-response", "truncated"):
                reply = dataclasses.replace(reply, retryable=True)
            out.on_reply(reply)

    def abort(self) -> None:
        """The owner gives up: close without a word to anyone."""
        self.current = None
        self.close()

    def on_http_error(self, exc: http.HttpError) -> None:
        self.end(Reply(0, code=exc.code, message=f"{self.label()}: {exc.message}"))

    def on_tls_error(self, exc: ssl.SSLError) -> None:
        self.end(Reply(0, code="tls-failed", message=f"{self.label()}: {exc.reason or exc}"))

    def on_peer_closed(self) -> None:
        self.end(Reply(0, code="peer-gone", message=f"{self.label()} closed the connection before answering"))

    def on_io_error(self, exc: OSError) -> None:
        code = "peer-gone" if self.connected else "unreachable"
        self.end(Reply(0, code=code, message=f"{self.label()}: {exc.strerror or exc}"))

    def on_deadline(self) -> None:
        if self.current is None:
            self.close()
        elif not self.secure:
            code = "unreachable" if not self.connected else "timeout"
            self.end(Reply(0, code=code, message=f"no answer from {self.label()} within {self.connect_timeout:g} s"))
        elif self.sent < self.current.size:
            self.end(Reply(0, code="timeout", message=f"{self.label()} took less than {MIN_PROGRESS_BYTES} bytes "
                                                      f"in {self.idle_timeout:g} s"))
        else:
            self.end(Reply(0, code="timeout", message=f"no answer from {self.label()} within "
                                                      f"{self.current.timeout:g} s"))

    def on_internal_error(self) -> None:
        self.end(Reply(0, code="internal-error", message="internal error; see the daemon log"))

    def on_closed(self) -> None:
        self.deadline = math.inf
        out, self.current = self.current, None
        if out is not None:  # closed under us (the server, mid-handshake): the request still hears of it
            when = "before answering" if self.secure else "during the TLS handshake"
            out.on_reply(Reply(0, code="peer-gone", message=f"{self.label()} closed the connection {when}"))
