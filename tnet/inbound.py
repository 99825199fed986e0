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
import socket
from typing import Any, Callable, Deque, Dict, Optional, Tuple

from . import api
from . import protocol as proto
from .peers import MIN_PROGRESS_BYTES, PeerConn, PeerContext
from .store import Copy, Store, TempFile, write_all
from .util import printable

log = logging.getLogger("tnet")

MAX_QUEUED_COPIES = 16  # files of one batch waiting to be copied in from another file system; then stop reading


def disk_code(exc: OSError, otherwise: str) -> str:
    return "disk-full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else otherwise


class Intake:
    """The files of one incoming batch, from temp file to their place."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batch = store.new_batch()
        self.temp: Optional[TempFile] = None  # the file in flight
        self.hasher: Any = None
        self.header: Optional[proto.FileHeader] = None
        # Files being copied into place from another file system, one at a time, in order.
        self.copies: Deque[Tuple[Copy, proto.FileHeader, str]] = collections.deque()  # copy, header, sha256

    def open_file(self, header: proto.FileHeader) -> None:
        """A new temp file for ``header``'s bytes; OSError if there is none to be had."""
        self.header = header
        self.temp = self.store.new_temp()
        self.hasher = hashlib.sha256()

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
            saved = self.batch.place(temp, header.path)
            if saved is None:  # TEMP_DIR is on another file system: copy, a slice per turn of the loop
                self.copies.append((self.batch.start_copy(temp, header.path), header, sha256))
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
        return header, sha256, copy.target if finished else "", None

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

    def backlogged(self) -> bool:
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
        if not cfg.allows(self.address):
            self.fail("refused", f"{cfg.host_name} does not take files from {self.address}")
            return
        try:
            ctx.store.check_folders()
        except proto.LocalProtocolError as exc:
            self.fail(exc.code, f"on {cfg.host_name}: {exc.message}")
            return
        shortfall = ctx.store.shortfall(event.size, event.entries)
        if shortfall:
            self.fail("no-space", f"not enough space on {cfg.host_name}: {shortfall}")
            return
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
        if self.awaiting_decision:
            self.fail("declined", f"no one on {cfg.host_name} accepted within {cfg.ask_timeout:g} s")
        elif not self.exchange.opened and not self.lingering:
            self.drop("timeout", f"{self.address} did not open its exchange within {cfg.handshake_timeout:g} s")
        else:
            super().on_deadline()

    def _on_file(self, event: proto.FileHeader) -> None:
        self.start_file("/".join(event.path), event.size)
        try:
            self.intake.open_file(event)
        except OSError as exc:
            self.fail(disk_code(exc, "temp-failed"), f"cannot create a temp file in TEMP_DIR on "
                                                     f"{self.ctx.config.host_name}: {exc.strerror}")
            return
        self.report_progress(None, self.ctx.config.report_progress_in, force=True)

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
            self.loop.each_turn(self, self.step_copies)
            self.keep_sender_waiting()
            self.update_reading()
        else:
            self.file_saved(header, saved, event.sha256)

    def file_saved(self, header: proto.FileHeader, path: str, sha256: str) -> None:
        self.files_saved += 1
        self.ctx.publish(api.file_done_event(self.describe(), "/".join(header.path), path, sha256, header.size))
        self.answer_done(header.index)

    def keep_sender_waiting(self) -> None:
        """A long copy can outlast the sender's IDLE_TIMEOUT, and with the
        connection the copy would go: say `wait` at once, then every third of
        that time (§4.1)."""
        now = self.loop.clock()
        idle = self.ctx.config.idle_timeout
        if now - self.told_wait_at >= idle / 3:
            self.told_wait_at = now
            self.send_event(proto.Wait(min(math.ceil(idle), proto.MAX_WAIT_S)))

    def step_copies(self) -> None:
        """One slice of the first file being copied into FILE_SAVE_DIR (see Batch.start_copy)."""
        self.touch()  # busy on our side: the sender waits for these results, silent
        self.keep_sender_waiting()
        header, sha256, saved, error = self.intake.step_copy()
        if error is not None:
            name = "/".join(header.path)
            code = disk_code(error, "save-failed")
            self.answer_failed(header.index, name, code, f"{name}: {error.strerror or error}")
        elif saved:
            self.file_saved(header, saved, sha256)
        if not self.intake.copies:
            self.loop.done(self)
        if not self.closed:
            self.update_reading()

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
        if self.first_failure is None:
            self.ctx.publish(api.transfer_done_event(summary))
        else:
            self.ctx.publish(api.transfer_failed_event(summary, *self.first_failure))
        self.ctx.registry.transfers.pop(self.id, None)

    def on_concluded(self, code: str, message: str) -> None:
        self.intake.close()  # before an error frame goes out: no `done` may follow it
        self.loop.done(self)
        if self.id:
            log.warning("transfer %s from %s failed: %s: %s", self.id, self.address, code, printable(message))
            self.ctx.publish(api.transfer_failed_event(self.describe(), code, message))
        else:
            super().on_concluded(code, message)

    def on_closed(self) -> None:
        super().on_closed()
        self.ctx.registry.remove_inbound(self)
        self.intake.close()
        self.loop.done(self)
