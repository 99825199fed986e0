"""Sending to LocalSend devices (lssend): tnet daemons on loopback with LOCALSEND=1, one
sending with `tnet send` / `tnet message` to another's LocalSend door, over HTTPS and
HTTP. The receiver is LocalSend-only to the sender (another discovery port, another
RECEIVE_PORT: a tnet attempt could not reach it), so what lands came by LocalSend; a
dual daemon, found both ways, gets tnet. Plus the rule that picks the target, without
sockets."""

from __future__ import annotations

import filecmp
import http.server
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from conftest import free_udp_port, next_address, random_file, wait_until
from lsclient import INFO, Sender

from tnet import tls, x509
from tnet.discovery import Directory, PeerRecord
from tnet.lsfind import Device
from tnet.lssend import Targets

SENDER_ALIAS = "alpha-ls"  # what a LocalSend receiver calls the sender: tnet calls it "alpha"


@pytest.fixture(scope="session")
def identities() -> Dict[str, x509.Identity]:
    """A certificate per HTTPS daemon name, made once per run (a second each): each must have its own
    fingerprint, or each would take the other's announcements for its own."""
    return {}


def free_tcp_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


@pytest.fixture(name="ls_pair")
def localsend_pair(net, identities):
    port = free_udp_port()

    def make(name: str, https: bool = True, hidden: bool = False, **env: str):
        """A daemon with LOCALSEND=1; ``hidden``: LocalSend-only to the others (its own discovery
        port and RECEIVE_PORT)."""
        if hidden:
            env = dict(env, BROADCAST_PORT=str(free_udp_port()), RECEIVE_PORT=str(free_tcp_port()))
        d = net.daemon(name, start=False, LOCALSEND="1", LOCALSEND_PORT=str(port),
                       LOCALSEND_HTTPS="1" if https else "0", **env)
        if https:
            identity = identities.setdefault(name, x509.make_identity("tnet", time.time()))
            state = Path(d.env["STATE_DIR"])
            state.mkdir(mode=0o700, parents=True)
            for file, text in ((tls.KEY_FILE, identity.key_pem), (tls.CERT_FILE, identity.cert_pem)):
                fd = os.open(state / file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, text.encode())
                os.close(fd)
        d.start()
        d.ls_port, d.https = port, https
        return d

    return make


def sees(d, alias: str) -> Dict[str, Any]:
    """The LocalSend device ``alias`` once ``d`` lists it."""
    def found() -> Any:
        peers = d.request("discover", timeout=0.5)[-1]["peers"]
        return next((p for p in peers if p["name"] == alias and p.get("kind") == "localsend"), None)

    return wait_until(found, what=f"{d.name} to see {alias}", interval=0.2)


def json_lines(out: subprocess.CompletedProcess) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def tree(root: Path) -> List[str]:
    return sorted(os.path.relpath(os.path.join(top, name), root) for top, dirs, files in os.walk(root)
                  for name in dirs + files)


@pytest.mark.parametrize("https", [True, False], ids=["https", "http"])
def test_files_a_folder_and_an_empty_file_reach_a_localsend_only_daemon(ls_pair, tmp_path, https):
    alpha = ls_pair("alpha", https=https, LOCALSEND_ALIAS=SENDER_ALIAS, REPORT_PROGRESS_OUT="1")
    bravo = ls_pair("bravo", https=https, hidden=True)
    device = sees(alpha, "bravo")
    assert (device["address"], device["protocol"]) == (bravo.address, "https" if https else "http")
    src = tmp_path / "src"
    (src / "photos" / "2024").mkdir(parents=True)
    (src / "photos" / "nothing here").mkdir()
    big = random_file(src / "big.bin", 3 * 1024 * 1024 + 5, seed=1)
    (src / "photos" / "2024" / "a.jpg").write_bytes(b"\xff\xd8jpeg")
    (src / "photos" / "notes.txt").write_text("notes\n")
    empty = src / "empty.dat"
    empty.write_bytes(b"")
    theirs, ours = bravo.events(), alpha.events()
    out = alpha.cli("send", "--json", "BRAVO", str(big), str(src / "photos"), str(empty))
    assert out.returncode == 0, out.stdout + out.stderr + alpha.log()
    lines = json_lines(out)
    final = lines[-1]
    assert final["ok"] is True and final["name"] == "bravo" and final["peer"] == bravo.address
    assert (final["files"], final["bytes"], final["attempts"], final["resumed_bytes"]) == (7, 3 * 1024 * 1024 + 17,
                                                                                          1, 0)
    started = lines[0]
    assert started["event"] == "started" and started["id"] == final["id"] and started["files"] == 7
    done = [line["file"] for line in lines if line.get("event") == "file-done"]
    assert done == ["big.bin", "photos", "photos/2024", "photos/2024/a.jpg", "photos/notes.txt", "empty.dat"]
    skipped = [line for line in lines if line.get("event") == "skipped"]
    assert [s["path"] for s in skipped] == [str(src / "photos" / "nothing here")]
    assert any(line.get("event") == "progress" for line in lines)
    for name in ("big.bin", "photos/2024/a.jpg", "photos/notes.txt", "empty.dat"):
        assert filecmp.cmp(src / name, bravo.downloads / name, shallow=False), name
    assert tree(bravo.downloads) == ["big.bin", "empty.dat", "photos", "photos/2024", "photos/2024/a.jpg",
                                     "photos/notes.txt"]
    received = theirs.wait_for(lambda e: e["event"] == "transfer-done")
    assert received["name"] == SENDER_ALIAS and received["files"] == 4  # it came by LocalSend
    sent = ours.wait_for(lambda e: e["event"] == "transfer-done")
    assert (sent["direction"], sent["name"], sent["id"]) == ("out", "bravo", final["id"])
    assert ours.of("transfer-started")[0]["id"] == final["id"] and ours.of("progress")
    entry = alpha.request("history")[-1]["entries"][-1]
    assert (entry["direction"], entry["name"], entry["code"], entry["files_total"]) == ("out", "bravo", "ok", 4)
    assert {f["file"] for f in entry["files"]} == {"big.bin", "photos/2024/a.jpg", "photos/notes.txt", "empty.dat"}
    assert alpha.request("transfers")[-1]["transfers"] == [] and bravo.temp_files() == []


def test_people_see_the_same_lines_as_for_a_tnet_peer(ls_pair, tmp_path):
    alpha = ls_pair("alpha", https=False)
    bravo = ls_pair("bravo", https=False, hidden=True)
    sees(alpha, "bravo")
    note = tmp_path / "note.txt"
    note.write_text("hi\n")
    out = alpha.cli("send", bravo.address, str(note))  # by address: a LocalSend device seen there
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"sending 1 item (3 B) to {bravo.address}, transfer ")
    assert lines[1].startswith("sent note.txt (3 B)")
    assert lines[-1].startswith("1 file, 3 B in ") and lines[-1].endswith(" to bravo")
    assert (bravo.downloads / "note.txt").read_text() == "hi\n"


@pytest.mark.parametrize("https", [True, False], ids=["https", "http"])
def test_a_message_arrives_as_a_message(ls_pair, https):
    alpha = ls_pair("alpha", https=https, LOCALSEND_ALIAS=SENDER_ALIAS)
    bravo = ls_pair("bravo", https=https, hidden=True)
    sees(alpha, "bravo")
    events = bravo.events()
    out = alpha.cli("message", "bravo", "lunch? \u2615")
    assert out.returncode == 0, out.stderr + alpha.log()
    assert out.stdout == f"delivered to bravo ({bravo.address})\n"
    message = events.wait_for(lambda e: e["event"] == "message")
    assert (message["text"], message["name"], message["peer"]) == ("lunch? \u2615", SENDER_ALIAS, alpha.address)
    assert tree(bravo.downloads) == []
    entry = alpha.request("history")[-1]["entries"][-1]
    assert (entry["kind"], entry["direction"], entry["peer"], entry["code"]) == ("message", "out", bravo.address,
                                                                                "ok")


def test_a_declined_offer_is_exit_5_and_a_cancel_withdraws_a_held_one(ls_pair, tmp_path):
    alpha = ls_pair("alpha", https=False)
    bravo = ls_pair("bravo", https=False, hidden=True, ACCEPT="ask", ASK_TIMEOUT="60")
    sees(alpha, "bravo")
    note = tmp_path / "note.txt"
    note.write_text("hi\n")
    events, sent = bravo.events(), alpha.events()
    send = subprocess.Popen(alpha.cli_args("send", "bravo", str(note)), env=alpha.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=alpha.dir)
    offer = events.wait_for(lambda e: e["event"] == "offer")
    assert bravo.cli("decline", offer["id"]).returncode == 0
    _, err = send.communicate(timeout=60)
    assert send.returncode == 5 and "declined" in err, err
    assert tree(bravo.downloads) == []

    # Held again; this time the sender cancels: the receiver hears of it and drops the offer.
    send = subprocess.Popen(alpha.cli_args("send", "--json", "bravo", str(note)), env=alpha.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=alpha.dir)
    second = events.wait_for(lambda e: e["event"] == "offer" and e["id"] != offer["id"])
    transfer = wait_until(lambda: alpha.request("transfers")[-1]["transfers"], what="the send to be listed")[0]
    assert (transfer["direction"], transfer["name"], transfer["peer"]) == ("out", "bravo", bravo.address)
    assert alpha.cli("cancel", transfer["id"]).returncode == 0
    out, _ = send.communicate(timeout=60)
    assert send.returncode == 8 and json_lines(subprocess.CompletedProcess([], 8, out))[-1]["code"] == "cancelled"
    gone = events.wait_for(lambda e: e["event"] == "transfer-failed" and e["id"] == second["id"])
    assert gone["code"] == "cancelled"
    assert bravo.request("transfers")[-1]["transfers"] == []
    ends = wait_until(lambda: sent.of("transfer-failed")[1:] and sent.of("transfer-failed"), what="both sends' ends")
    assert [e["code"] for e in ends] == ["declined", "cancelled"] and len({e["id"] for e in ends}) == 2  # one each


def test_a_sender_whose_client_goes_away_withdraws_its_offer(ls_pair, tmp_path):
    alpha = ls_pair("alpha", https=True)
    bravo = ls_pair("bravo", https=True, hidden=True, ACCEPT="ask", ASK_TIMEOUT="60")
    sees(alpha, "bravo")
    note = tmp_path / "note.txt"
    note.write_text("hi\n")
    events = bravo.events()
    send = subprocess.Popen(alpha.cli_args("send", "bravo", str(note)), env=alpha.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=alpha.dir)
    offer = events.wait_for(lambda e: e["event"] == "offer")
    send.kill()
    send.wait()
    gone = events.wait_for(lambda e: e["event"] == "transfer-failed" and e["id"] == offer["id"])
    assert gone["code"] == "cancelled"
    wait_until(lambda: alpha.request("transfers")[-1]["transfers"] == [], what="the send to end")


def test_a_pin_is_asked_for_and_a_wrong_one_refused(ls_pair, tmp_path):
    alpha = ls_pair("alpha", https=True)
    bravo = ls_pair("bravo", https=True, hidden=True, LOCALSEND_PIN="4711")
    sees(alpha, "bravo")
    note = tmp_path / "note.txt"
    note.write_text("hi\n")
    out = alpha.cli("send", "bravo", str(note))
    assert out.returncode == 5 and "pin-required" in out.stderr and "asks for a PIN" in out.stderr, out.stderr
    out = alpha.cli("send", "--json", "--pin", "0000", "bravo", str(note))
    final = json_lines(out)[-1]
    assert out.returncode == 5 and (final["code"], final["ok"]) == ("pin-required", False)
    assert "refused the PIN" in final["error"]
    assert alpha.cli("message", "--pin", "0000", "bravo", "hello").returncode == 5
    assert tree(bravo.downloads) == []
    out = alpha.cli("send", "--pin", "4711", "bravo", str(note))
    assert out.returncode == 0, out.stderr
    assert (bravo.downloads / "note.txt").read_text() == "hi\n"


def test_a_name_both_kinds_have_goes_to_tnet_and_several_peers_mix(ls_pair, tmp_path):
    alpha = ls_pair("alpha", https=False, LOCALSEND_ALIAS=SENDER_ALIAS)
    bravo = ls_pair("bravo", https=False, hidden=True)
    charlie = ls_pair("charlie", https=False)  # tnet and LocalSend both
    sees(alpha, "bravo")
    sees(alpha, "charlie")
    note = tmp_path / "note.txt"
    note.write_text("both\n")
    theirs = {d.name: d.events() for d in (bravo, charlie)}
    out = alpha.cli("send", "--json", "bravo,charlie", str(note))
    assert out.returncode == 0, out.stdout + out.stderr
    results = {r["peer_given"]: r for r in json_lines(out)[-1]["results"]}
    assert results["bravo"]["ok"] and results["charlie"]["ok"]
    for d in (bravo, charlie):
        assert (d.downloads / "note.txt").read_text() == "both\n"
    assert theirs["bravo"].wait_for(lambda e: e["event"] == "transfer-done")["name"] == SENDER_ALIAS
    assert theirs["charlie"].wait_for(lambda e: e["event"] == "transfer-done")["name"] == "alpha"  # by tnet
    out = alpha.cli("message", "bravo,charlie", "both ways")
    assert out.returncode == 0, out.stderr
    assert theirs["bravo"].wait_for(lambda e: e["event"] == "message")["name"] == SENDER_ALIAS
    assert theirs["charlie"].wait_for(lambda e: e["event"] == "message")["name"] == "alpha"


def test_a_device_whose_certificate_is_not_the_announced_one_gets_nothing(ls_pair, tmp_path):
    alpha = ls_pair("alpha", https=True)
    bravo = ls_pair("bravo", https=True, hidden=True)
    sees(alpha, "bravo")
    # Someone at bravo's address claims another fingerprint for bravo's port: the pinned handshake fails.
    claim = dict(INFO, alias="impostor", fingerprint="0" * 64, port=bravo.ls_port, protocol="https")
    status, _ = Sender(alpha.address, alpha.ls_port, True, source=bravo.address).call(
        "POST", "/api/localsend/v2/register", json.dumps(claim))
    assert status == 200
    note = tmp_path / "note.txt"
    note.write_text("secret\n")
    out = alpha.cli("send", "impostor", str(note))
    assert out.returncode == 4 and "fingerprint-mismatch" in out.stderr, out.stderr
    assert tree(bravo.downloads) == []


# --- which kind a target is, without sockets ---------------------------------------------------------


class FakeDiscovery:
    def __init__(self, names: Dict[str, str]) -> None:
        self.directory = Directory()
        for address, name in names.items():
            self.directory.learn(PeerRecord(name, address, 0.0))
        self.discovered = 0

    def discover(self, timeout: float, on_done: Any) -> None:
        self.discovered += 1
        on_done({})


class FakeLocalSend:
    def __init__(self, devices: List[Device]) -> None:
        self.list = devices

    def devices(self, since: float = 0.0) -> List[Device]:
        return list(self.list)

    def announce(self) -> None:
        pass


def device(alias: str, address: str, model: str = "Pixel", seen: float = 1.0) -> Device:
    return Device(alias, alias.upper() + address, address, 53317, "https", "mobile", model, seen)


@pytest.mark.parametrize("peer, expected, discoveries", [
    ("laptop", "tnet 10.0.0.2", 0),  # a tnet name, though a phone has it too
    ("LAPTOP", "tnet 10.0.0.2", 0),
    ("pixel", "device 10.0.0.7", 0),
    ("Pixel", "device 10.0.0.8", 0),  # the exact alias first
    ("PIXEL", "ambiguous-peer", 0),  # then in any case: two of them
    ("twin", "ambiguous-peer", 0),  # two phones of one alias
    ("dual", "device 10.0.0.9", 1),  # announces itself as tnet: its tnet side was asked for first
    ("10.0.0.2", "tnet 10.0.0.2", 0),
    ("10.0.0.7", "device 10.0.0.7", 0),
    ("10.0.0.99", "tnet 10.0.0.99", 0),  # nobody seen there: tnet, as without LOCALSEND
    ("nobody", "unknown-peer", 1),
])
def test_which_kind_a_target_is(peer, expected, discoveries):
    discovery = FakeDiscovery({"10.0.0.2": "laptop"})
    devices = [device("laptop", "10.0.0.3"), device("pixel", "10.0.0.7", seen=1.0), device("Pixel", "10.0.0.8"),
               device("twin", "10.0.0.4"), device("twin", "10.0.0.5"), device("dual", "10.0.0.9", model="tnet")]
    got: List[str] = []
    targets = Targets(discovery, FakeLocalSend(devices))  # type: ignore[arg-type]
    targets.resolve(peer, lambda a: got.append(f"tnet {a}"), lambda d: got.append(f"device {d.address}"),
                    lambda code, message: got.append(code))
    assert got == [expected] and discovery.discovered == discoveries


def test_a_device_seen_twice_at_one_address_is_one_and_the_tnet_side_of_a_dual_daemon_wins():
    discovery = FakeDiscovery({})
    old, new = device("phone", "10.0.0.7", seen=1.0), device("phone", "10.0.0.7", seen=2.0)
    new.fingerprint = "NEW"
    got: List[Any] = []
    Targets(discovery, FakeLocalSend([new, old])).resolve(  # type: ignore[arg-type]
        "phone", got.append, got.append, lambda code, message: got.append(code))
    assert got == [new]

    class Answering(FakeDiscovery):
        def discover(self, timeout: float, on_done: Any) -> None:
            self.directory.learn(PeerRecord("dual", "10.0.0.9", 1.0))  # its tnet side answers
            on_done({})

    got.clear()
    answering = Answering({})
    Targets(answering, FakeLocalSend([device("dual", "10.0.0.9", model="tnet")])).resolve(  # type: ignore[arg-type]
        "10.0.0.9", lambda a: got.append(f"tnet {a}"), got.append, lambda code, message: got.append(code))
    assert got == ["tnet 10.0.0.9"]


# --- against a scripted device: statuses, a cancel mid-upload, a kept-alive connection closed ----------


class FakeDevice:
    """A LocalSend receiver scripted by the test (plain HTTP, Python's http.server), known to the
    daemon by a register call from its own address. Records what it is asked."""

    def __init__(self, address: str, daemon) -> None:
        self.prepare_status, self.upload_status = 200, 200
        self.hold_upload = False  # read a little of an upload, then wait for a cancel
        self.close_after_prepare = False  # drop the kept-alive connection after answering prepare-upload
        self.requests: List[tuple] = []  # (path, connection number)
        self.uploads: Dict[str, bytes] = {}
        self.cancelled = threading.Event()
        self.connections = 0
        device = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                device.connections += 1
                self.number = device.connections

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                path = self.path.split("?")[0]
                device.requests.append((self.path, self.number))
                length = int(self.headers.get("Content-Length") or 0)
                if path.endswith("/upload") and device.hold_upload:
                    self.rfile.read(min(length, 65536))
                    device.cancelled.wait(30)
                    self.close_connection = True
                    return
                body = self.rfile.read(length)
                if path.endswith("/prepare-upload"):
                    ids = list(json.loads(body)["files"])
                    answer = json.dumps({"sessionId": "S1", "files": {i: "T" + i for i in ids}}).encode()
                    self.answer(device.prepare_status, answer if device.prepare_status == 200 else b"")
                    self.close_connection = device.close_after_prepare
                elif path.endswith("/upload"):
                    device.uploads[self.path] = body
                    self.answer(device.upload_status, b"")
                else:
                    self.answer(200, b"")
                    if path.endswith("/cancel"):
                        device.cancelled.set()

            def answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        claim = dict(INFO, alias="fake", fingerprint="FAKE" * 8, port=self.port, protocol="http", deviceModel="Pixel")
        status, _ = Sender(daemon.address, daemon.ls_port, daemon.https, source=address).call(
            "POST", "/api/localsend/v2/register", json.dumps(claim))
        assert status == 200

    def paths(self) -> List[str]:
        return [path.split("?")[0].rsplit("/", 1)[-1] for path, _ in self.requests]

    def close(self) -> None:
        self.cancelled.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(name="fake")
def fake_device(ls_pair):
    made: List[FakeDevice] = []

    def make(**env: str):
        alpha = ls_pair("alpha", https=False, **env)
        made.append(FakeDevice(next_address(), alpha))
        return alpha, made[-1]

    yield make
    for device in made:
        device.close()


@pytest.mark.parametrize("status, code, exit_code", [
    (403, "declined", 5), (409, "busy", 5), (401, "pin-required", 5), (429, "refused", 5), (507, "no-space", 5),
    (500, "peer-error", 1),
])
def test_what_a_refused_offer_is_called(fake, tmp_path, status, code, exit_code):
    alpha, device = fake()
    device.prepare_status = status
    note = tmp_path / "note.txt"
    note.write_text("x")
    out = alpha.cli("send", "--json", "fake", str(note))
    final = json_lines(out)[-1]
    assert (out.returncode, final["code"]) == (exit_code, code), out.stdout
    assert device.paths() == ["prepare-upload"]  # nothing to cancel: no session was made
    assert alpha.cli("message", "fake", "hi").returncode == exit_code


def test_a_file_the_receiver_cannot_verify_is_exit_7_and_the_session_is_cancelled(fake, tmp_path):
    alpha, device = fake()
    device.upload_status = 422
    note = tmp_path / "note.txt"
    note.write_text("x")
    out = alpha.cli("send", "--json", "fake", str(note))
    lines = json_lines(out)
    assert out.returncode == 7 and lines[-1]["code"] == "verify-failed", out.stdout
    assert [line["code"] for line in lines if line.get("event") == "file-failed"] == ["verify-failed"]
    wait_until(lambda: device.paths() == ["prepare-upload", "upload", "cancel"], what="the cancel")
    assert device.requests[-1][0] == "/api/localsend/v2/cancel?sessionId=S1"


def test_tnet_cancel_mid_upload_tells_the_receiver(fake, tmp_path):
    alpha, device = fake()
    device.hold_upload = True
    big = random_file(tmp_path / "big.bin", 16 * 1024 * 1024)
    send = subprocess.Popen(alpha.cli_args("send", "--json", "fake", str(big)), env=alpha.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=alpha.dir)
    transfer = wait_until(lambda: [t for t in alpha.request("transfers")[-1]["transfers"] if t["bytes"] > 0],
                          what="the upload to be under way")[0]
    assert (transfer["file"], transfer["file_size"], transfer["direction"]) == ("big.bin", 16 << 20, "out")
    assert alpha.cli("cancel", transfer["id"]).returncode == 0
    out, _ = send.communicate(timeout=60)
    assert send.returncode == 8 and json.loads(out.splitlines()[-1])["code"] == "cancelled"
    assert device.cancelled.wait(10)
    assert device.requests[-1][0] == "/api/localsend/v2/cancel?sessionId=S1"


def test_a_receiver_that_stops_reading_times_out(fake, tmp_path):
    alpha, device = fake(IDLE_TIMEOUT="1")
    device.hold_upload = True
    big = random_file(tmp_path / "big.bin", 64 * 1024 * 1024)
    out = alpha.cli("send", "--json", "fake", str(big))
    final = json_lines(out)[-1]
    assert (out.returncode, final["code"]) == (4, "timeout"), out.stdout
    assert "took less than 4096 bytes in 1 s" in final["error"]
    assert device.cancelled.wait(10)  # told, on a connection of its own


def test_a_kept_alive_connection_the_receiver_closed_is_replaced(fake, tmp_path):
    alpha, device = fake()
    device.close_after_prepare = True
    files = []
    for n in range(3):
        files.append(tmp_path / f"f{n}.txt")
        files[-1].write_text(f"file {n}\n")
    out = alpha.cli("send", "fake", *map(str, files))
    assert out.returncode == 0, out.stdout + out.stderr
    assert device.paths() == ["prepare-upload", "upload", "upload", "upload"]
    assert [number for _, number in device.requests] == [1, 2, 2, 2]
    assert sorted(device.uploads.values()) == [b"file 0\n", b"file 1\n", b"file 2\n"]


# --- hashing, a slice at a time ------------------------------------------------------------------------


def test_files_are_hashed_a_slice_per_step_and_a_change_is_seen(tmp_path):
    import hashlib

    from tnet.lssend import HASH_SLICE_BYTES, Hashes
    from tnet.walk import walk_now

    big = random_file(tmp_path / "big.bin", 2 * HASH_SLICE_BYTES + 10, seed=3)
    (tmp_path / "empty").write_bytes(b"")
    moving = tmp_path / "moving.txt"
    moving.write_text("before")
    entries, _ = walk_now([str(big), str(tmp_path / "empty"), str(moving)])
    moving.write_text("after, longer")  # changed since the walk: not offered
    hashes = Hashes(entries, memoryview(bytearray(1 << 20)))
    steps = 1
    while not hashes.step():
        steps += 1
    assert steps == 3  # the big file took three slices; the loop ran between them
    assert hashes.sha256 == {0: hashlib.sha256(big.read_bytes()).hexdigest(), 1: hashlib.sha256(b"").hexdigest()}
    assert list(hashes.changed) == [2] and "changed size since the walk" in hashes.changed[2]
    assert hashes.fd == -1
