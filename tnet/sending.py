"""A send request from its walk to its last answer, across dropped links (§7).

``SendJob`` walks the request's folders a slice per turn of the loop, finds
the peer, and offers the batch. When the link breaks (the peer gone, silent,
unreachable, restarting), it tries again after a backoff, for up to the
request's ``retry_for`` seconds since the batch last moved (once a first
attempt got through: a peer never reached fails at once): each attempt
offers only the entries not saved yet, under the same batch id (so that the
receiver puts them in the same top folders), and each file the receiver
kept part of is resumed from there. A receiver that speaks only version 1
is offered the batch again in version 1, without resume. The local client
sees one transfer: one id, one final answer, a ``retrying`` line per new
attempt; between two attempts the send itself is the open transfer of that
id, listed and cancellable.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional

from . import api
from . import protocol as proto
from .discovery import Discovery
from .outbound import Client, OutboundPeer
from .peers import PeerContext
from .walk import Walk

log = logging.getLogger("tnet")

# A transfer that fails thus is tried again: the link, not the files, was the trouble.
RETRY_CODES = {"peer-gone", "timeout", "io-error", "unreachable", "truncated", "shutdown", "busy"}
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # before the second, third ... attempt; then the last, again
SAVED, FAILED = 1, 2  # how the receiver answered an entry; 0 while it has not
DEFAULT_RETRY_FOR_S = 120.0


class SendJob:
    """One `send` request; the client of each of its attempts (an OutboundPeer)."""

    def __init__(self, ctx: PeerContext, discovery: Discovery, client: Client, walk: Walk, peer: str,
                 retry_for: float) -> None:
        self.ctx, self.discovery, self.client, self.walk, self.peer = ctx, discovery, client, walk, peer
        self.retry_for = retry_for
        self.closed = False
        self.deadline = math.inf  # of the backoff before the next attempt
        self.scheduled = math.inf
        self.job: Any = None  # what an attempt sets on its client; the job itself is the attempt
        self.address = ""
        self.peer_name = ""  # as the receiver's daemon said it, once one attempt heard it
        self.batch = os.urandom(16).hex()
        self.version = proto.VERSION
        self.id = ""
        self.answered_entries = bytearray()  # per entry of the batch: SAVED or FAILED once the receiver answered it
        self.failures: List[tuple] = []  # (code, message) of entries that failed for good
        self.attempt: Optional[OutboundPeer] = None
        self.between_attempts = False  # one broke and the next has not started: no attempt is there to tell the end
        self.last_order: List[int] = []
        self.attempts = 0
        self.failed_in_a_row = 0  # attempts that broke since the batch last moved: the backoff grows with them
        self.resumed_bytes = 0
        self.started = ctx.loop.clock()
        self.streak_since = math.inf  # when the link first broke since the batch last moved
        self.answered = False  # the client has its final answer, or is gone
        self.reached = False  # a daemon answered once: a link that breaks later is worth waiting for

    def label(self) -> str:
        return "send"

    # -- walking, then the first attempt

    def step(self) -> None:
        try:
            done = self.walk.step()
        except proto.LocalProtocolError as exc:
            if self.end():
                self.client.fail(exc.code, exc.message)
            return
        if done:
            self.ctx.loop.done(self)
            self.report_skipped()
            self.answered_entries = bytearray(len(self.walk.entries))
            self.resolve()

    def resolve(self) -> None:
        """Find the peer, then the first attempt. A hook: a LocalSend device may be found instead (lssend)."""
        self.discovery.resolve(self.peer, self.first_attempt, self.fail_for_good)

    def report_skipped(self) -> None:
        walk = self.walk
        for path in walk.skipped:
            self.client.reply({"event": "skipped", "path": path,
                               "reason": "not a regular file or folder (links are never followed)"})
        unshown = walk.skipped_count - len(walk.skipped)
        if unshown:
            self.client.reply({"event": "skipped", "path": "", "reason": f"and {unshown} more not shown"})

    def first_attempt(self, address: str) -> None:
        self.address = address
        self.id = self.ctx.new_transfer_id()
        entries = self.walk.entries
        self.client.reply({"event": "started", "id": self.id, "peer": address, "files": len(entries),
                           "bytes": entries.total})
        self.start_attempt()

    def start_attempt(self) -> None:
        if self.client.closed or self.answered:
            return
        registry = self.ctx.registry
        if len(registry.connections) >= self.ctx.config.max_connections:
            self.fail("busy", f"{len(registry.connections)} connections open (MAX_CONNECTIONS)")
            return
        entries = self.walk.entries
        order = [i for i, done in enumerate(self.answered_entries) if not done]
        if self.attempts:  # what the receiver has already, it does not get again
            self.resumed_bytes += sum(entries.size(i) for i in self.last_order if self.answered_entries[i] == SAVED)
        self.last_order = order
        first = proto.Offer(self.ctx.config.host_name, len(order), sum(entries.size(i) for i in order),
                            self.batch if self.version >= 2 else "")
        try:
            conn = OutboundPeer(self.ctx, self.address, first, self, entries, order, self.version, self.id)
        except OSError as exc:  # no socket to be had (EMFILE)
            self.fail("io-error", f"cannot open a connection: {exc.strerror}")
            return
        self.attempt, self.between_attempts = conn, False
        self.attempts += 1
        conn.connect(self.ctx.config.receive_port)

    # -- what an attempt says (we are its client)

    def reply(self, obj: Dict[str, Any]) -> None:
        index = obj.pop("index", None)
        if index is not None:
            self.streak_since = math.inf  # the batch moved
            self.answered_entries[index] = SAVED
            if obj.get("event") == "file-failed":
                self.answered_entries[index] = FAILED
                self.failures.append((obj["code"], obj["error"]))
        self.client.reply(obj)

    def finish(self, summary: Dict[str, Any]) -> None:
        self.take_resumed()
        if self.failures:  # files an earlier attempt had answered as failed
            self.fail_with_failures(summary)
        elif self.end():
            self.client.finish(self.summary(summary))

    def fail_with_failures(self, summary: Dict[str, Any]) -> None:
        code, message = self.failures[0]
        if self.end():
            self.client.fail(code, f"{len(self.failures)} of {len(self.walk.entries)} failed; first: {message}",
                             **self.summary(summary))

    def fail(self, code: str, message: str, **extra: Any) -> None:
        if self.waiting():  # `tnet cancel` between two attempts
            self.fail_for_good(code, message)
            return
        moved = self.take_resumed()
        if extra and self.failures:  # the attempt reached its end, with files that failed: for good
            self.fail_with_failures(extra)
        elif extra:
            self.fail_for_good(code, message)
        elif code == "unsupported-version" and self.version > proto.MIN_VERSION:
            log.info("%s speaks wire protocol version %d only: sending again without resume", self.address,
                     proto.MIN_VERSION)
            self.version = proto.MIN_VERSION
            self.start_attempt()
        elif self.may_retry(code, moved):
            self.retry_later(code, message)
        else:
            self.fail_for_good(code, message)

    def fail_for_good(self, code: str, message: str) -> None:
        if self.between_attempts and not self.answered:
            self.ended_between_attempts(code, message)
        if self.end():
            self.client.fail(code, message)

    def take_resumed(self) -> bool:
        """Count what the attempt resumed; whether it moved bytes of its own."""
        attempt = self.attempt
        if attempt is None:
            return False
        self.reached = self.reached or attempt.exchange.heard
        resumed, attempt.sender.resumed_bytes = attempt.sender.resumed_bytes, 0
        self.resumed_bytes += resumed
        return attempt.bytes_moved > resumed

    def may_retry(self, code: str, moved: bool) -> bool:
        now = self.ctx.loop.clock()
        if moved:
            self.streak_since = math.inf  # it moved before it broke
        if self.streak_since == math.inf:
            self.streak_since, self.failed_in_a_row = now, 0
        self.failed_in_a_row += 1
        # A peer never reached is no lost link: nobody there, or a typo; say so at once.
        return (self.reached and code in RETRY_CODES and now - self.streak_since < self.retry_for
                and not self.client.closed)

    def retry_later(self, code: str, message: str) -> None:
        wait = BACKOFF_S[min(self.failed_in_a_row - 1, len(BACKOFF_S) - 1)]
        if self.attempt is not None:
            self.peer_name = self.attempt.peer_name or self.peer_name
        self.attempt, self.between_attempts = None, True
        self.ctx.registry.transfers[self.id] = self  # listed and cancellable until the next attempt takes the id
        self.client.reply({"event": "retrying", "id": self.id, "attempt": self.attempts + 1, "code": code,
                           "error": message, "in": wait})
        self.deadline = self.ctx.loop.clock() + wait
        self.ctx.loop.schedule(self)

    def on_deadline(self) -> None:
        self.deadline = math.inf
        self.ctx.registry.forget(self)
        self.start_attempt()

    def waiting(self) -> bool:
        """Between two attempts: the backoff runs."""
        return self.deadline < math.inf and not self.answered

    def ended_between_attempts(self, code: str, message: str) -> None:
        """No attempt runs to say it (cancelled in the backoff, or the next one
        could not start): the send says it ended."""
        self.ctx.publish(api.transfer_failed_event(self.describe(), code, message))

    def describe(self) -> Dict[str, Any]:
        """What `tnet transfers` shows of the send between two attempts (§6.1):
        the files the receiver saved so far, nothing in flight."""
        entries = self.walk.entries
        saved = sum(entries.size(i) for i, answer in enumerate(self.answered_entries) if answer == SAVED)
        return {"id": self.id, "direction": "out", "peer": self.address, "name": self.peer_name, "file": "",
                "bytes": saved, "size": entries.total, "file_bytes": 0, "file_size": 0,
                "seconds": round(self.ctx.loop.clock() - self.started, 3)}

    def summary(self, last: Dict[str, Any]) -> Dict[str, Any]:
        entries = self.walk.entries
        return dict(last, id=self.id, files=len(entries), bytes=entries.total,
                    seconds=round(self.ctx.loop.clock() - self.started, 3), attempts=self.attempts,
                    resumed_bytes=self.resumed_bytes)

    # -- the end

    def end(self) -> bool:
        """Stop for good; True the first time (the one that answers the client)."""
        if self.answered:
            return False
        self.answered = True
        self.close()
        return True

    def cancel(self, code: str, message: str) -> None:
        """The client is gone, or asked to stop."""
        if self.between_attempts and not self.answered:
            self.ended_between_attempts(code, message)
        self.answered = True
        attempt, self.attempt = self.attempt, None
        self.close()
        if attempt is not None and not attempt.closed:
            attempt.cancel(code, message)

    def on_internal_error(self) -> None:
        if self.end():
            self.client.fail("internal-error", "internal error sending; see the daemon log")

    def close(self) -> None:
        self.closed = True
        self.deadline = math.inf
        self.ctx.loop.done(self)
        self.ctx.registry.forget(self)


class FanOut:
    """One send or message to several peers at once: a job per peer, each
    answering a ``Recipient`` of ours; one final answer with a result per
    peer, ok only when every one is. Their files are read about together,
    so from the page cache once where it holds them."""

    def __init__(self, client: Client, start: Callable[[str, "Recipient"], Any]) -> None:
        self.client, self.start_one = client, start
        self.recipients: List[Recipient] = []
        self.closed = False
        self.job: Any = None

    def start(self, peers: List[str]) -> None:
        if not peers:
            self.client.fail("unknown-peer", "no peer answered the discovery")
            return
        self.recipients = [Recipient(self, peer) for peer in peers]
        for recipient in self.recipients:
            recipient.job = self.start_one(recipient.target, recipient)

    def settled(self) -> None:
        if self.closed or any(r.result is None for r in self.recipients):
            return
        self.closed = True
        results = [dict(r.result or {}, peer_given=r.target) for r in self.recipients]
        failed = [r for r in results if not r["ok"]]
        if not failed:
            self.client.finish({"results": results})
            return
        listing = "; ".join(f"{r['peer_given']}: {r['code']}: {r['error']}" for r in failed)
        self.client.fail(failed[0]["code"], f"{len(failed)} of {len(results)} peers failed: {listing}", results=results)

    def cancel(self, code: str, message: str) -> None:
        self.closed = True
        for recipient in self.recipients:
            if recipient.job is not None:
                recipient.job.cancel(code, message)  # a job already over ignores it


class Recipient:
    """One peer of a FanOut, as the client of that peer's job."""

    def __init__(self, fan: FanOut, target: str) -> None:
        self.fan, self.target = fan, target
        self.job: Any = None
        self.result: Optional[Dict[str, Any]] = None

    @property
    def closed(self) -> bool:
        return self.fan.client.closed

    def reply(self, obj: Dict[str, Any]) -> None:
        self.fan.client.reply(dict(obj, peer_given=self.target))

    def finish(self, obj: Dict[str, Any]) -> None:
        self.result = dict(obj, ok=True)
        self.fan.settled()

    def fail(self, code: str, message: str, **extra: Any) -> None:
        self.result = dict(extra, ok=False, code=code, error=message)
        self.fan.settled()
