"""tnet as a LocalSend peer of the third-party ``localsendd`` (tests/netns/localsendd.py),
each in its own namespace on the lab's bridge, over HTTPS and over plain HTTP: they
find each other by multicast (and register calls), and localsendd's files land in
tnet's FILE_SAVE_DIR, byte-identical, with tnet's own events."""

from __future__ import annotations

import filecmp
import os

import pytest
from conftest import random_file, wait_until
from localsendd import LOCALSEND_PORT, Localsendd
from netns import make_lab

pytestmark = pytest.mark.netns


@pytest.fixture(name="lab")
def lab_with_routes(tmp_path):
    yield from make_lab(tmp_path, default_route=True)


def localsend_status(daemon):
    return daemon.request("status")[-1]["localsend"]


@pytest.mark.parametrize("protocol", ["https", "http"])
def test_localsendd_and_tnet_list_each_other_and_localsendd_files_land_in_tnet(lab, tmp_path, protocol):
    https = protocol == "https"
    tango = lab.daemon("tango", LOCALSEND="1", LOCALSEND_HTTPS="1" if https else "0")
    me = localsend_status(tango)
    assert (me["protocol"], me["port"], me["alias"]) == (protocol, LOCALSEND_PORT, "tango")
    lima = Localsendd(lab.host("lima"), "lima", https=https).start()
    assert lima.status()["self"]["multicast"] is True

    # localsendd lists tnet, under the fingerprint tnet announces (its certificate's in HTTPS mode).
    seen = lima.wait_for_device("tango")
    assert seen["ip"] in (tango.host.address, f"::ffff:{tango.host.address}")
    assert (seen["protocol"], seen["port"], seen["fingerprint"]) == (protocol, LOCALSEND_PORT, me["fingerprint"])
    assert seen["deviceType"] == "headless"

    # tnet discover lists localsendd beside tnet daemons, marked as LocalSend.
    def found():
        peers = tango.request("discover", timeout=2)[-1]["peers"]
        return next((p for p in peers if p["name"] == "lima"), None)

    device = wait_until(found, timeout=30, what="tnet discover to list lima", interval=0.5)
    assert (device["kind"], device["address"], device["protocol"]) == ("localsend", lima.address, protocol)
    assert device["port"] == LOCALSEND_PORT
    peers = tango.request("peers")[-1]["peers"]
    assert any(p["name"] == "lima" and p["kind"] == "localsend" and p["seen_s_ago"] >= 0 for p in peers)
    listed = tango.cli("discover", "--timeout", "2").stdout
    assert any(line.split()[:3] == ["lima", lima.address, "localsend"] for line in listed.splitlines()), listed

    events = tango.events()
    big = random_file(tmp_path / "big.bin", 8 * 1024 * 1024, seed=3)
    small = tmp_path / "note.txt"
    small.write_text("from lima\n")
    empty = tmp_path / "empty.dat"
    empty.write_bytes(b"")
    out = lima.send(big, small, empty, to="tango")
    assert out.returncode == 0, out.stdout + out.stderr + lima.log() + tango.log()
    assert "Last result: sent (tango)" in out.stdout
    for f in (big, small, empty):
        assert filecmp.cmp(f, tango.downloads / f.name, shallow=False)
    done = events.wait_for(lambda e: e["event"] == "transfer-done", what="transfer-done")
    assert done["name"] == "lima" and done["files"] == 3 and done["peer"] == lima.address
    files = {e["file"]: e for e in events.of("file-done")}
    assert set(files) == {"big.bin", "note.txt", "empty.dat"}
    assert files["big.bin"]["path"] == str(tango.downloads / "big.bin") and files["big.bin"]["size"] == 8 << 20
    assert events.of("file-failed") == [] and events.of("transfer-failed") == []
    assert sorted(os.listdir(tango.downloads)) == ["big.bin", "empty.dat", "note.txt"]
    assert tango.temp_files() == []


@pytest.fixture(name="bare_lab")
def lab_without_routes(tmp_path):
    yield from make_lab(tmp_path)


def test_two_tnet_daemons_find_each_other_as_localsend_peers_without_a_default_route(bare_lab):
    """tnet joins and sends on its interfaces by address, so a LAN without a gateway works
    (localsendd needs a route there)."""
    alpha = bare_lab.daemon("alpha", LOCALSEND="1", LOCALSEND_HTTPS="0")
    bravo = bare_lab.daemon("bravo", LOCALSEND="1", LOCALSEND_HTTPS="0")

    def found():
        peers = alpha.request("discover", timeout=1)[-1]["peers"]
        return next((p for p in peers if p.get("kind") == "localsend" and p["name"] == "bravo"), None)

    device = wait_until(found, timeout=30, what="alpha to find bravo", interval=0.5)
    assert device["address"] == bravo.host.address and device["protocol"] == "http"
    kinds = {(p["name"], p.get("kind")) for p in alpha.request("discover", timeout=1)[-1]["peers"]}
    assert ("bravo", "tnet") in kinds  # the same daemon, found by tnet's own discovery too
