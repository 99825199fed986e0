"""Faults only real hosts can show (issue 3): a sender that vanishes without a
FIN, a link that goes down mid-transfer, a lossy link.

Links are slowed with ``tc … tbf`` in the sending namespace so that a transfer
is surely in flight when the test cuts it. Loss comes from netem where the
kernel has it, else from an nftables rule (``numgen random mod 100 < 5 drop``)
plus tbf. Waits
poll with a deadline; nothing asserts on durations."""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
from typing import Callable

import pytest
from conftest import random_file
from netns import Host, make_lab, skip_or_fail

lab = pytest.fixture(name="lab")(make_lab)

pytestmark = pytest.mark.netns

MiB = 1024 * 1024
IDLE_TIMEOUT = "3"  # seconds; small so that the give-up is quick to observe


def limit_rate(host: Host, rate: str) -> None:
    """Shape ``host``'s egress on eth0 (a qdisc acts on egress only)."""
    if shutil.which("tc") is None:
        skip_or_fail("tc is not installed (scripts/test installs iproute2)")
    out = host.run("tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "64kb",
                   "latency", "400ms", check=False)
    if out.returncode != 0:
        pytest.skip(f"this kernel has no tbf qdisc: {out.stderr.strip()}")


def make_lossy(host: Host, percent: int, delay: str, rate: str) -> Callable[[], int]:
    """Lose ``percent`` % of what ``host`` sends on eth0, and slow it to ``rate``;
    return a function counting the packets dropped so far.

    With netem: one qdisc does loss, ``delay`` and rate. Without it (this
    kernel): an nftables rule drops at random and tbf limits the rate; there is
    no delay then.
    """
    if shutil.which("tc") is None:
        skip_or_fail("tc is not installed (scripts/test installs iproute2)")
    netem = host.run("tc", "qdisc", "add", "dev", "eth0", "root", "netem", "loss", f"{percent}%",
                     "delay", delay, "rate", rate, check=False)
    if netem.returncode == 0:
        def netem_drops() -> int:
            stats = host.run("tc", "-s", "qdisc", "show", "dev", "eth0").stdout
            return int(re.search(r"dropped (\d+)", stats).group(1))
        return netem_drops
    if shutil.which("nft") is None:
        skip_or_fail("this kernel has no netem and nft is not installed (scripts/test installs nftables)")
    # One wire-sized packet per skb: with segmentation offload, the hook would see
    # 64 KiB super-packets and each drop would lose some forty segments at once.
    host.run("ip", "link", "set", "eth0", "gso_max_segs", "1", check=False)
    rules = (
        "table inet tnetloss {\n"
        "  chain out {\n"
        "    type filter hook output priority 0; policy accept;\n"
        f'    oifname "eth0" numgen random mod 100 < {percent} counter drop\n'
        "  }\n"
        "}\n"
    )
    out = subprocess.run(host.exec_args("nft", "-f", "-"), input=rules, capture_output=True, text=True,
                         timeout=30)
    if out.returncode != 0:
        pytest.skip(f"no way to lose packets here: no netem, and nft says {out.stderr.strip()}")
    limit_rate(host, rate)

    def nft_drops() -> int:
        listing = host.run("nft", "list", "table", "inet", "tnetloss").stdout
        return int(re.search(r"counter packets (\d+)", listing).group(1))
    return nft_drops


def sending(sender, receiver_address: str, path) -> subprocess.Popen:
    """`tnet send` in the background, failing at once when the link breaks
    (these tests are about failing cleanly; test_resume_links.py resumes);
    the test reads its result later."""
    return subprocess.Popen(sender.cli_args("send", "--no-retry", receiver_address, str(path)), env=sender.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=sender.dir)


def in_flight(events, least: int = MiB):
    """Wait until the receiver has written ``least`` bytes of the file."""
    return events.wait_for(lambda e: e["event"] == "progress" and e["bytes"] >= least,
                           what=f"{least} bytes to arrive")


def test_receiver_gives_up_on_a_sender_gone_silent(lab, tmp_path):
    a = lab.daemon("alpha", IDLE_TIMEOUT=IDLE_TIMEOUT)
    b = lab.daemon("bravo", IDLE_TIMEOUT=IDLE_TIMEOUT, REPORT_PROGRESS_IN="1")
    limit_rate(a.host, "20mbit")
    events = b.events()
    f = random_file(tmp_path / "gone.bin", 20 * MiB, seed=4)
    cli = sending(a, b.address, f)
    try:
        in_flight(events)
        a.host.link("down")  # first the link: no FIN or RST can leave
        a.proc.kill()
        a.proc.wait()
        failed = events.wait_for(lambda e: e["event"] == "transfer-failed", what="the receiver to give up")
        assert failed["code"] == "timeout" and failed["peer"] == a.address
        # What arrived is kept for a resume (§7), out of sight; nothing else is left.
        assert [n for n in b.temp_files() if not n.startswith(".tnet-keep-")] == [] and os.listdir(b.downloads) == []
        out, err = cli.communicate(timeout=30)
        assert cli.returncode != 0  # its daemon died under it
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert b.request("status")[-1]["transfers"] == []  # and b serves on


def test_link_down_mid_transfer_fails_cleanly_on_both_sides(lab, tmp_path):
    a = lab.daemon("alpha", IDLE_TIMEOUT=IDLE_TIMEOUT)
    b = lab.daemon("bravo", IDLE_TIMEOUT=IDLE_TIMEOUT, REPORT_PROGRESS_IN="1")
    limit_rate(a.host, "20mbit")
    sender_events, events = a.events(), b.events()
    f = random_file(tmp_path / "cut.bin", 20 * MiB, seed=5)
    cli = sending(a, b.address, f)
    try:
        in_flight(events)
        b.host.link("down")  # the receiver's side of the cable
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 4, err
    assert err.count("\n") == 1 and "timeout" in err and b.address in err
    failed = events.wait_for(lambda e: e["event"] == "transfer-failed", what="the receiver to give up")
    assert failed["code"] == "timeout"
    sender_events.wait_for(lambda e: e["event"] == "transfer-failed" and e["peer"] == b.address,
                           what="the sender's failure event")
    # What arrived is kept for a resume (§7), out of sight; nothing else is left.
    assert [n for n in b.temp_files() if not n.startswith(".tnet-keep-")] == [] and os.listdir(b.downloads) == []
    assert a.request("status")[-1]["transfers"] == [] and b.request("status")[-1]["transfers"] == []

    b.host.link("up")  # the cable is back: the next transfer goes through
    small = random_file(tmp_path / "after.bin", MiB, seed=6)
    out = a.cli("send", b.address, str(small))
    assert out.returncode == 0, out.stderr
    assert filecmp.cmp(small, b.downloads / "after.bin", shallow=False)


def test_transfer_survives_a_lossy_link(lab, tmp_path):
    a, b = lab.daemon("alpha"), lab.daemon("bravo")
    data_drops = make_lossy(a.host, 5, "20ms", "200mbit")  # data segments
    ack_drops = make_lossy(b.host, 5, "0ms", "200mbit")  # and the acknowledgements
    f = random_file(tmp_path / "lossy.bin", 20 * MiB, seed=7)
    out = a.cli("send", b.address, str(f), timeout=170)
    assert out.returncode == 0, out.stderr + a.log()
    assert filecmp.cmp(f, b.downloads / "lossy.bin", shallow=False)
    assert data_drops() > 0 and ack_drops() > 0  # the loss was real
    assert b.temp_files() == []
