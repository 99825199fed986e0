"""The two ways to run tnet: from a clone, and as an installed command."""

from __future__ import annotations

import subprocess
import sys
import venv

from conftest import ROOT, base_env

import tnet


def test_runs_from_a_clone_with_nothing_installed(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tnet", "--version"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(base_env(), PYTHONPATH=""), timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"tnet {tnet.__version__}"


def test_pip_install_gives_a_tnet_command(tmp_path):
    venv.create(tmp_path / "v", with_pip=True)
    python = tmp_path / "v" / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    out = subprocess.run([str(tmp_path / "v" / "bin" / "tnet"), "--help"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=dict(base_env(), PYTHONPATH=""))
    assert out.returncode == 0 and "exit codes" in out.stdout
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            timeout=60)
    assert [line for line in listed.stdout.splitlines() if not line.startswith(("pip==", "setuptools==", "tnet=="))] \
        == [], "tnet must install no runtime dependency"
