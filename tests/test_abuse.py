"""Peers and local clients that break the rules on purpose: consent bypass,
peers that never read, unsolicited announces, trickled handshakes, oversized
reasons, requests that overlap, NUL bytes for hooks."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time

import crafted
from conftest import read_answers, wait_until

from tnet import protocol as p

PORT = 0xC00D


class RawPeer:
    """A hand-driven peer: raw bytes out, the daemon's frames decoded in."""

    def __init__(self, daemon) -> None:
        self.sock = socket.create_connection((daemon.address, PORT), timeout=30)
        self.decoder = crafted.Decoder()

    def __enter__(self) -> "RawPeer":
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def until(self, kind: type) -> list:
        """Frames up to and including the first of ``kind``."""
        events: list = []
        while not any(isinstance(e, kind) for e in events):
            data = self.sock.recv(65536)
            assert data, f"closed before {kind.__name__}: {events}"
            events += self.decoder.feed(data)
        return events

    def rest(self) -> list:
        """Everything the daemon says until it closes."""
        events: list = []
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return events
            if not data:
                return events
            events += self.decoder.feed(data)


def test_files_sent_before_an_ask_mode_receiver_accepts_are_refused(net):
    b = net.daemon("bravo", ACCEPT="ask")
    with RawPeer(b) as peer:
        peer.sock.sendall(p.PREFACE + p.encode_frame(p.Offer("mallory", 1, 5))
                     + p.encode_frame(p.FileHeader(0, ("planted.txt",), 5)) + b"hello"
                     + p.encode_frame(p.FileEnd(p.check_sha256(
                         "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"))))
        events = peer.rest()
    assert p.Error in [type(e) for e in events]
    assert [e for e in events if isinstance(e, p.Error)][0].code == "unexpected-frame"
    assert not b.downloads.exists() or os.listdir(b.downloads) == []
    assert b.temp_files() == []


def test_a_peer_that_never_reads_its_answers_is_not_read_either(net):
    b = net.daemon("bravo")
    parts = ["d" * 200] * 4
    entries = 60_000
    with RawPeer(b) as peer:
        sock = peer.sock
        sock.sendall(p.PREFACE + p.encode_frame(p.Offer("mallory", entries, 0)))
        assert peer.until(p.Accept)[-1] == p.Accept("bravo")
        sock.setblocking(False)
        pushed = 0
        index = 0
        pending = b""
        while index < entries:
            if not pending:
                pending = p.encode_frame(p.FileHeader(index, tuple(parts), 0)) + p.encode_frame(p.FileEnd("0" * 64))
                index += 1
            _, writable, _ = select.select([], [sock], [], 2.0)
            if not writable:
                break  # the daemon stopped reading us: what we wanted to see
            try:
                sent = sock.send(pending)
            except BlockingIOError:
                continue
            pushed += sent
            pending = pending[sent:]
        assert index < entries, "the daemon read everything a non-reading peer sent"
        assert pushed < 40 * 1024 * 1024
        status = b.request("status")[-1]
        assert status["ok"]


def test_unsolicited_announces_do_not_teach_peer_names(net):
    b = net.daemon("bravo")
    for _ in range(5):
        with RawPeer(b) as peer:
            peer.sock.sendall(p.PREFACE + p.encode_frame(p.Announce("impostor", "0" * 32)))
            peer.rest()
    assert b.request("status")[-1]["peers"] == 0
    out = b.cli("message", "impostor", "hi")
    assert out.returncode == 4 and "unknown-peer" in out.stderr


def test_a_trickled_handshake_is_held_to_the_handshake_timeout(net):
    b = net.daemon("bravo", HANDSHAKE_TIMEOUT="1")
    with RawPeer(b) as peer:
        sock = peer.sock
        assert sock.recv(len(p.PREFACE)) == p.PREFACE  # the daemon's comes at once
        closed = False
        opening = p.PREFACE + p.encode_frame(p.Offer("mallory", 1, 1))
        for byte in opening[:30]:  # one valid byte every 0.3 s: 9 s if never cut
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            readable, _, _ = select.select([sock], [], [], 0.3)  # the attacker's pace
            if readable and not sock.recv(65536):
                closed = True
                break
        assert closed, "the daemon kept a connection that never opened its exchange"


def test_long_failure_reasons_are_clipped_not_fatal(net):
    b = net.daemon("bravo")
    parts = tuple(["x" * 200] * 6)
    with RawPeer(b) as peer:
        peer.sock.sendall(p.PREFACE + p.encode_frame(p.Offer("mallory", 1, 1)))
        peer.until(p.Accept)
        peer.sock.sendall(p.encode_frame(p.FileHeader(0, parts, 1)) + b"x" + p.encode_frame(p.FileEnd("0" * 64)))
        failed = peer.until(p.Failed)[-1]
    assert failed.code == "verify-failed" and len(failed.message.encode()) <= p.MAX_ERROR_TEXT_BYTES
    assert "internal error" not in b.log()


def test_a_folder_too_deep_to_send_is_a_local_file_error(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    deep = tmp_path / "deep"
    path = deep
    for _ in range(p.MAX_PATH_PARTS - 1):
        path = path / "d"
    path.mkdir(parents=True)
    (path / "leaf.txt").write_text("x")  # its path has MAX_PATH_PARTS + 1 parts
    out = a.cli("send", b.address, str(deep))
    assert out.returncode == 6 and "deeper than" in out.stderr
    (path / "leaf.txt").unlink()
    assert a.cli("send", b.address, str(deep)).returncode == 0  # exactly MAX_PATH_PARTS: fine
    assert "internal error" not in a.log()


def test_a_small_file_shorter_than_its_size_is_file_changed(net):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    fake = "/sys/class/net/lo/address"  # stat says 4096 bytes; it holds 18
    if not os.path.exists(fake):
        import pytest
        pytest.skip("no sysfs")
    out = a.cli("send", b.address, fake)
    assert out.returncode == 7 and "file-changed" in out.stderr, out.stderr
    assert "internal error" not in a.log()
    assert not b.downloads.exists() or os.listdir(b.downloads) == []


def test_an_overlapping_request_is_refused_without_harming_the_first(net):
    a = net.daemon("alpha")
    with a.command_connection() as sock:
        sock.sendall(b'{"cmd":"discover","timeout":0.5}\n{"cmd":"status"}\n')
        first = read_answers(sock)
        assert first[-1] == {"ok": False, "code": "busy", "error": "one request at a time on a connection"}
        second = read_answers(sock)
        assert second[-1]["ok"] is True and second[-1]["peers"] == []
        sock.sendall(b'{"cmd":"status"}\n')  # and the connection serves the next one
        assert read_answers(sock)[-1]["host_name"] == "alpha"


def test_watch_exec_survives_a_nul_in_a_message(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    got = tmp_path / "got.txt"
    hook = f'{sys.executable} -c "import os; open({str(got)!r}, \'a\').write(os.environ[\'TNET_TEXT\'] + chr(10))"'
    with b.watching("--exec", hook, stdout=subprocess.DEVNULL) as watch:
        assert a.request("message", peer=b.address, text="hi\x00there")[-1]["ok"]
        assert a.cli("message", b.address, "second").returncode == 0
        wait_until(lambda: got.exists() and got.read_text().count("\n") == 2, what="both hooks")
        assert got.read_text() == "hi\\0there\nsecond\n"
        assert watch.poll() is None


def test_discovery_is_answered_over_tcp_never_udp(net):
    b = net.daemon("bravo")
    request = p.encode_discovery(p.DiscoveryRequest("x", "1" * 32, PORT))
    # A loopback requester is on a connected network: answered over TCP.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    requester = b.address.rsplit(".", 1)[0] + ".251"
    listener.bind((requester, PORT))
    listener.listen(4)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((requester, 0))
        udp.sendto(request, (b.address, net.broadcast_port))
        listener.settimeout(20)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(20)
            answer = b""
            deadline = time.monotonic() + 20
            while b'"announce"' not in answer and time.monotonic() < deadline:
                answer += conn.recv(4096)
        assert b'"name":"bravo"' in answer
        # ... and nothing ever comes back over UDP.
        assert select.select([udp], [], [], 0)[0] == []
    listener.close()
