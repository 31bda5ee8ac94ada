"""First contact (issue 21, item 9): `./dev` as a new user meets it, run for real with harmless
commands (never `test`), and the packaging every install reads.

The commands that install run against a throw-away VENV, so they never touch the checkout's
.venv; they are skipped where Mosquitto is missing, since `./dev` would install it as root."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedasync_iot.fleet._broker import mosquitto_path
from fedasync_iot.models._config import tomllib

ROOT = Path(__file__).resolve().parents[1]
needs_mosquitto = pytest.mark.skipif(mosquitto_path() is None,
                                     reason="./dev would install mosquitto")

# What `python3 -m venv` prints on Debian/Ubuntu when python3-venv is missing (Debian 12), after
# it made DIR/bin/python; then it exits 1.
DEBIAN_NO_VENV = """\
The virtual environment was not created successfully because ensurepip is not
available.  On Debian/Ubuntu systems, you need to install the python3-venv
package using the following command.

    apt install python3.11-venv

You may need to use sudo with that command.  After installing the python3-venv
package, recreate your virtual environment.
"""


def dev(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "dev"), *args], capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("ask", ["help", "--help", "-h"])
def test_help_lists_the_commands_and_exits_0(ask: str) -> None:
    done = dev(ask)

    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.startswith("usage: ./dev COMMAND [ARGS...]\n")
    commands = re.findall(r"^  (\w+)", done.stdout, flags=re.MULTILINE)
    assert commands == ["test", "demo", "setup", "help"]
    assert "set -euo" not in done.stdout


@pytest.mark.parametrize("argv", [["frobnicate"], []])
def test_an_unknown_or_missing_command_exits_2_with_the_usage(argv: list[str]) -> None:
    done = dev(*argv)

    assert (done.returncode, done.stdout) == (2, "")
    first = "./dev: unknown command 'frobnicate'\n" if argv else ""
    assert done.stderr.startswith(f"{first}usage: ./dev COMMAND"), done.stderr


@needs_mosquitto
def test_demo_help_lists_the_demo_options(tmp_path: Path) -> None:
    """The README says `./dev demo --help` lists the demo's options: fedasync-sim run's, not
    fedasync-sim's list of commands. The VENV is an installed one in all but name: this
    interpreter, and fedasync-sim as its console script would run it."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    sim = venv / "bin" / "fedasync-sim"
    sim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" '
                   '-m fedasync_iot.fleet.cli "$@"\n')
    sim.chmod(0o755)
    (venv / ".installed").touch()
    later = time.time() + 86400  # newer than pyproject.toml, whatever its mtime: no install
    os.utime(venv / ".installed", (later, later))

    done = dev("demo", "--help", env={"VENV": str(venv)})

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fedasync-sim run ")
    for option in ("--devices", "--duration", "--rule", "--seed"):
        assert f"\n  {option} " in done.stdout, option
    assert "`./dev demo --help` lists its options" in (ROOT / "README.md").read_text()


@needs_mosquitto
def test_a_python_without_venv_gets_the_python3_venv_hint(tmp_path: Path) -> None:
    """A bare Debian/Ubuntu has python3 but not python3-venv. This machine has it, so a stand-in
    python3 does what Debian's does (the fault injected); everything else is the real ./dev."""
    python = tmp_path / "python3"
    python.write_text(
        '#!/bin/sh\n[ "$1 $2" = "-m venv" ] || exit 99\n'
        f'mkdir -p "$3/bin" && ln -s "{sys.executable}" "$3/bin/python"\n'
        f"cat <<'EOF'\n{DEBIAN_NO_VENV}EOF\nexit 1\n")
    python.chmod(0o755)
    venv = tmp_path / "venv"

    done = dev("setup", env={"PYTHON": str(python), "VENV": str(venv)})

    assert done.returncode == 1
    assert "apt install python3.11-venv" in done.stderr  # what python3 said, shown
    assert done.stderr.endswith(
        f"!! {python} cannot create a virtual environment: on Debian/Ubuntu install "
        "python3-venv (apt-get install python3-venv), then run ./dev again\n")
    assert not venv.exists()  # a half-made venv would pass for a finished one next time


@needs_mosquitto
def test_a_venv_without_pip_is_named_not_installed_into(tmp_path: Path) -> None:
    """What a failed `python3 -m venv` left before ./dev removed it: a python without pip."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)

    done = dev("setup", env={"VENV": str(venv)})

    assert done.returncode == 1
    assert done.stderr.endswith(
        f"!! {venv} has no pip (left by a failed 'python3 -m venv'?): remove it (rm -rf {venv})"
        " and run ./dev again\n")
    assert not (venv / ".installed").exists()


def test_every_venv_directory_is_ignored_by_git() -> None:
    if shutil.which("git") is None:
        pytest.skip("no git")
    for path in (".venv/bin/python", ".venv-ci/bin/python", ".venv311/pyvenv.cfg"):
        done = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=False)
        if done.returncode == 128:
            pytest.skip(f"not a git checkout: {done.stderr.strip()}")
        assert done.returncode == 0, f"{path} is not ignored"


def test_the_license_is_an_spdx_expression_with_a_setuptools_that_reads_it() -> None:
    """The table form made every install warn (setuptools >= 77 deprecates it); the string
    form needs setuptools >= 77, which the build must then require."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())

    assert pyproject["project"]["license"] == "Apache-2.0"
    minimum = [int(m.group(1)) for r in pyproject["build-system"]["requires"]
               if (m := re.fullmatch(r"setuptools\s*>=\s*(\d+)(\.\d+)*", r))]
    assert len(minimum) == 1 and minimum[0] >= 77, pyproject["build-system"]["requires"]
