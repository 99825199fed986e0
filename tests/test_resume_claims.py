"""Resume (§7) when what it rests on is not what it claims: a keep folder
another user made, a batch record naming folders outside, an attempt that
arrives before the receiver saw the last one break, a partial that is
already whole, an earlier attempt's failed file."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import List

import crafted
from conftest import next_address, random_file, wait_until
from test_resume import V2, keep_folder, kept, send_partial

from tnet import protocol as proto
from tnet.keep import batch_key

MiB = 1024 * 1024
NOBODY = 65534


def test_a_keep_folder_that_is_not_ours_alone_is_not_used(net, tmp_path):
    a = net.daemon("alpha")
    b = net.daemon("bravo", start=False)
    planted = keep_folder(b)
    planted.mkdir()
    os.chmod(planted, 0o777)  # anyone could add a link or a record here
    if os.geteuid() == 0:
        os.chown(planted, NOBODY, NOBODY)
    b.start()
    assert "cannot keep partial files for resume" in b.log()
    f = random_file(tmp_path / "f.bin", 2 * MiB, seed=1)
    send_partial(b, "alpha", f, MiB)
    wait_until(lambda: "peer-gone" in b.log() or "truncated" in b.log(), what="the cut seen")
    assert os.listdir(planted) == [] and kept(b) == []
    final = json.loads(a.cli("send", "--json", b.address, str(f)).stdout.splitlines()[-1])
    assert final["ok"] and final["resumed_bytes"] == 0
    assert (b.downloads / "f.bin").read_bytes() == f.read_bytes()


def offer_batch(address: str, batch: str, path: List[str], data: bytes) -> None:
    wire = crafted.connect(address)
    wire.send(V2 + crafted.frame({"type": "offer", "name": "mallory", "entries": 1, "size": len(data),
                                  "batch": batch}))
    wire.wait_for(proto.Accept)
    wire.send(crafted.file_header(0, path, len(data)) + data + crafted.end(data))
    wire.wait_for(proto.Done)
    wire.close()


def test_a_batch_record_naming_a_folder_outside_is_not_followed(net, tmp_path):
    b = net.daemon("bravo")
    outside = tmp_path / "victim"
    outside.mkdir()
    for n, top in enumerate(("..", str(outside), "a/b", "")):
        batch = f"{n:02d}" * 16
        record = {"v": 1, "sender": "mallory", "tops": {"x": top}, "saved": {"x/f": [str(outside), 1, "0" * 64]},
                  "time": time.time()}
        (keep_folder(b) / (batch_key("mallory", batch) + ".json")).write_text(json.dumps(record))
        offer_batch(b.address, batch, ["x", f"evil{n}.txt"], b"outside")
    assert os.listdir(outside) == [] and not (b.downloads.parent / "evil0.txt").exists()
    landed = sorted(p.relative_to(b.downloads).as_posix() for p in b.downloads.rglob("*.txt"))
    assert landed == ["x (1)/evil1.txt", "x (2)/evil2.txt", "x (3)/evil3.txt", "x/evil0.txt"]


class StallingProxy:
    """address -> target on the data port; the first connection passes
    ``budget`` bytes each way, then stalls with both ends open: a link that
    broke without a word, as a pulled cable does."""

    def __init__(self, address: str, target: str, budget: int) -> None:
        self.target, self.budget = target, budget
        self.listener = socket.socket()
        self.listener.bind((address, 0xC00D))
        self.listener.listen(8)
        self.address = address
        self.socks: List[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        first = True
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            far = socket.create_connection((self.target, 0xC00D))
            self.socks += [near, far]
            limit = self.budget if first else 1 << 62
            first = False
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self.pump, args=(src, dst, limit), daemon=True).start()

    def pump(self, src: socket.socket, dst: socket.socket, limit: int) -> None:
        moved = 0
        while moved < limit:
            try:
                data = src.recv(min(65536, limit - moved))
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return
            moved += len(data)
        self.stop.wait()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for s in self.socks:
            s.close()


def test_an_attempt_arriving_before_the_receiver_saw_the_last_break_resumes_it(net, tmp_path):
    a = net.daemon("alpha", IDLE_TIMEOUT="2")
    b = net.daemon("bravo", IDLE_TIMEOUT="600")  # it would hold the dead link long after the retry
    folder = tmp_path / "d"
    folder.mkdir()
    random_file(folder / "a-one.bin", 2 * MiB, seed=1)
    random_file(folder / "b-two.bin", 16 * MiB, seed=2)
    proxy = StallingProxy(next_address(), b.address, 6 * MiB)
    try:
        out = a.cli("send", "--json", proxy.address, str(folder), timeout=120)
    finally:
        proxy.close()
    assert out.returncode == 0, out.stderr
    final = json.loads(out.stdout.splitlines()[-1])
    assert final["attempts"] == 2 and final["resumed_bytes"] > 3 * MiB  # a-one, and what came of b-two
    assert sorted(os.listdir(b.downloads)) == ["d"]  # the folder made once, not "d (1)"
    assert sorted(os.listdir(b.downloads / "d")) == ["a-one.bin", "b-two.bin"]
    assert (b.downloads / "d" / "b-two.bin").read_bytes() == (folder / "b-two.bin").read_bytes()
    assert "a newer attempt of the same batch replaced this one" in b.log()
    assert kept(b) == []


def test_a_partial_holding_every_byte_is_resumed_at_its_end(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    f = random_file(tmp_path / "f.bin", 2 * MiB, seed=3)
    send_partial(b, "alpha", f, 2 * MiB)  # every byte, then the link goes before the file's end
    wait_until(lambda: [k for k in kept(b) if k["kept"] == 2 * MiB], what="the whole file kept")
    out = a.cli("send", "--json", b.address, str(f))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["resumed_bytes"] == 2 * MiB
    assert (b.downloads / "f.bin").read_bytes() == f.read_bytes()


def test_a_file_an_earlier_attempt_failed_fails_the_send(net, tmp_path):
    a = net.daemon("alpha")
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "one.txt").write_bytes(b"1" * 100)
    (folder / "two.txt").write_bytes(b"2" * 200)
    (folder / "zzz.txt").write_bytes(b"3" * 300)
    with crafted.sending(a, next_address(), str(folder), "--json") as (receiver, cli):
        wire, offer = receiver.take_offer()
        assert offer.entries == 4  # the folder and its three files
        while sum(isinstance(e, proto.FileEnd) for e in wire.events) < 3:
            assert wire.pump()
        wire.send(crafted.frame({"type": "done", "index": 0}) + crafted.frame({"type": "done", "index": 1}) +
                  crafted.frame({"type": "failed", "index": 2, "code": "save-failed", "message": "disk says no"}))
        wire.close()  # the link breaks before the last entry is answered
        again, offer = receiver.take_offer()
        assert offer.entries == 1
        again.wait_for(proto.FileEnd)
        again.send(crafted.frame({"type": "done", "index": 0}))
        stdout, stderr = cli.communicate(timeout=60)
    final = json.loads(stdout.splitlines()[-1])
    assert cli.returncode != 0 and final["ok"] is False and final["code"] == "save-failed", final
    assert "1 of 4 failed" in final["error"] and "disk says no" in final["error"]
    assert final["resumed_bytes"] == 100  # the file saved before the break; not the one that failed


def test_an_answer_read_together_with_the_peers_error_gets_no_reply(net, tmp_path):
    a = net.daemon("alpha")
    f = random_file(tmp_path / "f.bin", MiB, seed=4)
    with crafted.sending(a, next_address(), str(f), "--no-retry") as (receiver, cli):
        wire, _ = receiver.take_offer()
        wire.wait_for(proto.FileHeader)
        # Both in one write: the resume asks for bytes, the error ends the exchange before they could go.
        wire.send(crafted.resume(0, 0, b"") + crafted.frame({"type": "error", "code": "shutdown",
                                                             "message": "going down"}))
        _, stderr = cli.communicate(timeout=60)
    assert cli.returncode != 0 and "shutdown" in stderr and "going down" in stderr, stderr
    assert "internal" not in stderr and "Traceback" not in a.log()
