"""Today's daemon and the previous one (checked out from git) exchange
files, folders and messages in both directions: the wire protocol and the
local API did not change shape when the code behind them did."""

from __future__ import annotations

import filecmp

import pytest
from conftest import PREVIOUS_MAIN, previous_code, random_file


@pytest.fixture(scope="module")
def old_root(tmp_path_factory):
    return previous_code(PREVIOUS_MAIN, tmp_path_factory.mktemp("previous"))


@pytest.mark.parametrize("old_sends", [True, False], ids=["old-to-new", "new-to-old"])
def test_files_folders_and_messages_cross_between_versions(net, tmp_path, old_root, old_sends):
    old = net.daemon("old", PYTHONPATH=str(old_root))
    new = net.daemon("new")
    assert old.request("status")[-1]["version"] and new.request("status")[-1]["ok"]
    sender, receiver = (old, new) if old_sends else (new, old)
    f = random_file(tmp_path / "big.bin", 3 * 1024 * 1024, seed=11)
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.txt").write_text("b")
    (folder / "empty").mkdir()
    out = sender.cli("send", receiver.name, str(f), str(folder))  # by name: discovery across versions too
    assert out.returncode == 0, out.stderr + receiver.log()
    assert filecmp.cmp(f, receiver.downloads / "big.bin", shallow=False)
    assert (receiver.downloads / "docs" / "sub" / "b.txt").read_text() == "b"
    assert (receiver.downloads / "docs" / "empty").is_dir()
    events = receiver.events()
    out = sender.cli("message", receiver.address, "across versions")
    assert out.returncode == 0, out.stderr
    assert events.wait_for(lambda e: e["event"] == "message")["text"] == "across versions"
