"""http.py without sockets: round trips, splits, malformed input, limits, body limits."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tnet import http as h
from tnet.protocol import LocalProtocolError, RemoteProtocolError

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMIT = 1 << 20


def split_at(data: bytes, points) -> list:
    cuts = sorted({p for p in points if 0 < p < len(data)})
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def drive(role: str, pieces, limit: int = LIMIT, methods=("GET",), eof: bool = True) -> list:
    """Feed ``pieces`` as a server or client would: accept every body up to
    ``limit``; a server starts the next cycle after each message, a client
    expects a response to each of ``methods``. Data is joined into bytes."""
    conn = h.Connection(role)
    out: list = []
    requests = list(reversed(methods))

    def take(events):
        for event in events:
            out.append(("data", bytes(event.data)) if isinstance(event, h.Data) else event)
            if isinstance(event, (h.Request, h.Response)):
                take(conn.accept_body(limit))
            elif isinstance(event, h.EndOfMessage) and conn.keep_alive and role == "server":
                take(conn.start_next_cycle())
            elif isinstance(event, h.EndOfMessage) and conn.keep_alive and requests:
                take(conn.expect_response(requests.pop()))

    if role == "client":
        take(conn.expect_response(requests.pop()))
    for piece in pieces:
        take(conn.feed(piece))
    if eof:
        take(conn.feed_eof())
    merged: list = []
    for item in out:
        if merged and isinstance(item, tuple) and isinstance(merged[-1], tuple):
            merged[-1] = ("data", merged[-1][1] + item[1])
        else:
            merged.append(item)
    return merged


def serve(data: bytes, limit: int = LIMIT, eof: bool = True) -> list:
    return drive("server", [data], limit, eof=eof)


def refusal(role: str, data: bytes, limit: int = LIMIT) -> h.HttpError:
    with pytest.raises(h.HttpError) as info:
        drive(role, [data], limit)
    return info.value


def req(method="GET", target="/", headers=(("host", "a"),), version="1.1") -> h.Request:
    return h.Request(method, target, tuple(headers), version)


GET = b"GET /api/localsend/v2/info HTTP/1.1\r\nHost: a\r\n\r\n"
POST = b"POST /api/localsend/v2/register HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;name=value;x\r\nhello\r\n1 ; y=\"q\"\r\n!\r\n0\r\nChecksum: abc\r\nX-Other: 1\r\n\r\n")
STREAM = GET + POST + CHUNKED
STREAM_EVENTS = [
    req("GET", "/api/localsend/v2/info"), h.EndOfMessage(),
    req("POST", "/api/localsend/v2/register", (("host", "a"), ("content-length", "5"))), ("data", b"hello"),
    h.EndOfMessage(),
    req("POST", "/u", (("host", "a"), ("transfer-encoding", "chunked"))), ("data", b"hello!"), h.EndOfMessage(),
]


# --- round trips and splits ---------------------------------------------------------------


def test_keep_alive_stream_whole():
    assert serve(STREAM) == STREAM_EVENTS


def test_keep_alive_stream_byte_by_byte():
    assert drive("server", [STREAM[i:i + 1] for i in range(len(STREAM))]) == STREAM_EVENTS


@SETTINGS
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_keep_alive_stream_random_splits(points):
    assert drive("server", split_at(STREAM, points)) == STREAM_EVENTS


def test_encoded_request_round_trip():
    wire = h.encode_request("POST", "/api/localsend/v2/prepare-upload?pin=1",
                            [("Host", "peer"), ("Content-Type", "application/json")], b'{"a":1}')
    request, data, end = serve(wire)
    assert request.method == "POST" and request.path == "/api/localsend/v2/prepare-upload"
    assert request.query == {"pin": "1"}
    assert request.header("Content-Type") == "application/json" and request.header("content-length") == "7"
    assert h.decode_json(data[1]) == {"a": 1} and end == h.EndOfMessage()


def test_encoded_response_round_trip_and_streamed_chunks():
    wire = h.encode_response(200, {"Content-Type": "application/json"}, b"{}")
    response, data, _ = drive("client", [wire])
    assert (response.status, response.reason, data) == (200, "OK", ("data", b"{}"))
    streamed = (h.encode_response_head(200, [("Transfer-Encoding", "chunked")])
                + h.encode_chunk(b"ab") + h.encode_chunk(b"") + h.encode_chunk(memoryview(b"cd")) + h.LAST_CHUNK)
    assert drive("client", [streamed])[1:] == [("data", b"abcd"), h.EndOfMessage()]


def test_lf_only_line_endings_and_leading_empty_lines_are_accepted():
    events = serve(b"\r\n\nGET / HTTP/1.1\nHost: a\n\nPOST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n"
                   b"2\nab\n0\n\n")
    assert events == [req(), h.EndOfMessage(), req("POST", "/", (("host", "a"), ("transfer-encoding", "chunked"))),
                      ("data", b"ab"), h.EndOfMessage()]


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_any_bytes_like_input(kind):
    assert drive("server", [kind(STREAM[:70]), kind(STREAM[70:])]) == STREAM_EVENTS


def test_header_accessors():
    request = serve(b"GET /x?a=1&b=%C3%A9&c= HTTP/1.1\r\nHost: a\r\nAccept: x\r\nACCEPT:  y \r\nEmpty:\r\n\r\n")[0]
    assert request.headers == (("host", "a"), ("accept", "x"), ("accept", "y"), ("empty", ""))
    assert request.header("accept") == "x, y" and request.header("empty") == "" and request.header("none") is None
    assert request.query == {"a": "1", "b": "é", "c": ""} and request.path == "/x"


# --- keep-alive ---------------------------------------------------------------------------


def test_pipelined_requests_wait_for_the_next_cycle():
    conn = h.Connection("server")
    assert conn.feed(GET + POST) == [req("GET", "/api/localsend/v2/info")]
    assert conn.paused and conn.state is h.State.BODY_WAIT
    assert conn.accept_body(0) == [h.EndOfMessage()]
    assert conn.paused and conn.keep_alive
    assert conn.feed(b"") == []  # held until our response is out
    events = conn.start_next_cycle()
    assert events[0].method == "POST" and len(events) == 1 and conn.body_length == 5
    assert [bytes(e.data) if isinstance(e, h.Data) else e for e in conn.accept_body(5)] == [b"hello", h.EndOfMessage()]
    assert conn.start_next_cycle() == [] and conn.feed_eof() == []
    assert conn.state is h.State.CLOSED


@pytest.mark.parametrize("head, keep", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: te, close\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True),
])
def test_keep_alive_follows_version_and_connection(head, keep):
    conn = h.Connection("server")
    conn.feed(head)
    conn.accept_body(0)
    assert conn.keep_alive is keep
    if keep:
        assert conn.start_next_cycle() == []
    else:
        with pytest.raises(LocalProtocolError) as info:
            conn.start_next_cycle()
        assert info.value.code == "must-close"
        assert conn.feed(GET) == []  # after a closing request nothing more is read


def test_a_close_while_paused_is_read_after_the_held_bytes():
    conn = h.Connection("server")
    conn.feed(POST[:-1])
    assert conn.feed_eof() == []
    with pytest.raises(h.HttpError) as info:
        conn.accept_body(5)
    assert (info.value.status, info.value.code) == (400, "truncated")


def test_calls_out_of_turn_are_local_errors():
    conn = h.Connection("server")
    with pytest.raises(LocalProtocolError):
        conn.accept_body(10)
    conn.feed(POST[:-2])
    with pytest.raises(LocalProtocolError):
        conn.start_next_cycle()
    with pytest.raises(LocalProtocolError):
        conn.expect_response("GET")
    with pytest.raises(LocalProtocolError):
        h.Connection("client").start_next_cycle()
    with pytest.raises(ValueError):
        h.Connection("proxy")
    conn = h.Connection("server")
    conn.feed_eof()
    with pytest.raises(LocalProtocolError):
        conn.feed(GET)


# --- malformed input ----------------------------------------------------------------------

HOST = b"Host: a\r\n"
MALFORMED = [
    (b"GET / HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", 400,
     "conflicting-length"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 3, 4\r\n\r\nabcd", 400, "bad-content-length"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400, "bad-content-length"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: -1\r\n\r\n", 400, "bad-content-length"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: +3\r\n\r\nabc", 400, "bad-content-length"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 0x3\r\n\r\nabc", 400, "bad-content-length"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: \xb2\r\n\r\nab", 400, "bad-content-length"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length:\r\n\r\n", 400, "bad-content-length"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1" + b"0" * 18 + b"\r\n\r\n", 413, "body-too-large"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip\r\n\r\n", 501, "unsupported-transfer-coding"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501, "unsupported-transfer-coding"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501,
     "unsupported-transfer-coding"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "bad-chunk-size"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n-1\r\n", 400, "bad-chunk-size"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\n", 400, "bad-chunk-size"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n\r\n", 400, "bad-chunk-size"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n 5\r\n", 400, "bad-chunk-size"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n5;a\x00\r\n", 400, "bad-chunk-size"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX", 400, "bad-chunk-end"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\r", 400, "bad-chunk-end"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n0\r\nbad name: x\r\n\r\n", 400,
     "bad-header-name"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nab", 400, "truncated"),
    (b"GET / HTTP/1.1\r\n" + HOST + b"X-A: 1\r\n continued\r\n\r\n", 400, "obsolete-folding"),
    (b"GET / HTTP/1.1\r\n\tHost: a\r\n\r\n", 400, "obsolete-folding"),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "bad-header-name"),
    (b"GET / HTTP/1.1\r\nHo(st: a\r\n\r\n", 400, "bad-header-name"),
    (b"GET / HTTP/1.1\r\n" + HOST + b"no colon\r\n\r\n", 400, "bad-header-name"),
    (b"GET / HTTP/1.1\r\n" + HOST + b": empty name\r\n\r\n", 400, "bad-header-name"),
    (b"GET / HTTP/1.1\r\n" + HOST + b"X: a\x00b\r\n\r\n", 400, "bad-header-value"),
    (b"GET / HTTP/1.1\r\n" + HOST + b"X: a\x7fb\r\n\r\n", 400, "bad-header-value"),
    (b"GET / HTTP/1.1\r\n" + HOST + b"X: a\rb\r\n\r\n", 400, "bare-cr"),
    (b"GET / HTTP/1.1\r" + HOST + b"\r\n", 400, "bare-cr"),
    (b"\rGET / HTTP/1.1\r\n" + HOST + b"\r\n", 400, "bare-cr"),
    (b"GET /  HTTP/1.1\r\n" + HOST + b"\r\n", 400, "bad-request-line"),
    (b"GET / HTTP/1.1 \r\n" + HOST + b"\r\n", 400, "bad-request-line"),
    (b"GET\t/ HTTP/1.1\r\n" + HOST + b"\r\n", 400, "bad-request-line"),
    (b"GET /\r\n\r\n", 400, "bad-request-line"),
    (b"get / http/1.1\r\n" + HOST + b"\r\n", 400, "bad-request-line"),
    (b"G(T / HTTP/1.1\r\n" + HOST + b"\r\n", 400, "bad-request-line"),
    (b"GET /\xff HTTP/1.1\r\n" + HOST + b"\r\n", 400, "bad-request-line"),
    (b"GET / HTTP/1.10\r\n" + HOST + b"\r\n", 400, "bad-request-line"),
    (b"GET / HTTP/2.0\r\n" + HOST + b"\r\n", 505, "unsupported-version"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "bad-host"),
    (b"GET / HTTP/1.1\r\n" + HOST + HOST + b"\r\n", 400, "bad-host"),
    (b"GET / HTTP/1.1\r\nHost: a", 400, "truncated"),
    (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n\r\nabc", 400, "truncated"),
]


@pytest.mark.parametrize("data, status, code", MALFORMED)
def test_malformed_requests_are_refused(data, status, code):
    error = refusal("server", data)
    assert (error.status, error.code) == (status, code)
    assert isinstance(error, RemoteProtocolError)


@pytest.mark.parametrize("data, status, code", MALFORMED)
def test_malformed_requests_fed_byte_by_byte_give_the_same_refusal(data, status, code):
    with pytest.raises(h.HttpError) as info:
        drive("server", [data[i:i + 1] for i in range(len(data))])
    assert (info.value.status, info.value.code) == (status, code)


def test_an_error_is_sticky():
    conn = h.Connection("server")
    with pytest.raises(h.HttpError) as first:
        conn.feed(b"BAD\r\n\r\n")
    for call in (lambda: conn.feed(GET), conn.feed_eof, lambda: conn.accept_body(1), conn.start_next_cycle):
        with pytest.raises(h.HttpError) as again:
            call()
        assert again.value is first.value
    assert conn.state is h.State.ERROR


MALFORMED_RESPONSES = [
    (b"HTTP/1.1 200\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "conflicting-length"),
    (b"HTTP/1.1 20 OK\r\n\r\n", "bad-status-line"),
    (b"HTTP/1.1 200 OK\x00\r\n\r\n", "bad-status-line"),
    (b"HTTP/1.1  200 OK\r\n\r\n", "bad-status-line"),
    (b"ICY 200 OK\r\n\r\n", "bad-status-line"),
    (b"HTTP/2.0 200 OK\r\n\r\n", "unsupported-version"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", "unexpected-upgrade"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", "truncated"),
    (b"", "no-response"),
]


@pytest.mark.parametrize("data, code", MALFORMED_RESPONSES)
def test_malformed_responses_are_refused_with_502(data, code):
    error = refusal("client", data)
    assert (error.status, error.code) == (502, code)


# --- responses ----------------------------------------------------------------------------


@pytest.mark.parametrize("head, method", [
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n", "GET"),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "HEAD"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "head"),
])
def test_responses_without_a_body(head, method):
    second = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    events = drive("client", [head + second], methods=(method, "GET"))
    assert [type(e) for e in events] == [h.Response, h.EndOfMessage, h.Response, tuple, h.EndOfMessage]
    assert events[3] == ("data", b"ok")


def test_a_response_body_until_eof():
    conn = h.Connection("client")
    conn.expect_response("GET")
    events = conn.feed(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nsome")
    assert events == [h.Response(200, "OK", (("server", "x"),), "1.0")]
    assert conn.body_length is None and not conn.keep_alive
    assert conn.feed(b" more") == []  # held while paused
    assert conn.feed_eof() == []  # the close waits behind the held bytes
    assert [bytes(e.data) if isinstance(e, h.Data) else e for e in conn.accept_body(9)] == [b"some more",
                                                                                          h.EndOfMessage()]


def test_interim_responses_are_dropped():
    events = drive("client", [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
                              b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    assert events == [h.Response(200, "OK", (("content-length", "0"),)), h.EndOfMessage()]


def test_a_status_line_without_reason():
    assert drive("client", [b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n"])[0].reason == ""


def test_a_closed_keep_alive_connection_gives_no_response():
    conn = h.Connection("client")
    conn.expect_response("GET")
    conn.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn.accept_body(0)
    conn.feed_eof()
    with pytest.raises(h.HttpError) as info:
        conn.expect_response("GET")
    assert info.value.code == "no-response"


# --- limits at N and N+1 ------------------------------------------------------------------


def request_line(length: int) -> bytes:
    line = b"GET /" + b"a" * (length - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == length
    return line


@pytest.mark.parametrize("crlf", [b"\r\n", b"\n"])
def test_start_line_limit(crlf):
    ok = request_line(h.MAX_START_LINE_BYTES) + crlf + HOST + b"\r\n"
    assert serve(ok)[0].target.startswith("/aaa")
    assert drive("server", [ok[i:i + 1000] for i in range(0, len(ok), 1000)])[0].method == "GET"
    error = refusal("server", request_line(h.MAX_START_LINE_BYTES + 1) + crlf + HOST + b"\r\n")
    assert (error.status, error.code) == (414, "start-line-too-long")


def test_an_incomplete_start_line_is_refused_as_soon_as_it_is_over():
    conn = h.Connection("server")
    assert conn.feed(request_line(h.MAX_START_LINE_BYTES) + b"\r") == []  # the CR may end it yet
    with pytest.raises(h.HttpError) as info:
        h.Connection("server").feed(request_line(h.MAX_START_LINE_BYTES + 2))
    assert info.value.status == 414


def fields_of(length: int) -> bytes:
    """Host plus one field: ``length`` bytes of field lines with their CRLFs."""
    filler = length - len(HOST) - len(b"X: \r\n")
    block = HOST + b"X: " + b"v" * filler + b"\r\n"
    assert len(block) == length
    return block


def test_header_bytes_limit():
    ok = b"GET / HTTP/1.1\r\n" + fields_of(h.MAX_HEADER_BYTES) + b"\r\n"
    assert len(serve(ok)[0].header("x")) > 16000
    error = refusal("server", b"GET / HTTP/1.1\r\n" + fields_of(h.MAX_HEADER_BYTES + 1) + b"\r\n")
    assert (error.status, error.code) == (431, "headers-too-large")


def test_an_incomplete_header_block_is_refused_as_soon_as_it_is_over():
    start = b"GET / HTTP/1.1\r\n"
    assert h.Connection("server").feed(start + fields_of(h.MAX_HEADER_BYTES) + b"\r") == []
    with pytest.raises(h.HttpError) as info:
        h.Connection("server").feed(start + fields_of(h.MAX_HEADER_BYTES) + b"X: y")
    assert info.value.status == 431


def test_header_count_limit():
    def head(count):
        return b"GET / HTTP/1.1\r\n" + HOST + b"".join(b"X-%d: 1\r\n" % i for i in range(count - 1)) + b"\r\n"
    assert len(serve(head(h.MAX_HEADERS))[0].headers) == h.MAX_HEADERS
    error = refusal("server", head(h.MAX_HEADERS + 1))
    assert (error.status, error.code) == (431, "too-many-headers")


def chunked(chunk_line: bytes, trailer: bytes = b"") -> bytes:
    return (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
            + chunk_line + b"\r\nabc\r\n0\r\n" + trailer + b"\r\n")


def test_chunk_line_limit():
    def line(length):
        return b"3;" + b"e" * (length - 2)
    assert serve(chunked(line(h.MAX_CHUNK_LINE_BYTES)))[1] == ("data", b"abc")
    error = refusal("server", chunked(line(h.MAX_CHUNK_LINE_BYTES + 1)))
    assert (error.status, error.code) == (400, "chunk-line-too-long")


def test_tiny_chunks_are_refused_past_the_free_ones():
    """A chunk is a step of the loop: a body of one-byte chunks would cost it
    seconds per MiB, so past FREE_CHUNKS a chunk must carry MIN_CHUNK_BYTES on average."""
    def body(sizes):
        return (b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"%x\r\n" % n + b"x" * n + b"\r\n" for n in sizes) + b"0\r\n\r\n")
    events = serve(body([1] * (h.FREE_CHUNKS - 1)))  # the last chunk is one more
    assert b"".join(bytes(e[1]) for e in events if isinstance(e, tuple)) == b"x" * (h.FREE_CHUNKS - 1)
    error = refusal("server", body([1] * h.FREE_CHUNKS))
    assert (error.status, error.code) == (400, "chunks-too-small")
    big = h.MIN_CHUNK_BYTES * 4
    earned = [big] * 100 + [1] * (h.FREE_CHUNKS + 298)  # 400 chunks earned by the big ones, less the last chunk
    assert serve(body(earned), limit=10 ** 6)[1] == ("data", b"x" * sum(earned))
    assert refusal("server", body([big] * 100 + [1] * (h.FREE_CHUNKS + 400)), limit=10 ** 6).code == "chunks-too-small"


def test_trailer_limit():
    def trailer(length):
        return b"T: " + b"t" * (length - 5) + b"\r\n"
    events = serve(chunked(b"3", b"A: 1\r\n" + trailer(h.MAX_TRAILER_BYTES - 6)))
    assert events[1:] == [("data", b"abc"), h.EndOfMessage()]
    error = refusal("server", chunked(b"3", b"A: 1\r\n" + trailer(h.MAX_TRAILER_BYTES - 5)))
    assert (error.status, error.code) == (431, "trailer-too-large")
    error = refusal("server", chunked(b"3", trailer(h.MAX_TRAILER_BYTES + 1)))
    assert (error.status, error.code) == (431, "trailer-too-large")


def test_held_bytes_limit():
    conn = h.Connection("server")
    conn.feed(GET)
    conn.accept_body(0)
    conn.feed(b"x" * (h.MAX_HELD_BYTES - 1))
    conn.feed(b"x")
    with pytest.raises(h.HttpError) as info:
        conn.feed(b"x")
    assert (info.value.status, info.value.code) == (400, "too-far-ahead")


def test_content_length_digits_limit():
    def head(digits):
        return b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: " + digits + b"\r\n\r\n"
    conn = h.Connection("server")
    conn.feed(head(b"0" * 5000 + b"9" * h.MAX_LENGTH_DIGITS))  # leading zeros are no size
    assert conn.body_length == 10 ** h.MAX_LENGTH_DIGITS - 1
    assert refusal("server", head(b"1" + b"0" * h.MAX_LENGTH_DIGITS)).status == 413


# --- the caller's body limit --------------------------------------------------------------


def test_body_limit_by_content_length():
    assert serve(POST, limit=5)[1] == ("data", b"hello")
    error = refusal("server", POST, limit=4)
    assert (error.status, error.code) == (413, "body-too-large")


def test_body_limit_chunked():
    assert serve(CHUNKED, limit=6)[1] == ("data", b"hello!")
    assert refusal("server", CHUNKED, limit=5).status == 413
    assert refusal("server", CHUNKED, limit=4).status == 413


def test_body_limit_until_eof():
    response = b"HTTP/1.1 200 OK\r\n\r\n" + b"z" * 10
    assert drive("client", [response], limit=10)[1] == ("data", b"z" * 10)
    assert drive("client", [response[:-3], response[-3:]], limit=10)[1] == ("data", b"z" * 10)
    assert refusal("client", response, limit=9).code == "body-too-large"


def test_a_body_is_refused_before_any_of_it_comes_out():
    conn = h.Connection("server")
    assert [type(e) for e in conn.feed(POST)] == [h.Request]  # the body waits for the caller's limit
    with pytest.raises(h.HttpError):
        conn.accept_body(4)


# --- streaming without copies -------------------------------------------------------------


def test_a_large_body_streams_as_views_of_each_feed():
    piece = b"\r\n\r\n" * (1 << 18)  # 1 MiB that looks like head ends: never searched
    count = 64
    conn = h.Connection("server")
    conn.feed(b"PUT /f HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (len(piece) * count))
    assert conn.accept_body(len(piece) * count) == []
    for index in range(count):
        events = conn.feed(piece)
        assert isinstance(events[0].data, memoryview) and events[0].data.obj is piece
        assert len(events[0].data) == len(piece)
        assert events[1:] == ([h.EndOfMessage()] if index == count - 1 else [])


def test_chunks_view_the_fed_buffer():
    head_end = CHUNKED.index(b"5;")
    conn = h.Connection("server")
    conn.feed(CHUNKED[:head_end])
    assert conn.accept_body(LIMIT) == []
    tail = CHUNKED[head_end:]
    chunks = [e.data for e in conn.feed(tail) if isinstance(e, h.Data)]
    assert [bytes(c) for c in chunks] == [b"hello", b"!"]
    assert all(isinstance(c, memoryview) and c.obj is tail for c in chunks)


# --- any bytes ----------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=1500), st.sampled_from(["server", "client"]))
def test_any_bytes_give_events_or_http_error(data, role):
    try:
        events = drive(role, [data])
    except h.HttpError as exc:
        assert 400 <= exc.status <= 505 and exc.code
        return
    assert all(isinstance(e, (h.Request, h.Response, h.EndOfMessage, tuple)) for e in events)


FRAGMENTS = [b"GET / HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 100 Continue\r\n", b"Host: a\r\n",
             b"Content-Length: ", b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n", b"\r\n", b"\n",
             b"\r", b" ", b"\t", b":", b";", b",", b"0", b"5", b"f", b"x", b"\x00", b"\xff", b"0" * 5000]


@SETTINGS
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40), st.sampled_from(["server", "client"]),
       st.lists(st.integers(0, 6000), max_size=5))
def test_plausible_fragments_give_events_or_http_error(parts, role, points):
    data = b"".join(parts)
    try:
        drive(role, split_at(data, points), limit=100)
    except h.HttpError as exc:
        assert exc.code


HEADS = [b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
         b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n"]


@SETTINGS
@given(st.sampled_from(HEADS), st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=8))
def test_any_bytes_after_a_head_split_anywhere_give_the_same_outcome(head, tail, points):
    def outcome(pieces):
        try:
            return drive("server", pieces, limit=200)
        except h.HttpError as exc:
            return (exc.status, exc.code)
    data = head + tail
    assert outcome(split_at(data, points)) == outcome([data])


@SETTINGS
@given(st.binary(max_size=200))
def test_chunk_sizes_and_trailers_from_any_bytes(tail):
    try:
        drive("server", [HEADS[0] + tail])
    except h.HttpError as exc:
        assert exc.status in (400, 413, 431)


# --- encoding -----------------------------------------------------------------------------


def test_encode_request_frames_the_body():
    assert h.encode_request("GET", "/i", [("Host", "a")]) == b"GET /i HTTP/1.1\r\nHost: a\r\n\r\n"
    assert h.encode_request("POST", "/c", {"Host": "a"}) == b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
    assert h.encode_request("PUT", "/u", [], memoryview(b"xy")).endswith(b"Content-Length: 2\r\n\r\nxy")
    assert h.encode_request_head("POST", "/u", [("Content-Length", "9")]).endswith(b"Content-Length: 9\r\n\r\n")


def test_encode_response_frames_the_body():
    assert h.encode_response(200, [], b"{}") == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    assert h.encode_response(404, []) == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    assert h.encode_response(204, []) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert h.encode_response_head(599, [], None) == b"HTTP/1.1 599 \r\n\r\n"
    assert h.encode_response_head(200, [], "Fine") == b"HTTP/1.1 200 Fine\r\n\r\n"


@pytest.mark.parametrize("call", [
    lambda: h.encode_response(200, [("X", "a\r\nInjected: 1")]),
    lambda: h.encode_response(200, [("X", "a\nb")]),
    lambda: h.encode_response(200, [("X", "a\x00")]),
    lambda: h.encode_response(200, [("X", " padded")]),
    lambda: h.encode_response(200, [("X", "\u20ac")]),
    lambda: h.encode_response(200, [("Bad Name", "v")]),
    lambda: h.encode_response(200, [("X:", "v")]),
    lambda: h.encode_response(200, [("Content-Length", "3")], b"abc"),
    lambda: h.encode_request("POST", "/", [("Transfer-Encoding", "chunked")], b"x"),
    lambda: h.encode_response(204, [], b"x"),
    lambda: h.encode_response(1000, []),
    lambda: h.encode_response_head(200, [], "OK\r\nX: y"),
    lambda: h.encode_request("GE T", "/", []),
    lambda: h.encode_request("GET", "/a b", []),
    lambda: h.encode_request("GET", "", []),
    lambda: h.encode_request("GET", "/\u00e9", []),
])
def test_encoders_refuse_what_would_break_framing(call):
    with pytest.raises(LocalProtocolError):
        call()


# --- helpers ------------------------------------------------------------------------------


def test_parse_query():
    target = "/api/localsend/v2/upload?sessionId=s1&fileId=f%2F1&token=t+1"
    assert h.parse_query(target) == {"sessionId": "s1", "fileId": "f/1", "token": "t 1"}
    assert h.parse_query("/x") == {}
    for bad in ("/u?a=1&a=2", "/u?a=%ff"):
        with pytest.raises(h.HttpError) as info:
            h.parse_query(bad)
        assert (info.value.status, info.value.code) == (400, "bad-query")


def test_decode_json():
    assert h.decode_json(memoryview(b'{"alias": "x"}')) == {"alias": "x"}
    for bad in (b"{", b"\xff", b"[" * 100_000):
        with pytest.raises(h.HttpError) as info:
            h.decode_json(bad)
        assert info.value.code == "bad-json"


# --- the sans-IO rule ---------------------------------------------------------------------

FORBIDDEN = {"socket", "selectors", "os", "time", "random", "select", "asyncio", "io", "pathlib", "shutil",
             "subprocess", "threading", "secrets", "tempfile", "ssl"}


def test_http_imports_no_io():
    tree = ast.parse(Path(h.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "open":
            pytest.fail("http.py calls open()")
    assert not imported & FORBIDDEN, imported & FORBIDDEN
