"""Connections to other daemons: what both ends of an exchange share (§4).

``PeerConn`` is one TCP connection to another daemon, driven by a
``protocol.Exchange``: reading into the shared buffer, the handshake and
idle deadlines (a peer must move MIN_PROGRESS_BYTES per IDLE_TIMEOUT),
backpressure, the lingering close after an error frame, progress reports.
Its two ends are ``inbound.InboundPeer`` and ``outbound.OutboundPeer``.
``Refusal`` is a connection we do not take, told why.

A connection is handed a ``PeerContext`` (the loop, the configuration, the
store, ``publish``, the registry of connections, ``learn``), never the
daemon. How an exchange ends has one verb each: ``complete`` (the kinds'
own), ``fail`` (we end it and tell the peer why), ``drop`` (it is over
without a word: the peer is gone, silent, or broke the connection); both
``conclude`` it, once: the result is recorded and reported.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Protocol, Sequence, Set, Tuple

from . import api
from . import protocol as proto
from .keep import Keep
from .loop import Conn, Loop
from .store import Store
from .util import Config, printable

log = logging.getLogger("tnet")

RECV_BYTES = 1024 * 1024  # one preallocated receive buffer, reused for every read of file bytes
# Frames are read in smaller bites: 64 KiB of the smallest frames is ~1,500 entries (folders made,
# tiny files placed), tens of milliseconds; a 1 MiB read of them would hold the loop for a second.
FRAME_RECV_BYTES = 64 * 1024
MIN_PROGRESS_BYTES = 4096  # a peer mid-exchange moves at least this much per IDLE_TIMEOUT, or is dropped
MAX_OUT_BUFFER_BYTES = 256 * 1024  # stop queueing frames for a peer, and reading from it, beyond this
LINGER_S = 2.0  # after an error frame, how long we wait for the peer to read it
MAX_DRAIN_READS = 64  # reads of what a reset peer left queued, looking for its error frame
PROGRESS_INTERVAL_S = 0.25  # progress events per transfer, at most four a second


class Transfer(Protocol):
    """What the commands need of an open transfer: a tnet peer's, or a LocalSend sender's (lsreceive)."""

    id: str

    def describe(self) -> Dict[str, Any]: ...

    def fail(self, code: str, message: str) -> None: ...


class PeerRegistry:
    """The connections to peers, by what they do; every count is a size here."""

    def __init__(self) -> None:
        self.connections: Set["PeerConn"] = set()  # both directions
        self.inbound: Dict[str, Set["PeerConn"]] = {}  # by the peer's address
        self.answering: Set["PeerConn"] = set()  # our answers to discoveries, in flight
        self.refusals: Set["Refusal"] = set()  # being told why they are not taken
        self.transfers: Dict[str, Transfer] = {}  # by transfer id, while open

    def forget(self, transfer: Transfer) -> None:
        """``transfer`` is over; the id may be another's by now (the next attempt of a send, or the send itself)."""
        if self.transfers.get(transfer.id) is transfer:
            del self.transfers[transfer.id]

    def inbound_count(self) -> int:
        return sum(len(conns) for conns in self.inbound.values())

    def add_inbound(self, conn: "PeerConn") -> None:
        self.inbound.setdefault(conn.address, set()).add(conn)

    def remove_inbound(self, conn: "PeerConn") -> None:
        same_address = self.inbound.get(conn.address)
        if same_address is not None:
            same_address.discard(conn)
            if not same_address:
                del self.inbound[conn.address]


@dataclass
class PeerContext:
    """What a peer connection needs of the daemon, and no more."""

    loop: Loop
    config: Config
    store: Store
    publish: Callable[[Dict[str, Any]], None]
    learn: Callable[[str, str, str], None]  # (name, address, nonce): an answer to our discovery
    new_transfer_id: Callable[[], str]
    registry: PeerRegistry = field(default_factory=PeerRegistry)
    keep: Optional[Keep] = None  # partials kept for resume (§7); None: nothing is kept
    wall: Callable[[], float] = time.time  # for records that outlive the daemon
    # The history's record of each file sent: (transfer id, [history.file_record, ...]).
    record_files: Callable[[str, Sequence[Dict[str, Any]]], None] = lambda transfer_id, files: None
    # Hashes of files being sent, shared by their senders (outbound.SharedHash, by file).
    hashes: Dict[tuple, Any] = field(default_factory=dict)
    # One buffer for every read: from peer sockets, and of files being hashed.
    # Whatever reads into it is done with it before the loop moves on.
    buffer: memoryview = field(default_factory=lambda: memoryview(bytearray(RECV_BYTES)))


class PeerConn(Conn):
    """A TCP connection to another daemon; the two ends subclass it.

    Hooks for the ends: ``on_event`` (each event the peer sent), ``on_concluded`` (the exchange's result, once),
    ``backlogged`` (stop reading: work of ours is pending), ``on_received``.
    """

    kind = "peer"
    role = proto.Role.ACCEPTOR
    AFTER_AN_ERROR: Tuple[type, ...] = (proto.Error,)  # what is still handled of a read that ends in one

    def __init__(self, ctx: PeerContext, sock: socket.socket, address: str) -> None:
        super().__init__(ctx.loop, sock)
        self.ctx = ctx
        self.max_out = 1 << 62  # unbounded: we never queue more than MAX_OUT_BUFFER_BYTES anyway
        self.address = address
        self.exchange = proto.Exchange(self.role)
        self.peer_name = ""
        self.id = ""  # set when this connection becomes a transfer
        self.lingering = False  # our error frame is out; waiting for the peer's EOF
        self.write_shut = False
        self.draining = False  # reading the peer's last frames after a reset
        self.result: Optional[Tuple[str, str]] = None  # (code, message) once concluded
        self.started = ctx.loop.clock()
        self.total = 0  # bytes of the batch
        self.bytes_moved = 0  # of them, sent or received
        self.current = ""  # name of the file in flight
        self.current_size = 0
        self.current_from = 0  # bytes_moved when the file in flight started
        self.progress_at = -math.inf
        self.batching = False  # inside on_readable's event loop: send() only queues
        self.moved_since_touch = 0  # bytes moved since the idle deadline was last pushed back
        ctx.registry.connections.add(self)

    def label(self) -> str:
        return self.address

    def on_readable(self) -> None:
        view = self.ctx.buffer
        # Big reads only inside a file: what one read of frames costs the loop stays bounded.
        size = len(view) if self.exchange.data_remaining >= FRAME_RECV_BYTES else FRAME_RECV_BYTES
        try:
            n = self.sock.recv_into(view, size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.on_io_error(exc)
            return
        if self.lingering:
            if n == 0:
                self.close()
            return
        try:
            events = self.exchange.receive_data(view[:n]) if n else self.exchange.feed_eof()
        except proto.RemoteProtocolError as exc:
            self.on_remote_error(exc)
            return
        self.on_received(n)
        self.handle(events)
        if not n and not self.closed:
            self.close()  # a close the exchange allows: after a message, an announce, a whole batch

    def handle(self, events: Any) -> None:
        # A read that ends in the peer's error frame: no answer can follow it (§4.3).
        ended = self.exchange.state is proto.State.CLOSED
        self.batching = True  # answers to these events leave in one write, below
        try:
            for event in events:
                if self.closed or self.lingering:
                    return
                if not ended or isinstance(event, self.AFTER_AN_ERROR):
                    self.on_event(event)
        finally:
            self.batching = False
        if self.out and not self.closed:
            self.flush()

    def send_event(self, event: Any) -> None:
        """Send one frame of the exchange (LocalProtocolError if it may not go now)."""
        self.send(self.exchange.send(event))

    def send(self, data: bytes) -> None:
        """Queue ``data``; write it now unless a received batch is being
        handled, whose answers (a ``done`` per small file) go out together."""
        if self.batching:
            self.out += data
        else:
            super().send(data)

    def close(self) -> None:
        if self.batching:  # a handler closed us: what the batch queued goes first
            self.batching = False
            if not self.closed:
                self.flush()
        super().close()

    def touch(self, moved: int = MIN_PROGRESS_BYTES) -> None:
        """The exchange moved ``moved`` bytes (no count: an answer, a decision, work of ours). Each
        MIN_PROGRESS_BYTES push the idle deadline back: a trickle does not. Until the peer has opened
        the exchange, the handshake deadline stands, however it trickles."""
        if self.lingering or not self.exchange.opened:
            return
        self.moved_since_touch += moved
        if self.moved_since_touch >= MIN_PROGRESS_BYTES:
            self.moved_since_touch = 0
            self.set_deadline(self.loop.clock() + self.ctx.config.idle_timeout)

    def on_received(self, count: int) -> None:
        """``count`` bytes came in (0: EOF) and were decoded."""
        self.touch()

    def on_event(self, event: Any) -> None:
        raise NotImplementedError

    def on_remote_error(self, exc: proto.RemoteProtocolError) -> None:
        """The peer broke the protocol (§4.3): say which rule, and end."""
        self.fail(exc.code, exc.message)

    def on_io_error(self, exc: OSError) -> None:
        reason = exc.strerror or str(exc)
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            if not self.draining:
                # A peer that closes with our data unread resets the connection,
                # but the frame saying why (§4.3) is queued ahead of the reset:
                # read it first. Bounded: what is queued is finite.
                self.draining = True
                for _ in range(MAX_DRAIN_READS):
                    if self.closed or self.result is not None:
                        break
                    self.on_readable()
                if self.closed:
                    return
            self.drop("peer-gone", f"{self.address} closed the connection ({reason})")
        else:
            self.drop("io-error", f"{self.address}: {reason}")

    def on_deadline(self) -> None:
        if self.lingering:
            self.close()
            return
        self.drop("timeout", f"{self.address} moved less than {MIN_PROGRESS_BYTES} bytes in "
                             f"{self.ctx.config.idle_timeout:g} s")

    def on_internal_error(self) -> None:
        self.drop("internal-error", "internal error; see the daemon log")

    def fail(self, code: str, message: str) -> None:
        """End the exchange and tell the peer why (an error frame), then close
        once it has read it. Where no frame can go (before our preface, or
        in the middle of a file's bytes) the connection is only closed; a
        receiver mid-file then sees the file cut short (`truncated`)."""
        if self.closed or self.lingering:
            return
        try:
            frame = self.exchange.send(proto.Error(code, proto.clip_text(message)))
        except proto.LocalProtocolError:
            self.drop(code, message)
            return
        self.conclude(code, message)
        self.out += frame
        self.linger()

    def drop(self, code: str, message: str) -> None:
        """End the exchange without a word to the peer, and close."""
        self.conclude(code, message)
        self.close()

    def conclude(self, code: str, message: str) -> None:
        """Record the exchange's failure once and let the end report it."""
        if self.result is None:
            self.result = (code, message)
            self.ctx.registry.forget(self)  # over, though an error frame may still be going out
            self.on_concluded(code, message)

    def on_concluded(self, code: str, message: str) -> None:
        log.warning("peer %s: %s: %s", self.address, code, printable(message))
        self.ctx.publish(api.error_event(self.address, code, message))

    def linger(self) -> None:
        """Our last words are queued: send them, half-close, and wait for the
        peer's EOF before closing, so that a reset cannot destroy them (§4.3)."""
        self.lingering = True
        self.set_deadline(self.loop.clock() + LINGER_S)
        self.flush()

    def flush(self) -> None:
        super().flush()
        if self.closed:
            return
        if self.lingering and not self.out and not self.write_shut:
            self.shutdown_write()
        self.update_reading()

    def update_reading(self) -> None:
        """A peer that does not read our answers gets nothing more read from
        it, nor one whose files wait for us: what we owe it stays bounded."""
        reading = len(self.out) <= MAX_OUT_BUFFER_BYTES and not self.backlogged()
        if reading != self.reading:
            self.reading = reading
            self.want_write(bool(self.out) or self.wants_more_output())

    def backlogged(self) -> bool:
        return False

    def shutdown_write(self) -> None:
        self.write_shut = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()

    def on_closed(self) -> None:
        self.ctx.registry.connections.discard(self)
        self.ctx.registry.remove_inbound(self)
        self.loop.done(self)  # no more slices of work of ours
        if self.result is None and self.id:
            self.conclude("peer-gone", f"connection to {self.address} closed")
        self.ctx.registry.forget(self)

    def describe(self) -> Dict[str, Any]:
        """What `tnet transfers` shows of this transfer (§6.1)."""
        in_flight = bool(self.current)
        return {"id": self.id, "direction": "in" if self.role is proto.Role.ACCEPTOR else "out",
                "peer": self.address, "name": self.peer_name, "file": self.current, "bytes": self.bytes_moved,
                "size": self.total, "file_bytes": self.bytes_moved - self.current_from if in_flight else 0,
                "file_size": self.current_size if in_flight else 0,
                "seconds": round(self.loop.clock() - self.started, 3)}

    def start_file(self, name: str, size: int) -> None:
        """A file of the batch is now in flight (for describe and progress)."""
        self.current, self.current_size, self.current_from = name, size, self.bytes_moved

    def report_progress(self, reply: Optional[Callable[[Dict[str, Any]], None]], publish: bool,
                        force: bool = False) -> None:
        if reply is None and not publish:
            return  # no one to tell: the common case of a receiver, once per small file
        now = self.loop.clock()
        if not force and now - self.progress_at < PROGRESS_INTERVAL_S:
            return
        self.progress_at = now
        event = api.progress_event(self.describe())
        if reply is not None:
            reply(event)
        if publish:
            self.ctx.publish(event)


class Refusal(Conn):
    """A connection we do not take (too many open, or from its address): it
    is told why in an error frame, as a refused offer would be (§4.3), and
    closed once the peer closed or LINGER_S passed."""

    def __init__(self, ctx: PeerContext, sock: socket.socket, code: str, message: str) -> None:
        super().__init__(ctx.loop, sock)
        self.ctx = ctx
        ctx.registry.refusals.add(self)
        self.set_deadline(ctx.loop.clock() + LINGER_S)
        exchange = proto.Exchange(proto.Role.ACCEPTOR)
        self.send(exchange.send_preface() + exchange.send(proto.Error(code, proto.clip_text(message))))
        if not self.closed and not self.out:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.close()

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(FRAME_RECV_BYTES)  # read and dropped: a close with it unread would reset
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()

    def on_closed(self) -> None:
        self.ctx.registry.refusals.discard(self)
