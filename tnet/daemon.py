"""The tnet daemon: one thread, one ``selectors`` loop, four sockets.

This module owns the loop and its four listening sockets: the TCP listener
(files and messages from peers), the UDP listener (discovery requests), the
UNIX command socket (local clients, ``ClientConn`` and the ``COMMANDS`` they
may run) and the UNIX events socket (``Subscriber``s, fed by ``publish``).
It also holds what the connections share: discovery windows, the peers seen,
open transfers, signals and the clean shutdown.

The rest of the daemon is split by responsibility: ``loop`` (a connection's
socket, buffer and deadline; the timer heap), ``peers`` (the two ends of an
exchange with another daemon) and ``store`` (placing verified files in
FILE_SAVE_DIR). The bytes are parsed and built by ``protocol``; ``util``
supplies the configuration. Reading order for a newcomer: ``Daemon`` here,
then ``ClientConn`` and the commands below it, then ``peers``.

Every socket callback has one boundary that turns ``OSError`` and
``ProtocolError`` into "drop this connection, say why on the events socket";
the loop's last-resort guard logs a traceback and drops only the connection
involved. The daemon never writes outside TEMP_DIR and FILE_SAVE_DIR and
never replaces an existing file (§4.2).
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import math
import os
import selectors
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import __version__
from . import protocol as proto
from .loop import Conn, Timers
from .peers import RECV_BYTES, InboundPeer, OutboundPeer, PeerConn, Refusal
from .store import Store, StoreError, remove_quietly
from .util import Config, broadcast_targets, local_networks, monotonic
from .walk import Entries, Walk

log = logging.getLogger("tnet")

MAX_SUBSCRIBER_BUFFER_BYTES = 1024 * 1024  # a subscriber this far behind is dropped
LAGGING_GRACE_S = 10.0  # for a dropped subscriber to read the line in flight and its last word
MAX_DATAGRAMS_PER_WAKE = 64  # then let other sockets have a turn
ACCEPT_PAUSE_S = 1.0  # out of descriptors: how long a listener rests
HALF_CLOSED_PROBE_S = 2.0  # how often a busy half-closed client is checked for being gone
MAX_ANSWERS_PER_WINDOW = 2  # discovery answers per requester address per window
MAX_ANSWERS_PER_WINDOW_ALL = 64  # and for all requesters together: a spoofed flood costs a bounded amount
MAX_DATAGRAMS_PER_WINDOW = 256  # datagrams parsed per window; the rest of a flood costs a recvfrom each
ANSWER_WINDOW_S = 1.0
MAX_PENDING_ANSWERS = 64  # announce connections in flight, all requesters together
MAX_REQUESTERS_REMEMBERED = 4096  # requester addresses in the answer budget; older ones are forgotten
MAX_PEERS = 1024  # peer addresses remembered with their name; the oldest sighting is forgotten first
MAX_DROP_LOGS_PER_WINDOW = 10  # log lines for dropped datagrams per DROP_LOG_WINDOW_S; then a count
DROP_LOG_WINDOW_S = 60.0
OUTBOUND_SHARE = 4  # 1/4 of MAX_CONNECTIONS is kept for connections we open: inbound ones cannot starve them
MAX_REFUSALS = 64  # refused connections being told why at once; beyond that they are just closed
CLIENT_DISCARD_S = 5.0  # a client whose request was refused may finish writing it within this
NETWORKS_TTL_S = 5.0  # how long the list of directly connected networks is trusted
DEFAULT_DISCOVER_S = 1.0
LISTEN_BACKLOG = 128
SOCKET_DIR_MODE = 0o700
SOCKET_MODE = 0o600


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to change."""


# --- Local clients ----------------------------------------------------------------


class Subscriber(Conn):
    """A local client of the events socket: it reads, we write. One that
    falls more than MAX_SUBSCRIBER_BUFFER_BYTES behind gets a last event
    saying how many it lost, and is dropped (§6.2)."""

    kind = "subscriber"

    def __init__(self, daemon: "Daemon", sock: socket.socket) -> None:
        super().__init__(daemon, sock)
        self.max_out = MAX_SUBSCRIBER_BUFFER_BYTES
        self.lagging = False  # it fell behind and is being dropped
        self.lost = 0  # events it did not get
        self.told = False  # its last word is queued

    def deliver(self, line: bytes) -> None:
        if len(self.out) + len(line) > self.max_out:
            self.drop_for_lagging()
        else:
            self.send_soon(line)

    def drop_for_lagging(self) -> None:
        """Keep the line being written, if any; what follows it goes unsent
        and is counted; the last word says so."""
        newline = self.out.find(b"\n")
        unsent = self.out[newline + 1:] if newline >= 0 else self.out[:]
        self.lagging = True
        self.lost = unsent.count(b"\n") + 1
        del self.out[len(self.out) - len(unsent):]
        log.warning("events subscriber dropped: more than %d bytes behind", self.max_out)
        self.daemon.subscribers.discard(self)  # no more events: only its last word, then it is closed
        self.close_when_flushed = True
        self.set_deadline(self.daemon.clock() + LAGGING_GRACE_S)
        self.want_write(True)

    def flush(self) -> None:
        if self.lagging and not self.told:
            # After the line in flight, the last word.
            self.told = True
            self.out += proto.encode_line({"event": "dropped", "code": "lagging", "lost": self.lost,
                                           "message": f"more than {self.max_out} bytes behind; "
                                                      f"{self.lost} events lost"})
        super().flush()

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(4096)  # what a subscriber writes is ignored (§6.2)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # gone, or only done writing (`socat - ... < /dev/null`)
            if self.still_reading():
                self.reading = False
                self.want_write(bool(self.out) or self.lagging)
            else:
                self.close()

    def on_overflow(self) -> None:
        self.drop_for_lagging()

    def on_closed(self) -> None:
        self.daemon.subscribers.discard(self)


class ClientConn(Conn):
    """A local client of the command socket: one JSON request at a time (§6)."""

    kind = "client"

    def __init__(self, daemon: "Daemon", sock: socket.socket) -> None:
        super().__init__(daemon, sock)
        self.decoder = proto.LineDecoder()
        self.busy = False  # a request is being answered
        self.job: Any = None  # the walk or exchange it waits on: has ``closed`` and ``abort``
        self.discarding = False  # its line was refused: read and drop the rest, then close

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if self.discarding and data:
            return
        if not data:
            # A half-close (socat and nc do it at the end of their input) still
            # wants its answer. A client gone altogether (Ctrl-C) fails even a
            # write of nothing: cancel its job now, not at a next write that a
            # stalled transfer may never make.
            if self.busy and not self.still_reading():
                self.close()
                return
            self.reading = False
            if self.busy:
                self.want_write(bool(self.out))
                self.set_deadline(self.daemon.clock() + HALF_CLOSED_PROBE_S)
            else:
                self.close_after_flush()
            return
        try:
            lines = self.decoder.feed(data)
        except proto.RemoteProtocolError as exc:
            # Answered now, but read to its end: a client still writing would get
            # a broken pipe instead of the answer if we closed at once.
            log.warning("command client dropped: %s", exc)
            self.fail(exc.code, exc.message)
            self.discarding = True
            self.set_deadline(self.daemon.clock() + CLIENT_DISCARD_S)
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
            except proto.LocalProtocolError as exc:
                self.fail(exc.code, exc.message)

    def reply(self, obj: Dict[str, Any]) -> None:
        """An intermediate line (a file done, progress); the request goes on."""
        self.send_soon(proto.encode_line(obj))

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

    def on_deadline(self) -> None:
        """A busy client that half-closed: is it still there to read its answer?"""
        if self.discarding:
            self.close()
        elif not self.still_reading():
            self.close()  # and its job is cancelled
        elif self.busy:
            self.set_deadline(self.daemon.clock() + HALF_CLOSED_PROBE_S)

    def on_overflow(self) -> None:
        log.warning("command client dropped: more than %d bytes behind", self.max_out)
        self.close()

    def on_closed(self) -> None:
        job, self.job = self.job, None
        if job is not None and not job.closed:
            # The one who asked is gone (Ctrl-C): nobody wants this transfer.
            job.abort("cancelled", "the local client disconnected")


# --- Discovery --------------------------------------------------------------------


@dataclass
class PeerRecord:
    name: str
    address: str
    last_seen: float


Found = Dict[str, PeerRecord]  # peers by address: duplicates merge


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
        self.close()
        self.on_done(self.found)

    def close(self) -> None:
        self.closed = True
        if self.daemon is not None:
            self.daemon.discoveries.pop(self.nonce, None)

    def label(self) -> str:
        return "discovery"


# --- The daemon ---------------------------------------------------------------------


class Listener:
    """One of the four listening sockets; ``accept`` makes a connection of it."""

    closed = False

    def __init__(self, sock: socket.socket, on_readable: Callable[[], None]) -> None:
        self.sock = sock
        self.on_readable = on_readable
        self.deadline = math.inf  # while paused: when to listen again
        self.scheduled = math.inf
        self.sel: Optional[selectors.BaseSelector] = None

    def pause(self, timers: Timers, until: float) -> None:
        """Out of descriptors: a readable listener we cannot accept from would
        wake the loop at once, forever. Stop listening for a while."""
        if self.sel is not None and self.deadline == math.inf:
            self.sel.unregister(self.sock)
            self.deadline = until
            timers.schedule(self)

    def on_deadline(self) -> None:
        self.deadline = math.inf
        if self.sel is not None:
            self.sel.register(self.sock, selectors.EVENT_READ, self)

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
        self.store = Store(config.save_dir, config.temp_dir, nonce())
        # One buffer for every read: from peer sockets, and of files being hashed.
        # Whatever reads into it is done with it before the loop moves on.
        self.recv_buf = bytearray(RECV_BYTES)
        self.recv_view = memoryview(self.recv_buf)
        self.subscribers: set = set()
        # Work done a slice per turn of the loop (copies into FILE_SAVE_DIR, walks of folders to send):
        # owner -> its step. While any is due, the loop does not block.
        self.turn_work: Dict[Any, Callable[[], None]] = {}
        self.transfers: Dict[str, PeerConn] = {}
        # Names learnt from answers to our own discoveries only, one per address (§5).
        self.peers: Dict[str, PeerRecord] = {}
        self.discoveries: Dict[str, Discovery] = {}
        self.answered: Dict[str, Tuple[float, int]] = {}  # requester -> (window start, answers)
        self.answered_all = (-math.inf, 0)  # (window start, answers) for all requesters
        self.parsed = (-math.inf, 0)  # (window start, datagrams parsed)
        self.drop_logs = (-math.inf, 0, 0)  # (window start, lines logged, dropped unlogged)
        self.peer_conns: set = set()  # every PeerConn, both directions
        self.inbound: Dict[str, set] = {}  # address -> InboundPeers from it
        self.refusals: set = set()  # connections being told why they were refused
        self.answering: set = set()  # OutboundPeers answering a discovery
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
        try:
            self.store.open(time.time())
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        ensure_descriptors(4 * cfg.max_connections + 64)  # a socket, a file and folders each, and some
        if self.store.other_file_system():
            log.warning("TEMP_DIR=%s and FILE_SAVE_DIR=%s are on different file systems: each file is "
                        "copied once more after it is verified, and needs room in both until then; "
                        "a TEMP_DIR beside FILE_SAVE_DIR saves that", cfg.temp_dir, cfg.save_dir)
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
            listener.sel = self.sel
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
            self.guarded(key.data, functools.partial(self.say_goodbye, key.data))
        for subscriber in list(self.subscribers):
            self.guarded(subscriber, subscriber.flush)
            subscriber.close()
        for listener in self.listeners:
            if listener.deadline == math.inf:  # a paused one is not registered
                self.sel.unregister(listener.sock)
            listener.close()
        for path in self.socket_paths:
            remove_quietly(path)
        self.store.close()
        self.sel.close()

    def say_goodbye(self, item: Any) -> None:
        """At shutdown: tell a peer mid-transfer, or a client mid-request, why."""
        if isinstance(item, PeerConn) and not item.closed:
            if item.id and item.result is None:
                item.abort("shutdown", f"{self.config.host_name} is shutting down")
            item.close()
        elif isinstance(item, ClientConn) and not item.closed:
            if item.busy:
                item.fail("shutdown", "the daemon is shutting down")
                item.flush()
            item.close()

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
        wait = 0.0 if self.turn_work else self.timers.next_wait(self.clock())  # slices go on between events
        for key, mask in self.sel.select(wait):
            item = key.data
            if mask & selectors.EVENT_READ and not item.closed:
                self.guarded(item, item.on_readable)
            if mask & selectors.EVENT_WRITE and not item.closed:
                self.guarded(item, item.on_writable)
        for item in self.timers.pop_due(self.clock()):
            self.guarded(item, item.on_deadline)
        for item, step in list(self.turn_work.items()):
            self.guarded(item, step)

    def guarded(self, item: Any, callback: Callable[[], None]) -> None:
        """Run one callback; a bug costs the connection involved, not the daemon."""
        try:
            callback()
        except Exception:
            log.exception("internal error on %s; dropping it", item.label())
            try:
                if isinstance(item, PeerConn):
                    item.end_failed("internal-error", "internal error; see the daemon log")
                if not isinstance(item, Listener):
                    item.close()
            except Exception:
                log.exception("and again while dropping it")

    # -- listeners

    def on_tcp_accept(self) -> None:
        sock, addr = self.accept(self.listeners[0].sock)
        if sock is None:
            return
        reason = self.refusal(addr[0])
        if reason:
            log.warning("refusing %s: %s", addr[0], reason)
            if len(self.refusals) >= MAX_REFUSALS:
                sock.close()  # being told costs a connection too: not more than this many at once
            else:
                self.sel.register(sock, selectors.EVENT_READ, Refusal(self, sock, "busy", reason))
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = InboundPeer(self, sock, addr[0])
        self.sel.register(sock, selectors.EVENT_READ, conn)
        conn.send(proto.encode_preface())  # both ends open with it (§2)

    def refusal(self, address: str) -> str:
        """Why a connection from ``address`` is not taken now, or ''."""
        cfg = self.config
        inbound = sum(len(conns) for conns in self.inbound.values())
        if len(self.peer_conns) >= cfg.max_connections:
            return f"{cfg.host_name} has {len(self.peer_conns)} connections open (MAX_CONNECTIONS)"
        if inbound >= self.max_inbound():
            return f"{cfg.host_name} takes {inbound} connections already (MAX_CONNECTIONS keeps the rest for its own)"
        if len(self.inbound.get(address, ())) >= cfg.max_connections_per_peer:
            return (f"{address} has {cfg.max_connections_per_peer} connections open to {cfg.host_name} "
                    "(MAX_CONNECTIONS_PER_PEER)")
        return ""

    def max_inbound(self) -> int:
        limit = self.config.max_connections
        return max(limit - limit // OUTBOUND_SHARE, 1)

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
            log.error("accept failed: %s; not accepting for %g s", exc.strerror, ACCEPT_PAUSE_S)
            for item in self.listeners:
                if item.sock is listener:
                    item.pause(self.timers, self.clock() + ACCEPT_PAUSE_S)
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
            # The cheap checks first: a flood costs a lookup per datagram, not a parse.
            if not self.in_scope(host) or not self.may_parse():
                continue
            try:
                request = proto.decode_datagram(datagram)
            except proto.RemoteProtocolError as exc:
                self.log_dropped(host, exc)
                continue
            if request.nonce in self.discoveries:
                continue  # our own broadcast, heard back
            if self.may_answer(host):
                self.answer(host, request)

    def in_scope(self, host: str) -> bool:
        """Whom we answer at all (§5): never a network our bind address cannot
        belong to, never one we are not directly connected to."""
        ip = ipaddress.IPv4Address(host)
        if ip.is_multicast or ip.is_unspecified or host == "255.255.255.255":
            return False
        bind = ipaddress.IPv4Address(self.config.bind_address)
        if not bind.is_unspecified and ip.is_loopback != bind.is_loopback:
            return False
        return any(ip in network for network in self.local_networks())  # a spoofed source elsewhere: no

    def may_parse(self) -> bool:
        """At most MAX_DATAGRAMS_PER_WINDOW datagrams are parsed per window."""
        now = self.clock()
        start, count = self.parsed
        if now - start >= ANSWER_WINDOW_S:
            start, count = now, 0
        self.parsed = (start, count + 1)
        return count < MAX_DATAGRAMS_PER_WINDOW

    def may_answer(self, host: str) -> bool:
        """At most MAX_ANSWERS_PER_WINDOW answers per requester per window,
        MAX_ANSWERS_PER_WINDOW_ALL in all, MAX_PENDING_ANSWERS in flight."""
        now = self.clock()
        start, count = self.answered_all
        if now - start >= ANSWER_WINDOW_S:
            start, count = now, 0
        if count >= MAX_ANSWERS_PER_WINDOW_ALL or len(self.answering) >= MAX_PENDING_ANSWERS:
            return False
        start_one, count_one = self.answered.get(host, (now, 0))
        if now - start_one >= ANSWER_WINDOW_S:
            start_one, count_one = now, 0
        if count_one >= MAX_ANSWERS_PER_WINDOW:
            return False
        if len(self.answered) >= MAX_REQUESTERS_REMEMBERED:  # spoofed floods must not grow this
            self.answered = {h: v for h, v in self.answered.items() if now - v[0] < ANSWER_WINDOW_S}
        self.answered[host] = (start_one, count_one + 1)
        self.answered_all = (start, count + 1)
        return True

    def log_dropped(self, host: str, exc: proto.RemoteProtocolError) -> None:
        """A line per dropped datagram, MAX_DROP_LOGS_PER_WINDOW at most per window, then a count."""
        now = self.clock()
        start, logged, unlogged = self.drop_logs
        if now - start >= DROP_LOG_WINDOW_S:
            if unlogged:
                log.info("%d more datagrams dropped in the last %g s", unlogged, now - start)
            start, logged, unlogged = now, 0, 0
        if logged < MAX_DROP_LOGS_PER_WINDOW:
            log.info("datagram from %s dropped: %s", host, exc)
            logged += 1
        else:
            unlogged += 1
        self.drop_logs = (start, logged, unlogged)

    def answer(self, host: str, request: proto.DiscoveryRequest) -> None:
        if len(self.peer_conns) < self.config.max_connections:
            try:
                conn = OutboundPeer(self, host, proto.Announce(self.config.host_name, request.nonce))
            except OSError as exc:  # out of descriptors: an answer is not worth more
                log.info("cannot answer %s: %s", host, exc.strerror)
                return
            conn.connect(request.port)

    # -- shared services

    def publish(self, event: Dict[str, Any]) -> None:
        if not self.subscribers:
            return
        line = proto.encode_line(event)
        for subscriber in list(self.subscribers):
            subscriber.deliver(line)

    def new_transfer_id(self) -> str:
        return str(next(self.ids))

    def learn_peer(self, name: str, address: str, nonce: str) -> None:
        """An answer to our discovery ``nonce``: ``address`` is called ``name``
        (and no longer what it said before). Nothing else teaches names."""
        discovery = self.discoveries.get(nonce)
        if discovery is None:
            return
        record = PeerRecord(name, address, self.clock())
        self.peers.pop(address, None)
        self.peers[address] = record  # dicts keep order: the oldest sighting comes first
        if len(self.peers) > MAX_PEERS:
            del self.peers[next(iter(self.peers))]
        discovery.found[address] = record

    def local_networks(self) -> List[ipaddress.IPv4Network]:
        """The directly connected networks, asked again every few seconds."""
        now = self.clock()
        if now >= self.networks_until:
            self.networks = local_networks()
            self.networks_until = now + NETWORKS_TTL_S
        return self.networks

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
            raise proto.LocalProtocolError("discovery-failed", "cannot broadcast: " + "; ".join(errors))
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

def ensure_descriptors(wanted: int) -> None:
    """Raise the soft limit on open files towards ``wanted`` (up to the hard
    limit); say so when MAX_CONNECTIONS cannot all be served."""
    try:
        import resource  # Unix only
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (OSError, ValueError):
        pass
    if soft < wanted:
        log.warning("only %d open files allowed; MAX_CONNECTIONS wants about %d", soft, wanted)


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
        item["seen_s_ago"] = round(now - daemon.peers[item["address"]].last_seen, 1)
    client.finish({"peers": peers})


def cmd_message(daemon: Daemon, client: ClientConn, args: Dict[str, Any]) -> None:
    first = proto.Message(daemon.config.host_name, args["text"])
    daemon.resolve(args["peer"], lambda address: open_peer(daemon, client, address, first), client.fail)


def cmd_send(daemon: Daemon, client: ClientConn, args: Dict[str, Any]) -> None:
    job = WalkJob(daemon, client, Walk(args["paths"]), args["peer"])
    client.job = job
    daemon.turn_work[job] = job.step


class WalkJob:
    """A send request's folders walked a slice per turn of the loop (F6:
    others are served meanwhile); then the peer is resolved and offered the batch."""

    def __init__(self, daemon: Daemon, client: ClientConn, walk: Walk, peer: str) -> None:
        self.daemon, self.client, self.walk, self.peer = daemon, client, walk, peer
        self.closed = False
        self.answered = False  # the client has its answer, or is gone

    def label(self) -> str:
        return "walk"

    def step(self) -> None:
        try:
            done = self.walk.step()
        except proto.LocalProtocolError as exc:
            self.answered = True
            self.close()
            self.client.fail(exc.code, exc.message)
            return
        if done:
            self.answered = True
            self.close()
            self.offer()

    def offer(self) -> None:
        client, walk, daemon = self.client, self.walk, self.daemon
        client.job = None
        for path in walk.skipped:
            client.reply({"event": "skipped", "path": path,
                          "reason": "not a regular file or folder (links are never followed)"})
        if walk.skipped_count > len(walk.skipped):
            client.reply({"event": "skipped", "path": "", "reason": f"and {walk.skipped_count - len(walk.skipped)} "
                                                                     "more not shown"})
        entries = walk.entries
        first = proto.Offer(daemon.config.host_name, len(entries), entries.total)
        daemon.resolve(self.peer, lambda address: open_peer(daemon, client, address, first, entries), client.fail)

    def abort(self, code: str, message: str) -> None:
        self.answered = True  # the client is gone: nothing to tell
        self.close()

    def close(self) -> None:
        """End the walk; a client still waiting (after an internal error) is told."""
        self.closed = True
        self.daemon.turn_work.pop(self, None)
        if not self.answered:
            self.answered = True
            self.client.fail("internal-error", "internal error while walking the files; see the daemon log")


def open_peer(daemon: Daemon, client: ClientConn, address: str, first: Any,
              entries: Optional[Entries] = None) -> None:
    if client.closed:
        return
    if len(daemon.peer_conns) >= daemon.config.max_connections:
        client.fail("busy", f"{len(daemon.peer_conns)} connections open (MAX_CONNECTIONS)")
        return
    try:
        conn = OutboundPeer(daemon, address, first, client, entries)
    except OSError as exc:  # no socket to be had (EMFILE): say so, not a traceback
        client.fail("io-error", f"cannot open a connection: {exc.strerror}")
        return
    if conn.id:
        client.reply({"event": "started", "id": conn.id, "peer": address, "files": len(conn.entries),
                      "bytes": conn.total})
    conn.connect(daemon.config.receive_port)


def cmd_transfers(daemon: Daemon, client: ClientConn, args: Dict[str, Any]) -> None:
    client.finish({"transfers": [conn.describe() for conn in daemon.transfers.values()]})


def transfer_by_id(daemon: Daemon, transfer_id: str) -> PeerConn:
    conn = daemon.transfers.get(transfer_id)
    if conn is None:
        raise proto.LocalProtocolError("no-such-transfer", f"no open transfer {transfer_id!r}")
    return conn


def cmd_cancel(daemon: Daemon, client: ClientConn, args: Dict[str, Any]) -> None:
    conn = transfer_by_id(daemon, args["id"])
    conn.abort("cancelled", f"cancelled on {daemon.config.host_name}")
    client.finish({"id": args["id"]})


def cmd_decide(accepted: bool) -> Callable[[Daemon, ClientConn, Dict[str, Any]], None]:
    def handler(daemon: Daemon, client: ClientConn, args: Dict[str, Any]) -> None:
        conn = transfer_by_id(daemon, args["id"])
        if not isinstance(conn, InboundPeer) or not conn.awaiting_decision:
            raise proto.LocalProtocolError("not-waiting", f"transfer {args['id']} is not waiting for a decision")
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
