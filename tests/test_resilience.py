"""The daemon survives its own failures: errors in timer callbacks, running out
of descriptors, clients that half-close then vanish; and a sender's deadlines
are the documented ones."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys

import crafted
from conftest import random_file, wait_until

from tnet import protocol as proto
from tnet.daemon import Daemon
from tnet.outbound import OutboundPeer
from tnet.util import load_config


def test_a_failing_cleanup_in_a_timeout_costs_one_transfer_not_the_daemon(net):
    b = net.daemon("bravo", IDLE_TIMEOUT="1")
    events = b.events()
    wire = crafted.start_batch(b.address, 1, 10)
    wire.send(crafted.file_header(0, ["f.bin"], 10) + b"12345")  # half a file, then silence
    temp = b.temp / wait_until(lambda: b.temp_files(), what="the temp file")[0]
    os.rename(temp, b.temp / "elsewhere.part")
    temp.mkdir()  # a folder under its name, with something in it: unlink(2) fails
    (temp / "inside").write_text("x")
    failed = events.wait_for(lambda e: e["event"] == "transfer-failed", what="the idle timeout")
    assert failed["code"] == "timeout"
    assert b.proc.poll() is None and b.request("status")[-1]["ok"]
    assert "cannot remove" in b.log() and "Traceback" not in b.log()
    wire.close()


def limit_descriptors(count: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))
    return apply


def test_out_of_descriptors_the_daemon_rests_its_listeners_instead_of_spinning(net):
    b = net.daemon("bravo", start=False)
    with open(b.log_path, "ab") as log:
        b.proc = subprocess.Popen([sys.executable, "-m", "tnet", "daemon"], env=b.env, stdout=log, stderr=log,
                                  cwd=b.dir, preexec_fn=limit_descriptors(40))
    wait_until(b.alive_and_answering, what="the daemon")
    clients = []
    try:
        for _ in range(60):  # more than it can hold: the rest wait in the backlog
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(b.command_socket)
            clients.append(sock)
        # Two pauses logged means a second has passed with the backlog still full.
        wait_until(lambda: b.log().count("not accepting for") >= 2, what="two rests of the listener")
        assert b.log().count("accept failed") <= 10, "the loop spun on a listener it could not accept from"
    finally:
        for sock in clients:
            sock.close()
    wait_until(b.alive_and_answering, what="the daemon to serve again")


def test_ctrl_c_on_send_cancels_and_exits_8(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    big = random_file(tmp_path / "big.bin", 64 * 1024 * 1024, seed=3)
    os.kill(b.proc.pid, signal.SIGSTOP)  # the receiver takes nothing: the transfer stays open
    try:
        send = subprocess.Popen(a.cli_args("send", b.address, str(big)), env=a.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_until(lambda: a.request("transfers")[-1]["transfers"], what="the transfer to open")
        send.send_signal(signal.SIGINT)
        out, err = send.communicate(timeout=60)
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    assert send.returncode == 8 and "cancelled" in err, err
    wait_until(lambda: not a.request("transfers")[-1]["transfers"], what="the transfer to be gone")


def test_a_busy_client_that_half_closes_then_leaves_cancels_its_send(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    big = random_file(tmp_path / "big.bin", 64 * 1024 * 1024, seed=4)
    os.kill(b.proc.pid, signal.SIGSTOP)
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(a.command_socket)
        client.sendall(b'{"cmd":"send","peer":"%s","paths":["%s"]}\n' % (b.address.encode(), str(big).encode()))
        client.shutdown(socket.SHUT_WR)  # as socat does at the end of its input
        wait_until(lambda: a.request("transfers")[-1]["transfers"], what="the transfer to open")
        assert a.request("transfers")[-1]["transfers"], "a half-close alone must not cancel"
        client.close()  # now it is gone
        wait_until(lambda: not a.request("transfers")[-1]["transfers"], timeout=15,
                   what="the abandoned transfer to be cancelled")
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)


def test_a_subscriber_that_half_closes_still_gets_events(net):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    sub = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sub.connect(b.event_socket)
    sub.shutdown(socket.SHUT_WR)  # `socat - UNIX-CONNECT:events < /dev/null`
    wait_until(lambda: b.request("status")[-1]["subscribers"] == 1, what="the subscriber")
    assert a.cli("message", b.address, "still there?").returncode == 0
    sub.settimeout(30)
    assert b'"text":"still there?"' in sub.recv(65536)
    sub.close()


def test_a_sender_waits_idle_timeout_not_handshake_timeout_for_the_accept(net, tmp_path):
    a = net.daemon("alpha", HANDSHAKE_TIMEOUT="1")
    address = a.address.rsplit(".", 1)[0] + ".249"
    receiver = crafted.Receiver(address)
    f = tmp_path / "f.txt"
    f.write_text("patience")
    send = subprocess.Popen(a.cli_args("send", address, str(f)), env=a.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        sock, _ = receiver.listener.accept()
        wire = crafted.Wire(sock, "acceptor")
        wire.send(proto.PREFACE)  # ... and nothing more, past the sender's handshake timeout
        offer = wire.wait_for(proto.Offer)
        wait_until(lambda: [t for t in a.request("transfers")[-1]["transfers"] if t["seconds"] > 1.5],
                   what="the sender to wait past its handshake timeout")
        wire.send(proto.encode_frame(proto.Accept("mute")))
        assert offer.entries == 1
        wire.wait_for(proto.FileEnd)
        wire.send(proto.encode_frame(proto.Done(0)))
        assert send.wait(60) == 0, send.stderr.read()
        wire.close()
    finally:
        send.kill()
        receiver.close()


def test_cancelling_a_send_still_connecting_sends_nothing(net):
    daemon = Daemon(load_config({"FILE_SAVE_DIR": str(net.root / "d"), "TEMP_DIR": str(net.root)}))
    conn = OutboundPeer(daemon.peers, "127.0.0.1", proto.Offer("alpha", 0, 0))
    assert not conn.connected
    conn.cancel("cancelled", "by the user")
    assert conn.closed and conn.out == bytearray() and conn.result == ("cancelled", "by the user")


def test_a_connect_that_never_completes_is_unreachable(net):
    daemon = Daemon(load_config({"FILE_SAVE_DIR": str(net.root / "d"), "TEMP_DIR": str(net.root),
                                 "HANDSHAKE_TIMEOUT": "3"}))
    conn = OutboundPeer(daemon.peers, "127.0.0.1", proto.Offer("alpha", 0, 0))
    conn.on_deadline()  # the handshake deadline, with no SYN-ACK ever seen
    assert conn.closed and conn.result == ("unreachable", "cannot reach 127.0.0.1: no answer within 3 s")
