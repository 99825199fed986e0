"""The downloads directory: verified temp files placed without ever replacing.

Everything here works on directory descriptors, from TEMP_DIR and
FILE_SAVE_DIR down (§4.2): a folder is opened once, ``O_NOFOLLOW``, right
after it was found or made, and everything below it is named relative to
that descriptor, so no path component is resolved again once it was made. A
local user who can write in FILE_SAVE_DIR may rename folders or plant links
there meanwhile, but cannot make the daemon write anywhere else.

* ``Root`` is one configured folder (TEMP_DIR or FILE_SAVE_DIR) and its
  descriptor, checked at each offer: made again if removed, never followed
  to a new place if a link was put in its stead.
* ``WorkDir`` is this daemon's private folder (``.tnet-<id>``, mode 0700)
  inside a root: temp files grow there, and a lock held on ``lock`` for the
  daemon's life tells a later daemon which folders are leftovers of one that
  was killed (``remove_leftovers``).
* ``Batch`` places one incoming batch: the folders of the entry in flight as
  a stack of descriptors (at most MAX_PATH_PARTS deep, whatever the batch's
  size), and ``claim`` for a free ``name (n).ext``. ``link(2)`` reserves and
  moves in one atomic step and never replaces a name.
* ``Copy``: when TEMP_DIR is on another file system, a verified file is
  copied a slice per turn of the loop, so that a large file does not hold up
  every other transfer.

Nothing here follows a link, and nothing here replaces a file.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from . import protocol as proto

log = logging.getLogger("tnet")

COPY_SLICE_BYTES = 8 * 1024 * 1024  # copied per turn of the loop: milliseconds, not a stall
RELEASE_SLICE_BYTES = 256 * 1024 * 1024  # of a copied temp file, freed per turn (~40 ms on tmpfs)
BUFFER_COPY_BYTES = 1024 * 1024  # where sendfile cannot copy between files
WORK_PREFIX = proto.WORK_FOLDER_PREFIX
LOCK_NAME = "lock"  # held with flock for the daemon's life
LOCKLESS_GRACE_S = 60.0  # a work folder with no lock this old is a leftover, not one being made
MAX_TRIES = 10_000  # numbered names tried before a name counts as taken for good
MAX_REMEMBERED = 4096  # names whose last number is remembered
MAX_TOPS_REMEMBERED = 4096  # top folders of a batch, as sent -> as saved; more are claimed anew when met again

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
_NEW_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
# Read-only, so that holding it does not keep a file system from being remounted read-only.
_LOCK_FLAGS = os.O_RDONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
# Every call the store makes relative to a folder descriptor; without them it
# would have to resolve paths again, and race.
_DIR_FD_CALLS = (os.open, os.mkdir, os.link, os.unlink, os.stat, os.rmdir, os.rename)


class StoreError(Exception):
    """A folder cannot be used; the message names the variable and why."""


def write_all(fd: int, data: Any) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def remove_quietly(path: str) -> None:
    """Unlink ``path``; a missing file is the goal, any other failure is
    logged: cleaning up must never take the daemon down."""
    unlink_quietly(path, None)


def unlink_quietly(name: str, dir_fd: Optional[int]) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", name, exc.strerror)


def close_quietly(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError as exc:
            log.warning("cannot close a descriptor: %s", exc.strerror)


def open_folder(name: str, dir_fd: Optional[int] = None) -> int:
    """A descriptor of folder ``name``; a link there is refused (ELOOP or ENOTDIR), never followed."""
    fd = os.open(name, _FOLDER_FLAGS, dir_fd=dir_fd)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):  # where O_DIRECTORY is unknown
        os.close(fd)
        raise OSError(errno.ENOTDIR, f"{name} is not a folder")
    return fd


def check_dir_fd_support() -> None:
    missing = [call.__name__ for call in _DIR_FD_CALLS if call not in os.supports_dir_fd]
    if missing or not _NOFOLLOW:
        raise StoreError("this system cannot work relative to folder descriptors "
                         f"({', '.join(missing) or 'O_NOFOLLOW'}): tnet will not race on paths instead")


class Root:
    """TEMP_DIR or FILE_SAVE_DIR: its path as configured and its descriptor."""

    def __init__(self, var: str, path: str, code: str) -> None:
        self.var, self.path, self.code = var, os.path.abspath(path), code
        self.fd = -1
        self.identity = (0, 0)  # (st_dev, st_ino) of the folder the descriptor holds

    def open(self) -> None:
        """Make the folder if missing and hold it. The configured path may
        itself lead through links (~/Downloads -> /data/dl): it is the
        owner's choice, followed this once."""
        os.makedirs(self.path, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
        info = os.fstat(fd)
        if not stat.S_ISDIR(info.st_mode):
            os.close(fd)
            raise OSError(errno.ENOTDIR, "not a folder")
        close_quietly(self.fd)
        self.fd, self.identity = fd, (info.st_dev, info.st_ino)

    def ensure(self) -> bool:
        """Still the folder we hold (True), or made again after it was removed
        (False: the caller's work folders in it are gone). A link put in its
        place is refused: LocalProtocolError."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            info = None
        except OSError as exc:
            raise proto.LocalProtocolError(self.code, f"{self.var}={self.path}: {exc.strerror}") from None
        if info is not None and (info.st_dev, info.st_ino) == self.identity:
            return True
        if info is not None and os.path.islink(self.path):
            raise proto.LocalProtocolError(self.code, f"{self.var}={self.path} was replaced by a link; "
                                                      "not following it (restart the daemon to accept it)")
        try:
            self.open()
        except OSError as exc:
            raise proto.LocalProtocolError(self.code, f"{self.var}={self.path}: cannot create it: "
                                                      f"{exc.strerror}") from None
        log.warning("%s=%s was removed or replaced; using the folder now there", self.var, self.path)
        return False

    def close(self) -> None:
        close_quietly(self.fd)
        self.fd = -1


class WorkDir:
    """This daemon's private folder inside a root, locked for its life."""

    def __init__(self, root: Root, token: str) -> None:
        self.root = root
        self.name = WORK_PREFIX + token
        os.mkdir(self.name, 0o700, dir_fd=root.fd)
        self.fd = open_folder(self.name, root.fd)
        try:
            self.lock_fd = os.open(LOCK_NAME, _LOCK_FLAGS, 0o600, dir_fd=self.fd)
            lock(self.lock_fd)
        except OSError:
            os.close(self.fd)
            raise
        self.serial = 0
        self.users = 0  # copies using it (a staging folder), which remove it after the last

    def alive(self) -> bool:
        """False once someone removed the folder (rm -r TEMP_DIR)."""
        return os.fstat(self.fd).st_nlink > 0

    def new_file(self) -> Tuple[int, str]:
        """A new file, 0600, its descriptor and name in this folder."""
        while True:
            self.serial += 1
            name = f"{self.serial}.part"
            try:
                return os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=self.fd), name
            except FileExistsError:
                continue  # not ours to reuse

    def remove(self) -> None:
        """At a clean stop: the folder and what is left in it. Once."""
        if self.fd < 0:
            return
        empty_folder(self.fd)
        ours = os.fstat(self.fd)
        close_quietly(self.lock_fd)
        close_quietly(self.fd)
        self.fd = self.lock_fd = -1
        try:
            # Its root may have been removed and made again: the name there may be a newer folder's.
            if not os.path.samestat(os.stat(self.name, dir_fd=self.root.fd, follow_symlinks=False), ours):
                return
            os.rmdir(self.name, dir_fd=self.root.fd)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot remove %s in %s: %s", self.name, self.root.path, exc.strerror)


def lock(fd: int) -> None:
    import fcntl  # Unix only, as is the whole daemon

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def empty_folder(fd: int) -> Tuple[int, int]:
    """Remove the files in a work folder; (files, bytes) removed."""
    files = size = 0
    for entry in os.scandir(fd):
        try:
            info = entry.stat(follow_symlinks=False)
            os.unlink(entry.name, dir_fd=fd)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove leftover %s: %s", entry.name, exc.strerror)
            continue
        if entry.name != LOCK_NAME:
            files, size = files + 1, size + info.st_size
    return files, size


def remove_leftovers(root: Root, now: float) -> Tuple[int, int]:
    """Remove the work folders in ``root`` of daemons of this user that are
    gone (their lock is free): what a daemon killed mid-transfer left. Other
    users' folders and a running daemon's are never touched. (files, bytes)."""
    files = size = 0
    for entry in os.scandir(root.fd):
        if not proto.is_work_folder_name(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                continue
            fd = open_folder(entry.name, root.fd)
        except OSError:
            continue
        try:
            if not is_leftover(fd, now - info.st_mtime):
                continue
            removed = empty_folder(fd)
            os.rmdir(entry.name, dir_fd=root.fd)
            files, size = files + removed[0], size + removed[1]
        except OSError as exc:
            log.warning("cannot remove leftover %s in %s: %s", entry.name, root.path, exc.strerror)
        finally:
            os.close(fd)
    return files, size


def is_leftover(fd: int, age_s: float) -> bool:
    try:
        lock_fd = os.open(LOCK_NAME, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
    except FileNotFoundError:
        return age_s > LOCKLESS_GRACE_S  # a daemon between mkdir and its lock, or one long gone
    try:
        lock(lock_fd)  # released when we close it: the folder is removed meanwhile, not reused
    except OSError:
        return False  # held: its daemon runs
    finally:
        os.close(lock_fd)
    return True


class Store:
    """TEMP_DIR and FILE_SAVE_DIR, held by descriptor; new temp files; batches."""

    def __init__(self, save_dir: str, temp_dir: str, token: str) -> None:
        self.save = Root("FILE_SAVE_DIR", save_dir, "save-failed")
        self.temp = Root("TEMP_DIR", temp_dir, "temp-failed")
        self.token = token
        self.work: Optional[WorkDir] = None  # in TEMP_DIR
        self.staging: Optional[WorkDir] = None  # in FILE_SAVE_DIR, while copies from another file system run
        umask = os.umask(0)
        os.umask(umask)
        self.file_mode = 0o666 & ~umask
        self.dir_mode = 0o777 & ~umask
        self.last_number: Dict[Tuple[str, str], int] = {}

    @property
    def save_dir(self) -> str:
        return self.save.path

    @property
    def temp_dir(self) -> str:
        return self.temp.path

    def open(self, now: float) -> None:
        """Hold both folders, clear what a killed daemon left, make our work
        folder; StoreError saying which folder and why."""
        check_dir_fd_support()
        for root in (self.save, self.temp):
            try:
                root.open()
            except OSError as exc:
                raise StoreError(f"{root.var}={root.path}: cannot create it: {exc.strerror}") from None
            if not os.access(root.path, os.W_OK | os.X_OK):
                raise StoreError(f"{root.var}={root.path}: not a writable folder")
            files, size = remove_leftovers(root, now)
            if files:
                log.info("removed %d leftover temp files (%d bytes) in %s", files, size, root.path)
        try:
            self.work = WorkDir(self.temp, self.token)
        except OSError as exc:
            raise StoreError(f"TEMP_DIR={self.temp.path}: cannot make a work folder: {exc.strerror}") from None

    def close(self) -> None:
        for work in (self.work, self.staging):
            if work is not None:
                work.remove()
        self.work = self.staging = None
        self.save.close()
        self.temp.close()

    def other_file_system(self) -> bool:
        return self.save.identity[0] != self.temp.identity[0]

    def check_folders(self) -> None:
        """Before an offer is taken: both folders there (made again if they
        were removed meanwhile), or LocalProtocolError saying which and why."""
        if not self.temp.ensure() or self.work is None or not self.work.alive():
            self.work = self.new_work_dir(self.temp)
        if not self.save.ensure():
            self.staging = None  # gone with the folder; the copies using it fail, a new one is made as needed

    def new_work_dir(self, root: Root) -> WorkDir:
        try:
            return WorkDir(root, self.token)
        except OSError as exc:
            raise proto.LocalProtocolError(root.code, f"{root.var}={root.path}: cannot make a work folder: "
                                                      f"{exc.strerror}") from None

    def shortfall(self, size: int, entries: int) -> str:
        """'' if ``size`` bytes and ``entries`` new files and folders fit, else why not."""
        needs = {self.save.identity[0]: (self.save, size, entries + 1)}
        if self.other_file_system():
            needs[self.temp.identity[0]] = (self.temp, size, 1)
        for root, need_bytes, need_inodes in needs.values():
            fs = os.fstatvfs(root.fd)
            free = fs.f_bavail * fs.f_frsize
            if free < need_bytes:
                return f"need {need_bytes} bytes, {free} free in {root.path}"
            # f_files 0: a file system without a fixed number of inodes (btrfs)
            if fs.f_files and fs.f_favail < need_inodes:
                return f"need {need_inodes} inodes, {fs.f_favail} free in {root.path}"
        return ""

    def new_temp(self) -> "TempFile":
        if self.work is None:
            raise OSError(errno.ENOENT, "no work folder in TEMP_DIR")
        return TempFile(self.work)

    def take_staging(self) -> WorkDir:
        """Our work folder in FILE_SAVE_DIR, made for the first copy that needs
        it and removed after the last (``release_staging``): nothing hidden
        stays in the downloads folder."""
        if self.staging is None:
            self.staging = WorkDir(self.save, self.token)
        self.staging.users += 1
        return self.staging

    def release_staging(self, work: WorkDir) -> None:
        work.users -= 1
        if work.users == 0:
            work.remove()
            if self.staging is work:
                self.staging = None

    def claim(self, dir_fd: int, shown: str, name: str, create: Callable[[str], Any]) -> str:
        """Make ``name`` in the folder ``dir_fd`` (shown as ``shown``) with
        ``create``, or its first free numbered variant, and return the name
        it got. ``create`` must raise FileExistsError on a taken name and
        never replace one. The last number given to a name is remembered, so
        that a thousand copies cost a thousand tries, not half a million."""
        key = (shown, name)
        for n, candidate in numbered(name, self.last_number.get(key, 0)):
            try:
                create(candidate)
            except FileExistsError:
                continue
            if len(self.last_number) >= MAX_REMEMBERED:
                self.last_number.clear()
            self.last_number[key] = n
            return candidate
        raise OSError(errno.EEXIST, f"no free name for {name}")

    def mkdir_in(self, dir_fd: int) -> Callable[[str], None]:
        return lambda name: os.mkdir(name, self.dir_mode, dir_fd=dir_fd)

    def new_batch(self, tops: Optional[Dict[str, str]] = None) -> "Batch":
        return Batch(self, tops)


class TempFile:
    """A new file in the work folder, where an incoming file grows."""

    def __init__(self, work: WorkDir) -> None:
        self.dir_fd = os.dup(work.fd)  # the folder stays ours even if TEMP_DIR is removed and made again
        try:
            self.fd, self.name = work.new_file()
        except OSError:
            os.close(self.dir_fd)
            raise

    def close(self) -> None:
        close_quietly(self.fd)
        self.fd = -1

    def discard(self) -> None:
        """Nothing of it stays."""
        self.close()
        if self.name:
            unlink_quietly(self.name, self.dir_fd)
            self.name = ""
        close_quietly(self.dir_fd)
        self.dir_fd = -1


class Batch:
    """Where the entries of one incoming batch go. The folders of the entry
    in flight are a stack of descriptors; an entry elsewhere pops the stack
    to the common part and descends again. A top folder is always new
    (``DIR (1)`` if ``DIR`` exists); below it only this batch writes."""

    def __init__(self, store: Store, tops: Optional[Dict[str, str]] = None) -> None:
        self.store = store
        self.stack: List[Tuple[str, int, str]] = []  # (name as sent, descriptor, path as saved)
        # Top folders as sent -> as saved (by an earlier attempt of the same batch, too: §7).
        self.tops: Dict[str, str] = dict(tops or {})

    def folder(self, parts: Tuple[str, ...]) -> Tuple[int, str]:
        """The folder for ``parts`` under FILE_SAVE_DIR, made as needed: its
        descriptor (valid until the next call) and its path, for people."""
        keep = 0
        while keep < min(len(parts), len(self.stack)) and self.stack[keep][0] == parts[keep]:
            keep += 1
        self.pop_to(keep)
        store = self.store
        for part in parts[keep:]:
            if self.stack:
                parent_fd, shown = self.stack[-1][1], self.stack[-1][2]
                name = part
                try:
                    os.mkdir(part, store.dir_mode, dir_fd=parent_fd)
                except FileExistsError:
                    pass  # this batch made it; a link planted in its place is refused just below
            else:
                parent_fd, shown = store.save.fd, store.save.path
                name = self.top_folder(part)
            try:
                fd = open_folder(name, parent_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise OSError(exc.errno, f"{part} is not a folder here (a link or a file); "
                                             "not following it") from None
                raise
            self.stack.append((part, fd, os.path.join(shown, name)))
        if not self.stack:
            return store.save.fd, store.save.path
        return self.stack[-1][1], self.stack[-1][2]

    def top_folder(self, part: str) -> str:
        """The saved name of top folder ``part``: the one this batch made, or a new one."""
        store = self.store
        known = self.tops.get(part)
        if known is not None:
            try:
                os.stat(known, dir_fd=store.save.fd, follow_symlinks=False)
                return known  # opened below without following a link
            except FileNotFoundError:
                pass  # removed meanwhile: a new one
        name = store.claim(store.save.fd, store.save.path, part, store.mkdir_in(store.save.fd))
        if len(self.tops) < MAX_TOPS_REMEMBERED:
            self.tops[part] = name
        return name

    def pop_to(self, depth: int) -> None:
        for _, fd, _ in self.stack[depth:]:
            close_quietly(fd)
        del self.stack[depth:]

    def place(self, temp: TempFile, parts: Tuple[str, ...]) -> Optional[str]:
        """Move a verified temp file to its place; return the path it got, or
        None when it cannot be linked there (TEMP_DIR on another file
        system): ``start_copy`` then."""
        folder_fd, shown = self.folder(parts[:-1])
        os.fchmod(temp.fd, self.store.file_mode)

        def link(candidate: str) -> None:
            os.link(temp.name, candidate, src_dir_fd=temp.dir_fd, dst_dir_fd=folder_fd, follow_symlinks=False)

        try:
            # link(2) is atomic and never replaces: the reservation and the move in one.
            name = self.store.claim(folder_fd, shown, parts[-1], link)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return None
        temp.discard()  # its temp name
        return os.path.join(shown, name)

    def start_copy(self, temp: TempFile, parts: Tuple[str, ...]) -> "Copy":
        folder_fd, shown = self.folder(parts[:-1])
        return Copy(self.store, temp, folder_fd, shown, parts[-1])

    def close(self) -> None:
        self.pop_to(0)


class Copy:
    """A verified temp file on its way into FILE_SAVE_DIR from another file
    system, a slice of work per ``step``: the bytes go to a new file in our
    work folder in FILE_SAVE_DIR; then the temp file is freed by truncation,
    a slice at a time too (freeing a 1 GiB tmpfs file at once holds the loop
    ~0.2 s); then the copy takes its name. ``abandon`` removes both."""

    def __init__(self, store: Store, temp: TempFile, folder_fd: int, shown: str, name: str) -> None:
        self.store, self.temp, self.shown, self.name = store, temp, shown, name
        self.target = ""  # known once placed
        self.folder_fd = os.dup(folder_fd)
        self.staging: Optional[TempFile] = None
        self.work: Optional[WorkDir] = None  # the staging folder, while the copy uses it
        self.size = os.fstat(temp.fd).st_size
        self.copied = 0

    def step(self) -> bool:
        """The next slice of work; True once the file is in place. OSError if it cannot be."""
        if self.work is None:
            self.work = self.store.take_staging()
            self.staging = TempFile(self.work)
        assert self.staging is not None
        if self.copied < self.size:
            n = copy_slice(self.temp.fd, self.staging.fd, self.copied, min(COPY_SLICE_BYTES, self.size - self.copied))
            if n == 0:
                raise OSError(errno.EIO, "the temp file shrank while being copied")
            self.copied += n
            return False
        left = os.fstat(self.temp.fd).st_size
        if left:
            os.ftruncate(self.temp.fd, max(left - RELEASE_SLICE_BYTES, 0))
            return False
        os.fchmod(self.staging.fd, self.store.file_mode)
        self.temp.discard()
        self.target = os.path.join(self.shown, self.store.claim(self.folder_fd, self.shown, self.name, self.put))
        self.abandon()  # the staging name, after a link
        return True

    def put(self, target: str) -> None:
        """The copy under ``target``, never replacing a file: link(2) where the
        file system has links; else an O_EXCL reservation renamed over (which
        ext4 follows with a flush of the whole file, hence not the first choice)."""
        staging = self.staging
        assert staging is not None
        try:
            os.link(staging.name, target, src_dir_fd=staging.dir_fd, dst_dir_fd=self.folder_fd,
                    follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            os.close(os.open(target, _NEW_FILE_FLAGS, self.store.file_mode, dir_fd=self.folder_fd))
            try:
                os.rename(staging.name, target, src_dir_fd=staging.dir_fd, dst_dir_fd=self.folder_fd)
            except OSError:
                unlink_quietly(target, self.folder_fd)  # our empty reservation
                raise
            staging.name = ""  # renamed: nothing left to remove under that name

    def abandon(self) -> None:
        """Nothing of the copy stays but a file placed under its name."""
        if self.staging is not None:
            self.staging.discard()
            self.staging = None
        if self.work is not None:
            self.store.release_staging(self.work)
            self.work = None
        self.temp.discard()
        close_quietly(self.folder_fd)
        self.folder_fd = -1


def copy_slice(src: int, dst: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes from ``offset`` in ``src`` to the end of
    ``dst``: inside the kernel where sendfile takes a file (Linux), else
    through a buffer."""
    try:
        return os.sendfile(dst, src, offset, count)
    except OSError as exc:  # macOS: sockets only
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
    data = os.pread(src, min(count, BUFFER_COPY_BYTES), offset)
    write_all(dst, data)
    return len(data)


def numbered(name: str, start: int = 0) -> Iterator[Tuple[int, str]]:
    """``name``, then ``stem (n).ext`` from ``start`` on, each a valid name of
    at most MAX_NAME_BYTES: a long stem is cut, and an extension too long to
    keep beside a number is dropped."""
    yield 0, name
    stem, ext = os.path.splitext(name)
    if not stem or len(ext.encode("utf-8")) > proto.MAX_NAME_BYTES // 2:
        stem, ext = name, ""  # ".bashrc", or a name that is mostly "extension"
    for n in range(max(start, 1), MAX_TRIES):
        suffix = f" ({n}){ext}"
        room = proto.MAX_NAME_BYTES - len(suffix.encode("utf-8"))
        trimmed = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
        yield n, trimmed + suffix
