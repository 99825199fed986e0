"""TLS for the LocalSend side: the identity kept in STATE_DIR, the two contexts,
and TLS over memory BIOs, so that no handshake ever blocks the loop.

* ``load_identity``: the certificate and key (HTTPS) or the random fingerprint
  (HTTP) in STATE_DIR, made once by ``x509.make_identity`` and kept: phones
  remember a device by its fingerprint. The folder is 0700, the files 0600,
  each written to a temp name and renamed into place, and nothing is read or
  written through a link. What cannot be used stops the daemon with
  ``StateDirError`` saying which file and what to do.
* ``server_context`` and ``client_context``: TLS 1.2 or later, ALPN http/1.1,
  our certificate on both sides (the official app, as a server, requires a
  client certificate). Neither verifies a chain: LocalSend certificates are
  self-signed, and a peer is recognised by its fingerprint, which the client
  pins after the handshake (``TlsPipe.peer_fingerprint``). The server does
  not ask for a client certificate: Python's ``ssl`` has no verify callback,
  and with CERT_OPTIONAL OpenSSL would refuse every self-signed one it is
  shown; so a sender is who its address says, as with localsendd.
* ``TlsPipe``: an ``ssl.SSLObject`` between two ``MemoryBIO``s. The owner
  feeds it the bytes its socket read and sends what it produced.

It must not touch sockets, and reads no clock: the caller passes ``now``.
"""

from __future__ import annotations

import errno
import os
import secrets
import ssl
import stat
from dataclasses import dataclass
from typing import Optional, Union

from . import x509
from .util import StateDirError, open_state_dir

CERT_FILE = "localsend-cert.pem"
KEY_FILE = "localsend-key.pem"
FINGERPRINT_FILE = "localsend-fingerprint"  # HTTP mode: a random id, as localsendd keeps one
COMMON_NAME = "tnet"  # LocalSend ignores it; the fingerprint is what identifies us
MAX_STATE_FILE_BYTES = 64 * 1024  # a 2048-bit key in PEM is ~1.7 KiB; more is not ours
FINGERPRINT_BYTES = 16  # 32 hex digits, as localsendd's uuid4().hex
MAX_FINGERPRINT_CHARS = 128  # localsend.MAX_FINGERPRINT_BYTES
ALPN = ["http/1.1"]  # the official app offers only this

_FILE_MODE = 0o600
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: a FIFO planted there cannot block us
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC


@dataclass(frozen=True)
class LocalIdentity:
    """Who we are to LocalSend devices. ``cert_path`` and ``key_path`` are ''
    in HTTP mode."""

    fingerprint: str
    cert_path: str = ""
    key_path: str = ""

    @property
    def https(self) -> bool:
        return bool(self.cert_path)


# --- STATE_DIR and its files -------------------------------------------------------------------


def read_private(dir_fd: int, name: str, shown: str) -> Optional[bytes]:
    """The bytes of our file ``name``, None if there is none. A link, a file
    that is not regular, not ours, or readable by others is refused."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateDirError(f"{shown} is a link; not following it (remove it)") from None
        raise StateDirError(f"{shown}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_STATE_FILE_BYTES:
            raise StateDirError(f"{shown} is not a small regular file (remove it)")
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise StateDirError(f"{shown} belongs to someone else or others may read it "
                                    f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
        return os.read(fd, MAX_STATE_FILE_BYTES + 1)
    except OSError as exc:
        raise StateDirError(f"{shown}: {exc.strerror}") from None
    finally:
        os.close(fd)


def write_private(dir_fd: int, name: str, data: bytes, shown: str) -> None:
    """``data`` as our file ``name``, 0600, all or nothing: a temp file renamed into place."""
    temp = f".{name}.{os.getpid()}.tmp"
    try:
        try:
            os.unlink(temp, dir_fd=dir_fd)  # a leftover of a start that was killed
        except FileNotFoundError:
            pass
        fd = os.open(temp, _NEW_FLAGS, _FILE_MODE, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces a link, never follows it
    except OSError as exc:
        try:
            os.unlink(temp, dir_fd=dir_fd)
        except OSError:
            pass
        raise StateDirError(f"cannot write {shown}: {exc.strerror}") from None


def load_identity(state_dir: str, https: bool, now: float) -> LocalIdentity:
    """Our LocalSend identity from STATE_DIR, made there at the first start."""
    dir_fd = open_state_dir(state_dir)
    try:
        if https:
            return _load_certificate(dir_fd, state_dir, now)
        return LocalIdentity(_load_fingerprint(dir_fd, state_dir))
    finally:
        os.close(dir_fd)


def _load_fingerprint(dir_fd: int, state_dir: str) -> str:
    shown = os.path.join(state_dir, FINGERPRINT_FILE)
    data = read_private(dir_fd, FINGERPRINT_FILE, shown)
    if data is None:
        text = secrets.token_hex(FINGERPRINT_BYTES)
        write_private(dir_fd, FINGERPRINT_FILE, text.encode("ascii") + b"\n", shown)
        return text
    text = data.decode("ascii", "replace").strip()
    if not 0 < len(text) <= MAX_FINGERPRINT_CHARS or not text.isalnum() or not text.isascii():
        raise StateDirError(f"{shown} does not hold a fingerprint (letters and digits); remove it")
    return text


def _load_certificate(dir_fd: int, state_dir: str, now: float) -> LocalIdentity:
    cert_shown, key_shown = os.path.join(state_dir, CERT_FILE), os.path.join(state_dir, KEY_FILE)
    cert = read_private(dir_fd, CERT_FILE, cert_shown)
    key = read_private(dir_fd, KEY_FILE, key_shown)
    if cert is None:
        # The certificate is written last: a key alone is a first start that was cut short.
        made = x509.make_identity(COMMON_NAME, now)
        write_private(dir_fd, KEY_FILE, made.key_pem.encode("ascii"), key_shown)
        write_private(dir_fd, CERT_FILE, made.cert_pem.encode("ascii"), cert_shown)
        cert = made.cert_pem.encode("ascii")
    elif key is None:
        raise StateDirError(f"{cert_shown} has no key beside it ({key_shown}); remove it to make a new "
                                "pair (LocalSend devices will see a new fingerprint)")
    try:
        fingerprint = x509.fingerprint(x509.pem_to_der(cert))
    except x509.IdentityError as exc:
        raise StateDirError(f"{cert_shown}: {exc}; remove it and {key_shown} to make a new pair") from None
    identity = LocalIdentity(fingerprint, cert_shown, key_shown)
    try:
        server_context(identity)  # the key must be the certificate's
    except (ssl.SSLError, OSError) as exc:
        raise StateDirError(f"{cert_shown} and {key_shown} cannot be used ({exc}); remove both to make "
                                "a new pair") from None
    return identity


# --- Contexts ----------------------------------------------------------------------------------


def _context(purpose: int, identity: LocalIdentity) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(identity.cert_path, identity.key_path)
    context.set_alpn_protocols(ALPN)
    return context


def server_context(identity: LocalIdentity) -> ssl.SSLContext:
    """Serves our certificate; asks for none (see the module's docstring)."""
    context = _context(ssl.PROTOCOL_TLS_SERVER, identity)
    context.verify_mode = ssl.CERT_NONE
    return context


def client_context(identity: LocalIdentity) -> ssl.SSLContext:
    """Presents our certificate when asked; the server's is pinned by fingerprint, not verified.
    In HTTP mode (no certificate of ours) it presents none: a server that requires one refuses it."""
    if identity.https:
        context = _context(ssl.PROTOCOL_TLS_CLIENT, identity)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(ALPN)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --- TLS in memory -----------------------------------------------------------------------------


class TlsClosed(Exception):
    """The peer ended TLS: ``clean`` with a close_notify, else by closing the connection."""

    def __init__(self, clean: bool) -> None:
        super().__init__("closed" if clean else "closed without close_notify")
        self.clean = clean


class TlsPipe:
    """TLS without a socket: ciphertext in (``receive``), plaintext out
    (``read_into``), plaintext in (``write``), ciphertext out (``take_output``).
    ``ssl.SSLError`` from ``handshake`` and ``read_into`` is the peer's fault."""

    def __init__(self, context: ssl.SSLContext, server_side: bool) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        self.established = False
        self.broken = False  # the peer ended TLS without close_notify: OpenSSL refuses to write any more

    def receive(self, data: Union[bytes, memoryview]) -> None:
        self.incoming.write(data)

    def receive_eof(self) -> None:
        self.incoming.write_eof()

    def handshake(self) -> bool:
        """Go on with the handshake; True once it is done."""
        if not self.established:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return False
            self.established = True
        return True

    def read_into(self, buffer: memoryview) -> int:
        """Plaintext into ``buffer``: its length, 0 when more ciphertext is
        needed first. TlsClosed once the peer ended TLS."""
        try:
            n = self.obj.read(len(buffer), buffer)  # type: ignore[arg-type]  # any writable buffer does
        except ssl.SSLWantReadError:
            return 0
        except ssl.SSLZeroReturnError:
            raise TlsClosed(True) from None
        except ssl.SSLEOFError:
            self.broken = True
            raise TlsClosed(False) from None
        if n == 0:  # the peer's close_notify (ssl reports it so, not as SSLZeroReturnError)
            raise TlsClosed(True)
        return int(n)  # type: ignore[arg-type]  # with a buffer, read returns a count

    def write(self, data: Union[bytes, memoryview]) -> None:
        self.obj.write(data)

    def take_output(self) -> bytes:
        """Ciphertext to send: handshake messages, records, alerts."""
        return self.outgoing.read()

    def close_notify(self) -> None:
        """Say that we send nothing more (the peer's answer is not awaited)."""
        try:
            self.obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass

    def peer_fingerprint(self) -> str:
        """The LocalSend fingerprint of the certificate the peer presented, '' if none."""
        der = self.obj.getpeercert(binary_form=True)
        return x509.fingerprint(der) if der else ""
