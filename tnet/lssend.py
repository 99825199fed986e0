"""Sending to LocalSend devices (LOCALSEND=1): files and messages, as tnet sends them (§8.6).

* ``Targets``: who a name or address a user typed is, a tnet daemon (its
  address) or a LocalSend device (``lsfind.Device``), by one rule: a tnet
  daemon first, then a LocalSend device, and a device that says it is tnet
  is asked for its tnet side first;
* ``LsSendJob``: a ``sending.SendJob`` (the walk, the lines to its client)
  whose peer may turn out to be a LocalSend device: its one attempt is then
  an ``LsSend``;
* ``Hashes``: the SHA-256 of each file of a batch, a slice per turn of the
  loop, before the offer (LocalSend receivers check it);
* ``Caller``: our requests to one device on a kept-alive ``HttpLink``;
* ``LsSend``: one send to a device: prepare-upload, then an upload per file,
  one at a time, answered to its client with the lines of a tnet attempt,
  with the same events, a transfer `tnet transfers` shows and `tnet cancel`
  stops; ``LsMessage``: a message, as the official app sends one.

LocalSend has no resume, and its receivers keep nothing of a file cut short:
a send is one attempt (a request whose kept-alive connection the server had
closed meanwhile is sent once more, on a new one).

Knows the LocalSend endpoints and statuses, the loop, the walk's entries;
nothing of tnet's wire protocol.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import ipaddress
import json
import logging
import math
import mimetypes
import os
import secrets
import stat
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Set, Tuple
from urllib.parse import quote

from . import api, http
from . import localsend as ls
from . import protocol as proto
from .discovery import DEFAULT_DISCOVER_S, Discovery
from .history import file_record
from .httpconn import HttpLink, Outgoing, Reply, Server
from .lsdoor import DEVICE_MODEL, LocalSend
from .lsfind import Device
from .outbound import Client
from .peers import PROGRESS_INTERVAL_S, PeerContext
from .sending import SendJob
from .util import printable
from .walk import MAX_SKIPPED_SHOWN, Entries, Walk

log = logging.getLogger("tnet")

HASH_SLICE_BYTES = 8 * 1024 * 1024  # of files hashed per turn of the loop: a few milliseconds
FILES_PER_TURN = 256  # opened per turn while hashing: a tree of small files costs an open each
PREPARE_TIMEOUT_S = 300.0  # for a person to answer the receiver's prompt (tnet asks for 120 s, localsendd for 60)
CANCEL_TIMEOUT_S = 4.0  # connect, TLS and answer of our cancel: a courtesy, not worth waiting for
VERIFY_BYTES_PER_S = 50 * 1000 * 1000  # after a file's last byte, its receiver hashes and places it (as §7's wait)
PROGRESS_START_BYTES = 64 * 1024  # a file this large gets a progress line when it starts, as a tnet send's
MAX_ANSWER_BYTES = ls.MAX_PREPARE_UPLOAD_BYTES  # of a prepare-upload's answer: ids and tokens of up to MAX_FILES
MAX_UPLOAD_ANSWER_BYTES = 64 * 1024  # an upload's answer carries a short message at most
TNET_MODEL = DEVICE_MODEL  # the deviceModel a tnet daemon with LOCALSEND=1 announces

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

# Statuses of prepare-upload -> (tnet code, what it says); any other is "peer-error".
PREPARE_STATUSES = {
    400: ("bad-request", "took the offer for a malformed one"),
    401: ("pin-required", "asks for a PIN (give --pin)"),
    403: ("declined", "declined the files"),
    409: ("busy", "is busy with another transfer"),
    413: ("refused", "refused an offer this large"),
    429: ("refused", "refuses this address for a while: too many wrong PINs"),
    507: ("no-space", "has not enough space"),
}
# Statuses of an upload -> tnet code; the ones in SESSION_OVER end the send, the others fail one file.
UPLOAD_STATUSES = {400: "bad-request", 403: "refused", 404: "cancelled", 409: "cancelled", 410: "cancelled",
                   413: "size-mismatch", 422: "verify-failed", 500: "save-failed", 507: "disk-full"}
SESSION_OVER = (403, 404, 409, 410)


def file_type(name: str) -> str:
    """The MIME type LocalSend apps show a file by (images to the gallery...)."""
    return mimetypes.guess_type(name, strict=False)[0] or ls.DEFAULT_FILE_TYPE


def said(reply: Reply) -> str:
    """What the receiver said with a status: the official app's (and tnet's) {"message": ...}, if any."""
    try:
        text = json.loads(reply.body.decode("utf-8")).get("message") if reply.body else None
    except (ValueError, AttributeError):
        return ""
    return f": {printable(proto.clip_text(text))}" if isinstance(text, str) and text else ""


def open_file(path: str, size: int) -> Tuple[int, Optional[os.stat_result], str]:
    """(descriptor, its stat, '') of a file to send, or (-1, None, why it is not what the walk
    found). Never blocks (a FIFO swapped in) and never follows a link swapped in since the walk;
    LocalProtocolError (file-error) if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO, errno.ENOTDIR):
            return -1, None, f"{path} was replaced or removed since the walk ({exc.strerror})"
        raise proto.LocalProtocolError("file-error", f"cannot read {printable(path)}: {exc.strerror}") from None
    info = os.fstat(fd)
    reason = "" if stat.S_ISREG(info.st_mode) else f"{path} is no longer a regular file"
    if not reason and info.st_size != size:
        reason = f"{path} changed size since the walk"
    if reason:
        os.close(fd)
        return -1, None, reason
    return fd, info, ""


def stamp(info: os.stat_result) -> Tuple[int, int]:
    return info.st_size, info.st_mtime_ns


# --- Whom a send goes to -------------------------------------------------------------------------


class Targets:
    """What a user typed, as a tnet daemon or a LocalSend device (docs/PROTOCOL.md §8.6):

    * an address: a tnet daemon that answered a discovery from it; else a
      LocalSend device seen there; else a tnet daemon, as without LOCALSEND;
    * a name: tnet names first (as ``Discovery.resolve``: exact, then in any
      case); then LocalSend aliases (exact, then in any case; several devices
      of one alias at one address are one, the latest); a name known nowhere
      starts a discovery (and an announcement) before it is unknown;
    * a device that announces itself as tnet (deviceModel "tnet") may be a
      tnet daemon whose tnet side we have not heard yet: a discovery is asked
      first, and its tnet side wins.
    """

    def __init__(self, discovery: Discovery, localsend: Optional[LocalSend]) -> None:
        self.discovery, self.localsend = discovery, localsend

    def resolve(self, peer: str, tnet: Callable[[str], None], device: Callable[[Device], None],
                fail: Callable[[str, str], None]) -> None:
        localsend = self.localsend
        if localsend is None:
            self.discovery.resolve(peer, tnet, fail)
            return
        if not self.decide(peer, False, tnet, device, fail):
            localsend.announce()
            try:
                self.discovery.discover(DEFAULT_DISCOVER_S, lambda found: self.after(peer, tnet, device, fail))
            except proto.LocalProtocolError as exc:
                fail(exc.code, exc.message)

    def decide(self, peer: str, final: bool, tnet: Callable[[str], None], device: Callable[[Device], None],
               fail: Callable[[str, str], None]) -> bool:
        """Call one of the three and return True; or return False: ask the network first."""
        directory = self.discovery.directory
        try:
            address = str(ipaddress.IPv4Address(peer))
        except ValueError:
            address = ""
        if address:
            found = None if address in directory.records else self.latest(d for d in self.devices()
                                                                           if d.address == address)
            if found is None:
                tnet(address)
                return True
            candidates = [found]
        else:
            addresses = directory.addresses_of(peer)
            candidates = [] if addresses else self.named(peer)
            addresses = addresses or [d.address for d in candidates]
            if len(addresses) > 1:
                fail("ambiguous-peer", f"{peer!r} is at {', '.join(addresses)}; name one address")
                return True
            if addresses and not candidates:
                tnet(addresses[0])
                return True
        if candidates and (final or candidates[0].device_model != TNET_MODEL):
            device(candidates[0])
            return True
        if final:
            known = sorted(set(directory.names()) | {d.alias for d in self.devices()})
            fail("unknown-peer", f"no peer named {peer!r}; known: {', '.join(known) or 'none'}")
        return final

    def after(self, peer: str, tnet: Callable[[str], None], device: Callable[[Device], None],
              fail: Callable[[str, str], None]) -> None:
        """The discovery window closed: decide for good."""
        self.decide(peer, True, tnet, device, fail)

    def devices(self) -> List[Device]:
        return self.localsend.devices() if self.localsend is not None else []

    @staticmethod
    def latest(devices: Iterable[Device]) -> Optional[Device]:
        found: Optional[Device] = None
        for candidate in devices:
            if found is None or candidate.last_seen >= found.last_seen:
                found = candidate
        return found

    def named(self, name: str) -> List[Device]:
        """The devices called ``name`` (exactly, else in any case), one per address, the latest."""
        devices = self.devices()
        for same in (lambda alias: alias == name, lambda alias: alias.casefold() == name.casefold()):
            by_address: Dict[str, Device] = {}
            for found in sorted((d for d in devices if same(d.alias)), key=lambda d: d.last_seen):
                by_address[found.address] = found
            if by_address:
                return [by_address[a] for a in sorted(by_address)]
        return []


class LsSendJob(SendJob):
    """A `send` whose peer may be a LocalSend device (``Targets``): its one attempt is then an ``LsSend``."""

    def __init__(self, ctx: PeerContext, discovery: Discovery, client: Client, walk: Walk, peer: str,
                 retry_for: float, targets: Targets, localsend: LocalSend, pin: Optional[str]) -> None:
        super().__init__(ctx, discovery, client, walk, peer, retry_for)
        self.targets, self.localsend, self.pin = targets, localsend, pin
        self.device: Optional[Device] = None
        self.ls: Optional[LsSend] = None

    def resolve(self) -> None:
        self.targets.resolve(self.peer, self.first_attempt, self.to_device, self.fail_for_good)

    def to_device(self, device: Device) -> None:
        self.device = device
        self.first_attempt(device.address)  # the `started` line, then start_attempt

    def start_attempt(self) -> None:
        if self.device is None:
            super().start_attempt()
            return
        if self.client.closed or self.answered:
            return
        self.attempts = 1
        self.ls = LsSend(self.ctx, self.localsend, self.device, self.walk.entries, self, self.id, self.pin)
        self.ls.start()

    def cancel(self, code: str, message: str) -> None:
        super().cancel(code, message)
        attempt, self.ls = self.ls, None
        if attempt is not None:
            attempt.cancel(code, message)


# --- The files' hashes ---------------------------------------------------------------------------


class Hashes:
    """The SHA-256 of each file of a batch, a slice per ``step``, and what each
    file was when read (size, mtime), so that a change before or while it is
    sent is seen. A file that changed since the walk is in ``changed``."""

    def __init__(self, entries: Entries, buffer: memoryview) -> None:
        self.entries, self.buffer = entries, buffer
        self.files = [i for i in range(len(entries)) if not entries.is_folder(i)]
        self.sha256: Dict[int, str] = {}
        self.stamps: Dict[int, Tuple[int, int]] = {}
        self.changed: Dict[int, str] = {}  # entry -> why it is not sent
        self.next = 0  # position in ``files``
        self.fd = -1
        self.hasher: Any = None
        self.left = 0

    @property
    def done(self) -> bool:
        return self.fd < 0 and self.next == len(self.files)

    def step(self) -> bool:
        """Hash up to HASH_SLICE_BYTES more; True once every file is hashed.
        LocalProtocolError (file-error) for a file that cannot be read."""
        budget, opened = HASH_SLICE_BYTES, 0
        while budget > 0 and opened < FILES_PER_TURN and not self.done:
            if self.fd < 0:
                self.open_next()
                opened += 1
            else:
                budget -= self.read_some(budget)
        return self.done

    def open_next(self) -> None:
        index = self.files[self.next]
        size = self.entries.size(index)
        fd, info, reason = open_file(self.entries.local_path(index), size)
        if reason:
            self.changed[index] = reason
            self.next += 1
            return
        assert info is not None
        self.fd, self.hasher, self.left = fd, hashlib.sha256(), size
        self.stamps[index] = stamp(info)
        if not size:
            self.end_file(index)

    def read_some(self, budget: int) -> int:
        index = self.files[self.next]
        view = self.buffer
        try:
            n = os.readv(self.fd, [view[:min(self.left, len(view), budget)]])
        except OSError as exc:
            self.close()
            path = printable(self.entries.local_path(index))
            raise proto.LocalProtocolError("file-error", f"reading {path}: {exc.strerror}") from None
        if n == 0:
            self.changed[index] = f"{self.entries.local_path(index)} shrank while being read"
            self.close()
            self.next += 1
            return 1
        self.hasher.update(view[:n])
        self.left -= n
        if not self.left:
            self.end_file(index)
        return n

    def end_file(self, index: int) -> None:
        if stamp(os.fstat(self.fd)) == self.stamps[index]:
            self.sha256[index] = self.hasher.hexdigest()
        else:
            self.changed[index] = f"{self.entries.local_path(index)} changed while being read"
        self.close()
        self.next += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- Requests to one device ----------------------------------------------------------------------


class Caller:
    """Our requests to one device, one at a time on a kept-alive link (HTTPS
    with our certificate and its fingerprint pinned, or HTTP as it announced);
    a request that met a connection the server had closed meanwhile goes once
    more, on a new one. A link that cannot be opened (no descriptor) is an
    ``io-error`` reply."""

    def __init__(self, ctx: PeerContext, localsend: LocalSend, device: Device) -> None:
        self.ctx, self.localsend, self.device = ctx, localsend, device
        https = device.protocol != "http"
        self.server = Server(device.address, device.port, localsend.client_tls if https else None,
                             device.fingerprint if https else "")
        self.link: Optional[HttpLink] = None
        self.requests = self.links = 0  # sent, and connections they took (the log says, for debugging)

    def new_link(self, connect_timeout: float) -> HttpLink:
        cfg = self.ctx.config
        return HttpLink(self.ctx.loop, self.localsend.buffers, self.server, cfg.bind_address, connect_timeout,
                        cfg.idle_timeout)

    def head(self, target: str, fields: List[Tuple[str, str]]) -> bytes:
        return http.encode_request_head("POST", target, [("Host", f"{self.device.address}:{self.device.port}")]
                                        + fields)

    def json_request(self, target: str, body: bytes) -> bytes:
        return self.head(target, [("Content-Type", "application/json"), ("Accept", "application/json"),
                                  ("Content-Length", str(len(body)))])

    def send(self, out: Outgoing, retried: bool = False) -> None:
        def on_reply(reply: Reply) -> None:
            if reply.retryable and not retried:
                log.debug("%s closed a kept-alive connection; sending again on a new one", self.device.address)
                self.send(out, retried=True)
            else:
                out.on_reply(reply)

        if self.link is None or self.link.closed:
            try:
                self.link = self.new_link(self.ctx.config.handshake_timeout)
            except OSError as exc:  # no socket to be had (EMFILE)
                out.on_reply(Reply(0, code="io-error", message=f"cannot open a connection: {exc.strerror}"))
                return
            self.links += 1
        self.requests += 1
        self.link.request(dataclasses.replace(out, on_reply=on_reply))

    def cancel_remote(self, session_id: str) -> None:
        """POST cancel, on a link of its own (ours may be mid-body); its answer is not awaited by anyone."""
        target = ls.CANCEL_PATH + ("?sessionId=" + quote(session_id, safe="") if session_id else "")
        try:
            link = self.new_link(CANCEL_TIMEOUT_S)
        except OSError:
            return
        link.request(Outgoing(self.head(target, [("Content-Length", "0")]), lambda reply: link.close(),
                              timeout=CANCEL_TIMEOUT_S))

    def close(self) -> None:
        if self.link is not None:
            self.link.abort()
            self.link = None
        log.debug("to %s: %d requests on %d connections", self.device.address, self.requests, self.links)


def prepare_target(pin: Optional[str]) -> str:
    return ls.PREPARE_UPLOAD_PATH + ("?pin=" + quote(pin, safe="") if pin is not None else "")


def prepare_failure(reply: Reply, alias: str, pin: Optional[str]) -> Tuple[str, str]:
    """A prepare-upload that got no session, as (tnet code, message)."""
    if not reply.status:
        return reply.code, reply.message
    code, what = PREPARE_STATUSES.get(reply.status, ("peer-error", f"answered {reply.status}"))
    if reply.status == 401 and pin is not None:
        what = "refused the PIN"
    return code, f"{printable(alias)} {what} ({reply.status}){said(reply)}"


# --- A send ------------------------------------------------------------------------------------


class Reporting:
    """What a send to a device shows and reports: ``describe``, progress lines
    and events, the lines of an entry done or failed. ``LsSend`` is the one kind."""

    def __init__(self, ctx: PeerContext, device: Device, entries: Entries, client: Client, transfer_id: str) -> None:
        self.ctx, self.loop, self.device, self.entries = ctx, ctx.loop, device, entries
        self.client, self.id = client, transfer_id
        self.current = -1  # the entry in flight
        self.file_sent = 0
        self.bytes_moved = 0
        self.bytes_before = 0  # moved before the file in flight
        self.total = entries.total
        self.started = self.loop.clock()
        self.progress_at = -math.inf
        self.first_failure: Optional[Tuple[str, str]] = None
        self.folders_shown: Set[int] = set()

    def describe(self) -> Dict[str, Any]:
        """What `tnet transfers` shows of it (§6.1)."""
        current = self.current
        return {"id": self.id, "direction": "out", "peer": self.device.address, "name": self.device.alias,
                "file": "/".join(self.entries.parts(current)) if current >= 0 else "", "bytes": self.bytes_moved,
                "size": self.total, "file_bytes": self.file_sent if current >= 0 else 0,
                "file_size": self.entries.size(current) if current >= 0 else 0,
                "seconds": round(self.loop.clock() - self.started, 3)}

    def summary(self) -> Dict[str, Any]:
        return {"id": self.id, "direction": "out", "peer": self.device.address, "name": self.device.alias,
                "files": len(self.entries), "bytes": self.total,
                "seconds": round(self.loop.clock() - self.started, 3), "resumed_bytes": 0}

    def report_progress(self, force: bool = False) -> None:
        now = self.loop.clock()
        if not force and now - self.progress_at < PROGRESS_INTERVAL_S:
            return
        self.progress_at = now
        event = api.progress_event(self.describe())
        self.client.reply(dict(event))
        if self.ctx.config.report_progress_out:
            self.ctx.publish(event)

    def entry_line(self, index: int, **fields: Any) -> None:
        self.client.reply(dict(fields, file="/".join(self.entries.parts(index)), size=self.entries.size(index),
                               id=self.id, index=index))

    def entry_done(self, index: int, sha256: str) -> None:
        """A file saved: its folders' lines first (LocalSend makes them as it saves their files)."""
        folders = []
        parent = self.entries.parents[index]
        while parent >= 0 and parent not in self.folders_shown:
            folders.append(parent)
            parent = self.entries.parents[parent]
        for folder in reversed(folders):
            self.folders_shown.add(folder)
            self.entry_line(folder, event="file-done", folder=True)
        self.entry_line(index, event="file-done", folder=False)
        name = "/".join(self.entries.parts(index))
        self.ctx.record_files(self.id, [file_record(name, self.entries.size(index), sha256,
                                                    self.entries.local_path(index))])

    def entry_failed(self, index: int, code: str, message: str) -> None:
        if self.first_failure is None:
            self.first_failure = (code, message)
        self.entry_line(index, event="file-failed", code=code, error=message)

    def skip_empty_folders(self, with_files: Set[int]) -> None:
        """LocalSend carries files, not folders: one with no file sent below it cannot be made there.
        Said as the walk's skipped entries are: the first MAX_SKIPPED_SHOWN, then a count."""
        entries = self.entries
        empty = [i for i in range(len(entries)) if entries.is_folder(i) and i not in with_files]
        for index in empty[:MAX_SKIPPED_SHOWN]:
            self.client.reply({"event": "skipped", "path": entries.local_path(index),
                               "reason": "no file in this folder is sent: LocalSend carries files, not folders"})
        if len(empty) > MAX_SKIPPED_SHOWN:
            self.client.reply({"event": "skipped", "path": "",
                               "reason": f"and {len(empty) - MAX_SKIPPED_SHOWN} more such folders not shown"})


def folders_above(entries: Entries, files: List[int]) -> Set[int]:
    found: Set[int] = set()
    for index in files:
        parent = entries.parents[index]
        while parent >= 0 and parent not in found:
            found.add(parent)
            parent = entries.parents[parent]
    return found


class LsSend(Reporting):
    """One send to a LocalSend device: hashes, prepare-upload, then an upload
    per file taken, in order, on one kept-alive link. Its client (an
    ``LsSendJob``) gets the lines of a tnet attempt; the events are a tnet
    send's (transfer-started, progress with REPORT_PROGRESS_OUT=1,
    transfer-done or transfer-failed); it is a transfer (``fail``: `tnet
    cancel`), and ``cancel`` is its client's going away. Whatever ends it
    early tells the receiver (POST cancel)."""

    kind = "localsend-out"

    def __init__(self, ctx: PeerContext, localsend: LocalSend, device: Device, entries: Entries, client: Client,
                 transfer_id: str, pin: Optional[str]) -> None:
        super().__init__(ctx, device, entries, client, transfer_id)
        self.localsend, self.pin = localsend, pin
        self.hashes = Hashes(entries, ctx.buffer)
        self.caller = Caller(ctx, localsend, device)
        self.offered: Dict[str, int] = {}  # file id -> entry
        self.session = ""
        self.asked = False  # the prepare-upload is out: a cancel must say so
        self.queue: List[Tuple[str, str]] = []  # (file id, token) still to upload, in order
        self.position = 0
        self.unsent = False  # a file taken was not saved: the receiver is told we are done
        self.fd = -1
        self.closed = False

    def label(self) -> str:
        return f"localsend send {self.id} to {self.device.address}"

    def start(self) -> None:
        self.ctx.registry.transfers[self.id] = self
        self.localsend.sending.add(self)
        self.loop.each_turn(self, self.step_hash)

    def step_hash(self) -> None:
        try:
            done = self.hashes.step()
        except proto.LocalProtocolError as exc:
            self.conclude(exc.code, exc.message)
            return
        if done:
            self.loop.done(self)
            self.prepare()

    def prepare(self) -> None:
        entries, hashes = self.entries, self.hashes
        for index, reason in sorted(hashes.changed.items()):
            self.entry_failed(index, "file-changed", reason)
        offers = []
        for index in hashes.files:
            if index in hashes.sha256:
                parts = entries.parts(index)
                offers.append(ls.FileOffer(str(index), parts, entries.size(index), file_type(parts[-1]),
                                           hashes.sha256[index]))
                self.offered[str(index)] = index
        self.skip_empty_folders(folders_above(entries, list(self.offered.values())))
        if not offers:
            self.complete()
            return
        try:
            body = ls.encode_prepare_upload(self.localsend.info, offers)
        except proto.LocalProtocolError as exc:
            self.conclude(exc.code, exc.message)
            return
        self.asked = True
        self.caller.send(Outgoing(self.caller.json_request(prepare_target(self.pin), body) + body, self.on_prepared,
                                  max_body=MAX_ANSWER_BYTES, timeout=PREPARE_TIMEOUT_S))

    def on_prepared(self, reply: Reply) -> None:
        if self.closed:
            return
        if reply.status == 204:  # "finished, no file transfer needed"
            for index in self.offered.values():
                self.entry_done(index, self.hashes.sha256[index])
            self.complete()
            return
        if reply.status != 200:
            self.asked = False  # no session: nothing to cancel
            self.conclude(*prepare_failure(reply, self.device.alias, self.pin))
            return
        try:
            self.session, tokens = ls.decode_prepare_response(reply.body, set(self.offered))
        except ls.LocalSendError as exc:
            self.conclude("bad-response", f"{self.device.address}: prepare-upload answer: {exc.message}")
            return
        for file_id, index in self.offered.items():
            if file_id not in tokens:
                self.entry_failed(index, "declined", f"{printable(self.device.alias)} did not take it")
        self.queue = [(file_id, tokens[file_id]) for file_id in self.offered if file_id in tokens]
        self.ctx.publish(api.transfer_started_event(self.describe(), len(self.entries)))
        self.next_upload()

    def next_upload(self) -> None:
        entries = self.entries
        while self.position < len(self.queue) and not self.closed:
            file_id, token = self.queue[self.position]
            self.position += 1
            index = self.offered[file_id]
            size = entries.size(index)
            try:
                fd, info, reason = open_file(entries.local_path(index), size)
            except proto.LocalProtocolError as exc:
                self.conclude(exc.code, exc.message)
                return
            if not reason and info is not None and stamp(info) != self.hashes.stamps[index]:
                os.close(fd)
                reason = f"{entries.local_path(index)} changed since it was hashed"
            if reason:
                self.unsent = True
                self.entry_failed(index, "file-changed", reason)
                continue
            self.fd, self.current, self.file_sent, self.bytes_before = fd, index, 0, self.bytes_moved
            self.report_progress(force=size >= PROGRESS_START_BYTES)
            name = entries.parts(index)[-1]
            head = self.caller.head(ls.upload_target(self.session, file_id, token),
                                    [("Content-Type", file_type(name)), ("Content-Length", str(size))])
            self.caller.send(Outgoing(head, functools.partial(self.on_uploaded, index), fd=fd, size=size,
                                      max_body=MAX_UPLOAD_ANSWER_BYTES, on_sent=self.on_sent,
                                      timeout=self.ctx.config.idle_timeout + size / VERIFY_BYTES_PER_S))
            return
        if not self.closed:
            self.complete()

    def on_sent(self, sent: int) -> None:
        self.file_sent = sent  # of this upload: a request sent again starts over
        self.bytes_moved = self.bytes_before + sent
        self.report_progress()

    def on_uploaded(self, index: int, reply: Reply) -> None:
        changed = self.fd >= 0 and stamp(os.fstat(self.fd)) != self.hashes.stamps[index]
        self.close_file()
        if self.closed:
            return
        self.current = -1
        if reply.status in (200, 204) and not changed:
            self.entry_done(index, self.hashes.sha256[index])
        elif reply.status in (200, 204):
            self.unsent = True
            self.entry_failed(index, "file-changed", f"{self.entries.local_path(index)} changed while being sent")
        elif not reply.status and reply.code == "file-changed":  # it shrank: the body was cut short, the link too
            self.unsent = True
            self.entry_failed(index, "file-changed", f"{self.entries.local_path(index)} {reply.message}")
        elif reply.status in SESSION_OVER or not reply.status:
            if reply.status:
                code = UPLOAD_STATUSES[reply.status]
                self.conclude(code, f"{printable(self.device.alias)} ended the transfer ({reply.status}){said(reply)}")
            else:
                self.conclude(reply.code, reply.message)
            return
        else:
            self.unsent = True
            code = UPLOAD_STATUSES.get(reply.status, "peer-error")
            self.entry_failed(index, code, f"{printable(self.device.alias)} answered {reply.status}{said(reply)}")
        self.next_upload()

    # -- the end

    def complete(self) -> None:
        """Every file was answered: the final line and event, as a tnet attempt's."""
        if self.unsent and self.session:
            self.caller.cancel_remote(self.session)  # it waits for files that will not come
        summary = self.summary()
        if self.first_failure is None:
            self.ctx.publish(api.transfer_done_event(summary))
            self.client.finish(summary)
        else:
            code, message = self.first_failure
            self.ctx.publish(api.transfer_failed_event(summary, code, message))
            self.client.fail(code, message, **summary)
        self.close()

    def fail(self, code: str, message: str) -> None:
        """`tnet cancel`, or shutdown: end it now."""
        self.conclude(code, message)

    def cancel(self, code: str, message: str) -> None:
        """The client is gone."""
        self.conclude(code, message)

    def conclude(self, code: str, message: str) -> None:
        """End it early: the receiver is told, the client answered, the event published."""
        if self.closed:
            return
        if self.asked:
            self.caller.cancel_remote(self.session)  # without a session: the offer still held
        log.warning("transfer %s to %s failed: %s: %s", self.id, self.device.address, code, printable(message))
        self.ctx.publish(api.transfer_failed_event(self.describe(), code, message))
        if not self.client.closed:
            self.client.fail(code, message)
        self.close()

    def on_internal_error(self) -> None:
        self.conclude("internal-error", "internal error sending; see the daemon log")

    def close_file(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.closed = True
        self.loop.done(self)
        self.hashes.close()
        self.close_file()
        self.caller.close()
        self.ctx.registry.forget(self)
        self.localsend.sending.discard(self)


# --- A message ---------------------------------------------------------------------------------


class Asker(Protocol):
    """The client a message answers (commands.Noted, a FanOut's Recipient behind it)."""

    job: Any

    @property
    def closed(self) -> bool: ...

    def finish(self, obj: Dict[str, Any]) -> None: ...

    def fail(self, code: str, message: str, **extra: Any) -> None: ...


class LsMessage:
    """A message to a LocalSend device as the official app sends one: a
    prepare-upload of one text file holding the text as its ``preview``.
    204 says it was shown; a receiver that asks for the file instead (200
    and a token: localsendd saves it) is sent its bytes."""

    def __init__(self, ctx: PeerContext, localsend: LocalSend, device: Device, text: str, client: Asker,
                 pin: Optional[str]) -> None:
        self.device, self.text, self.client, self.pin = device, text, client, pin
        self.localsend = localsend
        self.caller = Caller(ctx, localsend, device)
        self.file_id = secrets.token_hex(16)  # its file's name too, should the receiver save it
        self.session = ""
        self.closed = False
        client.job = self

    def start(self) -> None:
        offer = ls.message_offer(self.file_id, self.text)
        try:
            body = ls.encode_prepare_upload(self.localsend.info, [offer])
        except proto.LocalProtocolError as exc:
            self.end(exc.code, exc.message)
            return
        self.caller.send(Outgoing(self.caller.json_request(prepare_target(self.pin), body) + body, self.on_prepared,
                                  max_body=MAX_ANSWER_BYTES, timeout=PREPARE_TIMEOUT_S))

    def on_prepared(self, reply: Reply) -> None:
        if self.closed:
            return
        if reply.status == 204:
            self.end()
            return
        if reply.status != 200:
            self.end(*prepare_failure(reply, self.device.alias, self.pin))
            return
        try:
            self.session, tokens = ls.decode_prepare_response(reply.body, {self.file_id})
        except ls.LocalSendError as exc:
            self.end("bad-response", f"{self.device.address}: prepare-upload answer: {exc.message}")
            return
        if self.file_id not in tokens:
            self.end("declined", f"{printable(self.device.alias)} did not take the message")
            return
        data = self.text.encode("utf-8")
        head = self.caller.head(ls.upload_target(self.session, self.file_id, tokens[self.file_id]),
                                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))])
        self.caller.send(Outgoing(head, self.on_uploaded, body=data, max_body=MAX_UPLOAD_ANSWER_BYTES))

    def on_uploaded(self, reply: Reply) -> None:
        if self.closed:
            return
        if reply.status in (200, 204):
            self.end()
        elif reply.status:
            self.end(UPLOAD_STATUSES.get(reply.status, "peer-error"),
                     f"{printable(self.device.alias)} answered {reply.status}{said(reply)}")
        else:
            self.end(reply.code, reply.message)

    def end(self, code: str = "", message: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.caller.close()
        if code:
            log.info("message to %s: %s: %s", self.device.address, code, printable(message))
            self.client.fail(code, message)
        else:
            self.client.finish({"peer": self.device.address, "name": self.device.alias})

    def cancel(self, code: str, message: str) -> None:
        """The client is gone: the receiver is told, if it holds the offer."""
        if not self.closed:
            self.caller.cancel_remote(self.session)
            self.closed = True
            self.caller.close()
