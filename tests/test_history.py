"""history.py on its own: the history file's round trip, its bound, its
survival of restarts, corrupt and torn lines, filters, modes and links."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tnet import history
from tnet.history import MAX_LINE_BYTES, History, HistoryError, message_entry, transfer_entry


def note(i: int, peer: str = "10.0.0.1", name: str = "laptop", direction: str = "in") -> dict:
    return message_entry(1_700_000_000.0 + i, direction, peer, name, "ok", f"note {i}")


def lines_of(path) -> list:
    return path.read_bytes().split(b"\n")[:-1]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "state" / "tnet" / "history.jsonl"


def opened(path, max_entries: int = 1000) -> History:
    h = History(str(path), max_entries)
    h.open()
    return h


def test_entries_come_back_as_appended_oldest_first(path):
    h = opened(path)
    sent = transfer_entry(1_700_000_000.12345, "out", "10.0.0.2", "desk", "ok", transfer_id="7",
                          files=[history.file_record("a/b.txt", 3, "ab" * 32, "/home/me/a/b.txt")],
                          total_bytes=3, seconds=0.5004)
    h.append(sent)
    h.append(note(1))
    entries, skipped = h.read()
    assert skipped == 0
    assert entries == [sent, note(1)]
    assert entries[0]["time"] == 1_700_000_000.123 and entries[0]["seconds"] == 0.5
    assert entries[0]["files"] == [{"file": "a/b.txt", "path": "/home/me/a/b.txt", "size": 3, "sha256": "ab" * 32}]
    assert entries[0]["files_total"] == 1 and entries[0]["kind"] == "transfer" and entries[0]["id"] == "7"
    assert len(lines_of(path)) == 2 and all(json.loads(line) for line in lines_of(path))
    h.close()


def test_a_restart_sees_the_same_history_and_keeps_counting(path):
    h = opened(path)
    for i in range(150):
        h.append(note(i))
    h.close()
    again = opened(path)
    assert again.read() == ([note(i) for i in range(150)], 0)
    again.append(note(150))
    assert again.read()[0][-2:] == [note(149), note(150)]
    again.close()
    smaller = opened(path, max_entries=10)  # HISTORY_MAX lowered: 151 lines are over 10 + the slack of 100
    assert len(lines_of(path)) == 10
    assert smaller.read() == ([note(i) for i in range(141, 151)], 0)
    smaller.close()


def test_history_max_is_honoured_with_a_slack_and_appends_rewrite_rarely(path):
    h = opened(path, max_entries=100)
    assert h.slack == 100  # at least MIN_SLACK_LINES
    counts = []
    for i in range(1000):
        h.append(note(i))
        counts.append(len(lines_of(path)))
    assert max(counts) == 200  # max + slack, reached before each rewrite
    assert counts[:200] == list(range(1, 201))  # no rewrite before the slack is used up
    assert counts[200] == 100  # then the newest 100, the entry just appended among them
    assert h.read() == ([note(i) for i in range(900, 1000)], 0)
    assert History(str(path), 100).read()[0] == [note(i) for i in range(900, 1000)]
    assert [p for p in os.listdir(path.parent) if p != "history.jsonl"] == []  # no temp file left behind
    h.close()


def test_the_slack_is_a_tenth_of_a_large_history_max():
    assert History("h", 10_000).slack == 1000 and History("h", 5).slack == 100


def test_corrupt_lines_are_skipped_and_counted_and_a_torn_tail_is_stepped_over(path):
    path.parent.mkdir(parents=True)
    good = [json.dumps(note(i)).encode() for i in range(3)]
    path.write_bytes(good[0] + b"\nnot json\n[1, 2]\n\xff\xfe\n" + b"[" * 100_000 + b"\n" + good[1]
                     + b"\n\n" + b'{"n": 1' + b"1" * 1000 + b"}\n" + good[2] + b'\n{"time": 17000')
    h = opened(path)
    assert h.read() == ([note(0), note(1), note(2)], 6)  # the blank line is no entry, and not corrupt
    h.append(note(3))
    assert path.read_bytes().endswith(b'{"time": 17000\n' + history.encode_entry(note(3)))
    assert h.read() == ([note(0), note(1), note(2), note(3)], 6)
    h.close()


def test_a_short_write_leaves_a_half_line_that_the_next_append_steps_over(path, monkeypatch):
    h = opened(path)
    h.append(note(0))
    real_write = os.write

    def half(fd, data):
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(history.os, "write", half)
    with pytest.raises(HistoryError) as raised:
        h.append(note(1))
    monkeypatch.setattr(history.os, "write", real_write)
    assert raised.value.code == "history-io"
    h.append(note(2))
    assert h.read() == ([note(0), note(2)], 1)
    h.close()


def test_lines_of_max_line_bytes_are_read_and_longer_ones_skipped_without_being_held(path):
    path.parent.mkdir(parents=True)

    def line_of(size: int) -> bytes:
        head = b'{"pad": "'
        return head + b"x" * (size - len(head) - 3) + b'"}\n'

    path.write_bytes(line_of(MAX_LINE_BYTES) + line_of(MAX_LINE_BYTES + 1) + line_of(3 * MAX_LINE_BYTES))
    entries, skipped = History(str(path)).read()
    assert [len(e["pad"]) for e in entries] == [MAX_LINE_BYTES - 12] and skipped == 2


def test_an_entry_too_long_for_a_line_lists_fewer_files(path):
    h = opened(path)
    files = [history.file_record(f"{i:04d}" + "x" * 2000, i, "0" * 64) for i in range(1000)]
    h.append(transfer_entry(1.0, "in", "10.0.0.1", "laptop", "ok", transfer_id="1", files=files,
                            total_bytes=1, seconds=1.0))
    (entry,), skipped = h.read()
    assert len(path.read_bytes()) <= MAX_LINE_BYTES and skipped == 0
    assert 0 < len(entry["files"]) < 1000 and entry["files_total"] == 1000
    assert entry["files"] == files[: len(entry["files"])]
    with pytest.raises(HistoryError) as raised:
        h.append({"text": "x" * MAX_LINE_BYTES})
    assert raised.value.code == "history-entry-too-large"
    h.close()


def test_a_transfer_lists_at_most_max_entry_files_and_a_message_is_cut_to_max_text_chars():
    files = [history.file_record(str(i), i, "") for i in range(history.MAX_ENTRY_FILES + 1)]
    entry = transfer_entry(1.0, "out", "p", "n", "ok", transfer_id="1", files=files, total_bytes=0, seconds=0)
    assert len(entry["files"]) == history.MAX_ENTRY_FILES and entry["files_total"] == history.MAX_ENTRY_FILES + 1
    at_limit = message_entry(1.0, "in", "p", "n", "ok", "x" * history.MAX_TEXT_CHARS)
    over = message_entry(1.0, "in", "p", "n", "ok", "x" * (history.MAX_TEXT_CHARS + 1))
    assert at_limit["truncated"] is False and over["truncated"] is True
    assert over["text"] == at_limit["text"]
    with pytest.raises(ValueError):
        message_entry(1.0, "sideways", "p", "n", "ok", "x")


def test_limit_and_peer_filters(path):
    h = opened(path)
    for i in range(6):
        h.append(note(i, "10.0.0.1", "Laptop") if i % 2 else note(i, "10.0.0.2", "desk"))
    assert [e["text"] for e in h.read(limit=2)[0]] == ["note 4", "note 5"]
    assert h.read(limit=0) == ([], 0)
    assert [e["text"] for e in h.read(peer="laptop")[0]] == ["note 1", "note 3", "note 5"]
    assert [e["text"] for e in h.read(peer="LAPTOP", limit=2)[0]] == ["note 3", "note 5"]
    assert [e["text"] for e in h.read(peer="10.0.0.2")[0]] == ["note 0", "note 2", "note 4"]
    assert h.read(peer="10.0.0")[0] == []  # an address matches exactly
    h.close()


def test_reading_a_missing_history_gives_nothing_and_creates_nothing(path):
    assert History(str(path)).read() == ([], 0)
    assert not path.parent.exists()


def test_the_file_is_0600_and_a_new_folder_0700(path):
    h = opened(path)
    h.append(note(0))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    h.close()
    os.chmod(path, 0o644)
    opened(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_symlink_at_the_history_path_is_refused_and_its_target_untouched(path, tmp_path):
    path.parent.mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious\n")
    os.chmod(target, 0o644)
    path.symlink_to(target)
    with pytest.raises(HistoryError) as raised:
        opened(path)
    assert raised.value.code == "history-symlink"
    with pytest.raises(HistoryError):
        History(str(path)).read()
    assert target.read_bytes() == b"precious\n" and stat.S_IMODE(os.stat(target).st_mode) == 0o644


def test_a_folder_or_a_fifo_at_the_history_path_is_refused(path):
    path.mkdir(parents=True)
    with pytest.raises(HistoryError) as raised:
        opened(path)
    assert raised.value.code == "history-not-a-file"
    path.rmdir()
    os.mkfifo(path)
    with pytest.raises(HistoryError) as raised:
        opened(path)  # would block on a FIFO without O_NONBLOCK
    assert raised.value.code == "history-not-a-file"


def test_unprintable_characters_are_escaped_in_the_file(path):
    h = opened(path)
    text = "red \x1b[31m csi \x9b bidi \u202e del \x7f line\nbreak nul \x00 é ok"
    h.append(message_entry(1.0, "in", "10.0.0.1", "evil\x1b]0;x\x07", "ok", text))
    data = path.read_bytes()
    assert data.count(b"\n") == 1 and data.endswith(b"\n")
    assert data[:-1].decode("utf-8").isprintable() and "é".encode() in data
    (entry,), _ = h.read()
    assert entry["text"] == text and entry["name"] == "evil\x1b]0;x\x07"
    h.close()


def test_history_path_follows_state_dir_then_xdg_state_home_then_home():
    assert history.history_path({"STATE_DIR": "/s", "XDG_STATE_HOME": "/x"}) == "/s/history.jsonl"
    assert history.history_path({"XDG_STATE_HOME": "/x", "HOME": "/h"}) == "/x/tnet/history.jsonl"
    assert history.history_path({"XDG_STATE_HOME": "rel", "HOME": "/h"}) == "/h/.local/state/tnet/history.jsonl"
    assert history.history_path({"HOME": "/h"}) == "/h/.local/state/tnet/history.jsonl"


def test_a_failed_rewrite_keeps_every_entry_and_is_tried_again_a_slack_later(path, monkeypatch, caplog):
    h = opened(path, max_entries=100)
    for i in range(200):
        h.append(note(i))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(history.tempfile, "mkstemp", full)
    h.append(note(200))  # the entry is written; only the rewrite failed
    assert len(lines_of(path)) == 201 and "cannot rewrite" in caplog.text
    monkeypatch.undo()
    for i in range(201, 301):
        h.append(note(i))
    assert len(lines_of(path)) == 301  # no new try on every append
    h.append(note(301))
    assert h.read() == ([note(i) for i in range(202, 302)], 0) and len(lines_of(path)) == 100
    h.close()
