"""The ``tnet`` command: argparse, the local sockets, human or JSON output.

Holds the subcommands, the client of the daemon's command socket (one JSON
request per line, answers until the line carrying ``"ok"``) and of its events
socket, the rendering of progress and events for people, and the exit codes.
Knows nothing of the TCP protocol between daemons: everything goes through
the local daemon (docs/PROTOCOL.md §6).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, TextIO, Tuple

from . import __version__
from .util import (
    ConfigError,
    command_socket_path,
    event_socket_path,
    human_duration,
    human_rate,
    human_size,
    load_config,
    printable,
    setup_logging,
)

# Exit codes (documented in --help and the README).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's own
EXIT_NO_DAEMON = 3
EXIT_UNREACHABLE = 4
EXIT_REFUSED = 5
EXIT_LOCAL_FILE = 6
EXIT_VERIFY = 7
EXIT_CANCELLED = 8

EXIT_BY_CODE = {
    "unreachable": EXIT_UNREACHABLE,
    "unknown-peer": EXIT_UNREACHABLE,
    "ambiguous-peer": EXIT_UNREACHABLE,
    "timeout": EXIT_UNREACHABLE,
    "peer-gone": EXIT_UNREACHABLE,
    "io-error": EXIT_UNREACHABLE,
    "refused": EXIT_REFUSED,
    "declined": EXIT_REFUSED,
    "no-space": EXIT_REFUSED,
    "busy": EXIT_REFUSED,
    "bad-name": EXIT_LOCAL_FILE,
    "file-error": EXIT_LOCAL_FILE,
    "verify-failed": EXIT_VERIFY,
    "file-changed": EXIT_VERIFY,
    "shutdown": EXIT_UNREACHABLE,
    "cancelled": EXIT_CANCELLED,
    # A LocalSend device's (§8.6)
    "pin-required": EXIT_REFUSED,
    "tls-failed": EXIT_UNREACHABLE,
    "fingerprint-mismatch": EXIT_UNREACHABLE,
}

EPILOG = """\
exit codes (the same for every command):
  0  ok                             5  refused by the peer (declined, not allowed, no space)
  1  other error                    6  local file error (no such file, unreadable, bad name)
  2  usage error                    7  verification failed (SHA-256 mismatch, file changed)
  3  daemon not running             8  cancelled (`tnet cancel`, Ctrl-C, either side)
  4  peer unreachable or unknown

examples:
  tnet daemon &                      start the daemon (see the README for its variables)
  tnet discover                      list the daemons on this network
  tnet send laptop report.pdf        send a file to the peer named laptop
  tnet send 192.168.1.20 photos/     send a folder to an address
  tnet message laptop "lunch?"       a short note, shown by `tnet watch` there
  tnet watch                         follow incoming messages and transfers
  tnet history --peer laptop         what went to and came from laptop
  tnet send --json laptop a.txt      JSON Lines for scripts; every command takes --json

`tnet COMMAND --help` explains one command, with examples.
"""

class CliError(Exception):
    """A failure to report on stderr as one line, with its exit code; with
    ``--json`` also on stdout as ``{"ok": false, "code": slug, "error": …}``
    unless the daemon's own answer saying so was printed (``shown``)."""

    def __init__(self, message: str, code: int = EXIT_ERROR, slug: str = "error", shown: bool = False) -> None:
        super().__init__(message)
        self.exit_code = code
        self.slug = slug
        self.shown = shown


# --- Talking to the daemon --------------------------------------------------------


def connect(path: str, variable: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise CliError(f"no tnet daemon is running on {variable}={path} (start one with `tnet daemon`)",
                       EXIT_NO_DAEMON, "no-daemon") from None
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot reach the daemon at {variable}={path}: {exc.strerror}", EXIT_NO_DAEMON,
                       "no-daemon") from None
    return sock


def read_lines(sock: socket.socket) -> Iterator[List[Dict[str, Any]]]:
    """JSON objects, one per line, until the daemon closes; a list per read,
    so that a caller writes out once per batch (2,000 small files sent make
    a few dozen writes, not 2,000)."""
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        batch = [json.loads(line) for line in lines if line.strip()]
        if batch:
            yield batch


def request(env: Dict[str, str], cmd: str, **args: Any) -> Iterator[List[Dict[str, Any]]]:
    """Send one request; yield its answers as they arrive, a batch at a
    time, the final one (``ok``) last."""
    path = command_socket_path(env)
    with connect(path, "COMMAND_SOCKET") as sock:
        sock.sendall(json.dumps(dict(args, cmd=cmd)).encode() + b"\n")
        for batch in read_lines(sock):
            ends = [i for i, answer in enumerate(batch) if "ok" in answer]
            yield batch[:ends[0] + 1] if ends else batch
            if ends:
                return
    raise CliError("the daemon closed the connection without an answer", EXIT_NO_DAEMON, "no-daemon")


def final(answer: Dict[str, Any], shown: bool = False) -> Dict[str, Any]:
    """The answer if ok, else a CliError with the daemon's reason."""
    if answer.get("ok"):
        return answer
    code = str(answer.get("code", "error"))
    raise CliError(f"{code}: {printable(str(answer.get('error', '')))}", EXIT_BY_CODE.get(code, EXIT_ERROR),
                   code, shown)


def run_simple(env: Dict[str, str], cmd: str, **args: Any) -> Dict[str, Any]:
    *_, last = request(env, cmd, **args)
    return final(last[-1])


# --- Output ----------------------------------------------------------------------


def print_json(obj: Any, out: TextIO) -> None:
    """One JSON line; unprintable characters escaped, as on the daemon's sockets."""
    # Imported here, not at the top: output for people never needs the codec
    # and starts ~10 ms sooner, and a --json send has its request out first.
    from .api import encode_line

    out.write(encode_line(obj).decode("utf-8"))


def columns(rows: List[List[str]], out: TextIO) -> None:
    """Aligned columns for people."""
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")


def duration(seconds: float) -> str:
    """Tenths under a minute (a LAN transfer often takes less than one)."""
    return f"{seconds:.1f}s" if seconds < 60 else human_duration(seconds)


def plural(count: int, word: str, words: str = "") -> str:
    return f"{count} {word}" if count == 1 else f"{count} {words or word + 's'}"


class Progress:
    """Transfer progress for people.

    On a terminal, the file in flight has one live line, redrawn in place
    (name, percent, bytes, rate, ETA); when the file is done the line is
    replaced by a plain one, so that each file leaves one line behind. Off a
    terminal (a pipe, CI) nothing is redrawn: only the plain lines, never a
    control character. Progress events come from the daemon at most four
    times a second per transfer, one at 0% when a large file starts.
    """

    def __init__(self, out: TextIO, tty: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.tty = tty
        self.clock = clock
        self.live = False  # a live line is on the screen
        self.file: Tuple[Any, str] = (None, "")  # (transfer id, file) of the live line
        self.file_started = 0.0
        self.shares: Dict[str, str] = {}  # several peers at once: each one's share of its batch, in one line

    def update(self, event: Dict[str, Any]) -> None:
        """Redraw the live line from a progress event (on a terminal only)."""
        if not self.tty or not event.get("file"):
            return
        if event.get("peer_given"):
            self.update_shares(event)
            return
        now = self.clock()
        key = (event.get("id"), event["file"])
        if key != self.file:
            self.file, self.file_started = key, now
        size, done = event.get("file_size") or 0, event.get("file_bytes") or 0
        rate = done / (now - self.file_started) if now > self.file_started else 0.0
        eta = human_duration((size - done) / rate) if rate > 0 else "--"
        percent = 100 * done // size if size else 100
        tail = f"  {percent:3d}%  {human_size(done)}/{human_size(size)}  {human_size(rate)}/s  ETA {eta}"
        width = shutil.get_terminal_size().columns - 1  # the last column would wrap on some terminals
        name = shorten(printable(str(event["file"])), max(width - len(tail), 12))
        self.out.write("\r\x1b[2K" + (name + tail)[:width])
        self.out.flush()
        self.live = True

    def update_shares(self, event: Dict[str, Any]) -> None:
        """One line for a send to several peers: each one's percent of its batch."""
        size, done = event.get("size") or 0, event.get("bytes") or 0
        self.shares[str(event["peer_given"])] = f"{100 * done // size if size else 100}%"
        width = shutil.get_terminal_size().columns - 1
        text = "  ".join(f"{printable(peer)} {share}" for peer, share in self.shares.items())
        self.out.write("\r\x1b[2K" + text[:width])
        self.out.flush()
        self.live = True

    def file_done(self, event: Dict[str, Any], text: str) -> None:
        """A file is complete: its line becomes ``text``, with its rate if it was seen moving."""
        if self.file == (event.get("id"), event.get("file")):
            seconds = self.clock() - self.file_started
            if seconds > 0:
                text += f" at {human_rate(event.get('size') or 0, seconds)}"
            self.file = (None, "")
        self.line(text)

    def line(self, text: str) -> None:
        """A plain line (the live one, if any, is wiped first)."""
        if self.live:
            self.out.write("\r\x1b[2K")
            self.live = False
        self.out.write(text + "\n")


def shorten(name: str, room: int) -> str:
    """Keep the end of a long path: it names the file."""
    return name if len(name) <= room else "\u2026" + name[-(room - 1):]


# --- Subcommands -----------------------------------------------------------------


def cmd_daemon(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    from . import daemon  # the CLI alone never needs the daemon's code

    try:
        config = load_config(env)
    except ConfigError as exc:
        raise CliError(f"daemon: {exc}") from None
    setup_logging(config.log_level, as_json=args.json)
    return daemon.main(config)


def cmd_status(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    status = run_simple(env, "status")
    if args.json:
        print_json(status, out)
        return EXIT_OK
    rows = [
        ["host name", printable(status["host_name"])],
        ["version", f"{status['version']} (protocol {status['protocol']}, api {status['api']})"],
        ["listening", f"{status['bind_address']}:{status['receive_port']} (discovery port "
                      f"{status['broadcast_port']})"],
        ["broadcast to", ", ".join(status["broadcast_addresses"])],
        ["saving to", status["save_dir"]],
        ["accepting", status["accept"]],
        ["peers known", str(status["peers"])],
        ["transfers", str(len(status["transfers"]))],
    ]
    if "localsend" in status:  # LOCALSEND=1
        ls = status["localsend"]
        rows.append(["localsend", f"{printable(ls['alias'])} on port {ls['port']} ({ls['protocol']}"
                                  f"{', PIN' if ls['pin'] else ''}), {ls['devices']} devices seen"])
        rows.append(["fingerprint", ls["fingerprint"]])
    columns(rows, out)
    print_transfers(status["transfers"], out)
    return EXIT_OK


def kind_column(peer: Dict[str, Any]) -> List[str]:
    """With LOCALSEND=1 the daemon says what each peer is: "tnet", or "localsend" and how it is reached."""
    if "kind" not in peer:
        return []
    if peer["kind"] == "localsend":
        return [f"localsend ({peer.get('protocol', '')}, {printable(str(peer.get('device_type', '')))})"]
    return [printable(str(peer["kind"]))]


def cmd_discover(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    answer = run_simple(env, "discover", timeout=args.timeout)
    if args.json:
        print_json(answer["peers"], out)
    elif answer["peers"]:
        columns([[printable(p["name"]), p["address"]] + kind_column(p) for p in answer["peers"]], out)
    else:
        print("no peers answered (is tnet running there, with the same BROADCAST_PORT?)", file=sys.stderr)
    return EXIT_OK


def cmd_peers(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    answer = run_simple(env, "peers")
    if args.json:
        print_json(answer["peers"], out)
    elif answer["peers"]:
        rows = [[printable(p["name"]), p["address"]] + kind_column(p) + [f"seen {duration(p['seen_s_ago'])} ago"]
                for p in answer["peers"]]
        columns(rows, out)
    else:
        print("no peers seen yet; `tnet discover` looks for them", file=sys.stderr)
    return EXIT_OK


def recipients(args: argparse.Namespace) -> Dict[str, Any]:
    """The request's peers: every one discovery finds (--all), PEER,PEER…, or one PEER."""
    if args.all:
        return {"all": True}
    peers = [peer for peer in args.peer.split(",") if peer]
    if not peers:
        raise CliError("name a peer (or several, PEER,PEER…), or give --all", EXIT_USAGE, "usage")
    return {"peer": peers[0]} if len(peers) == 1 else {"peers": peers}


def pin(args: argparse.Namespace) -> Dict[str, str]:
    return {} if args.pin is None else {"pin": args.pin}


def positional(args: argparse.Namespace, rest: List[str]) -> List[str]:
    """With --all there is no PEER: what argparse took for one is the first of the rest."""
    return [args.peer] + rest if args.all else rest


def cmd_message(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    given = positional(args, [args.text] if args.text is not None else [])
    if len(given) != 1:
        raise CliError("give one message (- reads it from standard input)", EXIT_USAGE, "usage")
    text = sys.stdin.read() if given[0] == "-" else given[0]
    *_, last = request(env, "message", text=text, **recipients(args), **pin(args))
    answer = last[-1]
    if args.json:
        print_json(answer, out)
    results = answer.get("results") or [answer]
    if not args.json:
        for result in results:
            where = f" ({result['peer']})" if result.get("peer") else ""
            if result.get("ok"):
                out.write(f"delivered to {printable(result['name'])}{where}\n")
            elif "results" in answer:
                out.write(f"{printable(result['peer_given'])}: FAILED {result['code']}: {printable(result['error'])}\n")
    return worst_exit(answer, shown=args.json)


def worst_exit(answer: Dict[str, Any], shown: bool) -> int:
    """0 if every peer got it; else the worst exit code of those that did not."""
    results = answer.get("results")
    if results is None:
        final(answer, shown)
        return EXIT_OK
    codes = [EXIT_BY_CODE.get(str(r.get("code")), EXIT_ERROR) for r in results if not r.get("ok")]
    if codes:
        raise CliError(f"{answer.get('code')}: {printable(str(answer.get('error', '')))}", max(codes),
                       str(answer.get("code")), shown=True)
    return EXIT_OK


def cmd_send(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    files = positional(args, args.files)
    if not files:
        raise CliError("name the files and folders to send", EXIT_USAGE, "usage")
    paths = []
    for path in files:
        if not os.path.lexists(path):
            raise CliError(f"file-error: {printable(path)}: no such file or folder", EXIT_LOCAL_FILE, "file-error")
        paths.append(os.path.abspath(path))
    started: Dict[str, Any] = {}  # the "started" answer: the transfer id, for Ctrl-C
    try:
        retry_for = 0.0 if args.no_retry else args.retry_for
        answer = show_send(request(env, "send", paths=paths, retry_for=retry_for, **recipients(args), **pin(args)),
                           args, out, started)
    except KeyboardInterrupt:
        # Our connection is closed now, which cancels the transfer; say so
        # explicitly too, for a daemon that has not noticed yet.
        if started.get("id"):
            try:
                run_simple(env, "cancel", id=started["id"])
            except CliError:
                pass  # already gone: cancelled, as asked
        raise CliError("cancelled", EXIT_CANCELLED, "cancelled") from None
    return worst_exit(answer, shown=args.json)


def show_send(batches: Iterator[List[Dict[str, Any]]], args: argparse.Namespace, out: TextIO,
              started: Dict[str, Any]) -> Dict[str, Any]:
    """Print a send's answers as JSON Lines (all of them, as the daemon gives
    them) or for people; return the final one."""
    progress = Progress(out, out.isatty() and not args.json)
    counts: Dict[str, int] = {"files": 0, "folders": 0}
    answer: Dict[str, Any] = {}
    for batch in batches:
        for answer in batch:
            if answer.get("event") == "started":
                started.update(answer)
            if args.json:
                print_json(answer, out)
            else:
                show_send_line(answer, args, progress, counts)
        out.flush()  # once per batch received: a line per file, not a write per file
    if not args.json:
        for result in answer.get("results") or ([answer] if answer.get("ok") else []):
            progress.line(send_summary(result, counts, several="results" in answer))
    return answer


def show_send_line(answer: Dict[str, Any], args: argparse.Namespace, progress: Progress,
                   counts: Dict[str, int]) -> None:
    """One line of a send's answer, for people (several peers: each line says which)."""
    kind = answer.get("event")
    target = answer.get("peer_given")
    who = f"{printable(str(target))}: " if target else ""
    name = printable(str(answer.get("file", "")))
    if kind == "started":
        progress.line(f"sending {plural(answer['files'], 'item')} ({human_size(answer['bytes'])}) to "
                      f"{printable(str(target or args.peer))}, transfer {answer['id']}")
    elif kind == "progress":
        progress.update(answer)
    elif kind == "file-done" and answer.get("folder"):
        counts["folders"] += 1
    elif kind == "file-done":
        counts["files"] += 1
        progress.file_done(answer, f"{who}sent {name} ({human_size(answer['size'])})")
    elif kind == "file-failed":
        progress.line(f"{who}FAILED {name}: {answer['code']}: {printable(answer['error'])}")
    elif kind == "skipped":
        progress.line(f"{who}skipped {printable(answer['path'])}: {answer['reason']}")
    elif kind == "retrying":
        progress.line(f"{who}link lost, resuming (attempt {answer['attempt']}): {answer['code']}: "
                      f"{printable(answer['error'])}")


def send_summary(result: Dict[str, Any], counts: Dict[str, int], several: bool) -> str:
    """The last line of a send (one per peer when there are several)."""
    target = printable(str(result.get("peer_given") or result.get("name") or result.get("peer", "")))
    if not result.get("ok"):
        return f"{target}: FAILED {result.get('code')}: {printable(str(result.get('error', '')))}"
    seconds, size = result.get("seconds", 0), result.get("bytes", 0)
    counted = plural(counts["files"], "file") + (f" and {plural(counts['folders'], 'folder')}"
                                                 if counts["folders"] else "")
    if several:
        counted = plural(result.get("files", 0), "item")
    resumed = result.get("resumed_bytes") or 0
    saved = f"; resuming saved {human_size(resumed)}" if resumed else ""
    to = printable(str(result.get("name") or result.get("peer")))
    text = f"{counted}, {human_size(size)} in {duration(seconds)} ({human_rate(size, seconds)}) to {to}{saved}"
    return f"{target}: {text}" if several else text


def print_transfers(transfers: List[Dict[str, Any]], out: TextIO) -> None:
    rows = []
    for t in transfers:
        percent = f"{100 * t['bytes'] // t['size']}%" if t["size"] else "-"
        who = printable(t.get("name") or "") or t["peer"]
        rows.append([t["id"], t["direction"], who, printable(t.get("file") or ""), percent,
                     f"{human_size(t['bytes'])}/{human_size(t['size'])}"])
    if rows:
        columns([["ID", "DIR", "PEER", "FILE", "DONE", "BYTES"]] + rows, out)


def cmd_transfers(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    answer = run_simple(env, "transfers")
    if args.json:
        print_json(answer["transfers"], out)
    elif answer["transfers"]:
        print_transfers(answer["transfers"], out)
    else:
        out.write("no open transfers\n")
    return EXIT_OK


def cmd_by_id(cmd: str, done: str) -> Callable[[argparse.Namespace, Dict[str, str], TextIO], int]:
    """``cancel``, ``accept`` and ``decline``: one transfer id, a one-line answer."""

    def handler(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
        answer = run_simple(env, cmd, id=args.id)
        if args.json:
            print_json(answer, out)
        else:
            out.write(f"transfer {args.id} {done}\n")
        return EXIT_OK

    return handler


def cmd_history(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    query = {key: value for key, value in (("limit", args.limit), ("peer", args.peer)) if value is not None}
    answer = run_simple(env, "history", **query)
    entries = answer.get("entries", [])
    if args.json:
        for entry in entries:
            print_json(entry, out)
    elif entries:
        columns([history_row(entry) for entry in entries], out)
    else:
        print("no history" + (f" with {printable(args.peer)}" if args.peer else ""), file=sys.stderr)
    if answer.get("skipped"):
        print(f"tnet history: warning: {plural(answer['skipped'], 'corrupt line')} in the history file skipped",
              file=sys.stderr)
    if answer.get("omitted"):
        print(f"tnet history: {plural(answer['omitted'], 'older entry', 'older entries')} left out (more than one "
              "answer holds); --limit or --peer narrow it", file=sys.stderr)
    return EXIT_OK


HISTORY_FILES_SHOWN = 3  # file names on a transfer's line; the count says how many there were


def history_row(entry: Dict[str, Any]) -> List[str]:
    """time, direction, peer, what, result: one history entry for people.
    The file may have been edited by hand: any field may be missing or odd."""
    when = entry.get("time")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "?"
    name, address = printable(str(entry.get("name") or "")), printable(str(entry.get("peer") or ""))
    who = f"{name} ({address})" if name and address else name or address or "?"
    if entry.get("kind") == "message":
        what = "message: " + shorten_end(printable(str(entry.get("text", ""))), 60)
    else:
        files = [f for f in field_of(entry, "files", list, []) if isinstance(f, dict)]
        count = field_of(entry, "files_total", int, len(files))
        names = [printable(str(f.get("file", ""))) for f in files[:HISTORY_FILES_SHOWN]]
        what = f"{plural(count, 'file')}, {human_size(field_of(entry, 'bytes', int, 0))}"
        if names:
            what += ": " + ", ".join(names) + (", ..." if count > len(names) else "")
    return [stamp, printable(str(entry.get("direction", "?"))), who, what, printable(str(entry.get("code", "?")))]


def field_of(entry: Dict[str, Any], key: str, kind: Any, default: Any) -> Any:
    """``entry[key]`` if it is a ``kind``, else ``default``."""
    value = entry.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else default


def shorten_end(text: str, room: int) -> str:
    """Keep the start of a long message: it says what it is about."""
    return text if len(text) <= room else text[:room - 1] + "\u2026"


def describe_event(event: Dict[str, Any]) -> str:
    """One line for people; every peer-supplied string escaped."""
    kind = event.get("event", "?")
    tid = f"[{event.get('id', '')}]"
    who = printable(str(event.get("name") or event.get("peer", "")))
    to_from = "to" if event.get("direction") == "out" else "from"
    what = printable(str(event.get("file", "")))
    size = human_size(event.get("size") or 0)
    if kind == "message":
        return f"message from {who} ({event['peer']}): {printable(event['text'])}"
    if kind == "offer":
        return (f"offer {tid} from {who} ({event['peer']}): {plural(event['entries'], 'item')}, {size}; "
                f"`tnet accept {event['id']}` or `tnet decline {event['id']}`")
    if kind == "transfer-started":
        verb = "sending" if event.get("direction") == "out" else "receiving"
        return f"{verb} {tid} {to_from} {who}: {plural(event['entries'], 'item')}, {size}"
    if kind == "file-done":
        return f"received {what} ({size}) from {who} -> {printable(str(event.get('path', '')))}"
    if kind == "transfer-done":
        seconds, count = event.get("seconds") or 0, event.get("files", event.get("entries", 0))
        done = event.get("bytes") or 0
        return (f"done {tid} {to_from} {who}: {plural(count, 'file')}, {human_size(done)} in {duration(seconds)} "
                f"({human_rate(done, seconds)})")
    if kind in ("transfer-failed", "file-failed"):
        return f"{kind} {tid} {to_from} {who}: {event.get('code')}: {printable(str(event.get('message')))}"
    if kind == "error":
        return f"error {who}: {event.get('code')}: {printable(str(event.get('message')))}"
    return f"{kind} {tid} {who}".rstrip()


def run_hook(command: str, event: Dict[str, Any]) -> None:
    """``--exec``: run the shell command once for the event and wait for it.
    The event is on its stdin as one JSON line and in TNET_EVENT_JSON; each
    top-level field is in TNET_<FIELD> (upper case, ``-`` as ``_``): strings as
    they are (but a NUL, which no environment can hold, as ``\\0``), other
    values as JSON."""
    env = dict(os.environ)
    line = json.dumps(event, ensure_ascii=False)
    env["TNET_EVENT_JSON"] = line
    for key, value in event.items():
        text = value if isinstance(value, str) else json.dumps(value)
        env["TNET_" + key.upper().replace("-", "_")] = text.replace("\0", "\\0")
    try:
        import subprocess  # only --exec needs it: every other command starts faster without

        subprocess.run(command, shell=True, input=(line + "\n").encode(), env=env, check=False)
    except OSError as exc:
        print(f"tnet watch: --exec failed: {exc.strerror}", file=sys.stderr)


def cmd_watch(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    path = event_socket_path(env)
    progress = Progress(out, out.isatty() and not args.json)
    if not args.json:
        print(f"watching {path} (Ctrl-C to stop)", file=sys.stderr)
    try:
        while True:
            with connect(path, "EVENT_SOCKET") as sock:
                dropped = follow_events(sock, args, out, progress)
            if dropped is None:
                raise CliError("the daemon stopped", EXIT_NO_DAEMON, "no-daemon")
            # Dropped for falling behind (a slow terminal or --exec): say so, and carry on.
            print(f"tnet watch: fell behind; the daemon dropped this watch and {dropped.get('lost', '?')} events "
                  "with it; reconnecting", file=sys.stderr)
    except KeyboardInterrupt:  # the way to stop watching: not an error
        if progress.live:
            progress.line("")
        return EXIT_OK


def follow_events(sock: socket.socket, args: argparse.Namespace, out: TextIO,
                  progress: Progress) -> Optional[Dict[str, Any]]:
    """Show events until the daemon closes; the ``dropped`` event if that is why."""
    for batch in read_lines(sock):
        for event in batch:
            if args.json:
                print_json(event, out)
            elif event.get("event") == "progress":
                progress.update(event)  # drawn on a terminal only; REPORT_PROGRESS_IN=1 sends them
            elif event.get("event") == "file-done":
                progress.file_done(event, describe_event(event))
            elif event.get("event") != "dropped":
                progress.line(describe_event(event))
            if args.exec:
                out.flush()  # our line before the hook's output
                run_hook(args.exec, event)
            if event.get("event") == "dropped":
                out.flush()
                return event
        out.flush()
    return None


# --- Arguments -------------------------------------------------------------------


def build_parser() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    """The parser of `tnet`, and the parser of each command by its name."""
    parser = argparse.ArgumentParser(
        prog="tnet",
        description="Move files and short messages between machines on one local network.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_peer_commands(sub)
    add_local_commands(sub)
    return parser, sub.choices


def parse_command_line(argv: Optional[List[str]]) -> argparse.Namespace:
    """The options of a command go anywhere after it, between its files too
    (`tnet send laptop a.txt --json b.txt`): what the first pass leaves over,
    the command's own parser takes again, options and positionals intermixed."""
    parser, commands = build_parser()
    args, rest = parser.parse_known_args(argv)
    if not rest:
        return args
    words = sys.argv[1:] if argv is None else argv
    after = words[words.index(args.command) + 1:]
    if "--" in after:  # what follows it is never an option, but the intermixed pass would read options there
        parser.parse_args(argv)  # the plain parser's error for the words left over
    return commands[args.command].parse_intermixed_args(after, argparse.Namespace(command=args.command))


def add_command(sub: Any, name: str, handler: Callable[..., int], help_text: str, *examples: str,
                more: str = "") -> argparse.ArgumentParser:
    lines = "\n".join(f"  {example}" for example in examples)
    p = sub.add_parser(name, help=help_text, description=help_text + more, epilog=f"examples:\n{lines}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=handler)
    p.add_argument("--json", action="store_true", help=JSON_HELP.get(name, "machine-readable output (JSON)"))
    return p


def add_peer_commands(sub: Any) -> None:
    """The commands that reach other machines."""
    add_command(sub, "daemon", cmd_daemon, "run the daemon in the foreground (configured by environment variables)",
        "tnet daemon                          defaults: every interface, sockets in ./run/tnet/",
        "BIND_ADDRESS=192.168.1.20 tnet daemon    serve on one address only",
        "ACCEPT=ask ALLOW_FROM=192.168.1.0/24 tnet daemon    ask before taking files, from this LAN only")
    p = add_command(sub, "discover", cmd_discover, "ask the network which tnet daemons are there (name, address)",
            "tnet discover", "tnet discover --timeout 3 --json")
    p.add_argument("--timeout", type=float, default=1.0, metavar="S", help="seconds to collect answers (1)")
    add_command(sub, "peers", cmd_peers, "list the peers that answered a discovery (name, address, last seen)",
                "tnet peers", "tnet peers --json")
    p = add_command(sub, "send", cmd_send, "send files and folders to a peer and wait until it has verified them",
            "tnet send laptop notes.txt photos/      by name (as `tnet peers` lists it)",
            "tnet send 192.168.1.20 report.pdf       by address",
            "tnet send laptop,nas photos/            to two peers at once",
            "tnet send --all slides.pdf              to every peer a discovery finds",
            "tnet send --json laptop big.iso         one JSON object per line: started, progress, file-done, ok",
            more=". A folder arrives as one new folder under the peer's FILE_SAVE_DIR (\"photos (1)\" if "
            "\"photos\" exists); symbolic links inside it are skipped and reported, never followed.")
    p.add_argument("peer", metavar="PEER[,PEER...]", help="IPv4 address or host name (as `tnet discover` lists it), "
                   "or several, comma-separated: all at once")
    p.add_argument("files", nargs="*", metavar="FILE", help="files or folders")
    p.add_argument("--all", action="store_true", help="to every peer a fresh discovery finds (then give no PEER)")
    p.add_argument("--retry-for", type=float, default=120.0, metavar="S",
                   help="when the link breaks, try again (resuming) for up to S seconds (120)")
    p.add_argument("--no-retry", action="store_true", help="fail at once when the link breaks")
    add_pin(p)
    p = add_command(sub, "message", cmd_message, "send a short message (UTF-8, at most 64 KiB)",
            "tnet message laptop 'lunch?'",
            "tnet message --all 'back in 5'",
            "echo 'build done' | tnet message laptop -")
    p.add_argument("peer", metavar="PEER[,PEER...]", help="IPv4 address or host name, or several, comma-separated")
    p.add_argument("text", nargs="?", help="the message; - reads it from standard input")
    p.add_argument("--all", action="store_true", help="to every peer a fresh discovery finds (then give no PEER)")
    add_pin(p)


def add_pin(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pin", metavar="PIN", help="the PIN a LocalSend device asks for (LOCALSEND=1; tnet daemons "
                   "ask for none)")


def add_local_commands(sub: Any) -> None:
    """The commands that watch and steer this daemon."""
    p = add_command(sub, "watch", cmd_watch, "print messages, offers, transfers and errors as they happen",
            "tnet watch",
            "tnet watch --json | grep --line-buffered message",
            "tnet watch --exec 'notify-send \"tnet $TNET_EVENT\" \"$TNET_TEXT$TNET_FILE\"'",
            more=". On a terminal, incoming files show live progress when the daemon runs with "
            "REPORT_PROGRESS_IN=1.")
    p.add_argument("--exec", metavar="CMD", help="run the shell command CMD once per event, waiting for it: the "
                   "event is on its stdin as one JSON line and in TNET_EVENT_JSON, and each field in "
                   "TNET_<FIELD> (TNET_EVENT, TNET_NAME, TNET_PEER, TNET_TEXT, TNET_FILE, TNET_PATH, ...)")
    add_command(sub, "status", cmd_status, "show the daemon's configuration and open transfers", "tnet status",
        "tnet status --json")
    p = add_command(sub, "history", cmd_history, "list the transfers and messages that ended, in and out, oldest "
                    "first (time, direction, peer, what, result)",
                    "tnet history", "tnet history --limit 20 --peer laptop", "tnet history --json | jq .code",
                    more=". Kept by the daemon in STATE_DIR/history.jsonl, HISTORY_MAX entries at most.")
    p.add_argument("--limit", type=positive_int, metavar="N", help="the newest N entries only")
    p.add_argument("--peer", metavar="P", help="only those with P: an address, or a name in any case")
    add_command(sub, "transfers", cmd_transfers, "list open transfers (id, direction, peer, file, progress)",
        "tnet transfers", "tnet transfers --json")
    for name, text, done in (
        ("cancel", "stop a transfer, from either side: both clean up and report it cancelled", "cancelled"),
        ("accept", "take an offer waiting for a decision (ACCEPT=ask)", "accepted"),
        ("decline", "refuse an offer waiting for a decision (ACCEPT=ask)", "declined"),
    ):
        p = add_command(sub, name, cmd_by_id(name, done), text, f"tnet {name} 3         the id as `tnet transfers` or "
                "`tnet watch` show it")
        p.add_argument("id", help="transfer id, as `tnet transfers` or `tnet watch` show it")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return value


JSON_HELP = {
    "history": "one JSON object per entry, one per line, as the history file holds them",
    "daemon": "log as JSON objects, one per line, on stderr",
    "send": "JSON Lines: every answer of the daemon, the last one carrying \"ok\"",
    "watch": "each event as the daemon publishes it, one JSON object per line",
}


def main(argv: Optional[List[str]] = None, env: Optional[Dict[str, str]] = None,
         out: Optional[TextIO] = None) -> int:
    args = parse_command_line(argv)
    env = dict(os.environ) if env is None else env
    out = sys.stdout if out is None else out
    try:
        return args.handler(args, env, out)
    except CliError as exc:
        if getattr(args, "json", False) and not exc.shown:
            print_json({"ok": False, "code": exc.slug, "error": str(exc), "exit": exc.exit_code}, out)
        print(f"tnet {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"tnet {args.command}: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except BrokenPipeError:
        return EXIT_ERROR
