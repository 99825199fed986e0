"""store.py on its own: placing verified files without replacing any, on
folder descriptors that a swapped folder or link cannot redirect, the copy
from another file system a slice per turn, and the leftovers of a killed
daemon."""

from __future__ import annotations

import errno
import os
import time

import pytest

from tnet import protocol as proto
from tnet import store
from tnet.store import COPY_SLICE_BYTES, WORK_PREFIX, Store, numbered, write_all


def opened(tmp_path, token: str = "a" * 32) -> Store:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    (tmp_path / "save").mkdir(exist_ok=True)
    s = Store(str(tmp_path / "save"), str(tmp_path / "tmp"), token)
    s.open(time.time())
    return s


def temp_with(s: Store, data: bytes) -> store.TempFile:
    temp = s.new_temp()
    write_all(temp.fd, data)
    return temp


def visible(folder) -> list:
    return sorted(name for name in os.listdir(folder) if not name.startswith(WORK_PREFIX))


def part_files(folder) -> list:
    return sorted(name for _, _, files in os.walk(folder) for name in files if name != store.LOCK_NAME)


def test_a_copy_moves_a_slice_per_step_and_never_replaces_a_file(tmp_path):
    s = opened(tmp_path)
    data = os.urandom(2 * COPY_SLICE_BYTES + 5)
    copy = s.new_batch().start_copy(temp_with(s, data), ("f.bin",))
    (tmp_path / "save" / "f.bin").write_bytes(b"taken meanwhile")
    steps = 1
    while not copy.step():
        steps += 1
    assert steps == 5  # three slices, freeing the temp file, taking a name: never all in one go
    assert copy.target == str(tmp_path / "save" / "f (1).bin")
    assert (tmp_path / "save" / "f (1).bin").read_bytes() == data
    assert (tmp_path / "save" / "f.bin").read_bytes() == b"taken meanwhile"
    assert visible(tmp_path / "save") == ["f (1).bin", "f.bin"]
    assert part_files(tmp_path / "tmp") == [] and part_files(tmp_path / "save") == ["f (1).bin", "f.bin"]


def test_an_abandoned_copy_leaves_nothing(tmp_path):
    s = opened(tmp_path)
    copy = s.new_batch().start_copy(temp_with(s, os.urandom(COPY_SLICE_BYTES + 1)), ("f.bin",))
    assert copy.step() is False
    copy.abandon()
    assert part_files(tmp_path / "save") == [] and part_files(tmp_path / "tmp") == []


def test_without_a_file_to_file_sendfile_a_copy_goes_through_a_buffer(tmp_path, monkeypatch):
    def sockets_only(*args):
        raise OSError(errno.ENOTSOCK, "Socket operation on non-socket")

    monkeypatch.setattr(store.os, "sendfile", sockets_only)
    src = tmp_path / "src"
    src.write_bytes(b"x" * 3_000_000)
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
    s = opened(tmp_path)
    (tmp_path / "save" / "f.bin").write_bytes(b"first")
    copy = s.new_batch().start_copy(temp_with(s, b"second"), ("f.bin",))

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")  # as on FAT and exFAT

    monkeypatch.setattr(store.os, "link", no_links)
    while not copy.step():
        pass
    assert copy.target == str(tmp_path / "save" / "f (1).bin")
    assert (tmp_path / "save" / "f.bin").read_bytes() == b"first"
    assert (tmp_path / "save" / "f (1).bin").read_bytes() == b"second"
    assert part_files(tmp_path / "save") == ["f (1).bin", "f.bin"]


def test_a_folder_swapped_for_a_link_mid_batch_is_never_followed(tmp_path):
    """F1: the batch made FILE_SAVE_DIR/x; someone renames it and plants x ->
    outside. Later entries of the batch still go into the folder the batch made."""
    s = opened(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    batch = s.new_batch()
    assert batch.place(temp_with(s, b"one"), ("x", "a.txt")) == str(tmp_path / "save" / "x" / "a.txt")
    os.rename(tmp_path / "save" / "x", tmp_path / "save" / "moved")
    os.symlink(outside, tmp_path / "save" / "x")
    assert batch.place(temp_with(s, b"two"), ("x", "b.txt")) is not None
    batch.folder(("x", "sub"))  # a new folder below it too
    batch.place(temp_with(s, b"three"), ("x", "sub", "c.txt"))
    assert os.listdir(outside) == []
    assert (tmp_path / "save" / "moved" / "b.txt").read_bytes() == b"two"
    assert (tmp_path / "save" / "moved" / "sub" / "c.txt").read_bytes() == b"three"


def test_a_link_planted_below_a_folder_of_the_batch_is_refused(tmp_path):
    s = opened(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    batch = s.new_batch()
    batch.folder(("x",))
    os.symlink(outside, tmp_path / "save" / "x" / "sub")  # before the batch makes x/sub
    with pytest.raises(OSError) as raised:
        batch.place(temp_with(s, b"one"), ("x", "sub", "a.txt"))
    assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert os.listdir(outside) == []


def test_the_save_dir_swapped_for_a_link_mid_batch_is_never_followed(tmp_path):
    s = opened(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    batch = s.new_batch()
    batch.place(temp_with(s, b"one"), ("x", "a.txt"))
    os.rename(tmp_path / "save", tmp_path / "save.moved")
    os.symlink(outside, tmp_path / "save")
    batch.place(temp_with(s, b"two"), ("x", "b.txt"))
    batch.place(temp_with(s, b"top"), ("top.txt",))
    assert os.listdir(outside) == []
    assert (tmp_path / "save.moved" / "x" / "b.txt").read_bytes() == b"two"
    assert (tmp_path / "save.moved" / "top.txt").read_bytes() == b"top"
    with pytest.raises(proto.LocalProtocolError) as raised:  # the next offer is refused, not redirected
        s.check_folders()
    assert raised.value.code == "save-failed" and "link" in raised.value.message


def test_a_removed_save_or_temp_dir_is_made_again(tmp_path):
    s = opened(tmp_path)
    os.rmdir(tmp_path / "save")
    for name in os.listdir(tmp_path / "tmp"):
        for inner in os.listdir(tmp_path / "tmp" / name):
            os.unlink(tmp_path / "tmp" / name / inner)
        os.rmdir(tmp_path / "tmp" / name)
    os.rmdir(tmp_path / "tmp")
    s.check_folders()
    assert s.new_batch().place(temp_with(s, b"back"), ("a.txt",)) == str(tmp_path / "save" / "a.txt")
    assert (tmp_path / "save" / "a.txt").read_bytes() == b"back"


def test_copies_begun_before_the_save_dir_was_made_again_leave_the_new_staging_folder_alone(tmp_path):
    s = opened(tmp_path)
    old = [s.new_batch().start_copy(temp_with(s, b"old %d" % n), (f"old{n}.txt",)) for n in range(2)]
    for copy in old:
        copy.step()  # both copy into the staging folder in FILE_SAVE_DIR
    save = tmp_path / "save"
    os.rename(save, tmp_path / "removed")
    save.mkdir()
    s.check_folders()
    new = s.new_batch().start_copy(temp_with(s, b"new"), ("new.txt",))
    new.step()
    for copy in old:  # they fail with their folder gone; the newer staging folder is not theirs to remove
        copy.abandon()
    assert [name for name in os.listdir(save) if name.startswith(WORK_PREFIX)]
    assert part_files(tmp_path / "removed") == []  # theirs was emptied, wherever it went
    while not new.step():
        pass
    assert (save / "new.txt").read_bytes() == b"new"
    assert os.listdir(save) == ["new.txt"]  # the last copy out removed the staging folder


def test_leftovers_of_a_killed_daemon_go_and_nothing_else(tmp_path):
    """F7: a daemon's temp files live in its locked work folder; a later
    daemon removes a folder whose lock is free, and nothing else."""
    running = opened(tmp_path, "1" * 32)
    temp_with(running, b"in flight")
    killed = opened(tmp_path, "2" * 32)
    temp_with(killed, b"x" * 1000)
    assert killed.work is not None
    os.close(killed.work.lock_fd)  # as a kill -9 would release it
    (tmp_path / "tmp" / ".tnet-other.part").write_bytes(b"not in a work folder")
    (tmp_path / "tmp" / "unrelated").write_bytes(b"someone else's")
    users = tmp_path / "tmp" / ".tnet-holiday"  # a folder of the user's own, old and without a lock
    users.mkdir()
    (users / "photo.jpg").write_bytes(b"keep me")
    os.utime(users, (0, 0))
    stranger = tmp_path / "tmp" / (WORK_PREFIX + "3" * 32)
    stranger.mkdir()
    (stranger / "1.part").write_bytes(b"another user's")
    if os.geteuid() == 0:
        os.chown(stranger, 65534, 65534)  # another user's: never ours to remove
    # (and as a folder without a lock that is fresh, a daemon may be making it: left alone too)
    later = opened(tmp_path, "4" * 32)
    left = sorted(os.listdir(tmp_path / "tmp"))
    assert WORK_PREFIX + "2" * 32 not in left
    assert WORK_PREFIX + "1" * 32 in left and WORK_PREFIX + "4" * 32 in left
    assert ".tnet-other.part" in left and "unrelated" in left
    assert (users / "photo.jpg").read_bytes() == b"keep me"
    assert (stranger / "1.part").exists()
    assert sorted(os.listdir(tmp_path / "tmp" / (WORK_PREFIX + "1" * 32))) == ["1.part", store.LOCK_NAME]
    later.close()
    running.close()
    assert WORK_PREFIX + "4" * 32 not in os.listdir(tmp_path / "tmp")


def test_a_full_batch_keeps_a_bounded_number_of_folders_open(tmp_path):
    """F5: the batch's bookkeeping is the stack of folders of the entry in flight."""
    s = opened(tmp_path)
    batch = s.new_batch()
    for i in range(300):
        batch.folder((f"top{i}", "a", "b"))
    assert len(batch.stack) == 3
    batch.folder(("x",))
    assert len(batch.stack) == 1
    batch.close()
    assert batch.stack == []


def test_the_free_space_check_counts_inodes_too(tmp_path, monkeypatch):
    s = opened(tmp_path)
    real = os.fstatvfs(s.save.fd)

    class FewInodes:
        def __getattr__(self, name):
            return {"f_favail": 10, "f_files": 100}.get(name, getattr(real, name))

    monkeypatch.setattr(store.os, "fstatvfs", lambda fd: FewInodes())
    assert s.shortfall(0, 9) == ""
    assert "inodes" in s.shortfall(0, 10)


@pytest.mark.parametrize("name", ["a." + "x" * 250, "x" * 255, "é" * 127, ".bashrc", "a" * 200 + ".tar.gz"])
def test_numbered_names_stay_within_the_name_limit(name):
    names = [candidate for _, (_, candidate) in zip(range(12), numbered(name))][1:]
    for candidate in names:
        assert 0 < len(candidate.encode("utf-8")) <= proto.MAX_NAME_BYTES
        proto.check_file_name(candidate)
    assert len(set(names)) == len(names)
