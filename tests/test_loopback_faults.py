"""Faults on loopback: peers killed mid-transfer, slow and silent connections,
a full or unwritable disk, SIGTERM during transfers. Each checks the reason
given, that no partial file remains, and that the daemon goes on (or, on
SIGTERM, exits cleanly and restarts at once)."""

from __future__ import annotations

import errno
import filecmp
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import crafted
import pytest
from conftest import next_address, random_file, temp_files, wait_until

from tnet import protocol as proto

CRAFTED = str(Path(crafted.__file__).resolve())
MiB = 1024 * 1024


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def temp_size(daemon) -> int:
    names = daemon.temp_files()
    return os.path.getsize(daemon.temp / names[0]) if names else -1


def small_transfer_works(sender, receiver, tmp_path: Path, name: str = "after.bin") -> None:
    f = random_file(tmp_path / name, 200 * 1024, seed=3)
    out = sender.cli("send", receiver.address, str(f))
    assert out.returncode == 0, out.stderr + receiver.log()
    assert filecmp.cmp(f, Path(receiver.env["FILE_SAVE_DIR"]) / name, shallow=False)


# --- 4. dead and slow peers -------------------------------------------------------------------


def test_sender_killed_mid_transfer(net):
    b = net.daemon("bravo")
    events = b.events()
    sender = subprocess.Popen([sys.executable, CRAFTED, "send", b.address, str(8 * MiB), str(MiB)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert sender.stdout.readline() == b"ready\n"
        wait_until(lambda: temp_size(b) == MiB, what="the first MiB in the temp file")
    finally:
        sender.kill()
        sender.wait()
    failed = events.wait_for(lambda e: e["event"] == "transfer-failed")
    assert failed["code"] in ("truncated", "peer-gone"), failed
    wait_until(lambda: b.temp_files() == [], what="the temp file to go")
    assert os.listdir(b.downloads) == []
    assert b.request("status")[-1]["transfers"] == []


def test_receiver_killed_mid_transfer(net, tmp_path):
    address = next_address()
    receiver = subprocess.Popen([sys.executable, CRAFTED, "receive", address, str(MiB)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    a = net.daemon("alpha")
    f = sparse_file(tmp_path / "big.bin", 256 * MiB)
    try:
        assert receiver.stdout.readline() == b"listening\n"
        cli = subprocess.Popen(a.cli_args("send", "--no-retry", address, str(f)), env=a.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        assert receiver.stdout.readline() == b"ready\n"
    finally:
        receiver.kill()
        receiver.wait()
    _, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 4, stderr
    assert "peer-gone" in stderr and address in stderr
    assert a.request("status")[-1]["transfers"] == []


def test_slowloris_connections_time_out_while_a_good_transfer_proceeds(net, tmp_path):
    a = net.daemon("alpha")
    b = net.daemon("bravo", HANDSHAKE_TIMEOUT="1", IDLE_TIMEOUT="60", MAX_CONNECTIONS_PER_PEER="256")
    idle = [socket.create_connection((b.address, crafted.PORT), 30) for _ in range(200)]
    try:
        small_transfer_works(a, b, tmp_path)
        for sock in idle:
            sock.settimeout(30)
            assert crafted.Wire(sock, "initiator").read_to_eof() == proto.PREFACE  # then closed
    finally:
        for sock in idle:
            sock.close()
    assert b.log().count("did not open its exchange within 1 s") == 200
    small_transfer_works(a, b, tmp_path, "again.bin")


def test_a_trickling_handshake_does_not_push_its_deadline_back(net):
    """One byte at a time, each well inside IDLE_TIMEOUT: the handshake deadline still holds."""
    b = net.daemon("bravo", HANDSHAKE_TIMEOUT="1", IDLE_TIMEOUT="600")
    sock = socket.create_connection((b.address, crafted.PORT), 30)
    stream = iter(proto.PREFACE + crafted.offer(1, 1) * 100)

    def trickled_until_closed() -> bool:
        try:
            sock.send(bytes([next(stream)]))
        except (BrokenPipeError, ConnectionResetError):
            return True
        return "did not open its exchange" in b.log()

    try:
        wait_until(trickled_until_closed, timeout=60, what="the trickler to be dropped")
    finally:
        sock.close()


def test_max_connections_at_n_and_n_plus_one(net):
    b = net.daemon("bravo", MAX_CONNECTIONS="3", HANDSHAKE_TIMEOUT="60")
    held = [socket.create_connection((b.address, crafted.PORT), 30) for _ in range(3)]
    try:
        for sock in held:
            sock.settimeout(30)
            assert sock.recv(5) == proto.PREFACE  # taken
        assert first_answer(crafted.connect(b.address)).code == "busy"  # refused, and told why
        assert "refusing" in b.log() and "MAX_CONNECTIONS" in b.log()
        held.pop().close()
        wait_until(lambda: isinstance(first_answer(crafted.connect(b.address)), proto.Accept), what="the freed slot")
    finally:
        for sock in held:
            sock.close()


def first_answer(wire: crafted.Wire):
    """Offer an empty batch; the daemon's first answer: Accept, or the Error refusing us."""
    try:
        wire.send(proto.PREFACE + crafted.offer(1, 0))
        while True:
            for event in wire.events:
                if isinstance(event, (proto.Accept, proto.Error)):
                    return event
            assert wire.pump(), f"closed without an answer: {wire.events} {wire.remote_error}"
    finally:
        wire.close()


# --- 5. full and unwritable disks ---------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs, mounted for the test and unmounted after it, even on failure."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the full-disk tests need root in CI (to mount a tmpfs)")
        pytest.skip("needs root to mount a tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tnet-test", str(mount)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs: {out.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def on_disk(net, disk: Path, name: str = "bravo", **env: str):
    return net.daemon(name, FILE_SAVE_DIR=str(disk / "Downloads"), TEMP_DIR=str(disk / "tmp"), **env)


def fill(path: Path) -> None:
    """Take every free byte, as another writer would."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_file_that_does_not_fit_is_refused_up_front(net, small_disk, tmp_path):
    a, b = net.daemon("alpha"), on_disk(net, small_disk)
    f = sparse_file(tmp_path / "huge.bin", 16 * MiB)
    out = a.cli("send", b.address, str(f))
    assert out.returncode == 5, out.stderr
    assert "no-space" in out.stderr and "not enough space" in out.stderr
    assert temp_files(small_disk / "tmp") == [] and os.listdir(small_disk / "Downloads") == []
    small_transfer_works(a, b, tmp_path)


def test_a_disk_that_fills_mid_transfer_fails_cleanly(net, small_disk, tmp_path):
    a, b = net.daemon("alpha"), on_disk(net, small_disk)
    events = b.events()
    wire = crafted.start_batch(b.address, 1, 6 * MiB)
    wire.send(crafted.file_header(0, ["big.bin"], 6 * MiB) + bytes(MiB))
    wait_until(lambda: temp_files(small_disk / "tmp") and
               os.path.getsize(small_disk / "tmp" / temp_files(small_disk / "tmp")[0]) == MiB)
    fill(small_disk / "filler")
    try:
        wire.send(bytes(5 * MiB))
    except (BrokenPipeError, ConnectionResetError):
        pass
    error = wire.error()
    wire.close()
    assert error.code == "disk-full" and "No space left" in error.message
    failed = events.wait_for(lambda e: e["event"] == "transfer-failed")
    assert failed["code"] == "disk-full"
    wait_until(lambda: temp_files(small_disk / "tmp") == [], what="the temp file to go")
    assert os.listdir(small_disk / "Downloads") == []
    assert "disk-full" in b.log()
    os.unlink(small_disk / "filler")
    small_transfer_works(a, b, tmp_path)


def test_temp_dir_on_another_file_system_files_arrive_by_copy(net, small_disk, tmp_path):
    """TEMP_DIR (under tmp_path) and FILE_SAVE_DIR (the tmpfs) apart, as with
    a /tmp on tmpfs: link(2) cannot move a file, so it is copied in slices."""
    a, b = net.daemon("alpha"), net.daemon("bravo", FILE_SAVE_DIR=str(small_disk / "Downloads"))
    assert os.stat(b.temp).st_dev != os.stat(small_disk).st_dev
    events = b.events()
    f = random_file(tmp_path / "f.bin", 3 * MiB, seed=5)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "one.txt").write_text("one")
    (folder / "two.txt").write_text("two")
    for _ in range(2):
        out = a.cli("send", b.address, str(f), str(folder))
        assert out.returncode == 0, out.stderr + b.log()
    downloads = small_disk / "Downloads"
    assert sorted(os.listdir(downloads)) == ["docs", "docs (1)", "f (1).bin", "f.bin"]  # nothing hidden left
    for name in ("f.bin", "f (1).bin"):
        assert filecmp.cmp(f, downloads / name, shallow=False)
        assert (downloads / name).stat().st_mode & 0o777 == (downloads / "docs" / "one.txt").stat().st_mode & 0o777
    assert (downloads / "docs (1)" / "two.txt").read_text() == "two"
    done = events.wait_for(lambda e: e["event"] == "file-done" and e["path"].endswith("f (1).bin"))
    assert done["file"] == "f.bin" and done["size"] == 3 * MiB
    assert b.temp_files() == []


def test_a_receiver_copying_into_place_tells_the_sender_to_wait(net, small_disk):
    """A copy may outlast the sender's IDLE_TIMEOUT: `wait` keeps it from giving up."""
    b = net.daemon("bravo", FILE_SAVE_DIR=str(small_disk / "Downloads"), IDLE_TIMEOUT="9")
    data = os.urandom(MiB)
    wire = crafted.start_batch(b.address, 1, len(data))
    wire.send(crafted.file_header(0, ["slow.bin"], len(data)) + data + crafted.end(data))
    wait = wire.wait_for(proto.Wait)
    assert wait.seconds == 9
    assert wire.wait_for(proto.Done).index == 0
    wire.close()
    assert (small_disk / "Downloads" / "slow.bin").read_bytes() == data


def test_a_copy_into_a_full_save_dir_fails_cleanly(net, small_disk, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo", FILE_SAVE_DIR=str(small_disk / "Downloads"))
    data = os.urandom(2 * MiB)
    wire = crafted.start_batch(b.address, 1, len(data))
    wire.send(crafted.file_header(0, ["late.bin"], len(data)) + data)
    wait_until(lambda: temp_size(b) == len(data), what="the whole file in TEMP_DIR")
    fill(small_disk / "filler")  # after the offer's check of free space: the copy finds no room
    wire.send(crafted.end(data))
    failed = wire.wait_for(proto.Failed)
    wire.close()
    assert failed.code == "disk-full" and "late.bin" in failed.message, failed
    assert os.listdir(small_disk / "Downloads") == [] and b.temp_files() == []
    os.unlink(small_disk / "filler")
    small_transfer_works(a, b, tmp_path)


def test_an_unwritable_or_missing_save_dir_is_a_clear_error(net, small_disk, tmp_path):
    a, b = net.daemon("alpha"), on_disk(net, small_disk)
    f = tmp_path / "f.txt"
    f.write_text("x")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = a.cli("send", b.address, str(f))
    assert out.returncode != 0 and "Read-only file system" in out.stderr, out.stderr
    assert b.request("status")[-1]["ok"]
    # At start: read-only, or in a place where no folder can be made.
    for save_dir in (small_disk / "Downloads", f / "Downloads"):
        c = net.daemon("charlie", start=False, FILE_SAVE_DIR=str(save_dir))
        start = subprocess.run(c.cli_args("daemon"), env=c.env, capture_output=True, text=True, timeout=30)
        assert start.returncode == 1 and "FILE_SAVE_DIR" in start.stderr, start.stderr
        assert "Traceback" not in start.stderr
        net.daemons.remove(c)
        c.dir.rename(c.dir.with_name(f"charlie-{save_dir.parent.name}"))
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    # Removed while the daemon runs: made again, as at start.
    os.rmdir(small_disk / "Downloads")
    out = a.cli("send", b.address, str(f))
    assert out.returncode == 0, out.stderr
    assert (small_disk / "Downloads" / "f.txt").read_text() == "x"
    # Replaced by a file while the daemon runs: a clear error.
    os.unlink(small_disk / "Downloads" / "f.txt")
    os.rmdir(small_disk / "Downloads")
    (small_disk / "Downloads").write_text("not a folder")
    out = a.cli("send", b.address, str(f))
    assert out.returncode != 0 and "save-failed" in out.stderr and "FILE_SAVE_DIR" in out.stderr, out.stderr
    assert "Traceback" not in b.log()
    assert b.request("status")[-1]["ok"]


# --- 8. clean shutdown ----------------------------------------------------------------------------


def test_sigterm_on_a_receiving_daemon(net):
    b = net.daemon("bravo")
    wire = crafted.start_batch(b.address, 1, 8 * MiB)
    wire.send(crafted.file_header(0, ["big.bin"], 8 * MiB) + bytes(MiB))
    wait_until(lambda: temp_size(b) == MiB, what="the first MiB in the temp file")
    assert b.terminate() == 0
    error = wire.error()
    wire.close()
    assert error.code == "shutdown" and "bravo" in error.message
    assert b.temp_files() == [] and os.listdir(b.downloads) == []
    assert not os.path.exists(b.command_socket) and not os.path.exists(b.event_socket)
    b.start()  # at once, on the same paths and port
    assert b.request("status")[-1]["ok"]


def test_sigterm_on_a_sending_daemon_tells_its_cli(net, tmp_path):
    receiver = crafted.Receiver(next_address())
    a = net.daemon("alpha")
    f = sparse_file(tmp_path / "big.bin", 256 * MiB)
    try:
        cli = subprocess.Popen(a.cli_args("send", receiver.listener.getsockname()[0], str(f)), env=a.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wire, _ = receiver.take_offer()
        receiver.read_payload(wire, MiB)
        assert a.terminate() == 0
        _, stderr = cli.communicate(timeout=60)
        closing = receiver.finish_file(wire)
    finally:
        receiver.close()
    assert cli.returncode != 0 and "shutdown" in stderr, stderr
    assert isinstance(closing, proto.RemoteProtocolError) and closing.code == "truncated"
    assert not os.path.exists(a.command_socket) and not os.path.exists(a.event_socket)
    a.start()
    assert a.request("status")[-1]["ok"]


def test_sigterm_on_the_receiver_tells_the_sending_cli(net, tmp_path):
    a, b = net.daemon("alpha"), net.daemon("bravo")
    events = b.events()
    f = sparse_file(tmp_path / "big.bin", 1024 * MiB)
    cli = subprocess.Popen(a.cli_args("send", "--no-retry", b.address, str(f)), env=a.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        events.wait_for(lambda e: e["event"] == "transfer-started")
        b.proc.send_signal(signal.SIGSTOP)  # a fills the socket buffers and waits
        b.proc.send_signal(signal.SIGTERM)
        b.proc.send_signal(signal.SIGCONT)
        assert b.proc.wait(30) == 0
        _, stderr = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode != 0 and "shutdown" in stderr and "bravo" in stderr, stderr
    # What arrived is kept for a resume (§7), out of sight: nothing else is left.
    assert [n for n in b.temp_files() if not n.startswith(".tnet-keep-")] == [] and os.listdir(b.downloads) == []
    assert not os.path.exists(b.command_socket)
    b.start()
    small_transfer_works(a, b, tmp_path)
