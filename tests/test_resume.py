"""Resume (§7) between loopback daemons and hand-driven peers: what a broken
transfer leaves is kept and resumed, only when it is the same file from the
same sender, and a lying peer or an edited record never gets a corrupt file
in. The real links cut and daemons killed are in tests/netns/test_resume.py."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import crafted
from conftest import next_address, random_file, wait_until
from test_cli import MidFile

from tnet import protocol as proto

MiB = 1024 * 1024
V2 = proto.MAGIC + bytes([2])


def send_partial(daemon, sender_name: str, path: Path, cut: int) -> None:
    """As ``sender_name`` would: offer ``path``, send its first ``cut`` bytes, then vanish."""
    data = path.read_bytes()
    wire = crafted.connect(daemon.address)
    wire.send(V2 + crafted.offer(1, len(data), name=sender_name))
    wire.wait_for(proto.Accept)
    wire.send(crafted.frame({"type": "file", "index": 0, "path": [path.name], "size": len(data),
                             "mtime": path.stat().st_mtime_ns}))
    assert wire.wait_for(proto.Resume).offset == 0
    wire.send(crafted.frame({"type": "from", "index": 0, "offset": 0, "size": len(data)}) + data[:cut])
    wire.close()


def kept(daemon) -> List[Dict[str, Any]]:
    return daemon.request("transfers")[-1]["kept"]


def sent_json(daemon, *args: str) -> Dict[str, Any]:
    out = daemon.cli("send", "--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_what_arrived_of_a_broken_transfer_is_kept_and_resumed(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    f = random_file(tmp_path / "f.bin", 8 * MiB, seed=1)
    send_partial(b, "alpha", f, 3 * MiB)
    [partial] = wait_until(lambda: [k for k in kept(b) if k["kept"] == 3 * MiB], what="the partial kept")
    assert partial["file"] == "f.bin" and partial["name"] == "alpha" and partial["size"] == 8 * MiB
    assert os.listdir(b.downloads) == []  # never visible as a file
    final = sent_json(a, b.address, str(f))
    assert final["resumed_bytes"] == 3 * MiB
    assert filecmp.cmp(f, b.downloads / "f.bin", shallow=False)
    assert kept(b) == [] and b.temp_files() == []


def test_a_partial_of_another_sender_or_another_version_of_the_file_is_not_used(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    f = random_file(tmp_path / "f.bin", 4 * MiB, seed=2)
    send_partial(b, "mallory", f, 3 * MiB)  # same path, another sender
    wait_until(lambda: kept(b), what="mallory's partial kept")
    assert sent_json(a, b.address, str(f))["resumed_bytes"] == 0
    assert filecmp.cmp(f, b.downloads / "f.bin", shallow=False)
    send_partial(b, "alpha", f, 3 * MiB)
    wait_until(lambda: [k for k in kept(b) if k["name"] == "alpha"], what="alpha's partial kept")
    with open(f, "r+b") as changed:  # the source changes between attempts: another file now
        changed.write(b"new content")
    final = sent_json(a, b.address, str(f))
    assert final["resumed_bytes"] == 0
    assert filecmp.cmp(f, b.downloads / "f (1).bin", shallow=False)


def keep_folder(daemon) -> Path:
    return daemon.temp / f".tnet-keep-{os.geteuid()}"


def test_an_edited_partial_or_record_is_not_resumed_and_nothing_corrupt_lands(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    f = random_file(tmp_path / "f.bin", 4 * MiB, seed=3)
    for edit in ("partial", "record"):
        send_partial(b, "alpha", f, 2 * MiB)
        [part] = wait_until(lambda: list(keep_folder(b).glob("*.part")), what="the partial kept")
        record = part.with_suffix(".json")
        wait_until(lambda record=record: json.loads(record.read_text()).get("kept") == 2 * MiB,
                   what="its record written")
        if edit == "partial":
            with open(part, "r+b") as held:
                held.write(b"tampered")
        else:
            data = json.loads(record.read_text())
            record.write_text(json.dumps(dict(data, kept=1 * MiB)))
        final = sent_json(a, b.address, str(f))
        assert final["resumed_bytes"] == 0, edit
        assert "does not match its record" in b.log()
        for saved in b.downloads.iterdir():
            assert filecmp.cmp(f, saved, shallow=False), saved


def test_a_receiver_claiming_more_than_the_file_is_refused(net, tmp_path):
    a = net.daemon("alpha")
    f = random_file(tmp_path / "f.bin", 2 * MiB, seed=4)
    with crafted.sending(a, next_address(), str(f), "--no-retry") as (receiver, cli):
        wire, _ = receiver.take_offer()
        header = wire.wait_for(proto.FileHeader)
        assert header.mtime == f.stat().st_mtime_ns
        wire.send(crafted.resume(0, 2 * MiB + 1, b"x" * (2 * MiB + 1)))
        _, stderr = cli.communicate(timeout=60)
    assert cli.returncode != 0 and "bad-resume" in stderr, stderr


def test_a_receiver_whose_prefix_is_not_ours_gets_the_whole_file(net, tmp_path):
    a = net.daemon("alpha")
    f = random_file(tmp_path / "f.bin", 2 * MiB, seed=5)
    with crafted.sending(a, next_address(), str(f), "--json") as (receiver, cli):
        wire, _ = receiver.take_offer()
        wire.wait_for(proto.FileHeader)
        wire.send(crafted.resume(0, MiB, b"not the file" * 1000))
        start = wire.wait_for(proto.FileFrom)
        assert (start.offset, start.size) == (0, 2 * MiB)
        data = bytearray()
        while len(data) < 2 * MiB:
            data += b"".join(bytes(e.data) for e in wire.events if isinstance(e, proto.FileData))
            wire.events = [e for e in wire.events if not isinstance(e, proto.FileData)]
            if len(data) < 2 * MiB:
                assert wire.pump()
        end = wire.wait_for(proto.FileEnd)
        assert bytes(data) == f.read_bytes() and end.sha256 == hashlib.sha256(data).hexdigest()
        wire.send(crafted.frame({"type": "done", "index": 0}))
        stdout, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 0, stderr
    assert json.loads(stdout.splitlines()[-1])["resumed_bytes"] == 0


def test_a_receiver_restarting_mid_file_is_resumed_by_the_running_send(net, tmp_path):
    a = net.daemon("alpha")
    b = net.daemon("bravo", ACCEPT="ask", IDLE_TIMEOUT="5")
    events = b.events()
    big = random_file(tmp_path / "big.bin", 64 * MiB, seed=6)
    held = MidFile(a, b, events, big, "--json")
    try:
        received = held.listed[0]["bytes"]
        assert b.terminate() == 0  # SIGTERM: it says `shutdown` and keeps what arrived
        b.start()
        assert kept(b) and kept(b)[0]["kept"] >= received
        again = b.events()
        held.release(a)
        offer = again.wait_for(lambda e: e["event"] == "offer", timeout=60)
        assert b.cli("accept", offer["id"]).returncode == 0
        stdout, stderr = held.send.communicate(timeout=120)
    finally:
        held.release_all()
    assert held.send.returncode == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert any(line.get("event") == "retrying" for line in lines)
    assert lines[-1]["resumed_bytes"] >= received and lines[-1]["attempts"] >= 2
    assert filecmp.cmp(big, b.downloads / "big.bin", shallow=False)
    assert kept(b) == []


def test_a_peer_that_was_never_reached_fails_at_once(net, tmp_path):
    a = net.daemon("alpha")
    f = tmp_path / "f.txt"
    f.write_text("x")
    with socket.socket() as closed_port:
        closed_port.bind((next_address(), 0))
        out = a.cli("send", closed_port.getsockname()[0], str(f), timeout=60)
    assert out.returncode == 4 and "retrying" not in out.stdout and "resuming" not in out.stdout


def waiting_send(a, b, f: Path, *options: str) -> subprocess.Popen:
    """A `tnet send` from ``a`` whose receiver ``b`` (ACCEPT=ask) went away mid-offer:
    it has failed one attempt and waits to try again."""
    send = subprocess.Popen(a.cli_args("send", "--json", *options, b.address, str(f)), env=a.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b.events().wait_for(lambda e: e["event"] == "offer")
    assert b.terminate() == 0
    return send


def ended(send: subprocess.Popen) -> List[Dict[str, Any]]:
    try:
        stdout, _ = send.communicate(timeout=60)
    finally:
        if send.poll() is None:
            send.kill()
            send.communicate()
    return [json.loads(line) for line in stdout.splitlines()]


def test_a_send_whose_next_attempt_cannot_start_says_it_ended(net, tmp_path):
    """Every connection taken (MAX_CONNECTIONS) while the send waits: no attempt
    starts, so the send itself publishes its end, with the code it ends with."""
    a, b = net.daemon("alpha", MAX_CONNECTIONS="2"), net.daemon("bravo", ACCEPT="ask")
    events = a.events()
    send = waiting_send(a, b, random_file(tmp_path / "f.bin", MiB, seed=8), "--retry-for", "3")
    first = events.wait_for(lambda e: e["event"] == "transfer-failed")
    held = [socket.create_connection((a.address, crafted.PORT), 30) for _ in range(2)]
    try:
        lines = ended(send)
    finally:
        for sock in held:
            sock.close()
    assert send.returncode != 0 and lines[-1]["code"] == "busy"
    last = events.wait_for(lambda e: e["event"] == "transfer-failed" and e["code"] == "busy", what="the end")
    assert last["id"] == first["id"] and a.request("transfers")[-1]["transfers"] == []
    assert a.request("history")[-1]["entries"][-1]["code"] == "busy"


def test_a_send_waiting_when_its_daemon_stops_ends_with_shutdown(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", ACCEPT="ask")
    events = a.events()
    send = waiting_send(a, b, random_file(tmp_path / "f.bin", MiB, seed=9))
    first = events.wait_for(lambda e: e["event"] == "transfer-failed")
    wait_until(lambda: any(t["id"] == first["id"] for t in a.request("transfers")[-1]["transfers"]),
               what="the send to wait")
    assert a.terminate() == 0
    lines = ended(send)
    assert send.returncode == 4 and lines[-1]["code"] == "shutdown"
    assert first["message"] == "bravo is shutting down"  # the receiver's; now the sender's own:
    last = events.wait_for(lambda e: e["event"] == "transfer-failed" and e["message"] == lines[-1]["error"],
                           what="the end")
    assert last["id"] == first["id"] and last["code"] == "shutdown" and lines[-1]["error"] != first["message"]
    history = [json.loads(line) for line in (a.dir / "state" / "history.jsonl").read_text().splitlines()]
    codes = [e["code"] for e in history if e.get("id") == first["id"]]
    assert codes == ["shutdown", "shutdown"]  # the attempt's, then the send's


def test_a_send_between_two_attempts_is_listed_and_cancelled(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", ACCEPT="ask")
    sent_events, offers = a.events(), b.events()
    f = random_file(tmp_path / "f.bin", MiB, seed=7)
    send = subprocess.Popen(a.cli_args("send", "--json", b.address, str(f)), env=a.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        offers.wait_for(lambda e: e["event"] == "offer")
        assert b.terminate() == 0  # it says `shutdown`: the sender waits and tries again, then finds nobody
        # The fourth failed attempt is followed by a 4 s wait, and the send is listed through it.
        failed = wait_until(lambda: [e for e in list(sent_events.events) if e["event"] == "transfer-failed"][3:],
                            what="four failed attempts")[0]
        [listed] = [t for t in a.request("transfers")[-1]["transfers"] if t["id"] == failed["id"]]
        assert listed["direction"] == "out" and listed["file"] == "" and listed["size"] == MiB
        assert a.request("cancel", id=failed["id"])[-1]["ok"]
        stdout, _ = send.communicate(timeout=60)
    finally:
        if send.poll() is None:
            send.kill()
            send.communicate()
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert send.returncode == 8 and lines[-1]["code"] == "cancelled"
    assert [line["attempt"] for line in lines if line.get("event") == "retrying"] == [2, 3, 4, 5]
    sent_events.wait_for(lambda e: e["event"] == "transfer-failed" and e["code"] == "cancelled"
                         and e["id"] == failed["id"], what="the send's end")
    assert a.request("transfers")[-1]["transfers"] == []
    assert a.request("history")[-1]["entries"][-1]["code"] == "cancelled"
