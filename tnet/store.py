"""The downloads directory: verified temp files placed without ever replacing.

``Store`` moves a verified temp file from TEMP_DIR into FILE_SAVE_DIR under
its own name or the first free ``name (n).ext`` (§4.2): ``link(2)`` reserves
and moves in one atomic step. When TEMP_DIR is on another file system a
``Copy`` does the work a slice per turn of the loop, so that a large file
does not hold up every other transfer while it is copied. Folders of a batch go under one new top folder.
Nothing here follows a link, and nothing here replaces a file.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from . import protocol as proto

log = logging.getLogger("tnet")

COPY_SLICE_BYTES = 8 * 1024 * 1024  # copied per turn of the loop: milliseconds, not a stall
RELEASE_SLICE_BYTES = 256 * 1024 * 1024  # of a copied temp file, freed per turn (~40 ms on tmpfs)


def write_all(fd: int, data: Any) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def remove_quietly(path: str) -> None:
    """Unlink ``path``; a missing file is the goal, any other failure is
    logged: cleaning up must never take the daemon down."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror)


class Store:
    """Moves verified temp files into FILE_SAVE_DIR without ever replacing
    anything: a taken name becomes ``name (1).ext``, ``name (2).ext``, …"""

    MAX_TRIES = 10_000
    MAX_REMEMBERED = 4096  # names whose last number is remembered

    def __init__(self, save_dir: str, temp_dir: str) -> None:
        self.save_dir = os.path.abspath(save_dir)
        self.temp_dir = os.path.abspath(temp_dir)
        umask = os.umask(0)
        os.umask(umask)
        self.file_mode = 0o666 & ~umask
        self.dir_mode = 0o777 & ~umask
        self.last_number: Dict[Tuple[str, str], int] = {}

    def claim(self, folder: str, name: str, create: Callable[[str], Any]) -> str:
        """Make ``name`` in ``folder`` with ``create``, or its first free
        numbered variant, and return the path. ``create`` must raise
        FileExistsError on a taken name and never replace one. The last
        number given to a name is remembered, so that a thousand copies cost
        a thousand tries, not half a million."""
        key = (folder, name)
        for n, candidate in numbered(name, self.last_number.get(key, 0)):
            target = os.path.join(folder, candidate)
            try:
                create(target)
            except FileExistsError:
                continue
            if len(self.last_number) >= self.MAX_REMEMBERED:
                self.last_number.clear()
            self.last_number[key] = n
            return target
        raise OSError(errno.EEXIST, f"no free name for {name}")

    def place_file(self, temp_path: str, parts: Tuple[str, ...], tops: Dict[str, str]) -> Optional[str]:
        """Move a verified temp file to its place; return the path it got, or
        None when it cannot be linked there (TEMP_DIR on another file
        system): ``start_copy`` then."""
        folder = self.folder_for(parts[:-1], tops)
        os.chmod(temp_path, self.file_mode)
        try:
            # link(2) is atomic and never replaces: the reservation and the move in one.
            target = self.claim(folder, parts[-1], lambda target: os.link(temp_path, target))
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return None
        remove_quietly(temp_path)
        return target

    def start_copy(self, temp_path: str, parts: Tuple[str, ...], tops: Dict[str, str]) -> "Copy":
        return Copy(self, temp_path, self.folder_for(parts[:-1], tops), parts[-1])

    def folder_for(self, parts: Tuple[str, ...], tops: Dict[str, str]) -> str:
        """The folder for ``parts`` under FILE_SAVE_DIR, created as needed. The
        top folder of a batch is new (``DIR (1)`` if ``DIR`` exists); below it
        only this batch writes, and no link is ever followed."""
        if not parts:
            return self.save_dir
        top = tops.get(parts[0])
        if top is None:
            top = self.claim(self.save_dir, parts[0], lambda path: os.mkdir(path, self.dir_mode))
            tops[parts[0]] = top
        path = top
        for part in parts[1:]:
            path = os.path.join(path, part)
            try:
                os.mkdir(path, self.dir_mode)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    raise OSError(errno.ENOTDIR, f"{part} exists and is not a folder") from None
        return path


class Copy:
    """A verified temp file on its way into FILE_SAVE_DIR from another file
    system, a slice of work per ``step``: the bytes go to a hidden file in the
    target folder; then the temp file is freed by truncation, a slice at a
    time too (freeing a 1 GiB tmpfs file at once holds the loop ~0.2 s); then
    the copy takes its name. ``abandon`` removes the copy and the temp file."""

    def __init__(self, store: Store, temp_path: str, folder: str, name: str) -> None:
        self.store, self.folder, self.name = store, folder, name
        self.temp_path = temp_path
        self.target = ""  # known once placed
        self.staging = ""
        self.src = self.dst = -1
        try:
            self.dst, self.staging = tempfile.mkstemp(prefix=".tnet-", suffix=".part", dir=folder)
            self.src = os.open(temp_path, os.O_RDWR)  # writable, to be freed by truncation
            self.size = os.fstat(self.src).st_size
        except OSError:
            self.abandon()
            raise
        self.copied = 0

    def step(self) -> bool:
        """The next slice of work; True once the file is in place. OSError if it cannot be."""
        if self.copied < self.size:
            n = copy_slice(self.src, self.dst, self.copied, min(COPY_SLICE_BYTES, self.size - self.copied))
            if n == 0:
                raise OSError(errno.EIO, "the temp file shrank while being copied")
            self.copied += n
            return False
        left = os.fstat(self.src).st_size
        if left:
            os.ftruncate(self.src, max(left - RELEASE_SLICE_BYTES, 0))
            return False
        os.fchmod(self.dst, self.store.file_mode)
        self.close_files()
        remove_quietly(self.temp_path)
        self.temp_path = ""
        self.target = self.store.claim(self.folder, self.name, self.put)
        remove_quietly(self.staging)  # its second name, after a link
        self.staging = ""
        return True

    def put(self, target: str) -> None:
        """The copy under ``target``, never replacing a file: link(2) where the
        file system has links; else an O_EXCL reservation renamed over (which
        ext4 follows with a flush of the whole file, hence not the first choice)."""
        try:
            os.link(self.staging, target)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            os.close(os.open(target, flags, self.store.file_mode))
            try:
                os.replace(self.staging, target)
            except OSError:
                remove_quietly(target)  # our empty reservation
                raise

    def abandon(self) -> None:
        self.close_files()
        for path in (self.staging, self.temp_path):
            if path:
                remove_quietly(path)

    def close_files(self) -> None:
        for fd in (self.src, self.dst):
            if fd >= 0:
                os.close(fd)
        self.src = self.dst = -1


def copy_slice(src: int, dst: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes from ``offset`` in ``src`` to the end of
    ``dst``: inside the kernel where sendfile takes a file (Linux), else
    through a buffer."""
    try:
        return os.sendfile(dst, src, offset, count)
    except OSError as exc:  # macOS: sockets only
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
    data = os.pread(src, min(count, 1024 * 1024), offset)
    write_all(dst, data)
    return len(data)


def numbered(name: str, start: int = 0) -> Iterator[Tuple[int, str]]:
    """``name``, then ``stem (n).ext`` from ``start`` on, each a valid name."""
    yield 0, name
    stem, ext = os.path.splitext(name)
    for n in range(max(start, 1), Store.MAX_TRIES):
        suffix = f" ({n}){ext}"
        room = proto.MAX_NAME_BYTES - len(suffix.encode("utf-8"))
        trimmed = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
        yield n, trimmed + suffix
