"""The `tnet` command as people and scripts use it, against daemons on loopback:
progress on a terminal and in a pipe, --json and exit codes, folders,
transfers and cancel, consent (ACCEPT=ask, ALLOW_FROM), peers by name,
watch --exec, help, and the files in contrib/."""

from __future__ import annotations

import configparser
import fcntl
import filecmp
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import termios
import threading
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import ROOT, random_file, tnet_on_path, wait_until

from tnet import cli

ESCAPES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # any control character but \t and \n


class Terminal:
    """A command on a pseudo-terminal of 120 columns; its output is read in a thread."""

    def __init__(self, args: List[str], env: Dict[str, str], cwd: Path) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        env = {k: v for k, v in env.items() if k not in ("COLUMNS", "LINES")}
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                     start_new_session=True)
        os.close(slave)
        self.master = master
        self.output = b""
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the other side is closed
                chunk = b""
            if not chunk:
                return
            with self.lock:
                self.output += chunk

    def text(self) -> str:
        with self.lock:
            return self.output.decode("utf-8", "replace")

    def wait(self, timeout: float = 120.0) -> int:
        code = self.proc.wait(timeout)
        self.thread.join(timeout)
        os.close(self.master)
        return code

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.wait()
        return self.text()


def subscribers(daemon) -> int:
    return daemon.request("status")[-1]["subscribers"]


# --- 1. Progress ----------------------------------------------------------------------


def test_send_on_a_terminal_draws_a_live_line_and_a_summary(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    big = random_file(tmp_path / "big.bin", 32 * 1024 * 1024, seed=3)
    term = Terminal(a.cli_args("send", "bravo", str(big)), a.env, a.dir)
    assert term.wait() == 0, term.text() + a.log()
    screen = term.text()
    # a live line: wiped and redrawn in place, with name, percent, bytes, rate and ETA
    live = re.findall(r"\r\x1b\[2K(big\.bin +\d+% +[\d.]+ (?:B|KiB|MiB)/32\.0 MiB +[\d.]+ \S+/s +ETA \S+)", screen)
    assert live, repr(screen)
    assert len(live[0]) < 120  # fits the terminal
    assert re.search(r"\r\x1b\[2Ksent big\.bin \(32\.0 MiB\)", screen), repr(screen)
    assert re.search(r"1 file, 32\.0 MiB in [\d.]+s \([\d.]+ \S+/s\) to bravo\r\n", screen), repr(screen)
    assert filecmp.cmp(big, b.downloads / "big.bin", shallow=False)


def test_send_into_a_pipe_prints_plain_lines(net, tmp_path):
    a = net.daemon("alpha")
    net.daemon("bravo")
    big = random_file(tmp_path / "big.bin", 8 * 1024 * 1024, seed=4)
    small = tmp_path / "small.txt"
    small.write_text("hello")
    out = a.cli("send", "bravo", str(big), str(small))
    assert out.returncode == 0, out.stderr
    assert not ESCAPES.search(out.stdout), repr(out.stdout)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("sending 2 items (8.0 MiB) to bravo, transfer ")
    assert lines[1] == "sent big.bin (8.0 MiB)" and lines[2] == "sent small.txt (5 B)"
    assert re.fullmatch(r"2 files, 8\.0 MiB in [\d.]+s \([\d.]+ \S+/s\) to bravo", lines[3]), lines
    assert len(lines) == 4


def test_watch_on_a_terminal_shows_incoming_progress(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", REPORT_PROGRESS_IN="1")
    term = Terminal(b.cli_args("watch"), b.env, b.dir)
    try:
        wait_until(lambda: subscribers(b) == 1, what="watch to subscribe")
        big = random_file(tmp_path / "in.bin", 16 * 1024 * 1024, seed=5)
        assert a.cli("send", b.address, str(big)).returncode == 0
        wait_until(lambda: "done [" in term.text(), what="the transfer summary in watch")
    finally:
        screen = term.stop()
    assert re.search(r"receiving \[\d+\] from alpha: 1 item, 16\.0 MiB", screen), repr(screen)
    assert re.search(r"\r\x1b\[2Kin\.bin +\d+% +[\d.]+ (?:B|KiB|MiB)/16\.0 MiB +[\d.]+ \S+/s +ETA", screen), \
        repr(screen)
    assert re.search(r"\r\x1b\[2Kreceived in\.bin \(16\.0 MiB\) from alpha -> ", screen), repr(screen)
    assert re.search(r"done \[\d+\] from alpha: 1 file, 16\.0 MiB in [\d.]+s", screen), repr(screen)


def test_watch_into_a_pipe_prints_plain_lines(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", REPORT_PROGRESS_IN="1")
    watch = subprocess.Popen(b.cli_args("watch"), env=b.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_until(lambda: subscribers(b) == 1, what="watch to subscribe")
        f = random_file(tmp_path / "p.bin", 2 * 1024 * 1024, seed=6)
        assert a.cli("send", b.address, str(f)).returncode == 0
        assert a.cli("message", "bravo", "ding \x1b[31m").returncode == 0
        lines = [watch.stdout.readline() for _ in range(4)]
    finally:
        watch.send_signal(signal.SIGINT)
        assert watch.wait(30) == 0  # Ctrl-C is how one stops watching
    text = "".join(lines)
    assert not ESCAPES.search(text.replace("\n", "")), repr(text)
    assert lines[0].startswith("receiving [") and lines[1].startswith("received p.bin (2.0 MiB) from alpha")
    assert lines[2].startswith("done [") and lines[3] == f"message from alpha ({a.address}): ding \\x1b[31m\n"


def test_progress_line_fits_and_shortens_long_names():
    class Screen:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    clock = iter([10.0, 12.0]).__next__
    screen = Screen()
    progress = cli.Progress(screen, tty=True, clock=clock)
    event = {"id": "1", "file": "d/" * 200 + "x.bin", "file_bytes": 0, "file_size": 4 << 20}
    progress.update(event)
    progress.update(dict(event, file_bytes=2 << 20))
    last = screen.text.split("\r\x1b[2K")[-1]
    assert last.startswith("\u2026") and "x.bin   50%  2.0 MiB/4.0 MiB  1.0 MiB/s  ETA 2s" in last
    assert len(last) < shutil.get_terminal_size().columns


# --- 2. --json and exit codes -----------------------------------------------------------


def test_every_command_takes_json_and_its_output_parses(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    f = tmp_path / "j.txt"
    f.write_text("json")
    discover = json.loads(a.cli("discover", "--json").stdout)
    assert [p["name"] for p in discover] == ["bravo"]
    peers = json.loads(a.cli("peers", "--json").stdout)
    assert peers[0]["name"] == "bravo" and peers[0]["address"] == b.address and "seen_s_ago" in peers[0]
    sent = [json.loads(line) for line in a.cli("send", "--json", "bravo", str(f)).stdout.splitlines()]
    assert [x.get("event") for x in sent] == ["started", "file-done", None] and sent[-1]["ok"] is True
    assert sent[-1]["files"] == 1 and sent[-1]["bytes"] == 4
    message = json.loads(a.cli("message", "--json", "bravo", "hi").stdout)
    assert message["ok"] and message["name"] == "bravo"
    assert json.loads(a.cli("status", "--json").stdout)["host_name"] == "alpha"
    assert json.loads(a.cli("transfers", "--json").stdout) == []
    for command in ("cancel", "accept", "decline"):
        out = a.cli(command, "--json", "99")
        assert out.returncode == 1
        assert json.loads(out.stdout) == {"ok": False, "code": "no-such-transfer", "exit": 1,
                                          "error": "no-such-transfer: no open transfer '99'"}
    help_text = a.cli("--help").stdout
    for name in re.findall(r"^    (\w+)", help_text, re.M):  # every subcommand listed
        assert "--json" in a.cli(name, "--help").stdout, name


def test_options_go_anywhere_after_the_command():
    parsed = cli.parse_command_line(["send", "laptop", "a.txt", "--json", "b/", "--retry-for", "5", "c"])
    assert (parsed.peer, parsed.files, parsed.json, parsed.retry_for) == ("laptop", ["a.txt", "b/", "c"], True, 5.0)
    parsed = cli.parse_command_line(["message", "laptop", "--pin", "1234", "lunch?"])
    assert (parsed.peer, parsed.text, parsed.pin) == ("laptop", "lunch?", "1234")
    assert vars(cli.parse_command_line(["send", "--json", "laptop", "a"])) == vars(
        cli.parse_command_line(["send", "laptop", "a", "--json"]))
    with pytest.raises(SystemExit) as unknown:
        cli.parse_command_line(["send", "laptop", "a", "--bogus", "b"])
    assert unknown.value.code == 2
    parsed = cli.parse_command_line(["message", "--json", "laptop", "--", "--all"])  # after --, words only
    assert (parsed.peer, parsed.text, parsed.all, parsed.json) == ("laptop", "--all", False, True)
    for words in (["message", "--", "laptop", "--all", "--json"], ["message", "--", "laptop", "hi", "--pin", "1"]):
        with pytest.raises(SystemExit) as extra:  # a word too many, not options after all
            cli.parse_command_line(words)
        assert extra.value.code == 2


def test_a_send_with_an_option_between_its_files_sends_them_all(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    first, second = tmp_path / "1.txt", tmp_path / "2.txt"
    first.write_text("one")
    second.write_text("two")
    out = a.cli("send", b.address, str(first), "--json", str(second))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["files"] == 2
    assert sorted(os.listdir(b.downloads)) == ["1.txt", "2.txt"]


def test_daemon_logs_json_with_json(net):
    a = net.daemon("alpha", start=False)
    a.proc = subprocess.Popen(a.cli_args("daemon", "--json"), env=a.env, stderr=subprocess.PIPE, text=True,
                              cwd=a.dir)
    wait_until(lambda: os.path.exists(a.command_socket) and a.alive_and_answering(), what="the daemon to start")
    first = json.loads(a.proc.stderr.readline())
    assert first["level"] == "info" and "alpha" in first["message"]
    assert a.terminate() == 0


def test_exit_codes(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", ALLOW_FROM="127.0.0.1")
    f = tmp_path / "f.txt"
    f.write_text("x")
    gone = a.cli("status", "--json", env={"COMMAND_SOCKET": str(tmp_path / "nothing")})
    assert gone.returncode == cli.EXIT_NO_DAEMON == 3
    assert json.loads(gone.stdout)["code"] == "no-daemon" and "no tnet daemon is running" in gone.stderr
    assert a.cli("watch", env={"EVENT_SOCKET": str(tmp_path / "nothing")}).returncode == 3
    unreachable = a.cli("send", "127.0.0.254", str(f))
    assert unreachable.returncode == cli.EXIT_UNREACHABLE == 4 and "unreachable" in unreachable.stderr
    assert a.cli("message", "no-such-peer", "x").returncode == 4
    refused = a.cli("send", b.address, str(f))
    assert refused.returncode == cli.EXIT_REFUSED == 5, refused.stderr
    assert a.cli("message", b.address, "x").returncode == 5
    missing = a.cli("send", "--json", b.address, str(tmp_path / "missing.txt"))
    assert missing.returncode == cli.EXIT_LOCAL_FILE == 6
    assert json.loads(missing.stdout)["code"] == "file-error" and "missing.txt" in missing.stderr
    assert a.cli("frobnicate").returncode == 2
    assert cli.EXIT_BY_CODE["verify-failed"] == 7  # 7 and 8 are provoked in the tests of cancel below
    help_text = a.cli("--help").stdout
    for code, words in ((3, "daemon not running"), (4, "peer unreachable"), (5, "refused by the peer"),
                        (6, "local file error"), (7, "verification failed"), (8, "cancelled")):
        assert re.search(rf"\b{code}  {words}", help_text), (code, help_text)


# --- 3. Folders -----------------------------------------------------------------------


def make_tree(root: Path) -> None:
    """500 files in 3 levels, an empty folder, and links that must not be followed."""
    n = 0
    for i in range(5):
        for j in range(10):
            folder = root / f"level1-{i}" / f"level2-{j}"
            folder.mkdir(parents=True)
            for k in range(10):
                (folder / f"file-{k}.txt").write_bytes(f"{i}/{j}/{k}\n".encode() * (n % 7))
                n += 1
    (root / "empty folder").mkdir()
    assert n == 500


def tree(root: Path) -> Dict[str, bytes]:
    """Every file and folder below ``root``, by relative path; links fail the test."""
    found: Dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            assert not path.is_symlink(), path
            found[str(path.relative_to(root))] = b"/" if path.is_dir() else path.read_bytes()
    return found


def test_a_folder_arrives_identical_links_skipped_and_second_send_is_renamed(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    src = tmp_path / "photos"
    make_tree(src)
    expected = tree(src)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the tree")
    os.symlink(secret, src / "level1-0" / "link-out")
    os.symlink("..", src / "level1-1" / "loop")
    out = a.cli("send", "bravo", str(src))
    assert out.returncode == 0, out.stderr + a.log()
    assert tree(b.downloads / "photos") == expected
    assert "secret.txt" not in os.listdir(b.downloads)
    lines = out.stdout.splitlines()
    skipped = sorted(line for line in lines if line.startswith("skipped "))
    assert len(skipped) == 2 and "link-out" in skipped[0] and "loop" in skipped[1]
    assert lines[-1].startswith("500 files and 57 folders, ")
    again = a.cli("send", "--json", b.address, str(src))
    assert again.returncode == 0
    assert sorted(os.listdir(b.downloads)) == ["photos", "photos (1)"]
    assert tree(b.downloads / "photos (1)") == expected
    events = [json.loads(line) for line in again.stdout.splitlines()]
    assert sorted(e["path"] for e in events if e.get("event") == "skipped") == [
        str(src / "level1-0" / "link-out"), str(src / "level1-1" / "loop")]
    assert b.temp_files() == []


# --- 4. Transfers and cancel --------------------------------------------------------------


def transfers_of(daemon) -> List[dict]:
    return json.loads(daemon.cli("transfers", "--json").stdout)


class MidFile:
    """A transfer held in the middle of a big file, whatever the machine's speed:
    the receiver (ACCEPT=ask) accepts while the sender is stopped (SIGSTOP);
    the sender announces the file while the receiver is stopped, and is
    stopped in turn once it waits for the receiver to say what it holds (§7);
    the receiver says so and is stopped; the sender then streams into the
    stopped receiver until the socket buffers are full, and is stopped again;
    the receiver, let go, reads what is queued and waits for more.
    ``release()`` lets the sender go on."""

    def __init__(self, a, b, events, big: Path, *send_args: str) -> None:
        self.a, self.b, self.stopped = a, b, []
        self.send = subprocess.Popen(a.cli_args("send", *send_args, b.address, str(big)), env=a.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            self.offer = events.wait_for(lambda e: e["event"] == "offer")
            self.hold(a)
            assert b.cli("accept", self.offer["id"]).returncode == 0
            self.hold(b)
            self.release(a)
            wait_until(lambda: any(t["file"] for t in a.request("transfers")[-1]["transfers"]),
                       what="the sender to announce the file")
            self.hold(a)
            self.release(b)
            wait_until(lambda: any(t["file"] for t in b.request("transfers")[-1]["transfers"]),
                       what="the receiver to answer it")
            self.hold(b)
            self.release(a)
            wait_until(lambda: any(t["bytes"] > 0 for t in a.request("transfers")[-1]["transfers"]),
                       what="the sender to start streaming")
            self.hold(a)
            self.release(b)
            self.listed = wait_until(lambda: [t for t in transfers_of(b) if t["bytes"] > 0], what="bytes received")
        except BaseException:
            self.release_all()
            raise

    def hold(self, daemon) -> None:
        daemon.proc.send_signal(signal.SIGSTOP)
        self.stopped.append(daemon)

    def release(self, daemon) -> None:
        daemon.proc.send_signal(signal.SIGCONT)
        self.stopped.remove(daemon)

    def release_all(self) -> None:
        for daemon in list(self.stopped):
            self.release(daemon)

    def result(self):
        self.release_all()
        out, err = self.send.communicate(timeout=60)
        return self.send.returncode, out, err


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_cancel_from_the_receiving_side_mid_file(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", ACCEPT="ask")
    ea, eb = a.events(), b.events()
    big = sparse_file(tmp_path / "huge.bin", 256 * 1024 * 1024)  # far more than socket buffers hold
    held = MidFile(a, b, eb, big)
    try:
        t = held.listed[0]
        assert (t["id"], t["direction"], t["peer"], t["name"], t["file"]) == (
            held.offer["id"], "in", a.address, "alpha", "huge.bin")
        assert 0 < t["bytes"] < t["size"] == big.stat().st_size
        assert b.temp_files()  # the partial file
        human = b.cli("transfers").stdout.splitlines()
        assert human[0].split() == ["ID", "DIR", "PEER", "FILE", "DONE", "BYTES"]
        assert human[1].split()[:4] == [held.offer["id"], "in", "alpha", "huge.bin"]
        cancel = b.cli("cancel", held.offer["id"])
        assert cancel.returncode == 0 and cancel.stdout == f"transfer {held.offer['id']} cancelled\n"
        assert eb.wait_for(lambda e: e["event"] == "transfer-failed")["code"] == "cancelled"
        wait_until(lambda: b.temp_files() == [], what="the temp file to go")
        assert transfers_of(b) == []
    finally:
        code, out, err = held.result()
    assert code == cli.EXIT_CANCELLED == 8, err
    assert "cancelled" in err
    assert ea.wait_for(lambda e: e["event"] == "transfer-failed")["code"] == "cancelled"
    assert os.listdir(b.downloads) == []
    wait_until(lambda: transfers_of(a) == [], what="the sender to forget it")


def test_a_file_changed_while_sent_fails_verification(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", ACCEPT="ask")
    eb = b.events()
    big = sparse_file(tmp_path / "moving.bin", 64 * 1024 * 1024)
    held = MidFile(a, b, eb, big, "--json")
    try:
        info = big.stat()
        os.utime(big, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))  # someone saved it meanwhile
    finally:
        code, out, err = held.result()
    assert code == cli.EXIT_VERIFY == 7, err
    last = json.loads(out.splitlines()[-1])
    assert last["ok"] is False and last["code"] == "file-changed"
    assert eb.wait_for(lambda e: e["event"] == "file-failed")["code"] == "file-changed"
    assert os.listdir(b.downloads) == [] and b.temp_files() == []


def test_cancel_from_the_sending_side(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", ACCEPT="ask")
    eb = b.events()
    f = random_file(tmp_path / "c.bin", 1000)
    send = subprocess.Popen(a.cli_args("send", "--json", b.address, str(f)), env=a.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    eb.wait_for(lambda e: e["event"] == "offer")
    (mine,) = transfers_of(a)
    assert mine["direction"] == "out" and mine["peer"] == b.address
    assert a.cli("cancel", mine["id"]).returncode == 0
    out, err = send.communicate(timeout=60)
    assert send.returncode == 8
    assert json.loads(out.splitlines()[-1])["code"] == "cancelled"
    assert eb.wait_for(lambda e: e["event"] == "transfer-failed")["code"] == "cancelled"
    assert transfers_of(b) == [] and os.listdir(b.downloads) == []


# --- 5. Consent ---------------------------------------------------------------------------


def test_ask_mode_accepted(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", ACCEPT="ask")
    eb = b.events()
    f = random_file(tmp_path / "asked.bin", 70000)
    send = subprocess.Popen(a.cli_args("send", "bravo", str(f)), env=a.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    offer = eb.wait_for(lambda e: e["event"] == "offer")
    assert (offer["name"], offer["entries"], offer["size"]) == ("alpha", 1, 70000)
    assert not os.listdir(b.downloads)
    (waiting,) = transfers_of(b)
    assert waiting["id"] == offer["id"]
    accept = b.cli("accept", "--json", offer["id"])
    assert json.loads(accept.stdout) == {"id": offer["id"], "ok": True}
    out, err = send.communicate(timeout=60)
    assert send.returncode == 0, err
    assert filecmp.cmp(f, b.downloads / "asked.bin", shallow=False)
    assert b.cli("accept", offer["id"]).returncode == 1  # gone: nothing to decide


def test_ask_mode_declined(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", ACCEPT="ask")
    with b.watching() as watch:
        f = tmp_path / "no.txt"
        f.write_text("unwanted")
        send = subprocess.Popen(a.cli_args("send", "bravo", str(f)), env=a.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        line = watch.stdout.readline()
        tid = re.match(r"offer \[(\d+)\] from alpha \(127\.[\d.]+\): 1 item, 8 B; `tnet accept \1` or "
                       r"`tnet decline \1`$", line)
        assert tid, line
        assert b.cli("decline", tid.group(1)).stdout == f"transfer {tid.group(1)} declined\n"
        out, err = send.communicate(timeout=60)
        assert send.returncode == cli.EXIT_REFUSED, err
        assert "declined" in err and "bravo" in err
        assert "transfer-failed" in watch.stdout.readline()
    assert os.listdir(b.downloads) == [] and b.temp_files() == []


def test_ask_mode_times_out_as_declined(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", ACCEPT="ask", ASK_TIMEOUT="0.5")
    f = tmp_path / "late.txt"
    f.write_text("late")
    out = a.cli("send", b.address, str(f))
    assert out.returncode == 5 and "no one on bravo accepted" in out.stderr


def test_allow_from_refuses_an_unlisted_peer(net, tmp_path):
    a = net.daemon("alpha")
    b = net.daemon("bravo", start=False)
    b.env["ALLOW_FROM"] = "127.0.0.1,10.0.0.0/8"
    b.start()
    c = net.daemon("charlie")
    b.env["ALLOW_FROM"] = ""
    f = tmp_path / "f.txt"
    f.write_text("x")
    out = a.cli("send", b.address, str(f))
    assert out.returncode == 5
    assert out.stderr == f"tnet send: refused: bravo does not take files from {a.address}\n"
    assert os.listdir(b.downloads) == []
    assert c.cli("send", b.address, str(f)).returncode == 5
    allowed = net.daemon("delta", ALLOW_FROM=a.address)
    assert a.cli("send", allowed.address, str(f)).returncode == 0
    assert c.cli("message", allowed.address, "let me in").returncode == 5


# --- 6. Peers by name ------------------------------------------------------------------------


def test_peers_by_name_unknown_and_ambiguous(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    twin1, twin2 = net.daemon("twin"), net.daemon("twin2", HOST_NAME="twin")
    discovered = a.cli("discover").stdout.splitlines()
    assert len(discovered) == 3
    assert len({line.index(b.address[:6]) for line in discovered}) == 1  # aligned columns
    f = tmp_path / "f.txt"
    f.write_text("x")
    assert a.cli("message", "bravo", "by name").returncode == 0
    assert a.cli("message", "BRAVO", "any case").returncode == 0
    peers = a.cli("peers").stdout.splitlines()
    assert re.fullmatch(rf"bravo +{re.escape(b.address)} +seen [\d.]+s ago", peers[0]), peers
    ambiguous = a.cli("send", "twin", str(f))
    assert ambiguous.returncode == 4
    assert "ambiguous-peer" in ambiguous.stderr
    assert twin1.address in ambiguous.stderr and twin2.address in ambiguous.stderr
    unknown = a.cli("send", "zulu", str(f))
    assert unknown.returncode == 4
    assert "unknown-peer" in unknown.stderr and "bravo" in unknown.stderr and "twin" in unknown.stderr


# --- 7. Scripts and desktop: watch --exec, the service unit, completion ------------------------


def test_watch_exec_runs_once_per_event_with_the_event_on_stdin_and_in_the_environment(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    log = tmp_path / "hook.log"
    hook = f'{{ cat; printf "%s|%s|%s\\n" "$TNET_EVENT" "$TNET_NAME" "$TNET_TEXT"; }} >> "{log}"'
    with b.watching("--json", "--exec", hook):
        for n in range(3):
            assert a.cli("message", "bravo", f"note {n}").returncode == 0
        wait_until(lambda: log.exists() and log.read_text().count("\n") >= 6, what="three hook runs")
        assert a.cli("message", "bravo", "last").returncode == 0
        wait_until(lambda: log.read_text().count("\n") >= 8, what="the fourth hook run")
    lines = log.read_text().splitlines()
    assert len(lines) == 8  # once per event: a JSON line from stdin, then the environment
    for n, (stdin_line, env_line) in enumerate(zip(lines[::2], lines[1::2])):
        text = f"note {n}" if n < 3 else "last"
        assert json.loads(stdin_line) == {"event": "message", "peer": a.address, "name": "alpha", "text": text}
        assert env_line == f"message|alpha|{text}"


def test_systemd_user_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # keys are case-sensitive
    path = ROOT / "contrib" / "tnet.service"
    unit.read_string("\n".join(line for line in path.read_text().splitlines() if not line.startswith("Environment=")))
    assert unit["Service"]["ExecStart"].split()[-2:] == ["tnet", "daemon"]
    assert unit["Install"]["WantedBy"] == "default.target"  # user units: started at login
    env = dict(line.split("=", 2)[1:] for line in path.read_text().splitlines() if line.startswith("Environment="))
    assert env["COMMAND_SOCKET"] == "%t/tnet/commands" and env["EVENT_SOCKET"] == "%t/tnet/events"
    if shutil.which("systemd-analyze"):
        out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def complete(words: List[str], env: Dict[str, str]) -> List[str]:
    script = ROOT / "contrib" / "tnet.bash-completion"
    words_text = " ".join(f"'{w}'" for w in words)
    out = subprocess.run(["bash", "-c", f'source "{script}"; COMP_WORDS=({words_text}); '
                          f'COMP_CWORD={len(words) - 1}; _tnet; printf "%s\\n" "${{COMPREPLY[@]}}"'],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_bash_completion(net, tmp_path):
    script = ROOT / "contrib" / "tnet.bash-completion"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    a = net.daemon("alpha")
    net.daemon("bravo")
    env = dict(a.env, PATH=tnet_on_path(tmp_path / "bin"))
    commands = re.findall(r"^    (\w+)", a.cli("--help").stdout, re.M)
    assert sorted(complete(["tnet", ""], env)) == sorted(commands + ["--help", "--version"])
    assert complete(["tnet", "tr"], env) == ["transfers"]
    assert complete(["tnet", "disc", ""], env) == []
    assert complete(["tnet", "discover", "--t"], env) == ["--timeout"]
    assert sorted(complete(["tnet", "watch", "--"], env)) == ["--exec", "--help", "--json"]
    a.cli("discover")
    assert complete(["tnet", "send", "b"], env) == ["bravo"]
    assert complete(["tnet", "send", "--json", "bravo", str(script)[:-3]], env) == [str(script)]
    assert sorted(complete(["tnet", "history", "--"], env)) == ["--help", "--json", "--limit", "--peer"]
    assert complete(["tnet", "history", "--peer", "b"], env) == ["bravo"]
    assert complete(["tnet", "history", "--limit", ""], env) == []


# --- 8. Help that teaches ---------------------------------------------------------------------


def test_every_help_has_examples(net):
    a = net.daemon("alpha", start=False)
    top = a.cli("--help").stdout
    assert "examples:" in top and "exit codes" in top
    for name in re.findall(r"^    (\w+)", top, re.M):
        text = a.cli(name, "--help").stdout
        assert re.search(r"examples:\n  tnet ", text) or re.search(r"examples:\n  \S+=\S+ tnet", text), name
