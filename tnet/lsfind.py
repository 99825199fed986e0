"""LocalSend discovery: the multicast group, our announcements, the answers, the devices seen.

``Finder`` joins 224.0.0.167 on LOCALSEND_PORT (UDP) on the interface of
BIND_ADDRESS, or on every up interface when it is the wildcard, and sends
there only (IP_MULTICAST_IF, TTL 1, our own datagrams not looped back).
It announces us at start (+100, +500, +2000 ms, as the protocol says) and
on ``announce`` (`tnet discover`). An announcement from another device
(``announce: true``) is answered as the protocol asks: POST /register to it,
over HTTPS with our certificate and its announced fingerprint pinned, or
over HTTP as it says; when that fails, a multicast ``announce: false``.
Answers are bounded per announcer, in flight and in all, and only devices on
a network we are directly connected to are answered (a loopback BIND_ADDRESS
answers loopback ones only), as tnet's own discovery (§5).

``Devices`` holds what was learnt from announcements, register calls and
the answers to ours: one entry per fingerprint, the latest address.

Knows the LocalSend datagram and register formats and the loop; nothing of
files.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import math
import socket
import ssl
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import http
from . import localsend as ls
from . import protocol as proto
from .httpconn import Buffers, Call, HttpClient, Reply
from .loop import Loop
from .util import Config, interfaces, local_networks, printable

log = logging.getLogger("tnet")

ANNOUNCE_DELAYS_S = (0.1, 0.5, 2.0)  # after start: a lost datagram is not the only chance
MULTICAST_TTL = 1  # the group is link-local (224.0.0.0/24): routers never forward it anyway
MAX_DATAGRAMS_PER_WAKE = 64  # then the other sockets have a turn
MAX_REGISTERS_IN_FLIGHT = 16  # our answers (POST /register) open at once
MAX_ANSWERS_PER_WINDOW = 2  # answers per announcer address per window
MAX_ANSWERS_PER_WINDOW_ALL = 32  # and for all of them: a spoofed flood costs a bounded amount
ANSWER_WINDOW_S = 1.0
MAX_FALLBACKS_PER_WINDOW = 1  # multicast answers when a register call failed
MAX_ANNOUNCERS_REMEMBERED = 4096  # addresses in the answer budget; beyond it old windows are forgotten
REGISTER_TIMEOUT_S = 4.0  # connect, TLS and answer; localsendd waits as long
MAX_REGISTER_REPLY_BYTES = ls.MAX_REGISTER_BYTES
MAX_DEVICES = 1024  # devices remembered; the oldest sighting is forgotten first
NETWORKS_TTL_S = 5.0  # how long the list of directly connected networks is trusted
# Linux delivers a group's datagrams to every socket bound to the port unless
# told to deliver only the groups this socket joined, on the interfaces it joined them.
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49 if sys.platform.startswith("linux") else 0)


@dataclass
class Device:
    """A LocalSend device seen on the network."""

    alias: str
    fingerprint: str
    address: str
    port: int
    protocol: str
    device_type: str
    device_model: str
    last_seen: float

    def as_peer(self) -> Dict[str, Any]:
        """How `tnet discover` and `tnet peers` list it, beside tnet daemons."""
        return {"name": self.alias, "address": self.address, "kind": "localsend", "port": self.port,
                "protocol": self.protocol, "fingerprint": self.fingerprint, "device_type": self.device_type,
                "device_model": self.device_model}


class Devices:
    """One entry per fingerprint, the latest sighting last; at most MAX_DEVICES."""

    def __init__(self) -> None:
        self.records: "collections.OrderedDict[str, Device]" = collections.OrderedDict()

    def learn(self, info: ls.DeviceInfo, address: str, now: float) -> Device:
        old = self.records.pop(info.fingerprint, None)
        port = info.port if info.port is not None else (old.port if old else ls.DEFAULT_PORT)
        scheme = info.protocol or (old.protocol if old else "https")
        device = Device(info.alias, info.fingerprint, address, port, scheme, info.device_type,
                        info.device_model or "", now)
        self.records[info.fingerprint] = device
        while len(self.records) > MAX_DEVICES:
            self.records.popitem(last=False)
        return device

    def since(self, when: float) -> List[Device]:
        return sorted((d for d in self.records.values() if d.last_seen >= when), key=lambda d: (d.alias, d.address))

    def all(self) -> List[Device]:
        return self.since(-math.inf)


class Announcer:
    """The announcements after start, on the loop's timers."""

    def __init__(self, loop: Loop, announce: Callable[[], None]) -> None:
        self.loop = loop
        self.announce = announce
        self.due: List[float] = []
        self.deadline = math.inf
        self.scheduled = math.inf
        self.closed = False

    def start(self, delays: Tuple[float, ...]) -> None:
        now = self.loop.clock()
        self.due = sorted(now + d for d in delays)
        self.next()

    def next(self) -> None:
        self.deadline = self.due.pop(0) if self.due else math.inf
        if self.deadline < math.inf:
            self.loop.schedule(self)

    def on_deadline(self) -> None:
        self.next()
        self.announce()

    def on_internal_error(self) -> None:
        self.next()

    def label(self) -> str:
        return "localsend announcements"


Budget = Tuple[float, int]  # (window start, count)


def counted(budget: Budget, now: float) -> Budget:
    start, count = budget
    if now - start >= ANSWER_WINDOW_S:
        start, count = now, 0
    return start, count + 1


class Finder:
    """Our multicast socket, announcements and answers; the devices seen."""

    def __init__(self, loop: Loop, config: Config, info: ls.DeviceInfo, buffers: Buffers,
                 client_tls: Optional[ssl.SSLContext]) -> None:
        self.loop, self.config, self.info, self.buffers = loop, config, info, buffers
        self.client_tls = client_tls
        self.devices = Devices()
        self.announcer = Announcer(loop, self.announce)
        self.in_flight: Dict[HttpClient, None] = {}
        self.answered: Dict[str, Budget] = {}
        self.answered_all: Budget = (-math.inf, 0)
        self.fallbacks: Budget = (-math.inf, 0)
        self.networks: List[ipaddress.IPv4Network] = []
        self.networks_until = -math.inf
        self.sock: Optional[socket.socket] = None

    # -- the socket

    def open(self) -> socket.socket:
        """The UDP socket bound to the group and port, joined where we serve. OSError if it cannot be bound."""
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # Every daemon on the machine (and a LocalSend app) may share the port.
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if IP_MULTICAST_ALL:
                udp.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            udp.bind((ls.MULTICAST_GROUP, self.config.localsend_port))  # the group's datagrams, no others
        except OSError:
            udp.close()
            raise
        udp.setblocking(False)
        self.sock = udp
        self.join()
        return udp

    def sources(self) -> List[str]:
        """The addresses we join and send from: BIND_ADDRESS, or every up
        interface's when it is the wildcard ('' when none is known: the
        routing table then chooses)."""
        bind = self.config.bind_address
        if bind != "0.0.0.0":
            return [bind]
        found = [str(i.network.ip) for i in interfaces() if not i.network.ip.is_loopback]
        return sorted(set(found)) or [""]

    def join(self) -> None:
        """Join the group where we serve; again at each announcement, for
        interfaces that came up since (a join made already is no error)."""
        if self.sock is None:
            return
        group = socket.inet_aton(ls.MULTICAST_GROUP)
        errors = []
        for source in self.sources():
            request = struct.pack("4s4s", group, socket.inet_aton(source or "0.0.0.0"))
            try:
                self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, request)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:  # joined there already
                    errors.append(f"{source or 'the default interface'}: {exc.strerror}")
        for error in errors:
            log.warning("LocalSend: cannot join %s on %s; devices there can still reach this daemon by "
                        "address", ls.MULTICAST_GROUP, error)

    def close(self) -> None:
        self.announcer.closed = True
        for client in list(self.in_flight):
            client.close()
        self.in_flight.clear()

    # -- announcing

    def start(self) -> None:
        self.announcer.start(ANNOUNCE_DELAYS_S)

    def announce(self, flag: bool = True) -> None:
        """Multicast our info; ``flag``: ask the others to register with us."""
        self.join()
        datagram = ls.encode_announce(self.info, flag)
        for source in self.sources():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MULTICAST_TTL)
                    udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
                    if source:
                        udp.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(source))
                        udp.bind((source, 0))
                    udp.sendto(datagram, (ls.MULTICAST_GROUP, self.config.localsend_port))
                except OSError as exc:
                    log.warning("LocalSend: cannot announce from %s: %s", source or "the default interface",
                                exc.strerror)

    # -- what others say

    def on_datagrams(self, udp: socket.socket) -> None:
        for _ in range(MAX_DATAGRAMS_PER_WAKE):
            try:
                datagram, (host, _port) = udp.recvfrom(ls.MAX_ANNOUNCE_BYTES + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("LocalSend discovery socket: %s", exc.strerror)
                return
            if not self.in_scope(host):
                continue
            try:
                info, wants_answer = ls.decode_announce(datagram)
            except proto.RemoteProtocolError as exc:
                log.debug("LocalSend datagram from %s dropped: %s", host, exc)
                continue
            if info.fingerprint == self.info.fingerprint:
                continue  # our own, heard back
            self.learn(info, host)
            if wants_answer and self.may_answer(host):
                self.register_with(info, host)

    def learn(self, info: ls.DeviceInfo, address: str) -> None:
        if info.fingerprint != self.info.fingerprint:
            device = self.devices.learn(info, address, self.loop.clock())
            log.debug("LocalSend device %s at %s:%d (%s)", printable(device.alias), address, device.port,
                      device.protocol)

    def in_scope(self, host: str) -> bool:
        """Whom we answer at all: a directly connected network, and loopback
        only when we serve on loopback (and the other way round)."""
        ip = ipaddress.IPv4Address(host)
        if ip.is_multicast or ip.is_unspecified:
            return False
        bind = ipaddress.IPv4Address(self.config.bind_address)
        if not bind.is_unspecified and ip.is_loopback != bind.is_loopback:
            return False
        now = self.loop.clock()
        if now >= self.networks_until:
            self.networks = local_networks()
            self.networks_until = now + NETWORKS_TTL_S
        return any(ip in network for network in self.networks)

    def may_answer(self, host: str) -> bool:
        now = self.loop.clock()
        all_of_them = counted(self.answered_all, now)
        this_one = counted(self.answered.get(host, (now, 0)), now)
        if (all_of_them[1] > MAX_ANSWERS_PER_WINDOW_ALL or this_one[1] > MAX_ANSWERS_PER_WINDOW
                or len(self.in_flight) >= MAX_REGISTERS_IN_FLIGHT):
            return False
        if len(self.answered) >= MAX_ANNOUNCERS_REMEMBERED:
            self.answered = {h: v for h, v in self.answered.items() if now - v[0] < ANSWER_WINDOW_S}
        self.answered[host] = this_one
        self.answered_all = all_of_them
        return True

    def register_with(self, info: ls.DeviceInfo, host: str) -> None:
        """POST /register to an announcer, as it asked; a multicast answer if that fails."""
        https = info.protocol != "http"
        if https and self.client_tls is None:
            self.fallback(host, "no certificate of ours for HTTPS")  # cannot happen: HTTPS mode makes one
            return
        port = info.port or ls.DEFAULT_PORT
        request = http.encode_request("POST", ls.REGISTER_PATH, [
            ("Host", f"{host}:{port}"), ("Content-Type", "application/json"), ("Accept", "application/json"),
        ], ls.encode_register(self.info))
        call = Call(host, port, request, tls=self.client_tls if https else None,
                    pinned=info.fingerprint if https else "", max_body=MAX_REGISTER_REPLY_BYTES,
                    timeout=REGISTER_TIMEOUT_S)
        try:
            client = HttpClient(self.loop, self.buffers, call, lambda reply: self.on_register_reply(client, info,
                                                                                                   host, reply))
        except OSError as exc:  # out of descriptors: an answer is not worth more
            log.info("LocalSend: cannot answer %s: %s", host, exc.strerror)
            return
        self.in_flight[client] = None
        client.connect(self.config.bind_address)

    def on_register_reply(self, client: HttpClient, info: ls.DeviceInfo, host: str, reply: Reply) -> None:
        self.in_flight.pop(client, None)
        if reply.status == 200:
            try:
                answer = ls.decode_register(reply.body, need_port=False)
            except ls.LocalSendError:
                return  # it took our register; what it says of itself we have from its announcement
            if answer.fingerprint == info.fingerprint:
                self.learn(info, host)
            return
        why = f"{reply.status}" if reply.status else f"{reply.code}: {reply.message}"
        self.fallback(host, why)

    def fallback(self, host: str, why: str) -> None:
        log.info("LocalSend: register with %s failed (%s); answering by multicast", host, printable(why))
        self.fallbacks = counted(self.fallbacks, self.loop.clock())
        if self.fallbacks[1] <= MAX_FALLBACKS_PER_WINDOW:
            self.announce(False)
