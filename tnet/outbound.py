"""The sending end: a connection we open to a peer (§4).

``OutboundPeer`` answers a discovery (an announce), delivers a message, or
sends a batch and collects the receiver's answers, for the local client
that asked (anything with ``reply``, ``finish`` and ``fail``). ``FileSender``
puts a batch's entries on the wire: frames and small files through the
output buffer, large files with ``sendfile`` straight from the page cache,
each hashed as it goes, read back once (§4.2).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import stat
from typing import Any, Dict, Optional, Protocol, Sequence, Tuple

from . import api
from . import protocol as proto
from .history import file_record
from .peers import MAX_OUT_BUFFER_BYTES, PeerConn, PeerContext
from .util import printable
from .walk import Entries

log = logging.getLogger("tnet")

SEND_CHUNK_BYTES = 4 * 1024 * 1024  # at most this per sendfile call
INLINE_FILE_BYTES = 64 * 1024  # smaller files are read into the send buffer: batches
HEADER_COST_BYTES = 64  # what a frame counts for in a wake-up's sending budget
RESUMABLE_BYTES = 1024 * 1024  # files this large wait for the receiver to say what it holds (§7): one round trip
PREFIX_SLICE_BYTES = 8 * 1024 * 1024  # of our own copy of a resumed prefix, hashed per turn of the loop

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NO_SENDFILE = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)


class Client(Protocol):
    """The local client a send or message answers to (clients.ClientConn)."""

    closed: bool
    job: Any

    def reply(self, obj: Dict[str, Any]) -> None: ...

    def finish(self, obj: Dict[str, Any]) -> None: ...

    def fail(self, code: str, message: str, **extra: Any) -> None: ...


class SharedHash:
    """The SHA-256 of one file from its start, as far as any of its senders
    read it: a file sent to several peers at once is hashed once, by
    whichever is ahead; the others only send."""

    def __init__(self, key: Tuple[int, ...]) -> None:
        self.key = key  # device, inode, size and modification time: one version of one file
        self.hasher = hashlib.sha256()
        self.done = 0  # bytes hashed; every sender of the file is at or behind it
        self.users = 0


class FileSender:
    """The entries of one batch, put on the wire in order."""

    def __init__(self, entries: Entries, exchange: proto.Exchange, buffer: memoryview,
                 order: Optional[Sequence[int]] = None, hashes: Optional[Dict[tuple, SharedHash]] = None) -> None:
        self.entries, self.exchange, self.buffer = entries, exchange, buffer
        self.hashes = hashes if hashes is not None else {}  # of files being sent from their start, by key
        self.shared: Optional[SharedHash] = None  # the file in flight's, once it is sent from its start
        # The entries of this attempt, by their index in the batch (a retry leaves out those already saved).
        self.order: Sequence[int] = order if order is not None else range(len(entries))
        self.next_entry = 0  # position in ``order``: the index on the wire
        self.fd = -1  # sendfile source (at explicit offsets); read in order for the hash
        self.hasher: Any = None
        self.index = -1  # the file in flight, or -1
        self.size = 0
        self.path = ""  # its local path
        self.name = ""  # its name on the wire, joined
        self.sent = 0  # bytes of it on the wire
        self.stat: Optional[os.stat_result] = None
        self.use_sendfile = hasattr(os, "sendfile")
        self.waiting = False  # a resumable file's header is out: its bytes wait for the receiver's resume
        self.prefix_left = 0  # of the receiver's offset, bytes of our copy still to hash
        self.resume: Optional[proto.Resume] = None
        self.resumed_bytes = 0  # not sent again, the receiver having them

    @property
    def in_file(self) -> bool:
        return self.index >= 0

    @property
    def all_sent(self) -> bool:
        return not self.in_file and self.next_entry == len(self.order)

    def original(self, wire_index: int) -> int:
        """The batch's index of the entry sent as ``wire_index``."""
        return self.order[wire_index]

    def start_entry(self, out: bytearray) -> int:
        """The next entry's frame (and a small file's bytes) into ``out``;
        bytes of budget it cost. LocalProtocolError for a file that cannot be read."""
        index = self.next_entry  # on the wire
        entry = self.order[index]
        self.next_entry += 1
        entries = self.entries
        parts, size = entries.parts(entry), entries.size(entry)
        self.name = "/".join(parts)
        if entries.is_folder(entry):
            out += self.exchange.send(proto.Folder(index, parts))
            return HEADER_COST_BYTES
        path = entries.local_path(entry)
        reason = self.open_file(path, size)
        if reason:
            return self.disown(index, parts, out, reason)
        self.index, self.size, self.path, self.sent, self.hasher = index, size, path, 0, hashlib.sha256()
        assert self.stat is not None
        if size >= RESUMABLE_BYTES and self.exchange.version >= 2:
            out += self.exchange.send(proto.FileHeader(index, parts, size, mtime=self.stat.st_mtime_ns))
            self.waiting = True
            return HEADER_COST_BYTES
        out += self.exchange.send(proto.FileHeader(index, parts, size))
        self.share_hash()
        if size > INLINE_FILE_BYTES:
            return HEADER_COST_BYTES
        if size:
            self.read_for_hash(size, out)
            self.exchange.sent_file_bytes(size)
        self.sent = size
        return HEADER_COST_BYTES + size

    def open_file(self, path: str, size: int) -> str:
        """Open the file to send; '' or why it is not what the walk found."""
        try:
            # Never blocks (a FIFO swapped in would hold the loop until someone
            # opens it) and never follows a link swapped in since the walk.
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC)
            self.stat = os.fstat(self.fd)
        except OSError as exc:
            self.close_file()
            if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO, errno.ENOTDIR):
                return f"{path} was replaced or removed since the walk ({exc.strerror})"
            raise proto.LocalProtocolError("file-error", f"cannot read {path}: {exc.strerror}") from None
        if not stat.S_ISREG(self.stat.st_mode):
            self.close_file()
            return f"{path} is no longer a regular file"
        if self.stat.st_size != size:
            self.close_file()
            return f"{path} changed size since the offer"
        return ""

    def take_resume(self, resume: proto.Resume, out: bytearray) -> None:
        """The receiver holds ``resume.offset`` bytes: hash ours as far
        (``hash_prefix``, a slice per turn), or send it all if it holds none."""
        self.resume, self.prefix_left = resume, resume.offset
        if not resume.offset:
            self.send_from(0, out)

    def hash_prefix(self, out: bytearray) -> bool:
        """One slice of our copy of the receiver's prefix into the file's hash;
        True once compared and the rest is on its way (only the rest if the
        two prefixes match, else all of it). LocalProtocolError if unreadable."""
        resume = self.resume
        assert resume is not None and self.prefix_left
        view = self.buffer
        try:
            n = os.readv(self.fd, [view[:min(self.prefix_left, len(view), PREFIX_SLICE_BYTES)]])
        except OSError as exc:
            raise proto.LocalProtocolError("file-error", f"reading {self.path}: {exc.strerror}") from None
        if n == 0:
            raise proto.LocalProtocolError("file-changed", f"{self.name} shrank while being sent")
        self.hasher.update(view[:n])
        self.prefix_left -= n
        if self.prefix_left:
            return False
        ours = hashlib.sha256(bytes.fromhex(resume.salt) + self.hasher.digest()).hexdigest()
        if ours == resume.sha256:
            self.sent = resume.offset
            self.resumed_bytes += resume.offset
            self.send_from(resume.offset, out)
        else:  # the receiver's prefix is not our file's: all of it, hashed from the start
            os.lseek(self.fd, 0, os.SEEK_SET)
            self.hasher = hashlib.sha256()
            self.send_from(0, out)
        return True

    def send_from(self, offset: int, out: bytearray) -> None:
        out += self.exchange.send(proto.FileFrom(self.index, offset, self.size - offset))
        self.waiting = False
        if offset == 0:
            self.share_hash()

    def share_hash(self) -> None:
        """Hash the file sent from its start with its other senders (a resumed one hashes alone)."""
        assert self.stat is not None
        info = self.stat
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        shared = self.hashes.get(key)
        if shared is None:
            shared = self.hashes[key] = SharedHash(key)
        shared.users += 1
        self.shared = shared

    def disown(self, index: int, parts: Tuple[str, ...], out: bytearray, reason: str) -> int:
        """An entry that cannot be sent as offered fails alone: a header with
        no bytes, then `failed` in place of its `end` (§4.2)."""
        out += self.exchange.send(proto.FileHeader(index, parts, 0))
        out += self.exchange.send(proto.Failed(index, "file-changed", proto.clip_text(reason)))
        return HEADER_COST_BYTES

    def send_piece(self, sock: socket.socket, out: bytearray) -> int:
        """One sendfile (or read and queue) of the file in flight; the bytes
        that went, each hashed. OSError from the socket; BlockingIOError: later."""
        count = min(SEND_CHUNK_BYTES, self.size - self.sent)
        if count == 0:  # resumed at its very end: nothing is left but the file's end
            return 0
        if self.use_sendfile:
            try:
                sent = os.sendfile(sock.fileno(), self.fd, self.sent, count)
            except OSError as exc:
                if exc.errno not in _NO_SENDFILE:
                    raise
                self.use_sendfile = False  # e.g. a file system without it: copy instead
                return 0
            self.read_for_hash(sent)
            self.exchange.sent_file_bytes(sent)
        else:
            before = len(out)
            self.read_for_hash(count, out)  # hashed and read: it must go, with the next flush
            sent = len(out) - before
            self.exchange.sent_file_bytes(sent)
        if sent == 0 and count:
            raise proto.LocalProtocolError("file-changed", f"{self.path} shrank while being sent")
        self.sent += sent
        return sent

    def read_for_hash(self, count: int, copy_to: Optional[bytearray] = None) -> None:
        """Hash the next ``count`` bytes of the file (and append them to
        ``copy_to``). Reading after sendfile costs a copy from the page cache
        but keeps one pass of hashing per side (§4.2), and per file however
        many peers get it at once; the reads go into the daemon's one receive
        buffer, so no chunk is ever allocated. sendfile takes explicit
        offsets, so the descriptor's own position is the hash's."""
        view, shared, position = self.buffer, self.shared, self.sent
        if shared is not None:
            if copy_to is None:  # only what no sender of the file has hashed yet
                count = max(position + count - shared.done, 0)
                position = max(position, shared.done)
            os.lseek(self.fd, position, os.SEEK_SET)
        while count:
            n = os.readv(self.fd, [view[:min(count, len(view))]])
            if n == 0:
                raise proto.LocalProtocolError("file-changed", f"{self.name} shrank while being sent")
            if shared is None:
                self.hasher.update(view[:n])
            elif position + n > shared.done:
                shared.hasher.update(view[shared.done - position:n])
                shared.done = position + n
            if copy_to is not None:
                copy_to += view[:n]
            position += n
            count -= n

    def finish_file(self, out: bytearray) -> str:
        """Its `end`, or `failed` if it changed while being sent; the SHA-256 sent, or ''."""
        assert self.stat is not None
        now = os.fstat(self.fd)
        sha256 = ""
        if (now.st_size, now.st_mtime_ns) != (self.stat.st_size, self.stat.st_mtime_ns):
            reason = proto.clip_text(f"{self.name} changed while being sent")
            out += self.exchange.send(proto.Failed(self.index, "file-changed", reason))
        else:
            sha256 = (self.shared.hasher if self.shared is not None else self.hasher).hexdigest()
            out += self.exchange.send(proto.FileEnd(sha256))
        self.close_file()
        self.index = -1
        self.resume = None
        return sha256

    def close_file(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        shared, self.shared = self.shared, None
        if shared is not None:
            shared.users -= 1
            if not shared.users:
                del self.hashes[shared.key]


class OutboundPeer(PeerConn):
    """A connection we open to a peer: to announce, to message, or to send."""

    kind = "outbound"
    role = proto.Role.INITIATOR
    AFTER_AN_ERROR = (proto.Error, proto.Done, proto.Failed)  # answers before it still count

    def __init__(self, ctx: PeerContext, address: str, first: Any, client: Optional[Client] = None,
                 entries: Optional[Entries] = None, order: Optional[Sequence[int]] = None,
                 version: int = proto.MIN_VERSION, transfer_id: str = "") -> None:
        super().__init__(ctx, socket.socket(socket.AF_INET, socket.SOCK_STREAM), address)
        self.exchange = proto.Exchange(self.role, version)
        self.first = first  # the frame that opens the exchange
        self.client = client
        self.entries = entries if entries is not None else Entries()
        self.sender = FileSender(self.entries, self.exchange, ctx.buffer, order, ctx.hashes)
        self.connected = False
        self.streaming = False
        self.answers = 0  # handled; the exchange counts them as they are read, a batch ahead
        self.failures = 0
        self.first_failure: Optional[Tuple[str, str]] = None  # (code, message)
        self.total = first.size if isinstance(first, proto.Offer) else 0
        if client is not None:
            client.job = self
        if isinstance(first, proto.Offer):
            self.id = transfer_id or ctx.new_transfer_id()  # a send's attempts share one id
            ctx.registry.transfers[self.id] = self
        elif isinstance(first, proto.Announce):
            ctx.registry.answering.add(self)

    def connect(self, port: int) -> None:
        """Start a non-blocking connect from BIND_ADDRESS; ``on_writable`` ends it."""
        cfg, sock = self.ctx.config, self.sock
        self.set_deadline(self.loop.clock() + cfg.handshake_timeout)
        try:
            sock.setblocking(False)
            if cfg.bind_address != "0.0.0.0":
                sock.bind((cfg.bind_address, 0))  # peers see our address
            self.want_write(True)
            err = sock.connect_ex((self.address, port))
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self.unreachable(os.strerror(err))

    def on_io_error(self, exc: OSError) -> None:
        if self.connected:
            super().on_io_error(exc)
        else:
            self.unreachable(os.strerror(exc.errno or errno.EIO))

    def unreachable(self, reason: str) -> None:
        self.drop("unreachable", f"cannot reach {self.address}: {reason}")

    def on_deadline(self) -> None:
        if not self.connected:  # SYNs unanswered: no host there, or a firewall
            self.unreachable(f"no answer within {self.ctx.config.handshake_timeout:g} s")
        else:
            super().on_deadline()

    def on_remote_error(self, exc: proto.RemoteProtocolError) -> None:
        if exc.code == "peer-gone":  # it closed before answering everything: nothing to tell it
            self.drop(exc.code, f"{self.address} closed the connection")
        else:
            super().on_remote_error(exc)

    def cancel(self, code: str, message: str) -> None:
        """The local client is gone or asked to stop."""
        self.fail(code, message)

    def on_writable(self) -> None:
        if self.connected:
            self.flush()
            self.pump()
            return
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.unreachable(os.strerror(err))
            return
        self.connected = True
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Connected: from now on the peer's silence is measured by IDLE_TIMEOUT.
        self.set_deadline(self.loop.clock() + self.ctx.config.idle_timeout)
        self.out += self.exchange.send_preface() + self.exchange.send(self.first)
        if isinstance(self.first, proto.Announce):
            self.linger()  # nothing to wait for but the requester's close
        else:
            self.flush()

    def pump(self) -> None:
        """Frames and small files up to a buffer's worth, then big files by sendfile from the page cache;
        a bounded amount per wake-up, so that one fast peer does not starve the others."""
        budget = SEND_CHUNK_BYTES
        while self.streaming and not self.closed and budget > 0 and len(self.out) < MAX_OUT_BUFFER_BYTES:
            if self.sender.waiting:
                break  # a resumable file's bytes wait for the receiver's resume
            if self.sender.in_file and self.out:
                self.flush()  # a file's raw bytes go only after what was queued before them
                if self.out:
                    return
            budget -= self.stream_step()
        self.flush()

    def stream_step(self) -> int:
        """Put the next piece of the batch on the wire; return bytes of budget consumed."""
        sender = self.sender
        if sender.all_sent:
            self.streaming = False  # all sent; answers are on their way
            self.want_write(bool(self.out))
            return SEND_CHUNK_BYTES
        try:
            if sender.in_file:
                step = sender.send_piece(self.sock, self.out)
                self.bytes_moved += step
                self.touch(step)
                self.report_progress(self.reply, self.ctx.config.report_progress_out)
            else:
                step = self.start_entry()
        except proto.LocalProtocolError as exc:
            self.fail(exc.code, exc.message)
            return 0
        except (BlockingIOError, InterruptedError):
            return SEND_CHUNK_BYTES
        except OSError as exc:
            self.on_io_error(exc)
            return 0
        if sender.in_file and sender.sent == sender.size and not (self.closed or self.lingering):
            sha256 = sender.finish_file(self.out)
            if sha256:  # for the history: what was read, and its hash
                self.ctx.record_files(self.id, [file_record(sender.name, sender.size, sha256, sender.path)])
        return max(step, 1)

    def start_entry(self) -> int:
        sender = self.sender
        cost = sender.start_entry(self.out)
        size = self.entries.size(sender.original(sender.next_entry - 1))
        self.start_file(sender.name, size)
        if sender.in_file and sender.sent == sender.size and not sender.waiting:
            self.bytes_moved += sender.size  # a small file, queued whole
        elif sender.in_file:
            self.report_progress(self.reply, self.ctx.config.report_progress_out, force=True)  # a 0% line
        else:
            self.bytes_moved += size  # a folder, or disowned
        return cost

    def step_prefix(self) -> None:
        """A slice of our copy of what the receiver holds, hashed; then the rest goes."""
        self.touch()
        try:
            done = self.sender.hash_prefix(self.out)
        except proto.LocalProtocolError as exc:
            self.fail(exc.code, exc.message)
            return
        if done:
            self.loop.done(self)
            self.bytes_moved += self.sender.sent  # what the receiver had, if it was ours
            self.want_write(True)

    def wants_more_output(self) -> bool:
        return self.streaming or not self.connected

    def on_progress_out(self, sent: int) -> None:
        self.touch(sent)  # the receiver reads: enough of that keeps us both alive

    @property
    def reply(self) -> Optional[Any]:
        return self.client.reply if self.client is not None else None

    # -- what the receiver says

    def on_event(self, event: Any) -> None:
        if isinstance(event, proto.Ack):
            self.result = ("ok", "")
            if self.client:
                self.client.finish({"peer": self.address, "name": event.name})
            self.close()
        elif isinstance(event, proto.Accept):
            self.streaming = True
            self.peer_name = event.name  # shown, never learnt: names come from discovery answers alone (§5)
            self.started = self.loop.clock()
            self.touch()
            self.ctx.publish(api.transfer_started_event(self.describe(), len(self.sender.order)))
            self.want_write(True)
        elif isinstance(event, proto.Resume):
            self.sender.take_resume(event, self.out)
            if self.sender.prefix_left:
                self.loop.each_turn(self, self.step_prefix)
            else:
                self.want_write(True)
        elif isinstance(event, proto.Wait):
            # The receiver asks its user, or copies files into place: allow that, and the usual silence on top.
            self.set_deadline(self.loop.clock() + event.seconds + self.ctx.config.idle_timeout)
        elif isinstance(event, (proto.Done, proto.Failed)):
            self.on_answer(event)
        else:  # the exchange lets nothing else through; an Error ends it
            self.drop(event.code, event.message)

    def on_answer(self, event: Any) -> None:
        entries, index = self.entries, self.sender.original(event.index)
        result = {"file": "/".join(entries.parts(index)), "size": entries.size(index)}
        if isinstance(event, proto.Done):
            result.update(event="file-done", folder=entries.is_folder(index))
        else:
            result.update(event="file-failed", code=event.code, error=event.message)
            self.failures += 1
            if self.first_failure is None:
                self.first_failure = (event.code, event.message)
        if self.client:
            self.client.reply(dict(result, id=self.id, index=index))
        self.answers += 1
        if self.answers == len(self.sender.order):
            self.complete()

    def complete(self) -> None:
        seconds = self.loop.clock() - self.started
        summary = {"id": self.id, "direction": "out", "peer": self.address, "name": self.peer_name,
                   "files": len(self.sender.order), "bytes": self.total, "seconds": round(seconds, 3),
                   "resumed_bytes": self.sender.resumed_bytes}
        if self.first_failure is not None:
            code, message = self.first_failure
            self.result = self.first_failure
            self.ctx.publish(api.transfer_failed_event(summary, code, message))
            if self.client:
                self.client.fail(code, f"{self.failures} of {len(self.sender.order)} failed; first: {message}",
                                 **summary)
        else:
            self.result = ("ok", "")
            self.ctx.publish(api.transfer_done_event(summary))
            if self.client:
                self.client.finish(summary)
        self.close()

    def on_concluded(self, code: str, message: str) -> None:
        self.streaming = False
        self.loop.done(self)
        self.sender.close_file()
        if self.id:
            self.ctx.publish(api.transfer_failed_event(self.describe(), code, message))
        client, self.client = self.client, None
        if client is not None and not client.closed:
            client.fail(code, message)
        if self.id:
            log.warning("transfer %s to %s failed: %s: %s", self.id, self.address, code, printable(message))
        else:
            log.info("to %s: %s: %s", self.address, code, printable(message))

    def on_closed(self) -> None:
        super().on_closed()
        self.sender.close_file()
        self.ctx.registry.answering.discard(self)
