"""tnet against the wire: throughput, memory, small files, fairness, discovery,
idle cost and CLI latency, each as a ratio to a reference tool measured in the
same run (issue 4); and, each beside its own reference in the same run, the
code before the restructuring (issue 10), resume (issue 11), LocalSend
(issue 12) and one send to several peers (issue 13).

The "sha256 floor" is bench/floor.py: the least a SHA-256-verified transfer
costs in Python here (sendfile and one hashing read on one side; receive,
hash, write on the other), so that tnet over it is the cost of tnet itself.

Two hosts are two network namespaces joined by a veth pair (mode ``veth``),
or two daemons on 127.231.0.2 and 127.231.0.3 (mode ``loopback``). Discovery
runs 20 daemons in namespaces on one bridge, the fan-out 4 and LocalSend 3
(with a default route each: localsendd joins its multicast group through it). Every file lives on a tmpfs
mounted here; every destination is deleted before each run, so each tool pays
for allocating new pages. Runs alternate between tools (A B A B ...) after one
round that is not counted, and the median and min-max of each are reported.

Needs root (namespaces, tmpfs) and installs socat, netcat-openbsd, iperf3,
iproute2 and openssl with apt-get when they are missing, and localsendd from
PyPI into the tests' virtualenv (.venv-localsendd) for the LocalSend figures. Sends nothing anywhere but
loopback and the namespaces it creates, and removes them in a ``finally``.

Usage: bench/run [--quick] [--reps N] [--only SECTION,...] [--previous REV] [--code REV]
                 [--one-core-each] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MiB = 1024 * 1024
GiB = 1024 * MiB
TAG = f"tnb{os.getpid() % 100000}"  # prefix of every namespace, link and folder we create
PAIR_NET = "10.231.0"  # the veth pair: .1 is host a, .2 is host b
BRIDGE_NET = "10.232.0"  # the discovery bridge: .1 .. .20
LOOP_A, LOOP_B = "127.231.0.2", "127.231.0.3"  # outside the 127.1-200.x.x the tests use
LOOP_BROADCAST = "127.255.255.255"
SECTIONS = ("transfer", "rss", "small", "concurrent", "discovery", "idle", "status", "previous", "resume", "fanout",
            "localsend")
PREVIOUS = "1eef014"  # main before issues 10-13: the code the restructuring must not slow down
SHAPED_RATE = "320mbit"  # ~40 MB/s for the cut link: the cut lands mid-file, as in tests/netns/test_resume_links.py
OUTAGE_S = 5.0  # how long the cut link stays down
FAULT_TIMEOUTS = {"IDLE_TIMEOUT": "2", "HANDSHAKE_TIMEOUT": "2"}  # a cut link is noticed within the outage
POLL_S = 0.01  # progress polls: 1 % of a 1 GiB file at 1 GB/s
LOCALSENDD = "localsendd==0.1.1"  # the third-party peer the tests are written against (tests/netns/localsendd.py)
LOCALSENDD_VENV = ROOT / ".venv-localsendd"  # the tests' own (ignored by git): made once, shared
LOCALSENDD_PYTHON = (3, 11)  # localsendd's Requires-Python
LOCALSEND_PORT = 53317  # the protocol's default; each peer has a namespace of its own
RSS_LIMIT_MIB = 48  # every daemon's peak, whatever the size (issues 4 and 12)
TOOL_TIMEOUT_S = 300  # one run of any tool; a hang ends the bench instead of stalling it


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(cmd: List[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def ended(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def command_line(cmd: str, **args: Any) -> bytes:
    """One request of the local API (docs/PROTOCOL.md §6)."""
    return json.dumps(dict(args, cmd=cmd)).encode() + b"\n"


def proc_field(path: str, field: str) -> int:
    """The number after ``field:`` in a /proc file of ``name: value`` lines."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} in {path}")


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 60.0, interval: float = POLL_S) -> Any:
    """Poll ``predicate`` until it returns something true, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out waiting for {what}")


def median_range(values: List[float]) -> Dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def ensure_tools() -> None:
    packages = {"socat": "socat", "nc": "netcat-openbsd", "iperf3": "iperf3", "ip": "iproute2", "ss": "iproute2",
                "tc": "iproute2", "openssl": "openssl"}
    missing = sorted({pkg for tool, pkg in packages.items() if shutil.which(tool) is None})
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, capture_output=True).returncode:
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", *missing], env=env)


# --- Hosts ----------------------------------------------------------------------------


class Host:
    """A place to run processes: a network namespace (its link is ``eth0``), or the loopback."""

    def __init__(self, name: str, address: str, broadcast: str, netns: str = "") -> None:
        self.name = name
        self.address = address
        self.broadcast = broadcast
        self.netns = netns

    def argv(self, cmd: List[str]) -> List[str]:
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def popen(self, cmd: List[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(self.argv(cmd), **kw)

    def sh(self, script: str, **kw: Any) -> subprocess.Popen:
        return self.popen(["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)

    def wait_listening(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(self.argv(["ss", "-Hltn"]), capture_output=True, text=True).stdout
            if f"{self.address}:{port} " in out or f"*:{port} " in out or f"0.0.0.0:{port} " in out:
                return
            time.sleep(0.005)
        raise RuntimeError(f"nothing listens on {self.address}:{port}")

    def link(self, state: str) -> None:
        """``ip link set eth0 up|down`` inside the namespace."""
        run(self.argv(["ip", "link", "set", "eth0", state]))

    def shape(self, rate: str) -> None:
        """Limit what leaves eth0 to ``rate`` (a qdisc acts on egress only)."""
        run(self.argv(["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "64kb",
                       "latency", "400ms"]))

    def rx_bytes(self) -> int:
        """What eth0 has received, headers included (its namespace's /sys)."""
        return int(run(self.argv(["cat", "/sys/class/net/eth0/statistics/rx_bytes"])).stdout)


class Process:
    """A daemon this bench started, saving what it receives in ``downloads``; its figures from /proc."""

    proc: Optional[subprocess.Popen] = None
    host: Host
    downloads: Path

    def clean_downloads(self) -> None:
        shutil.rmtree(self.downloads, ignore_errors=True)
        self.downloads.mkdir()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def proc_status(self, field: str) -> int:
        return proc_field(f"/proc/{self.pid}/status", field)

    def peak_rss_mib(self) -> float:
        return self.proc_status("VmHWM") / 1024

    def reset_peak_rss(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def own_core(self, cpu: int) -> None:
        """Run every thread on ``cpu`` alone and steer what eth0 receives to it
        (RPS): the kernel's work for this end's packets stays with this end,
        as on a machine of its own, instead of running inside the other's calls."""
        run(self.host.argv(["sh", "-c", f"echo {1 << cpu:x} > /sys/class/net/eth0/queues/rx-0/rps_cpus"]))
        run(["taskset", "-a", "-p", "-c", str(cpu), str(self.pid)])

    def cpu_seconds(self) -> float:
        """User and system time of every thread, ended ones included."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if that is not enough within 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                ended(self.proc)

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone."""
        assert self.proc is not None
        ended(self.proc)


class TnetDaemon(Process):
    """One ``tnet daemon`` with its folders on the bench's tmpfs; ``code`` is
    the folder holding the ``tnet`` package it runs (this one, or the previous
    code checked out from git), ``env`` more variables."""

    def __init__(self, host: Host, work: Path, broadcast_port: int, code: Path = ROOT, **env: str) -> None:
        self.host = host
        self.dir = work / host.name
        self.downloads = self.dir / "Downloads"
        self.temp = self.dir / "tmp"
        self.temp.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("TNET", "BIND_", "BROADCAST_"))}
        self.env.update({
            "PYTHONPATH": str(code),
            "BIND_ADDRESS": host.address,
            "BROADCAST_ADDRESS": host.broadcast,
            "BROADCAST_PORT": str(broadcast_port),
            "HOST_NAME": host.name,
            "FILE_SAVE_DIR": str(self.downloads),
            "TEMP_DIR": str(self.temp),
            "STATE_DIR": str(self.dir / "state"),
            "COMMAND_SOCKET": str(self.dir / "commands"),
            "EVENT_SOCKET": str(self.dir / "events"),
            "LOG_LEVEL": "warning",
            **env,
        })

    def start(self) -> "TnetDaemon":
        log_file = open(self.dir / "daemon.log", "ab")
        self.proc = self.host.popen([PYTHON, "-m", "tnet", "daemon"], env=self.env, stdout=log_file,
                                    stderr=log_file, cwd=self.dir)
        log_file.close()
        return self

    def wait_ready(self, timeout: float = 30.0) -> "TnetDaemon":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.host.name} exited: {(self.dir / 'daemon.log').read_text()}")
            if self.cli("status", check=False).returncode == 0:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"daemon {self.host.name} does not answer")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """The CLI talks to the daemon over its UNIX socket: no namespace needed."""
        return subprocess.run([PYTHON, "-m", "tnet", *args], env=self.env, capture_output=True, text=True,
                              check=check, cwd=self.dir, timeout=TOOL_TIMEOUT_S)

    def cli_started(self, *args: str) -> subprocess.Popen:
        """The CLI running while the bench does something else (a fault)."""
        return subprocess.Popen([PYTHON, "-m", "tnet", *args], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=self.dir)

    def request(self, cmd: str, **args: Any) -> Dict[str, Any]:
        """One request on the command socket; its last answer (the one with "ok")."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TOOL_TIMEOUT_S)
            sock.connect(self.env["COMMAND_SOCKET"])
            sock.sendall(command_line(cmd, **args))
            buf = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError(f"{cmd}: the daemon closed the connection")
                *lines, buf = (buf + chunk).split(b"\n")
                for answer in map(json.loads, filter(None, lines)):
                    if "ok" in answer:
                        return answer

    def cpu_seconds(self) -> float:
        """Nanosecond counts: the daemon is one thread."""
        return int(Path(f"/proc/{self.pid}/schedstat").read_text().split()[0]) / 1e9

    def read_bytes(self) -> int:
        """What the daemon has read from storage (not from the page cache) so far."""
        return proc_field(f"/proc/{self.pid}/io", "read_bytes")


class Setup:
    """Everything the bench creates, undone by ``teardown`` in reverse order."""

    def __init__(self) -> None:
        self.undo: List[Callable[[], Any]] = []

    def do(self, cmd: List[str], undo: Optional[List[str]] = None) -> None:
        run(cmd)
        if undo is not None:
            self.undo.append(lambda: subprocess.run(undo, capture_output=True))

    def later(self, action: Callable[[], Any]) -> None:
        self.undo.append(action)

    def teardown(self) -> None:
        while self.undo:
            try:
                self.undo.pop()()
            except Exception as exc:  # keep undoing the rest
                log(f"teardown: {exc}")


def make_netns(setup: Setup, name: str) -> None:
    setup.do(["ip", "netns", "add", name], ["ip", "netns", "del", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def veth_pair(setup: Setup, tag: str = "") -> List[Host]:
    """Two namespaces joined by a veth pair; ``tag`` tells pairs of one run apart."""
    a, b = f"{TAG}{tag}a", f"{TAG}{tag}b"
    make_netns(setup, a)
    make_netns(setup, b)
    run(["ip", "link", "add", "eth0", "netns", a, "type", "veth", "peer", "name", "eth0", "netns", b])
    hosts = []
    for ns, n in ((a, 1), (b, 2)):
        run(["ip", "-n", ns, "addr", "add", f"{PAIR_NET}.{n}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        hosts.append(Host(f"host-{'ab'[n - 1]}", f"{PAIR_NET}.{n}", f"{PAIR_NET}.255", ns))
    return hosts


def bridged_hosts(setup: Setup, count: int, tag: str = "node", default_route: bool = False) -> List[Host]:
    """``count`` namespaces on one bridge, called ``tag-1`` ...; ``default_route``
    gives each ``default dev eth0`` (the bridge still leads nowhere)."""
    switch = f"{TAG}{tag}"
    make_netns(setup, switch)
    run(["ip", "-n", switch, "link", "add", "br0", "type", "bridge"])
    run(["ip", "-n", switch, "link", "set", "br0", "up"])
    hosts = []
    for i in range(1, count + 1):
        ns = f"{TAG}{tag}{i}"
        make_netns(setup, ns)
        run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", switch])
        run(["ip", "-n", switch, "link", "set", f"p{i}", "master", "br0", "up"])
        run(["ip", "-n", ns, "addr", "add", f"{BRIDGE_NET}.{i}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        if default_route:
            run(["ip", "-n", ns, "route", "add", "default", "dev", "eth0"])
        hosts.append(Host(f"{tag}-{i}", f"{BRIDGE_NET}.{i}", f"{BRIDGE_NET}.255", ns))
    return hosts


def mount_tmpfs(setup: Setup, path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    setup.do(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], ["umount", "-l", str(path)])


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address if address.startswith("127.") else "127.0.0.1", 0))
        return probe.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


# --- One transfer with each tool --------------------------------------------------------


def timed(action: Callable[[], Any]) -> float:
    start = time.monotonic()
    action()
    return time.monotonic() - start


def tnet_send(sender: TnetDaemon, receiver: TnetDaemon, *paths: Path) -> float:
    return tnet_send_all(sender, [receiver], *paths)


def tnet_send_all(sender: TnetDaemon, receivers: List[TnetDaemon], *paths: Path) -> float:
    """One `tnet send PEER,PEER... PATHS`, into empty download folders; its seconds."""
    for receiver in receivers:
        receiver.clean_downloads()
    peers = ",".join(r.host.address for r in receivers)
    seconds = timed(lambda: sender.cli("send", "--json", peers, *map(str, paths)))
    for receiver in receivers:
        receiver.clean_downloads()
    return seconds


def measured_send(a: TnetDaemon, b: TnetDaemon, src: Path) -> Dict[str, float]:
    """One `tnet send` of ``src``: its rate, the CPU of both ends and each daemon's peak RSS."""
    for d in (a, b):
        d.reset_peak_rss()
    before = cpu_used([a, b])
    seconds = tnet_send(a, b, src)
    size = src.stat().st_size
    return {"MB_per_s": size / seconds / 1e6, "cpu_s_per_GiB": (cpu_used([a, b]) - before) * GiB / size,
            "sender_MiB": a.peak_rss_mib(), "receiver_MiB": b.peak_rss_mib()}


def piped(a: Host, b: Host, send: str, receive: str, dest: Path) -> float:
    """Start ``receive`` on b listening on PORT, then ``send`` on a; the time
    from the sender's start until the receiver has exited."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    port = free_port(b.address)
    server = b.sh(receive.format(addr=b.address, port=port, dest=dest))
    client: Optional[subprocess.Popen] = None
    try:
        b.wait_listening(port)
        start = time.monotonic()
        client = a.sh(send.format(addr=b.address, port=port, dest=dest))
        if client.wait(TOOL_TIMEOUT_S) or server.wait(TOOL_TIMEOUT_S):
            raise RuntimeError(f"{send} | {receive} failed: {server.stderr.read() if server.stderr else ''}"
                               f"{client.stderr.read() if client.stderr else ''}")
        seconds = time.monotonic() - start
    finally:
        for p in (server, client):
            if p is not None:
                ended(p)
    shutil.rmtree(dest, ignore_errors=True)
    return seconds


def socat_file(a: Host, b: Host, src: Path, dest: Path, opts: str = "") -> float:
    return piped(a, b, f"socat -u {opts} OPEN:{src} TCP:{{addr}}:{{port}}",
                 f"socat -u {opts} TCP-LISTEN:{{port}},bind={{addr}},reuseaddr OPEN:{{dest}}/f,creat,trunc", dest)


def nc_file(a: Host, b: Host, src: Path, dest: Path) -> float:
    return piped(a, b, f"nc -N {{addr}} {{port}} < {src}", "nc -d -l {addr} {port} > {dest}/f", dest)


def floor_file(a: Host, b: Host, src: Path, dest: Path) -> float:
    floor = ROOT / "bench" / "floor.py"
    return piped(a, b, f"{PYTHON} {floor} send {{addr}} {{port}} {src}",
                 f"{PYTHON} {floor} recv {{addr}} {{port}} {{dest}}/f", dest)


def iperf3_rate(a: Host, b: Host, size: int) -> float:
    """Bytes per second iperf3 delivers (its receiver's figure)."""
    port = free_port(b.address)
    server = b.popen(["iperf3", "-s", "-1", "-B", b.address, "-p", str(port)], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    try:
        b.wait_listening(port)
        out = run(a.argv(["iperf3", "-c", b.address, "-p", str(port), "-n", str(size), "-J"]),
                  timeout=TOOL_TIMEOUT_S).stdout
        server.wait(30)
    finally:
        ended(server)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 8


def cpu_used(daemons: List[TnetDaemon]) -> float:
    """CPU seconds used so far by the daemons and by every child we waited for
    (socat, nc, iperf3, the CLI): both ends of a transfer together."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime + sum(d.cpu_seconds() for d in daemons)


# --- Sections -------------------------------------------------------------------------


def bench_transfer(res: Dict[str, Any], mode: str, a: TnetDaemon, b: TnetDaemon, src: Path, scratch: Path,
                   reps: int) -> None:
    size = src.stat().st_size
    ha, hb = a.host, b.host
    tools: Dict[str, Callable[[], float]] = {
        "tnet": lambda: size / tnet_send(a, b, src),
        "socat -u": lambda: size / socat_file(ha, hb, src, scratch),
        "socat -u -b 262144": lambda: size / socat_file(ha, hb, src, scratch, "-b 262144"),
        "nc": lambda: size / nc_file(ha, hb, src, scratch),
        "sha256 floor": lambda: size / floor_file(ha, hb, src, scratch),
        "iperf3": lambda: iperf3_rate(ha, hb, size),
    }
    rates: Dict[str, List[float]] = {name: [] for name in tools}
    cpu: Dict[str, List[float]] = {name: [] for name in tools}
    warm_up(tools.values())
    for rep in range(reps):
        for name, measure in tools.items():
            before = cpu_used([a, b])
            rates[name].append(measure() / 1e6)
            cpu[name].append((cpu_used([a, b]) - before) * GiB / size)
        log(f"  {mode} rep {rep + 1}: " + ", ".join(f"{n} {r[-1]:.0f}" for n, r in rates.items()) + " MB/s")
    res[f"transfer_{mode}"] = {"bytes": size, "MB_per_s": {n: median_range(r) for n, r in rates.items()},
                               "cpu_s_per_GiB": {n: median_range(c) for n, c in cpu.items()}}


def bench_rss(res: Dict[str, Any], a: TnetDaemon, b: TnetDaemon, files: List[Path]) -> None:
    out = {}
    for src in files:
        size = src.stat().st_size
        m = measured_send(a, b, src)
        out[str(size)] = {k: m[k] for k in ("sender_MiB", "receiver_MiB", "MB_per_s")}
        log(f"  {size / GiB:g} GiB: peak RSS sender {m['sender_MiB']:.1f} MiB, "
            f"receiver {m['receiver_MiB']:.1f} MiB, {m['MB_per_s']:.0f} MB/s")
    res["rss"] = out


def bench_small(res: Dict[str, Any], a: TnetDaemon, b: TnetDaemon, folder: Path, scratch: Path,
                reps: int) -> None:
    ha, hb = a.host, b.host
    tools: Dict[str, Callable[[], float]] = {
        "tnet": lambda: tnet_send(a, b, folder),
        "tar|socat|tar": lambda: piped(
            ha, hb, f"tar c -C {folder.parent} {folder.name} | socat -u - TCP:{{addr}}:{{port}}",
            "socat -u TCP-LISTEN:{port},bind={addr},reuseaddr - | tar x -C {dest}", scratch),
    }
    times: Dict[str, List[float]] = {name: [] for name in tools}
    warm_up(tools.values())
    for rep in range(reps):
        for name, measure in tools.items():
            times[name].append(measure())
        log(f"  small files rep {rep + 1}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()))
    res["small_files"] = {"files": len(os.listdir(folder)), "seconds": {n: median_range(t) for n, t in times.items()}}


def concurrent_cli(a: TnetDaemon, b: TnetDaemon, files: List[Path], start: float) -> List[float]:
    """One `tnet send` process per file, as people start them; when each ended."""
    procs = [subprocess.Popen([PYTHON, "-m", "tnet", "send", "--json", b.host.address, str(f)], env=a.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=a.dir) for f in files]
    ends: Dict[int, float] = {}
    while len(ends) < len(procs):
        if time.monotonic() - start > TOOL_TIMEOUT_S:
            for p in procs:
                p.kill()
            raise RuntimeError("concurrent sends did not finish")
        for i, p in enumerate(procs):
            if i not in ends and p.poll() is not None:
                if p.returncode:
                    raise RuntimeError(f"concurrent send failed: {p.stderr.read().decode() if p.stderr else ''}")
                ends[i] = time.monotonic()
        time.sleep(0.01)  # a 1% error on the shortest run; polling faster takes CPU from the transfers
    return list(ends.values())


def concurrent_api(a: TnetDaemon, b: TnetDaemon, files: List[Path], start: float) -> List[float]:
    """The same sends as requests on the command socket from this process:
    the daemon's concurrency without 20 interpreters starting beside it."""
    sel = selectors.DefaultSelector()
    pending: Dict[socket.socket, bytes] = {}
    for f in files:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(a.env["COMMAND_SOCKET"])
        sock.sendall(command_line("send", peer=b.host.address, paths=[str(f)]))
        sel.register(sock, selectors.EVENT_READ, sock)
        pending[sock] = b""
    ends = []
    while pending:
        ready = sel.select(max(start + TOOL_TIMEOUT_S - time.monotonic(), 0))
        if not ready:
            raise RuntimeError("concurrent sends did not finish")
        for key, _ in ready:
            sock = key.data
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("the daemon closed a command connection")
            *lines, pending[sock] = (pending[sock] + data).split(b"\n")
            for answer in map(json.loads, filter(None, lines)):
                if "ok" not in answer:
                    continue
                if not answer["ok"]:
                    raise RuntimeError(f"concurrent send failed: {answer}")
                ends.append(time.monotonic())
                sel.unregister(sock)
                sock.close()
                del pending[sock]
    return ends


def bench_concurrent(res: Dict[str, Any], a: TnetDaemon, b: TnetDaemon, files: List[Path], reps: int) -> None:
    size = files[0].stat().st_size
    for via, launch in (("cli", concurrent_cli), ("api", concurrent_api)):
        aggregate, spread, slowest, fastest = [], [], [], []
        for rep in range(reps):
            b.clean_downloads()
            start = time.monotonic()
            ends = launch(a, b, files, start)
            rates = [size / (end - start) / 1e6 for end in ends]
            aggregate.append(size * len(files) / (max(ends) - start) / 1e6)
            slowest.append(min(rates))
            fastest.append(max(rates))
            spread.append(min(rates) / max(rates))
            b.clean_downloads()
            log(f"  concurrent via {via}, rep {rep + 1}: aggregate {aggregate[-1]:.0f} MB/s, "
                f"slowest {slowest[-1]:.0f}, fastest {fastest[-1]:.0f}")
        res["concurrent" if via == "cli" else "concurrent_api"] = {
            "transfers": len(files), "bytes_each": size, "aggregate_MB_per_s": median_range(aggregate),
            "slowest_MB_per_s": median_range(slowest), "fastest_MB_per_s": median_range(fastest),
            "slowest_over_fastest": median_range(spread)}


def bench_discovery(res: Dict[str, Any], setup: Setup, work: Path, reps: int) -> None:
    daemons = start_daemons(setup, bridged_hosts(setup, 20), work)
    found, seconds = [], []
    for rep in range(reps):
        asker = daemons[rep % len(daemons)]
        start = time.monotonic()
        peers = json.loads(asker.cli("discover", "--json").stdout)
        seconds.append(time.monotonic() - start)
        found.append(len({p["address"] for p in peers} - {asker.host.address}))
        log(f"  discovery rep {rep + 1}: {found[-1]} of 19 in {seconds[-1]:.2f} s")
    windows = {}
    for i, window in enumerate((0.05, 0.1, 0.2, 0.5)):  # the shortest window that still hears everyone
        asker = daemons[-1 - i]  # each a fresh asker: answers are rate-limited per requester
        peers = json.loads(asker.cli("discover", "--json", "--timeout", str(window)).stdout)
        windows[str(window)] = len({p["address"] for p in peers} - {asker.host.address})
    log(f"  discovery by window: {windows}")
    res["discovery"] = {"daemons": len(daemons), "found": found, "all_found_every_time": min(found) == 19,
                        "cli_seconds": median_range(seconds), "found_by_window_s": windows}


def bench_idle(res: Dict[str, Any], d: TnetDaemon, seconds: float) -> None:
    cpu, wakes = d.cpu_seconds(), d.proc_status("voluntary_ctxt_switches")
    time.sleep(seconds)
    res["idle"] = {"seconds": seconds, "cpu_s": d.cpu_seconds() - cpu,
                   "wakeups": d.proc_status("voluntary_ctxt_switches") - wakes}
    log(f"  idle {seconds:g} s: {res['idle']['cpu_s']:.4f} s CPU, {res['idle']['wakeups']} wake-ups")


def bench_status(res: Dict[str, Any], d: TnetDaemon, reps: int) -> None:
    status, bare = [], []
    for _ in range(reps):
        status.append(timed(lambda: d.cli("status")))
        bare.append(timed(lambda: run([PYTHON, "-c", "pass"])))
    res["status"] = {"tnet_status_s": median_range(status), "python_start_s": median_range(bare)}
    log(f"  status {statistics.median(status) * 1000:.0f} ms, bare interpreter {statistics.median(bare) * 1000:.0f} ms")


# --- Shared by the sections of issues 10-13 ---------------------------------------------------


Measure = Callable[[], Dict[str, float]]  # one run of one side: its figures by name


def warm_up(measures: Iterable[Callable[[], Any]]) -> None:
    """One run of each, not counted: the first run of a section is its slowest,
    whichever side runs it (a receiver of 1 GiB spent 2-2.5 s more system time
    in it, tnet or localsendd alike), and counted it would land on the side
    that goes first alone."""
    for measure in measures:
        measure()


def alternating(what: str, reps: int, sides: Dict[str, Measure]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Run each side in turn, ``reps`` times (A B A B ...), after one round that
    is not counted; for each figure, each side's median and min-max:
    ``{figure: {side: median_range}}``."""
    warm_up(sides.values())
    runs: Dict[str, Dict[str, List[float]]] = {}
    for rep in range(reps):
        for side, measure in sides.items():
            for figure, value in measure().items():
                runs.setdefault(figure, {}).setdefault(side, []).append(value)
        log(f"  {what} rep {rep + 1} ({' / '.join(sides)}): " + "; ".join(
            f"{figure} " + " / ".join(f"{values[-1]:.3g}" for values in by_side.values())
            for figure, by_side in runs.items()))
    return {figure: {side: median_range(v) for side, v in by_side.items()} for figure, by_side in runs.items()}


def start_daemons(setup: Setup, hosts: List[Host], work: Path, code: Path = ROOT, **env: str) -> List[TnetDaemon]:
    """A daemon on each host, sharing a discovery port; stopped by the teardown."""
    port = free_udp_port()
    daemons = [TnetDaemon(h, work, port, code, **env) for h in hosts]
    for d in daemons:
        setup.later(d.stop)
        d.start()
    return [d.wait_ready() for d in daemons]


# --- The code before issues 10-13, side by side (issue 10) -------------------------------------


def code_at(rev: str, into: Path) -> Path:
    """The ``tnet`` package of ``rev`` from git, compiled as an installed one is;
    the folder to put on PYTHONPATH."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tnet"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    run([PYTHON, "-m", "compileall", "-q", str(into / "tnet")])
    return into


def main_figures(a: TnetDaemon, b: TnetDaemon, big: Path, smalls: Path) -> Dict[str, float]:
    """One send of ``big`` (rate, CPU, peak RSS) by daemons just started, one
    of the small files (and the receiver's peak RSS for it), and `tnet status`
    (the median of five: one call is quick and noisy)."""
    for d in (a, b):  # Python keeps what it once allocated: an earlier batch would set the peak
        d.stop()
        d.start().wait_ready()
    figures = measured_send(a, b, big)
    b.reset_peak_rss()
    figures["small_files_s"] = tnet_send(a, b, smalls)
    figures["small_receiver_MiB"] = b.peak_rss_mib()
    figures["status_s"] = statistics.median(timed(partial(a.cli, "status")) for _ in range(5))
    return figures


def bench_previous(res: Dict[str, Any], setup: Setup, work: Path, big: Path, smalls: Path, reps: int,
                   old: str, new: str) -> None:
    """The main figures with the code of ``new`` ("" for this checkout) and of
    ``old``, each on a veth pair of its own: new -> new and old -> old."""
    codes = {"new": code_at(new, work / "new") if new else ROOT, "old": code_at(old, work / "old")}
    sides: Dict[str, Measure] = {}
    for side, code in codes.items():
        a, b = start_daemons(setup, veth_pair(setup, f"p{side}"), work / side, code)
        sides[side] = partial(main_figures, a, b, big, smalls)
    res["previous"] = {"rev": old, "new_rev": new, "bytes": big.stat().st_size, "small_files": len(os.listdir(smalls)),
                       "figures": alternating("previous", reps, sides)}


# --- Resume (issue 11) ---------------------------------------------------------------------------


def received_share(d: TnetDaemon) -> float:
    """How much of its incoming batch the daemon holds, 0 to 1 (0 when none is open)."""
    incoming = [t for t in d.request("transfers")["transfers"] if t["direction"] == "in" and t["size"]]
    return max((t["bytes"] / t["size"] for t in incoming), default=0.0)


def send_with_fault(a: TnetDaemon, b: TnetDaemon, src: Path, fault: Callable[[subprocess.Popen], None]) -> None:
    """Start `tnet send SRC`, and once ``b`` holds half of it, do ``fault`` to the
    running send; the send's downloads are removed afterwards."""
    b.clean_downloads()
    send = a.cli_started("send", "--json", b.host.address, str(src))
    try:
        wait_for("half the file received", lambda: received_share(b) >= 0.5, TOOL_TIMEOUT_S)
        fault(send)
    finally:
        ended(send)
    b.clean_downloads()


def last_answer(send: subprocess.Popen) -> Dict[str, Any]:
    """The final line of a `tnet send --json` that must succeed: attempts, resumed_bytes."""
    out, err = send.communicate(timeout=TOOL_TIMEOUT_S)
    if send.returncode:
        raise RuntimeError(f"tnet send: exit {send.returncode}: {err.strip()}")
    return json.loads(out.splitlines()[-1])


def cut_at_half(a: TnetDaemon, b: TnetDaemon, src: Path) -> Dict[str, float]:
    """A send whose link goes down on the receiver's side at 50 % for OUTAGE_S;
    the send retries and resumes by itself. The bytes on the receiver's wire
    over the file's size, and the attempts it took."""
    answer: Dict[str, Any] = {}

    def cut(send: subprocess.Popen) -> None:
        b.host.link("down")
        time.sleep(OUTAGE_S)  # the outage itself, not a wait for something
        b.host.link("up")
        answer.update(last_answer(send))

    wire = on_wire(b, partial(send_with_fault, a, b, src, cut))
    return {"wire_over_size": wire / src.stat().st_size, "attempts": answer["attempts"]}


def uncut(a: TnetDaemon, b: TnetDaemon, src: Path) -> Dict[str, float]:
    return {"wire_over_size": on_wire(b, partial(tnet_send, a, b, src)) / src.stat().st_size}


def on_wire(receiver: TnetDaemon, action: Callable[[], Any]) -> int:
    """Bytes the receiver's eth0 took in while ``action`` ran."""
    before = receiver.host.rx_bytes()
    action()
    return receiver.host.rx_bytes() - before


def resume_after_kill(a: TnetDaemon, b: TnetDaemon, src: Path) -> Dict[str, float]:
    """Kill the sending daemon (SIGKILL) at 50 %, start it again, and time the
    second `tnet send` from its start to the verified end: both sides hash the
    kept prefix, then the rest moves."""

    def kill(send: subprocess.Popen) -> None:
        a.kill()
        send.communicate(timeout=60)  # exits 3: its daemon is gone

    send_with_fault(a, b, src, kill)
    wait_for("the partial kept", lambda: b.request("transfers")["kept"])
    a.start().wait_ready()
    start = time.monotonic()
    answer = last_answer(a.cli_started("send", "--json", b.host.address, str(src)))
    seconds = time.monotonic() - start
    b.clean_downloads()
    return {"seconds": seconds, "kept_share": answer["resumed_bytes"] / src.stat().st_size}


def fresh(a: TnetDaemon, b: TnetDaemon, src: Path) -> Dict[str, float]:
    return {"seconds": tnet_send(a, b, src)}


def bench_resume(res: Dict[str, Any], setup: Setup, work: Path, big: Path, half: Path, reps: int) -> None:
    """(a) bytes on the wire for a link cut at 50 %, against an uncut send on the
    same shaped link; (b) resuming after the sender was killed at 50 %, against
    sending the other half, and the whole file, fresh (the link not shaped)."""
    a, b = start_daemons(setup, veth_pair(setup, "res"), work, ROOT, **FAULT_TIMEOUTS)
    a.host.shape(SHAPED_RATE)
    wire = alternating("resume, link cut", reps, {"cut": partial(cut_at_half, a, b, big),
                                                  "uncut": partial(uncut, a, b, big)})
    run(a.host.argv(["tc", "qdisc", "del", "dev", "eth0", "root"]))
    runs = wire["wire_over_size"]
    extra = [c - u for c, u in zip(runs["cut"]["runs"], runs["uncut"]["runs"])]  # the cut's cost, headers aside
    timing = alternating("resume, sender killed", reps, {"resume": partial(resume_after_kill, a, b, big),
                                                         "half": partial(fresh, a, b, half),
                                                         "full": partial(fresh, a, b, big)})
    res["resume"] = {"bytes": big.stat().st_size, "rate": SHAPED_RATE, "outage_s": OUTAGE_S,
                     "wire_over_size": dict(runs, extra=median_range(extra)), "attempts": wire["attempts"]["cut"],
                     "kept_share": timing["kept_share"]["resume"], "seconds": timing["seconds"]}


# --- One file to several peers at once (issue 13) --------------------------------------------


def uncached(path: Path) -> None:
    """Flush ``path`` to its disk and drop it from the page cache: its next read is from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fs_type(path: Path) -> str:
    """The type of the file system holding ``path`` (its longest mount point)."""
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point, fs = line.split()[1:3]
        if (str(path) + "/").startswith(point.rstrip("/") + "/") and len(point) >= len(best):
            best, kind = point, fs
    return kind


def fanned_out(sender: TnetDaemon, receivers: List[TnetDaemon], src: Path, at_once: bool) -> Dict[str, float]:
    """``src``, dropped from the page cache first, to every receiver: with one
    `tnet send A,B,C`, or with a send to each in a row. Its seconds, what the
    sender read from the disk, and the CPU of every end."""
    uncached(src)
    read, cpu = sender.read_bytes(), cpu_used([sender, *receivers])
    if at_once:
        seconds = tnet_send_all(sender, receivers, src)
    else:
        seconds = sum(tnet_send(sender, r, src) for r in receivers)
    return {"seconds": seconds, "read_MiB": (sender.read_bytes() - read) / MiB,
            "cpu_s": cpu_used([sender, *receivers]) - cpu}


def bench_fanout(res: Dict[str, Any], setup: Setup, work: Path, src: Path, reps: int) -> None:
    """``src`` (on a disk, not the tmpfs, so that read_bytes counts disk reads)
    from one daemon to three on one bridge, at once and in a row."""
    sender, *receivers = start_daemons(setup, bridged_hosts(setup, 4, "fan"), work)
    figures = alternating("fan-out", reps, {"at once": partial(fanned_out, sender, receivers, src, True),
                                            "in a row": partial(fanned_out, sender, receivers, src, False)})
    res["fanout"] = dict(figures, bytes=src.stat().st_size, peers=len(receivers), source_fs=fs_type(src))


# --- LocalSend (issue 12) ------------------------------------------------------------------------


def newest_python(least: Tuple[int, int]) -> str:
    """pyenv's newest Python of at least ``least``, else this one if it is new enough."""
    found = []
    for python in Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv", "versions").glob("3.*/bin/python"):
        version = tuple(int(part) for part in python.parent.parent.name.split(".")[:2] if part.isdigit())
        if version >= least:
            found.append((version, str(python)))
    if found:
        return max(found)[1]
    if sys.version_info >= least:
        return PYTHON
    raise RuntimeError(f"{LOCALSENDD} needs Python >= {'.'.join(map(str, least))}; none found")


def localsendd_bin() -> Path:
    """The bin folder of LOCALSENDD_VENV, made first if need be (the venv and
    marker of tests/netns/localsendd.py, so the tests and the bench share it)."""
    bin_dir, marker = LOCALSENDD_VENV / "bin", LOCALSENDD_VENV / "installed"
    if (bin_dir / "localsendd").exists() and marker.exists() and marker.read_text().strip() == LOCALSENDD:
        return bin_dir
    python = newest_python(LOCALSENDD_PYTHON)
    log(f"installing {LOCALSENDD} into {LOCALSENDD_VENV} with {python}")
    shutil.rmtree(LOCALSENDD_VENV, ignore_errors=True)
    run([python, "-m", "venv", str(LOCALSENDD_VENV)])
    run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", LOCALSENDD],
        timeout=600)
    marker.write_text(LOCALSENDD + "\n")
    return bin_dir


class Localsendd(Process):
    """The third-party LocalSend peer, in a namespace only: it announces on
    whatever interface the routing table gives it, so on the host it would
    talk on eth0. Unattended: it takes every transfer offered, as long as no
    ``localsendctl`` is attached to it then."""

    def __init__(self, host: Host, work: Path, https: bool, bin_dir: Path) -> None:
        if not host.netns:
            raise ValueError("localsendd runs only in a namespace of the bench")
        self.host = host
        self.alias = host.name
        self.https = https
        self.bin = bin_dir
        self.dir = work / f"localsendd-{host.name}"
        self.downloads = self.dir / "Downloads"
        self.socket = str(self.dir / "ctl")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCALSEND", "XDG_"))}
        self.env.update({"HOME": str(self.dir), "XDG_STATE_HOME": str(self.dir / "state"),
                         "XDG_CONFIG_HOME": str(self.dir / "config"),  # empty: no config.toml is read
                         "XDG_RUNTIME_DIR": str(self.dir), "LOCALSENDD_SOCKET": self.socket})

    def start(self) -> "Localsendd":
        for folder in ("Downloads", "state", "config"):
            (self.dir / folder).mkdir(parents=True, exist_ok=True)
        with open(self.dir / "localsendd.log", "ab") as log_file:
            # ip netns exec execs localsendd: the pid is the daemon's.
            self.proc = self.host.popen(
                [str(self.bin / "localsendd"), "--alias", self.alias, "--port", str(LOCALSEND_PORT),
                 "--device-type", "headless", "--download-dir", str(self.downloads), "--socket", self.socket,
                 "--encryption" if self.https else "--no-encryption", "--unattended", "--log-level", "warning"],
                env=self.env, stdout=log_file, stderr=log_file, cwd=self.dir)
        me = wait_for(f"localsendd {self.alias} to answer", self.answering, 30.0, 0.2)
        if me["protocol"] != ("https" if self.https else "http"):  # it falls back to HTTP without a certificate
            raise RuntimeError(f"localsendd {self.alias} serves {me['protocol']}")
        return self

    def answering(self) -> Optional[Dict[str, Any]]:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"localsendd {self.alias} exited: {(self.dir / 'localsendd.log').read_text()}")
        if not os.path.exists(self.socket):
            return None
        out = self.ctl("status", "--json", check=False)
        return json.loads(out.stdout)["self"] if out.returncode == 0 else None

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.host.argv([str(self.bin / "localsendctl"), "--socket", self.socket, *args]),
                              env=self.env, capture_output=True, text=True, check=check, timeout=TOOL_TIMEOUT_S)

    def sees(self, alias: str) -> bool:
        return any(d["alias"] == alias for d in json.loads(self.ctl("devices", "--json").stdout))

    def send(self, src: Path, to: str) -> float:
        """``localsendctl send SRC --to TO --wait``: seconds until the receiver took it."""
        start = time.monotonic()
        out = self.ctl("send", str(src), "--to", to, "--wait", "--quiet", check=False)
        if out.returncode:
            raise RuntimeError(f"localsendctl send to {to}: exit {out.returncode}: {out.stdout}{out.stderr}")
        return time.monotonic() - start


def one_file(send: Callable[[], float], sender: Process, receiver: Process, end: str,
             src: Path, cores: bool) -> Dict[str, float]:
    """``send()`` puts ``src`` from ``sender`` into ``receiver``: the rate, the
    CPU and peak RSS of the ``end`` ("receiver" or "sender") measured, and the
    CPU of both ends (on one machine the kernel charges each end for part of
    the other's network work, so only their sum compares two senders fully).
    ``cores``: each end on a core of its own (``Process.own_core``)."""
    size = src.stat().st_size
    if cores:
        sender.own_core(0)
        receiver.own_core(1)
    measured, other = (sender, receiver) if end == "sender" else (receiver, sender)
    receiver.clean_downloads()
    measured.reset_peak_rss()
    cpu, other_cpu = measured.cpu_seconds(), other.cpu_seconds()
    seconds = send()
    if (receiver.downloads / src.name).stat().st_size != size:
        raise RuntimeError(f"{src.name} landed with another size")
    receiver.clean_downloads()
    used = measured.cpu_seconds() - cpu
    both = used + other.cpu_seconds() - other_cpu
    return {"MB_per_s": size / seconds / 1e6, f"{end}_cpu_s_per_GiB": used * GiB / size,
            "both_cpu_s_per_GiB": both * GiB / size, f"{end}_peak_MiB": measured.peak_rss_mib()}


def tnet_sees(tnet: TnetDaemon, alias: str) -> bool:
    tnet.cli("discover", "--timeout", "1")
    return any(p.get("kind") == "localsend" and p["name"] == alias
               for p in json.loads(tnet.cli("peers", "--json").stdout))


def localsend_both_ways(setup: Setup, hosts: List[Host], work: Path, https: bool, src: Path,
                        reps: int, cores: bool) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """localsendd ``a`` sends ``src`` to tnet (LOCALSEND=1) and to localsendd ``b``,
    alternately; then tnet and ``a`` send it to ``b``, alternately."""
    bin_dir = localsendd_bin()
    a, b = (Localsendd(h, work, https, bin_dir) for h in hosts[:2])
    [tnet] = start_daemons(setup, hosts[2:3], work, LOCALSEND="1", LOCALSEND_HTTPS="1" if https else "0")
    for lsd in (b, a):
        setup.later(lsd.stop)
        lsd.start()
    for alias in (tnet.host.name, b.alias):
        wait_for(f"localsendd to find {alias}", partial(a.sees, alias), 60.0, 0.5)
    wait_for(f"tnet to find {b.alias}", partial(tnet_sees, tnet, b.alias), 60.0, 0.5)
    kind = "HTTPS" if https else "HTTP"
    received = alternating(f"localsendd -> tnet, {kind}", reps, {
        "tnet": partial(one_file, partial(a.send, src, tnet.host.name), a, tnet, "receiver", src, cores),
        "localsendd": partial(one_file, partial(a.send, src, b.alias), a, b, "receiver", src, cores)})
    sent = alternating(f"tnet -> localsendd, {kind}", reps, {
        "tnet": partial(one_file, partial(timed, partial(tnet.cli, "send", b.alias, str(src))), tnet, b, "sender",
                        src, cores),
        "localsendd": partial(one_file, partial(a.send, src, b.alias), a, b, "sender", src, cores)})
    for process in (a, b, tnet):
        process.stop()
    return received, sent


def bench_localsend(res: Dict[str, Any], setup: Setup, work: Path, src: Path, reps: int, cores: bool) -> None:
    """localsendd -> tnet and tnet -> localsendd, each against localsendd ->
    localsendd, over HTTP and over HTTPS, in three namespaces with a default
    route each (localsendd joins its multicast group through it); ``cores``:
    each end of a send on a core of its own."""
    hosts = bridged_hosts(setup, 3, "ls", default_route=True)
    for key in ("localsend_receive", "localsend_send"):
        res[key] = {"bytes": src.stat().st_size, "localsendd": LOCALSENDD, "one_core_each": cores}
    for https in (False, True):
        protocol = "https" if https else "http"
        res["localsend_receive"][protocol], res["localsend_send"][protocol] = localsend_both_ways(
            setup, hosts, work / protocol, https, src, reps, cores)


# --- The table ------------------------------------------------------------------------------


def fmt(m: Dict[str, Any], scale: float = 1.0, digits: int = 0) -> str:
    return f"{m['median'] * scale:.{digits}f} ({m['min'] * scale:.{digits}f}–{m['max'] * scale:.{digits}f})"


Row = Callable[[str, str, str, str, Optional[float], str, Optional[bool]], None]


def table(res: Dict[str, Any]) -> str:
    rows = [("figure", "tnet median (min–max)", "reference", "ref median (min–max)", "ratio", "target", "met")]

    def row(figure: str, tnet: str, ref: str, refval: str, ratio: Optional[float], target: str,
            met: Optional[bool]) -> None:
        """``ratio`` and ``met`` None: not measured."""
        verdict = "—" if met is None else ("yes" if met else "NO")
        rows.append((figure, tnet, ref, refval, "—" if ratio is None else f"{ratio:.2f}", target,
                     verdict if target else ""))

    for mode in ("veth", "loopback"):
        t = res.get(f"transfer_{mode}")
        if not t:
            continue
        r = t["MB_per_s"]
        size = f"{t['bytes'] / GiB:g} GiB"
        for ref in ("socat -u", "socat -u -b 262144", "nc", "sha256 floor", "iperf3"):
            ratio = r["tnet"]["median"] / r[ref]["median"]
            target, met = "", True
            if ref == "socat -u":
                need = 2.0 if mode == "veth" else 1.3
                target, met = f"≥ {need}", ratio >= need
            elif ref == "iperf3" and mode == "veth":
                target, met = "≥ 0.45", ratio >= 0.45
            row(f"{size} {mode}, MB/s", fmt(r["tnet"]), ref, fmt(r[ref]), ratio, target, met)
        c = t["cpu_s_per_GiB"]
        for ref in ("socat -u", "socat -u -b 262144", "sha256 floor"):
            row(f"{size} {mode}, CPU s per GiB, both ends", fmt(c["tnet"], digits=2), ref, fmt(c[ref], digits=2),
                c["tnet"]["median"] / c[ref]["median"], "", True)
    if "rss" in res:
        for size, m in res["rss"].items():
            peak = max(m["sender_MiB"], m["receiver_MiB"])
            row(f"{int(size) / GiB:g} GiB, peak RSS MiB (send/recv)",
                f"{m['sender_MiB']:.1f} / {m['receiver_MiB']:.1f}", "limit", str(RSS_LIMIT_MIB), peak / RSS_LIMIT_MIB,
                "< 1", peak < RSS_LIMIT_MIB)
    if "small_files" in res:
        s = res["small_files"]["seconds"]
        ratio = s["tnet"]["median"] / s["tar|socat|tar"]["median"]
        row(f"{res['small_files']['files']} × 4 KiB, s", fmt(s["tnet"], digits=2), "tar|socat|tar",
            fmt(s["tar|socat|tar"], digits=2), ratio, "≤ 3", ratio <= 3)
    if "concurrent" in res:
        c = res["concurrent"]
        single = res.get("transfer_veth", res.get("transfer_loopback", {})).get("MB_per_s", {}).get("tnet")
        if single:
            ratio = c["aggregate_MB_per_s"]["median"] / single["median"]
            row(f"{c['transfers']} concurrent, aggregate MB/s", fmt(c["aggregate_MB_per_s"]), "tnet single",
                fmt(single), ratio, "≥ 0.70", ratio >= 0.70)
        sp = c["slowest_over_fastest"]
        row(f"{c['transfers']} concurrent, slowest MB/s", fmt(c["slowest_MB_per_s"]), "fastest",
            fmt(c["fastest_MB_per_s"]), sp["median"], "≥ 0.5", sp["median"] >= 0.5)
        api = res.get("concurrent_api")
        if api and single:  # no target: what the daemon does without 20 interpreters starting beside it
            row(f"{c['transfers']} concurrent via the API, aggregate MB/s", fmt(api["aggregate_MB_per_s"]),
                "tnet single", fmt(single), api["aggregate_MB_per_s"]["median"] / single["median"], "", True)
            row(f"{c['transfers']} concurrent via the API, slowest MB/s", fmt(api["slowest_MB_per_s"]), "fastest",
                fmt(api["fastest_MB_per_s"]), api["slowest_over_fastest"]["median"], "", True)
    if "discovery" in res:
        d = res["discovery"]
        w = d["found_by_window_s"]
        shortest = min((float(k) for k, v in w.items() if v == 19), default=float("nan"))
        row("discovery of 19, found per run", " ".join(map(str, d["found"])), "window", "1.0 s",
            shortest / 1.0, "19 every time", d["all_found_every_time"])
    if "idle" in res:
        i = res["idle"]
        row(f"idle {i['seconds']:g} s, CPU s (wake-ups)", f"{i['cpu_s']:.4f} ({i['wakeups']})", "limit",
            f"{0.05 * i['seconds'] / 10:.3f}", i["cpu_s"] / (0.05 * i["seconds"] / 10), "< 1",
            i["cpu_s"] < 0.05 * i["seconds"] / 10)
    if "status" in res:
        s = res["status"]
        row("`tnet status`, ms", fmt(s["tnet_status_s"], 1000), "python -c pass", fmt(s["python_start_s"], 1000),
            s["tnet_status_s"]["median"] / s["python_start_s"]["median"], "< 150 ms",
            s["tnet_status_s"]["median"] < 0.150)
    for section, rows_of in SECTION_ROWS:
        if section in res:
            rows_of(res[section], row)
    cells = [[cell.replace("|", "\\|") for cell in r] for r in rows]  # a Markdown table
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


PREVIOUS_ROWS = (  # figure, label, scale, digits, whether more is better
    ("MB_per_s", "{size} veth, MB/s", 1, 0, True),
    ("cpu_s_per_GiB", "{size} veth, CPU s per GiB, both ends", 1, 2, False),
    ("sender_MiB", "{size}, peak RSS MiB, sender", 1, 1, False),
    ("receiver_MiB", "{size}, peak RSS MiB, receiver", 1, 1, False),
    ("small_files_s", "{files} × 4 KiB, s", 1, 2, False),
    ("small_receiver_MiB", "{files} × 4 KiB, peak RSS MiB, receiver", 1, 1, False),
    ("status_s", "`tnet status`, ms", 1000, 0, False),
)


def gib(size: int) -> str:
    return f"{size / GiB:g} GiB"


def previous_rows(p: Dict[str, Any], row: Row) -> None:
    """New against old code: within noise when the new median is no worse than
    the old figure's own spread allows (its min for rates, its max for costs)."""
    for name, label, scale, digits, more_is_better in PREVIOUS_ROWS:
        new, old = p["figures"][name]["new"], p["figures"][name]["old"]
        met = new["median"] >= old["min"] if more_is_better else new["median"] <= old["max"]
        figure = "new / old: " + label.format(size=gib(p["bytes"]), files=p["small_files"])
        if p.get("new_rev"):
            figure = figure.replace("new / old", f"{p['new_rev']} / old")
        row(figure, fmt(new, scale, digits), f"old ({p['rev']})", fmt(old, scale, digits),
            new["median"] / old["median"], "within noise", met)


def resume_rows(r: Dict[str, Any], row: Row) -> None:
    size = gib(r["bytes"])
    w, s = r["wire_over_size"], r["seconds"]
    row(f"resume: {size} cut at 50 %, wire / size", fmt(w["cut"], digits=3), "no cut", fmt(w["uncut"], digits=3),
        w["cut"]["median"], "≤ 1.05", w["cut"]["median"] <= 1.05)
    row(f"resume: {size} cut at 50 %, (cut − uncut) wire / size", fmt(w["extra"], digits=3), "", "",
        w["extra"]["median"], "", True)
    kept = f"{r['kept_share']['median']:.0%} kept"
    for ref, label in (("half", "the other half fresh"), ("full", f"{size} fresh")):
        row(f"resume: {size}, {kept}, s", fmt(s["resume"], digits=2), label, fmt(s[ref], digits=2),
            s["resume"]["median"] / s[ref]["median"], "", True)


def fanout_rows(f: Dict[str, Any], row: Row) -> None:
    size = gib(f["bytes"])
    t, read = f["seconds"], f["read_MiB"]
    ratio = t["at once"]["median"] / t["in a row"]["median"]
    row(f"{size} to {f['peers']} peers at once, s", fmt(t["at once"], digits=2), f"{f['peers']} sends in a row",
        fmt(t["in a row"], digits=2), ratio, "≤ 0.6", ratio <= 0.6)
    once = read["at once"]["median"] <= 1.1 * f["bytes"] / MiB
    row(f"{size} to {f['peers']} peers, sender read MiB", fmt(read["at once"]), f"{f['peers']} sends in a row",
        fmt(read["in a row"]), read["at once"]["median"] / read["in a row"]["median"], "≤ 1.1 × file", once)
    cpu = f["cpu_s"]  # no target: where the time goes on two cores
    row(f"{size} to {f['peers']} peers, CPU s, all ends", fmt(cpu["at once"], digits=2),
        f"{f['peers']} sends in a row", fmt(cpu["in a row"], digits=2),
        cpu["at once"]["median"] / cpu["in a row"]["median"], "", True)


def localsend_rows(r: Dict[str, Any], row: Row, direction: str, end: str) -> None:
    """``direction``: "localsendd → tnet" or "tnet → localsendd"; ``end``: the
    side whose CPU and peak RSS were measured, "receiver" or "sender"."""
    doing = "receiving" if end == "receiver" else "sending"
    for protocol in ("http", "https"):
        m = r[protocol]
        rate, cpu, both, rss = m["MB_per_s"], m[f"{end}_cpu_s_per_GiB"], m["both_cpu_s_per_GiB"], m[f"{end}_peak_MiB"]
        ratio = rate["tnet"]["median"] / rate["localsendd"]["median"]
        what = f"{gib(r['bytes'])} {direction}, {protocol.upper()}{', a core each' if r.get('one_core_each') else ''}"
        row(f"{what}, MB/s", fmt(rate["tnet"]), "localsendd → localsendd", fmt(rate["localsendd"]), ratio,
            "≥ 1.0", ratio >= 1.0)
        row(f"{what}, {end} CPU s per GiB", fmt(cpu["tnet"], digits=2), f"localsendd {doing}",
            fmt(cpu["localsendd"], digits=2), cpu["tnet"]["median"] / cpu["localsendd"]["median"], "", True)
        row(f"{what}, CPU s per GiB, both ends", fmt(both["tnet"], digits=2), "localsendd → localsendd",
            fmt(both["localsendd"], digits=2), both["tnet"]["median"] / both["localsendd"]["median"], "", True)
        row(f"{what}, peak RSS MiB", fmt(rss["tnet"], digits=1), "limit", str(RSS_LIMIT_MIB),
            rss["tnet"]["max"] / RSS_LIMIT_MIB, "< 1", rss["tnet"]["max"] < RSS_LIMIT_MIB)


SECTION_ROWS: Tuple[Tuple[str, Callable[[Dict[str, Any], Row], None]], ...] = (
    ("previous", previous_rows), ("resume", resume_rows), ("fanout", fanout_rows),
    ("localsend_receive", lambda r, row: localsend_rows(r, row, "localsendd → tnet", "receiver")),
    ("localsend_send", lambda r, row: localsend_rows(r, row, "tnet → localsendd", "sender")))


def machine() -> Dict[str, str]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version()}


# --- Main ---------------------------------------------------------------------------------


def bench_issues_10_to_13(res: Dict[str, Any], only: Set[str], setup: Setup, work: Path, src: Path, dst: Path,
                          reps: int, revs: Tuple[str, str], cores: bool) -> None:
    """The sections of issues 10-13, each in namespaces of its own, before the
    4 GiB memory test (see main). Their files: ``src/big.bin`` and ``src/small``."""
    big = src / "big.bin"
    size = big.stat().st_size
    if "previous" in only:
        log(f"previous: {revs[1] or 'this code'} and {revs[0]} side by side, {size / GiB:g} GiB and small files")
        bench_previous(res, setup, dst / "previous", big, src / "small", reps, *revs)
    if "fanout" in only:
        disk = work / "disk"  # not a tmpfs: what the sender reads comes from a disk
        disk.mkdir()
        random_file(disk / "fanout.bin", size)
        log(f"fanout: {size / GiB:g} GiB to 3 peers at once and in a row, from {disk} ({fs_type(disk)})")
        bench_fanout(res, setup, dst / "fanout", disk / "fanout.bin", reps)
        shutil.rmtree(disk)
    if "localsend" in only:
        log(f"localsend: {size / GiB:g} GiB from {LOCALSENDD} to tnet and back, and to itself, HTTP and HTTPS")
        bench_localsend(res, setup, dst / "localsend", big, reps, cores)
    if "resume" in only:
        half = src / "half.bin"
        random_file(half, size // 2)
        log(f"resume: {size / GiB:g} GiB, cut at 50 % on a {SHAPED_RATE} link; the sender killed at 50 %")
        bench_resume(res, setup, dst / "resume", big, half, reps)
        half.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer runs (about a minute)")
    parser.add_argument("--reps", type=int, help="repetitions per figure (5; 3 with --quick)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated: {','.join(SECTIONS)}")
    parser.add_argument("--modes", default="veth,loopback", help="veth, loopback or both")
    parser.add_argument("--previous", default=PREVIOUS, help=f"old code of `previous`, a git revision ({PREVIOUS})")
    parser.add_argument("--code", default="", help="new code of `previous`, a git revision (this checkout)")
    parser.add_argument("--one-core-each", action="store_true",
                        help="LocalSend figures with each end of a send on a core of its own")
    parser.add_argument("--json", default=str(ROOT / "bench" / "out" / "results.json"), help="where to write")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, tmpfs)", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    modes = args.modes.split(",")
    reps = args.reps or (3 if args.quick else 5)
    big = 256 * MiB if args.quick else GiB
    huge = GiB if args.quick else 4 * GiB
    small_count = 500 if args.quick else 2000
    each = 25 * MiB if args.quick else 100 * MiB
    ensure_tools()
    # As installed: a clone run under PYTHONDONTWRITEBYTECODE would compile
    # every module again at each CLI start and charge that to tnet.
    run([PYTHON, "-m", "compileall", "-q", str(ROOT / "tnet")])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below
    res: Dict[str, Any] = {"machine": machine(), "quick": args.quick, "reps": reps}
    setup = Setup()
    work = Path(f"/tmp/{TAG}")
    setup.later(lambda: shutil.rmtree(work, ignore_errors=True))
    began = time.monotonic()
    try:
        src, dst = work / "src", work / "dst"
        mount_tmpfs(setup, src, f"{huge + big + big // 2 + 256 * MiB}")
        mount_tmpfs(setup, dst, f"{huge + 4 * big + 2 * 20 * each}")
        log(f"making files in {src}")
        random_file(src / "big.bin", big)
        smalls = src / "small"
        smalls.mkdir()
        for i in range(small_count):
            (smalls / f"f{i:04d}.bin").write_bytes(os.urandom(4096))
        random_file(src / "each.bin", each)
        concurrent = [src / "each.bin"] + [src / f"each{i:02d}.bin" for i in range(1, 20)]
        for path in concurrent[1:]:
            os.link(src / "each.bin", path)

        first: Tuple[TnetDaemon, TnetDaemon]
        for mode in modes:
            if mode == "veth":
                hosts = veth_pair(setup)
            else:
                hosts = [Host("loop-a", LOOP_A, LOOP_BROADCAST), Host("loop-b", LOOP_B, LOOP_BROADCAST)]
            a, b = start_daemons(setup, hosts, dst / mode)
            scratch = dst / mode / "scratch"
            if "transfer" in only:
                log(f"{mode}: {big / GiB:g} GiB, tnet vs socat, nc, the sha256 floor, iperf3")
                bench_transfer(res, mode, a, b, src / "big.bin", scratch, reps)
            if mode != modes[0]:
                continue  # the rest once, on the first mode
            if "idle" in only:
                log(f"{mode}: idle daemon")
                bench_idle(res, a, 3.0 if args.quick else 10.0)
            if "status" in only:
                log(f"{mode}: tnet status")
                bench_status(res, a, 10)
            first = (a, b)
            if "small" in only:
                log(f"{mode}: {small_count} small files")
                bench_small(res, a, b, smalls, scratch, reps)
            if "concurrent" in only:
                log(f"{mode}: 20 concurrent transfers of {each / MiB:g} MiB")
                bench_concurrent(res, a, b, concurrent, max(3, reps - 2))
        bench_issues_10_to_13(res, only, setup, work, src, dst, reps, (args.previous, args.code), args.one_core_each)
        if "rss" in only:
            # Last of the transfers: writing and freeing gigabytes makes the
            # next minutes' page allocations slower on some virtual machines
            # (the host takes freed memory back), which would skew the ratios.
            log(f"{modes[0]}: peak RSS")
            with open(src / "huge.bin", "wb") as whole:
                for _ in range(huge // big):
                    with open(src / "big.bin", "rb") as part:
                        shutil.copyfileobj(part, whole, 4 * MiB)
            bench_rss(res, *first, [src / "big.bin", src / "huge.bin"])
            os.unlink(src / "huge.bin")
        if "discovery" in only:
            log("discovery: 20 daemons on one bridge")
            bench_discovery(res, setup, dst / "discovery", reps)
    finally:
        setup.teardown()
    res["seconds"] = round(time.monotonic() - began, 1)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    m = res["machine"]
    print(f"\n{m['nproc']} × {m['cpu']}, Linux {m['kernel']}, Python {m['python']}; {reps} runs each, "
          f"{res['seconds']:.0f} s in all\n")
    print(table(res))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
