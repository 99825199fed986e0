"""Local clients: the command socket's connections and the events socket's.

``ClientConn`` is one connection to the command socket: it reads one JSON
request at a time (§6.1) and hands it to the daemon's dispatcher, then
carries the answers; a client that goes away cancels the job it waits on.
``Events`` is the events socket's side (§6.2): its ``Subscriber``s and
``publish``, which never lets a slow reader slow the daemon.

Knows the local API (``api``) and the loop; nothing of peers or files.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable, Dict, Optional, Set

from . import api
from .loop import Conn, Loop
from .protocol import LocalProtocolError, RemoteProtocolError

log = logging.getLogger("tnet")

MAX_SUBSCRIBER_BUFFER_BYTES = 1024 * 1024  # a subscriber this far behind is dropped
LAGGING_GRACE_S = 10.0  # for a dropped subscriber to read the line in flight and its last word
HALF_CLOSED_PROBE_S = 2.0  # how often a busy half-closed client is checked for being gone
CLIENT_DISCARD_S = 5.0  # a client whose request was refused may finish writing it within this
CLIENT_RECV_BYTES = 65536
SUBSCRIBER_RECV_BYTES = 4096  # what a subscriber writes is read only to be dropped

# The daemon's dispatcher: runs one request; LocalProtocolError is its refusal.
Dispatch = Callable[["ClientConn", api.Request], None]


class ClientConn(Conn):
    """A local client of the command socket: one JSON request at a time (§6.1)."""

    kind = "client"

    def __init__(self, loop: Loop, sock: socket.socket, dispatch: Dispatch) -> None:
        super().__init__(loop, sock)
        self.dispatch = dispatch
        self.decoder = api.LineDecoder()
        self.busy = False  # a request is being answered
        self.job: Any = None  # the walk or exchange it waits on: has ``closed`` and ``cancel``
        self.discarding = False  # its line was refused: read and drop the rest, then close
        # Shown each line of the answer, the final one too (the history's witness of a send or message);
        # a client gone before its final answer shows one saying it was cancelled.
        self.observer: Optional[Callable[[Dict[str, Any]], None]] = None

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(CLIENT_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if self.discarding and data:
            return
        if not data:
            self.on_eof()
            return
        try:
            lines = self.decoder.feed(data)
        except RemoteProtocolError as exc:
            # Answered now, but read to its end: a client still writing would get
            # a broken pipe instead of the answer if we closed at once.
            log.warning("command client dropped: %s", exc)
            self.fail(exc.code, exc.message)
            self.discarding = True
            self.set_deadline(self.loop.clock() + CLIENT_DISCARD_S)
            return
        for line in lines:
            self.take(line)

    def on_eof(self) -> None:
        # A half-close (socat and nc do it at the end of their input) still
        # wants its answer. A client gone altogether (Ctrl-C) fails even a
        # write of nothing: cancel its job now, not at a next write that a
        # stalled transfer may never make.
        if self.busy and not self.still_reading():
            self.close()
            return
        self.reading = False
        if self.busy:
            self.want_write(bool(self.out))
            self.set_deadline(self.loop.clock() + HALF_CLOSED_PROBE_S)
        else:
            self.close_after_flush()

    def take(self, line: bytes) -> None:
        if self.busy:  # answered, but the request in flight goes on untouched
            self.send(api.encode_line({"ok": False, "code": "busy", "error": "one request at a time on a connection"}))
            return
        try:
            request = api.decode_request(line)
        except RemoteProtocolError as exc:
            self.fail(exc.code, exc.message)
            return
        self.busy = True
        try:
            self.dispatch(self, request)
        except LocalProtocolError as exc:
            self.fail(exc.code, exc.message)

    def reply(self, obj: Dict[str, Any]) -> None:
        """An intermediate line (a file done, progress); the request goes on."""
        if self.observer is not None:
            self.observer(obj)
        self.send_soon(api.encode_line(obj))

    def finish(self, obj: Dict[str, Any]) -> None:
        """The final line of the request."""
        self.end_request(dict(obj, ok=True))

    def fail(self, code: str, message: str, **extra: Any) -> None:
        self.end_request(dict(extra, ok=False, code=code, error=message))

    def end_request(self, answer: Dict[str, Any]) -> None:
        observer, self.observer = self.observer, None
        if observer is not None:
            observer(answer)
        self.busy = False
        self.job = None
        self.send(api.encode_line(answer))
        if not self.reading:
            self.close_after_flush()

    def close_after_flush(self) -> None:
        self.close_when_flushed = True
        self.flush()

    def on_deadline(self) -> None:
        """A busy client that half-closed: is it still there to read its answer?"""
        if self.discarding or not self.still_reading():
            self.close()  # and its job is cancelled
        elif self.busy:
            self.set_deadline(self.loop.clock() + HALF_CLOSED_PROBE_S)

    def on_overflow(self) -> None:
        log.warning("command client dropped: more than %d bytes behind", self.max_out)
        self.close()

    def on_closed(self) -> None:
        job, self.job = self.job, None
        if job is not None:
            # The one who asked is gone (Ctrl-C): nobody wants this transfer. (A job that is over ignores it.)
            job.cancel("cancelled", "the local client disconnected")
        observer, self.observer = self.observer, None
        if observer is not None and self.busy:
            observer({"ok": False, "code": "cancelled", "error": "the local client disconnected"})


class Subscriber(Conn):
    """A local client of the events socket: it reads, we write. One that
    falls more than MAX_SUBSCRIBER_BUFFER_BYTES behind gets a last event
    saying how many it lost, and is dropped (§6.2)."""

    kind = "subscriber"

    def __init__(self, loop: Loop, sock: socket.socket, hub: "Events") -> None:
        super().__init__(loop, sock)
        self.hub = hub
        self.max_out = MAX_SUBSCRIBER_BUFFER_BYTES
        self.lagging = False  # it fell behind and is being dropped
        self.lost = 0  # events it did not get
        self.told = False  # its last word is queued

    def deliver(self, line: bytes) -> None:
        if len(self.out) + len(line) > self.max_out:
            self.drop_for_lagging()
        else:
            self.send_soon(line)

    def drop_for_lagging(self) -> None:
        """Keep the line being written, if any; what follows it goes unsent
        and is counted; the last word says so."""
        newline = self.out.find(b"\n")
        unsent = self.out[newline + 1:] if newline >= 0 else self.out[:]
        self.lagging = True
        self.lost = unsent.count(b"\n") + 1
        del self.out[len(self.out) - len(unsent):]
        log.warning("events subscriber dropped: more than %d bytes behind", self.max_out)
        self.hub.subscribers.discard(self)  # no more events: only its last word, then it is closed
        self.close_when_flushed = True
        self.set_deadline(self.loop.clock() + LAGGING_GRACE_S)
        self.want_write(True)

    def flush(self) -> None:
        if self.lagging and not self.told:
            self.told = True  # after the line in flight, the last word
            self.out += api.encode_line(api.dropped_event(self.lost, self.max_out))
        super().flush()

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(SUBSCRIBER_RECV_BYTES)  # what a subscriber writes is ignored (§6.2)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # gone, or only done writing (`socat - ... < /dev/null`)
            if self.still_reading():
                self.reading = False
                self.want_write(bool(self.out) or self.lagging)
            else:
                self.close()

    def on_overflow(self) -> None:
        self.drop_for_lagging()

    def on_closed(self) -> None:
        self.hub.subscribers.discard(self)


class Events:
    """The events socket's subscribers, and ``publish`` to all of them."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.subscribers: Set[Subscriber] = set()

    def subscribe(self, sock: socket.socket) -> Subscriber:
        subscriber = Subscriber(self.loop, sock, self)
        self.subscribers.add(subscriber)
        return subscriber

    def publish(self, event: Dict[str, Any]) -> None:
        if not self.subscribers:
            return
        line = api.encode_line(event)
        for subscriber in list(self.subscribers):
            subscriber.deliver(line)

    def flush_all(self) -> None:
        """At shutdown: what each subscriber has queued goes, if the socket takes it now."""
        for subscriber in list(self.subscribers):
            self.loop.guarded(subscriber, subscriber.flush)
            subscriber.close()
