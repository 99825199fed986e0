"""store.py on its own: placing verified files without replacing any, and the
copy from another file system, which goes a slice per turn of the loop."""

from __future__ import annotations

import errno
import os

from tnet import store
from tnet.store import COPY_SLICE_BYTES, Store


def make_temp(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_a_copy_moves_a_slice_per_step_and_never_replaces_a_file(tmp_path):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "save").mkdir()
    s = Store(str(tmp_path / "save"), str(tmp_path / "tmp"))
    data = os.urandom(2 * COPY_SLICE_BYTES + 5)
    temp = make_temp(tmp_path / "tmp" / "t.part", data)
    copy = s.start_copy(temp, ("f.bin",), {})
    (tmp_path / "save" / "f.bin").write_bytes(b"taken meanwhile")
    steps = 1
    while not copy.step():
        steps += 1
    assert steps == 5  # three slices, freeing the temp file, taking a name: never all in one go
    assert copy.target == str(tmp_path / "save" / "f (1).bin")
    assert (tmp_path / "save" / "f (1).bin").read_bytes() == data
    assert (tmp_path / "save" / "f.bin").read_bytes() == b"taken meanwhile"
    assert sorted(os.listdir(tmp_path / "save")) == ["f (1).bin", "f.bin"]
    assert os.listdir(tmp_path / "tmp") == []


def test_an_abandoned_copy_leaves_nothing(tmp_path):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "save").mkdir()
    s = Store(str(tmp_path / "save"), str(tmp_path / "tmp"))
    copy = s.start_copy(make_temp(tmp_path / "tmp" / "t.part", os.urandom(COPY_SLICE_BYTES + 1)), ("f.bin",), {})
    assert copy.step() is False
    copy.abandon()
    assert os.listdir(tmp_path / "save") == [] and os.listdir(tmp_path / "tmp") == []


def test_without_a_file_to_file_sendfile_a_copy_goes_through_a_buffer(tmp_path, monkeypatch):
    def sockets_only(*args):
        raise OSError(errno.ENOTSOCK, "Socket operation on non-socket")

    monkeypatch.setattr(store.os, "sendfile", sockets_only)
    src = make_temp(tmp_path / "src", b"x" * 3_000_000)
    fd_in = os.open(src, os.O_RDONLY)
    fd_out = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
    copied = 0
    while copied < 3_000_000:
        n = store.copy_slice(fd_in, fd_out, copied, 3_000_000 - copied)
        assert 0 < n <= 1024 * 1024
        copied += n
    os.close(fd_in)
    os.close(fd_out)
    assert (tmp_path / "dst").read_bytes() == b"x" * 3_000_000


def test_where_there_are_no_hard_links_a_copy_is_renamed_over_a_reserved_name(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")  # as on FAT and exFAT

    monkeypatch.setattr(store.os, "link", no_links)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "save").mkdir()
    (tmp_path / "save" / "f.bin").write_bytes(b"first")
    s = Store(str(tmp_path / "save"), str(tmp_path / "tmp"))
    copy = s.start_copy(make_temp(tmp_path / "tmp" / "t.part", b"second"), ("f.bin",), {})
    while not copy.step():
        pass
    assert copy.target == str(tmp_path / "save" / "f (1).bin")
    assert (tmp_path / "save" / "f.bin").read_bytes() == b"first"
    assert (tmp_path / "save" / "f (1).bin").read_bytes() == b"second"
    assert sorted(os.listdir(tmp_path / "save")) == ["f (1).bin", "f.bin"]
