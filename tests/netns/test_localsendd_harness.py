"""The reference LocalSend path: two third-party ``localsendd`` peers in two
namespaces on the lab's bridge find each other by multicast and move a file,
over HTTPS and over plain HTTP. What tnet's LocalSend side is measured and
tested against starts from here."""

from __future__ import annotations

import filecmp
import os
import re

import pytest
from conftest import random_file
from localsendd import LOCALSEND_PORT, Localsendd, cert_fingerprint
from netns import make_lab

pytestmark = pytest.mark.netns


@pytest.fixture(name="lab")
def lab_with_routes(tmp_path):
    yield from make_lab(tmp_path, default_route=True)


@pytest.mark.parametrize("protocol", ["https", "http"])
def test_two_localsendd_discover_each_other_and_send_a_file(lab, tmp_path, protocol):
    https = protocol == "https"
    a = Localsendd(lab.host("alpha"), "alpha", https=https).start()
    b = Localsendd(lab.host("bravo"), "bravo", https=https).start()
    for me in (a.status()["self"], b.status()["self"]):
        assert me["multicast"] is True  # joined the group, not the subnet-scan fallback
        assert me["encryption"] is https

    seen_by_a = a.wait_for_device("bravo")
    seen_by_b = b.wait_for_device("alpha")
    assert (seen_by_a["protocol"], seen_by_a["port"]) == (protocol, LOCALSEND_PORT)
    assert seen_by_a["ip"] in (b.address, f"::ffff:{b.address}")  # its listener is dual-stack
    assert seen_by_b["ip"] in (a.address, f"::ffff:{a.address}")
    if https:
        assert seen_by_a["fingerprint"] == cert_fingerprint(b.cert_path)
        assert seen_by_b["fingerprint"] == cert_fingerprint(a.cert_path)
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", seen_by_a["fingerprint"])  # a random id it keeps
    listed = a.ctl("devices").stdout
    assert re.search(rf"^\s+bravo\s+\S+\s+headless\s+{protocol}$", listed, re.M), listed

    big = random_file(tmp_path / "big.bin", 8 * 1024 * 1024, seed=5)
    out = a.send(big, to="bravo")
    assert out.returncode == 0, out.stdout + out.stderr + a.log() + b.log()
    assert "Last result: sent (bravo)" in out.stdout
    assert filecmp.cmp(big, b.downloads / "big.bin", shallow=False)

    small = tmp_path / "note.txt"
    small.write_text("back the other way\n")
    out = b.send(small, to="alpha")
    assert out.returncode == 0, out.stdout + out.stderr + a.log() + b.log()
    assert (a.downloads / "note.txt").read_text() == "back the other way\n"
    assert os.listdir(b.downloads) == ["big.bin"] and os.listdir(a.downloads) == ["note.txt"]
