"""Daemons on loopback: discovery, transfers, messages, events, the local API."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import socket
import stat
import subprocess

import pytest
from conftest import random_file, read_answers, wait_until


def test_three_daemons_discover_each_other_by_name(net):
    a, b, c = net.daemon("alpha"), net.daemon("bravo"), net.daemon("charlie")
    answer = a.request("discover", timeout=1.0)[-1]
    assert answer["ok"]
    assert sorted((p["name"], p["address"]) for p in answer["peers"]) == [
        ("bravo", b.address), ("charlie", c.address)]  # never itself
    out = a.cli("discover", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(p["name"] for p in json.loads(out.stdout)) == ["bravo", "charlie"]
    human = a.cli("discover").stdout.splitlines()
    assert human[0].split() == ["bravo", b.address]


def test_files_arrive_identical_and_names_are_never_reused(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    big = random_file(tmp_path / "big.bin", 100 * 1024 * 1024, seed=1)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    out = a.cli("send", "bravo", str(big), str(empty))  # by name: found by discovery
    assert out.returncode == 0, out.stderr + a.log()
    assert filecmp.cmp(big, b.downloads / "big.bin", shallow=False)
    assert (b.downloads / "empty.txt").read_bytes() == b""
    again = a.cli("send", b.address, str(big))
    assert again.returncode == 0, again.stderr
    assert filecmp.cmp(big, b.downloads / "big (1).bin", shallow=False)
    assert sorted(os.listdir(b.downloads)) == ["big (1).bin", "big.bin", "empty.txt"]
    assert b.temp_files() == [] and a.temp_files() == []


def test_message_reaches_the_peers_watchers(net):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    with b.watching("--json") as watch:
        out = a.cli("message", b.address, "hello, wörld\n\x1b[31m")
        assert out.returncode == 0, out.stderr
        event = json.loads(watch.stdout.readline())
        assert event == {"event": "message", "peer": a.address, "name": "alpha", "text": "hello, wörld\n\x1b[31m"}


def test_sending_to_a_peer_without_daemon_fails_fast(net, tmp_path):
    a = net.daemon("alpha")
    f = tmp_path / "f.txt"
    f.write_text("x")
    out = a.cli("send", "127.0.0.254", str(f))
    assert out.returncode == 4
    assert "unreachable" in out.stderr and "Connection refused" in out.stderr
    out = a.cli("message", "nobody-here", "x")
    assert out.returncode == 4
    assert "unknown-peer" in out.stderr


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed (scripts/test installs it)")
def test_the_local_api_driven_by_socat(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    f = random_file(tmp_path / "s.bin", 12345)

    def socat(line: str) -> list:
        out = subprocess.run(["socat", "-t", "30", "-", f"UNIX-CONNECT:{a.command_socket}"], input=line + "\n",
                             capture_output=True, text=True, timeout=60)
        return [json.loads(x) for x in out.stdout.splitlines()]

    status = socat('{"cmd": "status"}')
    assert status[-1]["ok"] and status[-1]["host_name"] == "alpha"
    sent = socat(json.dumps({"cmd": "send", "peer": b.address, "paths": [str(f)]}))
    assert sent[-1]["ok"], sent
    assert [e["event"] for e in sent[:-1]] == ["started", "file-done"]
    assert filecmp.cmp(f, b.downloads / "s.bin", shallow=False)
    bad = socat('{"cmd": "fly"}')
    assert bad[-1]["ok"] is False and bad[-1]["code"] == "unknown-command"


def test_socket_files_are_private(net):
    a = net.daemon("alpha")
    for path in (a.command_socket, a.event_socket):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


def test_second_daemon_on_same_sockets_refuses_and_stale_socket_is_replaced(net):
    a = net.daemon("alpha")
    clone = subprocess.run(a.cli_args("daemon"), env=dict(a.env, BIND_ADDRESS="127.0.0.1"),
                           capture_output=True, text=True, timeout=30)
    assert clone.returncode == 1
    assert "another tnet daemon" in clone.stderr
    a.proc.kill()  # no cleanup: the socket files stay behind, stale
    a.proc.wait()
    assert os.path.exists(a.command_socket)
    a.start()
    assert a.request("status")[-1]["ok"]


def test_sigterm_removes_socket_files_and_exits_zero(net):
    a = net.daemon("alpha")
    assert a.terminate() == 0
    assert not os.path.exists(a.command_socket) and not os.path.exists(a.event_socket)


def test_events_report_transfer_lifecycle(net, tmp_path):
    a, b = net.daemon("alpha", REPORT_PROGRESS_OUT="1"), net.daemon("bravo", REPORT_PROGRESS_IN="1")
    ea, eb = a.events(), b.events()
    f = random_file(tmp_path / "p.bin", 8 * 1024 * 1024)
    assert a.cli("send", b.address, str(f)).returncode == 0
    done = eb.wait_for(lambda e: e["event"] == "file-done")
    assert done["path"] == str(b.downloads / "p.bin") and done["size"] == f.stat().st_size
    eb.wait_for(lambda e: e["event"] == "transfer-done")
    assert eb.of("transfer-started") and eb.of("progress")
    ea.wait_for(lambda e: e["event"] == "transfer-done" and e["peer"] == b.address)


def test_bad_configuration_names_the_variable(net):
    a = net.daemon("alpha", start=False, RECEIVE_PORT="70000")
    out = subprocess.run(a.cli_args("daemon"), env=a.env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "RECEIVE_PORT" in out.stderr and "Traceback" not in out.stderr


def test_one_request_per_line_and_errors_are_json(net):
    a = net.daemon("alpha")
    with a.command_connection() as sock:
        sock.sendall(b'{"cmd": "send", "peer": 5, "paths": []}\n')
        answer = read_answers(sock)[-1]
        assert answer["ok"] is False and answer["code"] == "bad-request"
        sock.sendall(b"not json\n")
        assert read_answers(sock)[-1]["code"] == "bad-json"
        sock.sendall(b'{"cmd": "status"}\n')
        assert read_answers(sock)[-1]["ok"] is True


def test_a_receiver_asking_its_user_keeps_the_sender_waiting(net, tmp_path):
    a = net.daemon("alpha", IDLE_TIMEOUT="1")
    b = net.daemon("bravo", ACCEPT="ask")
    events = b.events()
    f = random_file(tmp_path / "asked.bin", 1000)
    sender = subprocess.Popen(a.cli_args("send", b.address, str(f)), env=a.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        offer = events.wait_for(lambda e: e["event"] == "offer")
        # Past the sender's idle timeout, it is still waiting: `wait` told it to.
        wait_until(lambda: [t for t in a.request("transfers")[-1]["transfers"] if t["seconds"] > 1.5],
                   what="the sender to wait past its idle timeout")
        assert b.cli("accept", offer["id"]).returncode == 0
        assert sender.wait(60) == 0, sender.stderr.read()
    finally:
        sender.kill()
        sender.wait()
    assert (b.downloads / "asked.bin").read_bytes() == f.read_bytes()


def test_a_receiver_that_never_answers_the_offer_times_out(net, tmp_path):
    a = net.daemon("alpha", IDLE_TIMEOUT="1")
    mute = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    mute.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    mute_address = a.address.rsplit(".", 1)[0] + ".250"
    mute.bind((mute_address, 49165))
    mute.listen(1)
    try:
        f = tmp_path / "f.txt"
        f.write_text("x")
        out = a.cli("send", mute_address, str(f))  # accepted by the kernel, never answered
        assert out.returncode == 4 and "timeout" in out.stderr
    finally:
        mute.close()
