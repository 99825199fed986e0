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
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, TextIO

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
    "bad-name": EXIT_LOCAL_FILE,
    "file-error": EXIT_LOCAL_FILE,
    "verify-failed": EXIT_VERIFY,
    "file-changed": EXIT_VERIFY,
    "cancelled": EXIT_CANCELLED,
}

EPILOG = """\
exit codes:
  0 ok · 1 other error · 2 usage · 3 daemon not running · 4 peer unreachable or unknown
  5 refused by the peer (declined, not allowed, no space) · 6 local file error
  7 verification failed · 8 cancelled

examples:
  tnet daemon &                      start the daemon (see the README for its variables)
  tnet discover                      list the daemons on this network
  tnet send laptop report.pdf        send a file to the peer named laptop
  tnet send 192.168.1.20 photos/     send a folder to an address
  tnet message laptop "lunch?"       a short note, shown by `tnet watch` there
  tnet watch                         follow incoming messages and transfers
"""


class CliError(Exception):
    """A failure to report on stderr as one line, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = code


# --- Talking to the daemon --------------------------------------------------------


def connect(path: str, variable: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise CliError(f"no tnet daemon is running on {variable}={path} (start one with `tnet daemon`)",
                       EXIT_NO_DAEMON) from None
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot reach the daemon at {variable}={path}: {exc.strerror}", EXIT_NO_DAEMON) from None
    return sock


def read_lines(sock: socket.socket) -> Iterator[Dict[str, Any]]:
    """JSON objects, one per line, until the daemon closes."""
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)


def request(env: Dict[str, str], cmd: str, **args: Any) -> Iterator[Dict[str, Any]]:
    """Send one request; yield every answer line, the final one (``ok``) last."""
    path = command_socket_path(env)
    with connect(path, "COMMAND_SOCKET") as sock:
        sock.sendall(json.dumps(dict(args, cmd=cmd)).encode() + b"\n")
        for answer in read_lines(sock):
            yield answer
            if "ok" in answer:
                return
    raise CliError("the daemon closed the connection without an answer")


def final(answer: Dict[str, Any]) -> Dict[str, Any]:
    """The answer if ok, else a CliError with the daemon's reason."""
    if answer.get("ok"):
        return answer
    code = answer.get("code", "error")
    raise CliError(f"{code}: {printable(str(answer.get('error', '')))}", EXIT_BY_CODE.get(code, EXIT_ERROR))


def run_simple(env: Dict[str, str], cmd: str, **args: Any) -> Dict[str, Any]:
    *_, last = request(env, cmd, **args)
    return final(last)


# --- Output ----------------------------------------------------------------------


def print_json(obj: Any, out: TextIO) -> None:
    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    out.flush()


def columns(rows: List[List[str]], out: TextIO) -> None:
    """Aligned columns for people."""
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")


class Progress:
    """Draws transfer progress: one live line on a terminal, plain lines off it."""

    def __init__(self, out: TextIO, tty: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.tty = tty
        self.clock = clock
        self.started = clock()
        self.live = False

    def update(self, event: Dict[str, Any]) -> None:
        if not self.tty:
            return  # off a terminal, only completed files are worth a line
        size, done = event.get("size") or 0, event.get("bytes") or 0
        elapsed = max(self.clock() - self.started, 1e-6)
        rate = done / elapsed
        percent = 100.0 * done / size if size else 100.0
        eta = human_duration((size - done) / rate) if rate > 0 else "?"
        name = printable(str(event.get("file", "")))[-40:]
        line = f"{name}  {percent:5.1f}%  {human_size(done)}/{human_size(size)}  {human_size(rate)}/s  ETA {eta}"
        self.out.write("\r\x1b[2K" + line)
        self.out.flush()
        self.live = True

    def line(self, text: str) -> None:
        if self.live:
            self.out.write("\r\x1b[2K")
            self.live = False
        self.out.write(text + "\n")
        self.out.flush()


# --- Subcommands -----------------------------------------------------------------


def cmd_daemon(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    from . import daemon  # the CLI alone never needs the daemon's code

    try:
        config = load_config(env)
    except ConfigError as exc:
        raise CliError(f"daemon: {exc}") from None
    setup_logging(config.log_level)
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
    columns(rows, out)
    print_transfers(status["transfers"], out)
    return EXIT_OK


def cmd_discover(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    answer = run_simple(env, "discover", timeout=args.timeout)
    if args.json:
        print_json(answer["peers"], out)
    else:
        columns([[printable(p["name"]), p["address"]] for p in answer["peers"]], out)
    return EXIT_OK


def cmd_peers(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    answer = run_simple(env, "peers")
    if args.json:
        print_json(answer["peers"], out)
    else:
        rows = [[printable(p["name"]), p["address"], f"seen {human_duration(p['seen_s_ago'])} ago"]
                for p in answer["peers"]]
        columns(rows, out)
    return EXIT_OK


def cmd_message(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    answer = run_simple(env, "message", peer=args.peer, text=text)
    if args.json:
        print_json(answer, out)
    return EXIT_OK


def cmd_send(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    paths = []
    for path in args.files:
        full = os.path.abspath(path)
        if not os.path.exists(full):
            raise CliError(f"file-error: {printable(path)}: no such file or folder", EXIT_LOCAL_FILE)
        paths.append(full)
    progress = Progress(out, out.isatty() and not args.json)
    last: Dict[str, Any] = {}
    try:
        for answer in request(env, "send", peer=args.peer, paths=paths):
            last = answer
            show_send_line(answer, args.json, progress, out)
    except KeyboardInterrupt:
        if last.get("id"):  # the daemon goes on with a half-closed client; say stop
            run_simple(env, "cancel", id=last["id"])
        raise CliError("cancelled", EXIT_CANCELLED) from None
    if last.get("ok") and not args.json:
        seconds = last.get("seconds", 0)
        progress.line(f"{last['files']} file(s), {human_size(last['bytes'])} in {human_duration(seconds)} "
                      f"({human_rate(last['bytes'], seconds)}) to {printable(last.get('name') or last['peer'])}")
    final(last)
    return EXIT_OK


def show_send_line(answer: Dict[str, Any], as_json: bool, progress: Progress, out: TextIO) -> None:
    """One answer line of a `send`, as JSON or for people."""
    if as_json:
        print_json(answer, out)
        return
    kind = answer.get("event")
    if kind == "progress":
        progress.update(answer)
    elif kind == "file-done":
        progress.line(f"sent {printable(answer['file'])} ({human_size(answer['size'])})")
    elif kind == "file-failed":
        progress.line(f"FAILED {printable(answer['file'])}: {printable(answer['error'])}")
    elif kind == "skipped":
        progress.line(f"skipped {printable(answer['path'])}: {answer['reason']}")


def print_transfers(transfers: List[Dict[str, Any]], out: TextIO) -> None:
    rows = []
    for t in transfers:
        percent = f"{100.0 * t['bytes'] / t['size']:.0f}%" if t["size"] else "-"
        rows.append([t["id"], t["direction"], t["peer"], printable(t.get("file") or ""), percent,
                     f"{human_size(t['bytes'])}/{human_size(t['size'])}"])
    if rows:
        columns([["ID", "DIR", "PEER", "FILE", "DONE", "BYTES"]] + rows, out)


def cmd_transfers(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    answer = run_simple(env, "transfers")
    if args.json:
        print_json(answer["transfers"], out)
    else:
        print_transfers(answer["transfers"], out)
    return EXIT_OK


def cmd_by_id(cmd: str) -> Callable[[argparse.Namespace, Dict[str, str], TextIO], int]:
    def handler(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
        answer = run_simple(env, cmd, id=args.id)
        if args.json:
            print_json(answer, out)
        return EXIT_OK

    return handler


def describe_event(event: Dict[str, Any]) -> str:
    """One line for people; every peer-supplied string escaped."""
    kind = event.get("event", "?")
    who = printable(str(event.get("name") or event.get("peer", "")))
    what = printable(str(event.get("file", "")))
    if kind == "message":
        return f"message from {who} ({event['peer']}): {printable(event['text'])}"
    if kind == "file-done":
        return f"received {what} from {who} -> {printable(event.get('path', ''))}"
    if kind in ("transfer-failed", "file-failed", "error"):
        return f"{kind} [{event.get('id', '')}] {who}: {event.get('code')}: {printable(str(event.get('message')))}"
    if kind == "offer":
        return (f"offer [{event['id']}] from {who}: {event['entries']} file(s), {human_size(event['size'])}; "
                f"`tnet accept {event['id']}` or `tnet decline {event['id']}`")
    if kind == "progress":
        return f"{event['direction']} [{event['id']}] {what} {human_size(event['bytes'])}/{human_size(event['size'])}"
    return f"{kind} [{event.get('id', '')}] {who} {human_size(event.get('size') or 0)}".rstrip()


def run_hook(command: str, event: Dict[str, Any]) -> None:
    """``--exec``: the event as JSON on stdin and in TNET_EVENT_JSON, and each
    top-level field as TNET_<FIELD> in the environment."""
    env = dict(os.environ)
    env["TNET_EVENT_JSON"] = json.dumps(event, ensure_ascii=False)
    for key, value in event.items():
        env["TNET_" + key.upper().replace("-", "_")] = value if isinstance(value, str) else json.dumps(value)
    try:
        subprocess.run(command, shell=True, input=env["TNET_EVENT_JSON"].encode(), env=env, check=False)
    except OSError as exc:
        print(f"tnet watch: --exec failed: {exc.strerror}", file=sys.stderr)


def cmd_watch(args: argparse.Namespace, env: Dict[str, str], out: TextIO) -> int:
    path = event_socket_path(env)
    with connect(path, "EVENT_SOCKET") as sock:
        if not args.json:
            out.write(f"watching {path} (Ctrl-C to stop)\n")
            out.flush()
        for event in read_lines(sock):
            if args.json:
                print_json(event, out)
            else:
                out.write(describe_event(event) + "\n")
                out.flush()
            if args.exec:
                run_hook(args.exec, event)
    raise CliError("the daemon stopped", EXIT_NO_DAEMON)


# --- Arguments -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tnet",
        description="Move files and short messages between machines on one local network.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, handler: Callable[..., int], help_text: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler)
        if name != "daemon":
            p.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
        return p

    add("daemon", cmd_daemon, "run the daemon in the foreground (configured by environment variables)",
        "BIND_ADDRESS=127.0.0.2 BROADCAST_ADDRESS=127.255.255.255 tnet daemon")
    p = add("discover", cmd_discover, "list the other daemons on the network", "tnet discover --timeout 2")
    p.add_argument("--timeout", type=float, default=1.0, metavar="S", help="seconds to collect answers (1)")
    add("peers", cmd_peers, "list peers seen recently", "tnet peers")
    p = add("send", cmd_send, "send files and folders to a peer and wait until it has verified them",
            "tnet send laptop notes.txt photos/")
    p.add_argument("peer", help="IPv4 address or host name (as `tnet discover` lists it)")
    p.add_argument("files", nargs="+", metavar="FILE", help="files or folders")
    p = add("message", cmd_message, "send a short message (UTF-8, at most 64 KiB)",
            "echo 'build done' | tnet message laptop -")
    p.add_argument("peer", help="IPv4 address or host name")
    p.add_argument("text", help="the message; - reads it from standard input")
    p = add("watch", cmd_watch, "print incoming messages, transfers and errors as they happen",
            "tnet watch --exec 'notify-send tnet \"$TNET_EVENT\"'")
    p.add_argument("--exec", metavar="CMD", help="run CMD (a shell command) for each event; the event is on "
                   "its stdin as JSON and in TNET_EVENT_JSON, each field in TNET_<FIELD>")
    add("status", cmd_status, "show the daemon's configuration and open transfers", "tnet status --json")
    add("transfers", cmd_transfers, "list open transfers", "tnet transfers")
    for name, text in (("cancel", "stop a transfer (either side); both sides clean up"),
                       ("accept", "accept an offer waiting in ACCEPT=ask mode"),
                       ("decline", "decline an offer waiting in ACCEPT=ask mode")):
        p = add(name, cmd_by_id(name), text, f"tnet {name} 3")
        p.add_argument("id", help="transfer id, as `tnet transfers` or `tnet watch` show it")
    return parser


def main(argv: Optional[List[str]] = None, env: Optional[Dict[str, str]] = None,
         out: Optional[TextIO] = None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(os.environ) if env is None else env
    out = sys.stdout if out is None else out
    try:
        return args.handler(args, env, out)
    except CliError as exc:
        print(f"tnet {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"tnet {args.command}: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except BrokenPipeError:
        return EXIT_ERROR
