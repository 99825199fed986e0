"""PEERS (issue 13): static peers asked by unicast at each discovery, and
answered from beyond the directly connected networks only when listed.
The real subnets and router are in tests/netns/test_subnets.py."""

from __future__ import annotations

import ipaddress
import json
import math
import socket

from conftest import free_udp_port

from tnet import protocol as proto
from tnet.discovery import Discovery
from tnet.loop import Loop
from tnet.util import load_config


def discovery(**env: str) -> Discovery:
    config = load_config(dict({"HOST_NAME": "alpha"}, **env))
    d = Discovery(Loop(lambda: 0.0), config, lambda: "a" * 32, lambda host, request: None, lambda: 0)
    d.networks = [ipaddress.IPv4Network("10.0.1.0/24"), ipaddress.IPv4Network("127.0.0.0/8")]
    d.networks_until = math.inf  # the machine's own interfaces play no part here
    return d


def test_only_directly_connected_requesters_are_answered_unless_listed():
    plain = discovery()
    assert plain.in_scope("10.0.1.9") and plain.in_scope("127.0.0.5")
    assert not plain.in_scope("10.0.2.7")  # another subnet
    listed = discovery(PEERS="10.0.2.7:4000")  # whatever its port, the address is listed
    assert listed.in_scope("10.0.2.7") and not listed.in_scope("10.0.2.8")
    allowed = discovery(ALLOW_FROM="10.0.2.0/24")
    assert allowed.in_scope("10.0.2.8") and not allowed.in_scope("10.0.3.1")
    for never in ("224.0.0.1", "0.0.0.0", "255.255.255.255"):
        assert not discovery(ALLOW_FROM="0.0.0.0/0").in_scope(never)
    on_loopback = discovery(BIND_ADDRESS="127.0.0.2", PEERS="10.0.2.7")
    assert not on_loopback.in_scope("10.0.2.7")  # a loopback daemon still answers only loopback


def test_a_discovery_goes_to_each_broadcast_address_and_each_peer():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as broadcast, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        broadcast.bind(("127.0.0.1", 0))
        peer.bind(("127.0.0.1", 0))
        for s in (broadcast, peer):
            s.settimeout(5)
        d = discovery(BIND_ADDRESS="127.0.0.1", BROADCAST_ADDRESS="127.0.0.1",
                      BROADCAST_PORT=str(broadcast.getsockname()[1]), PEERS=f"127.0.0.1:{peer.getsockname()[1]}")
        d.port = 0xC00D
        d.discover(1.0, lambda found: None)
        assert proto.decode_datagram(broadcast.recv(512)).nonce == "a" * 32
        assert proto.decode_datagram(peer.recv(512)) == proto.DiscoveryRequest("alpha", "a" * 32, 0xC00D)
        d.loop.close()


def test_a_peer_out_of_broadcast_reach_is_found_through_peers_and_reached_by_name(net, tmp_path):
    b_port = free_udp_port()  # bravo hears on another port: no broadcast of alpha's reaches it
    b = net.daemon("bravo", BROADCAST_PORT=str(b_port))
    lonely = net.daemon("lonely")
    out = lonely.cli("discover", "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == []
    a = net.daemon("alpha", PEERS=f"{b.address}:{b_port}")
    out = a.cli("discover", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted((p["name"], p["address"]) for p in json.loads(out.stdout)) == [
        ("bravo", b.address), ("lonely", lonely.address)]
    assert f"discovery also asks {b.address}:{b_port}" in a.log()
    f = tmp_path / "f.txt"
    f.write_text("by name")
    assert a.cli("send", "bravo", str(f)).returncode == 0
    assert (b.downloads / "f.txt").read_text() == "by name"
    assert a.cli("message", "bravo", "found you").returncode == 0


def test_a_host_name_in_peers_stops_the_daemon_with_a_clear_message(net):
    a = net.daemon("alpha", start=False, PEERS="nas.local")
    out = a.cli("daemon")
    assert out.returncode == 1 and "PEERS='nas.local'" in out.stderr and "host names are not looked up" in out.stderr
    assert "Traceback" not in out.stderr
