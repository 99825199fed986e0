"""What keeps transfers fast, checked by what it does rather than by a clock
(speed itself is measured in bench/): small files are pipelined, never one
round trip each, a large file streams through constant memory, and a file
sent to several peers at once is hashed once."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys

import crafted
import pytest
from conftest import next_address

from tnet import outbound
from tnet import protocol as proto
from tnet.walk import Entries

MiB = 1024 * 1024


def test_small_files_stream_without_waiting_for_an_answer_each(net, tmp_path):
    """A crafted receiver answers nothing until every file is in: a sender
    that waited for a `done` per file would stall after the first one."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        (folder / f"f{i:03d}.txt").write_bytes(b"%d\n" % i * 100)
    address = next_address()
    receiver = crafted.Receiver(address)
    a = net.daemon("alpha")
    send = subprocess.Popen(a.cli_args("send", "--json", address, str(folder)), env=a.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wire, offer = receiver.take_offer()
        assert offer.entries == 301  # the folder and its files
        ends = [wire.wait_for(proto.FileEnd) for _ in range(300)]  # not a byte sent back yet
        assert len(ends) == 300
        # Answers by index, in any order (§4.1): last first here.
        wire.send(b"".join(proto.encode_frame(proto.Done(i)) for i in reversed(range(offer.entries))))
        out, err = send.communicate(timeout=60)
        assert send.returncode == 0, err
        assert out.count('"event":"file-done"') == 301
        wire.close()
    finally:
        if send.poll() is None:
            send.kill()
        receiver.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")
def test_a_file_larger_than_any_buffer_streams_in_constant_memory(net, tmp_path):
    size = 256 * MiB  # several times a daemon's whole footprint: held in memory, it would show
    a, b = net.daemon("alpha"), net.daemon("bravo")
    f = tmp_path / "big.bin"
    with open(f, "wb") as out:
        out.truncate(size)  # sparse: cheap to make, as costly as any other file to send
    assert a.cli("send", b.address, str(f)).returncode == 0
    assert (b.downloads / "big.bin").stat().st_size == size
    for daemon in (a, b):
        rss = daemon.peak_rss()
        assert rss < 64 * MiB, f"{daemon.name}: peak RSS {rss / MiB:.1f} MiB for a {size // MiB} MiB file"


class CountingSha256:
    """hashlib.sha256 that counts what it was given, over every instance."""

    hashed = 0

    def __init__(self, data: bytes = b"") -> None:
        self.inner = hashlib.sha256(data)
        CountingSha256.hashed += len(data)

    def update(self, data) -> None:
        CountingSha256.hashed += len(data)
        self.inner.update(data)

    def digest(self) -> bytes:
        return self.inner.digest()

    def hexdigest(self) -> str:
        return self.inner.hexdigest()


class OneFileSend:
    """A FileSender of one file over a socketpair, the far end drained by hand."""

    def __init__(self, path, hashes, sendfile: bool) -> None:
        entries = Entries()
        entries.add(path.name, -1, path.stat().st_size, str(path))
        exchange = proto.Exchange(proto.Role.INITIATOR, version=1)
        exchange.send_preface()
        exchange.receive_data(b"TNET\x01")
        exchange.send(proto.Offer("alpha", 1, entries.total))
        exchange.receive_data(proto.encode_frame(proto.Accept("bravo")))
        self.sender = outbound.FileSender(entries, exchange, memoryview(bytearray(65536)), hashes=hashes)
        self.sender.use_sendfile = sendfile
        self.near, self.far = socket.socketpair()
        self.near.setblocking(False)
        self.out = bytearray()
        self.sender.start_entry(self.out)
        self.sha256 = ""

    def step(self) -> None:
        try:
            self.sender.send_piece(self.near, self.out)
        except BlockingIOError:
            pass
        while True:
            try:
                if not self.far.recv(1 << 20, socket.MSG_DONTWAIT):
                    break
            except BlockingIOError:
                break
        self.out.clear()
        if self.sender.sent == self.sender.size:
            self.sha256 = self.sender.finish_file(self.out)

    def close(self) -> None:
        self.sender.close_file()
        self.near.close()
        self.far.close()


@pytest.mark.parametrize("sendfile", [True, False])
def test_a_file_sent_to_several_peers_at_once_is_hashed_once(tmp_path, monkeypatch, sendfile):
    monkeypatch.setattr(outbound, "hashlib", type("H", (), {"sha256": CountingSha256}))
    monkeypatch.setattr(outbound, "SEND_CHUNK_BYTES", 128 * 1024)
    path = tmp_path / "f.bin"
    data = os.urandom(3 * MiB + 7)
    path.write_bytes(data)
    hashes: dict = {}
    sends = [OneFileSend(path, hashes, sendfile) for _ in range(2)]
    try:
        for _ in range(4):
            sends[0].step()  # the first is ahead: it hashes, the second only sends
        sends.append(OneFileSend(path, hashes, sendfile))  # one more, starting late
        leader = sends[0]
        while not all(s.sha256 for s in sends[1:]):
            for s in sends:
                if not s.sha256:
                    s.step()
            if leader in sends and leader.sender.sent > MiB:  # the leader goes (its peer dropped)
                leader.close()
                sends.remove(leader)
        assert leader not in sends and len(sends) == 2
        assert [s.sha256 for s in sends] == [hashlib.sha256(data).hexdigest()] * 2
        assert CountingSha256.hashed == len(data)  # one pass over the file for all three
        assert hashes == {}  # none left once every sender is done with the file
    finally:
        for s in sends:
            s.close()
        CountingSha256.hashed = 0


LOADED = """
import os, sys
from tnet import commands, daemon, util
d = daemon.Daemon(util.load_config(os.environ))
if os.environ["LOCALSEND"] == "0":
    d.start()
    commands.resolver(d.services)  # what a send or a message asks first
    d.stop()
print(" ".join(sorted(m for m in sys.modules if m == "ssl" or m.startswith("tnet."))))
"""
LOCALSEND_ONLY = {"ssl", "tnet.tls", "tnet.x509", "tnet.http", "tnet.httpconn", "tnet.localsend", "tnet.lsdoor",
                  "tnet.lsfind", "tnet.lsreceive", "tnet.lssend"}


@pytest.mark.parametrize("localsend", ["0", "1"])
def test_a_daemon_without_localsend_loads_neither_ssl_nor_its_modules(net, localsend):
    """Memory: ssl and the LocalSend modules are a tenth of a daemon's RSS."""
    d = net.daemon("lean", start=False, LOCALSEND=localsend)
    loaded = set(subprocess.run([sys.executable, "-c", LOADED], env=d.env, cwd=d.dir, capture_output=True,
                                text=True, check=True).stdout.split())
    assert "tnet.commands" in loaded
    if localsend == "0":
        assert not loaded & LOCALSEND_ONLY
    else:
        assert LOCALSEND_ONLY - {"tnet.lssend"} <= loaded
