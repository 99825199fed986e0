"""A running daemon against a crafted peer (tests/crafted.py) on loopback:
garbage, hostile names, lying sizes, files that change while being sent,
discovery floods. Each case checks the reason the daemon gives (error frame,
events, log), that nothing is written where it must not be, and that the
daemon goes on serving."""

from __future__ import annotations

import filecmp
import json
import os
import random
import select
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import crafted
import pytest
from conftest import next_address, random_file, wait_until

from tnet import discovery as tnet_discovery
from tnet import protocol as proto

PRE = proto.PREFACE


def tree(root: Path) -> Dict[str, bytes]:
    """Every file and link under ``root`` (what a link points to, not through it)."""
    found: Dict[str, bytes] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                found[rel] = b"-> " + os.readlink(path).encode()
            elif os.path.isfile(path) and name not in ("daemon.log", "history.jsonl"):  # the daemon's own records
                with open(path, "rb") as f:
                    found[rel] = f.read()
    return found


def normal_transfer_works(sender, receiver, tmp_path: Path, name: str = "after.bin") -> None:
    f = random_file(tmp_path / name, 300 * 1024, seed=7)
    out = sender.cli("send", receiver.address, str(f))
    assert out.returncode == 0, out.stderr + receiver.log()
    assert filecmp.cmp(f, receiver.downloads / name, shallow=False)


def rng_bytes(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) for _ in range(size))


# --- 1. garbage on the TCP and UDP ports -----------------------------------------------

GARBAGE = [
    ("bad-magic", rng_bytes(1, 3000)),
    ("bad-magic", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("unsupported-version", proto.MAGIC + bytes([proto.VERSION + 1])),
    ("unsupported-version", proto.MAGIC + b"\x00"),
    ("frame-too-large", PRE + struct.pack(">I", 0xFFFFFFFF)),
    ("frame-too-large", PRE + struct.pack(">I", proto.MAX_FRAME_BYTES + 1)),
    ("bad-frame", PRE + struct.pack(">I", 0)),
    ("bad-json", PRE + struct.pack(">I", 5) + b'{"type":"offer"}'),  # length shorter than the JSON
    ("truncated", PRE + struct.pack(">I", 100) + b'{"type":'),  # longer than what comes, then EOF
    ("bad-json", PRE + struct.pack(">I", 2000) + rng_bytes(2, 2000)),
    ("unexpected-frame", PRE + crafted.frame({"type": "done", "index": 0})),
    ("bad-host-name", PRE + crafted.offer(1, 1, name="x" * (proto.MAX_HOST_NAME_BYTES + 1))),
]


def test_garbage_on_the_tcp_port_is_dropped_with_a_reason_and_service_goes_on(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    events = b.events()
    for code, data in GARBAGE:
        wire = crafted.connect(b.address)
        wire.send(data)
        wire.sock.shutdown(socket.SHUT_WR)
        assert wire.error().code == code, data[:40]
        wire.close()
        events.wait_for(lambda e, code=code: e["event"] == "error" and e["code"] == code,
                        what=f"an error event {code}")
        wait_until(lambda code=code: f": {code}: " in b.log(), what=f"{code} in the log")
    assert b.request("status")[-1]["ok"]
    assert b.temp_files() == [] and os.listdir(b.downloads) == []
    normal_transfer_works(a, b, tmp_path)


def test_random_datagrams_on_the_udp_port_are_dropped_with_a_reason(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    good = json.dumps({"type": "discover", "name": "x", "nonce": "0" * 32, "port": 1}, separators=(",", ":")).encode()
    datagrams = [
        ("bad-magic", rng_bytes(3, 100)),
        ("datagram-too-large", PRE + b" " * proto.MAX_DATAGRAM_BYTES),
        ("unsupported-version", proto.MAGIC + b"\x07" + good),
        ("bad-json", PRE + b"{nope"),
        ("bad-frame", PRE + good.replace(b'"port":1', b'"port":0')),
        ("bad-nonce", PRE + good.replace(b"0" * 32, b"0" * 31)),
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((next_address(), 0))
        for _, datagram in datagrams:
            udp.sendto(datagram, (b.address, net.broadcast_port))
        for code, _ in datagrams:
            wait_until(lambda code=code: f"dropped: {code}:" in b.log(), what=f"datagram {code} in the log")
        udp.setblocking(False)
        with pytest.raises(BlockingIOError):  # never an answer over UDP
            udp.recv(4096)
    assert b.request("status")[-1]["ok"]
    normal_transfer_works(a, b, tmp_path)


def test_header_limits_at_n_and_n_plus_one(net):
    """An offer frame of exactly MAX_HEADER_BYTES after the first frame is taken; one byte more is not.
    The first frame may be a message, so it gets MAX_FRAME_BYTES."""
    b = net.daemon("bravo")

    def padded(obj: dict, size: int) -> bytes:
        payload = json.dumps(obj, separators=(",", ":")).encode()
        return struct.pack(">I", size) + payload + b" " * (size - len(payload))

    for size, code in ((proto.MAX_FRAME_BYTES, None), (proto.MAX_FRAME_BYTES + 1, "frame-too-large")):
        wire = crafted.connect(b.address)
        wire.send(PRE + padded({"type": "offer", "name": "m", "entries": 1, "size": 1}, size))
        if code is None:
            wire.wait_for(proto.Accept)
            wire.send(padded({"type": "file", "index": 0, "path": ["h.txt"], "size": 1}, proto.MAX_HEADER_BYTES)
                      + b"h" + crafted.end(b"h"))  # a header of exactly N bytes is taken
            wire.wait_for(proto.Done)
        else:
            assert wire.error().code == code
        wire.close()
    wire = crafted.start_batch(b.address, 1, 1)
    wire.send(padded({"type": "file", "index": 0, "path": ["h.txt"], "size": 1}, proto.MAX_HEADER_BYTES + 1))
    assert wire.error().code == "frame-too-large"
    assert os.listdir(b.downloads) == ["h.txt"]


def test_message_size_at_n_and_n_plus_one(net):
    b = net.daemon("bravo")
    events = b.events()
    for size, code in ((proto.MAX_MESSAGE_BYTES, None), (proto.MAX_MESSAGE_BYTES + 1, "message-too-large")):
        wire = crafted.connect(b.address)
        wire.send(PRE + crafted.frame({"type": "message", "name": "m", "text": "\x01" * size}))
        if code is None:
            wire.wait_for(proto.Ack)
            events.wait_for(lambda e, size=size: e["event"] == "message" and len(e["text"]) == size)
        else:
            assert wire.error().code == code
        wire.close()


# --- 2. hostile names ----------------------------------------------------------------------

HOSTILE_PATHS = [["../x"], ["/etc/x"], ["a/../../x"], [".."], ["."], ["a", "..", "..", "x"], ["a\x00b"],
                 ["a\nb"], ["\x1b[31mred"], ["a\x7fb"], ["a\\..\\..\\x"], ["x" * 300], [""], ["\u202etxt.exe"],
                 ["ok", "../../x"], []]


def test_hostile_file_names_are_refused_and_nothing_is_written(net, tmp_path):
    b = net.daemon("bravo")
    events = b.events()
    before = tree(tmp_path)
    etc_x = os.path.exists("/etc/x")
    cases: List[bytes] = [crafted.file_header(0, path, 1) for path in HOSTILE_PATHS]
    cases += [crafted.frame({"type": "folder", "index": 0, "path": path}) for path in HOSTILE_PATHS[:6]]
    raw = b'{"type":"file","index":0,"path":["a\xff\xfeb.txt"],"size":1}'  # not UTF-8 at all
    cases.append(crafted.frame(raw))
    cases.append(crafted.frame({"type": "file", "index": 0, "path": ["a\udcffb"], "size": 1}))
    for case in cases:
        wire = crafted.start_batch(b.address, 1, 1)
        wire.send(case + b"x" + crafted.end(b"x"))
        assert wire.error().code == "bad-name", case
        wire.close()
    wait_until(lambda: len(events.of("transfer-failed")) == len(cases), what="every offer to fail")
    assert {e["code"] for e in events.of("transfer-failed")} == {"bad-name"}
    assert tree(tmp_path) == before
    history = b.request("history")[-1]["entries"]
    assert len(history) == len(cases) and {(e["direction"], e["code"]) for e in history} == {("in", "bad-name")}
    assert os.path.exists("/etc/x") == etc_x
    assert b.temp_files() == []


def test_a_planted_symlink_is_a_taken_name_and_never_followed(net, tmp_path):
    b = net.daemon("bravo")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.txt").write_bytes(b"precious")
    b.downloads.mkdir(exist_ok=True)
    os.symlink(outside / "target.txt", b.downloads / "planted.txt")
    os.symlink(outside / "new.txt", b.downloads / "dangling.txt")
    os.symlink(outside, b.downloads / "linkdir")
    wire = crafted.start_batch(b.address, 4, 9)
    wire.send(crafted.file_header(0, ["planted.txt"], 3) + b"one" + crafted.end(b"one"))
    wire.send(crafted.file_header(1, ["dangling.txt"], 3) + b"two" + crafted.end(b"two"))
    wire.send(crafted.frame({"type": "folder", "index": 2, "path": ["linkdir"]}))
    wire.send(crafted.file_header(3, ["linkdir", "target.txt"], 3) + b"six" + crafted.end(b"six"))
    assert sorted(wire.wait_for(proto.Done).index for _ in range(4)) == [0, 1, 2, 3]
    wire.close()
    assert (outside / "target.txt").read_bytes() == b"precious"
    assert sorted(os.listdir(outside)) == ["target.txt"]
    assert (b.downloads / "planted (1).txt").read_bytes() == b"one"
    assert (b.downloads / "dangling (1).txt").read_bytes() == b"two"
    assert (b.downloads / "linkdir (1)" / "target.txt").read_bytes() == b"six"
    assert os.readlink(b.downloads / "planted.txt") == str(outside / "target.txt")
    assert b.temp_files() == []


def read_lines_until(stream, count: int, timeout: float = 30.0) -> List[bytes]:
    """``count`` lines from a pipe, waiting on select with a deadline."""
    lines: List[bytes] = []
    buf = b""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    while len(lines) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {lines} within {timeout} s"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"EOF after {lines}"
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines.extend(done)
    return lines


def test_terminal_escapes_from_peers_are_shown_escaped(net):
    b = net.daemon("bravo")
    watch = subprocess.Popen(b.cli_args("watch"), env=b.env, stdout=subprocess.PIPE)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(b.event_socket)
    try:
        wait_until(lambda: b.request("status")[-1]["subscribers"] == 2, what="watch to connect")
        evil = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202egnp.exe\rline"
        wire = crafted.connect(b.address)
        wire.send(PRE + crafted.frame({"type": "message", "name": "mallory", "text": evil}))
        wire.wait_for(proto.Ack)
        wire.close()
        wire = crafted.connect(b.address)
        wire.send(PRE + crafted.frame({"type": "message", "name": "x\x1b[31my", "text": "hi"}))
        assert wire.error().code == "bad-host-name"
        wire.close()
        human = [line for line in read_lines_until(watch.stdout, 2) if not line.startswith(b"watching ")]
        if len(human) < 2:  # "watching ..." went to stdout too
            human += read_lines_until(watch.stdout, 1)
        raw.settimeout(30)
        lines = b""
        while lines.count(b"\n") < 2:
            lines += raw.recv(65536)
    finally:
        watch.terminate()
        watch.wait()
        raw.close()
    text = b"\n".join(human)
    for byte in (b"\x1b", b"\x07", b"\r", b"\xc2\x9b", "\u202e".encode()):
        assert byte not in text, human
        assert byte not in lines, lines
    assert b"\\x1b]0;owned\\x07" in human[0] and b"mallory" in human[0]
    assert b"bad-host-name" in human[1] and b"\\x1b[31m" in human[1]
    message, error = (json.loads(line) for line in lines.splitlines()[:2])
    assert message["text"] == evil  # escaped in JSON, intact once decoded
    assert error["event"] == "error" and error["code"] == "bad-host-name"
    assert b"\x1b" not in b.log_path.read_bytes()


# --- 3. lying sizes --------------------------------------------------------------------------


def test_lying_sizes_keep_nothing_and_say_why(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    events = b.events()
    data = rng_bytes(4, 1000)

    # fewer bytes than announced, then close
    wire = crafted.start_batch(b.address, 1, 1000)
    wire.send(crafted.file_header(0, ["short.bin"], 1000) + data[:500])
    wait_until(lambda: b.temp_files(), what="the temp file")
    wire.sock.shutdown(socket.SHUT_WR)
    assert wire.error().code == "truncated"
    wire.close()
    failed = events.wait_for(lambda e: e["event"] == "transfer-failed")
    assert failed["code"] == "truncated" and "closed" in failed["message"]

    # more bytes than announced: the surplus is read as a frame header
    wire = crafted.start_batch(b.address, 1, 1000)
    wire.send(crafted.file_header(0, ["long.bin"], 1000) + data + b"xxxx" + crafted.end(data + b"xxxx"))
    assert wire.error().code == "frame-too-large"
    wire.close()

    # the content does not match the announced SHA-256
    wire = crafted.start_batch(b.address, 1, 1000)
    wire.send(crafted.file_header(0, ["wrong.bin"], 1000) + data + crafted.end(data[::-1]))
    result = wire.wait_for(proto.Failed)
    assert result.code == "verify-failed" and "SHA-256" in result.message
    wire.close()
    events.wait_for(lambda e: e["event"] == "file-failed" and e["code"] == "verify-failed")
    failed = events.wait_for(lambda e: e["event"] == "transfer-failed" and e["code"] == "verify-failed")
    assert failed["files"] == 0 and "SHA-256" in failed["message"]

    # a file larger than the offer said (the free-space check saw the offer): N ok, N+1 refused
    wire = crafted.start_batch(b.address, 1, 10)
    wire.send(crafted.file_header(0, ["ten.bin"], 10) + data[:10] + crafted.end(data[:10]))
    wire.wait_for(proto.Done)
    wire.close()
    wire = crafted.start_batch(b.address, 2, 10)
    wire.send(crafted.file_header(0, ["five.bin"], 5) + data[:5] + crafted.end(data[:5]))
    wire.send(crafted.file_header(1, ["six.bin"], 6) + data[:6] + crafted.end(data[:6]))
    assert wire.error().code == "size-mismatch"
    wire.close()
    events.wait_for(lambda e: e["event"] == "transfer-failed" and e["code"] == "size-mismatch")

    assert sorted(os.listdir(b.downloads)) == ["five.bin", "ten.bin"]
    assert b.temp_files() == []
    for code in ("truncated", "frame-too-large", "verify-failed", "size-mismatch"):
        assert code in b.log()
    normal_transfer_works(a, b, tmp_path)


def change_grow(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"more")


def change_shrink(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def change_rewrite(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"\xff" * 4096)


@pytest.mark.parametrize("change", [change_grow, change_shrink, change_rewrite])
def test_a_file_that_changes_while_being_sent_is_detected(net, tmp_path, change):
    """The receiver is a crafted one that stops reading after 1 MiB, so the
    change surely lands mid-transfer."""
    receiver_address = next_address()
    receiver = crafted.Receiver(receiver_address)
    a = net.daemon("alpha")
    f = tmp_path / "moving.bin"
    with open(f, "wb") as out:
        out.truncate(64 * 1024 * 1024)
    cli = subprocess.Popen(a.cli_args("send", receiver_address, str(f)), env=a.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        wire, offer = receiver.take_offer()
        assert offer.size == 64 * 1024 * 1024
        assert receiver.read_payload(wire, 1024 * 1024) >= 1024 * 1024
        change(f)
        closing = receiver.finish_file(wire)
        _, stderr = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
        receiver.close()
    if change is change_shrink:  # mid-file no frame can be sent: the receiver sees the file cut short
        assert isinstance(closing, proto.RemoteProtocolError) and closing.code == "truncated", closing
    else:
        assert isinstance(closing, proto.Failed) and closing.code == "file-changed", closing
    assert cli.returncode == 7, stderr
    assert "file-changed" in stderr and "moving.bin" in stderr


# --- 7. discovery abuse ----------------------------------------------------------------------


class Requester:
    """A spoofed requester: a UDP socket to send from and a TCP listener for answers."""

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((address, 0))
        self.udp.setblocking(False)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((address, port))
        self.tcp.listen(1024)
        self.tcp.setblocking(False)
        self.port = self.tcp.getsockname()[1]
        self.answers = 0

    def datagram(self, pad: int = 0) -> bytes:
        body = {"type": "discover", "name": "flood", "nonce": os.urandom(16).hex(), "port": self.port}
        data = PRE + json.dumps(body, separators=(",", ":")).encode()
        return data + b" " * pad

    def collect(self) -> int:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except BlockingIOError:
                return self.answers
            conn.settimeout(10)
            assert crafted.Wire(conn, "acceptor").wait_for(proto.Announce).name == "bravo"
            conn.close()
            self.answers += 1

    def heard_nothing_over_udp(self) -> bool:
        try:
            self.udp.recv(4096)
        except BlockingIOError:
            return True
        return False

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


def test_a_discovery_flood_gets_a_bounded_number_of_tcp_answers_and_no_udp(net):
    b = net.daemon("bravo")
    first = Requester(next_address(), 0)
    requesters = [first] + [Requester(next_address(), first.port) for _ in range(9)]
    target = (b.address, net.broadcast_port)
    try:
        started = time.monotonic()
        for i in range(1000):
            r = requesters[i % len(requesters)]
            r.udp.sendto(r.datagram(), target)
        # Datagrams are handled in order: once a fresh requester is answered,
        # the flood has been handled too.
        sentinel = Requester(next_address(), first.port)
        requesters.append(sentinel)

        def sentinel_answered() -> bool:
            sentinel.udp.sendto(sentinel.datagram(), target)
            return wait_until_quiet(sentinel)

        wait_until(sentinel_answered, what="an answer to the sentinel")
        elapsed = time.monotonic() - started
        windows = int(elapsed / tnet_discovery.ANSWER_WINDOW_S) + 2
        bound = tnet_discovery.MAX_ANSWERS_PER_WINDOW * windows
        for r in requesters[:-1]:
            assert 1 <= r.collect() <= bound, (r.address, r.answers, elapsed)
        assert all(r.heard_nothing_over_udp() for r in requesters)

        # The datagram limit at N and N+1, from requesters that have not asked yet.
        fits, too_big = Requester(next_address(), first.port), Requester(next_address(), first.port)
        requesters += [fits, too_big]
        fits.udp.sendto(fits.datagram(proto.MAX_DATAGRAM_BYTES - len(fits.datagram())), target)
        too_big.udp.sendto(too_big.datagram(proto.MAX_DATAGRAM_BYTES + 1 - len(too_big.datagram())), target)
        wait_until(lambda: fits.collect(), what="an answer to a datagram of MAX_DATAGRAM_BYTES")
        wait_until(lambda: f"datagram from {too_big.address} dropped: datagram-too-large" in b.log())
        assert too_big.collect() == 0
    finally:
        for r in requesters:
            r.close()
    assert b.request("status")[-1]["ok"]


def wait_until_quiet(requester: Requester) -> bool:
    """Whether an answer reached ``requester`` within a short look."""
    ready = select.select([requester.tcp], [], [], 0.5)[0]
    return bool(ready) and requester.collect() > 0
