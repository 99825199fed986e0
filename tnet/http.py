"""HTTP/1.1 messages, bytes in and events out, without any I/O.

A sans-IO codec for the HTTP/1.1 (RFC 9112) that LocalSend v2 speaks, in the
manner of h11. It holds the limits, each with its reason; frozen events
(``Request`` and ``Response`` heads, ``Data`` pieces of a body, ``EndOfMessage``);
``Connection``, which parses what one peer sends (requests for a ``"server"``,
responses for a ``"client"``) and hands each body to a ``_Body`` to read;
``encode_*`` for heads, messages and chunks; helpers for a query string and a
JSON body; and ``HttpError``, which carries the status a server answers with.

It must not touch sockets, files, clocks or TLS, and knows no LocalSend schema.
Bodies are streamed, never accumulated: ``Data`` views the fed buffer, and a
body of known length costs O(1) per ``feed`` however large it is. Parsing
pauses so that the caller decides before more is read::

    conn = Connection("server")
    conn.feed(data)            # [..., Request]: it pauses after every head
    conn.accept_body(limit)    # [Data..., EndOfMessage]: a larger body is a 413
    conn.start_next_cycle()    # once the response is out: the next request

A client calls ``expect_response(method)`` after sending each request. While
``paused``, fed bytes are held (up to ``MAX_HELD_BYTES``) and the resuming call
returns their events. Leniency, as in h11: a bare LF ends a line as CRLF does,
and empty lines before a start line are skipped (RFC 9112 §2.2). All else that
RFC 9112 calls invalid is refused, obsolete line folding included.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union
from urllib.parse import parse_qsl, urlsplit

from .protocol import LocalProtocolError, RemoteProtocolError

# --- Limits -------------------------------------------------------------------

MAX_START_LINE_BYTES = 8 * 1024  # a request or status line; an upload's target is ~200 bytes, 8 KiB is the usual cap
MAX_HEADER_BYTES = 16 * 1024  # the field lines of one head, as h11 allows; real clients send under 2 KiB
MAX_HEADERS = 100  # fields in one head, as CPython's http.client allows
MAX_CHUNK_LINE_BYTES = 1024  # a chunk size and its extensions, which nobody needs
MAX_TRAILER_BYTES = 8 * 1024  # trailer fields after a chunked body, which are dropped unread
# Each chunk costs a step of its own: chunks of a byte each would take the loop
# seconds per MiB. Past the first FREE_CHUNKS, a body needs MIN_CHUNK_BYTES a chunk.
FREE_CHUNKS, MIN_CHUNK_BYTES = 64, 1024
MAX_HELD_BYTES = 64 * 1024  # what a peer may send ahead of our answer (pipelining): a few heads
MAX_LENGTH_DIGITS = 18  # a Content-Length of 10**18 bytes (an exabyte) or more is refused as too large

_HEAD_ROOM = MAX_START_LINE_BYTES + 2 + MAX_HEADER_BYTES + 2  # a maximal head with its line endings

Headers = Tuple[Tuple[str, str], ...]
HeadersIn = Union[Mapping[str, str], Iterable[Tuple[str, str]]]

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"  # RFC 9110 §5.6.2
_TOKEN_RE = re.compile(_TOKEN)
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([1-9][0-9]{2})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls but HTAB (RFC 9110 §5.5)
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?")
_TARGET = re.compile(r"[\x21-\x7e]+")
_HEAD_END = re.compile(rb"\n\r?\n")
_EMPTY_LINES = re.compile(rb"(?:\r?\n)*")
_NO_BODY_STATUSES = (204, 304)  # and 1xx; RFC 9112 §6.3


# --- Errors and events --------------------------------------------------------


class HttpError(RemoteProtocolError):
    """The peer sent what HTTP/1.1 forbids or a limit refuses.

    ``status`` is what a server answers before closing (400, 413, 414, 431, 501,
    505). A client has nobody to answer: its errors carry 502, as a gateway's would.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status = status


class _Head:
    headers: Headers

    def header(self, name: str) -> Optional[str]:
        """The field's value, repeated fields joined by ", " (RFC 9110 §5.3); None if absent."""
        name = name.lower()
        values = [value for key, value in self.headers if key == name]
        return ", ".join(values) if values else None


@dataclass(frozen=True)
class Request(_Head):
    """A request's head. Names are lower case; values are decoded as Latin-1."""

    method: str
    target: str
    headers: Headers
    http_version: str = "1.1"

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> Dict[str, str]:
        return parse_query(self.target)


@dataclass(frozen=True)
class Response(_Head):
    """A response's head (interim 1xx responses are dropped, never shown)."""

    status: int
    reason: str
    headers: Headers
    http_version: str = "1.1"


@dataclass(frozen=True)
class Data:
    """A piece of the body. ``data`` may view the fed buffer: use it before that buffer is reused."""

    data: Union[bytes, memoryview]


@dataclass(frozen=True)
class EndOfMessage:
    """The body is complete (trailers, if any, were dropped)."""


Event = Union[Request, Response, Data, EndOfMessage]


class State(enum.Enum):
    IDLE = "idle"  #: a client before its first ``expect_response``
    HEAD = "head"  #: reading a request or status line and its fields
    BODY_WAIT = "body-wait"  #: a head is out; waiting for ``accept_body``
    LENGTH = "length"  #: a body of known length
    CHUNK_SIZE = "chunk-size"  #: a chunk-size line
    CHUNK_DATA = "chunk-data"  #: a chunk's bytes
    CHUNK_END = "chunk-end"  #: the line ending after a chunk's bytes
    TRAILER = "trailer"  #: trailer fields after the last chunk
    UNTIL_EOF = "until-eof"  #: a response body that the close ends
    DONE = "done"  #: a message is complete; waiting for the next cycle
    CLOSED = "closed"  #: the peer closed between messages
    ERROR = "error"  #: the peer broke the protocol; nothing more is read


_PAUSED = (State.IDLE, State.BODY_WAIT, State.DONE)
_BODY_STATES = (State.LENGTH, State.CHUNK_SIZE, State.CHUNK_DATA, State.CHUNK_END, State.TRAILER, State.UNTIL_EOF)


# --- Parsing ------------------------------------------------------------------


class Connection:
    """Parses what one peer sends on one connection: requests for a ``"server"``,
    responses for a ``"client"``. Every method returns events; each raises
    ``HttpError`` for bad input (and again on every later call), and
    ``LocalProtocolError`` when called out of turn."""

    def __init__(self, role: str) -> None:
        if role not in ("server", "client"):
            raise ValueError(role)
        self.role = role
        self.state = State.HEAD if role == "server" else State.IDLE
        self.keep_alive = True  #: whether another message may follow the current one
        self.body_length: Optional[int] = None  #: the current body's declared length (None: chunked or until EOF)
        self._buf = bytearray()  # an incomplete head
        self._scanned = 0  # how far _buf has been searched for the head's end
        self._held = b""  # bytes fed while paused
        self._eof = False
        self._error: Optional[HttpError] = None
        self._method = ""  # of the request a client awaits the response to
        self._chunked = False
        self._body = _Body()  # reads each body once its head has framed it
        self._steps = {state: self._step_body for state in _BODY_STATES}
        self._steps[State.HEAD] = self._step_head

    @property
    def paused(self) -> bool:
        """Waiting for the caller; a loop may stop reading until it resumes."""
        return self.state in _PAUSED

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> List[Event]:
        self._check_open()
        if self.paused:
            return self._guard(self._hold, data)
        return self._guard(self._run, memoryview(data).cast("B"))

    def feed_eof(self) -> List[Event]:
        """The peer closed its side. Mid-message that is an error."""
        self._check_open()
        self._eof = True
        return [] if self.paused else self._guard(self._on_eof)

    def accept_body(self, max_bytes: int) -> List[Event]:
        """Read the body of the head just received, refusing (413) more than ``max_bytes``."""
        self._check_error()
        if self.state is not State.BODY_WAIT:
            raise LocalProtocolError("out-of-turn", f"accept_body in state {self.state.value}")
        return self._guard(self._start_body, max_bytes)

    def start_next_cycle(self) -> List[Event]:
        """A server sent its response: read the next request."""
        if self.role != "server":
            raise LocalProtocolError("out-of-turn", "a client calls expect_response")
        return self._next_cycle()

    def expect_response(self, method: str) -> List[Event]:
        """A client sent a request with ``method`` (a HEAD's response has no body): read the response."""
        if self.role != "client":
            raise LocalProtocolError("out-of-turn", "a server calls start_next_cycle")
        self._method = method.upper()
        return self._next_cycle()

    # -- driving

    def _check_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _check_open(self) -> None:
        self._check_error()
        if self._eof:
            raise LocalProtocolError("out-of-turn", "the peer has closed: nothing more to feed")

    def _guard(self, step: Callable[..., List[Event]], *args: Any) -> List[Event]:
        try:
            return step(*args)
        except HttpError as exc:
            if self.role == "client":
                exc.status = 502
            self._error = exc
            self.state = State.ERROR
            raise

    def _run(self, view: memoryview) -> List[Event]:
        events: List[Event] = []
        pos = 0
        while pos < len(view) and not self.paused:
            pos = self._steps[self.state](view, pos, events)
        if pos < len(view):
            self._held = bytes(view[pos:])  # once per message: at most what one feed brought
        return events

    def _hold(self, data: Union[bytes, bytearray, memoryview]) -> List[Event]:
        if self.state is State.DONE and not self.keep_alive:
            return []  # after a message that ends the connection, nothing more is read
        if len(self._held) + len(data) > MAX_HELD_BYTES:
            raise HttpError(400, "too-far-ahead", f"over {MAX_HELD_BYTES} bytes sent before our answer")
        self._held += bytes(data)
        return []

    def _resume(self) -> List[Event]:
        held, self._held = self._held, b""
        events = self._run(memoryview(held)) if held else []
        if self._eof and not self.paused:
            events += self._on_eof()
        return events

    def _next_cycle(self) -> List[Event]:
        self._check_error()  # a close already fed is fine: it is read after the held bytes
        if self.state not in (State.IDLE, State.DONE, State.CLOSED):
            raise LocalProtocolError("out-of-turn", f"the current message is not complete ({self.state.value})")
        if not self.keep_alive or self.state is State.CLOSED:
            raise LocalProtocolError("must-close", "the connection carries no further message")
        self.state = State.HEAD
        return self._guard(self._resume)

    def _on_eof(self) -> List[Event]:
        if self.state is State.UNTIL_EOF:
            return self._end_message([])
        if self.state is State.HEAD and not self._buf:
            if self.role == "client":
                raise HttpError(400, "no-response", "the server closed without a response")
            self.state = State.CLOSED
            return []
        raise HttpError(400, "truncated", f"the peer closed mid-message ({self.state.value})")

    def _end_message(self, events: List[Event]) -> List[Event]:
        events.append(EndOfMessage())
        self.state = State.DONE
        return events

    # -- the head

    def _step_head(self, view: memoryview, pos: int, events: List[Event]) -> int:
        buf = self._buf
        before = len(buf)
        buf += view[pos:pos + _HEAD_ROOM + 1 - before]  # one byte over a maximal head tells it is too large
        taken = len(buf) - before
        skipped = _EMPTY_LINES.match(buf).end()  # type: ignore[union-attr]
        if skipped:
            del buf[:skipped]
            self._scanned = 0
        end = _HEAD_END.search(buf, max(self._scanned - 2, 0))
        self._check_size(end.start() + 1 if end else -1)
        if end is None:
            self._scanned = len(buf)
            return pos + taken
        extra = len(buf) - end.end()
        head = bytes(buf[:end.start() + 1])
        buf.clear()
        self._scanned = 0
        self._parse_head(head, events)
        return pos + taken - extra

    def _check_size(self, end: int) -> None:
        """Refuse a whole head (its blank line at ``end``) over the limits, or a
        partial one (``end`` is -1) as soon as no ending could bring it within."""
        buf = self._buf
        lf = buf.find(b"\n", 0, MAX_START_LINE_BYTES + 2)
        start = len(buf) - 1 if lf < 0 else lf - (buf[lf - 1:lf] == b"\r")  # the last byte may be a CR
        if start > MAX_START_LINE_BYTES:
            raise HttpError(414, "start-line-too-long", f"a request or status line over {MAX_START_LINE_BYTES} bytes")
        if lf >= 0 and (end if end >= 0 else len(buf) - 1) - lf - 1 > MAX_HEADER_BYTES:
            raise HttpError(431, "headers-too-large", f"header fields over {MAX_HEADER_BYTES} bytes")

    def _parse_head(self, head: bytes, events: List[Event]) -> None:
        """``head`` is the start line and field lines, each ending in LF or CRLF."""
        lines = [_strip_cr(line) for line in head.split(b"\n")[:-1]]
        if len(lines) - 1 > MAX_HEADERS:
            raise HttpError(431, "too-many-headers", f"more than {MAX_HEADERS} header fields")
        headers = tuple(_parse_field(line) for line in lines[1:])
        if self.role == "server":
            self._on_request_line(lines[0], headers, events)
        else:
            self._on_status_line(lines[0], headers, events)

    def _on_request_line(self, line: bytes, headers: Headers, events: List[Event]) -> None:
        match = _REQUEST_LINE.fullmatch(line)
        if match is None:
            raise HttpError(400, "bad-request-line", f"not METHOD SP target SP HTTP/1.x: {line[:80]!r}")
        method, target, major, minor = (group.decode("ascii") for group in match.groups())
        if major != "1":
            raise HttpError(505, "unsupported-version", f"HTTP/{major}.{minor}; this server speaks HTTP/1.1")
        request = Request(method, target, headers, f"1.{minor}")
        hosts = [value for name, value in headers if name == "host"]
        if request.http_version != "1.0" and len(hosts) != 1:  # RFC 9112 §3.2
            raise HttpError(400, "bad-host", "an HTTP/1.1 request has exactly one Host field")
        self._set_framing(request, body_allowed=True)
        events.append(request)

    def _on_status_line(self, line: bytes, headers: Headers, events: List[Event]) -> None:
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise HttpError(400, "bad-status-line", f"not HTTP/1.x SP status SP reason: {line[:80]!r}")
        major, minor, status = (int(group) for group in match.groups()[:3])
        if major != 1:
            raise HttpError(505, "unsupported-version", f"HTTP/{major}.{minor}")
        if status == 101:
            raise HttpError(400, "unexpected-upgrade", "101 Switching Protocols was never asked for")
        if status < 200:
            return  # an interim response (100 Continue): the final one follows
        response = Response(status, (match.group(4) or b"").decode("latin-1"), headers, f"1.{minor}")
        self._set_framing(response, body_allowed=status not in _NO_BODY_STATUSES and self._method != "HEAD")
        events.append(response)

    def _set_framing(self, head: Union[Request, Response], body_allowed: bool) -> None:
        """How the body is delimited (RFC 9112 §6.3), and whether another message may follow."""
        tokens = {token.strip().lower() for token in (head.header("connection") or "").split(",")}
        self.keep_alive = "keep-alive" in tokens if head.http_version == "1.0" else "close" not in tokens
        self._chunked = False
        self.body_length = 0
        self.state = State.BODY_WAIT
        if not body_allowed:
            return
        coding, length = head.header("transfer-encoding"), head.header("content-length")
        if coding is not None and length is not None:
            raise HttpError(400, "conflicting-length", "both Transfer-Encoding and Content-Length")
        if coding is not None:
            if [token.strip().lower() for token in coding.split(",") if token.strip()] != ["chunked"]:
                raise HttpError(501, "unsupported-transfer-coding", f"only chunked is understood: {coding!r}")
            self._chunked, self.body_length = True, None
        elif length is not None:
            self.body_length = _parse_length(length)
        elif isinstance(head, Response):
            self.body_length, self.keep_alive = None, False  # the close ends the body

    # -- the body

    def _start_body(self, max_bytes: int) -> List[Event]:
        self.state = self._body.start(self._chunked, self.body_length, max_bytes)
        if self.state is State.DONE:
            return self._end_message([])  # paused again: the held bytes wait for the next cycle
        return self._resume()

    def _step_body(self, view: memoryview, pos: int, events: List[Event]) -> int:
        pos = self._body.step(view, pos, events)
        self.state = self._body.state  # the body's state is the connection's until the message ends
        if self.state is State.DONE:
            self._end_message(events)
        return pos


class _Body:
    """Reads one body for ``Connection`` once its framing is known (RFC 9112
    §6.3, §7.1): bytes of a known length, bytes until the close, or chunks --
    size lines, their bytes and line endings, then trailers. ``state`` is one of
    the body's ``State``s, and ``DONE`` once it is complete; the connection
    mirrors it after every step and adds the ``EndOfMessage``. Data passes as
    slices of the fed view, so a known length costs one step per ``feed``."""

    def __init__(self) -> None:
        self.state = State.DONE
        self._line = bytearray()  # an incomplete chunk-size or trailer line
        self._left = 0  # bytes of the body or chunk still due
        self._limit_left = 0  # bytes the caller still accepts of a chunked or EOF-delimited body
        self._trailer_left = 0
        self._chunks = self._chunk_bytes = 0  # of the current chunked body: chunks and their bytes so far
        self._saw_cr = False
        self._steps = {
            State.LENGTH: self._step_data, State.CHUNK_DATA: self._step_data,
            State.CHUNK_SIZE: self._step_chunk_size, State.CHUNK_END: self._step_chunk_end,
            State.TRAILER: self._step_trailer, State.UNTIL_EOF: self._step_until_eof,
        }

    def start(self, chunked: bool, length: Optional[int], max_bytes: int) -> State:
        """Begin a body (``length`` None: chunked or until EOF) refusing (413) more
        than ``max_bytes``; the first state, ``DONE`` at once for an empty body."""
        if length is not None and length > max_bytes:
            raise HttpError(413, "body-too-large", f"{length} bytes, at most {max_bytes} taken here")
        self._limit_left = max_bytes
        self._chunks = self._chunk_bytes = 0
        if chunked:
            self.state = State.CHUNK_SIZE
        elif length is None:
            self.state = State.UNTIL_EOF
        elif length:
            self.state, self._left = State.LENGTH, length
        else:
            self.state = State.DONE
        return self.state

    def step(self, view: memoryview, pos: int, events: List[Event]) -> int:
        """Read from ``view`` at ``pos`` in the current state; where reading stopped."""
        return self._steps[self.state](view, pos, events)

    def _step_data(self, view: memoryview, pos: int, events: List[Event]) -> int:
        take = min(self._left, len(view) - pos)
        events.append(Data(view[pos:pos + take]))
        self._left -= take
        if not self._left:
            if self.state is State.CHUNK_DATA:
                self.state, self._saw_cr = State.CHUNK_END, False
            else:
                self.state = State.DONE
        return pos + take

    def _step_until_eof(self, view: memoryview, pos: int, events: List[Event]) -> int:
        if len(view) - pos > self._limit_left:
            raise HttpError(413, "body-too-large", "the body is over the limit taken here")
        self._limit_left -= len(view) - pos
        events.append(Data(view[pos:]))
        return len(view)

    def _step_chunk_size(self, view: memoryview, pos: int, events: List[Event]) -> int:
        line, pos = self._read_line(view, pos, MAX_CHUNK_LINE_BYTES + 2, 400, "chunk-line-too-long")
        if line is None:
            return pos
        match = _CHUNK_SIZE.fullmatch(_strip_cr(line[:-1]))
        if match is None:
            raise HttpError(400, "bad-chunk-size", f"not a chunk size: {line[:40]!r}")
        size = int(match.group(1), 16)
        if size > self._limit_left:
            raise HttpError(413, "body-too-large", f"a chunk of {size} bytes, {self._limit_left} still taken")
        self._limit_left -= size
        self._chunks, self._chunk_bytes = self._chunks + 1, self._chunk_bytes + size
        if self._chunks > FREE_CHUNKS + self._chunk_bytes // MIN_CHUNK_BYTES:
            raise HttpError(400, "chunks-too-small", f"{self._chunks} chunks for {self._chunk_bytes} bytes: "
                                                     f"at most {FREE_CHUNKS}, then one per {MIN_CHUNK_BYTES} bytes")
        if size:
            self.state, self._left = State.CHUNK_DATA, size
        else:
            self.state, self._trailer_left = State.TRAILER, MAX_TRAILER_BYTES
        return pos

    def _step_chunk_end(self, view: memoryview, pos: int, events: List[Event]) -> int:
        byte = view[pos]
        if byte == 0x0D and not self._saw_cr:
            self._saw_cr = True
        elif byte == 0x0A:
            self.state = State.CHUNK_SIZE
        else:
            raise HttpError(400, "bad-chunk-end", "a chunk's data is followed by CRLF")
        return pos + 1

    def _step_trailer(self, view: memoryview, pos: int, events: List[Event]) -> int:
        line, pos = self._read_line(view, pos, self._trailer_left + 2, 431, "trailer-too-large")
        if line is None:
            return pos
        field = _strip_cr(line[:-1])
        if not field:
            self.state = State.DONE
            return pos
        if len(line) > self._trailer_left:
            raise HttpError(431, "trailer-too-large", f"trailer fields over {MAX_TRAILER_BYTES} bytes")
        self._trailer_left -= len(line)
        _parse_field(field)  # checked, then dropped: nothing here uses trailers
        return pos

    def _read_line(self, view: memoryview, pos: int, max_raw: int, status: int,
                   code: str) -> Tuple[Optional[bytes], int]:
        """One line with its LF, once it is complete; at most ``max_raw`` bytes in all."""
        window = bytes(view[pos:pos + max_raw - len(self._line)])
        lf = window.find(b"\n")
        if lf >= 0:
            line = bytes(self._line) + window[:lf + 1]
            self._line.clear()
            return line, pos + lf + 1
        self._line += window
        if len(self._line) >= max_raw:
            raise HttpError(status, code, f"a line over {max_raw - 2} bytes")
        return None, pos + len(window)



def _strip_cr(line: bytes) -> bytes:
    """A line without its CR; a CR anywhere else is refused (RFC 9112 §2.2)."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if b"\r" in line:
        raise HttpError(400, "bare-cr", "a CR not followed by LF")
    return line


def _parse_field(line: bytes) -> Tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise HttpError(400, "obsolete-folding", "a field line continued on the next line (RFC 9112 §5.2)")
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN_RE.fullmatch(name):
        raise HttpError(400, "bad-header-name", f"not a field name: {name[:40]!r}")
    value = value.strip(b" \t")
    if _BAD_VALUE.search(value):
        raise HttpError(400, "bad-header-value", f"a control character in {name[:40]!r}")
    return name.decode("ascii").lower(), value.decode("latin-1")


def _parse_length(value: str) -> int:
    """A Content-Length value: one decimal length, repeated identically if at all (RFC 9110 §8.6)."""
    values = {part.strip() for part in value.split(",")}
    if len(values) != 1 or not all(part.isdigit() and part.isascii() for part in values):
        raise HttpError(400, "bad-content-length", f"not one decimal length: {value!r}")
    digits = values.pop().lstrip("0") or "0"  # int() refuses over 4300 digits, zeros included
    if len(digits) > MAX_LENGTH_DIGITS:
        raise HttpError(413, "body-too-large", f"Content-Length {digits[:40]}...")
    return int(digits)


# --- Encoding -----------------------------------------------------------------

LAST_CHUNK = b"0\r\n\r\n"  # ends a chunked body, no trailers
_BODY_METHODS = ("POST", "PUT", "PATCH")  # servers may want a Content-Length even when it is 0


def encode_request_head(method: str, target: str, headers: HeadersIn) -> bytes:
    """A request line and fields; the caller sets any framing field and sends the body."""
    if not _TOKEN_RE.fullmatch(method.encode("latin-1", "replace")):
        raise LocalProtocolError("bad-method", f"not a method: {method!r}")
    if not _TARGET.fullmatch(target):
        raise LocalProtocolError("bad-target", f"not a request target: {target!r}")
    return f"{method} {target} HTTP/1.1\r\n".encode("ascii") + _encode_fields(headers)


def encode_request(method: str, target: str, headers: HeadersIn, body: Union[bytes, memoryview] = b"") -> bytes:
    """A whole request; adds Content-Length when there is a body (or the method expects one)."""
    fields = _with_length(headers, body, bool(body) or method.upper() in _BODY_METHODS)
    return encode_request_head(method, target, fields) + bytes(body)


def encode_response_head(status: int, headers: HeadersIn, reason: Optional[str] = None) -> bytes:
    """A status line and fields; the caller sets any framing field and sends the body."""
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise LocalProtocolError("bad-status", f"not a status: {status!r}")
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    if _BAD_VALUE.search(reason.encode("latin-1", "replace")):
        raise LocalProtocolError("bad-reason", f"a control character in {reason!r}")
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1", "replace") + _encode_fields(headers)


def encode_response(status: int, headers: HeadersIn, body: Union[bytes, memoryview] = b"") -> bytes:
    """A whole response with its Content-Length (none for 1xx, 204 and 304, which have no body)."""
    if status < 200 or status in _NO_BODY_STATUSES:
        if body:
            raise LocalProtocolError("body-not-allowed", f"a {status} response has no body")
        return encode_response_head(status, _with_length(headers, body, False))
    return encode_response_head(status, _with_length(headers, body, True)) + bytes(body)


def encode_chunk(data: Union[bytes, memoryview]) -> bytes:
    """One chunk of a chunked body; nothing for empty data, whose chunk would end the body (use LAST_CHUNK)."""
    return b"%x\r\n%s\r\n" % (len(data), bytes(data)) if data else b""


def _with_length(headers: HeadersIn, body: Union[bytes, memoryview], add: bool) -> List[Tuple[str, str]]:
    fields = list(_pairs(headers))
    if any(name.lower() in ("content-length", "transfer-encoding") for name, _ in fields):
        raise LocalProtocolError("framing-header", "a whole message gets its Content-Length here, not from the caller")
    return fields + [("Content-Length", str(len(body)))] if add else fields


def _pairs(headers: HeadersIn) -> Iterable[Tuple[str, str]]:
    return headers.items() if isinstance(headers, Mapping) else headers


def _encode_fields(headers: HeadersIn) -> bytes:
    lines = []
    for name, value in _pairs(headers):
        if not isinstance(name, str) or not _TOKEN_RE.fullmatch(name.encode("latin-1", "replace")):
            raise LocalProtocolError("bad-header-name", f"not a field name: {name!r}")
        try:
            raw = str(value).encode("latin-1")
        except UnicodeEncodeError:
            raise LocalProtocolError("bad-header-value", f"{name}: not Latin-1: {value!r}") from None
        if _BAD_VALUE.search(raw) or raw != raw.strip(b" \t"):
            raise LocalProtocolError("bad-header-value", f"{name}: a control character or edge space: {value!r}")
        lines.append(name.encode("ascii") + b": " + raw + b"\r\n")
    return b"".join(lines) + b"\r\n"


# --- Helpers for the caller ---------------------------------------------------


def parse_query(target: str) -> Dict[str, str]:
    """A target's query parameters, percent-decoded as UTF-8. A repeated name is
    refused (400): which of its values counts would be a guess."""
    try:
        pairs = parse_qsl(urlsplit(target).query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise HttpError(400, "bad-query", f"unreadable query: {exc}") from None
    query = dict(pairs)
    if len(query) != len(pairs):
        raise HttpError(400, "bad-query", "a parameter is repeated")
    return query


def decode_json(body: Union[bytes, bytearray, memoryview]) -> Any:
    """A JSON body, or 400. The caller bounds its size with ``accept_body``."""
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise HttpError(400, "bad-json", f"not JSON: {exc}") from None
