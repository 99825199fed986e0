"""A LocalSend sender for the tests, with Python's own http.client and ssl: what a
phone does, and what a hostile one does (raw requests on a socket)."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
from typing import Any, Dict, List, Optional, Tuple

from tnet import localsend as ls

INFO = {"alias": "phone", "version": "2.2", "deviceModel": "Pixel", "deviceType": "mobile",
        "fingerprint": "F" * 64, "port": 53317, "protocol": "https"}


def unverified() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def entry(file_id: str, name: str, data: bytes, sha: bool = True, **extra: Any) -> Dict[str, Any]:
    item: Dict[str, Any] = {"id": file_id, "fileName": name, "size": len(data), "fileType": "application/octet-stream"}
    if sha:
        item["sha256"] = hashlib.sha256(data).hexdigest()
    item.update(extra)
    return item


class Sender:
    """One sender's HTTP(S) connection to a daemon's LocalSend port (keep-alive)."""

    def __init__(self, address: str, port: int, https: bool, source: Optional[str] = None,
                 timeout: float = 30.0) -> None:
        self.address, self.port, self.https, self.source, self.timeout = address, port, https, source, timeout
        self.conn = self.connect()

    def connect(self) -> http.client.HTTPConnection:
        source = (self.source, 0) if self.source else None
        if self.https:
            return http.client.HTTPSConnection(self.address, self.port, context=unverified(), timeout=self.timeout,
                                               source_address=source)
        return http.client.HTTPConnection(self.address, self.port, timeout=self.timeout, source_address=source)

    def call(self, method: str, target: str, body: Any = None, headers: Optional[Dict[str, str]] = None,
             encode_chunked: bool = False) -> Tuple[int, bytes]:
        self.conn.request(method, target, body, headers or {}, encode_chunked=encode_chunked)
        response = self.conn.getresponse()
        data = response.read()
        if response.will_close:
            self.conn.close()
            self.conn = self.connect()
        return response.status, data

    def prepare(self, files: Dict[str, Dict[str, Any]], pin: Optional[str] = None,
                info: Optional[Dict[str, Any]] = None) -> Tuple[int, Any]:
        target = ls.PREPARE_UPLOAD_PATH + (f"?pin={pin}" if pin is not None else "")
        status, data = self.call("POST", target, json.dumps({"info": info or INFO, "files": files}),
                                 {"Content-Type": "application/json"})
        return status, json.loads(data) if data else None

    def upload(self, session: str, file_id: str, token: str, data: Any, chunked: bool = False) -> Tuple[int, bytes]:
        headers = {"Content-Type": "application/octet-stream"}
        if chunked:
            return self.call("POST", ls.upload_target(session, file_id, token), iter([data]), headers,
                             encode_chunked=True)
        return self.call("POST", ls.upload_target(session, file_id, token), data, headers)

    def send(self, files: List[Tuple[str, bytes]], **kwargs: Any) -> Dict[str, int]:
        """A whole transfer: prepare-upload, then each file; the status of each upload by name."""
        entries = {f"id{n}": entry(f"id{n}", name, data) for n, (name, data) in enumerate(files)}
        status, answer = self.prepare(entries, **kwargs)
        assert status == 200, (status, answer)
        results = {}
        for n, (name, data) in enumerate(files):
            token = answer["files"].get(f"id{n}")
            if token is not None:
                results[name] = self.upload(answer["sessionId"], f"id{n}", token, data)[0]
        return results

    def close(self) -> None:
        self.conn.close()


def raw(address: str, port: int, source: Optional[str] = None, timeout: float = 30.0) -> socket.socket:
    """A plain TCP connection, for requests written by hand."""
    sock = socket.create_connection((address, port), timeout=timeout, source_address=(source, 0) if source else None)
    return sock


def read_response(sock: socket.socket) -> Tuple[int, bytes]:
    """The status and whatever follows, up to the peer's close or a complete small response."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, rest
