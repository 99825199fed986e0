"""Connections to other daemons: the two ends of every exchange (§4).

``PeerConn`` holds what both ends share: the stream decoder, the idle and
handshake deadlines, the lingering close after an error frame, backpressure,
progress reports. ``InboundPeer`` is a connection a peer opened to us (an
announce, a message, or a batch of files it streams into temp files that
``store`` verifies and places); ``OutboundPeer`` is one we open (to answer a
discovery, deliver a message, or stream a batch with ``sendfile``).
"""

from __future__ import annotations

import collections
import errno
import hashlib
import logging
import math
import os
import selectors
import socket
import stat
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Optional, Tuple

from . import protocol as proto
from .loop import Conn
from .store import Copy, TempFile, write_all
from .util import printable
from .walk import Entries

if TYPE_CHECKING:
    from .daemon import ClientConn, Daemon

log = logging.getLogger("tnet")

RECV_BYTES = 1024 * 1024  # one preallocated receive buffer, reused for every read of file bytes
# Frames are read in smaller bites: 64 KiB of the smallest frames is ~1,500 entries (folders made,
# tiny files placed), tens of milliseconds; a 1 MiB read of them would hold the loop for a second.
FRAME_RECV_BYTES = 64 * 1024
MIN_PROGRESS_BYTES = 4096  # a peer mid-exchange moves at least this much per IDLE_TIMEOUT, or is dropped
MAX_QUEUED_COPIES = 16  # files of one batch waiting to be copied in from another file system; then stop reading
SEND_CHUNK_BYTES = 4 * 1024 * 1024  # at most this per sendfile call
INLINE_FILE_BYTES = 64 * 1024  # smaller files are read into the send buffer: batches
MAX_OUT_BUFFER_BYTES = 256 * 1024  # stop queueing frames for a peer, and reading from it, beyond this
LINGER_S = 2.0  # after an error frame, how long we wait for the peer to read it
MAX_DRAIN_READS = 64  # reads of what a reset peer left queued, looking for its error frame
PROGRESS_INTERVAL_S = 0.25  # progress events per transfer, at most four a second
HEADER_COST_BYTES = 64  # what a frame counts for in a wake-up's sending budget

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class PeerConn(Conn):
    """A TCP connection to another daemon; the two ends subclass it."""

    kind = "peer"
    role = "acceptor"

    def __init__(self, daemon: "Daemon", sock: socket.socket, address: str) -> None:
        super().__init__(daemon, sock)
        self.max_out = 1 << 62  # unbounded: we never queue more than MAX_OUT_BUFFER_BYTES anyway
        self.address = address
        self.decoder = proto.StreamDecoder(self.role)
        self.peer_name = ""
        self.id = ""  # set when this connection becomes a transfer
        self.lingering = False  # our error frame is out; waiting for the peer's EOF
        self.write_shut = False
        self.draining = False  # reading the peer's last frames after a reset
        self.result: Optional[Tuple[str, str]] = None  # (code, message) once failed
        self.started = daemon.clock()
        self.total = 0
        self.bytes_done = 0
        self.current = ""  # name of the file in flight
        self.current_size = 0
        self.current_from = 0  # bytes_done when the file in flight started
        self.progress_at = -math.inf
        self.batching = False  # inside on_readable's event loop: send() only queues
        self.moved = 0  # bytes moved since the idle deadline was last pushed back
        daemon.peer_conns.add(self)

    def label(self) -> str:
        return f"{self.address}"

    def on_readable(self) -> None:
        conn_buf = self.daemon.recv_buf
        # Big reads only inside a file: what one read of frames costs the loop stays bounded.
        size = RECV_BYTES if self.decoder.data_remaining >= FRAME_RECV_BYTES else FRAME_RECV_BYTES
        try:
            n = self.sock.recv_into(conn_buf, size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail_io(exc)
            return
        if self.lingering:
            if n == 0:
                self.close()
            return
        try:
            if n:
                events = self.decoder.feed(self.daemon.recv_view[:n])
            else:
                events = self.decoder.feed_eof()
        except proto.RemoteProtocolError as exc:
            self.abort(exc.code, exc.message)
            return
        self.on_received(n)
        self.batching = True  # answers to these events leave in one write, below
        try:
            for event in events:
                if self.closed or self.lingering:
                    return
                self.on_event(event)
        finally:
            self.batching = False
        if self.out and not self.closed:
            self.flush()
        if not n and not self.closed:
            self.on_eof()

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
        """The exchange moved ``moved`` bytes (no count: an answer, a decision,
        work of ours). Each MIN_PROGRESS_BYTES of them push the idle deadline
        back, so a peer that trickles a byte now and then is dropped all the
        same. Until the peer has opened the exchange, the handshake deadline
        stands, however it trickles."""
        if self.lingering or not self.decoder.opened:
            return
        self.moved += moved
        if self.moved >= MIN_PROGRESS_BYTES:
            self.moved = 0
            self.set_deadline(self.daemon.clock() + self.daemon.config.idle_timeout)

    def on_received(self, count: int) -> None:
        """``count`` bytes came in (0: EOF) and were decoded."""
        self.touch()

    def on_event(self, event: Any) -> None:
        raise NotImplementedError

    def on_eof(self) -> None:
        self.close()

    def fail_io(self, exc: OSError) -> None:
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
            self.end_failed("peer-gone", f"{self.address} closed the connection ({reason})")
        else:
            self.end_failed("io-error", f"{self.address}: {reason}")
        self.close()

    def on_deadline(self) -> None:
        if self.lingering:
            self.close()
            return
        self.end_failed("timeout", f"{self.address} moved less than {MIN_PROGRESS_BYTES} bytes in "
                                   f"{self.daemon.config.idle_timeout:g} s")
        self.close()

    def abort(self, code: str, message: str) -> None:
        """End the exchange: tell the peer why, then close once it has read it."""
        if self.closed or self.lingering:
            return
        self.end_failed(code, message)
        self.out += proto.encode_frame(proto.Error(code, proto.clip_text(message)))
        self.linger()

    def linger(self) -> None:
        """Our last words are queued: send them, half-close, and wait for the
        peer's EOF before closing, so that a reset cannot destroy them (§4.3)."""
        self.lingering = True
        self.set_deadline(self.daemon.clock() + LINGER_S)
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

    def end_failed(self, code: str, message: str) -> None:
        """Record the failure once and let the subclass report and clean up."""
        if self.result is None:
            self.result = (code, message)
            self.daemon.transfers.pop(self.id, None)  # over, though an error frame may still be going out
            self.on_failed(code, message)

    def on_failed(self, code: str, message: str) -> None:
        log.warning("peer %s: %s: %s", self.address, code, printable(message))
        self.daemon.publish({"event": "error", "peer": self.address, "code": code, "message": message})

    def on_closed(self) -> None:
        self.daemon.peer_conns.discard(self)
        if self.result is None and self.id:
            self.end_failed("peer-gone", f"connection to {self.address} closed")
        self.daemon.transfers.pop(self.id, None)

    def describe(self) -> Dict[str, Any]:
        """What `tnet transfers` shows of this transfer."""
        return {
            "id": self.id,
            "direction": "in" if self.role == "acceptor" else "out",
            "peer": self.address,
            "name": self.peer_name,
            "file": self.current,
            "bytes": self.bytes_done,
            "size": self.total,
            "file_bytes": self.bytes_done - self.current_from if self.current else 0,
            "file_size": self.current_size if self.current else 0,
            "seconds": round(self.daemon.clock() - self.started, 3),
        }

    def start_file(self, name: str, size: int) -> None:
        """A file of the batch is now in flight (for describe and progress)."""
        self.current, self.current_size, self.current_from = name, size, self.bytes_done

    def report_progress(self, client: Optional[ClientConn], publish: bool, force: bool = False) -> None:
        if client is None and not publish:
            return  # no one to tell: the common case of a receiver, once per small file
        now = self.daemon.clock()
        if not force and now - self.progress_at < PROGRESS_INTERVAL_S:
            return
        self.progress_at = now
        event = dict(self.describe(), event="progress")
        if client is not None:
            client.reply(event)
        if publish:
            self.daemon.publish(event)


class InboundPeer(PeerConn):
    """A connection a peer opened to us: an announce, a message or a batch."""

    kind = "inbound"
    role = "acceptor"

    def __init__(self, daemon: "Daemon", sock: socket.socket, address: str) -> None:
        super().__init__(daemon, sock, address)
        daemon.inbound.setdefault(address, set()).add(self)
        self.set_deadline(daemon.clock() + daemon.config.handshake_timeout)
        self.offer: Optional[proto.Offer] = None
        self.awaiting_decision = False
        self.entries_done = 0
        self.files_saved = 0
        self.first_failure: Optional[Tuple[str, str]] = None  # (code, message) of the first failed entry
        self.batch = daemon.store.new_batch()
        self.temp: Optional[TempFile] = None  # the file in flight
        self.hasher: Any = None
        self.header: Optional[proto.FileHeader] = None
        # Files being copied into place from another file system, one at a time, in order: entry, copy, header, sha256
        self.copies: Deque[Tuple[int, Copy, proto.FileHeader, str]] = collections.deque()
        self.told_wait_at = -math.inf  # when the sender was last told to wait for a copy

    def touch(self, moved: int = MIN_PROGRESS_BYTES) -> None:
        if not self.awaiting_decision:
            super().touch(moved)

    def on_received(self, count: int) -> None:
        self.touch(count)  # a sender owes us bytes: only enough of them keep it alive

    def backlogged(self) -> bool:
        return len(self.copies) >= MAX_QUEUED_COPIES

    def on_event(self, event: Any) -> None:
        handler = self._HANDLERS.get(type(event))
        if handler is None:  # the decoder lets through only what is legal here
            raise AssertionError(f"unexpected {event!r}")
        handler(self, event)

    def _on_announce(self, event: proto.Announce) -> None:
        if event.nonce in self.daemon.discoveries:  # unasked, it is a claim we cannot check
            self.daemon.learn_peer(event.name, self.address, event.nonce)
        self.close()

    def _on_message(self, event: proto.Message) -> None:
        if not self.daemon.config.allows(self.address):
            self.abort("refused", f"{self.daemon.config.host_name} does not take messages from {self.address}")
            return
        self.daemon.publish({"event": "message", "peer": self.address, "name": event.name, "text": event.text})
        self.send(proto.encode_frame(proto.Ack(self.daemon.config.host_name)))

    def _on_offer(self, event: proto.Offer) -> None:
        daemon = self.daemon
        self.offer, self.peer_name, self.total = event, event.name, event.size
        if not daemon.config.allows(self.address):
            self.abort("refused", f"{daemon.config.host_name} does not take files from {self.address}")
            return
        try:
            daemon.store.check_folders()
        except proto.LocalProtocolError as exc:
            self.abort(exc.code, f"on {daemon.config.host_name}: {exc.message}")
            return
        shortfall = daemon.store.shortfall(event.size, event.entries)
        if shortfall:
            self.abort("no-space", f"not enough space on {daemon.config.host_name}: {shortfall}")
            return
        self.id = daemon.new_transfer_id()
        daemon.transfers[self.id] = self
        if daemon.config.accept == "ask":
            self.awaiting_decision = True
            self.set_deadline(daemon.clock() + daemon.config.ask_timeout)
            self.send(proto.encode_frame(proto.Wait(math.ceil(daemon.config.ask_timeout))))
            daemon.publish(dict(self.describe(), event="offer", entries=event.entries))
            return
        self.decide(True)

    def decide(self, accepted: bool) -> None:
        """Take or decline the offer (at once in ``auto`` mode)."""
        self.awaiting_decision = False
        if not accepted:
            self.abort("declined", f"{self.daemon.config.host_name} declined the files")
            return
        self.started = self.daemon.clock()
        self.touch()
        entries = self.offer.entries if self.offer else 0
        self.daemon.publish(dict(self.describe(), event="transfer-started", entries=entries))
        self.decoder.accept_offer()
        self.send(proto.encode_frame(proto.Accept(self.daemon.config.host_name)))
        self.maybe_complete()

    def on_deadline(self) -> None:
        if self.awaiting_decision:
            self.abort("declined", f"no one on {self.daemon.config.host_name} accepted within "
                                   f"{self.daemon.config.ask_timeout:g} s")
            return
        if not self.decoder.opened and not self.lingering:
            self.end_failed("timeout", f"{self.address} did not open its exchange within "
                                       f"{self.daemon.config.handshake_timeout:g} s")
            self.close()
            return
        super().on_deadline()

    def _on_file(self, event: proto.FileHeader) -> None:
        self.header = event
        self.start_file("/".join(event.path), event.size)
        try:
            self.temp = self.daemon.store.new_temp()
        except OSError as exc:
            code = "disk-full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "temp-failed"
            self.abort(code, f"cannot create a temp file in TEMP_DIR on {self.daemon.config.host_name}: "
                             f"{exc.strerror}")
            return
        self.hasher = hashlib.sha256()
        self.report_progress(None, self.daemon.config.report_progress_in, force=True)

    def _on_data(self, event: proto.FileData) -> None:
        data = event.data
        self.hasher.update(data)
        try:
            write_all(self.temp.fd, data)  # type: ignore[union-attr]  # the decoder sends data only after `file`
        except OSError as exc:
            code = "disk-full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "write-failed"
            self.abort(code, f"writing {self.current} on {self.daemon.config.host_name}: {exc.strerror}")
            return
        self.bytes_done += len(data)
        self.report_progress(None, self.daemon.config.report_progress_in)

    def _on_end(self, event: proto.FileEnd) -> None:
        header, temp = self.header, self.temp
        assert header is not None and temp is not None  # the decoder sends `end` only after `file`
        self.temp = None
        if self.hasher.hexdigest() != event.sha256:
            temp.discard()
            self.entry_failed(header.index, self.current, "verify-failed", f"{self.current}: SHA-256 does not match")
            return
        try:
            saved = self.batch.place(temp, header.path)
            if saved is None:  # TEMP_DIR is on another file system: copy, a slice per turn of the loop
                self.copies.append((header.index, self.batch.start_copy(temp, header.path), header, event.sha256))
        except OSError as exc:
            temp.discard()
            self.entry_failed(header.index, self.current, "save-failed", f"{self.current}: {exc.strerror or exc}")
            return
        if saved is None:
            self.daemon.turn_work[self] = self.step_copies
            self.keep_sender_waiting()
            self.update_reading()
            return
        self.file_saved(header, saved, event.sha256)

    def file_saved(self, header: proto.FileHeader, path: str, sha256: str) -> None:
        self.files_saved += 1
        self.daemon.publish(dict(self.describe(), event="file-done", file="/".join(header.path), path=path,
                                 sha256=sha256, size=header.size))
        self.entry_done(header.index)

    def keep_sender_waiting(self) -> None:
        """A long copy can outlast the sender's IDLE_TIMEOUT, and with the
        connection the copy would go: say `wait` at once, then every third of
        that time (§4.1)."""
        now = self.daemon.clock()
        idle = self.daemon.config.idle_timeout
        if now - self.told_wait_at >= idle / 3:
            self.told_wait_at = now
            self.send(proto.encode_frame(proto.Wait(min(math.ceil(idle), proto.MAX_WAIT_S))))

    def step_copies(self) -> None:
        """One slice of the first file being copied into FILE_SAVE_DIR (see Batch.start_copy)."""
        self.touch()  # busy on our side: the sender waits for these results, silent
        self.keep_sender_waiting()
        index, copy, header, sha256 = self.copies[0]
        try:
            finished = copy.step()
        except OSError as exc:
            self.copies.popleft()
            copy.abandon()
            name = "/".join(header.path)
            code = "disk-full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "save-failed"
            self.entry_failed(index, name, code, f"{name}: {exc.strerror or exc}")
            finished = False
        else:
            if finished:
                self.copies.popleft()
                self.file_saved(header, copy.target, sha256)
        if not self.copies:
            self.daemon.turn_work.pop(self, None)
        if not self.closed:
            self.update_reading()

    def _on_folder(self, event: proto.Folder) -> None:
        try:
            self.batch.folder(event.path)
        except OSError as exc:
            name = "/".join(event.path)
            self.entry_failed(event.index, name, "save-failed", f"{name}: {exc.strerror or exc}")
            return
        self.entry_done(event.index)

    def _on_sender_failed(self, event: proto.Failed) -> None:
        if self.header is None or event.index != self.header.index:
            self.abort("unexpected-frame", f"'failed' for entry {event.index}, which is not in flight")
            return
        self.discard_temp()
        self.entry_failed(event.index, self.current, event.code, f"{self.address}: {event.message}")

    def _on_error(self, event: proto.Error) -> None:
        self.end_failed(event.code, f"{self.address}: {event.message}")
        self.close()

    _HANDLERS: Dict[type, Callable[..., None]] = {
        proto.Announce: _on_announce,
        proto.Message: _on_message,
        proto.Offer: _on_offer,
        proto.FileHeader: _on_file,
        proto.FileData: _on_data,
        proto.FileEnd: _on_end,
        proto.Folder: _on_folder,
        proto.Failed: _on_sender_failed,
        proto.Error: _on_error,
    }

    def entry_done(self, index: int) -> None:
        self.entries_done += 1
        self.send(proto.encode_frame(proto.Done(index)))
        self.maybe_complete()

    def entry_failed(self, index: int, name: str, code: str, message: str) -> None:
        self.entries_done += 1
        if self.first_failure is None:
            self.first_failure = (code, message)
        log.warning("from %s: %s: %s", self.address, code, printable(message))
        self.daemon.publish(dict(self.describe(), event="file-failed", file=name, code=code, message=message))
        self.send(proto.encode_frame(proto.Failed(index, code, proto.clip_text(message))))
        self.maybe_complete()

    def maybe_complete(self) -> None:
        if self.offer is not None and self.entries_done == self.offer.entries and self.result is None:
            self.result = self.first_failure or ("ok", "")
            self.current = ""
            summary = dict(self.describe(), entries=self.offer.entries, files=self.files_saved)
            if self.first_failure is None:
                self.daemon.publish(dict(summary, event="transfer-done"))
            else:  # as the sender reports it: the batch failed, with its first reason
                code, message = self.first_failure
                self.daemon.publish(dict(summary, event="transfer-failed", code=code, message=message))
            self.daemon.transfers.pop(self.id, None)

    def on_eof(self) -> None:
        self.close()  # after a message, an announce, or a whole batch

    def discard_temp(self) -> None:
        if self.temp is not None:
            self.temp.discard()
            self.temp = None

    def on_failed(self, code: str, message: str) -> None:
        self.discard_temp()
        self.drop_copies()  # before an error frame goes out: no `done` may follow it
        if self.id:
            log.warning("transfer %s from %s failed: %s: %s", self.id, self.address, code, printable(message))
            self.daemon.publish(dict(self.describe(), event="transfer-failed", code=code, message=message))
        else:
            super().on_failed(code, message)

    def on_closed(self) -> None:
        super().on_closed()
        same_address = self.daemon.inbound.get(self.address)
        if same_address is not None:
            same_address.discard(self)
            if not same_address:
                del self.daemon.inbound[self.address]
        self.discard_temp()
        self.drop_copies()
        self.batch.close()

    def drop_copies(self) -> None:
        """The sender will hear no `done` for these files: nothing of them stays."""
        for _, copy, _, _ in self.copies:
            copy.abandon()
        self.copies.clear()
        self.daemon.turn_work.pop(self, None)


class OutboundPeer(PeerConn):
    """A connection we open to a peer: to announce, to message, or to send."""

    kind = "outbound"
    role = "initiator"

    def __init__(self, daemon: "Daemon", address: str, first: Any,
                 client: Optional[ClientConn] = None, entries: Optional[Entries] = None) -> None:
        super().__init__(daemon, socket.socket(socket.AF_INET, socket.SOCK_STREAM), address)
        self.first = first  # the frame that opens the exchange
        self.client = client
        self.entries = entries if entries is not None else Entries()
        self.connected = False
        self.next_entry = 0
        self.answered = bytearray(len(self.entries))  # 1 once the receiver answered that entry
        self.answers = 0
        self.failures = 0
        self.first_failure: Optional[Tuple[str, str]] = None  # (code, message)
        self.streaming = False
        self.file_fd = -1  # sendfile source (at explicit offsets); read in order for the hash
        self.hasher: Any = None
        self.entry: Optional[int] = None  # index of the file in flight
        self.entry_size = 0
        self.entry_path = ""  # its local path
        self.sent = 0  # bytes of the current file on the wire
        self.stat: Optional[os.stat_result] = None
        self.use_sendfile = hasattr(os, "sendfile")
        self.events = 0  # registered by connect()
        self.total = self.entries.total
        if client is not None:
            client.job = self
        if isinstance(first, proto.Offer):
            self.id = daemon.new_transfer_id()
            daemon.transfers[self.id] = self
        elif isinstance(first, proto.Announce):
            daemon.answering.add(self)

    def connect(self, port: int) -> None:
        """Start a non-blocking connect from BIND_ADDRESS; ``on_writable`` ends it."""
        daemon, sock = self.daemon, self.sock
        self.set_deadline(daemon.clock() + daemon.config.handshake_timeout)
        try:
            sock.setblocking(False)
            if daemon.config.bind_address != "0.0.0.0":
                sock.bind((daemon.config.bind_address, 0))  # peers see our address
            daemon.sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self)
            self.events = selectors.EVENT_READ | selectors.EVENT_WRITE
            err = sock.connect_ex((self.address, port))
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self.connect_failed(err)

    def fail_io(self, exc: OSError) -> None:
        if self.connected:
            super().fail_io(exc)
        else:
            self.connect_failed(exc.errno or errno.EIO)

    def connect_failed(self, err: int) -> None:
        self.end_failed("unreachable", f"cannot reach {self.address}: {os.strerror(err)}")
        self.close()

    def on_deadline(self) -> None:
        if not self.connected:  # SYNs unanswered: no host there, or a firewall
            self.end_failed("unreachable", f"cannot reach {self.address}: no answer within "
                                           f"{self.daemon.config.handshake_timeout:g} s")
            self.close()
            return
        super().on_deadline()

    def on_writable(self) -> None:
        if not self.connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.connect_failed(err)
                return
            self.connected = True
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Connected: from now on the peer's silence is measured by IDLE_TIMEOUT.
            self.set_deadline(self.daemon.clock() + self.daemon.config.idle_timeout)
            self.out += proto.encode_preface() + proto.encode_frame(self.first)
            if isinstance(self.first, proto.Announce):
                self.linger()  # nothing to wait for but the requester's close
            else:
                self.flush()
            return
        self.flush()
        self.pump()

    def pump(self) -> None:
        """Queue frames and small files up to a buffer's worth, then let the
        kernel send big files straight from the page cache; a bounded amount
        per wake-up, so that one fast peer does not starve the others."""
        budget = SEND_CHUNK_BYTES
        while self.streaming and not self.closed and budget > 0 and len(self.out) < MAX_OUT_BUFFER_BYTES:
            if self.entry is not None and self.out:
                self.flush()  # a file's raw bytes go only after what was queued before them
                if self.out:
                    return
            budget -= self.stream_step()
        self.flush()

    def wants_more_output(self) -> bool:
        return self.streaming or not self.connected

    def on_progress_out(self, sent: int) -> None:
        self.touch(sent)  # the receiver reads: enough of that keeps us both alive

    # -- what the receiver says

    def on_event(self, event: Any) -> None:
        if isinstance(event, proto.Ack) and isinstance(self.first, proto.Message):
            self.result = ("ok", "")
            if self.client:
                self.client.finish({"peer": self.address, "name": event.name})
            self.close()
        elif isinstance(event, proto.Accept) and isinstance(self.first, proto.Offer) and not self.streaming \
                and self.next_entry == 0:
            self.streaming = True
            self.peer_name = event.name  # shown, never learnt: names come from discovery answers alone (§5)
            self.started = self.daemon.clock()
            self.touch()
            self.daemon.publish(dict(self.describe(), event="transfer-started", entries=len(self.entries)))
            self.want_write(True)
        elif isinstance(event, proto.Wait) and isinstance(self.first, proto.Offer):
            # The receiver asks its user, or copies files into place: allow that, and the usual silence on top.
            self.set_deadline(self.daemon.clock() + event.seconds + self.daemon.config.idle_timeout)
        elif isinstance(event, (proto.Done, proto.Failed)) and self.streaming_started():
            self.on_result(event)
        elif isinstance(event, proto.Error):
            self.end_failed(event.code, event.message)
            self.close()
        else:
            self.abort("unexpected-frame", f"{type(event).__name__} is not allowed here")

    def streaming_started(self) -> bool:
        return isinstance(self.first, proto.Offer) and (self.streaming or self.next_entry > 0)

    def on_result(self, event: Any) -> None:
        if event.index >= self.next_entry or self.answered[event.index]:
            self.abort("unexpected-frame", f"result for entry {event.index}, which was not sent or is answered")
            return
        entries, index = self.entries, event.index
        self.answered[index] = 1
        self.answers += 1
        name = "/".join(entries.parts(index))
        if isinstance(event, proto.Done):
            result = {"event": "file-done", "file": name, "size": entries.size(index),
                      "folder": entries.is_folder(index)}
        else:
            result = {"event": "file-failed", "file": name, "size": entries.size(index), "code": event.code,
                      "error": event.message}
            self.failures += 1
            if self.first_failure is None:
                self.first_failure = (event.code, event.message)
        if self.client:
            self.client.reply(dict(result, id=self.id))
        if self.answers == len(entries):
            self.complete()

    def complete(self) -> None:
        seconds = self.daemon.clock() - self.started
        summary = {"id": self.id, "direction": "out", "peer": self.address, "name": self.peer_name,
                   "files": len(self.entries), "bytes": self.total, "seconds": round(seconds, 3)}
        if self.first_failure is not None:
            code, message = self.first_failure
            self.result = self.first_failure
            self.daemon.publish(dict(summary, event="transfer-failed", code=code, message=message))
            if self.client:
                self.client.fail(code, f"{self.failures} of {len(self.entries)} failed; first: {message}", **summary)
        else:
            self.result = ("ok", "")
            self.daemon.publish(dict(summary, event="transfer-done"))
            if self.client:
                self.client.finish(summary)
        self.close()

    def on_eof(self) -> None:
        self.end_failed("peer-gone", f"{self.address} closed the connection")
        self.close()

    # -- streaming files

    def stream_step(self) -> int:
        """Put the next piece of the batch on the wire; return bytes consumed."""
        if self.entry is None and self.next_entry == len(self.entries):
            self.streaming = False  # all sent; results are on their way
            self.want_write(bool(self.out))
            return SEND_CHUNK_BYTES
        try:
            step = self.start_entry() if self.entry is None else self.send_file_piece()
        except proto.LocalProtocolError as exc:
            self.abort(exc.code, exc.message)
            return 0
        except (BlockingIOError, InterruptedError):
            return SEND_CHUNK_BYTES
        except OSError as exc:
            self.fail_io(exc)
            return 0
        if self.entry is not None and self.sent == self.entry_size and not (self.closed or self.lingering):
            self.finish_entry()
        return max(step, 1)

    def start_entry(self) -> int:
        entries, index = self.entries, self.next_entry
        self.next_entry += 1
        parts, size = entries.parts(index), entries.size(index)
        self.start_file("/".join(parts), size)
        if entries.is_folder(index):
            self.out += proto.encode_frame(proto.Folder(index, parts))
            return HEADER_COST_BYTES
        path = entries.local_path(index)
        try:
            # Never blocks (a FIFO swapped in would hold the loop until someone
            # opens it) and never follows a link swapped in since the walk.
            self.file_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC)
            self.stat = os.fstat(self.file_fd)
        except OSError as exc:
            self.close_file()
            if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO, errno.ENOTDIR):
                return self.disown(index, parts, f"{path} was replaced or removed since the walk ({exc.strerror})")
            self.abort("file-error", f"cannot read {path}: {exc.strerror}")
            return 0
        if not stat.S_ISREG(self.stat.st_mode):
            self.close_file()
            return self.disown(index, parts, f"{path} is no longer a regular file")
        if self.stat.st_size != size:
            self.close_file()
            return self.disown(index, parts, f"{path} changed size since the offer")
        self.entry, self.entry_size, self.entry_path = index, size, path
        self.sent, self.hasher = 0, hashlib.sha256()
        self.out += proto.encode_frame(proto.FileHeader(index, parts, size))
        if size <= INLINE_FILE_BYTES:  # stream_step finishes it at once
            self.read_for_hash(size, self.out)
            self.sent = size
            self.bytes_done += size
            return HEADER_COST_BYTES + size
        self.report_progress(self.client, self.daemon.config.report_progress_out, force=True)  # a 0% line
        return HEADER_COST_BYTES

    def disown(self, index: int, parts: Tuple[str, ...], reason: str) -> int:
        """An entry that cannot be sent as offered fails alone: a header with
        no bytes, then `failed` in place of its `end` (§4.2)."""
        self.bytes_done += self.entries.size(index)
        self.out += proto.encode_frame(proto.FileHeader(index, parts, 0))
        self.out += proto.encode_frame(proto.Failed(index, "file-changed", proto.clip_text(reason)))
        return HEADER_COST_BYTES

    def send_file_piece(self) -> int:
        """One sendfile (or read and send) of the current file; hashes what went."""
        count = min(SEND_CHUNK_BYTES, self.entry_size - self.sent)
        if self.use_sendfile:
            try:
                sent = os.sendfile(self.sock.fileno(), self.file_fd, self.sent, count)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                self.use_sendfile = False  # e.g. a file system without it: copy instead
                return 0
            self.read_for_hash(sent)
        else:
            before = len(self.out)
            self.read_for_hash(count, self.out)  # hashed and read: it must go, with the next flush
            sent = len(self.out) - before
        if sent == 0 and count:
            raise proto.LocalProtocolError("file-changed", f"{self.entry_path} shrank while being sent")
        self.sent += sent
        self.bytes_done += sent
        self.touch(sent)
        self.report_progress(self.client, self.daemon.config.report_progress_out)
        return sent

    def read_for_hash(self, count: int, copy_to: Optional[bytearray] = None) -> None:
        """Hash the next ``count`` bytes of the file (and append them to
        ``copy_to``). Reading after sendfile costs a copy from the page cache
        but keeps one pass of hashing per side (§4.2); the reads go into the
        daemon's one receive buffer, so no chunk is ever allocated. sendfile
        takes explicit offsets, so the descriptor's own position is the
        hash's."""
        view = self.daemon.recv_view
        while count:
            n = os.readv(self.file_fd, [view[:min(count, len(view))]])
            if n == 0:
                raise proto.LocalProtocolError("file-changed", f"{self.current} shrank while being sent")
            self.hasher.update(view[:n])
            if copy_to is not None:
                copy_to += view[:n]
            count -= n

    def finish_entry(self) -> None:
        assert self.entry is not None and self.stat is not None
        now = os.fstat(self.file_fd)
        changed = (now.st_size, now.st_mtime_ns) != (self.stat.st_size, self.stat.st_mtime_ns)
        if changed:
            reason = proto.clip_text(f"{self.current} changed while being sent")
            self.out += proto.encode_frame(proto.Failed(self.entry, "file-changed", reason))
        else:
            self.out += proto.encode_frame(proto.FileEnd(self.hasher.hexdigest()))
        self.close_file()
        self.entry = None

    def close_file(self) -> None:
        if self.file_fd >= 0:
            os.close(self.file_fd)
            self.file_fd = -1

    def on_failed(self, code: str, message: str) -> None:
        self.streaming = False
        self.close_file()
        if self.id:
            self.daemon.publish(dict(self.describe(), event="transfer-failed", code=code, message=message))
        client, self.client = self.client, None
        if client is not None and not client.closed:
            client.fail(code, message)
        if self.id:
            log.warning("transfer %s to %s failed: %s: %s", self.id, self.address, code, printable(message))
        else:
            log.info("to %s: %s: %s", self.address, code, printable(message))

    def abort(self, code: str, message: str) -> None:
        unframed = not self.connected or (self.entry is not None and self.sent < self.entry_size)
        if unframed and not self.closed:
            # Before the preface, or mid-file, an error frame would be read as
            # garbage or as file bytes (§4.3): just close; a receiver mid-file
            # sees the file cut short (`truncated`).
            self.end_failed(code, message)
            self.close()
            return
        super().abort(code, message)

    def on_closed(self) -> None:
        super().on_closed()
        self.close_file()
        self.daemon.answering.discard(self)


class Refusal(Conn):
    """A connection we do not take (too many open, or from its address): it
    is told why in an error frame, as a refused offer would be (§4.3), and
    closed once the peer closed or LINGER_S passed."""

    def __init__(self, daemon: "Daemon", sock: socket.socket, code: str, message: str) -> None:
        super().__init__(daemon, sock)
        daemon.refusals.add(self)
        self.set_deadline(daemon.clock() + LINGER_S)
        self.send(proto.encode_preface() + proto.encode_frame(proto.Error(code, proto.clip_text(message))))
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
        self.daemon.refusals.discard(self)
