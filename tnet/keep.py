"""Partial files kept for resume (§7), and the batches they belong to.

When an exchange breaks in the middle of a file that may be resumed, the
bytes that arrived stay in ``TEMP_DIR/.tnet-keep-<uid>/`` (mode 0700, this
user's alone, else not used) as
``<key>.part`` beside a small record ``<key>.json``: who sent it (host name
and address), its path in the batch, its size and the sender's modification
time, how many bytes are kept and their SHA-256. The key is a hash of the
receiving FILE_SAVE_DIR, the sender's name and the path, so a partial from
another sender with the same path is never mixed in, and a file that changed
(another size or time) starts over. A partial being written is locked
(``flock``); a daemon killed mid-file leaves it unlocked, and resumable.
Records older than RESUME_KEEP, unreadable or not matching their file are
removed at start and when met.

A batch's top folders as saved (``photos`` -> ``photos (1)``) and the files
it saved are kept as ``batch-<id>.json`` too, so that a send that resumes
after a dropped link puts the rest of its files where the first attempt put
the others, and a file saved just as the link went down (its `done` lost
with it) is not saved twice.

Everything is relative to the keep folder's descriptor (see ``store``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import protocol as proto
from .store import Root, TempFile, close_quietly, lock, open_folder, unlink_quietly, write_all

log = logging.getLogger("tnet")

KEEP_PREFIX = ".tnet-keep-"  # + the user id: TEMP_DIR may be a /tmp others write in too
RECORD_VERSION = 1
MAX_RECORD_BYTES = 4 * 1024 * 1024  # a partial's record is a few hundred bytes; a batch's, its folders and files
MAX_BATCH_SAVED = 20_000  # files of a batch remembered as saved; more may be saved twice after a dropped link
MAX_BATCH_TOPS = 4096  # top folders remembered per batch; more are not resumed into the same folders
KEY_HEX_CHARS = 32

_FLAGS = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def partial_key(save_dir: str, sender: str, parts: Tuple[str, ...]) -> str:
    text = "\0".join((save_dir, sender) + parts)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:KEY_HEX_CHARS]


class KeptFile(TempFile):
    """A partial in the keep folder, locked while a transfer writes it; a
    TempFile to the store (it is placed, copied or discarded alike)."""

    def __init__(self, keep: "Keep", key: str, fd: int, record: Dict[str, Any], offset: int, note: str) -> None:
        self.keep, self.key = keep, key
        self.dir_fd = os.dup(keep.fd)
        self.fd, self.name = fd, key + ".part"
        self.record = record
        self.offset = offset  # bytes held when claimed
        self.note = note  # why an earlier partial was not kept on, if it was not

    def discard(self) -> None:
        if self.name:
            unlink_quietly(self.key + ".json", self.dir_fd)
        super().discard()

    def release(self) -> None:
        """Let go of it as it is (its lock goes with the descriptor)."""
        self.close()
        close_quietly(self.dir_fd)
        self.dir_fd, self.name = -1, ""

    def keep_for_later(self, kept: int, sha256: str, now: float) -> None:
        """The transfer broke: record what is held, and let go of it."""
        self.record.update(kept=kept, sha256=sha256, time=now)
        try:
            write_record(self.dir_fd, self.key + ".json", self.record)
        except OSError as exc:
            log.warning("cannot keep %s for resume: %s", "/".join(self.record["path"]), exc.strerror)
            self.discard()
            return
        self.release()


class Keep:
    """The keep folder in TEMP_DIR: claim, keep, list and expire partials."""

    def __init__(self, root: Root, keep_s: float, wall: Callable[[], float]) -> None:
        self.root, self.keep_s, self.wall = root, keep_s, wall
        self.fd = -1

    def open(self) -> Tuple[int, int]:
        """Make or open the folder; remove what expired. (files, bytes)
        removed. OSError if the folder there is not ours alone (another user
        may have made it first in a shared TEMP_DIR: it is then not used)."""
        close_quietly(self.fd)
        self.fd = -1
        name = keep_dir_name()
        try:
            os.mkdir(name, 0o700, dir_fd=self.root.fd)
        except FileExistsError:
            pass
        fd = open_folder(name, self.root.fd)
        info = os.fstat(fd)
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            os.close(fd)
            raise OSError(errno.EPERM, f"{name} in TEMP_DIR is not this user's alone (mode "
                                       f"{stat.S_IMODE(info.st_mode):04o}); not keeping partial files there")
        self.fd = fd
        return self.clean()

    def ensure(self) -> None:
        """Made again if TEMP_DIR was removed and made again (``Store.check_folders``)."""
        try:
            gone = self.fd < 0 or os.fstat(self.fd).st_nlink == 0
        except OSError:
            gone = True
        if gone:
            try:
                self.open()
            except OSError as exc:
                raise proto.LocalProtocolError("temp-failed", f"TEMP_DIR: cannot keep partial files: {exc.strerror}") \
                    from None

    def close(self) -> None:
        close_quietly(self.fd)
        self.fd = -1

    def claim(self, key: str, sender: str, address: str, parts: Tuple[str, ...], size: int,
              mtime: int) -> Optional[KeptFile]:
        """The partial for this file, locked for us, or a new one; None when
        another transfer holds it (the file is then received without resume)."""
        want = {"v": RECORD_VERSION, "sender": sender, "path": list(parts), "size": size, "mtime": mtime}
        try:
            fd = os.open(key + ".part", _FLAGS | os.O_CREAT, 0o600, dir_fd=self.fd)
        except OSError as exc:
            log.warning("cannot keep files for resume in TEMP_DIR: %s", exc.strerror)
            return None
        try:
            lock(fd)
            return self.claimed(fd, key, want, address)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                log.warning("cannot keep files for resume in TEMP_DIR: %s", exc.strerror)
            return None  # being written right now by another transfer, or unusable

    def claimed(self, fd: int, key: str, want: Dict[str, Any], address: str) -> KeptFile:
        """The partial locked for us: kept on, or emptied if it does not match."""
        size = want["size"]
        record, note = self.read_record(key), ""
        held = os.fstat(fd).st_size
        if held and (record is None or {k: record.get(k) for k in want} != want or self.expired(record)):
            note = "a kept partial did not match its record, or its file changed, or it expired; starting over"
            held = 0
        if held > size:
            note, held = "a kept partial was longer than the file; starting over", 0
        if not held:
            os.ftruncate(fd, 0)
            record = dict(want, kept=0, sha256="")
        assert record is not None
        record.update(address=address, time=self.wall())
        try:
            write_record(self.fd, key + ".json", record)
        except OSError:
            pass  # kept without a record: unmatched next time, and started over then
        return KeptFile(self, key, fd, record, held, note)

    def read_record(self, key: str) -> Optional[Dict[str, Any]]:
        try:
            # Non-blocking: a FIFO in its place would hold the loop. Only a regular file is read.
            fd = os.open(key + ".json", os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0), dir_fd=self.fd)
        except OSError:
            return None
        try:
            data = os.read(fd, MAX_RECORD_BYTES + 1) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        except OSError:
            data = b""
        finally:
            os.close(fd)
        try:
            record = json.loads(data.decode("utf-8")) if len(data) <= MAX_RECORD_BYTES else None
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def expired(self, record: Dict[str, Any]) -> bool:
        when = record.get("time")
        return not isinstance(when, (int, float)) or when + self.keep_s < self.wall()

    def listing(self) -> List[Dict[str, Any]]:
        """The partials kept, for `tnet transfers` and `status`."""
        found = []
        for name in sorted(os.listdir(self.fd)):
            if not name.endswith(".part") or name.startswith("batch-"):
                continue
            record = self.read_record(name[:-len(".part")])
            try:
                held = os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_size
            except OSError:
                continue
            if record is None or not held:
                continue
            found.append({"file": "/".join(map(str, record.get("path", []))), "name": record.get("sender", ""),
                          "peer": record.get("address", ""), "size": record.get("size", 0), "kept": held,
                          "expires_s": round(record.get("time", 0) + self.keep_s - self.wall())})
        return found

    def clean(self) -> Tuple[int, int]:
        """Remove expired, unreadable and orphaned partials and records that no transfer holds."""
        files = size = 0
        for name in os.listdir(self.fd):
            key, dot, ext = name.rpartition(".")
            if ext not in ("part", "json") or not dot:
                continue
            record = self.read_record(key)
            if record is not None and not self.expired(record):
                continue
            removed = self.remove_unlocked(key, name)
            files, size = files + (removed > 0), size + max(removed, 0)
        return files, size

    def remove_unlocked(self, key: str, name: str) -> int:
        """Remove ``name`` unless its partial is being written; bytes freed, or -1."""
        try:
            info = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return -1
        if name.endswith(".part") and stat.S_ISREG(info.st_mode):
            try:
                fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=self.fd)
            except OSError:
                return -1
            try:
                lock(fd)
            except OSError:
                return -1  # in use
            finally:
                os.close(fd)
        unlink_quietly(name, self.fd)
        return info.st_size if name.endswith(".part") else 0

    # -- batches

    def batch_state(self, sender: str, batch: str) -> Tuple[Dict[str, str], Dict[str, Any]]:
        """What an earlier attempt of ``batch`` made: its top folders (as sent
        -> as saved) and the files it saved (path -> [saved path, size,
        sha256]). A record is read as the claim it is: a name that is not one
        safe file name is dropped, never used as a path."""
        record = self.read_record(batch_key(sender, batch))
        if record is None or self.expired(record) or record.get("sender") != sender:
            return {}, {}
        tops, saved = record.get("tops"), record.get("saved")
        good_tops = {k: v for k, v in tops.items() if safe_name(k) and safe_name(v)} if isinstance(tops, dict) else {}
        good_saved = {k: v for k, v in saved.items() if isinstance(k, str) and isinstance(v, list) and len(v) == 3
                      and isinstance(v[0], str) and isinstance(v[1], int) and isinstance(v[2], str)} \
            if isinstance(saved, dict) else {}
        return good_tops, good_saved

    def keep_batch(self, sender: str, batch: str, tops: Dict[str, str], saved: Dict[str, Any]) -> None:
        if not tops and not saved:
            return
        files = list(saved.items())[:MAX_BATCH_SAVED]
        while True:  # the folders always; as many of the files as fit in a record
            record = {"v": RECORD_VERSION, "sender": sender, "tops": dict(list(tops.items())[:MAX_BATCH_TOPS]),
                      "saved": dict(files), "time": self.wall()}
            try:
                write_record(self.fd, batch_key(sender, batch) + ".json", record)
                return
            except OSError as exc:
                if exc.errno != errno.EFBIG or not files:
                    log.warning("cannot keep a batch's folders for resume: %s", exc.strerror)
                    return
                files = files[:len(files) // 2]

    def forget_batch(self, sender: str, batch: str) -> None:
        unlink_quietly(batch_key(sender, batch) + ".json", self.fd)


def keep_dir_name() -> str:
    return f"{KEEP_PREFIX}{os.geteuid()}"


def safe_name(name: Any) -> bool:
    try:
        proto.check_file_name(name)
    except proto.RemoteProtocolError:
        return False
    return True


def batch_key(sender: str, batch: str) -> str:
    return "batch-" + hashlib.sha256(f"{sender}\0{batch}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


def write_record(dir_fd: int, name: str, record: Dict[str, Any]) -> None:
    """``record`` as ``name``, whole or not at all (a new file renamed over)."""
    data = json.dumps(record, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if len(data) > MAX_RECORD_BYTES:
        raise OSError(errno.EFBIG, "record too large")
    temp = name + ".new"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600, dir_fd=dir_fd)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)
    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
