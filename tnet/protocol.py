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

import enum
import json
import struct
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

# --- Constants (docs/PROTOCOL.md §1) ----------------------------------------

MAGIC = b"TNET"
VERSION = 2  # the newest wire protocol this code speaks (§2)
MIN_VERSION = 1  # the oldest: a version-1 daemon is still a peer
PREFACE = MAGIC + bytes([MIN_VERSION])  # version 1's: discovery datagrams, announces, messages (§2, §7)

FRAME_LENGTH = struct.Struct(">I")  # every frame: u32 length, then JSON, §3
# Compact UTF-8 JSON for frames, datagrams and lines. One encoder for all:
# json.dumps with these options would build a new one per call, which costs
# more than encoding a small frame.
to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# --- Limits -------------------------------------------------------------------

MAX_NAME_BYTES = 255  # the common file-name limit of ext4, APFS, NTFS
WORK_FOLDER_PREFIX, WORK_TOKEN_CHARS = ".tnet-", 32  # a daemon's private work folder: .tnet-<32 hex>
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
MAX_CODE_BYTES = 64  # error slugs
MAX_ERROR_TEXT_BYTES = 1024  # a one-line reason
NONCE_HEX_CHARS = 32  # 128 bits: discovery rounds never collide
SHA256_HEX_CHARS = 64

# --- Errors -------------------------------------------------------------------


class CodedError(Exception):
    """An error with a stable ``code`` slug for clients, and a message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ProtocolError(CodedError):
    """A violation of the protocol."""


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
    """A batch of ``entries`` files and folders, ``size`` bytes in all.
    Version 2: ``batch`` names the batch across attempts (§7)."""

    name: str
    entries: int
    size: int
    batch: str = ""


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
    """Entry ``index`` is a file of ``size`` raw bytes, which follow at once.
    Version 2, with ``mtime`` (the sender's modification time, ns): a file
    that may be resumed; its bytes wait for the receiver's ``Resume`` (§7)."""

    index: int
    path: Tuple[str, ...]
    size: int
    mtime: Optional[int] = None


@dataclass(frozen=True)
class Resume:
    """The receiver holds the first ``offset`` bytes of the file in flight;
    ``sha256`` is the SHA-256 of ``salt`` (16 bytes, hex) then those bytes (§7)."""

    index: int
    offset: int
    salt: str
    sha256: str


@dataclass(frozen=True)
class FileFrom:
    """The file in flight from byte ``offset`` on: ``size`` raw bytes follow (§7)."""

    index: int
    offset: int
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
    Folder, Done, Failed, Error, Resume, FileFrom,
]

# Frame type -> (event class, {field: type}). Field names are the wire names.
_FRAMES: Dict[str, Tuple[type, Dict[str, type]]] = {
    "announce": (Announce, {"name": str, "nonce": str}),
    "message": (Message, {"name": str, "text": str}),
    "ack": (Ack, {"name": str}),
    "offer": (Offer, {"name": str, "entries": int, "size": int, "batch": str}),
    "accept": (Accept, {"name": str}),
    "wait": (Wait, {"seconds": int}),
    "file": (FileHeader, {"index": int, "path": list, "size": int, "mtime": int}),
    "resume": (Resume, {"index": int, "offset": int, "salt": str, "sha256": str}),
    "from": (FileFrom, {"index": int, "offset": int, "size": int}),
    "end": (FileEnd, {"sha256": str}),
    "folder": (Folder, {"index": int, "path": list}),
    "done": (Done, {"index": int}),
    "failed": (Failed, {"index": int, "code": str, "message": str}),
    "error": (Error, {"code": str, "message": str}),
}
_FRAME_TYPE = {cls: name for name, (cls, _) in _FRAMES.items()}
# What version 2 added (§7): fields that may be left out (and are, at their
# default), and frames version 1 does not know.
_OPTIONAL_FIELDS = {"offer": {"batch"}, "file": {"mtime"}}
_V2_FRAMES = {"resume", "from"}
MAX_MTIME_NS = 2**63 - 1  # a signed 64-bit time, as stat(2) gives it

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
    if is_work_folder_name(name):
        raise RemoteProtocolError("bad-name", f"{name!r} is the name of a daemon's work folder")
    return name


def is_work_folder_name(name: str) -> bool:
    """A daemon's private work folder (.tnet-<32 hex>): a later daemon removes
    it when no daemon holds it, so nothing received may be called so."""
    token = name[len(WORK_FOLDER_PREFIX):]
    return (name.startswith(WORK_FOLDER_PREFIX) and len(token) == WORK_TOKEN_CHARS
            and all(c in "0123456789abcdef" for c in token))


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
        if field not in fields and field in _OPTIONAL_FIELDS.get(kind, ()):
            continue
        value = fields.get(field)
        # bool is an int subclass; a size of `true` is a lie, not a number.
        if not isinstance(value, ftype) or isinstance(value, bool):
            raise RemoteProtocolError("bad-frame", f"{kind}.{field} must be {ftype.__name__}")
        values[field] = value
    if "index" in values:
        _check_count(values["index"], MAX_ENTRIES - 1, "index")
    if "size" in values:
        _check_count(values["size"], MAX_FILE_BYTES, "size")
    if "offset" in values:
        _check_count(values["offset"], MAX_FILE_BYTES, "offset")
    if "mtime" in values:
        _check_count(values["mtime"], MAX_MTIME_NS, "mtime")
    if "batch" in values:
        _check_nonce(values["batch"], "batch")
    if "salt" in values:
        _check_nonce(values["salt"], "salt")
    if "entries" in values:
        _check_count(values["entries"], MAX_ENTRIES, "entries")
    if "seconds" in values:
        _check_count(values["seconds"], MAX_WAIT_S, "seconds")
    if "path" in values:
        values["path"] = check_path(values["path"])
    if "name" in values:
        check_host_name(values["name"])
    if "nonce" in values:
        _check_nonce(values["nonce"], "nonce")
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


def _check_nonce(nonce: str, what: str) -> str:
    if not isinstance(nonce, str) or len(nonce) != NONCE_HEX_CHARS or nonce.strip("0123456789abcdef"):
        code = "bad-nonce" if what == "nonce" else "bad-frame"
        raise RemoteProtocolError(code, f"a {what} is {NONCE_HEX_CHARS} lowercase hex digits")
    return nonce


def _object_without_repeats(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # which one counts would be the parser's whim, not the sender's
        raise ValueError("a key is repeated")
    return obj


_json_decode = json.JSONDecoder(object_pairs_hook=_object_without_repeats).decode


def parse_json_object(payload: Union[bytes, memoryview], what: str) -> Dict[str, Any]:
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
    optional = _OPTIONAL_FIELDS.get(kind, ())
    for field in schema:
        value = getattr(event, field)
        if field in optional and value in (None, ""):
            continue  # left out at its default: the frame is version 1's
        fields[field] = list(value) if isinstance(value, tuple) else value
    try:
        _build_event(kind, fields)  # we never send what we would refuse
    except RemoteProtocolError as exc:
        raise LocalProtocolError(exc.code, exc.message) from None
    payload = to_json(fields).encode("utf-8")
    return FRAME_LENGTH.pack(len(payload)) + payload


# --- Framing a TCP stream (§2, §3) --------------------------------------------

_PREFACE, _FRAME, _DATA, _BROKEN = "preface", "frame", "data", "broken"


class FrameReader:
    """One direction of a TCP stream between daemons cut into what it holds:
    the preface (checked), frames (as JSON objects) and a file's raw bytes
    (``FileData`` chunks that view the fed buffer). It knows the framing of
    §2 and §3 and nothing of who may send what: after a ``file`` frame,
    ``size`` raw bytes follow. Frames longer than ``max_frame`` are refused
    by their announced length, before their bytes are waited for.

    ``Exchange`` reads through it and applies the rules; a hand-driven peer
    (the tests' ``crafted``) may use it alone.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _PREFACE
        self.version = 0  # the peer's, once its preface is in
        self.data_left = 0  # raw bytes due before the next frame
        self.max_frame = MAX_FRAME_BYTES

    @property
    def at_boundary(self) -> bool:
        """Not inside a preface, a frame or a file's bytes."""
        return self._state == _FRAME and not self._buf

    def items(self, data: Union[bytes, bytearray, memoryview]) -> Iterator[Union[Dict[str, Any], FileData]]:
        """What ``data`` completes, in order: frame objects and FileData. A
        generator, so that whoever reads it may change ``max_frame`` between
        two frames. RemoteProtocolError on bytes that are not this framing."""
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            if self._state == _DATA:
                take = min(self.data_left, len(view) - pos)
                self.data_left -= take
                if self.data_left == 0:
                    self._state = _FRAME
                yield FileData(view[pos:pos + take])
                pos += take
                continue
            if self._state == _FRAME and not self._buf and len(view) - pos > FRAME_LENGTH.size:
                # The common case, a whole frame in one read: parse it in place, not byte-buffered.
                (length,) = FRAME_LENGTH.unpack_from(view, pos)
                self._check_length(length)
                end = pos + FRAME_LENGTH.size + length
                if end <= len(view):
                    obj = self._frame_object(view[pos + FRAME_LENGTH.size:end])
                    pos = end
                    yield obj
                    continue
            need = self._bytes_needed()
            take = min(need, len(view) - pos)
            self._buf += view[pos:pos + take]
            pos += take
            if take == need:  # the preface, a frame's length (checked at once) or a whole frame
                buffered = self._parse_buffered()
                if buffered is not None:
                    yield buffered

    def _bytes_needed(self) -> int:
        """How many more bytes complete the preface or frame in ``_buf``."""
        if self._state == _PREFACE:
            return len(PREFACE) - len(self._buf)
        if len(self._buf) < FRAME_LENGTH.size:
            return FRAME_LENGTH.size - len(self._buf)
        (length,) = FRAME_LENGTH.unpack_from(self._buf)
        return FRAME_LENGTH.size + length - len(self._buf)

    def _parse_buffered(self) -> Optional[Dict[str, Any]]:
        if self._state == _PREFACE:
            self.version = check_preface(bytes(self._buf))
            self._buf.clear()
            self._state = _FRAME
            return None
        (length,) = FRAME_LENGTH.unpack_from(self._buf)
        if len(self._buf) == FRAME_LENGTH.size:  # only the length so far
            self._check_length(length)
            return None
        payload = bytes(self._buf[FRAME_LENGTH.size:])
        self._buf.clear()
        return self._frame_object(payload)

    def _check_length(self, length: int) -> None:
        if length > self.max_frame:
            raise RemoteProtocolError("frame-too-large", f"{length} bytes, limit {self.max_frame}")
        if length == 0:
            raise RemoteProtocolError("bad-frame", "empty frame")

    def _frame_object(self, payload: Union[bytes, memoryview]) -> Dict[str, Any]:
        obj = parse_json_object(payload, "frame")
        size, kind = obj.get("size"), obj.get("type")
        # The only bytes that are not frames (§3): a file's after its header,
        # unless it may be resumed (§7), whose bytes follow its `from`.
        raw = (kind == "file" and "mtime" not in obj) or kind == "from"
        if raw and isinstance(size, int) and not isinstance(size, bool) and size > 0:
            self.data_left = size
            self._state = _DATA
        return obj


def event_of(obj: Dict[str, Any]) -> Any:
    """The event a frame object stands for, its fields checked, without the
    exchange's rules: for tools and tests that speak the protocol by hand."""
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _FRAMES:
        raise RemoteProtocolError("bad-frame", f"unknown frame type {kind!r}")
    return _build_event(kind, obj)


def check_preface(preface: bytes) -> int:
    """The version a preface names, if this code speaks it."""
    if preface[:len(MAGIC)] != MAGIC:
        raise RemoteProtocolError("bad-magic", "not a tnet peer")
    version = preface[len(MAGIC)]
    if not MIN_VERSION <= version <= VERSION:
        raise RemoteProtocolError("unsupported-version", f"peer speaks version {version}, this is version "
                                                         f"{MIN_VERSION} to {VERSION}")
    return version


def encode_preface_of(version: int) -> bytes:
    return MAGIC + bytes([version])


# --- The exchange: who may send what, when (§4.1) -----------------------------
#
# Everything that decides whether a frame may be sent or received now lives
# here, for both ends, in the manner of h11's _state.py: one table of which
# frame each role may send in each state, a few guards that count (entries
# in order, sizes against the offer, answers once each), and one Exchange
# per connection that both ``send`` and ``receive_data`` advance.


class Role(enum.Enum):
    INITIATOR = "initiator"  #: opened the connection
    ACCEPTOR = "acceptor"  #: took it on its listener


class State(enum.Enum):
    OPENING = "opening"  #: prefaces only: the initiator's first frame decides the exchange
    MESSAGE = "message"  #: a message is out; the acceptor's ack (or error) is due
    OFFERED = "offered"  #: an offer is out; the acceptor says wait, accept or error
    STREAMING = "streaming"  #: accepted: entries one way, between two of them; answers the other way
    RESUMING = "resuming"  #: a file that may be resumed is announced; the acceptor's resume is due (§7)
    RESUMED = "resumed"  #: the acceptor said what it holds; the initiator's from (or failed) is due
    FILE_DATA = "file-data"  #: a file's raw bytes are due (no frame can come from the initiator)
    FILE_END = "file-end"  #: the file's bytes are through; its end (or failed) is due
    DONE = "done"  #: complete: only closing is left
    CLOSED = "closed"  #: an error frame was sent or received: nothing more


_ANSWERING = {"done": None, "failed": None, "wait": None, "error": State.CLOSED}  # None: the state stays
# (role that sends, state) -> {frame type: next state}. A missing key is the error.
EXCHANGE_RULES: Dict[Tuple[Role, State], Dict[str, Optional[State]]] = {
    (Role.INITIATOR, State.OPENING): {"announce": State.DONE, "message": State.MESSAGE, "offer": State.OFFERED,
                                      "error": State.CLOSED},
    (Role.ACCEPTOR, State.OPENING): {"error": State.CLOSED},  # refused before a word: busy
    (Role.INITIATOR, State.MESSAGE): {"error": State.CLOSED},
    (Role.ACCEPTOR, State.MESSAGE): {"ack": State.DONE, "error": State.CLOSED},
    (Role.INITIATOR, State.OFFERED): {"error": State.CLOSED},  # nothing before the accept: ACCEPT=ask holds
    (Role.ACCEPTOR, State.OFFERED): {"wait": None, "accept": State.STREAMING, "error": State.CLOSED},
    (Role.INITIATOR, State.STREAMING): {"file": State.FILE_DATA, "folder": None, "error": State.CLOSED},
    (Role.ACCEPTOR, State.STREAMING): _ANSWERING,
    (Role.INITIATOR, State.RESUMING): {"error": State.CLOSED},
    (Role.ACCEPTOR, State.RESUMING): dict(_ANSWERING, resume=State.RESUMED),
    (Role.INITIATOR, State.RESUMED): {"from": State.FILE_DATA, "failed": State.STREAMING, "error": State.CLOSED},
    (Role.ACCEPTOR, State.RESUMED): _ANSWERING,
    (Role.INITIATOR, State.FILE_DATA): {},  # raw bytes only
    (Role.ACCEPTOR, State.FILE_DATA): _ANSWERING,
    (Role.INITIATOR, State.FILE_END): {"end": State.STREAMING, "failed": State.STREAMING, "error": State.CLOSED},
    (Role.ACCEPTOR, State.FILE_END): _ANSWERING,
    (Role.INITIATOR, State.DONE): {},
    (Role.ACCEPTOR, State.DONE): {},
    (Role.INITIATOR, State.CLOSED): {},
    (Role.ACCEPTOR, State.CLOSED): {},
}
_OTHER = {Role.INITIATOR: Role.ACCEPTOR, Role.ACCEPTOR: Role.INITIATOR}


class Exchange:
    """One connection between two daemons, seen from one end. No I/O.

    ``send(event)`` turns an event into bytes and advances the state;
    ``receive_data(data)`` and ``feed_eof()`` turn the peer's bytes into
    events and advance it too. Sending what the state forbids raises
    ``LocalProtocolError`` ("... cannot be sent in state ..."), at the call;
    receiving it raises ``RemoteProtocolError``, after which the exchange
    refuses all further input. File bytes come out as ``FileData`` chunks
    that view the fed buffer; a sender that writes them itself (sendfile)
    reports them with ``sent_file_bytes``.
    """

    def __init__(self, role: Role, version: int = VERSION) -> None:
        """An initiator speaks ``version``; an acceptor answers in the
        initiator's version, up to ``version`` (§2, §7)."""
        self.role = role
        self.state = State.OPENING
        self._reader = FrameReader()
        self._reader.max_frame = MAX_FRAME_BYTES if role is Role.ACCEPTOR else MAX_HEADER_BYTES
        self._preface_sent = False
        self.version = version if role is Role.INITIATOR else 0  # 0: not known yet
        self.max_version = version
        self._error: Optional[RemoteProtocolError] = None
        self.entries = 0  # of the offer
        self.next_index = 0  # the entry due next
        self.bytes_left = 0  # of the size the offer announced
        self.file_index = -1  # the file in flight
        self.file_bytes_left = 0  # its raw bytes still due
        self.answered = bytearray()  # per entry: 1 once done or failed was said
        self.answers = 0
        self.file_size = 0  # of the file in flight
        self.resume_offset = 0  # what the acceptor said it holds of it

    # -- what the caller asks

    @property
    def opened(self) -> bool:
        """Whether the initiator's first frame is through (the handshake is over)."""
        return self.state is not State.OPENING

    @property
    def data_remaining(self) -> int:
        """Raw file bytes due from the peer before its next frame: a receive size hint."""
        return self._reader.data_left

    @property
    def complete(self) -> bool:
        return self.state is State.DONE

    @property
    def heard(self) -> bool:
        """Whether the peer's preface is in: a daemon is there."""
        return self._reader.version != 0

    # -- sending

    def send_preface(self) -> bytes:
        """Our preface: the initiator's names the exchange's version; an
        acceptor's always names version 1, which every acceptor speaks, so
        that it can go out at once, before the initiator's is read (§2)."""
        if self._preface_sent:
            raise LocalProtocolError("bad-event", "the preface is sent once")
        self._preface_sent = True
        return encode_preface_of(self.version if self.role is Role.INITIATOR else MIN_VERSION)

    def send(self, event: Any) -> bytes:
        """The bytes of ``event``, which this end now sends (§4.1)."""
        if not self._preface_sent:
            raise LocalProtocolError("bad-event", "the preface goes first")
        if isinstance(event, FileData):
            self.sent_file_bytes(len(event.data))
            return bytes(event.data)
        data = encode_frame(event)
        self._advance(self.role, event)
        return data

    def sent_file_bytes(self, count: int) -> None:
        """``count`` bytes of the file in flight went out another way (sendfile)."""
        if self.role is not Role.INITIATOR or self.state is not State.FILE_DATA or count > self.file_bytes_left:
            raise LocalProtocolError("bad-event", f"{count} file bytes cannot be sent in state {self.state.value}")
        self._file_bytes(count)

    # -- receiving

    def receive_data(self, data: Union[bytes, bytearray, memoryview]) -> List[Any]:
        if self._error is not None:
            raise self._error
        events: List[Any] = []
        try:
            for item in self._items(data):
                if isinstance(item, FileData):
                    self._file_bytes(len(item.data))
                    events.append(item)
                    continue
                events.append(self._receive_frame(item))
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        return events

    def _items(self, data: Union[bytes, bytearray, memoryview]) -> Iterator[Any]:
        """The reader's items, with the peer's version taken as it comes."""
        known = self._reader.version
        for item in self._reader.items(data):
            if not known:
                known = self._take_version(self._reader.version)
            yield item
        if not known and self._reader.version:
            self._take_version(self._reader.version)

    def _take_version(self, version: int) -> int:
        if self.role is Role.ACCEPTOR:
            if version > self.max_version:
                raise RemoteProtocolError("unsupported-version", f"peer speaks version {version}, this is "
                                                                 f"version {MIN_VERSION} to {self.max_version}")
            self.version = version  # the exchange's: the initiator's
        elif version != MIN_VERSION:
            raise RemoteProtocolError("bad-magic", f"an acceptor's preface names version {MIN_VERSION}, not {version}")
        return version

    def feed_eof(self) -> List[Any]:
        """The peer closed its side: legal once the exchange allows it."""
        if self._error is not None:
            raise self._error
        if not self._reader.at_boundary:
            what = "before the preface" if self._reader._state == _PREFACE else "mid-frame or mid-file"
            self._error = RemoteProtocolError("truncated", f"connection closed {what}")
        elif self.state in (State.DONE, State.CLOSED):
            return []
        elif self.role is Role.ACCEPTOR:
            if self.state is State.MESSAGE or (self.state in (State.OFFERED, State.STREAMING)
                                               and self.next_index == self.entries):
                return []  # all it had to say is in: a sender that does not wait for our answer
            self._error = RemoteProtocolError("truncated", "connection closed mid-exchange")
        else:
            self._error = RemoteProtocolError("peer-gone", "the receiver closed the connection")
        raise self._error

    def _receive_frame(self, obj: Dict[str, Any]) -> Any:
        event = event_of(obj)
        try:
            self._advance(_OTHER[self.role], event)
        except LocalProtocolError as exc:  # the rule the peer broke, in its terms
            raise RemoteProtocolError(exc.code, exc.message) from None
        if self.role is Role.ACCEPTOR and self.state is not State.OPENING:
            self._reader.max_frame = MAX_HEADER_BYTES  # only the opening frame may be a long message
        return event

    # -- the rules, for both directions

    def _advance(self, sender: Role, event: Any) -> None:
        """Apply ``event`` sent by ``sender``, or LocalProtocolError naming the rule it breaks."""
        kind = _FRAME_TYPE[type(event)]
        if self.version < 2 and (kind in _V2_FRAMES or _uses_optional_fields(kind, event)):
            raise LocalProtocolError("bad-frame", f"{kind!r} as sent is wire protocol version 2; this exchange is "
                                                  f"version {self.version}")
        allowed = EXCHANGE_RULES[(sender, self.state)]
        if kind not in allowed:
            raise LocalProtocolError("unexpected-frame", f"{kind!r} cannot be sent by the {sender.value} in "
                                                         f"state {self.state.value}")
        guard = _GUARDS.get((sender, kind))
        if guard is not None:
            guard(self, event)
        next_state = allowed[kind]
        if next_state is not None:
            self.state = next_state
        if kind == "file" and event.mtime is not None:
            self.state = State.RESUMING  # its bytes wait for the acceptor's resume
        elif kind in ("file", "from") and event.size == 0:
            self.state = State.FILE_END  # no raw bytes: its end is due at once
        if (self.state is State.STREAMING and self.next_index == self.entries
                and self.answers == self.entries):
            self.state = State.DONE

    def _take_offer(self, event: Offer) -> None:
        self.entries, self.bytes_left = event.entries, event.size
        self.answered = bytearray(event.entries)

    def _take_entry(self, event: Any) -> None:
        if self.next_index >= self.entries:
            raise LocalProtocolError("unexpected-frame", f"entry {event.index} is one more than the "
                                                         f"{self.entries} offered")
        if event.index != self.next_index:
            raise LocalProtocolError("bad-index", f"entry {event.index} where entry {self.next_index} was due")
        if isinstance(event, FileHeader):
            if event.size > self.bytes_left:  # the offer's size was checked against free space
                raise LocalProtocolError("size-mismatch", f"file of {event.size} bytes exceeds what the offer "
                                                          f"announced ({self.bytes_left} left)")
            self.bytes_left -= event.size
            self.file_index, self.file_bytes_left, self.file_size = event.index, event.size, event.size
        self.next_index += 1

    def _take_resume(self, event: Resume) -> None:
        if event.index != self.file_index:
            raise LocalProtocolError("bad-resume", f"resume for entry {event.index}, not the file in flight")
        if event.offset > self.file_size:
            raise LocalProtocolError("bad-resume", f"resume at byte {event.offset} of a file of {self.file_size}")
        self.resume_offset = event.offset

    def _take_from(self, event: FileFrom) -> None:
        if event.index != self.file_index:
            raise LocalProtocolError("bad-resume", f"bytes of entry {event.index}, not the file in flight")
        if event.offset not in (0, self.resume_offset):
            raise LocalProtocolError("bad-resume", f"bytes from {event.offset}: the receiver holds "
                                                   f"{self.resume_offset}, or send it all")
        if event.size != self.file_size - event.offset:
            raise LocalProtocolError("size-mismatch", f"{event.size} bytes from {event.offset} of a file of "
                                                      f"{self.file_size}")
        self.file_bytes_left = event.size

    def _take_disowning(self, event: Failed) -> None:
        if event.index != self.file_index:
            raise LocalProtocolError("unexpected-frame", f"'failed' for entry {event.index}, which is not in flight")

    def _take_answer(self, event: Any) -> None:
        index = event.index
        in_flight = index == self.file_index and self.state in _FILE_IN_FLIGHT
        if index >= self.next_index or self.answered[index] or in_flight:
            raise LocalProtocolError("unexpected-frame", f"an answer for entry {index}, which was not sent whole "
                                                         "or is answered")
        self.answered[index] = 1
        self.answers += 1

    def _file_bytes(self, count: int) -> None:
        self.file_bytes_left -= count
        if self.file_bytes_left == 0 and self.state is State.FILE_DATA:
            self.state = State.FILE_END


_FILE_IN_FLIGHT = (State.RESUMING, State.RESUMED, State.FILE_DATA, State.FILE_END)


def _uses_optional_fields(kind: str, event: Any) -> bool:
    return any(getattr(event, field) not in (None, "") for field in _OPTIONAL_FIELDS.get(kind, ()))


# (role that sends, frame type) -> the check that counts: entries in order, sizes within the offer,
# an answer once per entry sent.
_GUARDS: Dict[Tuple[Role, str], Callable[[Exchange, Any], None]] = {
    (Role.INITIATOR, "offer"): Exchange._take_offer,
    (Role.INITIATOR, "file"): Exchange._take_entry,
    (Role.INITIATOR, "folder"): Exchange._take_entry,
    (Role.INITIATOR, "failed"): Exchange._take_disowning,
    (Role.INITIATOR, "from"): Exchange._take_from,
    (Role.ACCEPTOR, "resume"): Exchange._take_resume,
    (Role.ACCEPTOR, "done"): Exchange._take_answer,
    (Role.ACCEPTOR, "failed"): Exchange._take_answer,
}


# --- Discovery datagrams (§5) -------------------------------------------------


@dataclass(frozen=True)
class DiscoveryRequest:
    """Broadcast by a daemon looking for peers; answered over TCP on ``port``."""

    name: str
    nonce: str
    port: int


def encode_discovery(request: DiscoveryRequest) -> bytes:
    body = {"type": "discover", "name": request.name, "nonce": request.nonce, "port": request.port}
    datagram = PREFACE + to_json(body).encode("utf-8")
    if len(datagram) > MAX_DATAGRAM_BYTES:
        raise LocalProtocolError("datagram-too-large", f"over {MAX_DATAGRAM_BYTES} bytes")
    return datagram


def decode_datagram(datagram: bytes) -> DiscoveryRequest:
    """One whole UDP datagram to a ``DiscoveryRequest`` or RemoteProtocolError."""
    if len(datagram) > MAX_DATAGRAM_BYTES:
        raise RemoteProtocolError("datagram-too-large", f"over {MAX_DATAGRAM_BYTES} bytes")
    if datagram[:len(MAGIC)] != MAGIC:
        raise RemoteProtocolError("bad-magic", "not a tnet datagram")
    if datagram[len(MAGIC):len(PREFACE)] != bytes([MIN_VERSION]):
        raise RemoteProtocolError("unsupported-version", "unknown datagram version")
    obj = parse_json_object(datagram[len(PREFACE):], "datagram")
    port = obj.get("port")
    if obj.get("type") != "discover":
        raise RemoteProtocolError("bad-frame", "a datagram's type is 'discover'")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise RemoteProtocolError("bad-frame", "port must be 1 to 65535")
    name = check_host_name(obj.get("name"))  # type: ignore[arg-type]
    return DiscoveryRequest(name=name, nonce=_check_nonce(obj.get("nonce"), "nonce"), port=port)  # type: ignore[arg-type]
