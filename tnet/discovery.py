"""Discovery (§5): asking who is there, answering who asks, and the names learnt.

``Discovery`` broadcasts our requests and collects the answers in
``Window``s, and asks the static peers (PEERS) by unicast at the same time;
it takes the datagrams of the UDP listener and decides, within
bounded budgets, whom to answer (the answer itself, a TCP connection, is
made by the caller's ``answer``). ``Directory`` holds the names learnt, only
from answers to our own requests, one per address. ``resolve`` turns what a
user typed into an address. The list of directly connected networks is
asked of the system every few seconds, not per datagram.

Knows the datagram format (``protocol``) and the loop; nothing of peers.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

from . import protocol as proto
from .loop import Loop
from .util import Config, broadcast_targets, local_networks

log = logging.getLogger("tnet")

MAX_DATAGRAMS_PER_WAKE = 64  # then let other sockets have a turn
MAX_ANSWERS_PER_WINDOW = 2  # discovery answers per requester address per window
MAX_ANSWERS_PER_WINDOW_ALL = 64  # and for all requesters together: a spoofed flood costs a bounded amount
MAX_DATAGRAMS_PER_WINDOW = 256  # datagrams parsed per window; the rest of a flood costs a recvfrom each
ANSWER_WINDOW_S = 1.0
MAX_PENDING_ANSWERS = 64  # announce connections in flight, all requesters together
MAX_REQUESTERS_REMEMBERED = 4096  # requester addresses in the answer budget; older ones are forgotten
MAX_PEERS = 1024  # peer addresses remembered with their name; the oldest sighting is forgotten first
MAX_DROP_LOGS_PER_WINDOW = 10  # log lines for dropped datagrams per DROP_LOG_WINDOW_S; then a count
DROP_LOG_WINDOW_S = 60.0
NETWORKS_TTL_S = 5.0  # how long the list of directly connected networks is trusted
DEFAULT_DISCOVER_S = 1.0


@dataclass
class PeerRecord:
    name: str
    address: str
    last_seen: float


Found = Dict[str, PeerRecord]  # peers by address: duplicates merge


class Directory:
    """The peers that answered our discoveries: one name per address, the
    latest; at most MAX_PEERS addresses, the oldest sighting forgotten first."""

    def __init__(self) -> None:
        self.records: Dict[str, PeerRecord] = {}

    def learn(self, record: PeerRecord) -> None:
        self.records.pop(record.address, None)
        self.records[record.address] = record  # dicts keep order: the oldest sighting comes first
        if len(self.records) > MAX_PEERS:
            del self.records[next(iter(self.records))]

    def addresses_of(self, name: str) -> List[str]:
        """Addresses known under ``name``: exact match first, then any case."""
        for same in (lambda n: n == name, lambda n: n.casefold() == name.casefold()):
            addresses = sorted({r.address for r in self.records.values() if same(r.name)})
            if addresses:
                return addresses
        return []

    def names(self) -> List[str]:
        return sorted({r.name for r in self.records.values()})


class Window:
    """One discovery of ours: collects answers until its deadline."""

    def __init__(self, nonce: str, deadline: float, on_done: Callable[[Found], None],
                 on_close: Callable[["Window"], Any]) -> None:
        self.nonce = nonce
        self.deadline = deadline
        self.scheduled = math.inf
        self.closed = False
        self.found: Found = {}
        self.on_done = on_done
        self.on_close = on_close

    def on_deadline(self) -> None:
        self.close()
        self.on_done(self.found)

    def on_internal_error(self) -> None:
        self.close()

    def close(self) -> None:
        self.closed = True
        self.on_close(self)

    def label(self) -> str:
        return "discovery"


Budget = Tuple[float, int]  # (window start, count)


class Discovery:
    """Our requests and their windows; the requests of others and their budgets."""

    def __init__(self, loop: Loop, config: Config, nonce: Callable[[], str],
                 answer: Callable[[str, proto.DiscoveryRequest], None], answers_in_flight: Callable[[], int]) -> None:
        self.loop, self.config, self.nonce = loop, config, nonce
        self.answer, self.answers_in_flight = answer, answers_in_flight
        self.directory = Directory()
        self.windows: Dict[str, Window] = {}  # by nonce
        self.port = 0  # our TCP port, where answers come (known once listening)
        self.broadcasts = broadcast_targets(config)
        self.networks: List[ipaddress.IPv4Network] = []
        self.networks_until = -math.inf
        self.answered: Dict[str, Budget] = {}  # requester -> its answers this window
        self.answered_all: Budget = (-math.inf, 0)
        self.parsed: Budget = (-math.inf, 0)
        self.drop_logs = (-math.inf, 0, 0)  # (window start, lines logged, dropped unlogged)

    # -- asking

    def discover(self, timeout: float, on_done: Callable[[Found], None]) -> None:
        """Broadcast a request, and send it to each of PEERS; call
        ``on_done(found)`` when the window closes."""
        nonce = self.nonce()
        window = Window(nonce, self.loop.clock() + timeout, on_done, lambda w: self.windows.pop(w.nonce, None))
        request = proto.encode_discovery(proto.DiscoveryRequest(self.config.host_name, nonce, self.port))
        errors = []
        # Asked again each time: interfaces come up and get addresses after we start.
        self.broadcasts = broadcast_targets(self.config)
        targets = [(target, self.config.broadcast_port) for target in self.broadcasts] + list(self.config.peers)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            if self.config.bind_address != "0.0.0.0":
                udp.bind((self.config.bind_address, 0))  # answers come back to our address
            for target, port in targets:
                try:
                    udp.sendto(request, (target, port))
                except OSError as exc:
                    errors.append(f"{target}:{port}: {exc.strerror}")
        if len(errors) == len(targets):
            raise proto.LocalProtocolError("discovery-failed", "cannot send a discovery: " + "; ".join(errors))
        for error in errors:
            log.warning("discovery: %s", error)
        self.windows[nonce] = window
        self.loop.schedule(window)

    def learn(self, name: str, address: str, nonce: str) -> None:
        """An answer to our discovery ``nonce``: ``address`` is called ``name``
        (and no longer what it said before). Nothing else teaches names."""
        window = self.windows.get(nonce)
        if window is None:
            return
        record = PeerRecord(name, address, self.loop.clock())
        self.directory.learn(record)
        window.found[address] = record

    def resolve(self, peer: str, then: Callable[[str], None], fail: Callable[[str, str], None]) -> None:
        """Turn a peer (address or host name) into an address; a name not
        known yet triggers one discovery before it is declared unknown."""
        try:
            then(str(ipaddress.IPv4Address(peer)))
            return
        except ValueError:
            pass

        def decide(final: bool) -> bool:
            addresses = self.directory.addresses_of(peer)
            if len(addresses) == 1:
                then(addresses[0])
            elif len(addresses) > 1:
                fail("ambiguous-peer", f"{peer!r} is at {', '.join(addresses)}; name one address")
            elif final:
                known = self.directory.names()
                fail("unknown-peer", f"no peer named {peer!r}; known: {', '.join(known) or 'none'}")
            return bool(addresses) or final

        def after_discovery(found: Found) -> None:
            decide(True)

        if not decide(False):
            self.discover(DEFAULT_DISCOVER_S, after_discovery)

    # -- answering

    def on_datagrams(self, udp: socket.socket) -> None:
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
            if request.nonce in self.windows:
                continue  # our own broadcast, heard back
            if self.may_answer(host):
                self.answer(host, request)

    def in_scope(self, host: str) -> bool:
        """Whom we answer at all (§5): never a network our bind address cannot
        belong to, never one we are not directly connected to unless PEERS or
        ALLOW_FROM names the requester."""
        ip = ipaddress.IPv4Address(host)
        if ip.is_multicast or ip.is_unspecified or host == "255.255.255.255":
            return False
        bind = ipaddress.IPv4Address(self.config.bind_address)
        if not bind.is_unspecified and ip.is_loopback != bind.is_loopback:
            return False
        if any(ip in network for network in self.local_networks()):
            return True
        return self.config.lists(host)  # a spoofed source elsewhere: only where we were told to answer

    def local_networks(self) -> List[ipaddress.IPv4Network]:
        """The directly connected networks, asked again every few seconds."""
        now = self.loop.clock()
        if now >= self.networks_until:
            self.networks = local_networks()
            self.networks_until = now + NETWORKS_TTL_S
        return self.networks

    def may_parse(self) -> bool:
        """At most MAX_DATAGRAMS_PER_WINDOW datagrams are parsed per window."""
        self.parsed = counted(self.parsed, self.loop.clock())
        return self.parsed[1] <= MAX_DATAGRAMS_PER_WINDOW

    def may_answer(self, host: str) -> bool:
        """At most MAX_ANSWERS_PER_WINDOW answers per requester per window,
        MAX_ANSWERS_PER_WINDOW_ALL in all, MAX_PENDING_ANSWERS in flight."""
        now = self.loop.clock()
        all_of_them = counted(self.answered_all, now)
        this_one = counted(self.answered.get(host, (now, 0)), now)
        if (all_of_them[1] > MAX_ANSWERS_PER_WINDOW_ALL or this_one[1] > MAX_ANSWERS_PER_WINDOW
                or self.answers_in_flight() >= MAX_PENDING_ANSWERS):
            return False
        if len(self.answered) >= MAX_REQUESTERS_REMEMBERED:  # spoofed floods must not grow this
            self.answered = {h: v for h, v in self.answered.items() if now - v[0] < ANSWER_WINDOW_S}
        self.answered[host] = this_one
        self.answered_all = all_of_them
        return True

    def log_dropped(self, host: str, exc: proto.RemoteProtocolError) -> None:
        """A line per dropped datagram, MAX_DROP_LOGS_PER_WINDOW at most per window, then a count."""
        now = self.loop.clock()
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


def counted(budget: Budget, now: float) -> Budget:
    """``budget`` with one more, in a new window if the last one is over."""
    start, count = budget
    if now - start >= ANSWER_WINDOW_S:
        start, count = now, 0
    return start, count + 1
