"""The README's recipes run as written.

The shell blocks of README.md's "## Recipes" section run in order with bash, against daemons on
loopback: "desk", the daemon the commands talk to, and "laptop", its one
peer. Only the environment is arranged: the socket variables, a HOME and
XDG_RUNTIME_DIR of the test's own, and on PATH a `tnet` that runs this
checkout, a `notify-send` that writes to a file, and a `systemctl` that
does what `systemctl --user enable --now` does with a user unit (its
ExecStart, with the unit's Environment= over ~/.config/environment.d/)."""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

from conftest import LOOPBACK_BROADCAST, ROOT, next_address, random_file, tnet_on_path, wait_until

FAKE_NOTIFY_SEND = """#!/bin/sh
printf '%s | %s\\n' "$1" "$2" >> "$HOME/notifications"
"""

FAKE_SYSTEMCTL = '''#!{python}
"""systemctl --user, as far as the recipes use it: daemon-reload, enable --now UNIT."""
import glob, os, shlex, subprocess, sys, time
home, runtime = os.environ["HOME"], os.environ["XDG_RUNTIME_DIR"]
args = [a for a in sys.argv[1:] if a != "--user"]
if args == ["daemon-reload"]:
    sys.exit(0)
if args[:2] != ["enable", "--now"] or len(args) != 3:
    sys.exit("systemctl (test stand-in): only daemon-reload and enable --now UNIT")
env = {{"HOME": home, "XDG_RUNTIME_DIR": runtime}}
for conf in sorted(glob.glob(os.path.join(home, ".config/environment.d/*.conf"))):
    for line in open(conf):
        if "=" in line:
            key, value = line.strip().split("=", 1)
            env[key] = value
command = None
for line in open(os.path.join(home, ".config/systemd/user", args[2])):
    line = line.strip().replace("%h", home).replace("%t", runtime)
    if line.startswith("Environment="):
        key, value = line[len("Environment="):].split("=", 1)
        env[key] = value
    elif line.startswith("ExecStart="):
        command = shlex.split(line[len("ExecStart="):])
log = open(os.path.join(home, "service.log"), "ab")
proc = subprocess.Popen(command, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                        start_new_session=True)
with open(os.path.join(home, "service.pids"), "a") as pids:
    pids.write(f"{{proc.pid}}\\n")
deadline = time.monotonic() + 30
while not os.path.exists(env["COMMAND_SOCKET"]):  # started, as Type=notify would say
    if proc.poll() is not None or time.monotonic() > deadline:
        sys.exit(f"tnet.service failed; see {{home}}/service.log")
    time.sleep(0.01)
'''


def recipes_text() -> str:
    """The "## Recipes" section of README.md."""
    found = re.search(r"^## Recipes\n(.*?)(?=^## |\Z)", (ROOT / "README.md").read_text(), re.M | re.S)
    assert found, "no '## Recipes' section in README.md"
    return found.group(1)


def recipes() -> List[Tuple[str, str]]:
    """(heading, shell block) in document order."""
    found, heading = [], ""
    for match in re.finditer(r"^### ([^\n]+)$|^```sh\n(.*?)^```$", recipes_text(), re.M | re.S):
        if match.group(1):
            heading = match.group(1).strip()
        else:
            found.append((heading, match.group(2)))
    return found


def test_the_recipes_section_has_the_four_recipes():
    headings = [heading for heading, _ in recipes()]
    for wanted in ("Send to the only peer", "Pipe a message from a script", "Watch and notify",
                   "Run as a service"):
        assert wanted in headings, headings


def test_recipes_run_as_written(net, tmp_path):
    desk, laptop = net.daemon("desk"), net.daemon("laptop")
    laptop_events, desk_events = laptop.events(), desk.events()
    home, work, tools = tmp_path / "home", tmp_path / "work", tmp_path / "tools"
    home.mkdir()
    shutil.copytree(ROOT / "contrib", work / "contrib")  # "from the clone"
    report = random_file(work / "report.pdf", 300_000, seed=9)
    runtime = Path(net.sockdir) / "xdg"  # short: UNIX socket paths are limited
    runtime.mkdir(mode=0o700)
    tnet_on_path(home / ".local" / "bin")  # where `pip install --user` puts it; the unit looks there
    path = tnet_on_path(tools)
    for name, text in (("notify-send", FAKE_NOTIFY_SEND), ("systemctl", FAKE_SYSTEMCTL.format(python=sys.executable))):
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    # What the user manager's environment would hold on this test's loopback network.
    (home / ".config" / "environment.d").mkdir(parents=True)
    service_address = next_address()
    (home / ".config" / "environment.d" / "tnet.conf").write_text(
        f"BIND_ADDRESS={service_address}\nBROADCAST_ADDRESS={LOOPBACK_BROADCAST}\n"
        f"BROADCAST_PORT={net.broadcast_port}\nHOST_NAME=service\nTEMP_DIR={tmp_path / 'service-tmp'}\n")
    env = dict(desk.env, PATH=path, HOME=str(home), XDG_RUNTIME_DIR=str(runtime))
    sessions = []
    try:
        outputs = {}
        for heading, block in recipes():
            log = tmp_path / f"recipe-{len(sessions)}.out"
            with open(log, "w") as out:  # a file, not a pipe: a recipe may leave a job running
                proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", block], cwd=work, env=env,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                sessions.append(proc.pid)
                code = proc.wait(120)
            outputs[heading] = outputs.get(heading, "") + log.read_text()
            assert code == 0, f"recipe {heading!r} failed ({code}):\n{block}\n{outputs[heading]}"

        assert filecmp.cmp(report, laptop.downloads / "report.pdf", shallow=False)
        message = laptop_events.wait_for(lambda e: e["event"] == "message")
        assert message["name"] == "desk" and message["text"].startswith("backup finished on ")

        wait_until(lambda: desk.request("status")[-1]["subscribers"] >= 2, what="the recipe's watch")
        assert laptop.cli("message", "desk", "lunch?").returncode == 0
        photo = work / "photo.jpg"
        photo.write_bytes(b"jpeg")
        assert laptop.cli("send", "desk", str(photo)).returncode == 0
        desk_events.wait_for(lambda e: e["event"] == "transfer-done")
        notifications = home / "notifications"
        wait_until(lambda: notifications.exists() and notifications.read_text().count("\n") >= 2,
                   what="two notifications")
        assert notifications.read_text().splitlines() == [
            "tnet: laptop | lunch?", f"tnet: laptop | received {desk.downloads / 'photo.jpg'}"]

        status = outputs["Run as a service"]
        assert re.search(r"^host name +service$", status, re.M), status
        assert f"{service_address}:" in status
        assert (runtime / "tnet" / "commands").exists()
        assert (home / ".local/share/bash-completion/completions/tnet").exists()
    finally:
        for pgid in sessions:  # jobs the recipes left running (tnet watch &)
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        pids = home / "service.pids"
        for pid in pids.read_text().split() if pids.exists() else []:
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
