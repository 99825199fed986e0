"""The least a verified transfer can cost in Python on this machine: the
bench's "sha256 floor" reference.

One file, one TCP connection, nothing else: the sender hands the kernel the
file with sendfile and reads it back once to hash it; the receiver reads into
one reused 1 MiB buffer, hashes and writes. Both check the SHA-256 at the
end. tnet does the same per byte, plus framing, a loop, progress and
placing the file, so tnet over this figure is what those cost.

Usage: floor.py recv ADDRESS PORT DEST   (listens; exits 0 once DEST is verified)
       floor.py send ADDRESS PORT SRC
"""

import hashlib
import os
import socket
import struct
import sys

BUFFER = 1024 * 1024  # as tnet's receive buffer
SEND_CHUNK = 4 * 1024 * 1024  # as tnet's sendfile calls


def receive(address: str, port: int, dest: str) -> int:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(1)
    sock, _ = listener.accept()
    (size,) = struct.unpack(">Q", sock.recv(8, socket.MSG_WAITALL))
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    digest = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    left = size
    while left:
        n = sock.recv_into(view, min(left, BUFFER))
        if not n:
            return 1
        digest.update(view[:n])
        done = 0
        while done < n:
            done += os.write(fd, view[done:n])
        left -= n
    os.close(fd)
    return 0 if sock.recv(32, socket.MSG_WAITALL) == digest.digest() else 1


def send(address: str, port: int, src: str) -> int:
    fd = os.open(src, os.O_RDONLY)
    size = os.fstat(fd).st_size
    sock = socket.create_connection((address, port))
    sock.sendall(struct.pack(">Q", size))
    view = memoryview(bytearray(BUFFER))
    digest = hashlib.sha256()
    offset = 0
    while offset < size:
        sent = os.sendfile(sock.fileno(), fd, offset, min(SEND_CHUNK, size - offset))
        offset += sent
        while sent:
            n = os.readv(fd, [view[:min(sent, BUFFER)]])
            digest.update(view[:n])
            sent -= n
    sock.sendall(digest.digest())
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # the receiver's close: it has everything
    return 0


if __name__ == "__main__":
    role, address, port, path = sys.argv[1:5]
    sys.exit((receive if role == "recv" else send)(address, int(port), path))
