"""Three real hosts on one bridge: the core features on a LAN without a gateway
(issue 2, acceptance 3). Each daemon runs with the default BIND_ADDRESS and
BROADCAST_ADDRESS and its own host name."""

from __future__ import annotations

import filecmp
import json
import os

import pytest
from conftest import random_file
from netns import make_lab

lab = pytest.fixture(name="lab")(make_lab)

pytestmark = pytest.mark.netns


def test_three_hosts_discover_send_and_message(lab, tmp_path):
    a, b, c = lab.daemon("alpha"), lab.daemon("bravo"), lab.daemon("charlie")

    status = a.request("status")[-1]
    assert status["host_name"] == "alpha"  # from `hostname` inside its own UTS namespace
    assert status["bind_address"] == "0.0.0.0"
    assert status["broadcast_addresses"] == [f"{lab.subnet}.255"]  # asked of eth0 itself
    assert "default" not in a.host.run("ip", "route").stdout

    out = a.cli("discover", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted((p["name"], p["address"]) for p in json.loads(out.stdout)) == [
        ("bravo", b.address), ("charlie", c.address)]
    out = c.cli("discover", "--json")
    assert sorted(p["name"] for p in json.loads(out.stdout)) == ["alpha", "bravo"]

    big = random_file(tmp_path / "big.bin", 100 * 1024 * 1024, seed=3)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    out = a.cli("send", "bravo", str(big), str(empty))  # by name
    assert out.returncode == 0, out.stderr + a.log()
    assert filecmp.cmp(big, b.downloads / "big.bin", shallow=False)
    assert (b.downloads / "empty.txt").read_bytes() == b""
    again = a.cli("send", "bravo", str(big))
    assert again.returncode == 0, again.stderr
    assert filecmp.cmp(big, b.downloads / "big (1).bin", shallow=False)
    assert sorted(os.listdir(b.downloads)) == ["big (1).bin", "big.bin", "empty.txt"]
    assert b.temp_files() == []

    with c.watching("--json") as watch:
        out = b.cli("message", "charlie", "over the bridge")
        assert out.returncode == 0, out.stderr
        event = json.loads(watch.stdout.readline())
        assert event == {"event": "message", "peer": b.address, "name": "bravo", "text": "over the bridge"}


def test_sending_where_no_daemon_listens_fails_fast(lab, tmp_path):
    a = lab.daemon("alpha")
    quiet = lab.host("quiet")  # a host on the bridge that runs no daemon: its kernel refuses
    f = tmp_path / "f.txt"
    f.write_text("x")
    out = a.cli("send", quiet.address, str(f), timeout=30)
    assert out.returncode == 4
    assert "unreachable" in out.stderr and "Connection refused" in out.stderr
    out = a.cli("message", quiet.address, "anyone?", timeout=30)
    assert out.returncode == 4 and "Connection refused" in out.stderr
    out = a.cli("send", f"{lab.subnet}.200", str(f), timeout=30)  # no host at all: ARP goes unanswered
    assert out.returncode == 4 and "unreachable" in out.stderr
    out = a.cli("message", "nobody-here", "x", timeout=30)
    assert out.returncode == 4 and "unknown-peer" in out.stderr


def test_a_daemon_started_before_its_address_discovers_once_it_has_one(lab):
    """A laptop's daemon starts at boot, before the network is configured."""
    a = lab.daemon("alpha")
    b = lab.daemon("bravo", configure=False)
    b.host.configure()
    out = b.cli("discover", "--json")
    assert out.returncode == 0, out.stderr
    assert [(p["name"], p["address"]) for p in json.loads(out.stdout)] == [("alpha", a.address)]
    assert b.request("status")[-1]["broadcast_addresses"] == [f"{lab.subnet}.255"]
