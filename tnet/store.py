"""The downloads directory: verified temp files placed without ever replacing.

``Store`` moves a verified temp file from TEMP_DIR into FILE_SAVE_DIR under
its own name or the first free ``name (n).ext`` (§4.2): ``link(2)`` reserves
and moves in one atomic step, and when TEMP_DIR is on another file system a
name is reserved with ``O_EXCL`` before a copy is renamed over it. Folders of
a batch go under one new top folder. Nothing here follows a link, and
nothing here replaces a file.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
from typing import Any, Callable, Dict, Iterator, Tuple

from . import protocol as proto

log = logging.getLogger("tnet")


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

    def place_file(self, temp_path: str, parts: Tuple[str, ...], tops: Dict[str, str]) -> str:
        """Move a verified temp file to its place; return the path it got."""
        folder = self.folder_for(parts[:-1], tops)
        os.chmod(temp_path, self.file_mode)
        try:
            # link(2) is atomic and never replaces: the reservation and the move in one.
            target = self.claim(folder, parts[-1], lambda target: os.link(temp_path, target))
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return self.copy_into(temp_path, folder, parts[-1])
        remove_quietly(temp_path)
        return target

    def copy_into(self, temp_path: str, folder: str, name: str) -> str:
        """TEMP_DIR on another file system: reserve the name with O_EXCL, copy
        to a hidden file beside it, then rename over our own reservation."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        target = self.claim(folder, name, lambda target: os.close(os.open(target, flags, self.file_mode)))
        fd, staging = tempfile.mkstemp(prefix=".tnet-", suffix=".part", dir=folder)
        try:
            os.close(fd)
            shutil.copyfile(temp_path, staging)
            os.chmod(staging, self.file_mode)
            os.replace(staging, target)
        except OSError:
            remove_quietly(staging)
            remove_quietly(target)
            raise
        remove_quietly(temp_path)
        return target

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


def numbered(name: str, start: int = 0) -> Iterator[Tuple[int, str]]:
    """``name``, then ``stem (n).ext`` from ``start`` on, each a valid name."""
    yield 0, name
    stem, ext = os.path.splitext(name)
    for n in range(max(start, 1), Store.MAX_TRIES):
        suffix = f" ({n}){ext}"
        room = proto.MAX_NAME_BYTES - len(suffix.encode("utf-8"))
        trimmed = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
        yield n, trimmed + suffix
