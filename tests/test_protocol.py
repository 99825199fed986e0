"""protocol.py without sockets: round trips, splits, malformed input, limits,
and the exchange's rules for both ends (§4.1)."""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import random
import struct
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tnet import protocol as p

SHA = hashlib.sha256(b"hello").hexdigest()
NONCE = "0123456789abcdef" * 2


def frame(obj) -> bytes:
    payload = json.dumps(obj).encode()
    return struct.pack(">I", len(payload)) + payload


def batch_stream(files) -> bytes:
    """What a sender writes: preface, offer, then each file and its end."""
    out = [p.encode_preface(), p.encode_frame(p.Offer("alpha", len(files), sum(len(d) for _, d in files)))]
    for index, (name, data) in enumerate(files):
        out.append(p.encode_frame(p.FileHeader(index, (name,), len(data))))
        out.append(data)
        out.append(p.encode_frame(p.FileEnd(hashlib.sha256(data).hexdigest())))
    return b"".join(out)


def offer_end(stream: bytes) -> int:
    """Where the opening frame ends, if it is an offer (the receiver accepts there)."""
    start = len(p.PREFACE)
    if len(stream) < start + 4:
        return 0
    end = start + 4 + struct.unpack_from(">I", stream, start)[0]
    try:
        return end if json.loads(stream[start + 4:end]).get("type") == "offer" else 0
    except ValueError:
        return 0


def receiver() -> p.Exchange:
    exchange = p.Exchange(p.Role.ACCEPTOR)
    exchange.send_preface()
    return exchange


def decode_all(stream: bytes, splits=None):
    """Feed ``stream`` in pieces to a receiver, accepting an offer as a daemon
    would, and join the FileData so that results compare."""
    decoder = receiver()
    accept_at = offer_end(stream)
    pieces = split_at(stream, list(splits or []) + [accept_at])
    events = []
    fed = 0
    for piece in pieces:
        fed += len(piece)
        new = decoder.receive_data(piece)
        if accept_at and fed == accept_at:
            decoder.send(p.Accept("bravo"))
        for event in new:
            if isinstance(event, p.FileData):
                data = bytes(event.data)
                if events and isinstance(events[-1], p.FileData):
                    events[-1] = p.FileData(bytes(events[-1].data) + data)
                else:
                    events.append(p.FileData(data))
            else:
                events.append(event)
    events += decoder.feed_eof()
    return events


def frames_of(stream: bytes) -> list:
    """What a stream holds by its framing alone (no exchange rules)."""
    reader = p.FrameReader()
    return [item if isinstance(item, p.FileData) else p.event_of(item) for item in reader.items(stream)]


def split_at(data: bytes, points) -> list:
    points = sorted(set(min(max(0, x), len(data)) for x in points) - {0, len(data)})
    edges = [0] + points + [len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def accepted(offer: p.Offer) -> p.Exchange:
    """A receiver's exchange that has taken ``offer`` and answered accept."""
    decoder = receiver()
    assert decoder.receive_data(PRE + p.encode_frame(offer)) == [offer]
    decoder.send(p.Accept("bravo"))
    return decoder


FILES = [("a.txt", b"hello"), ("empty", b""), ("big.bin", bytes(range(256)) * 1000)]
EXPECTED = [
    p.Offer("alpha", 3, 5 + 256000),
    p.FileHeader(0, ("a.txt",), 5), p.FileData(b"hello"), p.FileEnd(SHA),
    p.FileHeader(1, ("empty",), 0), p.FileEnd(hashlib.sha256(b"").hexdigest()),
    p.FileHeader(2, ("big.bin",), 256000), p.FileData(bytes(range(256)) * 1000),
    p.FileEnd(hashlib.sha256(bytes(range(256)) * 1000).hexdigest()),
]


# --- round trips ---------------------------------------------------------------


def test_batch_round_trip_whole():
    assert decode_all(batch_stream(FILES)) == EXPECTED


EXPECTED_TWO = [p.Offer("alpha", 2, 5)] + EXPECTED[1:6]  # FILES[:2]


def test_batch_round_trip_byte_by_byte():
    stream = batch_stream(FILES[:2])
    assert decode_all(stream, splits=range(len(stream))) == EXPECTED_TWO


def test_batch_round_trip_at_random_split_points():
    stream = batch_stream(FILES)
    rng = random.Random(7)
    for _ in range(200):
        points = [rng.randrange(len(stream) + 1) for _ in range(rng.randrange(1, 12))]
        assert decode_all(stream, splits=points) == EXPECTED


@pytest.mark.parametrize("event", [
    p.Announce("host", NONCE), p.Message("host", "hi ✓\n\x00"), p.Offer("h", 0, 0), p.Error("refused", "no"),
])
def test_first_frames_round_trip(event):
    assert decode_all(p.encode_preface() + p.encode_frame(event)) == [event]


@pytest.mark.parametrize("event", [
    p.Ack("bravo"), p.Accept("bravo"), p.Wait(120), p.Done(0), p.Failed(3, "verify-failed", "x"),
    p.Error("no-space", "full"),
])
def test_answers_round_trip(event):
    assert frames_of(p.encode_preface() + p.encode_frame(event)) == [event]


def test_folder_and_nested_paths_round_trip():
    stream = p.encode_preface() + p.encode_frame(p.Offer("h", 2, 1)) + p.encode_frame(p.Folder(0, ("d",))) \
        + p.encode_frame(p.FileHeader(1, ("d", "e", "f.txt"), 1)) + b"x" \
        + p.encode_frame(p.FileEnd(hashlib.sha256(b"x").hexdigest()))
    events = decode_all(stream)
    assert events[1] == p.Folder(0, ("d",)) and events[2].path == ("d", "e", "f.txt")


def test_sender_may_disown_a_file_in_place_of_its_end():
    stream = p.encode_preface() + p.encode_frame(p.Offer("h", 1, 1)) + p.encode_frame(p.FileHeader(0, ("f",), 1)) \
        + b"x" + p.encode_frame(p.Failed(0, "file-changed", "f changed"))
    assert decode_all(stream)[-1] == p.Failed(0, "file-changed", "f changed")


def test_file_data_views_the_callers_buffer_without_copy():
    decoder = accepted(p.Offer("h", 1, 10))
    decoder.receive_data(p.encode_frame(p.FileHeader(0, ("f",), 10)))
    assert decoder.data_remaining == 10
    buf = bytearray(b"0123456789")
    [chunk] = decoder.receive_data(memoryview(buf))
    assert isinstance(chunk.data, memoryview) and chunk.data.obj is buf


def test_datagram_round_trip():
    request = p.DiscoveryRequest("alpha", NONCE, 49165)
    assert p.decode_datagram(p.encode_discovery(request)) == request


# --- malformed input ---------------------------------------------------------------

PRE = p.encode_preface()
MALFORMED = [
    ("bad-magic", b"HTTP/1.1 200\r\n"),
    ("unsupported-version", b"TNET\x03"),
    ("bad-json", PRE + struct.pack(">I", 3) + b"{x}"),
    ("bad-json", PRE + struct.pack(">I", 4) + b"\xff\xfe{}"),
    ("bad-json", PRE + frame([1, 2])),
    ("bad-json", PRE + struct.pack(">I", 3000) + b"[" * 3000),
    ("bad-frame", PRE + struct.pack(">I", 0)),
    ("bad-frame", PRE + frame({"type": "nope"})),
    ("bad-frame", PRE + frame({"type": "offer", "name": "h", "entries": 1})),
    ("bad-frame", PRE + frame({"type": "offer", "name": "h", "entries": True, "size": 1})),
    ("bad-frame", PRE + frame({"type": "offer", "name": "h", "entries": -1, "size": 1})),
    ("bad-frame", PRE + frame({"type": "offer", "name": "h", "entries": 1, "size": p.MAX_FILE_BYTES + 1})),
    ("bad-host-name", PRE + frame({"type": "offer", "name": "a\x1bb", "entries": 1, "size": 1})),
    ("bad-host-name", PRE + frame({"type": "offer", "name": "", "entries": 1, "size": 1})),
    ("unexpected-frame", PRE + frame({"type": "done", "index": 0})),
    ("unexpected-frame", PRE + frame({"type": "offer", "name": "h", "entries": 0, "size": 0})
     + frame({"type": "offer", "name": "h", "entries": 0, "size": 0})),
    ("unexpected-frame", PRE + frame({"type": "message", "name": "h", "text": "x"})
     + frame({"type": "message", "name": "h", "text": "x"})),
    ("bad-nonce", PRE + frame({"type": "announce", "name": "h", "nonce": "xyz"})),
    ("frame-too-large", PRE + struct.pack(">I", p.MAX_FRAME_BYTES + 1)),
]


@pytest.mark.parametrize("code,stream", MALFORMED, ids=[f"{c}-{i}" for i, (c, _) in enumerate(MALFORMED)])
def test_malformed_streams_raise_the_modules_own_error(code, stream):
    decoder = receiver()
    with pytest.raises(p.RemoteProtocolError) as info:
        decoder.receive_data(stream)
    assert info.value.code == code
    with pytest.raises(p.RemoteProtocolError):  # sticky
        decoder.receive_data(b"")


HOSTILE_NAMES = ["../x", "/etc/x", "a/../../x", "..", ".", "a\x00b", "a\nb", "a\x1b[31m", "a\\b", "x" * 256,
                 "\u202eexe.txt", "", "a\u2028b", ".tnet-" + "0" * 32]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_file_names_are_refused(name):
    with pytest.raises(p.RemoteProtocolError) as info:
        accepted(p.Offer("h", 1, 1)).receive_data(frame({"type": "file", "index": 0, "path": [name], "size": 1}))
    assert info.value.code == "bad-name"


def test_invalid_utf8_in_a_name_is_refused():
    payload = b'{"type":"file","index":0,"path":["a\xffb"],"size":1}'
    with pytest.raises(p.RemoteProtocolError):
        accepted(p.Offer("h", 1, 1)).receive_data(struct.pack(">I", len(payload)) + payload)


def test_lone_surrogate_escaped_in_json_is_refused():
    with pytest.raises(p.RemoteProtocolError) as info:
        accepted(p.Offer("h", 1, 1)).receive_data(frame({"type": "file", "index": 0, "path": ["a\ud800"], "size": 1}))
    assert info.value.code == "bad-name"


def test_entries_before_the_receiver_accepts_are_refused():
    stream = PRE + p.encode_frame(p.Offer("h", 1, 1)) + p.encode_frame(p.FileHeader(0, ("f",), 1))
    with pytest.raises(p.RemoteProtocolError) as info:
        receiver().receive_data(stream)
    assert info.value.code == "unexpected-frame"


def test_unknown_fields_are_refused():
    with pytest.raises(p.RemoteProtocolError) as info:
        receiver().receive_data(PRE + frame({"type": "offer", "name": "h", "entries": 1, "size": 1, "evil": 1}))
    assert info.value.code == "bad-frame"


def test_error_text_must_be_valid_utf8():
    with pytest.raises(p.RemoteProtocolError) as info:
        frames_of(PRE + frame({"type": "error", "code": "x", "message": "\ud800"}))
    assert info.value.code == "bad-frame"


def test_clip_text_fits_an_error_frame():
    clipped = p.clip_text("é" * p.MAX_ERROR_TEXT_BYTES)
    assert len(clipped.encode()) <= p.MAX_ERROR_TEXT_BYTES and p.encode_frame(p.Error("x", clipped))


def test_ordinary_names_pass():
    for name in ["report.pdf", ".bashrc", "naïve café.txt", "日本語", "a b (1).tar.gz", "x" * 255]:
        assert p.check_file_name(name) == name


@pytest.mark.parametrize("cut", [3, 5, 9, 30, -40, -1])
def test_truncated_streams_raise_at_eof(cut):
    stream = batch_stream([("a.txt", b"hello")])
    decoder = receiver()
    for piece in split_at(stream[:cut], [offer_end(stream)]):
        if any(isinstance(e, p.Offer) for e in decoder.receive_data(piece)):
            decoder.send(p.Accept("bravo"))
    with pytest.raises(p.RemoteProtocolError) as info:
        decoder.feed_eof()
    assert info.value.code == "truncated"


def test_a_file_larger_than_the_offer_is_refused():
    with pytest.raises(p.RemoteProtocolError) as info:
        accepted(p.Offer("h", 1, 4)).receive_data(p.encode_frame(p.FileHeader(0, ("f",), 5)))
    assert info.value.code == "size-mismatch"


def test_more_entries_than_offered_are_refused():
    with pytest.raises(p.RemoteProtocolError) as info:
        accepted(p.Offer("h", 1, 0)).receive_data(p.encode_frame(p.Folder(0, ("d",))) +
                                                  p.encode_frame(p.Folder(1, ("e",))))
    assert info.value.code == "unexpected-frame"


def test_datagrams_malformed():
    good = p.encode_discovery(p.DiscoveryRequest("a", NONCE, 1))
    for data, code in [
        (b"", "bad-magic"), (b"XNET\x01{}", "bad-magic"), (b"TNET\x09{}", "unsupported-version"),
        (b"TNET\x01{", "bad-json"), (b"TNET\x01" + json.dumps({"type": "discover", "name": "a", "nonce": NONCE,
                                                                "port": 0}).encode(), "bad-frame"),
        (good + b" " * (p.MAX_DATAGRAM_BYTES + 1 - len(good)), "datagram-too-large"),
    ]:
        with pytest.raises(p.RemoteProtocolError) as info:
            p.decode_datagram(data)
        assert info.value.code == code


def test_we_never_encode_what_we_would_refuse():
    with pytest.raises(p.LocalProtocolError):
        p.encode_frame(p.FileHeader(0, ("../x",), 1))
    with pytest.raises(p.LocalProtocolError):
        p.encode_frame(p.Message("h", "x" * (p.MAX_MESSAGE_BYTES + 1)))
    with pytest.raises(p.LocalProtocolError):
        p.encode_frame(p.FileData(b"x"))


# --- limits at N and N+1 ----------------------------------------------------------------


def test_name_limit():
    assert p.check_file_name("é" * (p.MAX_NAME_BYTES // 2) + "x")  # 255 bytes
    with pytest.raises(p.RemoteProtocolError):
        p.check_file_name("é" * (p.MAX_NAME_BYTES // 2) + "xy")  # 256 bytes


def test_path_depth_limit():
    assert p.check_path(["d"] * p.MAX_PATH_PARTS)
    with pytest.raises(p.RemoteProtocolError):
        p.check_path(["d"] * (p.MAX_PATH_PARTS + 1))


def test_host_name_limit():
    assert p.check_host_name("h" * p.MAX_HOST_NAME_BYTES)
    with pytest.raises(p.RemoteProtocolError):
        p.check_host_name("h" * (p.MAX_HOST_NAME_BYTES + 1))


def test_message_limit_including_worst_case_escaping():
    worst = "\x01" * p.MAX_MESSAGE_BYTES  # six bytes each in JSON
    assert decode_all(PRE + p.encode_frame(p.Message("h", worst))) == [p.Message("h", worst)]
    with pytest.raises(p.RemoteProtocolError) as info:
        receiver().receive_data(PRE + frame({"type": "message", "name": "h", "text": "x" * (p.MAX_MESSAGE_BYTES + 1)}))
    assert info.value.code == "message-too-large"


def test_header_limit_after_the_first_frame():
    accepted(p.Offer("h", 1, 1)).receive_data(struct.pack(">I", p.MAX_HEADER_BYTES))  # N: waiting for the payload
    with pytest.raises(p.RemoteProtocolError) as info:
        accepted(p.Offer("h", 1, 1)).receive_data(struct.pack(">I", p.MAX_HEADER_BYTES + 1))
    assert info.value.code == "frame-too-large"


def test_bad_sha256_is_refused():
    decoder = accepted(p.Offer("h", 1, 1))
    decoder.receive_data(p.encode_frame(p.FileHeader(0, ("f",), 1)) + b"x")
    with pytest.raises(p.RemoteProtocolError) as info:
        decoder.receive_data(frame({"type": "end", "sha256": "Z" * 64}))
    assert info.value.code == "bad-frame"


def test_first_frame_limit():
    receiver().receive_data(PRE + struct.pack(">I", p.MAX_FRAME_BYTES))
    with pytest.raises(p.RemoteProtocolError):
        receiver().receive_data(PRE + struct.pack(">I", p.MAX_FRAME_BYTES + 1))


def test_initiator_frames_are_headers_only():
    p.Exchange(p.Role.INITIATOR).receive_data(PRE + struct.pack(">I", p.MAX_HEADER_BYTES))
    with pytest.raises(p.RemoteProtocolError):
        p.Exchange(p.Role.INITIATOR).receive_data(PRE + struct.pack(">I", p.MAX_HEADER_BYTES + 1))


def test_wait_limit():
    assert frames_of(PRE + p.encode_frame(p.Wait(p.MAX_WAIT_S))) == [p.Wait(p.MAX_WAIT_S)]
    with pytest.raises(p.RemoteProtocolError):
        frames_of(PRE + frame({"type": "wait", "seconds": p.MAX_WAIT_S + 1}))


def test_datagram_limit():
    base = p.encode_discovery(p.DiscoveryRequest("a", NONCE, 1))
    padded = base[:-1] + b" " * (p.MAX_DATAGRAM_BYTES - len(base)) + b"}"
    assert len(padded) == p.MAX_DATAGRAM_BYTES and p.decode_datagram(padded)
    with pytest.raises(p.RemoteProtocolError):
        p.decode_datagram(padded[:-1] + b" }")


def test_entries_limit():
    [offer] = receiver().receive_data(PRE + p.encode_frame(p.Offer("h", p.MAX_ENTRIES, 0)))
    assert offer.entries == p.MAX_ENTRIES
    with pytest.raises(p.RemoteProtocolError):
        receiver().receive_data(PRE + frame({"type": "offer", "name": "h", "entries": p.MAX_ENTRIES + 1, "size": 0}))


# --- properties ------------------------------------------------------------------------

ALL_EVENTS = (p.Announce, p.Message, p.Ack, p.Offer, p.Accept, p.Wait, p.FileHeader, p.FileData, p.FileEnd, p.Folder,
              p.Done, p.Failed, p.Error)


def feed_checked(decoder, pieces):
    """Feed pieces, accepting offers; only events or RemoteProtocolError; the
    buffer stays bounded."""
    try:
        for piece in pieces:
            for event in decoder.receive_data(piece):
                assert isinstance(event, ALL_EVENTS)
                if isinstance(event, p.Offer):
                    decoder.send(p.Accept("bravo"))
            assert len(decoder._reader._buf) <= p.FRAME_LENGTH.size + p.MAX_FRAME_BYTES
        decoder.feed_eof()
    except p.RemoteProtocolError as exc:
        assert exc.code and isinstance(exc.code, str)


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.binary(max_size=2000), st.sampled_from([p.Role.ACCEPTOR, p.Role.INITIATOR]))
def test_any_bytes_give_events_or_the_modules_error(data, role):
    feed_checked(p.Exchange(role), [data])


@SETTINGS
@given(st.binary(max_size=2000))
def test_any_bytes_after_a_valid_preface(data):
    feed_checked(receiver(), [PRE + data])


@SETTINGS
@given(st.lists(st.integers(min_value=0, max_value=3000), max_size=20))
def test_any_split_of_a_valid_stream_decodes_the_same(points):
    assert decode_all(batch_stream(FILES[:2]), splits=points) == EXPECTED_TWO


@SETTINGS
@given(st.data())
def test_mutated_valid_streams_never_escape_the_error_type(data):
    stream = bytearray(batch_stream(FILES[:2]))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(stream) - 1))
        stream[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(stream)))
    points = sorted({cut, offer_end(bytes(stream))})
    feed_checked(receiver(), split_at(bytes(stream), points))


@SETTINGS
@given(st.binary(max_size=600))
def test_any_datagram_gives_a_request_or_the_modules_error(data):
    try:
        assert isinstance(p.decode_datagram(data), p.DiscoveryRequest)
    except p.RemoteProtocolError:
        pass


@SETTINGS
@given(st.text(max_size=300))
def test_check_file_name_accepts_only_safe_names(name):
    try:
        assert p.check_file_name(name) == name
    except p.RemoteProtocolError:
        return
    assert "/" not in name and "\\" not in name and name not in ("", ".", "..")
    assert len(name.encode()) <= p.MAX_NAME_BYTES
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name)


# --- the exchange: who may send what, when (§4.1) ------------------------------------------


def pair() -> "tuple[p.Exchange, p.Exchange]":
    """An initiator and an acceptor whose prefaces are through."""
    initiator, acceptor = p.Exchange(p.Role.INITIATOR), p.Exchange(p.Role.ACCEPTOR)
    assert acceptor.receive_data(initiator.send_preface()) == []
    assert initiator.receive_data(acceptor.send_preface()) == []
    return initiator, acceptor


def carry(sender: p.Exchange, receiver_: p.Exchange, event) -> list:
    return receiver_.receive_data(sender.send(event))


def test_a_whole_batch_between_two_exchanges():
    i, a = pair()
    assert carry(i, a, p.Offer("alpha", 3, 5)) == [p.Offer("alpha", 3, 5)]
    assert i.state is a.state is p.State.OFFERED
    assert carry(a, i, p.Wait(120)) == [p.Wait(120)]
    assert carry(a, i, p.Accept("bravo")) == [p.Accept("bravo")]
    assert carry(i, a, p.Folder(0, ("d",))) == [p.Folder(0, ("d",))]
    assert carry(i, a, p.FileHeader(1, ("d", "f"), 5)) == [p.FileHeader(1, ("d", "f"), 5)]
    assert a.state is p.State.FILE_DATA and a.data_remaining == 5
    assert carry(a, i, p.Done(0)) == [p.Done(0)]  # answers cross a file in flight
    i.sent_file_bytes(5)
    assert [bytes(e.data) for e in a.receive_data(b"hello")] == [b"hello"]
    assert a.state is p.State.FILE_END
    assert carry(i, a, p.FileEnd(SHA)) == [p.FileEnd(SHA)]
    assert carry(i, a, p.FileHeader(2, ("e",), 0)) == [p.FileHeader(2, ("e",), 0)]
    assert carry(i, a, p.Failed(2, "file-changed", "gone")) == [p.Failed(2, "file-changed", "gone")]
    assert carry(a, i, p.Failed(2, "file-changed", "gone")) and carry(a, i, p.Done(1))
    assert i.complete and a.complete
    assert i.feed_eof() == [] and a.feed_eof() == []


def test_a_message_and_its_ack():
    i, a = pair()
    carry(i, a, p.Message("alpha", "hi"))
    carry(a, i, p.Ack("bravo"))
    assert i.complete and a.complete


@pytest.mark.parametrize("events,code", [
    ([p.Offer("h", 1, 1), p.FileHeader(0, ("f",), 1)], "unexpected-frame"),  # before the accept
    ([p.Message("h", "x"), p.Message("h", "y")], "unexpected-frame"),
    ([p.Ack("h")], "unexpected-frame"),  # only the acceptor acks
    ([p.Offer("h", 1, 1), "accept", p.Folder(1, ("d",))], "bad-index"),
    ([p.Offer("h", 1, 1), "accept", p.Folder(0, ("d",)), p.Folder(1, ("e",))], "unexpected-frame"),
    ([p.Offer("h", 1, 1), "accept", p.FileHeader(0, ("f",), 2)], "size-mismatch"),
    ([p.Offer("h", 2, 2), "accept", p.FileHeader(0, ("f",), 1), p.Folder(1, ("d",))], "unexpected-frame"),  # mid-file
    ([p.Offer("h", 2, 0), "accept", p.FileHeader(0, ("f",), 0), p.Failed(1, "x", "y")], "unexpected-frame"),
])
def test_the_initiator_cannot_send_what_the_state_forbids(events, code):
    i, a = pair()
    with pytest.raises(p.LocalProtocolError) as info:
        for event in events:
            if event == "accept":
                carry(a, i, p.Accept("bravo"))
            else:
                carry(i, a, event)
    assert info.value.code == code


def test_a_refused_send_names_the_state():
    i, a = pair()
    carry(i, a, p.Offer("h", 1, 1))
    with pytest.raises(p.LocalProtocolError) as info:
        i.send(p.FileHeader(0, ("f",), 1))
    assert info.value.message == "'file' cannot be sent by the initiator in state offered"


@pytest.mark.parametrize("answers,code", [
    ([p.Done(0)], "unexpected-frame"),  # nothing sent yet
    ([p.Accept("b"), p.Accept("b")], "unexpected-frame"),
    ([p.Accept("b"), p.Done(1)], "unexpected-frame"),  # entry 1 was not sent
    ([p.Accept("b"), p.Done(0), p.Done(0)], "unexpected-frame"),  # answered twice
])
def test_the_acceptor_cannot_answer_what_was_not_sent_or_twice(answers, code):
    i, a = pair()
    carry(i, a, p.Offer("h", 2, 0))
    with pytest.raises(p.LocalProtocolError) as info:
        for answer in answers:
            carry(a, i, answer)
            if isinstance(answer, p.Accept):
                carry(i, a, p.Folder(0, ("d",)))
    assert info.value.code == code


def test_a_receiver_that_answers_a_file_still_in_flight_is_refused():
    i, a = pair()
    carry(i, a, p.Offer("h", 1, 5))
    carry(a, i, p.Accept("b"))
    carry(i, a, p.FileHeader(0, ("f",), 5))
    with pytest.raises(p.RemoteProtocolError) as info:
        i.receive_data(p.encode_frame(p.Done(0)))  # a hostile receiver, bypassing its own exchange
    assert info.value.code == "unexpected-frame"


def test_no_frame_can_interrupt_a_files_bytes_and_eof_then_is_truncated():
    i, a = pair()
    carry(i, a, p.Offer("h", 1, 5))
    carry(a, i, p.Accept("b"))
    carry(i, a, p.FileHeader(0, ("f",), 5))
    with pytest.raises(p.LocalProtocolError):
        i.send(p.Error("cancelled", "mid-file"))  # would be read as file bytes: the sender must just close
    a.receive_data(b"he")
    with pytest.raises(p.RemoteProtocolError) as info:
        a.feed_eof()
    assert info.value.code == "truncated"


def test_a_receiver_closing_early_is_peer_gone_for_the_sender():
    i, a = pair()
    carry(i, a, p.Offer("h", 1, 0))
    with pytest.raises(p.RemoteProtocolError) as info:
        i.feed_eof()
    assert info.value.code == "peer-gone"


def test_the_preface_goes_first_and_once():
    exchange = p.Exchange(p.Role.INITIATOR)
    with pytest.raises(p.LocalProtocolError):
        exchange.send(p.Message("h", "x"))
    exchange.send_preface()
    with pytest.raises(p.LocalProtocolError):
        exchange.send_preface()


def test_every_state_has_a_rule_for_both_roles():
    for state in p.State:
        for role in p.Role:
            assert (role, state) in p.EXCHANGE_RULES


# Events either end might try: valid frames, some of them out of place.
POOL = [
    p.Announce("alpha", NONCE), p.Message("alpha", "hi"), p.Offer("alpha", 2, 3), p.Offer("alpha", 0, 0),
    p.Ack("bravo"), p.Accept("bravo"), p.Wait(5),
    p.FileHeader(0, ("f",), 3), p.FileHeader(1, ("g",), 0), p.FileHeader(0, ("big",), 9), p.Folder(0, ("d",)),
    p.Folder(1, ("e",)), p.FileData(b"x"), p.FileData(b"xyz"), p.FileEnd(SHA),
    p.Done(0), p.Done(1), p.Failed(0, "verify-failed", "no"), p.Failed(1, "file-changed", "no"),
    p.Error("cancelled", "stop"),
    # version 2 (§7): a file that may be resumed, what the receiver holds, the rest from an offset
    p.FileHeader(0, ("f",), 3, mtime=1), p.Resume(0, 2, NONCE, SHA), p.Resume(0, 0, NONCE, SHA),
    p.Resume(0, 4, NONCE, SHA), p.FileFrom(0, 2, 1), p.FileFrom(0, 0, 3), p.FileFrom(0, 1, 2),
    p.Offer("alpha", 2, 3, batch=NONCE),
]


@SETTINGS
@given(st.lists(st.tuples(st.booleans(), st.integers(0, len(POOL) - 1), st.booleans()), max_size=40))
def test_two_exchanges_agree_on_every_rule(steps):
    """Whatever one end may send, the other takes, as that same event; what
    one end may not send, the other refuses with the same code when a
    hostile peer sends it anyway. So the rules are one table for both."""
    i, a = pair()
    for from_initiator, k, hostile in steps:
        sender, taker = (i, a) if from_initiator else (a, i)
        event = POOL[k]
        probe = copy.deepcopy(sender)
        try:
            data = probe.send(event)
        except p.LocalProtocolError as exc:
            if hostile and not isinstance(event, p.FileData):
                with pytest.raises(p.RemoteProtocolError) as info:
                    taker.receive_data(p.encode_frame(event))
                assert info.value.code == exc.code
                return
            continue
        got = taker.receive_data(sender.send(event))
        if isinstance(event, p.FileData):
            assert b"".join(bytes(e.data) for e in got) == bytes(event.data)
        else:
            assert got == [event]
        assert data and sender.state is taker.state  # one state, seen from both ends
        if i.state in (p.State.DONE, p.State.CLOSED):
            assert i.feed_eof() == [] and a.feed_eof() == []
            return


# --- the sans-IO rule -------------------------------------------------------------------

FORBIDDEN = {"socket", "selectors", "os", "time", "random", "select", "asyncio", "io", "pathlib", "shutil",
             "subprocess", "threading", "secrets", "tempfile"}


def test_protocol_imports_no_io():
    tree = ast.parse((Path(p.__file__)).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "open":
            pytest.fail("protocol.py calls open()")
    assert not imported & FORBIDDEN, imported & FORBIDDEN
    assert "tnet" not in imported


# --- version 2: resume (§7) -----------------------------------------------------------------


def resuming_pair(size: int = 10) -> "tuple[p.Exchange, p.Exchange]":
    """An accepted batch of one resumable file of ``size`` bytes, its header sent."""
    i, a = pair()
    carry(i, a, p.Offer("alpha", 1, size, batch=NONCE))
    carry(a, i, p.Accept("bravo"))
    assert carry(i, a, p.FileHeader(0, ("f",), size, mtime=7)) == [p.FileHeader(0, ("f",), size, mtime=7)]
    assert i.state is a.state is p.State.RESUMING and a.data_remaining == 0  # its bytes wait
    return i, a


def test_a_resumed_file_goes_from_the_receivers_offset():
    i, a = resuming_pair(10)
    carry(a, i, p.Resume(0, 4, NONCE, SHA))
    assert carry(i, a, p.FileFrom(0, 4, 6)) == [p.FileFrom(0, 4, 6)]
    assert a.data_remaining == 6
    i.sent_file_bytes(6)
    assert [bytes(e.data) for e in a.receive_data(b"456789")] == [b"456789"]
    carry(i, a, p.FileEnd(SHA))
    carry(a, i, p.Done(0))
    assert i.complete and a.complete


def test_a_sender_may_send_it_all_again_but_nothing_else():
    i, a = resuming_pair(10)
    carry(a, i, p.Resume(0, 4, NONCE, SHA))
    for wrong, code in [(p.FileFrom(0, 3, 7), "bad-resume"), (p.FileFrom(0, 4, 5), "size-mismatch"),
                        (p.FileFrom(1, 0, 10), "bad-resume")]:
        with pytest.raises(p.LocalProtocolError) as info:
            copy.deepcopy(i).send(wrong)
        assert info.value.code == code
        with pytest.raises(p.RemoteProtocolError) as remote:
            copy.deepcopy(a).receive_data(p.encode_frame(wrong))
        assert remote.value.code == code
    carry(i, a, p.FileFrom(0, 0, 10))
    assert a.data_remaining == 10


def test_a_receiver_cannot_claim_more_than_the_file():
    i, a = resuming_pair(10)
    with pytest.raises(p.LocalProtocolError):
        copy.deepcopy(a).send(p.Resume(0, 11, NONCE, SHA))
    with pytest.raises(p.RemoteProtocolError) as info:
        i.receive_data(p.encode_frame(p.Resume(0, 11, NONCE, SHA)))
    assert info.value.code == "bad-resume"


def test_version_1_knows_none_of_it():
    i = p.Exchange(p.Role.INITIATOR, version=1)
    assert i.send_preface() == b"TNET\x01"
    with pytest.raises(p.LocalProtocolError) as info:
        i.send(p.Offer("alpha", 1, 1, batch=NONCE))
    assert info.value.code == "bad-frame"
    a = receiver()
    a.receive_data(b"TNET\x01" + p.encode_frame(p.Offer("alpha", 1, 1)))
    a.send(p.Accept("bravo"))
    with pytest.raises(p.RemoteProtocolError) as remote:
        a.receive_data(p.encode_frame(p.FileHeader(0, ("f",), 1, mtime=1)))
    assert remote.value.code == "bad-frame" and a.version == 1


def test_an_acceptor_always_answers_in_version_1_and_follows_the_initiator():
    a = p.Exchange(p.Role.ACCEPTOR)
    assert a.send_preface() == b"TNET\x01"
    a.receive_data(b"TNET\x02")
    assert a.version == 2
    i = p.Exchange(p.Role.INITIATOR)
    with pytest.raises(p.RemoteProtocolError) as info:
        i.receive_data(b"TNET\x02")  # an acceptor's preface names version 1
    assert info.value.code == "bad-magic"
