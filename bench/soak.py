"""A bounded soak: three daemons on loopback trade files and messages in every
direction for a while, and nothing may be lost, duplicated, leaked or left.

Each round keeps up to --parallel sends in flight between random pairs
(random sizes up to --max-mib, some empty) and sends a burst of messages.
Every file received must carry the SHA-256 of the one sent; every message
must arrive exactly once; at the end the temp folders are empty, no daemon
holds more file descriptors than it started with, and each daemon's peak RSS
is reported. Exits non-zero on any discrepancy.

Addresses 127.232.0.2-4 and a private discovery port; nothing leaves loopback.

Usage: python3 bench/soak.py [--minutes M] [--parallel N] [--max-mib S] [--seed N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
MAX_MINUTES = 60.0  # a soak is bounded, whatever is asked
NAMES = ("soak-a", "soak-b", "soak-c")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Host:
    def __init__(self, root: Path, name: str, address: str, port: int) -> None:
        self.name, self.address, self.dir = name, address, root / name
        (self.dir / "tmp").mkdir(parents=True)
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), BIND_ADDRESS=address,
                        BROADCAST_ADDRESS="127.255.255.255", BROADCAST_PORT=str(port), HOST_NAME=name,
                        FILE_SAVE_DIR=str(self.dir / "Downloads"), TEMP_DIR=str(self.dir / "tmp"),
                        STATE_DIR=str(self.dir / "state"),
                        COMMAND_SOCKET=str(self.dir / "run" / "commands"),
                        EVENT_SOCKET=str(self.dir / "run" / "events"), LOG_LEVEL="warning")
        self.log = open(self.dir / "daemon.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tnet", "daemon"], env=self.env, stdout=self.log,
                                     stderr=self.log)
        deadline = time.monotonic() + 20
        while not self.answers():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"{name} did not start; see {self.dir / 'daemon.log'}")
            time.sleep(0.05)
        self.fds_at_start = 0

    def answers(self) -> bool:
        try:
            return bool(self.request({"cmd": "status"})[-1].get("ok"))
        except OSError:
            return False

    def request(self, obj: Dict[str, Any]) -> List[Dict[str, Any]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(120)
            sock.connect(self.env["COMMAND_SOCKET"])
            sock.sendall(json.dumps(obj).encode() + b"\n")
            lines: List[Dict[str, Any]] = []
            buf = b""
            while not lines or "ok" not in lines[-1]:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                *done, buf = buf.split(b"\n")
                lines += [json.loads(line) for line in done if line.strip()]
            return lines

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def peak_rss_mib(self) -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def events_of(host: Host) -> Tuple[socket.socket, List[Dict[str, Any]], bytearray]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(host.env["EVENT_SOCKET"])
    sock.setblocking(False)
    return sock, [], bytearray()


def drain(sub: Tuple[socket.socket, List[Dict[str, Any]], bytearray]) -> None:
    sock, events, buf = sub
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return
        if not chunk:
            return
        buf += chunk
        *lines, rest = bytes(buf).split(b"\n")
        buf[:] = rest
        events += [json.loads(line) for line in lines if line.strip()]


def send_failure(proc: subprocess.Popen, name: str) -> str:
    return f"send {name}: exit {proc.returncode}: {proc.stderr.read().strip() if proc.stderr else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--parallel", type=int, default=6)
    parser.add_argument("--max-mib", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="tnet-soak-"))
    port = free_udp_port()
    hosts = [Host(root, name, f"127.232.0.{i + 2}", port) for i, name in enumerate(NAMES)]
    subs = {h.name: events_of(h) for h in hosts}
    for host in hosts:
        while host.request({"cmd": "status"})[-1]["subscribers"] != 1:
            pass  # the status round trip itself paces this: the daemon accepts between two
        host.fds_at_start = host.fds()  # the events subscriber included
    sent_files: Dict[str, str] = {}  # file name -> sha256
    sent_messages: Dict[str, int] = {h.name: 0 for h in hosts}
    failures: List[str] = []
    delivered: set = set()  # sends that exited 0
    running: List[Tuple[subprocess.Popen, str]] = []
    deadline = time.monotonic() + min(args.minutes, MAX_MINUTES) * 60
    n = 0
    try:
        while time.monotonic() < deadline:
            while len(running) < args.parallel:
                src, dst = rng.sample(hosts, 2)
                size = 0 if rng.random() < 0.05 else rng.randrange(1, int(args.max_mib * 2**20))
                name = f"f{n:06d}.bin"
                n += 1
                path = root / "out" / name
                path.parent.mkdir(exist_ok=True)
                data = rng.getrandbits(8 * size).to_bytes(size, "little") if size else b""
                path.write_bytes(data)
                sent_files[name] = hashlib.sha256(data).hexdigest()
                proc = subprocess.Popen([sys.executable, "-m", "tnet", "send", dst.address, str(path)], env=src.env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                running.append((proc, name))
            for proc, name in list(running):
                if proc.poll() is not None:
                    running.remove((proc, name))
                    if proc.returncode != 0:
                        failures.append(send_failure(proc, name))
                    else:
                        delivered.add(name)
                    (root / "out" / name).unlink()
            src, dst = rng.sample(hosts, 2)
            for _ in range(10):
                answer = src.request({"cmd": "message", "peer": dst.address, "text": f"m{sent_messages[dst.name]}"})
                if answer[-1].get("ok"):
                    sent_messages[dst.name] += 1
                else:
                    failures.append(f"message to {dst.name}: {answer[-1]}")
            for sub in subs.values():
                drain(sub)
            time.sleep(0.05)  # pacing the load, not waiting for a result
        for proc, name in running:
            if proc.wait(300) != 0:
                failures.append(send_failure(proc, name))
            else:
                delivered.add(name)
        running = []

        def seen() -> int:  # events are published before the peer is answered: they are queued already
            return sum(1 for sub in subs.values() for e in sub[1] if e["event"] in ("file-done", "message"))

        settle_by = time.monotonic() + 30
        while seen() < len(delivered) + sum(sent_messages.values()) and time.monotonic() < settle_by:
            select.select([sub[0] for sub in subs.values()], [], [], 1.0)
            for sub in subs.values():
                drain(sub)
        received: Dict[str, int] = {}
        for host in hosts:
            events = subs[host.name][1]
            texts = [e["text"] for e in events if e["event"] == "message"]
            if sorted(texts) != sorted(f"m{i}" for i in range(sent_messages[host.name])):
                failures.append(f"{host.name}: messages lost or duplicated ({len(texts)} of "
                                f"{sent_messages[host.name]})")
            for event in events:
                if event["event"] == "file-done":
                    name = os.path.basename(event["path"])
                    received[name] = received.get(name, 0) + 1
                    if sent_files.get(name) != event["sha256"]:
                        failures.append(f"{name}: wrong SHA-256 on {host.name}")
            leftovers = [name for _, _, names in os.walk(host.dir / "tmp") for name in names if name != "lock"]
            if leftovers:
                failures.append(f"{host.name}: temp files left: {leftovers[:5]}")
            if host.fds() > host.fds_at_start:
                failures.append(f"{host.name}: {host.fds()} descriptors open, {host.fds_at_start} at start")
        missing = sorted(delivered - set(received))
        twice = sorted(name for name, count in received.items() if count > 1)
        if missing or twice:
            failures.append(f"files missing: {missing[:5]}, received twice: {twice[:5]}")
        for host in hosts:
            print(f"{host.name}: peak RSS {host.peak_rss_mib():.1f} MiB, {host.fds()} descriptors")
        total = sum(os.path.getsize(p) for h in hosts for p in (h.dir / "Downloads").glob("*"))
        print(f"{len(sent_files)} files ({total / 2**20:.0f} MiB) and {sum(sent_messages.values())} messages "
              f"in {min(args.minutes, MAX_MINUTES):g} min; {len(failures)} failures")
        for failure in failures[:20]:
            print("  " + failure)
        return 1 if failures else 0
    finally:
        for proc, _ in running:
            proc.kill()
        for host in hosts:
            host.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
