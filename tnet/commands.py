"""What local clients may ask (§6.1): one handler per command, in ``COMMANDS``.

Each handler gets the ``Services`` (the parts of the daemon it may use), the
client and the request's checked arguments; it answers with
``client.finish``/``client.fail`` at once or later (a discovery window, a
transfer), and raises ``LocalProtocolError`` to refuse. ``WalkJob`` walks a
send's folders a slice per turn of the loop before the offer goes out.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from . import __version__, api
from . import protocol as proto
from .clients import ClientConn, Events
from .discovery import DEFAULT_DISCOVER_S, Discovery, Found, PeerRecord
from .inbound import InboundPeer
from .loop import Loop
from .lsdoor import LocalSend
from .lsreceive import LsReceive
from .outbound import OutboundPeer
from .peers import PeerContext, Transfer
from .store import Store
from .util import Config
from .walk import Entries, Walk


@dataclass
class Services:
    """The parts of the daemon that commands use."""

    config: Config
    loop: Loop
    peers: PeerContext
    discovery: Discovery
    events: Events
    store: Store
    localsend: Optional[LocalSend] = None  # LOCALSEND=1

    @property
    def transfers(self) -> Dict[str, Transfer]:
        return self.peers.registry.transfers


Handler = Callable[[Services, ClientConn, Dict[str, Any]], None]


def cmd_status(services: Services, client: ClientConn, args: Dict[str, Any]) -> None:
    cfg = services.config
    client.finish({
        "version": __version__,
        "api": api.API_VERSION,
        "protocol": proto.VERSION,
        "pid": os.getpid(),
        "host_name": cfg.host_name,
        "bind_address": cfg.bind_address,
        "receive_port": cfg.receive_port,
        "broadcast_port": cfg.broadcast_port,
        "broadcast_addresses": list(services.discovery.broadcasts),
        "save_dir": services.store.save_dir,
        "temp_dir": services.store.temp_dir,
        "command_socket": os.path.abspath(cfg.command_socket),
        "event_socket": os.path.abspath(cfg.event_socket),
        "accept": cfg.accept,
        "idle_timeout": cfg.idle_timeout,
        "transfers": [conn.describe() for conn in services.transfers.values()],
        "peers": len(services.discovery.directory.records),
        "subscribers": len(services.events.subscribers),
        **localsend_status(services),
    })


def localsend_status(services: Services) -> Dict[str, Any]:
    return {} if services.localsend is None else {"localsend": services.localsend.status()}


def peer_list(records: Any) -> List[Dict[str, Any]]:
    return [{"name": r.name, "address": r.address} for r in sorted(records, key=lambda r: (r.name, r.address))]


def with_localsend(services: Services, peers: List[Dict[str, Any]], since: float) -> List[Dict[str, Any]]:
    """LOCALSEND=1: tnet daemons marked as such, then the LocalSend devices seen since ``since``."""
    if services.localsend is None:
        return peers
    now = services.loop.clock()
    devices = [dict(d.as_peer(), seen_s_ago=round(now - d.last_seen, 1)) for d in services.localsend.devices(since)]
    return [dict(p, kind="tnet") for p in peers] + devices


def cmd_discover(services: Services, client: ClientConn, args: Dict[str, Any]) -> None:
    started = services.loop.clock()
    if services.localsend is not None:
        services.localsend.announce()

    def done(found: Found) -> None:
        if not client.closed:
            peers = with_localsend(services, peer_list(found.values()), started)
            client.finish({"peers": [{k: v for k, v in p.items() if k != "seen_s_ago"} for p in peers]})

    services.discovery.discover(float(args.get("timeout", DEFAULT_DISCOVER_S)), done)


def cmd_peers(services: Services, client: ClientConn, args: Dict[str, Any]) -> None:
    now = services.loop.clock()
    records: Dict[str, PeerRecord] = services.discovery.directory.records
    peers = peer_list(records.values())
    for item in peers:
        item["seen_s_ago"] = round(now - records[item["address"]].last_seen, 1)
    client.finish({"peers": with_localsend(services, peers, -math.inf)})


def cmd_message(services: Services, client: ClientConn, args: Dict[str, Any]) -> None:
    first = proto.Message(services.config.host_name, args["text"])
    services.discovery.resolve(args["peer"], lambda address: open_peer(services, client, address, first),
                               client.fail)


def cmd_send(services: Services, client: ClientConn, args: Dict[str, Any]) -> None:
    job = WalkJob(services, client, Walk(args["paths"]), args["peer"])
    client.job = job
    services.loop.each_turn(job, job.step)


class WalkJob:
    """A send request's folders walked a slice per turn of the loop (others
    are served meanwhile); then the peer is resolved and offered the batch."""

    def __init__(self, services: Services, client: ClientConn, walk: Walk, peer: str) -> None:
        self.services, self.client, self.walk, self.peer = services, client, walk, peer
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
        client, walk, services = self.client, self.walk, self.services
        client.job = None
        for path in walk.skipped:
            client.reply({"event": "skipped", "path": path,
                          "reason": "not a regular file or folder (links are never followed)"})
        unshown = walk.skipped_count - len(walk.skipped)
        if unshown:
            client.reply({"event": "skipped", "path": "", "reason": f"and {unshown} more not shown"})
        entries = walk.entries
        first = proto.Offer(services.config.host_name, len(entries), entries.total)
        services.discovery.resolve(self.peer, lambda address: open_peer(services, client, address, first, entries),
                                   client.fail)

    def cancel(self, code: str, message: str) -> None:
        self.answered = True  # the client is gone: nothing to tell
        self.close()

    def on_internal_error(self) -> None:
        self.close()

    def close(self) -> None:
        """End the walk; a client still waiting (after an internal error) is told."""
        self.closed = True
        self.services.loop.done(self)
        if not self.answered:
            self.answered = True
            self.client.fail("internal-error", "internal error while walking the files; see the daemon log")


def open_peer(services: Services, client: ClientConn, address: str, first: Any,
              entries: Optional[Entries] = None) -> None:
    if client.closed:
        return
    connections = services.peers.registry.connections
    if len(connections) >= services.config.max_connections:
        client.fail("busy", f"{len(connections)} connections open (MAX_CONNECTIONS)")
        return
    try:
        conn = OutboundPeer(services.peers, address, first, client, entries)
    except OSError as exc:  # no socket to be had (EMFILE): say so, not a traceback
        client.fail("io-error", f"cannot open a connection: {exc.strerror}")
        return
    if conn.id:
        client.reply({"event": "started", "id": conn.id, "peer": address, "files": len(conn.entries),
                      "bytes": conn.total})
    conn.connect(services.config.receive_port)


def cmd_transfers(services: Services, client: ClientConn, args: Dict[str, Any]) -> None:
    client.finish({"transfers": [conn.describe() for conn in services.transfers.values()]})


def transfer_by_id(services: Services, transfer_id: str) -> Transfer:
    conn = services.transfers.get(transfer_id)
    if conn is None:
        raise proto.LocalProtocolError("no-such-transfer", f"no open transfer {transfer_id!r}")
    return conn


def cmd_cancel(services: Services, client: ClientConn, args: Dict[str, Any]) -> None:
    transfer_by_id(services, args["id"]).fail("cancelled", f"cancelled on {services.config.host_name}")
    client.finish({"id": args["id"]})


def cmd_decide(accepted: bool) -> Handler:
    def handler(services: Services, client: ClientConn, args: Dict[str, Any]) -> None:
        conn = transfer_by_id(services, args["id"])
        if not isinstance(conn, (InboundPeer, LsReceive)) or not conn.awaiting_decision:
            raise proto.LocalProtocolError("not-waiting", f"transfer {args['id']} is not waiting for a decision")
        conn.decide(accepted)
        client.finish({"id": args["id"]})

    return handler


COMMANDS: Dict[str, Handler] = {
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


def dispatcher(services: Services) -> Callable[[ClientConn, api.Request], None]:
    """What a ClientConn calls with each request."""
    return lambda client, request: COMMANDS[request.cmd](services, client, request.args)
