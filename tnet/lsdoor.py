"""The LocalSend front door: LocalSend v2 devices (phones) reach the daemon here.

With LOCALSEND=1 the daemon serves LOCALSEND_PORT over HTTPS (or HTTP) and
joins the LocalSend multicast group on the same port (``lsfind``). This
module holds:

* ``LocalSend``, what the daemon makes and wires: the identity from
  STATE_DIR (``tls``), the two sockets, the ``Door`` and the ``Finder``;
* ``Door``: the connections of the TCP listener and their bounds, the
  receive sessions, the PIN guard, the transfers being received;
* ``DoorConn``: one HTTP connection, its requests one at a time
  (keep-alive), each answered by an endpoint (``ROUTES``): ``info`` (v2 and
  v1), ``register``, ``prepare-upload``, ``upload`` (streamed into a temp
  file, see ``lsreceive``), ``cancel``.

Policy is tnet's own (docs/PROTOCOL.md, "LocalSend v2"): ALLOW_FROM, names
refused and never rewritten (a refused name fails that file, not the
request), the folders and free space checked before any byte, ACCEPT=ask
holding the prepare-upload until `tnet accept`/`decline` or ASK_TIMEOUT,
several senders at once. Connections are bounded apart from tnet peers': at
most MAX_CONNECTIONS_PER_PEER from one address and three quarters of
MAX_CONNECTIONS in all. When a new one would pass a bound, the oldest
connection that is not in the middle of a request (its TLS handshake or
first request still due, or idle between requests) makes room for it; only
when every one is busy is the new one refused. So thousands of silent
connections cannot keep a sender out.
"""

from __future__ import annotations

import collections
import enum
import errno
import functools
import logging
import math
import socket
import ssl
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from . import api, http, tls
from . import localsend as ls
from . import protocol as proto
from .httpconn import Buffers, HttpConn
from .lsfind import Device, Finder
from .lsreceive import LsReceive, Upload, error_body
from .peers import MIN_PROGRESS_BYTES, PeerContext
from .tls import TlsPipe
from .util import StateDirError

log = logging.getLogger("tnet")

LISTEN_BACKLOG = 1024  # a burst of connections (a phone's parallel uploads, a flood) waits, not retried 1 s later
ACCEPTS_PER_WAKE = 64  # connections taken per turn of the loop; then the others have their turn
OUTBOUND_SHARE = 4  # as daemon.py: a quarter of MAX_CONNECTIONS is not taken from others
MAX_BUFFERED_JSON_BYTES = 16 * 1024 * 1024  # request bodies held at once, all connections: two maximal offers
HALF_CLOSED_PROBE_S = 2.0  # how often a sender that half-closed while its answer waits is checked for being gone
DEVICE_MODEL = "tnet"  # what LocalSend apps show under our alias
DEVICE_TYPE = "headless"  # a daemon without a screen of its own


class StartError(Exception):
    """The LocalSend side cannot start; the message names the variable or file."""


def disk_code(exc: OSError, otherwise: str) -> str:
    return "disk-full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else otherwise


class Phase(enum.Enum):
    NEW = "new"  #: accepted: TLS and the first request's head are due within HANDSHAKE_TIMEOUT
    IDLE = "idle"  #: between requests: the next one's head within IDLE_TIMEOUT
    BODY = "body"  #: a request is read: MIN_PROGRESS_BYTES per IDLE_TIMEOUT, or it ends
    WAITING = "waiting"  #: the answer waits on us (a decision, a copy): no deadline of its own, but a
    #: sender that half-closed is probed every HALF_CLOSED_PROBE_S
    CLOSING = "closing"  #: the last answer is out; lingering


_MAKES_ROOM = (Phase.NEW, Phase.IDLE)  # connections that may be closed for a new one


class DoorConn(HttpConn):
    """One connection to the front door: requests in order, one at a time."""

    kind = "localsend"

    def __init__(self, door: "Door", sock: socket.socket, address: str, pipe: Optional[TlsPipe]) -> None:
        super().__init__(door.loop, sock, "server", door.buffers, pipe)
        self.door = door
        self.address = address
        self.phase = Phase.NEW
        self.request: Optional[http.Request] = None
        self.handler: Optional[Handler] = None
        self.body = bytearray()
        self.body_done = False  # the request's body is read to its end: the connection may carry another
        self.upload: Optional[Upload] = None
        self.dropping = False  # the request is refused already: its body is read and dropped, never held
        self.held: Optional[LsReceive] = None  # the transfer whose prepare-upload waits for its answer
        self.moved = 0  # bytes since the deadline was last pushed back
        door.track(self)
        self.enter(Phase.NEW, door.config.handshake_timeout)

    def label(self) -> str:
        return f"localsend {self.address}"

    def enter(self, phase: Phase, timeout: Optional[float]) -> None:
        self.phase = phase
        self.door.may_make_room(self, phase in _MAKES_ROOM)
        self.moved = 0
        if phase is Phase.WAITING and not self.reading:
            timeout = HALF_CLOSED_PROBE_S  # a pipelined request after the half-close waits too
        self.set_deadline(math.inf if timeout is None else self.loop.clock() + timeout)

    # -- requests

    def on_event(self, event: http.Event) -> None:
        if isinstance(event, http.Request):
            self.on_request(event)
        elif isinstance(event, http.Data):
            self.on_body(event.data)
        else:
            self.on_end()

    def on_request(self, request: http.Request) -> None:
        self.request, self.body_done = request, False
        self.enter(Phase.BODY, self.door.config.idle_timeout)
        route = ROUTES.get(request.path)
        if route is None:
            self.reply(404, error_body(f"nothing at {request.path}"))
        elif request.method != route[0]:
            self.reply(405, error_body(f"{request.path} takes {route[0]}"), headers=[("Allow", route[0])])
        elif route[1] is None:
            start_upload(self, request)
        else:
            refusal = refused_at_head(self, request) if request.path == ls.PREPARE_UPLOAD_PATH else None
            self.dropping = refusal is not None
            self.handler = route[1] if refusal is None else functools.partial(answer_refusal, *refusal)
            self.accept(route[2])

    def accept(self, limit: int) -> None:
        try:
            events = self.http.accept_body(limit)
        except http.HttpError as exc:
            self.on_http_error(exc)
            return
        expect = self.request is not None and (self.request.header("expect") or "").lower() == "100-continue"
        if expect and not self.dropping:
            self.send_plain(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for it before a large body
        self.dispatch(events)

    def on_body(self, data: Any) -> None:
        if self.dropping:
            return
        if self.upload is not None:
            write_upload(self, self.upload, data)
        elif self.door.hold_json(self, len(data)):
            self.body += data
        else:
            self.reply(503, error_body("too many requests at once; try again"), close=True)

    def on_end(self) -> None:
        self.body_done = True
        if self.upload is not None:
            finish_upload(self, self.upload)
            return
        handler, request, body = self.handler, self.request, bytes(self.body)
        self.release_body()
        assert handler is not None and request is not None  # a body is accepted only for a handler
        try:
            handler(self, request, body)
        except (ls.LocalSendError, http.HttpError) as exc:
            self.reply(exc.status, error_body(exc.message))

    def reply(self, status: int, body: bytes = b"", close: bool = False,
              headers: Sequence[Tuple[str, str]] = ()) -> None:
        """Answer the request in flight; then the next one, or close if it cannot follow."""
        if self.closed or self.lingering:
            return
        self.release_body()
        self.handler = self.request = None
        must_close = close or not self.http.keep_alive or not self.body_done
        fields = list(headers)
        if body:
            fields.append(("Content-Type", "application/json"))
        if must_close:
            fields.append(("Connection", "close"))
        self.send_plain(http.encode_response(status, fields, body))
        if must_close:
            self.enter(Phase.CLOSING, None)
            self.linger()
            return
        self.enter(Phase.IDLE, self.door.config.idle_timeout)
        try:
            events = self.http.start_next_cycle()
        except http.HttpError as exc:
            self.on_http_error(exc)
            return
        self.dispatch(events)
        if self.http.state is http.State.CLOSED and not self.closed and not self.lingering:
            self.enter(Phase.CLOSING, None)  # it half-closed before: every request it sent is answered
            self.linger()

    def hold(self, transfer: LsReceive) -> None:
        """A prepare-upload that waits for the transfer's answer (at once in ACCEPT=auto)."""
        self.held = transfer
        self.door.receiving.add(transfer)
        self.enter(Phase.WAITING, None)
        transfer.start()

    def answer_held(self, status: int, body: bytes) -> None:
        self.held = None
        self.reply(status, body)

    def release_body(self) -> None:
        self.door.release_json(self)
        self.body = bytearray()

    # -- how it ends

    def on_received(self, count: int) -> None:
        # Only a file's bytes push the deadline back: a JSON body, at most a few MiB,
        # comes whole within IDLE_TIMEOUT, so a trickled one cannot hold its memory long.
        if self.phase is Phase.BODY and self.upload is not None:
            self.moved += count
            if self.moved >= MIN_PROGRESS_BYTES:
                self.moved = 0
                self.set_deadline(self.loop.clock() + self.door.config.idle_timeout)

    def on_http_error(self, exc: http.HttpError) -> None:
        if self.upload is not None:
            code = "size-mismatch" if exc.status == 413 else exc.code
            self.fail_upload(code, f"{self.address}: {exc.message}")
        self.reply(exc.status, error_body(exc.message), close=True)

    def on_tls_error(self, exc: ssl.SSLError) -> None:
        log.debug("LocalSend TLS from %s failed: %s", self.address, exc)
        self.close()

    def on_peer_closed(self) -> None:
        # A sender that shuts down its writing half after a whole request (HTTP/1.1
        # allows it) still reads the answer waiting on a decision or a copy. One gone
        # altogether (a reset) fails even a write of nothing: its request ends now.
        if self.phase is Phase.WAITING and self.still_reading():
            self.reading = False  # EOF stays readable: the selector would wake us for it every turn
            self.want_write(bool(self.out))
            self.enter(Phase.WAITING, None)
            return
        self.close()

    def on_deadline(self) -> None:
        if self.phase is Phase.WAITING:  # only a sender that half-closed has a deadline here
            if self.still_reading():
                self.enter(Phase.WAITING, None)  # probed again
            else:
                self.close()
            return
        if self.upload is not None and not self.lingering:
            cfg = self.door.config
            self.fail_upload("timeout", f"{self.address} sent less than {MIN_PROGRESS_BYTES} bytes in "
                                        f"{cfg.idle_timeout:g} s")
        self.close()

    def on_internal_error(self) -> None:
        if self.upload is not None:
            self.fail_upload("internal-error", "internal error; see the daemon log")
        self.close()

    def fail_upload(self, code: str, message: str, retry: bool = False) -> None:
        upload, self.upload = self.upload, None
        if upload is not None:
            self.loop.done(self)
            upload.transfer.failed(upload, code, message, retry)

    def abort_upload(self) -> None:
        """The transfer is over (cancelled): this upload goes no further."""
        self.upload = None
        self.close()

    def on_closed(self) -> None:
        self.door.untrack(self)
        self.loop.done(self)  # a copy into place, if one was under way
        self.release_body()
        if self.upload is not None:
            self.fail_upload("peer-gone", f"{self.address} closed the connection mid-file")
        held, self.held = self.held, None
        if held is not None:
            held.sender_gone()


Handler = Callable[[DoorConn, http.Request, bytes], None]


# --- Endpoints ---------------------------------------------------------------------------------


def on_info(conn: DoorConn, request: http.Request, body: bytes) -> None:
    conn.reply(200, conn.door.info_body)


def on_register(conn: DoorConn, request: http.Request, body: bytes) -> None:
    """A device tells us who it is (an answer to our announcement, or its own call)."""
    info = ls.decode_register(body)
    conn.door.learn(info, conn.address)
    conn.reply(200, conn.door.info_body)


def refused_at_head(conn: DoorConn, request: http.Request) -> Optional[Tuple[int, bytes]]:
    """What of a prepare-upload needs no body (ALLOW_FROM, then the PIN): a
    refused sender's body never takes room from the others'."""
    door, cfg, address = conn.door, conn.door.config, conn.address
    if not cfg.allows(address):
        return 403, error_body(f"{cfg.host_name} does not take files from {address}")
    pin = request.query.get("pin")
    status = door.pins.check(address, pin, door.loop.clock())
    if status != 200:
        why = "too many wrong PINs; wait a minute" if status == 429 else ("wrong PIN" if pin else "PIN required")
        return status, error_body(why)
    return None


def answer_refusal(status: int, body: bytes, conn: DoorConn, request: http.Request, dropped: bytes) -> None:
    conn.reply(status, body)


def on_prepare_upload(conn: DoorConn, request: http.Request, body: bytes) -> None:
    """A sender's offer (ALLOW_FROM and the PIN passed at its head), through
    tnet's policy, in the order the statuses are documented."""
    door, cfg, address = conn.door, conn.door.config, conn.address
    offer = ls.decode_prepare_upload(body)
    if offer.message is not None:
        door.ctx.publish(api.message_event(address, offer.info.alias, offer.message))
        conn.reply(204)
        return
    if not offer.files and not offer.refused:
        conn.reply(204)  # nothing to send: the spec's answer
        return
    store = door.ctx.store
    try:
        store.check_folders()
    except proto.LocalProtocolError as exc:
        conn.reply(500, error_body(f"on {cfg.host_name}: {exc.message}"))
        return
    inodes = sum(len(f.path) for f in offer.files)  # each file, and at most each folder on its way
    shortfall = store.shortfall(sum(f.size for f in offer.files), inodes)
    if shortfall:
        conn.reply(507, error_body(f"not enough space on {cfg.host_name}: {shortfall}"))
        return
    if door.sessions.full:
        conn.reply(409, error_body(f"{cfg.host_name} is taking {len(door.sessions)} transfers already"))
        return
    conn.hold(LsReceive(door.ctx, door.sessions, address, offer, conn.answer_held, door.transfer_over))


def on_cancel(conn: DoorConn, request: http.Request, body: bytes) -> None:
    conn.door.cancel(conn.address, request.query)
    conn.reply(200)


def start_upload(conn: DoorConn, request: http.Request) -> None:
    """An upload's head: its session, token and address checked before any byte is taken."""
    door = conn.door
    try:
        session, offer = door.sessions.check_upload(request.query, conn.address)
    except (ls.LocalSendError, http.HttpError) as exc:
        conn.reply(exc.status, error_body(exc.message))
        return
    transfer = door.transfer_of(session.session_id)
    if transfer is None:
        conn.reply(409, error_body("the transfer is over"))
        return
    try:
        upload = transfer.begin(offer, conn.abort_upload)
    except OSError as exc:
        conn.reply(500, error_body(f"cannot create a temp file in TEMP_DIR on {door.config.host_name}: "
                                   f"{exc.strerror}"))
        return
    conn.upload = upload
    declared = conn.http.body_length
    if declared is not None and declared != offer.size:
        conn.fail_upload("size-mismatch", f"{upload.name}: {declared} bytes sent for {offer.size} announced")
        conn.reply(400, error_body(f"the body has {declared} bytes; the file has {offer.size}"))
        return
    conn.accept(offer.size)


def write_upload(conn: DoorConn, upload: Upload, data: Any) -> None:
    try:
        upload.write(data)
    except OSError as exc:
        code = disk_code(exc, "write-failed")
        conn.fail_upload(code, f"writing {upload.name} on {conn.door.config.host_name}: {exc.strerror}")
        conn.reply(507 if code == "disk-full" else 500, error_body(f"{code}: {exc.strerror}"), close=True)
        return
    upload.transfer.moved(upload, len(data))


def finish_upload(conn: DoorConn, upload: Upload) -> None:
    """The body ended: verify, place, answer (after the copy, from another file system)."""
    transfer = upload.transfer
    if upload.received != upload.offer.size:  # a chunked body ended short
        conn.fail_upload("truncated", f"{upload.name}: {upload.received} of {upload.offer.size} bytes")
        conn.reply(400, error_body(f"{upload.received} of {upload.offer.size} bytes"))
        return
    try:
        saved = transfer.verify(upload)
    except ValueError as exc:
        conn.fail_upload("verify-failed", str(exc), retry=True)
        conn.reply(422, error_body(str(exc)))
        return
    except OSError as exc:
        conn.fail_upload("save-failed", f"{upload.name}: {exc.strerror or exc}")
        conn.reply(500, error_body(f"save-failed: {exc.strerror or exc}"))
        return
    if saved is None:
        conn.enter(Phase.WAITING, None)
        conn.loop.each_turn(conn, lambda: step_copy(conn, upload))
        return
    conn.upload = None
    transfer.saved(upload, saved)
    conn.reply(200)


def step_copy(conn: DoorConn, upload: Upload) -> None:
    """One slice of a copy into FILE_SAVE_DIR (store.Copy); the answer when it is done."""
    copy = upload.copy
    assert copy is not None
    try:
        finished = copy.step()
    except OSError as exc:
        conn.fail_upload(disk_code(exc, "save-failed"), f"{upload.name}: {exc.strerror or exc}")
        conn.reply(500, error_body(f"save-failed: {exc.strerror or exc}"))
        return
    if finished:
        conn.loop.done(conn)
        upload.copy = None
        conn.upload = None
        upload.transfer.saved(upload, copy.target)
        conn.reply(200)


# Path -> (method, handler or None for the streamed upload, body limit).
ROUTES: Dict[str, Tuple[str, Optional[Handler], int]] = {
    ls.INFO_PATH: ("GET", on_info, 0),
    ls.INFO_V1_PATH: ("GET", on_info, 0),
    ls.REGISTER_PATH: ("POST", on_register, ls.MAX_REGISTER_BYTES),
    ls.PREPARE_UPLOAD_PATH: ("POST", on_prepare_upload, ls.MAX_PREPARE_UPLOAD_BYTES),
    ls.UPLOAD_PATH: ("POST", None, 0),
    ls.CANCEL_PATH: ("POST", on_cancel, ls.MAX_REGISTER_BYTES),  # no body is due; a small one is read and dropped
}


# --- The door ----------------------------------------------------------------------------------


class Door:
    """The listener's connections and their bounds; sessions, PINs, transfers."""

    def __init__(self, ctx: PeerContext, info: ls.DeviceInfo, server_tls: Optional[ssl.SSLContext],
                 buffers: Buffers, learn: Callable[[ls.DeviceInfo, str], None]) -> None:
        self.ctx, self.loop, self.config = ctx, ctx.loop, ctx.config
        self.info_body = ls.encode_register(info)
        self.fingerprint = info.fingerprint
        self.server_tls = server_tls
        self.buffers = buffers
        self.learn_device = learn
        self.sessions = ls.Sessions()
        self.pins = ls.PinGuard(ctx.config.localsend_pin)
        self.conns: Set[DoorConn] = set()
        self.per_address: Dict[str, Set[DoorConn]] = {}
        self.spare: "collections.OrderedDict[DoorConn, None]" = collections.OrderedDict()  # may make room, oldest first
        self.receiving: Set[LsReceive] = set()
        self.json_held: Dict[DoorConn, int] = {}  # request bodies being read, by connection
        self.json_bytes = 0

    def max_connections(self) -> int:
        limit = self.config.max_connections
        return max(limit - limit // OUTBOUND_SHARE, 1)

    def take(self, sock: socket.socket, address: str) -> None:
        """A new connection from the listener, if there is room for it."""
        if not self.make_room(address):
            log.debug("LocalSend: refusing %s: every connection is busy", address)
            sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe = TlsPipe(self.server_tls, server_side=True) if self.server_tls is not None else None
        DoorConn(self, sock, address, pipe).watch()

    def make_room(self, address: str) -> bool:
        """Within both bounds, closing the oldest connection that is not busy where needed."""
        if len(self.per_address.get(address, ())) >= self.config.max_connections_per_peer:
            victim = next((c for c in self.spare if c.address == address), None)
            if victim is None:
                return False
            victim.close()
        if len(self.conns) >= self.max_connections():
            if not self.spare:
                return False
            next(iter(self.spare)).close()
        return True

    def track(self, conn: DoorConn) -> None:
        self.conns.add(conn)
        self.per_address.setdefault(conn.address, set()).add(conn)

    def untrack(self, conn: DoorConn) -> None:
        self.conns.discard(conn)
        self.spare.pop(conn, None)
        same = self.per_address.get(conn.address)
        if same is not None:
            same.discard(conn)
            if not same:
                del self.per_address[conn.address]

    def may_make_room(self, conn: DoorConn, spare: bool) -> None:
        self.spare.pop(conn, None)
        if spare and not conn.closed:
            self.spare[conn] = None

    def hold_json(self, conn: DoorConn, count: int) -> bool:
        """Room for ``count`` more bytes of request bodies? Counted until released."""
        if self.json_bytes + count > MAX_BUFFERED_JSON_BYTES:
            return False
        self.json_bytes += count
        self.json_held[conn] = self.json_held.get(conn, 0) + count
        return True

    def release_json(self, conn: DoorConn) -> None:
        self.json_bytes -= self.json_held.pop(conn, 0)

    def learn(self, info: ls.DeviceInfo, address: str) -> None:
        if info.fingerprint != self.fingerprint:
            self.learn_device(info, address)

    def transfer_of(self, session_id: str) -> Optional[LsReceive]:
        return next((t for t in self.receiving if t.session and t.session.session_id == session_id), None)

    def transfer_over(self, transfer: LsReceive) -> None:
        self.receiving.discard(transfer)

    def cancel(self, address: str, query: Dict[str, str]) -> None:
        """POST cancel: the sender's session, or its offers still waiting for a decision."""
        session = self.sessions.cancel(query, address)
        if session is not None:
            transfer = self.transfer_of(session.session_id)
            if transfer is not None:
                transfer.sender_cancelled()
        elif not query.get("sessionId"):
            for transfer in [t for t in self.receiving if t.address == address and t.session is None]:
                transfer.sender_cancelled()

    def close(self) -> None:
        for transfer in list(self.receiving):
            transfer.fail("shutdown", f"{self.config.host_name} is shutting down")
        for conn in list(self.conns):
            conn.close()


# --- The whole ---------------------------------------------------------------------------------


class LocalSend:
    """The daemon's LocalSend peer (LOCALSEND=1). Methods for the daemon:
    ``open`` (the identity and both sockets), ``start``, ``on_listener``
    (new connections), ``on_datagrams``, ``close``; for commands: ``announce``,
    ``devices``, ``status``; for sends (``lssend``): ``info``, ``client_tls``,
    ``buffers``, ``sending``."""

    def __init__(self, ctx: PeerContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.buffers = Buffers(plain=ctx.buffer)
        self.identity: Optional[tls.LocalIdentity] = None
        self.door: Optional[Door] = None
        self.finder: Optional[Finder] = None
        # For our sends to LocalSend devices (lssend): who we say we are, the TLS we speak, the sends under way.
        self.info = ls.DeviceInfo(alias=ctx.config.alias, fingerprint="")
        self.client_tls: Optional[ssl.SSLContext] = None
        self.sending: Set[Any] = set()

    def open(self, now: float) -> Tuple[socket.socket, socket.socket]:
        """The identity, then the TCP listener and the multicast socket; StartError if not."""
        cfg = self.config
        try:
            identity = tls.load_identity(cfg.state_dir, cfg.localsend_https, now)
            info = ls.DeviceInfo(alias=cfg.alias, fingerprint=identity.fingerprint, port=cfg.localsend_port,
                                 protocol="https" if identity.https else "http", device_model=DEVICE_MODEL,
                                 device_type=DEVICE_TYPE)
            ls.encode_info(info)  # an alias LocalSend would refuse is refused here
        except StateDirError as exc:
            raise StartError(f"LOCALSEND=1: {exc}") from None
        except proto.LocalProtocolError as exc:
            raise StartError(f"LOCALSEND_ALIAS={cfg.alias!r}: {exc.message}") from None
        self.identity, self.info = identity, info
        server = tls.server_context(identity) if identity.https else None
        self.client_tls = tls.client_context(identity)
        client = self.client_tls if identity.https else None
        self.finder = Finder(self.ctx.loop, cfg, info, self.buffers, client)
        self.door = Door(self.ctx, info, server, self.buffers, self.finder.learn)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((cfg.bind_address, cfg.localsend_port))
            tcp.listen(LISTEN_BACKLOG)
        except OSError as exc:
            tcp.close()
            raise StartError(f"LOCALSEND_PORT={cfg.localsend_port} (TCP) on BIND_ADDRESS={cfg.bind_address}: "
                             f"{exc.strerror}") from None
        try:
            udp = self.finder.open()
        except OSError as exc:
            tcp.close()
            raise StartError(f"LOCALSEND_PORT={cfg.localsend_port} (UDP, group {ls.MULTICAST_GROUP}): "
                             f"{exc.strerror}") from None
        return tcp, udp

    def start(self) -> None:
        assert self.finder is not None and self.identity is not None
        self.finder.start()
        log.info("LocalSend: %s on %s:%d (%s), fingerprint %s", self.config.alias, self.config.bind_address,
                 self.config.localsend_port, "https" if self.identity.https else "http", self.identity.fingerprint)

    def on_listener(self, listener: socket.socket, accept: Callable[[socket.socket], Tuple[Any, Any]]) -> None:
        """The listener is readable: take up to ACCEPTS_PER_WAKE connections
        (``accept`` is the daemon's, which rests the listener when descriptors run out)."""
        assert self.door is not None
        for _ in range(ACCEPTS_PER_WAKE):
            sock, addr = accept(listener)
            if sock is None:
                return
            self.door.take(sock, addr[0])

    def on_datagrams(self, udp: socket.socket) -> None:
        assert self.finder is not None
        self.finder.on_datagrams(udp)

    def announce(self) -> None:
        if self.finder is not None:
            self.finder.announce()

    def devices(self, since: float = -math.inf) -> List[Device]:
        return self.finder.devices.since(since) if self.finder is not None else []

    def status(self) -> Dict[str, Any]:
        """What `tnet status` shows of it."""
        identity = self.identity
        return {"alias": self.config.alias, "port": self.config.localsend_port,
                "protocol": "https" if identity and identity.https else "http",
                "fingerprint": identity.fingerprint if identity else "", "pin": self.config.localsend_pin is not None,
                "devices": len(self.finder.devices.records) if self.finder else 0,
                "connections": len(self.door.conns) if self.door else 0}

    def close(self) -> None:
        for send in list(self.sending):
            send.fail("shutdown", f"{self.config.host_name} is shutting down")
        if self.door is not None:
            self.door.close()
        if self.finder is not None:
            self.finder.close()
