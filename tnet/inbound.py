"""The receiving end: a connection a peer opened to us (§4).

``InboundPeer`` takes an announce (an answer to our discovery), a message
(published on the events socket, acked) or a batch: the offer goes through
the policy (ALLOW_FROM, the folders, free space and inodes, ACCEPT=ask),
then each entry is answered ``done`` or ``failed``. ``Intake`` holds the
files of that batch: each grows in a temp file while it is hashed, is
checked against its ``end``, and is placed by the store (or copied in, a
slice per turn of the loop, from another file system).
"""

from __future__ import annotations

import collections
import errno
import hashlib
import logging
import math
import os
import socket
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from . import api
from . import protocol as proto
from .keep import MAX_BATCH_SAVED, Keep, KeptFile, partial_key
from .peers import MIN_PROGRESS_BYTES, PeerConn, PeerContext
from .store import Copy, Store, TempFile, write_all
from .util import printable

log = logging.getLogger("tnet")

MAX_QUEUED_COPIES = 16  # files of one batch waiting to be copied in from another file system; then stop reading
PREFIX_SLICE_BYTES = 8 * 1024 * 1024  # of a kept partial, hashed per turn of the loop before resuming it
PREFIX_HASH_BYTES_S = 50 * 1024 * 1024  # the slowest a sender hashes its prefix: how long we wait for its bytes
# A transfer that ends thus keeps what arrived of the file in flight, to be resumed (§7); any other
# end (cancelled, declined, refused, a disk full, a lie) keeps nothing.
KEEP_CODES = {"truncated", "peer-gone", "timeout", "io-error", "shutdown", "internal-error"}


def disk_code(exc: OSError, otherwise: str) -> str:
    return "disk-full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else otherwise


class Intake:
    """The files of one incoming batch, from temp file to their place."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batch = store.new_batch()
        self.temp: Optional[TempFile] = None  # the file in flight
        self.hasher: Any = None
        self.prefix_left = 0  # bytes of a kept partial still to hash before resuming it
        # Files saved by this batch, and by an earlier attempt of it (§7): path -> [saved path, size, sha256].
        self.saved: Dict[str, List[Any]] = {}
        self.earlier: Dict[str, Any] = {}
        self.header: Optional[proto.FileHeader] = None
        # Files being copied into place from another file system, one at a time, in order.
        self.copies: Deque[Tuple[Copy, proto.FileHeader, str]] = collections.deque()  # copy, header, sha256

    def open_file(self, header: proto.FileHeader) -> None:
        """A new temp file for ``header``'s bytes; OSError if there is none to be had."""
        self.header = header
        self.temp = self.store.new_temp()
        self.hasher = hashlib.sha256()

    def open_resumable(self, header: proto.FileHeader, keep: Optional[Keep], sender: str, address: str) -> int:
        """A file that may be resumed: the partial kept of it (claimed), or
        a new one; the bytes held, to be hashed (``hash_prefix``) first."""
        self.header, self.hasher, self.prefix_left = header, hashlib.sha256(), 0
        kept = None
        if keep is not None:
            key = partial_key(self.store.save_dir, sender, header.path)
            kept = keep.claim(key, sender, address, header.path, header.size, header.mtime or 0)
        if kept is None:
            self.temp = self.store.new_temp()
            return 0
        self.temp = kept
        if kept.note:
            log.warning("from %s: %s: %s", address, "/".join(header.path), kept.note)
        os.lseek(kept.fd, 0, os.SEEK_SET)
        self.prefix_left = kept.offset
        return kept.offset

    def hash_prefix(self) -> bool:
        """One slice of the kept bytes into the file's hash; True once all are in."""
        assert self.temp is not None
        data = os.read(self.temp.fd, min(self.prefix_left, PREFIX_SLICE_BYTES))
        if not data:
            raise OSError(errno.EIO, "the kept partial shrank")
        self.hasher.update(data)
        self.prefix_left -= len(data)
        return self.prefix_left == 0

    def resume_frame(self, salt: bytes) -> proto.Resume:
        """What we hold of the file in flight, its prefix hashed (§7): the
        bytes and the SHA-256 of ``salt`` and the prefix's digest; none, and
        the partial emptied, if it is not what its record says (a record
        edited by hand, or a partial changed behind our back)."""
        header, kept = self.header, self.temp
        assert header is not None
        held = kept.offset if isinstance(kept, KeptFile) else 0
        if held and isinstance(kept, KeptFile):
            held = self.checked_prefix(kept)
        digest = hashlib.sha256(salt + self.hasher.digest()).hexdigest() if held else hashlib.sha256(salt).hexdigest()
        return proto.Resume(header.index, held, salt.hex(), digest)

    def take_from(self, offset: int) -> int:
        """The sender sends from ``offset``: from 0 if our prefix is not its file's."""
        if offset == 0 and self.held:
            self.restart_file()
        return offset

    def checked_prefix(self, kept: KeptFile) -> int:
        """The bytes held, if the record agrees: it names them and their hash
        (a transfer that broke), or nothing yet (a daemon killed mid-file:
        the final hash still checks every byte). 0 otherwise, emptied."""
        recorded = (kept.record.get("kept"), kept.record.get("sha256"))
        if recorded in ((0, ""), (kept.offset, self.hasher.hexdigest())):
            return kept.offset
        log.warning("%s: the kept partial does not match its record; starting over", "/".join(kept.record["path"]))
        self.restart_file()
        return 0

    @property
    def held(self) -> int:
        """Bytes of the file in flight that a kept partial gave us."""
        return self.temp.offset if isinstance(self.temp, KeptFile) else 0

    def restart_file(self) -> None:
        """The sender sends the whole file: what was held goes."""
        assert self.temp is not None
        os.ftruncate(self.temp.fd, 0)
        os.lseek(self.temp.fd, 0, os.SEEK_SET)
        self.hasher = hashlib.sha256()

    def keep_or_discard(self, keep: bool, now: float) -> None:
        """The exchange ended mid-file: keep what arrived for a resume, or nothing."""
        temp = self.temp
        if not (isinstance(temp, KeptFile) and keep):
            self.discard_file()
            return
        self.temp = None
        if self.prefix_left:  # still hashing what was kept before: it stays as it was
            temp.release()
        else:
            temp.keep_for_later(os.fstat(temp.fd).st_size, self.hasher.hexdigest(), now)

    def end(self, resumable: bool, keep: Optional[Keep], sender: str, batch: str, now: float) -> None:
        """The exchange ended early: what arrived of the file in flight, and
        where the batch's folders are, kept for a resume (§7), or nothing.
        Before an error frame goes out: no `done` may follow it."""
        self.keep_or_discard(resumable, now)
        if resumable and batch and keep is not None:
            keep.keep_batch(sender, batch, self.batch.tops, dict(self.earlier, **self.saved))
        self.close()

    def write(self, data: Any) -> None:
        assert self.temp is not None  # the exchange lets data through only after `file`
        self.hasher.update(data)
        write_all(self.temp.fd, data)

    def close_file(self, sha256: str) -> Optional[str]:
        """The file's end: its saved path, or None while it is being copied
        in (``step_copy``). OSError if it cannot be placed, ValueError if its
        SHA-256 is not the one the sender read."""
        temp, header = self.temp, self.header
        assert temp is not None and header is not None
        self.temp = None
        try:
            if self.hasher.hexdigest() != sha256:
                raise ValueError("SHA-256 does not match")
            before = self.earlier.get("/".join(header.path))
            if isinstance(before, list) and len(before) == 3 and before[1:] == [header.size, sha256]:
                temp.discard()  # saved already, just as the link broke: its `done` never reached the sender
                return str(before[0])
            saved = self.batch.place(temp, header.path)
            if saved is None:  # TEMP_DIR is on another file system: copy, a slice per turn of the loop
                self.copies.append((self.batch.start_copy(temp, header.path), header, sha256))
            else:
                self.remember(header, saved, sha256)
        except (OSError, ValueError):
            temp.discard()
            raise
        return saved

    def step_copy(self) -> Tuple[proto.FileHeader, str, str, Optional[OSError]]:
        """One slice of the first copy: its header, sha256, the saved path
        ('' while not done) and the error that ended it, if one did."""
        copy, header, sha256 = self.copies[0]
        try:
            finished = copy.step()
        except OSError as exc:
            self.copies.popleft()
            copy.abandon()
            return header, sha256, "", exc
        if finished:
            self.copies.popleft()
            self.remember(header, copy.target, sha256)
        return header, sha256, copy.target if finished else "", None

    def continue_batch(self, tops: Dict[str, str], saved: Dict[str, Any]) -> None:
        """What an earlier attempt of this batch made (§7): its folders, its files."""
        self.batch.tops.update(tops)
        self.earlier = saved

    def remember(self, header: proto.FileHeader, saved: str, sha256: str) -> None:
        if len(self.saved) < MAX_BATCH_SAVED:
            self.saved["/".join(header.path)] = [saved, header.size, sha256]

    def discard_file(self) -> None:
        if self.temp is not None:
            self.temp.discard()
            self.temp = None

    def drop_copies(self) -> None:
        """The sender will hear no `done` for these files: nothing of them stays."""
        for copy, _, _ in self.copies:
            copy.abandon()
        self.copies.clear()

    def close(self) -> None:
        self.discard_file()
        self.drop_copies()
        self.batch.close()


def offer_refusal(ctx: PeerContext, address: str, offer: proto.Offer) -> Optional[Tuple[str, str]]:
    """Why an offer is not taken (code, message), before any byte of it: the
    policy, the folders, free space and inodes (§4.2)."""
    cfg = ctx.config
    if not cfg.allows(address):
        return "refused", f"{cfg.host_name} does not take files from {address}"
    try:
        ctx.store.check_folders()
        if ctx.keep is not None:
            ctx.keep.ensure()
    except proto.LocalProtocolError as exc:
        return exc.code, f"on {cfg.host_name}: {exc.message}"
    shortfall = ctx.store.shortfall(offer.size, offer.entries)
    if shortfall:
        return "no-space", f"not enough space on {cfg.host_name}: {shortfall}"
    return None


def take_over_batch(ctx: PeerContext, newer: "InboundPeer", offer: proto.Offer) -> Tuple[Dict[str, str], Dict]:
    """What earlier attempts of the batch made (``Keep.batch_state``). A
    sender tries again when its link broke, and this end may not have seen
    the break yet: such an attempt ends first, keeping what it got, so that
    the newer one resumes it (§7)."""
    assert ctx.keep is not None
    for conn in list(ctx.registry.inbound.get(newer.address, ())):
        older = getattr(conn, "offer", None)
        if conn is not newer and not conn.closed and older is not None and older.batch == offer.batch \
                and conn.peer_name == offer.name:
            conn.drop("peer-gone", "the sender tried again: a newer attempt of the same batch replaced this one")
    return ctx.keep.batch_state(offer.name, offer.batch)


class InboundPeer(PeerConn):
    """A connection a peer opened to us: an announce, a message or a batch."""

    kind = "inbound"
    role = proto.Role.ACCEPTOR

    def __init__(self, ctx: PeerContext, sock: socket.socket, address: str) -> None:
        super().__init__(ctx, sock, address)
        ctx.registry.add_inbound(self)
        self.set_deadline(ctx.loop.clock() + ctx.config.handshake_timeout)
        self.offer: Optional[proto.Offer] = None
        self.awaiting_decision = False
        self.entries_answered = 0
        self.files_saved = 0
        self.first_failure: Optional[Tuple[str, str]] = None  # (code, message) of the first failed entry
        self.intake = Intake(ctx.store)
        self.told_wait_at = -math.inf  # when the sender was last told to wait for a copy

    def start(self) -> None:
        self.send(self.exchange.send_preface())  # both ends open with it (§2)

    def touch(self, moved: int = MIN_PROGRESS_BYTES) -> None:
        if not self.awaiting_decision:
            super().touch(moved)

    def on_received(self, count: int) -> None:
        self.touch(count)  # a sender owes us bytes: only enough of them keep it alive

    def backlogged(self) -> bool:  # our copies into place: no more files until they are done
        return len(self.intake.copies) >= MAX_QUEUED_COPIES

    def on_event(self, event: Any) -> None:
        self._HANDLERS[type(event)](self, event)  # the exchange lets through only what is legal here

    def _on_announce(self, event: proto.Announce) -> None:
        self.ctx.learn(event.name, self.address, event.nonce)  # unless it answers our discovery, a claim: ignored
        self.close()

    def _on_message(self, event: proto.Message) -> None:
        cfg = self.ctx.config
        if not cfg.allows(self.address):
            self.fail("refused", f"{cfg.host_name} does not take messages from {self.address}")
            return
        self.ctx.publish(api.message_event(self.address, event.name, event.text))
        self.send_event(proto.Ack(cfg.host_name))

    def _on_offer(self, event: proto.Offer) -> None:
        ctx, cfg = self.ctx, self.ctx.config
        self.offer, self.peer_name, self.total = event, event.name, event.size
        refusal = offer_refusal(ctx, self.address, event)
        if refusal:
            self.fail(*refusal)
            return
        if event.batch and ctx.keep is not None:  # an attempt after a dropped link: where the first put things
            self.intake.continue_batch(*take_over_batch(ctx, self, event))
        self.id = ctx.new_transfer_id()
        ctx.registry.transfers[self.id] = self
        if cfg.accept == "ask":
            self.awaiting_decision = True
            self.set_deadline(self.loop.clock() + cfg.ask_timeout)
            self.send_event(proto.Wait(math.ceil(cfg.ask_timeout)))
            ctx.publish(api.offer_event(self.describe(), event.entries))
            return
        self.decide(True)

    def decide(self, accepted: bool) -> None:
        """Take or decline the offer (at once in ``auto`` mode)."""
        self.awaiting_decision = False
        if not accepted:
            self.fail("declined", f"{self.ctx.config.host_name} declined the files")
            return
        self.started = self.loop.clock()
        self.touch()
        entries = self.offer.entries if self.offer else 0
        self.ctx.publish(api.transfer_started_event(self.describe(), entries))
        self.send_event(proto.Accept(self.ctx.config.host_name))
        self.maybe_complete()

    def on_deadline(self) -> None:
        cfg = self.ctx.config
        if self.awaiting_decision:  # nobody answered the offer
            self.fail("declined", f"no one on {cfg.host_name} accepted within {cfg.ask_timeout:g} s")
        elif not self.exchange.opened and not self.lingering:
            self.drop("timeout", f"{self.address} did not open its exchange within {cfg.handshake_timeout:g} s")
        else:
            super().on_deadline()

    def _on_file(self, event: proto.FileHeader) -> None:
        self.start_file("/".join(event.path), event.size)
        try:
            if event.mtime is None:
                self.intake.open_file(event)
            elif self.intake.open_resumable(event, self.ctx.keep, self.peer_name, self.address):
                self.loop.each_turn(self, self.step_work)  # its kept bytes are hashed first, then answered
                return
            else:
                self.answer_resume()
        except OSError as exc:
            self.fail(disk_code(exc, "temp-failed"), f"cannot create a temp file in TEMP_DIR on "
                                                     f"{self.ctx.config.host_name}: {exc.strerror}")
            return
        self.report_progress(None, self.ctx.config.report_progress_in, force=True)

    def answer_resume(self) -> None:
        """Say how much of the file in flight we hold (§7), and give the
        sender time to hash as much of its own."""
        resume = self.intake.resume_frame(os.urandom(16))
        self.send_event(resume)
        self.set_deadline(self.loop.clock() + self.ctx.config.idle_timeout + resume.offset / PREFIX_HASH_BYTES_S)

    def _on_from(self, event: proto.FileFrom) -> None:
        self.bytes_moved += self.intake.take_from(event.offset)
        self.report_progress(None, self.ctx.config.report_progress_in, force=True)

    def step_work(self) -> None:
        """Per turn: a slice of the kept bytes being hashed, or of the first
        file being copied in (see Batch.start_copy). The sender waits for us,
        silent: it is told to wait, and its silence is not held against it."""
        self.touch()
        self.keep_sender_waiting()
        try:
            if self.intake.prefix_left and self.intake.hash_prefix():
                self.answer_resume()
        except OSError as exc:
            self.fail("temp-failed", f"reading a kept partial on {self.ctx.config.host_name}: {exc.strerror}")
        if not self.intake.prefix_left and self.intake.copies:
            header, sha256, saved, error = self.intake.step_copy()
            if error is not None:
                name = "/".join(header.path)
                self.answer_failed(header.index, name, disk_code(error, "save-failed"),
                                   f"{name}: {error.strerror or error}")
            elif saved:
                self.file_saved(header, saved, sha256)
        if not self.intake.prefix_left and not self.intake.copies:
            self.loop.done(self)
        if not self.closed:
            self.update_reading()

    def _on_data(self, event: proto.FileData) -> None:
        try:
            self.intake.write(event.data)
        except OSError as exc:
            self.fail(disk_code(exc, "write-failed"), f"writing {self.current} on {self.ctx.config.host_name}: "
                                                      f"{exc.strerror}")
            return
        self.bytes_moved += len(event.data)
        self.report_progress(None, self.ctx.config.report_progress_in)

    def _on_end(self, event: proto.FileEnd) -> None:
        header = self.intake.header
        assert header is not None  # the exchange lets `end` through only after `file`
        try:
            saved = self.intake.close_file(event.sha256)
        except ValueError:
            self.answer_failed(header.index, self.current, "verify-failed", f"{self.current}: SHA-256 does not match")
            return
        except OSError as exc:
            self.answer_failed(header.index, self.current, "save-failed", f"{self.current}: {exc.strerror or exc}")
            return
        if saved is None:
            self.loop.each_turn(self, self.step_work)
            self.keep_sender_waiting()
            self.update_reading()
        else:
            self.file_saved(header, saved, event.sha256)

    def file_saved(self, header: proto.FileHeader, path: str, sha256: str) -> None:
        self.files_saved += 1
        self.ctx.publish(api.file_done_event(self.describe(), "/".join(header.path), path, sha256, header.size))
        self.answer_done(header.index)

    def keep_sender_waiting(self) -> None:
        """Work of ours (a copy, a prefix hashed) can outlast the sender's IDLE_TIMEOUT: `wait`, at once, then
        every third of that time (§4.1)."""
        now, idle = self.loop.clock(), self.ctx.config.idle_timeout
        if now - self.told_wait_at >= idle / 3:
            self.told_wait_at = now
            self.send_event(proto.Wait(min(math.ceil(idle), proto.MAX_WAIT_S)))

    def _on_folder(self, event: proto.Folder) -> None:
        try:
            self.intake.batch.folder(event.path)
        except OSError as exc:
            name = "/".join(event.path)
            self.answer_failed(event.index, name, "save-failed", f"{name}: {exc.strerror or exc}")
            return
        self.answer_done(event.index)

    def _on_sender_failed(self, event: proto.Failed) -> None:
        self.intake.discard_file()
        self.answer_failed(event.index, self.current, event.code, f"{self.address}: {event.message}")

    def _on_error(self, event: proto.Error) -> None:
        self.drop(event.code, f"{self.address}: {event.message}")

    _HANDLERS: Dict[type, Callable[..., None]] = {
        proto.Announce: _on_announce,
        proto.Message: _on_message,
        proto.Offer: _on_offer,
        proto.FileHeader: _on_file,
        proto.FileData: _on_data,
        proto.FileEnd: _on_end,
        proto.Folder: _on_folder,
        proto.Failed: _on_sender_failed,
        proto.FileFrom: _on_from,
        proto.Error: _on_error,
    }

    def answer_done(self, index: int) -> None:
        self.entries_answered += 1
        self.send_event(proto.Done(index))
        self.maybe_complete()

    def answer_failed(self, index: int, name: str, code: str, message: str) -> None:
        self.entries_answered += 1
        if self.first_failure is None:
            self.first_failure = (code, message)
        log.warning("from %s: %s: %s", self.address, code, printable(message))
        self.ctx.publish(api.file_failed_event(self.describe(), name, code, message))
        self.send_event(proto.Failed(index, code, proto.clip_text(message)))
        self.maybe_complete()

    def maybe_complete(self) -> None:
        """Every entry answered: the batch is over, as the sender will report it."""
        if self.offer is None or self.entries_answered != self.offer.entries or self.result is not None:
            return
        self.result = self.first_failure or ("ok", "")
        self.current = ""
        summary = dict(self.describe(), entries=self.offer.entries, files=self.files_saved)
        if self.offer.batch and self.ctx.keep is not None:
            self.ctx.keep.forget_batch(self.peer_name, self.offer.batch)
        if self.first_failure is None:
            self.ctx.publish(api.transfer_done_event(summary))
        else:
            self.ctx.publish(api.transfer_failed_event(summary, *self.first_failure))
        self.ctx.registry.forget(self)

    def on_concluded(self, code: str, message: str) -> None:
        batch = self.offer.batch if self.offer is not None else ""
        self.intake.end(code in KEEP_CODES, self.ctx.keep, self.peer_name, batch, self.ctx.wall())
        self.loop.done(self)
        if self.id:
            log.warning("transfer %s from %s failed: %s: %s", self.id, self.address, code, printable(message))
            self.ctx.publish(api.transfer_failed_event(self.describe(), code, message))
        else:
            super().on_concluded(code, message)

    def on_closed(self) -> None:
        super().on_closed()
        self.intake.close()
