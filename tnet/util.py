"""Configuration and small helpers shared by the daemon and the CLI.

Holds ``Config`` and ``load_config`` (from an environment mapping, so tests
pass a plain dict), the value parsers, the discovery of the machine's IPv4
broadcast addresses, the clock, logging setup and human formatting.
Imports nothing from tnet; does no I/O beyond asking the OS about its
interfaces and host name, and opening STATE_DIR (``open_state_dir``).

Environment variables (the one table; the README repeats it):

=====================  ==========================  ==========================================
variable               default                     meaning
=====================  ==========================  ==========================================
EVENT_SOCKET           ./run/tnet/events           UNIX socket publishing events
COMMAND_SOCKET         ./run/tnet/commands         UNIX socket taking commands
                                                   (COMMAND_SOKET, the historical spelling,
                                                   is read when COMMAND_SOCKET is unset)
BROADCAST_PORT         0xC0DE (49374)              UDP discovery port
RECEIVE_PORT           0xC00D (49165)              TCP data port
FILE_SAVE_DIR          Downloads                   where received files land
REPORT_PROGRESS_IN     0                           1: progress events for incoming transfers
REPORT_PROGRESS_OUT    0                           1: progress events for outgoing transfers
BIND_ADDRESS           0.0.0.0                     IPv4 address TCP and UDP serve on
BROADCAST_ADDRESS      every up interface's        comma-separated discovery targets
                       directed broadcast
TEMP_DIR               the system temp dir         where incoming files grow until verified
HOST_NAME              the host name               the name this daemon announces
IDLE_TIMEOUT           30                          seconds a peer may stay silent mid-exchange
HANDSHAKE_TIMEOUT      10                          seconds a new connection has to say who it is
MAX_CONNECTIONS        512                         open TCP connections, both directions
                                                   (a quarter kept for the ones we open)
MAX_CONNECTIONS_PER_PEER  32                       TCP connections one address may open to us
ACCEPT                 auto                        auto: take every offer; ask: wait for
                                                   `tnet accept ID` / `tnet decline ID`
ASK_TIMEOUT            120                         seconds an offer waits in ask mode
ALLOW_FROM             (everyone)                  comma-separated IPv4 addresses or networks
                                                   whose offers and messages are taken (and
                                                   whose discoveries are answered from any
                                                   network)
PEERS                  (none)                      comma-separated IPv4 addresses, each
                                                   optionally address:port (the peer's
                                                   BROADCAST_PORT, default ours), asked by
                                                   unicast at each discovery, and answered
                                                   from any network; no host names
HISTORY_MAX            10000                       history entries kept, the oldest dropped
RESUME_KEEP            24                          hours a partial file is kept for a resume
LOG_LEVEL              info                        debug, info, warning or error
STATE_DIR              $XDG_STATE_HOME/tnet, else  what must outlive the daemon: the history,
                       ~/.local/state/tnet         the LocalSend certificate, key, fingerprint
                                                   (one daemon per STATE_DIR)
LOCALSEND              0                           1: be a LocalSend v2 peer too (phones)
LOCALSEND_PORT         53317                       its TCP port (HTTP or HTTPS) and UDP port
                                                   (multicast group 224.0.0.167)
LOCALSEND_ALIAS        HOST_NAME                   the name LocalSend devices show
LOCALSEND_HTTPS        1                           0: plain HTTP instead of HTTPS
LOCALSEND_PIN          (none)                      a PIN LocalSend senders must give
=====================  ==========================  ==========================================
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Tuple

DEFAULT_EVENT_SOCKET = "./run/tnet/events"
DEFAULT_COMMAND_SOCKET = "./run/tnet/commands"
DEFAULT_BROADCAST_PORT = 0xC0DE
DEFAULT_RECEIVE_PORT = 0xC00D
MAX_TIMEOUT_S = 24 * 3600.0  # a longer timeout is a typo
MAX_KEEP_HOURS = 24 * 365.0  # partials kept longer than a year are clutter, not a resume
DEFAULT_LOCALSEND_PORT = 53317  # LocalSend's own default: phones look there first
MAX_ALIAS_BYTES = 128  # a LocalSend alias (localsend.MAX_ALIAS_BYTES); util imports nothing from tnet
MAX_PIN_BYTES = 64  # the apps offer a few digits; a longer PIN is a paste gone wrong
LIMITED_BROADCAST = "255.255.255.255"
DEFAULT_HISTORY_MAX = 10_000  # entries: months of use, a few MiB
MAX_HISTORY_MAX = 1_000_000  # a rewrite of the history reads it whole, on the loop: more would stall it
MAX_STATIC_PEERS = 256  # each discovery sends a datagram to every one of PEERS, on the loop


class ConfigError(Exception):
    """A configuration value is unusable; the message names the variable."""


@dataclass(frozen=True)
class Config:
    event_socket: str = DEFAULT_EVENT_SOCKET
    command_socket: str = DEFAULT_COMMAND_SOCKET
    broadcast_port: int = DEFAULT_BROADCAST_PORT
    receive_port: int = DEFAULT_RECEIVE_PORT
    save_dir: str = "Downloads"
    report_progress_in: bool = False
    report_progress_out: bool = False
    bind_address: str = "0.0.0.0"
    broadcast_addresses: Tuple[str, ...] = ()
    temp_dir: str = field(default_factory=lambda: system_temp_dir())
    host_name: str = field(default_factory=socket.gethostname)
    idle_timeout: float = 30.0
    handshake_timeout: float = 10.0
    max_connections: int = 512
    max_connections_per_peer: int = 32
    accept: str = "auto"
    ask_timeout: float = 120.0
    allow_from: Tuple[ipaddress.IPv4Network, ...] = ()
    log_level: str = "info"
    resume_keep_s: float = 24 * 3600.0
    peers: Tuple[Tuple[str, int], ...] = ()  # PEERS: (address, UDP port)
    history_max: int = DEFAULT_HISTORY_MAX
    state_dir: str = field(default_factory=lambda: state_dir_path(os.environ))
    localsend: bool = False
    localsend_port: int = DEFAULT_LOCALSEND_PORT
    localsend_alias: str = ""  # "": HOST_NAME (``alias``)
    localsend_https: bool = True
    localsend_pin: Optional[str] = None

    @property
    def alias(self) -> str:
        """The name LocalSend devices show for this daemon."""
        return self.localsend_alias or self.host_name

    def allows(self, address: str) -> bool:
        """Whether ALLOW_FROM lets ``address`` send offers and messages."""
        if not self.allow_from:
            return True
        ip = ipaddress.IPv4Address(address)
        return any(ip in net for net in self.allow_from)

    def lists(self, address: str) -> bool:
        """Whether PEERS or ALLOW_FROM (when set) names ``address``: its
        discoveries are answered from any network (§5)."""
        if any(address == peer for peer, _ in self.peers):
            return True
        ip = ipaddress.IPv4Address(address)
        return any(ip in net for net in self.allow_from)


# --- Parsers: each takes the variable's name for its error message -----------


def parse_int(name: str, text: str, low: int, high: int) -> int:
    """Decimal or 0x-hex integer within [low, high]."""
    try:
        value = int(text.strip(), 0)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: not a number (decimal or 0x-hex)") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={text!r}: must be {low} to {high}")
    return value


def parse_port(name: str, text: str) -> int:
    return parse_int(name, text, 1, 65535)


def parse_bool(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={text!r}: use 1 or 0")


def parse_seconds(name: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigError(f"{name}={text!r}: not a number of seconds") from None
    if not 0 < value <= MAX_TIMEOUT_S:
        raise ConfigError(f"{name}={text!r}: must be over 0 and at most {MAX_TIMEOUT_S:g}")
    return value


def parse_hours(name: str, text: str) -> float:
    """Hours (decimal), as seconds; 0 keeps nothing."""
    try:
        hours = float(text.strip())
    except ValueError:
        raise ConfigError(f"{name}={text!r}: a number of hours") from None
    if not 0 <= hours <= MAX_KEEP_HOURS:
        raise ConfigError(f"{name}={text!r}: must be 0 to {MAX_KEEP_HOURS:g} hours")
    return hours * 3600.0


def parse_address(name: str, text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        raise ConfigError(f"{name}={text!r}: not an IPv4 address") from None


def parse_address_list(name: str, text: str) -> Tuple[str, ...]:
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{name}={text!r}: a comma-separated list of IPv4 addresses")
    return tuple(parse_address(name, item) for item in items)


def parse_network_list(name: str, text: str) -> Tuple[ipaddress.IPv4Network, ...]:
    nets = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            nets.append(ipaddress.IPv4Network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{name}={text!r}: {item.strip()!r} is not an IPv4 address or network") from None
    return tuple(nets)


def parse_peer_list(name: str, text: str, default_port: int) -> Tuple[Tuple[str, int], ...]:
    """``address[:port],...`` as (address, port) pairs, duplicates merged.
    Addresses only: a host name would need a DNS lookup, which may block."""
    peers: List[Tuple[str, int]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, _, port_text = item.partition(":")
        try:
            ip = ipaddress.IPv4Address(host.strip())
        except ValueError:
            raise ConfigError(f"{name}={text!r}: {host.strip()!r} is not an IPv4 address (host names are not "
                              "looked up: give the address, optionally address:port)") from None
        if ip.is_multicast or ip.is_unspecified or str(ip) == LIMITED_BROADCAST:
            raise ConfigError(f"{name}={text!r}: {ip} is not one host's address (broadcasts go in "
                              "BROADCAST_ADDRESS)")
        port = parse_port(name, port_text) if port_text.strip() else default_port
        if (str(ip), port) not in peers:
            peers.append((str(ip), port))
    if len(peers) > MAX_STATIC_PEERS:
        raise ConfigError(f"{name}: {len(peers)} peers; at most {MAX_STATIC_PEERS}")
    return tuple(peers)


def parse_choice(name: str, text: str, choices: Tuple[str, ...]) -> str:
    value = text.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}={text!r}: one of {', '.join(choices)}")
    return value


def system_temp_dir() -> str:
    import tempfile  # only the daemon needs it: the CLI starts faster without

    return tempfile.gettempdir()


def state_dir_path(env: Mapping[str, str]) -> str:
    """STATE_DIR; by default $XDG_STATE_HOME/tnet, else ~/.local/state/tnet (a
    relative XDG_STATE_HOME is ignored, as the XDG spec says)."""
    state = env.get("STATE_DIR")
    if state:
        return state
    xdg = env.get("XDG_STATE_HOME", "")
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(xdg if os.path.isabs(xdg) else os.path.join(home, ".local", "state"), "tnet")


def parse_text(name: str, text: str, limit: int) -> str:
    """A display string or secret: printable, 1 to ``limit`` bytes of UTF-8."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        size = -1
    if not text.isprintable() or not 0 < size <= limit:
        raise ConfigError(f"{name}={text!r}: printable, 1 to {limit} bytes")
    return text


def command_socket_path(env: Mapping[str, str]) -> str:
    return env.get("COMMAND_SOCKET") or env.get("COMMAND_SOKET") or DEFAULT_COMMAND_SOCKET


def event_socket_path(env: Mapping[str, str]) -> str:
    return env.get("EVENT_SOCKET") or DEFAULT_EVENT_SOCKET


def load_config(env: Mapping[str, str]) -> Config:
    """Read every variable of the table above; raise ConfigError on a bad one."""
    values: dict = {
        "event_socket": event_socket_path(env),
        "command_socket": command_socket_path(env),
        "state_dir": state_dir_path(env),
    }
    parsers = {
        "BROADCAST_PORT": ("broadcast_port", parse_port),
        "RECEIVE_PORT": ("receive_port", parse_port),
        "REPORT_PROGRESS_IN": ("report_progress_in", parse_bool),
        "REPORT_PROGRESS_OUT": ("report_progress_out", parse_bool),
        "BIND_ADDRESS": ("bind_address", parse_address),
        "BROADCAST_ADDRESS": ("broadcast_addresses", parse_address_list),
        "IDLE_TIMEOUT": ("idle_timeout", parse_seconds),
        "HANDSHAKE_TIMEOUT": ("handshake_timeout", parse_seconds),
        "MAX_CONNECTIONS": ("max_connections", lambda n, t: parse_int(n, t, 1, 65536)),
        "MAX_CONNECTIONS_PER_PEER": ("max_connections_per_peer", lambda n, t: parse_int(n, t, 1, 65536)),
        "ACCEPT": ("accept", lambda n, t: parse_choice(n, t, ("auto", "ask"))),
        "ASK_TIMEOUT": ("ask_timeout", parse_seconds),
        "ALLOW_FROM": ("allow_from", parse_network_list),
        "RESUME_KEEP": ("resume_keep_s", parse_hours),
        "LOG_LEVEL": ("log_level", lambda n, t: parse_choice(n, t, ("debug", "info", "warning", "error"))),
        "HISTORY_MAX": ("history_max", lambda n, t: parse_int(n, t, 1, MAX_HISTORY_MAX)),
        "LOCALSEND": ("localsend", parse_bool),
        "LOCALSEND_PORT": ("localsend_port", parse_port),
        "LOCALSEND_ALIAS": ("localsend_alias", lambda n, t: parse_text(n, t, MAX_ALIAS_BYTES)),
        "LOCALSEND_HTTPS": ("localsend_https", parse_bool),
        "LOCALSEND_PIN": ("localsend_pin", lambda n, t: parse_text(n, t, MAX_PIN_BYTES)),
    }
    for var, (attr, parse) in parsers.items():
        text = env.get(var)
        if text is not None and text != "":
            values[attr] = parse(var, text)
    for var, attr in (("FILE_SAVE_DIR", "save_dir"), ("TEMP_DIR", "temp_dir"), ("HOST_NAME", "host_name")):
        if env.get(var):
            values[attr] = env[var]
    if env.get("PEERS", "").strip():  # after BROADCAST_PORT: a peer's port defaults to ours
        values["peers"] = parse_peer_list("PEERS", env["PEERS"], values.get("broadcast_port", DEFAULT_BROADCAST_PORT))
    config = Config(**values)
    if not config.host_name.isprintable() or len(config.host_name.encode("utf-8", "replace")) > 64:
        raise ConfigError(f"HOST_NAME={config.host_name!r}: printable, at most 64 bytes")
    return config


def broadcast_targets(config: Config) -> Tuple[str, ...]:
    """BROADCAST_ADDRESS if set, else every up interface's directed broadcast."""
    if config.broadcast_addresses:
        return config.broadcast_addresses
    found = interface_broadcasts()
    return tuple(found) if found else (LIMITED_BROADCAST,)


# --- STATE_DIR ---------------------------------------------------------------------


class StateDirError(Exception):
    """STATE_DIR or a file in it cannot be used; the message says which and why."""


_STATE_DIR_FLAGS = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
                    | getattr(os, "O_CLOEXEC", 0))


def open_state_dir(path: str) -> int:
    """A descriptor of STATE_DIR, made 0700 if missing. A link there, a folder
    of someone else's or one others may write in is refused."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        fd = os.open(path, _STATE_DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StateDirError(f"STATE_DIR={path} is a link or not a folder; not following it") from None
        raise StateDirError(f"STATE_DIR={path}: {exc.strerror}") from None
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        os.close(fd)
        raise StateDirError(f"STATE_DIR={path} belongs to someone else or others may write in it "
                            f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 700 it")
    return fd


# --- Interfaces -----------------------------------------------------------------

# ioctl request numbers: the same idea on each system, different values.
_IOCTLS = {
    "linux": (0x8913, 0x8919, 0x8915, 0x891B),  # SIOCGIFFLAGS, SIOCGIFBRDADDR, SIOCGIFADDR, SIOCGIFNETMASK
    "darwin": (0xC0206911, 0xC0206923, 0xC0206921, 0xC0206925),
}
_IFF_UP, _IFF_BROADCAST, _IFF_LOOPBACK = 0x1, 0x2, 0x8
_IFREQ = struct.Struct("16s16s")  # ifr_name, then the union holding flags or an address


@dataclass(frozen=True)
class Interface:
    """An up IPv4 interface, as the kernel describes it."""

    name: str
    network: ipaddress.IPv4Interface  # its address and netmask
    broadcast: str  # its directed broadcast; "" on loopback and point-to-point links


def interfaces() -> List[Interface]:
    """Every up IPv4 interface, asked of the interfaces themselves (no default
    route needed). Empty where the system or the ioctls are unknown."""
    requests = _IOCTLS.get("darwin" if sys.platform == "darwin" else sys.platform)
    if requests is None or not hasattr(socket, "if_nameindex"):
        return []
    import fcntl  # Unix only: imported here so that util stays importable elsewhere

    get_flags, get_broadcast, get_address, get_netmask = requests
    found: List[Interface] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:

        def ask(request: int, ifname: bytes) -> bytes:
            return fcntl.ioctl(sock.fileno(), request, _IFREQ.pack(ifname, b""))

        for _, name in socket.if_nameindex():
            ifname = name.encode()[:15]
            try:
                flags = struct.unpack_from("H", ask(get_flags, ifname), 16)[0]
                if not flags & _IFF_UP:
                    continue
                address = socket.inet_ntoa(ask(get_address, ifname)[20:24])  # sockaddr_in's address
                netmask = socket.inet_ntoa(ask(get_netmask, ifname)[20:24])
                broadcast = ""
                if flags & _IFF_BROADCAST and not flags & _IFF_LOOPBACK:
                    broadcast = socket.inet_ntoa(ask(get_broadcast, ifname)[20:24])
            except OSError:  # no IPv4 address on it, or it went away meanwhile
                continue
            network = ipaddress.IPv4Interface(f"{address}/{netmask}")
            if broadcast == "0.0.0.0":
                # `ip addr add 10.0.0.2/24 dev eth0` sets no broadcast address, yet the
                # kernel routes the subnet's: derive it from the address and netmask.
                broadcast = str(network.network.broadcast_address)
            found.append(Interface(name, network, broadcast))
    return found


def interface_broadcasts() -> List[str]:
    """The directed broadcast address of every up, non-loopback IPv4
    interface; empty where unknown (the caller then uses 255.255.255.255)."""
    found: List[str] = []
    for interface in interfaces():
        if interface.broadcast and interface.broadcast not in found:
            found.append(interface.broadcast)
    return found


def local_networks() -> List[ipaddress.IPv4Network]:
    """The networks this machine is directly on, loopback included."""
    return [interface.network.network for interface in interfaces()]


# --- Clock, logging, formatting ---------------------------------------------------


def monotonic() -> float:
    """The clock deadlines are measured on; tests inject their own."""
    return time.monotonic()


def setup_logging(level: str, as_json: bool = False) -> None:
    """Log lines on stderr; ``as_json``: one JSON object per line (`tnet daemon --json`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if as_json else
                         logging.Formatter("%(asctime)s tnet %(levelname)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


class JsonLogFormatter(logging.Formatter):
    """``{"time": epoch seconds, "level": "info", "message": "..."}``"""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname.lower(), "message": record.getMessage()}
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(size: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in _UNITS:
        if abs(size) < 1024 or unit == _UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_rate(size: float, seconds: float) -> str:
    return human_size(size / seconds if seconds > 0 else 0) + "/s"


def human_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def printable(text: str) -> str:
    """``text`` with every control or format character escaped, so that a
    hostile name cannot drive the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
