"""The history file: every finished transfer and message, in and out.

Holds ``History``, owner of ``STATE_DIR/history.jsonl`` (one JSON object a line,
newest last), the builders of its entries and ``history_path``. An append is one
``os.write`` of a whole line to an O_APPEND descriptor: a crash leaves at most a
half line at the end, which reading skips and the next append steps over. The
file grows to HISTORY_MAX plus a slack, then is rewritten atomically with the
newest HISTORY_MAX entries: O(1) per append, amortised.

It does I/O on that one file (and a temp file beside it) only: no sockets, no
clock (the caller passes each entry's time), never through a link. One daemon
writes a given file (``open`` takes a lock on it, and a second writer is
refused); readers may come and go.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import tempfile
from typing import IO, Any, Deque, Dict, Generator, Iterator, List, Mapping, Optional, Sequence, Tuple

from .api import encode_line
from .protocol import CodedError
from .util import DEFAULT_HISTORY_MAX, state_dir_path

log = logging.getLogger("tnet")

HISTORY_FILE = "history.jsonl"
MIN_SLACK_LINES = 100  # a rewrite every append or so would stall the loop on a small HISTORY_MAX
SLACK_FRACTION = 10  # the file may hold HISTORY_MAX + 10 %: a rewrite every thousand appends at the default
MAX_LINE_BYTES = 1024 * 1024  # newline included; a longer line is corrupt, never held in memory
MAX_TEXT_CHARS = 4096  # of a message kept: a history shows what was said, it is no archive of 64 KiB notes
MAX_ENTRY_FILES = 1000  # files listed per transfer; "files_total" counts them all
MAX_INT_DIGITS = 30  # sizes and times have under 20; a huge number in the file is corruption
READ_BYTES = 1024 * 1024  # per read when counting lines

_FILE_MODE, _DIR_MODE = 0o600, 0o700
_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK  # O_NONBLOCK: a FIFO planted there cannot block us


class HistoryError(CodedError):
    """The history file cannot be used or written."""


def history_path(env: Mapping[str, str]) -> str:
    """STATE_DIR/history.jsonl (STATE_DIR as ``util.state_dir_path`` finds it)."""
    return os.path.join(state_dir_path(env), HISTORY_FILE)


# --- Entries --------------------------------------------------------------------


def file_record(file: str, size: int, sha256: str, path: str = "") -> Dict[str, Any]:
    """One file of a transfer: ``file`` its path in the batch, ``path`` where it
    was saved (incoming) or read from (outgoing), "" when it has none."""
    return {"file": file, "path": path, "size": size, "sha256": sha256}


def transfer_entry(time: float, direction: str, peer: str, name: str, code: str, *, transfer_id: str,
                   files: Sequence[Dict[str, Any]], total_bytes: int, seconds: float) -> Dict[str, Any]:
    """A finished transfer; ``code`` is "ok" or the failure's code. At most
    MAX_ENTRY_FILES files are listed; ``files_total`` says how many there were."""
    entry = _common(time, direction, "transfer", peer, name, code)
    entry.update(id=transfer_id, files=list(files[:MAX_ENTRY_FILES]), files_total=len(files),
                 bytes=total_bytes, seconds=round(seconds, 3))
    return entry


def message_entry(time: float, direction: str, peer: str, name: str, code: str, text: str) -> Dict[str, Any]:
    """A message; its text is cut to MAX_TEXT_CHARS characters, ``truncated`` says so."""
    entry = _common(time, direction, "message", peer, name, code)
    entry.update(text=text[:MAX_TEXT_CHARS], truncated=len(text) > MAX_TEXT_CHARS)
    return entry


def _common(time: float, direction: str, kind: str, peer: str, name: str, code: str) -> Dict[str, Any]:
    if direction not in ("in", "out"):
        raise ValueError(f"direction {direction!r}: in or out")
    return {"time": round(time, 3), "direction": direction, "kind": kind, "peer": peer, "name": name, "code": code}


def encode_entry(entry: Dict[str, Any]) -> bytes:
    """One line for ``entry``; a transfer too long for MAX_LINE_BYTES lists
    fewer files until it fits. HistoryError if it still does not."""
    line = encode_line(entry)
    files = entry.get("files")
    while len(line) > MAX_LINE_BYTES and isinstance(files, list) and files:
        files = files[: len(files) // 2]
        line = encode_line(dict(entry, files=files))
    if len(line) > MAX_LINE_BYTES:
        raise HistoryError("history-entry-too-large", f"an entry is at most {MAX_LINE_BYTES} bytes")
    return line


# --- The file -------------------------------------------------------------------


class History:
    """The history file: ``open`` it, ``append`` entries, ``read`` them back
    (``read`` needs no ``open``, so a reader never creates the file)."""

    def __init__(self, path: str, max_entries: int = DEFAULT_HISTORY_MAX) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries {max_entries}: at least 1")
        self.path = os.path.abspath(path)
        self.max_entries = max_entries
        self.slack = max(MIN_SLACK_LINES, max_entries // SLACK_FRACTION)
        self._fd = -1
        self._lines = 0  # in the file, corrupt ones too: what the bound counts
        self._torn = False  # the file ends in a half line: the next append starts a new one
        self._rewrite_at = max_entries + self.slack

    def open(self) -> None:
        """Create the folder (0700) and the file (0600) if missing, count its
        lines, and rewrite it if it is over the bound (HISTORY_MAX lowered)."""
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, _DIR_MODE, exist_ok=True)
        except OSError as exc:
            raise HistoryError("history-io", f"cannot create {folder}: {exc.strerror}") from None
        self._fd = _open_file(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise HistoryError("history-locked", f"{self.path}: another tnet daemon writes its history there; "
                                                 "give each daemon its own STATE_DIR") from None
        try:
            if stat.S_IMODE(os.fstat(self._fd).st_mode) != _FILE_MODE:
                os.fchmod(self._fd, _FILE_MODE)
            self._lines = self._count_lines()
        except OSError as exc:
            self.close()
            raise HistoryError("history-io", f"cannot read {self.path}: {exc.strerror}") from None
        if self._lines > self._rewrite_at:
            self._rewrite()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def append(self, entry: Dict[str, Any]) -> None:
        """Write ``entry`` as one line. HistoryError if it cannot be; the file
        then ends in at most a half line, which the next append steps over."""
        if self._fd < 0:
            raise HistoryError("history-closed", f"{self.path} is not open")
        line = (b"\n" if self._torn else b"") + encode_entry(entry)
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            self._torn = True  # perhaps: a needless newline makes a blank line, which reading skips
            raise HistoryError("history-io", f"cannot append to {self.path}: {exc.strerror}") from None
        if written < len(line):  # a full disk: what was written is a half line
            self._torn = True
            raise HistoryError("history-io", f"cannot append to {self.path}: short write")
        self._torn = False
        self._lines += 1
        if self._lines > self._rewrite_at:
            self._rewrite()

    def read(self, limit: Optional[int] = None, peer: Optional[str] = None) -> Tuple[List[Dict[str, Any]], int]:
        """The newest ``limit`` entries (at most HISTORY_MAX), oldest first, of
        ``peer`` (a name, any case, or an exact address) if given, and the
        number of corrupt lines skipped. No file yet: no entries."""
        keep = self.max_entries if limit is None else max(0, min(limit, self.max_entries))
        found: Deque[Dict[str, Any]] = collections.deque(maxlen=keep)
        skipped = 0
        for item in self.scan():
            if item is None:
                skipped += 1
            elif peer is None or matches(item[1], peer):
                found.append(item[1])
        return list(found), skipped

    def scan(self) -> Generator[Optional[Tuple[bytes, Dict[str, Any]]], None, None]:
        """(line, entry) for each good line, oldest first, None for each
        corrupt one, one line in memory at a time, for a reader that goes a
        slice at a time (close the iterator to stop early). No file yet: none."""
        try:
            fd = _open_file(self.path, os.O_RDONLY)
        except HistoryError as exc:
            if exc.code == "history-missing":
                return
            raise
        with open(fd, "rb") as f:
            yield from _entries(f)

    def _count_lines(self) -> int:
        with open(self._fd, "rb", closefd=False) as f:
            f.seek(0)
            count = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(READ_BYTES), b""))
            end = f.tell()
        self._torn = end > 0 and os.pread(self._fd, 1, end - 1) != b"\n"
        return count + int(self._torn)

    def _rewrite(self) -> None:
        """Replace the file with its newest HISTORY_MAX entries: two passes over
        it (count, then copy), so memory stays one line whatever its size. A
        failure is logged, not raised (the entry is written): the file stays as
        it was and grows by another slack before the next try."""
        folder = os.path.dirname(self.path)
        temp_fd, temp_path = -1, ""
        try:
            with open(self._fd, "rb", closefd=False) as f:
                f.seek(0)
                total = sum(1 for item in _entries(f) if item is not None)
                f.seek(0)
                temp_fd, temp_path = tempfile.mkstemp(prefix=".history-", suffix=".tmp", dir=folder)
                kept = 0
                with open(temp_fd, "wb", closefd=False) as out:
                    for item in _entries(f):
                        if item is not None:
                            total -= 1
                            if total < self.max_entries:
                                out.write(item[0])
                                kept += 1
            os.fsync(temp_fd)
            fcntl.fcntl(temp_fd, fcntl.F_SETFL, fcntl.fcntl(temp_fd, fcntl.F_GETFL) | os.O_APPEND)
            fcntl.flock(temp_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked before anyone can open it by name
            os.replace(temp_path, self.path)
        except OSError as exc:
            if temp_fd >= 0:
                os.close(temp_fd)
                with contextlib.suppress(OSError):
                    os.unlink(temp_path)
            self._rewrite_at = self._lines + self.slack
            log.warning("cannot rewrite %s to its newest %d entries: %s", self.path, self.max_entries, exc.strerror)
            return
        os.close(self._fd)
        self._fd, self._lines, self._torn = temp_fd, kept, False
        self._rewrite_at = self.max_entries + self.slack


def _open_file(path: str, flags: int) -> int:
    """``path`` opened with ``flags``, refused unless it is a regular file (a
    link, a folder, a FIFO or a device planted there is never written to)."""
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, _FILE_MODE)
    except FileNotFoundError:
        raise HistoryError("history-missing", f"{path} does not exist") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # EMLINK: FreeBSD's answer to O_NOFOLLOW
            raise HistoryError("history-symlink", f"{path} is a symbolic link; refusing it") from None
        if exc.errno in (errno.EISDIR, errno.ENXIO):
            raise HistoryError("history-not-a-file", f"{path} is not a regular file; refusing it") from None
        raise HistoryError("history-io", f"cannot open {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HistoryError("history-not-a-file", f"{path} is not a regular file; refusing it")
    return fd


def _entries(f: IO[bytes]) -> Iterator[Optional[Tuple[bytes, Dict[str, Any]]]]:
    """(line, entry) for each good line, None for each corrupt one; blank lines
    are no entries. A line over MAX_LINE_BYTES is read past, never held."""
    while True:
        line = f.readline(MAX_LINE_BYTES)
        if not line:
            return
        if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(MAX_LINE_BYTES)
            yield None
        elif line.strip():
            try:
                entry = json.loads(line, parse_int=_parse_int)
            except (ValueError, RecursionError):  # RecursionError: a line of a million "["
                entry = None
            ok = isinstance(entry, dict)
            yield (line if line.endswith(b"\n") else line + b"\n", entry) if ok else None


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ValueError("a number too long for any field")
    return int(text)


def matches(entry: Dict[str, Any], peer: str) -> bool:
    """Whether ``entry`` is with ``peer``: its exact address, or its name in any case."""
    name = entry.get("name")
    return entry.get("peer") == peer or (isinstance(name, str) and name.casefold() == peer.casefold())
