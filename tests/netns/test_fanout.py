"""One send or message to several peers at once (issue 13), on real hosts:
`tnet send h2,h3` and `--all` with one peer that refuses and one that is
gone; each file is read from disk once (the sender's /proc/PID/io)."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import pytest
from netns import make_lab

lab = pytest.fixture(name="lab")(make_lab)

pytestmark = pytest.mark.netns

MiB = 1024 * 1024


def read_bytes(daemon) -> int:
    """What the daemon's process read from storage so far (/proc/PID/io)."""
    with open(f"/proc/{daemon.proc.pid}/io") as io:
        for line in io:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/PID/io")


def uncached(path: Path, size: int) -> Path:
    """A file of ``size`` random bytes, flushed and dropped from the page cache."""
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path


def four_hosts(lab, h3_unreachable: bool = False):
    """h1 sends; h2 and h3 take; h4 refuses h1 (ALLOW_FROM). ``h3_unreachable``:
    h3 answers discoveries but takes files on another port, so nothing reaches it."""
    h1 = lab.daemon("h1")
    h2 = lab.daemon("h2")
    h3 = lab.daemon("h3", RECEIVE_PORT="50000") if h3_unreachable else lab.daemon("h3")
    h4 = lab.daemon("h4", ALLOW_FROM="127.0.0.1")
    return h1, h2, h3, h4


def test_a_send_to_several_peers_runs_at_once_reads_once_and_reports_each(lab, tmp_path):
    h1, h2, h3, h4 = four_hosts(lab)
    big = uncached(tmp_path / "big.bin", 1024 * MiB)
    assert [p["name"] for p in h1.request("discover")[-1]["peers"]] == ["h2", "h3", "h4"]
    before = read_bytes(h1)
    out = h1.cli("send", "h2,h3", str(big), timeout=600)
    assert out.returncode == 0, out.stderr
    read = read_bytes(h1) - before
    print(f"\n1 GiB to 2 peers at once: the sender read {read / MiB:.0f} MiB from storage")
    assert read <= 1.1 * 1024 * MiB  # once, not twice
    for host in (h2, h3):
        assert filecmp.cmp(big, host.downloads / "big.bin", shallow=False)
    lines = out.stdout.splitlines()
    assert any(line.startswith("h2: ") for line in lines) and any(line.startswith("h3: ") for line in lines)


def test_all_peers_with_one_refusing_and_one_gone(lab, tmp_path):
    h1, h2, h3, h4 = four_hosts(lab, h3_unreachable=True)
    f = uncached(tmp_path / "f.bin", 8 * MiB)
    out = h1.cli("send", "--all", "--no-retry", "--json", str(f), timeout=300)
    answer = json.loads(out.stdout.splitlines()[-1])
    by_peer = {r["peer_given"]: r for r in answer["results"]}
    assert by_peer[h2.host.address]["ok"] and filecmp.cmp(f, h2.downloads / "f.bin", shallow=False)
    assert by_peer[h4.host.address]["code"] == "refused"
    assert by_peer[h3.host.address]["code"] == "unreachable"
    assert out.returncode == 5  # the worst of refused (5) and unreachable (4)
    people = h1.cli("message", "h2,h4", "hello both")
    assert people.returncode == 5
    assert "delivered to h2" in people.stdout and "h4: FAILED refused" in people.stdout
