"""Two subnets joined by a router that forwards IPv4 but, as every router,
no broadcast (issue 13): discovery finds the far peers only through PEERS,
and only those that list the requester (in PEERS or ALLOW_FROM) answer;
files and messages cross both ways, by address and by name."""

from __future__ import annotations

import filecmp
import json

import pytest
from conftest import random_file
from netns import make_lab

pytestmark = pytest.mark.netns


@pytest.fixture
def lab(tmp_path):
    yield from make_lab(tmp_path, lans=2)


def discovered(daemon) -> list:
    out = daemon.cli("discover", "--json", "--timeout", "2")
    assert out.returncode == 0, out.stderr + daemon.log()
    return sorted((p["name"], p["address"]) for p in json.loads(out.stdout))


def test_static_peers_across_a_router(lab, tmp_path):
    # LAN 0: alpha lists the far ones; delta lists no one.
    # LAN 1: bravo lists alpha; echo takes LAN 0 in ALLOW_FROM; charlie lists no one.
    alpha, delta = lab.daemon("alpha", start=False), lab.daemon("delta", start=False)
    bravo, charlie, echo = (lab.daemon(name, start=False, lan=1) for name in ("bravo", "charlie", "echo"))
    alpha.env["PEERS"] = f"{bravo.address},{charlie.address},{echo.address}:49374"
    bravo.env["PEERS"] = alpha.address
    echo.env["ALLOW_FROM"] = f"{lab.subnets[0]}.0/24"
    for d in (alpha, delta, bravo, charlie, echo):
        d.start()
    assert "default" not in alpha.host.run("ip", "route").stdout  # the router is reached by a route per LAN
    assert alpha.request("status")[-1]["broadcast_addresses"] == [f"{lab.subnets[0]}.255"]

    # Charlie hears alpha's request (the unicast crosses the router) and stays silent: it lists no one.
    assert discovered(alpha) == sorted([("bravo", bravo.address), ("delta", delta.address), ("echo", echo.address)])
    assert discovered(delta) == [("alpha", alpha.address)]  # the broadcast stays on its LAN
    assert discovered(bravo) == sorted([("alpha", alpha.address), ("charlie", charlie.address),
                                        ("echo", echo.address)])
    assert discovered(charlie) == sorted([("bravo", bravo.address), ("echo", echo.address)])

    there = random_file(tmp_path / "there.bin", 1 << 20, seed=1)
    back = random_file(tmp_path / "back.bin", 1 << 20, seed=2)
    out = alpha.cli("send", "bravo", str(there))  # by name, learnt across the router
    assert out.returncode == 0, out.stderr
    assert filecmp.cmp(there, bravo.downloads / "there.bin", shallow=False)
    out = bravo.cli("send", "alpha", str(back))
    assert out.returncode == 0, out.stderr
    assert filecmp.cmp(back, alpha.downloads / "back.bin", shallow=False)
    out = delta.cli("send", charlie.address, str(there))  # by address: no discovery, no PEERS needed
    assert out.returncode == 0, out.stderr
    assert filecmp.cmp(there, charlie.downloads / "there.bin", shallow=False)

    with alpha.watching("--json") as watch:
        out = bravo.cli("message", "alpha", "from the far side")
        assert out.returncode == 0, out.stderr
        assert json.loads(watch.stdout.readline()) == {"event": "message", "peer": bravo.address, "name": "bravo",
                                                       "text": "from the far side"}
    assert alpha.cli("message", "bravo", "and back").returncode == 0
    assert charlie.cli("message", alpha.address, "unlisted, yet reachable").returncode == 0
    history = [json.loads(line) for line in alpha.cli("history", "--json").stdout.splitlines()]
    assert [(e["kind"], e["direction"], e["peer"], e["code"]) for e in history] == [
        ("transfer", "out", bravo.address, "ok"), ("transfer", "in", bravo.address, "ok"),
        ("message", "in", bravo.address, "ok"), ("message", "out", bravo.address, "ok"),
        ("message", "in", charlie.address, "ok")]
