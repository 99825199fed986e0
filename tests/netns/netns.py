"""Real hosts for the tests: network namespaces joined by a bridge.

A ``Lab`` builds, for one test:

* a hub namespace holding a bridge, so that nothing is ever added to the
  host's own interfaces;
* one namespace per host, linked to the bridge by a veth pair (``eth0`` on the
  host's side), with a private address 10.x.y.n/24, ``lo`` up and no default
  route: a LAN without a gateway (``Lab(default_route=True)`` gives each host
  ``default dev eth0`` instead, for programs that find their interface through
  the routing table; the bridge still leads nowhere);
* with ``Lab(lans=N)``, N such LANs, each its own bridge and /24, joined by a
  router namespace (``.254`` on each, IPv4 forwarding on, so broadcasts stay
  on their LAN as on any router) and a route on each host to the other LANs
  through it: ``lab.host(name, lan=1)`` puts a host on the second one;
* a ``tnet daemon`` per host, started as
  ``ip netns exec NS unshare --uts sh -c 'hostname NAME; exec python -m tnet daemon'``
  so that it has its own host name and runs with the default BIND_ADDRESS and
  BROADCAST_ADDRESS (its broadcast address comes from its only interface).

Every namespace name carries the test process id and a counter, so runs side
by side never meet. The UNIX sockets and folders live in temp folders on the
shared file system: the test drives each daemon from the host's namespace.
``Lab.close`` kills every process started in the lab's namespaces and deletes
the namespaces (their veths and bridge go with them); the fixture calls it even
when the test fails.

Needs root, ``ip`` and ``unshare``. Without them the tests are skipped, except
when CI=true: there a missing capability is a failure.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from conftest import ROOT, Daemon, base_env, wait_until

_labs = itertools.count(1)
_labs_made = itertools.count()
_PID = os.getpid()


def skip_or_fail(reason: str) -> None:
    """Skip here; in CI a missing capability is a failure, never a skip."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and the namespace tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def require_netns() -> None:
    if os.geteuid() != 0:
        skip_or_fail("network namespaces need root")
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is not installed (scripts/test installs iproute2)")


def run(*cmd: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()}")
    return out


class Host:
    """One namespace on the bridge: its address, its veth, its daemon."""

    def __init__(self, lab: Lab, name: str, ns: str, address: str, port: str, lan: int = 0) -> None:
        self.lab = lab
        self.lan = lan  # which of the lab's LANs (bridges) it is on
        self.name = name  # its host name, set with `hostname` inside unshare --uts
        self.ns = ns
        self.address = address
        self.port = port  # the bridge's end of the veth, in the hub namespace
        self.daemon: Optional[Daemon] = None

    def exec_args(self, *cmd: str) -> List[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return run(*self.exec_args(*cmd), check=check, timeout=timeout)

    def popen(self, *cmd: str, **kwargs: Any) -> subprocess.Popen:
        proc = subprocess.Popen(self.exec_args(*cmd), **kwargs)
        self.lab.procs.append(proc)
        return proc

    def configure(self) -> None:
        """Give eth0 its address, as ``ip addr add`` does by hand: no broadcast
        address is set (the kernel still routes the subnet's)."""
        self.run("ip", "addr", "add", f"{self.address}/24", "dev", "eth0")
        if self.lab.default_route:
            self.run("ip", "route", "add", "default", "dev", "eth0")
        for lan, subnet in enumerate(self.lab.subnets):
            if lan != self.lan:  # the other LANs are behind the router
                self.run("ip", "route", "add", f"{subnet}.0/24", "via", self.lab.router_address(self.lan))

    def link(self, state: str) -> None:
        """``ip link set eth0 up|down`` inside this host."""
        self.run("ip", "link", "set", "eth0", state)


class NsDaemon(Daemon):
    """A ``tnet daemon`` in a namespace: its own host name, default network settings."""

    def __init__(self, host: Host, root: Path, sockdir: str, env: Dict[str, str]) -> None:
        super().__init__(root, sockdir, host.name, host.address, 0, env)
        self.host = host
        for var in ("BIND_ADDRESS", "BROADCAST_ADDRESS", "BROADCAST_PORT", "HOST_NAME"):
            if var not in env:
                del self.env[var]  # the defaults: what a real host runs with

    def start(self) -> NsDaemon:
        cmd = self.host.exec_args("unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.name,
                                  sys.executable, "-m", "tnet", "daemon")
        with open(self.log_path, "ab") as log:
            # ip netns exec, unshare and sh each exec the next: the pid is the daemon's.
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log, cwd=self.dir)
        self.host.lab.procs.append(self.proc)
        wait_until(lambda: self.alive_and_answering(), what=f"daemon {self.name} to answer")
        return self


class Lab:
    """Namespaces on one bridge (or ``lans`` bridges and a router), for one test."""

    def __init__(self, root: Path, default_route: bool = False, lans: int = 1) -> None:
        self.root = root
        self.default_route = default_route
        self.n = next(_labs)
        self.prefix = f"tn{_PID}n{self.n}"
        self.subnet = f"10.{1 + self.n % 250}.{_PID % 250}"
        # Every LAN a /24 of its own; the namespaces keep labs apart, the numbers keep logs readable.
        self.subnets = [self.subnet] + [f"172.{16 + lan}.{_PID % 250}" for lan in range(1, lans)]
        self.router = ""  # its namespace, when there are several LANs
        self.sockdir = tempfile.mkdtemp(prefix="tn")  # short: UNIX socket paths are limited
        self.namespaces: List[str] = []
        self.procs: List[subprocess.Popen] = []
        self.hosts: List[Host] = []
        self.hub = ""

    def build(self) -> None:
        """The hub namespace and its bridge."""
        self.hub = self.add_namespace("h")
        for lan in range(len(self.subnets)):
            run("ip", "-n", self.hub, "link", "add", f"br{lan}", "type", "bridge")
            run("ip", "-n", self.hub, "link", "set", f"br{lan}", "up")
        if len(self.subnets) > 1:
            self.build_router()

    def build_router(self) -> None:
        """A namespace with a leg on each LAN (``eth<lan>``, address .254) that forwards IPv4 between them."""
        self.router = self.add_namespace("r")
        for lan in range(len(self.subnets)):
            leg = f"eth{lan}"
            run("ip", "-n", self.hub, "link", "add", f"r{lan}", "type", "veth", "peer", "name", leg,
                "netns", self.router)
            run("ip", "-n", self.hub, "link", "set", f"r{lan}", "master", f"br{lan}")
            run("ip", "-n", self.hub, "link", "set", f"r{lan}", "up")
            run("ip", "-n", self.router, "addr", "add", f"{self.router_address(lan)}/24", "dev", leg)
            run("ip", "-n", self.router, "link", "set", leg, "up")
        # Per namespace: writing it from inside the router's changes only the router.
        run("ip", "netns", "exec", self.router, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")

    def router_address(self, lan: int) -> str:
        return f"{self.subnets[lan]}.254"

    def add_namespace(self, tag: str) -> str:
        ns = f"{self.prefix}{tag}"
        run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def host(self, name: str, configure: bool = True, lan: int = 0) -> Host:
        """A new namespace on the bridge of LAN ``lan``, called ``name``; no daemon yet."""
        index = len(self.hosts) + 1
        ns = self.add_namespace(f"x{index}")
        port = f"v{index}"
        # Created from inside the hub: the host's namespace never sees either end.
        run("ip", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "-n", self.hub, "link", "set", port, "master", f"br{lan}")
        run("ip", "-n", self.hub, "link", "set", port, "up")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        host = Host(self, name, ns, f"{self.subnets[lan]}.{index}", port, lan)
        self.hosts.append(host)
        if configure:
            host.configure()
        return host

    def daemon(self, name: str, start: bool = True, configure: bool = True, lan: int = 0, **env: str) -> NsDaemon:
        """A host called ``name`` on LAN ``lan`` running a daemon; ``env`` adds
        variables. ``configure=False``: its eth0 gets no address yet (see Host.configure)."""
        host = self.host(name, configure, lan)
        host.daemon = NsDaemon(host, self.root, self.sockdir, env)
        return host.daemon.start() if start else host.daemon

    def close(self) -> None:
        for host in self.hosts:
            if host.daemon is not None:
                for reader in host.daemon.readers:
                    reader.close()
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                    proc.terminate()
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for ns in reversed(self.namespaces):
            # Anything left running in our namespaces was started by this lab.
            pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.sockdir, ignore_errors=True)


_STALE = re.compile(r"(tn(\d+)n\d+(?:h|r|x\d+))(?:\s|$)")  # the names Lab gives


def remove_stale_namespaces() -> None:
    """Delete the namespaces of an earlier run that was killed before its
    finalizer could (its process id is gone)."""
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        match = _STALE.match(line)
        if match and int(match.group(2)) != _PID and not os.path.exists(f"/proc/{match.group(2)}"):
            run("ip", "netns", "del", match.group(1), check=False)


def make_lab(tmp_path: Path, default_route: bool = False, lans: int = 1):
    """Generator for the ``lab`` fixture: skips (or fails in CI) where
    namespaces cannot be made, and tears everything down afterwards.
    ``default_route``, ``lans``: see ``Lab`` (pytest leaves a parameter with a default alone)."""
    require_netns()
    if next(_labs_made) == 0:
        remove_stale_namespaces()
    lab = Lab(tmp_path, default_route, lans)
    try:
        try:
            lab.build()
        except (RuntimeError, OSError) as exc:
            # Root without CAP_SYS_ADMIN (a container), or a kernel without bridges.
            skip_or_fail(f"cannot build network namespaces: {exc}")
        yield lab
    finally:
        lab.close()


__all__ = ["Host", "Lab", "NsDaemon", "ROOT", "base_env", "make_lab", "require_netns", "run", "skip_or_fail"]
