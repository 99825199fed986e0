"""Load on real hosts (issue 3, point 9): three daemons on a bridge exchange 50
files of 1 to 20 MiB and 1,000 messages in every direction at once, while one
more host takes a file and stops reading. Every file arrives identical, every
message exactly once, no daemon's peak RSS reaches 64 MiB, and the stalled
transfer times out while the others finish."""

from __future__ import annotations

import collections
import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import wait_until
from netns import make_lab

from tnet.util import DEFAULT_RECEIVE_PORT

lab = pytest.fixture(name="lab")(make_lab)

pytestmark = pytest.mark.netns

MiB = 1024 * 1024
FILES = 50
MESSAGES = 1000
MAX_RSS_BYTES = 64 * MiB
IDLE_TIMEOUT = "8"  # the stalled transfer gives up after this many silent seconds; the
# others, busy but never silent that long, are not at risk even on a loaded machine

# A receiver that takes the offer, says "accept", and never reads a byte: the
# sender's socket buffers fill and its transfer stalls. A small fixed receive
# buffer makes that happen after a few hundred KiB.
STALLED_RECEIVER = r"""
import socket, sys
from tnet import protocol
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept()
conn.recv(65536)  # the preface and offer: an accept before them would be answered unexpected-frame
conn.sendall(protocol.encode_preface() + protocol.encode_frame(protocol.Accept("delta")))
print("accepted", flush=True)
sys.stdin.read()
"""


def random_files(folder: Path, count: int):
    """``count`` files of 1 to 20 MiB of random bytes; their SHA-256 by name."""
    folder.mkdir()
    digests = {}
    for i in range(count):
        size = MiB * (1 + i * 19 // (count - 1)) + 7 * i  # not all whole MiB
        name = f"f{i:02d}.bin"
        digest = hashlib.sha256()
        with open(folder / name, "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, MiB))
                digest.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        digests[name] = digest.hexdigest()
    return digests


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pair(i: int):
    """Sender and receiver index of job ``i``: every direction among three."""
    sender = i % 3
    return sender, (sender + 1 + (i // 3) % 2) % 3


def test_fifty_transfers_and_a_thousand_messages_at_once(lab, tmp_path):
    daemons = [lab.daemon(name, IDLE_TIMEOUT=IDLE_TIMEOUT, LOG_LEVEL="info")
               for name in ("alpha", "bravo", "charlie")]
    a = daemons[0]
    readers = [d.events() for d in daemons]
    digests = random_files(tmp_path / "src", FILES)

    delta = lab.host("delta")
    stalled = delta.popen(sys.executable, "-c", STALLED_RECEIVER, str(DEFAULT_RECEIVE_PORT), env=a.env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert stalled.stdout.readline() == "listening\n"
    stalled_file = tmp_path / "stalled.bin"
    with open(stalled_file, "wb") as f:
        f.write(os.urandom(20 * MiB))

    def send(i: int):
        s, r = pair(i)
        name = f"f{i:02d}.bin"
        return i, daemons[s].request("send", wait=120, peer=daemons[r].address, paths=[str(tmp_path / "src" / name)])

    def message(j: int):
        s, r = pair(j)
        return daemons[s].request("message", wait=60, peer=daemons[r].address, text=f"m{j} from {daemons[s].name}")

    with ThreadPoolExecutor(FILES + 1) as file_pool, ThreadPoolExecutor(24) as message_pool:
        stalled_job = file_pool.submit(a.request, "send", wait=120, peer=delta.address, paths=[str(stalled_file)],
                                       retry_for=0)  # the stall itself is the test, not what a retry makes of it
        file_jobs = [file_pool.submit(send, i) for i in range(FILES)]
        message_jobs = [message_pool.submit(message, j) for j in range(MESSAGES)]
        message_answers = [job.result() for job in message_jobs]
        file_answers = [job.result() for job in file_jobs]
        stalled_answer = stalled_job.result()[-1]

    assert all(answers[-1]["ok"] for answers in message_answers), [
        answers[-1] for answers in message_answers if not answers[-1]["ok"]][:5]
    failed = [(i, answers[-1]) for i, answers in file_answers if not answers[-1]["ok"]]
    assert failed == []
    assert stalled_answer["ok"] is False and stalled_answer["code"] == "timeout", stalled_answer

    for r, d in enumerate(daemons):
        expected = {f"f{i:02d}.bin" for i in range(FILES) if pair(i)[1] == r}
        assert set(os.listdir(d.downloads)) == expected
        for name in sorted(expected):
            assert sha256_of(d.downloads / name) == digests[name], f"{name} on {d.name}"
        assert d.temp_files() == []

    for r, reader in enumerate(readers):
        expected = collections.Counter(f"m{j} from {daemons[pair(j)[0]].name}"
                                       for j in range(MESSAGES) if pair(j)[1] == r)
        count = sum(expected.values())
        wait_until(lambda r=reader, n=count: len(r.of("message")) >= n, what="every message event")
        got = collections.Counter(e["text"] for e in reader.of("message"))
        assert got == expected  # each exactly once

    for d in daemons:
        assert d.request("status")[-1]["transfers"] == []
        rss = d.peak_rss()
        print(f"{d.name}: peak RSS {rss / MiB:.1f} MiB")
        assert rss < MAX_RSS_BYTES, f"{d.name}: peak RSS {rss / MiB:.1f} MiB"
