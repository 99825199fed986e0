"""api.py without sockets: request lines, their schema and limits, and the events' builders."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tnet import api
from tnet import protocol as p


def test_line_decoder_splits_lines_and_skips_blank_ones():
    decoder = api.LineDecoder()
    assert decoder.feed(b'{"cmd":"status"}\n\n{"cmd"') == [b'{"cmd":"status"}']
    assert decoder.feed(b':"peers"}\n') == [b'{"cmd":"peers"}']


def test_requests_are_type_checked():
    assert api.decode_request(b'{"cmd":"send","peer":"h","paths":["/x"]}') == api.Request("send", {
        "peer": "h", "paths": ["/x"]})
    for line, code in [
        (b'{"cmd":"fly"}', "unknown-command"),
        (b'{"cmd":"send","peer":"h"}', "bad-request"),
        (b'{"cmd":"send","peer":1,"paths":["/x"]}', "bad-request"),
        (b'{"cmd":"send","peer":"h","paths":[]}', "bad-request"),
        (b'{"cmd":"status","extra":1}', "bad-request"),
        (b'{"cmd":"discover","timeout":true}', "bad-request"),
        (b'{"cmd":"discover","timeout":0}', "bad-request"),
        (b'[1]', "bad-json"),
        (b'{"cmd": ', "bad-json"),
        (b'{"cmd":"status","cmd":"peers"}', "bad-json"),
        (b'{"cmd":"message","peer":"h","text":"\\ud800"}', "bad-request"),
    ]:
        with pytest.raises(p.RemoteProtocolError) as info:
            api.decode_request(line)
        assert info.value.code == code, line


def test_line_limit():
    decoder = api.LineDecoder(max_line=10)
    assert decoder.feed(b"0123456789") == []  # N bytes, no newline yet: kept
    with pytest.raises(p.RemoteProtocolError) as info:
        api.LineDecoder(max_line=10).feed(b"0123456789A")
    assert info.value.code == "line-too-long"
    assert api.LineDecoder(max_line=10).feed(b"0123456789\n") == [b"0123456789"]


def test_discover_timeout_limit():
    assert api.decode_request(b'{"cmd":"discover","timeout":%d}' % api.MAX_DISCOVER_TIMEOUT_S)
    with pytest.raises(p.RemoteProtocolError):
        api.decode_request(b'{"cmd":"discover","timeout":30.001}')


def test_lines_escape_everything_unprintable():
    line = api.encode_line({"text": "a\x1b[31m\u009b\u202e\x7fé"})
    assert line == b'{"text":"a\\u001b[31m\\u009b\\u202e\\u007f\xc3\xa9"}\n'


EVENTS = {"message_event": "message", "offer_event": "offer", "transfer_started_event": "transfer-started",
          "progress_event": "progress", "file_done_event": "file-done", "file_failed_event": "file-failed",
          "transfer_done_event": "transfer-done", "transfer_failed_event": "transfer-failed",
          "error_event": "error", "dropped_event": "dropped"}


def test_one_builder_per_event_of_the_events_socket():
    builders = {name for name, _ in inspect.getmembers(api, inspect.isfunction) if name.endswith("_event")}
    assert builders == set(EVENTS)
    transfer = {"id": "1", "direction": "in", "peer": "10.0.0.2"}
    assert api.file_done_event(transfer, "a", "/d/a", "0" * 64, 3) == dict(
        transfer, event="file-done", file="a", path="/d/a", sha256="0" * 64, size=3)
    assert api.dropped_event(5, 100)["lost"] == 5


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=500))
def test_any_request_line_gives_a_request_or_the_modules_error(data):
    try:
        assert isinstance(api.decode_request(data), api.Request)
    except p.RemoteProtocolError:
        pass
