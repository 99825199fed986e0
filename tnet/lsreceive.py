"""Files a LocalSend device sends us: one accepted prepare-upload as a transfer.

``LsReceive`` is what ``tnet transfers``, ``accept``, ``decline`` and
``cancel`` see of a LocalSend sender, with the interface of an incoming tnet
transfer (``id``, ``describe``, ``awaiting_decision``, ``decide``, ``fail``):
it holds the request while ACCEPT=ask waits (ASK_TIMEOUT), then the
``localsend.Session`` that says which uploads to take, and publishes the
same events as a tnet batch. It is a timer item of the loop: a session in
which nothing moved for IDLE_TIMEOUT fails (``timeout``), and every file
still pending with it (``Receiving``, its base, holds what it shows and
reports). ``Upload`` is one file's body on its way: a temp file hashed
while written, then checked and placed by the store.

The HTTP side (statuses, connections) is the front door's, ``lsdoor``;
nothing here reads a socket.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from . import api
from . import localsend as ls
from .peers import MIN_PROGRESS_BYTES, PROGRESS_INTERVAL_S, PeerContext
from .store import Copy, TempFile, write_all
from .util import printable

log = logging.getLogger("tnet")

TOKEN_BYTES = 16  # session ids and tokens: 128 random bits, 32 hex digits

# How an answer to a held prepare-upload is given: (status, JSON body or b"").
Answer = Callable[[int, bytes], None]


def new_token() -> str:
    return secrets.token_hex(TOKEN_BYTES)


class Upload:
    """One file's body: a temp file and its SHA-256, as the bytes come."""

    def __init__(self, transfer: "LsReceive", offer: ls.FileOffer, temp: TempFile,
                 abort: Callable[[], None]) -> None:
        self.transfer = transfer
        self.offer = offer
        self.temp: Optional[TempFile] = temp
        self.hasher = hashlib.sha256()
        self.received = 0
        self.copy: Optional[Copy] = None
        self.sha256 = ""
        self.abort = abort  # ends the connection it arrives on: the transfer is over

    @property
    def name(self) -> str:
        return "/".join(self.offer.path)

    def write(self, data: Any) -> None:
        assert self.temp is not None  # the door writes only into an open upload
        self.hasher.update(data)
        write_all(self.temp.fd, data)
        self.received += len(data)

    def discard(self) -> None:
        if self.copy is not None:
            self.copy.abandon()
            self.copy = None
        if self.temp is not None:
            self.temp.discard()
            self.temp = None


class Receiving:
    """What a LocalSend transfer shows and reports: its counts, ``describe``,
    progress, file-failed events, and the idle deadline that MIN_PROGRESS_BYTES
    push back. ``LsReceive`` is the one kind."""

    def __init__(self, ctx: PeerContext, address: str, offer: ls.PrepareUpload) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self.address = address
        self.offer = offer
        self.names = {f.id: "/".join(f.path) for f in offer.files}  # a refused name is not here: it may be anything
        self.id = ""
        self.first_failure: Optional[Tuple[str, str]] = None
        self.reported: Set[str] = set()  # file ids that had their file-done or file-failed event
        self.files_saved = 0
        self.total = sum(f.size for f in offer.files)
        self.bytes_moved = 0
        self.current: Optional[Upload] = None
        self.started = self.loop.clock()
        self.progress_at = -math.inf
        self.moved_since_touch = 0
        self.deadline = math.inf
        self.scheduled = math.inf
        self.closed = False

    @property
    def entries(self) -> int:
        return len(self.offer.files) + len(self.offer.refused)

    def label(self) -> str:
        return f"localsend {self.address}"

    def set_deadline(self, when: float) -> None:
        self.deadline = when
        self.loop.schedule(self)

    def on_deadline(self) -> None:
        raise NotImplementedError  # the kind's: what an idle deadline means to it

    def touch(self, moved: int = MIN_PROGRESS_BYTES) -> None:
        """Each MIN_PROGRESS_BYTES moved push the idle deadline back, as for a tnet peer."""
        self.moved_since_touch += moved
        if self.moved_since_touch >= MIN_PROGRESS_BYTES:
            self.moved_since_touch = 0
            self.set_deadline(self.loop.clock() + self.ctx.config.idle_timeout)

    def describe(self) -> Dict[str, Any]:
        """What `tnet transfers` shows of it (§6.1)."""
        current = self.current
        return {
            "id": self.id,
            "direction": "in",
            "peer": self.address,
            "name": self.offer.info.alias,
            "file": current.name if current else "",
            "bytes": self.bytes_moved,
            "size": self.total,
            "file_bytes": current.received if current else 0,
            "file_size": current.offer.size if current else 0,
            "seconds": round(self.loop.clock() - self.started, 3),
        }

    def report_progress(self, force: bool = False) -> None:
        if not self.ctx.config.report_progress_in:
            return
        now = self.loop.clock()
        if force or now - self.progress_at >= PROGRESS_INTERVAL_S:
            self.progress_at = now
            self.ctx.publish(api.progress_event(self.describe()))

    def file_failed_event(self, file_id: str, code: str, message: str) -> None:
        self.reported.add(file_id)
        name = self.names.get(file_id, file_id)
        if self.first_failure is None:  # the log has the first; the events socket has each
            self.first_failure = (code, message)
            log.warning("from %s: %s: %s: %s", self.address, name, code, printable(message))
        self.ctx.publish(api.file_failed_event(self.describe(), name, code, message))


class LsReceive(Receiving):
    """One LocalSend sender's prepare-upload, from the offer to its last file."""

    kind = "localsend"

    def __init__(self, ctx: PeerContext, sessions: ls.Sessions, address: str, offer: ls.PrepareUpload,
                 answer: Answer, on_over: Callable[["LsReceive"], None]) -> None:
        super().__init__(ctx, address, offer)
        self.sessions = sessions
        self.answer: Optional[Answer] = answer  # while the prepare-upload waits for its answer
        self.on_over = on_over
        self.session: Optional[ls.Session] = None
        self.batch = ctx.store.new_batch()
        self.awaiting_decision = False
        self.result: Optional[Tuple[str, str]] = None
        self.failures: Dict[str, Tuple[str, str]] = {}  # file id -> the last (code, message) it failed with
        self.uploads: Set[Upload] = set()

    # -- the offer

    def start(self) -> None:
        """Registered as a transfer: asked about (ACCEPT=ask) or taken at once."""
        cfg = self.ctx.config
        self.id = self.ctx.new_transfer_id()
        self.ctx.registry.transfers[self.id] = self
        if cfg.accept == "ask":
            self.awaiting_decision = True
            self.set_deadline(self.loop.clock() + cfg.ask_timeout)
            self.ctx.publish(api.offer_event(self.describe(), self.entries))
        else:
            self.decide(True)

    def decide(self, accepted: bool) -> None:
        """Take or decline the offer: the held prepare-upload gets its answer."""
        self.awaiting_decision = False
        cfg = self.ctx.config
        if not accepted:
            self.refuse(403, "declined", f"{cfg.host_name} declined the files")
            return
        if not self.offer.files:
            code, message = self.offer.refused[0][1:]
            self.refuse(403, code, f"no file was taken: {message}")
            return
        tokens = {f.id: new_token() for f in self.offer.files}
        session = ls.Session(new_token(), self.address, self.offer, tokens)
        try:
            self.sessions.add(session)
        except ls.LocalSendError as exc:
            self.refuse(exc.status, "busy", f"{cfg.host_name} is taking {len(self.sessions)} transfers already")
            return
        self.session = session
        self.started = self.loop.clock()
        self.ctx.publish(api.transfer_started_event(self.describe(), self.entries))
        for file_id, code, message in self.offer.refused:
            self.file_failed_event(file_id, code, message)
        self.give_answer(200, ls.encode_prepare_response(session.session_id, tokens))
        self.set_deadline(self.loop.clock() + cfg.idle_timeout)

    def refuse(self, status: int, code: str, message: str) -> None:
        for file_id, refused_code, refused_message in self.offer.refused:
            self.file_failed_event(file_id, refused_code, refused_message)
        self.give_answer(status, error_body(message))
        self.conclude(code, message)

    def give_answer(self, status: int, body: bytes) -> None:
        answer, self.answer = self.answer, None
        if answer is not None:
            answer(status, body)

    def sender_gone(self) -> None:
        """The connection holding the prepare-upload closed before its answer."""
        self.answer = None
        if self.session is None and self.result is None:
            self.conclude("cancelled", f"{self.address} withdrew the offer")

    # -- uploads (the door checked the session, token and address)

    def begin(self, offer: ls.FileOffer, abort: Callable[[], None]) -> Upload:
        """An upload of ``offer`` starts: its temp file (OSError if none can be made)."""
        assert self.session is not None
        upload = Upload(self, offer, self.ctx.store.new_temp(), abort)
        self.session.file_started(offer.id)
        self.uploads.add(upload)
        self.current = upload
        self.touch()
        self.report_progress(force=True)
        return upload

    def moved(self, upload: Upload, count: int) -> None:
        self.bytes_moved += count
        self.current = upload
        self.touch(count)
        self.report_progress()

    def verify(self, upload: Upload) -> Optional[str]:
        """The body is complete: its saved path, None while it is being copied
        in (``upload.copy``). ValueError if its SHA-256 is not the announced
        one, OSError if it cannot be placed: then ``failed`` it."""
        temp = upload.temp
        assert temp is not None
        upload.sha256 = upload.hasher.hexdigest()
        if upload.offer.sha256 is not None and upload.sha256 != upload.offer.sha256:
            raise ValueError(f"{upload.name}: SHA-256 does not match")
        saved = self.batch.place(temp, upload.offer.path)
        if saved is None:  # TEMP_DIR is on another file system: copied a slice per turn
            upload.copy = self.batch.start_copy(temp, upload.offer.path)
        upload.temp = None  # placed, or the copy owns it now
        return saved

    def saved(self, upload: Upload, path: str) -> None:
        self.uploads.discard(upload)
        self.files_saved += 1
        self.touch()
        assert self.session is not None
        self.session.file_finished(upload.offer.id, True)
        self.reported.add(upload.offer.id)
        self.ctx.publish(api.file_done_event(self.describe(), upload.name, path, upload.sha256, upload.offer.size))
        self.maybe_complete()

    def failed(self, upload: Upload, code: str, message: str, retry: bool = False) -> None:
        """The upload ended without a file; with ``retry`` (a SHA-256 mismatch)
        the sender may send it again, up to localsend.MAX_UPLOAD_ATTEMPTS."""
        upload.discard()
        self.uploads.discard(upload)
        self.bytes_moved -= upload.received  # what may come again is not counted twice
        self.failures[upload.offer.id] = (code, message)
        if self.session is None or self.result is not None:
            return
        self.session.file_finished(upload.offer.id, False, retry)
        if self.session.file_state(upload.offer.id) is ls.FileState.FAILED:
            self.file_failed_event(upload.offer.id, code, message)
        else:
            log.info("from %s: %s: %s (the sender may try again)", self.address, code, printable(message))
        self.maybe_complete()

    def sender_cancelled(self) -> None:
        """POST cancel from the sender."""
        self.fail("cancelled", f"{self.address} cancelled the transfer")

    # -- the end

    def maybe_complete(self) -> None:
        session = self.session
        if session is None or not session.done or self.result is not None:
            return
        self.current = None
        summary = dict(self.describe(), entries=self.entries, files=self.files_saved)
        if self.first_failure is None:
            self.result = ("ok", "")
            self.ctx.publish(api.transfer_done_event(summary))
        else:
            self.result = self.first_failure
            self.ctx.publish(api.transfer_failed_event(summary, *self.first_failure))
        self.over()

    def fail(self, code: str, message: str) -> None:
        """End it now (`tnet cancel`, the sender's cancel, a timeout, shutdown):
        the held request is refused, uploads in flight are cut, pending files fail."""
        if self.result is not None:
            return
        if self.answer is not None:
            self.refuse(403, code, message)
            return
        if self.session is not None:
            self.session.cancel()
            for upload in list(self.uploads):
                upload.discard()
                self.uploads.discard(upload)
                self.session.file_finished(upload.offer.id, False)
                upload.abort()
            for file_id in self.session.files:
                if self.session.file_state(file_id) is ls.FileState.FAILED and file_id not in self.reported:
                    earlier = self.failures.get(file_id)
                    self.file_failed_event(file_id, *(earlier or (code, message)))
        self.conclude(code, message)

    def conclude(self, code: str, message: str) -> None:
        if self.result is not None:
            return
        self.result = (code, message)
        self.current = None
        if self.id:
            log.warning("transfer %s from %s failed: %s: %s", self.id, self.address, code, printable(message))
            summary = dict(self.describe(), entries=self.entries, files=self.files_saved)
            self.ctx.publish(api.transfer_failed_event(summary, code, message))
        self.over()

    def over(self) -> None:
        self.closed = True
        self.batch.close()
        self.ctx.registry.forget(self)
        self.on_over(self)

    def on_deadline(self) -> None:
        cfg = self.ctx.config
        if self.awaiting_decision:
            self.decide_timeout(cfg.ask_timeout)
        elif not self.uploads:
            self.fail("timeout", f"{self.address} sent nothing for {cfg.idle_timeout:g} s")
        else:
            self.set_deadline(self.loop.clock() + cfg.idle_timeout)  # each upload has its own deadline

    def decide_timeout(self, ask_timeout: float) -> None:
        self.awaiting_decision = False
        self.refuse(403, "declined", f"no one on {self.ctx.config.host_name} accepted within {ask_timeout:g} s")

    def on_internal_error(self) -> None:
        self.fail("internal-error", "internal error; see the daemon log")

def error_body(message: str) -> bytes:
    """A JSON body saying why, as the official app's errors carry one."""
    return json.dumps({"message": message}).encode("ascii")


__all__: List[str] = ["LsReceive", "Upload", "error_body", "new_token"]
