"""Test harness: real daemon processes on loopback addresses (127.0.x.y), each
with its own sockets, downloads and temp folders, discovering each other via
127.255.255.255 on a discovery port private to the test. Nothing here ever
sends to another address. Waits poll with a deadline; nothing sleeps to
synchronise."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK_BROADCAST = "127.255.255.255"
_hosts = itertools.count(0)
# Concurrent test runs on one machine must not share addresses: pick a second
# octet from the process id.
_NET = 1 + os.getpid() % 200


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "a condition",
               interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy or the deadline passes.
    ``interval``: longer for a predicate that starts a process each time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def next_address() -> str:
    """A fresh loopback address per daemon, so no test inherits another's state;
    one whose data port another run on this machine holds is passed over."""
    while True:
        n = next(_hosts)
        address = f"127.{_NET}.{n // 250}.{2 + n % 250}"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, 0xC00D))
            except OSError:
                continue
        return address


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TNET", "BIND_", "BROADCAST_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


class EventReader:
    """Collects the JSON lines of an events socket in a thread; tests wait on them."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.events: List[Dict[str, Any]] = []
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            with self._cond:
                self.events.extend(json.loads(line) for line in lines if line.strip())
                self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Dict[str, Any]], bool], timeout: float = 30.0,
                 what: str = "an event") -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise AssertionError(f"no {what} within {timeout} s; got {self.events[-20:]}")
                self._cond.wait(left)

    def of(self, kind: str) -> List[Dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == kind]

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """One `tnet daemon` process and its folders."""

    def __init__(self, root: Path, sockdir: str, name: str, address: str, broadcast_port: int,
                 env: Optional[Dict[str, str]] = None) -> None:
        self.name = name
        self.address = address
        self.dir = root / name
        self.downloads = self.dir / "Downloads"
        self.temp = self.dir / "tmp"
        self.temp.mkdir(parents=True)
        self.env = base_env()
        self.env.update({
            "BIND_ADDRESS": address,
            "BROADCAST_ADDRESS": LOOPBACK_BROADCAST,
            "BROADCAST_PORT": str(broadcast_port),
            "HOST_NAME": name,
            "FILE_SAVE_DIR": str(self.downloads),
            "TEMP_DIR": str(self.temp),
            "COMMAND_SOCKET": os.path.join(sockdir, name, "commands"),
            "EVENT_SOCKET": os.path.join(sockdir, name, "events"),
            "LOG_LEVEL": "debug",
            "STATE_DIR": str(self.dir / "state"),  # never the real home's
        })
        self.env.update(env or {})
        self.log_path = self.dir / "daemon.log"
        self.proc: Optional[subprocess.Popen] = None
        self.readers: List[EventReader] = []

    @property
    def command_socket(self) -> str:
        return self.env["COMMAND_SOCKET"]

    @property
    def event_socket(self) -> str:
        return self.env["EVENT_SOCKET"]

    def start(self) -> "Daemon":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tnet", "daemon"], env=self.env,
                                         stdout=log, stderr=log, cwd=self.dir)
        wait_until(lambda: self.alive_and_answering(), what=f"daemon {self.name} to answer")
        return self

    def alive_and_answering(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon {self.name} exited {self.proc.returncode}:\n{self.log()}")
        try:
            return bool(self.request("status")[-1].get("ok"))
        except OSError:
            return False

    def command_connection(self, wait: float = 30.0) -> socket.socket:
        """A raw connection to the command socket, for tests that speak the API by hand."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(wait)
        sock.connect(self.command_socket)
        return sock

    def request(self, cmd: str, wait: float = 60.0, **args: Any) -> List[Dict[str, Any]]:
        """One request on the command socket; every answer line."""
        with self.command_connection(wait) as sock:
            sock.sendall(json.dumps(dict(args, cmd=cmd)).encode() + b"\n")
            return read_answers(sock)

    def cli_args(self, *args: str) -> List[str]:
        return [sys.executable, "-m", "tnet", *args]

    def cli(self, *args: str, input: Optional[str] = None, timeout: float = 120.0,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tnet", *args], env=dict(self.env, **(env or {})),
                              input=input, capture_output=True, text=True, timeout=timeout, cwd=self.dir)

    @contextlib.contextmanager
    def watching(self, *args: str, **popen: Any) -> Iterator[subprocess.Popen]:
        """`tnet watch ARGS` running and subscribed; stopped on the way out."""
        before = self.request("status")[-1]["subscribers"]
        popen = dict({"stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL, "text": True}, **popen)
        watch = subprocess.Popen(self.cli_args("watch", *args), env=self.env, **popen)
        try:
            wait_until(lambda: self.request("status")[-1]["subscribers"] > before, what="watch to subscribe")
            yield watch
        finally:
            watch.terminate()
            watch.wait()

    def events(self) -> EventReader:
        reader = EventReader(self.event_socket)
        self.readers.append(reader)
        return reader

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def temp_files(self) -> List[str]:
        """Files in TEMP_DIR, inside the daemons' work folders too (their locks aside)."""
        return temp_files(self.temp)

    def peak_rss(self) -> int:
        """VmHWM of the daemon process, in bytes."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc/PID/status")

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        for reader in self.readers:
            reader.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def temp_files(folder: Path) -> List[str]:
    return sorted(os.path.relpath(os.path.join(top, name), folder) for top, _, names in os.walk(folder)
                  for name in names if name != "lock")


def read_answers(sock: socket.socket) -> List[Dict[str, Any]]:
    """Answer lines up to and including the one carrying "ok"."""
    answers: List[Dict[str, Any]] = []
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return answers
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                answers.append(json.loads(line))
                if "ok" in answers[-1]:
                    return answers


class Net:
    """The daemons of one test: own addresses, own discovery port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sockdir = tempfile.mkdtemp(prefix="tn")  # short: UNIX socket paths are limited
        self.broadcast_port = free_udp_port()
        self.daemons: List[Daemon] = []

    def daemon(self, name: str, start: bool = True, **env: str) -> Daemon:
        d = Daemon(self.root, self.sockdir, name, next_address(), self.broadcast_port, env)
        self.daemons.append(d)
        return d.start() if start else d

    def close(self) -> None:
        for d in self.daemons:
            d.stop()
        shutil.rmtree(self.sockdir, ignore_errors=True)


@pytest.fixture
def net(tmp_path: Path):
    n = Net(tmp_path)
    yield n
    n.close()


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    """A file of pseudo-random bytes, written in 1 MiB pieces."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.getrandbits(8 * n).to_bytes(n, "little") if n else b"")
            left -= n
    return path


def tnet_on_path(folder: Path) -> str:
    """A `tnet` command in ``folder`` that runs this checkout's `python -m tnet`;
    returns a PATH with ``folder`` first."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "tnet"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m tnet "$@"\n')
    wrapper.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"


# The last code that landed before wire protocol and local API changed shape
# inside (the exchange state machine); the tests check that today's daemon
# still speaks with it, both ways.
PREVIOUS_MAIN = "1eef014"


def previous_code(rev: str, into: Path) -> Path:
    """The package as it was at ``rev``, from this clone's git history, in ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tnet"], capture_output=True)
    if archive.returncode != 0:
        reason = f"cannot check out {rev} from git: {archive.stderr.decode(errors='replace').strip()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into
