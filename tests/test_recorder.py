"""recorder.py on its own: events in, history entries out, memory bounded;
the `history` request read a slice per turn, its answer bounded."""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import pytest

from tnet import recorder as rec
from tnet.history import MAX_ENTRY_FILES, History, file_record, message_entry
from tnet.loop import Loop
from tnet.recorder import HistoryJob, Recorder


@pytest.fixture
def recorder(tmp_path):
    forwarded: List[Dict[str, Any]] = []
    r = Recorder(History(str(tmp_path / "state" / "history.jsonl")), forwarded.append, max_in_flight=3,
                 wall=lambda: 1_700_000_000.0)
    r.forwarded = forwarded  # type: ignore[attr-defined]
    r.open()
    yield r
    r.close()


def transfer(direction: str, tid: str) -> Dict[str, Any]:
    return {"id": tid, "direction": direction, "peer": "10.0.0.2", "name": "bravo", "bytes": 10, "seconds": 0.25}


def test_every_event_is_forwarded_and_what_ends_is_recorded(recorder):
    events = [dict(transfer("in", "1"), event="transfer-started", entries=1),
              dict(transfer("in", "1"), event="file-done", file="a.txt", path="/d/a.txt", sha256="ab" * 32, size=3),
              dict(transfer("in", "1"), event="progress"),
              dict(transfer("in", "1"), event="transfer-done", entries=1, files=1),
              {"event": "message", "peer": "10.0.0.3", "name": "charlie", "text": "hi"},
              {"event": "error", "peer": "10.0.0.4", "code": "bad-magic", "message": "x"}]
    for event in events:
        recorder.publish(event)
    assert recorder.forwarded == events
    entries, skipped = recorder.history.read()
    assert skipped == 0 and [e["kind"] for e in entries] == ["transfer", "message"]
    assert entries[0]["files"] == [file_record("a.txt", 3, "ab" * 32, "/d/a.txt")]
    assert (entries[0]["direction"], entries[0]["code"], entries[0]["id"], entries[0]["bytes"]) == ("in", "ok", "1", 10)
    assert entries[1] == message_entry(1_700_000_000.0, "in", "10.0.0.3", "charlie", "ok", "hi")
    assert recorder.in_flight == {}


def test_a_transfer_lists_at_most_max_entry_files_and_counts_them_all(recorder):
    for i in range(MAX_ENTRY_FILES + 5):
        recorder.publish(dict(transfer("in", "7"), event="file-done", file=f"{i}", path=f"/d/{i}", sha256="", size=i))
    assert len(recorder.in_flight[("in", "7")].files) == MAX_ENTRY_FILES
    recorder.publish(dict(transfer("in", "7"), event="transfer-failed", code="verify-failed", message="x"))
    (entry,), _ = recorder.history.read()
    assert len(entry["files"]) == MAX_ENTRY_FILES and entry["files_total"] == MAX_ENTRY_FILES + 5
    assert entry["code"] == "verify-failed"


def test_transfers_in_flight_are_bounded_the_oldest_forgotten(recorder):
    for tid in "12345":
        recorder.publish(dict(transfer("in", tid), event="file-done", file="f", path="/f", sha256="", size=1))
    assert list(recorder.in_flight) == [("in", "3"), ("in", "4"), ("in", "5")]


def test_outgoing_files_come_from_the_send_lines_unless_the_sender_gives_its_own(recorder):
    recorder.on_send_line({"event": "started", "id": "4", "peer": "10.0.0.2", "files": 3, "bytes": 5})
    recorder.on_send_line({"event": "file-done", "file": "d", "size": 0, "folder": True, "id": "4"})
    recorder.on_send_line({"event": "file-done", "file": "d/a", "size": 5, "folder": False, "id": "4"})
    recorder.on_send_line({"event": "file-done", "file": "b", "size": 2, "folder": False, "id": "5"})
    recorder.publish(dict(transfer("out", "4"), event="transfer-done", files=2))
    recorder.record_outgoing_files("5", [file_record("b", 2, "cd" * 32, "/home/me/b")])
    recorder.on_send_line({"event": "file-done", "file": "b", "size": 2, "folder": False, "id": "5"})  # ignored now
    recorder.record_outgoing_files("5", [file_record("c", 1, "ef" * 32, "/home/me/c")])  # once per file is fine
    recorder.publish(dict(transfer("out", "5"), event="transfer-done", files=2))
    recorder.publish(dict(transfer("out", "6"), event="transfer-failed", files=9, code="unreachable", message="x"))
    four, five, six = recorder.history.read()[0]
    assert four["files"] == [file_record("d/a", 5, "")] and four["files_total"] == 1
    assert five["files"] == [file_record("b", 2, "cd" * 32, "/home/me/b"), file_record("c", 1, "ef" * 32, "/home/me/c")]
    assert six["files"] == [] and six["files_total"] == 9 and six["code"] == "unreachable"


def test_a_history_that_cannot_be_written_is_said_once_and_costs_no_event(recorder, caplog):
    recorder.history.close()
    with caplog.at_level(logging.INFO, logger="tnet"):
        for i in range(3):
            recorder.publish({"event": "message", "peer": "10.0.0.3", "name": "c", "text": str(i)})
    assert len(recorder.forwarded) == 3
    assert [r.levelname for r in caplog.records] == ["ERROR"] and "history-closed" in caplog.text
    recorder.history.open()
    with caplog.at_level(logging.INFO, logger="tnet"):
        recorder.publish({"event": "message", "peer": "10.0.0.3", "name": "c", "text": "back"})
    assert "written again" in caplog.text
    assert [e["text"] for e in recorder.history.read()[0]] == ["back"]


class Client:
    """What a HistoryJob answers to."""

    def __init__(self) -> None:
        self.closed = False
        self.job: Any = None
        self.answers: List[Dict[str, Any]] = []

    def finish(self, obj: Dict[str, Any]) -> None:
        self.answers.append(dict(obj, ok=True))
        self.job = None

    def fail(self, code: str, message: str, **extra: Any) -> None:
        self.answers.append(dict(extra, ok=False, code=code, error=message))
        self.job = None


def run_job(loop: Loop, client: Client, history: History, **args: Any) -> int:
    HistoryJob(loop, client, history, args.get("limit"), args.get("peer")).start()
    turns = 0
    while loop.turn_work:
        loop.run_once(at_most=0)
        turns += 1
    return turns


def note(i: int) -> Dict[str, Any]:
    return message_entry(float(i), "in", "10.0.0.2" if i % 2 else "10.0.0.3", "b", "ok", f"note {i}")


def test_the_history_request_reads_a_slice_per_turn(recorder):
    for i in range(2 * rec.LINES_PER_TURN + 10):
        recorder.history.append(note(i))
    loop, client = Loop(lambda: 0.0), Client()
    assert run_job(loop, client, recorder.history, limit=3, peer="10.0.0.2") == 3
    (answer,) = client.answers
    assert [e["text"] for e in answer["entries"]] == [f"note {i}" for i in (4005, 4007, 4009)]
    assert answer["skipped"] == 0 and answer["omitted"] == 0 and client.job is None
    loop.close()


def test_the_answer_keeps_the_newest_entries_that_fit_and_counts_the_rest(recorder, monkeypatch):
    for i in range(50):
        recorder.history.append(note(i))
    with open(recorder.history.path, "rb") as f:
        line = len(f.readlines()[-1])  # the newest lines are all this long
    monkeypatch.setattr(rec, "MAX_ANSWER_BYTES", 10 * line + 5)
    loop, client = Loop(lambda: 0.0), Client()
    run_job(loop, client, recorder.history)
    (answer,) = client.answers
    assert [e["text"] for e in answer["entries"]] == [f"note {i}" for i in range(40, 50)]
    assert answer["omitted"] == 40
    client = Client()
    run_job(loop, client, recorder.history, limit=12)
    assert client.answers[0]["omitted"] == 2
    loop.close()


def test_a_client_gone_mid_read_stops_it(recorder):
    for i in range(3 * rec.LINES_PER_TURN):
        recorder.history.append(note(i))
    loop, client = Loop(lambda: 0.0), Client()
    job = HistoryJob(loop, client, recorder.history, None, None)
    job.start()
    loop.run_once(at_most=0)
    assert client.job is job and loop.turn_work
    job.cancel("cancelled", "the local client disconnected")
    assert not loop.turn_work and client.answers == [] and job.lines.gi_frame is None  # its file is closed
    loop.close()


def test_a_history_gone_bad_is_answered_with_its_code(recorder, tmp_path):
    path = tmp_path / "elsewhere" / "history.jsonl"
    path.parent.mkdir()
    path.symlink_to(tmp_path / "target")
    loop, client = Loop(lambda: 0.0), Client()
    run_job(loop, client, History(str(path)))
    assert client.answers[0]["ok"] is False and client.answers[0]["code"] == "history-symlink"
    loop.close()
