"""The local JSON API (docs/PROTOCOL.md §6), without any I/O.

Both UNIX sockets speak one JSON object per line. This module holds the
command socket's requests (``REQUESTS``, the schema; ``decode_request``;
``LineDecoder`` for the stream), ``encode_line`` for every line on both
sockets and the CLI's ``--json``, and one builder per event of the events
socket (§6.2), so that an event's fields are written down once. It must not
touch sockets, files or clocks, like ``protocol``, whose errors it raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from .protocol import MAX_MESSAGE_BYTES, RemoteProtocolError, parse_json_object, to_json

API_VERSION = 1  # of the local JSON API, §6
MAX_LINE_BYTES = 1024 * 1024  # one request (a long list of paths)
MAX_DISCOVER_TIMEOUT_S = 30.0  # a window longer than this is a mistake
MAX_RECIPIENTS = 64  # peers of one send or message; a LAN's worth
MAX_PIN_CHARS = 256  # a LocalSend PIN (§8.6) is a few digits; the app lets people type words
MAX_RETRY_FOR_S = 7 * 24 * 3600.0  # a send that keeps trying for more than a week is forgotten, not patient

# --- Requests (§6.1) ------------------------------------------------------------



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
    # To one peer, several (``peers``), or every one a fresh discovery finds (``all``): one of the three.
    "send": {"peer": (str, False), "peers": (list, False), "all": (bool, False), "paths": (list, True),
             "retry_for": (_NUMBER, False), "pin": (str, False)},
    "message": {"peer": (str, False), "peers": (list, False), "all": (bool, False), "text": (str, True),
                "pin": (str, False)},
    "transfers": {},
    "cancel": {"id": (str, True)},
    "accept": {"id": (str, True)},
    "decline": {"id": (str, True)},
    "history": {"limit": (int, False), "peer": (str, False)},
}


def decode_request(line: bytes) -> Request:
    """Parse and type-check one request line, or raise RemoteProtocolError."""
    obj = parse_json_object(line, "request")
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
        # bool is an int subclass: true is no number, and only a flag is a flag
        if not isinstance(value, types) or isinstance(value, bool) is not (types is bool):
            raise RemoteProtocolError("bad-request", f"{cmd}: {name!r} has the wrong type")
    for name, (_, required) in schema.items():
        if required and name not in obj:
            raise RemoteProtocolError("bad-request", f"{cmd} needs {name!r}")
    for check in _CHECKS.get(cmd, ()):
        check(cmd, obj)
    return Request(cmd=cmd, args=obj)


def _check_paths(cmd: str, obj: Dict[str, Any]) -> None:
    paths = obj["paths"]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise RemoteProtocolError("bad-request", "send: 'paths' is a non-empty list of strings")


def _check_targets(cmd: str, obj: Dict[str, Any]) -> None:
    given = [name for name in ("peer", "peers", "all") if obj.get(name) not in (None, False)]
    if len(given) != 1:
        raise RemoteProtocolError("bad-request", f"{cmd} needs one of 'peer', 'peers' or 'all'")
    peers = obj.get("peers", [""])
    if "peers" in obj and not (0 < len(peers) <= MAX_RECIPIENTS and all(isinstance(p, str) and p for p in peers)):
        raise RemoteProtocolError("bad-request", f"{cmd}: 'peers' is a list of 1 to {MAX_RECIPIENTS} names or "
                                                 "addresses")


def _check_text(cmd: str, obj: Dict[str, Any]) -> None:
    try:
        text_bytes = len(obj["text"].encode("utf-8"))
    except UnicodeEncodeError:
        raise RemoteProtocolError("bad-request", "message: text is not valid UTF-8") from None
    if text_bytes > MAX_MESSAGE_BYTES:
        raise RemoteProtocolError("message-too-large", f"a message is at most {MAX_MESSAGE_BYTES} bytes")


def _check_pin(cmd: str, obj: Dict[str, Any]) -> None:
    pin = obj.get("pin")
    if pin is not None and not (0 < len(pin) <= MAX_PIN_CHARS and pin.isprintable()):
        raise RemoteProtocolError("bad-request", f"{cmd}: 'pin' is 1 to {MAX_PIN_CHARS} printable characters")


def _check_numbers(cmd: str, obj: Dict[str, Any]) -> None:
    if "retry_for" in obj and not 0 <= obj["retry_for"] <= MAX_RETRY_FOR_S:
        raise RemoteProtocolError("bad-request", f"retry_for must be 0 to {MAX_RETRY_FOR_S:g} s")
    if cmd == "history" and obj.get("limit", 1) < 1:
        raise RemoteProtocolError("bad-request", "history: 'limit' is at least 1")
    if cmd == "history" and obj.get("peer", "x") == "":
        raise RemoteProtocolError("bad-request", "history: 'peer' is an address or a name")
    if "timeout" in obj and not 0 < obj["timeout"] <= MAX_DISCOVER_TIMEOUT_S:
        raise RemoteProtocolError("bad-request", f"timeout must be over 0 and at most {MAX_DISCOVER_TIMEOUT_S:g} s")


# Command -> the checks beyond types, in order.
_CHECKS: Dict[str, Tuple[Callable[[str, Dict[str, Any]], None], ...]] = {
    "send": (_check_targets, _check_paths, _check_numbers, _check_pin),
    "message": (_check_targets, _check_text, _check_pin),
    "discover": (_check_numbers,),
    "history": (_check_numbers,),
}


def encode_line(obj: Any) -> bytes:
    """One JSON object as one line (§6). Printable non-ASCII stays UTF-8; every
    other character (controls, C1 controls such as U+009B, DEL, format characters
    such as U+202E, lone surrogates) is escaped as \\uXXXX, so that a line shown
    on a terminal as it is cannot drive that terminal."""
    text = to_json(obj)
    if not text.isprintable():  # outside strings JSON is printable ASCII: only string contents change
        text = "".join(c if c.isprintable() else _json_escape(c) for c in text)
    return text.encode("utf-8") + b"\n"


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


# --- Events (§6.2): one builder each ------------------------------------------------
# ``transfer`` is a transfer as ``transfers`` shows it (§6.1): id, direction, peer, name, file,
# bytes, size, file_bytes, file_size, seconds.

Transfer = Dict[str, Any]


def message_event(peer: str, name: str, text: str) -> Dict[str, Any]:
    return {"event": "message", "peer": peer, "name": name, "text": text}


def offer_event(transfer: Transfer, entries: int) -> Dict[str, Any]:
    return dict(transfer, event="offer", entries=entries)


def transfer_started_event(transfer: Transfer, entries: int) -> Dict[str, Any]:
    return dict(transfer, event="transfer-started", entries=entries)


def progress_event(transfer: Transfer) -> Dict[str, Any]:
    return dict(transfer, event="progress")


def file_done_event(transfer: Transfer, file: str, path: str, sha256: str, size: int) -> Dict[str, Any]:
    return dict(transfer, event="file-done", file=file, path=path, sha256=sha256, size=size)


def file_failed_event(transfer: Transfer, file: str, code: str, message: str) -> Dict[str, Any]:
    return dict(transfer, event="file-failed", file=file, code=code, message=message)


def transfer_done_event(summary: Transfer) -> Dict[str, Any]:
    return dict(summary, event="transfer-done")


def transfer_failed_event(summary: Transfer, code: str, message: str) -> Dict[str, Any]:
    return dict(summary, event="transfer-failed", code=code, message=message)


def error_event(peer: str, code: str, message: str) -> Dict[str, Any]:
    return {"event": "error", "peer": peer, "code": code, "message": message}


def dropped_event(lost: int, max_bytes: int) -> Dict[str, Any]:
    return {"event": "dropped", "code": "lagging", "lost": lost,
            "message": f"more than {max_bytes} bytes behind; {lost} events lost"}
