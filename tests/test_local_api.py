"""Abuse of the local API (docs/PROTOCOL.md §6): bad requests get a JSON
error on the same connection, what cannot be answered is dropped, the
daemon goes on; its sockets admit no other user."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import crafted
import pytest
from conftest import next_address, read_answers, wait_until

from tnet import api
from tnet import clients as tnet_clients
from tnet import daemon as tnet_daemon
from tnet import protocol as proto

BAD_REQUESTS = [
    (b"not json", "bad-json"),
    (b"[1, 2]", "bad-json"),
    (b"\xff\xfe{}", "bad-json"),
    (b"[" * 100_000, "bad-json"),
    (b'{"cmd": 5}', "bad-request"),
    (b'{"nocmd": "status"}', "bad-request"),
    (b'{"cmd": "fly"}', "unknown-command"),
    (b'{"cmd": "\\u001b[2Jfly"}', "unknown-command"),
    (b'{"cmd": "status", "verbose": true}', "bad-request"),
    (b'{"cmd": "send", "peer": "127.0.0.1", "paths": "/etc/passwd"}', "bad-request"),
    (b'{"cmd": "send", "peer": "127.0.0.1", "paths": [1]}', "bad-request"),
    (b'{"cmd": "send", "peer": "127.0.0.1", "paths": []}', "bad-request"),
    (b'{"cmd": "send", "peer": ["127.0.0.1"], "paths": ["/x"]}', "bad-request"),
    (b'{"cmd": "send", "peer": "127.0.0.1", "paths": ["relative"]}', "bad-request"),
    (b'{"cmd": "send", "peer": "127.0.0.1", "paths": ["/no/such/file"]}', "file-error"),
    (b'{"cmd": "send", "peer": "127.0.0.1", "paths": ["/a\\u0000b"]}', "file-error"),
    (b'{"cmd": "send", "peer": "127.0.0.1", "paths": ["/\\ud800"]}', "file-error"),
    (b'{"cmd": "send", "peer": "127.0.0.1", "paths": ["/\xff"]}', "file-error"),
    (b'{"cmd": "send", "peer": "127.0.0.1", "paths": ["/dev/null"]}', "file-error"),
    (b'{"cmd": "discover", "timeout": true}', "bad-request"),
    (b'{"cmd": "discover", "timeout": "1"}', "bad-request"),
    (b'{"cmd": "discover", "timeout": NaN}', "bad-request"),
    (b'{"cmd": "discover", "timeout": 1e999}', "bad-request"),
    (b'{"cmd": "discover", "timeout": -1}', "bad-request"),
    (b'{"cmd": "message", "peer": "127.0.0.1", "text": 5}', "bad-request"),
    (b'{"cmd": "message", "peer": "127.0.0.1", "text": "\\ud800"}', "bad-request"),
    (b'{"cmd": "message", "peer": "127.0.0.1", "text": "' + b"a" * (proto.MAX_MESSAGE_BYTES + 1) + b'"}',
     "message-too-large"),
    (b'{"cmd": "cancel", "id": "nope"}', "no-such-transfer"),
    (b'{"cmd": "cancel"}', "bad-request"),
    (b'{"cmd": "accept", "id": 7}', "bad-request"),
    (b'{"cmd": "decline", "id": "1"}', "no-such-transfer"),
]


def test_bad_requests_get_a_json_error_and_the_connection_goes_on(net):
    a = net.daemon("alpha")
    with a.command_connection() as sock:
        for line, code in BAD_REQUESTS:
            sock.sendall(line + b"\n")
            raw = b""
            while not raw.endswith(b"\n"):
                chunk = sock.recv(65536)
                assert chunk, f"dropped instead of answered: {line[:80]!r}"
                raw += chunk
            assert not any(c in raw for c in (b"\x1b", b"\x00")), raw
            answer = json.loads(raw)
            assert answer["ok"] is False and answer["code"] == code, (line[:80], answer)
            assert answer["error"]
        sock.sendall(b'{"cmd": "status"}\n')
        assert read_answers(sock)[-1]["ok"] is True
    assert "Traceback" not in a.log()


def test_line_limit_at_n_and_n_plus_one_and_a_10_mib_line(net):
    a = net.daemon("alpha")
    request = b'{"cmd": "status"}'
    with a.command_connection() as sock:
        sock.sendall(request + b" " * (api.MAX_LINE_BYTES - len(request)) + b"\n")
        assert read_answers(sock)[-1]["ok"] is True
    for size in (api.MAX_LINE_BYTES + 1, 10 * 1024 * 1024):
        with a.command_connection() as sock:
            try:
                sock.sendall(request + b" " * (size - len(request)))  # and no newline
            except (BrokenPipeError, ConnectionResetError):
                pass  # dropped while we were still sending: the answer is there to read
            answer = read_answers(sock)
            assert answer[-1]["ok"] is False and answer[-1]["code"] == "line-too-long"
            try:
                assert sock.recv(1) == b""  # and the connection is closed
            except ConnectionResetError:
                pass  # closed with our surplus unread
    assert "command client dropped: line-too-long" in a.log()
    assert a.request("status")[-1]["ok"]


def test_a_client_that_shuts_its_writing_half_still_gets_its_answer(net, tmp_path):
    """`socat -`, `nc -N`: the request, then EOF; the answer is still read."""
    a, b = net.daemon("alpha"), net.daemon("bravo")
    f = tmp_path / "half.txt"
    f.write_bytes(b"half-closed\n")
    for request in ({"cmd": "send", "peer": b.address, "paths": [str(f)]}, {"cmd": "discover", "timeout": 0.5}):
        with a.command_connection() as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            answers = read_answers(sock)
            assert answers and answers[-1]["ok"] is True, answers
            assert sock.recv(1) == b""
    assert (b.downloads / "half.txt").read_bytes() == b"half-closed\n"
    assert a.request("status")[-1]["transfers"] == []


def test_a_client_gone_in_the_middle_of_a_send_cancels_it(net, tmp_path):
    receiver = crafted.Receiver(next_address())
    a = net.daemon("alpha")
    events = a.events()
    f = tmp_path / "big.bin"
    with open(f, "wb") as out:
        out.truncate(64 * 1024 * 1024)
    try:
        sock = a.command_connection()
        sock.sendall(json.dumps({"cmd": "send", "peer": receiver.listener.getsockname()[0],
                                 "paths": [str(f)]}).encode() + b"\n")
        wire, _ = receiver.take_offer()
        receiver.read_payload(wire, 1024 * 1024)
        sock.close()  # Ctrl-C on the CLI
        failed = events.wait_for(lambda e: e["event"] == "transfer-failed")
        assert failed["code"] == "cancelled" and "disconnected" in failed["message"]
        closing = receiver.finish_file(wire)  # cut short mid-file: no frame can say why
        assert isinstance(closing, proto.RemoteProtocolError) and closing.code == "truncated"
    finally:
        receiver.close()
    assert a.request("status")[-1]["transfers"] == []
    assert "cancelled" in a.log()


def test_a_subscriber_that_never_reads_is_dropped_at_its_buffer_limit(net):
    b = net.daemon("bravo")
    reader = b.events()
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(b.event_socket)
    wait_until(lambda: b.request("status")[-1]["subscribers"] == 2)
    text = "x" * proto.MAX_MESSAGE_BYTES
    count = 2 * tnet_clients.MAX_SUBSCRIBER_BUFFER_BYTES // len(text) + 2
    for _ in range(count):
        wire = crafted.connect(b.address)
        wire.send(proto.PREFACE + crafted.frame({"type": "message", "name": "m", "text": text}))
        wire.wait_for(proto.Ack)
        wire.close()
    wait_until(lambda: "events subscriber dropped" in b.log(), what="the stuck subscriber to be dropped")
    wait_until(lambda: len(reader.of("message")) == count, what="the reading subscriber to get everything")
    assert b.request("status")[-1]["subscribers"] == 1
    stuck.settimeout(30)
    received = 0
    while True:
        chunk = stuck.recv(1 << 20)
        if not chunk:
            break
        received += len(chunk)
    assert received <= tnet_clients.MAX_SUBSCRIBER_BUFFER_BYTES + 1024 * 1024  # what was queued, plus the kernel's
    stuck.close()


def test_sockets_are_private_to_their_user(net):
    a = net.daemon("alpha")
    sockdir = os.path.dirname(a.command_socket)
    for path in (a.command_socket, a.event_socket):
        assert stat.S_IMODE(os.lstat(path).st_mode) == tnet_daemon.SOCKET_MODE == 0o600
    assert stat.S_IMODE(os.stat(sockdir).st_mode) == tnet_daemon.SOCKET_DIR_MODE == 0o700
    setpriv = "/usr/bin/setpriv" if os.path.exists("/usr/bin/setpriv") else None
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to try as another user; the modes are checked above")
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
             "sys.exit(0)\n")

    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    # The interpreter must be one that user can run (a pyenv under /root is not).
    runnable = [python for python in (sys.executable, "/usr/bin/python3") if os.path.exists(python) and
                subprocess.run(as_nobody + [python, "-c", "pass"], capture_output=True).returncode == 0]
    if not runnable:
        pytest.skip("no Python that uid 65534 can run; the modes are checked above")

    def connect_as_nobody(path: str) -> int:
        out = subprocess.run(as_nobody + [runnable[0], "-c", probe, path], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode in (0, 13), out.stderr
        return out.returncode

    for path in (a.command_socket, a.event_socket):
        assert connect_as_nobody(path) == 13  # the folders are closed to it
    # Even with the folders opened up, the sockets' own mode keeps others out.
    opened = [sockdir, os.path.dirname(sockdir)]
    modes = [stat.S_IMODE(os.stat(p).st_mode) for p in opened]
    try:
        for p in opened:
            os.chmod(p, 0o711)
        for path in (a.command_socket, a.event_socket):
            assert connect_as_nobody(path) == 13
    finally:
        for p, mode in zip(opened, modes):
            os.chmod(p, mode)
    assert a.request("status")[-1]["ok"]
