"""A hand-driven tnet peer for the hostile tests: it speaks the wire protocol
(docs/PROTOCOL.md §2-§4) over plain blocking sockets and sends whatever it is
told, legal or not. It decodes what the daemon answers with tnet.protocol.

Run as a program it is a peer in a process of its own, which a test can kill:

    python crafted.py send ADDRESS SIZE SENT   offer one file of SIZE bytes, send
                                               SENT of them, print "ready", then
                                               wait for stdin to close
    python crafted.py receive ADDRESS READ     take one offer on ADDRESS, read READ
                                               payload bytes, print "ready", wait

Only loopback addresses are ever used by the tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tnet import protocol as proto  # noqa: E402

PORT = 0xC00D  # the default RECEIVE_PORT, which the test daemons keep


def frame(obj: Union[Dict[str, Any], bytes]) -> bytes:
    """A frame around a JSON object, or around raw payload bytes as given."""
    payload = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return struct.pack(">I", len(payload)) + payload


def offer(entries: int, size: int, name: str = "mallory") -> bytes:
    return frame({"type": "offer", "name": name, "entries": entries, "size": size})


def file_header(index: int, path: List[str], size: int) -> bytes:
    return frame({"type": "file", "index": index, "path": path, "size": size})


def end(data: bytes) -> bytes:
    return frame({"type": "end", "sha256": hashlib.sha256(data).hexdigest()})


class Decoder:
    """What the daemon says, as events: its framing checked (protocol.FrameReader),
    its frames checked field by field, but none of the exchange's rules, so that
    a test may send anything and still read the answer."""

    def __init__(self) -> None:
        self.reader = proto.FrameReader()

    def feed(self, data: bytes) -> List[Any]:
        return [proto.FileData(bytes(item.data)) if isinstance(item, proto.FileData) else proto.event_of(item)
                for item in self.reader.items(data)]

    def feed_eof(self) -> List[Any]:
        if not self.reader.at_boundary:
            raise proto.RemoteProtocolError("truncated", "connection closed mid-frame or mid-file")
        return []


class Wire:
    """One TCP connection and a decoder for what the other side says."""

    def __init__(self, sock: socket.socket, role: str = "") -> None:
        self.sock = sock
        self.decoder = Decoder()
        self.events: List[Any] = []
        self.eof = False
        self.remote_error: Optional[proto.RemoteProtocolError] = None
        self.resumes_answered: set = set()  # entries told `resume` already

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv(self, size: int = 65536) -> bytes:
        try:
            return self.sock.recv(size)
        except ConnectionResetError:
            return b""

    def pump(self, size: int = 65536) -> bool:
        """Read once and decode; False at EOF."""
        if self.eof:
            return False
        data = self._recv(size)
        try:
            if data:
                self.events.extend(self.decoder.feed(data))
            else:
                self.eof = True
                self.decoder.feed_eof()
        except proto.RemoteProtocolError as exc:
            self.remote_error = exc
        return not self.eof

    def wait_for(self, kind: type) -> Any:
        """The first event of ``kind``; AssertionError if the stream ends first."""
        while True:
            for event in self.events:
                if isinstance(event, kind):
                    self.events.remove(event)
                    return event
            if not self.pump():
                raise AssertionError(f"no {kind.__name__} before EOF; got {self.events}")

    def error(self) -> proto.Error:
        """Read to EOF; the error frame the other side sent before closing."""
        while self.pump():
            pass
        errors = [e for e in self.events if isinstance(e, proto.Error)]
        assert errors, f"closed without an error frame; got {self.events}"
        return errors[0]

    def read_to_eof(self) -> bytes:
        data = bytearray()
        while True:
            chunk = self._recv()
            if not chunk:
                return bytes(data)
            data += chunk

    def close(self) -> None:
        self.sock.close()


def connect(address: str, port: int = PORT, source: Optional[str] = None, timeout: float = 30.0) -> Wire:
    """A connection to a daemon's TCP port, as an initiator."""
    sock = socket.create_connection((address, port), timeout, source_address=(source, 0) if source else None)
    return Wire(sock, "initiator")


def start_batch(address: str, entries: int, size: int, source: Optional[str] = None) -> Wire:
    """Connect, say the preface and an offer, and wait for the accept."""
    wire = connect(address, source=source)
    wire.send(proto.PREFACE + offer(entries, size))
    wire.wait_for(proto.Accept)
    return wire


class Receiver:
    """A listener on ``address``:PORT that plays the receiving daemon by hand."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((address, PORT))
        self.listener.listen(8)
        self.listener.settimeout(timeout)
        self.timeout = timeout

    def take_offer(self) -> "tuple[Wire, proto.Offer]":
        sock, _ = self.listener.accept()
        sock.settimeout(self.timeout)
        wire = Wire(sock, "acceptor")
        wire.send(proto.PREFACE)
        event = wire.wait_for(proto.Offer)
        wire.send(frame({"type": "accept", "name": "slowpoke"}))
        return wire, event

    def read_payload(self, wire: Wire, count: int) -> int:
        """Read until ``count`` file bytes came in (or the stream ends)."""
        got = 0
        while got < count:
            for event in list(wire.events):
                answer_resumable(wire, event)
                if isinstance(event, proto.FileData):
                    got += len(event.data)
                    wire.events.remove(event)
            if got >= count or not wire.pump(min(65536, max(count - got, 1))):
                break
        return got

    def finish_file(self, wire: Wire) -> Any:
        """Read the rest of the file; answer like a daemon; return the sender's
        closing frame (``FileEnd`` or ``Failed``), its ``Error``, or the decoder's
        error if the stream ends mid-file."""
        hasher = hashlib.sha256()
        while True:
            for event in list(wire.events):
                wire.events.remove(event)
                answer_resumable(wire, event)
                if isinstance(event, proto.FileData):
                    hasher.update(event.data)
                elif isinstance(event, proto.FileHeader):
                    hasher = hashlib.sha256()
                elif isinstance(event, proto.FileEnd):
                    ok = event.sha256 == hasher.hexdigest()
                    wire.send(frame({"type": "done", "index": 0} if ok else
                                    {"type": "failed", "index": 0, "code": "verify-failed",
                                     "message": "SHA-256 does not match"}))
                    return event
                elif isinstance(event, proto.Failed):
                    wire.send(frame({"type": "failed", "index": event.index, "code": event.code,
                                     "message": event.message}))
                    return event
                elif isinstance(event, proto.Error):
                    return event
            if not wire.pump():
                return wire.remote_error  # cut short: `truncated`

    def close(self) -> None:
        self.listener.close()


@contextlib.contextmanager
def sending(daemon: Any, address: str, path: str, *options: str) -> Iterator[Tuple[Receiver, "subprocess.Popen[str]"]]:
    """`tnet send OPTIONS ADDRESS PATH` on ``daemon`` (a conftest.Daemon) to
    a Receiver played on ``address``: the receiver and the CLI's process,
    killed and closed at the end however the test went."""
    receiver = Receiver(address)
    cli = subprocess.Popen(daemon.cli_args("send", *options, address, path), env=daemon.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        yield receiver, cli
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        receiver.close()


def resume(index: int, offset: int = 0, prefix: bytes = b"", salt: bytes = b"\0" * 16) -> bytes:
    """A receiver's `resume` (§7): it holds ``prefix`` of entry ``index``."""
    digest = hashlib.sha256(salt + hashlib.sha256(prefix).digest()).hexdigest() if offset else \
        hashlib.sha256(salt).hexdigest()
    return frame({"type": "resume", "index": index, "offset": offset, "salt": salt.hex(), "sha256": digest})


def answer_resumable(wire: Wire, event: Any) -> None:
    """A file that may be resumed waits for the receiver's word: we hold nothing of it."""
    if isinstance(event, proto.FileHeader) and event.mtime is not None and event.index not in wire.resumes_answered:
        wire.resumes_answered.add(event.index)
        wire.send(resume(event.index))


def _main(argv: List[str]) -> int:
    mode, address, *numbers = argv
    if mode == "send":
        size, sent = int(numbers[0]), int(numbers[1])
        wire = start_batch(address, 1, size)
        wire.send(file_header(0, ["killed.bin"], size) + bytes(sent))
    elif mode == "receive":
        receiver = Receiver(address)
        print("listening", flush=True)
        wire, _ = receiver.take_offer()
        receiver.read_payload(wire, int(numbers[0]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("ready", flush=True)
    sys.stdin.read()  # until the test kills us or closes our stdin
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
