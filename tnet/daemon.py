"""The tnet daemon: one thread, one ``selectors`` loop, four sockets.

Everything that touches the world lives here: the loop and its timer heap,
the TCP listener (files and messages from peers), the UDP listener
(discovery requests), the UNIX command socket (local clients) and the UNIX
events socket (local subscribers); one object per connection holding its
socket, decoder, outgoing buffer and deadline; temp file -> verify -> move;
event fan-out; signals.

The bytes themselves are parsed and built by ``protocol`` (no I/O there);
``util`` supplies the configuration. Reading order for a newcomer: ``Daemon``
(the loop and the shared state), then ``ClientConn`` (the local API), then
``InboundPeer`` and ``OutboundPeer`` (the two ends of a transfer).

Every socket callback has one boundary that turns ``OSError`` and
``ProtocolError`` into "drop this connection, say why on the events socket";
the loop's last-resort guard logs a traceback and drops only the connection
involved. The daemon never writes outside TEMP_DIR and FILE_SAVE_DIR and
never replaces an existing file (§4.2).
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import ipaddress
import itertools
import logging
import math
import os
import selectors
import shutil
import signal
import socket
import stat
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from . import __version__
from . import protocol as proto
from .util import Config, broadcast_targets, local_networks, monotonic, printable

log = logging.getLogger("tnet")

RECV_BYTES = 1024 * 1024  # one preallocated receive buffer, reused for every read
SEND_CHUNK_BYTES = 4 * 1024 * 1024  # at most this per sendfile call
INLINE_FILE_BYTES = 64 * 1024  # smaller files are read into the send buffer: batches
MAX_OUT_BUFFER_BYTES = 256 * 1024  # stop queueing frames for a peer beyond this
MAX_SUBSCRIBER_BUFFER_BYTES = 1024 * 1024  # a subscriber this far behind is dropped
MAX_CLIENT_BUFFER_BYTES = 4 * 1024 * 1024  # likewise for a command client
MAX_DATAGRAMS_PER_WAKE = 64  # then let other sockets have a turn
MAX_ANSWERS_PER_WINDOW = 2  # discovery answers per requester address per window
ANSWER_WINDOW_S = 1.0
MAX_PENDING_ANSWERS = 64  # announce connections in flight, all requesters together
MAX_PEERS = 1024  # peers remembered by name; the oldest sighting is forgotten first
NETWORKS_TTL_S = 5.0  # how long the list of directly connected networks is trusted
LINGER_S = 2.0  # after an error frame, how long we wait for the peer to read it
MAX_DRAIN_READS = 64  # reads of what a reset peer left queued, looking for its error frame
PROGRESS_INTERVAL_S = 0.25  # progress events per transfer, at most four a second
DEFAULT_DISCOVER_S = 1.0
LISTEN_BACKLOG = 128
SOCKET_DIR_MODE = 0o700
SOCKET_MODE = 0o600


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to change."""


class LocalError(Exception):
    """A local request cannot be carried out: ``code`` and a one-line reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- Connections ----------------------------------------------------------------


class Conn:
    """A socket in the loop: its outgoing buffer and its deadline."""

    kind = "conn"

    def __init__(self, daemon: "Daemon", sock: socket.socket) -> None:
        self.daemon = daemon
        self.sock = sock
        self.out = bytearray()
        self.deadline = math.inf
        self.scheduled = math.inf  # when the timer heap will next look at us
        self.closed = False
        self.events = selectors.EVENT_READ  # what the selector watches; 0: not registered
        self.reading = True  # False once the peer half-closed and nothing more is read
        self.close_when_flushed = False
        self.max_out = MAX_CLIENT_BUFFER_BYTES

    def label(self) -> str:
        return self.kind

    def set_deadline(self, when: float) -> None:
        self.deadline = when
        self.daemon.timers.schedule(self)

    def send(self, data: bytes) -> None:
        """Queue ``data`` and write what the socket takes now."""
        if self.closed:
            return
        self.out += data
        if len(self.out) > self.max_out:
            self.on_overflow()
            return
        self.flush()

    def flush(self) -> None:
        try:
            while self.out:
                sent = self.sock.send(self.out)
                del self.out[:sent]
                self.on_progress_out()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self.fail_io(exc)
            return
        if self.close_when_flushed and not self.out:
            self.close()
            return
        self.want_write(bool(self.out) or self.wants_more_output())

    def want_write(self, wanted: bool) -> None:
        events = (selectors.EVENT_READ if self.reading else 0) | (selectors.EVENT_WRITE if wanted else 0)
        if events == self.events or self.closed:
            return
        if not events:
            self.daemon.sel.unregister(self.sock)
        elif not self.events:
            self.daemon.sel.register(self.sock, events, self)
        else:
            self.daemon.sel.modify(self.sock, events, self)
        self.events = events

    def wants_more_output(self) -> bool:
        return False

    def on_progress_out(self) -> None:
        pass

    def on_writable(self) -> None:
        self.flush()

    def on_overflow(self) -> None:
        self.close()

    def fail_io(self, exc: OSError) -> None:
        self.close()

    def on_deadline(self) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.events:
            self.daemon.sel.unregister(self.sock)
        self.sock.close()
        self.on_closed()

    def on_closed(self) -> None:
        pass


class Timers:
    """A heap of deadlines. Each connection has at most one live entry; a
    deadline that moved later is re-filed when its old entry comes up."""

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int, Any]] = []
        self._seq = itertools.count()

    def schedule(self, item: Any) -> None:
        if item.deadline < item.scheduled:
            item.scheduled = item.deadline
            heapq.heappush(self._heap, (item.deadline, next(self._seq), item))

    def next_wait(self, now: float) -> Optional[float]:
        """Seconds until the nearest deadline, or None: block until I/O."""
        while self._heap and (self._heap[0][2].closed or self._heap[0][0] != self._heap[0][2].scheduled):
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return max(self._heap[0][0] - now, 0.0)

    def pop_due(self, now: float) -> List[Any]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            when, _, item = heapq.heappop(self._heap)
            if item.closed or when != item.scheduled:
                continue
            item.scheduled = math.inf
            if item.deadline <= now:
                due.append(item)
            else:
                self.schedule(item)
        return due


class Subscriber(Conn):
    """A local client of the events socket: it reads, we write."""

    kind = "subscriber"

    def __init__(self, daemon: "Daemon", sock: socket.socket) -> None:
        super().__init__(daemon, sock)
        self.max_out = MAX_SUBSCRIBER_BUFFER_BYTES

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(4096)  # nothing is expected; EOF means gone
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()

    def on_overflow(self) -> None:
        log.warning("events subscriber dropped: more than %d bytes behind", self.max_out)
        self.close()

    def on_closed(self) -> None:
        self.daemon.subscribers.discard(self)


class ClientConn(Conn):
    """A local client of the command socket: one JSON request at a time (§6)."""

    kind = "client"

    def __init__(self, daemon: "Daemon", sock: socket.socket) -> None:
        super().__init__(daemon, sock)
        self.decoder = proto.LineDecoder()
        self.busy = False  # a request is being answered
        self.job: Optional["OutboundPeer"] = None  # the exchange it waits on

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # A half-close (socat and nc do it at the end of their input) still
            # wants its answer. A client gone altogether (Ctrl-C) fails even a
            # write of nothing: cancel its job now, not at a next write that a
            # stalled transfer may never make.
            if self.busy and not self.still_reading():
                self.close()
                return
            self.reading = False
            self.close_after_flush() if not self.busy else self.want_write(bool(self.out))
            return
        try:
            lines = self.decoder.feed(data)
        except proto.RemoteProtocolError as exc:
            log.warning("command client dropped: %s", exc)
            self.fail(exc.code, exc.message)
            self.close_after_flush()
            return
        for line in lines:
            if self.busy:  # answered, but the request in flight goes on untouched
                self.send(proto.encode_line({"ok": False, "code": "busy",
                                             "error": "one request at a time on a connection"}))
                continue
            try:
                request = proto.decode_request(line)
            except proto.RemoteProtocolError as exc:
                self.fail(exc.code, exc.message)
                continue
            self.busy = True
            try:
                COMMANDS[request.cmd](self.daemon, self, request.args)
            except LocalError as exc:
                self.fail(exc.code, exc.message)

    def reply(self, obj: Dict[str, Any]) -> None:
        """An intermediate line (progress); the request goes on."""
        self.send(proto.encode_line(obj))

    def finish(self, obj: Dict[str, Any]) -> None:
        """The final line of the request."""
        self.end_request(dict(obj, ok=True))

    def fail(self, code: str, message: str, **extra: Any) -> None:
        self.end_request(dict(extra, ok=False, code=code, error=message))

    def end_request(self, answer: Dict[str, Any]) -> None:
        self.busy = False
        self.job = None
        self.send(proto.encode_line(answer))
        if not self.reading:
            self.close_after_flush()

    def close_after_flush(self) -> None:
        self.close_when_flushed = True
        self.flush()

    def still_reading(self) -> bool:
        """After EOF: did the client only shut its writing half? A write of
        nothing fails (EPIPE) once it has closed altogether."""
        try:
            self.sock.send(b"")
        except OSError:
            return False
        return True

    def on_overflow(self) -> None:
        log.warning("command client dropped: more than %d bytes behind", self.max_out)
        self.close()

    def on_closed(self) -> None:
        job, self.job = self.job, None
        if job is not None and not job.closed:
            # The one who asked is gone (Ctrl-C): nobody wants this transfer.
            job.abort("cancelled", "the local client disconnected")


# --- Peers ------------------------------------------------------------------------


@dataclass
class Entry:
    """One file or folder of an outgoing batch."""

    path: str  # local path; "" for a folder
    parts: Tuple[str, ...]  # its name on the wire
    size: int


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
        daemon.peer_count += 1

    def label(self) -> str:
        return f"{self.address}"

    def on_readable(self) -> None:
        conn_buf = self.daemon.recv_buf
        try:
            n = self.sock.recv_into(conn_buf)
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
        self.touch()
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

    def touch(self) -> None:
        """The peer is alive: push the idle deadline back. Until it has opened
        the exchange, the handshake deadline stands, however it trickles."""
        if not self.lingering and self.decoder.opened:
            self.set_deadline(self.daemon.clock() + self.daemon.config.idle_timeout)

    def on_progress_out(self) -> None:
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
        self.end_failed("timeout", f"{self.address} was silent for {self.daemon.config.idle_timeout:g} s")
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
        # A peer that does not read our answers gets nothing more read from it:
        # what we queue for it stays bounded.
        reading = len(self.out) <= MAX_OUT_BUFFER_BYTES
        if reading != self.reading:
            self.reading = reading
            self.want_write(bool(self.out) or self.wants_more_output())

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
        self.daemon.peer_count -= 1
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
        self.set_deadline(daemon.clock() + daemon.config.handshake_timeout)
        self.offer: Optional[proto.Offer] = None
        self.awaiting_decision = False
        self.entries_done = 0
        self.files_saved = 0
        self.first_failure: Optional[Tuple[str, str]] = None  # (code, message) of the first failed entry
        self.tops: Dict[str, str] = {}  # top folder as sent -> as saved
        self.temp_path = ""
        self.temp_fd = -1
        self.hasher: Any = None
        self.header: Optional[proto.FileHeader] = None

    def touch(self) -> None:
        if not self.awaiting_decision:
            super().touch()

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
        self.daemon.learn_peer(event.name, self.address)
        self.daemon.publish({"event": "message", "peer": self.address, "name": event.name, "text": event.text})
        self.send(proto.encode_frame(proto.Ack(self.daemon.config.host_name)))

    def _on_offer(self, event: proto.Offer) -> None:
        daemon = self.daemon
        self.offer, self.peer_name, self.total = event, event.name, event.size
        if not daemon.config.allows(self.address):
            self.abort("refused", f"{daemon.config.host_name} does not take files from {self.address}")
            return
        daemon.learn_peer(event.name, self.address)
        try:
            daemon.ensure_folders()
        except LocalError as exc:
            self.abort(exc.code, f"on {daemon.config.host_name}: {exc.message}")
            return
        shortfall = daemon.space_shortfall(event.size)
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
            self.temp_fd, self.temp_path = tempfile.mkstemp(
                prefix=".tnet-", suffix=".part", dir=self.daemon.config.temp_dir
            )
        except OSError as exc:
            self.abort("temp-failed", f"cannot create a temp file in TEMP_DIR: {exc.strerror}")
            return
        self.hasher = hashlib.sha256()
        self.report_progress(None, self.daemon.config.report_progress_in, force=True)

    def _on_data(self, event: proto.FileData) -> None:
        data = event.data
        self.hasher.update(data)
        try:
            write_all(self.temp_fd, data)
        except OSError as exc:
            code = "disk-full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "write-failed"
            self.abort(code, f"writing {self.current} on {self.daemon.config.host_name}: {exc.strerror}")
            return
        self.bytes_done += len(data)
        self.report_progress(None, self.daemon.config.report_progress_in)

    def _on_end(self, event: proto.FileEnd) -> None:
        header = self.header
        assert header is not None  # the decoder sends `end` only after `file`
        self.close_temp()
        if self.hasher.hexdigest() != event.sha256:
            self.discard_temp()
            self.entry_failed(header.index, "verify-failed", f"{self.current}: SHA-256 does not match")
            return
        try:
            saved = self.daemon.store.place_file(self.temp_path, header.path, self.tops)
        except OSError as exc:
            self.discard_temp()
            self.entry_failed(header.index, "save-failed", f"{self.current}: {exc.strerror or exc}")
            return
        self.temp_path = ""
        self.files_saved += 1
        self.daemon.publish(dict(self.describe(), event="file-done", path=saved, sha256=event.sha256,
                                 size=header.size))
        self.entry_done(header.index)

    def _on_folder(self, event: proto.Folder) -> None:
        try:
            self.daemon.store.make_folder(event.path, self.tops)
        except OSError as exc:
            self.entry_failed(event.index, "save-failed", f"{'/'.join(event.path)}: {exc.strerror or exc}")
            return
        self.entry_done(event.index)

    def _on_sender_failed(self, event: proto.Failed) -> None:
        if self.header is None or event.index != self.header.index:
            self.abort("unexpected-frame", f"'failed' for entry {event.index}, which is not in flight")
            return
        self.discard_temp()
        self.entry_failed(event.index, event.code, f"{self.address}: {event.message}")

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

    def entry_failed(self, index: int, code: str, message: str) -> None:
        self.entries_done += 1
        if self.first_failure is None:
            self.first_failure = (code, message)
        log.warning("from %s: %s: %s", self.address, code, printable(message))
        self.daemon.publish(dict(self.describe(), event="file-failed", code=code, message=message))
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

    def close_temp(self) -> None:
        if self.temp_fd >= 0:
            os.close(self.temp_fd)
            self.temp_fd = -1

    def discard_temp(self) -> None:
        self.close_temp()
        if self.temp_path:
            remove_quietly(self.temp_path)
            self.temp_path = ""

    def on_failed(self, code: str, message: str) -> None:
        self.discard_temp()
        if self.id:
            log.warning("transfer %s from %s failed: %s: %s", self.id, self.address, code, printable(message))
            self.daemon.publish(dict(self.describe(), event="transfer-failed", code=code, message=message))
        else:
            super().on_failed(code, message)

    def on_closed(self) -> None:
        super().on_closed()
        self.discard_temp()


class OutboundPeer(PeerConn):
    """A connection we open to a peer: to announce, to message, or to send."""

    kind = "outbound"
    role = "initiator"

    def __init__(self, daemon: "Daemon", address: str, first: Any,
                 client: Optional[ClientConn] = None, entries: Optional[List[Entry]] = None) -> None:
        super().__init__(daemon, socket.socket(socket.AF_INET, socket.SOCK_STREAM), address)
        self.first = first  # the frame that opens the exchange
        self.client = client
        self.entries = entries or []
        self.connected = False
        self.next_entry = 0
        self.results: Dict[int, Dict[str, Any]] = {}
        self.streaming = False
        self.file_fd = -1  # sendfile source (at explicit offsets); read in order for the hash
        self.hasher: Any = None
        self.entry: Optional[Entry] = None
        self.sent = 0  # bytes of the current file on the wire
        self.stat: Optional[os.stat_result] = None
        self.use_sendfile = hasattr(os, "sendfile")
        self.events = 0  # registered by connect()
        self.total = sum(entry.size for entry in self.entries)
        if client is not None:
            client.job = self
        if isinstance(first, proto.Offer):
            self.id = daemon.new_transfer_id()
            daemon.transfers[self.id] = self
        elif isinstance(first, proto.Announce):
            daemon.pending_answers += 1

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

    def on_writable(self) -> None:
        if not self.connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.connect_failed(err)
                return
            self.connected = True
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.touch()
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

    # -- what the receiver says

    def on_event(self, event: Any) -> None:
        if isinstance(event, proto.Ack) and isinstance(self.first, proto.Message):
            self.result = ("ok", "")
            self.daemon.learn_peer(event.name, self.address)
            if self.client:
                self.client.finish({"peer": self.address, "name": event.name})
            self.close()
        elif isinstance(event, proto.Accept) and isinstance(self.first, proto.Offer) and not self.streaming \
                and self.next_entry == 0:
            self.streaming = True
            self.peer_name = event.name
            self.daemon.learn_peer(event.name, self.address)
            self.started = self.daemon.clock()
            self.touch()
            self.daemon.publish(dict(self.describe(), event="transfer-started", entries=len(self.entries)))
            self.want_write(True)
        elif isinstance(event, proto.Wait) and isinstance(self.first, proto.Offer) and not self.streaming_started():
            # The receiver asks its user: allow that, and the usual silence on top.
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
        if event.index >= self.next_entry or event.index in self.results:
            self.abort("unexpected-frame", f"result for entry {event.index}, which was not sent or is answered")
            return
        entry = self.entries[event.index]
        name = "/".join(entry.parts)
        if isinstance(event, proto.Done):
            result = {"event": "file-done", "file": name, "size": entry.size, "folder": not entry.path}
        else:
            result = {"event": "file-failed", "file": name, "size": entry.size, "code": event.code,
                      "error": event.message}
        self.results[event.index] = result
        if self.client:
            self.client.reply(dict(result, id=self.id))
        if len(self.results) == len(self.entries):
            self.complete()

    def complete(self) -> None:
        seconds = self.daemon.clock() - self.started
        failures = [r for r in self.results.values() if r["event"] == "file-failed"]
        summary = {"id": self.id, "direction": "out", "peer": self.address, "name": self.peer_name,
                   "files": len(self.entries), "bytes": self.total, "seconds": round(seconds, 3)}
        if failures:
            first = failures[0]
            self.result = (first["code"], first["error"])
            self.daemon.publish(dict(summary, event="transfer-failed", code=first["code"], message=first["error"]))
            if self.client:
                self.client.fail(first["code"], f"{len(failures)} of {len(self.entries)} failed; first: "
                                 f"{first['error']}", **summary)
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
        except LocalError as exc:
            self.abort(exc.code, exc.message)
            return 0
        except (BlockingIOError, InterruptedError):
            return SEND_CHUNK_BYTES
        except OSError as exc:
            self.fail_io(exc)
            return 0
        if self.entry is not None and self.sent == self.entry.size and not (self.closed or self.lingering):
            self.finish_entry()
        return max(step, 1)

    def start_entry(self) -> int:
        entry = self.entries[self.next_entry]
        index = self.next_entry
        self.next_entry += 1
        self.start_file("/".join(entry.parts), entry.size)
        if not entry.path:
            self.out += proto.encode_frame(proto.Folder(index, entry.parts))
            return 64
        try:
            self.file_fd = os.open(entry.path, os.O_RDONLY)
            self.stat = os.fstat(self.file_fd)
        except OSError as exc:
            self.close_file()
            self.abort("file-error", f"cannot read {entry.path}: {exc.strerror}")
            return 0
        if self.stat.st_size != entry.size:
            self.abort("file-changed", f"{entry.path} changed size since the offer")
            return 0
        self.entry, self.sent, self.hasher = entry, 0, hashlib.sha256()
        self.out += proto.encode_frame(proto.FileHeader(index, entry.parts, entry.size))
        if entry.size <= INLINE_FILE_BYTES:  # stream_step finishes it at once
            self.read_for_hash(entry.size, self.out)
            self.sent = entry.size
            self.bytes_done += entry.size
            return 64 + entry.size
        self.report_progress(self.client, self.daemon.config.report_progress_out, force=True)  # a 0% line
        return 64

    def send_file_piece(self) -> int:
        """One sendfile (or read and send) of the current file; hashes what went."""
        entry = self.entry
        assert entry is not None
        count = min(SEND_CHUNK_BYTES, entry.size - self.sent)
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
            raise LocalError("file-changed", f"{entry.path} shrank while being sent")
        self.sent += sent
        self.bytes_done += sent
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
                raise LocalError("file-changed", f"{self.current} shrank while being sent")
            self.hasher.update(view[:n])
            if copy_to is not None:
                copy_to += view[:n]
            count -= n

    def finish_entry(self) -> None:
        entry = self.entry
        assert entry is not None and self.stat is not None
        now = os.fstat(self.file_fd)
        changed = (now.st_size, now.st_mtime_ns) != (self.stat.st_size, self.stat.st_mtime_ns)
        index = self.next_entry - 1
        if changed:
            reason = proto.clip_text(f"{self.current} changed while being sent")
            self.out += proto.encode_frame(proto.Failed(index, "file-changed", reason))
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
        if self.entry is not None and self.sent < self.entry.size and not self.closed:
            # Mid-file an error frame would be read as file bytes (§4.3): just
            # close; the receiver sees the file cut short (`truncated`).
            self.end_failed(code, message)
            self.close()
            return
        super().abort(code, message)

    def on_closed(self) -> None:
        super().on_closed()
        self.close_file()
        if isinstance(self.first, proto.Announce):
            self.daemon.pending_answers -= 1


def write_all(fd: int, data: Any) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- The downloads directory ----------------------------------------------------


class Store:
    """Moves verified temp files into FILE_SAVE_DIR without ever replacing
    anything: a taken name becomes ``name (1).ext``, ``name (2).ext``, …"""

    MAX_TRIES = 10_000
    MAX_REMEMBERED = 4096  # names whose last number is remembered

    def __init__(self, save_dir: str, temp_dir: str) -> None:
        self.save_dir = os.path.abspath(save_dir)
        self.temp_dir = os.path.abspath(temp_dir)
        umask = os.umask(0)
        os.umask(umask)
        self.file_mode = 0o666 & ~umask
        self.dir_mode = 0o777 & ~umask
        self.last_number: Dict[Tuple[str, str], int] = {}

    def claim(self, folder: str, name: str, create: Callable[[str], Any]) -> str:
        """Make ``name`` in ``folder`` with ``create``, or its first free
        numbered variant, and return the path. ``create`` must raise
        FileExistsError on a taken name and never replace one. The last
        number given to a name is remembered, so that a thousand copies cost
        a thousand tries, not half a million."""
        key = (folder, name)
        for n, candidate in numbered(name, self.last_number.get(key, 0)):
            target = os.path.join(folder, candidate)
            try:
                create(target)
            except FileExistsError:
                continue
            if len(self.last_number) >= self.MAX_REMEMBERED:
                self.last_number.clear()
            self.last_number[key] = n
            return target
        raise OSError(errno.EEXIST, f"no free name for {name}")

    def place_file(self, temp_path: str, parts: Tuple[str, ...], tops: Dict[str, str]) -> str:
        """Move a verified temp file to its place; return the path it got."""
        folder = self.folder_for(parts[:-1], tops)
        os.chmod(temp_path, self.file_mode)
        try:
            # link(2) is atomic and never replaces: the reservation and the move in one.
            target = self.claim(folder, parts[-1], lambda target: os.link(temp_path, target))
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return self.copy_into(temp_path, folder, parts[-1])
        remove_quietly(temp_path)
        return target

    def copy_into(self, temp_path: str, folder: str, name: str) -> str:
        """TEMP_DIR on another file system: reserve the name with O_EXCL, copy
        to a hidden file beside it, then rename over our own reservation."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        target = self.claim(folder, name, lambda target: os.close(os.open(target, flags, self.file_mode)))
        fd, staging = tempfile.mkstemp(prefix=".tnet-", suffix=".part", dir=folder)
        try:
            os.close(fd)
            shutil.copyfile(temp_path, staging)
            os.chmod(staging, self.file_mode)
            os.replace(staging, target)
        except OSError:
            remove_quietly(staging)
            remove_quietly(target)
            raise
        remove_quietly(temp_path)
        return target

    def make_folder(self, parts: Tuple[str, ...], tops: Dict[str, str]) -> str:
        return self.folder_for(parts, tops)

    def folder_for(self, parts: Tuple[str, ...], tops: Dict[str, str]) -> str:
        """The folder for ``parts`` under FILE_SAVE_DIR, created as needed. The
        top folder of a batch is new (``DIR (1)`` if ``DIR`` exists); below it
        only this batch writes, and no link is ever followed."""
        if not parts:
            return self.save_dir
        top = tops.get(parts[0])
        if top is None:
            top = self.claim(self.save_dir, parts[0], lambda path: os.mkdir(path, self.dir_mode))
            tops[parts[0]] = top
        path = top
        for part in parts[1:]:
            path = os.path.join(path, part)
            try:
                os.mkdir(path, self.dir_mode)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    raise OSError(errno.ENOTDIR, f"{part} exists and is not a folder") from None
        return path


def numbered(name: str, start: int = 0) -> Iterator[Tuple[int, str]]:
    """``name``, then ``stem (n).ext`` from ``start`` on, each a valid name."""
    yield 0, name
    stem, ext = os.path.splitext(name)
    for n in range(max(start, 1), Store.MAX_TRIES):
        suffix = f" ({n}){ext}"
        room = proto.MAX_NAME_BYTES - len(suffix.encode("utf-8"))
        trimmed = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
        yield n, trimmed + suffix


# --- Discovery --------------------------------------------------------------------


@dataclass
class PeerRecord:
    name: str
    address: str
    last_seen: float


Found = Dict[Tuple[str, str], PeerRecord]  # peers by (name, address): duplicates merge


class Discovery:
    """One discovery window: collects announces until its deadline."""

    def __init__(self, nonce: str, deadline: float, on_done: Callable[[Found], Any]) -> None:
        self.nonce = nonce
        self.deadline = deadline
        self.scheduled = math.inf
        self.closed = False
        self.found: Found = {}
        self.on_done = on_done
        self.daemon: Optional[Daemon] = None

    def on_deadline(self) -> None:
        self.closed = True
        assert self.daemon is not None
        self.daemon.discoveries.pop(self.nonce, None)
        self.on_done(self.found)


# --- The daemon ---------------------------------------------------------------------


class Listener:
    """One of the four listening sockets; ``accept`` makes a connection of it."""

    closed = False

    def __init__(self, sock: socket.socket, on_readable: Callable[[], None]) -> None:
        self.sock = sock
        self.on_readable = on_readable

    def on_writable(self) -> None:
        pass

    def label(self) -> str:
        return "listener"

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """The loop and everything the connections share."""

    def __init__(self, config: Config, clock: Callable[[], float] = monotonic,
                 nonce: Callable[[], str] = lambda: os.urandom(16).hex()) -> None:
        self.config = config
        self.clock = clock
        self.nonce = nonce
        self.sel = selectors.DefaultSelector()
        self.timers = Timers()
        self.store = Store(config.save_dir, config.temp_dir)
        # One buffer for every read: from peer sockets, and of files being hashed.
        # Whatever reads into it is done with it before the loop moves on.
        self.recv_buf = bytearray(RECV_BYTES)
        self.recv_view = memoryview(self.recv_buf)
        self.subscribers: set = set()
        self.transfers: Dict[str, PeerConn] = {}
        self.peers: Dict[Tuple[str, str], PeerRecord] = {}
        self.discoveries: Dict[str, Discovery] = {}
        self.answered: Dict[str, Tuple[float, int]] = {}  # requester -> (window start, answers)
        self.peer_count = 0
        self.pending_answers = 0
        self.ids = itertools.count(1)
        self.stopping = False
        self.socket_paths: List[str] = []
        self.listeners: List[Listener] = []
        self.broadcasts = broadcast_targets(config)
        self.tcp_address = ("", 0)
        self.networks: List[ipaddress.IPv4Network] = []
        self.networks_until = -math.inf

    # -- start and stop

    def start(self) -> None:
        """Open the four sockets, or raise StartupError with the reason."""
        cfg = self.config
        for var, path in (("FILE_SAVE_DIR", cfg.save_dir), ("TEMP_DIR", cfg.temp_dir)):
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise StartupError(f"{var}={path}: cannot create it: {exc.strerror}") from None
            if not os.access(path, os.W_OK | os.X_OK):
                raise StartupError(f"{var}={path}: not a writable folder")
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((cfg.bind_address, cfg.receive_port))
        except OSError as exc:
            tcp.close()
            raise StartupError(f"RECEIVE_PORT={cfg.receive_port} on BIND_ADDRESS={cfg.bind_address}: "
                               f"{exc.strerror}") from None
        tcp.listen(LISTEN_BACKLOG)
        self.tcp_address = tcp.getsockname()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Broadcasts reach only wildcard-bound sockets, and every daemon on the
        # machine shares the port: SO_REUSEADDR lets them all hear (§5).
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            udp.bind(("", cfg.broadcast_port))
        except OSError as exc:
            tcp.close()
            udp.close()
            raise StartupError(f"BROADCAST_PORT={cfg.broadcast_port}: {exc.strerror}") from None
        command = self.open_unix("COMMAND_SOCKET", cfg.command_socket)
        events = self.open_unix("EVENT_SOCKET", cfg.event_socket)
        for sock, callback in ((tcp, self.on_tcp_accept), (udp, self.on_datagram),
                               (command, self.on_command_accept), (events, self.on_event_accept)):
            sock.setblocking(False)
            listener = Listener(sock, callback)
            self.listeners.append(listener)
            self.sel.register(sock, selectors.EVENT_READ, listener)
        log.info("tnet %s: %s on %s:%d, discovery on port %d to %s, saving to %s", __version__,
                 cfg.host_name, cfg.bind_address, cfg.receive_port, cfg.broadcast_port,
                 ",".join(self.broadcasts), self.store.save_dir)

    def open_unix(self, var: str, path: str) -> socket.socket:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            try:
                os.makedirs(folder, mode=SOCKET_DIR_MODE)
            except OSError as exc:
                raise StartupError(f"{var}={path}: cannot create {folder}: {exc.strerror}") from None
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise StartupError(f"{var}={path}: exists and is not a socket; not touching it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                remove_quietly(path)  # stale: its daemon is gone
            else:
                raise StartupError(f"{var}={path}: another tnet daemon is serving it")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is born 0600
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise StartupError(f"{var}={path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(path, SOCKET_MODE)
        sock.listen(LISTEN_BACKLOG)
        self.socket_paths.append(path)
        return sock

    def stop(self) -> None:
        """Fail open transfers cleanly, tell peers, remove the socket files."""
        for key in list(self.sel.get_map().values()):
            item = key.data
            if isinstance(item, PeerConn) and not item.closed:
                if item.id and item.result is None:
                    item.abort("shutdown", f"{self.config.host_name} is shutting down")
                item.close()
            elif isinstance(item, ClientConn) and not item.closed:
                if item.busy:
                    item.fail("shutdown", "the daemon is shutting down")
                    item.flush()
                item.close()
        for subscriber in list(self.subscribers):
            subscriber.flush()
            subscriber.close()
        for listener in self.listeners:
            self.sel.unregister(listener.sock)
            listener.close()
        for path in self.socket_paths:
            remove_quietly(path)
        self.sel.close()

    # -- the loop

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self.sel.register(wake_r, selectors.EVENT_READ, Listener(wake_r, lambda: drain(wake_r)))
        old_fd = signal.set_wakeup_fd(wake_w.fileno())
        previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self.stopping:
                self.run_once()
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.sel.unregister(wake_r)
            wake_r.close()
            wake_w.close()
            self.stop()
        log.info("stopped")
        return 0

    def on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def run_once(self) -> None:
        for key, mask in self.sel.select(self.timers.next_wait(self.clock())):
            item = key.data
            try:
                if mask & selectors.EVENT_READ and not item.closed:
                    item.on_readable()
                if mask & selectors.EVENT_WRITE and not item.closed:
                    item.on_writable()
            except Exception:  # last resort: a bug must cost one connection, not the daemon
                log.exception("internal error on %s; dropping it", item.label())
                if isinstance(item, PeerConn):
                    item.end_failed("internal-error", "internal error; see the daemon log")
                if not isinstance(item, Listener):
                    item.close()
        for item in self.timers.pop_due(self.clock()):
            item.on_deadline()

    # -- listeners

    def on_tcp_accept(self) -> None:
        sock, addr = self.accept(self.listeners[0].sock)
        if sock is None:
            return
        if self.peer_count >= self.config.max_connections:
            log.warning("refusing %s: %d connections open (MAX_CONNECTIONS)", addr[0], self.peer_count)
            sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = InboundPeer(self, sock, addr[0])
        self.sel.register(sock, selectors.EVENT_READ, conn)
        conn.send(proto.encode_preface())  # both ends open with it (§2)

    def on_command_accept(self) -> None:
        sock, _ = self.accept(self.listeners[2].sock)
        if sock is not None:
            self.sel.register(sock, selectors.EVENT_READ, ClientConn(self, sock))

    def on_event_accept(self) -> None:
        sock, _ = self.accept(self.listeners[3].sock)
        if sock is not None:
            subscriber = Subscriber(self, sock)
            self.subscribers.add(subscriber)
            self.sel.register(sock, selectors.EVENT_READ, subscriber)

    def accept(self, listener: socket.socket) -> Tuple[Optional[socket.socket], Any]:
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None, None
        except OSError as exc:  # EMFILE and friends: say so, keep serving the rest
            log.error("accept failed: %s", exc.strerror)
            return None, None
        sock.setblocking(False)
        return sock, addr

    def on_datagram(self) -> None:
        udp = self.listeners[1].sock
        for _ in range(MAX_DATAGRAMS_PER_WAKE):
            try:
                datagram, (host, _port) = udp.recvfrom(proto.MAX_DATAGRAM_BYTES + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("discovery socket: %s", exc.strerror)
                return
            try:
                request = proto.decode_datagram(datagram)
            except proto.RemoteProtocolError as exc:
                log.info("datagram from %s dropped: %s", host, exc)
                continue
            if request.nonce in self.discoveries:
                continue  # our own broadcast, heard back
            if self.may_answer(host):
                self.answer(host, request)

    def may_answer(self, host: str) -> bool:
        """Rate and scope of discovery answers (§5): bounded per requester, never
        to a network our bind address cannot belong to, never over UDP."""
        ip = ipaddress.IPv4Address(host)
        if ip.is_multicast or ip.is_unspecified or host == "255.255.255.255":
            return False
        bind = ipaddress.IPv4Address(self.config.bind_address)
        if not bind.is_unspecified and ip.is_loopback != bind.is_loopback:
            return False
        if not any(ip in network for network in self.local_networks()):
            return False  # a spoofed source elsewhere would make us connect there
        if self.pending_answers >= MAX_PENDING_ANSWERS:
            return False
        now = self.clock()
        start, count = self.answered.get(host, (now, 0))
        if now - start >= ANSWER_WINDOW_S:
            start, count = now, 0
        if count >= MAX_ANSWERS_PER_WINDOW:
            return False
        if len(self.answered) > 4096:  # forget old requesters; spoofed floods must not grow this
            self.answered = {h: v for h, v in self.answered.items() if now - v[0] < ANSWER_WINDOW_S}
        self.answered[host] = (start, count + 1)
        return True

    def answer(self, host: str, request: proto.DiscoveryRequest) -> None:
        if self.peer_count < self.config.max_connections:
            OutboundPeer(self, host, proto.Announce(self.config.host_name, request.nonce)).connect(request.port)

    # -- shared services

    def publish(self, event: Dict[str, Any]) -> None:
        if not self.subscribers:
            return
        line = proto.encode_line(event)
        for subscriber in list(self.subscribers):
            subscriber.send(line)

    def new_transfer_id(self) -> str:
        return str(next(self.ids))

    def learn_peer(self, name: str, address: str, nonce: str = "") -> None:
        record = PeerRecord(name, address, self.clock())
        self.peers.pop((name, address), None)
        self.peers[(name, address)] = record  # dicts keep order: the oldest sighting comes first
        if len(self.peers) > MAX_PEERS:
            del self.peers[next(iter(self.peers))]
        discovery = self.discoveries.get(nonce) if nonce else None
        if discovery is not None:
            discovery.found[(name, address)] = record

    def local_networks(self) -> List[ipaddress.IPv4Network]:
        """The directly connected networks, asked again every few seconds."""
        now = self.clock()
        if now >= self.networks_until:
            self.networks = local_networks()
            self.networks_until = now + NETWORKS_TTL_S
        return self.networks

    def ensure_folders(self) -> None:
        """TEMP_DIR and FILE_SAVE_DIR exist (made again, as at start, if they
        were removed meanwhile), or LocalError saying which and why."""
        for var, code, folder in (("TEMP_DIR", "temp-failed", self.store.temp_dir),
                                  ("FILE_SAVE_DIR", "save-failed", self.store.save_dir)):
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise LocalError(code, f"{var}={folder}: cannot create it: {exc.strerror}") from None

    def space_shortfall(self, size: int) -> str:
        """'' if ``size`` bytes fit in TEMP_DIR and FILE_SAVE_DIR, else why not."""
        folders = {self.store.temp_dir, self.store.save_dir}
        devices: Dict[int, str] = {}
        for folder in sorted(folders):
            try:
                devices.setdefault(os.stat(folder).st_dev, folder)
            except OSError as exc:
                return f"{folder}: {exc.strerror}"
        for folder in devices.values():
            fs = os.statvfs(folder)
            free = fs.f_bavail * fs.f_frsize
            if free < size:
                return f"need {size} bytes, {free} free in {folder}"
        return ""

    def discover(self, timeout: float, on_done: Callable[[Found], Any]) -> None:
        """Broadcast a request; call ``on_done(found)`` when the window closes."""
        nonce = self.nonce()
        discovery = Discovery(nonce, self.clock() + timeout, on_done)
        discovery.daemon = self
        request = proto.encode_discovery(proto.DiscoveryRequest(self.config.host_name, nonce,
                                                                self.tcp_address[1]))
        errors = []
        # Asked again each time: interfaces come up and get addresses after we start.
        self.broadcasts = broadcast_targets(self.config)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            if self.config.bind_address != "0.0.0.0":
                udp.bind((self.config.bind_address, 0))  # answers come back to our address
            for target in self.broadcasts:
                try:
                    udp.sendto(request, (target, self.config.broadcast_port))
                except OSError as exc:
                    errors.append(f"{target}: {exc.strerror}")
        if len(errors) == len(self.broadcasts):
            raise LocalError("discovery-failed", "cannot broadcast: " + "; ".join(errors))
        for error in errors:
            log.warning("discovery: %s", error)
        self.discoveries[nonce] = discovery
        self.timers.schedule(discovery)

    def resolve(self, peer: str, then: Callable[[str], None], fail: Callable[[str, str], None]) -> None:
        """Turn a peer (address or host name) into an address; a name not
        known yet triggers one discovery before it is declared unknown."""
        try:
            then(str(ipaddress.IPv4Address(peer)))
            return
        except ValueError:
            pass

        def decide(final: bool) -> bool:
            addresses = self.addresses_of(peer)
            if len(addresses) == 1:
                then(addresses[0])
            elif len(addresses) > 1:
                fail("ambiguous-peer", f"{peer!r} is at {', '.join(addresses)}; name one address")
            elif final:
                known = sorted({r.name for r in self.peers.values()})
                fail("unknown-peer", f"no peer named {peer!r}; known: {', '.join(known) or 'none'}")
            return bool(addresses) or final

        if not decide(False):
            self.discover(DEFAULT_DISCOVER_S, lambda found: decide(True))

    def addresses_of(self, name: str) -> List[str]:
        """Addresses known under ``name``: exact match first, then any case."""
        for same in (lambda n: n == name, lambda n: n.casefold() == name.casefold()):
            addresses = sorted({r.address for r in self.peers.values() if same(r.name)})
            if addresses:
                return addresses
        return []

    def entries_for(self, paths: List[str]) -> Tuple[List[Entry], List[str]]:
        """The batch for ``paths``: files, and folders walked; plus what was skipped."""
        entries: List[Entry] = []
        skipped: List[str] = []
        for path in paths:
            if not os.path.isabs(path):
                raise LocalError("bad-request", f"{path}: give an absolute path")
            try:
                info = os.stat(path)
            except OSError as exc:
                raise LocalError("file-error", f"{path}: {exc.strerror}") from None
            except ValueError:  # a NUL, or a lone surrogate that no file name can hold
                raise LocalError("file-error", f"{printable(path)}: not a possible file name") from None
            name = os.path.basename(os.path.normpath(path))
            if stat.S_ISREG(info.st_mode):
                entries.append(Entry(path, (checked_name(name, path),), info.st_size))
            elif stat.S_ISDIR(info.st_mode):
                self.walk_folder(path, (checked_name(name, path),), entries, skipped)
            else:
                raise LocalError("file-error", f"{path}: not a regular file or folder")
            if not os.access(path, os.R_OK):
                raise LocalError("file-error", f"{path}: permission denied")
        if len(entries) > proto.MAX_ENTRIES:
            raise LocalError("file-error", f"more than {proto.MAX_ENTRIES} files and folders")
        return entries, skipped

    def walk_folder(self, root: str, parts: Tuple[str, ...], entries: List[Entry], skipped: List[str]) -> None:
        entries.append(Entry("", parts, 0))
        try:
            children = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError as exc:
            raise LocalError("file-error", f"{root}: {exc.strerror}") from None
        for child in children:
            if child.is_symlink():
                skipped.append(child.path)  # never followed: it may lead out of the tree
            elif child.is_dir(follow_symlinks=False):
                self.walk_folder(child.path, child_parts(parts, child), entries, skipped)
            elif child.is_file(follow_symlinks=False):
                size = child.stat(follow_symlinks=False).st_size
                entries.append(Entry(child.path, child_parts(parts, child), size))
            else:
                skipped.append(child.path)  # sockets, fifos, devices


def child_parts(parts: Tuple[str, ...], child: os.DirEntry) -> Tuple[str, ...]:
    """The wire path of a folder's child, checked as the receiver will (§4.2)."""
    if len(parts) >= proto.MAX_PATH_PARTS:
        raise LocalError("file-error", f"{child.path}: deeper than {proto.MAX_PATH_PARTS} levels")
    return parts + (checked_name(child.name, child.path),)


def checked_name(name: str, path: str) -> str:
    try:
        return proto.check_file_name(name)
    except proto.RemoteProtocolError as exc:
        raise LocalError("bad-name", f"{printable(path)}: {exc.message}; rename it to send it") from None


def drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


# --- Commands from local clients (§6) -----------------------------------------------


def cmd_status(daemon: Daemon, client: ClientConn, args: Dict[str, Any]) -> None:
    cfg = daemon.config
    client.finish({
        "version": __version__,
        "api": proto.API_VERSION,
        "protocol": proto.VERSION,
        "pid": os.getpid(),
        "host_name": cfg.host_name,
        "bind_address": cfg.bind_address,
        "receive_port": cfg.receive_port,
        "broadcast_port": cfg.broadcast_port,
        "broadcast_addresses": list(daemon.broadcasts),
        "save_dir": daemon.store.save_dir,
        "temp_dir": daemon.store.temp_dir,
        "command_socket": os.path.abspath(cfg.command_socket),
        "event_socket": os.path.abspath(cfg.event_socket),
        "accept": cfg.accept,
        "idle_timeout": cfg.idle_timeout,
        "transfers": [conn.describe() for conn in daemon.transfers.values()],
        "peers": len(daemon.peers),
        "subscribers": len(daemon.subscribers),
    })


def peer_list(records: Any) -> List[Dict[str, Any]]:
    return [{"name": r.name, "address": r.address} for r in sorted(records, key=lambda r: (r.name, r.address))]


def cmd_discover(daemon: Daemon, client: ClientConn, args: Dict[str, Any]) -> None:
    def done(found: Found) -> None:
        if not client.closed:
            client.finish({"peers": peer_list(found.values())})

    daemon.discover(float(args.get("timeout", DEFAULT_DISCOVER_S)), done)


def cmd_peers(daemon: Daemon, client: ClientConn, args: Dict[str, Any]) -> None:
    now = daemon.clock()
    peers = peer_list(daemon.peers.values())
    for item in peers:
        item["seen_s_ago"] = round(now - daemon.peers[(item["name"], item["address"])].last_seen, 1)
    client.finish({"peers": peers})


def cmd_message(daemon: Daemon, client: ClientConn, args: Dict[str, Any]) -> None:
    first = proto.Message(daemon.config.host_name, args["text"])
    daemon.resolve(args["peer"], lambda address: open_peer(daemon, client, address, first), client.fail)


def cmd_send(daemon: Daemon, client: ClientConn, args: Dict[str, Any]) -> None:
    entries, skipped = daemon.entries_for(args["paths"])
    for path in skipped:
        client.reply({"event": "skipped", "path": path,
                      "reason": "not a regular file or folder (links are never followed)"})
    total = sum(entry.size for entry in entries)
    first = proto.Offer(daemon.config.host_name, len(entries), total)
    daemon.resolve(args["peer"], lambda address: open_peer(daemon, client, address, first, entries), client.fail)


def open_peer(daemon: Daemon, client: ClientConn, address: str, first: Any,
              entries: Optional[List[Entry]] = None) -> None:
    if client.closed:
        return
    if daemon.peer_count >= daemon.config.max_connections:
        client.fail("busy", f"{daemon.peer_count} connections open (MAX_CONNECTIONS)")
        return
    conn = OutboundPeer(daemon, address, first, client, entries)
    if conn.id:
        client.reply({"event": "started", "id": conn.id, "peer": address, "files": len(conn.entries),
                      "bytes": conn.total})
    conn.connect(daemon.config.receive_port)


def cmd_transfers(daemon: Daemon, client: ClientConn, args: Dict[str, Any]) -> None:
    client.finish({"transfers": [conn.describe() for conn in daemon.transfers.values()]})


def transfer_by_id(daemon: Daemon, transfer_id: str) -> PeerConn:
    conn = daemon.transfers.get(transfer_id)
    if conn is None:
        raise LocalError("no-such-transfer", f"no open transfer {transfer_id!r}")
    return conn


def cmd_cancel(daemon: Daemon, client: ClientConn, args: Dict[str, Any]) -> None:
    conn = transfer_by_id(daemon, args["id"])
    conn.abort("cancelled", f"cancelled on {daemon.config.host_name}")
    client.finish({"id": args["id"]})


def cmd_decide(accepted: bool) -> Callable[[Daemon, ClientConn, Dict[str, Any]], None]:
    def handler(daemon: Daemon, client: ClientConn, args: Dict[str, Any]) -> None:
        conn = transfer_by_id(daemon, args["id"])
        if not isinstance(conn, InboundPeer) or not conn.awaiting_decision:
            raise LocalError("not-waiting", f"transfer {args['id']} is not waiting for a decision")
        conn.decide(accepted)
        client.finish({"id": args["id"]})

    return handler


COMMANDS: Dict[str, Callable[[Daemon, ClientConn, Dict[str, Any]], None]] = {
    "status": cmd_status,
    "discover": cmd_discover,
    "peers": cmd_peers,
    "message": cmd_message,
    "send": cmd_send,
    "transfers": cmd_transfers,
    "cancel": cmd_cancel,
    "accept": cmd_decide(True),
    "decline": cmd_decide(False),
}


def main(config: Config) -> int:
    """Run a daemon in the foreground until SIGINT or SIGTERM."""
    daemon = Daemon(config)
    try:
        daemon.start()
    except StartupError as exc:
        print(f"tnet daemon: {exc}", file=sys.stderr)
        return 1
    return daemon.run()
