"""scripts/setup.sh on a stand-in venv whose python only records what it is asked: pip runs when the package is
not installed from this checkout or pyproject.toml changed, and not on a rerun."""

import shutil
import stat
import subprocess

from helpers.ranks import ROOT

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "{log}"
case "$*" in
  "-m pip install -q -e .[dev]") touch "{installed}" ;;
  *"import aletheia_ds, os"*) [ -f "{installed}" ] && echo "{checkout}" ;;
  *"import torch, deepspeed"*) echo "ready: (stand-in)" ;;
esac
exit 0
"""


def test_setup_skips_pip_when_installed_from_this_checkout_and_pyproject_unchanged(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", checkout / "scripts" / "setup.sh")
    (checkout / "pyproject.toml").write_text('[project]\nname = "aletheia-ds"\n')
    bin_dir = checkout / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    log, installed = tmp_path / "calls.log", tmp_path / "installed"
    python = bin_dir / "python"
    python.write_text(FAKE_PYTHON.format(log=log, installed=installed, checkout=checkout))
    python.chmod(python.stat().st_mode | stat.S_IXUSR)

    def setup() -> tuple[str, list[str]]:
        log.write_text("")
        proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=checkout, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout, [call for call in log.read_text().splitlines() if call.startswith("-m pip")]

    out, pip = setup()
    assert "-m pip install -q -e .[dev]" in pip and "installing aletheia_ds" in out
    out, pip = setup()  # a rerun: nothing to install
    assert pip == [] and "already installed from this checkout" in out and "ready:" in out
    (checkout / "pyproject.toml").write_text('[project]\nname = "aletheia-ds"\ndependencies = ["trl"]\n')
    out, pip = setup()  # new dependencies: pip again
    assert "-m pip install -q -e .[dev]" in pip
    installed.unlink()  # the venv imports the package from elsewhere (another checkout): pip again
    out, pip = setup()
    assert "-m pip install -q -e .[dev]" in pip
