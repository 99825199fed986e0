"""The LocalSend v2 protocol, without any I/O.

LocalSend peers find each other by multicast JSON datagrams and move files
over HTTP(S) with JSON bodies. This module holds the pure part of that:

* the constants (API paths, default port and group, the version we speak)
  and every limit, each with the reason for its value;
* ``DeviceInfo`` and the codecs of announcements, register and info bodies;
* the prepare-upload request and response, both as receiver and as sender;
* ``Session`` and ``Sessions``: which upload a receiver takes, and when;
* ``PinGuard``: the PIN check with its per-address attempt limit;
* ``LocalSendError``, a refusal with the HTTP status to answer it with.

It must not touch sockets, files, clocks or randomness: callers pass in bodies,
query parameters, ``now``, session ids and tokens. HTTP framing is not here
either. Names a peer offers are checked by ``protocol.check_path`` and refused,
never rewritten. Unknown JSON fields are ignored: unlike tnet's own format,
LocalSend adds fields between minor versions.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import ipaddress
import json
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from typing import AbstractSet, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlencode

from . import protocol

# --- Constants ---------------------------------------------------------------------------------

API_V2 = "/api/localsend/v2"
INFO_PATH = API_V2 + "/info"
REGISTER_PATH = API_V2 + "/register"
PREPARE_UPLOAD_PATH = API_V2 + "/prepare-upload"
UPLOAD_PATH = API_V2 + "/upload"
CANCEL_PATH = API_V2 + "/cancel"
INFO_V1_PATH = "/api/localsend/v1/info"  # still probed by apps up to 1.17
DEFAULT_PORT = 53317  # TCP for HTTP(S) and UDP for multicast alike
MULTICAST_GROUP = "224.0.0.167"  # in 224.0.0.0/24: some Android devices refuse other groups
PROTOCOL_VERSION = "2.2"  # what the official app 1.18 and localsendd send
DEVICE_TYPES = ("mobile", "desktop", "web", "headless", "server")
DEFAULT_FILE_TYPE = "application/octet-stream"

# --- Limits ------------------------------------------------------------------------------------

MAX_ANNOUNCE_BYTES = 4096  # a datagram with one info object is ~300 bytes
MAX_REGISTER_BYTES = 16 * 1024  # one info object, with room for long fields
MAX_FILES = 10_000  # a large photo folder; more in one request is a flood
# MAX_FILES entries of ~800 bytes each (id, path, type, hash, metadata); bounds the
# prepare-upload request and its response (ids and tokens only) alike.
MAX_PREPARE_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_ALIAS_BYTES = 128  # a display name; the app's own are two words
MAX_DEVICE_MODEL_BYTES = 128  # "Samsung", "Linux"
MAX_FINGERPRINT_BYTES = 128  # a SHA-256 in hex is 64, a random id 32
MAX_ID_BYTES = 128  # file ids, session ids, tokens: a UUID is 36
MAX_FILE_NAME_BYTES = 4096  # a whole "a/b/c.jpg" (PATH_MAX); each part is protocol.MAX_NAME_BYTES
MAX_FILE_TYPE_BYTES = 255  # RFC 6838: type and subtype of at most 127 each
MAX_PREVIEW_BYTES = protocol.MAX_MESSAGE_BYTES  # a message travels there: tnet's message limit
MAX_NUMBER_CHARS = 24  # the largest number is a size (16 digits); int() of huge literals is slow
MAX_SESSIONS = 16  # concurrent receive sessions; LocalSend itself allows one
MAX_UPLOAD_ATTEMPTS = 3  # the official app retries a file after a checksum mismatch (422)
MAX_PIN_ATTEMPTS = 3  # wrong PINs per address before 429, as the official app and localsendd
PIN_WINDOW_S = 60.0  # how long wrong PINs are counted, and the lockout after the last one
MAX_PIN_CLIENTS = 1024  # addresses PinGuard remembers; the oldest record goes first

_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_HIDDEN = ("Cc", "Cf", "Zl", "Zp")  # controls, format (bidi) characters, line/paragraph breaks
_ZWJ = "\u200d"  # a format character that joins emoji sequences in a device name


class LocalSendError(protocol.RemoteProtocolError):
    """A request (or answer) we refuse; ``status`` is the HTTP status a server answers.
    When we are the client, only ``code`` and ``message`` matter."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status = status


@contextlib.contextmanager
def _ours() -> Iterator[None]:
    """What we would refuse from a peer, we must not send: our own error then."""
    try:
        yield
    except LocalSendError as exc:
        raise protocol.LocalProtocolError(exc.code, exc.message) from None


# --- JSON and field checks ---------------------------------------------------------------------


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    obj: Dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:  # two "size" keys: which one did the sender's other checks see?
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError("number too long")
    return int(text)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse_object(body: bytes, limit: int, what: str) -> Dict[str, Any]:
    if len(body) > limit:
        raise LocalSendError(413, "too-large", f"{what} is over {limit} bytes")
    try:
        # Bytes that are not UTF-8 become lone surrogates: refused in any string check below.
        obj = json.loads(bytes(body).decode("utf-8", "surrogateescape"), object_pairs_hook=_no_duplicates,
                         parse_int=_parse_int, parse_constant=_refuse_constant)
    except _DuplicateKey as exc:
        raise LocalSendError(400, "duplicate-key", f"{what} repeats the key {str(exc)!r}") from None
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nesting
        raise LocalSendError(400, "bad-json", f"{what} is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise LocalSendError(400, "bad-json", f"{what} is not a JSON object")
    return obj


def _get(obj: Dict[str, Any], key: str, kind: type, where: str, required: bool = True) -> Any:
    """``obj[key]`` if it has type ``kind``; null counts as missing (LocalSend fields are nullable)."""
    value = obj.get(key)
    if value is None:
        if required:
            raise LocalSendError(400, "missing-field", f"{where} needs {key!r}")
        return None
    # bool is an int subclass; a size of `true` is a lie, not a number.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise LocalSendError(400, "bad-field", f"{where}.{key} must be {kind.__name__}")
    return value


def _check_text(text: str, limit: int, where: str) -> str:
    """A display string: UTF-8, 1 to ``limit`` bytes, nothing that could drive a terminal."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise LocalSendError(400, "bad-text", f"{where} is not valid UTF-8") from None
    if not 0 < size <= limit:
        raise LocalSendError(400, "bad-text", f"{where} is 1 to {limit} bytes")
    if not text.isprintable() and any(unicodedata.category(c) in _HIDDEN and c != _ZWJ for c in text):
        raise LocalSendError(400, "bad-text", f"{where} has a control or format character")
    return text


def _check_id(value: Any, where: str) -> str:
    """A file id, session id or token: printable ASCII, 1 to MAX_ID_BYTES."""
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_ID_BYTES
            or not value.isascii() or not value.isprintable()):
        raise LocalSendError(400, "bad-id", f"{where} is 1 to {MAX_ID_BYTES} printable ASCII characters")
    return value


def _dump(obj: Any) -> bytes:
    try:
        return _to_json(obj).encode("utf-8")
    except UnicodeEncodeError:
        raise protocol.LocalProtocolError("bad-text", "a string is not valid UTF-8") from None


# --- Device info (discovery, register, /info) --------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """Who a peer is. ``port`` and ``protocol`` are None where the body may leave
    them out (a register response, the ``info`` of a prepare-upload)."""

    alias: str
    fingerprint: str
    port: Optional[int] = DEFAULT_PORT
    protocol: Optional[str] = "https"
    version: str = PROTOCOL_VERSION
    device_model: Optional[str] = None
    device_type: str = "desktop"
    download: bool = False


def encode_info(info: DeviceInfo, announce: Optional[bool] = None) -> Dict[str, Any]:
    """The JSON object for ``info``; ``announce`` only in multicast datagrams."""
    obj: Dict[str, Any] = {"alias": info.alias, "version": info.version, "deviceModel": info.device_model,
                           "deviceType": info.device_type, "fingerprint": info.fingerprint,
                           "port": info.port, "protocol": info.protocol, "download": info.download}
    obj = {key: value for key, value in obj.items() if value is not None}  # serde skips None too
    if announce is not None:
        obj["announce"] = announce
    with _ours():
        decode_device(obj, need_port=info.port is not None)  # we never send what we would refuse
    return obj


def decode_device(obj: Any, *, need_port: bool) -> DeviceInfo:
    """A device info object, strict on types, tolerant where real peers differ.
    ``need_port``: the object must say where to reach the device (port and protocol)."""
    if not isinstance(obj, dict):
        raise LocalSendError(400, "bad-field", "device info is not a JSON object")
    version = _get(obj, "version", str, "info")
    major, _, minor = version.partition(".")
    if major != "2" or not minor.isdigit() or not minor.isascii() or len(minor) > 3:
        raise LocalSendError(400, "unsupported-version", f"protocol version 2.x, not {version[:16]!r}")
    port = _get(obj, "port", int, "info", need_port)
    if port is not None and not 1 <= port <= 65535:
        raise LocalSendError(400, "bad-field", "port must be 1 to 65535")
    scheme = _get(obj, "protocol", str, "info", need_port)
    if scheme is not None and scheme not in ("http", "https"):
        raise LocalSendError(400, "bad-field", "protocol is 'http' or 'https'")
    model = _get(obj, "deviceModel", str, "info", False)
    device_type = (_get(obj, "deviceType", str, "info", False) or "desktop").lower()
    return DeviceInfo(
        alias=_check_text(_get(obj, "alias", str, "info"), MAX_ALIAS_BYTES, "alias"),
        fingerprint=_check_text(_get(obj, "fingerprint", str, "info"), MAX_FINGERPRINT_BYTES, "fingerprint"),
        port=port, protocol=scheme, version=version,
        device_model=None if model is None else _check_text(model, MAX_DEVICE_MODEL_BYTES, "deviceModel"),
        device_type=device_type if device_type in DEVICE_TYPES else "desktop",  # the spec's fallback
        download=bool(_get(obj, "download", bool, "info", False)),
    )


def encode_announce(info: DeviceInfo, announce: bool) -> bytes:
    """A multicast datagram: ``announce=True`` asks peers to register with us."""
    return _dump(encode_info(info, announce))


def decode_announce(datagram: bytes) -> Tuple[DeviceInfo, bool]:
    """A multicast datagram as (info, whether it asks for an answer)."""
    obj = _parse_object(datagram, MAX_ANNOUNCE_BYTES, "datagram")
    info = decode_device(obj, need_port=True)
    flag = _get(obj, "announce", bool, "datagram", False)
    if flag is None:  # protocol v1 called it "announcement"
        flag = _get(obj, "announcement", bool, "datagram", False)
    # Without either flag, as the official app 1.18 reads it: every datagram is an announcement.
    return info, True if flag is None else flag


def encode_register(info: DeviceInfo) -> bytes:
    """The body of a register request, its response, and of /info."""
    return _dump(encode_info(info))


def decode_register(body: bytes, *, need_port: bool = True) -> DeviceInfo:
    """A register request (``need_port``), or with ``need_port=False`` its response or /info."""
    return decode_device(_parse_object(body, MAX_REGISTER_BYTES, "register body"), need_port=need_port)


# --- Prepare-upload ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FileOffer:
    """One offered file. ``path`` is its relative path, checked part by part."""

    id: str
    path: Tuple[str, ...]
    size: int
    file_type: str = DEFAULT_FILE_TYPE
    sha256: Optional[str] = None
    preview: Optional[str] = None


@dataclass(frozen=True)
class PrepareUpload:
    """A send request. ``refused`` holds (file id, code, message) for files whose
    name or preview we refuse; the rest of the request stands. ``message`` is the
    text when the request is a text message, as the official app sends them."""

    info: DeviceInfo
    files: Tuple[FileOffer, ...]
    refused: Tuple[Tuple[str, str, str], ...] = ()
    message: Optional[str] = None


def _decode_file(file_id: str, obj: Any) -> Union[FileOffer, protocol.RemoteProtocolError]:
    """One entry of ``files``, or why only this file is refused. Raises LocalSendError
    for what makes the whole request malformed."""
    where = f"files[{file_id!r}]"
    if not isinstance(obj, dict):
        raise LocalSendError(400, "bad-field", f"{where} is not a JSON object")
    if _get(obj, "id", str, where) != file_id:
        raise LocalSendError(400, "bad-id", f"{where}.id differs from its key")
    size = _get(obj, "size", int, where)
    if not 0 <= size <= protocol.MAX_FILE_BYTES:
        raise LocalSendError(400, "bad-size", f"{where}.size must be 0 to {protocol.MAX_FILE_BYTES}")
    file_type = _check_text(_get(obj, "fileType", str, where, False) or DEFAULT_FILE_TYPE,
                            MAX_FILE_TYPE_BYTES, f"{where}.fileType")
    sha256 = _get(obj, "sha256", str, where, False)
    if sha256 is not None:
        sha256 = sha256.lower()
        if len(sha256) != protocol.SHA256_HEX_CHARS or sha256.strip("0123456789abcdef"):
            raise LocalSendError(400, "bad-sha256", f"{where}.sha256 is 64 hex digits")
    name = _get(obj, "fileName", str, where)
    preview = _get(obj, "preview", str, where, False)
    try:
        _check_size(name, MAX_FILE_NAME_BYTES, "bad-name", "a fileName")
        path = protocol.check_path(name.split("/"))  # "photos/2024/a.jpg" carries folders
        if preview is not None:
            _check_size(preview, MAX_PREVIEW_BYTES, "bad-preview", "a preview")
    except protocol.RemoteProtocolError as exc:
        return exc
    return FileOffer(file_id, path, size, file_type, sha256, preview)


def _check_size(text: str, limit: int, code: str, what: str) -> None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise protocol.RemoteProtocolError(code, f"{what} is not valid UTF-8") from None
    if size > limit:
        raise protocol.RemoteProtocolError(code, f"{what} is at most {limit} bytes")


def decode_prepare_upload(body: bytes) -> PrepareUpload:
    """The body of POST prepare-upload. An empty ``files`` is valid: answer 204."""
    obj = _parse_object(body, MAX_PREPARE_UPLOAD_BYTES, "prepare-upload")
    info = decode_device(_get(obj, "info", dict, "prepare-upload"), need_port=False)
    entries = _get(obj, "files", dict, "prepare-upload")
    if len(entries) > MAX_FILES:
        raise LocalSendError(413, "too-many-files", f"at most {MAX_FILES} files in one request")
    files: List[FileOffer] = []
    refused: List[Tuple[str, str, str]] = []
    for file_id, entry in entries.items():
        offer = _decode_file(_check_id(file_id, "a file id"), entry)
        if isinstance(offer, FileOffer):
            files.append(offer)
        else:
            refused.append((file_id, offer.code, offer.message))
    message = None
    if len(entries) == 1 and files and files[0].file_type.startswith("text/") and files[0].preview is not None:
        message = files[0].preview
    return PrepareUpload(info, tuple(files), tuple(refused), message)


def encode_prepare_upload(info: DeviceInfo, files: Sequence[FileOffer]) -> bytes:
    """The body of our own prepare-upload; ``sha256`` and ``preview`` only when known."""
    entries: Dict[str, Dict[str, Any]] = {}
    for offer in files:
        entry = {"id": offer.id, "fileName": "/".join(offer.path), "size": offer.size,
                 "fileType": offer.file_type, "sha256": offer.sha256, "preview": offer.preview}
        entries[offer.id] = {key: value for key, value in entry.items() if value is not None}
    if len(entries) != len(files):
        raise protocol.LocalProtocolError("bad-id", "two files share an id")
    body = _dump({"info": encode_info(info), "files": entries})
    with _ours():
        decoded = decode_prepare_upload(body)
    if decoded.refused:
        raise protocol.LocalProtocolError(decoded.refused[0][1], decoded.refused[0][2])
    if [f.path for f in decoded.files] != [f.path for f in files]:  # a part held a "/"
        raise protocol.LocalProtocolError("bad-name", "a path part is not a file name")
    return body


def message_offer(file_id: str, text: str) -> FileOffer:
    """A text message the way the official app sends it: one text file, the text in ``preview``."""
    return FileOffer(file_id, (f"{file_id}.txt",), len(text.encode("utf-8")), "text/plain", None, text)


def encode_prepare_response(session_id: str, tokens: Mapping[str, str]) -> bytes:
    """The 200 answer: the session id and a token for each accepted file."""
    with _ours():
        for file_id, token in tokens.items():
            _check_id(file_id, "a file id")
            _check_id(token, "a token")
        _check_id(session_id, "sessionId")
    return _dump({"sessionId": session_id, "files": dict(tokens)})


def decode_prepare_response(body: bytes, offered: Optional[AbstractSet[str]] = None) -> Tuple[str, Dict[str, str]]:
    """A receiver's 200 answer as (session id, {file id: token}). With ``offered``,
    a token for a file we did not offer is refused."""
    obj = _parse_object(body, MAX_PREPARE_UPLOAD_BYTES, "prepare-upload response")
    session_id = _check_id(_get(obj, "sessionId", str, "response"), "sessionId")
    entries = _get(obj, "files", dict, "response")
    if len(entries) > MAX_FILES:
        raise LocalSendError(413, "too-many-files", f"at most {MAX_FILES} tokens in one response")
    tokens = {_check_id(key, "a file id"): _check_id(value, "a token") for key, value in entries.items()}
    if offered is not None and not tokens.keys() <= offered:
        raise LocalSendError(400, "unknown-file", "a token for a file that was not offered")
    return session_id, tokens


def upload_target(session_id: str, file_id: str, token: str) -> str:
    """The request target of one upload, parameters urlencoded."""
    return UPLOAD_PATH + "?" + urlencode({"sessionId": session_id, "fileId": file_id, "token": token})


# --- Receive sessions --------------------------------------------------------------------------


def _host(address: str) -> str:
    """An address as one spelling: a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


class SessionState(enum.Enum):
    #: Accepted; uploads of its files may come.
    ACTIVE = "active"
    #: Every accepted file finished or failed.
    FINISHED = "finished"
    #: The sender or our user cancelled; no new upload is taken.
    CANCELLED = "cancelled"


class FileState(enum.Enum):
    #: Accepted, not uploaded yet (or back after a checksum mismatch).
    PENDING = "pending"
    #: Its upload request is being received.
    IN_PROGRESS = "in-progress"
    #: Saved and verified.
    FINISHED = "finished"
    #: Given up: failed upload, attempts used up, or the session was cancelled.
    FAILED = "failed"


_FINAL = (FileState.FINISHED, FileState.FAILED)


def _upload_params(query: Mapping[str, str]) -> Tuple[str, str, str]:
    values = tuple(query.get(key) for key in ("sessionId", "fileId", "token"))
    if any(value is None for value in values):
        raise LocalSendError(400, "missing-parameter", "upload needs sessionId, fileId and token")
    return values  # type: ignore[return-value]


class Session:
    """One accepted prepare-upload: its sender's address and a token per accepted
    file. Decides which upload requests to take (``check_upload``) and tracks each
    file's state; the caller reports what happened (``file_started`` ...)."""

    def __init__(self, session_id: str, sender_ip: str, offer: PrepareUpload, tokens: Mapping[str, str]) -> None:
        offered = {f.id: f for f in offer.files}
        with _ours():
            _check_id(session_id, "sessionId")
            for token in tokens.values():
                _check_id(token, "a token")
        if not tokens or not tokens.keys() <= offered.keys():
            raise protocol.LocalProtocolError("bad-id", "tokens are for some of the offered files")
        self.session_id = session_id
        self.sender_ip = _host(sender_ip)
        self.info = offer.info
        self.files = {file_id: offered[file_id] for file_id in tokens}
        self.state = SessionState.ACTIVE
        self._tokens = dict(tokens)
        self._file_states = {file_id: FileState.PENDING for file_id in tokens}
        self._attempts = {file_id: 0 for file_id in tokens}

    def file_state(self, file_id: str) -> FileState:
        return self._file_states[file_id]

    @property
    def done(self) -> bool:
        """No file is pending or being received: the session may be forgotten."""
        return all(state in _FINAL for state in self._file_states.values())

    def check_upload(self, query: Mapping[str, str], client_ip: str) -> FileOffer:
        """The file an upload request (its query parameters) may write, or LocalSendError:
        400 a parameter missing; 403 another session, address, token or file, or a file
        already received or being received; 409 the session was cancelled."""
        session_id, file_id, token = _upload_params(query)
        if session_id != self.session_id:
            raise LocalSendError(403, "unknown-session", "no such session")
        if _host(client_ip) != self.sender_ip:
            raise LocalSendError(403, "wrong-address", "uploads come from the address that prepared them")
        expected = self._tokens.get(file_id)
        if expected is None:
            raise LocalSendError(403, "unknown-file", "no such file in this session")
        if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), expected.encode("ascii")):
            raise LocalSendError(403, "bad-token", "wrong token")
        if self.state is SessionState.CANCELLED:
            raise LocalSendError(409, "cancelled", "the session was cancelled")
        if self._file_states[file_id] is not FileState.PENDING:
            raise LocalSendError(403, "file-not-pending", f"file is {self._file_states[file_id].value}")
        return self.files[file_id]

    def file_started(self, file_id: str) -> None:
        """An upload that ``check_upload`` allowed is being received."""
        self._expect(file_id, FileState.PENDING)
        self._file_states[file_id] = FileState.IN_PROGRESS
        self._attempts[file_id] += 1

    def file_finished(self, file_id: str, ok: bool, retry: bool = False) -> None:
        """The upload ended. ``retry``: a checksum mismatch (422), which the sender
        may repeat until MAX_UPLOAD_ATTEMPTS uploads of the file were started."""
        self._expect(file_id, FileState.IN_PROGRESS)
        if ok:
            state = FileState.FINISHED
        elif retry and self._attempts[file_id] < MAX_UPLOAD_ATTEMPTS and self.state is SessionState.ACTIVE:
            state = FileState.PENDING
        else:
            state = FileState.FAILED
        self._file_states[file_id] = state
        if self.done and self.state is SessionState.ACTIVE:
            self.state = SessionState.FINISHED

    def cancel(self) -> None:
        """No new upload is taken; files still being received end by ``file_finished``."""
        if self.state is SessionState.ACTIVE:
            self.state = SessionState.CANCELLED
        for file_id, state in self._file_states.items():
            if state is FileState.PENDING:
                self._file_states[file_id] = FileState.FAILED

    def _expect(self, file_id: str, state: FileState) -> None:
        if self._file_states.get(file_id) is not state:
            raise protocol.LocalProtocolError("bad-state", f"file {file_id!r} is not {state.value}")


class Sessions:
    """The receive sessions of one server, by id. Several senders may send at once
    (LocalSend answers 409 to a second one); ``max_sessions`` bounds them."""

    def __init__(self, max_sessions: int = MAX_SESSIONS) -> None:
        self._sessions: Dict[str, Session] = {}
        self._max = max_sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Optional[Session]:
        return self._sessions.get(session_id)

    @property
    def full(self) -> bool:
        """Whether a new sender is answered 409 (ask before the user is asked)."""
        return sum(not s.done for s in self._sessions.values()) >= self._max

    def add(self, session: Session) -> None:
        """Register an accepted session. Done sessions are kept (for the caller to
        read) until this call, which drops them to make room."""
        if session.session_id in self._sessions:
            raise protocol.LocalProtocolError("bad-id", "session ids are unique")
        if self.full:
            raise LocalSendError(409, "busy", "blocked by other sessions")
        for old in [s for s in self._sessions.values() if s.done]:
            del self._sessions[old.session_id]
        self._sessions[session.session_id] = session

    def remove(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def check_upload(self, query: Mapping[str, str], client_ip: str) -> Tuple[Session, FileOffer]:
        """Session.check_upload on the session the query names (403 if none)."""
        session = self._sessions.get(_upload_params(query)[0])
        if session is None:
            raise LocalSendError(403, "unknown-session", "no such session")
        return session, session.check_upload(query, client_ip)

    def cancel(self, query: Mapping[str, str], client_ip: str) -> Optional[Session]:
        """POST cancel: the session it cancelled, if the query names one of the
        sender's. Without a sessionId a sender cancels its request still waiting for
        a decision, which is the caller's, not a session yet."""
        session = self._sessions.get(query.get("sessionId") or "")
        if session is None or session.sender_ip != _host(client_ip):
            return None
        session.cancel()
        return session


# --- PIN -----------------------------------------------------------------------------------------


class PinGuard:
    """The ``?pin=`` check of prepare-upload. ``check`` answers 200, 401 (missing or
    wrong) or 429: after ``max_attempts`` wrong PINs from one address within
    ``window_s``, until ``window_s`` after the last of them. A missing PIN is not
    counted: senders first try without one. With ``pin`` None every check is 200."""

    def __init__(self, pin: Optional[str], max_attempts: int = MAX_PIN_ATTEMPTS, window_s: float = PIN_WINDOW_S,
                 max_clients: int = MAX_PIN_CLIENTS) -> None:
        self._pin = None if pin is None else pin.encode("utf-8")
        self._max_attempts = max_attempts
        self._window_s = window_s
        self._max_clients = max_clients
        self._fails: OrderedDict[str, Tuple[int, float]] = OrderedDict()  # address -> (count, since)

    def __len__(self) -> int:
        return len(self._fails)

    def check(self, client_ip: str, given_pin: Optional[str], now: float) -> int:
        if self._pin is None:
            return 200
        address = _host(client_ip)
        count, since = self._fails.get(address, (0, now))
        if now - since >= self._window_s:
            count, since = 0, now
            self._fails.pop(address, None)
        if count >= self._max_attempts:
            return 429
        if given_pin is None:
            return 401
        if hmac.compare_digest(given_pin.encode("utf-8", "surrogatepass"), self._pin):
            self._fails.pop(address, None)
            return 200
        count += 1
        self._fails.pop(address, None)  # re-inserted last: eviction takes the oldest record
        self._fails[address] = (count, now if count >= self._max_attempts else since)
        while len(self._fails) > self._max_clients:
            self._fails.popitem(last=False)
        return 401
