"""The local side of a send: the files and folders a request names, walked.

``Entries`` is an outgoing batch held compactly: per entry its name, the
index of its folder's entry and its size, so that 100,000 files cost a few
megabytes, not a dict each. ``Walk`` fills it a slice per ``step``, so that
a request naming a huge tree does not hold up the daemon's loop: the loop
calls ``step`` once per turn and serves everyone else in between. The walk
stops at MAX_ENTRIES, never follows a link inside a folder (links, sockets,
FIFOs and devices are skipped and reported), and checks every name as the
receiver will (§4.2), so that a user is told which file to rename.

Reads the file system (listdir, lstat); never opens a file, never writes.
"""

from __future__ import annotations

import os
import stat
import sys
from array import array
from typing import List, Tuple

from . import protocol as proto
from .util import printable

FOLDER = -1  # the size of a folder entry
WALK_SLICE = 2000  # folder children looked at per step: a few milliseconds
MAX_SKIPPED_SHOWN = 1000  # skipped paths reported one by one; the rest are counted


class Entries:
    """The entries of one outgoing batch, in the order they are sent: each
    folder before what it holds."""

    def __init__(self) -> None:
        self.names: List[str] = []
        self.parents = array("i")  # index of the folder entry holding it, -1 at the top
        self.sizes = array("q")  # bytes, or FOLDER
        self.tops: dict = {}  # index of a top entry -> its local path
        self.total = 0

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str, parent: int, size: int, local: str = "") -> int:
        index = len(self.names)
        if len(self.names) >= proto.MAX_ENTRIES:
            raise proto.LocalProtocolError("file-error", f"more than {proto.MAX_ENTRIES} files and folders")
        self.names.append(sys.intern(name))  # a tree sent many times over holds each name once
        self.parents.append(parent)
        self.sizes.append(size)
        if parent < 0:
            self.tops[index] = local
        self.total += max(size, 0)
        return index

    def is_folder(self, index: int) -> bool:
        return self.sizes[index] == FOLDER

    def size(self, index: int) -> int:
        return max(self.sizes[index], 0)

    def parts(self, index: int) -> Tuple[str, ...]:
        """The entry's path on the wire."""
        parts = []
        while index >= 0:
            parts.append(self.names[index])
            index = self.parents[index]
        return tuple(reversed(parts))

    def local_path(self, index: int) -> str:
        names = []
        while self.parents[index] >= 0:
            names.append(self.names[index])
            index = self.parents[index]
        return os.path.join(self.tops[index], *reversed(names))


class Walk:
    """The walk of a request's paths into ``Entries``, a slice per ``step``.

    Every path named and everything inside the folders is looked at step by
    step, each folder's children in name order; ``LocalProtocolError`` says
    why the batch cannot be sent (no such file, unreadable, a name that
    cannot be sent, too many entries).
    """

    def __init__(self, paths: List[str]) -> None:
        self.entries = Entries()
        self.skipped: List[str] = []  # at most MAX_SKIPPED_SHOWN of them
        self.skipped_count = 0
        # Folders being walked: (local path, entry index, depth, child names, next child)
        self.stack: List[Tuple[str, int, int, List[str], int]] = []
        self.paths = paths
        self.next_top = 0

    @staticmethod
    def check_top(path: str) -> Tuple[str, str, bool]:
        """(name on the wire, local path, is a folder) for a path the user named."""
        if not os.path.isabs(path):
            raise proto.LocalProtocolError("bad-request", f"{path}: give an absolute path")
        try:
            info = os.stat(path)  # a link the user names is followed: it is what they mean
            real = os.path.realpath(path)
        except OSError as exc:
            raise proto.LocalProtocolError("file-error", f"{printable(path)}: {exc.strerror}") from None
        except ValueError:  # a NUL, or a lone surrogate that no file name can hold
            raise proto.LocalProtocolError("file-error", f"{printable(path)}: not a possible file name") from None
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            raise proto.LocalProtocolError("file-error", f"{printable(path)}: not a regular file or folder")
        if not os.access(path, os.R_OK):
            raise proto.LocalProtocolError("file-error", f"{printable(path)}: permission denied")
        name = checked_name(os.path.basename(os.path.normpath(path)), path)
        return name, real, stat.S_ISDIR(info.st_mode)

    @property
    def done(self) -> bool:
        return not self.stack and self.next_top == len(self.paths)

    def step(self, budget: int = WALK_SLICE) -> bool:
        """Walk up to ``budget`` more children; True once the walk is complete."""
        while budget > 0 and not self.done:
            if not self.stack:
                self.add_top()
                budget -= 1
                continue
            folder, index, depth, children, position = self.stack[-1]
            if position == len(children):
                self.stack.pop()
                continue
            self.stack[-1] = (folder, index, depth, children, position + 1)
            self.add_child(folder, index, depth, children[position])
            budget -= 1
        return self.done

    def add_top(self) -> None:
        name, local, is_folder = self.check_top(self.paths[self.next_top])
        self.next_top += 1
        if is_folder:
            self.open_folder(local, self.entries.add(name, -1, FOLDER, local), 1)
        else:
            self.entries.add(name, -1, os.stat(local).st_size, local)

    def add_child(self, folder: str, parent: int, depth: int, name: str) -> None:
        path = os.path.join(folder, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return  # gone since the listing: it is not part of the batch
        except OSError as exc:
            raise proto.LocalProtocolError("file-error", f"{printable(path)}: {exc.strerror}") from None
        if stat.S_ISLNK(info.st_mode) or not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
            self.skip(path)  # a link may lead out of the tree; sockets, FIFOs, devices are not files
            return
        if depth >= proto.MAX_PATH_PARTS:
            raise proto.LocalProtocolError("file-error", f"{printable(path)}: deeper than {proto.MAX_PATH_PARTS} "
                                                         "levels")
        name = checked_name(name, path)
        if stat.S_ISDIR(info.st_mode):
            self.open_folder(path, self.entries.add(name, parent, FOLDER), depth + 1)
        else:
            self.entries.add(name, parent, info.st_size)

    def open_folder(self, path: str, index: int, depth: int) -> None:
        try:
            children = sorted(os.listdir(path))
        except OSError as exc:
            raise proto.LocalProtocolError("file-error", f"{printable(path)}: {exc.strerror}") from None
        self.stack.append((path, index, depth, children, 0))

    def skip(self, path: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < MAX_SKIPPED_SHOWN:
            self.skipped.append(path)


def checked_name(name: str, path: str) -> str:
    try:
        return proto.check_file_name(name)
    except proto.RemoteProtocolError as exc:
        raise proto.LocalProtocolError("bad-name", f"{printable(path)}: {exc.message}; rename it to send it") from None


def walk_now(paths: List[str]) -> Tuple[Entries, List[str]]:
    """The whole walk at once (tests, tools): entries and skipped paths."""
    walk = Walk(paths)
    while not walk.step():
        pass
    return walk.entries, walk.skipped

