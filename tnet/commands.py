"""What local clients may ask (§6.1): one handler per command, in ``COMMANDS``.

Each handler gets the ``Services`` (the parts of the daemon it may use), the
client and the request's checked arguments; it answers with
``client.finish``/``client.fail`` at once or later (a discovery window, a
transfer), and raises ``LocalProtocolError`` to refuse. A send is a
``sending.SendJob``: the walk, then its attempts; with LOCALSEND=1 an
``lssend.LsSendJob``, whose peer may be a LocalSend device (``lssend.Targets``
decides), as a message's may; those modules load only with LOCALSEND=1. The history (``recorder``) is shown the
answers of sends and messages.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from . import __version__, api
from . import protocol as proto
from .clients import ClientConn, Events
from .discovery import DEFAULT_DISCOVER_S, Discovery, Found, PeerRecord
from .loop import Loop
from .outbound import OutboundPeer
from .peers import PeerContext, Transfer
from .recorder import HistoryJob, Recorder
from .sending import DEFAULT_RETRY_FOR_S, FanOut, SendJob
from .store import Store
from .util import Config
from .walk import Walk

if TYPE_CHECKING:  # LOCALSEND=1's modules load only with it (daemon.localsend_door, lssend below)
    from .lsdoor import LocalSend
    from .lsfind import Device


@dataclass
class Services:
    """The parts of the daemon that commands use."""

    config: Config
    loop: Loop
    peers: PeerContext
    discovery: Discovery
    events: Events
    store: Store
    recorder: Recorder
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
        "kept": kept_partials(services),
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


Resolve = Callable[[str, Callable[[str], None], Callable[["Device"], None], Callable[[str, str], None]], None]


def resolver(services: Services) -> Resolve:
    """How a typed peer is found: ``resolve(peer, to_tnet, to_device, fail)``."""
    if services.localsend is None:
        return lambda peer, tnet, device, fail: services.discovery.resolve(peer, tnet, fail)
    from .lssend import Targets

    return Targets(services.discovery, services.localsend).resolve


def cmd_message(services: Services, client: ClientConn, args: Dict[str, Any]) -> None:
    first = proto.Message(services.config.host_name, args["text"])
    resolve = resolver(services)

    def message_to(peer: str, to: Any) -> Any:
        noted = Noted(to, services.recorder.outgoing_message(peer, args["text"]))

        def deliver(address: str) -> None:
            noted.note.address = address
            open_peer(services, noted, address, first)

        def to_device(device: Device) -> None:
            noted.note.address = device.address
            if not noted.closed and services.localsend is not None:
                from .lssend import LsMessage

                LsMessage(services.peers, services.localsend, device, args["text"], noted, args.get("pin")).start()

        resolve(peer, deliver, to_device, noted.fail)
        return noted

    to_targets(services, client, args, message_to)


class Noted:
    """A message's client that puts its final answer in the history too."""

    def __init__(self, client: Any, note: Any) -> None:
        self.client, self.note = client, note
        self.job: Any = None

    @property
    def closed(self) -> bool:
        return bool(self.client.closed)

    def cancel(self, code: str, message: str) -> None:
        """The client is gone: the message is cancelled, and recorded so."""
        self.note.on_answer({"ok": False, "code": code, "error": message})
        if self.job is not None and not self.job.closed:
            self.job.cancel(code, message)

    def reply(self, obj: Dict[str, Any]) -> None:
        self.client.reply(obj)

    def finish(self, obj: Dict[str, Any]) -> None:
        self.note.on_answer(dict(obj, ok=True))
        self.client.finish(obj)

    def fail(self, code: str, message: str, **extra: Any) -> None:
        self.note.on_answer(dict(extra, ok=False, code=code, error=message))
        self.client.fail(code, message, **extra)


def cmd_send(services: Services, client: ClientConn, args: Dict[str, Any]) -> None:
    retry_for = float(args.get("retry_for", DEFAULT_RETRY_FOR_S))
    localsend = services.localsend

    def send_to(peer: str, to: Any) -> SendJob:
        walk = Walk(args["paths"])
        if localsend is None:
            job = SendJob(services.peers, services.discovery, to, walk, peer, retry_for)
        else:  # the peer may be a LocalSend device
            from .lssend import LsSendJob, Targets

            targets = Targets(services.discovery, localsend)
            job = LsSendJob(services.peers, services.discovery, to, walk, peer, retry_for, targets, localsend,
                            args.get("pin"))
        services.loop.each_turn(job, job.step)
        return job

    to_targets(services, client, args, send_to)


def to_targets(services: Services, client: ClientConn, args: Dict[str, Any], start: Callable[[str, Any], Any]) -> None:
    """Start a job for the one peer asked, or a FanOut for several or all."""
    if "peer" in args:
        client.job = start(args["peer"], client)
        return
    fan = FanOut(client, start)
    client.job = fan
    if "peers" in args:
        fan.start(list(dict.fromkeys(args["peers"])))
        return

    started = services.loop.clock()
    if services.localsend is not None:
        services.localsend.announce()

    def found(peers: Found) -> None:
        if not client.closed:  # by address: names may be shared; a tnet daemon's LocalSend side is the daemon
            devices = services.localsend.devices(started) if services.localsend is not None else []
            fan.start(sorted(set(peers) | {d.address for d in devices}))

    services.discovery.discover(DEFAULT_DISCOVER_S, found)


def open_peer(services: Services, client: Any, address: str, first: Any) -> None:
    """A message to ``address``."""
    if client.closed:
        return
    connections = services.peers.registry.connections
    if len(connections) >= services.config.max_connections:
        client.fail("busy", f"{len(connections)} connections open (MAX_CONNECTIONS)")
        return
    try:
        conn = OutboundPeer(services.peers, address, first, client)
    except OSError as exc:  # no socket to be had (EMFILE): say so, not a traceback
        client.fail("io-error", f"cannot open a connection: {exc.strerror}")
        return
    conn.connect(services.config.receive_port)


def cmd_transfers(services: Services, client: ClientConn, args: Dict[str, Any]) -> None:
    client.finish({"transfers": [conn.describe() for conn in services.transfers.values()],
                   "kept": kept_partials(services)})


def kept_partials(services: Services) -> List[Dict[str, Any]]:
    keep = services.peers.keep
    return keep.listing() if keep is not None and keep.fd >= 0 else []


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
        conn: Any = transfer_by_id(services, args["id"])  # a tnet peer's or a LocalSend sender's (lsreceive)
        if not getattr(conn, "awaiting_decision", False):
            raise proto.LocalProtocolError("not-waiting", f"transfer {args['id']} is not waiting for a decision")
        conn.decide(accepted)
        client.finish({"id": args["id"]})

    return handler


def cmd_history(services: Services, client: ClientConn, args: Dict[str, Any]) -> None:
    HistoryJob(services.loop, client, services.recorder.history, args.get("limit"), args.get("peer")).start()


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
    "history": cmd_history,
}


def dispatcher(services: Services) -> Callable[[ClientConn, api.Request], None]:
    """What a ClientConn calls with each request."""

    def dispatch(client: ClientConn, request: api.Request) -> None:
        if request.cmd == "send":
            client.observer = services.recorder.on_send_line  # its file-done lines name the files sent
        COMMANDS[request.cmd](services, client, request.args)

    return dispatch
