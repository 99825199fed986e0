"""The event loop and what every connection in it shares.

``Loop`` is the daemon's one thread: a ``selectors`` selector, the heap of
deadlines (``Timers``) that says how long it may block, work done a slice
per turn (copies, walks of folders to send), the wake-up descriptor that
signals write to, and the guarded dispatch: a callback that raises costs
the connection involved, never the daemon. ``Conn`` is one socket in it:
its outgoing buffer, what the selector watches for it, its deadline.
``Listener`` is a listening socket that rests when descriptors run out.

No connection kind lives here, and nothing here knows the protocols: the
kinds are in ``clients`` (local) and ``peers``, ``inbound``, ``outbound``.
Everything is handed the loop, never the daemon.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import selectors
import signal
import socket
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

log = logging.getLogger("tnet")

MAX_CLIENT_BUFFER_BYTES = 4 * 1024 * 1024  # a local client this far behind is dropped
# The longest the loop blocks with nothing due: a deadline of 10**20 s, or an
# absurd configuration, then still sees the loop come round.
MAX_WAIT_S = 24 * 3600.0


class Timed(Protocol):
    """What the timer heap needs of an item."""

    deadline: float  #: absolute, on the loop's clock; math.inf: none
    scheduled: float  #: when the heap will next look at it (kept by Timers)
    closed: bool  #: a closed item is dropped from the heap

    def on_deadline(self) -> None: ...

    def label(self) -> str: ...


class Handler(Protocol):
    """What the selector and the guard need of a registered item."""

    closed: bool

    def on_readable(self) -> None: ...

    def on_writable(self) -> None: ...

    def label(self) -> str: ...

    def on_internal_error(self) -> None:
        """A callback of ours raised: drop what is involved, say so."""


class Timers:
    """A heap of deadlines. Each item has at most one live entry; a deadline
    that moved later is filed again when its old entry comes up."""

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int, Any]] = []
        self._seq = itertools.count()

    def schedule(self, item: Timed) -> None:
        if item.deadline < item.scheduled:
            item.scheduled = item.deadline
            heapq.heappush(self._heap, (item.deadline, next(self._seq), item))

    def next_wait(self, now: float) -> Optional[float]:
        """Seconds until the nearest deadline, or None: block until I/O."""
        while self._heap and (self._heap[0][2].closed or self._heap[0][0] != self._heap[0][2].scheduled):
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return min(max(self._heap[0][0] - now, 0.0), MAX_WAIT_S)

    def pop_due(self, now: float) -> List[Timed]:
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


class Loop:
    """The selector, the timers, the slices of work, signals; one turn at a time.

    Methods for the parts: ``register``/``modify``/``unregister`` (sockets),
    ``schedule`` (an item whose deadline changed), ``each_turn``/``done``
    (a step to call once per turn until it is done), ``guarded`` (run a
    callback behind the last-resort guard). For the owner: ``run`` until
    SIGINT or SIGTERM, ``run_once``.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.sel = selectors.DefaultSelector()
        self.timers = Timers()
        self.turn_work: Dict[Any, Callable[[], None]] = {}  # owner -> its step, called once per turn
        self.stopping = False

    def register(self, sock: socket.socket, events: int, handler: Handler) -> None:
        self.sel.register(sock, events, handler)

    def modify(self, sock: socket.socket, events: int, handler: Handler) -> None:
        self.sel.modify(sock, events, handler)

    def unregister(self, sock: socket.socket) -> None:
        self.sel.unregister(sock)

    def schedule(self, item: Timed) -> None:
        self.timers.schedule(item)

    def each_turn(self, owner: Any, step: Callable[[], None]) -> None:
        """Call ``step`` once per turn of the loop, between the sockets, until ``done(owner)``."""
        self.turn_work[owner] = step

    def done(self, owner: Any) -> None:
        self.turn_work.pop(owner, None)

    def handlers(self) -> List[Any]:
        return [key.data for key in self.sel.get_map().values()]

    def run(self) -> None:
        """Turn until SIGINT or SIGTERM; a signal wakes the loop through a socket pair."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        waker = Listener(self, wake_r, lambda: drain(wake_r))
        self.register(wake_r, selectors.EVENT_READ, waker)
        old_fd = signal.set_wakeup_fd(wake_w.fileno())
        previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self.stopping:
                self.run_once()
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.unregister(wake_r)
            wake_r.close()
            wake_w.close()

    def on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def run_once(self, at_most: Optional[float] = None) -> None:
        """One turn: wait for I/O until the nearest deadline (or ``at_most``
        seconds), then the callbacks, the deadlines due, one slice of each
        piece of work. While work is due it does not wait at all."""
        wait = 0.0 if self.turn_work else self.timers.next_wait(self.clock())
        if at_most is not None:
            wait = at_most if wait is None else min(wait, at_most)
        for key, mask in self.sel.select(wait):
            item = key.data
            if mask & selectors.EVENT_READ and not item.closed:
                self.guarded(item, item.on_readable)
            if mask & selectors.EVENT_WRITE and not item.closed:
                self.guarded(item, item.on_writable)
        for item in self.timers.pop_due(self.clock()):
            self.guarded(item, item.on_deadline)
        for owner, step in list(self.turn_work.items()):
            self.guarded(owner, step)

    def guarded(self, item: Any, callback: Callable[[], None]) -> None:
        """Run one callback; a bug costs the item involved, not the daemon."""
        try:
            callback()
        except Exception:
            log.exception("internal error on %s; dropping it", item.label())
            try:
                item.on_internal_error()
            except Exception:
                log.exception("and again while dropping it")

    def close(self) -> None:
        self.sel.close()


def drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


class Conn:
    """A socket in the loop: its outgoing buffer and its deadline.

    Hooks for the kinds: ``on_readable``, ``on_writable`` (flushes),
    ``on_deadline``, ``on_overflow`` (more than ``max_out`` queued),
    ``on_io_error`` (a write failed), ``on_progress_out`` (bytes went out),
    ``wants_more_output``, ``on_closed``.
    """

    kind = "conn"

    def __init__(self, loop: Loop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.out = bytearray()
        self.deadline = math.inf
        self.scheduled = math.inf  # when the timer heap will next look at us
        self.closed = False
        self.events = 0  # what the selector watches; 0: not registered (``watch`` registers it)
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

    def watch(self) -> None:
        """Register with the loop, for reading."""
        self.want_write(False)

    def set_deadline(self, when: float) -> None:
        self.deadline = when
        self.loop.schedule(self)

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
            self.on_io_error(exc)
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
            self.loop.unregister(self.sock)
        elif not self.events:
            self.loop.register(self.sock, events, self)
        else:
            self.loop.modify(self.sock, events, self)
        self.events = events

    def wants_more_output(self) -> bool:
        return False

    def on_progress_out(self, sent: int) -> None:
        pass

    def on_readable(self) -> None:
        pass

    def on_writable(self) -> None:
        self.flush()

    def on_overflow(self) -> None:
        self.close()

    def on_io_error(self, exc: OSError) -> None:
        self.close()

    def on_deadline(self) -> None:
        self.close()

    def on_internal_error(self) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.events:
            self.loop.unregister(self.sock)
        self.sock.close()
        self.on_closed()

    def on_closed(self) -> None:
        pass


class Listener:
    """A listening socket; ``on_readable`` accepts. Out of descriptors, a
    readable listener we cannot accept from would wake the loop at once,
    forever: ``pause`` stops listening for a while instead."""

    def __init__(self, loop: Loop, sock: socket.socket, on_readable: Callable[[], None]) -> None:
        self.loop = loop
        self.sock = sock
        self.on_readable = on_readable
        self.closed = False
        self.deadline = math.inf  # while paused: when to listen again
        self.scheduled = math.inf
        self.registered = False

    def listen(self) -> None:
        self.loop.register(self.sock, selectors.EVENT_READ, self)
        self.registered = True

    def pause(self, until: float) -> None:
        if self.registered:
            self.loop.unregister(self.sock)
            self.registered = False
            self.deadline = until
            self.loop.schedule(self)

    def on_deadline(self) -> None:
        self.deadline = math.inf
        if not self.closed:
            self.listen()

    def on_writable(self) -> None:
        pass

    def on_internal_error(self) -> None:
        pass  # a listener keeps listening: the connection it made is dropped by its own guard

    def label(self) -> str:
        return "listener"

    def close(self) -> None:
        if self.registered:
            self.loop.unregister(self.sock)
            self.registered = False
        self.closed = True
        self.sock.close()
