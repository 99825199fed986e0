"""The pieces of the event loop that every connection shares.

``Conn`` is one socket in the daemon's ``selectors`` loop: its outgoing
buffer, what the selector watches for it, and its deadline. ``Timers`` is the
heap of deadlines that tells the loop how long it may block. No connection
kind lives here: local clients are in ``daemon``, peers in ``peers``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import selectors
import socket
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

if TYPE_CHECKING:
    from .daemon import Daemon

MAX_CLIENT_BUFFER_BYTES = 4 * 1024 * 1024  # a local client this far behind is dropped


class Conn:
    """A socket in the loop: its outgoing buffer and its deadline."""

    kind = "conn"

    def __init__(self, daemon: "Daemon", sock: socket.socket) -> None:
        self.daemon = daemon
        self.sock = sock
        self.out = bytearray()
        self.deadline = math.inf
        self.scheduled = math.inf  # when the timer heap will next look at us
        self.closed = False
        self.events = selectors.EVENT_READ  # what the selector watches; 0: not registered
        self.reading = True  # False once the peer half-closed and nothing more is read
        self.close_when_flushed = False
        self.max_out = MAX_CLIENT_BUFFER_BYTES

    def label(self) -> str:
        return self.kind

    def still_reading(self) -> bool:
        """After EOF: did the other end only shut its writing half? A write of
        nothing fails (EPIPE) once it has closed altogether."""
        try:
            self.sock.send(b"")
        except OSError:
            return False
        return True

    def set_deadline(self, when: float) -> None:
        self.deadline = when
        self.daemon.timers.schedule(self)

    def send(self, data: bytes) -> None:
        """Queue ``data`` and write what the socket takes now."""
        if self.queue(data):
            self.flush()

    def send_soon(self, data: bytes) -> None:
        """Queue ``data`` for when the loop next finds the socket writable:
        what one turn of the loop produces (a line per small file of a batch)
        then leaves in one write instead of one write each."""
        if self.queue(data):
            self.want_write(True)

    def queue(self, data: bytes) -> bool:
        """Add ``data`` to the outgoing buffer; False if closed or now dropped."""
        if self.closed:
            return False
        self.out += data
        if len(self.out) > self.max_out:
            self.on_overflow()
            return False
        return True

    def flush(self) -> None:
        try:
            while self.out:
                sent = self.sock.send(self.out)
                del self.out[:sent]
                self.on_progress_out(sent)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self.fail_io(exc)
            return
        if self.close_when_flushed and not self.out:
            self.close()
            return
        self.want_write(bool(self.out) or self.wants_more_output())

    def want_write(self, wanted: bool) -> None:
        events = (selectors.EVENT_READ if self.reading else 0) | (selectors.EVENT_WRITE if wanted else 0)
        if events == self.events or self.closed:
            return
        if not events:
            self.daemon.sel.unregister(self.sock)
        elif not self.events:
            self.daemon.sel.register(self.sock, events, self)
        else:
            self.daemon.sel.modify(self.sock, events, self)
        self.events = events

    def wants_more_output(self) -> bool:
        return False

    def on_progress_out(self, sent: int) -> None:
        pass

    def on_writable(self) -> None:
        self.flush()

    def on_overflow(self) -> None:
        self.close()

    def fail_io(self, exc: OSError) -> None:
        self.close()

    def on_deadline(self) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.events:
            self.daemon.sel.unregister(self.sock)
        self.sock.close()
        self.on_closed()

    def on_closed(self) -> None:
        pass


class Timers:
    """A heap of deadlines. Each connection has at most one live entry; a
    deadline that moved later is re-filed when its old entry comes up."""

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int, Any]] = []
        self._seq = itertools.count()

    def schedule(self, item: Any) -> None:
        if item.deadline < item.scheduled:
            item.scheduled = item.deadline
            heapq.heappush(self._heap, (item.deadline, next(self._seq), item))

    def next_wait(self, now: float) -> Optional[float]:
        """Seconds until the nearest deadline, or None: block until I/O."""
        while self._heap and (self._heap[0][2].closed or self._heap[0][0] != self._heap[0][2].scheduled):
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return max(self._heap[0][0] - now, 0.0)

    def pop_due(self, now: float) -> List[Any]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            when, _, item = heapq.heappop(self._heap)
            if item.closed or when != item.scheduled:
                continue
            item.scheduled = math.inf
            if item.deadline <= now:
                due.append(item)
            else:
                self.schedule(item)
        return due
