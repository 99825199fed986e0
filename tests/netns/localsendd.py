"""The third-party LocalSend peer ``localsendd`` in the lab's namespaces.

This module holds:

* ``localsendd_bin()``: the folder of a virtualenv at ``<repo>/.venv-localsendd``
  (ignored by git) holding ``localsendd`` and ``localsendctl`` at the version
  the tests were written against, made once with a Python >= 3.11 (pyenv's,
  else one on PATH) and reused while its marker file names that version;
* ``Localsendd``: one such daemon started inside a lab host's namespace, with
  its own alias, port, download, state and config folders and control socket,
  over HTTPS or plain HTTP, and helpers that run ``localsendctl`` against it.

It must never start ``localsendd`` outside a lab namespace: the daemon joins
the LocalSend multicast group and announces itself on whatever interface the
routing table gives it, so in the host's own namespace it would talk on eth0.
``Localsendd.start`` refuses a host without a namespace for that reason.

``localsendd`` joins the multicast group through the routing table (no
interface is named), so its hosts need ``make_lab(..., default_route=True)``;
without a route it falls back to probing port 53317 across a /24.

Where the virtualenv cannot be made (no Python >= 3.11, no access to the
package index) the tests are skipped, except under CI=true, where that is a
failure (``skip_or_fail``).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from conftest import ROOT, base_env, wait_until
from netns import Host, skip_or_fail

REQUIREMENT = "localsendd==0.1.1"  # the version whose behaviour the tests expect
VENV = ROOT / ".venv-localsendd"  # under .gitignore's /.venv*/
_MARKER = VENV / "installed"  # written last: a venv without it is half made
_LOCK = ROOT / ".venv-localsendd.lock"  # a folder, so .gitignore covers it too; outlives a rebuilt venv
MIN_PYTHON = (3, 11)  # localsendd's Requires-Python (it reads TOML with tomllib)
LOCALSEND_PORT = 53317  # the protocol's default TCP port; localsendd's UDP port is always this one
INSTALL_TIMEOUT_S = 600.0  # a cold pip install of one small wheel, on a slow mirror
START_TIMEOUT_S = 30.0  # HTTPS mode makes an RSA key with openssl first
CTL_TIMEOUT_S = 60.0  # one localsendctl call that does not wait for a transfer
SEND_TIMEOUT_S = 600.0  # `send --wait` has no deadline of its own
POLL_INTERVAL_S = 0.2  # each poll starts a localsendctl process: not 100 a second
_ENV_PREFIXES = ("LOCALSEND", "XDG_")  # inherited settings the daemon would read


def find_python() -> Optional[str]:
    """The newest Python >= 3.11: pyenv's versions first, then python3.1x on PATH."""
    candidates: List[str] = []
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    if shutil.which("pyenv"):
        out = subprocess.run(["pyenv", "root"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            pyenv_root = out.stdout.strip()
    candidates += sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.1[1-9].*", "bin", "python")),
                         key=_version_key, reverse=True)
    candidates += [p for p in (shutil.which(f"python3.{minor}") for minor in (13, 12, 11)) if p]
    if sys.version_info >= MIN_PYTHON:
        candidates.append(sys.executable)
    for python in candidates:
        if os.access(python, os.X_OK):
            return python
    return None


def _version_key(path: str) -> List[int]:
    version = Path(path).parent.parent.name  # .../versions/3.12.1/bin/python
    return [int(part) if part.isdigit() else -1 for part in version.split(".")]


def localsendd_bin() -> Path:
    """The venv's bin folder, making the venv first if need be. A lock on a
    folder beside it keeps two test runs from building it at once."""
    bin_dir = VENV / "bin"
    if _installed():
        return bin_dir
    python = find_python()
    if python is None:
        skip_or_fail("localsendd needs Python >= 3.11 and none was found (pyenv or python3.1x on PATH)")
    _LOCK.mkdir(parents=True, exist_ok=True)
    lock = os.open(_LOCK, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed():
            _build(str(python))
    finally:
        os.close(lock)
    return bin_dir


def _installed() -> bool:
    try:
        return _MARKER.read_text().strip() == REQUIREMENT and os.access(VENV / "bin" / "localsendd", os.X_OK)
    except OSError:
        return False


def _build(python: str) -> None:
    shutil.rmtree(VENV, ignore_errors=True)
    steps = [[python, "-m", "venv", str(VENV)],
             [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", REQUIREMENT]]
    for cmd in steps:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            skip_or_fail(f"cannot install {REQUIREMENT}: {' '.join(cmd)} took over {INSTALL_TIMEOUT_S:.0f} s")
        if out.returncode != 0:
            shutil.rmtree(VENV, ignore_errors=True)
            skip_or_fail(f"cannot install {REQUIREMENT}: {' '.join(cmd)}: {out.stderr.strip()[-500:]}")
    _MARKER.write_text(REQUIREMENT + "\n")


def cert_fingerprint(cert_pem: Path) -> str:
    """A LocalSend HTTPS fingerprint: SHA-256 of the certificate's DER bytes, upper-case hex."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_pem.read_text())).hexdigest().upper()


class Localsendd:
    """One ``localsendd`` in a lab host's namespace, and ``localsendctl`` for it.

    Methods for the caller: ``start``, ``ctl``, ``status``, ``devices``,
    ``wait_for_device``, ``send``, ``log``, ``stop``. ``Lab.close`` ends the
    process with the rest of the lab even when ``stop`` is never called.

    ``unattended=True`` (the default) makes it accept every transfer on its
    own, but only while no control client is attached: a ``localsendctl`` call
    running on the receiver when a transfer is offered turns it into a prompt
    that waits up to 60 s for ``localsendctl accept``.
    """

    def __init__(self, host: Host, alias: str, port: int = LOCALSEND_PORT, https: bool = True,
                 pin: Optional[str] = None, unattended: bool = True) -> None:
        self.host = host
        self.alias = alias
        self.port = port
        self.https = https
        self.pin = pin
        self.unattended = unattended
        self.dir = host.lab.root / f"localsendd-{alias}"
        self.downloads = self.dir / "Downloads"
        self.state_home = self.dir / "state"  # XDG_STATE_HOME: its fingerprint, cert.pem and key.pem
        self.config_home = self.dir / "config"  # XDG_CONFIG_HOME: left empty, so no config.toml is read
        self.socket = os.path.join(host.lab.sockdir, f"lsd-{alias}.sock")  # short: sun_path is limited
        self.log_path = self.dir / "localsendd.log"
        self.bin = localsendd_bin()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return self.host.address

    @property
    def cert_path(self) -> Path:
        return self.state_home / "localsendd" / "cert.pem"

    def env(self) -> Dict[str, str]:
        env = {k: v for k, v in base_env().items() if not k.startswith(_ENV_PREFIXES)}
        env.update({
            "HOME": str(self.dir),  # nothing falls back to the real home folder
            "XDG_STATE_HOME": str(self.state_home),
            "XDG_CONFIG_HOME": str(self.config_home),
            "XDG_RUNTIME_DIR": str(self.dir),
            "LOCALSENDD_SOCKET": self.socket,
        })
        return env

    def command(self) -> List[str]:
        cmd = [str(self.bin / "localsendd"), "--alias", self.alias, "--port", str(self.port),
               "--device-type", "headless", "--download-dir", str(self.downloads), "--socket", self.socket,
               "--encryption" if self.https else "--no-encryption",
               "--unattended" if self.unattended else "--no-unattended",
               "--log-level", "debug", "--no-log-time"]
        if self.pin is not None:
            cmd += ["--pin", self.pin]
        return cmd

    def start(self) -> Localsendd:
        if not self.host.ns:
            raise AssertionError("localsendd runs only inside a lab namespace")
        if self.https and shutil.which("openssl") is None:
            skip_or_fail("localsendd's HTTPS mode needs openssl on PATH")
        for folder in (self.downloads, self.state_home, self.config_home):
            folder.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # ip netns exec execs localsendd: the pid is the daemon's, so terminate() reaches it.
            self.proc = self.host.popen(*self.command(), env=self.env(), stdout=log, stderr=log, cwd=self.dir)
        me = wait_until(self._answering, timeout=START_TIMEOUT_S, what=f"localsendd {self.alias} to answer",
                        interval=POLL_INTERVAL_S)
        protocol = "https" if self.https else "http"
        if me["protocol"] != protocol:  # it falls back to HTTP when it cannot make a certificate
            raise AssertionError(f"localsendd {self.alias} serves {me['protocol']}, not {protocol}:\n{self.log()}")
        return self

    def _answering(self) -> Optional[Dict[str, Any]]:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"localsendd {self.alias} exited {self.proc.returncode}:\n{self.log()}")
        if not os.path.exists(self.socket):
            return None
        out = self.ctl("status", "--json", check=False)
        return json.loads(out.stdout)["self"] if out.returncode == 0 else None

    def ctl(self, *args: str, check: bool = True, timeout: float = CTL_TIMEOUT_S) -> subprocess.CompletedProcess:
        """``localsendctl --socket SOCK ARGS`` inside the host's namespace.
        Exit codes: 0 done (for ``send --wait``: sent), 1 failed or refused,
        2 no readable file, 3 daemon not running."""
        cmd = self.host.exec_args(str(self.bin / "localsendctl"), "--socket", self.socket, *args)
        out = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"localsendctl {' '.join(args)}: exit {out.returncode}: {out.stderr.strip()}")
        return out

    def status(self) -> Dict[str, Any]:
        """``status --json``: keys instanceId, seq, self, incoming, active, result, devices."""
        return json.loads(self.ctl("status", "--json").stdout)

    def devices(self) -> List[Dict[str, Any]]:
        """``devices --json``: each with fingerprint, alias, deviceType, deviceModel,
        ip, port, protocol, download."""
        return json.loads(self.ctl("devices", "--json").stdout)

    def wait_for_device(self, alias: str, timeout: float = 30.0) -> Dict[str, Any]:
        """The peer called ``alias`` once this daemon lists it."""
        def seen() -> Optional[Dict[str, Any]]:
            return next((d for d in self.devices() if d["alias"] == alias), None)
        return wait_until(seen, timeout=timeout, what=f"{self.alias} to discover {alias}",
                          interval=POLL_INTERVAL_S)

    def send(self, *files: Path, to: str, pin: Optional[str] = None,
             timeout: float = SEND_TIMEOUT_S) -> subprocess.CompletedProcess:
        """``send FILES --to TO --wait --quiet``: returns once the transfer ended;
        exit 0 only when the receiver took every file."""
        args = ["send", *map(str, files), "--to", to, "--wait", "--quiet"]
        if pin is not None:
            args += ["--pin", pin]
        return self.ctl(*args, check=False, timeout=timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


__all__ = ["LOCALSEND_PORT", "REQUIREMENT", "Localsendd", "cert_fingerprint", "find_python", "localsendd_bin"]
