"""The tnet daemon: the wiring of one thread, one loop, four sockets.

``Daemon`` makes the parts and joins them: the ``loop`` (selector, timers,
signals, slices of work), the ``store`` (TEMP_DIR and FILE_SAVE_DIR), the
``clients`` (the command socket's connections; the events socket's
subscribers), ``discovery`` (the UDP listener, our requests, the peers'
names), the peers (``inbound`` for the TCP listener's connections,
``outbound`` for ours, sharing a ``peers.PeerContext``), the ``recorder``
(the history: what the peers publish goes through it to the events
socket) and the ``commands`` local clients may run. It opens the four sockets, accepts on
them, refuses peers beyond the connection limits, and stops cleanly.

Reading order for a newcomer: this module, then ``loop``, ``clients`` and
``commands``, then ``peers``, ``inbound``, ``outbound``, ``store``; the
bytes are in ``protocol`` and ``api``. Imports run one way, down that list.
The daemon never writes outside TEMP_DIR and FILE_SAVE_DIR and never
replaces an existing file (§4.2).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import stat
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from . import __version__
from . import protocol as proto
from .clients import ClientConn, Events
from .commands import Services, dispatcher
from .discovery import Discovery
from .history import HISTORY_FILE, History, HistoryError
from .inbound import InboundPeer
from .keep import Keep
from .loop import Listener, Loop
from .outbound import OutboundPeer
from .peers import PeerConn, PeerContext, Refusal
from .recorder import Recorder
from .sending import SendJob
from .store import Store, StoreError, remove_quietly
from .util import Config, StateDirError, monotonic, open_state_dir

if TYPE_CHECKING:
    from .lsdoor import LocalSend

log = logging.getLogger("tnet")

ACCEPT_PAUSE_S = 1.0  # out of descriptors: how long a listener rests
OUTBOUND_SHARE = 4  # 1/4 of MAX_CONNECTIONS is kept for connections we open: inbound ones cannot starve them
MAX_REFUSALS = 64  # refused connections being told why at once; beyond that they are just closed
LISTEN_BACKLOG = 128
SOCKET_DIR_MODE = 0o700
SOCKET_MODE = 0o600
DESCRIPTORS_PER_CONNECTION = 4  # its socket, a file, its folder, a copy's; plus some for the daemon


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to change."""


class Daemon:
    """The parts of a daemon, and the four sockets that feed them."""

    def __init__(self, config: Config, clock: Callable[[], float] = monotonic,
                 nonce: Callable[[], str] = lambda: os.urandom(16).hex()) -> None:
        self.config = config
        self.loop = Loop(clock)
        self.store = Store(config.save_dir, config.temp_dir, nonce())
        self.events = Events(self.loop)
        self.recorder = Recorder(History(os.path.join(config.state_dir, HISTORY_FILE), config.history_max),
                                 self.events.publish, config.max_connections)
        self.transfer_ids = iter(range(1, 1 << 62))
        self.peers = PeerContext(loop=self.loop, config=config, store=self.store, publish=self.recorder.publish,
                                 learn=self.learn, new_transfer_id=lambda: str(next(self.transfer_ids)),
                                 record_files=self.recorder.record_outgoing_files)
        self.discovery = Discovery(self.loop, config, nonce, self.answer,
                                   lambda: len(self.peers.registry.answering))
        self.localsend = localsend_door(self.peers) if config.localsend else None
        self.services = Services(config=config, loop=self.loop, peers=self.peers, discovery=self.discovery,
                                 events=self.events, store=self.store, recorder=self.recorder,
                                 localsend=self.localsend)
        self.dispatch = dispatcher(self.services)
        self.listeners: List[Listener] = []
        self.socket_paths: List[str] = []

    def learn(self, name: str, address: str, nonce: str) -> None:
        self.discovery.learn(name, address, nonce)

    # -- start and stop

    def start(self) -> None:
        """Open the four sockets, or raise StartupError with the reason."""
        cfg = self.config
        try:
            os.close(open_state_dir(cfg.state_dir))  # private, and never through a link: before a byte goes in it
            self.recorder.open()
        except StateDirError as exc:
            raise StartupError(str(exc)) from None
        except HistoryError as exc:
            raise StartupError(f"STATE_DIR={cfg.state_dir}: {exc}") from None
        try:
            self.store.open(time.time())
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        if cfg.resume_keep_s:
            self.open_keep(cfg.resume_keep_s)
        pools = 2 if cfg.localsend else 1  # the LocalSend door counts its connections apart
        ensure_descriptors(DESCRIPTORS_PER_CONNECTION * cfg.max_connections * pools + 64)
        if self.store.other_file_system():
            log.warning("TEMP_DIR=%s and FILE_SAVE_DIR=%s are on different file systems: each file is "
                        "copied once more after it is verified, and needs room in both until then; "
                        "a TEMP_DIR beside FILE_SAVE_DIR saves that", cfg.temp_dir, cfg.save_dir)
        tcp = open_tcp(cfg)
        try:
            udp = open_udp(cfg)
        except StartupError:
            tcp.close()
            raise
        more = self.open_localsend(tcp, udp)
        self.discovery.port = tcp.getsockname()[1]
        command = open_unix("COMMAND_SOCKET", cfg.command_socket)
        self.socket_paths.append(cfg.command_socket)
        events = open_unix("EVENT_SOCKET", cfg.event_socket)
        self.socket_paths.append(cfg.event_socket)
        for sock, callback in ((tcp, lambda: self.on_tcp_accept(tcp)), (udp, lambda: self.discovery.on_datagrams(udp)),
                               (command, lambda: self.on_command_accept(command)),
                               (events, lambda: self.on_event_accept(events))) + more:
            sock.setblocking(False)
            listener = Listener(self.loop, sock, callback)
            self.listeners.append(listener)
            listener.listen()
        if self.localsend is not None:
            self.localsend.start()
        log.info("tnet %s: %s on %s:%d, discovery on port %d to %s, saving to %s", __version__,
                 cfg.host_name, cfg.bind_address, cfg.receive_port, cfg.broadcast_port,
                 ",".join(self.discovery.broadcasts), self.store.save_dir)
        if cfg.peers:
            log.info("discovery also asks %s", ", ".join(f"{address}:{port}" for address, port in cfg.peers))
        log.info("history in %s (at most %d entries)", self.recorder.history.path, cfg.history_max)

    def open_keep(self, keep_s: float) -> None:
        """Resume's partial files; without them the daemon still serves, and says why not."""
        keep = Keep(self.store.temp, keep_s, time.time)
        try:
            files, size = keep.open()
        except OSError as exc:
            log.warning("TEMP_DIR=%s: cannot keep partial files for resume, so a cut transfer starts over: %s",
                        self.config.temp_dir, exc.strerror)
            return
        self.peers.keep = keep
        if files:
            log.info("removed %d expired or unreadable partial files (%d bytes) kept for resume", files, size)

    def open_localsend(self, tcp: socket.socket, udp: socket.socket) -> Tuple[Tuple[socket.socket, Callable], ...]:
        """LOCALSEND=1: its sockets, each with what to do when it is readable;
        StartupError (``tcp`` and ``udp`` closed) if it cannot start."""
        localsend = self.localsend
        if localsend is None:
            return ()
        from .lsdoor import StartError

        try:
            ls_tcp, ls_udp = localsend.open(time.time())
        except StartError as exc:
            tcp.close()
            udp.close()
            raise StartupError(str(exc)) from None
        return (ls_tcp, lambda: localsend.on_listener(ls_tcp, self.accept)), (ls_udp,
                                                                              lambda: localsend.on_datagrams(ls_udp))

    def stop(self) -> None:
        """Fail open transfers cleanly, tell peers and clients, remove the socket files."""
        if self.localsend is not None:
            self.localsend.close()  # its transfers fail with "shutdown", published below
        for transfer in list(self.peers.registry.transfers.values()):
            if isinstance(transfer, SendJob) and transfer.waiting():  # no connection of its own to be told by
                self.loop.guarded(transfer, functools.partial(transfer.fail, "shutdown",
                                                              "the daemon is shutting down"))
        for item in self.loop.handlers():
            self.loop.guarded(item, functools.partial(self.say_goodbye, item))
        self.events.flush_all()
        for listener in self.listeners:
            listener.close()
        for path in self.socket_paths:
            remove_quietly(path)
        if self.peers.keep is not None:
            self.peers.keep.close()
        self.store.close()
        self.recorder.close()
        self.loop.close()

    def say_goodbye(self, item: Any) -> None:
        """At shutdown: tell a peer mid-transfer, or a client mid-request, why."""
        if isinstance(item, PeerConn) and not item.closed:
            if item.id and item.result is None:
                item.fail("shutdown", f"{self.config.host_name} is shutting down")
            item.close()
        elif isinstance(item, ClientConn) and not item.closed:
            if item.busy:
                item.fail("shutdown", "the daemon is shutting down")
            item.flush()  # that answer, or one a send waiting to try again gave above
            item.close()

    def run(self) -> int:
        try:
            self.loop.run()
        finally:
            self.stop()
        log.info("stopped")
        return 0

    def run_once(self) -> None:
        self.loop.run_once()

    # -- the listeners

    def on_tcp_accept(self, listener: socket.socket) -> None:
        sock, addr = self.accept(listener)
        if sock is None:
            return
        reason = self.refusal(addr[0])
        if reason:
            log.warning("refusing %s: %s", addr[0], reason)
            if len(self.peers.registry.refusals) >= MAX_REFUSALS:
                sock.close()  # being told costs a connection too: not more than this many at once
            else:
                Refusal(self.peers, sock, "busy", reason).watch()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = InboundPeer(self.peers, sock, addr[0])
        conn.watch()
        conn.start()

    def refusal(self, address: str) -> str:
        """Why a connection from ``address`` is not taken now, or ''."""
        cfg, registry = self.config, self.peers.registry
        inbound = registry.inbound_count()
        if len(registry.connections) >= cfg.max_connections:
            return f"{cfg.host_name} has {len(registry.connections)} connections open (MAX_CONNECTIONS)"
        if inbound >= self.max_inbound():
            return f"{cfg.host_name} takes {inbound} connections already (MAX_CONNECTIONS keeps the rest for its own)"
        if len(registry.inbound.get(address, ())) >= cfg.max_connections_per_peer:
            return (f"{address} has {cfg.max_connections_per_peer} connections open to {cfg.host_name} "
                    "(MAX_CONNECTIONS_PER_PEER)")
        return ""

    def max_inbound(self) -> int:
        limit = self.config.max_connections
        return max(limit - limit // OUTBOUND_SHARE, 1)

    def on_command_accept(self, listener: socket.socket) -> None:
        sock, _ = self.accept(listener)
        if sock is not None:
            ClientConn(self.loop, sock, self.dispatch).watch()

    def on_event_accept(self, listener: socket.socket) -> None:
        sock, _ = self.accept(listener)
        if sock is not None:
            self.events.subscribe(sock).watch()

    def accept(self, listener: socket.socket) -> Tuple[Optional[socket.socket], Any]:
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None, None
        except OSError as exc:  # EMFILE and friends: say so, keep serving the rest
            log.error("accept failed: %s; not accepting for %g s", exc.strerror, ACCEPT_PAUSE_S)
            for item in self.listeners:
                if item.sock is listener:
                    item.pause(self.loop.clock() + ACCEPT_PAUSE_S)
            return None, None
        sock.setblocking(False)
        return sock, addr

    def answer(self, host: str, request: proto.DiscoveryRequest) -> None:
        """Answer a discovery over TCP, at the requester's address (§5)."""
        if len(self.peers.registry.connections) >= self.config.max_connections:
            return
        try:
            conn = OutboundPeer(self.peers, host, proto.Announce(self.config.host_name, request.nonce))
        except OSError as exc:  # out of descriptors: an answer is not worth more
            log.info("cannot answer %s: %s", host, exc.strerror)
            return
        conn.connect(request.port)


# --- The sockets -----------------------------------------------------------------


def localsend_door(peers: PeerContext) -> LocalSend:
    """LOCALSEND=1's front door. Imported here, not above: without LOCALSEND
    the daemon never loads ssl nor the LocalSend modules (less memory)."""
    from .lsdoor import LocalSend

    return LocalSend(peers)


def open_tcp(cfg: Config) -> socket.socket:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        tcp.bind((cfg.bind_address, cfg.receive_port))
    except OSError as exc:
        tcp.close()
        raise StartupError(f"RECEIVE_PORT={cfg.receive_port} on BIND_ADDRESS={cfg.bind_address}: "
                           f"{exc.strerror}") from None
    tcp.listen(LISTEN_BACKLOG)
    return tcp

def open_udp(cfg: Config) -> socket.socket:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Broadcasts reach only wildcard-bound sockets, and every daemon on the
    # machine shares the port: SO_REUSEADDR lets them all hear (§5).
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        udp.bind(("", cfg.broadcast_port))
    except OSError as exc:
        udp.close()
        raise StartupError(f"BROADCAST_PORT={cfg.broadcast_port}: {exc.strerror}") from None
    return udp

def open_unix(var: str, path: str) -> socket.socket:
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
    return sock


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



def main(config: Config) -> int:
    """Run a daemon in the foreground until SIGINT or SIGTERM."""
    daemon = Daemon(config)
    try:
        daemon.start()
    except StartupError as exc:
        print(f"tnet daemon: {exc}", file=sys.stderr)
        return 1
    return daemon.run()
