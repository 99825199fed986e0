"""Hostile hosts and local races, round 2: each test reproduces one way a
peer, a local client or a local user who can write in FILE_SAVE_DIR hurt an
earlier tnet, and checks it no longer does. Races are made deterministic by
acting on a daemon's own events (a file done, an offer waiting), never by
sleeping; the load tests print what they measured."""

from __future__ import annotations

import filecmp
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import crafted
import pytest
from conftest import next_address, read_answers, temp_files, wait_until
from test_hostile import Requester
from test_loopback_faults import first_answer, small_disk, small_transfer_works  # noqa: F401 (a fixture)

from tnet import api
from tnet import discovery as tnet_discovery
from tnet import protocol as proto
from tnet.store import WORK_PREFIX

MiB = 1024 * 1024


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def everything_below(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- F1: a folder swapped for a link mid-batch ----------------------------------------------


def test_f1_a_folder_swapped_for_a_link_mid_batch_gets_nothing_outside(net, tmp_path):
    b = net.daemon("bravo")
    outside = tmp_path / "outside"
    outside.mkdir()
    wire = crafted.start_batch(b.address, 3, 6)
    wire.send(crafted.frame({"type": "folder", "index": 0, "path": ["x"]}))
    wire.send(crafted.file_header(1, ["x", "a.txt"], 3) + b"one" + crafted.end(b"one"))
    assert sorted(wire.wait_for(proto.Done).index for _ in range(2)) == [0, 1]
    os.rename(b.downloads / "x", b.downloads / "moved")
    os.symlink(outside, b.downloads / "x")
    wire.send(crafted.file_header(2, ["x", "b.txt"], 3) + b"two" + crafted.end(b"two"))
    assert wire.wait_for(proto.Done).index == 2
    wire.close()
    assert os.listdir(outside) == []
    assert (b.downloads / "moved" / "b.txt").read_bytes() == b"two"


def swap_when_the_big_file_starts(events, folder: Path, outside: Path) -> None:
    """On the 0% progress line of big.bin, put a link to ``outside`` where ``folder`` was."""
    events.wait_for(lambda e: e["event"] == "progress" and e.get("file", "").endswith("big.bin"),
                    what="big.bin to start")
    os.rename(folder, str(folder) + ".moved")
    os.symlink(outside, folder)


@pytest.mark.parametrize("swapped", ["subfolder", "save-dir"])
def test_f1_an_ordinary_folder_send_with_a_swap_mid_batch_gets_nothing_outside(net, tmp_path, swapped):
    a, b = net.daemon("alpha"), net.daemon("bravo", REPORT_PROGRESS_IN="1")
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "a.txt").write_text("first")
    with open(folder / "big.bin", "wb") as f:
        f.truncate(64 * MiB)  # long enough that the swap lands before its end
    events = b.events()
    cli = subprocess.Popen(a.cli_args("send", b.address, str(folder)), env=a.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    target = b.downloads / "x" if swapped == "subfolder" else b.downloads
    swap_when_the_big_file_starts(events, target, outside)
    _, stderr = cli.communicate(timeout=120)
    later = None
    if swapped == "save-dir":  # the next offer is refused, not taken through the link
        f = tmp_path / "later.txt"
        f.write_text("later")
        later = a.cli("send", b.address, str(f))
    assert os.listdir(outside) == []  # first: what matters most
    assert cli.returncode == 0, stderr + b.log()
    saved = Path(str(target) + ".moved") / ("big.bin" if swapped == "subfolder" else "x/big.bin")
    assert saved.stat().st_size == 64 * MiB
    if later is not None:
        assert later.returncode != 0 and "save-failed" in later.stderr and "link" in later.stderr, later.stderr


# --- F2: a FIFO or a link swapped in on the sending side ------------------------------------


def test_f2_a_fifo_or_link_swapped_into_a_folder_being_sent_fails_that_file_only(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", ACCEPT="ask")
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("one.txt", "three.txt", "two.txt"):
        (folder / name).write_text(name)
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET!!!")  # as long as three.txt: only the link, not the size, gives it away
    events = b.events()
    cli = subprocess.Popen(a.cli_args("send", b.address, str(folder)), env=a.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    offer = events.wait_for(lambda e: e["event"] == "offer")  # walked: the batch is fixed now
    os.unlink(folder / "two.txt")
    os.mkfifo(folder / "two.txt")
    os.unlink(folder / "three.txt")
    os.symlink(secret, folder / "three.txt")
    assert b.request("accept", id=offer["id"])[-1]["ok"]
    try:
        _, stderr = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            os.close(os.open(folder / "two.txt", os.O_RDWR | os.O_NONBLOCK))  # set a daemon stuck on it free
    assert cli.returncode == 7 and "file-changed" in stderr, stderr
    assert a.request("status")[-1]["ok"]
    assert (b.downloads / "docs" / "one.txt").read_text() == "one.txt"
    assert everything_below(b.downloads) == ["docs", "docs/one.txt"]
    failed = [e for e in events.of("file-failed")]
    assert {e["file"] for e in failed} == {"docs/two.txt", "docs/three.txt"}
    assert all(e["code"] == "file-changed" for e in failed)


def test_f2_a_fifo_alone_does_not_freeze_the_sender(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", ACCEPT="ask")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "one.txt").write_text("one")
    (folder / "two.txt").write_text("two")
    events = b.events()
    cli = subprocess.Popen(a.cli_args("send", b.address, str(folder)), env=a.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    offer = events.wait_for(lambda e: e["event"] == "offer")
    os.unlink(folder / "two.txt")
    os.mkfifo(folder / "two.txt")  # nobody will ever open its other end
    assert b.request("accept", id=offer["id"])[-1]["ok"]
    try:
        _, stderr = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            os.close(os.open(folder / "two.txt", os.O_RDWR | os.O_NONBLOCK))  # set a daemon stuck on it free
    assert cli.returncode == 7 and "file-changed" in stderr, stderr
    assert a.request("status")[-1]["ok"]


# --- F3: names are claims, not facts --------------------------------------------------------


def test_f3_a_name_in_a_message_never_redirects_a_send(net, tmp_path):
    a = net.daemon("alpha")
    attacker = next_address()
    trap = crafted.Receiver(attacker, timeout=0.1)
    try:
        for name in [f"name{i}" for i in range(1100)] + ["laptop"]:  # the claim last: no flood pushes it out
            wire = crafted.connect(a.address, source=attacker)
            wire.send(proto.PREFACE + crafted.frame({"type": "message", "name": name, "text": "hi"}))
            wire.wait_for(proto.Ack)
            wire.close()
        f = tmp_path / "f.txt"
        f.write_text("for the laptop")
        out = a.cli("send", "laptop", str(f))
        assert out.returncode == 4 and "unknown-peer" in out.stderr, out.stderr
        with pytest.raises(socket.timeout):
            trap.listener.accept()  # nobody came to the attacker
        assert a.request("peers")[-1]["peers"] == []
    finally:
        trap.close()


def test_f3_one_address_holds_one_name_and_floods_push_no_one_out(net):
    a = net.daemon("alpha")
    net.daemon("bravo")
    assert [p["name"] for p in a.request("discover")[-1]["peers"]] == ["bravo"]
    attacker = next_address()
    for i in range(200):
        wire = crafted.connect(a.address, source=attacker)
        wire.send(proto.PREFACE + crafted.offer(1, 0, name=f"flood{i}"))
        wire.close()
    assert [p["name"] for p in a.request("peers")[-1]["peers"]] == ["bravo"]


# --- F4: one host takes every connection ----------------------------------------------------


def trickle(wires: List[crafted.Wire], stop: threading.Event) -> None:
    """A byte of file data on each connection now and then, as a slow attacker would."""
    while not stop.wait(0.2):
        for wire in wires:
            try:
                wire.send(b"\0")
            except OSError:
                pass


def test_f4_one_address_gets_a_bounded_share_and_trickles_time_out(net, tmp_path):
    b = net.daemon("bravo", MAX_CONNECTIONS="16", MAX_CONNECTIONS_PER_PEER="4", IDLE_TIMEOUT="2")
    a = net.daemon("alpha")
    events = b.events()
    attacker = next_address()
    accepted, refused = [], []
    for _ in range(8):
        wire = crafted.connect(b.address, source=attacker)
        wire.send(proto.PREFACE + crafted.offer(1, MiB))
        answer = None
        while answer is None:
            answer = next((e for e in wire.events if isinstance(e, (proto.Accept, proto.Error))), None)
            if answer is None:
                assert wire.pump(), wire.events
        (accepted if isinstance(answer, proto.Accept) else refused).append((wire, answer))
    assert len(accepted) == 4 and len(refused) == 4
    assert all(e.code == "busy" and "MAX_CONNECTIONS_PER_PEER" in e.message for _, e in refused)
    wires = [wire for wire, _ in accepted]
    for wire in wires:
        wire.send(crafted.file_header(0, ["slow.bin"], MiB))
    stop = threading.Event()
    dripper = threading.Thread(target=trickle, args=(wires, stop), daemon=True)
    dripper.start()
    try:
        small_transfer_works(a, b, tmp_path)  # others are served meanwhile
        small_transfer_works(b, a, tmp_path, "back.bin")
        def timed_out() -> List[Dict[str, Any]]:
            return [e for e in events.of("transfer-failed") if e["code"] == "timeout"]

        wait_until(lambda: len(timed_out()) == 4, timeout=60, what="the four trickling connections to time out")
        assert all("less than" in e["message"] for e in timed_out())
    finally:
        stop.set()
        dripper.join()
        for wire, _ in accepted + refused:
            wire.close()
    assert temp_files(b.temp) == []


def test_f4_inbound_connections_cannot_starve_our_own_sends(net, tmp_path):
    b = net.daemon("bravo", MAX_CONNECTIONS="8", MAX_CONNECTIONS_PER_PEER="8", HANDSHAKE_TIMEOUT="60")
    a = net.daemon("alpha")
    attacker = next_address()
    # As many as MAX_CONNECTIONS, from one host: some are taken, the rest refused.
    held = [socket.create_connection((b.address, crafted.PORT), 30, source_address=(attacker, 0))
            for _ in range(8)]
    try:
        for sock in held:
            sock.settimeout(30)
            assert sock.recv(5) == proto.PREFACE
        assert first_answer(crafted.connect(b.address, source=next_address())).code == "busy"
        small_transfer_works(b, a, tmp_path)  # a quarter of MAX_CONNECTIONS is kept for these
    finally:
        for sock in held:
            sock.close()


# --- F5: inodes, and a flood of folders -----------------------------------------------------


@pytest.fixture
def few_inodes(tmp_path):
    """A tmpfs with 64 inodes, mounted for the test and unmounted after it."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the inode test needs root in CI (to mount a tmpfs)")
        pytest.skip("needs root to mount a tmpfs")
    mount = tmp_path / "inodes"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=64,mode=0755", "tnet-test", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_f5_an_offer_of_more_entries_than_free_inodes_is_refused_up_front(net, few_inodes, tmp_path):
    a = net.daemon("alpha")
    b = net.daemon("bravo", FILE_SAVE_DIR=str(few_inodes / "Downloads"), TEMP_DIR=str(few_inodes / "tmp"))
    wire = crafted.connect(b.address)
    wire.send(proto.PREFACE + crafted.offer(100, 0))
    error = wire.error()
    wire.close()
    assert error.code == "no-space" and "inodes" in error.message, error
    small_transfer_works(a, b, tmp_path)


def test_f5_a_flood_of_folders_costs_bounded_memory_and_others_are_served(net):
    b = net.daemon("bravo")
    count = 150_000
    wire = crafted.start_batch(b.address, count, 0)
    rss_before = b.peak_rss()
    frames = b"".join(crafted.frame({"type": "folder", "index": i, "path": [f"f{i}"]}) for i in range(count))

    def flood() -> None:
        try:
            wire.sock.sendall(frames)
        except OSError:
            pass

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    answered = 0
    slowest = 0.0
    served_mid_flood = False
    while answered < count:
        started = time.monotonic()
        assert b.request("status")[-1]["ok"]
        slowest = max(slowest, time.monotonic() - started)
        while answered < count and wire.pump():
            answered += sum(isinstance(e, proto.Done) for e in wire.events)
            wire.events.clear()
            break
        served_mid_flood = served_mid_flood or 0 < answered < count
    sender.join()
    wire.close()
    rss = b.peak_rss()
    print(f"\n{count} folders: slowest status {slowest * 1000:.0f} ms, peak RSS {rss_before / MiB:.1f} -> "
          f"{rss / MiB:.1f} MiB")
    assert served_mid_flood
    assert rss - rss_before < 8 * MiB  # the batch's bookkeeping does not grow with its folders


# --- F6: a huge local request -------------------------------------------------------------


def test_f6_a_request_naming_a_folder_many_times_stops_at_max_entries_and_others_are_served(net, tmp_path):
    a = net.daemon("alpha")
    folder = tmp_path / "d"
    folder.mkdir()
    for i in range(100):
        (folder / f"{i:03}").write_bytes(b"")
    copies = proto.MAX_ENTRIES // 101 + 100  # past MAX_ENTRIES, within MAX_LINE_BYTES
    before = cpu_seconds(a.proc.pid)
    started = time.monotonic()
    with a.command_connection(120) as sock:
        sock.sendall(json.dumps({"cmd": "send", "peer": "127.0.0.1", "paths": [str(folder)] * copies}).encode()
                     + b"\n")
        statuses = 0
        sock.setblocking(False)
        answers: List[Dict[str, Any]] = []
        buf = b""
        while not answers:
            assert a.request("status")[-1]["ok"]
            statuses += 1
            try:
                buf += sock.recv(65536)
            except BlockingIOError:
                continue
            answers = [json.loads(line) for line in buf.split(b"\n")[:-1] if line.strip()]
    elapsed = time.monotonic() - started
    rss = a.peak_rss()
    print(f"\n{copies} copies of a 100-file folder: failed after {elapsed:.1f} s, "
          f"{cpu_seconds(a.proc.pid) - before:.1f} s CPU, {statuses} status answers meanwhile, "
          f"peak RSS {rss / MiB:.1f} MiB")
    assert answers[-1]["code"] == "file-error" and str(proto.MAX_ENTRIES) in answers[-1]["error"]
    assert statuses > 1  # answered while the walk went on
    assert rss < 128 * MiB


def test_f6_a_100000_file_folder_is_offered_in_bounded_memory(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", ACCEPT="ask")
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(100_000):
        (folder / f"{i:06}.txt").write_bytes(b"")
    events = b.events()
    started = time.monotonic()
    cli = subprocess.Popen(a.cli_args("send", b.address, str(folder)), env=a.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        offer = events.wait_for(lambda e: e["event"] == "offer", timeout=120)
        elapsed = time.monotonic() - started
        assert offer["entries"] == 100_001
        rss = a.peak_rss()
        print(f"\n100,000 files walked and offered in {elapsed:.1f} s, sender peak RSS {rss / MiB:.1f} MiB")
        assert rss < 64 * MiB
        assert b.request("decline", id=offer["id"])[-1]["ok"]
        _, stderr = cli.communicate(timeout=60)
        assert cli.returncode == 5, stderr
    finally:
        if cli.poll() is None:
            cli.kill()


# --- F7: what a killed daemon leaves ------------------------------------------------------


def test_f7_a_restart_removes_a_killed_daemons_temp_files_and_no_one_elses(net, tmp_path):
    b = net.daemon("bravo")
    other = net.daemon("other", TEMP_DIR=str(b.temp))  # the same TEMP_DIR, as /tmp is shared
    plain = b.temp / "unrelated.part"
    plain.write_bytes(b"not ours")
    wires = []
    for d in (b, other):
        wire = crafted.start_batch(d.address, 1, 8 * MiB)
        wire.send(crafted.file_header(0, ["killed.bin"], 8 * MiB) + bytes(MiB))
        wires.append(wire)
    def in_flight() -> list:
        return [n for n in temp_files(b.temp) if n.endswith(".part") and not n.endswith("unrelated.part")]

    wait_until(lambda: len([n for n in in_flight() if os.path.getsize(b.temp / n) == MiB]) == 2,
               what="both temp files at 1 MiB")
    theirs = in_flight()
    b.proc.kill()
    b.proc.wait()
    planted = b.downloads / (WORK_PREFIX + "0" * 32)  # a copy's staging folder a killed daemon left
    planted.mkdir()
    (planted / "lock").write_bytes(b"")
    (planted / "1.part").write_bytes(b"x" * 1000)
    b.start()
    left = temp_files(b.temp)
    assert "unrelated.part" in left
    survivors = [n for n in theirs if n in left]
    assert len(survivors) == 1  # the running daemon's, untouched
    assert not planted.exists()
    assert "leftover temp files" in b.log()
    for wire in wires:
        wire.close()


# --- F8: a burst of events and a slow `tnet watch` ------------------------------------------


def test_f8_a_watch_that_falls_behind_is_told_and_reconnects(net):
    b = net.daemon("bravo")
    with b.watching("--json", stderr=subprocess.PIPE) as watch:
        # Nobody reads watch's output yet: it stops reading the daemon, which falls 1 MiB behind.
        text = "x" * proto.MAX_MESSAGE_BYTES
        for _ in range(60):
            wire = crafted.connect(b.address)
            wire.send(proto.PREFACE + crafted.frame({"type": "message", "name": "m", "text": text}))
            wire.wait_for(proto.Ack)
            wire.close()
        wait_until(lambda: "events subscriber dropped" in b.log(), what="the watch to be dropped")
        lines: List[Dict[str, Any]] = []

        def read() -> None:
            assert watch.stdout is not None
            for line in watch.stdout:
                lines.append(json.loads(line))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        dropped = wait_until(lambda: next((e for e in lines if e.get("event") == "dropped"), None),
                             what="the dropped event")
        assert dropped["code"] == "lagging" and dropped["lost"] > 0
        wait_until(lambda: b.request("status")[-1]["subscribers"] == 1, what="watch to reconnect")
        wire = crafted.connect(b.address)
        wire.send(proto.PREFACE + crafted.frame({"type": "message", "name": "m", "text": "after"}))
        wire.wait_for(proto.Ack)
        wire.close()
        wait_until(lambda: any(e.get("text") == "after" for e in lines), what="a message after the reconnect")
        received = sum(e.get("event") == "message" and e.get("text") == text for e in lines)
        assert received + dropped["lost"] <= 60 and watch.poll() is None
    assert watch.stderr is not None and "fell behind" in watch.stderr.read()


# --- F9: discovery amplification ----------------------------------------------------------


def test_f9_a_spoofed_discovery_flood_gets_a_bounded_number_of_answers(net):
    """300 requester addresses, in rounds, their answers drained between
    rounds (so that answers in flight are no limit): the answers stay within
    the budget for all requesters together."""
    b = net.daemon("bravo")
    first = Requester(next_address(), 0)
    requesters = [first] + [Requester(next_address(), first.port) for _ in range(299)]
    target = (b.address, net.broadcast_port)
    before = cpu_seconds(b.proc.pid)
    try:
        started = time.monotonic()
        for _ in range(6):
            for r in requesters:
                r.udp.sendto(r.datagram(), target)
            # An answer on loopback is queued at its listener as it is made: take them until none comes.
            while select.select([r.tcp for r in requesters], [], [], 0.3)[0]:
                for r in requesters:
                    r.collect()
        total = sum(r.answers for r in requesters)
        windows = int((time.monotonic() - started) / tnet_discovery.ANSWER_WINDOW_S) + 2
        print(f"\n1,800 requests from 300 addresses over {windows - 2} s: {total} answers, "
              f"{cpu_seconds(b.proc.pid) - before:.2f} s CPU")
        assert 0 < total <= tnet_discovery.MAX_ANSWERS_PER_WINDOW_ALL * windows
    finally:
        for r in requesters:
            r.close()


def test_f9_garbage_datagrams_are_logged_at_a_bounded_rate(net):
    b = net.daemon("bravo")
    before = b.log().count("dropped:")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((next_address(), 0))
        for i in range(3000):
            udp.sendto(b"garbage %d" % i, (b.address, net.broadcast_port))
    wait_until(lambda: b.log().count("dropped:") - before >= tnet_discovery.MAX_DROP_LOGS_PER_WINDOW,
               what="the first drops logged")
    assert b.request("status")[-1]["ok"]
    assert b.log().count("dropped:") - before <= tnet_discovery.MAX_DROP_LOGS_PER_WINDOW


# --- F10: small ones ----------------------------------------------------------------------


@pytest.mark.parametrize("indexes", [[0, 0], [0, 5], [1]])
def test_f10_entries_come_in_order_or_the_batch_ends(net, indexes):
    b = net.daemon("bravo")
    wire = crafted.start_batch(b.address, 2, 0)
    wire.send(b"".join(crafted.frame({"type": "folder", "index": i, "path": [f"d{n}"]})
                       for n, i in enumerate(indexes)))
    assert wire.error().code == "bad-index"
    wire.close()


def test_f10_a_repeated_json_key_is_refused(net):
    b = net.daemon("bravo")
    wire = crafted.connect(b.address)
    wire.send(proto.PREFACE + crafted.frame(b'{"type":"offer","name":"m","entries":1,"size":1,"size":0}'))
    assert wire.error().code == "bad-json"
    wire.close()
    answer = b.request("status", extra=1)  # and on the command socket
    assert answer[-1]["code"] == "bad-request"
    with b.command_connection() as sock:
        sock.sendall(b'{"cmd":"status","cmd":"peers"}\n')
        assert read_answers(sock)[-1]["code"] == "bad-json"


def test_f10_a_long_name_that_is_taken_gets_a_numbered_name_within_the_limit(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    name = "a." + "x" * 253
    f = tmp_path / name
    f.write_text("new")
    b.downloads.mkdir(exist_ok=True)
    (b.downloads / name).write_text("old")
    out = a.cli("send", b.address, str(f))
    assert out.returncode == 0, out.stderr
    saved = [n for n in os.listdir(b.downloads) if n != name]
    assert len(saved) == 1 and len(saved[0].encode()) <= proto.MAX_NAME_BYTES and "(1)" in saved[0]
    assert filecmp.cmp(f, b.downloads / saved[0], shallow=False)


def test_f10_a_request_line_over_the_limit_gets_its_answer_not_a_broken_pipe(net):
    b = net.daemon("bravo")
    with b.command_connection() as sock:
        sock.sendall(b"x" * (2 * api.MAX_LINE_BYTES) + b"\n")
        assert read_answers(sock)[-1]["code"] == "line-too-long"
    assert b.request("status")[-1]["ok"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
