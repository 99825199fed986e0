"""tls.py: the LocalSend identity in STATE_DIR (made once, kept, refused when
unsafe), and TLS over memory BIOs between two pipes, without a socket."""

from __future__ import annotations

import os
import shutil
import ssl
import stat
import time
from pathlib import Path

import pytest

from tnet import tls, x509
from tnet.util import StateDirError, open_state_dir


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A STATE_DIR holding one identity, made once (an RSA key costs a second)."""
    state = tmp_path_factory.mktemp("made") / "state"
    tls.load_identity(str(state), True, time.time())
    return state


@pytest.fixture(name="state")
def copy_of_made(made, tmp_path) -> Path:
    state = tmp_path / "state"
    shutil.copytree(made, state)
    return state


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_identity_is_made_once_private_and_kept(made, state):
    first = tls.load_identity(str(state), True, time.time())
    assert (mode(made), mode(made / tls.CERT_FILE), mode(made / tls.KEY_FILE)) == (0o700, 0o600, 0o600)
    cert = (state / tls.CERT_FILE).read_text()
    assert first.fingerprint == x509.fingerprint(x509.pem_to_der(cert))
    assert len(first.fingerprint) == 64 and first.fingerprint == first.fingerprint.upper()
    assert tls.load_identity(str(state), True, time.time()) == first
    assert sorted(os.listdir(state)) == [tls.CERT_FILE, tls.KEY_FILE]  # no temp file left


def test_http_mode_keeps_a_random_fingerprint(tmp_path):
    state = tmp_path / "deep" / "state"
    first = tls.load_identity(str(state), False, 0.0)
    assert not first.https and len(first.fingerprint) == 32 and int(first.fingerprint, 16) >= 0
    assert tls.load_identity(str(state), False, 0.0) == first
    assert mode(state / tls.FINGERPRINT_FILE) == 0o600 and mode(state) == 0o700
    (state / tls.FINGERPRINT_FILE).write_text("not a fingerprint!\n")
    with pytest.raises(StateDirError, match="does not hold a fingerprint"):
        tls.load_identity(str(state), False, 0.0)


def test_a_key_alone_is_an_interrupted_first_start_and_is_made_again(state):
    old = tls.load_identity(str(state), True, time.time())
    (state / tls.CERT_FILE).unlink()
    new = tls.load_identity(str(state), True, time.time())
    assert new.fingerprint != old.fingerprint


@pytest.mark.parametrize("damage, message", [
    (lambda s: (s / tls.KEY_FILE).unlink(), "has no key beside it"),
    (lambda s: (s / tls.KEY_FILE).chmod(0o640), "others may read it"),
    (lambda s: (s / tls.CERT_FILE).write_text("garbage"), "no CERTIFICATE block"),
    (lambda s: s.chmod(0o777), "others may write in it"),
])
def test_an_unusable_identity_is_refused_with_the_file_and_the_cure(state, damage, message):
    damage(state)
    with pytest.raises(StateDirError, match=message) as info:
        tls.load_identity(str(state), True, time.time())
    assert str(state) in str(info.value)


def test_a_key_of_another_certificate_is_refused(state, made, tmp_path):
    other = tmp_path / "other"
    tls.load_identity(str(other), True, time.time())
    os.replace(other / tls.KEY_FILE, state / tls.KEY_FILE)
    with pytest.raises(StateDirError, match="cannot be used"):
        tls.load_identity(str(state), True, time.time())


def test_links_are_refused_never_followed(state, tmp_path):
    outside = tmp_path / "outside.pem"
    outside.write_text("precious")
    os.replace(state / tls.CERT_FILE, tmp_path / "moved.pem")
    (state / tls.CERT_FILE).symlink_to(outside)
    with pytest.raises(StateDirError, match="is a link"):
        tls.load_identity(str(state), True, time.time())
    assert outside.read_text() == "precious"
    link = tmp_path / "state-link"
    link.symlink_to(state)
    with pytest.raises(StateDirError, match="is a link or not a folder"):
        tls.load_identity(str(link), True, time.time())


def test_a_fifo_is_refused_without_blocking(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.mkfifo(state / tls.FINGERPRINT_FILE, 0o600)
    with pytest.raises(StateDirError, match="not a small regular file"):
        tls.load_identity(str(state), False, 0.0)


def test_a_write_replaces_a_planted_link_not_its_target(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "target"
    target.write_text("untouched")
    (state / "f").symlink_to(target)
    (state / ".f.leftover").write_text("")
    fd = open_state_dir(str(state))
    try:
        tls.write_private(fd, "f", b"new", "f")
    finally:
        os.close(fd)
    assert target.read_text() == "untouched"
    assert (state / "f").read_bytes() == b"new" and not (state / "f").is_symlink()


def pump(a: tls.TlsPipe, b: tls.TlsPipe) -> None:
    """Move what each end wrote to the other until neither has more."""
    while True:
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.take_output()
            if data:
                dst.receive(data)
                moved = True
        a.handshake()
        b.handshake()
        if not moved:
            return


def test_tls_between_two_pipes_pins_the_servers_fingerprint_and_carries_data(made):
    identity = tls.load_identity(str(made), True, time.time())
    server = tls.TlsPipe(tls.server_context(identity), server_side=True)
    client = tls.TlsPipe(tls.client_context(identity), server_side=False)
    assert not client.handshake()
    pump(client, server)
    assert client.established and server.established
    assert client.peer_fingerprint() == identity.fingerprint
    assert server.peer_fingerprint() == ""  # the server asks for no client certificate (see tls.py)
    assert client.obj.selected_alpn_protocol() == "http/1.1"
    buffer = memoryview(bytearray(1 << 20))
    assert server.read_into(buffer) == 0  # nothing yet: more ciphertext is needed
    client.write(b"x" * 100_000)
    server.receive(client.take_output())
    got = b""
    while True:
        n = server.read_into(buffer)
        if not n:
            break
        got += bytes(buffer[:n])
    assert got == b"x" * 100_000
    client.close_notify()
    server.receive(client.take_output())
    with pytest.raises(tls.TlsClosed) as closed:
        server.read_into(buffer)
    assert closed.value.clean


def test_garbage_instead_of_a_handshake_is_an_ssl_error(made):
    identity = tls.load_identity(str(made), True, time.time())
    server = tls.TlsPipe(tls.server_context(identity), server_side=True)
    server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ssl.SSLError):
        server.handshake()
    eof = tls.TlsPipe(tls.server_context(identity), server_side=True)
    eof.receive_eof()
    with pytest.raises(ssl.SSLError):
        eof.handshake()
