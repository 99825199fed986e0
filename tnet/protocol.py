"""The tnet wire format and local JSON API, without any I/O.

This module turns bytes into events and events into bytes. It holds:

* the constants of the protocol (magic, version, frame types) and every limit,
  each with the reason for its value;
* frozen event dataclasses, one per frame type, plus ``FileData`` for the raw
  payload of a file, which is streamed out in chunks and never accumulated;
* ``encode_*`` functions that build frames, datagrams and API lines;
* incremental decoders: ``StreamDecoder`` for a TCP connection between two
  daemons, ``decode_datagram`` for discovery, ``LineDecoder`` for the local
  command and events sockets;
* validation of everything a peer names: host names, file names, paths;
* the error classes.

It must not touch sockets, files, clocks or randomness: the caller passes in
bytes, ``now`` and nonces. That is what lets every limit and every malformed
input be unit-tested without a network (tests/test_protocol.py checks the
imports). The format itself is described in docs/PROTOCOL.md; comments here
cite its sections as §n.
"""

from __future__ import annotations

import json
import struct
import unicodedata
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

# --- Constants (docs/PROTOCOL.md §1) ----------------------------------------

MAGIC = b"TNET"
VERSION = 1
PREFACE = MAGIC + bytes([VERSION])  # opens every TCP stream and datagram, §2
API_VERSION = 1  # of the local JSON API, §6

FRAME_LENGTH = struct.Struct(">I")  # every frame: u32 length, then JSON, §3
# Compact UTF-8 JSON for frames, datagrams and lines. One encoder for all:
# json.dumps with these options would build a new one per call, which costs
# more than encoding a small frame.
_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# --- Limits -------------------------------------------------------------------

MAX_NAME_BYTES = 255  # the common file-name limit of ext4, APFS, NTFS
MAX_PATH_PARTS = 64  # folder depth of one entry; deeper trees are rare and hostile
MAX_HOST_NAME_BYTES = 64  # HOST_NAME_MAX on Linux
MAX_MESSAGE_BYTES = 64 * 1024  # a notification, not a file transfer
MAX_HEADER_BYTES = 4096  # every frame but a message: names and sizes only
# JSON may escape a control character into six bytes; a maximal message fits.
MAX_FRAME_BYTES = 6 * MAX_MESSAGE_BYTES + MAX_HEADER_BYTES
MAX_FILE_BYTES = 2**50  # 1 PiB: larger sizes are lies, not files
MAX_ENTRIES = 1_000_000  # files and folders in one offer
MAX_WAIT_S = 24 * 3600  # the longest a receiver may ask a sender to wait for a decision
MAX_DATAGRAM_BYTES = 512  # a discovery request is ~100 bytes
MAX_LINE_BYTES = 1024 * 1024  # one local API request (a long list of paths)
MAX_CODE_BYTES = 64  # error slugs
MAX_ERROR_TEXT_BYTES = 1024  # a one-line reason
NONCE_HEX_CHARS = 32  # 128 bits: discovery rounds never collide
SHA256_HEX_CHARS = 64

# --- Errors -------------------------------------------------------------------


class ProtocolError(Exception):
    """A violation of the protocol, with a stable ``code`` slug for clients."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class RemoteProtocolError(ProtocolError):
    """The peer (or a local client) sent bytes we refuse; drop that connection."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids."""


# --- Events between daemons (§4) ---------------------------------------------


@dataclass(frozen=True)
class Announce:
    """Answer to a discovery request: who I am (§5)."""

    name: str
    nonce: str


@dataclass(frozen=True)
class Message:
    name: str
    text: str


@dataclass(frozen=True)
class Ack:
    """The receiver, ``name``, got a ``Message``."""

    name: str


@dataclass(frozen=True)
class Offer:
    """A batch of ``entries`` files and folders, ``size`` bytes in all."""

    name: str
    entries: int
    size: int


@dataclass(frozen=True)
class Accept:
    """The receiver, ``name``, takes the offered batch."""

    name: str


@dataclass(frozen=True)
class Wait:
    """The receiver asks its user about the offer: allow it ``seconds``."""

    seconds: int


@dataclass(frozen=True)
class FileHeader:
    """Entry ``index`` is a file of ``size`` raw bytes, which follow at once."""

    index: int
    path: Tuple[str, ...]
    size: int


@dataclass(frozen=True)
class FileData:
    """A chunk of the current file. ``data`` may view the caller's buffer:
    use it before the next ``feed``."""

    data: Union[bytes, memoryview]


@dataclass(frozen=True)
class FileEnd:
    """The current file is complete; its SHA-256 as the sender read it."""

    sha256: str


@dataclass(frozen=True)
class Folder:
    """Entry ``index`` is a folder (sent so that empty folders arrive too)."""

    index: int
    path: Tuple[str, ...]


@dataclass(frozen=True)
class Done:
    """The receiver saved entry ``index``."""

    index: int


@dataclass(frozen=True)
class Failed:
    """The receiver could not save entry ``index``; the batch goes on."""

    index: int
    code: str
    message: str


@dataclass(frozen=True)
class Error:
    """The connection ends: refusal, cancellation, or a fault (§4.3)."""

    code: str
    message: str


Event = Union[
    Announce, Message, Ack, Offer, Accept, Wait, FileHeader, FileData, FileEnd,
    Folder, Done, Failed, Error,
]

# Frame type -> (event class, {field: type}). Field names are the wire names.
_FRAMES: Dict[str, Tuple[type, Dict[str, type]]] = {
    "announce": (Announce, {"name": str, "nonce": str}),
    "message": (Message, {"name": str, "text": str}),
    "ack": (Ack, {"name": str}),
    "offer": (Offer, {"name": str, "entries": int, "size": int}),
    "accept": (Accept, {"name": str}),
    "wait": (Wait, {"seconds": int}),
    "file": (FileHeader, {"index": int, "path": list, "size": int}),
    "end": (FileEnd, {"sha256": str}),
    "folder": (Folder, {"index": int, "path": list}),
    "done": (Done, {"index": int}),
    "failed": (Failed, {"index": int, "code": str, "message": str}),
    "error": (Error, {"code": str, "message": str}),
}
_FRAME_TYPE = {cls: name for name, (cls, _) in _FRAMES.items()}

# Which frames each side may receive, by state (§4.1). The initiator opened
# the connection; the acceptor took it on its listener.
_ACCEPTOR_FIRST = {"announce", "message", "offer", "error"}
_ACCEPTOR_IN_BATCH = {"file", "folder", "error"}
_INITIATOR_ANY = {"ack", "accept", "wait", "done", "failed", "error"}


# --- Validation of names ------------------------------------------------------


def check_file_name(name: str) -> str:
    """Return ``name`` if it is a safe base name for one path component.

    Refused rather than rewritten (§4.2): a sender that offers a name we would
    have to change is either hostile or will be told plainly why.
    """
    if not isinstance(name, str) or name in ("", ".", ".."):
        raise RemoteProtocolError("bad-name", f"not a file name: {name!r}")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise RemoteProtocolError("bad-name", f"not valid UTF-8: {name!r}") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise RemoteProtocolError("bad-name", f"longer than {MAX_NAME_BYTES} bytes")
    if "/" in name or "\\" in name:
        raise RemoteProtocolError("bad-name", f"forbidden character in {name!r}")
    if not name.isprintable():  # a printable name has none of the four categories: skip the walk
        for char in name:
            if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
                raise RemoteProtocolError("bad-name", f"forbidden character in {name!r}")
    return name


def check_path(parts: Any) -> Tuple[str, ...]:
    """A relative path as a tuple of safe components, or RemoteProtocolError."""
    if not isinstance(parts, (list, tuple)) or not 1 <= len(parts) <= MAX_PATH_PARTS:
        raise RemoteProtocolError("bad-name", f"a path has 1 to {MAX_PATH_PARTS} parts")
    return tuple(check_file_name(part) for part in parts)


def check_host_name(name: str) -> str:
    """A peer's announced name: printable, 1 to MAX_HOST_NAME_BYTES bytes."""
    if not isinstance(name, str) or not name or not name.isprintable():
        raise RemoteProtocolError("bad-host-name", f"not a printable host name: {name!r}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise RemoteProtocolError("bad-host-name", f"not valid UTF-8: {name!r}") from None
    if size > MAX_HOST_NAME_BYTES:
        raise RemoteProtocolError("bad-host-name", f"longer than {MAX_HOST_NAME_BYTES} bytes")
    return name


def check_sha256(value: str) -> str:
    if (
        not isinstance(value, str)
        or len(value) != SHA256_HEX_CHARS
        or value.strip("0123456789abcdef")
    ):
        raise RemoteProtocolError("bad-frame", "sha256 is 64 lowercase hex digits")
    return value


def _check_code_text(code: str, message: str) -> None:
    if not code or len(code) > MAX_CODE_BYTES or not code.isascii() or not code.isprintable():
        raise RemoteProtocolError("bad-frame", "an error code is a short printable slug")
    try:
        size = len(message.encode("utf-8"))
    except UnicodeEncodeError:
        raise RemoteProtocolError("bad-frame", "an error text is not valid UTF-8") from None
    if size > MAX_ERROR_TEXT_BYTES:
        raise RemoteProtocolError("bad-frame", f"an error text is at most {MAX_ERROR_TEXT_BYTES} bytes")


def clip_text(text: str) -> str:
    """``text`` cut to what an error frame may carry (MAX_ERROR_TEXT_BYTES)."""
    return text.encode("utf-8", "replace")[:MAX_ERROR_TEXT_BYTES].decode("utf-8", "ignore")


def _check_count(value: int, limit: int, what: str) -> int:
    if not 0 <= value <= limit:
        raise RemoteProtocolError("bad-frame", f"{what} must be 0 to {limit}, not {value}")
    return value


def _build_event(kind: str, fields: Dict[str, Any]) -> Any:
    """Check a frame's fields by type and range and turn it into its event."""
    cls, schema = _FRAMES[kind]
    unknown = set(fields) - set(schema) - {"type"}
    if unknown:  # a new field means a new version (§2), never a silent extra
        raise RemoteProtocolError("bad-frame", f"{kind} has no field {sorted(unknown)[0]!r}")
    values: Dict[str, Any] = {}
    for field, ftype in schema.items():
        value = fields.get(field)
        # bool is an int subclass; a size of `true` is a lie, not a number.
        if not isinstance(value, ftype) or isinstance(value, bool):
            raise RemoteProtocolError("bad-frame", f"{kind}.{field} must be {ftype.__name__}")
        values[field] = value
    if "index" in values:
        _check_count(values["index"], MAX_ENTRIES - 1, "index")
    if "size" in values:
        _check_count(values["size"], MAX_FILE_BYTES, "size")
    if "entries" in values:
        _check_count(values["entries"], MAX_ENTRIES, "entries")
    if "seconds" in values:
        _check_count(values["seconds"], MAX_WAIT_S, "seconds")
    if "path" in values:
        values["path"] = check_path(values["path"])
    if "name" in values:
        check_host_name(values["name"])
    if "nonce" in values:
        _check_nonce(values["nonce"])
    if "sha256" in values:
        check_sha256(values["sha256"])
    if "text" in values:
        try:
            text_bytes = len(values["text"].encode("utf-8"))
        except UnicodeEncodeError:
            raise RemoteProtocolError("bad-frame", "message text is not valid UTF-8") from None
        if text_bytes > MAX_MESSAGE_BYTES:
            raise RemoteProtocolError("message-too-large", f"over {MAX_MESSAGE_BYTES} bytes")
    if "code" in values:
        _check_code_text(values["code"], values["message"])
    return cls(**values)


def _check_nonce(nonce: str) -> str:
    if not isinstance(nonce, str) or len(nonce) != NONCE_HEX_CHARS or nonce.strip("0123456789abcdef"):
        raise RemoteProtocolError("bad-nonce", f"a nonce is {NONCE_HEX_CHARS} lowercase hex digits")
    return nonce


def _object_without_repeats(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # which one counts would be the parser's whim, not the sender's
        raise ValueError("a key is repeated")
    return obj


_json_decode = json.JSONDecoder(object_pairs_hook=_object_without_repeats).decode


def _parse_json_object(payload: Union[bytes, memoryview], what: str) -> Dict[str, Any]:
    try:
        # Bytes that are not UTF-8 become lone surrogates, so that inside a
        # string they are refused by the check of that field (a name is then
        # `bad-name`, as when the sender escaped a surrogate) and elsewhere
        # they are not JSON.
        obj = _json_decode(bytes(payload).decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nesting
        raise RemoteProtocolError("bad-json", f"{what} is not valid UTF-8 JSON with each key once") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("bad-json", f"{what} is not a JSON object")
    return obj


# --- Encoding frames ----------------------------------------------------------


def encode_preface() -> bytes:
    return PREFACE


def encode_frame(event: Any) -> bytes:
    """Encode one event (any but FileData, whose bytes go raw) as a frame (§3)."""
    kind = _FRAME_TYPE.get(type(event))
    if kind is None:
        raise LocalProtocolError("bad-event", f"cannot encode {type(event).__name__}")
    _, schema = _FRAMES[kind]
    fields: Dict[str, Any] = {"type": kind}
    for field in schema:
        value = getattr(event, field)
        fields[field] = list(value) if isinstance(value, tuple) else value
    try:
        _build_event(kind, fields)  # we never send what we would refuse
    except RemoteProtocolError as exc:
        raise LocalProtocolError(exc.code, exc.message) from None
    payload = _to_json(fields).encode("utf-8")
    return FRAME_LENGTH.pack(len(payload)) + payload


# --- Decoding a TCP stream ----------------------------------------------------

_PREFACE, _FRAME, _DATA, _CLOSED = "preface", "frame", "data", "closed"


class StreamDecoder:
    """Incremental decoder for one TCP stream between daemons. No I/O.

    ``role`` is ``"acceptor"`` for a connection taken on the listener, or
    ``"initiator"`` for one we opened; it decides which frames are legal
    (§4.1). ``feed`` returns events; raw file bytes come out as ``FileData``
    chunks that view the fed buffer, so nothing but an incomplete frame header
    is ever kept. Any violation raises ``RemoteProtocolError``, after which the
    decoder refuses further input.
    """

    def __init__(self, role: str) -> None:
        if role not in ("acceptor", "initiator"):
            raise ValueError(role)
        self.role = role
        self._state = _PREFACE
        self._buf = bytearray()
        self._data_left = 0  # raw bytes still due for the current file
        self._entries_left = 0  # entries still due in the accepted batch
        self._next_index = 0  # entries come in order: 0, 1, ... (§4.1)
        self._bytes_left = 0  # of the size the offer announced
        self._expect_end = False
        self._first = True  # the acceptor's first frame decides the connection
        self._awaiting_accept = False  # an offer is in, our accept is not out yet
        self._error: Optional[RemoteProtocolError] = None

    @property
    def data_remaining(self) -> int:
        """Raw file bytes due before the next frame: a receive size hint."""
        return self._data_left if self._state == _DATA else 0

    @property
    def opened(self) -> bool:
        """Whether the peer has sent its first frame (the handshake is over)."""
        return not self._first

    def accept_offer(self) -> None:
        """We sent ``accept``: from now on the offered entries may come (§4.1)."""
        self._awaiting_accept = False

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> List[Any]:
        if self._error is not None:
            raise self._error
        try:
            return self._feed(memoryview(data).cast("B"))
        except RemoteProtocolError as exc:
            self._error = exc
            self._state = _CLOSED
            raise

    def feed_eof(self) -> List[Any]:
        """The peer closed its side. Mid-frame or mid-file that is an error."""
        if self._error is not None:
            raise self._error
        silent = self.role == "acceptor" and self._first  # opened, said nothing
        if self._state == _DATA or self._buf or self._expect_end or self._entries_left or silent:
            self._error = RemoteProtocolError("truncated", "connection closed mid-transfer")
            raise self._error
        if self._state == _PREFACE:
            self._error = RemoteProtocolError("truncated", "connection closed before the preface")
            raise self._error
        self._state = _CLOSED
        return []

    def _feed(self, data: memoryview) -> List[Any]:
        events: List[Any] = []
        pos = 0
        while pos < len(data):
            if self._state == _DATA:
                take = min(self._data_left, len(data) - pos)
                events.append(FileData(data[pos:pos + take]))
                pos += take
                self._data_left -= take
                if self._data_left == 0:
                    self._state = _FRAME
                    self._expect_end = True
                continue
            if self._state == _CLOSED:
                raise RemoteProtocolError("bad-frame", "data after the end of the stream")
            if self._state == _FRAME and not self._buf and len(data) - pos > FRAME_LENGTH.size:
                # The common case, a whole frame in one read: parse it in place, not byte-buffered.
                (length,) = FRAME_LENGTH.unpack_from(data, pos)
                self._check_length(length)
                end = pos + FRAME_LENGTH.size + length
                if end <= len(data):
                    events.append(self._accept_frame(_parse_json_object(data[pos + FRAME_LENGTH.size:end], "frame")))
                    pos = end
                    continue
            need = self._bytes_needed()
            take = min(need, len(data) - pos)
            self._buf += data[pos:pos + take]
            pos += take
            if take == need:
                event = self._parse_buffered()
                if event is not None:
                    events.append(event)
        return events

    def _bytes_needed(self) -> int:
        """How many more bytes complete the preface or frame in ``_buf``."""
        if self._state == _PREFACE:
            return len(PREFACE) - len(self._buf)
        if len(self._buf) < FRAME_LENGTH.size:
            return FRAME_LENGTH.size - len(self._buf)
        (length,) = FRAME_LENGTH.unpack_from(self._buf)
        return FRAME_LENGTH.size + length - len(self._buf)

    def _parse_buffered(self) -> Optional[Any]:
        if self._state == _PREFACE:
            self._parse_preface()
            return None
        (length,) = FRAME_LENGTH.unpack_from(self._buf)
        if len(self._buf) == FRAME_LENGTH.size:  # only the length so far
            self._check_length(length)
            return None
        payload = bytes(self._buf[FRAME_LENGTH.size:])
        self._buf.clear()
        return self._accept_frame(_parse_json_object(payload, "frame"))

    def _check_length(self, length: int) -> None:
        """Refuse a frame by its announced length, before waiting for its bytes."""
        limit = MAX_FRAME_BYTES if self._message_allowed() else MAX_HEADER_BYTES
        if length > limit:
            raise RemoteProtocolError("frame-too-large", f"{length} bytes, limit {limit}")
        if length == 0:
            raise RemoteProtocolError("bad-frame", "empty frame")

    def _parse_preface(self) -> None:
        if bytes(self._buf[:len(MAGIC)]) != MAGIC:
            raise RemoteProtocolError("bad-magic", "not a tnet peer")
        if self._buf[len(MAGIC)] != VERSION:
            raise RemoteProtocolError(
                "unsupported-version",
                f"peer speaks version {self._buf[len(MAGIC)]}, this is version {VERSION}",
            )
        self._buf.clear()
        self._state = _FRAME
        return None

    def _message_allowed(self) -> bool:
        return self.role == "acceptor" and self._first

    def _allowed_frames(self) -> set:
        if self._expect_end:  # the sender may disown a file that changed under it
            return {"end", "failed", "error"}
        if self.role == "initiator":
            return _INITIATOR_ANY
        if self._first:
            return _ACCEPTOR_FIRST
        if self._entries_left and not self._awaiting_accept:
            return _ACCEPTOR_IN_BATCH
        return {"error"}

    def _accept_frame(self, obj: Dict[str, Any]) -> Any:
        kind = obj.get("type")
        if not isinstance(kind, str) or kind not in _FRAMES:
            raise RemoteProtocolError("bad-frame", f"unknown frame type {kind!r}")
        if kind not in self._allowed_frames():
            raise RemoteProtocolError("unexpected-frame", f"{kind!r} is not allowed here")
        event = _build_event(kind, obj)
        self._first = False
        if isinstance(event, Offer):
            self._entries_left, self._bytes_left = event.entries, event.size
            self._awaiting_accept = True
        elif isinstance(event, (FileHeader, Folder)):
            if event.index != self._next_index:
                raise RemoteProtocolError("bad-index", f"entry {event.index} where entry {self._next_index} was due")
            self._next_index += 1
            self._entries_left -= 1
        if isinstance(event, FileHeader):
            if event.size > self._bytes_left:  # the offer's size was checked against free space
                raise RemoteProtocolError("size-mismatch", f"file of {event.size} bytes exceeds what the offer "
                                                           f"announced ({self._bytes_left} left)")
            self._bytes_left -= event.size
            self._expect_end = True
            if event.size:
                self._state = _DATA
                self._data_left = event.size
                self._expect_end = False
        elif isinstance(event, (FileEnd, Failed)):
            self._expect_end = False
        return event


# --- Discovery datagrams (§5) -------------------------------------------------


@dataclass(frozen=True)
class DiscoveryRequest:
    """Broadcast by a daemon looking for peers; answered over TCP on ``port``."""

    name: str
    nonce: str
    port: int


def encode_discovery(request: DiscoveryRequest) -> bytes:
    body = {"type": "discover", "name": request.name, "nonce": request.nonce, "port": request.port}
    datagram = PREFACE + _to_json(body).encode("utf-8")
    if len(datagram) > MAX_DATAGRAM_BYTES:
        raise LocalProtocolError("datagram-too-large", f"over {MAX_DATAGRAM_BYTES} bytes")
    return datagram


def decode_datagram(datagram: bytes) -> DiscoveryRequest:
    """One whole UDP datagram to a ``DiscoveryRequest`` or RemoteProtocolError."""
    if len(datagram) > MAX_DATAGRAM_BYTES:
        raise RemoteProtocolError("datagram-too-large", f"over {MAX_DATAGRAM_BYTES} bytes")
    if datagram[:len(MAGIC)] != MAGIC:
        raise RemoteProtocolError("bad-magic", "not a tnet datagram")
    if datagram[len(MAGIC):len(PREFACE)] != bytes([VERSION]):
        raise RemoteProtocolError("unsupported-version", "unknown datagram version")
    obj = _parse_json_object(datagram[len(PREFACE):], "datagram")
    port = obj.get("port")
    if obj.get("type") != "discover":
        raise RemoteProtocolError("bad-frame", "a datagram's type is 'discover'")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise RemoteProtocolError("bad-frame", "port must be 1 to 65535")
    name = check_host_name(obj.get("name"))  # type: ignore[arg-type]
    return DiscoveryRequest(name=name, nonce=_check_nonce(obj.get("nonce")), port=port)  # type: ignore[arg-type]


# --- The local JSON API (§6) --------------------------------------------------


class LineDecoder:
    """Splits a byte stream into lines; an over-long line is fatal."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._buf = bytearray()
        self._max_line = max_line
        self._error: Optional[RemoteProtocolError] = None

    def feed(self, data: bytes) -> List[bytes]:
        """The complete, non-blank lines in the stream so far."""
        if self._error is not None:
            raise self._error
        self._buf += data
        lines = []
        start = 0
        while True:
            newline = self._buf.find(b"\n", start)
            if newline < 0 or newline - start > self._max_line:
                break
            line = bytes(self._buf[start:newline])
            if line.strip():
                lines.append(line)
            start = newline + 1
        del self._buf[:start]
        if len(self._buf) > self._max_line:
            self._error = RemoteProtocolError("line-too-long", f"a line is at most {self._max_line} bytes")
            raise self._error
        return lines


@dataclass(frozen=True)
class Request:
    """One command from a local client (§6.1)."""

    cmd: str
    args: Dict[str, Any]


_NUMBER = (int, float)
# Command -> {argument: (types, required)}. Unknown arguments are refused so
# that a typo is an error, not a silently ignored option.
REQUESTS: Dict[str, Dict[str, Tuple[Any, bool]]] = {
    "status": {},
    "discover": {"timeout": (_NUMBER, False)},
    "peers": {},
    "send": {"peer": (str, True), "paths": (list, True)},
    "message": {"peer": (str, True), "text": (str, True)},
    "transfers": {},
    "cancel": {"id": (str, True)},
    "accept": {"id": (str, True)},
    "decline": {"id": (str, True)},
}
MAX_DISCOVER_TIMEOUT_S = 30.0  # a window longer than this is a mistake


def decode_request(line: bytes) -> Request:
    """Parse and type-check one request line, or raise RemoteProtocolError."""
    obj = _parse_json_object(line, "request")
    cmd = obj.pop("cmd", None)
    if not isinstance(cmd, str):
        raise RemoteProtocolError("bad-request", "a request needs a string 'cmd'")
    schema = REQUESTS.get(cmd)
    if schema is None:
        raise RemoteProtocolError("unknown-command", f"no command {cmd!r}; known: {', '.join(REQUESTS)}")
    for name, value in obj.items():
        if name not in schema:
            raise RemoteProtocolError("bad-request", f"{cmd} takes no argument {name!r}")
        types, _ = schema[name]
        if not isinstance(value, types) or isinstance(value, bool):
            raise RemoteProtocolError("bad-request", f"{cmd}: {name!r} has the wrong type")
    for name, (_, required) in schema.items():
        if required and name not in obj:
            raise RemoteProtocolError("bad-request", f"{cmd} needs {name!r}")
    if cmd == "send":
        paths = obj["paths"]
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise RemoteProtocolError("bad-request", "send: 'paths' is a non-empty list of strings")
    if cmd == "message":
        try:
            text_bytes = len(obj["text"].encode("utf-8"))
        except UnicodeEncodeError:
            raise RemoteProtocolError("bad-request", "message: text is not valid UTF-8") from None
        if text_bytes > MAX_MESSAGE_BYTES:
            raise RemoteProtocolError("message-too-large", f"a message is at most {MAX_MESSAGE_BYTES} bytes")
    if "timeout" in obj and not 0 < obj["timeout"] <= MAX_DISCOVER_TIMEOUT_S:
        raise RemoteProtocolError("bad-request", f"timeout must be over 0 and at most {MAX_DISCOVER_TIMEOUT_S:g} s")
    return Request(cmd=cmd, args=obj)


def encode_line(obj: Any) -> bytes:
    """One JSON object as one line (§6). Printable non-ASCII stays UTF-8; every
    other character (controls, C1 controls such as U+009B, DEL, format characters
    such as U+202E, lone surrogates) is escaped as \\uXXXX, so that a line shown
    on a terminal as it is cannot drive that terminal."""
    text = _to_json(obj)
    if not text.isprintable():  # outside strings JSON is printable ASCII: only string contents change
        text = "".join(c if c.isprintable() else _json_escape(c) for c in text)
    return text.encode("utf-8") + b"\n"


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
