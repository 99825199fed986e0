"""The history in a running daemon (issue 13): every finished transfer and
message, in and out, in STATE_DIR/history.jsonl; `tnet history` and the
`history` request; restarts, corrupt lines, HISTORY_MAX, modes."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess

from conftest import next_address, wait_until


def history_of(daemon, **args):
    answer = daemon.request("history", **args)[-1]
    assert answer["ok"], answer
    return answer


def history_file(daemon):
    return daemon.dir / "state" / "history.jsonl"


def test_a_hundred_transfers_and_a_hundred_messages_both_ways_survive_a_restart(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    sent = []
    for i in range(100):
        folder = tmp_path / f"batch{i}"
        folder.mkdir()
        files = [folder / f"f{i}.txt"] + ([folder / f"g{i}.bin"] if i % 10 == 0 else [])
        for n, f in enumerate(files):
            f.write_bytes(f"file {i} {n} ".encode() * (i + 1))
        answer = a.request("send", peer=b.address, paths=[str(f) for f in files])[-1]
        assert answer["ok"], answer
        sent.append(files)
    for i in range(100):
        sender, receiver = (a, b) if i % 2 else (b, a)
        assert sender.request("message", peer=receiver.address, text=f"note {i}")[-1]["ok"]

    out = history_of(a)
    assert out["skipped"] == 0 and out["omitted"] == 0 and len(out["entries"]) == 200
    transfers = [e for e in out["entries"] if e["kind"] == "transfer"]
    assert len(transfers) == 100
    for entry, files in zip(transfers, sent):
        assert (entry["direction"], entry["peer"], entry["name"], entry["code"]) == ("out", b.address, "bravo", "ok")
        assert [(f["file"], f["size"]) for f in entry["files"]] == [(f.name, f.stat().st_size) for f in files]
        assert entry["files_total"] == len(files) and entry["bytes"] == sum(f.stat().st_size for f in files)
    messages = [e for e in out["entries"] if e["kind"] == "message"]
    assert [(m["direction"], m["text"]) for m in messages] == [
        ("out" if i % 2 else "in", f"note {i}") for i in range(100)]
    assert all(m["peer"] == b.address and m["code"] == "ok" for m in messages)
    assert all(m["name"] == "bravo" for m in messages)  # out: from bravo's ack; in: what bravo said

    got = history_of(b)["entries"]
    incoming = [e for e in got if e["kind"] == "transfer"]
    assert len(incoming) == 100 and all(e["direction"] == "in" and e["code"] == "ok" for e in incoming)
    for entry, files in zip(incoming, sent):
        assert entry["peer"] == a.address and entry["name"] == "alpha" and entry["files_total"] == len(files)
        for record, f in zip(entry["files"], files):
            saved = b.downloads / f.name
            assert record == {"file": f.name, "path": str(saved), "size": f.stat().st_size,
                              "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    assert len(history_file(b).read_bytes().splitlines()) == 200

    assert b.terminate() == 0
    b.start()
    assert history_of(b)["entries"] == got  # the same history after a restart
    assert b.request("message", peer=a.address, text="after the restart")[-1]["ok"]
    again = history_of(b)["entries"]
    assert again[:-1] == got and again[-1]["text"] == "after the restart" and again[-1]["direction"] == "out"


def test_a_corrupt_line_is_skipped_with_a_warning_and_the_daemon_goes_on(net):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    for i in range(3):
        assert a.request("message", peer=b.address, text=f"m{i}")[-1]["ok"]
    assert a.terminate() == 0
    lines = history_file(a).read_bytes().splitlines(keepends=True)
    history_file(a).write_bytes(lines[0] + b'{"time": 1, "kind": "mess\xff\n' + lines[1] + lines[2]
                                + b'{"time": 17')  # a hand-edited line, and a torn tail
    a.start()
    answer = history_of(a)
    assert [e["text"] for e in answer["entries"]] == ["m0", "m1", "m2"] and answer["skipped"] == 2
    out = a.cli("history")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 3 and "2 corrupt lines" in out.stderr and "warning" in out.stderr
    assert a.request("message", peer=b.address, text="m3")[-1]["ok"]  # appends step over the torn tail
    assert [e["text"] for e in history_of(a)["entries"]] == ["m0", "m1", "m2", "m3"]


def test_history_max_is_honoured(net):
    a, b = net.daemon("alpha", HISTORY_MAX="5"), net.daemon("bravo")
    for i in range(106):  # 5 + a slack of 100, then one more: the file is cut to the newest 5
        assert a.request("message", peer=b.address, text=f"m{i}")[-1]["ok"]
    assert [e["text"] for e in history_of(a)["entries"]] == [f"m{i}" for i in range(101, 106)]
    assert len(history_file(a).read_bytes().splitlines()) == 5
    assert [e["text"] for e in history_of(a, limit=2)["entries"]] == ["m104", "m105"]
    assert a.terminate() == 0
    a.start()
    assert len(history_of(a)["entries"]) == 5


def test_tnet_history_filters_by_peer_and_limit_and_prints_a_line_per_entry(net, tmp_path):
    a, b, c = net.daemon("alpha"), net.daemon("bravo"), net.daemon("Charlie")
    f = tmp_path / "f.txt"
    f.write_text("hello")
    assert a.cli("send", b.address, str(f)).returncode == 0
    for i in range(4):
        assert a.cli("message", (b if i % 2 else c).address, f"hi {i}").returncode == 0

    def entries(*args):
        out = a.cli("history", "--json", *args)
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]

    assert [e.get("text") for e in entries()] == [None, "hi 0", "hi 1", "hi 2", "hi 3"]
    assert [e["text"] for e in entries("--peer", "charlie")] == ["hi 0", "hi 2"]  # a name in any case
    assert [e["text"] for e in entries("--peer", c.address)] == ["hi 0", "hi 2"]
    assert [e.get("text") for e in entries("--peer", "bravo", "--limit", "2")] == ["hi 1", "hi 3"]
    assert [e["kind"] for e in entries("--limit", "5", "--peer", b.address)] == ["transfer", "message", "message"]
    assert entries("--peer", "nobody") == []

    people = a.cli("history", "--limit", "2")
    lines = people.stdout.splitlines()
    assert people.returncode == 0 and len(lines) == 2 and people.stderr == ""
    assert lines[0].split()[2:4] == ["out", "Charlie"]
    assert lines[1].split()[2:] == ["out", "bravo", f"({b.address})", "message:", "hi", "3", "ok"]
    transfer = a.cli("history", "--peer", "bravo", "--limit", "3").stdout.splitlines()[0]
    assert "out" in transfer and "1 file, 5 B: f.txt" in transfer and transfer.endswith("ok")
    bad = a.cli("history", "--limit", "0")
    assert bad.returncode == 2
    assert a.request("history", limit=0)[-1]["code"] == "bad-request"
    assert a.request("history", peer=5)[-1]["code"] == "bad-request"


def test_failures_are_recorded_too(net, tmp_path):
    a = net.daemon("alpha")
    b = net.daemon("bravo", ALLOW_FROM="127.0.0.1")  # not alpha
    f = tmp_path / "f.txt"
    f.write_text("x")
    assert a.cli("send", b.address, str(f)).returncode == 5
    assert a.cli("message", "nobody-here", "anyone?").returncode == 4
    assert a.cli("message", b.address, "let me in").returncode == 5
    entries = history_of(a)["entries"]
    assert [(e["kind"], e["direction"], e["code"]) for e in entries] == [
        ("transfer", "out", "refused"), ("message", "out", "unknown-peer"), ("message", "out", "refused")]
    assert entries[1]["name"] == "nobody-here" and entries[1]["peer"] == ""
    assert entries[2]["peer"] == b.address and entries[0]["peer"] == b.address
    assert history_of(b)["entries"] == []  # a refused offer or message is no transfer: nothing to flood it with


def test_the_file_is_private_and_an_unusable_state_dir_stops_the_daemon(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    assert a.request("message", peer=b.address, text="x")[-1]["ok"]
    assert stat.S_IMODE(os.stat(history_file(a)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(history_file(a).parent).st_mode) == 0o700

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    c = net.daemon("charlie", start=False, STATE_DIR=str(blocker / "state"))
    out = subprocess.run(c.cli_args("daemon"), env=c.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "STATE_DIR=" in out.stderr and "Traceback" not in out.stderr
    assert not os.path.exists(c.command_socket)
    # Two daemons, one STATE_DIR: the second is told, not let in to interleave its rewrites.
    d = net.daemon("delta", start=False, STATE_DIR=a.env["STATE_DIR"])
    out = subprocess.run(d.cli_args("daemon"), env=d.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "another tnet daemon writes its history there" in out.stderr
    assert a.request("status")[-1]["ok"]


def test_a_declined_offer_is_recorded_on_both_sides(net, tmp_path):
    a = net.daemon("alpha")
    b = net.daemon("bravo", ACCEPT="ask")
    f = tmp_path / "f.txt"
    f.write_text("x")
    eb = b.events()
    send = subprocess.Popen(a.cli_args("send", b.address, str(f)), env=a.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        offer = eb.wait_for(lambda e: e["event"] == "offer")
        assert b.request("decline", id=offer["id"])[-1]["ok"]
        assert send.wait(30) == 5
    finally:
        send.kill()
    wait_until(lambda: history_of(b)["entries"], what="bravo's history of the declined offer")
    (entry,) = history_of(b)["entries"]
    assert (entry["direction"], entry["code"], entry["id"]) == ("in", "declined", offer["id"])
    (out,) = history_of(a)["entries"]
    assert (out["direction"], out["code"], out["files"]) == ("out", "declined", [])


def test_a_message_whose_client_went_away_is_recorded_as_cancelled(net):
    a = net.daemon("alpha")
    silent = socket.socket()  # takes the connection, never answers
    silent.bind((next_address(), 0xC00D))
    silent.listen()
    try:
        with a.command_connection() as client:
            client.sendall(json.dumps({"cmd": "message", "peer": silent.getsockname()[0], "text": "hello?"}).encode()
                           + b"\n")
            silent.settimeout(20)
            conn, _ = silent.accept()
        # The client is gone (as with Ctrl-C): the message is cancelled, and the history says so.
        (entry,) = wait_until(lambda: history_of(a)["entries"], what="the cancelled message in the history")
        assert (entry["direction"], entry["code"], entry["text"]) == ("out", "cancelled", "hello?")
        assert entry["peer"] == silent.getsockname()[0]
        conn.close()
    finally:
        silent.close()


def test_a_hand_edited_entry_of_odd_fields_still_prints():
    from tnet.cli import history_row

    assert history_row({})[:3] == ["?", "?", "?"]
    row = history_row({"time": "noon", "kind": "transfer", "files": "many", "files_total": True, "bytes": "1",
                       "name": "evil\x1b[2J", "code": 7})
    assert row[0] == "?" and row[2] == "evil\\x1b[2J" and row[3] == "0 files, 0 B" and row[4] == "7"
    long = history_row({"kind": "message", "text": "x" * 100, "peer": "10.0.0.1"})
    assert long[2] == "10.0.0.1" and len(long[3]) == len("message: ") + 60
