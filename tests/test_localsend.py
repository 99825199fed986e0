"""localsend.py without sockets: round trips, malformed bodies, limits, sessions, PIN."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tnet import localsend as ls
from tnet import protocol as p

FINGERPRINT = "0123456789ABCDEF" * 4
INFO = ls.DeviceInfo(alias="Nice Orange", fingerprint=FINGERPRINT, device_model="Linux", download=True)
SHA = "ab" * 32
INFO_JSON = {"alias": "Secret Banana", "version": "2.2", "deviceModel": "Windows", "deviceType": "desktop",
             "fingerprint": "random string", "port": 53317, "protocol": "https", "download": False}


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def file_entry(file_id="f1", name="a.png", size=10, **extra):
    entry = {"id": file_id, "fileName": name, "size": size, "fileType": "image/png"}
    entry.update(extra)
    return entry


def prepare(*entries, info=None) -> bytes:
    return body({"info": INFO_JSON if info is None else info, "files": {e["id"]: e for e in entries}})


def padded(data: bytes, size: int) -> bytes:
    """``data`` grown to exactly ``size`` bytes with JSON whitespace."""
    assert len(data) <= size
    return data + b" " * (size - len(data))


def refusal(call, *args, **kwargs):
    with pytest.raises(ls.LocalSendError) as info:
        call(*args, **kwargs)
    return info.value.status, info.value.code


# --- Round trips ---------------------------------------------------------------------------------


def test_device_info_round_trips_through_register_and_announce():
    assert ls.decode_register(ls.encode_register(INFO)) == INFO
    assert ls.decode_announce(ls.encode_announce(INFO, True)) == (INFO, True)
    assert ls.decode_announce(ls.encode_announce(INFO, False)) == (INFO, False)
    obj = ls.encode_info(INFO)
    assert obj == {"alias": "Nice Orange", "version": "2.2", "deviceModel": "Linux", "deviceType": "desktop",
                   "fingerprint": FINGERPRINT, "port": 53317, "protocol": "https", "download": True}
    assert "announce" not in obj and ls.encode_info(INFO, announce=True)["announce"] is True


def test_register_response_may_leave_out_port_and_protocol():
    answer = ls.DeviceInfo(alias="Phone", fingerprint="x", port=None, protocol=None, device_type="mobile")
    encoded = ls.encode_register(answer)
    assert b"port" not in encoded and b"protocol" not in encoded and b"deviceModel" not in encoded
    assert ls.decode_register(encoded, need_port=False) == answer
    assert refusal(ls.decode_register, encoded) == (400, "missing-field")


def test_prepare_upload_round_trip_with_folders_hash_and_preview():
    files = [ls.FileOffer("f1", ("photos", "2024", "a.jpg"), 5, "image/jpeg", SHA),
             ls.FileOffer("f2", ("b.txt",), 0, "text/plain", None, "hello")]
    decoded = ls.decode_prepare_upload(ls.encode_prepare_upload(INFO, files))
    assert decoded.info == INFO
    assert decoded.files == tuple(files)
    assert decoded.refused == () and decoded.message is None  # two files: not a message


def test_prepare_upload_file_entries_on_the_wire():
    raw = json.loads(ls.encode_prepare_upload(INFO, [ls.FileOffer("f1", ("d", "a.jpg"), 5, "image/jpeg")]))
    assert raw["files"] == {"f1": {"id": "f1", "fileName": "d/a.jpg", "size": 5, "fileType": "image/jpeg"}}


def test_a_text_message_as_the_official_app_sends_it():
    offer = ls.message_offer("8d3e", "héllo")
    assert offer.path == ("8d3e.txt",) and offer.size == 6
    decoded = ls.decode_prepare_upload(ls.encode_prepare_upload(INFO, [offer]))
    assert decoded.message == "héllo"
    assert ls.decode_prepare_upload(prepare(file_entry(fileType="text/plain"))).message is None  # no preview
    assert ls.decode_prepare_upload(prepare(file_entry(preview="x"))).message is None  # not text


def test_prepare_response_round_trip_and_hostile_receiver():
    tokens = {"f1": "t1", "f2": "t2"}
    assert ls.decode_prepare_response(ls.encode_prepare_response("s1", tokens), {"f1", "f2"}) == ("s1", tokens)
    answer = body({"sessionId": "s1", "files": {"f9": "t"}})
    assert refusal(ls.decode_prepare_response, answer, {"f1"}) == (400, "unknown-file")
    assert refusal(ls.decode_prepare_response, body({"sessionId": "s1", "files": {"f1": 5}})) == (400, "bad-id")
    assert refusal(ls.decode_prepare_response, body({"sessionId": "s\x1b", "files": {}})) == (400, "bad-id")
    assert refusal(ls.decode_prepare_response, body({"files": {}})) == (400, "missing-field")


def test_upload_target_is_urlencoded():
    target = ls.upload_target("s 1", "a&b=c", "t/+?")
    url = urlsplit(target)
    assert url.path == "/api/localsend/v2/upload"
    assert dict(parse_qsl(url.query)) == {"sessionId": "s 1", "fileId": "a&b=c", "token": "t/+?"}


def test_constants():
    assert (ls.INFO_PATH, ls.REGISTER_PATH, ls.PREPARE_UPLOAD_PATH, ls.UPLOAD_PATH, ls.CANCEL_PATH) == (
        "/api/localsend/v2/info", "/api/localsend/v2/register", "/api/localsend/v2/prepare-upload",
        "/api/localsend/v2/upload", "/api/localsend/v2/cancel")
    assert ls.INFO_V1_PATH == "/api/localsend/v1/info"
    assert (ls.DEFAULT_PORT, ls.MULTICAST_GROUP, ls.PROTOCOL_VERSION) == (53317, "224.0.0.167", "2.2")


# --- Device info: strict types, tolerant values ------------------------------------------------


def device(**changes):
    obj = dict(INFO_JSON)
    obj.update(changes)
    return {key: value for key, value in obj.items() if value is not ...}


@pytest.mark.parametrize("changes, expected", [
    ({"deviceType": "toaster"}, {"device_type": "desktop"}),
    ({"deviceType": "MOBILE"}, {"device_type": "mobile"}),
    ({"deviceType": None}, {"device_type": "desktop"}),
    ({"deviceType": ...}, {"device_type": "desktop"}),
    ({"deviceModel": None}, {"device_model": None}),
    ({"download": ...}, {"download": False}),
    ({"version": "2.0"}, {"version": "2.0"}),
    ({"version": "2.10"}, {"version": "2.10"}),
    ({"version": "2.123"}, {"version": "2.123"}),
    ({"alias": "Anna's 👨\u200d👩\u200d👧 phone"}, {"alias": "Anna's 👨\u200d👩\u200d👧 phone"}),
    ({"protocol": "http", "port": 1}, {"protocol": "http", "port": 1}),
    ({"port": 65535}, {"port": 65535}),
    ({"future": {"field": 1}}, {}),
])
def test_device_info_tolerance(changes, expected):
    info = ls.decode_device(device(**changes), need_port=True)
    for field, value in expected.items():
        assert getattr(info, field) == value


@pytest.mark.parametrize("changes, code", [
    ({"version": "1.0"}, "unsupported-version"),
    ({"version": "3.0"}, "unsupported-version"),
    ({"version": "2"}, "unsupported-version"),
    ({"version": "2.x"}, "unsupported-version"),
    ({"version": "2.1.0"}, "unsupported-version"),
    ({"version": "2.1234"}, "unsupported-version"),
    ({"version": "2.²"}, "unsupported-version"),
    ({"version": 2.2}, "bad-field"),
    ({"version": ...}, "missing-field"),
    ({"alias": ""}, "bad-text"),
    ({"alias": "a\u202eb"}, "bad-text"),
    ({"alias": "a\nb"}, "bad-text"),
    ({"alias": "a\x1b[2J"}, "bad-text"),
    ({"alias": "\ud800"}, "bad-text"),
    ({"alias": 5}, "bad-field"),
    ({"alias": None}, "missing-field"),
    ({"fingerprint": ...}, "missing-field"),
    ({"fingerprint": "a\x00"}, "bad-text"),
    ({"deviceModel": "\x07"}, "bad-text"),
    ({"deviceModel": 1}, "bad-field"),
    ({"deviceType": 1}, "bad-field"),
    ({"port": 0}, "bad-field"),
    ({"port": 65536}, "bad-field"),
    ({"port": "53317"}, "bad-field"),
    ({"port": True}, "bad-field"),
    ({"port": ...}, "missing-field"),
    ({"protocol": "ftp"}, "bad-field"),
    ({"protocol": "HTTPS"}, "bad-field"),
    ({"protocol": ...}, "missing-field"),
    ({"download": "yes"}, "bad-field"),
])
def test_device_info_refusals(changes, code):
    assert refusal(ls.decode_device, device(**changes), need_port=True) == (400, code)


def test_device_info_is_an_object():
    assert refusal(ls.decode_device, [INFO_JSON], need_port=False) == (400, "bad-field")


def test_announce_flags():
    assert ls.decode_announce(body(device(announce=True)))[1] is True
    assert ls.decode_announce(body(device(announce=False)))[1] is False
    assert ls.decode_announce(body(device(announcement=False)))[1] is False  # protocol v1's name
    assert ls.decode_announce(body(device(announcement=True)))[1] is True
    assert ls.decode_announce(body(device()))[1] is True  # as the official app 1.18 reads it
    assert refusal(ls.decode_announce, body(device(announce="yes"))) == (400, "bad-field")


def test_we_never_send_what_we_refuse():
    with pytest.raises(p.LocalProtocolError):
        ls.encode_register(ls.DeviceInfo(alias="a\u202e", fingerprint="x"))
    with pytest.raises(p.LocalProtocolError):
        ls.encode_announce(ls.DeviceInfo(alias="a", fingerprint="x", port=0), True)
    with pytest.raises(p.LocalProtocolError):
        ls.encode_prepare_upload(INFO, [ls.FileOffer("f1", ("..",), 1)])
    with pytest.raises(p.LocalProtocolError):
        ls.encode_prepare_upload(INFO, [ls.FileOffer("f1", ("a",), 1), ls.FileOffer("f1", ("b",), 1)])
    with pytest.raises(p.LocalProtocolError):
        ls.encode_prepare_upload(INFO, [ls.FileOffer("f1", ("a\ud800",), 1)])
    with pytest.raises(p.LocalProtocolError):
        ls.encode_prepare_upload(INFO, [ls.FileOffer("f1", ("a/b",), 1)])
    with pytest.raises(p.LocalProtocolError):
        ls.encode_prepare_response("s1", {"f1": ""})


# --- Prepare-upload: malformed bodies --------------------------------------------------------------

INFO_RAW = json.dumps(INFO_JSON)


def raw_file(fields: str, name: str = '"fileName":"a.png",') -> bytes:
    return ('{"info":' + INFO_RAW + ',"files":{"f1":{"id":"f1",' + name + fields + "}}}").encode()


MALFORMED = [
    (b"", "bad-json"),
    (b"not json", "bad-json"),
    (b"[]", "bad-json"),
    (b"\xff\xfe{}", "bad-json"),
    (b"[" * 100_000, "bad-json"),
    (b'{"info":' + INFO_RAW.encode() + b',"files":{}', "bad-json"),
    (b'{"files":{}}', "missing-field"),
    (b'{"info":' + INFO_RAW.encode() + b"}", "missing-field"),
    (b'{"info":null,"files":{}}', "missing-field"),
    (b'{"info":"me","files":{}}', "bad-field"),
    (b'{"info":' + INFO_RAW.encode() + b',"files":[]}', "bad-field"),
    (b'{"info":' + INFO_RAW.encode() + b',"files":{"f1":5}}', "bad-field"),
    (b'{"info":' + INFO_RAW.encode() + b',"files":{},"files":{}}', "duplicate-key"),
    (b'{"info":' + INFO_RAW.encode() + b',"files":{"f1":{},"f1":{}}}', "duplicate-key"),
    (raw_file('"size":1,"size":2'), "duplicate-key"),
    (raw_file('"size":"abc"'), "bad-field"),
    (raw_file('"size":"10"'), "bad-field"),
    (raw_file('"size":-1'), "bad-size"),
    (raw_file('"size":1.5'), "bad-field"),
    (raw_file('"size":1e3'), "bad-field"),
    (raw_file('"size":true'), "bad-field"),
    (raw_file('"size":NaN'), "bad-json"),
    (raw_file('"size":Infinity'), "bad-json"),
    (raw_file('"size":null'), "missing-field"),
    (raw_file('"size":1' + "0" * 30), "bad-json"),
    (raw_file('"size":1,"sha256":"abc"'), "bad-sha256"),
    (raw_file('"size":1,"sha256":"' + "g" * 64 + '"'), "bad-sha256"),
    (raw_file('"size":1,"sha256":5'), "bad-field"),
    (raw_file('"size":1,"preview":5'), "bad-field"),
    (raw_file('"size":1,"fileType":"a\\u0000"'), "bad-text"),
    (raw_file('"size":1,"fileType":7'), "bad-field"),
    (raw_file('"size":1,"fileName":["a"]', name=""), "bad-field"),
    (raw_file('"size":1,"id":"f2"'), "duplicate-key"),
    (b'{"info":' + INFO_RAW.encode() + b',"files":{"f1":{"id":"f2","fileName":"a","size":1}}}', "bad-id"),
    (b'{"info":' + INFO_RAW.encode() + b',"files":{"f1":{"fileName":"a","size":1}}}', "missing-field"),
    (b'{"info":' + INFO_RAW.encode() + b',"files":{"":{"id":"","fileName":"a","size":1}}}', "bad-id"),
    (b'{"info":' + INFO_RAW.encode() + b',"files":{"f\\n":{"id":"f\\n","fileName":"a","size":1}}}', "bad-id"),
    (b'{"info":' + INFO_RAW.encode() + b',"files":{"f1":{"id":"f1","size":1}}}', "missing-field"),
]


@pytest.mark.parametrize("data, code", MALFORMED)
def test_malformed_prepare_upload(data, code):
    assert refusal(ls.decode_prepare_upload, data) == (400, code)


def test_sha256_in_upper_case_is_taken_in_lower_case():
    offer = ls.decode_prepare_upload(prepare(file_entry(sha256=SHA.upper()))).files[0]
    assert offer.sha256 == SHA


def test_missing_optional_file_fields_default():
    entry = {"id": "f1", "fileName": "a", "size": 0, "fileType": None, "sha256": None, "preview": None,
             "metadata": {"modified": "2021-01-01T12:34:56Z"}}
    assert ls.decode_prepare_upload(prepare(entry)).files == (ls.FileOffer("f1", ("a",), 0),)


def test_empty_files_is_valid_for_a_204():
    decoded = ls.decode_prepare_upload(prepare())
    assert decoded.files == () and decoded.refused == ()


HOSTILE_NAMES = ["../x", "/abs", "a/../b", "a\x00b", "a\x1bb", "tab\tname", "a\u202eb.exe", "a\u2028b",
                 "x" * 256, "é" * 128, ".", "..", "", "a//b", "a/", "a\\b", "\ud800", "/".join("a" * 65)]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_name_refuses_that_file_only(name):
    decoded = ls.decode_prepare_upload(prepare(file_entry("bad", name), file_entry("good", "ok.png")))
    assert [f.id for f in decoded.files] == ["good"]
    assert [(file_id, code) for file_id, code, _ in decoded.refused] == [("bad", "bad-name")]


def test_a_hostile_name_refuses_a_message_too():
    decoded = ls.decode_prepare_upload(prepare(file_entry("m", "../m.txt", fileType="text/plain", preview="hi")))
    assert decoded.files == () and decoded.message is None


def test_non_utf8_bytes_in_a_name_are_a_bad_name():
    data = prepare(file_entry("bad", "NAME"), file_entry("good", "ok")).replace(b"NAME", b"a\xffb")
    assert [code for _, code, _ in ls.decode_prepare_upload(data).refused] == ["bad-name"]


# --- Limits at N and N+1 -------------------------------------------------------------------------


@pytest.mark.parametrize("decode, limit, data", [
    (ls.decode_announce, ls.MAX_ANNOUNCE_BYTES, body(INFO_JSON)),
    (ls.decode_register, ls.MAX_REGISTER_BYTES, body(INFO_JSON)),
    (ls.decode_prepare_upload, ls.MAX_PREPARE_UPLOAD_BYTES, prepare(file_entry())),
    (ls.decode_prepare_response, ls.MAX_PREPARE_UPLOAD_BYTES, body({"sessionId": "s", "files": {}})),
])
def test_body_size_limits(decode, limit, data):
    decode(padded(data, limit))
    assert refusal(decode, padded(data, limit + 1)) == (413, "too-large")


def test_file_count_limit():
    entries = [{"id": str(i), "fileName": "a", "size": 0} for i in range(ls.MAX_FILES + 1)]
    assert len(ls.decode_prepare_upload(prepare(*entries[:-1])).files) == ls.MAX_FILES
    assert refusal(ls.decode_prepare_upload, prepare(*entries)) == (413, "too-many-files")
    tokens = {str(i): "t" for i in range(ls.MAX_FILES + 1)}
    tokens_body = body({"sessionId": "s", "files": dict(list(tokens.items())[:-1])})
    assert len(ls.decode_prepare_response(tokens_body)[1]) == ls.MAX_FILES
    assert refusal(ls.decode_prepare_response, body({"sessionId": "s", "files": tokens})) == (413, "too-many-files")


@pytest.mark.parametrize("field, limit", [
    ("alias", ls.MAX_ALIAS_BYTES), ("fingerprint", ls.MAX_FINGERPRINT_BYTES),
    ("deviceModel", ls.MAX_DEVICE_MODEL_BYTES),
])
def test_device_text_limits(field, limit):
    assert getattr(ls.decode_device(device(**{field: "é" * (limit // 2)}), need_port=True),
                   {"alias": "alias", "fingerprint": "fingerprint", "deviceModel": "device_model"}[field])
    assert refusal(ls.decode_device, device(**{field: "é" * (limit // 2) + "x"}), need_port=True) == (400, "bad-text")


def test_file_id_limit():
    at, over = "i" * ls.MAX_ID_BYTES, "i" * (ls.MAX_ID_BYTES + 1)
    assert ls.decode_prepare_upload(prepare(file_entry(at))).files[0].id == at
    assert refusal(ls.decode_prepare_upload, prepare(file_entry(over))) == (400, "bad-id")


def test_file_name_limits():
    part = "n" * p.MAX_NAME_BYTES
    assert ls.decode_prepare_upload(prepare(file_entry(name=part))).files[0].path == (part,)
    whole = "/".join(["n" * 240] * 17)  # 17 parts and 16 slashes: the whole fileName is 4096 bytes
    assert len(whole) == ls.MAX_FILE_NAME_BYTES
    assert len(ls.decode_prepare_upload(prepare(file_entry(name=whole))).files[0].path) == 17
    assert ls.decode_prepare_upload(prepare(file_entry(name=whole + "n"))).refused[0][1] == "bad-name"
    deep = "/".join(["d"] * p.MAX_PATH_PARTS)
    assert len(ls.decode_prepare_upload(prepare(file_entry(name=deep))).files[0].path) == p.MAX_PATH_PARTS
    assert ls.decode_prepare_upload(prepare(file_entry(name=deep + "/d"))).refused[0][1] == "bad-name"


def test_file_size_and_number_limits():
    assert ls.decode_prepare_upload(prepare(file_entry(size=p.MAX_FILE_BYTES))).files[0].size == p.MAX_FILE_BYTES
    assert refusal(ls.decode_prepare_upload, prepare(file_entry(size=p.MAX_FILE_BYTES + 1))) == (400, "bad-size")
    longest = "9" * ls.MAX_NUMBER_CHARS  # a number literal of the longest length parses (then is too big)
    assert refusal(ls.decode_prepare_upload, raw_file('"size":' + longest)) == (400, "bad-size")
    assert refusal(ls.decode_prepare_upload, raw_file('"size":9' + longest)) == (400, "bad-json")


def test_file_type_limit():
    at = "t/" + "x" * (ls.MAX_FILE_TYPE_BYTES - 2)
    assert ls.decode_prepare_upload(prepare(file_entry(fileType=at))).files[0].file_type == at
    assert refusal(ls.decode_prepare_upload, prepare(file_entry(fileType=at + "x"))) == (400, "bad-text")


def test_preview_limit_refuses_that_file():
    at = "é" * (ls.MAX_PREVIEW_BYTES // 2)
    message = prepare(file_entry(fileType="text/plain", preview=at))
    assert ls.decode_prepare_upload(message).message == at
    decoded = ls.decode_prepare_upload(prepare(file_entry(fileType="text/plain", preview=at + "x")))
    assert decoded.files == () and decoded.refused[0][:2] == ("f1", "bad-preview") and decoded.message is None


# --- Receive sessions ------------------------------------------------------------------------------

SENDER = "10.0.0.2"


def offer(*ids):
    return ls.decode_prepare_upload(prepare(*(file_entry(i, f"{i}.bin") for i in ids)))


def session(ids=("f1", "f2"), accepted=("f1", "f2")):
    return ls.Session("s1", SENDER, offer(*ids), {i: "tok-" + i for i in accepted})


def query(file_id="f1", session_id="s1", token=None):
    return {"sessionId": session_id, "fileId": file_id, "token": "tok-" + file_id if token is None else token}


def test_session_good_path():
    s = session()
    for file_id in ("f1", "f2"):
        assert s.check_upload(query(file_id), SENDER).id == file_id
        s.file_started(file_id)
        assert s.file_state(file_id) is ls.FileState.IN_PROGRESS and not s.done
        s.file_finished(file_id, ok=True)
    assert s.done and s.state is ls.SessionState.FINISHED


def test_session_takes_only_accepted_files():
    s = session(ids=("f1", "f2"), accepted=("f2",))
    assert refusal(s.check_upload, query("f1"), SENDER) == (403, "unknown-file")
    assert s.check_upload(query("f2"), SENDER).id == "f2"
    with pytest.raises(p.LocalProtocolError):
        ls.Session("s1", SENDER, offer("f1"), {"f9": "t"})  # a token for a file not offered
    with pytest.raises(p.LocalProtocolError):
        ls.Session("s1", SENDER, offer("f1"), {})  # nothing accepted is a 204, not a session


@pytest.mark.parametrize("q, ip, expected", [
    ({"sessionId": "s1", "fileId": "f1"}, SENDER, (400, "missing-parameter")),
    ({"fileId": "f1", "token": "tok-f1"}, SENDER, (400, "missing-parameter")),
    (query(session_id="s2"), SENDER, (403, "unknown-session")),
    (query(token="tok-f2"), SENDER, (403, "bad-token")),
    (query(token=""), SENDER, (403, "bad-token")),
    (query(token="tök\udcff"), SENDER, (403, "bad-token")),
    (query(), "10.0.0.3", (403, "wrong-address")),
    (query("f3"), SENDER, (403, "unknown-file")),
])
def test_session_refuses_uploads(q, ip, expected):
    assert refusal(session().check_upload, q, ip) == expected


def test_session_accepts_the_mapped_spelling_of_the_sender():
    assert session().check_upload(query(), "::ffff:" + SENDER).id == "f1"


def test_replay_of_a_file_in_progress_or_finished():
    s = session()
    s.check_upload(query(), SENDER)
    s.file_started("f1")
    assert refusal(s.check_upload, query(), SENDER) == (403, "file-not-pending")
    s.file_finished("f1", ok=True)
    assert refusal(s.check_upload, query(), SENDER) == (403, "file-not-pending")
    with pytest.raises(p.LocalProtocolError):
        s.file_started("f1")
    with pytest.raises(p.LocalProtocolError):
        s.file_finished("f2", ok=True)  # never started


def test_a_failed_file_ends_the_session_too():
    s = session(accepted=("f1",))
    s.file_started("f1")
    s.file_finished("f1", ok=False)
    assert s.done and s.file_state("f1") is ls.FileState.FAILED
    assert refusal(s.check_upload, query(), SENDER) == (403, "file-not-pending")


def test_checksum_retries_up_to_the_limit():
    s = session(accepted=("f1",))
    for _ in range(ls.MAX_UPLOAD_ATTEMPTS - 1):
        s.check_upload(query(), SENDER)
        s.file_started("f1")
        s.file_finished("f1", ok=False, retry=True)
        assert s.file_state("f1") is ls.FileState.PENDING and not s.done
    s.file_started("f1")
    s.file_finished("f1", ok=False, retry=True)  # the last attempt is final
    assert s.file_state("f1") is ls.FileState.FAILED and s.done


def test_cancel():
    s = session()
    s.file_started("f1")
    s.cancel()
    assert s.state is ls.SessionState.CANCELLED and not s.done  # f1 still being received
    assert refusal(s.check_upload, query("f2"), SENDER) == (409, "cancelled")
    assert s.file_state("f2") is ls.FileState.FAILED
    s.file_finished("f1", ok=False, retry=True)  # no retry in a cancelled session
    assert s.done and s.state is ls.SessionState.CANCELLED


def test_sessions_registry():
    sessions = ls.Sessions(max_sessions=2)
    first = ls.Session("s1", SENDER, offer("f1"), {"f1": "tok-f1"})
    second = ls.Session("s2", "10.0.0.9", offer("f1"), {"f1": "tok-f1"})
    sessions.add(first)
    sessions.add(second)
    assert sessions.full and len(sessions) == 2 and sessions.get("s2") is second
    with pytest.raises(p.LocalProtocolError):
        sessions.add(ls.Session("s1", SENDER, offer("f1"), {"f1": "t"}))
    assert refusal(sessions.add, ls.Session("s3", SENDER, offer("f1"), {"f1": "t"})) == (409, "busy")
    assert sessions.check_upload(query(session_id="s2"), "10.0.0.9") == (second, second.files["f1"])
    assert refusal(sessions.check_upload, query(session_id="s2"), SENDER) == (403, "wrong-address")
    assert refusal(sessions.check_upload, query(session_id="nope"), SENDER) == (403, "unknown-session")
    assert refusal(sessions.check_upload, {"sessionId": "s1"}, SENDER) == (400, "missing-parameter")
    first.file_started("f1")
    first.file_finished("f1", ok=True)
    assert not sessions.full  # a done session makes room
    sessions.add(ls.Session("s3", SENDER, offer("f1"), {"f1": "t"}))
    assert sessions.get("s1") is None and len(sessions) == 2
    sessions.remove("s3")
    assert sessions.get("s3") is None


def test_sessions_limit_at_n_and_n_plus_one():
    sessions = ls.Sessions()
    for i in range(ls.MAX_SESSIONS):
        sessions.add(ls.Session(f"s{i}", SENDER, offer("f1"), {"f1": "t"}))
    assert refusal(sessions.add, ls.Session("over", SENDER, offer("f1"), {"f1": "t"})) == (409, "busy")


def test_sessions_cancel_only_from_the_sender():
    sessions = ls.Sessions()
    s = ls.Session("s1", SENDER, offer("f1"), {"f1": "tok-f1"})
    sessions.add(s)
    assert sessions.cancel({"sessionId": "s1"}, "10.0.0.3") is None
    assert sessions.cancel({}, SENDER) is None  # a request still waiting is the caller's
    assert sessions.cancel({"sessionId": "s9"}, SENDER) is None
    assert s.state is ls.SessionState.ACTIVE
    assert sessions.cancel({"sessionId": "s1"}, SENDER) is s and s.state is ls.SessionState.CANCELLED


# --- PIN -------------------------------------------------------------------------------------------


def test_pin_right_wrong_missing():
    guard = ls.PinGuard("123456")
    assert guard.check(SENDER, "123456", now=0.0) == 200
    assert guard.check(SENDER, None, now=0.0) == 401
    assert guard.check(SENDER, "000000", now=0.0) == 401
    assert guard.check(SENDER, "ünï\udcff", now=0.0) == 401
    assert ls.PinGuard(None).check(SENDER, None, now=0.0) == 200


def test_pin_lockout_and_recovery():
    guard = ls.PinGuard("1234", max_attempts=3, window_s=60.0)
    for _ in range(2):
        assert guard.check(SENDER, "0000", now=1.0) == 401
    assert guard.check(SENDER, None, now=1.0) == 401  # a missing PIN is not counted
    assert guard.check(SENDER, "0000", now=10.0) == 401  # the third wrong one
    assert guard.check(SENDER, "1234", now=11.0) == 429  # even the right PIN, while locked
    assert guard.check("::ffff:" + SENDER, "1234", now=11.0) == 429  # the same host, spelled as IPv6
    assert guard.check("10.0.0.3", "1234", now=11.0) == 200  # others are not locked out
    assert guard.check(SENDER, "1234", now=69.9) == 429  # the window runs from the last wrong PIN
    assert guard.check(SENDER, "1234", now=70.0) == 200


def test_pin_attempts_at_n_minus_one_and_n():
    guard = ls.PinGuard("1234")
    for _ in range(ls.MAX_PIN_ATTEMPTS - 1):
        assert guard.check(SENDER, "0", now=0.0) == 401
    assert guard.check(SENDER, "1234", now=0.0) == 200  # the right PIN clears the count
    for _ in range(ls.MAX_PIN_ATTEMPTS):
        assert guard.check(SENDER, "0", now=0.0) == 401
    assert guard.check(SENDER, "1234", now=0.0) == 429


def test_pin_wrong_attempts_expire_with_the_window():
    guard = ls.PinGuard("1234", max_attempts=2, window_s=60.0)
    assert guard.check(SENDER, "0", now=0.0) == 401
    assert guard.check(SENDER, "0", now=60.0) == 401  # the first is forgotten: a count of one again
    assert guard.check(SENDER, "1234", now=61.0) == 200


def test_pin_memory_is_bounded():
    guard = ls.PinGuard("1234", max_attempts=1, max_clients=10)
    for i in range(50):
        guard.check(f"10.0.1.{i}", "0", now=0.0)
    assert len(guard) == 10
    assert guard.check("10.0.1.49", "1234", now=0.0) == 429  # the newest are kept
    assert guard.check("10.0.1.0", "1234", now=0.0) == 200  # the oldest were forgotten


# --- Any input: a value or LocalSendError ---------------------------------------------------------

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DECODERS = [ls.decode_announce, ls.decode_register, ls.decode_prepare_upload, ls.decode_prepare_response,
            lambda data: ls.decode_register(data, need_port=False)]


@SETTINGS
@given(st.binary(max_size=2000), st.sampled_from(DECODERS))
def test_any_bytes_decode_or_refuse(data, decode):
    try:
        decode(data)
    except ls.LocalSendError as exc:
        assert exc.status in (400, 413) and exc.code


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**51) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from(["2.2", "2.1", "http", "https", "mobile", "a/b", "..", SHA]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10)
FIELDS = ["alias", "version", "deviceModel", "deviceType", "fingerprint", "port", "protocol", "download",
          "announce", "announcement", "id", "fileName", "size", "fileType", "sha256", "preview"]
FUZZ_INFO = st.fixed_dictionaries({}, optional={key: JSON_VALUES for key in FIELDS[:10]}) | st.just(INFO_JSON)
FUZZ_FILE = st.fixed_dictionaries({}, optional={key: JSON_VALUES | st.just("f1") for key in FIELDS[10:]})


@SETTINGS
@given(FUZZ_INFO, st.dictionaries(st.sampled_from(["f1", "f2", ""]), FUZZ_FILE | JSON_VALUES, max_size=3))
def test_any_json_decodes_or_refuses(info, files):
    for data in (body(info), body({"info": info, "files": files}), body({"sessionId": "s", "files": files})):
        for decode in DECODERS:
            try:
                decode(data)
            except ls.LocalSendError:
                pass


@SETTINGS
@given(st.dictionaries(st.sampled_from(["sessionId", "fileId", "token", "x"]),
                       st.text(max_size=8) | st.sampled_from(["s1", "f1", "tok-f1"]), max_size=4), st.text(max_size=8))
def test_any_upload_query_is_taken_or_refused(q, ip):
    sessions = ls.Sessions()
    sessions.add(session())
    try:
        sessions.check_upload(q, ip)
    except ls.LocalSendError as exc:
        assert exc.status in (400, 403)


FORBIDDEN = {"socket", "selectors", "os", "time", "random", "select", "asyncio", "io", "pathlib", "shutil",
             "subprocess", "threading", "secrets", "tempfile", "uuid", "http"}


def test_localsend_imports_no_io():
    tree = ast.parse(Path(ls.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "open":
            pytest.fail("localsend.py calls open()")
    assert not imported & FORBIDDEN, imported & FORBIDDEN
