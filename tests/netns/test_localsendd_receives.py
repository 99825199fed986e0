"""tnet sending to the third-party ``localsendd`` (tests/netns/localsendd.py), each in its
own namespace on the lab's bridge: `tnet send` and `tnet message` to the device tnet
discovered land in localsendd's download folder, over HTTPS (its fingerprint pinned),
over plain HTTP, and from a tnet in HTTP mode (no certificate of its own) to an HTTPS
localsendd, which asks for none.

What localsendd 0.1.1 does with what it is sent: it keeps only each file's base name
(``safe_file_name``: the part after the last "/"), so a folder's files land side by side;
a text message (one text/plain file with a ``preview``) is not shown but taken as a
file, which tnet then uploads: it is saved as ``<id>.txt``; an empty file is refused
with 500 (it counts a body of 0 bytes as interrupted)."""

from __future__ import annotations

import filecmp
import json
import os

import pytest
from conftest import random_file, wait_until
from localsendd import Localsendd
from netns import make_lab

pytestmark = pytest.mark.netns


@pytest.fixture(name="lab")
def lab_with_routes(tmp_path):
    yield from make_lab(tmp_path, default_route=True)  # localsendd joins the group through the routing table


def discovered(tango, alias: str):
    def found():
        peers = tango.request("discover", timeout=2)[-1]["peers"]
        return next((p for p in peers if p["name"] == alias and p.get("kind") == "localsend"), None)

    return wait_until(found, timeout=30, what=f"tnet discover to list {alias}", interval=0.5)


@pytest.mark.parametrize("tnet_https, lsd_https", [(True, True), (False, False), (False, True)],
                         ids=["https", "http", "http-to-https"])
def test_tnet_send_and_message_land_in_localsendd(lab, tmp_path, tnet_https, lsd_https):
    tango = lab.daemon("tango", LOCALSEND="1", LOCALSEND_HTTPS="1" if tnet_https else "0")
    lima = Localsendd(lab.host("lima"), "lima", https=lsd_https).start()
    device = discovered(tango, "lima")
    assert (device["address"], device["protocol"]) == (lima.address, "https" if lsd_https else "http")

    big = random_file(tmp_path / "big.bin", 8 * 1024 * 1024, seed=7)
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("first\n")
    (docs / "sub" / "b.txt").write_text("second\n")
    events = tango.events()
    out = tango.cli("send", "--json", "lima", str(big), str(docs))
    assert out.returncode == 0, out.stdout + out.stderr + tango.log() + lima.log()
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    final = lines[-1]
    assert (final["ok"], final["name"], final["peer"], final["files"]) == (True, "lima", lima.address, 5)
    assert [line["file"] for line in lines if line.get("event") == "file-done" and not line["folder"]] == [
        "big.bin", "docs/a.txt", "docs/sub/b.txt"]
    assert sorted(os.listdir(lima.downloads)) == ["a.txt", "b.txt", "big.bin"]  # base names only, as localsendd keeps
    assert filecmp.cmp(big, lima.downloads / "big.bin", shallow=False)
    assert (lima.downloads / "a.txt").read_text() == "first\n"
    assert (lima.downloads / "b.txt").read_text() == "second\n"
    done = events.wait_for(lambda e: e["event"] == "transfer-done" and e["direction"] == "out")
    assert done["name"] == "lima" and done["id"] == final["id"]

    out = tango.cli("message", "lima", "hello lima \u2615")
    assert out.returncode == 0, out.stdout + out.stderr + tango.log() + lima.log()
    assert out.stdout == f"delivered to lima ({lima.address})\n"
    texts = [name for name in os.listdir(lima.downloads) if name not in ("a.txt", "b.txt", "big.bin")]
    assert len(texts) == 1 and texts[0].endswith(".txt"), texts
    assert (lima.downloads / texts[0]).read_text(encoding="utf-8") == "hello lima \u2615"
    history = tango.request("history")[-1]["entries"]
    assert [(e["kind"], e["name"], e["code"]) for e in history[-2:]] == [("transfer", "lima", "ok"),
                                                                         ("message", "lima", "ok")]


def test_an_empty_file_localsendd_refuses_fails_alone(lab, tmp_path):
    tango = lab.daemon("tango", LOCALSEND="1")
    lima = Localsendd(lab.host("lima"), "lima").start()
    discovered(tango, "lima")
    empty = tmp_path / "empty.dat"
    empty.write_bytes(b"")
    note = tmp_path / "note.txt"
    note.write_text("kept\n")
    out = tango.cli("send", "lima", str(note), str(empty))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED empty.dat: save-failed: lima answered 500" in out.stdout
    assert "save-failed: 1 of 2 failed" in out.stderr
    assert os.listdir(lima.downloads) == ["note.txt"]
