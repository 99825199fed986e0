"""What keeps transfers fast, checked by what it does rather than by a clock
(speed itself is measured in bench/): small files are pipelined, never one
round trip each, and a large file streams through constant memory."""

from __future__ import annotations

import subprocess
import sys

import crafted
import pytest
from conftest import next_address

from tnet import protocol as proto

MiB = 1024 * 1024


def test_small_files_stream_without_waiting_for_an_answer_each(net, tmp_path):
    """A crafted receiver answers nothing until every file is in: a sender
    that waited for a `done` per file would stall after the first one."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        (folder / f"f{i:03d}.txt").write_bytes(b"%d\n" % i * 100)
    address = next_address()
    receiver = crafted.Receiver(address)
    a = net.daemon("alpha")
    send = subprocess.Popen(a.cli_args("send", "--json", address, str(folder)), env=a.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wire, offer = receiver.take_offer()
        assert offer.entries == 301  # the folder and its files
        ends = [wire.wait_for(proto.FileEnd) for _ in range(300)]  # not a byte sent back yet
        assert len(ends) == 300
        # Answers by index, in any order (§4.1): last first here.
        wire.send(b"".join(proto.encode_frame(proto.Done(i)) for i in reversed(range(offer.entries))))
        out, err = send.communicate(timeout=60)
        assert send.returncode == 0, err
        assert out.count('"event":"file-done"') == 301
        wire.close()
    finally:
        if send.poll() is None:
            send.kill()
        receiver.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")
def test_a_file_larger_than_any_buffer_streams_in_constant_memory(net, tmp_path):
    size = 256 * MiB  # several times a daemon's whole footprint: held in memory, it would show
    a, b = net.daemon("alpha"), net.daemon("bravo")
    f = tmp_path / "big.bin"
    with open(f, "wb") as out:
        out.truncate(size)  # sparse: cheap to make, as costly as any other file to send
    assert a.cli("send", b.address, str(f)).returncode == 0
    assert (b.downloads / "big.bin").stat().st_size == size
    for daemon in (a, b):
        rss = daemon.peak_rss()
        assert rss < 64 * MiB, f"{daemon.name}: peak RSS {rss / MiB:.1f} MiB for a {size // MiB} MiB file"
