"""Sending to LocalSend devices (lssend): tnet daemons on loopback with LOCALSEND=1, one
sending with `tnet send` / `tnet message` to another's LocalSend door, over HTTPS and
HTTP. The receiver is LocalSend-only to the sender (another discovery port, another
RECEIVE_PORT: a tnet attempt could not reach it), so what lands came by LocalSend; a
dual daemon, found both ways, gets tnet. Plus the rule that picks the target, without
sockets."""

from __future__ import annotations

import filecmp
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from conftest import free_udp_port, random_file, wait_until
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
    events = bravo.events()
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
