"""The LocalSend front door of a running daemon on loopback (LOCALSEND=1), driven
by Python's http.client and ssl as a phone would, and by hand as a hostile
sender would: uploads over HTTP and HTTPS, the policy (ALLOW_FROM, ACCEPT=ask,
PIN, free space), names refused, lying sizes and hashes, stalls, cancels,
several senders at once, thousands of silent connections, and discovery on
loopback. Nothing partial is ever left behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from conftest import free_udp_port, wait_until
from lsclient import INFO, Sender, entry, raw, read_response

from tnet import http, tls, x509
from tnet import localsend as ls
from tnet.httpconn import Buffers, Call, HttpClient, Reply
from tnet.loop import Loop


@pytest.fixture(scope="session")
def identity() -> x509.Identity:
    """One certificate for every HTTPS daemon of the run: making one costs a second."""
    return x509.make_identity("tnet", time.time())


@pytest.fixture(name="ls_net")
def localsend_net(net, identity):
    port = free_udp_port()

    def make(name: str, https: bool = True, **env: str):
        d = net.daemon(name, start=False, LOCALSEND="1", LOCALSEND_PORT=str(port),
                       LOCALSEND_HTTPS="1" if https else "0", **env)
        if https:
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


def sender(d, **kwargs: Any) -> Sender:
    return Sender(d.address, d.ls_port, d.https, **kwargs)


def tree(root: Path) -> List[str]:
    return sorted(os.path.relpath(os.path.join(top, name), root) for top, dirs, files in os.walk(root)
                  for name in dirs + files)


def nothing_left(d) -> None:
    assert d.temp_files() == []


# --- what works -------------------------------------------------------------------------------


@pytest.mark.parametrize("https", [True, False], ids=["https", "http"])
def test_files_land_with_tnet_events_over_one_kept_alive_connection(ls_net, https):
    d = ls_net("alpha", https=https, REPORT_PROGRESS_IN="1")
    events = d.events()
    big = os.urandom(3 * 1024 * 1024 + 17)
    files = [("big.bin", big), ("docs/notes/a.txt", b"hello\n"), ("empty", b"")]
    s = sender(d)
    status, answer = s.prepare({f"f{n}": entry(f"f{n}", name, data) for n, (name, data) in enumerate(files)})
    assert status == 200 and set(answer["files"]) == {"f0", "f1", "f2"}
    for n, (_, data) in enumerate(files):
        status, body = s.upload(answer["sessionId"], f"f{n}", answer["files"][f"f{n}"], data, chunked=n == 1)
        assert (status, body) == (200, b"")
    assert (d.downloads / "big.bin").read_bytes() == big
    assert (d.downloads / "docs" / "notes" / "a.txt").read_bytes() == b"hello\n"
    assert (d.downloads / "empty").read_bytes() == b""
    done = events.wait_for(lambda e: e["event"] == "transfer-done")
    assert (done["name"], done["files"], done["entries"], done["direction"]) == ("phone", 3, 3, "in")
    started = events.of("transfer-started")[0]
    assert started["id"] == done["id"] and started["entries"] == 3 and started["size"] == len(big) + 6
    by_file = {e["file"]: e for e in events.of("file-done")}
    assert by_file["big.bin"]["sha256"] == hashlib.sha256(big).hexdigest()
    assert by_file["docs/notes/a.txt"]["path"] == str(d.downloads / "docs" / "notes" / "a.txt")
    assert events.of("progress") and events.of("progress")[0]["id"] == done["id"]
    assert d.request("transfers")[-1]["transfers"] == []
    nothing_left(d)


def test_info_register_and_the_device_list(ls_net):
    d = ls_net("alpha", https=False)
    s = sender(d)
    for path in (ls.INFO_PATH, ls.INFO_V1_PATH):
        status, body = s.call("GET", path)
        me = json.loads(body)
        assert status == 200 and (me["alias"], me["protocol"], me["port"]) == ("alpha", "http", d.ls_port)
    status, body = s.call("POST", ls.REGISTER_PATH, json.dumps(dict(INFO, alias="pixel", port=40000)))
    assert status == 200 and json.loads(body)["fingerprint"] == me["fingerprint"]
    assert s.call("POST", ls.REGISTER_PATH, b"{not json")[0] == 400
    assert s.call("GET", "/nothing")[0] == 404 and s.call("GET", ls.REGISTER_PATH)[0] == 405
    peers = d.request("peers")[-1]["peers"]
    assert [(p["name"], p["address"], p["kind"], p["port"]) for p in peers] == [("pixel", "127.0.0.1", "localsend",
                                                                                   40000)]
    out = d.cli("peers")
    assert out.stdout.split()[:4] == ["pixel", "127.0.0.1", "localsend", "(https,"], out.stdout
    status = d.request("status")[-1]["localsend"]
    assert (status["alias"], status["devices"], status["pin"]) == ("alpha", 1, False)


def test_a_text_message_is_a_message_event_and_no_file(ls_net):
    d = ls_net("alpha")
    events = d.events()
    text = "lunch at 1? \u2615"
    data = text.encode()
    status, answer = sender(d).prepare({"m": entry("m", "m.txt", data, sha=False, fileType="text/plain",
                                                   preview=text)})
    assert (status, answer) == (204, None)
    message = events.wait_for(lambda e: e["event"] == "message")
    assert (message["name"], message["text"], message["peer"]) == ("phone", text, "127.0.0.1")
    assert tree(d.downloads) == []


def test_several_senders_at_once_each_get_their_session(ls_net):
    d = ls_net("alpha", https=False)
    first, second = sender(d), sender(d, source="127.0.0.7")
    a = first.prepare({"a": entry("a", "a.bin", b"A" * 1000)})[1]
    b = second.prepare({"b": entry("b", "b.bin", b"B" * 1000)})[1]
    assert a["sessionId"] != b["sessionId"]
    assert second.upload(b["sessionId"], "b", b["files"]["b"], b"B" * 1000)[0] == 200
    assert first.upload(a["sessionId"], "a", a["files"]["a"], b"A" * 1000)[0] == 200
    assert sorted(os.listdir(d.downloads)) == ["a.bin", "b.bin"]


# --- policy -------------------------------------------------------------------------------------


def test_allow_from_refuses_files_and_messages_with_403(ls_net):
    d = ls_net("alpha", https=False, ALLOW_FROM="10.0.0.0/8")
    s = sender(d)
    assert s.prepare({"a": entry("a", "a.bin", b"x")})[0] == 403
    assert s.prepare({"m": entry("m", "m.txt", b"hi", fileType="text/plain", preview="hi")})[0] == 403
    assert tree(d.downloads) == []


def test_a_refused_sender_takes_no_room_from_the_allowed_ones(ls_net):
    """ALLOW_FROM and the PIN are checked at the head of a prepare-upload: the
    body of a refused one is dropped as it comes, never held with the others'."""
    d = ls_net("alpha", https=False, ALLOW_FROM="127.0.0.3/32", LOCALSEND_PIN="4711")
    limit = 16 * 1024 * 1024  # lsdoor.MAX_BUFFERED_JSON_BYTES
    held = []
    for n, query in enumerate(("?pin=4711", "")):  # refused by ALLOW_FROM; allowed but no PIN
        sock = raw(d.address, d.ls_port, source=f"127.0.2.{n + 1}" if query else "127.0.0.3")
        sock.sendall(b"POST %s%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                     % (ls.PREPARE_UPLOAD_PATH.encode(), query.encode(), limit // 2) + b" " * (limit // 2 - 1))
        held.append(sock)
    wait_until(lambda: d.request("status")[-1]["localsend"]["connections"] == 2, what="two connections")
    status, answer = sender(d, source="127.0.0.3").prepare({"a": entry("a", "a.bin", b"x")}, pin="4711")
    assert status == 200, answer
    for sock, expected in zip(held, (b"403", b"401")):
        sock.sendall(b" ")  # the last byte: the refusal is the answer, the connection stays usable
        assert sock.recv(12)[9:12] == expected
        sock.close()


def test_expect_100_continue_is_answered_only_for_a_body_taken(ls_net):
    d = ls_net("alpha", https=False)
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
    with raw(d.address, d.ls_port) as sock:
        sock.sendall(head % (ls.REGISTER_PATH.encode(), 2))
        assert sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
    with raw(d.address, d.ls_port) as sock:
        sock.sendall(head % (ls.REGISTER_PATH.encode(), ls.MAX_REGISTER_BYTES + 1))
        assert sock.recv(12) == b"HTTP/1.1 413"  # not a 100 first: that body would be refused


def test_pin_401_then_429_after_three_wrong_ones(ls_net):
    d = ls_net("alpha", https=False, LOCALSEND_PIN="4711")
    files = {"a": entry("a", "a.bin", b"x")}
    right, wrong = sender(d, source="127.0.0.3"), sender(d, source="127.0.0.4")
    assert right.prepare(files)[0] == 401  # none given: not counted
    assert right.prepare(files, pin="4711")[0] == 200
    assert [wrong.prepare(files, pin="0000")[0] for _ in range(4)] == [401, 401, 401, 429]
    assert wrong.prepare(files, pin="4711")[0] == 429  # locked out, even with the right one
    assert d.request("status")[-1]["localsend"]["pin"] is True


def test_ask_mode_holds_the_request_until_accept_or_decline(ls_net):
    d = ls_net("alpha", https=False, ACCEPT="ask", ASK_TIMEOUT="60")
    events = d.events()
    results: Dict[str, Any] = {}

    def offer(key: str, name: str) -> None:
        results[key] = sender(d).prepare({"a": entry("a", name, b"xyz")})

    for key, name, verb in (("yes", "taken.bin", "accept"), ("no", "declined.bin", "decline")):
        thread = threading.Thread(target=offer, args=(key, name))
        thread.start()
        offered = events.wait_for(lambda e: e["event"] == "offer" and e["id"] not in results.get("seen", ()))
        results.setdefault("seen", set()).add(offered["id"])
        listed = {t["id"]: t for t in d.request("transfers")[-1]["transfers"]}
        assert listed[offered["id"]]["name"] == "phone" and listed[offered["id"]]["size"] == 3
        assert thread.is_alive()  # held while nobody decided
        assert d.cli(verb, offered["id"]).returncode == 0
        thread.join(10)
    status, answer = results["yes"]
    assert status == 200 and "a" in answer["files"]
    assert sender(d).upload(answer["sessionId"], "a", answer["files"]["a"], b"xyz")[0] == 200
    assert os.listdir(d.downloads) == ["taken.bin"]
    assert results["no"] == (403, {"message": "alpha declined the files"})
    assert d.cli("accept", "999").returncode != 0


def test_ask_timeout_declines_and_a_sender_that_hangs_up_withdraws(ls_net):
    d = ls_net("alpha", https=False, ACCEPT="ask", ASK_TIMEOUT="1")
    events = d.events()
    assert sender(d).prepare({"a": entry("a", "a.bin", b"x")})[0] == 403
    failed = events.wait_for(lambda e: e["event"] == "transfer-failed")
    assert failed["code"] == "declined" and "within 1 s" in failed["message"]
    sock = raw(d.address, d.ls_port)
    body = json.dumps({"info": INFO, "files": {"a": entry("a", "a.bin", b"x")}}).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                 % (ls.PREPARE_UPLOAD_PATH.encode(), len(body), body))
    events.wait_for(lambda e: e["event"] == "offer")
    reset(sock)
    gone = events.wait_for(lambda e: e["event"] == "transfer-failed" and e["code"] == "cancelled")
    assert "withdrew" in gone["message"]
    assert d.request("transfers")[-1]["transfers"] == []


def reset(sock: socket.socket) -> None:
    """Hang up for good: a reset. (A close sends what a half-close does, and the sender may
    still be reading: the daemon learns it is gone when a write to it fails.)"""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def answer_to_the_close(sock: socket.socket) -> Tuple[int, bytes]:
    """The status and body of the one answer, read up to the daemon's close."""
    status, rest = read_response(sock)
    return status, rest + b"".join(iter(lambda: sock.recv(65536), b""))


def test_a_sender_that_half_closes_after_its_offer_is_answered_and_a_reset_withdraws(ls_net):
    d = ls_net("alpha", https=False, ACCEPT="ask", ASK_TIMEOUT="60")
    events = d.events()
    data = b"kept"
    socks, ids = [], []
    for name in ("half.bin", "reset.bin"):
        sock = raw(d.address, d.ls_port)
        body = json.dumps({"info": INFO, "files": {"a": entry("a", name, data)}}).encode()
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (ls.PREPARE_UPLOAD_PATH.encode(), len(body), body))
        ids.append(events.wait_for(lambda e: e["event"] == "offer" and e["id"] not in ids)["id"])
        sock.shutdown(socket.SHUT_WR)
        socks.append(sock)
    reset(socks[1])  # noticed within a probe of the half-closed connection
    gone = events.wait_for(lambda e: e["event"] == "transfer-failed" and e["code"] == "cancelled")
    assert gone["id"] == ids[1]
    assert [t["id"] for t in d.request("transfers")[-1]["transfers"]] == [ids[0]]
    assert d.cli("accept", ids[0]).returncode == 0
    status, body = answer_to_the_close(socks[0])
    answer = json.loads(body)
    assert status == 200 and "a" in answer["files"]
    assert sender(d).upload(answer["sessionId"], "a", answer["files"]["a"], data)[0] == 200
    assert (d.downloads / "half.bin").read_bytes() == data


def test_not_enough_space_is_507_before_any_byte(ls_net):
    d = ls_net("alpha", https=False)
    status, answer = sender(d).prepare({"a": entry("a", "huge.bin", b"", size=2**49)})
    assert status == 507 and "not enough space" in answer["message"]
    assert d.request("transfers")[-1]["transfers"] == []


# --- hostile senders ---------------------------------------------------------------------------

HOSTILE_NAMES = ["../x", "a/../../x", "/etc/x", "a\x00b", "a\nb", "\x1b[31mred", "a\x7fb", "\u202etxt.exe",
                 "x" * 256, ".", "..", "a/./b", "", "a//b", "a/", ".tnet-" + "f" * 32 + "/x"]


def test_hostile_names_fail_their_file_and_the_rest_lands(ls_net, tmp_path):
    d = ls_net("alpha", https=False)
    events = d.events()
    before = [p for p in tree(tmp_path) if not p.endswith(".log")]
    files = {f"h{n}": entry(f"h{n}", name, b"evil") for n, name in enumerate(HOSTILE_NAMES)}
    files["ok"] = entry("ok", "fine.txt", b"good")
    s = sender(d)
    status, answer = s.prepare(files)
    assert status == 200 and list(answer["files"]) == ["ok"]  # tokens only for what is taken
    for file_id in files:
        token = answer["files"].get(file_id, "guess")
        status, _ = s.upload(answer["sessionId"], file_id, token, b"good" if file_id == "ok" else b"evil")
        assert status == (200 if file_id == "ok" else 403), file_id
    failed = events.wait_for(lambda e: e["event"] == "transfer-failed")
    assert failed["code"] == "bad-name" and failed["files"] == 1 and failed["entries"] == len(files)
    assert sorted(e["code"] for e in events.of("file-failed")) == ["bad-name"] * len(HOSTILE_NAMES)
    assert tree(d.downloads) == ["fine.txt"]
    after = [p for p in tree(tmp_path) if not p.endswith(".log")]
    assert after == sorted(before + [os.path.relpath(d.downloads / "fine.txt", tmp_path)])
    assert not os.path.exists("/etc/x") or os.path.getsize("/etc/x") != 4
    only_hostile = {f"h{n}": entry(f"h{n}", name, b"evil") for n, name in enumerate(HOSTILE_NAMES[:3])}
    status, answer = s.prepare(only_hostile)
    assert status == 403 and "bad-name" not in answer["message"] and "no file was taken" in answer["message"]
    nothing_left(d)


@pytest.mark.parametrize("field, value", [
    ("size", "abc"), ("size", -1), ("size", 2**50 + 1), ("size", True), ("size", 1.5), ("id", "other"),
    ("sha256", "xyz"), ("fileName", 7),
])
def test_malformed_offers_are_400_and_start_nothing(ls_net, field, value):
    d = ls_net("alpha", https=False)
    files = {"a": dict(entry("a", "a.bin", b"x"), **{field: value})}
    status, answer = sender(d).prepare(files)
    assert status == 400, answer
    assert d.request("transfers")[-1]["transfers"] == []


def test_malformed_bodies_are_400(ls_net):
    d = ls_net("alpha", https=False)
    s = sender(d)
    for body in (b"", b"[]", b"{", b'{"info": {}, "files": {}}', b'{"info": 1, "files": {}}',
                 json.dumps({"info": INFO, "files": {}, "files ": 1}).encode().replace(b'"files "', b'"files"')):
        assert s.call("POST", ls.PREPARE_UPLOAD_PATH, body)[0] == 400, body
    assert s.prepare({})[0] == 204  # nothing offered: nothing to do


def one_session(d, data: bytes, **extra: Any):
    s = sender(d)
    status, answer = s.prepare({"a": entry("a", "a.bin", data, **extra)})
    assert status == 200
    return s, answer["sessionId"], answer["files"]["a"]


def test_lying_sizes_leave_nothing(ls_net):
    d = ls_net("alpha", https=False)
    events = d.events()
    data = b"0123456789"
    cases = [(data[:5], 400), (data + b"more", 400)]  # Content-Length short of, or past, the size
    for body, expected in cases:
        s, session, token = one_session(d, data)
        assert s.upload(session, "a", token, body)[0] == expected
    s, session, token = one_session(d, data)  # chunked, past the size
    assert s.upload(session, "a", token, data + b"x" * 100, chunked=True)[0] == 413
    s, session, token = one_session(d, data)  # chunked, short of it
    assert s.upload(session, "a", token, data[:3], chunked=True)[0] == 400
    s, session, token = one_session(d, data)  # the sender closes mid-body
    sock = raw(d.address, d.ls_port)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234"
                 % ls.upload_target(session, "a", token).encode())
    sock.close()
    wait_until(lambda: len(events.of("transfer-failed")) == 5, what="five failed transfers")
    codes = sorted(e["code"] for e in events.of("file-failed"))
    assert codes == ["size-mismatch", "size-mismatch", "size-mismatch", "truncated", "truncated"], codes
    assert tree(d.downloads) == []
    nothing_left(d)


def test_a_wrong_sha256_is_422_nothing_lands_and_a_retry_may_follow(ls_net):
    d = ls_net("alpha", https=True)
    events = d.events()
    data = os.urandom(100_000)
    s, session, token = one_session(d, data)
    assert s.upload(session, "a", token, os.urandom(100_000))[0] == 422
    assert tree(d.downloads) == [] and d.temp_files() == []
    assert s.upload(session, "a", token, data)[0] == 200  # the official app tries again
    assert (d.downloads / "a.bin").read_bytes() == data
    events.wait_for(lambda e: e["event"] == "transfer-done")
    s, session, token = one_session(d, data)
    for _ in range(ls.MAX_UPLOAD_ATTEMPTS):
        assert s.upload(session, "a", token, b"y" * len(data))[0] == 422
    failed = events.wait_for(lambda e: e["event"] == "transfer-failed")
    assert failed["code"] == "verify-failed" and "SHA-256" in failed["message"]
    assert tree(d.downloads) == ["a.bin"]
    nothing_left(d)


def test_a_wrong_token_session_or_address_is_refused_before_any_byte(ls_net):
    d = ls_net("alpha", https=False)
    s, session, token = one_session(d, b"secret")
    other = sender(d, source="127.0.0.9")
    assert s.upload(session, "a", "0" * 32, b"secret")[0] == 403
    assert s.upload("nope", "a", token, b"secret")[0] == 403
    assert s.upload(session, "b", token, b"secret")[0] == 403
    assert other.upload(session, "a", token, b"secret")[0] == 403
    assert s.call("POST", ls.UPLOAD_PATH + "?sessionId=" + session, b"x")[0] == 400
    assert tree(d.downloads) == []
    assert s.upload(session, "a", token, b"secret")[0] == 200
    assert s.upload(session, "a", token, b"secret")[0] == 403  # received already
    nothing_left(d)


def test_cancel_by_the_sender_or_by_tnet_cancel_ends_it_and_cuts_an_upload(ls_net):
    d = ls_net("alpha", https=False)
    events = d.events()
    s, session, token = one_session(d, b"x" * 10)
    assert s.call("POST", f"{ls.CANCEL_PATH}?sessionId={session}")[0] == 200
    failed = events.wait_for(lambda e: e["event"] == "transfer-failed")
    assert failed["code"] == "cancelled"
    assert s.upload(session, "a", token, b"x" * 10)[0] == 409
    s, session, token = one_session(d, b"x" * 1_000_000)
    sock = raw(d.address, d.ls_port)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" %
                 ls.upload_target(session, "a", token).encode() + b"x" * 300_000)
    transfer = wait_until(lambda: [t for t in d.request("transfers")[-1]["transfers"] if t["bytes"] >= 300_000],
                          what="the upload to be under way")[0]
    assert transfer["file"] == "a.bin" and transfer["file_size"] == 1_000_000
    assert d.cli("cancel", transfer["id"]).returncode == 0
    assert read_response(sock)[0] == 0  # cut: no answer, the connection is closed
    failed = events.wait_for(lambda e: e["event"] == "transfer-failed" and e["id"] == transfer["id"])
    assert failed["code"] == "cancelled"
    assert tree(d.downloads) == []
    nothing_left(d)


def test_a_cancelled_offer_of_many_files_has_an_event_each_and_one_log_line(ls_net):
    d = ls_net("alpha", https=False)
    events = d.events()
    s = sender(d)
    status, answer = s.prepare({f"f{n}": entry(f"f{n}", f"{n}.bin", b"x") for n in range(2000)})
    assert status == 200 and len(answer["files"]) == 2000
    assert s.call("POST", f"{ls.CANCEL_PATH}?sessionId={answer['sessionId']}")[0] == 200
    events.wait_for(lambda e: e["event"] == "transfer-failed")
    failed = events.of("file-failed")
    assert len(failed) == 2000 and {e["code"] for e in failed} == {"cancelled"}
    assert {e["file"] for e in failed} == {f"{n}.bin" for n in range(2000)}
    assert d.log().count(".bin: cancelled") == 1  # the log has the first; the events socket has each


def test_a_stalled_upload_and_an_idle_session_time_out(ls_net):
    d = ls_net("alpha", https=False, IDLE_TIMEOUT="1")
    events = d.events()
    s, session, token = one_session(d, b"x" * 100_000)
    sock = raw(d.address, d.ls_port)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" %
                 ls.upload_target(session, "a", token).encode() + b"x" * 1000)
    failed = events.wait_for(lambda e: e["event"] == "file-failed")
    assert failed["code"] == "timeout"
    sock.close()
    one_session(d, b"y")
    idle = events.wait_for(lambda e: e["event"] == "transfer-failed" and e["id"] != failed["id"])
    assert idle["code"] == "timeout" and "sent nothing" in idle["message"]
    assert tree(d.downloads) == []
    nothing_left(d)


def test_garbage_and_over_long_heads_get_an_http_status(ls_net):
    d = ls_net("alpha", https=False)
    for request, expected in ((b"HELLO\r\n\r\n", 400), (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
                              (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
                              (b"POST " + ls.REGISTER_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: 20000\r\n\r\n", 413)):
        sock = raw(d.address, d.ls_port)
        sock.sendall(request)
        assert read_response(sock)[0] == expected, request[:40]
        sock.close()
    sock = raw(d.address, d.ls_port)  # TLS on the HTTP port is garbage too
    sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n")
    assert read_response(sock)[0] == 400
    sender(d).prepare({})  # still serving


def test_thousands_of_silent_connections_do_not_keep_a_sender_out(ls_net):
    d = ls_net("alpha", https=True)
    held: List[socket.socket] = []
    try:
        for n in range(2000):  # from 100 addresses: past both the per-address and the overall bound
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((f"127.0.{200 + n % 50}.{10 + n // 50 % 2}", 0))
            sock.connect((d.address, d.ls_port))
            held.append(sock)
        data = os.urandom(500_000)
        assert sender(d, source="127.0.0.11").send([("legit.bin", data)]) == {"legit.bin": 200}
        assert (d.downloads / "legit.bin").read_bytes() == data
        connections = d.request("status")[-1]["localsend"]["connections"]
        assert connections <= 384  # three quarters of MAX_CONNECTIONS
    finally:
        for sock in held:
            sock.close()


def test_the_daemon_refuses_to_start_on_an_unusable_state_dir(net, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "state-link"
    link.symlink_to(target)
    d = net.daemon("alpha", start=False, LOCALSEND="1", LOCALSEND_PORT=str(free_udp_port()), STATE_DIR=str(link))
    out = subprocess.run(d.cli_args("daemon"), env=d.env, capture_output=True, text=True, timeout=60, cwd=d.dir)
    assert out.returncode == 1 and "STATE_DIR" in out.stderr and "link" in out.stderr, out.stderr
    assert os.listdir(target) == []


# --- discovery on loopback ----------------------------------------------------------------------


def test_two_daemons_find_each_other_by_multicast_on_loopback_only(ls_net):
    a = ls_net("alpha", https=True)
    b = ls_net("bravo", https=False)

    def found(d, name: str) -> Any:
        peers = d.request("discover", timeout=1)[-1]["peers"]
        return next((p for p in peers if p["name"] == name and p.get("kind") == "localsend"), None)

    seen = wait_until(lambda: found(a, "bravo"), what="alpha to find bravo", interval=0.2)
    assert (seen["address"], seen["protocol"], seen["port"]) == (b.address, "http", b.ls_port)
    seen = wait_until(lambda: found(b, "alpha"), what="bravo to find alpha", interval=0.2)
    assert (seen["address"], seen["protocol"]) == (a.address, "https")
    assert seen["fingerprint"] == a.request("status")[-1]["localsend"]["fingerprint"]
    if shutil.which("ip") is None:
        return  # iproute2 is what shows the memberships
    memberships = subprocess.run(["ip", "-4", "maddr", "show"], capture_output=True, text=True).stdout
    interface = ""
    joined = set()
    for line in memberships.splitlines():
        if not line.startswith((" ", "\t")):
            interface = line.split(":")[1].strip()
        elif ls.MULTICAST_GROUP in line:
            joined.add(interface)
    assert joined == {"lo"}, memberships


def test_our_register_call_pins_the_servers_fingerprint(ls_net, identity, tmp_path):
    d = ls_net("alpha", https=True)
    state = tmp_path / "client-state"
    state.mkdir(mode=0o700)
    for file, text in ((tls.KEY_FILE, identity.key_pem), (tls.CERT_FILE, identity.cert_pem)):
        fd = os.open(state / file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, text.encode())
        os.close(fd)
    context = tls.client_context(tls.load_identity(str(state), True, time.time()))
    loop = Loop(time.monotonic)
    replies: List[Reply] = []
    for alias, pinned in (("caller", identity.fingerprint), ("intruder", "0" * 64)):
        me = ls.DeviceInfo(alias=alias, fingerprint=alias.upper())
        request = http.encode_request("POST", ls.REGISTER_PATH, {"Host": "x"}, ls.encode_register(me))
        client = HttpClient(loop, Buffers(), Call(d.address, d.ls_port, request, tls=context, pinned=pinned),
                            replies.append)
        client.connect("127.0.0.1")
        deadline = time.monotonic() + 20
        while len(replies) < 2 - (pinned == identity.fingerprint) and time.monotonic() < deadline:
            loop.run_once(at_most=0.1)
    loop.close()
    assert replies[0].status == 200 and ls.decode_register(replies[0].body, need_port=False).alias == "alpha"
    assert replies[0].fingerprint == identity.fingerprint
    assert (replies[1].status, replies[1].code) == (0, "fingerprint-mismatch")
    peers = d.request("peers")[-1]["peers"]
    assert [p["name"] for p in peers] == ["caller"]  # the pinned call got through; the other sent nothing


@pytest.fixture(name="tmpfs")
def small_tmpfs(tmp_path):
    """A 16 MiB tmpfs for FILE_SAVE_DIR, unmounted after the test even on failure."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the other-file-system tests need root in CI (to mount a tmpfs)")
        pytest.skip("needs root to mount a tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tnet-test", str(mount)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs: {out.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_from_another_file_system_files_are_copied_into_place_and_space_is_checked_first(ls_net, tmpfs):
    d = ls_net("alpha", https=False, FILE_SAVE_DIR=str(tmpfs / "Downloads"))
    assert os.stat(d.temp).st_dev != os.stat(tmpfs).st_dev
    events = d.events()
    data = os.urandom(3 * 1024 * 1024)
    assert sender(d).send([("photos/big.bin", data), ("small.txt", b"s")]) == {"photos/big.bin": 200,
                                                                                "small.txt": 200}
    assert (tmpfs / "Downloads" / "photos" / "big.bin").read_bytes() == data
    assert sorted(os.listdir(tmpfs / "Downloads")) == ["photos", "small.txt"]  # no work folder left there
    events.wait_for(lambda e: e["event"] == "transfer-done")
    status, answer = sender(d).prepare({"a": entry("a", "too-big.bin", b"", size=20 * 1024 * 1024)})
    assert status == 507 and "not enough space" in answer["message"]
    nothing_left(d)


def test_a_sender_that_half_closes_after_its_body_gets_its_answer_after_the_copy(ls_net, tmpfs):
    d = ls_net("alpha", https=False, FILE_SAVE_DIR=str(tmpfs / "Downloads"))
    events = d.events()
    data = os.urandom(15 * 1024 * 1024)  # two slices of the copy: the half-close comes between them
    _, session, token = one_session(d, data)
    sock = raw(d.address, d.ls_port)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                 % (ls.upload_target(session, "a", token).encode(), len(data)) + data)
    sock.shutdown(socket.SHUT_WR)
    assert answer_to_the_close(sock)[0] == 200
    events.wait_for(lambda e: e["event"] == "transfer-done")
    assert (tmpfs / "Downloads" / "a.bin").read_bytes() == data
    nothing_left(d)


# --- bounds at N and N + 1 ------------------------------------------------------------------------


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def busy(d, source: str) -> socket.socket:
    """A connection in the middle of a request: a register head, its body still due."""
    sock = raw(d.address, d.ls_port, source=source)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{" % ls.REGISTER_PATH.encode())
    return sock


def test_connections_per_address_idle_ones_make_room_busy_ones_do_not(ls_net):
    d = ls_net("alpha", https=False, MAX_CONNECTIONS_PER_PEER="3", IDLE_TIMEOUT="60")
    idle = [raw(d.address, d.ls_port, source="127.0.0.21") for _ in range(3)]
    wait_until(lambda: d.request("status")[-1]["localsend"]["connections"] == 3, what="three connections")
    newest = raw(d.address, d.ls_port, source="127.0.0.21")  # N + 1: the oldest idle one goes
    assert closed_by_peer(idle[0])
    assert not closed_by_peer(idle[1], timeout=0.5)
    for sock in idle[1:] + [newest]:
        sock.close()
    held = [busy(d, "127.0.0.22") for _ in range(3)]
    wait_until(lambda: d.request("status")[-1]["localsend"]["connections"] == 3, what="three busy connections")
    refused = raw(d.address, d.ls_port, source="127.0.0.22")
    assert closed_by_peer(refused)  # every one is busy: the new one is refused
    assert sender(d, source="127.0.0.23").call("GET", ls.INFO_PATH)[0] == 200  # others are not affected
    for sock in held:
        sock.close()


def test_sixteen_senders_at_once_and_the_seventeenth_is_409(ls_net):
    d = ls_net("alpha", https=False)
    for n in range(ls.MAX_SESSIONS):
        assert sender(d, source=f"127.0.1.{n + 1}").prepare({"a": entry("a", f"{n}.bin", b"x")})[0] == 200
    assert sender(d, source="127.0.1.99").prepare({"a": entry("a", "late.bin", b"x")})[0] == 409
    assert len(d.request("transfers")[-1]["transfers"]) == ls.MAX_SESSIONS


def test_request_bodies_held_at_once_are_bounded(ls_net):
    d = ls_net("alpha", https=False)
    limit = 16 * 1024 * 1024  # lsdoor.MAX_BUFFERED_JSON_BYTES
    held = []
    for n in range(2):  # two bodies of 8 MiB - 1, each a byte short of its end
        sock = raw(d.address, d.ls_port, source=f"127.0.2.{n + 1}")
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                     % (ls.PREPARE_UPLOAD_PATH.encode(), limit // 2) + b" " * (limit // 2 - 1))
        held.append(sock)
    wait_until(lambda: d.request("status")[-1]["localsend"]["connections"] == 2, what="two connections")
    s = sender(d)
    assert s.call("POST", ls.REGISTER_PATH, b"{}")[0] == 400  # N: the last two bytes fit (and are no device)
    assert s.call("POST", ls.REGISTER_PATH, b"{ }")[0] == 503  # N + 1
    for sock in held:
        sock.close()
    wait_until(lambda: s.call("POST", ls.REGISTER_PATH, b"{ }")[0] == 400, what="the bodies to be released")
