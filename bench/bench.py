"""tnet against the wire: throughput, memory, small files, fairness, discovery,
idle cost and CLI latency, each as a ratio to a reference tool measured in the
same run (issue 4).

The "sha256 floor" is bench/floor.py: the least a SHA-256-verified transfer
costs in Python here (sendfile and one hashing read on one side; receive,
hash, write on the other), so that tnet over it is the cost of tnet itself.

Two hosts are two network namespaces joined by a veth pair (mode ``veth``),
or two daemons on 127.231.0.2 and 127.231.0.3 (mode ``loopback``). Discovery
runs 20 daemons in namespaces on one bridge. Every file lives on a tmpfs
mounted here; every destination is deleted before each run, so each tool pays
for allocating new pages. Runs alternate between tools (A B A B ...), and the
median and min-max of each are reported.

Needs root (namespaces, tmpfs) and installs socat, netcat-openbsd, iperf3 and
iproute2 with apt-get when they are missing. Sends nothing anywhere but
loopback and the namespaces it creates, and removes them in a ``finally``.

Usage: bench/run [--quick] [--reps N] [--only SECTION,...] [--json PATH]
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
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MiB = 1024 * 1024
GiB = 1024 * MiB
TAG = f"tnb{os.getpid() % 100000}"  # prefix of every namespace, link and folder we create
PAIR_NET = "10.231.0"  # the veth pair: .1 is host a, .2 is host b
BRIDGE_NET = "10.232.0"  # the discovery bridge: .1 .. .20
LOOP_A, LOOP_B = "127.231.0.2", "127.231.0.3"  # outside the 127.1-200.x.x the tests use
LOOP_BROADCAST = "127.255.255.255"
SECTIONS = ("transfer", "rss", "small", "concurrent", "discovery", "idle", "status")
TOOL_TIMEOUT_S = 300  # one run of any tool; a hang ends the bench instead of stalling it


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(cmd: List[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def median_range(values: List[float]) -> Dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def ensure_tools() -> None:
    packages = {"socat": "socat", "nc": "netcat-openbsd", "iperf3": "iperf3", "ip": "iproute2", "ss": "iproute2"}
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
    """A place to run processes: a network namespace, or the loopback."""

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


class TnetDaemon:
    """One ``tnet daemon`` with its folders on the bench's tmpfs."""

    def __init__(self, host: Host, work: Path, broadcast_port: int) -> None:
        self.host = host
        self.dir = work / host.name
        self.downloads = self.dir / "Downloads"
        self.temp = self.dir / "tmp"
        self.temp.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("TNET", "BIND_", "BROADCAST_"))}
        self.env.update({
            "PYTHONPATH": str(ROOT),
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
        })
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "TnetDaemon":
        log_file = open(self.dir / "daemon.log", "ab")
        self.proc = self.host.popen([PYTHON, "-m", "tnet", "daemon"], env=self.env, stdout=log_file,
                                    stderr=log_file, cwd=self.dir)
        log_file.close()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.host.name} exited: {(self.dir / 'daemon.log').read_text()}")
            if self.cli("status", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"daemon {self.host.name} does not answer")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """The CLI talks to the daemon over its UNIX socket: no namespace needed."""
        return subprocess.run([PYTHON, "-m", "tnet", *args], env=self.env, capture_output=True, text=True,
                              check=check, cwd=self.dir, timeout=TOOL_TIMEOUT_S)

    def clean_downloads(self) -> None:
        shutil.rmtree(self.downloads, ignore_errors=True)
        self.downloads.mkdir()

    def proc_status(self, field: str) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return int(Path(f"/proc/{self.proc.pid}/schedstat").read_text().split()[0]) / 1e9

    def reset_peak_rss(self) -> None:
        assert self.proc is not None
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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


def veth_pair(setup: Setup) -> List[Host]:
    a, b = f"{TAG}a", f"{TAG}b"
    make_netns(setup, a)
    make_netns(setup, b)
    run(["ip", "link", "add", "veth0", "netns", a, "type", "veth", "peer", "name", "veth0", "netns", b])
    hosts = []
    for ns, n in ((a, 1), (b, 2)):
        run(["ip", "-n", ns, "addr", "add", f"{PAIR_NET}.{n}/24", "dev", "veth0"])
        run(["ip", "-n", ns, "link", "set", "veth0", "up"])
        hosts.append(Host(f"host-{'ab'[n - 1]}", f"{PAIR_NET}.{n}", f"{PAIR_NET}.255", ns))
    return hosts


def bridged_hosts(setup: Setup, count: int) -> List[Host]:
    switch = f"{TAG}sw"
    make_netns(setup, switch)
    run(["ip", "-n", switch, "link", "add", "br0", "type", "bridge"])
    run(["ip", "-n", switch, "link", "set", "br0", "up"])
    hosts = []
    for i in range(1, count + 1):
        ns = f"{TAG}n{i}"
        make_netns(setup, ns)
        run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", switch])
        run(["ip", "-n", switch, "link", "set", f"p{i}", "master", "br0", "up"])
        run(["ip", "-n", ns, "addr", "add", f"{BRIDGE_NET}.{i}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        hosts.append(Host(f"node-{i}", f"{BRIDGE_NET}.{i}", f"{BRIDGE_NET}.255", ns))
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
    receiver.clean_downloads()
    seconds = timed(lambda: sender.cli("send", "--json", receiver.host.address, *map(str, paths)))
    receiver.clean_downloads()
    return seconds


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
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
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
        if server.poll() is None:
            server.kill()
            server.wait()
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
        for d in (a, b):
            d.reset_peak_rss()
        seconds = tnet_send(a, b, src)
        size = src.stat().st_size
        out[str(size)] = {"sender_MiB": a.proc_status("VmHWM") / 1024, "receiver_MiB": b.proc_status("VmHWM") / 1024,
                          "MB_per_s": size / seconds / 1e6}
        log(f"  {size / GiB:g} GiB: peak RSS sender {out[str(size)]['sender_MiB']:.1f} MiB, "
            f"receiver {out[str(size)]['receiver_MiB']:.1f} MiB, {size / seconds / 1e6:.0f} MB/s")
    res["rss"] = out


def bench_small(res: Dict[str, Any], a: TnetDaemon, b: TnetDaemon, folder: Path, scratch: Path,
                reps: int) -> None:
    ha, hb = a.host, b.host
    times: Dict[str, List[float]] = {"tnet": [], "tar|socat|tar": []}
    for rep in range(reps):
        times["tnet"].append(tnet_send(a, b, folder))
        times["tar|socat|tar"].append(piped(
            ha, hb, f"tar c -C {folder.parent} {folder.name} | socat -u - TCP:{{addr}}:{{port}}",
            "socat -u TCP-LISTEN:{port},bind={addr},reuseaddr - | tar x -C {dest}", scratch))
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
        sock.sendall(json.dumps({"cmd": "send", "peer": b.host.address, "paths": [str(f)]}).encode() + b"\n")
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
    hosts = bridged_hosts(setup, 20)
    port = free_udp_port()
    daemons = [TnetDaemon(h, work, port) for h in hosts]
    for d in daemons:
        setup.later(d.stop)
        d.start()
    for d in daemons:
        d.wait_ready()
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


# --- The table ------------------------------------------------------------------------------


def fmt(m: Dict[str, Any], scale: float = 1.0, digits: int = 0) -> str:
    return f"{m['median'] * scale:.{digits}f} ({m['min'] * scale:.{digits}f}–{m['max'] * scale:.{digits}f})"


def table(res: Dict[str, Any]) -> str:
    rows = [("figure", "tnet median (min–max)", "reference", "ref median (min–max)", "ratio", "target", "met")]

    def row(figure: str, tnet: str, ref: str, refval: str, ratio: float, target: str, met: bool) -> None:
        rows.append((figure, tnet, ref, refval, f"{ratio:.2f}", target, ("yes" if met else "NO") if target else ""))

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
                f"{m['sender_MiB']:.1f} / {m['receiver_MiB']:.1f}", "limit", "48", peak / 48, "< 1", peak < 48)
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
    cells = [[cell.replace("|", "\\|") for cell in r] for r in rows]  # a Markdown table
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine() -> Dict[str, str]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version()}


# --- Main ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer runs (about a minute)")
    parser.add_argument("--reps", type=int, help="repetitions per figure (5; 3 with --quick)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated: {','.join(SECTIONS)}")
    parser.add_argument("--modes", default="veth,loopback", help="veth, loopback or both")
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
        mount_tmpfs(setup, src, f"{huge + big + 256 * MiB}")
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
            port = free_udp_port()
            a, b = (TnetDaemon(h, dst / mode, port).start() for h in hosts)
            setup.later(a.stop)
            setup.later(b.stop)
            a.wait_ready()
            b.wait_ready()
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
