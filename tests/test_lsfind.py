"""lsfind.py without a daemon: the device list, the announcements after start on
an injected clock, whom we answer and how often, datagrams in on a loopback
UDP socket (nothing multicast is sent here)."""

from __future__ import annotations

import socket
from typing import List, Tuple

import pytest

from tnet import localsend as ls
from tnet import lsfind
from tnet.httpconn import Buffers
from tnet.loop import Loop
from tnet.util import Config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def device(alias: str, fingerprint: str, **extra) -> ls.DeviceInfo:
    return ls.DeviceInfo(alias=alias, fingerprint=fingerprint, **extra)


def test_devices_one_per_fingerprint_latest_address_bounded(monkeypatch):
    monkeypatch.setattr(lsfind, "MAX_DEVICES", 3)
    devices = lsfind.Devices()
    devices.learn(device("a", "A", port=1000, protocol="http"), "10.0.0.1", 1.0)
    devices.learn(device("a2", "A", port=None, protocol=None), "10.0.0.9", 2.0)  # a register answer: no port
    assert [(d.alias, d.address, d.port, d.protocol) for d in devices.all()] == [("a2", "10.0.0.9", 1000, "http")]
    for n, name in enumerate("bcd"):
        devices.learn(device(name, name.upper()), f"10.0.0.{n + 2}", 3.0 + n)
    assert [d.alias for d in devices.all()] == ["b", "c", "d"]  # the oldest sighting went first
    assert [d.alias for d in devices.since(4.0)] == ["c", "d"]
    assert devices.all()[0].as_peer()["kind"] == "localsend"


def test_announcements_come_at_100_500_and_2000_ms_on_the_loop():
    clock = Clock()
    loop = Loop(clock)
    said: List[float] = []
    announcer = lsfind.Announcer(loop, lambda: said.append(clock.now))
    announcer.start(lsfind.ANNOUNCE_DELAYS_S)
    for step in range(30):
        clock.now = 1000.0 + step * 0.1
        loop.run_once(at_most=0)
    assert [round(t - 1000.0, 1) for t in said] == [0.1, 0.5, 2.0]
    loop.close()


@pytest.mark.parametrize("bind, host, answered", [
    ("127.0.0.5", "127.0.0.9", True), ("127.0.0.5", "10.99.0.1", False), ("0.0.0.0", "224.0.0.167", False),
    ("0.0.0.0", "0.0.0.0", False), ("0.0.0.0", "203.0.113.7", False),  # not a network we are on
])
def test_whom_we_answer(bind, host, answered):
    finder = lsfind.Finder(Loop(Clock()), Config(bind_address=bind, host_name="t"), device("me", "ME"),
                           Buffers(), None)
    assert finder.in_scope(host) is answered


def test_answers_are_bounded_per_announcer_and_in_all(monkeypatch):
    clock = Clock()
    finder = lsfind.Finder(Loop(clock), Config(bind_address="127.0.0.5", host_name="t"), device("me", "ME"),
                           Buffers(), None)
    assert [finder.may_answer("127.0.0.9") for _ in range(4)] == [True, True, False, False]
    assert sum(finder.may_answer(f"127.0.1.{n}") for n in range(100)) == lsfind.MAX_ANSWERS_PER_WINDOW_ALL - 2
    clock.now += lsfind.ANSWER_WINDOW_S
    assert finder.may_answer("127.0.0.9")


def test_datagrams_teach_devices_and_announcements_are_answered(monkeypatch):
    clock = Clock()
    finder = lsfind.Finder(Loop(clock), Config(bind_address="127.0.0.1", host_name="t"), device("me", "ME"),
                           Buffers(), None)
    answered: List[Tuple[str, str]] = []
    monkeypatch.setattr(finder, "register_with", lambda info, host: answered.append((info.alias, host)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        target = udp.getsockname()
        for datagram in (ls.encode_announce(device("phone", "P", port=53317), True),
                         ls.encode_announce(device("tablet", "T", port=53318, protocol="http"), False),
                         ls.encode_announce(device("me", "ME"), True),  # our own, heard back
                         b"{not json", b"\x00" * 5000,
                         b'{"alias":"old","version":"1.0","fingerprint":"O","port":1,"protocol":"http"}'):
            out.sendto(datagram, target)
        finder.on_datagrams(udp)
    assert answered == [("phone", "127.0.0.1")]  # announce:false asks for no answer
    listed = {(d.alias, d.port, d.protocol) for d in finder.devices.all()}
    assert listed == {("phone", 53317, "https"), ("tablet", 53318, "http")}
