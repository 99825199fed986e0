"""Deadlines on an injected clock: the parts of the daemon run in this
process over socket pairs, and time moves only when the test says so. No
subprocess, no sleep: handshake, idle (and the trickle that does not beat
it), the lingering close after an error frame, the ask timeout, the
discovery window, the half-closed client probe."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any, List

import pytest

from tnet import protocol as proto
from tnet.clients import HALF_CLOSED_PROBE_S, ClientConn
from tnet.discovery import Discovery
from tnet.inbound import InboundPeer
from tnet.loop import Loop
from tnet.peers import LINGER_S, MIN_PROGRESS_BYTES, PeerContext
from tnet.store import Store
from tnet.util import load_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A loop on a fake clock, a store in tmp_path, and the context a peer is handed."""

    def __init__(self, tmp_path, **env: str) -> None:
        self.clock = Clock()
        self.loop = Loop(self.clock)
        self.config = load_config(dict({"FILE_SAVE_DIR": str(tmp_path / "save"), "TEMP_DIR": str(tmp_path / "tmp"),
                                         "HOST_NAME": "bravo"}, **env))
        self.store = Store(self.config.save_dir, self.config.temp_dir, "f" * 32)
        self.store.open(time.time())
        self.published: List[dict] = []
        self.learnt: List[tuple] = []
        ids = iter(range(1, 1000))
        self.ctx = PeerContext(loop=self.loop, config=self.config, store=self.store, publish=self.published.append,
                               learn=lambda *args: self.learnt.append(args), new_transfer_id=lambda: str(next(ids)))

    def inbound(self) -> "tuple[InboundPeer, socket.socket]":
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.settimeout(5)
        conn = InboundPeer(self.ctx, ours, "10.0.0.9")
        conn.watch()
        conn.start()
        return conn, theirs

    def turn(self, seconds: float = 0.0) -> None:
        """Move the clock, then one turn of the loop that does not wait."""
        self.clock.now += seconds
        self.loop.run_once(at_most=0)

    def close(self) -> None:
        self.store.close()
        self.loop.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def read_events(sock: socket.socket) -> List[Any]:
    """What the daemon sent on ``sock`` until it closed its writing side."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    reader = proto.FrameReader()
    return [proto.event_of(item) for item in reader.items(data) if not isinstance(item, proto.FileData)]


def test_the_handshake_deadline_holds_however_the_peer_trickles(rig):
    conn, peer = rig.inbound()
    timeout = rig.config.handshake_timeout
    for byte in proto.PREFACE:  # a byte now and then: not a whole first frame
        peer.send(bytes([byte]))
        rig.turn(timeout / 10)
    assert not conn.closed
    rig.turn(timeout)
    assert conn.closed and conn.result is not None and conn.result[0] == "timeout"
    assert "did not open its exchange" in conn.result[1]


def offered(rig: Rig, size: int = MIN_PROGRESS_BYTES * 10) -> "tuple[InboundPeer, socket.socket]":
    conn, peer = rig.inbound()
    peer.sendall(proto.PREFACE + proto.encode_frame(proto.Offer("alpha", 1, size)))
    rig.turn()  # accepted: entries may come
    peer.sendall(proto.encode_frame(proto.FileHeader(0, ("f.bin",), size)))
    rig.turn()
    assert conn.exchange.state is proto.State.FILE_DATA
    return conn, peer


def test_a_peer_that_moves_enough_stays_and_a_trickle_is_dropped(rig):
    conn, peer = offered(rig)
    idle = rig.config.idle_timeout
    for _ in range(3):  # MIN_PROGRESS_BYTES per IDLE_TIMEOUT: alive
        peer.sendall(bytes(MIN_PROGRESS_BYTES))
        rig.turn(idle * 0.9)
    assert not conn.closed
    for _ in range(20):  # a byte now and then: not enough
        if conn.closed:
            break
        peer.sendall(b"\0")
        rig.turn(idle / 10)
    assert conn.closed and conn.result is not None and conn.result[0] == "timeout"
    assert f"less than {MIN_PROGRESS_BYTES} bytes" in conn.result[1]
    assert rig.store.work is not None and [n for n in os.listdir(rig.store.work.fd) if n.endswith(".part")] == []


def test_after_an_error_frame_the_connection_lingers_then_closes(rig):
    conn, peer = offered(rig)
    conn.fail("cancelled", "by the test")
    assert conn.lingering and not conn.closed
    assert read_events(peer)[-1] == proto.Error("cancelled", "by the test")  # sent, and the write side shut
    rig.turn(LINGER_S * 0.9)
    assert not conn.closed  # the peer has not closed: still waiting for it
    rig.turn(LINGER_S * 0.2)
    assert conn.closed


def test_an_offer_nobody_answers_is_declined_after_ask_timeout(tmp_path):
    rig = Rig(tmp_path, ACCEPT="ask", ASK_TIMEOUT="120")
    try:
        conn, peer = rig.inbound()
        peer.sendall(proto.PREFACE + proto.encode_frame(proto.Offer("alpha", 1, 1)))
        rig.turn()
        assert conn.awaiting_decision and rig.published[-1]["event"] == "offer"
        rig.turn(119)
        assert conn.awaiting_decision  # well past IDLE_TIMEOUT: asking is not idling
        rig.turn(2)
        events = read_events(peer)
        assert events[0] == proto.Wait(120)
        assert events[-1].code == "declined" and "120 s" in events[-1].message
    finally:
        rig.close()


def test_a_discovery_window_closes_at_its_deadline_with_what_it_found(rig):
    found: List[dict] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))  # the broadcast goes to loopback, to a port of ours
        config = load_config({"BIND_ADDRESS": "127.0.0.1", "BROADCAST_ADDRESS": "127.0.0.1",
                              "BROADCAST_PORT": str(sink.getsockname()[1]), "HOST_NAME": "alpha"})
        discovery = Discovery(rig.loop, config, lambda: "a" * 32, lambda host, request: None, lambda: 0)
        discovery.port = 0xC00D
        discovery.discover(1.5, found.append)
        assert proto.decode_datagram(sink.recv(512)).nonce == "a" * 32
        discovery.learn("bravo", "10.0.0.2", "a" * 32)
        discovery.learn("mallory", "10.0.0.3", "b" * 32)  # answers no discovery of ours: ignored
        rig.turn(1.4)
        assert found == []
        rig.turn(0.2)
        assert [{r.name: r.address for r in f.values()} for f in found] == [{"bravo": "10.0.0.2"}]
        assert discovery.windows == {} and list(discovery.directory.records) == ["10.0.0.2"]


def test_a_busy_client_that_half_closed_is_probed_until_it_is_gone(rig):
    requests: List[Any] = []
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client = ClientConn(rig.loop, ours, lambda conn, request: requests.append(request))
    client.watch()
    theirs.sendall(b'{"cmd":"status"}\n')
    theirs.shutdown(socket.SHUT_WR)  # as socat does at the end of its input
    rig.turn()
    rig.turn()
    assert requests and client.busy and not client.closed
    rig.turn(HALF_CLOSED_PROBE_S)
    assert not client.closed  # still there to read its answer
    theirs.close()
    rig.turn(HALF_CLOSED_PROBE_S)
    assert client.closed


def test_a_whole_file_over_a_socket_pair_is_placed(rig):
    data = b"hello" * 1000
    conn, peer = rig.inbound()
    peer.sendall(proto.PREFACE + proto.encode_frame(proto.Offer("alpha", 1, len(data))))
    rig.turn()
    peer.sendall(proto.encode_frame(proto.FileHeader(0, ("f.txt",), len(data))) + data
                 + proto.encode_frame(proto.FileEnd(hashlib.sha256(data).hexdigest())))
    rig.turn()
    peer.shutdown(socket.SHUT_WR)
    rig.turn()
    with open(os.path.join(rig.store.save.path, "f.txt"), "rb") as saved:
        assert saved.read() == data
    assert [e["event"] for e in rig.published] == ["transfer-started", "file-done", "transfer-done"]
    assert conn.closed
