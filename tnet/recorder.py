"""The daemon's side of the history file: what feeds it, and the ``history`` request.

``Recorder`` turns what the daemon publishes into history entries: its
``publish`` wraps the events socket's (§6.2) and sees every event on the
way. An incoming message is recorded when it is published; a transfer, in
either direction, when its ``transfer-done`` or ``transfer-failed`` is,
with the files collected until then: an incoming one's from its
``file-done`` events (saved path, size, SHA-256), an outgoing one's from the
``file-done`` lines of the send request (``on_send_line``: name and size),
or from the sending side itself (``record_outgoing_files``), which then
takes precedence. An outgoing message is recorded when its request has its
final answer (``outgoing_message``).

``HistoryJob`` answers a ``history`` request (§6.1), reading the file a
slice per turn of the loop, so that a long history costs other clients
nothing, and keeping only the newest entries that fit in one answer.

Memory stays bounded: at most MAX_ENTRY_FILES files per transfer, at most
MAX_CONNECTIONS transfers in flight (the oldest forgotten first). A history
that cannot be written is logged, never fatal to a transfer or message.
Knows the history file, the loop and the fields of the events; nothing of
peers or sockets.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Generator, List, Optional, Sequence, Tuple

from .history import MAX_ENTRY_FILES, History, HistoryError, file_record, matches, message_entry, transfer_entry
from .loop import Loop

log = logging.getLogger("tnet")

Event = Dict[str, Any]
MAX_ANSWER_BYTES = 2 * 1024 * 1024  # of entries in one answer: half a local client's buffer, never overflowing it
LINES_PER_TURN = 2000  # history lines read per turn of the loop; other clients and transfers go on meanwhile
BYTES_PER_TURN = 1024 * 1024  # and at most about this many bytes of them


@dataclass
class InFlight:
    """The files of one transfer seen so far: the first MAX_ENTRY_FILES, and a count of all."""

    files: List[Dict[str, Any]] = field(default_factory=list)
    count: int = 0
    from_sender: bool = False  # given by record_outgoing_files: the request's lines are not needed

    def add(self, record: Dict[str, Any]) -> None:
        self.count += 1
        if len(self.files) < MAX_ENTRY_FILES:
            self.files.append(record)


class Recorder:
    """Feeds ``history`` from the events the daemon publishes (through
    ``publish``, which passes each on to ``forward``) and from the answers
    to local requests; ``wall`` gives each entry its time (epoch seconds)."""

    def __init__(self, history: History, forward: Callable[[Event], None], max_in_flight: int,
                 wall: Callable[[], float] = time.time) -> None:
        self.history = history
        self.forward = forward
        self.max_in_flight = max(max_in_flight, 1)
        self.wall = wall
        self.in_flight: Dict[Tuple[str, str], InFlight] = {}  # by (direction, transfer id), oldest first
        self.failing = False  # the last append failed: said once, until one works again

    def open(self) -> None:
        """Open the history file (HistoryError if it cannot be)."""
        self.history.open()

    def close(self) -> None:
        self.history.close()

    # -- what feeds it

    def publish(self, event: Event) -> None:
        """Publish ``event`` (``forward``), then record what it finishes."""
        self.forward(event)
        kind = event.get("event")
        if kind == "message":
            self.append(message_entry(self.wall(), "in", str(event.get("peer", "")), str(event.get("name", "")),
                                      "ok", str(event.get("text", ""))))
        elif kind == "file-done" and event.get("direction") == "in":
            record = file_record(str(event.get("file", "")), int(event.get("size") or 0),
                                 str(event.get("sha256", "")), str(event.get("path", "")))
            self.transfer("in", str(event.get("id", ""))).add(record)
        elif kind in ("transfer-done", "transfer-failed") and event.get("direction") in ("in", "out"):
            self.finish_transfer(event)

    def on_send_line(self, line: Event) -> None:
        """A line of a ``send`` request's answer: its ``file-done`` lines name
        the files of an outgoing transfer (folders aside)."""
        if line.get("event") == "file-done" and line.get("id") and not line.get("folder"):
            flight = self.transfer("out", str(line["id"]))
            if not flight.from_sender:
                flight.add(file_record(str(line.get("file", "")), int(line.get("size") or 0), ""))

    def record_outgoing_files(self, transfer_id: str, files: Sequence[Dict[str, Any]]) -> None:
        """The sending side's own records of files of outgoing transfer
        ``transfer_id`` (``history.file_record``: with the path read from and
        the SHA-256 sent), before its transfer-done or transfer-failed is
        published; may be called once per file or once for all. They replace
        what the send request's lines said."""
        flight = self.transfer("out", transfer_id)
        if not flight.from_sender:
            flight.files, flight.count, flight.from_sender = [], 0, True
        for record in files:
            flight.add(record)

    def outgoing_message(self, peer: str, text: str) -> "OutgoingMessage":
        """A message about to go to ``peer`` (as the user named it); its
        ``on_answer`` records it once the request's final answer is known."""
        return OutgoingMessage(self, peer, text)

    # -- entries

    def transfer(self, direction: str, transfer_id: str) -> InFlight:
        key = (direction, transfer_id)
        flight = self.in_flight.get(key)
        if flight is None:
            flight = self.in_flight[key] = InFlight()
            if len(self.in_flight) > self.max_in_flight:  # a transfer whose end we never saw: forgotten
                del self.in_flight[next(iter(self.in_flight))]
        return flight

    def finish_transfer(self, event: Event) -> None:
        direction, transfer_id = str(event["direction"]), str(event.get("id", ""))
        flight = self.in_flight.pop((direction, transfer_id), None)
        code = "ok" if event["event"] == "transfer-done" else str(event.get("code") or "error")
        entry = transfer_entry(self.wall(), direction, str(event.get("peer", "")), str(event.get("name") or ""),
                               code, transfer_id=transfer_id, files=flight.files if flight else [],
                               total_bytes=int(event.get("bytes") or 0), seconds=float(event.get("seconds") or 0))
        if flight is not None:
            entry["files_total"] = flight.count
        elif isinstance(event.get("files"), int):
            entry["files_total"] = event["files"]  # no file seen: the count the event gives
        self.append(entry)

    def append(self, entry: Dict[str, Any]) -> None:
        try:
            self.history.append(entry)
        except HistoryError as exc:
            if not self.failing:
                log.error("history: %s; entries are lost until it can be written again", exc)
            self.failing = True
            return
        if self.failing:
            log.info("history: %s is written again", self.history.path)
            self.failing = False


class OutgoingMessage:
    """A message of ours on its way: recorded with the request's final answer."""

    def __init__(self, recorder: Recorder, peer: str, text: str) -> None:
        self.recorder, self.peer, self.text = recorder, peer, text
        self.address = ""  # once the peer's name is resolved
        self.recorded = False

    def on_answer(self, line: Event) -> None:
        """A line of the request's answer; the final one carries ``ok``."""
        if "ok" not in line or self.recorded:
            return
        self.recorded = True
        if line["ok"]:
            address, name, code = str(line.get("peer", "")), str(line.get("name", "")), "ok"
        else:
            address, name, code = self.address, "", str(line.get("code") or "error")
            if not address and is_address(self.peer):
                address = self.peer
            elif not is_address(self.peer):
                name = self.peer  # as the user named it: no peer answered with its own
        self.recorder.append(message_entry(self.recorder.wall(), "out", address, name, code, self.text))


def is_address(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


class HistoryJob:
    """A ``history`` request: the file read a slice per turn; the newest
    ``limit`` entries of ``peer`` that fit in MAX_ANSWER_BYTES go in the
    answer, and ``omitted`` counts those that did not fit."""

    def __init__(self, loop: Loop, client: Any, history: History, limit: Optional[int], peer: Optional[str]) -> None:
        self.loop, self.client, self.peer = loop, client, peer
        self.keep = history.max_entries if limit is None else max(0, min(limit, history.max_entries))
        self.lines: Generator[Optional[Tuple[bytes, Dict[str, Any]]], None, None] = history.scan()
        self.found: Deque[Tuple[int, Dict[str, Any]]] = collections.deque()  # (line bytes, entry)
        self.found_bytes = 0
        self.matched = 0
        self.skipped = 0
        self.closed = False

    def start(self) -> None:
        self.client.job = self  # a client that goes away stops the reading
        self.loop.each_turn(self, self.step)

    def label(self) -> str:
        return "history"

    def step(self) -> None:
        budget = BYTES_PER_TURN
        try:
            for _ in range(LINES_PER_TURN):
                try:
                    item = next(self.lines)
                except StopIteration:
                    self.answer()
                    return
                if item is None:
                    self.skipped += 1
                    continue
                line, entry = item
                budget -= len(line)
                if self.peer is None or matches(entry, self.peer):
                    self.take(len(line), entry)
                if budget <= 0:
                    return
        except HistoryError as exc:
            self.close()
            self.client.fail(exc.code, exc.message)
        except OSError as exc:
            self.close()
            self.client.fail("history-io", f"cannot read the history: {exc.strerror}")

    def take(self, size: int, entry: Dict[str, Any]) -> None:
        self.matched += 1
        self.found.append((size, entry))
        self.found_bytes += size
        while self.found and (len(self.found) > self.keep or self.found_bytes > MAX_ANSWER_BYTES):
            self.found_bytes -= self.found.popleft()[0]

    def answer(self) -> None:
        self.close()
        entries = [entry for _, entry in self.found]
        self.client.finish({"entries": entries, "skipped": self.skipped,
                            "omitted": min(self.matched, self.keep) - len(entries)})

    def cancel(self, code: str, message: str) -> None:
        self.close()  # the client is gone: nothing to tell

    def on_internal_error(self) -> None:
        self.close()
        if not self.client.closed:
            self.client.fail("internal-error", "internal error while reading the history; see the daemon log")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.done(self)
            self.lines.close()  # its file is closed now, not whenever it is collected
            if self.client.job is self:
                self.client.job = None
